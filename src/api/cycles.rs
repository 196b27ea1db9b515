//! `CALL chunkwise.run_cycle(task)`: one scheduled cycle, made for pg_cron.
//!
//! A cycle re-plans from the task's `source` (as its owner), commits so that the workers
//! see the new items, then runs at most `max_items_per_cycle` of them. It does not start
//! while a task it `depends_on` holds it (see `pipeline`), and it finishes what a crash
//! left of the task's pipeline: runs not settled, downstream cycles not started.
//!
//! The procedure is PL/pgSQL (only a procedure may COMMIT) around three steps here:
//! `_cycle_begin` takes the task's cycle lock and plans, `_cycle_start` starts the run,
//! `_cycle_wait` waits for it a second at a time and, once it has ended, lets the lock go.
//! The procedure commits after each step: a cycle holds no snapshot while its workers
//! run. One statement that waited for the whole run (as `run()` does) would hold the
//! cluster's xmin horizon for all that time, and VACUUM could remove no row deleted
//! meanwhile anywhere in the cluster: with a cron job cycling back to back, hardly ever.
//!
//! So the cycle outlives the transactions of its procedure, in the session: the lock is
//! a session-level lock that only the extension can take (see `locks`), and the run's
//! shared memory and worker handles are kept for the session (`launcher::Keep`). A
//! second cycle of the same task, from any session (cron or not), sees the lock taken and
//! returns at once, and no role can hold it to stop another's cycles. An ERROR or a
//! cancel anywhere in a cycle, between its steps too, ends it (`at_abort`): its workers
//! stop after their current item and the lock goes, as for a cancelled `run()`.

use std::cell::{Cell, RefCell};
use std::time::Duration;

use pgrx::prelude::*;

use super::planning::plan_source;
use crate::catalog::Task;
use crate::error::{OrRaise, SqlError, SqlResult};
use crate::launcher::{Keep, LaunchedRun, launch_run};
use crate::locks::{try_lock_cycle, unlock_cycle};
use crate::pipeline::downstream::{requested_downstream, start_requested, waiting_for};
use crate::pipeline::settle::{Settler, settle_runs};
use crate::transaction::without_keeping_locks;

/// How long one `_cycle_wait` waits before its statement ends (and with it its snapshot).
const WAIT_STEP: Duration = Duration::from_secs(1);

/// The cycle this session is in, from `_cycle_begin` until its run has ended. Dropping it
/// ends it: its run's workers, if still at work, stop after their current item, and the
/// cycle lock goes.
struct Cycle {
    task_id: i32,
    /// The run it started, kept for the session while its workers work.
    run: Option<LaunchedRun>,
}

impl Drop for Cycle {
    fn drop(&mut self) {
        if let Some(run) = &self.run {
            run.cancel();
        }
        unlock_cycle(self.task_id);
    }
}

thread_local! {
    static CYCLE: RefCell<Option<Cycle>> = const { RefCell::new(None) };
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Ends this session's cycle, if it is in one.
fn end_cycle() {
    // Taken out first, dropped after the borrow: dropping unmaps the run's memory.
    let cycle = CYCLE.with_borrow_mut(Option::take);
    drop(cycle);
}

fn register_callback() {
    if CALLBACK_REGISTERED.replace(true) {
        return;
    }
    // SAFETY: registers a callback with a 'static function and no argument; it stays
    // registered for the backend's life.
    unsafe { pg_sys::RegisterXactCallback(Some(at_abort), std::ptr::null_mut()) };
}

/// A transaction that aborts ends the cycle: the procedure stops with it. (Only its
/// transactions at the top level can: a cycle is refused inside a transaction block,
/// which an EXCEPTION block around the CALL also makes, and its other steps follow a
/// COMMIT, which a procedure cannot do inside a subtransaction.)
#[pg_guard]
unsafe extern "C-unwind" fn at_abort(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    if matches!(
        event,
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT
    ) {
        end_cycle();
    }
}

/// The task of the step's cycle, checked against this session's cycle: `running` says
/// whether the step expects its run to be under way.
fn cycle_task(task: Option<&str>, running: bool) -> SqlResult<Task> {
    let task = without_keeping_locks(|| Task::for_caller(task, "run a cycle of"))?;
    let in_step = CYCLE.with_borrow(|cycle| {
        cycle
            .as_ref()
            .is_some_and(|cycle| cycle.task_id == task.id && cycle.run.is_some() == running)
    });
    if !in_step {
        return Err(SqlError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "no cycle of task \"{}\" was begun in this session",
                task.name
            ),
        )
        .hint("Use CALL chunkwise.run_cycle(task)."));
    }
    Ok(task)
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
        register_callback();
        // A cycle this session left (its procedure ended without an abort) ends here.
        end_cycle();
        if !try_lock_cycle(task.id) {
            notice!(
                "a cycle of task \"{}\" is already running; this one does nothing",
                task.name
            );
            return Ok(false);
        }
        CYCLE.set(Some(Cycle {
            task_id: task.id,
            run: None,
        }));
        if task.paused {
            end_cycle();
            notice!("task \"{}\" is paused; no cycle runs", task.name);
            return Ok(false);
        }
        if let Some(waits) = waiting_for(task.id)? {
            end_cycle();
            notice!(
                "the cycle of task \"{}\" waits for {waits}; no cycle runs",
                task.name
            );
            return Ok(false);
        }
        // Runs of the task that ended without being settled (their last worker was
        // killed, or the server crashed): settled now, in this cycle's first transaction;
        // the cycles they ask for start once this one has run.
        settle_runs(&task, Settler::Recovery)?;
        if let Some(planned) = plan_source(&task)? {
            debug1!("cycle of task \"{}\": {planned} new items", task.name);
        }
        Ok(true)
    };
    run().or_raise()
}

