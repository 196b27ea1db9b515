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

/// Runs `read` in an internal subtransaction and rolls it back, releasing the locks it
/// took; an ERROR rolls it back too and goes on. Only for work whose effects may be
/// undone: reads, and what is not transactional (launching workers, a sequence).
pub fn without_keeping_locks<R>(read: impl FnOnce() -> R) -> R {
    // SAFETY: the pattern of PL/pgSQL's exception blocks: remember the memory context and
    // resource owner, start a subtransaction, and restore both after it ends either way.
    let (memory, owner) = unsafe {
        let saved = (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner);
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(saved.0);
        saved
    };
    // SAFETY: ends the subtransaction begun above, from its own or its parent's state.
    let roll_back = move || unsafe {
        pg_sys::MemoryContextSwitchTo(memory);
        pg_sys::RollbackAndReleaseCurrentSubTransaction();
        pg_sys::MemoryContextSwitchTo(memory);
        pg_sys::CurrentResourceOwner = owner;
    };
    let result = PgTryBuilder::new(AssertUnwindSafe(read))
        .catch_others(|caught| {
            roll_back();
            caught.rethrow()
        })
        .execute();
    roll_back();
    result
}
