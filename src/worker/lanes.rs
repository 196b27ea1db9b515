//! Lanes: the workers of one run each reserve a stretch of the queue (a lane, a few
//! dozen positions in (priority, item_id) order) and claim inside it, instead of all
//! claiming the next item at the front of the queue.
//!
//! Why: consecutive items live on the same heap page and the same primary-key leaf. With
//! every worker at the front, every claim, row lock and mark-done of the run went through
//! the one page and the one leaf the others were changing too, and on 16 cores 8 workers
//! did 2.4-2.7 times what one did, 16 workers 1.3-1.5 times (LWLock BufferContent, half
//! of their time; `bash bench/run.sh scaling`). In lanes each worker changes pages of its
//! own.
//!
//! The price is order: items are taken in priority order lane by lane, so the run's
//! workers are at most (workers x lane) positions apart. A lane holds about
//! `LANE_WORK` of the worker's items (at most `chunkwise.lane_size`), so slow items
//! have lanes of one and keep the exact order.
//!
//! A run with `max_items` (a cycle) must take the best `max_items` items, not the first
//! `max_items` its workers happened to claim across their lanes: its first lane fixes
//! the position of the `max_items`-th due pending item (`RunState::fix_limit_bound`),
//! and no lane, sweep or helping claim of the run goes past it. Items planned during the
//! run with a better priority are still inside; one held elsewhere for the whole run
//! leaves the run one item short, for the next cycle, rather than taking one beyond.
//!
//! What a claim does, in this order (`LaneStatements::claim`):
//! 1. Once a second, and then on from what it found: a sweep for stragglers, items behind
//!    the frontier (the end of the last lane handed out) and outside every lane: retries
//!    fallen due, items planned since with a better priority, items a lane's owner
//!    skipped because they were locked then.
//! 2. The next items of its own lane.
//! 3. A new lane after the frontier: the positions up to the lane's size are read, and
//!    the frontier moves to the last of them only if nobody moved it meanwhile
//!    (`RunState::advance_lane_frontier`), so no two lanes overlap.
//! 4. Nothing left to reserve (the run's tail): the next items after the start of the
//!    earliest lane of the others, in their lanes or not, so that idle workers help
//!    finish the lanes still under way.
//!
//! Every claim still locks its rows (SKIP LOCKED) and re-checks them: lanes decide where
//! a worker looks, never whether an item runs twice.

use std::time::{Duration, Instant};

use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiError};

use super::claim::{
    ClaimScope, Claimant, ClaimedItem, PlainClaim, RESCAN_INTERVAL, RunsClaims, int4, int8,
    plain_claim_args, plain_claim_sql,
};
use super::error::Bookkeeping;
use crate::columns::Columns;
use crate::item_status::item_status;
use crate::run_state::{Lane, RunState};

/// About how much of a worker's time one lane holds: its size is this over the worker's
/// recent time per item, at least 1 and at most `chunkwise.lane_size`.
const LANE_WORK: Duration = Duration::from_millis(20);

/// Lanes tried in one claim when each found nothing it could claim (items locked by other
/// transactions, or not due).
const RESERVE_TRIES: usize = 4;

/// Before every position: a claim after it starts at the start of the queue.
const QUEUE_START: (i64, i64) = (i64::MIN, i64::MIN);

/// The end of a new lane: the position of the `$4`-th due pending item after ($2, $3),
/// or of the last one if fewer are left; no row if none is.
const LANE_END: &str = concat!(
    "SELECT priority, item_id FROM ( \
       SELECT priority, item_id FROM chunkwise.items \
        WHERE task_id = $1 AND status = ",
    item_status!(pending),
    " AND not_before <= now() AND (priority, item_id) > ($2, $3) \
        ORDER BY priority, item_id LIMIT $4) ahead \
     ORDER BY priority DESC, item_id DESC LIMIT 1"
);

/// The prepared statements of lanes (plain tasks only).
pub struct LaneStatements {
    in_lane: OwnedPreparedStatement,
    sweep: OwnedPreparedStatement,
    lane_end: OwnedPreparedStatement,
}

impl LaneStatements {
    pub fn prepare(client: &SpiClient<'_>) -> Result<LaneStatements, SpiError> {
        let claim_args = plain_claim_args();
        let in_lane = ClaimScope {
            after_cursor: true,
            up_to_bound: true,
            outside_lanes: false,
        };
        let sweep = ClaimScope {
            outside_lanes: true,
            ..in_lane
        };
        Ok(LaneStatements {
            in_lane: client
                .prepare_mut(&plain_claim_sql(in_lane), &claim_args)?
                .keep(),
            sweep: client
                .prepare_mut(&plain_claim_sql(sweep), &claim_args)?
                .keep(),
            lane_end: client
                .prepare_mut(LANE_END, &[int4(), int8(), int8(), int8()])?
                .keep(),
        })
    }
}

/// A worker's place among the lanes: its own lane and how far it got in it, and where
/// its sweep for stragglers goes on from.
#[derive(Default)]
pub struct LaneCursor {
    lane: Option<Lane>,
    lane_at: (i64, i64),
    sweep_at: Option<(i64, i64)>,
    swept_at: Option<Instant>,
}

impl LaneCursor {
    /// The worker leaves its lane (an error rolled its claims back, or it exits): the
    /// rest of it is for the others' sweeps.
    pub fn leave(&mut self, run: &RunState, place: usize) {
        if self.lane.take().is_some() {
            run.work_in_lane(place, None);
        }
        self.sweep_at = None;
    }
}

