//! What the dashboard reads: the extension's views, queried as the connected role (so it
//! sees what that role may see and nothing more), and the steering calls it makes.

use serde::Serialize;
use tokio_postgres::{Client, Row};

use crate::db::DbError;

/// A row of `chunkwise.task_status`.
#[derive(Debug, Clone, Serialize)]
pub struct TaskRow {
    pub task: String,
    pub owner: String,
    pub state: &'static str,
    pub paused: bool,
    pub always_on: bool,
    pub pending: i64,
    pub waiting_retry: i64,
    pub running: i64,
    pub done: i64,
    pub dead: i64,
    pub active_workers: i64,
    pub idle_workers: i64,
    pub blocked_groups: i64,
    pub items_per_second: Option<f64>,
    pub seconds_left: Option<f64>,
    pub throttled: Option<String>,
}

impl TaskRow {
    /// Items this task has in its queue now (the progress bar's whole).
    pub fn total(&self) -> i64 {
        self.pending + self.waiting_retry + self.done + self.dead
    }

    /// One word for what the task is doing, in the order a reader asks: stopped on
    /// purpose, held back, working, waiting for workers, nothing to do.
    fn state_of(
        paused: bool,
        throttled: bool,
        running: i64,
        workers: i64,
        queued: i64,
    ) -> &'static str {
        if paused {
            "paused"
        } else if throttled {
            "throttled"
        } else if running > 0 {
            "running"
        } else if workers > 0 {
            "waiting"
        } else if queued > 0 {
            "pending"
        } else {
            "idle"
        }
    }
}

/// A row of `chunkwise.runs`, with its items done per second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct RunRow {
    pub run_id: i64,
    pub state: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub seconds: Option<f64>,
    pub workers: i64,
    pub processed: i64,
    pub failed: i64,
    pub dead: i64,
    pub outcome: Option<String>,
    /// (second of the run, items done in it), from `chunkwise.run_throughput`.
    pub throughput: Vec<(i32, i64)>,
}

/// A row of `chunkwise.failures`.
#[derive(Debug, Clone, Serialize)]
pub struct FailureRow {
    pub item_id: i64,
    pub key: i64,
    pub hi: Option<i64>,
    pub group_key: Option<String>,
    pub status: String,
    pub attempts: i64,
    pub max_attempts: i64,
    pub sqlstate: Option<String>,
    pub message: Option<String>,
    pub last_failed_at: Option<String>,
    pub next_retry: Option<String>,
    pub blocks_group: bool,
}

/// A row of `chunkwise.workers`.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerRow {
    pub pid: i32,
    pub task: String,
    pub run_id: i64,
    pub state: String,
    pub current_key: Option<i64>,
    pub current_item: Option<i64>,
    pub since: Option<String>,
    pub items_done: i64,
    pub started_at: String,
    pub throttled: Option<String>,
}

/// Builds `$row_type` from the same-named columns of `$row` (plus any `extra` fields).
macro_rules! from_row {
    ($row:expr, $row_type:ident { $($field:ident),* $(,)? } $(, $extra:ident: $value:expr)*) => {
        $row_type {
            $($field: $row.try_get(stringify!($field))?,)*
            $($extra: $value,)*
        }
    };
}

/// Times as text in the session's time zone, to the second.
macro_rules! at {
    ($column:literal) => {
        concat!($column, "::timestamptz(0)::text AS ", $column)
    };
}

const TASKS: &str = "SELECT task, owner::text AS owner, paused, always_on, pending, waiting_retry, running, done, dead, \
            active_workers, idle_workers, blocked_groups, items_per_second::float8 AS items_per_second, \
            extract(epoch FROM estimated_time_left)::float8 AS seconds_left, throttled \
       FROM chunkwise.task_status";

