//! Steering tasks: `pause`, `resume`, `cancel`, `retry`, `skip`, `purge`.
//!
//! Workers look at the task's `paused` flag and `cancelled_through` run id with every
//! claim: a worker asked to stop finishes (commits) its current item, claims no other and
//! exits. Nothing is lost: unclaimed items stay pending for the next run.

use pgrx::datum::Interval;
use pgrx::prelude::*;

use crate::always_on;
use crate::catalog::{self, Task};
use crate::error::{OrRaise, SqlError, SqlResult};
use crate::item_status::item_status;
use crate::open_groups::close_items_of_groups;
use crate::queued_in_transaction;
use crate::security::as_extension_owner;

/// Runs fixed bookkeeping SQL on the task's rows as the extension owner; returns the
/// number the statement yields.
fn count_as_owner(sql: &str, task: &Task, extra: Option<Interval>) -> SqlResult<i64> {
    let count = as_extension_owner(|| match extra {
        Some(interval) => Spi::get_one_with_args::<i64>(sql, &[task.id.into(), interval.into()]),
        None => Spi::get_one_with_args::<i64>(sql, &[task.id.into()]),
    })?;
    Ok(count.unwrap_or(0))
}

fn set_paused(task: Option<&str>, paused: bool) -> SqlResult<()> {
    let task = Task::for_caller(task, if paused { "pause" } else { "resume" })?;
    as_extension_owner(|| {
        Spi::run_with_args(
            "UPDATE chunkwise.tasks SET paused = $2 WHERE task_id = $1",
            &[task.id.into(), paused.into()],
        )
    })?;
    always_on::restart_at_commit(task.id, task.always_on);
    let workers = catalog::live_workers(task.id)?;
    if paused && workers > 0 {
        notice!(
            "task \"{}\" paused: its {workers} running workers stop after their current item",
            task.name
        );
    }
    Ok(())
}

/// Pauses the task: running workers stop after their current item and no run or cycle
/// starts until `resume`.
#[pg_extern(volatile, parallel_unsafe)]
fn pause(task: Option<&str>) {
    set_paused(task, true).or_raise()
}

/// Lets the task run again; the next `run` or cycle picks up what is pending.
#[pg_extern(volatile, parallel_unsafe)]
fn resume(task: Option<&str>) {
    set_paused(task, false).or_raise()
}

/// Stops the task's running runs: each worker finishes its current item and exits; the
/// items not started stay pending. Returns the number of workers told to stop.
#[pg_extern(volatile, parallel_unsafe)]
fn cancel(task: Option<&str>) -> i64 {
    let run = || -> SqlResult<i64> {
        let task = Task::for_caller(task, "cancel")?;
        // Every run numbered so far; runs started later are not affected.
        let through = catalog::last_run_id()?;
        as_extension_owner(|| {
            Spi::run_with_args(
                "UPDATE chunkwise.tasks SET cancelled_through = $2 WHERE task_id = $1",
                &[task.id.into(), through.into()],
            )
        })?;
        always_on::restart_at_commit(task.id, task.always_on);
        let workers = catalog::live_workers(task.id)?;
        if workers == 0 {
            notice!("task \"{}\" has no running workers", task.name);
        }
        Ok(workers)
    };
    run().or_raise()
}

/// Makes the task's dead items pending again with their attempts reset. A dead item
/// whose key was planned again meanwhile stays dead: the pending twin does its work.
/// Returns the number of items made pending.
#[pg_extern(volatile, parallel_unsafe)]
fn retry(task: Option<&str>) -> i64 {
    let run = || -> SqlResult<i64> {
        let task = Task::for_caller(task, "retry")?;
        let revived = count_as_owner(
            concat!(
                "WITH revived AS ( \
                   UPDATE chunkwise.items i \
                      SET status = ",
                item_status!(pending),
                ", attempts = 0, not_before = now(), finished_at = NULL \
                    WHERE i.task_id = $1 AND i.status = ",
                item_status!(dead),
                " AND NOT EXISTS (SELECT FROM chunkwise.items p \
                                   WHERE p.task_id = i.task_id AND p.key = i.key AND p.status = ",
                item_status!(pending),
                ") RETURNING 1) \
                 SELECT count(*) FROM revived"
            ),
            &task,
            None,
        )?;
        if revived > 0 {
            queued_in_transaction::items_queued(&task, revived);
        }
        Ok(revived)
    };
    run().or_raise()
}

