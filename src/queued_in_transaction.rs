//! The tasks whose queue this backend's open transaction changed (items planned,
//! enqueued or revived). Until the transaction commits, the task's workers cannot see
//! those items, and they skip the pending items it re-planned (its row locks): a run
//! started in the same transaction would do none of that work and end as if it had.
//! `psql -c 'SELECT chunkwise.plan(...); SELECT chunkwise.run(...)'` and a pg_cron job
//! with the same two statements are one transaction, so this is a real trap; a run asks
//! here first and is refused (see `launcher::ensure_runnable`).
//!
//! Each entry remembers the subtransaction that made it: a rolled-back savepoint takes
//! its entries with it, a released one hands them to its parent, and the end of the
//! transaction clears them all.

use std::cell::{Cell, RefCell};

use pgrx::pg_sys;

use crate::always_on;
use crate::catalog::Task;
use crate::transaction::transaction_ended;

thread_local! {
    /// (task id, subtransaction that queued into it) for the open transaction.
    static QUEUED: RefCell<Vec<(i32, pg_sys::SubTransactionId)>> =
        const { RefCell::new(Vec::new()) };
    /// The callbacks are registered once per backend.
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// This transaction queued `added` new items into `task` (0 when it only changed pending
/// ones): remembered until the transaction ends, and always-on pools are woken at commit.
pub fn items_queued(task: &Task, added: i64) {
    always_on::wake_at_commit(task, added);
    if !REGISTERED.replace(true) {
        // SAFETY: registers callbacks with 'static functions and no argument; they stay
        // registered for the backend's life.
        unsafe {
            pg_sys::RegisterXactCallback(Some(at_transaction_end), std::ptr::null_mut());
            pg_sys::RegisterSubXactCallback(Some(at_subtransaction_end), std::ptr::null_mut());
        }
    }
    // SAFETY: reads this backend's current subtransaction id; a transaction is open.
    let sub = unsafe { pg_sys::GetCurrentSubTransactionId() };
    QUEUED.with(|queued| {
        let mut queued = queued.borrow_mut();
        if !queued.contains(&(task.id, sub)) {
            queued.push((task.id, sub));
        }
    });
}

/// Whether this transaction queued items into task `task_id` (and did not roll that back).
pub fn queued_into(task_id: i32) -> bool {
    QUEUED.with(|queued| queued.borrow().iter().any(|&(task, _)| task == task_id))
}

/// Forgets everything at the end of the transaction, whatever the end. Raises nothing.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn at_transaction_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    if transaction_ended(event) {
        QUEUED.with(|queued| queued.borrow_mut().clear());
    }
}

/// A savepoint rolled back drops what it queued; one released hands it to its parent.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn at_subtransaction_end(
    event: pg_sys::SubXactEvent::Type,
    my_sub: pg_sys::SubTransactionId,
    parent_sub: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    QUEUED.with(|queued| {
        let mut queued = queued.borrow_mut();
        match event {
            pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB => {
                queued.retain(|&(_, sub)| sub != my_sub);
            }
            pg_sys::SubXactEvent::SUBXACT_EVENT_COMMIT_SUB => {
                for entry in queued.iter_mut().filter(|(_, sub)| *sub == my_sub) {
                    entry.1 = parent_sub;
                }
                queued.sort_unstable();
                queued.dedup();
            }
            _ => {}
        }
    });
}
