//! What the last worker of a run does once it has left it: settles the task's runs that
//! are over (see `pipeline`: outcome, callback, downstream cycles asked for) and starts
//! the cycles they asked for. A failed callback's retry that falls due within
//! `chunkwise.retry_wait_max` is waited for here, as a run waits for its items' retries;
//! a later one is left to the task's next run or cycle.

use std::time::Duration;

use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;

use super::{report_waiting, signals};
use crate::catalog::Task;
use crate::error::SqlResult;
use crate::gucs;
use crate::pipeline::downstream::start_requested;
use crate::pipeline::settle::{Settler, next_callback_retry, settle_runs};
use crate::transaction::in_transaction_or_error;

/// Settles after run `run_id` of `task`; errors are logged, never raised: the worker is
/// leaving, and what is not settled stays armed for the next run or cycle.
pub fn follow_up(task: &Task, run_id: i64) {
    loop {
        // The next callback retry is looked up in the settling's own transaction.
        let Some((requested, next_retry)) = committed(task, "settle its runs", || {
            let requested = settle_runs(task, Settler::LastWorkerOf(run_id))?;
            Ok((requested, next_callback_retry(task.id)?))
        }) else {
            return;
        };
        if !requested.is_empty() {
            committed(task, "start the tasks it asked for", || {
                start_requested(&requested)
            });
        }
        let Some(retry_in) = next_retry else {
            return;
        };
        if retry_in > f64::from(gucs::retry_wait_max_secs()) {
            return;
        }
        report_waiting(&format!(
            "task {}: waiting {retry_in:.1} s to retry a callback",
            task.name
        ));
        let alive =
            BackgroundWorker::wait_latch(Some(Duration::from_secs_f64(retry_in.max(0.001))));
        if !alive || signals::stop_signalled() {
            return;
        }
    }
}

/// Runs `body` in a transaction of its own; `None` (logged) when it fails.
fn committed<R>(task: &Task, what: &str, body: impl FnOnce() -> SqlResult<R>) -> Option<R> {
    in_transaction_or_error(body)
        .map_err(|(sqlstate, message)| {
            warning!(
                "pg_chunkwise worker of task \"{}\": it could not {what} [SQLSTATE {sqlstate}]: {message}; \
                 the task's next run or cycle does it",
                task.name
            )
        })
        .ok()
}
