//! A database's supervisor: started by the launcher, connected to one database, it keeps
//! each always-on task's pool between `min_workers` and `workers`. It looks when its
//! latch is set (a committed enqueue that found no idle member, a change to an always-on
//! task, a member leaving) and, when a pool is empty, when its next item falls due; it
//! never polls. It leaves when its database has no always-on task (or no extension).

use std::time::{Duration, Instant};

use pgrx::PgMemoryContexts;
use pgrx::bgworkers::{BackgroundWorker, DynamicBackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;

use super::registry::{self, Seat};
use crate::columns::Columns;
use crate::error::SqlResult;
use crate::item_status::item_status;
use crate::latch;
use crate::launcher::{DEFAULT_WORKERS, is_stopped, launch_worker, next_run_id, room_for_workers};
use crate::pipeline::downstream::start_requested;
use crate::pipeline::settle::settle_database;
use crate::security::with_pinned_search_path;
use crate::transaction::in_transaction_or_error;
use crate::worker::args::WorkerArgs;

/// After a pool's worker failed to get going, the supervisor waits this long before it
/// starts another for that task (a dropped target or a role that may not log in would
/// otherwise make it start workers in a loop).
const FAILED_START_BACKOFF: Duration = Duration::from_secs(5);
/// How long it waits after its own bookkeeping failed.
const ERROR_BACKOFF: Duration = Duration::from_secs(5);

/// The always-on tasks that run (not paused), with what their pools need. Due items are
/// counted up to a bound: the pool grows to at most `workers` anyway.
const ALWAYS_ON_TASKS: &str = concat!(
    "SELECT t.task_id, t.task, chunkwise._owner(t.anchor, t.owner) AS owner, \
            coalesce(t.workers, $1) AS workers, t.min_workers, d.due, \
            CASE WHEN d.due = 0 THEN \
              (SELECT extract(epoch FROM min(i.not_before) - clock_timestamp())::float8 \
                 FROM chunkwise.items i WHERE i.task_id = t.task_id AND i.status = ",
    item_status!(pending),
    ") END AS next_due_in \
       FROM chunkwise.tasks t \
      CROSS JOIN LATERAL ( \
            SELECT count(*) AS due FROM ( \
              SELECT FROM chunkwise.items i \
               WHERE i.task_id = t.task_id AND i.status = ",
    item_status!(pending),
    " AND i.not_before <= now() LIMIT 1024) due_items) d \
      WHERE t.always_on AND NOT t.paused ORDER BY t.task_id"
);

/// Whether this database has pg_chunkwise at a version with always-on tasks.
const HAS_ALWAYS_ON: &str = "SELECT EXISTS (SELECT FROM pg_catalog.pg_attribute \
     WHERE attrelid = pg_catalog.to_regclass('chunkwise.tasks') AND attname = 'always_on' \
       AND NOT attisdropped) AS answer";

/// When the supervisor looks again.
enum NextLook {
    /// When its latch is set (a request, a member leaving).
    WhenWoken,
    /// After this long at the latest (a backoff, an empty pool's next retry).
    After(Duration),
    /// Never: its database has no always-on task and no worker it started is left.
    Leave,
}

struct AlwaysOnTask {
    id: i32,
    name: String,
    owner: pg_sys::Oid,
    workers: i32,
    min_workers: i32,
    due: i64,
    next_due_in: Option<f64>,
}

struct Launched {
    seat: Seat,
    task_id: i32,
    handle: DynamicBackgroundWorker,
}

struct Supervisor {
    database: pg_sys::Oid,
    launched: Vec<Launched>,
    /// Tasks whose workers failed to get going, and until when none is started for them.
    backoff: Vec<(i32, Instant)>,
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn chunkwise_supervisor_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = pg_sys::Oid::from(arg.value() as u32);
    // As the bootstrap superuser: it reads the extension's tables and starts workers,
    // which run as each task's owner.
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database), None);
    if !registry::supervisor_joined(database) {
        return;
    }
    // SAFETY: registers a callback with a plain integer argument, run once at exit.
    unsafe {
        pg_sys::before_shmem_exit(
            Some(supervisor_gone),
            pg_sys::Datum::from(database.to_u32()),
        )
    };
    finish_pipelines();
    let mut supervisor = Supervisor {
        database,
        launched: Vec::new(),
        backoff: Vec::new(),
    };
    loop {
        let seen = registry::supervisor_requests(database);
        let timeout = match supervisor.look_in_transaction() {
            Ok(NextLook::WhenWoken) => None,
            Ok(NextLook::After(wait)) => Some(wait),
            Ok(NextLook::Leave) if registry::supervisor_leaves(database, seen) => return,
            // A request came in while it looked: look again at once.
            Ok(NextLook::Leave) => Some(Duration::ZERO),
            Err((sqlstate, message)) => {
                latch::cancels_held(|| {
                    warning!(
                        "pg_chunkwise supervisor: its look at the always-on tasks failed [SQLSTATE {sqlstate}]: {message}; \
                     it looks again in {} s",
                        ERROR_BACKOFF.as_secs()
                    )
                });
                Some(ERROR_BACKOFF)
            }
        };
        latch::nap(timeout);
        if BackgroundWorker::sigterm_received() {
            return;
        }
    }
}

