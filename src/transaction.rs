//! Transactions, subtransactions, GUC nest levels, the user id and the statement timer:
//! the raw server calls that begin, end and unwind them, each behind a guard, in one place.
//!
//! Why `without_keeping_locks`: a backend that waits for its run's workers (`run()`,
//! `wait()`, `run_cycle`) keeps its transaction open while it sleeps on its latch. Had its
//! lookups of the task, the backlog and the run kept their AccessShareLocks on
//! `chunkwise.tasks` and `chunkwise.items` until then, a `VACUUM FULL`, `CLUSTER` or
//! `REINDEX` of those tables would queue behind it, the workers' claims behind that, and
//! the deadlock detector, which sees lock waits but not a latch wait, would find no cycle:
//! everything froze until a timeout. So those lookups run in a subtransaction that is
//! rolled back afterwards, which releases the locks it took; what they found is Rust data
//! by then.

use std::ffi::CStr;
use std::panic::AssertUnwindSafe;

use pgrx::prelude::*;

use crate::error::SqlError;
use crate::raised::{RaisedCodeWatch, RaisedError};

mod timeout_ids {
    include!(concat!(env!("OUT_DIR"), "/timeout_ids.rs"));
}

// utils/timeout.h, which pgrx does not bind; the id comes from the server's own header
// at build time (build.rs).
unsafe extern "C-unwind" {
    fn enable_timeout_after(id: u32, delay_ms: i32);
    fn disable_timeout(id: u32, keep_indicator: bool);
}

/// An internal subtransaction, begun as PL/pgSQL's exception blocks begin one: it
/// remembers the memory context and resource owner its caller returns to when it ends,
/// committed or rolled back.
#[derive(Clone, Copy)]
pub struct Subtransaction {
    memory: pg_sys::MemoryContext,
    owner: pg_sys::ResourceOwner,
}

impl Subtransaction {
    /// Begins a subtransaction of the current transaction; the caller stays in its own
    /// memory context.
    pub fn begin() -> Subtransaction {
        // SAFETY: remembers the caller's context and owner, begins the subtransaction
        // (which switches both) and returns to the caller's memory context.
        unsafe {
            let saved = Subtransaction {
                memory: pg_sys::CurrentMemoryContext,
                owner: pg_sys::CurrentResourceOwner,
            };
            pg_sys::BeginInternalSubTransaction(std::ptr::null());
            pg_sys::MemoryContextSwitchTo(saved.memory);
            saved
        }
    }

    /// Commits the subtransaction into its parent.
    ///
    /// # Safety
    /// Once, while this subtransaction is the current one and in good state.
    pub unsafe fn release(self) {
        // SAFETY: the caller vouches that this subtransaction is the current one.
        unsafe {
            pg_sys::ReleaseCurrentSubTransaction();
            self.restore();
        }
    }

    /// Rolls the subtransaction back, releasing its locks, also after an ERROR in it.
    ///
    /// # Safety
    /// Once, while this subtransaction is the current one (aborted or not).
    pub unsafe fn roll_back(self) {
        // SAFETY: leaves whatever context the ERROR left us in before PostgreSQL frees
        // it; the caller vouches that this subtransaction is the current one.
        unsafe {
            pg_sys::MemoryContextSwitchTo(self.memory);
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            self.restore();
        }
    }

    /// # Safety
    /// Right after the subtransaction ended.
    unsafe fn restore(self) {
        // SAFETY: both were current when the subtransaction began and outlive it.
        unsafe {
            pg_sys::MemoryContextSwitchTo(self.memory);
            pg_sys::CurrentResourceOwner = self.owner;
        }
    }
}

/// Runs `read` in an internal subtransaction and rolls it back, releasing the locks it
/// took; an ERROR rolls it back too and goes on. Only for work whose effects may be
/// undone: reads, and what is not transactional (launching workers, a sequence).
pub fn without_keeping_locks<R>(read: impl FnOnce() -> R) -> R {
    let subtransaction = Subtransaction::begin();
    let result = PgTryBuilder::new(AssertUnwindSafe(read))
        .catch_others(|caught| {
            // SAFETY: the subtransaction begun above is still the current one.
            unsafe { subtransaction.roll_back() };
            caught.rethrow()
        })
        .execute();
    // SAFETY: as above; `read` returned normally.
    unsafe { subtransaction.roll_back() };
    result
}

