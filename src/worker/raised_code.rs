//! The SQLSTATE an error was raised with, exactly as raised.
//!
//! pgrx turns a caught PostgreSQL error into a `PgSqlErrorCode`, an enum of the codes
//! PostgreSQL itself defines: a user-defined code (`RAISE ... USING ERRCODE = 'P0042'`)
//! becomes XX000 there. A DBA who raises P0042 to mean "supplier file missing" must find
//! P0042 in `chunkwise.failures`. PostgreSQL calls every error-context callback while it
//! builds an error report, before it jumps to the handler, and `geterrcode()` then gives
//! the code being raised: a callback pushed around the item remembers the last one.

use std::ffi::c_void;
use std::sync::atomic::{AtomicI32, Ordering};

use pgrx::pg_sys;

/// The code of the last report made while a watch was pushed; 0 = none.
static LAST_RAISED: AtomicI32 = AtomicI32::new(0);

/// An error-context callback on PostgreSQL's stack while it lives. Boxed: PostgreSQL
/// keeps a pointer to it, so it must not move.
pub struct RaisedCodeWatch {
    callback: Box<pg_sys::ErrorContextCallback>,
}

unsafe extern "C-unwind" fn remember_code(_arg: *mut c_void) {
    // SAFETY: called by errfinish() while it builds a report, when geterrcode() reads
    // the code of that report.
    LAST_RAISED.store(unsafe { pg_sys::geterrcode() }, Ordering::Relaxed);
}

impl RaisedCodeWatch {
    /// Pushes the callback; the code remembered so far is forgotten.
    pub fn push() -> RaisedCodeWatch {
        LAST_RAISED.store(0, Ordering::Relaxed);
        let mut callback = Box::new(pg_sys::ErrorContextCallback {
            // SAFETY: reads the head of this backend's error-context stack.
            previous: unsafe { pg_sys::error_context_stack },
            callback: Some(remember_code),
            arg: std::ptr::null_mut(),
        });
        // SAFETY: the box outlives its place on the stack: `drop` takes it off.
        unsafe { pg_sys::error_context_stack = &mut *callback };
        RaisedCodeWatch { callback }
    }

    /// The raw code of the last report (of any level) made since `push`; the error that
    /// ended the item is the last report before it was caught (a re-throw reports
    /// nothing new). 0 when nothing was reported, e.g. for a Rust panic.
    pub fn last_raised(&self) -> i32 {
        LAST_RAISED.load(Ordering::Relaxed)
    }
}

impl Drop for RaisedCodeWatch {
    fn drop(&mut self) {
        // SAFETY: puts back the head this watch found; on the error path pgrx has already
        // restored the stack to the state of the call it guarded, with this watch on top.
        unsafe { pg_sys::error_context_stack = self.callback.previous };
    }
}
