//! The worker's bookkeeping on the queue tables: claim, mark done, record a failure,
//! and the run's row. All of it runs as the extension owner, with plans prepared once.

use std::cell::Cell;
use std::time::Instant;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::PgOid;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiTupleTable};

use super::args::WorkerArgs;
use super::claim::{
    ClaimScope, Claimant, ClaimedItem, PlainClaim, RESCAN_INTERVAL, RunsClaims, WAITED, int4, int8,
    plain_claim_args, plain_claim_sql,
};
use super::error::{Bookkeeping, BookkeepingError, Cause};
use super::inflight;
use super::lanes::{LaneCursor, LaneStatements};
use crate::catalog::Task;
use crate::columns::Columns;
use crate::governance::{GOVERNANCE_COLUMNS, Governance};
use crate::item_status::item_status;
use crate::latch;
use crate::locks;
use crate::notify;
use crate::open_groups::close_items_of_groups;
use crate::raised::RaisedError;
use crate::run_state::{Attempt, RunState, Tally};
use crate::security::as_extension_owner_with;

/// A claim from the start of the queue and one from after the worker's cursor; for
/// plain tasks also the claims of lanes.
struct Claim {
    from_start: OwnedPreparedStatement,
    after: OwnedPreparedStatement,
    lanes: Option<LaneStatements>,
}

/// Where a worker's next claim starts: after the last item it claimed (plain tasks) or
/// after the last group it served (sequential groups: round-robin).
#[derive(Default)]
pub struct ClaimCursor {
    after_item: Option<(i64, i64)>,
    after_group: Option<String>,
    rescanned_at: Option<Instant>,
    /// The last claim found items behind the furthest position the others reached
    /// (stragglers a rescan found: retries fallen due, better priorities planned since):
    /// the next claims go on from this worker's own cursor, in order, until it catches up.
    sweeping: bool,
    /// Where it is among the run's lanes, when it claims in lanes.
    lanes: LaneCursor,
}

impl ClaimCursor {
    /// Starts again from the front of the queue (its claims rolled back, or it exits),
    /// leaving its lane to the others.
    pub fn reset(&mut self, run: &RunState, place: usize) {
        self.lanes.leave(run, place);
        *self = ClaimCursor::default();
    }
}

/// The task's ($1) groups with work whose head (first pending or dead item in priority
/// order) is pending and due, each with its head as `head`: what a claim of a task with
/// sequential groups chooses from, and what `GROUP_WORK_REMAINS` asks about. A FROM
/// clause and the start of its WHERE.
macro_rules! groups_with_due_heads {
    () => {
        concat!(
            "chunkwise.groups g \
             CROSS JOIN LATERAL ( \
               SELECT i.item_id, i.status, i.not_before FROM chunkwise.items i \
                WHERE i.task_id = g.task_id AND i.group_key = g.group_key \
                  AND i.status IN (",
            item_status!(pending),
            ", ",
            item_status!(dead),
            ") ORDER BY i.priority, i.item_id LIMIT 1) head \
             WHERE g.task_id = $1 AND g.open > 0 AND head.status = ",
            item_status!(pending),
            " AND head.not_before <= now()"
        )
    };
}

