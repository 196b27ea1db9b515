//! What a claim is: the item it hands a worker, the worker that claims, and the
//! statement a plain task's claims are made of (its scopes: from the start of the
//! queue, after a cursor, inside a lane, around the lanes). The queue (`queue`) runs
//! the claims; lanes (`lanes`) choose where a worker looks; both build on this.

use std::time::Duration;

use pgrx::JsonB;
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::PgOid;
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;

use super::error::{Bookkeeping, Cause};
use crate::item_status::item_status;
use crate::run_state::{Lane, RunState};

/// What runs claims: the queue, for lanes (`lanes`), which decide which claims to make.
pub trait RunsClaims {
    /// Runs one claim statement with its arguments.
    fn claim_with(
        &self,
        statement: &OwnedPreparedStatement,
        args: &[DatumWithOid<'_>],
    ) -> Bookkeeping<Vec<ClaimedItem>>;

    /// The claim of a plain task after `after`, whoever holds the lanes.
    fn claim_after(&self, plain: &PlainClaim, after: (i64, i64)) -> Bookkeeping<Vec<ClaimedItem>>;

    /// Runs one bookkeeping statement, named `statement` in its errors.
    fn bookkeeping<R>(
        &self,
        statement: &'static str,
        f: impl FnOnce() -> Result<R, Cause>,
    ) -> Bookkeeping<R>;
}

/// A claimed item, locked by this worker's transaction until it commits.
pub struct ClaimedItem {
    pub id: i64,
    pub key: i64,
    pub hi: Option<i64>,
    pub payload: Option<JsonB>,
    pub attempts: i32,
    /// Set by the claim of a task with sequential groups.
    pub group_key: Option<String>,
    pub priority: i64,
    /// The row version claimed (its xmin): a target that enqueues its own key again
    /// updates the row, and the item then stays pending for the follow-up (see the
    /// queue's MARK_DONE).
    pub version: String,
    /// Where that version lies in the table (its ctid): the mark-done goes straight to it
    /// (a TID scan) instead of looking the item up in the primary key, whose leaf the
    /// other workers' mark-dones are inserting into.
    pub row_at: String,
    /// Seconds from its enqueue (or its retry time, if later) to its claim.
    pub waited: f64,
}

/// The worker that claims: its run's shared state, its place in the run, and the size of
/// its next lane (0: it claims at the front of the queue, see `lanes`).
#[derive(Clone, Copy)]
pub struct Claimant<'a> {
    pub run: &'a RunState,
    pub place: usize,
    pub lane_size: i64,
}

/// A claim of a plain task: whose, how many, and the items the run's other workers
/// hold (`RunState::held_by_others`).
pub(super) struct PlainClaim {
    pub task_id: i32,
    pub limit: i64,
    pub run_id: i64,
    pub held: Vec<i64>,
}

impl PlainClaim {
    /// The parameters of `plain_claim_sql`: after `after`, up to `bound`, outside `lanes`
    /// (each used only by the scopes that read it).
    pub fn args(
        &self,
        after: (i64, i64),
        bound: (i64, i64),
        lanes: &[Lane],
    ) -> Vec<DatumWithOid<'static>> {
        let column = |f: fn(&Lane) -> i64| lanes.iter().map(f).collect::<Vec<i64>>();
        vec![
            self.task_id.into(),
            self.limit.into(),
            self.run_id.into(),
            after.0.into(),
            after.1.into(),
            self.held.clone().into(),
            bound.0.into(),
            bound.1.into(),
            column(|lane| lane.start.0).into(),
            column(|lane| lane.start.1).into(),
            column(|lane| lane.end.0).into(),
            column(|lane| lane.end.1).into(),
        ]
    }
}

/// How long a worker claims after its cursor before it looks at the whole queue again:
/// items before the cursor (retries that fell due, items planned meanwhile with a better
/// priority, items a dead worker let go) wait at most this long.
pub(super) const RESCAN_INTERVAL: Duration = Duration::from_secs(1);

/// A claimed item's wait from its enqueue (or its retry time, if later) to now, in
/// seconds: the enqueue-to-start latency of always-on pools.
pub(super) const WAITED: &str =
    "extract(epoch FROM clock_timestamp() - greatest(enqueued_at, not_before))::float8";

