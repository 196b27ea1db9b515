//! Task definition: `create_task`, `drop_task`.

use pgrx::datum::{DatumWithOid, Interval};
use pgrx::prelude::*;

use crate::catalog::{Task, required_task_name};
use crate::error::{OrRaise, SqlError, SqlResult};
use crate::gucs;
use crate::oid_args::RegProc;
use crate::security::{as_extension_owner, current_user, ensure_owner_can_run};
use crate::target::{Target, ensure_single_statement};

/// Longest task name: it must fit in `application_name` beside the run id.
const MAX_TASK_NAME: usize = 40;
const MAX_ATTEMPTS: i32 = 1000;
const MAX_ITEMS_PER_COMMIT: i32 = 10_000;

/// The options of `create_task`, validated as a whole before anything is written.
struct TaskOptions<'a> {
    name: &'a str,
    call: Option<pg_sys::Oid>,
    statement: Option<&'a str>,
    after: Option<&'a str>,
    source: Option<&'a str>,
    workers: Option<i32>,
    max_items_per_cycle: Option<i64>,
    max_attempts: i32,
    retry_backoff: Interval,
    retry_backoff_max: Interval,
    item_timeout: Option<Interval>,
    items_per_commit: i32,
    synchronous_commit: bool,
    sequential_groups: bool,
    rank_by_activity: bool,
}

fn required<T>(value: Option<T>, name: &str) -> SqlResult<T> {
    value.ok_or_else(|| {
        SqlError::new(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            format!("{name} must not be NULL"),
        )
        .hint(format!("Leave {name} out to use its default."))
    })
}

fn ensure_range<T: PartialOrd + std::fmt::Display>(
    value: T,
    lo: T,
    hi: T,
    name: &str,
) -> SqlResult<()> {
    if value >= lo && value <= hi {
        return Ok(());
    }
    Err(
        SqlError::invalid_parameter(format!("{name} must be between {lo} and {hi}, not {value}"))
            .hint(format!("Pass a {name} between {lo} and {hi}.")),
    )
}

fn ensure_positive_interval(value: &Interval, name: &str) -> SqlResult<()> {
    if value.as_micros() > 0 && value.months() >= 0 && value.days() >= 0 && value.micros() >= 0 {
        return Ok(());
    }
    Err(
        SqlError::invalid_parameter(format!("{name} must be a positive interval"))
            .hint(format!("For example {name} => '10 seconds'.")),
    )
}

pub fn validate_task_name(name: &str) -> SqlResult<()> {
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c));
    if !name.is_empty() && name.len() <= MAX_TASK_NAME && valid_chars {
        return Ok(());
    }
    Err(SqlError::new(
        PgSqlErrorCode::ERRCODE_INVALID_NAME,
        format!("invalid task name \"{name}\""),
    )
    .hint(format!(
        "A task name has 1 to {MAX_TASK_NAME} characters from A-Z, a-z, 0-9 and _ - . :"
    )))
}

impl TaskOptions<'_> {
    fn validate(&self) -> SqlResult<()> {
        validate_task_name(self.name)?;
        match (self.call, self.statement) {
            (Some(_), Some(_)) => {
                return Err(SqlError::invalid_parameter("give either call or statement, not both")
                    .hint("call => names a procedure taking the item; statement => is SQL using $1 (and $2)."));
            }
            (None, None) => {
                return Err(SqlError::invalid_parameter("a task needs call or statement")
                    .hint("For example call => 'dwh.update_datamart_user' or statement => 'UPDATE ... WHERE id = $1'."));
            }
            (Some(proc), None) => {
                Target::for_call(proc)?;
                ensure_owner_may_execute(proc)?;
            }
            (None, Some(sql)) => ensure_single_statement(sql, "statement")?,
        }
        if let Some(sql) = self.after {
            ensure_single_statement(sql, "after")?;
        }
        if let Some(sql) = self.source {
            ensure_single_statement(sql, "source")?;
        }
        if let Some(workers) = self.workers {
            ensure_range(workers, 1, gucs::max_workers(), "workers").map_err(|e| {
                e.hint(format!(
                    "workers must be at least 1 and at most chunkwise.max_workers ({}).",
                    gucs::max_workers()
                ))
            })?;
        }
        if let Some(limit) = self.max_items_per_cycle {
            ensure_range(limit, 1, i64::MAX, "max_items_per_cycle")?;
        }
        ensure_range(self.max_attempts, 1, MAX_ATTEMPTS, "max_attempts")?;
        ensure_positive_interval(&self.retry_backoff, "retry_backoff")?;
        ensure_positive_interval(&self.retry_backoff_max, "retry_backoff_max")?;
        if self.retry_backoff_max.as_micros() < self.retry_backoff.as_micros() {
            return Err(SqlError::invalid_parameter(
                "retry_backoff_max must not be shorter than retry_backoff",
            )
            .hint("The backoff doubles after each failure up to retry_backoff_max."));
        }
        if let Some(timeout) = &self.item_timeout {
            ensure_positive_interval(timeout, "item_timeout")?;
        }
        ensure_range(
            self.items_per_commit,
            1,
            MAX_ITEMS_PER_COMMIT,
            "items_per_commit",
        )?;
        if self.sequential_groups {
            return Err(SqlError::new(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "sequential_groups is not supported yet",
            )
            .hint("Create the task without sequential_groups; per-group ordering is planned."));
        }
        if self.rank_by_activity && self.source.is_none() {
            return Err(
                SqlError::invalid_parameter("rank_by_activity needs a source query")
                    .hint("Give source => a query returning key, last_activity and actions."),
            );
        }
        Ok(())
    }

    fn insert(&self) -> SqlResult<()> {
        let args: Vec<DatumWithOid> = vec![
            self.name.into(),
            current_user().into(),
            self.call.into(),
            self.statement.into(),
            self.after.into(),
            self.source.into(),
            self.workers.into(),
            self.max_items_per_cycle.into(),
            self.max_attempts.into(),
            self.retry_backoff.into(),
            self.retry_backoff_max.into(),
            self.item_timeout.into(),
            self.items_per_commit.into(),
            self.synchronous_commit.into(),
            self.sequential_groups.into(),
            self.rank_by_activity.into(),
        ];
        let inserted = as_extension_owner(|| {
            Spi::connect_mut(|client| {
                client
                    .update(
                        "INSERT INTO chunkwise.tasks (task, owner, call, statement, after, source, workers, \
                             max_items_per_cycle, max_attempts, retry_backoff, retry_backoff_max, item_timeout, \
                             items_per_commit, synchronous_commit, sequential_groups, rank_by_activity) \
                         VALUES ($1, $2, $3::regprocedure, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) \
                         ON CONFLICT (task) DO NOTHING",
                        None,
                        &args,
                    )
                    .map(|table| table.len())
            })
        })?;
        if inserted == 1 {
            return Ok(());
        }
        Err(SqlError::new(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!("task \"{}\" already exists", self.name),
        )
        .hint("Choose another name, or chunkwise.drop_task() the old task first."))
    }
}

