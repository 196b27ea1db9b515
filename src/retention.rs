//! Retention: a task's done and skipped items older than its `retain_done`, and its
//! finished runs older than `retain_runs`, are removed at the end of each of its runs,
//! by whoever announces that end (its last worker, or the launcher when every worker
//! was gone before it could count them).

use pgrx::prelude::*;

use crate::security::as_extension_owner;

/// Most old items, and runs, one run's end removes: a bigger backlog of old rows is
/// worked off over the next runs, so that no run's end waits long for it.
const ITEMS_BATCH: i64 = 10_000;
const RUNS_BATCH: i64 = 1_000;

/// Removes one batch of the task's old finished items and runs, oldest first. Pending
/// and dead items are never touched.
pub fn apply(task_id: i32) {
    as_extension_owner(|| -> Result<(), pgrx::spi::SpiError> {
        // The status is spelled out (not a parameter) so that each DELETE walks its
        // partial index (items_done_idx, items_skipped_idx) whatever the plan.
        for status in ["done", "skipped"] {
            Spi::run_with_args(
                &format!(
                    "DELETE FROM chunkwise.items WHERE item_id IN ( \
                       SELECT i.item_id FROM chunkwise.items i \
                         JOIN chunkwise.tasks t ON t.task_id = i.task_id \
                        WHERE i.task_id = $1 AND i.status = '{status}' \
                          AND i.finished_at < now() - t.retain_done \
                        ORDER BY i.finished_at LIMIT $2)"
                ),
                &[task_id.into(), ITEMS_BATCH.into()],
            )?;
        }
        Spi::run_with_args(
            "DELETE FROM chunkwise.run_history WHERE run_id IN ( \
               SELECT r.run_id FROM chunkwise.run_history r \
                 JOIN chunkwise.tasks t ON t.task_id = r.task_id \
                WHERE r.task_id = $1 AND r.finished_at < now() - t.retain_runs \
                  AND NOT EXISTS (SELECT FROM chunkwise._live_workers lw WHERE lw.run_id = r.run_id) \
                ORDER BY r.finished_at LIMIT $2)",
            &[task_id.into(), RUNS_BATCH.into()],
        )
    })
    .expect("retention deletes from the extension's own tables");
}
