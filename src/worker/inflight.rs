//! The item a worker has in flight, kept in a small file that outlives a crash of the
//! server, so that a target which crashes the server is counted like one that fails.
//!
//! An attempt is counted when the item's transaction commits (done, or failed with a
//! retry). A target whose backend is killed by SIGKILL or segfaults makes the postmaster
//! restart every backend, which rolls the count back too: without more, such a poison
//! item would be retried forever, and a nightly cycle would take the database down every
//! night. Shared memory does not survive the restart, and a commit per item would double
//! the queue's writes; so each worker keeps a file
//! `pg_chunkwise/inflight.<database>.<pid>` in the data directory. Before each item it
//! writes the item and its attempts so far (one `pwrite`, no fsync: what must survive is
//! a crash of PostgreSQL, not of the operating system); after the item's transaction
//! ends, that nothing is in flight.
//!
//! A worker that the postmaster stops because *another* process crashed (SIGQUIT) marks
//! its file as a bystander's before it exits; a clean or FATAL exit removes the file. A
//! file still saying "in flight" therefore names an item whose own worker died by a
//! signal. The workers of the next run in that database take such files (under a lock,
//! before their first claim) and count the item's attempt as failed.

use std::ffi::{CString, c_int};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::latch;
use pgrx::prelude::*;

/// The folder in the data directory (every backend's working directory).
const FOLDER: &str = "pg_chunkwise";
const MAGIC: u32 = u32::from_le_bytes(*b"cwif");
const RECORD_LEN: usize = 32;
/// Where the state byte is in a record.
const STATE_AT: u64 = 4;

/// What a worker's file says.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum SlotState {
    Idle = 0,
    InFlight = 1,
    /// Stopped by the postmaster's crash restart (SIGQUIT) while an item was in flight.
    Bystander = 2,
}

/// An item whose worker died by a signal while it ran it.
pub struct CrashedItem {
    pub pid: i32,
    pub run_id: i64,
    pub item_id: i64,
    /// The item's attempts when it was claimed: the crashed attempt is the next one.
    pub attempts: i32,
}

/// The open file, for the SIGQUIT handler (which may only make system calls).
static SLOT_FD: AtomicI32 = AtomicI32::new(-1);
/// The file's path, for the exit callback that removes it.
static SLOT_PATH: OnceLock<CString> = OnceLock::new();

/// This worker's file.
pub struct InFlightSlot {
    file: File,
}

impl InFlightSlot {
    /// Creates the worker's file and arranges for it to be marked (SIGQUIT) or removed
    /// (exit). `None`, after a WARNING, when the file cannot be made: the worker then
    /// works as before, without counting crashes.
    pub fn create(database: pg_sys::Oid) -> Option<InFlightSlot> {
        // SAFETY: reads this process's pid.
        let pid = unsafe { pg_sys::MyProcPid };
        let path = slot_path(database, pid);
        let opened = fs::create_dir_all(FOLDER).and_then(|()| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
        });
        let file = match opened {
            Ok(file) => file,
            Err(e) => {
                latch::cancels_held(|| {
                    warning!(
                        "pg_chunkwise cannot keep {}: {e}; a crash of the server during an item will not count as an attempt",
                        path.display()
                    )
                });
                return None;
            }
        };
        let slot = InFlightSlot { file };
        slot.write(SlotState::Idle, 0, 0, 0);
        SLOT_FD.store(slot.file.as_raw_fd(), Ordering::SeqCst);
        // A path made of the data directory and numbers has no NUL; without it the file
        // would only be left behind at exit, for the next start to remove.
        if let Ok(c_path) = CString::new(path.into_os_string().into_encoded_bytes()) {
            let _ = SLOT_PATH.set(c_path);
        }
        // SAFETY: registers plain functions of this module; the handler makes only
        // async-signal-safe calls, and the callback runs once at process exit.
        unsafe {
            crate::worker::signals::set_handler(libc::SIGQUIT, stop_as_bystander);
            pg_sys::on_proc_exit(Some(remove_slot_file), pg_sys::Datum::from(0));
        }
        Some(slot)
    }

    /// `item` (of `run_id`, with `attempts` so far) is about to run.
    pub fn in_flight(&self, run_id: i64, item_id: i64, attempts: i32) {
        self.write(SlotState::InFlight, run_id, item_id, attempts);
    }

    /// The last item's transaction has ended, committed or not.
    pub fn idle(&self) {
        self.write_state(SlotState::Idle);
    }

    fn write(&self, state: SlotState, run_id: i64, item_id: i64, attempts: i32) {
        let mut record = [0u8; RECORD_LEN];
        record[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        record[4] = state as u8;
        record[8..16].copy_from_slice(&run_id.to_le_bytes());
        record[16..24].copy_from_slice(&item_id.to_le_bytes());
        record[24..28].copy_from_slice(&attempts.to_le_bytes());
        self.report(self.file.write_all_at(&record, 0));
    }

    fn write_state(&self, state: SlotState) {
        self.report(self.file.write_all_at(&[state as u8], STATE_AT));
    }

    fn report(&self, written: io::Result<()>) {
        if let Err(e) = written {
            latch::cancels_held(|| log!("pg_chunkwise could not write its in-flight file: {e}"));
        }
    }
}

