//! Planning: `enqueue`, `plan`, `plan_by_activity`, `activity_tier`.
//!
//! A planning query runs as the caller (cursor fetches included), and only the insert of
//! its rows into the queue runs as the extension owner.

use std::collections::HashSet;

use pgrx::JsonB;
use pgrx::PgMemoryContexts;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::spi::{SpiCursor, SpiHeapTupleData, SpiTupleTable};
use pgrx::{PgBuiltInOids, PgOid};

use crate::catalog::Task;
use crate::error::{OrRaise, SqlError, SqlResult};
use crate::item_status::item_status;
use crate::kept_plans::write_returning;
use crate::open_groups::open_items_of_groups;
use crate::queued_in_transaction;
use crate::ranking::{Activity, Ranking};
use crate::security::{as_extension_owner, as_task_owner};
use crate::target::ensure_single_statement;
use crate::task_cache::task_for_enqueue;

/// Rows fetched from a planning query and written to the queue at a time, at most.
pub(crate) const PLAN_BATCH: i64 = 10_000;
/// Bytes of item data (payloads, group keys) fetched and written at a time, about.
const PLAN_BATCH_BYTES: usize = 4 << 20;

/// Largest payload an item may carry (its JSON text), and longest group key.
const MAX_PAYLOAD_BYTES: usize = 1 << 20;
const MAX_GROUP_KEY_CHARS: usize = 1000;

/// Items on their way into the queue, column by column (they travel as SQL arrays).
#[derive(Default)]
pub struct ItemBatch {
    keys: Vec<i64>,
    his: Vec<Option<i64>>,
    priorities: Vec<i64>,
    group_keys: Vec<Option<String>>,
    payloads: Vec<Option<JsonB>>,
}

impl ItemBatch {
    pub fn push(
        &mut self,
        key: i64,
        hi: Option<i64>,
        priority: i64,
        group_key: Option<String>,
        payload: Option<JsonB>,
    ) {
        self.keys.push(key);
        self.his.push(hi);
        self.priorities.push(priority);
        self.group_keys.push(group_key);
        self.payloads.push(payload);
    }

    /// About how much memory the batch's items take.
    fn bytes(&self) -> usize {
        let text: usize = self.group_keys.iter().flatten().map(String::len).sum();
        let payloads: usize = self.payload_sizes().sum();
        self.keys.len() * ITEM_BYTES + text + payloads
    }