/// Settles the runs a crash or a killed worker left armed and starts the cycles left
/// asked for (see `pipeline`), once, when the supervisor starts: at server start and
/// after a crash-restart every database gets a supervisor for a first look.
fn finish_pipelines() {
    let requested = in_own_transaction("settle the runs left armed", settle_database);
    if let Some(requested) = requested.filter(|r| !r.is_empty()) {
        in_own_transaction("start the cycles left asked for", || {
            start_requested(&requested)
        });
    }
}

/// Runs `body` in a transaction of its own; `None` (with a WARNING) when it fails.
fn in_own_transaction<R>(what: &str, body: impl FnOnce() -> SqlResult<R>) -> Option<R> {
    in_transaction_or_error(body)
        .map_err(|(sqlstate, message)| {
            latch::cancels_held(|| {
                warning!(
                    "pg_chunkwise supervisor: it could not {what} [SQLSTATE {sqlstate}]: {message}"
                )
            })
        })
        .ok()
}

/// The supervisor's exit callback: frees its seat so that the launcher can start another.
#[pg_guard]
unsafe extern "C-unwind" fn supervisor_gone(_code: i32, database: pg_sys::Datum) {
    registry::supervisor_exited(pg_sys::Oid::from(database.value() as u32));
}

impl Supervisor {
    /// `look` in a transaction of its own, with the pinned search_path; an ERROR in it is
    /// rolled back and returned as (SQLSTATE, message).
    fn look_in_transaction(&mut self) -> Result<NextLook, (String, String)> {
        in_transaction_or_error(|| with_pinned_search_path(|| self.look()))
    }

    /// One look at the always-on tasks: retires the pools of tasks that are no longer
    /// always-on and starts what the others need. Returns when to look again.
    fn look(&mut self) -> SqlResult<NextLook> {
        self.forget_stopped_workers();
        let tasks = if Spi::get_one::<bool>(HAS_ALWAYS_ON)?.unwrap_or(false) {
            always_on_tasks()?
        } else {
            Vec::new()
        };
        let ids: Vec<i32> = tasks.iter().map(|t| t.id).collect();
        registry::keep_only_pools(self.database, &ids);
        if tasks.is_empty() {
            return Ok(if self.launched.is_empty() {
                NextLook::Leave
            } else {
                NextLook::WhenWoken
            });
        }
        let mut next_look: Option<Duration> = None;
        let mut sooner = |wait: Duration| {
            next_look = Some(next_look.map_or(wait, |n| n.min(wait)));
        };
        for task in &tasks {
            let Some(pool) =
                registry::pool_for(self.database, task.id, task.min_workers, task.workers)
            else {
                latch::cancels_held(|| {
                    warning!(
                        "pg_chunkwise: no pool slot is free for always-on task \"{}\" ({} always-on tasks at most)",
                        task.name,
                        registry::MAX_POOLS
                    )
                });
                continue;
            };
            if let Some(until) = self.backed_off(task.id) {
                sooner(until);
                continue;
            }
            let size = registry::pool_size(pool);
            let wanted = wanted_size(task, size);
            if wanted > size.active {
                self.start_members(task, pool, wanted - size.active)?;
            } else if size.active == 0
                && let Some(seconds) = task.next_due_in
            {
                // Nobody waits for the next retry: the supervisor does.
                sooner(Duration::from_secs_f64(seconds.max(0.001)));
            }
        }
        Ok(next_look.map_or(NextLook::WhenWoken, NextLook::After))
    }

