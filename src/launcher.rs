//! Starting a run: background-worker slots, launching the workers and waiting for them
//! with progress NOTICEs. The launcher is the backend that called `chunkwise.run()`.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorkerBuilder, BackgroundWorkerStatus, DynamicBackgroundWorker};
use pgrx::prelude::*;

use crate::catalog::Task;
use crate::error::{SqlError, SqlResult};
use crate::gucs;
use crate::item_status::item_status;
use crate::latch;
use crate::locks::LaunchLock;
use crate::notify;
use crate::queued_in_transaction::queued_into;
use crate::retention;
use crate::run_state::{RunState, SharedRun};
use crate::security::{as_extension_owner, ensure_owner_can_run, ensure_owner_may_execute};
use crate::target::Target;
use crate::transaction::{SessionMemory, without_keeping_locks};
use crate::worker::args::WorkerArgs;

/// What `chunkwise.run()` returns.
pub struct RunSummary {
    pub run_id: Option<i64>,
    pub processed: i64,
    pub failed: i64,
    pub dead: i64,
    pub seconds: f64,
}

impl RunSummary {
    /// The summary of a run that found nothing to do and started no worker.
    fn nothing_run() -> RunSummary {
        RunSummary {
            run_id: None,
            processed: 0,
            failed: 0,
            dead: 0,
            seconds: 0.0,
        }
    }
}

/// How often the launcher looks at its workers while it waits.
const POLL: Duration = Duration::from_millis(200);
/// How long a launch waits for its workers to get going, and how often it looks.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
const STARTUP_POLL: Duration = Duration::from_millis(5);
/// Workers a run gets when neither run() nor the task says.
pub const DEFAULT_WORKERS: i32 = 2;

/// How long the launcher keeps what it needs to watch a run: its mapping of the run's
/// shared memory and the handles of its workers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// For the launching statement (`run()`).
    Statement,
    /// Across transactions, until the run is dropped: a cycle commits while it waits, so
    /// as to hold no snapshot for the length of its run.
    Session,
}

/// A run whose workers have been launched.
pub struct LaunchedRun {
    run_id: i64,
    shared: SharedRun,
    handles: Vec<DynamicBackgroundWorker>,
    /// Items the run expects to handle (backlog, capped by max_items).
    total: i64,
    started: Instant,
    /// When the next progress NOTICE is due.
    next_report: Instant,
    /// Where the handles live when the run is kept for the session; dropped after them.
    _memory: Option<SessionMemory>,
}

impl LaunchedRun {
    /// Waits until every worker has exited, or for at most `budget`, reporting progress;
    /// true once they all have. If the caller's statement is cancelled, the workers are
    /// told to stop after their current item and the cancel is re-raised.
    pub fn wait_for_workers(&mut self, task: &Task, budget: Option<Duration>) -> bool {
        let deadline = budget.map(|budget| Instant::now() + budget);
        let interval = progress_interval();
        let state = self.shared.state();
        let mut next_report = self.next_report;
        let ended = PgTryBuilder::new(AssertUnwindSafe(|| {
            loop {
                if all_stopped(&self.handles) {
                    return true;
                }
                let now = Instant::now();
                if deadline.is_some_and(|deadline| now >= deadline) {
                    return false;
                }
                wait_on_latch(deadline.map_or(POLL, |deadline| POLL.min(deadline - now)));
                if !interval.is_zero() && Instant::now() >= next_report {
                    report_progress(task, self.run_id, state, self.total, self.started);
                    next_report += interval;
                }
            }
        }))
        .catch_others(|caught| {
            state.cancel();
            caught.rethrow()
        })
        .execute();
        self.next_report = next_report;
        ended
    }

    pub fn run_id(&self) -> i64 {
        self.run_id
    }

    /// Tells the workers to stop after their current item.
    pub fn cancel(&self) {
        self.shared.state().cancel();
    }

    /// What the run did, once its workers have exited: an error if none of them got to
    /// work, a WARNING if some ended without finishing.
    pub fn summary(&self, task: &Task) -> SqlResult<RunSummary> {
        ensure_some_worker_started(self)?;
        warn_about_lost_workers(task, self)?;
        let tally = self.shared.state().tally();
        Ok(RunSummary {
            run_id: Some(self.run_id),
            processed: tally.processed,
            failed: tally.failed,
            dead: tally.dead,
            seconds: self.started.elapsed().as_secs_f64(),
        })
    }
}