/// The claim of a task with sequential groups: the head item of the next group after
/// this worker's cursor (in group_key order, wrapping around) whose head is due. Each
/// worker walks the groups round-robin, so every group with work gets a turn per pass,
/// whatever its size. A dead head blocks its group; a head waiting for its retry makes the
/// group wait (order is kept). The group's row stays locked (SKIP LOCKED for the others)
/// until this transaction ends: one item per group in flight. The head is read before the
/// group's row is locked: if the worker that held the lock finished that head meanwhile,
/// the re-check of the locked item row (pending, due) refuses it and the claim comes back
/// empty instead of running the item twice. Nothing here updates the groups table, and
/// `open` is in no index, so the mark-done update of a group's row stays a HOT update.
fn groups_claim_sql(after_cursor: bool) -> String {
    format!(
        "WITH turn AS ( \
           SELECT g.group_key, head.item_id FROM {heads} AND $2 > 0 {cursor} \
              AND EXISTS (SELECT FROM chunkwise.tasks t \
                           WHERE t.task_id = $1 AND NOT t.paused AND t.cancelled_through < $3) \
            ORDER BY g.group_key LIMIT 1 \
            FOR UPDATE OF g SKIP LOCKED) \
         SELECT i.item_id, i.key, i.hi, i.payload, i.attempts, turn.group_key, i.priority, \
                i.xmin::text AS version, i.ctid::text AS row_at, {waited} AS waited \
           FROM chunkwise.items i JOIN turn USING (item_id) \
          WHERE i.status = {pending} AND i.not_before <= now() \
            FOR UPDATE OF i",
        heads = groups_with_due_heads!(),
        pending = item_status!(pending),
        waited = WAITED,
        cursor = if after_cursor {
            "AND g.group_key > $4"
        } else {
            ""
        }
    )
}

/// Whether due work remains that this task's claims could take once whoever holds it lets
/// go: the claim's own conditions, without its locks. An empty claim is the end of a run
/// only when this says no: a claim also comes back empty when the items or groups left
/// are locked by other workers (or other transactions), or when a group's head was
/// finished by the worker that held it between the claim's read and its lock.
const PLAIN_WORK_REMAINS: &str = concat!(
    "SELECT EXISTS (SELECT FROM chunkwise.items WHERE task_id = $1 AND status = ",
    item_status!(pending),
    " AND not_before <= now()) AS answer"
);

/// The same for a task with sequential groups: a group with work whose head is due.
const GROUP_WORK_REMAINS: &str = concat!(
    "SELECT EXISTS (SELECT FROM ",
    groups_with_due_heads!(),
    ") AS answer"
);

/// Done, unless the row is no longer the version claimed ($3, at $4): the item's own
/// target enqueued its key again, which updated the pending row in the item's
/// transaction. Then the item stays pending with what the enqueue set, and runs again:
/// marking it done would lose the follow-up the target asked for. The claimed version is
/// found by its ctid: it cannot move while this transaction holds its row lock.
macro_rules! mark_done_sql {
    ($returning:literal) => {
        concat!(
            "UPDATE chunkwise.items SET status = ",
            item_status!(done),
            ", finished_at = clock_timestamp(), run_id = $2 \
             WHERE ctid = $4::tid AND item_id = $1 AND xmin = $3::xid",
            $returning
        )
    };
}
const MARK_DONE: &str = mark_done_sql!("");

/// Done, in a task with sequential groups: the group has one open item fewer (the same
/// version check as MARK_DONE: an item enqueued again stays open).
const MARK_DONE_IN_GROUP: &str = concat!(
    "WITH done AS (",
    mark_done_sql!(" RETURNING task_id, group_key"),
    ") ",
    close_items_of_groups!("done")
);

/// Whether the run ($2) must stop: its task was paused, cancelled up to it, or dropped.
const STOP_REQUESTED: &str = "SELECT coalesce((SELECT paused OR cancelled_through >= $2 \
       FROM chunkwise.tasks WHERE task_id = $1), true) AS answer";

/// The task's ($1) governance options, read again every second by running workers.
fn governance_sql() -> String {
    format!("SELECT {GOVERNANCE_COLUMNS} FROM chunkwise.tasks WHERE task_id = $1")
}

/// The most replication lag of any standby now, in seconds (0 without standbys, or
/// while they are caught up and idle: the lags are then NULL).
const REPLICATION_LAG: &str = "SELECT coalesce(extract(epoch FROM        max(greatest(write_lag, flush_lag, replay_lag))), 0)::float8 AS lag        FROM pg_catalog.pg_stat_replication";