    /// The size of each payload's JSON text.
    fn payload_sizes(&self) -> impl Iterator<Item = usize> + '_ {
        self.payloads
            .iter()
            .flatten()
            .map(|p| p.0.to_string().len())
    }

    /// Refuses payloads and group keys too big to be sensible item data (they would
    /// bloat the queue and every claim that reads it).
    fn ensure_within_limits(&self) -> SqlResult<()> {
        if let Some(key) = self
            .group_keys
            .iter()
            .flatten()
            .find(|g| g.chars().count() > MAX_GROUP_KEY_CHARS)
        {
            return Err(SqlError::new(
                PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                format!(
                    "group_key of {} characters is longer than {MAX_GROUP_KEY_CHARS}",
                    key.chars().count()
                ),
            )
            .hint("Use a short identifier of the group (an organisation id, say), not its data."));
        }
        for bytes in self.payload_sizes() {
            if bytes > MAX_PAYLOAD_BYTES {
                return Err(SqlError::new(
                    PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                    format!("payload of {bytes} bytes is larger than {MAX_PAYLOAD_BYTES}"),
                )
                .hint("Keep large data in a table and put its key or path in the payload."));
            }
        }
        Ok(())
    }

    /// Items of a task with sequential groups belong to a group.
    fn ensure_grouped(&self, task: &Task) -> SqlResult<()> {
        if !task.sequential_groups || self.group_keys.iter().all(Option::is_some) {
            return Ok(());
        }
        Err(SqlError::new(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            format!(
                "task \"{}\" has sequential_groups: every item needs a group_key",
                task.name
            ),
        )
        .hint("Pass group_key => ..., or return a text group_key column from the planning query."))
    }

    /// Adds the batch to the task's queue: new keys become pending items in batch order,
    /// keys already pending get the new priority. Returns the number of items added.
    /// For a task with sequential groups, the groups' counts of open items follow.
    pub fn insert(self, task: &Task, not_before: Option<TimestampWithTimeZone>) -> SqlResult<i64> {
        if self.keys.is_empty() {
            return Ok(0);
        }
        self.ensure_within_limits()?;
        self.ensure_grouped(task)?;
        let task_id = task.id;
        if task.sequential_groups {
            lock_groups(task_id, &self.group_keys)?;
        }
        let added = if self.keys.len() == 1 && !task.sequential_groups {
            self.insert_one(task_id, not_before)?
        } else {
            self.insert_all(task, not_before)?
        };
        queued_in_transaction::items_queued(task, added);
        Ok(added)
    }

    fn insert_all(self, task: &Task, not_before: Option<TimestampWithTimeZone>) -> SqlResult<i64> {
        let added = as_extension_owner(|| {
            write_returning::<i64>(
                INSERT_ITEMS,
                &INSERT_ITEMS_TYPES,
                &[
                    task.id.into(),
                    self.keys.into(),
                    self.his.into(),
                    self.priorities.into(),
                    self.group_keys.into(),
                    self.payloads.into(),
                    not_before.into(),
                    task.sequential_groups.into(),
                ],
            )
        })?;
        Ok(added.unwrap_or(0))
    }

    /// The batch's only item, through `INSERT_ONE_ITEM`.
    fn insert_one(self, task_id: i32, not_before: Option<TimestampWithTimeZone>) -> SqlResult<i64> {
        let ItemBatch {
            keys,
            his,
            priorities,
            group_keys,
            payloads,
        } = self;
        let inserted = as_extension_owner(|| {
            write_returning::<bool>(
                INSERT_ONE_ITEM,
                &INSERT_ONE_ITEM_TYPES,
                &[
                    task_id.into(),
                    keys.into_iter().next().into(),
                    his.into_iter().next().flatten().into(),
                    priorities.into_iter().next().into(),
                    group_keys.into_iter().next().flatten().into(),
                    payloads.into_iter().next().flatten().into(),
                    not_before.into(),
                ],
            )
        })?;
        Ok(i64::from(inserted == Some(true)))
    }
}

/// The upsert of items from `$rows` (a VALUES list or a SELECT of task_id, key, hi,
/// priority, group_key, payload, not_before): new keys become pending, a pending key gets
/// the new priority, range and (unless `$keep_group`, a boolean SQL expression: a task
/// with sequential groups keeps an item in its group) group key and payload.
macro_rules! upsert_items {
    ($rows:literal, $keep_group:literal) => {
        concat!(
            "INSERT INTO chunkwise.items AS i (task_id, key, hi, priority, group_key, payload, not_before) ",
            $rows,
            " ON CONFLICT (task_id, key) WHERE status = ",
            item_status!(pending),
            " DO UPDATE \
                 SET priority = EXCLUDED.priority, hi = EXCLUDED.hi, \
                     group_key = CASE WHEN ",
            $keep_group,
            " THEN i.group_key ELSE coalesce(EXCLUDED.group_key, i.group_key) END, \
                     payload = coalesce(EXCLUDED.payload, i.payload) \
             RETURNING (xmax = 0) AS inserted, i.task_id, i.group_key"
        )
    };
}

/// Adds a batch of items: new keys become pending in batch order, pending keys get the
/// new priority; a task with sequential groups has its groups' open counts follow. Run
/// by every plan, so its plan is kept (see `kept_plans`).
const INSERT_ITEMS: &str = concat!(
    "WITH added AS (",
    upsert_items!(
        "SELECT $1, u.key, u.hi, u.priority, u.group_key, u.payload, coalesce($7, now()) \
           FROM unnest($2::bigint[], $3::bigint[], $4::bigint[], $5::text[], $6::jsonb[]) \
                WITH ORDINALITY AS u(key, hi, priority, group_key, payload, ord) \
          ORDER BY u.ord",
        "$8"
    ),
    "), opened AS (",
    open_items_of_groups!("(SELECT task_id, group_key FROM added WHERE $8 AND inserted) new"),
    ") SELECT count(*) FILTER (WHERE inserted) FROM added"
);

