//! The task an enqueue writes to, looked up once per transaction: an enqueue from a
//! trigger runs once per row changed, and the lookup with its rights check was a third
//! of its cost.
//!
//! A looked-up task is kept for the rest of the transaction, for the role that looked it
//! up, until this backend changes a task (`forget`, called by create_task, alter_task
//! and drop_task), a subtransaction aborts, or a type changes (a task's owner is its
//! anchor type's: REASSIGN OWNED, DROP OWNED, here or committed elsewhere). Other sessions
//! cannot change what enqueue relies on underneath: the lookup takes the task's
//! definition lock shared (see `locks`), which drop_task, and alter_task switching
//! sequential_groups, take exclusively, so they wait for the transactions that enqueue
//! (as ALTER TABLE waits for those that read the table). Other options are not read by
//! enqueue (always_on only decides whom its commit wakes), so steering never waits.
//! That also keeps drop_task from missing the items of an enqueue that commits after
//! its DELETE began: they would have stayed behind without a task.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use pgrx::pg_sys;

use crate::catalog::{Task, required_task_name};
use crate::error::SqlResult;
use crate::locks::{TaskLock, lock_task};
use crate::transaction::transaction_ended;

/// A task kept for this transaction.
struct Kept {
    name: String,
    user: pg_sys::Oid,
    task: Rc<Task>,
}

thread_local! {
    static KEPT: RefCell<Vec<Kept>> = const { RefCell::new(Vec::new()) };
    /// The transaction callbacks are registered once per backend.
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// The task `name` for an enqueue by the current role: `Task::for_caller(name, action)`,
/// looked up once per transaction.
pub fn task_for_enqueue(name: Option<&str>, action: &str) -> SqlResult<Rc<Task>> {
    let name = required_task_name(name)?;
    // SAFETY: reads the current role of this backend.
    let user = unsafe { pg_sys::GetUserId() };
    let kept = KEPT.with(|kept| {
        kept.borrow()
            .iter()
            .find(|k| k.user == user && k.name == name)
            .map(|k| k.task.clone())
    });
    if let Some(task) = kept {
        return Ok(task);
    }
    lock_task(Task::for_caller(Some(name), action)?.id, TaskLock::Uses);
    // Looked up again under the lock: an alter_task or drop_task that committed while
    // this one waited is seen (a fresh snapshot: this runs in a volatile function).
    let task = Rc::new(Task::for_caller(Some(name), action)?);
    register_callbacks();
    KEPT.with(|kept| {
        kept.borrow_mut().push(Kept {
            name: name.to_string(),
            user,
            task: task.clone(),
        })
    });
    Ok(task)
}

/// This backend changed a task: what was kept may be stale.
pub fn forget() {
    KEPT.with(|kept| kept.borrow_mut().clear());
}

fn register_callbacks() {
    if REGISTERED.replace(true) {
        return;
    }
    // SAFETY: registers callbacks with 'static functions and no argument; they stay
    // registered for the backend's life.
    unsafe {
        pg_sys::RegisterXactCallback(Some(at_transaction_end), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(at_subtransaction_end), std::ptr::null_mut());
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::TYPEOID as i32,
            Some(at_type_change),
            pg_sys::Datum::from(0),
        );
    }
}

/// Forgets when a type changes (an anchor's owner among them). Raises nothing.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn at_type_change(_arg: pg_sys::Datum, _cache_id: i32, _hash: u32) {
    forget();
}

/// Forgets at the end of the transaction, whatever the end. Raises nothing.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn at_transaction_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    if transaction_ended(event) {
        forget();
    }
}

/// Forgets when a subtransaction aborts: a lock it took is released with it.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn at_subtransaction_end(
    event: pg_sys::SubXactEvent::Type,
    _my_subid: pg_sys::SubTransactionId,
    _parent_subid: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        forget();
    }
}
