//! Retention: a task's done and skipped items older than its `retain_done`, and its
//! finished runs older than `retain_runs`, are removed at the end of each of its runs,
//! by whoever announces that end (its last worker, or the launcher when every worker
//! was gone before it could count them).

use pgrx::prelude::*;
use pgrx::spi::SpiError;

use crate::item_status::item_status;
use crate::security::as_extension_owner;

/// Most old items, and runs, one run's end removes: a bigger backlog of old rows is
/// worked off over the next runs, so that no run's end waits long for it.
const ITEMS_BATCH: i64 = 10_000;
const RUNS_BATCH: i64 = 1_000;

/// Removes one batch of the task's old finished items and runs, oldest first. Pending
/// and dead items are never touched.
pub fn apply(task_id: i32) -> Result<(), SpiError> {
    as_extension_owner(|| {
        // The status is spelled out (not a parameter), and the cutoff is a scalar
        // subquery, so that each DELETE is a range scan of its partial index
        // (items_done_idx, items_skipped_idx) that stops at the cutoff: with nothing old
        // enough it reads nothing, however many younger rows there are. The batch's ids
        // go in as an array, so the rows are found by primary key, never by a scan.
        for status in [item_status!(done), item_status!(skipped)] {
            Spi::run_with_args(
                &format!(
                    "DELETE FROM chunkwise.items WHERE item_id = ANY (ARRAY( \
                       SELECT item_id FROM chunkwise.items \
                        WHERE task_id = $1 AND status = {status} \
                          AND finished_at < (SELECT now() - retain_done FROM chunkwise.tasks WHERE task_id = $1) \
                        ORDER BY finished_at LIMIT $2))"
                ),
                &[task_id.into(), ITEMS_BATCH.into()],
            )?;
        }
        Spi::run_with_args(
            "DELETE FROM chunkwise.run_history WHERE run_id = ANY (ARRAY( \
               SELECT r.run_id FROM chunkwise.run_history r \
                WHERE r.task_id = $1 \
                  AND r.finished_at < (SELECT now() - retain_runs FROM chunkwise.tasks WHERE task_id = $1) \
                  AND NOT EXISTS (SELECT FROM chunkwise._live_workers lw WHERE lw.run_id = r.run_id) \
                ORDER BY r.finished_at LIMIT $2))",
            &[task_id.into(), RUNS_BATCH.into()],
        )
    })
}