/// What [`in_subtransaction`] does with the subtransaction when its body succeeds.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum OnSuccess {
    /// Commit it into the caller's transaction (an item's effects).
    Keep,
    /// Roll it back (a predicate evaluated for its answer only).
    RollBack,
}

/// Runs `f` as PL/pgSQL runs an EXCEPTION block: in a subtransaction of its own, with the
/// identity and settings as they were restored afterwards (`f` may set more in the
/// [`GucScope`] it is given; SET, SET ROLE and `set_config` inside are undone too). An
/// ERROR in it, or an error it returns, rolls the subtransaction back and comes back with
/// its SQLSTATE as raised; success keeps or rolls back the subtransaction as `on_success`
/// says.
pub fn in_subtransaction<R>(
    on_success: OnSuccess,
    f: impl FnOnce(&GucScope) -> Result<R, SqlError>,
) -> Result<R, RaisedError> {
    let subtransaction = Subtransaction::begin();
    let watch = RaisedCodeWatch::push();
    let raised = &watch;
    let outcome = PgTryBuilder::new(AssertUnwindSafe(|| {
        let identity = SavedIdentity::current();
        let settings = GucScope::new();
        let ran = f(&settings);
        // Undone as at the end of a function: the settings made inside, a role set.
        drop(settings);
        drop(identity);
        match (&ran, on_success) {
            // SAFETY: the subtransaction begun above is the current one, in good state.
            (Ok(_), OnSuccess::Keep) => unsafe { subtransaction.release() },
            // SAFETY: as above.
            _ => unsafe { subtransaction.roll_back() },
        }
        ran.map_err(RaisedError::from)
    }))
    .catch_others(move |caught| {
        // SAFETY: as in PL/pgSQL: roll the subtransaction back, which also restores
        // settings and identity.
        unsafe { subtransaction.roll_back() };
        Err(RaisedError::caught(caught, raised.last_raised()))
    })
    .execute();
    drop(watch);
    outcome
}

/// A GUC nest level of its own, as a function with `SET` clauses gets: settings made
/// inside it, with [`GucScope::set`] or by any SQL run inside it (`SET`, `set_config`),
/// are undone when it is dropped, so nothing leaks out to the caller either way.
pub struct GucScope {
    level: i32,
}

impl GucScope {
    pub fn new() -> GucScope {
        // SAFETY: pushes a GUC nest level; `drop` pops it, and a (sub)transaction abort
        // in between pops it as well.
        GucScope {
            level: unsafe { pg_sys::NewGUCNestLevel() },
        }
    }

    /// Sets `name` to `value` until the scope ends (a function-style SAVE setting).
    pub fn set(&self, name: &CStr, value: &CStr) {
        // SAFETY: both strings are NUL-terminated and copied by set_config_option; an
        // invalid value raises an ERROR like any SET would.
        unsafe {
            pg_sys::set_config_option(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
        }
    }
}

impl Drop for GucScope {
    fn drop(&mut self) {
        // SAFETY: pops the level pushed in `new` (and any above it), discarding what was
        // set inside, as PostgreSQL does after a function with SET clauses. If an abort
        // already popped it, AtEOXact_GUC finds nothing at or above the level to undo.
        unsafe { pg_sys::AtEOXact_GUC(false, self.level) };
    }
}

/// The user id and security context as they were when it was made; dropping it puts
/// them back (undoing a `switch_to`, or a `SET ROLE` run in between).
pub struct SavedIdentity {
    user: pg_sys::Oid,
    context: i32,
}

impl SavedIdentity {
    /// The current identity, restored on drop.
    pub fn current() -> SavedIdentity {
        let mut user = pg_sys::InvalidOid;
        let mut context = 0;
        // SAFETY: both out-parameters point to live locals.
        unsafe { pg_sys::GetUserIdAndSecContext(&mut user, &mut context) };
        SavedIdentity { user, context }
    }