/// Splits the claimed `[lo, hi)` item $1 at $2: a new pending item `[$2, hi)` with its
/// priority, group, payload and attempts, and the item itself shrunk to `[lo, $2)`; no
/// attempt is charged. A pending item already at key $2 (overlapping plans) makes it
/// split nothing: then `child` is NULL and the timeout counts as a failure.
const SPLIT_ITEM: &str = concat!(
    "WITH parent AS (SELECT task_id, hi, priority, group_key, payload, attempts                        FROM chunkwise.items WHERE item_id = $1),           child AS (INSERT INTO chunkwise.items (task_id, key, hi, priority, group_key, payload, attempts, run_id)                     SELECT task_id, $2, hi, priority, group_key, payload, attempts, $3 FROM parent                     ON CONFLICT (task_id, key) WHERE status = ",
    item_status!(pending),
    " DO NOTHING RETURNING item_id),           shrunk AS (UPDATE chunkwise.items SET hi = $2, run_id = $3                       WHERE item_id = $1 AND EXISTS (SELECT FROM child))      SELECT (SELECT item_id FROM child) AS child"
);

/// A failed attempt: attempts + 1; dead after max_attempts, else due again after an
/// exponential backoff (retry_backoff * 2^(attempts-1), capped at retry_backoff_max).
/// `$condition` narrows which item rows it applies to. The RETURNING columns are read by
/// `Queue::count_failed_attempt`.
macro_rules! failed_attempt_sql {
    ($($condition:tt)*) => {
        concat!(
            "UPDATE chunkwise.items i \
             SET attempts = i.attempts + 1, \
                 status = CASE WHEN i.attempts + 1 >= t.max_attempts THEN ",
            item_status!(dead),
            " ELSE ",
            item_status!(pending),
            " END, \
                 not_before = CASE WHEN i.attempts + 1 >= t.max_attempts THEN i.not_before \
                              ELSE clock_timestamp() + least(t.retry_backoff * power(2, least(i.attempts, 30)), \
                                                             t.retry_backoff_max) END, \
                 finished_at = CASE WHEN i.attempts + 1 >= t.max_attempts THEN clock_timestamp() END, \
                 last_sqlstate = $2, last_error = $3, last_failed_at = clock_timestamp(), run_id = $4 \
             FROM chunkwise.tasks t \
             WHERE i.item_id = $1 AND t.task_id = i.task_id",
            $($condition)*,
            " RETURNING i.status = ",
            item_status!(dead),
            " AS dead, i.attempts, t.max_attempts, t.task, i.key, \
                        to_char(i.not_before, 'YYYY-MM-DD HH24:MI:SS.MS TZ') AS retry_at"
        )
    };
}

/// A failure inside the item, or at its commit.
const RECORD_FAILURE: &str = failed_attempt_sql!("");

/// An attempt that crashed the server: counted only if no attempt was counted since the
/// crashed one was claimed with `$5` attempts (and the item was not done or dropped).
const RECORD_CRASH: &str = failed_attempt_sql!(concat!(
    " AND i.status = ",
    item_status!(pending),
    " AND i.attempts = $5"
));

/// What recording a failed attempt found.
struct CountedAttempt {
    dead: bool,
    attempts: i32,
    max_attempts: i32,
    task: String,
    key: i64,
    retry_at: String,
}

/// The SQLSTATE recorded for an attempt that crashed the server: it raised nothing.
const CRASH_SQLSTATE: &str = "XX000";

impl CountedAttempt {
    /// The RETURNING row of a failed-attempt update; `None` when no row was updated.
    fn read(table: SpiTupleTable) -> Result<Option<CountedAttempt>, Cause> {
        let Some(row) = table.into_iter().next() else {
            return Ok(None);
        };
        Ok(Some(CountedAttempt {
            dead: row.required("dead")?,
            attempts: row.required("attempts")?,
            max_attempts: row.required("max_attempts")?,
            task: row.required("task")?,
            key: row.required("key")?,
            retry_at: row.required("retry_at")?,
        }))
    }

