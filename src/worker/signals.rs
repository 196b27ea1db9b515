//! Signal handlers of the worker process.

use std::ffi::c_int;

use pgrx::pg_sys;

/// Installs `handler` for `signal`, as PostgreSQL's own processes do.
///
/// # Safety
/// `handler` must be async-signal-safe.
pub unsafe fn set_handler(signal: c_int, handler: unsafe extern "C-unwind" fn(c_int)) {
    // SAFETY: the caller vouches for the handler; pqsignal installs it with SA_RESTART.
    unsafe {
        #[cfg(not(feature = "pg18"))]
        pg_sys::pqsignal(signal, Some(handler));
        #[cfg(feature = "pg18")]
        pg_sys::pqsignal_be(signal, Some(handler));
    }
}

/// SIGTERM (`pg_terminate_backend`, a fast shutdown, `DROP DATABASE ... WITH (FORCE)`):
/// the worker stops now. A target that is running is interrupted as by a cancel (the
/// worker rolls that item back without counting an attempt); the worker then commits
/// what its batch finished, adds its figures to the run and exits. In the worker's own
/// bookkeeping, the cancel makes the statement fail, and the worker's loop, seeing the
/// stop, exits (a lock wait there would otherwise not end).
pub unsafe extern "C-unwind" fn stop_worker(_signal: c_int) {
    // SAFETY: what PostgreSQL's own handlers do: set flags of type sig_atomic_t and the
    // latch, keeping errno for the code the signal interrupted.
    unsafe {
        let errno = *libc::__errno_location();
        std::ptr::addr_of_mut!(pg_sys::ShutdownRequestPending).write_volatile(1);
        std::ptr::addr_of_mut!(pg_sys::QueryCancelPending).write_volatile(1);
        std::ptr::addr_of_mut!(pg_sys::InterruptPending).write_volatile(1);
        pg_sys::SetLatch(pg_sys::MyLatch);
        *libc::__errno_location() = errno;
    }
}

/// Whether SIGTERM asked the worker to stop.
pub fn stop_signalled() -> bool {
    // SAFETY: reads a flag that `stop_worker` sets.
    unsafe { std::ptr::addr_of!(pg_sys::ShutdownRequestPending).read_volatile() != 0 }
}

/// Drops a cancel that arrived after the statement it was meant for (the item, or a
/// nap): it would otherwise hit the worker's next bookkeeping statement instead. A
/// SIGTERM's cancel is kept: it also stops the worker.
pub fn forget_cancel() {
    if !stop_signalled() {
        // SAFETY: backend-local interrupt state, cleared as ProcessInterrupts does.
        unsafe { std::ptr::addr_of_mut!(pg_sys::QueryCancelPending).write_volatile(0) };
    }
}