fn ensure_owner_may_execute(proc: pg_sys::Oid) -> SqlResult<()> {
    let allowed = Spi::get_one_with_args::<bool>(
        "SELECT pg_catalog.has_function_privilege($1, $2, 'EXECUTE')",
        &[current_user().into(), proc.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if allowed {
        return Ok(());
    }
    Err(SqlError::new(
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        "the task owner may not execute the target procedure",
    )
    .hint("GRANT EXECUTE on it to the role creating the task; workers run as that role."))
}

/// Defines a task: what to run per item and how (see the README for every option).
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::too_many_arguments)]
fn create_task(
    task: Option<&str>,
    call: default!(Option<RegProc>, "NULL"),
    statement: default!(Option<&str>, "NULL"),
    after: default!(Option<&str>, "NULL"),
    source: default!(Option<&str>, "NULL"),
    workers: default!(Option<i32>, "NULL"),
    max_items_per_cycle: default!(Option<i64>, "NULL"),
    max_attempts: default!(Option<i32>, 5),
    retry_backoff: default!(Option<Interval>, "'10 seconds'"),
    retry_backoff_max: default!(Option<Interval>, "'1 hour'"),
    item_timeout: default!(Option<Interval>, "NULL"),
    items_per_commit: default!(Option<i32>, 1),
    synchronous_commit: default!(Option<bool>, true),
    sequential_groups: default!(Option<bool>, false),
    rank_by_activity: default!(Option<bool>, false),
) {
    let run = || -> SqlResult<()> {
        let options = TaskOptions {
            name: required_task_name(task)?,
            call: call.map(|c| c.0),
            statement,
            after,
            source,
            workers,
            max_items_per_cycle,
            max_attempts: required(max_attempts, "max_attempts")?,
            retry_backoff: required(retry_backoff, "retry_backoff")?,
            retry_backoff_max: required(retry_backoff_max, "retry_backoff_max")?,
            item_timeout,
            items_per_commit: required(items_per_commit, "items_per_commit")?,
            synchronous_commit: required(synchronous_commit, "synchronous_commit")?,
            sequential_groups: required(sequential_groups, "sequential_groups")?,
            rank_by_activity: required(rank_by_activity, "rank_by_activity")?,
        };
        options.validate()?;
        ensure_owner_can_run(options.name, current_user())?;
        options.insert()?;
        Ok(())
    };
    run().or_raise()
}

/// Drops a task with its queue and run history. Refused while its workers run.
#[pg_extern(volatile, parallel_unsafe)]
fn drop_task(task: Option<&str>) {
    let run = || -> SqlResult<()> {
        let task = Task::for_caller(task, "drop")?;
        let (live, pending) = as_extension_owner(|| {
            Spi::get_two_with_args::<i64, i64>(
                "SELECT (SELECT count(*) FROM chunkwise._live_workers w \
                           JOIN chunkwise.run_history r USING (run_id) WHERE r.task_id = $1), \
                        (SELECT count(*) FROM chunkwise.items WHERE task_id = $1 AND status = 'pending')",
                &[task.id.into()],
            )
        })?;
        if live.unwrap_or(0) > 0 {
            return Err(SqlError::new(
                PgSqlErrorCode::ERRCODE_OBJECT_IN_USE,
                format!("task \"{}\" has running workers", task.name),
            )
            .hint("Wait for its run to finish, or chunkwise.cancel() it, then drop the task."));
        }
        as_extension_owner(|| {
            Spi::run_with_args(
                "DELETE FROM chunkwise.items WHERE task_id = $1",
                &[task.id.into()],
            )?;
            Spi::run_with_args(
                "DELETE FROM chunkwise.run_history WHERE task_id = $1",
                &[task.id.into()],
            )?;
            Spi::run_with_args(
                "DELETE FROM chunkwise.tasks WHERE task_id = $1",
                &[task.id.into()],
            )
        })?;
        let pending = pending.unwrap_or(0);
        if pending > 0 {
            notice!(
                "task \"{}\" dropped with {pending} pending items",
                task.name
            );
        }
        Ok(())
    };
    run().or_raise()
}
