//! Settling runs that are over: their outcome, their callback and the cycles they ask
//! for, in one transaction (see the module above).

use pgrx::prelude::*;

use super::callback::{self, RunFigures};
use super::downstream;
use crate::catalog::Task;
use crate::columns::Columns;
use crate::error::{SqlError, SqlResult};
use crate::latch;
use crate::notify;
use crate::security::{as_extension_owner, with_pinned_search_path};

/// Who is settling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settler {
    /// The last worker of this run, which knows the run is over.
    LastWorkerOf(i64),
    /// Anyone else (a cycle of the task): settles only runs that are clearly over.
    Recovery,
}

/// How long a run may take to register all its workers: a recovery pass leaves younger
/// runs whose workers are not all registered to their last worker (the launcher waits
/// as long for its workers; see `launcher`).
const REGISTRATION_GRACE_SECS: i32 = 10;

/// The task's next run to settle, locked: armed, due, and over (no live worker, and all
/// its workers registered, or started before the server did, or given time to), or this
/// worker's own run. `succeeded`:
/// not cancelled, nothing dead, no retry left waiting, and, for a run that did not end
/// cleanly, nothing of the task left pending (its work was done before it stopped).
const NEXT_OVER_RUN: &str = "\
SELECT h.run_id, h.processed, h.failed, h.dead,
       coalesce(h.outcome = 'succeeded',
                NOT h.cancelled AND h.dead = 0
                AND NOT EXISTS (SELECT FROM chunkwise.items i
                                 WHERE i.task_id = h.task_id AND i.status = 'pending'
                                   AND (i.attempts > 0 OR h.finished_at IS NULL
                                        OR h.workers_exited < h.workers_started))) AS succeeded
  FROM chunkwise.run_history h
 WHERE h.task_id = $1 AND h.followup = 'armed'
   AND (h.followup_not_before IS NULL OR h.followup_not_before <= clock_timestamp())
   AND (h.run_id = $2
        OR (NOT EXISTS (SELECT FROM chunkwise._live_workers lw WHERE lw.run_id = h.run_id)
            AND (h.workers_started >= h.workers_requested
                 OR h.started_at < pg_postmaster_start_time()
                 OR h.started_at < clock_timestamp() - make_interval(secs => $3))))
 ORDER BY h.run_id
 LIMIT 1
 FOR UPDATE OF h SKIP LOCKED";

/// A run being settled.
struct OverRun {
    run_id: i64,
    processed: i64,
    failed: i64,
    dead: i64,
    succeeded: bool,
}

/// The task's pipeline options, read when a run is settled (alter_task may have changed
/// them since the run started).
struct Followers {
    on_success: Option<pg_sys::Oid>,
    on_failure: Option<pg_sys::Oid>,
    then: Vec<i32>,
}

/// Settles every run of `task` that is over and armed, in the caller's transaction, and
/// returns the tasks whose cycles it asked for: start them after the commit with
/// [`downstream::start_requested`].
pub fn settle_runs(task: &Task, settler: Settler) -> SqlResult<Vec<i32>> {
    let own_run = match settler {
        Settler::LastWorkerOf(run_id) => run_id,
        Settler::Recovery => 0,
    };
    let mut requested = Vec::new();
    while let Some(run) = next_over_run(task.id, own_run)? {
        requested.extend(settle_one(task, &run)?);
    }
    Ok(requested)
}

/// Whether this database's pg_chunkwise is at a version with pipelines (the library may
/// be newer than the extension until `ALTER EXTENSION ... UPDATE`).
const HAS_PIPELINES: &str = "SELECT EXISTS (SELECT FROM pg_catalog.pg_attribute \
     WHERE attrelid = pg_catalog.to_regclass('chunkwise.run_history') AND attname = 'followup' \
       AND NOT attisdropped)";

/// Settles every run in this database that is over and armed, and returns the tasks
/// whose cycles were asked for and not started (by these settlings or before a crash).
/// The always-on supervisor calls it when it starts, at server start and after a
/// crash-restart (with the preloaded library), so that nothing waits for a next cycle.
pub fn settle_database() -> SqlResult<Vec<i32>> {
    // Asked as whoever calls (the extension's owner is only known once it exists).
    if !with_pinned_search_path(|| Spi::get_one::<bool>(HAS_PIPELINES))?.unwrap_or(false) {
        return Ok(Vec::new());
    }
    let armed = as_extension_owner(|| {
        Spi::get_one::<Vec<i32>>(
            "SELECT coalesce(array_agg(DISTINCT task_id), '{}') FROM chunkwise.run_history \
              WHERE followup = 'armed'",
        )
    })?
    .unwrap_or_default();
    for task_id in armed {
        if let Some(task) = Task::by_id(task_id)? {
            settle_runs(&task, Settler::Recovery)?;
        }
    }
    let requested = as_extension_owner(|| {
        Spi::get_one::<Vec<i32>>(
            "SELECT coalesce(array_agg(task_id ORDER BY task_id), '{}') FROM chunkwise.tasks \
              WHERE cycle_requested_by IS NOT NULL",
        )
    })?;
    Ok(requested.unwrap_or_default())
}

