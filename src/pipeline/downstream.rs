//! The cycles a settled run asks for (`then`), what holds a cycle back (`depends_on`),
//! and starting the cycles asked for.

use pgrx::prelude::*;

use crate::api::planning::plan_source;
use crate::catalog::Task;
use crate::columns::Columns;
use crate::error::SqlResult;
use crate::latch;
use crate::launcher::start_task;
use crate::notify;
use crate::security::as_extension_owner;
use crate::transaction::{OnSuccess, in_subtransaction};

/// What the task's cycle waits for (see the `chunkwise.pipeline` view, which says it):
/// the tasks it depends on whose latest run did not succeed or that still have pending
/// items. `None` when nothing holds it.
pub fn waiting_for(task_id: i32) -> SqlResult<Option<String>> {
    as_extension_owner(|| {
        Spi::connect(|client| -> SqlResult<Option<String>> {
            let table = client.select(
                "SELECT p.waiting_for FROM chunkwise.pipeline p \
                   JOIN chunkwise.tasks t USING (task) WHERE t.task_id = $1",
                Some(1),
                &[task_id.into()],
            )?;
            // No row (dropped meanwhile) is nothing to wait for.
            match table.into_iter().next() {
                Some(row) => Ok(row.optional("waiting_for")?),
                None => Ok(None),
            }
        })
    })
}

/// Asks for a cycle of the task `task_id` after a run `upstream_run` of a task that has
/// it in its `then`, in the settling transaction: plans it from its `source` as its
/// owner and records the request, unless what it depends on holds it. True when its
/// workers are to be started (an always-on task's pool is woken by the planning's
/// commit instead).
pub fn request_cycle(task_id: i32, upstream_run: i64) -> SqlResult<bool> {
    let Some(task) = Task::by_id(task_id)? else {
        return Ok(false);
    };
    if let Some(waits) = waiting_for(task.id)? {
        latch::cancels_held(|| {
            notice!(
                "task \"{}\" does not start after run {upstream_run}: it waits for {waits}",
                task.name
            )
        });
        return Ok(false);
    }
    // A failing source holds this task back, not the settling of the run before it.
    if let Err(error) = in_subtransaction(OnSuccess::Keep, |_| plan_source(&task).map(drop)) {
        latch::cancels_held(|| {
            warning!(
                "task \"{}\" does not start after run {upstream_run}: planning from its source failed [SQLSTATE {}]: {}",
                task.name,
                error.sqlstate,
                error.message
            )
        });
        return Ok(false);
    }
    notify::cycle_requested(task.id, upstream_run)?;
    if task.always_on {
        return Ok(false);
    }
    as_extension_owner(|| {
        Spi::run_with_args(
            "UPDATE chunkwise.tasks SET cycle_requested_by = $2 WHERE task_id = $1",
            &[task.id.into(), upstream_run.into()],
        )
    })?;
    Ok(true)
}

/// Starts a run of each task in `task_ids` whose cycle was asked for and not yet
/// started. The request is taken in the caller's transaction, which must commit once
/// the workers are under way: the task's row stays locked meanwhile, so a second starter
/// waits for that commit and then finds no request. A paused task keeps its request.
pub fn start_requested(task_ids: &[i32]) -> SqlResult<()> {
    for &task_id in task_ids {
        let Some(task) = Task::by_id(task_id)? else {
            continue;
        };
        if task.paused || task.always_on || !lock_request(task.id)? {
            continue;
        }
        match start_task(&task, None, task.max_items_per_cycle) {
            Ok(Some(run_id)) => debug1!("task \"{}\": run {run_id} started", task.name),
            Ok(None) => {}
            Err(error) => {
                latch::cancels_held(|| {
                    warning!(
                        "task \"{}\" could not start [SQLSTATE {}]: {}",
                        task.name,
                        error.sqlstate(),
                        error.message()
                    )
                });
                continue;
            }
        }
        // Taken after the launch: the launch refuses a task whose row this transaction
        // wrote (it takes that for a task created in it).
        as_extension_owner(|| {
            Spi::run_with_args(
                "UPDATE chunkwise.tasks SET cycle_requested_by = NULL WHERE task_id = $1",
                &[task.id.into()],
            )
        })?;
    }
    Ok(())
}

/// Locks the task's row if a cycle of it was asked for; false when none was (or another
/// starter took the request while this one waited for the lock).
fn lock_request(task_id: i32) -> SqlResult<bool> {
    as_extension_owner(|| {
        Spi::connect_mut(|client| -> SqlResult<bool> {
            // NO KEY UPDATE: the new workers' run rows still take their key share.
            let locked = client.update(
                "SELECT FROM chunkwise.tasks \
                  WHERE task_id = $1 AND cycle_requested_by IS NOT NULL FOR NO KEY UPDATE",
                None,
                &[task_id.into()],
            )?;
            Ok(!locked.is_empty())
        })
    })
}

/// The tasks downstream of `task_id` (its `then`, theirs, and so on) with a cycle asked
/// for and not started: what a crash may have left between a settling and its starts.
pub fn requested_downstream(task_id: i32) -> SqlResult<Vec<i32>> {
    let ids = as_extension_owner(|| {
        Spi::get_one_with_args::<Vec<i32>>(
            "WITH RECURSIVE down(task_id) AS ( \
                 SELECT unnest(then_tasks) FROM chunkwise.tasks WHERE task_id = $1 \
                 UNION \
                 SELECT unnest(t.then_tasks) FROM chunkwise.tasks t JOIN down d USING (task_id)) \
             SELECT coalesce(array_agg(t.task_id ORDER BY t.task_id), '{}') \
               FROM down JOIN chunkwise.tasks t USING (task_id) \
              WHERE t.cycle_requested_by IS NOT NULL",
            &[task_id.into()],
        )
    })?;
    Ok(ids.unwrap_or_default())
}
