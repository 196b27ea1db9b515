//! What the last worker of a run does once it has left it: settles the task's runs that
//! are over (see `pipeline`: outcome, callback, downstream cycles asked for) and starts
//! the cycles they asked for. A failed callback's retry that falls due within
//! `chunkwise.retry_wait_max` is waited for here, as a run waits for its items' retries;
//! a later one is left to the task's next run or cycle.
//!
//! A worker that starts so late that its run's shared segment is gone (the launcher
//! stopped waiting for it after `STARTUP_TIMEOUT`, and every worker that joined has left)
//! does the same in the last worker's stead: the launcher counted it in, so none of those
//! that left was the last one out, and nobody announced or settled the run.

use std::time::Duration;

use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;

use super::{WorkerArgs, report_waiting, signals};
use crate::catalog::Task;
use crate::error::SqlResult;
use crate::gucs;
use crate::latch;
use crate::notify;
use crate::pipeline::downstream::start_requested;
use crate::pipeline::settle::{Settler, next_callback_retry, settle_runs};
use crate::retention;
use crate::security::as_extension_owner;
use crate::transaction::in_transaction_or_error;

/// Settles after run `run_id` of `task`; errors are logged, never raised: the worker is
/// leaving, and what is not settled stays armed for the next run or cycle.
pub fn follow_up(task: &Task, run_id: i64) {
    settle_after(task, run_id, false);
}

/// The last worker's part, done by a worker that found its run's segment gone (see the
/// module above): it connects, announces the end of the run and settles it.
pub fn stand_in_for_the_last_worker(args: &WorkerArgs) {
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(args.database), Some(args.owner));
    let Ok(Some(task)) = in_transaction_or_error(|| Task::by_id(args.task_id)) else {
        return;
    };
    latch::cancels_held(|| {
        log!(
            "pg_chunkwise worker of task \"{}\" started after the other workers of run {} had left; it settles the run in the last one's stead",
            task.name,
            args.run_id
        )
    });
    settle_after(&task, args.run_id, true);
}

/// Settles the task's runs that are over, run `run_id` first among them; with
/// `announce`, also announces that run's end (once: only while it is armed and was never
/// settled, and not while another settler holds it).
fn settle_after(task: &Task, run_id: i64, mut announce: bool) {
    loop {
        // The next callback retry is looked up in the settling's own transaction.
        let Some((requested, next_retry)) = committed(task, "settle its runs", || {
            if std::mem::take(&mut announce) && claim_unsettled(run_id)? {
                notify::run_finished(run_id)?;
                retention::apply(task.id)?;
            }
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
        latch::nap(Some(Duration::from_secs_f64(retry_in.max(0.0))));
        if signals::stop_signalled() {
            return;
        }
    }
}

/// Locks run `run_id` if it was never settled (nor tried: a failed callback counts) and no
/// other settler holds it; true when it did.
fn claim_unsettled(run_id: i64) -> SqlResult<bool> {
    as_extension_owner(|| {
        Spi::connect_mut(|client| -> SqlResult<bool> {
            let locked = client.update(
                "SELECT FROM chunkwise.run_history \
                  WHERE run_id = $1 AND followup = 'armed' AND followup_attempts = 0 \
                    FOR UPDATE SKIP LOCKED",
                None,
                &[run_id.into()],
            )?;
            Ok(!locked.is_empty())
        })
    })
}

/// Runs `body` in a transaction of its own; `None` (logged) when it fails.
fn committed<R>(task: &Task, what: &str, body: impl FnOnce() -> SqlResult<R>) -> Option<R> {
    in_transaction_or_error(body)
        .map_err(|(sqlstate, message)| {
            latch::cancels_held(|| warning!(
                "pg_chunkwise worker of task \"{}\": it could not {what} [SQLSTATE {sqlstate}]: {message}; \
                 the task's next run or cycle does it",
                task.name
            ))
        })
        .ok()
}