    /// Frees the seats of launched workers that stopped without joining, and backs off
    /// their tasks.
    fn forget_stopped_workers(&mut self) {
        let now = Instant::now();
        let mut failed = Vec::new();
        self.launched.retain(|launched| {
            let stopped = is_stopped(&launched.handle);
            if stopped && registry::release_unjoined(launched.seat) {
                failed.push(launched.task_id);
            }
            !stopped
        });
        self.backoff.retain(|(_, until)| *until > now);
        for task_id in failed {
            self.backoff.push((task_id, now + FAILED_START_BACKOFF));
        }
    }

    fn backed_off(&self, task_id: i32) -> Option<Duration> {
        self.backoff
            .iter()
            .find(|(id, _)| *id == task_id)
            .map(|(_, until)| until.saturating_duration_since(Instant::now()))
    }

    fn start_members(&mut self, task: &AlwaysOnTask, pool: usize, count: i32) -> SqlResult<()> {
        let count = count.min(room_for_workers(task.owner)?);
        if count <= 0 {
            return Ok(());
        }
        let run_id = registry::pool_run(pool, next_run_id)?;
        for _ in 0..count {
            let Some(seat) = registry::reserve_member(pool, run_id) else {
                break;
            };
            let args = WorkerArgs {
                database: self.database,
                owner: task.owner,
                task_id: task.id,
                run_id,
                workers: task.workers,
                place: 0,
                seat: Some(seat),
            };
            // The handle must outlive this look's transaction, whose memory it would be
            // allocated in (a few bytes per worker started, kept for the process's life).
            // SAFETY: TopMemoryContext lives as long as the process; nothing allocated in
            // the closure refers to shorter-lived memory.
            let launched = unsafe {
                PgMemoryContexts::TopMemoryContext
                    .switch_to(|_| launch_worker(&task.name, &args, 0))
            };
            match launched {
                Some(handle) => self.launched.push(Launched {
                    seat,
                    task_id: task.id,
                    handle,
                }),
                None => {
                    registry::release_unjoined(seat);
                    break;
                }
            }
        }
        Ok(())
    }
}

/// The pool's size for what is due: its minimum, grown by the due items the idle
/// members cannot take, up to `workers`.
fn wanted_size(task: &AlwaysOnTask, size: registry::PoolSize) -> i32 {
    let busy = size.active - size.idle;
    let for_due = i64::from(busy)
        .saturating_add(task.due)
        .min(i64::from(task.workers)) as i32;
    if task.due > 0 {
        for_due
            .max(task.min_workers)
            .max(size.active.min(task.workers))
    } else {
        task.min_workers
    }
}

fn always_on_tasks() -> SqlResult<Vec<AlwaysOnTask>> {
    Spi::connect(|client| {
        let table = client.select(ALWAYS_ON_TASKS, None, &[DEFAULT_WORKERS.into()])?;
        table
            .into_iter()
            .map(|row| {
                Ok(AlwaysOnTask {
                    id: row.required("task_id")?,
                    name: row.required("task")?,
                    owner: row.required("owner")?,
                    workers: row.required("workers")?,
                    min_workers: row.required("min_workers")?,
                    due: row.required("due")?,
                    next_due_in: row.optional("next_due_in")?,
                })
            })
            .collect()
    })
}
