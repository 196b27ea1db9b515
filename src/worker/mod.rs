//! The background worker: connects as the task owner, then claims and runs items until
//! the queue is drained (or the run's limit is reached, or it is told to stop).

pub mod args;
mod citus;
mod claim;
mod discarding_plan;
mod error;
mod follow_up;
mod inflight;
mod item;
mod lanes;
mod queue;
mod signals;
mod throttle;

use std::ffi::{CStr, CString};
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

pub use args::WorkerArgs;
use claim::{Claimant, ClaimedItem};
use error::{Bookkeeping, BookkeepingError, Cause};
use inflight::InFlightSlot;
use item::{ItemOutcome, Targets};
use queue::{ClaimCursor, Queue};
use throttle::{GATE_RECHECK, Throttle};

use crate::always_on::{self, Seat};
use crate::catalog::Task;
use crate::governance::{now_micros, split_point};
use crate::gucs;
use crate::latch;
use crate::notify;
use crate::raised::RaisedError;
use crate::retention;
use crate::run_state::{Attempt, SharedRun, Tally};
use crate::target::Target;
use crate::transaction::{Ended, aborting_on_error, in_transaction};

/// Longest sleep between looks at the cancel flag while waiting for a retry.
const RETRY_POLL: Duration = Duration::from_secs(1);
/// How long a worker naps before claiming again when the due work left is held by others.
const HELD_WORK_NAP: Duration = Duration::from_millis(20);
/// Bookkeeping errors in a row a worker rides out, and its first nap after one (doubled
/// each time).
const BOOKKEEPING_RETRIES: u32 = 4;
const BOOKKEEPING_NAP: Duration = Duration::from_millis(200);
/// How often a batch looks whether pause() or cancel() asked its run to stop.
const STOP_CHECK_INTERVAL: Duration = Duration::from_millis(200);
/// How often a worker adds its figures to the run's row.
const TALLY_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// The weight of the latest item in a worker's recent time per item (see `time_item`).
const ITEM_TIME_WEIGHT: f64 = 0.2;

/// What the worker's loop does after a step.
enum Step {
    Continue,
    Exit,
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn chunkwise_worker_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP);
    signals::handle_sigterm();
    let Some(args) = WorkerArgs::decode(BackgroundWorker::get_extra()) else {
        latch::cancels_held(|| {
            log!("pg_chunkwise worker started with malformed arguments; exiting")
        });
        return;
    };
    let shared = match args.seat {
        // A pool member: its seat in the always-on registry says whether it is still
        // wanted, and it counts itself out when it leaves, however it leaves.
        Some(seat) => {
            if !always_on::join(seat, args.task_id, args.run_id) {
                return;
            }
            // SAFETY: registers a callback with a plain integer argument, run once at exit.
            unsafe {
                pg_sys::before_shmem_exit(
                    Some(leave_pool_at_exit),
                    pg_sys::Datum::from(seat.encode()),
                )
            };
            SharedRun::private()
        }
        // The segment goes away when the launcher and every other worker are gone: this
        // worker started later than the launcher waited, after the rest of the run.
        None => match SharedRun::attach(arg.value() as u32) {
            Some(shared) => shared,
            None => {
                follow_up::stand_in_for_the_last_worker(&args);
                return;
            }
        },
    };
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(args.database), Some(args.owner));

    // An ERROR (a cancel too) is caught here as in the loop's steps: uncaught, it would
    // end the process without the warning.
    // SAFETY: reads the memory context the worker starts in, to return to after an ERROR.
    let memory = unsafe { pg_sys::CurrentMemoryContext };
    let started = aborting_on_error(memory, || transaction(|| Worker::start(args, shared)))
        .unwrap_or_else(|raised| Err(BookkeepingError::new("start", Cause::Raised(raised))));
    let mut worker = match started {
        Ok(Some(worker)) => worker,
        Ok(None) => return,
        Err(error) => {
            latch::cancels_held(|| {
                warning!(
                    "pg_chunkwise worker of task {}, run {}: it could not start: {error} [SQLSTATE {}]",
                    args.task_id,
                    args.run_id,
                    error.sqlstate()
                )
            });
            return;
        }
    };
    worker.run();
    worker.finish();
}

/// A pool member's exit callback: however the process ends, its seat is freed (a clean
/// exit has freed it already; then this does nothing).
#[pg_guard]
unsafe extern "C-unwind" fn leave_pool_at_exit(_code: i32, seat: pg_sys::Datum) {
    if let Some(seat) = Seat::decode(seat.value() as u64) {
        always_on::leave(seat);
    }
}