fn task_row(row: &Row) -> Result<TaskRow, DbError> {
    let paused: bool = row.try_get("paused")?;
    let throttled: Option<String> = row.try_get("throttled")?;
    let running: i64 = row.try_get("running")?;
    let active_workers: i64 = row.try_get("active_workers")?;
    let pending: i64 = row.try_get("pending")?;
    let waiting_retry: i64 = row.try_get("waiting_retry")?;
    Ok(TaskRow {
        task: row.try_get("task")?,
        owner: row.try_get("owner")?,
        state: TaskRow::state_of(
            paused,
            throttled.is_some(),
            running,
            active_workers,
            pending + waiting_retry,
        ),
        paused,
        always_on: row.try_get("always_on")?,
        pending,
        waiting_retry,
        running,
        done: row.try_get("done")?,
        dead: row.try_get("dead")?,
        active_workers,
        idle_workers: row.try_get("idle_workers")?,
        blocked_groups: row.try_get("blocked_groups")?,
        items_per_second: row.try_get("items_per_second")?,
        seconds_left: row.try_get("seconds_left")?,
        throttled,
    })
}

pub async fn tasks(db: &Client) -> Result<Vec<TaskRow>, DbError> {
    let rows = db.query(&format!("{TASKS} ORDER BY task"), &[]).await?;
    rows.iter().map(task_row).collect()
}

/// The task if the role may see it.
pub async fn task(db: &Client, task: &str) -> Result<Option<TaskRow>, DbError> {
    let row = db
        .query_opt(&format!("{TASKS} WHERE task = $1"), &[&task])
        .await?;
    row.as_ref().map(task_row).transpose()
}

/// The task's latest runs, newest first, each with its throughput series.
pub async fn runs(db: &Client, task: &str, limit: i64) -> Result<Vec<RunRow>, DbError> {
    let rows = db
        .query(
            concat!(
                "SELECT run_id, state, ",
                at!("started_at"),
                ", ",
                at!("finished_at"),
                ", seconds::float8 AS seconds, workers_started::bigint AS workers, \
                   processed::bigint AS processed, failed::bigint AS failed, dead::bigint AS dead, outcome \
                   FROM chunkwise.runs WHERE task = $1 ORDER BY run_id DESC LIMIT $2"
            ),
            &[&task, &limit],
        )
        .await?;
    let mut runs = rows
        .iter()
        .map(|row| {
            Ok(from_row!(row, RunRow { run_id, state, started_at, finished_at, seconds, workers, processed, failed, dead, outcome }, throughput: Vec::new()))
        })
        .collect::<Result<Vec<RunRow>, DbError>>()?;
    let ids: Vec<i64> = runs.iter().map(|r| r.run_id).collect();
    let points = db
        .query(
            "SELECT run_id, second, items FROM chunkwise.run_throughput \
              WHERE run_id = ANY ($1) ORDER BY run_id, second",
            &[&ids],
        )
        .await?;
    for point in &points {
        let run_id: i64 = point.try_get("run_id")?;
        if let Some(run) = runs.iter_mut().find(|r| r.run_id == run_id) {
            run.throughput
                .push((point.try_get("second")?, point.try_get("items")?));
        }
    }
    Ok(runs)
}

/// The task's failed items (waiting for a retry, or dead), latest failure first.
pub async fn failures(db: &Client, task: &str, limit: i64) -> Result<Vec<FailureRow>, DbError> {
    let rows = db
        .query(
            concat!(
                "SELECT item_id, key, hi, group_key, status, attempts::bigint AS attempts, \
                        max_attempts::bigint AS max_attempts, sqlstate, message, blocks_group, ",
                at!("last_failed_at"),
                ", ",
                at!("next_retry"),
                " FROM chunkwise.failures WHERE task = $1 \
                  ORDER BY last_failed_at DESC, item_id DESC LIMIT $2"
            ),
            &[&task, &limit],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(from_row!(
                row,
                FailureRow {
                    item_id,
                    key,
                    hi,
                    group_key,
                    status,
                    attempts,
                    max_attempts,
                    sqlstate,
                    message,
                    last_failed_at,
                    next_retry,
                    blocks_group
                }
            ))
        })
        .collect()
}