    /// Becomes `role`, adding `flags` to the security context, until the value is dropped.
    pub fn switch_to(role: pg_sys::Oid, flags: u32) -> SavedIdentity {
        let saved = SavedIdentity::current();
        // SAFETY: SECURITY_LOCAL_USERID_CHANGE marks the switch as local, as PostgreSQL
        // does for SECURITY DEFINER functions; the returned value puts the previous
        // identity back, also on unwind.
        unsafe { pg_sys::SetUserIdAndSecContext(role, saved.context | flags as i32) };
        saved
    }
}

impl Drop for SavedIdentity {
    fn drop(&mut self) {
        // SAFETY: plain assignment of backend-local globals to values read from them earlier
        // in this backend; (sub)transaction abort would restore the same values.
        unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.context) };
    }
}

/// The statement timeout armed around an item's SQL: SPI statements get no timer of their
/// own (only a client's statements do). Disarmed when dropped; a cancel it raised too late
/// to interrupt anything is the caller's to forget.
pub struct StatementTimer {
    armed: bool,
}

impl StatementTimer {
    /// Arms the timer for `timeout_ms`, or nothing when there is no timeout.
    pub fn arm(timeout_ms: Option<i64>) -> StatementTimer {
        if let Some(ms) = timeout_ms {
            // SAFETY: InitPostgres registers the STATEMENT_TIMEOUT handler in every backend.
            unsafe {
                enable_timeout_after(
                    timeout_ids::STATEMENT_TIMEOUT,
                    ms.clamp(1, i64::from(i32::MAX)) as i32,
                )
            };
        }
        StatementTimer {
            armed: timeout_ms.is_some(),
        }
    }
}

impl Drop for StatementTimer {
    fn drop(&mut self) {
        if self.armed {
            // SAFETY: disarms the timer armed in `arm`; harmless if it already fired.
            unsafe { disable_timeout(timeout_ids::STATEMENT_TIMEOUT, false) };
        }
    }
}

/// Runs `f`; an ERROR in it aborts the transaction it ran in (and any subtransaction),
/// returns to `memory` (a context outside that transaction) and comes back as the error,
/// with its SQLSTATE as raised. What PostgresMain does after an ERROR, for a background
/// worker's own statements.
pub fn aborting_on_error<R>(
    memory: pg_sys::MemoryContext,
    f: impl FnOnce() -> R,
) -> Result<R, RaisedError> {
    let watch = RaisedCodeWatch::push();
    let outcome = PgTryBuilder::new(AssertUnwindSafe(|| Ok(f())))
        .catch_others(|caught| {
            // SAFETY: leaves the failed transaction's memory, aborts it, and returns to
            // the caller's context, which outlives it.
            unsafe {
                pg_sys::MemoryContextSwitchTo(memory);
                pg_sys::AbortCurrentTransaction();
                pg_sys::MemoryContextSwitchTo(memory);
            }
            Err(RaisedError::caught(caught, watch.last_raised()))
        })
        .execute();
    drop(watch);
    outcome
}

/// How a transaction of [`in_transaction`] ended.
pub enum Ended<R, E> {
    Committed(R),
    /// The body returned an error: everything it did was rolled back.
    RolledBack(E),
    /// The commit raised an ERROR (a deferred constraint, Citus's PREPARE on worker
    /// nodes): rolled back; the body's result is kept, as it says what was tried.
    CommitFailed(R, RaisedError),
}

