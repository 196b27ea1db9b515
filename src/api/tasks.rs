//! Task definition: `create_task`, `drop_task`.

use pgrx::datum::{DatumWithOid, Interval};
use pgrx::prelude::*;

use crate::always_on;
use crate::catalog::{self, Task, required_task_name};
use crate::columns::Columns;
use crate::error::{OrRaise, SqlError, SqlResult, excerpt};
use crate::governance::pause_when;
use crate::gucs;
use crate::item_status::item_status;
use crate::launcher::DEFAULT_WORKERS;
use crate::locks::{TaskLock, lock_task};
use crate::oid_args::RegProc;
use crate::ownership::{anchor_task, drop_anchor};
use crate::pipeline::{callback, links};
use crate::security::{
    as_extension_owner, current_user, ensure_owner_can_run, ensure_owner_may_execute,
};
use crate::target::{ItemShape, Target, ensure_single_statement};
use crate::task_cache;

/// Longest task name: it must fit in `application_name` beside the run id.
const MAX_TASK_NAME: usize = 40;
const MAX_ATTEMPTS: i32 = 1000;
const MAX_ITEMS_PER_COMMIT: i32 = 10_000;

/// The options of `create_task` and `alter_task`, validated as a whole before anything
/// is written.
struct TaskOptions {
    name: String,
    /// The role the workers will run as.
    owner: pg_sys::Oid,
    call: Option<pg_sys::Oid>,
    statement: Option<String>,
    after: Option<String>,
    source: Option<String>,
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
    /// How long done and skipped items, and finished runs, are kept.
    retain_done: Interval,
    retain_runs: Interval,
    /// Kept running by a pool of resident workers (needs the preloaded library).
    always_on: bool,
    min_workers: i32,
    idle_timeout: Interval,
    /// Governance (see `crate::governance`).
    max_rate: Option<f64>,
    max_replication_lag: Option<Interval>,
    max_load: Option<f64>,
    pause_when: Option<String>,
    lock_timeout: Option<Interval>,
    split_on_timeout: bool,
    split_min_width: i64,
    /// Pipelines (see `crate::pipeline`): callbacks, and the ids of the tasks a
    /// successful run starts and of those whose success this task's cycles wait for.
    on_success: Option<pg_sys::Oid>,
    on_failure: Option<pg_sys::Oid>,
    then: Vec<i32>,
    depends_on: Vec<i32>,
}

