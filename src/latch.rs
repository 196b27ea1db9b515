//! Naps and log lines of the extension's background processes (run workers, supervisors,
//! the boot worker), safe from a cancel: neither lets one raise an ERROR between
//! statements (see `cancels_held` for the log lines).
//!
//! pgrx's `BackgroundWorker::wait_latch` processes interrupts when it wakes
//! (`CHECK_FOR_INTERRUPTS`). A `pg_cancel_backend` that reached a process while it napped
//! then raised "canceling statement due to user request" between statements: a run
//! worker napping after a failed bookkeeping step, outside its error handling, ended
//! (its run then showed as interrupted; the integration suite's cancel test caught it
//! under CPU contention), and an idle pool member reported the cancel as a failure of its
//! bookkeeping. A nap here drops such a cancel instead: it was meant for no statement.

use std::ffi::c_long;
use std::time::Duration;

use pgrx::pg_sys;

/// Sleeps on the process latch until it is set or `timeout` passes (`None`: until it is
/// set), then drops a cancel that arrived meanwhile (`forget_cancel`) and processes the
/// other interrupts (a ProcSignal barrier that `DROP DATABASE` waits for, a request to
/// log memory contexts) with cancels held off: one that is kept, or comes in meanwhile,
/// waits for the next statement. The process exits if the postmaster died, as
/// PostgreSQL's own background processes do. The caller looks at its own stop flag
/// afterwards (SIGTERM).
pub fn nap(timeout: Option<Duration>) {
    let (events, millis) = match timeout {
        // Whole milliseconds, rounded up: a wait of less than one would not sleep at all,
        // and callers that wait for a time loop until it has come.
        Some(timeout) => (
            pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH,
            c_long::try_from(timeout.as_micros().div_ceil(1_000)).unwrap_or(c_long::MAX),
        ),
        None => (pg_sys::WL_LATCH_SET | pg_sys::WL_EXIT_ON_PM_DEATH, -1),
    };
    // SAFETY: waits on this process's own latch, as PostgreSQL's background processes
    // do; the latch is reset before anything it announced is looked at.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            events as i32,
            millis,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    forget_cancel();
    cancels_held(|| {
        pg_sys::check_for_interrupts!();
    });
}

/// Drops a cancel that arrived after the statement it was meant for (an item, a nap): it
/// would otherwise hit the process's next statement instead. A cancel set together with a
/// shutdown request is kept: a run worker's SIGTERM sets both, to interrupt the statement
/// under way, and it stops the worker (`worker::signals`).
pub fn forget_cancel() {
    if !shutdown_requested() {
        // SAFETY: a backend-local interrupt flag of type sig_atomic_t, cleared as
        // ProcessInterrupts does.
        unsafe { std::ptr::addr_of_mut!(pg_sys::QueryCancelPending).write_volatile(0) };
    }
}

/// Whether a shutdown was requested of this process (`ShutdownRequestPending`; a run
/// worker's SIGTERM handler sets it, see `worker::signals`).
pub fn shutdown_requested() -> bool {
    // SAFETY: reads a backend-local flag of type sig_atomic_t that signal handlers set.
    unsafe { std::ptr::addr_of!(pg_sys::ShutdownRequestPending).read_volatile() != 0 }
}

/// Runs `report` (a WARNING, LOG or NOTICE line) with cancels held off.
///
/// PostgreSQL's `errfinish` processes interrupts after a line below ERROR, and pgrx's
/// ereport calls it outside any guard: a cancel pending then raised an ERROR that jumped
/// straight out of the Rust code to the process's top, past every error handler and
/// destructor of ours. A run worker died that way right after a "failed on attempt"
/// WARNING, still listed in its run's shared memory as holding its item, and the other
/// workers waited for that item until the end of time. Held off, the cancel waits for
/// the next statement, where it is caught like any other.
pub fn cancels_held<R>(report: impl FnOnce() -> R) -> R {
    // The count is put back as it was even if an ERROR in `report` reset it (errfinish
    // zeroes it) or a panic unwinds.
    struct Restore(u32);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: a backend-local counter, put back to its value before `report`.
            unsafe { pg_sys::QueryCancelHoldoffCount = self.0 };
        }
    }
    // SAFETY: HOLD_CANCEL_INTERRUPTS on a backend-local counter.
    let _restore = unsafe {
        let before = pg_sys::QueryCancelHoldoffCount;
        pg_sys::QueryCancelHoldoffCount = before + 1;
        Restore(before)
    };
    report()
}