/// Runs the task and waits for its workers: `chunkwise.run()`.
pub fn run_task(
    task: &Task,
    workers: Option<i32>,
    max_items: Option<i64>,
) -> SqlResult<RunSummary> {
    let Some(mut run) = launch_run(task, workers, max_items, Keep::Statement)? else {
        return Ok(RunSummary::nothing_run());
    };
    run.wait_for_workers(task, None);
    run.summary(task)
}

/// Starts the task's workers and returns once they are under way (`chunkwise.start()`);
/// `None` when there is nothing to run.
pub fn start_task(
    task: &Task,
    workers: Option<i32>,
    max_items: Option<i64>,
) -> SqlResult<Option<i64>> {
    let Some(run) = launch_run(task, workers, max_items, Keep::Statement)? else {
        return Ok(None);
    };
    // The run's shared memory lives while a process maps it: this backend lets go when
    // it returns, and launch_run waited until the workers hold it (or could not start).
    ensure_some_worker_started(&run)?;
    Ok(Some(run.run_id))
}

/// Checks, reserves worker slots and launches the workers; `None` (with a NOTICE) when
/// the task is paused or has nothing pending. The checks and counts run without keeping
/// their locks on the queue tables (see `transaction`): the caller is about to wait.
pub fn launch_run(
    task: &Task,
    workers: Option<i32>,
    max_items: Option<i64>,
    keep: Keep,
) -> SqlResult<Option<LaunchedRun>> {
    // Made outside the subtransaction: its mapping belongs to the caller's statement,
    // or to the session.
    let shared = SharedRun::create(max_items);
    let memory = (keep == Keep::Session).then(|| {
        shared.keep_for_session();
        SessionMemory::new()
    });
    let launch = || without_keeping_locks(|| launch_workers_for(task, workers, max_items, &shared));
    let launched = match &memory {
        Some(memory) => memory.allocating(launch)?,
        None => launch()?,
    };
    let Some(launched) = launched else {
        return Ok(None);
    };
    if shared.state().set_launched(launched.handles.len() as i32) {
        // Every worker was gone before it could tell: the end is the launcher's to tell.
        notify::run_finished(launched.run_id)?;
        retention::apply(task.id)?;
    }
    wait_until_under_way(&shared, &launched.handles);
    // The workers now show in pg_stat_activity, where the next launcher counts them.
    drop(launched.launch_lock);
    let interval = progress_interval();
    Ok(Some(LaunchedRun {
        run_id: launched.run_id,
        shared,
        handles: launched.handles,
        total: launched.total,
        started: launched.started,
        next_report: launched.started + interval,
        _memory: memory,
    }))
}

/// Workers launched, still holding the launch lock until they are under way.
struct Launched {
    run_id: i64,
    handles: Vec<DynamicBackgroundWorker>,
    total: i64,
    started: Instant,
    launch_lock: LaunchLock,
}

fn launch_workers_for(
    task: &Task,
    workers: Option<i32>,
    max_items: Option<i64>,
    shared: &SharedRun,
) -> SqlResult<Option<Launched>> {
    ensure_runnable(task)?;
    if let Some(limit) = max_items.filter(|&limit| limit < 1) {
        return Err(SqlError::invalid_parameter(format!(
            "max_items must be at least 1, not {limit}"
        ))
        .hint("Leave max_items out to run every pending item."));
    }
    let wanted = workers
        .or(task.workers)
        .unwrap_or(DEFAULT_WORKERS.min(gucs::max_workers()));
    if wanted < 1 || wanted > gucs::max_workers() {
        return Err(SqlError::invalid_parameter(format!(
            "workers must be between 1 and chunkwise.max_workers ({}), not {wanted}",
            gucs::max_workers()
        ))
        .hint("Pass fewer workers, or raise chunkwise.max_workers."));
    }
    if task.paused {
        latch::cancels_held(|| notice!("task \"{}\" is paused; nothing runs", task.name));
        return Ok(None);
    }
    let backlog = pending_backlog(task)?;
    if backlog == 0 {
        latch::cancels_held(|| notice!("task \"{}\" has no pending items", task.name));
        return Ok(None);
    }
    let total = max_items.map_or(backlog, |m| m.min(backlog));
    let wanted = wanted.min(i32::try_from(total).unwrap_or(i32::MAX));

    // Counting free slots and taking them is one step: the lock is held until the new
    // workers show in pg_stat_activity, where the next launcher counts them.
    let launch_lock = LaunchLock::acquire();
    let slots = free_worker_slots(task.owner, wanted)?;
    let started = Instant::now();
    let run_id = next_run_id()?;
    let handles = launch_workers(task, run_id, slots, shared)?;
    Ok(Some(Launched {
        run_id,
        handles,
        total,
        started,
        launch_lock,
    }))
}

