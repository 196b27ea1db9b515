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