/// How many positions the next lane of a worker holds: `LANE_WORK` of its items at its
/// recent time per item (`None`: none timed yet, a lane of one), at most `most`.
pub fn lane_size(most: i64, time_per_item: Option<Duration>) -> i64 {
    if most <= 0 {
        return 0;
    }
    let Some(per_item) = time_per_item else {
        return 1;
    };
    let fit = LANE_WORK.as_secs_f64() / per_item.as_secs_f64().max(1e-9);
    (fit as i64).clamp(1, most)
}

impl LaneStatements {
    /// Claims up to `args.limit` items of a plain task through `queue`, in lanes of up to
    /// the claimant's lane size (see the module's comment for the order of the steps).
    pub fn claim(
        &self,
        queue: &impl RunsClaims,
        args: &PlainClaim,
        cursor: &mut LaneCursor,
        claimant: &Claimant<'_>,
    ) -> Bookkeeping<Vec<ClaimedItem>> {
        let Claimant {
            run,
            place,
            lane_size: size,
        } = *claimant;
        let task_id = args.task_id;
        // A batch (items_per_commit) fits in one lane.
        let size = size.max(args.limit);
        let bound = if run.limited() {
            match self.limit_bound(queue, run, task_id)? {
                Some(bound) => Some(bound),
                None => return Ok(Vec::new()), // nothing was due when the run began
            }
        } else {
            None
        };
        // 1. Stragglers behind the frontier, outside every lane. The lanes are read after
        // the frontier: a lane is published before the frontier moves past it.
        if let (_, Some(frontier)) = run.lane_frontier() {
            let due = cursor
                .swept_at
                .is_none_or(|at| at.elapsed() >= RESCAN_INTERVAL);
            if due {
                cursor.swept_at = Some(Instant::now());
            }
            let from = if due {
                Some(QUEUE_START)
            } else {
                cursor.sweep_at
            };
            if let Some(from) = from {
                let lanes: Vec<Lane> = run.lanes().into_iter().map(|(_, lane)| lane).collect();
                let items = queue.claim_with(&self.sweep, &args.args(from, frontier, &lanes))?;
                cursor.sweep_at = items.last().map(|last| (last.priority, last.id));
                if !items.is_empty() {
                    return Ok(items);
                }
            }
        }

        // 2. Its own lane.
        if let Some(lane) = cursor.lane {
            let items =
                queue.claim_with(&self.in_lane, &args.args(cursor.lane_at, lane.end, &[]))?;
            if let Some(last) = items.last() {
                cursor.lane_at = (last.priority, last.id);
                return Ok(items);
            }
            cursor.leave(run, place);
        }

        // 3. A new lane after the frontier.
        for _ in 0..RESERVE_TRIES {
            let (version, frontier) = run.lane_frontier();
            let start = frontier.unwrap_or(QUEUE_START);
            if bound.is_some_and(|bound| start >= bound) {
                break;
            }
            let Some(end) = self.lane_end(queue, task_id, start, size)? else {
                break;
            };
            let end = bound.map_or(end, |bound| end.min(bound));
            let lane = Lane { start, end };
            run.work_in_lane(place, Some(lane));
            cursor.lane = Some(lane);
            if !run.advance_lane_frontier(version, end) {
                cursor.leave(run, place);
                continue; // another worker took the lane meanwhile
            }
            let items = queue.claim_with(&self.in_lane, &args.args(start, end, &[]))?;
            if let Some(last) = items.last() {
                cursor.lane_at = (last.priority, last.id);
                return Ok(items);
            }
            cursor.leave(run, place);
        }

        // 4. The tail: help the others finish their lanes.
        let help_from = run
            .lanes()
            .into_iter()
            .filter(|&(other, _)| other != place)
            .map(|(_, lane)| lane.start)
            .min()
            .unwrap_or(QUEUE_START);
        match bound {
            Some(bound) => queue.claim_with(&self.in_lane, &args.args(help_from, bound, &[])),
            None => queue.claim_after(args, help_from),
        }
    }

    /// The last position a run with `max_items` may claim: fixed by the first of its
    /// workers to ask, at its `max_items`-th due pending item (or its last, if fewer are
    /// due). `None` while none is due.
    fn limit_bound(
        &self,
        queue: &impl RunsClaims,
        run: &RunState,
        task_id: i32,
    ) -> Bookkeeping<Option<(i64, i64)>> {
        if let Some(bound) = run.limit_bound() {
            return Ok(Some(bound));
        }
        let found = self.lane_end(queue, task_id, QUEUE_START, run.max_items())?;
        Ok(found.map(|bound| run.fix_limit_bound(bound)))
    }

    /// The end of a new lane of up to `size` positions after `start` (see `LANE_END`).
    fn lane_end(
        &self,
        queue: &impl RunsClaims,
        task_id: i32,
        start: (i64, i64),
        size: i64,
    ) -> Bookkeeping<Option<(i64, i64)>> {
        queue.bookkeeping("lane", || {
            Spi::connect_mut(|client| {
                let table = client.update(
                    &self.lane_end,
                    None,
                    &[task_id.into(), start.0.into(), start.1.into(), size.into()],
                )?;
                match table.into_iter().next() {
                    Some(row) => Ok(Some((row.required("priority")?, row.required("item_id")?))),
                    None => Ok(None),
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_holds_about_twenty_milliseconds_of_items() {
        let per_item = |micros| Some(Duration::from_micros(micros));
        assert_eq!(lane_size(64, None), 1, "nothing timed yet: one");
        assert_eq!(lane_size(64, per_item(50)), 64, "fast items: the most");
        assert_eq!(lane_size(64, per_item(1_000)), 20);
        assert_eq!(lane_size(64, per_item(30_000)), 1, "slow items: one");
        assert_eq!(lane_size(0, per_item(50)), 0, "lanes off");
    }
}