pub async fn workers(db: &Client) -> Result<Vec<WorkerRow>, DbError> {
    let rows = db
        .query(
            concat!(
                "SELECT pid, task, run_id, state, current_key, current_item, items_done, throttled, ",
                at!("since"),
                ", ",
                at!("started_at"),
                " FROM chunkwise.workers ORDER BY task, pid"
            ),
            &[],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(from_row!(
                row,
                WorkerRow {
                    pid,
                    task,
                    run_id,
                    state,
                    current_key,
                    current_item,
                    since,
                    items_done,
                    started_at,
                    throttled
                }
            ))
        })
        .collect()
}

/// A text that changes whenever what the pages show changes: compared between two
/// reads to decide whether to tell the open pages.
pub async fn fingerprint(db: &Client) -> Result<String, DbError> {
    let row = db
        .query_one(
            "SELECT concat_ws('|', \
               (SELECT string_agg(concat_ws(',', task, paused, pending, waiting_retry, running, done, dead, \
                                            active_workers, idle_workers, throttled), ';' ORDER BY task) \
                  FROM chunkwise.task_status), \
               (SELECT string_agg(concat_ws(',', pid, state, current_item, items_done), ';' ORDER BY pid) \
                  FROM chunkwise.workers), \
               (SELECT concat_ws(',', max(run_id), count(*) FILTER (WHERE state = 'running')) \
                  FROM chunkwise.runs))",
            &[],
        )
        .await?;
    Ok(row.try_get::<_, Option<String>>(0)?.unwrap_or_default())
}

/// A steering call the pages offer, made as the connected role: the extension's own
/// permission checks decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    Cancel,
    Retry,
    Skip,
}

impl Action {
    pub fn parse(name: &str) -> Option<Action> {
        Some(match name {
            "pause" => Action::Pause,
            "resume" => Action::Resume,
            "cancel" => Action::Cancel,
            "retry" => Action::Retry,
            "skip" => Action::Skip,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Cancel => "cancel",
            Action::Retry => "retry",
            Action::Skip => "skip",
        }
    }

    /// What the page says after it was done.
    pub fn done_text(self) -> &'static str {
        match self {
            Action::Pause => "Paused: running workers stop after their current item.",
            Action::Resume => {
                "Resumed: the next run or cycle (an always-on pool at once) picks up what is pending."
            }
            Action::Cancel => {
                "Cancelled: running workers stop after their current item; nothing is lost."
            }
            Action::Retry => "Dead items are pending again.",
            Action::Skip => "The dead item was skipped.",
        }
    }

    /// Calls the extension's function; `key` is the dead item's key for `skip`.
    pub async fn perform(self, db: &Client, task: &str, key: Option<i64>) -> Result<(), DbError> {
        match self {
            Action::Pause => db.execute("SELECT chunkwise.pause($1)", &[&task]).await?,
            Action::Resume => db.execute("SELECT chunkwise.resume($1)", &[&task]).await?,
            Action::Cancel => db.execute("SELECT chunkwise.cancel($1)", &[&task]).await?,
            Action::Retry => db.execute("SELECT chunkwise.retry($1)", &[&task]).await?,
            Action::Skip => {
                db.execute("SELECT chunkwise.skip($1, $2)", &[&task, &key])
                    .await?
            }
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_state_says_the_most_important_thing_first() {
        assert_eq!(TaskRow::state_of(true, true, 2, 2, 10), "paused");
        assert_eq!(TaskRow::state_of(false, true, 0, 2, 10), "throttled");
        assert_eq!(TaskRow::state_of(false, false, 1, 2, 10), "running");
        assert_eq!(TaskRow::state_of(false, false, 0, 2, 0), "waiting");
        assert_eq!(TaskRow::state_of(false, false, 0, 0, 3), "pending");
        assert_eq!(TaskRow::state_of(false, false, 0, 0, 0), "idle");
    }

    #[test]
    fn only_the_five_actions_parse() {
        for name in ["pause", "resume", "cancel", "retry", "skip"] {
            assert_eq!(Action::parse(name).map(Action::name), Some(name));
        }
        assert_eq!(Action::parse("drop"), None);
        assert_eq!(Action::parse("Pause"), None);
    }
}