/// The next due pending items in (priority, item_id) order. SKIP LOCKED lets workers
/// pass each other's items without waiting; the partial index keeps it cheap. Nothing is
/// claimed while the task is paused or this run ($3) is cancelled (an init plan: one
/// primary-key lookup per claim). With `after_cursor`, only items after ($4, $5), the
/// last one this worker claimed: a done item leaves a dead entry at the front of the
/// partial index until vacuum, and a claim from the start walks over all of them, so
/// claims would slow down as a run goes on (see `ClaimCursor`).
///
/// `$6` lists the items the run's other workers hold (`RunState::held_by_others`): the
/// claim passes over them as it reads them, where SKIP LOCKED would first have to take
/// the page's exclusive lock to find each one locked. With every worker at the same
/// front of the queue, that exclusive lock on one heap page per skipped item was what
/// more workers queued on (LWLock BufferContent, bench/scaling.py). Items missing from
/// the list are still skipped by their row lock, so the list only saves work.
///
/// The claims of lanes (`lanes`) also stop at ($7, $8), and a sweep passes over the
/// lanes of the run's workers, given as four arrays ($9-$12: start priority, start item,
/// end priority, end item).
pub(super) fn plain_claim_sql(scope: ClaimScope) -> String {
    format!(
        "SELECT item_id, key, hi, payload, attempts, NULL::text AS group_key, priority, \
                xmin::text AS version, ctid::text AS row_at, {waited} AS waited FROM chunkwise.items \
          WHERE task_id = $1 AND status = {pending} AND not_before <= now() {cursor} {bound} \
            AND item_id <> ALL ($6) {lanes} \
            AND EXISTS (SELECT FROM chunkwise.tasks t \
                         WHERE t.task_id = $1 AND NOT t.paused AND t.cancelled_through < $3) \
          ORDER BY priority, item_id LIMIT $2 FOR UPDATE SKIP LOCKED",
        pending = item_status!(pending),
        waited = WAITED,
        cursor = if scope.after_cursor {
            "AND (priority, item_id) > ($4, $5)"
        } else {
            ""
        },
        bound = if scope.up_to_bound {
            "AND (priority, item_id) <= ($7, $8)"
        } else {
            ""
        },
        lanes = if scope.outside_lanes {
            "AND NOT EXISTS (SELECT FROM unnest($9::int8[], $10::int8[], $11::int8[], $12::int8[]) \
                                 AS lane(start_priority, start_item, end_priority, end_item) \
                              WHERE (items.priority, items.item_id) > (lane.start_priority, lane.start_item) \
                                AND (items.priority, items.item_id) <= (lane.end_priority, lane.end_item))"
        } else {
            ""
        }
    )
}

/// Which part of the queue a claim of a plain task reads (see `plain_claim_sql`).
#[derive(Clone, Copy)]
pub(super) struct ClaimScope {
    /// After the position ($4, $5).
    pub after_cursor: bool,
    /// Up to the position ($7, $8).
    pub up_to_bound: bool,
    /// Outside the lanes in $9-$12.
    pub outside_lanes: bool,
}

impl ClaimScope {
    pub const FROM_START: ClaimScope = ClaimScope {
        after_cursor: false,
        up_to_bound: false,
        outside_lanes: false,
    };
    pub const AFTER_CURSOR: ClaimScope = ClaimScope {
        after_cursor: true,
        up_to_bound: false,
        outside_lanes: false,
    };
}

pub(super) fn int8() -> PgOid {
    PgOid::BuiltIn(pg_sys::BuiltinOid::INT8OID)
}

pub(super) fn int8_array() -> PgOid {
    PgOid::BuiltIn(pg_sys::BuiltinOid::INT8ARRAYOID)
}

/// The parameters of `plain_claim_sql`, whichever of them a scope uses.
pub(super) fn plain_claim_args() -> Vec<PgOid> {
    let mut args = vec![
        int4(),
        int8(),
        int8(),
        int8(),
        int8(),
        int8_array(),
        int8(),
        int8(),
    ];
    args.extend([int8_array(), int8_array(), int8_array(), int8_array()]);
    args
}

pub(super) fn int4() -> PgOid {
    PgOid::BuiltIn(pg_sys::BuiltinOid::INT4OID)
}