fn next_over_run(task_id: i32, own_run: i64) -> SqlResult<Option<OverRun>> {
    as_extension_owner(|| {
        Spi::connect_mut(|client| -> SqlResult<Option<OverRun>> {
            let table = client.update(
                NEXT_OVER_RUN,
                Some(1),
                &[
                    task_id.into(),
                    own_run.into(),
                    REGISTRATION_GRACE_SECS.into(),
                ],
            )?;
            let Some(row) = table.into_iter().next() else {
                return Ok(None);
            };
            Ok(Some(OverRun {
                run_id: row.required("run_id")?,
                processed: row.required("processed")?,
                failed: row.required("failed")?,
                dead: row.required("dead")?,
                succeeded: row.required("succeeded")?,
            }))
        })
    })
}

fn followers(task_id: i32) -> SqlResult<Followers> {
    as_extension_owner(|| {
        Spi::connect(|client| -> SqlResult<Followers> {
            let table = client.select(
                "SELECT on_success::oid AS on_success, on_failure::oid AS on_failure, then_tasks \
                   FROM chunkwise.tasks WHERE task_id = $1",
                Some(1),
                &[task_id.into()],
            )?;
            let row = table.into_iter().next().ok_or_else(|| {
                SqlError::new(
                    PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                    format!("task {task_id} was dropped while its run was settled"),
                )
            })?;
            Ok(Followers {
                on_success: row.optional("on_success")?,
                on_failure: row.optional("on_failure")?,
                then: row.required("then_tasks")?,
            })
        })
    })
}

/// Settles one run: its callback, then (when it succeeded) its downstream cycles, and its
/// row, all in the caller's transaction. A callback that fails is recorded for a retry
/// with the task's backoff (or given up after max_attempts) and nothing follows yet.
fn settle_one(task: &Task, run: &OverRun) -> SqlResult<Vec<i32>> {
    let followers = followers(task.id)?;
    let outcome = if run.succeeded { "succeeded" } else { "failed" };
    let (name, callback) = if run.succeeded {
        ("on_success", followers.on_success)
    } else {
        ("on_failure", followers.on_failure)
    };
    if let Some(proc) = callback {
        let figures = RunFigures {
            task: &task.name,
            run_id: run.run_id,
            processed: run.processed,
            failed: run.failed,
            dead: run.dead,
        };
        if let Err(error) = callback::call(proc, task.owner, &figures) {
            let gave_up = record_callback_failure(run.run_id, outcome, &error.message)?;
            latch::cancels_held(|| {
                warning!(
                    "{name} of task \"{}\" failed for run {} [SQLSTATE {}]: {}{}",
                    task.name,
                    run.run_id,
                    error.sqlstate,
                    error.message,
                    if gave_up {
                        "; no more attempts (max_attempts)"
                    } else {
                        "; it is retried after the task's retry_backoff"
                    }
                )
            });
            notify::callback_failed(run.run_id, name)?;
            return Ok(Vec::new());
        }
        notify::callback_done(run.run_id, name)?;
    }
    as_extension_owner(|| {
        Spi::run_with_args(
            "UPDATE chunkwise.run_history \
                SET outcome = $2, followup = 'done', followup_error = NULL, followup_not_before = NULL \
              WHERE run_id = $1",
            &[run.run_id.into(), outcome.into()],
        )
    })?;
    if !run.succeeded {
        return Ok(Vec::new());
    }
    let mut requested = Vec::new();
    for downstream_id in followers.then {
        if downstream::request_cycle(downstream_id, run.run_id)? {
            requested.push(downstream_id);
        }
    }
    Ok(requested)
}

/// Records a failed callback: one more attempt, its error, and when the next may be
/// made (the task's retry_backoff, doubled per attempt, up to retry_backoff_max); after
/// max_attempts the run's follow-up is given up. True when given up.
fn record_callback_failure(run_id: i64, outcome: &str, message: &str) -> SqlResult<bool> {
    let followup = as_extension_owner(|| {
        Spi::get_one_with_args::<String>(
            "UPDATE chunkwise.run_history h \
                SET outcome = $2, followup_attempts = h.followup_attempts + 1, followup_error = $3, \
                    followup = CASE WHEN h.followup_attempts + 1 >= t.max_attempts THEN 'gave_up' ELSE 'armed' END, \
                    followup_not_before = clock_timestamp() \
                        + least(t.retry_backoff * power(2, h.followup_attempts), t.retry_backoff_max) \
               FROM chunkwise.tasks t \
              WHERE h.run_id = $1 AND t.task_id = h.task_id \
          RETURNING h.followup",
            &[run_id.into(), outcome.into(), message.into()],
        )
    })?;
    Ok(followup.as_deref() == Some("gave_up"))
}

/// Seconds until the task's next callback retry is due; `None` when none waits.
pub fn next_callback_retry(task_id: i32) -> SqlResult<Option<f64>> {
    let seconds = as_extension_owner(|| {
        Spi::get_one_with_args::<f64>(
            "SELECT extract(epoch FROM min(followup_not_before) - clock_timestamp())::float8 \
               FROM chunkwise.run_history WHERE task_id = $1 AND followup = 'armed' \
                AND followup_not_before IS NOT NULL",
            &[task_id.into()],
        )
    })?;
    Ok(seconds)
}