/// Adds one item of a task without sequential groups (what an enqueue from a trigger
/// does once per row): the same upsert as `INSERT_ITEMS` without the arrays, the sort
/// and the groups' counts, whose executor set-up is most of a single item's cost.
const INSERT_ONE_ITEM: &str = upsert_items!(
    "VALUES ($1, $2, $3, $4, $5, $6, coalesce($7, now()))",
    "false"
);

/// The parameter types of `INSERT_ONE_ITEM`: task_id, key, hi, priority, group key,
/// payload, not_before.
const INSERT_ONE_ITEM_TYPES: [PgOid; 7] = [
    PgOid::BuiltIn(PgBuiltInOids::INT4OID),
    PgOid::BuiltIn(PgBuiltInOids::INT8OID),
    PgOid::BuiltIn(PgBuiltInOids::INT8OID),
    PgOid::BuiltIn(PgBuiltInOids::INT8OID),
    PgOid::BuiltIn(PgBuiltInOids::TEXTOID),
    PgOid::BuiltIn(PgBuiltInOids::JSONBOID),
    PgOid::BuiltIn(PgBuiltInOids::TIMESTAMPTZOID),
];

/// The parameter types of `INSERT_ITEMS`: task_id, keys, his, priorities, group keys,
/// payloads, not_before, sequential_groups.
const INSERT_ITEMS_TYPES: [PgOid; 8] = [
    PgOid::BuiltIn(PgBuiltInOids::INT4OID),
    PgOid::BuiltIn(PgBuiltInOids::INT8ARRAYOID),
    PgOid::BuiltIn(PgBuiltInOids::INT8ARRAYOID),
    PgOid::BuiltIn(PgBuiltInOids::INT8ARRAYOID),
    PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID),
    PgOid::BuiltIn(PgBuiltInOids::JSONBARRAYOID),
    PgOid::BuiltIn(PgBuiltInOids::TIMESTAMPTZOID),
    PgOid::BuiltIn(PgBuiltInOids::BOOLOID),
];

/// Locks the rows of the groups `group_keys` name (making the missing ones), in
/// group_key order, before any of their items is touched.
///
/// A worker locks a group's row, then its head item (the claim), then updates both
/// (mark done). Planning that locked items first and groups second (the upsert below)
/// could hold the head a worker waits for while waiting for that worker's group: a
/// deadlock, which either killed the plan() or the worker's claim. Taking the groups
/// first, in one order, makes planning wait for the item a worker runs in one of its
/// groups, and nothing else.
fn lock_groups(task_id: i32, group_keys: &[Option<String>]) -> SqlResult<()> {
    as_extension_owner(|| {
        Spi::run_with_args(
            "INSERT INTO chunkwise.groups (task_id, group_key, open) \
             SELECT DISTINCT $1, k, 0 FROM unnest($2::text[]) k ORDER BY 2 \
             ON CONFLICT (task_id, group_key) DO NOTHING",
            &[task_id.into(), group_keys.to_vec().into()],
        )?;
        Spi::run_with_args(
            "SELECT FROM chunkwise.groups WHERE task_id = $1 AND group_key = ANY ($2::text[]) \
              ORDER BY group_key FOR UPDATE",
            &[task_id.into(), group_keys.to_vec().into()],
        )
    })?;
    Ok(())
}

/// The task a planning call writes to, after the caller's right to do so is checked.
pub(crate) fn task_to_plan(task: Option<&str>) -> SqlResult<Task> {
    Task::for_caller(task, "plan into")
}