    /// Logs the attempt (with the task's limit as it is now, not as the worker started)
    /// and announces a death. `cause` follows "failed on attempt n of m".
    fn report(&self, run_id: i64, item_id: i64, cause: &str) -> Bookkeeping<Attempt> {
        let said = format!(
            "pg_chunkwise task \"{}\" key {} failed on attempt {} of {}{cause}",
            self.task, self.key, self.attempts, self.max_attempts
        );
        if self.dead {
            notify::item_dead(run_id, item_id)
                .map_err(|e| BookkeepingError::new("announce a dead item", e))?;
            latch::cancels_held(|| {
                warning!("{said}; the item is dead (chunkwise.retry() makes it pending again)")
            });
            Ok(Attempt::Died)
        } else {
            latch::cancels_held(|| warning!("{said}; retry at {}", self.retry_at));
            Ok(Attempt::Failed)
        }
    }
}

pub struct Queue {
    claim: Claim,
    grouped: bool,
    stop_requested: OwnedPreparedStatement,
    work_remains: OwnedPreparedStatement,
    mark_done: OwnedPreparedStatement,
    record_failure: OwnedPreparedStatement,
    governance: OwnedPreparedStatement,
    /// The bookkeeping statement under way: an ERROR it raises unwinds past the queue,
    /// and the worker's log line names the statement from here.
    running: Cell<Option<&'static str>>,
}

fn text() -> PgOid {
    PgOid::BuiltIn(pg_sys::BuiltinOid::TEXTOID)
}

/// Runs the worker's own bookkeeping statements: as the extension owner, with the pinned
/// search_path (whatever the owner's role settings say), with generic plans; an error
/// comes back naming `statement`.
///
/// Why generic plans: the claim's and mark-done's parameters change with every item, and
/// the plan cache, judging a custom plan cheaper, planned them afresh for every item: a
/// quarter of the CPU of a 4-worker run went to the planner (perf), and forcing generic
/// plans took 4 workers from about 8,500 to 13,600 items/s. Their best plan does not
/// depend on the values (the claim index, the primary key). The task's own target keeps
/// the session's plan_cache_mode.
fn bookkeeping<R>(statement: &'static str, f: impl FnOnce() -> Result<R, Cause>) -> Bookkeeping<R> {
    as_extension_owner_with(&[(c"plan_cache_mode", c"force_generic_plan")], f)
        .map_err(|cause| BookkeepingError::new(statement, cause))
}

/// The statements that differ between plain tasks and tasks with sequential groups.
struct QueueSql {
    /// The claim, from the start (false) or after the worker's cursor (true).
    claim_sql: fn(bool) -> String,
    claim_args: Vec<PgOid>,
    mark_done: &'static str,
    work_remains: &'static str,
}

impl Queue {
    /// Prepares the hot-path statements for `task`; call inside a transaction.
    pub fn prepare(task: &Task) -> Bookkeeping<Queue> {
        let grouped = task.sequential_groups;
        let QueueSql {
            claim_sql,
            claim_args,
            mark_done,
            work_remains,
        } = if grouped {
            QueueSql {
                claim_sql: groups_claim_sql,
                claim_args: vec![int4(), int8(), int8(), text()],
                mark_done: MARK_DONE_IN_GROUP,
                work_remains: GROUP_WORK_REMAINS,
            }
        } else {
            QueueSql {
                claim_sql: |after| {
                    plain_claim_sql(if after {
                        ClaimScope::AFTER_CURSOR
                    } else {
                        ClaimScope::FROM_START
                    })
                },
                claim_args: plain_claim_args(),
                mark_done: MARK_DONE,
                work_remains: PLAIN_WORK_REMAINS,
            }
        };
        bookkeeping("prepare", || {
            Spi::connect(|client| {
                Ok(Queue {
                    claim: Claim {
                        from_start: client.prepare_mut(&claim_sql(false), &claim_args)?.keep(),
                        after: client.prepare_mut(&claim_sql(true), &claim_args)?.keep(),
                        lanes: (!grouped)
                            .then(|| LaneStatements::prepare(client))
                            .transpose()?,
                    },
                    grouped,
                    stop_requested: client
                        .prepare_mut(STOP_REQUESTED, &[int4(), int8()])?
                        .keep(),
                    work_remains: client.prepare_mut(work_remains, &[int4()])?.keep(),
                    mark_done: client
                        .prepare_mut(mark_done, &[int8(), int8(), text(), text()])?
                        .keep(),
                    record_failure: client
                        .prepare_mut(RECORD_FAILURE, &[int8(), text(), text(), int8()])?
                        .keep(),
                    governance: client.prepare_mut(&governance_sql(), &[int4()])?.keep(),
                    running: Cell::new(None),
                })
            })
        })
    }