struct Worker {
    args: WorkerArgs,
    task: Task,
    shared: SharedRun,
    queue: Queue,
    targets: Targets,
    /// Where the item in flight is kept for the case of a crash; `None` if it could not
    /// be made.
    slot: Option<InFlightSlot>,
    tally: Tally,
    /// pause() or cancel() asked this run to stop (seen when a claim came back empty).
    stop_requested: bool,
    /// Where its next claim starts.
    claim_cursor: ClaimCursor,
    /// The `now()` of its last claim's transaction: which items that claim found not yet
    /// due (see `Queue::seconds_to_next_retry`).
    last_claim_at: Option<pg_sys::TimestampTz>,
    stopped_early: bool,
    /// Claims of the run's `max_items` the batch under way holds.
    reserved: i64,
    /// The item being run, for the log when the worker's bookkeeping fails.
    item_in_flight: Option<i64>,
    /// Claims left to make one item at a time, after a batch failed at commit.
    one_per_transaction: usize,
    /// The worker's figures as the run's row has them, and when they were added.
    flushed: Tally,
    flushed_at: Instant,
    /// Left after too many bookkeeping errors (not counted as a clean exit).
    gave_up: bool,
    /// A pool member: since when it has found nothing to do.
    idle_since: Option<Instant>,
    /// The task's governance: gates, rate limit, lock_timeout, splitting.
    throttle: Throttle,
    /// Its recent time per done item (see `time_item`).
    time_per_item: Option<Duration>,
}

impl Worker {
    /// Loads the task, prepares the bookkeeping statements and registers with the run;
    /// `None` (after a log line) when the task is gone or its target no longer fits.
    fn start(args: WorkerArgs, shared: SharedRun) -> Bookkeeping<Option<Worker>> {
        let task = match Task::by_id(args.task_id) {
            Ok(Some(task)) => task,
            _ => {
                latch::cancels_held(|| {
                    log!(
                        "pg_chunkwise task {} no longer exists; worker exits",
                        args.task_id
                    )
                });
                return Ok(None);
            }
        };
        let target = match Target::of_task(&task) {
            Ok(target) => target,
            Err(_) => {
                latch::cancels_held(|| {
                    warning!(
                        "pg_chunkwise task \"{}\": its target procedure no longer fits; worker exits",
                        task.name
                    )
                });
                return Ok(None);
            }
        };
        set_session_option(
            c"application_name",
            &format!("chunkwise {} #{}", task.name, args.run_id),
        );
        if !task.synchronous_commit {
            set_session_option(c"synchronous_commit", "off");
        }
        let queue = Queue::prepare(&task)?;
        queue.count_crashed_attempts(args.database)?;
        let slot = InFlightSlot::create(args.database);
        queue.register_worker(&args)?;
        shared.state().join(args.place as usize);
        // Its gates are known before its first claim.
        let mut throttle = Throttle::new();
        throttle.reread_if_due(&queue, task.id)?;
        let targets = Targets::new(
            target,
            task.after.as_deref().map(Target::for_statement),
            task.item_timeout_ms,
        );
        Ok(Some(Worker {
            args,
            task,
            shared,
            queue,
            targets,
            slot,
            tally: Tally::default(),
            stop_requested: false,
            claim_cursor: ClaimCursor::default(),
            last_claim_at: None,
            time_per_item: None,
            stopped_early: false,
            reserved: 0,
            item_in_flight: None,
            one_per_transaction: 0,
            flushed: Tally::default(),
            flushed_at: Instant::now(),
            gave_up: false,
            idle_since: None,
            throttle,
        }))
    }

    fn should_stop(&self) -> bool {
        signals::stop_signalled() || self.shared.state().cancelled()
    }

    fn reload_config_if_asked() {
        // SAFETY: the SIGHUP handler sets ConfigReloadPending; re-reading the configuration
        // between transactions is what PostgreSQL's own processes do.
        unsafe {
            if std::ptr::addr_of!(pg_sys::ConfigReloadPending).read_volatile() != 0 {
                pg_sys::ConfigReloadPending = 0;
                pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
            }
        }
    }