/// Adds one item (or updates the priority of the pending item with that key).
#[pg_extern(volatile, parallel_unsafe)]
fn enqueue(
    task: Option<&str>,
    key: Option<i64>,
    priority: default!(Option<i64>, 0),
    group_key: default!(Option<&str>, "NULL"),
    payload: default!(Option<JsonB>, "NULL"),
    not_before: default!(Option<TimestampWithTimeZone>, "now()"),
) -> i64 {
    let run = || -> SqlResult<i64> {
        let task = task_for_enqueue(task, "plan into")?;
        let key =
            key.ok_or_else(|| SqlError::null_argument("key", "Every item needs a bigint key."))?;
        let priority = priority.ok_or_else(|| {
            SqlError::null_argument("priority", "Leave priority out for 0; lower runs first.")
        })?;
        let not_before = not_before.ok_or_else(|| {
            SqlError::null_argument(
                "not_before",
                "Leave not_before out to make the item due now.",
            )
        })?;
        let mut batch = ItemBatch::default();
        batch.push(key, None, priority, group_key.map(str::to_string), payload);
        batch.insert(&task, Some(not_before))
    };
    run().or_raise()
}

/// Where the planning query's columns are, and how to read them.
struct PlanColumns {
    key: Column,
    hi: Option<Column>,
    priority: Option<Column>,
    group_key: Option<usize>,
    payload: Option<usize>,
    last_activity: Option<usize>,
    actions: Option<Column>,
}

/// An integer column of any width.
#[derive(Clone, Copy)]
struct Column {
    ordinal: usize,
    type_oid: pg_sys::Oid,
}

impl Column {
    fn get(&self, row: &SpiHeapTupleData) -> SqlResult<Option<i64>> {
        Ok(match self.type_oid {
            t if t == pg_sys::INT8OID => row.get::<i64>(self.ordinal)?,
            t if t == pg_sys::INT4OID => row.get::<i32>(self.ordinal)?.map(i64::from),
            _ => row.get::<i16>(self.ordinal)?.map(i64::from),
        })
    }
}

fn find_column(table: &SpiTupleTable, name: &str) -> Option<usize> {
    table.column_ordinal(name).ok()
}

fn wrong_type(column: &str, wanted: &str) -> SqlError {
    SqlError::new(
        PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
        format!("column \"{column}\" of the planning query must be of type {wanted}"),
    )
    .hint(format!(
        "Cast it in the query, e.g. SELECT ...::{wanted} AS {column}."
    ))
}

fn integer_column(table: &SpiTupleTable, name: &str) -> SqlResult<Option<Column>> {
    let Some(ordinal) = find_column(table, name) else {
        return Ok(None);
    };
    let type_oid = table.column_type_oid(ordinal)?.value();
    if [pg_sys::INT8OID, pg_sys::INT4OID, pg_sys::INT2OID].contains(&type_oid) {
        Ok(Some(Column { ordinal, type_oid }))
    } else {
        Err(wrong_type(name, "bigint"))
    }
}

fn typed_column(
    table: &SpiTupleTable,
    name: &str,
    type_oid: pg_sys::Oid,
    type_name: &str,
) -> SqlResult<Option<usize>> {
    let Some(ordinal) = find_column(table, name) else {
        return Ok(None);
    };
    if table.column_type_oid(ordinal)?.value() == type_oid {
        Ok(Some(ordinal))
    } else {
        Err(wrong_type(name, type_name))
    }
}

impl PlanColumns {
    fn resolve(table: &SpiTupleTable, by_activity: bool) -> SqlResult<PlanColumns> {
        let key = integer_column(table, "key")?.ok_or_else(|| {
            SqlError::new(
                PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                "the planning query returns no column \"key\"",
            )
            .hint("Name the item key column key, e.g. SELECT user_id AS key FROM ...")
        })?;
        let columns = PlanColumns {
            key,
            hi: integer_column(table, "hi")?,
            priority: integer_column(table, "priority")?,
            group_key: typed_column(table, "group_key", pg_sys::TEXTOID, "text")?,
            payload: typed_column(table, "payload", pg_sys::JSONBOID, "jsonb")?,
            last_activity: typed_column(
                table,
                "last_activity",
                pg_sys::TIMESTAMPTZOID,
                "timestamptz",
            )?,
            actions: integer_column(table, "actions")?,
        };
        if by_activity && (columns.last_activity.is_none() || columns.actions.is_none()) {
            return Err(SqlError::new(
                PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                "plan_by_activity needs columns key, last_activity and actions",
            )
            .hint("For example SELECT user_id AS key, max(ts) AS last_activity, count(*) AS actions FROM ..."));
        }
        Ok(columns)
    }
}

