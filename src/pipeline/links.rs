//! `then` and `depends_on`: the edges of the pipeline graph. Stored as task ids (a task
//! that is chained to cannot be dropped), resolved from names for a caller who may manage
//! each task named, and checked for circles after each change.

use pgrx::prelude::*;

use crate::catalog::Task;
use crate::error::{SqlError, SqlResult};
use crate::security::as_extension_owner;

/// The ids of the tasks `names`, each of which the caller must own (or be a member of
/// its owner): chaining to a task starts or holds its work. Duplicates are dropped.
pub fn resolve(names: &[String], option: &str) -> SqlResult<Vec<i32>> {
    let mut ids = Vec::with_capacity(names.len());
    for name in names {
        let task = Task::for_caller(Some(name), &format!("name in {option} of"))?;
        if !ids.contains(&task.id) {
            ids.push(task.id);
        }
    }
    Ok(ids)
}

/// The first circle through `task_id`, as task names joined by arrows; NULL when there
/// is none. Edges run from the task that finishes to the task that follows: `a` then
/// `b` is a -> b, `c` depends on `a` is a -> c. The graph had no circle before this
/// change, so a new one passes through the task that changed.
const CIRCLE_THROUGH: &str = "\
WITH RECURSIVE edges(up, down) AS (
    SELECT t.task_id, d.id FROM chunkwise.tasks t CROSS JOIN LATERAL unnest(t.then_tasks) AS d(id)
    UNION
    SELECT u.id, t.task_id FROM chunkwise.tasks t CROSS JOIN LATERAL unnest(t.depends_on) AS u(id)
), walk(node, path) AS (
    SELECT down, ARRAY[up, down] FROM edges WHERE up = $1
    UNION ALL
    SELECT e.down, w.path || e.down FROM walk w JOIN edges e ON e.up = w.node
     WHERE w.node <> $1 AND e.down <> ALL (w.path[2:])
)
SELECT string_agg(t.task, ' -> ' ORDER BY p.ord)
  FROM (SELECT path FROM walk WHERE node = $1 LIMIT 1) c
  CROSS JOIN LATERAL unnest(c.path) WITH ORDINALITY AS p(id, ord)
  JOIN chunkwise.tasks t ON t.task_id = p.id";

/// Refuses a change of `then`/`depends_on` that closes a circle (the tasks would wait
/// for each other, or start each other, for ever). Called after the change is written,
/// in the same statement: the error rolls it back.
pub fn ensure_acyclic(task_id: i32) -> SqlResult<()> {
    let circle =
        as_extension_owner(|| Spi::get_one_with_args::<String>(CIRCLE_THROUGH, &[task_id.into()]))?;
    match circle {
        None => Ok(()),
        Some(circle) => Err(SqlError::invalid_parameter(format!(
            "then and depends_on would make a circle: {circle}"
        ))
        .hint("A pipeline runs one way: leave the task that closes the circle out of then or depends_on.")),
    }
}

/// Refuses to drop a task that other tasks name in their `then` or `depends_on`.
pub fn ensure_not_chained(task: &Task) -> SqlResult<()> {
    let chained_by = as_extension_owner(|| {
        Spi::get_one_with_args::<String>(
            "SELECT string_agg(task, ', ' ORDER BY task) FROM chunkwise.tasks \
              WHERE task_id <> $1 AND ($1 = ANY (then_tasks) OR $1 = ANY (depends_on))",
            &[task.id.into()],
        )
    })?;
    match chained_by {
        None => Ok(()),
        Some(others) => Err(SqlError::new(
            PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
            format!("task \"{}\" is in the then or depends_on of {others}", task.name),
        )
        .hint("Take it out of theirs first with chunkwise.alter_task(task, \"then\" => ..., depends_on => ...).")),
    }
}