/// Waits until every launched worker has joined the run (it is then connected and shows
/// in pg_stat_activity) or has stopped, for at most `STARTUP_TIMEOUT`. Each place is
/// looked at on its own: a worker that joined, did the whole run and stopped must not
/// stand in for one still starting, which would find the run's segment gone once the
/// launcher lets go of it. (One that starts later than `STARTUP_TIMEOUT` may still find
/// it gone: it then does the last worker's part, see `worker::late`.)
fn wait_until_under_way(shared: &SharedRun, handles: &[DynamicBackgroundWorker]) {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let state = shared.state();
    loop {
        let accounted_for = handles
            .iter()
            .enumerate()
            .all(|(place, handle)| state.has_joined(place) || is_stopped(handle));
        if accounted_for || Instant::now() >= deadline {
            return;
        }
        wait_on_latch(STARTUP_POLL);
    }
}

/// Workers that got to work but never left cleanly died mid-run (killed, or an ERROR in
/// their own bookkeeping: see the server log). Nothing of theirs is lost (an item in
/// flight rolled back and is pending again), but the run did not finish its work: say so,
/// with what is left, instead of returning as if it had.
fn warn_about_lost_workers(task: &Task, run: &LaunchedRun) -> SqlResult<()> {
    let state = run.shared.state();
    let lost = state.workers_attached() - state.workers_exited();
    if lost <= 0 {
        return Ok(());
    }
    let left = pending_backlog(task)?;
    latch::cancels_held(|| {
        warning!(
            "{lost} of the {} workers of run {} of task \"{}\" ended without finishing (see the server log); \
         {left} items are still pending: run the task again to finish them",
            state.workers_attached(),
            run.run_id,
            task.name
        )
    });
    Ok(())
}

/// A run none of whose workers got to work is an error, not an empty success.
fn ensure_some_worker_started(run: &LaunchedRun) -> SqlResult<()> {
    if run.shared.state().workers_attached() > 0 {
        return Ok(());
    }
    Err(SqlError::new(
        PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
        format!(
            "none of the {} workers of run {} could start",
            run.handles.len(),
            run.run_id
        ),
    )
    .hint("See the server log; workers connect to this database as the task's owner."))
}

/// Workers see only committed rows and fresh snapshots: refuse what they could not see.
fn ensure_runnable(task: &Task) -> SqlResult<()> {
    // SAFETY: reads the transaction's isolation level.
    if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
        return Err(SqlError::new(
            PgSqlErrorCode::ERRCODE_INVALID_TRANSACTION_STATE,
            "chunkwise.run() needs READ COMMITTED isolation",
        )
        .hint("Call it outside a REPEATABLE READ or SERIALIZABLE transaction; each item commits on its own."));
    }
    let xmin = as_extension_owner(|| {
        Spi::get_one_with_args::<i64>(
            "SELECT xmin::text::bigint FROM chunkwise.tasks WHERE task_id = $1",
            &[task.id.into()],
        )
    })?
    .unwrap_or(0);
    // SAFETY: checks whether an xid belongs to this transaction (or its subtransactions).
    if unsafe {
        pg_sys::TransactionIdIsCurrentTransactionId(pg_sys::TransactionId::from(xmin as u32))
    } {
        return Err(SqlError::new(
            PgSqlErrorCode::ERRCODE_INVALID_TRANSACTION_STATE,
            format!("task \"{}\" was created in this transaction", task.name),
        )
        .hint("Commit before chunkwise.run(): workers see only committed tasks and items."));
    }
    if queued_into(task.id) {
        return Err(SqlError::new(
            PgSqlErrorCode::ERRCODE_INVALID_TRANSACTION_STATE,
            format!(
                "items of task \"{}\" were queued in this transaction, and its workers cannot see them before it commits",
                task.name
            ),
        )
        .hint(
            "Commit after planning, then run the task (psql -c and pg_cron run a string of \
             statements as one transaction), or CALL chunkwise.run_cycle(), which commits its planning first.",
        ));
    }
    ensure_owner_can_run(&task.name, task.owner)?;
    // The target may have been dropped, or the owner lost EXECUTE, since creation.
    Target::of_task(task)?;
    if let Some(proc) = task.call {
        ensure_owner_may_execute(task.owner, proc)?;
    }
    Ok(())
}