/// How many rows the next fetch of a planning query may bring: about
/// `PLAN_BATCH_BYTES` of item data at the average row size seen so far, between one
/// row and `PLAN_BATCH`, growing at most eightfold from one fetch to the next. The first
/// fetch is small, so that wide rows (big payloads) never arrive ten thousand at a time.
struct FetchSize {
    rows: i64,
    seen_rows: usize,
    seen_bytes: usize,
}

impl FetchSize {
    const FIRST: i64 = 4;

    fn new() -> FetchSize {
        FetchSize {
            rows: Self::FIRST,
            seen_rows: 0,
            seen_bytes: 0,
        }
    }

    fn record(&mut self, rows: usize, bytes: usize) {
        self.seen_rows += rows;
        self.seen_bytes += bytes;
        let average = (self.seen_bytes / self.seen_rows.max(1)).max(1);
        let fitting = (PLAN_BATCH_BYTES / average) as i64;
        self.rows = fitting.clamp(1, PLAN_BATCH.min(self.rows.saturating_mul(8)));
    }
}

/// Runs the caller's planning query through a cursor, handing each fetched batch of rows
/// to `on_rows` together with the resolved columns; `on_rows` returns the bytes of item
/// data the rows held, which sizes the next fetch. Each batch is freed before the next
/// is fetched, so memory stays bounded by one batch whatever the query returns.
fn for_each_batch(
    query: Option<&str>,
    by_activity: bool,
    mut on_rows: impl FnMut(&PlanColumns, SpiTupleTable) -> SqlResult<usize>,
) -> SqlResult<()> {
    let query = query
        .ok_or_else(|| SqlError::null_argument("query", "Pass a SELECT returning a key column."))?;
    ensure_single_statement(query, "planning query")?;
    Spi::connect(|client| {
        let mut cursor: SpiCursor = client.try_open_cursor(query, &[])?;
        let mut columns: Option<PlanColumns> = None;
        let mut size = FetchSize::new();
        loop {
            let wanted = size.rows;
            let table = cursor.fetch(wanted)?;
            if columns.is_none() {
                columns = Some(PlanColumns::resolve(&table, by_activity)?);
            }
            let fetched = table.len();
            let columns = columns.as_ref().expect("resolved above");
            // What reading and writing the batch pallocs (its rows' values, the arrays
            // sent to the queue) goes into a context of its own, deleted right after:
            // else it would pile up in the cursor's connection until planning ends.
            // pgrx converts a row's values in the *parent* of the current context, so
            // the batch runs in a child of that context.
            let mut batch_memory = PgMemoryContexts::new("pg_chunkwise planning batch");
            // SAFETY: both contexts are fresh children (of the current context, then of
            // the batch's), live across the call and are deleted after it; on_rows keeps
            // nothing palloc'd beyond the call (what it keeps lives on Rust's heap).
            let bytes = unsafe {
                batch_memory.switch_to(|_| {
                    PgMemoryContexts::new("pg_chunkwise planning rows")
                        .switch_to(|_| on_rows(columns, table))
                })
            }?;
            drop(batch_memory);
            // SAFETY: SPI_tuptable is the table just fetched (SPI restores it after the
            // nested SPI connections of on_rows), which on_rows consumed; pgrx does not
            // free tuple tables itself, so without this every batch would stay in memory
            // until the cursor's connection ends.
            unsafe { pg_sys::SPI_freetuptable(pg_sys::SPI_tuptable) };
            size.record(fetched, bytes);
            if fetched < wanted as usize {
                return Ok(());
            }
        }
    })
}

/// Bytes an item takes on its way into the queue, besides its payload and group key.
const ITEM_BYTES: usize = 64;

fn required_key(columns: &PlanColumns, row: &SpiHeapTupleData) -> SqlResult<i64> {
    columns.key.get(row)?.ok_or_else(|| {
        SqlError::new(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "the planning query returned a NULL key",
        )
        .hint("Filter out rows without a key: WHERE key IS NOT NULL.")
    })
}

