//! Running one item's target (and `after`) in a subtransaction of the worker's
//! transaction: a failure rolls back that item alone and the worker goes on.

use std::panic::AssertUnwindSafe;

use pgrx::JsonB;
use pgrx::prelude::*;

use super::discarding_plan::DiscardingPlan;
use super::queue::ClaimedItem;
use super::signals;
use crate::error::SqlError;
use crate::raised::{RaisedCodeWatch, RaisedError};
use crate::target::Target;
use crate::transaction::{GucScope, SavedIdentity, StatementTimer, Subtransaction};

pub enum ItemOutcome {
    Done,
    Failed(RaisedError),
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

    /// Runs the target for `item` through SPI as the current user (the task owner). An
    /// ERROR inside raises as usual; what pgrx or the plan refuses is returned.
    fn execute(&mut self, item: &ClaimedItem) -> Result<(), SqlError> {
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
        let subtransaction = Subtransaction::begin();
        let timeout_ms = self.timeout_ms;
        let watch = RaisedCodeWatch::push();
        let raised = &watch;
        let outcome = PgTryBuilder::new(AssertUnwindSafe(|| {
            let identity = SavedIdentity::current();
            let settings = GucScope::new();
            let timer = StatementTimer::arm(timeout_ms);
            let ran = self.run_targets(item);
            // Undone as at the end of a function: the timer, the settings the target
            // made, a role it set.
            drop(timer);
            drop(settings);
            drop(identity);
            match ran {
                Ok(()) => {
                    // SAFETY: the item's subtransaction is the current one, in good state.
                    unsafe { subtransaction.release() };
                    ItemOutcome::Done
                }
                Err(refused) => {
                    // SAFETY: as above.
                    unsafe { subtransaction.roll_back() };
                    ItemOutcome::Failed(RaisedError::from(refused))
                }
            }
        }))
        .catch_others(move |caught| {
            // SAFETY: as in PL/pgSQL: roll the item's subtransaction back, which also
            // restores settings and identity.
            unsafe { subtransaction.roll_back() };
            ItemOutcome::Failed(RaisedError::caught(caught, raised.last_raised()))
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

impl Targets {
    /// The target, then `after`.
    fn run_targets(&mut self, item: &ClaimedItem) -> Result<(), SqlError> {
        self.target.execute(item)?;
        match self.after.as_mut() {
            Some(after) => after.execute(item),
            None => Ok(()),
        }
    }
}