    /// Claims and runs batches until the run is over. An ERROR in the worker's own
    /// bookkeeping (a deadlock with a DBA's statement, a lock or statement timeout from
    /// the owner's settings, a full disk) rolls back that step and is retried; after
    /// `BOOKKEEPING_RETRIES` in a row the worker gives up, says so in the log with task,
    /// run and item, and leaves without counting itself as finished: the run then shows
    /// as interrupted, and `run()` warns. The other workers go on with the work.
    fn run(&mut self) {
        loop {
            match self.retrying(Self::step) {
                Ok(Step::Continue) => {}
                Ok(Step::Exit) => return,
                Err(Unfinished::Stopped(_)) => {
                    // SIGTERM's cancel, or the launcher's, interrupted the bookkeeping.
                    self.stopped_early = true;
                    return;
                }
                Err(Unfinished::GaveUp) => {
                    self.gave_up = true;
                    return;
                }
            }
        }
    }

    /// Runs `step` (see `guarded`) until it succeeds: after an error the worker says so,
    /// naps (`bookkeeping_nap`) and tries again, `BOOKKEEPING_RETRIES` times at most.
    /// An error while the worker is told to stop ends it at once.
    fn retrying<R>(
        &mut self,
        mut step: impl FnMut(&mut Self) -> Bookkeeping<R>,
    ) -> Result<R, Unfinished> {
        let mut errors_in_a_row = 0;
        loop {
            match self.guarded(&mut step) {
                Ok(done) => return Ok(done),
                Err(error) if self.should_stop() => return Err(Unfinished::Stopped(error)),
                Err(error) => {
                    errors_in_a_row += 1;
                    if errors_in_a_row > BOOKKEEPING_RETRIES {
                        self.report_bookkeeping_failure(
                            &error,
                            &format!("it gives up after {BOOKKEEPING_RETRIES} tries"),
                        );
                        return Err(Unfinished::GaveUp);
                    }
                    self.report_bookkeeping_failure(&error, "it tries again");
                    // (A SIGTERM meanwhile: the next try, or step, sees it.)
                    latch::nap(Some(bookkeeping_nap(errors_in_a_row)));
                }
            }
        }
    }

    /// The WARNING of a failed step: task, run, the item in flight and why, then what the
    /// worker does about it (`next`); the statement that failed is its DETAIL.
    fn report_bookkeeping_failure(&self, error: &BookkeepingError, next: &str) {
        let doing = match self.item_in_flight {
            Some(item) => format!(" (item {item})"),
            None => String::new(),
        };
        let message = format!(
            "pg_chunkwise worker of task \"{}\", run {}: its bookkeeping failed{doing} [SQLSTATE {}]: {}; {next}",
            self.task.name,
            self.args.run_id,
            error.sqlstate(),
            error.cause,
        );
        let report = ErrorReport::new(PgSqlErrorCode::ERRCODE_WARNING, message, "pg_chunkwise")
            .set_detail(format!("The statement that failed: {}.", error.statement));
        latch::cancels_held(|| report.report(PgLogLevel::WARNING));
    }

    /// One step of the worker (a step of its loop, its leaving). Its errors come back
    /// here, and `retrying` decides what becomes of them: an ERROR raised in it (a cancel
    /// too) was caught and its transaction rolled back; an error it returned was rolled
    /// back where it arose.
    fn guarded<R>(&mut self, step: impl FnOnce(&mut Self) -> Bookkeeping<R>) -> Bookkeeping<R> {
        // SAFETY: reads the memory context the loop runs in, to return to after an ERROR.
        let memory = unsafe { pg_sys::CurrentMemoryContext };
        let outcome = match aborting_on_error(memory, || step(self)) {
            Ok(stepped) => stepped,
            Err(raised) => Err(BookkeepingError::new(
                self.queue
                    .interrupted_statement()
                    .unwrap_or("work between statements"),
                Cause::Raised(raised),
            )),
        };
        latch::forget_cancel();
        if outcome.is_err() {
            // The step's items rolled back: pending again, with no attempt counted.
            self.give_back_reserved(0);
            self.mark_idle();
            self.claim_cursor
                .reset(self.shared.state(), self.args.place as usize);
        }
        outcome
    }

