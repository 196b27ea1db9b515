//! Running: `run` (waits), `start` (returns at once) and `wait`.

use std::time::{Duration, Instant};

use pgrx::datum::Interval;
use pgrx::prelude::*;

use crate::catalog::{self, Task};
use crate::columns::Columns;
use crate::error::{OrRaise, SqlError, SqlResult};
use crate::launcher::{RunSummary, run_task, start_task, wait_on_latch};
use crate::security::{as_extension_owner, may_see};
use crate::transaction::without_keeping_locks;

/// Runs the task's pending items with a pool of background workers and waits for them,
/// reporting progress every `chunkwise.progress_interval`.
#[pg_extern(volatile, parallel_unsafe)]
fn run(
    task: Option<&str>,
    workers: default!(Option<i32>, "NULL"),
    max_items: default!(Option<i64>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(run_id, Option<i64>),
        name!(processed, i64),
        name!(failed, i64),
        name!(dead, i64),
        name!(seconds, f64),
    ),
> {
    let summary = (|| -> SqlResult<RunSummary> {
        let task = without_keeping_locks(|| Task::for_caller(task, "run"))?;
        run_task(&task, workers, max_items)
    })()
    .or_raise();
    TableIterator::once((
        summary.run_id,
        summary.processed,
        summary.failed,
        summary.dead,
        summary.seconds,
    ))
}

/// Starts a run and returns its id once its workers are under way (NULL when nothing is
/// pending or the task is paused). Follow it with `chunkwise.wait()` or the views.
#[pg_extern(volatile, parallel_unsafe)]
fn start(
    task: Option<&str>,
    workers: default!(Option<i32>, "NULL"),
    max_items: default!(Option<i64>, "NULL"),
) -> Option<i64> {
    (|| -> SqlResult<Option<i64>> {
        let task = without_keeping_locks(|| Task::for_caller(task, "start"))?;
        start_task(&task, workers, max_items)
    })()
    .or_raise()
}

/// How often wait() looks at the run, and how long it waits for a just-started run's
/// workers to record it.
const WAIT_POLL: Duration = Duration::from_millis(100);
const REGISTRATION_WAIT: Duration = Duration::from_secs(10);

/// A run as `chunkwise.runs` shows it.
struct RunRow {
    task: String,
    owner: pg_sys::Oid,
    state: String,
    processed: i64,
    failed: i64,
    dead: i64,
    /// NULL in the view for an interrupted run: nobody recorded its end.
    seconds: Option<f64>,
}

/// The run as it is now: a fresh snapshot (a read-write SPI statement takes one in READ
/// COMMITTED) and fresh backend statuses, also when wait() runs in the statement that
/// started the run, whose snapshot predates the workers. Keeps no locks: wait() sleeps
/// between reads (see `subxact`).
fn read_run(run_id: i64) -> SqlResult<Option<RunRow>> {
    // SAFETY: drops this transaction's cached copy of the backend status array.
    unsafe { pg_sys::pgstat_clear_snapshot() };
    let row = without_keeping_locks(|| {
        as_extension_owner(|| {
            Spi::connect_mut(|client| -> SqlResult<Option<RunRow>> {
                let table = client.update(
                    "SELECT r.task, chunkwise._owner(t.anchor, t.owner) AS owner, r.state, \
                            r.processed, r.failed, r.dead, r.seconds::float8 AS seconds \
                       FROM chunkwise.runs r JOIN chunkwise.tasks t USING (task) WHERE r.run_id = $1",
                    Some(1),
                    &[run_id.into()],
                )?;
                let Some(row) = table.into_iter().next() else {
                    return Ok(None);
                };
                Ok(Some(RunRow {
                    task: row.required("task")?,
                    owner: row.required("owner")?,
                    state: row.required("state")?,
                    processed: row.required("processed")?,
                    failed: row.required("failed")?,
                    dead: row.required("dead")?,
                    seconds: row.optional("seconds")?,
                }))
            })
        })
    })?;
    Ok(row)
}

/// The highest run id handed out so far (keeping no lock, as `read_run`).
fn last_run_id() -> SqlResult<i64> {
    without_keeping_locks(catalog::last_run_id)
}

fn unknown_run(run_id: i64) -> SqlError {
    SqlError::new(
        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        format!("run {run_id} does not exist"),
    )
    .hint("See SELECT run_id, task, state FROM chunkwise.runs; purge() forgets old runs.")
}

/// Waits until the run is no longer running (or `timeout` passes) and returns it as
/// `chunkwise.runs` shows it: state running, finished, cancelled or interrupted.
#[pg_extern(volatile, parallel_unsafe)]
fn wait(
    run_id: Option<i64>,
    timeout: default!(Option<Interval>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(run_id, i64),
        name!(task, String),
        name!(state, String),
        name!(processed, i64),
        name!(failed, i64),
        name!(dead, i64),
        name!(seconds, f64),
    ),
> {
    let (run_id, row) = (|| -> SqlResult<(i64, RunRow)> {
        let run_id = run_id.ok_or_else(|| {
            SqlError::null_argument("run_id", "Pass the id chunkwise.start() returned.")
        })?;
        let deadline = match timeout {
            None => None,
            Some(t) if t.as_micros() < 0 => {
                return Err(SqlError::invalid_parameter("timeout must not be negative")
                    .hint("Leave timeout out to wait for the end of the run."));
            }
            Some(t) => Some(Instant::now() + Duration::from_micros(t.as_micros() as u64)),
        };
        if run_id < 1 || run_id > last_run_id()? {
            return Err(unknown_run(run_id));
        }
        // Its workers record a just-started run in their first transaction.
        let registration_deadline = Instant::now() + REGISTRATION_WAIT;
        let mut row = loop {
            if let Some(row) = read_run(run_id)? {
                break row;
            }
            if Instant::now() >= registration_deadline {
                return Err(unknown_run(run_id));
            }
            wait_on_latch(WAIT_POLL);
        };
        // Watching a run is reading it: allowed to whoever may see its task; to anyone
        // else the run does not exist (its task and owner stay unknown to them).
        if !may_see(row.owner) {
            return Err(unknown_run(run_id));
        }
        while row.state == "running" && deadline.is_none_or(|d| Instant::now() < d) {
            wait_on_latch(WAIT_POLL);
            row = read_run(run_id)?.ok_or_else(|| unknown_run(run_id))?;
        }
        if row.state == "interrupted" {
            // A leaving worker commits the run's row before its process goes, but one
            // read can take its snapshot before that commit and look at pg_stat_activity
            // after the exit: the run then looks interrupted. A read with a snapshot
            // taken after this one saw the worker gone tells.
            row = read_run(run_id)?.ok_or_else(|| unknown_run(run_id))?;
        }
        Ok((run_id, row))
    })()
    .or_raise();
    TableIterator::once((
        run_id,
        row.task,
        row.state,
        row.processed,
        row.failed,
        row.dead,
        row.seconds.unwrap_or(0.0),
    ))
}