/// Gives up on the task's dead item with `key`: it becomes `skipped`, and a sequential
/// group it blocked goes on with its next item. Returns the item's id. (The update checks
/// `dead` again: a retry() committed while skip() waited for the row makes it pending,
/// and skip() then finds no dead item, as it would have after the retry.)
#[pg_extern(volatile, parallel_unsafe)]
fn skip(task: Option<&str>, key: Option<i64>) -> i64 {
    let run = || -> SqlResult<i64> {
        let task = Task::for_caller(task, "skip an item of")?;
        let key =
            key.ok_or_else(|| SqlError::null_argument("key", "Pass the key of the dead item."))?;
        let skipped = as_extension_owner(|| {
            Spi::get_one_with_args::<i64>(
                concat!(
                    "WITH skipped AS ( \
                       UPDATE chunkwise.items SET status = ",
                    item_status!(skipped),
                    ", finished_at = clock_timestamp() \
                        WHERE item_id = (SELECT item_id FROM chunkwise.items \
                                          WHERE task_id = $1 AND key = $2 AND status = ",
                    item_status!(dead),
                    " ORDER BY item_id DESC LIMIT 1) \
                          AND status = ",
                    item_status!(dead),
                    " RETURNING item_id, task_id, group_key), \
                     closed AS (",
                    close_items_of_groups!("skipped"),
                    ") SELECT item_id FROM skipped"
                ),
                &[task.id.into(), key.into()],
            )
        });
        match skipped {
            Ok(Some(id)) => {
                // The group it blocked goes on.
                queued_in_transaction::items_queued(&task, 1);
                Ok(id)
            }
            _ => Err(SqlError::new(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!("task \"{}\" has no dead item with key {key}", task.name),
            )
            .hint("See SELECT key, status FROM chunkwise.failures WHERE task = ...; only dead items can be skipped.")),
        }
    };
    run().or_raise()
}

/// Removes the task's done, dead and skipped items and its finished runs older than
/// `older_than`.
/// Pending items are never removed. Returns the number of items removed.
#[pg_extern(volatile, parallel_unsafe)]
fn purge(task: Option<&str>, older_than: Option<Interval>) -> i64 {
    let run = || -> SqlResult<i64> {
        let task = Task::for_caller(task, "purge")?;
        let older_than = older_than.ok_or_else(|| {
            SqlError::null_argument(
                "older_than",
                "Pass how old finished items must be, e.g. '7 days' (or '0' for all).",
            )
        })?;
        if older_than.months() < 0 || older_than.days() < 0 || older_than.micros() < 0 {
            return Err(
                SqlError::invalid_parameter("older_than must not be negative")
                    .hint("Pass how old finished items must be, e.g. '7 days' (or '0' for all)."),
            );
        }
        count_as_owner(
            "WITH gone AS ( \
               DELETE FROM chunkwise.run_history r \
                WHERE r.task_id = $1 AND r.finished_at < now() - $2 \
                  AND NOT EXISTS (SELECT FROM chunkwise._live_workers lw WHERE lw.run_id = r.run_id) \
                RETURNING 1) \
             SELECT count(*) FROM gone",
            &task,
            Some(older_than),
        )?;
        // Dead items purged no longer hold their group open.
        count_as_owner(
            concat!(
                "WITH gone AS ( \
                   DELETE FROM chunkwise.items \
                    WHERE task_id = $1 AND status IN (",
                item_status!(done),
                ", ",
                item_status!(dead),
                ", ",
                item_status!(skipped),
                ") AND finished_at < now() - $2 \
                    RETURNING task_id, group_key, status), \
                 closed AS (",
                close_items_of_groups!(concat!(
                    "(SELECT task_id, group_key FROM gone WHERE status = ",
                    item_status!(dead),
                    ") dead"
                )),
                ") SELECT count(*) FROM gone"
            ),
            &task,
            Some(older_than),
        )
    };
    run().or_raise()
}