/// Plans the rows of `query` (column `key`, optional `hi` for `[key, hi)` range items,
/// `priority`, `group_key`, `payload`).
/// Without `priority`, the query's row order is the processing order.
#[pg_extern(volatile, parallel_unsafe)]
fn plan(task: Option<&str>, query: Option<&str>) -> i64 {
    task_to_plan(task)
        .and_then(|task| plan_query(&task, query))
        .or_raise()
}

/// `plan()` for a task already checked: runs `query` as the current user.
pub(crate) fn plan_query(task: &Task, query: Option<&str>) -> SqlResult<i64> {
    let mut seen = HashSet::new();
    let mut position = 0i64;
    let mut added = 0i64;
    for_each_batch(query, false, |columns, table| {
        let mut batch = ItemBatch::default();
        for row in table {
            position += 1;
            let key = required_key(columns, &row)?;
            if !seen.insert(key) {
                continue;
            }
            let hi = match &columns.hi {
                Some(c) => c.get(&row)?,
                None => None,
            };
            let priority = match &columns.priority {
                Some(c) => c.get(&row)?.unwrap_or(0),
                None => position,
            };
            let group_key = match columns.group_key {
                Some(ord) => row.get::<String>(ord)?,
                None => None,
            };
            let payload = match columns.payload {
                Some(ord) => row.get::<JsonB>(ord)?,
                None => None,
            };
            batch.push(key, hi, priority, group_key, payload);
        }
        let bytes = batch.bytes();
        added += batch.insert(task, None)?;
        Ok(bytes)
    })?;
    Ok(added)
}

/// Plans the rows of `query` (`key`, `last_activity`, `actions`) in activity-recency order.
#[pg_extern(volatile, parallel_unsafe)]
fn plan_by_activity(task: Option<&str>, query: Option<&str>) -> i64 {
    task_to_plan(task)
        .and_then(|task| plan_query_by_activity(&task, query))
        .or_raise()
}

/// `plan_by_activity()` for a task already checked: runs `query` as the current user.
pub(crate) fn plan_query_by_activity(task: &Task, query: Option<&str>) -> SqlResult<i64> {
    let ranking = Ranking::from_settings()?;
    let mut seen = HashSet::new();
    let mut entities = Vec::new();
    for_each_batch(query, true, |columns, table| {
        let last_activity = columns.last_activity.expect("checked by resolve");
        let actions = columns.actions.expect("checked by resolve");
        let bytes = table.len() * ITEM_BYTES;
        for row in table {
            let key = required_key(columns, &row)?;
            if seen.insert(key) {
                entities.push(Activity {
                    key,
                    last_activity: row
                        .get::<TimestampWithTimeZone>(last_activity)?
                        .map(i64::from),
                    actions: actions.get(&row)?,
                });
            }
        }
        Ok(bytes)
    })?;
    let mut added = 0;
    for chunk in ranking
        .prioritise(transaction_now(), &mut entities)
        .chunks(PLAN_BATCH as usize)
    {
        let mut batch = ItemBatch::default();
        for &(key, priority) in chunk {
            batch.push(key, None, priority, None, None);
        }
        added += batch.insert(task, None)?;
    }
    Ok(added)
}

/// `now()` in PostgreSQL microseconds.
fn transaction_now() -> i64 {
    // SAFETY: reads the current transaction's start timestamp.
    unsafe { pg_sys::GetCurrentTransactionStartTimestamp() }
}

/// The combined activity-recency tier (1 = most urgent) the ranking gives an entity.
#[pg_extern(stable, parallel_safe)]
fn activity_tier(last_activity: Option<TimestampWithTimeZone>, actions: Option<i64>) -> i32 {
    let ranking = Ranking::from_settings().or_raise();
    ranking.tier(transaction_now(), last_activity.map(i64::from), actions)
}

/// Re-runs the task's source as its owner: its rights, never the caller's.
pub(crate) fn plan_source(task: &Task) -> SqlResult<Option<i64>> {
    let Some(source) = task.source.as_deref() else {
        return Ok(None);
    };
    as_task_owner(task.owner, || {
        if task.rank_by_activity {
            plan_query_by_activity(task, Some(source))
        } else {
            plan_query(task, Some(source))
        }
    })
    .map(Some)
}