/// Pending items that are due now or within `chunkwise.retry_wait_max`.
fn pending_backlog(task: &Task) -> SqlResult<i64> {
    let count = as_extension_owner(|| {
        Spi::get_one_with_args::<i64>(
            concat!(
                "SELECT count(*) FROM chunkwise.items WHERE task_id = $1 AND status = ",
                item_status!(pending),
                " AND not_before <= now() + make_interval(secs => $2)"
            ),
            &[
                task.id.into(),
                f64::from(gucs::retry_wait_max_secs()).into(),
            ],
        )
    })?;
    Ok(count.unwrap_or(0))
}

/// How many of `wanted` workers `chunkwise.max_workers` (across the cluster) and
/// `chunkwise.max_workers_per_role` (for the task's owner) leave room for. Call it with
/// the launch lock held.
fn free_worker_slots(owner: pg_sys::Oid, wanted: i32) -> SqlResult<i32> {
    let (busy, busy_for_owner) = busy_workers(owner)?;
    let max = gucs::max_workers();
    let mut free = (i64::from(max) - busy).max(0) as i32;
    if free == 0 {
        return Err(SqlError::new(
            PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            format!("all {max} pg_chunkwise workers allowed by chunkwise.max_workers are busy"),
        )
        .hint("Wait for other runs to finish, or raise chunkwise.max_workers."));
    }
    if free < wanted {
        latch::cancels_held(|| {
            warning!(
                "only {free} of {wanted} workers can start: chunkwise.max_workers is {max} and {busy} are busy"
            )
        });
    }
    if let Some(share) = gucs::max_workers_per_role() {
        let role_free = (i64::from(share) - busy_for_owner).max(0) as i32;
        if role_free == 0 {
            return Err(SqlError::new(
                PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
                format!(
                    "the task's owner already has {busy_for_owner} pg_chunkwise workers running, \
                     its whole share (chunkwise.max_workers_per_role = {share})"
                ),
            )
            .hint("Wait for the owner's other runs to finish, or raise chunkwise.max_workers_per_role."));
        }
        if role_free < free.min(wanted) {
            latch::cancels_held(|| {
                warning!(
                    "only {role_free} of {wanted} workers can start: chunkwise.max_workers_per_role is {share} \
                 and the task's owner has {busy_for_owner} running"
                )
            });
        }
        free = free.min(role_free);
    }
    Ok(free.min(wanted))
}

/// Workers running in the whole cluster, and those of them running as `owner`.
fn busy_workers(owner: pg_sys::Oid) -> SqlResult<(i64, i64)> {
    // SAFETY: drops this transaction's cached copy of the backend status array, so the
    // count below sees the workers launched since it was taken.
    unsafe { pg_sys::pgstat_clear_snapshot() };
    let (busy, busy_for_owner) = as_extension_owner(|| {
        Spi::get_two_with_args::<i64, i64>(
            "SELECT count(*), count(*) FILTER (WHERE usesysid = $1) \
               FROM pg_catalog.pg_stat_activity WHERE backend_type = 'chunkwise worker'",
            &[owner.into()],
        )
    })?;
    Ok((busy.unwrap_or(0), busy_for_owner.unwrap_or(0)))
}

/// How many more workers `chunkwise.max_workers` and `chunkwise.max_workers_per_role`
/// leave room for, quietly (an always-on pool grows when room frees up).
pub fn room_for_workers(owner: pg_sys::Oid) -> SqlResult<i32> {
    let (busy, busy_for_owner) = busy_workers(owner)?;
    let mut room = i64::from(gucs::max_workers()) - busy;
    if let Some(share) = gucs::max_workers_per_role() {
        room = room.min(i64::from(share) - busy_for_owner);
    }
    Ok(room.clamp(0, i64::from(i32::MAX)) as i32)
}

