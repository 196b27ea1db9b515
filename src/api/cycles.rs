//! `CALL chunkwise.run_cycle(task)`: one scheduled cycle, made for pg_cron.
//!
//! A cycle re-plans from the task's `source` (as its owner), commits so that the workers
//! see the new items, then runs at most `max_items_per_cycle` of them. It does not start
//! while a task it `depends_on` holds it (see `pipeline`), and it finishes what a crash
//! left of the task's pipeline: runs not settled, downstream cycles not started. The procedure is
//! PL/pgSQL (only a procedure may COMMIT) around two functions here:
//! `_cycle_begin` takes the task's cycle lock and plans, `_cycle_run` runs and lets the
//! lock go. The lock is a session-level lock that only the extension can take (see
//! `locks`), so it outlives the COMMIT between them and dies with the session if the
//! session does: a second cycle of the same task, from any session (cron or not), sees it
//! taken and returns at once, and no role can hold it to stop another's cycles.

use std::cell::Cell;
use std::panic::AssertUnwindSafe;

use pgrx::prelude::*;

use super::planning::plan_source;
use crate::catalog::Task;
use crate::error::{OrRaise, SqlError, SqlResult};
use crate::launcher::run_task;
use crate::locks::{try_lock_cycle, unlock_cycle};
use crate::pipeline::downstream::{requested_downstream, start_requested, waiting_for};
use crate::pipeline::settle::{Settler, settle_runs};
use crate::transaction::without_keeping_locks;

thread_local! {
    /// The task whose cycle lock this backend holds, between `_cycle_begin` and `_cycle_run`.
    static HELD_CYCLE: Cell<Option<i32>> = const { Cell::new(None) };
}

/// Lets the cycle lock go if this session holds it.
fn unlock(task_id: i32) {
    if HELD_CYCLE.with(|held| held.replace(None)) == Some(task_id) {
        unlock_cycle(task_id);
    }
}

/// Runs `f`; if it raises or returns an error, lets the cycle lock go before the error
/// goes on.
fn unlocking_on_error<R>(task_id: i32, f: impl FnOnce() -> SqlResult<R>) -> SqlResult<R> {
    let result = PgTryBuilder::new(AssertUnwindSafe(f))
        .catch_others(|caught| {
            unlock(task_id);
            caught.rethrow()
        })
        .execute();
    if result.is_err() {
        unlock(task_id);
    }
    result
}

/// Takes the cycle lock and plans from `source`. False (with a NOTICE) when another
/// cycle of the task holds the lock or the task is paused: the caller does nothing.
#[pg_extern(name = "_cycle_begin", volatile, parallel_unsafe)]
fn cycle_begin(task: Option<&str>) -> bool {
    let run = || -> SqlResult<bool> {
        let task = Task::for_caller(task, "run a cycle of")?;
        // SAFETY: reads the transaction state of this backend.
        if unsafe { pg_sys::IsTransactionBlock() } {
            return Err(SqlError::new(
                PgSqlErrorCode::ERRCODE_ACTIVE_SQL_TRANSACTION,
                "chunkwise.run_cycle() cannot run inside a transaction block",
            )
            .hint("CALL it on its own: it commits its planning before its workers start."));
        }
        if !try_lock_cycle(task.id) {
            notice!(
                "a cycle of task \"{}\" is already running; this one does nothing",
                task.name
            );
            return Ok(false);
        }
        HELD_CYCLE.with(|held| held.set(Some(task.id)));
        if task.paused {
            unlock(task.id);
            notice!("task \"{}\" is paused; no cycle runs", task.name);
            return Ok(false);
        }
        if let Some(waits) = unlocking_on_error(task.id, || waiting_for(task.id))? {
            unlock(task.id);
            notice!(
                "the cycle of task \"{}\" waits for {waits}; no cycle runs",
                task.name
            );
            return Ok(false);
        }
        // Runs of the task that ended without being settled (their last worker was
        // killed, or the server crashed): settled now, in this cycle's first transaction;
        // the cycles they ask for start once this one has run.
        unlocking_on_error(task.id, || settle_runs(&task, Settler::Recovery))?;
        let planned = unlocking_on_error(task.id, || plan_source(&task))?;
        if let Some(planned) = planned {
            debug1!("cycle of task \"{}\": {planned} new items", task.name);
        }
        Ok(true)
    };
    run().or_raise()
}

/// Runs at most `max_items_per_cycle` items, then lets the cycle lock go.
#[pg_extern(name = "_cycle_run", volatile, parallel_unsafe)]
fn cycle_run(task: Option<&str>) {
    let run = || -> SqlResult<()> {
        let task = without_keeping_locks(|| Task::for_caller(task, "run a cycle of"))?;
        if HELD_CYCLE.with(Cell::get) != Some(task.id) {
            return Err(SqlError::new(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "no cycle of task \"{}\" was begun in this session",
                    task.name
                ),
            )
            .hint("Use CALL chunkwise.run_cycle(task)."));
        }
        let summary =
            unlocking_on_error(task.id, || run_task(&task, None, task.max_items_per_cycle));
        unlock(task.id);
        let summary = summary?;
        // The run's last worker started what the run asked for; what earlier settlings
        // asked for and nobody started (a crash between the two) starts here.
        start_requested(&requested_downstream(task.id)?)?;
        if let Some(run_id) = summary.run_id {
            notice!(
                "cycle of task \"{}\": run {run_id} processed {}, {} failed attempts, {} dead, in {:.1} s",
                task.name,
                summary.processed,
                summary.failed,
                summary.dead,
                summary.seconds
            );
        }
        Ok(())
    };
    run().or_raise()
}

extension_sql!(
    r#"
-- One scheduled cycle: plan from the task's source, commit, run at most
-- max_items_per_cycle items. For pg_cron:
--   SELECT cron.schedule('datamart', '*/5 * * * *', 'CALL chunkwise.run_cycle(''datamart'')');
CREATE PROCEDURE chunkwise.run_cycle(task text)
LANGUAGE plpgsql AS $procedure$
BEGIN
    IF chunkwise._cycle_begin(task) THEN
        COMMIT;
        PERFORM chunkwise._cycle_run(task);
    END IF;
END
$procedure$;
"#,
    name = "run_cycle",
    requires = [cycle_begin, cycle_run]
);
