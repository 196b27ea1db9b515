//! Reads that keep no locks on the queue tables once they are done.
//!
//! A backend that waits for its run's workers (`run()`, `wait()`, `run_cycle`) keeps its
//! transaction open while it sleeps on its latch. Had its lookups of the task, the backlog
//! and the run kept their AccessShareLocks on `chunkwise.tasks` and `chunkwise.items`
//! until then, a `VACUUM FULL`, `CLUSTER` or `REINDEX` of those tables would queue behind
//! it, the workers' claims behind that, and the deadlock detector, which sees lock waits
//! but not a latch wait, would find no cycle: everything froze until a timeout. So
//! those lookups run in a subtransaction that is rolled back afterwards, which releases
//! the locks it took; what they found is Rust data by then.

use std::panic::AssertUnwindSafe;

use pgrx::prelude::*;

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
