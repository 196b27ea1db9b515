//! Running one item's target (and `after`) in a subtransaction of the worker's
//! transaction: a failure rolls back that item alone and the worker goes on.

use std::panic::AssertUnwindSafe;

use pgrx::JsonB;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;

use super::discarding_plan::DiscardingPlan;
use super::queue::ClaimedItem;
use super::raised_code::RaisedCodeWatch;
use super::signals;
use crate::error::{excerpt_of, sqlstate, sqlstate_of};
use crate::subxact::Subtransaction;
use crate::target::Target;

// utils/timeout.h, which pgrx does not bind. STATEMENT_TIMEOUT is the fourth TimeoutId
// in every supported PostgreSQL version; InitPostgres registers its handler.
const STATEMENT_TIMEOUT: u32 = 3;
unsafe extern "C-unwind" {
    fn enable_timeout_after(id: u32, delay_ms: i32);
    fn disable_timeout(id: u32, keep_indicator: bool);
}

/// Characters of a target's error message kept in the queue and the log.
const FAILURE_MESSAGE_CHARS: usize = 2000;

/// Why an item's attempt failed, as it is recorded and logged.
#[derive(Debug, Clone)]
pub struct ItemFailure {
    pub sqlstate: String,
    pub message: String,
}

impl ItemFailure {
    /// The failure of a caught error. `raised` is the code a [`RaisedCodeWatch`] saw:
    /// the report's own code, unless pgrx could not name it (a user-defined SQLSTATE,
    /// which it turns into XX000).
    pub fn caught(caught: CaughtError, raised: i32) -> Self {
        match caught {
            CaughtError::PostgresError(report)
            | CaughtError::ErrorReport(report)
            | CaughtError::RustPanic {
                ereport: report, ..
            } => {
                let code = report.sql_error_code();
                let sqlstate = if raised != 0 && PgSqlErrorCode::from(raised) == code {
                    sqlstate_of(raised)
                } else {
                    sqlstate(code)
                };
                ItemFailure {
                    sqlstate,
                    message: excerpt_of(report.message(), FAILURE_MESSAGE_CHARS).into_owned(),
                }
            }
        }
    }
}

pub enum ItemOutcome {
    Done,
    Failed(ItemFailure),
}

/// A target with its plan, prepared on first use and kept for the worker's life.
struct PreparedTarget {
    target: Target,
    plan: Option<DiscardingPlan>,
}

impl PreparedTarget {
    fn new(target: Target) -> Self {
        PreparedTarget { target, plan: None }
    }

    /// Runs the target for `item` through SPI as the current user (the task owner).
    fn execute(&mut self, item: &ClaimedItem) {
        let args = self.target.args(
            item.key,
            item.hi,
            item.payload.as_ref().map(|p| JsonB(p.0.clone())),
        );
        Spi::connect_mut(|_client| {
            let plan = match self.plan.take() {
                Some(plan) => plan,
                None => DiscardingPlan::prepare(&self.target.sql, &self.target.arg_types())?,
            };
            let ran = plan.execute(&args);
            self.plan = Some(plan);
            ran
        })
        .unwrap_or_else(|e| e.raise());
    }
}

/// The task's per-item SQL: the target, then `after`, under `item_timeout`.
pub struct Targets {
    target: PreparedTarget,
    after: Option<PreparedTarget>,
    timeout_ms: Option<i64>,
}

impl Targets {
    pub fn new(target: Target, after: Option<Target>, timeout_ms: Option<i64>) -> Self {
        Targets {
            target: PreparedTarget::new(target),
            after: after.map(PreparedTarget::new),
            timeout_ms,
        }
    }

    /// Runs the item in a subtransaction. Whatever the target changes in the session
    /// (SET, SET ROLE, search_path, session advisory locks, temporary tables, prepared
    /// statements) is undone before the next item.
    pub fn execute(&mut self, item: &ClaimedItem) -> ItemOutcome {
        let mut user = pg_sys::InvalidOid;
        let mut security = 0;
        // SAFETY: reads this backend's current user and security context.
        unsafe { pg_sys::GetUserIdAndSecContext(&mut user, &mut security) };
        let subtransaction = Subtransaction::begin();
        let timeout_ms = self.timeout_ms;
        let watch = RaisedCodeWatch::push();
        let raised = &watch;
        let outcome = PgTryBuilder::new(AssertUnwindSafe(|| {
            // SAFETY: a new GUC nesting level inside the subtransaction; it is popped
            // (discarding the target's settings) before the subtransaction is released.
            let guc_level = unsafe { pg_sys::NewGUCNestLevel() };
            if let Some(ms) = timeout_ms {
                // SAFETY: STATEMENT_TIMEOUT is registered by InitPostgres in every backend.
                unsafe {
                    enable_timeout_after(STATEMENT_TIMEOUT, ms.clamp(1, i64::from(i32::MAX)) as i32)
                };
            }
            self.target.execute(item);
            if let Some(after) = self.after.as_mut() {
                after.execute(item);
            }
            // SAFETY: see above; restoring the identity undoes a SET ROLE the target left;
            // the item's subtransaction is the current one.
            unsafe {
                disable_item_timeout(timeout_ms);
                pg_sys::AtEOXact_GUC(false, guc_level);
                pg_sys::SetUserIdAndSecContext(user, security);
                subtransaction.release();
            }
            ItemOutcome::Done
        }))
        .catch_others(move |caught| {
            // SAFETY: as in PL/pgSQL: roll the item's subtransaction back, which also
            // restores settings and identity.
            unsafe {
                disable_item_timeout(timeout_ms);
                subtransaction.roll_back();
            }
            ItemOutcome::Failed(ItemFailure::caught(caught, raised.last_raised()))
        })
        .execute();
        signals::forget_cancel();
        drop(watch);
        // A session-level advisory lock outlives the subtransaction: one a target took and
        // kept would block every later item that wants it. Let them all go, as
        // pg_advisory_unlock_all() does. (The worker takes none of its own.)
        // SAFETY: releases this backend's session-level user locks; callable any time.
        unsafe { pg_sys::LockReleaseSession(pg_sys::USER_LOCKMETHOD as pg_sys::LOCKMETHODID) };
        // Temporary objects and prepared statements belong to the session too: the next
        // item would find them (42P07, 42P05). Drop them as DISCARD TEMP and DEALLOCATE
        // ALL do. Both are no-ops for a target that made none.
        // SAFETY: called inside the worker's transaction, between items, as those
        // commands call them; they drop only this session's own temporary objects and
        // SQL-level prepared statements (the worker's SPI plans are not among them).
        unsafe {
            pg_sys::DropAllPreparedStatements();
            pg_sys::ResetTempTableNamespace();
        }
        outcome
    }
}

/// Stops the item's statement timer (a cancel it raised too late to interrupt the item
/// is dropped by `signals::forget_cancel`).
///
/// # Safety
/// Must run in a backend, between the item's statements and the worker's next ones.
unsafe fn disable_item_timeout(timeout_ms: Option<i64>) {
    if timeout_ms.is_some() {
        unsafe { disable_timeout(STATEMENT_TIMEOUT, false) };
    }
}
