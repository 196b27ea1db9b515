//! Signal handlers of the worker process.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::pg_sys;

use crate::latch;

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

/// Whether the SIGTERM came from this very process: the item's own target called
/// `pg_terminate_backend(pg_backend_pid())`.
static SELF_TERMINATED: AtomicBool = AtomicBool::new(false);

/// SIGTERM (`pg_terminate_backend`, a fast shutdown, `DROP DATABASE ... WITH (FORCE)`):
/// the worker stops now. A target that is running is interrupted as by a cancel; the
/// worker then commits what its batch finished, adds its figures to the run and exits.
/// In the worker's own bookkeeping, the cancel makes the statement fail, and the
/// worker's loop, seeing the stop, exits (a lock wait there would otherwise not end).
///
/// The interrupted item is rolled back without counting an attempt: the stop was not its
/// doing. Unless the signal came from the worker itself: then the item's target ended
/// its own worker, which counts as a failed attempt (retried forever otherwise).
extern "C" fn stop_worker(_signal: c_int, info: *mut libc::siginfo_t, _context: *mut c_void) {
    // SAFETY: what PostgreSQL's own handlers do: set flags of type sig_atomic_t and the
    // latch, keeping errno for the code the signal interrupted. getpid() and reading the
    // kernel's siginfo are async-signal-safe.
    unsafe {
        let errno = *libc::__errno_location();
        if !info.is_null() && (*info).si_pid() == libc::getpid() {
            SELF_TERMINATED.store(true, Ordering::SeqCst);
        }
        std::ptr::addr_of_mut!(pg_sys::ShutdownRequestPending).write_volatile(1);
        std::ptr::addr_of_mut!(pg_sys::QueryCancelPending).write_volatile(1);
        std::ptr::addr_of_mut!(pg_sys::InterruptPending).write_volatile(1);
        pg_sys::SetLatch(pg_sys::MyLatch);
        *libc::__errno_location() = errno;
    }
}

/// Installs `stop_worker` for SIGTERM, with the sender's pid (SA_SIGINFO, which
/// `pqsignal` does not ask for).
pub fn handle_sigterm() {
    // SAFETY: a zeroed sigaction filled in as pqsignal fills it, plus SA_SIGINFO.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = stop_worker as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut());
    }
}

/// Whether the worker's own target sent it SIGTERM.
pub fn self_terminated() -> bool {
    SELF_TERMINATED.load(Ordering::SeqCst)
}

/// Whether SIGTERM asked the worker to stop (`stop_worker` requests a shutdown).
pub fn stop_signalled() -> bool {
    latch::shutdown_requested()
}
