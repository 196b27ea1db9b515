//! Waking always-on pools at the commit of the transaction that gave them work: items
//! enqueued or planned wake idle members of the task's pool; a change to an always-on
//! task (create, alter, pause, resume, cancel, drop) retires its pool and wakes the
//! database's supervisor, which starts it again as the task now is. Before the commit
//! nothing is visible to the workers, so nothing is woken; after a rollback nothing is.

use std::cell::{Cell, RefCell};

use pgrx::pg_sys;

use super::registry;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Wake {
    Items { task_id: i32, count: i64 },
    Changed { task_id: i32 },
}

thread_local! {
    /// What this backend's transaction has to wake at commit.
    static PENDING: RefCell<Vec<Wake>> = const { RefCell::new(Vec::new()) };
    /// The transaction callback is registered once per backend.
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// `count` items of always-on task `task_id` were added in this transaction.
pub fn items_added(task_id: i32, count: i64) {
    if count <= 0 {
        return;
    }
    remember(|pending| {
        match pending.iter_mut().find_map(|wake| match wake {
            Wake::Items { task_id: t, count } if *t == task_id => Some(count),
            _ => None,
        }) {
            Some(total) => *total = total.saturating_add(count),
            None => pending.push(Wake::Items { task_id, count }),
        }
    });
}

/// Always-on task `task_id` was created or changed in this transaction.
pub fn task_changed(task_id: i32) {
    remember(|pending| {
        let wake = Wake::Changed { task_id };
        if !pending.contains(&wake) {
            pending.push(wake);
        }
    });
}

fn remember(add: impl FnOnce(&mut Vec<Wake>)) {
    if !registry::available() {
        return;
    }
    if !REGISTERED.replace(true) {
        // SAFETY: registers a callback with a 'static function and no argument; it stays
        // registered for the backend's life.
        unsafe { pg_sys::RegisterXactCallback(Some(at_transaction_end), std::ptr::null_mut()) };
    }
    PENDING.with(|pending| add(&mut pending.borrow_mut()));
}

/// The transaction callback: wakes at commit, forgets at abort. It runs after the
/// commit record is written, where an ERROR would be a PANIC: nothing in it raises
/// (the registry takes an LWLock and sets latches).
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn at_transaction_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    let wakes = match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT => {
            PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()))
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            PENDING.with(|p| p.borrow_mut().clear());
            return;
        }
        _ => return,
    };
    // SAFETY: reads this backend's database.
    let database = unsafe { pg_sys::MyDatabaseId };
    for wake in wakes {
        let supervisor_needed = match wake {
            Wake::Items { task_id, count } => registry::wake_for_items(database, task_id, count),
            Wake::Changed { task_id } => {
                registry::retire_pool(database, task_id);
                true
            }
        };
        if supervisor_needed {
            registry::request_supervisor(database);
        }
    }
}
