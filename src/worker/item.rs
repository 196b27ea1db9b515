//! Running one item's target (and `after`) in a subtransaction of the worker's
//! transaction: a failure rolls back that item alone and the worker goes on.

use std::ffi::CStr;
use std::time::Instant;

use pgrx::JsonB;
use pgrx::prelude::*;

use super::claim::ClaimedItem;
use super::discarding_plan::DiscardingPlan;
use crate::error::SqlError;
use crate::latch;
use crate::raised::RaisedError;
use crate::target::Target;
use crate::transaction::{OnSuccess, StatementTimer, in_subtransaction};

pub enum ItemOutcome {
    Done,
    Failed(RaisedError),
    /// Cancelled by `item_timeout`.
    TimedOut(RaisedError),
}

/// The SQLSTATE of a cancelled statement (a timeout, or pg_cancel_backend).
const QUERY_CANCELED: &str = "57014";

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

    /// Runs the item in a subtransaction, under `lock_timeout` when given. Whatever the
    /// target changes in the session (SET, SET ROLE, search_path, session advisory locks,
    /// temporary tables, prepared statements) is undone before the next item.
    pub fn execute(&mut self, item: &ClaimedItem, lock_timeout: Option<&CStr>) -> ItemOutcome {
        let timeout_ms = self.timeout_ms;
        let started = Instant::now();
        let outcome = in_subtransaction(OnSuccess::Keep, |settings| {
            if let Some(lock_timeout) = lock_timeout {
                settings.set(c"lock_timeout", lock_timeout);
            }
            let _timer = StatementTimer::arm(timeout_ms);
            self.run_targets(item)
        });
        latch::forget_cancel();
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
        match outcome {
            Ok(()) => ItemOutcome::Done,
            // A cancel once item_timeout has passed is the timer's (a user's cancel at
            // that moment would be taken for it, which only makes it split or retry).
            Err(failure)
                if failure.sqlstate == QUERY_CANCELED
                    && timeout_ms.is_some_and(|ms| started.elapsed().as_millis() >= ms as u128) =>
            {
                ItemOutcome::TimedOut(failure)
            }
            Err(failure) => ItemOutcome::Failed(failure),
        }
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