    fn step(&mut self) -> Bookkeeping<Step> {
        if self.should_stop() || self.stop_requested {
            self.stopped_early = true;
            return Ok(Step::Exit);
        }
        if self.args.seat.is_some_and(always_on::must_leave) {
            // Its task changed or is no longer always-on: the supervisor starts members
            // with the task as it is now.
            return Ok(Step::Exit);
        }
        Self::reload_config_if_asked();
        let wanted = if self.one_per_transaction > 0 {
            1
        } else {
            i64::from(self.task.items_per_commit)
        };
        let granted = self.shared.state().reserve(wanted);
        if granted == 0 {
            return Ok(Step::Exit); // the run's max_items is used up
        }
        self.reserved = granted;
        if !self.pass_governance(granted)? {
            self.give_back_reserved(0);
            return Ok(Step::Exit);
        }
        let handled = self.run_batch(granted)?;
        self.give_back_reserved(handled);
        if handled < granted {
            self.give_back_rate(granted - handled);
        }
        report_idle();
        if handled > 0 {
            self.idle_since = None;
        }
        if handled == 0 && !self.stop_requested && !self.should_stop() {
            // An empty claim ends the run only when no due work is left: what other
            // workers (or transactions) hold now is claimable once they let go.
            if self.due_work_held_elsewhere()? {
                latch::nap(Some(HELD_WORK_NAP));
                return Ok(Step::Continue);
            }
            let go_on = match self.args.seat {
                Some(seat) => self.idle_in_pool(seat)?,
                None => self.wait_for_retry()?,
            };
            if !go_on {
                return Ok(Step::Exit);
            }
        }
        Ok(Step::Continue)
    }

    /// Gives back the claims of `max_items` the last batch reserved and did not use.
    fn give_back_reserved(&mut self, used: i64) {
        self.shared.state().release(self.reserved - used);
        self.reserved = 0;
    }

    fn mark_idle(&mut self) {
        self.item_in_flight = None;
        self.shared.state().hold(self.args.place as usize, None);
        if let Some(slot) = &self.slot {
            slot.idle();
        }
    }

    /// Claims up to `limit` items and runs them in one transaction, then counts what
    /// happened to them. Returns how many items were claimed and run.
    ///
    /// The commit itself can fail: a deferred constraint is checked there, and under
    /// Citus a worker node that went away between the item's statements and the commit
    /// makes the PREPARE fail. Then every item of the batch is rolled back. A batch of
    /// one item is recorded as a failed attempt (with a retry) in a new transaction, as a
    /// failure inside the item would be. A bigger batch does not know which of its items
    /// failed, and charging them all would kill innocent items: its items are pending
    /// again and the worker claims them one per transaction, so that the one that fails
    /// at commit fails alone.
    fn run_batch(&mut self, limit: i64) -> Bookkeeping<i64> {
        let ended = in_transaction(|| self.process_batch(limit));
        self.mark_idle();
        self.one_per_transaction = self.one_per_transaction.saturating_sub(1);
        let (items, attempts) = match ended {
            Ended::Committed((items, attempts, flushed)) => {
                self.flushed = flushed;
                (items, attempts)
            }
            Ended::RolledBack(error) => return Err(error),
            Ended::CommitFailed((items, _, _), failure) if items.len() > 1 => {
                latch::cancels_held(|| {
                    warning!(
                        "pg_chunkwise task \"{}\": the commit of a batch of {} items failed [SQLSTATE {}]: {}; \
                     running them one per transaction to find the item that fails",
                        self.task.name,
                        items.len(),
                        failure.sqlstate,
                        failure.message
                    )
                });
                self.one_per_transaction = items.len();
                self.claim_cursor
                    .reset(self.shared.state(), self.args.place as usize);
                return Ok(items.len() as i64);
            }
            Ended::CommitFailed((items, _, _), failure) => {
                let run_id = self.args.run_id;
                let attempts = transaction(|| {
                    items
                        .iter()
                        .map(|item| self.queue.record_failure(item, &failure, run_id))
                        .collect()
                })?;
                (items, attempts)
            }
        };
        for attempt in attempts {
            self.tally.record(attempt);
            self.shared.state().record(attempt);
        }
        Ok(items.len() as i64)
    }

