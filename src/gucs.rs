//! The extension's settings (`chunkwise.*`). Each is a private static with one public
//! getter, so the rest of the code never touches a GUC's raw storage.

use std::ffi::CString;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

static MAX_WORKERS: GucSetting<i32> = GucSetting::<i32>::new(8);
static MAX_WORKERS_PER_ROLE: GucSetting<i32> = GucSetting::<i32>::new(0);
static PROGRESS_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(10);
static RETRY_WAIT_MAX: GucSetting<i32> = GucSetting::<i32>::new(30);
static RECENCY_WINDOWS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"7,30,90"));
static LOADAVG_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"/proc/loadavg"));
static LANE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(64);
static ACTIVITY_THRESHOLDS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"100,10"));

/// The most `chunkwise.max_workers` may be set to, and so the most workers of one run.
pub const MAX_WORKERS_LIMIT: i32 = 1024;

pub fn init() {
    GucRegistry::define_int_guc(
        c"chunkwise.max_workers",
        c"Most pg_chunkwise workers running at once, across all tasks and databases.",
        c"A run asks for no more background-worker slots than this leaves free, and warns when it gets fewer than it wanted.",
        &MAX_WORKERS,
        1,
        MAX_WORKERS_LIMIT,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"chunkwise.max_workers_per_role",
        c"Most pg_chunkwise workers running at once for the tasks of one owner role (0: no limit of its own).",
        c"Keeps one role from taking every worker chunkwise.max_workers allows; a run gets fewer workers, with a WARNING, or none, with an ERROR.",
        &MAX_WORKERS_PER_ROLE,
        0,
        1024,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"chunkwise.progress_interval",
        c"How often chunkwise.run() reports progress with a NOTICE.",
        c"0 turns the progress NOTICEs off.",
        &PROGRESS_INTERVAL,
        0,
        86_400,
        GucContext::Userset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"chunkwise.retry_wait_max",
        c"Longest a run waits for a failed item's retry to fall due before it ends.",
        c"Retries due later than this are left for the next run.",
        &RETRY_WAIT_MAX,
        0,
        86_400,
        GucContext::Userset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_string_guc(
        c"chunkwise.recency_windows",
        c"Recency tiers of the activity ranking, in days, ascending (default '7,30,90').",
        c"An item whose last activity is within the first window is in recency tier 1, and so on; older or never active is the last tier.",
        &RECENCY_WINDOWS,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"chunkwise.activity_thresholds",
        c"Activity tiers of the activity ranking: action counts, descending (default '100,10').",
        c"More actions than the first threshold is activity tier 1, more than the second tier 2, and so on.",
        &ACTIVITY_THRESHOLDS,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"chunkwise.lane_size",
        c"Most queue positions a worker of a run reserves for itself at once (0: none, every worker claims at the front of the queue).",
        c"Workers of one run that each work through a lane of their own touch different pages of the queue; a lane holds about 20 ms of the worker's items, at most this many. Runs with max_items claim at the front regardless.",
        &LANE_SIZE,
        0,
        100_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"chunkwise.loadavg_file",
        c"Where max_load reads the machine's load average (default '/proc/loadavg').",
        c"A file whose first field is the 1-minute load average, as /proc/loadavg; point it at a container's own view (LXCFS) where that is the one that counts.",
        &LOADAVG_FILE,
        GucContext::Suset,
        GucFlags::default(),
    );
}

pub fn max_workers() -> i32 {
    MAX_WORKERS.get()
}

/// The per-role share of workers, if one is set.
pub fn max_workers_per_role() -> Option<i32> {
    Some(MAX_WORKERS_PER_ROLE.get()).filter(|&n| n > 0)
}

/// Seconds between progress NOTICEs; 0 means none.
pub fn progress_interval_secs() -> i32 {
    PROGRESS_INTERVAL.get()
}

pub fn retry_wait_max_secs() -> i32 {
    RETRY_WAIT_MAX.get()
}

/// The most items a run's worker reserves at once (`chunkwise.lane_size`); 0: no lanes.
pub fn lane_size() -> i64 {
    i64::from(LANE_SIZE.get())
}

pub fn recency_windows() -> String {
    guc_string(&RECENCY_WINDOWS)
}

pub fn activity_thresholds() -> String {
    guc_string(&ACTIVITY_THRESHOLDS)
}

pub fn loadavg_file() -> String {
    guc_string(&LOADAVG_FILE)
}

fn guc_string(setting: &GucSetting<Option<CString>>) -> String {
    setting
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}
