//! The always-on launcher: a background worker the postmaster starts at server start
//! (and again after a crash-restart, since every process restarts then), registered by
//! `_PG_init` when the library is preloaded. It connects to no database: it reads the
//! list of databases from the shared catalog, as autovacuum's launcher does, and starts
//! one supervisor per database that wants one; each supervisor looks for the extension
//! and its always-on tasks, and leaves if there are none. Later, a committed
//! `create_task(always_on => true)` (or resume, alter) in a database without a
//! supervisor asks through the registry, and this launcher starts one there.

use std::time::Duration;

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::pg_sys;
use pgrx::prelude::*;

use super::registry;
use crate::latch;
use crate::launcher::is_stopped;

/// The launcher restarts this long after it exits (it only exits at shutdown or on an
/// error); after a crash-restart the postmaster starts it at once.
const RESTART_AFTER: Duration = Duration::from_secs(5);
/// How long the launcher waits before it tries again to start a supervisor that could
/// not start (no free background worker slot).
const RETRY_START: Duration = Duration::from_secs(5);

/// Registers the launcher with the postmaster; called from `_PG_init` while libraries
/// are preloaded.
pub fn register() {
    BackgroundWorkerBuilder::new("pg_chunkwise launcher")
        .set_type("chunkwise launcher")
        .set_library("pg_chunkwise")
        .set_function("chunkwise_launcher_main")
        // A database connection, though to no database: the shared catalogs.
        .enable_spi_access()
        .set_start_time(pgrx::bgworkers::BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(RESTART_AFTER))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn chunkwise_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // No database: only the shared catalogs are readable, which is all it needs.
    BackgroundWorker::connect_worker_to_spi(None, None);
    registry::launcher_started();
    let mut not_yet_seated = registry::want_supervisors(connectable_databases());
    let mut starting: Vec<(pg_sys::Oid, DynamicBackgroundWorker)> = Vec::new();
    loop {
        starting.retain(|(database, handle)| {
            let stopped = is_stopped(handle);
            if stopped {
                // Stopped before or after joining: if it never joined, its seat is free
                // again (and still wanted, so it starts again below).
                registry::supervisor_not_started(*database);
            }
            !stopped
        });
        if !not_yet_seated.is_empty() {
            not_yet_seated = registry::want_supervisors(not_yet_seated);
        }
        let mut failed = false;
        for database in registry::supervisors_to_start() {
            match start_supervisor(database) {
                Some(handle) => starting.push((database, handle)),
                None => {
                    registry::supervisor_not_started(database);
                    failed = true;
                }
            }
        }
        // Supervisors that stop wake this latch (bgw_notify_pid), so do requests; only a
        // start that failed, or databases waiting for a seat, make it look again by time.
        let timeout = (failed || !not_yet_seated.is_empty()).then_some(RETRY_START);
        latch::nap(timeout);
        if BackgroundWorker::sigterm_received() {
            return;
        }
    }
}

fn start_supervisor(database: pg_sys::Oid) -> Option<DynamicBackgroundWorker> {
    BackgroundWorkerBuilder::new("pg_chunkwise supervisor")
        .set_type("chunkwise supervisor")
        .set_library("pg_chunkwise")
        .set_function("chunkwise_supervisor_main")
        .enable_spi_access()
        .set_restart_time(None)
        .set_argument(Some(pg_sys::Datum::from(database.to_u32())))
        // SAFETY: reads this process's pid.
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
        .ok()
}

/// The databases that accept connections, read from the shared catalog pg_database.
fn connectable_databases() -> Vec<pg_sys::Oid> {
    let mut databases = Vec::new();
    // SAFETY: a catalog heap scan in a transaction of its own, as autovacuum's
    // get_database_list does; each tuple's struct is read before the next is fetched.
    unsafe {
        pg_sys::StartTransactionCommand();
        pg_sys::GetTransactionSnapshot();
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let relation = pg_sys::table_open(pg_sys::DatabaseRelationId, lock);
        let scan = pg_sys::table_beginscan_catalog(relation, 0, std::ptr::null_mut());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
            if (*form).datallowconn {
                databases.push((*form).oid);
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(relation, lock);
        pg_sys::CommitTransactionCommand();
    }
    databases
}