    /// Claims up to `limit` items and runs each in its own subtransaction, in the
    /// caller's transaction. Returns the items it ran, what happened to each, and the
    /// worker's figures as the run's row has them if this transaction commits.
    ///
    /// Between items it stops early when the run is told to stop (SIGTERM, cancel,
    /// pause): the items it did not get to are let go unchanged at commit. An item that
    /// SIGTERM interrupted is rolled back without counting an attempt.
    fn process_batch(
        &mut self,
        limit: i64,
    ) -> Bookkeeping<(Vec<ClaimedItem>, Vec<Attempt>, Tally)> {
        let flushed = self.flush_tally_if_due()?;
        let place = self.args.place as usize;
        let claimant = Claimant {
            run: self.shared.state(),
            place,
            lane_size: self.lane_size(),
        };
        // SAFETY: reads this transaction's start time, the claim's now().
        self.last_claim_at = Some(unsafe { pg_sys::GetCurrentTransactionStartTimestamp() });
        let mut items = self.queue.claim(
            self.task.id,
            self.args.run_id,
            limit,
            &mut self.claim_cursor,
            &claimant,
        )?;
        // Until mark_idle, after this transaction ends.
        self.shared
            .state()
            .hold(place, items.first().map(|item| item.id));
        if let Some(last) = items.last() {
            self.shared.state().reach(place, (last.priority, last.id));
        }
        if items.is_empty() {
            self.stop_requested = self.queue.stop_requested(self.task.id, self.args.run_id)?;
        }
        let mut attempts = Vec::with_capacity(items.len());
        let mut last_stop_check = Instant::now();
        for (ran, item) in items.iter().enumerate() {
            if ran > 0 && self.stop_between_items(&mut last_stop_check)? {
                break;
            }
            self.item_in_flight = Some(item.id);
            if let Some(seat) = self.args.seat {
                always_on::record_latency(seat, item.waited);
            }
            if let Some(slot) = &self.slot {
                slot.in_flight(self.args.run_id, item.id, item.attempts);
            }
            // chunkwise.workers parses this text.
            report_activity(&format!(
                "task {}: key {} (item {}); {} items done",
                self.task.name, item.key, item.id, self.tally.processed
            ));
            let lock_timeout = self.throttle.governance().lock_timeout.as_deref();
            let started = Instant::now();
            let attempt = match self.targets.execute(item, lock_timeout) {
                ItemOutcome::Done => {
                    self.queue.mark_done(item, self.args.run_id)?;
                    self.time_item(started.elapsed());
                    Attempt::Done
                }
                ItemOutcome::Failed(_) | ItemOutcome::TimedOut(_) if signals::self_terminated() => {
                    // The item's own target sent the SIGTERM: its attempt failed.
                    let failure =
                        RaisedError::new("57P01", "the item's target terminated its own worker");
                    self.queue
                        .record_failure(item, &failure, self.args.run_id)?
                }
                ItemOutcome::Failed(_) | ItemOutcome::TimedOut(_) if signals::stop_signalled() => {
                    // Stopped from outside: rolled back, not counted.
                    self.stopped_early = true;
                    break;
                }
                ItemOutcome::TimedOut(failure) => self.split_or_fail(item, &failure)?,
                ItemOutcome::Failed(failure) => {
                    self.queue
                        .record_failure(item, &failure, self.args.run_id)?
                }
            };
            attempts.push(attempt);
            if signals::self_terminated() {
                self.stopped_early = true;
                break;
            }
        }
        items.truncate(attempts.len());
        // The task's options, read again here, after its items (not to delay a woken
        // pool member's claim), when it has no gates (see `throttle`).
        self.throttle.reread_if_due(&self.queue, self.task.id)?;
        if !items.is_empty() {
            citus::commit_remote_work_with_2pc();
        }
        Ok((items, attempts, flushed))
    }

    /// Counts a done item's time (its target and its mark-done) into the worker's recent
    /// time per item, which sizes its lanes.
    fn time_item(&mut self, took: Duration) {
        self.time_per_item = Some(match self.time_per_item {
            Some(recent) => recent.mul_f64(1.0 - ITEM_TIME_WEIGHT) + took.mul_f64(ITEM_TIME_WEIGHT),
            None => took,
        });
    }

    /// How many positions the worker's next lane holds; 0: it claims at the front of the
    /// queue (pool members, which share no run state).
    fn lane_size(&self) -> i64 {
        if self.args.seat.is_some() {
            return 0;
        }
        lanes::lane_size(gucs::lane_size(), self.time_per_item)
    }

