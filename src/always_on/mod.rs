//! Always-on tasks: pools of resident workers that sleep on their latch while nothing is
//! due and are woken at the commit of the enqueue that gives them work.
//!
//! With `shared_preload_libraries = 'pg_chunkwise'`, `_PG_init` asks for the registry's
//! shared memory and registers the launcher (`boot`), which starts a supervisor in each
//! database (`supervisor`); supervisors start and grow the pools, whose members are the
//! ordinary workers (`crate::worker`) in pool mode. Enqueues and steering calls wake
//! them at commit (`wakeup`). Without the preload nothing of this runs, and
//! `always_on => true` is refused (`ensure_available`); everything else works as before.

mod boot;
mod registry;
mod supervisor;
mod wakeup;

use pgrx::prelude::*;

use crate::catalog::Task;
use crate::error::{SqlError, SqlResult};

pub use registry::{LATENCY_BUCKETS, PoolFigures, Seat};
pub use registry::{
    give_back_rate, join, leave, must_leave, pool_figures, record_latency, retire_if_above_minimum,
    start_idling, stop_idling, take_rate,
};
use wakeup::{items_added, task_changed};

/// Called from `_PG_init`: with the library preloaded, asks for the registry and
/// registers the launcher.
pub fn init() {
    // SAFETY: reads a flag the postmaster sets while it loads preloaded libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        registry::request();
        boot::register();
    }
}

/// Refuses always-on tasks where the library is not preloaded: nothing would start their
/// pools at boot or wake them at commit.
pub fn ensure_available() -> SqlResult<()> {
    if registry::available() {
        return Ok(());
    }
    Err(SqlError::new(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        "always-on tasks need pg_chunkwise in shared_preload_libraries",
    )
    .detail(
        "Their workers are started at server start and woken at commit by the preloaded library.",
    )
    .hint(
        "Add pg_chunkwise to shared_preload_libraries in postgresql.conf and restart the server, \
           or run the task with chunkwise.run() or chunkwise.run_cycle().",
    ))
}

/// `items` items of `task` became due in this transaction (enqueued, planned, retried,
/// unblocked): at commit, an always-on task's idle pool members wake for them.
pub fn wake_at_commit(task: &Task, items: i64) {
    if task.always_on {
        items_added(task.id, items);
    }
}

/// `task` changed in this transaction (or was created, paused, resumed, cancelled,
/// dropped): at commit, an always-on task's pool members leave after their current item
/// and the supervisor starts the pool again as the task now is.
pub fn restart_at_commit(task_id: i32, always_on: bool) {
    if always_on {
        task_changed(task_id);
    }
}
