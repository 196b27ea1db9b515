//! An ERROR as it was raised: its SQLSTATE exactly as raised, and its message.
//!
//! pgrx turns a caught PostgreSQL error into a `PgSqlErrorCode`, an enum of the codes
//! PostgreSQL itself defines: a user-defined code (`RAISE ... USING ERRCODE = 'P0042'`)
//! becomes XX000 there. A DBA who raises P0042 to mean "supplier file missing" must find
//! P0042 in `chunkwise.failures`. PostgreSQL calls every error-context callback while it
//! builds an error report, before it jumps to the handler, and `geterrcode()` then gives
//! the code being raised: a callback pushed around the item remembers the last one.

use std::ffi::c_void;
use std::sync::atomic::{AtomicI32, Ordering};

use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;

use crate::error::{SqlError, excerpt_of, packed_sqlstate, sqlstate, sqlstate_of};

/// Characters of an error message kept in the queue and the log.
const MESSAGE_CHARS: usize = 2000;

/// An ERROR as PostgreSQL raised it: why an item's attempt failed, as it is recorded and
/// logged, or what interrupted the worker's own statements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaisedError {
    pub sqlstate: String,
    pub message: String,
}

impl RaisedError {
    pub fn new(sqlstate: &str, message: impl Into<String>) -> Self {
        RaisedError {
            sqlstate: sqlstate.to_string(),
            message: message.into(),
        }
    }

    /// Its code as pgrx names it (XX000 for a code PostgreSQL does not define).
    pub fn code(&self) -> PgSqlErrorCode {
        PgSqlErrorCode::from(packed_sqlstate(&self.sqlstate))
    }

    /// The error of a caught ERROR. `raised` is the code a [`RaisedCodeWatch`] saw: the
    /// report's own code, unless pgrx could not name it (a user-defined SQLSTATE, which it
    /// turns into XX000).
    pub fn caught(caught: CaughtError, raised: i32) -> Self {
        match caught {
            CaughtError::PostgresError(report)
            | CaughtError::ErrorReport(report)
            | CaughtError::RustPanic {
                ereport: report, ..
            } => {
                let code = report.sql_error_code();
                let sqlstate = if raised != 0 && PgSqlErrorCode::from(raised) == code {
                    sqlstate_of(raised)
                } else {
                    sqlstate(code)
                };
                RaisedError {
                    sqlstate,
                    message: excerpt_of(report.message(), MESSAGE_CHARS).into_owned(),
                }
            }
        }
    }
}

/// The code of the last report made while a watch was pushed; 0 = none.
static LAST_RAISED: AtomicI32 = AtomicI32::new(0);

/// What the extension's own checks refused while running an item (a target that
/// tried to control the transaction, say), recorded as an ERROR of that code would be.
impl From<SqlError> for RaisedError {
    fn from(refused: SqlError) -> Self {
        RaisedError::new(
            &refused.sqlstate(),
            excerpt_of(refused.message(), MESSAGE_CHARS),
        )
    }
}

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
