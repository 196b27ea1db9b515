//! Reading tasks and the facts of their runs from the extension's tables.

use pgrx::prelude::*;
use pgrx::spi::SpiHeapTupleData;
use pgrx::{PgBuiltInOids, PgOid};

use crate::columns::Columns;
use crate::error::{SqlError, SqlResult, excerpt};
use crate::kept_plans::{Access, kept};
use crate::security::{as_extension_owner, may_manage, may_see, permission_denied};

/// A task as the engine uses it; intervals that only SQL needs stay in the table.
#[derive(Debug, Clone)]
pub struct Task {
    pub id: i32,
    pub name: String,
    pub owner: pg_sys::Oid,
    pub call: Option<pg_sys::Oid>,
    pub statement: Option<String>,
    pub after: Option<String>,
    /// The planning query `run_cycle` re-runs, by activity when `rank_by_activity`.
    pub source: Option<String>,
    pub rank_by_activity: bool,
    pub max_items_per_cycle: Option<i64>,
    pub workers: Option<i32>,
    /// `item_timeout` in milliseconds, if set.
    pub item_timeout_ms: Option<i64>,
    pub items_per_commit: i32,
    pub synchronous_commit: bool,
    /// One item per group in flight, groups in turn (see `chunkwise.groups`).
    pub sequential_groups: bool,
    pub paused: bool,
    /// Kept running by an always-on pool (see `always_on`).
    pub always_on: bool,
    /// `idle_timeout` in milliseconds: how long a pool member above `min_workers` waits
    /// for work before it leaves.
    pub idle_timeout_ms: i64,
}

/// The columns `Task::from_row` reads, by name. (max_attempts and the backoff are read by
/// the statements that use them, so that alter_task changes them for running workers too.)
/// The owner is `chunkwise._owner`'s expression written out: a SQL function with its own
/// `SET search_path` is called through a GUC nest level of its own on every lookup.
macro_rules! select_task_where {
    ($condition:literal) => {
        concat!(
            "SELECT task_id, task, \
                    coalesce((SELECT d.typowner FROM pg_catalog.pg_type d WHERE d.oid = anchor), owner) AS owner, \
                    call::oid AS call, \
                    statement, after, workers, (extract(epoch FROM item_timeout) * 1000)::bigint AS item_timeout_ms, \
                    items_per_commit, synchronous_commit, paused, source, rank_by_activity, max_items_per_cycle, \
                    sequential_groups, always_on, (extract(epoch FROM idle_timeout) * 1000)::bigint AS idle_timeout_ms \
               FROM chunkwise.tasks WHERE ",
            $condition
        )
    };
}

impl Task {
    fn from_row(row: &SpiHeapTupleData) -> SqlResult<Task> {
        Ok(Task {
            id: row.required("task_id")?,
            name: row.required("task")?,
            owner: row.required("owner")?,
            call: row.optional("call")?,
            statement: row.optional("statement")?,
            after: row.optional("after")?,
            workers: row.optional("workers")?,
            item_timeout_ms: row.optional("item_timeout_ms")?,
            items_per_commit: row.required("items_per_commit")?,
            synchronous_commit: row.required("synchronous_commit")?,
            paused: row.required("paused")?,
            source: row.optional("source")?,
            rank_by_activity: row.required("rank_by_activity")?,
            max_items_per_cycle: row.optional("max_items_per_cycle")?,
            sequential_groups: row.required("sequential_groups")?,
            always_on: row.required("always_on")?,
            idle_timeout_ms: row.required("idle_timeout_ms")?,
        })
    }

    /// Looks a task up by name; an unknown name is the caller's error.
    pub fn by_name(name: &str) -> SqlResult<Task> {
        Task::find(
            select_task_where!("task = $1"),
            PgOid::BuiltIn(PgBuiltInOids::TEXTOID),
            name,
        )?
        .ok_or_else(|| unknown_task(name))
    }

    /// The named task, for a caller who wants to `action` it (e.g. "run"). A task the
    /// caller may see but not manage is refused with 42501; one it may not even see is
    /// answered as if it did not exist, so that nobody learns of other roles' tasks.
    /// The lookup runs with the pinned search_path and evaluates nothing of the caller's,
    /// and nothing else runs before the check.
    pub fn for_caller(name: Option<&str>, action: &str) -> SqlResult<Task> {
        let name = required_task_name(name)?;
        let task = Task::by_name(name)?;
        if may_manage(task.owner) {
            Ok(task)
        } else if may_see(task.owner) {
            Err(permission_denied(name, task.owner, action))
        } else {
            Err(unknown_task(name))
        }
    }

    /// Looks a task up by id (workers); `None` when it was dropped meanwhile.
    pub fn by_id(id: i32) -> SqlResult<Option<Task>> {
        Task::find(
            select_task_where!("task_id = $1"),
            PgOid::BuiltIn(PgBuiltInOids::INT4OID),
            id,
        )
    }

    /// One task by `key` (of type `key_type`), through a kept plan: enqueue looks its
    /// task up on every call.
    fn find<K: IntoDatum>(query: &'static str, key_type: PgOid, key: K) -> SqlResult<Option<Task>> {
        as_extension_owner(|| {
            Spi::connect(|client| {
                let plan = kept(client, query, &[key_type], Access::Reads)?;
                let table = client.select(&*plan, Some(1), &[key.into()])?;
                match table.into_iter().next() {
                    Some(row) => Task::from_row(&row).map(Some),
                    None => Ok(None),
                }
            })
        })
    }
}

pub fn unknown_task(name: &str) -> SqlError {
    SqlError::new(
        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        format!("task \"{}\" does not exist", excerpt(name)),
    )
    .hint("See SELECT task FROM chunkwise.task_status for the tasks you can see, or create it with chunkwise.create_task().")
}

/// The task name argument of every function: required.
pub fn required_task_name(name: Option<&str>) -> SqlResult<&str> {
    name.ok_or_else(|| {
        SqlError::null_argument(
            "task name",
            "Pass the name given to chunkwise.create_task().",
        )
    })
}

/// Workers of the task alive now: their sessions, as `chunkwise._live_workers` tells
/// them from pg_stat_activity.
pub fn live_workers(task_id: i32) -> SqlResult<i64> {
    let live = as_extension_owner(|| {
        Spi::get_one_with_args::<i64>(
            "SELECT count(*) FROM chunkwise._live_workers lw \
               JOIN chunkwise.run_history r USING (run_id) WHERE r.task_id = $1",
            &[task_id.into()],
        )
    })?;
    Ok(live.unwrap_or(0))
}

/// The highest run id handed out so far; 0 before the first run.
pub fn last_run_id() -> SqlResult<i64> {
    let last = as_extension_owner(|| {
        Spi::get_one::<i64>(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM chunkwise.run_id_seq",
        )
    })?;
    Ok(last.unwrap_or(0))
}
