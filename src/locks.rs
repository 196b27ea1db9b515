//! Heavyweight locks that only this extension can take.
//!
//! SQL's advisory-lock functions reach every key of their key space, so any role could
//! take a key first and make the extension believe a cycle is running. These locks use
//! the advisory lock tag with a fourth field that `pg_advisory_lock(bigint)` (1) and
//! `pg_advisory_lock(int, int)` (2) never set: no SQL function can name them, and
//! `pg_advisory_unlock_all()` releases them only in the session that holds them. They
//! show in `pg_locks` as advisory locks with `objsubid` 25463 ("cw").

use pgrx::pg_sys;

/// The tag field that sets these locks apart from SQL's advisory locks.
const CHUNKWISE_LOCKS: u16 = 0x6377;

/// What a lock guards: its first key.
#[derive(Clone, Copy)]
#[repr(u32)]
enum LockKind {
    /// A task's `run_cycle` (second key: the task id), per database.
    Cycle = 1,
    /// Counting and launching workers against `chunkwise.max_workers`, cluster-wide.
    Launch = 2,
    /// Counting the items that were in flight in a crash (see `worker::inflight`), per
    /// database.
    CrashRecovery = 3,
    /// A task's definition (second key: the task id), per database: shared by the
    /// transactions that enqueue with a task they looked up once (see `task_cache`),
    /// exclusive for alter_task and drop_task.
    Task = 4,
}

fn tag(database: pg_sys::Oid, kind: LockKind, id: u32) -> pg_sys::LOCKTAG {
    pg_sys::LOCKTAG {
        locktag_field1: database.to_u32(),
        locktag_field2: kind as u32,
        locktag_field3: id,
        locktag_field4: CHUNKWISE_LOCKS,
        locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    }
}

fn cycle_tag(task_id: i32) -> pg_sys::LOCKTAG {
    // SAFETY: reads this backend's database id.
    tag(
        unsafe { pg_sys::MyDatabaseId },
        LockKind::Cycle,
        task_id as u32,
    )
}

/// Takes the task's cycle lock for this session if nobody holds it; false if taken,
/// by another session or by a cycle of this one.
pub fn try_lock_cycle(task_id: i32) -> bool {
    let tag = cycle_tag(task_id);
    // SAFETY: a session-level lock on a tag built above; dontWait returns at once.
    let result = unsafe { pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as i32, true, true) };
    match result {
        pg_sys::LockAcquireResult::LOCKACQUIRE_OK => true,
        pg_sys::LockAcquireResult::LOCKACQUIRE_ALREADY_HELD
        | pg_sys::LockAcquireResult::LOCKACQUIRE_ALREADY_CLEAR => {
            // SAFETY: gives back the second hold just taken; the first stays.
            unsafe { pg_sys::LockRelease(&tag, pg_sys::ExclusiveLock as i32, true) };
            false
        }
        _ => false,
    }
}

/// Lets the task's cycle lock go; call it only while this session holds it
/// (LockRelease warns about a lock that is not held).
pub fn unlock_cycle(task_id: i32) {
    let tag = cycle_tag(task_id);
    // SAFETY: releases a session lock of this backend taken by `try_lock_cycle`.
    unsafe { pg_sys::LockRelease(&tag, pg_sys::ExclusiveLock as i32, true) };
}

/// The cluster-wide launch lock, held while a run counts the busy workers and launches
/// its own, until they show in `pg_stat_activity`: two runs starting at once cannot both
/// count the same free slots. Released when dropped, also on error.
pub struct LaunchLock {
    tag: pg_sys::LOCKTAG,
}

impl LaunchLock {
    /// Waits for the lock (a cancel interrupts the wait, as for any lock).
    pub fn acquire() -> LaunchLock {
        let tag = tag(pg_sys::InvalidOid, LockKind::Launch, 0);
        // SAFETY: a session-level lock (it must not wait for the end of the caller's
        // transaction, which outlives the run) on a tag built above; `drop` releases it.
        unsafe { pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as i32, true, false) };
        LaunchLock { tag }
    }
}

impl Drop for LaunchLock {
    fn drop(&mut self) {
        // SAFETY: releases the session lock taken in `acquire`.
        unsafe { pg_sys::LockRelease(&self.tag, pg_sys::ExclusiveLock as i32, true) };
    }
}

/// Takes the database's crash-recovery lock until the end of the transaction: one worker
/// at a time takes the files of crashed workers, and the next sees its counts committed.
pub fn lock_crash_recovery() {
    // SAFETY: reads this backend's database id.
    let tag = tag(unsafe { pg_sys::MyDatabaseId }, LockKind::CrashRecovery, 0);
    // SAFETY: a transaction-level lock on a tag built above, released at commit or abort.
    unsafe { pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as i32, false, false) };
}

/// How a transaction holds a task's definition lock.
#[derive(Clone, Copy)]
pub enum TaskLock {
    /// It relies on the task as it looked it up (enqueue's cached lookup).
    Uses,
    /// It changes or drops the task: waits for the transactions that use it.
    Changes,
}

/// Takes the task's definition lock until the end of the transaction (or of the
/// subtransaction, if that aborts).
pub fn lock_task(task_id: i32, how: TaskLock) {
    // SAFETY: reads this backend's database id.
    let tag = tag(
        unsafe { pg_sys::MyDatabaseId },
        LockKind::Task,
        task_id as u32,
    );
    let mode = match how {
        TaskLock::Uses => pg_sys::AccessShareLock,
        TaskLock::Changes => pg_sys::AccessExclusiveLock,
    };
    // SAFETY: a transaction-level lock on a tag built above, released at commit or abort.
    unsafe { pg_sys::LockAcquire(&tag, mode as i32, false, false) };
}