    /// Runs one bookkeeping statement (see [`bookkeeping`]), remembering which one is
    /// under way until it returns.
    fn run<R>(
        &self,
        statement: &'static str,
        f: impl FnOnce() -> Result<R, Cause>,
    ) -> Bookkeeping<R> {
        self.running.set(Some(statement));
        let result = bookkeeping(statement, f);
        self.running.set(None);
        result
    }

    /// The statement that an ERROR interrupted, if it was one of the queue's: the next
    /// call forgets it.
    pub fn interrupted_statement(&self) -> Option<&'static str> {
        self.running.take()
    }

    /// Claims up to `limit` due items (one, from the next group, for sequential groups).
    /// A plain task's worker with a lane size (`claimant`) claims in lanes (`lanes`); the
    /// others claim at the front of the queue: after the worker's cursor, or from the
    /// start when nothing is left after it or the cursor is older than `RESCAN_INTERVAL`;
    /// the cursor moves to the last item claimed. A plain task's claims there start after
    /// the furthest item any other worker of the claimant's run claimed
    /// (unless the worker is sweeping up stragglers behind it, see
    /// `ClaimCursor::sweeping`) and pass over the items the others hold without trying to
    /// lock them (`plain_claim_sql`): with every worker at the front of the queue, a claim
    /// that started after its own last item read each item the others had claimed since,
    /// on the very heap page they were updating.
    pub fn claim(
        &self,
        task_id: i32,
        run_id: i64,
        limit: i64,
        cursor: &mut ClaimCursor,
        claimant: &Claimant<'_>,
    ) -> Bookkeeping<Vec<ClaimedItem>> {
        let Claimant {
            run,
            place,
            lane_size,
        } = *claimant;
        let plain = PlainClaim {
            task_id,
            limit,
            run_id,
            held: if self.grouped {
                Vec::new()
            } else {
                run.held_by_others(place)
            },
        };
        if let Some(lanes) = self.claim.lanes.as_ref().filter(|_| lane_size > 0) {
            return lanes.claim(self, &plain, &mut cursor.lanes, claimant);
        }
        let reached = (!self.grouped)
            .then(|| run.reached_by_others(place))
            .flatten();
        let after_item = if cursor.sweeping {
            cursor.after_item
        } else {
            cursor.after_item.max(reached)
        };
        let args = |after: bool| -> Vec<DatumWithOid<'static>> {
            if self.grouped {
                let group = cursor.after_group.clone().filter(|_| after);
                vec![task_id.into(), limit.into(), run_id.into(), group.into()]
            } else {
                let position = after_item.filter(|_| after).unwrap_or((0, 0));
                plain.args(position, (0, 0), &[])
            }
        };
        let fresh = cursor
            .rescanned_at
            .is_some_and(|at| at.elapsed() < RESCAN_INTERVAL);
        let has_cursor = after_item.is_some() || cursor.after_group.is_some();
        let mut items = if fresh && has_cursor {
            self.claim_with(&self.claim.after, &args(true))?
        } else {
            Vec::new()
        };
        if items.is_empty() {
            items = self.claim_with(&self.claim.from_start, &args(false))?;
            cursor.rescanned_at = Some(Instant::now());
        }
        if let Some(last) = items.last() {
            let position = (last.priority, last.id);
            cursor.after_item = Some(position);
            cursor.after_group.clone_from(&last.group_key);
            cursor.sweeping = reached.is_some_and(|reached| position < reached);
        }
        Ok(items)
    }

    /// Whether due work remains for this task's claims (see `PLAIN_WORK_REMAINS`).
    pub fn work_remains(&self, task_id: i32) -> Bookkeeping<bool> {
        self.ask("work check", &self.work_remains, &[task_id.into()])
    }

    /// Whether `chunkwise.pause()` or `chunkwise.cancel()` asked this run to stop.
    pub fn stop_requested(&self, task_id: i32, run_id: i64) -> Bookkeeping<bool> {
        self.ask(
            "stop check",
            &self.stop_requested,
            &[task_id.into(), run_id.into()],
        )
    }

    /// The `answer` of a yes/no bookkeeping statement.
    fn ask(
        &self,
        name: &'static str,
        statement: &OwnedPreparedStatement,
        args: &[DatumWithOid<'_>],
    ) -> Bookkeeping<bool> {
        self.run(name, || {
            Spi::connect_mut(|client| {
                let table = client.update(statement, None, args)?;
                let row = table.into_iter().next().ok_or(Cause::NoRow)?;
                Ok(row.required("answer")?)
            })
        })
    }

    pub fn mark_done(&self, item: &ClaimedItem, run_id: i64) -> Bookkeeping<()> {
        self.run("mark done", || {
            Spi::connect_mut(|client| {
                client.update(
                    &self.mark_done,
                    None,
                    &[
                        item.id.into(),
                        run_id.into(),
                        item.version.as_str().into(),
                        item.row_at.as_str().into(),
                    ],
                )?;
                Ok(())
            })
        })
    }

    /// Records a failed attempt and logs it; the attempt is `Died` when the item is now dead.
    pub fn record_failure(
        &self,
        item: &ClaimedItem,
        failure: &RaisedError,
        run_id: i64,
    ) -> Bookkeeping<Attempt> {
        let counted = self.run("record failure", || {
            Spi::connect_mut(|client| {
                let table = client.update(
                    &self.record_failure,
                    None,
                    &[
                        item.id.into(),
                        failure.sqlstate.as_str().into(),
                        failure.message.as_str().into(),
                        run_id.into(),
                    ],
                )?;
                CountedAttempt::read(table)?.ok_or(Cause::NoRow)
            })
        })?;
        counted.report(
            run_id,
            item.id,
            &format!(" [SQLSTATE {}]: {}", failure.sqlstate, failure.message),
        )
    }

    /// Counts the attempts that were in flight when the server crashed (see
    /// `worker::inflight`) as failed, before this worker's first claim.
    pub fn count_crashed_attempts(&self, database: pg_sys::Oid) -> Bookkeeping<()> {
        locks::lock_crash_recovery();
        for crashed in inflight::take_crashed(database) {
            let message = format!(
                "the server crashed while this item ran: its worker (pid {}, run {}) was killed by a signal",
                crashed.pid, crashed.run_id
            );
            let counted = self.run("record crash", || {
                Spi::connect_mut(|client| {
                    let table = client.update(
                        RECORD_CRASH,
                        None,
                        &[
                            crashed.item_id.into(),
                            CRASH_SQLSTATE.into(),
                            message.as_str().into(),
                            crashed.run_id.into(),
                            crashed.attempts.into(),
                        ],
                    )?;
                    CountedAttempt::read(table)
                })
            })?;
            if let Some(counted) = counted {
                counted.report(
                    crashed.run_id,
                    crashed.item_id,
                    &format!(
                        ": the server crashed while it ran (its worker, pid {} of run {}, died by a signal)",
                        crashed.pid, crashed.run_id
                    ),
                )?;
            }
        }
        Ok(())
    }

    /// The task's governance options as they are now; `None` when it was dropped.
    pub fn governance(&self, task_id: i32) -> Bookkeeping<Option<Governance>> {
        self.run("governance", || {
            Spi::connect_mut(|client| {
                let table = client.update(&self.governance, Some(1), &[task_id.into()])?;
                match table.into_iter().next() {
                    Some(row) => Ok(Some(Governance::from_row(&row)?)),
                    None => Ok(None),
                }
            })
        })
    }

    /// The most replication lag of any standby, in seconds.
    pub fn replication_lag_secs(&self) -> Bookkeeping<f64> {
        self.run("replication lag", || {
            Ok(Spi::get_one::<f64>(REPLICATION_LAG)?.unwrap_or(0.0))
        })
    }

    /// Splits a timed-out `[lo, hi)` item at `at` (see `SPLIT_ITEM`); returns the new
    /// item's id, or `None` when it could not split.
    pub fn split(&self, item: &ClaimedItem, at: i64, run_id: i64) -> Bookkeeping<Option<i64>> {
        self.run("split item", || {
            Ok(Spi::get_one_with_args::<i64>(
                SPLIT_ITEM,
                &[item.id.into(), at.into(), run_id.into()],
            )?)
        })
    }

    /// Seconds until the earliest retry of the task falls due, among the items that were
    /// not yet due at the worker's last claim (`claimed_at`, that claim's `now()`; `None`:
    /// this transaction's). One that fell due since comes back as 0 seconds or less, so
    /// that the worker claims again at once instead of leaving the run with it pending
    /// (with `now()` of this lookup instead, it fell between the two and was missed on a
    /// busy machine). Items due before the claim and not taken by it (held elsewhere,
    /// behind a group's head) are not waited for here.
    pub fn seconds_to_next_retry(
        &self,
        task_id: i32,
        claimed_at: Option<pg_sys::TimestampTz>,
    ) -> Bookkeeping<Option<f64>> {
        let claimed_at = claimed_at.and_then(|at| TimestampWithTimeZone::try_from(at).ok());
        self.run("retry lookup", || {
            Spi::connect(|client| {
                let table =
                    client.select(NEXT_RETRY, None, &[task_id.into(), claimed_at.into()])?;
                let row = table.into_iter().next().ok_or(Cause::NoRow)?;
                Ok(row.optional("seconds")?)
            })
        })
    }

    /// Counts the worker into its run and records its session (which makes it live in
    /// the views), forgetting sessions that are gone.
    pub fn register_worker(&self, args: &WorkerArgs) -> Bookkeeping<()> {
        self.run("register worker", || {
            Spi::run_with_args(
                "INSERT INTO chunkwise.run_history (run_id, task_id, started_at, workers_requested, workers_started, followup) \
                 VALUES ($1, $2, now(), $3, 1, 'armed') \
                 ON CONFLICT (run_id) DO UPDATE SET workers_started = chunkwise.run_history.workers_started + 1",
                &[args.run_id.into(), args.task_id.into(), args.workers.into()],
            )?;
            Spi::run(
                "DELETE FROM chunkwise.worker_sessions w \
                  WHERE NOT EXISTS (SELECT FROM chunkwise._live_workers l WHERE l.pid = w.pid)",
            )?;
            Spi::run_with_args(
                "INSERT INTO chunkwise.worker_sessions (pid, run_id, backend_start) \
                 SELECT pid, $1, backend_start FROM pg_catalog.pg_stat_activity \
                  WHERE pid = pg_catalog.pg_backend_pid()",
                &[args.run_id.into()],
            )?;
            Ok(())
        })
    }

    /// Adds a worker's figures to its run's row.
    pub fn add_to_run(&self, run_id: i64, tally: &Tally) -> Bookkeeping<()> {
        self.run("add figures", || Self::update_run(run_id, tally, None))
    }

    /// Adds the worker's last figures to the run's row and forgets its session. A worker
    /// that gave up is not counted as exited: the run shows as interrupted.
    pub fn unregister_worker(
        &self,
        args: &WorkerArgs,
        tally: &Tally,
        stopped_early: bool,
        gave_up: bool,
    ) -> Bookkeeping<()> {
        let leaving = Leaving {
            counted: !gave_up,
            stopped_early,
        };
        self.run("unregister worker", || {
            Self::update_run(args.run_id, tally, Some(leaving))?;
            Spi::run(
                "DELETE FROM chunkwise.worker_sessions WHERE pid = pg_catalog.pg_backend_pid()",
            )?;
            Ok(())
        })
    }

    /// One update of the run's row: the worker's figures, and its exit when it leaves.
    fn update_run(run_id: i64, tally: &Tally, leaving: Option<Leaving>) -> Result<(), Cause> {
        Spi::run_with_args(
            "UPDATE chunkwise.run_history \
                SET processed = processed + $2, failed = failed + $3, dead = dead + $4, \
                    workers_exited = workers_exited + CASE WHEN $5 THEN 1 ELSE 0 END, \
                    finished_at = CASE WHEN $6 THEN clock_timestamp() ELSE finished_at END, \
                    cancelled = cancelled OR $7 \
              WHERE run_id = $1",
            &[
                run_id.into(),
                tally.processed.into(),
                tally.failed.into(),
                tally.dead.into(),
                leaving.is_some_and(|l| l.counted).into(),
                leaving.is_some().into(),
                leaving.is_some_and(|l| l.stopped_early).into(),
            ],
        )?;
        Ok(())
    }
}