    /// A `[lo, hi)` item that ran past `item_timeout`: with `split_on_timeout`, and if
    /// it is wide enough, it becomes two halves in this transaction (no attempt charged,
    /// and its rolled-back work is done by the halves); otherwise a failed attempt.
    fn split_or_fail(&self, item: &ClaimedItem, failure: &RaisedError) -> Bookkeeping<Attempt> {
        let governance = self.throttle.governance();
        let at = item
            .hi
            .filter(|_| governance.split_on_timeout)
            .and_then(|hi| {
                split_point(item.key, hi, governance.split_min_width).map(|at| (at, hi))
            });
        if let Some((at, hi)) = at
            && let Some(child) = self.queue.split(item, at, self.args.run_id)?
        {
            latch::cancels_held(|| {
                log!(
                    "pg_chunkwise task \"{}\": item {} [{}, {hi}) ran past item_timeout; split into item {} [{}, {at}) and item {child} [{at}, {hi})",
                    self.task.name,
                    item.id,
                    item.key,
                    item.id,
                    item.key
                )
            });
            return Ok(Attempt::Split);
        }
        self.queue.record_failure(item, failure, self.args.run_id)
    }

    /// Waits until the task's gates are open and `max_rate` lets `items` items start
    /// (see `throttle`). Nothing is claimed meanwhile. Returns false when the worker
    /// should leave instead: SIGTERM, pause or cancel, or its pool wants it gone. A
    /// closed gate holds nothing back while no work is due.
    fn pass_governance(&mut self, items: i64) -> Bookkeeping<bool> {
        let task_id = self.task.id;
        let mut last_stop_check = Instant::now();
        loop {
            let closed = if self.throttle.due_for_a_look() {
                transaction(|| {
                    self.throttle.reread_if_due(&self.queue, task_id)?;
                    match self.throttle.closed_gate(&self.queue, &self.task.name)? {
                        Some(reason) if self.queue.work_remains(task_id)? => Ok(Some(reason)),
                        _ => Ok(None),
                    }
                })?
            } else {
                None
            };
            let (reason, wait) = match closed {
                Some(reason) => (reason, GATE_RECHECK),
                None => match self.throttle.governance().max_rate {
                    None => return Ok(true),
                    Some(rate) => match self.take_rate(items, rate) {
                        Ok(()) => return Ok(true),
                        Err(wait) => (format!("max_rate ({rate}/s)"), wait.min(GATE_RECHECK)),
                    },
                },
            };
            report_waiting(&format!(
                "task {}: throttled by {reason}; {} items done",
                self.task.name, self.tally.processed
            ));
            latch::nap(Some(wait));
            if transaction(|| self.stop_between_items(&mut last_stop_check))? {
                self.stopped_early = true;
                return Ok(false);
            }
            if self.args.seat.is_some_and(always_on::must_leave) {
                return Ok(false);
            }
        }
    }

    /// Takes `items` slots of the `max_rate` schedule the worker shares: its run's, or
    /// its pool's.
    fn take_rate(&self, items: i64, rate: f64) -> Result<(), Duration> {
        let now = now_micros();
        match self.args.seat {
            Some(seat) => always_on::take_rate(seat, now, items, rate),
            None => self.shared.state().rate.take(now, items, rate),
        }
    }

    /// Gives back `max_rate` slots a claim did not use.
    fn give_back_rate(&self, items: i64) {
        if self.throttle.governance().max_rate.is_none() {
            return;
        }
        match self.args.seat {
            Some(seat) => always_on::give_back_rate(seat, items),
            None => self.shared.state().rate.give_back(items),
        }
    }

    /// Whether the batch should end before its next item: SIGTERM or the launcher's
    /// cancel at once, pause() or cancel() looked up at most every `STOP_CHECK_INTERVAL`.
    fn stop_between_items(&mut self, last_check: &mut Instant) -> Bookkeeping<bool> {
        if self.should_stop() {
            self.stopped_early = true;
            return Ok(true);
        }
        if last_check.elapsed() >= STOP_CHECK_INTERVAL {
            *last_check = Instant::now();
            self.stop_requested = self.queue.stop_requested(self.task.id, self.args.run_id)?;
        }
        Ok(self.stop_requested)
    }

    /// Adds what the worker counted since its last report to the run's row, in the
    /// batch's transaction, at most every `TALLY_FLUSH_INTERVAL`: the figures of a
    /// worker that dies are then at most that old. Returns the figures the row holds
    /// once this transaction commits.
    fn flush_tally_if_due(&mut self) -> Bookkeeping<Tally> {
        if self.flushed_at.elapsed() < TALLY_FLUSH_INTERVAL || self.tally == self.flushed {
            return Ok(self.flushed);
        }
        self.flushed_at = Instant::now();
        self.queue
            .add_to_run(self.args.run_id, &self.tally.since(&self.flushed))?;
        Ok(self.tally)
    }