/// Runs `body` in a background worker's transaction of its own, as pgrx's
/// `BackgroundWorker::transaction` does: committed when it returns `Ok`, rolled back
/// when it returns `Err`. An ERROR raised by the commit rolls back too and is returned
/// with the body's result instead of unwinding. An ERROR raised in the body unwinds, as
/// ever, to the caller's [`aborting_on_error`].
pub fn in_transaction<R, E>(body: impl FnOnce() -> Result<R, E>) -> Ended<R, E> {
    // SAFETY: the start of a transaction as pgrx's BackgroundWorker::transaction does it;
    // the memory context is remembered to return to after a rollback.
    let memory = unsafe {
        let memory = pg_sys::CurrentMemoryContext;
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        memory
    };
    let result = body();
    // SAFETY: pops the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
    match result {
        Ok(result) => {
            // SAFETY: commits the transaction started above.
            match aborting_on_error(memory, || unsafe { pg_sys::CommitTransactionCommand() }) {
                Ok(()) => Ended::Committed(result),
                Err(raised) => Ended::CommitFailed(result, raised),
            }
        }
        Err(error) => {
            // SAFETY: rolls back the transaction started above, which is in good state,
            // and returns to the caller's memory context.
            unsafe {
                pg_sys::AbortCurrentTransaction();
                pg_sys::MemoryContextSwitchTo(memory);
            }
            Ended::RolledBack(error)
        }
    }
}

/// [`in_transaction`] for a background process's own steps, from outside any
/// transaction: an ERROR in `body` or at its commit, or an error it returns, rolls back
/// and comes back as (SQLSTATE, message).
pub fn in_transaction_or_error<R>(
    body: impl FnOnce() -> Result<R, SqlError>,
) -> Result<R, (String, String)> {
    // SAFETY: reads the current memory context, outside any transaction here: the one to
    // return to after an ERROR.
    let memory = unsafe { pg_sys::CurrentMemoryContext };
    match aborting_on_error(memory, || in_transaction(body)) {
        Ok(Ended::Committed(result)) => Ok(result),
        Ok(Ended::RolledBack(error)) => Err((error.sqlstate(), error.message().to_string())),
        Ok(Ended::CommitFailed(_, raised)) | Err(raised) => Err((raised.sqlstate, raised.message)),
    }
}

/// Whether a transaction callback's `event` is the end of the transaction, whatever the
/// end (commit, abort or prepare, parallel or not): where per-transaction state is let go.
pub fn transaction_ended(event: pg_sys::XactEvent::Type) -> bool {
    matches!(
        event,
        pg_sys::XactEvent::XACT_EVENT_COMMIT
            | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT
            | pg_sys::XactEvent::XACT_EVENT_ABORT
            | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT
            | pg_sys::XactEvent::XACT_EVENT_PREPARE
    )
}

/// A memory context of the session's own, deleted when dropped: for what must outlive
/// the transaction that makes it (the worker handles of a cycle's run, which the cycle
/// waits for across the commits of its procedure).
pub struct SessionMemory(pg_sys::MemoryContext);

impl SessionMemory {
    pub fn new() -> SessionMemory {
        // SAFETY: a child of TopMemoryContext with a static name; deleted in `drop`.
        SessionMemory(unsafe {
            pg_sys::AllocSetContextCreateExtended(
                pg_sys::TopMemoryContext,
                c"chunkwise run".as_ptr(),
                pg_sys::ALLOCSET_SMALL_MINSIZE as usize,
                pg_sys::ALLOCSET_SMALL_INITSIZE as usize,
                pg_sys::ALLOCSET_SMALL_MAXSIZE as usize,
            )
        })
    }

    /// Runs `f` with this context as the current one (what it pallocs lives here), and
    /// returns to the caller's context afterwards, also when `f` raises.
    pub fn allocating<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(pg_sys::MemoryContext);
        impl Drop for Restore {
            fn drop(&mut self) {
                // SAFETY: the caller's context, current when `allocating` began, outlives
                // the call.
                unsafe { pg_sys::MemoryContextSwitchTo(self.0) };
            }
        }
        // SAFETY: this context lives until `self` is dropped, after the call.
        let _restore = Restore(unsafe { pg_sys::MemoryContextSwitchTo(self.0) });
        f()
    }
}

impl Drop for SessionMemory {
    fn drop(&mut self) {
        // SAFETY: deletes the context made in `new`; nothing in it is used afterwards (its
        // owner drops what lives in it first). Never the current one: `allocating` left it.
        unsafe { pg_sys::MemoryContextDelete(self.0) };
    }
}