pub fn next_run_id() -> SqlResult<i64> {
    let id = as_extension_owner(|| Spi::get_one::<i64>("SELECT nextval('chunkwise.run_id_seq')"))?;
    id.ok_or_else(|| {
        SqlError::new(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            "nextval of chunkwise.run_id_seq returned NULL",
        )
    })
}

fn launch_workers(
    task: &Task,
    run_id: i64,
    count: i32,
    shared: &SharedRun,
) -> SqlResult<Vec<DynamicBackgroundWorker>> {
    // SAFETY: reads this backend's database id, set once at connection.
    let database = unsafe { pg_sys::MyDatabaseId };
    let mut handles = Vec::new();
    for place in 0..count {
        let args = WorkerArgs {
            database,
            owner: task.owner,
            task_id: task.id,
            run_id,
            workers: count,
            place,
            seat: None,
        };
        match launch_worker(&task.name, &args, shared.handle()) {
            Some(handle) => handles.push(handle),
            None => break,
        }
    }
    if handles.is_empty() {
        return Err(SqlError::new(
            PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            "no background worker slot is free for pg_chunkwise",
        )
        .detail(format!("max_worker_processes is {}.", max_worker_processes()))
        .hint("Raise max_worker_processes (needs a restart) or wait for other background workers to finish."));
    }
    if handles.len() < count as usize {
        latch::cancels_held(|| {
            warning!(
                "only {} of {count} workers could start: no more background worker slots (max_worker_processes = {})",
                handles.len(),
                max_worker_processes()
            )
        });
    }
    Ok(handles)
}

/// Launches one worker of task `task_name` with `args`, attached to the run segment
/// `segment` (0 for a pool member); this process hears when it stops (bgw_notify_pid).
/// `None` when no background worker slot is free.
pub fn launch_worker(
    task_name: &str,
    args: &WorkerArgs,
    segment: u32,
) -> Option<DynamicBackgroundWorker> {
    BackgroundWorkerBuilder::new(&format!("chunkwise worker {task_name} #{}", args.run_id))
        .set_type("chunkwise worker")
        .set_library("pg_chunkwise")
        .set_function("chunkwise_worker_main")
        .enable_spi_access()
        .set_restart_time(None)
        .set_argument(Some(pg_sys::Datum::from(segment)))
        .set_extra(&args.encode())
        // SAFETY: reads this process's pid.
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
        .ok()
}

fn max_worker_processes() -> i32 {
    // SAFETY: reads a GUC variable of this backend.
    unsafe { pg_sys::max_worker_processes }
}

/// Whether a launched worker has stopped (or the postmaster is gone).
pub fn is_stopped(handle: &DynamicBackgroundWorker) -> bool {
    matches!(
        handle.pid(),
        Err(BackgroundWorkerStatus::Stopped | BackgroundWorkerStatus::PostmasterDied)
    )
}

fn all_stopped(handles: &[DynamicBackgroundWorker]) -> bool {
    handles.iter().all(is_stopped)
}

/// Sleeps on this backend's latch for at most `timeout`, then serves interrupts (a
/// cancel raises here). Workers' state changes set the latch too (bgw_notify_pid).
pub fn wait_on_latch(timeout: Duration) {
    // SAFETY: waits on this backend's latch; WL_EXIT_ON_PM_DEATH ends us with the
    // postmaster.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            timeout.as_millis() as i64,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    check_for_interrupts!();
}

/// How often a waiting launcher reports progress (`chunkwise.progress_interval`; zero:
/// never).
fn progress_interval() -> Duration {
    Duration::from_secs(gucs::progress_interval_secs().max(0) as u64)
}

fn report_progress(task: &Task, run_id: i64, state: &RunState, total: i64, started: Instant) {
    let tally = state.tally();
    let done = tally.processed + tally.dead;
    let failed = tally.failed;
    let elapsed = started.elapsed().as_secs_f64();
    let rate = if elapsed > 0.0 {
        done as f64 / elapsed
    } else {
        0.0
    };
    let percent = if total > 0 {
        100.0 * done as f64 / total as f64
    } else {
        100.0
    };
    let eta = if rate > 0.0 {
        format!("{:.0}s", (total - done).max(0) as f64 / rate)
    } else {
        "unknown".to_string()
    };
    latch::cancels_held(|| {
        notice!(
            "task \"{}\" run {run_id}: {done}/{total} items ({percent:.0}%), {failed} failed attempts, {rate:.1} items/s, ETA {eta}",
            task.name
        )
    });
}