    /// After an empty claim: whether due work remains that others hold; the worker then
    /// says so in pg_stat_activity while it naps before claiming again.
    fn due_work_held_elsewhere(&self) -> Bookkeeping<bool> {
        let remains = transaction(|| self.queue.work_remains(self.task.id))?;
        if remains {
            report_waiting(&format!(
                "task {}: waiting for due items other transactions hold; {} items done",
                self.task.name, self.tally.processed
            ));
        }
        Ok(remains)
    }

    /// Nothing is claimable: waits for the next retry if it falls due within
    /// `chunkwise.retry_wait_max`. Returns false when the worker should exit.
    fn wait_for_retry(&mut self) -> Bookkeeping<bool> {
        let task_id = self.task.id;
        let claimed_at = self.last_claim_at;
        let Some(seconds) = transaction(|| self.queue.seconds_to_next_retry(task_id, claimed_at))?
        else {
            return Ok(false);
        };
        if seconds > f64::from(gucs::retry_wait_max_secs()) {
            return Ok(false);
        }
        let deadline = Instant::now() + Duration::from_secs_f64(seconds.max(0.0));
        while Instant::now() < deadline {
            let nap = deadline
                .saturating_duration_since(Instant::now())
                .min(RETRY_POLL);
            latch::nap(Some(nap));
            if self.should_stop()
                || transaction(|| self.queue.stop_requested(task_id, self.args.run_id))?
            {
                self.stopped_early = true;
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// A pool member with nothing claimable sleeps on its latch until a committed
    /// enqueue wakes it, the next retry falls due, or `idle_timeout` passes (then it
    /// leaves if the pool is above `min_workers`). Returns false when it should leave.
    ///
    /// It marks itself idle before it looks at the queue: an enqueue that commits after
    /// the look finds the mark and sets the latch, one that committed before is seen by
    /// the look, so no wake-up is lost between the two.
    fn idle_in_pool(&mut self, seat: Seat) -> Bookkeeping<bool> {
        always_on::start_idling(seat);
        let task_id = self.task.id;
        let claimed_at = self.last_claim_at;
        let next_due = transaction(|| self.queue.seconds_to_next_retry(task_id, claimed_at))?;
        if next_due.is_some_and(|seconds| seconds <= 0.0) {
            always_on::stop_idling(seat);
            return Ok(true);
        }
        let idle_since = *self.idle_since.get_or_insert_with(Instant::now);
        let idle_timeout = Duration::from_millis(self.task.idle_timeout_ms.max(1) as u64);
        let idle_left = idle_timeout.saturating_sub(idle_since.elapsed());
        let nap = next_due.map_or(idle_left, |seconds| {
            idle_left.min(Duration::from_secs_f64(seconds))
        });
        report_waiting(&format!(
            "task {}: idle, waiting for items; {} items done",
            self.task.name, self.tally.processed
        ));
        latch::nap(Some(nap));
        // (Whether it must leave, the next step looks first.)
        let woken = always_on::stop_idling(seat);
        if self.should_stop() {
            self.stopped_early = true;
            return Ok(false);
        }
        if !woken && idle_since.elapsed() >= idle_timeout {
            if always_on::retire_if_above_minimum(seat) {
                return Ok(false);
            }
            self.idle_since = Some(Instant::now());
        }
        Ok(true)
    }

    /// Adds this worker's figures to the run's row; the last worker out announces the
    /// end of the run and then settles it (see `follow_up`). Leaving is retried as the
    /// loop's steps are (a cancel that hit it once ended the worker uncounted). If it
    /// keeps failing, the worker says so and leaves uncounted: the run then shows as
    /// interrupted, as after any worker lost, and the task's next run or cycle settles it.
    fn finish(mut self) {
        self.claim_cursor
            .reset(self.shared.state(), self.args.place as usize);
        // Counted out of the run (or pool) once, whichever try of the leaving does it.
        let mut last_out = None;
        let left = self.retrying(|worker| worker.leave(&mut last_out));
        let Worker {
            args, task, shared, ..
        } = self;
        // The run's shared state is not needed past this point: let it go before any
        // follow-up, which may create and drop run segments of its own (downstream runs).
        drop(shared);
        match left {
            Ok(true) => follow_up::follow_up(&task, args.run_id),
            Ok(false) | Err(Unfinished::GaveUp) => {} // (said so when it gave up)
            Err(Unfinished::Stopped(error)) => latch::cancels_held(|| {
                warning!(
                    "pg_chunkwise worker of task \"{}\", run {}: it could not leave its run cleanly [SQLSTATE {}]: {error}",
                    task.name,
                    args.run_id,
                    error.sqlstate()
                )
            }),
        }
    }

    /// Adds the worker's last figures to the run's row and counts it out (once:
    /// `last_out` keeps whether it was the last out, for a try after a failed one).
    /// Returns whether it was the last out, which then announced the run's end.
    fn leave(&self, last_out: &mut Option<bool>) -> Bookkeeping<bool> {
        let Worker {
            args,
            shared,
            queue,
            tally,
            flushed,
            stopped_early,
            gave_up,
            ..
        } = self;
        transaction(|| {
            queue.unregister_worker(args, &tally.since(flushed), *stopped_early, *gave_up)?;
            let last_out = *last_out.get_or_insert_with(|| match args.seat {
                Some(seat) => always_on::leave(seat),
                None => shared.state().worker_exited(*gave_up),
            });
            if last_out {
                let announce = || -> Result<(), Cause> {
                    notify::run_finished(args.run_id)?;
                    retention::apply(args.task_id)?;
                    Ok(())
                };
                announce()
                    .map_err(|cause| BookkeepingError::new("announce the run's end", cause))?;
            }
            Ok(last_out)
        })
    }
}

/// How a worker's step that kept failing ended (see `Worker::retrying`).
enum Unfinished {
    /// It was told to stop (SIGTERM, the launcher's cancel); the last error.
    Stopped(BookkeepingError),
    /// It failed `BOOKKEEPING_RETRIES` times more (said so in the log).
    GaveUp,
}

/// The nap after the `errors_in_a_row`-th bookkeeping error in a row: `BOOKKEEPING_NAP`,
/// doubled for each error before it.
fn bookkeeping_nap(errors_in_a_row: u32) -> Duration {
    BOOKKEEPING_NAP * 2u32.pow(errors_in_a_row.saturating_sub(1).min(16))
}

/// Runs `body` in a transaction of its own: committed when it returns `Ok`, rolled back
/// when it returns an error, which comes back, as does an ERROR raised by the commit.
fn transaction<R>(body: impl FnOnce() -> Bookkeeping<R>) -> Bookkeeping<R> {
    match in_transaction(body) {
        Ended::Committed(result) => Ok(result),
        Ended::RolledBack(error) => Err(error),
        Ended::CommitFailed(_, raised) => {
            Err(BookkeepingError::new("commit", Cause::Raised(raised)))
        }
    }
}

/// Sets a session setting of the worker; a value PostgreSQL cannot hold (a NUL inside)
/// is left unset.
fn set_session_option(name: &CStr, value: &str) {
    let Ok(value) = CString::new(value) else {
        return;
    };
    // SAFETY: both strings are NUL-terminated and outlive the call, which copies them.
    unsafe {
        pg_sys::SetConfigOption(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
        )
    };
}

/// Shows the item in flight in pg_stat_activity (state active, query = this text).
fn report_activity(text: &str) {
    let text = CString::new(text).unwrap_or_default();
    // SAFETY: pgstat_report_activity copies the NUL-terminated string.
    unsafe { pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, text.as_ptr()) };
}

/// Shows the worker as idle with `text` as its query (chunkwise.workers shows no item).
fn report_waiting(text: &str) {
    let text = CString::new(text).unwrap_or_default();
    // SAFETY: pgstat_report_activity copies the NUL-terminated string.
    unsafe { pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, text.as_ptr()) };
}

fn report_idle() {
    // SAFETY: a NULL text keeps the last query shown, as PostgreSQL does for idle backends.
    unsafe { pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, std::ptr::null()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bookkeeping_naps_double_from_the_first() {
        let naps: Vec<u128> = (1..=BOOKKEEPING_RETRIES)
            .map(|n| bookkeeping_nap(n).as_millis())
            .collect();
        assert_eq!(naps, [200, 400, 800, 1600]);
        let total: Duration = (1..=BOOKKEEPING_RETRIES).map(bookkeeping_nap).sum();
        assert_eq!(
            total,
            Duration::from_millis(3000),
            "a worker gives up after 3 s of naps"
        );
    }
}