fn slot_path(database: pg_sys::Oid, pid: i32) -> PathBuf {
    Path::new(FOLDER).join(format!("inflight.{}.{pid}", database.to_u32()))
}

/// The postmaster's crash restart stops every backend with SIGQUIT: this worker did not
/// crash the server, so its item in flight is not to blame. Exits as PostgreSQL's own
/// handler does.
unsafe extern "C-unwind" fn stop_as_bystander(_signal: c_int) {
    let fd = SLOT_FD.load(Ordering::SeqCst);
    // SAFETY: pwrite and _exit are async-signal-safe; the byte lives in static memory.
    unsafe {
        if fd >= 0 {
            static BYSTANDER: u8 = SlotState::Bystander as u8;
            libc::pwrite(fd, std::ptr::addr_of!(BYSTANDER).cast(), 1, STATE_AT as i64);
        }
        libc::_exit(2);
    }
}

/// A worker that exits by itself (cleanly, or FATAL: SIGTERM, an error) rolled its item
/// back and nobody blames it: the file goes.
unsafe extern "C-unwind" fn remove_slot_file(_code: c_int, _arg: pg_sys::Datum) {
    if let Some(path) = SLOT_PATH.get() {
        // SAFETY: a NUL-terminated path.
        unsafe { libc::unlink(path.as_ptr()) };
    }
}

/// Takes the files of `database` left by workers that are gone: returns the items that
/// were in flight when their worker died by a signal, and removes every such file.
///
/// Call it before this worker makes its own file, in a transaction holding the
/// database's recovery lock, and count the items in
/// the same transaction: the files are removed before it commits, so a failed commit
/// forgets a crash rather than two workers counting it twice.
pub fn take_crashed(database: pg_sys::Oid) -> Vec<CrashedItem> {
    let Ok(entries) = fs::read_dir(FOLDER) else {
        return Vec::new(); // no worker has run here since the folder was made
    };
    let prefix = format!("inflight.{}.", database.to_u32());
    // SAFETY: reads this process's pid.
    let me = unsafe { pg_sys::MyProcPid };
    let mut crashed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        // A live backend's file is its own (pids are unique among the living), except
        // this worker's pid: it has not made its file yet, so one with its pid is stale.
        // SAFETY: looks the pid up in the proc array (under its lock).
        if pid != me && !unsafe { pg_sys::BackendPidGetProc(pid) }.is_null() {
            continue;
        }
        let path = entry.path();
        let record = fs::read(&path).unwrap_or_default();
        if let Err(e) = fs::remove_file(&path) {
            latch::cancels_held(|| log!("pg_chunkwise could not remove {}: {e}", path.display()));
            continue;
        }
        if let Some(item) = crashed_item(pid, &record) {
            crashed.push(item);
        }
    }
    crashed
}

/// The item a record names, if it says an item was in flight.
fn crashed_item(pid: i32, record: &[u8]) -> Option<CrashedItem> {
    let record: &[u8; RECORD_LEN] = record.try_into().ok()?;
    if u32::from_le_bytes(record[0..4].try_into().ok()?) != MAGIC
        || record[4] != SlotState::InFlight as u8
    {
        return None;
    }
    Some(CrashedItem {
        pid,
        run_id: i64::from_le_bytes(record[8..16].try_into().ok()?),
        item_id: i64::from_le_bytes(record[16..24].try_into().ok()?),
        attempts: i32::from_le_bytes(record[24..28].try_into().ok()?),
    })
}
