//! Running: `run`.

use pgrx::prelude::*;

use crate::catalog::Task;
use crate::error::{OrRaise, SqlResult};
use crate::launcher::{RunSummary, run_task};

/// Runs the task's pending items with a pool of background workers and waits for them,
/// reporting progress every `chunkwise.progress_interval`.
#[pg_extern(volatile, parallel_unsafe)]
fn run(
    task: Option<&str>,
    workers: default!(Option<i32>, "NULL"),
    max_items: default!(Option<i64>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(run_id, Option<i64>),
        name!(processed, i64),
        name!(failed, i64),
        name!(dead, i64),
        name!(seconds, f64),
    ),
> {
    let summary = (|| -> SqlResult<RunSummary> {
        let task = Task::for_caller(task, "run")?;
        run_task(&task, workers, max_items)
    })()
    .or_raise();
    TableIterator::once((
        summary.run_id,
        summary.processed,
        summary.failed,
        summary.dead,
        summary.seconds,
    ))
}