fn required<T>(value: Option<T>, name: &str) -> SqlResult<T> {
    value.ok_or_else(|| {
        SqlError::null_argument(name, format!("Leave {name} out to use its default."))
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

fn ensure_positive_number(value: f64, name: &str, what: &str) -> SqlResult<()> {
    if value.is_finite() && value > 0.0 {
        return Ok(());
    }
    Err(
        SqlError::invalid_parameter(format!("{name} must be a positive number, not {value}"))
            .hint(format!("{name} is {what}; leave it out for no limit.")),
    )
}

/// Whether a statement uses `$2` (the `hi` of a `[lo, hi)` item).
fn uses_second_parameter(sql: &str) -> bool {
    sql.match_indices("$2")
        .any(|(at, _)| !sql[at + 2..].starts_with(|c: char| c.is_ascii_digit()))
}

fn ensure_not_negative(value: &Interval, name: &str) -> SqlResult<()> {
    if value.months() >= 0 && value.days() >= 0 && value.micros() >= 0 {
        return Ok(());
    }
    Err(
        SqlError::invalid_parameter(format!("{name} must not be negative")).hint(format!(
            "For example {name} => '7 days'; '0' keeps nothing once a run ends."
        )),
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
        format!("invalid task name \"{}\"", excerpt(name)),
    )
    .hint(format!(
        "A task name has 1 to {MAX_TASK_NAME} characters from A-Z, a-z, 0-9 and _ - . :"
    )))
}

impl TaskOptions {
    fn validate(&self) -> SqlResult<()> {
        validate_task_name(&self.name)?;
        match (self.call, self.statement.as_deref()) {
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
                ensure_owner_may_execute(self.owner, proc)?;
            }
            (None, Some(sql)) => ensure_single_statement(sql, "statement")?,
        }
        if let Some(sql) = self.after.as_deref() {
            ensure_single_statement(sql, "after")?;
        }
        if let Some(sql) = self.source.as_deref() {
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
        if self.sequential_groups && self.items_per_commit > 1 {
            return Err(SqlError::invalid_parameter(
                "sequential_groups runs one item of a group per transaction; items_per_commit must be 1",
            )
            .hint("Leave items_per_commit out, or drop sequential_groups."));
        }
        if self.always_on {
            always_on::ensure_available()?;
        }
        let workers = self.workers.unwrap_or(DEFAULT_WORKERS);
        if self.min_workers < 0 || self.min_workers > workers {
            return Err(SqlError::invalid_parameter(format!(
                "min_workers must be between 0 and workers ({workers}), not {}",
                self.min_workers
            ))
            .hint("An always-on pool keeps min_workers workers up and grows to workers; raise workers or lower min_workers."));
        }
        ensure_positive_interval(&self.idle_timeout, "idle_timeout")?;
        self.validate_governance()?;
        if let Some(proc) = self.on_success {
            callback::ensure_callback(proc, self.owner, "on_success")?;
        }
        if let Some(proc) = self.on_failure {
            callback::ensure_callback(proc, self.owner, "on_failure")?;
        }
        ensure_not_negative(&self.retain_done, "retain_done")?;
        ensure_not_negative(&self.retain_runs, "retain_runs")?;
        if self.rank_by_activity && self.source.is_none() {
            return Err(
                SqlError::invalid_parameter("rank_by_activity needs a source query")
                    .hint("Give source => a query returning key, last_activity and actions."),
            );
        }
        Ok(())
    }

    fn validate_governance(&self) -> SqlResult<()> {
        if let Some(rate) = self.max_rate {
            ensure_positive_number(
                rate,
                "max_rate",
                "items per second across the task's workers, e.g. max_rate => 200",
            )?;
        }
        if let Some(load) = self.max_load {
            ensure_positive_number(
                load,
                "max_load",
                "the 1-minute load average per core above which workers wait, e.g. max_load => 1.5",
            )?;
        }
        if let Some(lag) = &self.max_replication_lag {
            ensure_positive_interval(lag, "max_replication_lag")?;
        }
        if let Some(timeout) = &self.lock_timeout {
            ensure_positive_interval(timeout, "lock_timeout")?;
        }
        if let Some(expression) = self.pause_when.as_deref() {
            pause_when::ensure_valid(expression, self.owner)?;
        }
        ensure_range(self.split_min_width, 1, i64::MAX, "split_min_width")?;
        if self.split_on_timeout {
            self.ensure_splittable()?;
        }
        Ok(())
    }

    /// `split_on_timeout` needs `[lo, hi)` items to halve, a timeout to split on, and
    /// items that are not counted per group.
    fn ensure_splittable(&self) -> SqlResult<()> {
        let takes_ranges = match (self.call, self.statement.as_deref()) {
            (Some(proc), _) => Target::for_call(proc)?.shape == Some(ItemShape::Range),
            (None, Some(sql)) => uses_second_parameter(sql),
            (None, None) => false,
        };
        if !takes_ranges {
            return Err(SqlError::invalid_parameter(
                "split_on_timeout needs a task of [lo, hi) range items",
            )
            .hint("Its call must take (bigint, bigint), or its statement use $1 and $2 as lo and hi; plan items with chunkwise.plan_ranges()."));
        }
        if self.item_timeout.is_none() {
            return Err(
                SqlError::invalid_parameter("split_on_timeout needs an item_timeout")
                    .hint("Set item_timeout => the longest an item may run, e.g. '30 seconds'."),
            );
        }
        if self.sequential_groups {
            return Err(SqlError::invalid_parameter(
                "split_on_timeout cannot split the items of sequential groups",
            )
            .hint("Drop sequential_groups, or split_on_timeout."));
        }
        Ok(())
    }

    /// The stored options, each with its column: the one list that INSERT and UPDATE
    /// are written from (`load` reads the same columns by name).
    fn stored(&self) -> Vec<(&'static str, DatumWithOid<'_>)> {
        vec![
            ("call", self.call.into()),
            ("statement", self.statement.as_deref().into()),
            ("after", self.after.as_deref().into()),
            ("source", self.source.as_deref().into()),
            ("workers", self.workers.into()),
            ("max_items_per_cycle", self.max_items_per_cycle.into()),
            ("max_attempts", self.max_attempts.into()),
            ("retry_backoff", self.retry_backoff.into()),
            ("retry_backoff_max", self.retry_backoff_max.into()),
            ("item_timeout", self.item_timeout.into()),
            ("items_per_commit", self.items_per_commit.into()),
            ("synchronous_commit", self.synchronous_commit.into()),
            ("sequential_groups", self.sequential_groups.into()),
            ("rank_by_activity", self.rank_by_activity.into()),
            ("retain_done", self.retain_done.into()),
            ("retain_runs", self.retain_runs.into()),
            ("always_on", self.always_on.into()),
            ("min_workers", self.min_workers.into()),
            ("idle_timeout", self.idle_timeout.into()),
            ("max_rate", self.max_rate.into()),
            ("max_replication_lag", self.max_replication_lag.into()),
            ("max_load", self.max_load.into()),
            ("pause_when", self.pause_when.as_deref().into()),
            ("lock_timeout", self.lock_timeout.into()),
            ("split_on_timeout", self.split_on_timeout.into()),
            ("split_min_width", self.split_min_width.into()),
            ("on_success", self.on_success.into()),
            ("on_failure", self.on_failure.into()),
            ("then_tasks", self.then.clone().into()),
            ("depends_on", self.depends_on.clone().into()),
        ]
    }

    /// Inserts the task and anchors it to its owner (see `ownership`); returns its id.
    fn insert(&self) -> SqlResult<i32> {
        let (columns, placeholders, options) = option_parameters(self.stored(), 3);
        let mut args: Vec<DatumWithOid> = vec![self.name.as_str().into(), self.owner.into()];
        args.extend(options);
        let inserted = as_extension_owner(|| {
            Spi::connect_mut(|client| -> SqlResult<Option<i32>> {
                let table = client.update(
                    &format!(
                        "INSERT INTO chunkwise.tasks (task, owner, {columns}) \
                         VALUES ($1, $2, {placeholders}) \
                         ON CONFLICT (task) DO NOTHING RETURNING task_id"
                    ),
                    None,
                    &args,
                )?;
                // No row: the name is taken.
                match table.into_iter().next() {
                    Some(row) => Ok(Some(row.required("task_id")?)),
                    None => Ok(None),
                }
            })
        })?;
        if let Some(task_id) = inserted {
            links::ensure_acyclic(task_id)?;
            anchor_task(task_id, &self.name, self.owner)?;
            return Ok(task_id);
        }
        Err(SqlError::new(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!("task \"{}\" already exists", self.name),
        )
        .hint("Choose another name, or chunkwise.drop_task() the old task first."))
    }

    fn update(&self, task_id: i32) -> SqlResult<()> {
        let (columns, placeholders, options) = option_parameters(self.stored(), 2);
        let mut args: Vec<DatumWithOid> = vec![task_id.into()];
        args.extend(options);
        as_extension_owner(|| {
            Spi::run_with_args(
                &format!(
                    "UPDATE chunkwise.tasks SET ({columns}) = ({placeholders}) WHERE task_id = $1"
                ),
                &args,
            )
        })?;
        links::ensure_acyclic(task_id)
    }
}

/// The column list, the matching parameters (numbered from `first`; `call` is cast from
/// its oid) and the values of `stored` options.
fn option_parameters<'a>(
    stored: Vec<(&'static str, DatumWithOid<'a>)>,
    first: usize,
) -> (String, String, Vec<DatumWithOid<'a>>) {
    let columns = stored.iter().map(|(column, _)| *column).collect::<Vec<_>>();
    let placeholders = columns
        .iter()
        .enumerate()
        .map(|(i, column)| match *column {
            "call" | "on_success" | "on_failure" => format!("${}::regprocedure", first + i),
            _ => format!("${}", first + i),
        })
        .collect::<Vec<_>>();
    let values = stored.into_iter().map(|(_, value)| value).collect();
    (columns.join(", "), placeholders.join(", "), values)
}

impl TaskOptions {
    /// The task's options as stored, for `alter_task` to change.
    fn load(task: &Task) -> SqlResult<TaskOptions> {
        let options = as_extension_owner(|| {
            Spi::connect(|client| -> SqlResult<TaskOptions> {
                let table = client.select(
                    "SELECT *, call::oid AS call_oid, on_success::oid AS on_success_oid, \
                            on_failure::oid AS on_failure_oid \
                       FROM chunkwise.tasks WHERE task_id = $1",
                    Some(1),
                    &[task.id.into()],
                )?;
                let row = table.into_iter().next().ok_or_else(|| {
                    SqlError::new(
                        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                        format!("task \"{}\" vanished while it was read", task.name),
                    )
                })?;
                Ok(TaskOptions {
                    name: task.name.clone(),
                    owner: task.owner,
                    call: row.optional("call_oid")?,
                    statement: row.optional("statement")?,
                    after: row.optional("after")?,
                    source: row.optional("source")?,
                    workers: row.optional("workers")?,
                    max_items_per_cycle: row.optional("max_items_per_cycle")?,
                    max_attempts: row.required("max_attempts")?,
                    retry_backoff: row.required("retry_backoff")?,
                    retry_backoff_max: row.required("retry_backoff_max")?,
                    item_timeout: row.optional("item_timeout")?,
                    items_per_commit: row.required("items_per_commit")?,
                    synchronous_commit: row.required("synchronous_commit")?,
                    sequential_groups: row.required("sequential_groups")?,
                    rank_by_activity: row.required("rank_by_activity")?,
                    retain_done: row.required("retain_done")?,
                    retain_runs: row.required("retain_runs")?,
                    always_on: row.required("always_on")?,
                    min_workers: row.required("min_workers")?,
                    idle_timeout: row.required("idle_timeout")?,
                    max_rate: row.optional("max_rate")?,
                    max_replication_lag: row.optional("max_replication_lag")?,
                    max_load: row.optional("max_load")?,
                    pause_when: row.optional("pause_when")?,
                    lock_timeout: row.optional("lock_timeout")?,
                    split_on_timeout: row.required("split_on_timeout")?,
                    split_min_width: row.required("split_min_width")?,
                    on_success: row.optional("on_success_oid")?,
                    on_failure: row.optional("on_failure_oid")?,
                    then: row.required("then_tasks")?,
                    depends_on: row.required("depends_on")?,
                })
            })
        })?;
        Ok(options)
    }
}

/// The groups' bookkeeping starts with a group's first item: switching sequential_groups
/// is only possible while the task has no pending or dead item.
fn ensure_queue_empty(task: &Task, sequential: bool) -> SqlResult<()> {
    let open = as_extension_owner(|| {
        Spi::get_one_with_args::<i64>(
            concat!(
                "SELECT count(*) FROM chunkwise.items WHERE task_id = $1 AND status IN (",
                item_status!(pending),
                ", ",
                item_status!(dead),
                ")"
            ),
            &[task.id.into()],
        )
    })?
    .unwrap_or(0);
    if open == 0 {
        return Ok(());
    }
    Err(SqlError::new(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!(
            "cannot turn sequential_groups {} while task \"{}\" has {open} pending or dead items",
            if sequential { "on" } else { "off" },
            task.name
        ),
    )
    .hint("Let the queue drain (or purge it), then alter the task."))
}

/// Applies a text option given to `alter_task`: NULL keeps the stored value, '' clears it.
fn alter_text(stored: &mut Option<String>, given: Option<&str>) {
    match given {
        Some("") => *stored = None,
        Some(value) => *stored = Some(value.to_string()),
        None => {}
    }
}

/// Applies an optional setting given to `alter_task`: NULL keeps the stored value, a
/// zero (`is_zero`) clears it.
fn alter_optional<T>(stored: &mut Option<T>, given: Option<T>, is_zero: impl Fn(&T) -> bool) {
    match given {
        Some(value) if is_zero(&value) => *stored = None,
        Some(value) => *stored = Some(value),
        None => {}
    }
}

fn is_zero_interval(interval: &Interval) -> bool {
    interval.as_micros() == 0 && interval.months() == 0 && interval.days() == 0
}

/// A callback option: `'-'` (the zero OID, as `regproc` reads it) means none, which is
/// how `alter_task` clears one.
fn callback_oid(given: Option<RegProc>) -> Option<pg_sys::Oid> {
    given.map(|p| p.0).filter(|&oid| oid != pg_sys::InvalidOid)
}

/// Applies a required setting given to `alter_task`: NULL keeps the stored value.
fn alter_required<T>(stored: &mut T, given: Option<T>) {
    if let Some(value) = given {
        *stored = value;
    }
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
    retain_done: default!(Option<Interval>, "'7 days'"),
    retain_runs: default!(Option<Interval>, "'30 days'"),
    always_on: default!(Option<bool>, false),
    min_workers: default!(Option<i32>, 1),
    idle_timeout: default!(Option<Interval>, "'5 minutes'"),
    max_rate: default!(Option<f64>, "NULL"),
    max_replication_lag: default!(Option<Interval>, "NULL"),
    max_load: default!(Option<f64>, "NULL"),
    pause_when: default!(Option<&str>, "NULL"),
    lock_timeout: default!(Option<Interval>, "NULL"),
    split_on_timeout: default!(Option<bool>, false),
    split_min_width: default!(Option<i64>, 1),
    on_success: default!(Option<RegProc>, "NULL"),
    on_failure: default!(Option<RegProc>, "NULL"),
    then: default!(Option<Vec<String>>, "NULL"),
    depends_on: default!(Option<Vec<String>>, "NULL"),
) {
    let run = || -> SqlResult<()> {
        let options = TaskOptions {
            name: required_task_name(task)?.to_string(),
            owner: current_user(),
            call: call.map(|c| c.0),
            statement: statement.map(str::to_string),
            after: after.map(str::to_string),
            source: source.map(str::to_string),
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
            retain_done: required(retain_done, "retain_done")?,
            retain_runs: required(retain_runs, "retain_runs")?,
            always_on: required(always_on, "always_on")?,
            min_workers: required(min_workers, "min_workers")?,
            idle_timeout: required(idle_timeout, "idle_timeout")?,
            max_rate,
            max_replication_lag,
            max_load,
            pause_when: pause_when.map(str::to_string),
            lock_timeout,
            split_on_timeout: required(split_on_timeout, "split_on_timeout")?,
            split_min_width: required(split_min_width, "split_min_width")?,
            on_success: callback_oid(on_success),
            on_failure: callback_oid(on_failure),
            then: links::resolve(&then.unwrap_or_default(), "then")?,
            depends_on: links::resolve(&depends_on.unwrap_or_default(), "depends_on")?,
        };
        options.validate()?;
        ensure_owner_can_run(&options.name, current_user())?;
        let task_id = options.insert()?;
        always_on::restart_at_commit(task_id, options.always_on);
        Ok(())
    };
    run().or_raise()
}

/// Changes a task's options. An option left out (NULL) keeps its value; '' clears
/// `after`, `source` and `pause_when`; 0 clears `workers`, `max_items_per_cycle`,
/// `item_timeout`, `max_rate`, `max_load`, `max_replication_lag` and `lock_timeout`;
/// '-' clears `on_success` and `on_failure`, '{}' clears `then` and `depends_on`.
/// Running workers pick up the governance options within a second.
/// Giving `call` replaces a `statement` and the other way round. Runs under way keep the
/// options they started with; the next run uses the new ones. An always-on pool's
/// members leave after their current item and the pool restarts with the new options.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::too_many_arguments)]
fn alter_task(
    task: Option<&str>,
    call: default!(Option<RegProc>, "NULL"),
    statement: default!(Option<&str>, "NULL"),
    after: default!(Option<&str>, "NULL"),
    source: default!(Option<&str>, "NULL"),
    workers: default!(Option<i32>, "NULL"),
    max_items_per_cycle: default!(Option<i64>, "NULL"),
    max_attempts: default!(Option<i32>, "NULL"),
    retry_backoff: default!(Option<Interval>, "NULL"),
    retry_backoff_max: default!(Option<Interval>, "NULL"),
    item_timeout: default!(Option<Interval>, "NULL"),
    items_per_commit: default!(Option<i32>, "NULL"),
    synchronous_commit: default!(Option<bool>, "NULL"),
    sequential_groups: default!(Option<bool>, "NULL"),
    rank_by_activity: default!(Option<bool>, "NULL"),
    retain_done: default!(Option<Interval>, "NULL"),
    retain_runs: default!(Option<Interval>, "NULL"),
    always_on: default!(Option<bool>, "NULL"),
    min_workers: default!(Option<i32>, "NULL"),
    idle_timeout: default!(Option<Interval>, "NULL"),
    max_rate: default!(Option<f64>, "NULL"),
    max_replication_lag: default!(Option<Interval>, "NULL"),
    max_load: default!(Option<f64>, "NULL"),
    pause_when: default!(Option<&str>, "NULL"),
    lock_timeout: default!(Option<Interval>, "NULL"),
    split_on_timeout: default!(Option<bool>, "NULL"),
    split_min_width: default!(Option<i64>, "NULL"),
    on_success: default!(Option<RegProc>, "NULL"),
    on_failure: default!(Option<RegProc>, "NULL"),
    then: default!(Option<Vec<String>>, "NULL"),
    depends_on: default!(Option<Vec<String>>, "NULL"),
) {
    let run = || -> SqlResult<()> {
        let current = Task::for_caller(task, "alter")?;
        task_cache::forget();
        let mut options = TaskOptions::load(&current)?;
        if call.is_some() || statement.is_some() {
            options.call = call.map(|c| c.0);
            options.statement = statement.map(str::to_string);
        }
        alter_text(&mut options.after, after);
        alter_text(&mut options.source, source);
        alter_optional(&mut options.workers, workers, |&w| w == 0);
        alter_optional(
            &mut options.max_items_per_cycle,
            max_items_per_cycle,
            |&m| m == 0,
        );
        alter_optional(&mut options.item_timeout, item_timeout, is_zero_interval);
        alter_optional(&mut options.max_rate, max_rate, |&r| r == 0.0);
        alter_optional(
            &mut options.max_replication_lag,
            max_replication_lag,
            is_zero_interval,
        );
        alter_optional(&mut options.max_load, max_load, |&l| l == 0.0);
        alter_text(&mut options.pause_when, pause_when);
        alter_optional(&mut options.lock_timeout, lock_timeout, is_zero_interval);
        alter_required(&mut options.split_on_timeout, split_on_timeout);
        alter_required(&mut options.split_min_width, split_min_width);
        alter_required(&mut options.max_attempts, max_attempts);
        alter_required(&mut options.retry_backoff, retry_backoff);
        alter_required(&mut options.retry_backoff_max, retry_backoff_max);
        alter_required(&mut options.items_per_commit, items_per_commit);
        alter_required(&mut options.synchronous_commit, synchronous_commit);
        if let Some(wanted) = sequential_groups.filter(|&w| w != options.sequential_groups) {
            // Enqueues check group keys against the task as they looked it up (once per
            // transaction): wait for the open ones, whose items then count as queued.
            // No other option needs this wait, so steering a busy task never waits.
            lock_task(current.id, TaskLock::Changes);
            ensure_queue_empty(&current, wanted)?;
        }
        alter_required(&mut options.sequential_groups, sequential_groups);
        alter_required(&mut options.rank_by_activity, rank_by_activity);
        alter_required(&mut options.retain_done, retain_done);
        alter_required(&mut options.retain_runs, retain_runs);
        alter_required(&mut options.always_on, always_on);
        alter_required(&mut options.min_workers, min_workers);
        alter_required(&mut options.idle_timeout, idle_timeout);
        if let Some(proc) = on_success {
            options.on_success = callback_oid(Some(proc));
        }
        if let Some(proc) = on_failure {
            options.on_failure = callback_oid(Some(proc));
        }
        if let Some(names) = then {
            options.then = links::resolve(&names, "then")?;
        }
        if let Some(names) = depends_on {
            options.depends_on = links::resolve(&names, "depends_on")?;
        }
        options.validate()?;
        options.update(current.id)?;
        // A pool restarts with the task as it now is; one no longer always-on leaves.
        always_on::restart_at_commit(current.id, current.always_on || options.always_on);
        Ok(())
    };
    run().or_raise()
}

/// Drops a task with its queue and run history. Refused while it is always on or its
/// workers run.
#[pg_extern(volatile, parallel_unsafe)]
fn drop_task(task: Option<&str>) {
    let run = || -> SqlResult<()> {
        let task = Task::for_caller(task, "drop")?;
        // Waits for the transactions that enqueue into it: their items are then committed
        // and deleted below with the rest, instead of staying behind without a task.
        lock_task(task.id, TaskLock::Changes);
        task_cache::forget();
        // An always-on task is refused whether or not a member happens to be up at this
        // instant (its pool restarts after an alter_task): the rule must not depend on timing.
        if task.always_on {
            return Err(SqlError::new(
                PgSqlErrorCode::ERRCODE_OBJECT_IN_USE,
                format!("task \"{}\" is always on", task.name),
            )
            .hint(
                "Turn its pool off first with chunkwise.alter_task(task, always_on => false); \
                 its workers leave after their current item.",
            ));
        }
        if catalog::live_workers(task.id)? > 0 {
            return Err(SqlError::new(
                PgSqlErrorCode::ERRCODE_OBJECT_IN_USE,
                format!("task \"{}\" has running workers", task.name),
            )
            .hint("Wait for its run to finish, or chunkwise.cancel() it, then drop the task."));
        }
        links::ensure_not_chained(&task)?;
        always_on::restart_at_commit(task.id, task.always_on);
        // Its groups and runs go with it (foreign keys ON DELETE CASCADE); its items,
        // which have no key (see bootstrap.sql), are deleted here.
        let pending = as_extension_owner(|| {
            Spi::get_one_with_args::<i64>(
                concat!(
                    "WITH dropped AS (DELETE FROM chunkwise.tasks WHERE task_id = $1), \
                          items AS (DELETE FROM chunkwise.items WHERE task_id = $1 RETURNING status) \
                     SELECT count(*) FROM items WHERE status = ",
                    item_status!(pending)
                ),
                &[task.id.into()],
            )
        })?
        .unwrap_or(0);
        drop_anchor(&task.name)?;
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