impl RunsClaims for Queue {
    fn claim_after(&self, plain: &PlainClaim, after: (i64, i64)) -> Bookkeeping<Vec<ClaimedItem>> {
        self.claim_with(&self.claim.after, &plain.args(after, (0, 0), &[]))
    }

    fn claim_with(
        &self,
        statement: &OwnedPreparedStatement,
        args: &[DatumWithOid<'_>],
    ) -> Bookkeeping<Vec<ClaimedItem>> {
        self.run("claim", || {
            Spi::connect_mut(|client| {
                let table = client.update(statement, None, args)?;
                table
                    .into_iter()
                    .map(|row| {
                        Ok(ClaimedItem {
                            id: row.required("item_id")?,
                            key: row.required("key")?,
                            hi: row.optional("hi")?,
                            payload: row.optional("payload")?,
                            attempts: row.required("attempts")?,
                            group_key: row.optional("group_key")?,
                            priority: row.required("priority")?,
                            version: row.required("version")?,
                            row_at: row.required("row_at")?,
                            waited: row.required("waited")?,
                        })
                    })
                    .collect()
            })
        })
    }

    fn bookkeeping<R>(
        &self,
        statement: &'static str,
        f: impl FnOnce() -> Result<R, Cause>,
    ) -> Bookkeeping<R> {
        self.run(statement, f)
    }
}

/// Seconds until the task's ($1) earliest scheduled retry; NULL when none is.
const NEXT_RETRY: &str = concat!(
    "SELECT extract(epoch FROM min(not_before) - clock_timestamp())::float8 AS seconds \
       FROM chunkwise.items WHERE task_id = $1 AND status = ",
    item_status!(pending),
    " AND not_before > coalesce($2, now())"
);

/// How a worker leaves its run.
#[derive(Clone, Copy)]
struct Leaving {
    /// Counted as exited (not when it gave up: the run is then interrupted).
    counted: bool,
    /// Stopped before the run's work was done (pause, cancel, SIGTERM).
    stopped_early: bool,
}