/// Starts the cycle's run of at most `max_items_per_cycle` items. False when nothing
/// runs: the cycle is over.
#[pg_extern(name = "_cycle_start", volatile, parallel_unsafe)]
fn cycle_start(task: Option<&str>) -> bool {
    let run = || -> SqlResult<bool> {
        let task = cycle_task(task, false)?;
        let Some(run) = launch_run(&task, None, task.max_items_per_cycle, Keep::Session)? else {
            end_cycle();
            start_requested(&requested_downstream(task.id)?)?;
            return Ok(false);
        };
        CYCLE.with_borrow_mut(|cycle| {
            if let Some(cycle) = cycle {
                cycle.run = Some(run);
            }
        });
        Ok(true)
    };
    run().or_raise()
}

/// Waits for the cycle's run for at most a second; true once it has ended (the cycle is
/// then over and its lock gone).
#[pg_extern(name = "_cycle_wait", volatile, parallel_unsafe)]
fn cycle_wait(task: Option<&str>) -> bool {
    let run = || -> SqlResult<bool> {
        // `cycle_task` checked that this session's cycle has its run under way.
        let task = cycle_task(task, true)?;
        let ended = CYCLE.with_borrow_mut(|cycle| {
            let cycle = cycle.as_mut()?;
            let ended = cycle.run.as_mut()?.wait_for_workers(&task, Some(WAIT_STEP));
            if ended { cycle.run.take() } else { None }
        });
        let Some(run) = ended else {
            return Ok(false);
        };
        end_cycle();
        let summary = run.summary(&task)?;
        // The run's last worker started what the run asked for; what earlier settlings
        // asked for and nobody started (a crash between the two) starts here.
        start_requested(&requested_downstream(task.id)?)?;
        notice!(
            "cycle of task \"{}\": run {} processed {}, {} failed attempts, {} dead, in {:.1} s",
            task.name,
            run.run_id(),
            summary.processed,
            summary.failed,
            summary.dead,
            summary.seconds
        );
        Ok(true)
    };
    run().or_raise()
}

/// The step of 0.1.0's `run_cycle` that started and waited in one statement. Not in this
/// version's SQL, only in the library: the 0.1.0 install script, which the upgrade path
/// starts from, creates it and needs its symbol. Only a database still at 0.1.0 can call
/// it, and there this library refuses every call until the extension is updated.
#[pg_extern(name = "_cycle_run", sql = false)]
fn cycle_run(task: Option<&str>) {
    crate::security::extension_owner();
    SqlError::new(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!(
            "chunkwise._cycle_run({}) is gone from pg_chunkwise {}",
            task.unwrap_or("NULL"),
            env!("CARGO_PKG_VERSION")
        ),
    )
    .hint("Use CALL chunkwise.run_cycle(task).")
    .raise()
}

extension_sql!(
    r#"
-- One scheduled cycle: plan from the task's source, commit, run at most
-- max_items_per_cycle items, committing while it waits for them (so as to hold no
-- snapshot). For pg_cron:
--   SELECT cron.schedule('datamart', '*/5 * * * *', 'CALL chunkwise.run_cycle(''datamart'')');
CREATE PROCEDURE chunkwise.run_cycle(task text)
LANGUAGE plpgsql AS $procedure$
BEGIN
    IF chunkwise._cycle_begin(task) THEN
        COMMIT;
        IF chunkwise._cycle_start(task) THEN
            LOOP
                COMMIT;
                EXIT WHEN chunkwise._cycle_wait(task);
            END LOOP;
        END IF;
    END IF;
END
$procedure$;
"#,
    name = "run_cycle",
    requires = [cycle_begin, cycle_start, cycle_wait]
);
