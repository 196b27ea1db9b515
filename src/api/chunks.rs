//! Chunked planning over one relation: `plan_ranges` cuts an integer column into
//! `[lo, hi)` key ranges of about `chunk_rows` rows each, `plan_blocks` cuts the heap into
//! ranges of blocks, and `block_tid` turns a block number into the tid where a TID range
//! scan of those blocks starts.
//!
//! Both read the relation as the caller: planning needs SELECT on it. Only the quoted
//! names of the relation and column are spliced into the planning SQL; numbers travel as
//! parameters.

use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use super::planning::{ItemBatch, PLAN_BATCH, task_to_plan};
use crate::catalog::Task;
use crate::columns::Columns;
use crate::error::{OrRaise, SqlError, SqlResult, excerpt};
use crate::oid_args::RegClass;
use crate::security::with_pinned_search_path;
use crate::target::Target;

/// Up to this many rows, range boundaries are cut from every key: exact chunk sizes for
/// the price of sorting the key column once.
const EXACT_ROWS: f64 = 1_000_000.0;
/// Above it, boundaries are cut from a sample holding this many rows per planned chunk
/// (the relative error of a chunk's size is about 1/sqrt of it: 7%), at most
/// `MAX_SAMPLE_ROWS` rows so that the one sort stays in memory-sized territory.
const SAMPLE_ROWS_PER_CHUNK: f64 = 200.0;
const MAX_SAMPLE_ROWS: f64 = 5_000_000.0;

/// A relation about to be chunked.
pub(super) struct Relation {
    pub(super) oid: pg_sys::Oid,
    /// Schema-qualified and quoted: safe to splice into SQL.
    pub(super) quoted: String,
    kind: char,
    reltuples: f64,
    relpages: f64,
    /// Heap blocks now (`pg_relation_size` / block size); 0 for relations without storage.
    blocks: i64,
}

impl Relation {
    pub(super) fn open(relation: Option<RegClass>) -> SqlResult<Relation> {
        let oid = relation
            .ok_or_else(|| {
                SqlError::null_argument("relation", "Pass the table to chunk, e.g. 'stage'.")
            })?
            .0;
        let found = Spi::connect(|client| -> SqlResult<Option<Relation>> {
            let table = client.select(
                "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS quoted, \
                        c.relkind::text AS kind, c.reltuples::float8 AS reltuples, \
                        c.relpages::float8 AS relpages, \
                        pg_catalog.pg_relation_size(c.oid) / current_setting('block_size')::bigint AS blocks \
                   FROM pg_catalog.pg_class c \
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                  WHERE c.oid = $1",
                Some(1),
                &[oid.into()],
            )?;
            let Some(row) = table.into_iter().next() else {
                return Ok(None);
            };
            Ok(Some(Relation {
                oid,
                quoted: row.required("quoted")?,
                kind: row
                    .required::<String>("kind")?
                    .chars()
                    .next()
                    .unwrap_or('?'),
                reltuples: row.required("reltuples")?,
                relpages: row.required("relpages")?,
                blocks: row.required("blocks")?,
            }))
        })?;
        found.ok_or_else(|| {
            SqlError::new(
                PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                format!("relation with OID {} does not exist", oid.to_u32()),
            )
            .hint("Pass the relation by name, e.g. 'myschema.stage'.")
        })
    }

    /// Only relations holding rows can be chunked; views and the like cannot.
    fn ensure_kind(&self, allowed: &[char], hint: &str) -> SqlResult<()> {
        if allowed.contains(&self.kind) {
            return Ok(());
        }
        Err(SqlError::new(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("{} is not a table that can be chunked", self.quoted),
        )
        .hint(hint.to_string()))
    }

    /// The number of rows, estimated as the planner does (statistics scaled to the
    /// relation's current size), or counted when the relation was never analyzed.
    fn estimated_rows(&self, client: &SpiClient<'_>) -> SqlResult<f64> {
        if self.reltuples > 0.0 && self.relpages > 0.0 && self.blocks > 0 {
            return Ok(self.reltuples / self.relpages * self.blocks as f64);
        }
        let counted = client
            .select(&format!("SELECT count(*) FROM {}", self.quoted), None, &[])?
            .first()
            .get_one::<i64>()?;
        Ok(counted.unwrap_or(0) as f64)
    }
}

/// The integer column a key-range plan cuts.
struct KeyColumn {
    quoted: String,
    not_null: bool,
}

impl KeyColumn {
    fn find(relation: &Relation, column: Option<&str>) -> SqlResult<KeyColumn> {
        let column = column.ok_or_else(|| {
            SqlError::null_argument("column", "Pass the integer key column to cut into ranges.")
        })?;
        let found = Spi::connect(|client| -> SqlResult<Option<(String, pg_sys::Oid, bool)>> {
            let table = client.select(
                "SELECT quote_ident(attname) AS quoted, atttypid, attnotnull FROM pg_catalog.pg_attribute \
                  WHERE attrelid = $1 AND attname = $2 AND attnum > 0 AND NOT attisdropped",
                Some(1),
                &[relation.oid.into(), column.into()],
            )?;
            match table.into_iter().next() {
                None => Ok(None),
                Some(row) => Ok(Some((
                    row.required("quoted")?,
                    row.required("atttypid")?,
                    row.required("attnotnull")?,
                ))),
            }
        })?;
        let Some((quoted, type_oid, not_null)) = found else {
            return Err(SqlError::new(
                PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                format!(
                    "column \"{}\" of relation {} does not exist",
                    excerpt(column),
                    relation.quoted
                ),
            )
            .hint("Name an integer column of the relation, usually its primary key."));
        };
        if ![pg_sys::INT8OID, pg_sys::INT4OID, pg_sys::INT2OID].contains(&type_oid) {
            return Err(SqlError::new(
                PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
                format!(
                    "column \"{column}\" of relation {} is not an integer column",
                    relation.quoted
                ),
            )
            .hint("plan_ranges cuts smallint, integer or bigint keys; for other tables use plan_blocks, which needs no key."));
        }
        Ok(KeyColumn { quoted, not_null })
    }
}

/// The task a chunked plan writes to: its target must take `[lo, hi)` ranges.
pub(super) fn range_task(task: Option<&str>, function: &str) -> SqlResult<Task> {
    let task = task_to_plan(task)?;
    if Target::of_task(&task)?.takes_ranges() {
        return Ok(task);
    }
    Err(SqlError::new(
        PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
        format!(
            "task \"{}\" takes single keys, but {function} plans [lo, hi) ranges",
            task.name
        ),
    )
    .hint("Create the task with a call taking (bigint, bigint), or a statement using $1 = lo and $2 = hi."))
}

fn positive(value: Option<i64>, name: &str) -> SqlResult<i64> {
    match value {
        None => Err(SqlError::null_argument(
            name,
            "Pass a chunk size greater than zero.",
        )),
        Some(v) if v <= 0 => Err(SqlError::invalid_parameter(format!(
            "{name} must be greater than zero, not {v}"
        ))
        .hint("Pass a chunk size greater than zero.")),
        Some(v) => Ok(v),
    }
}

/// Turns ordered cut points into consecutive `[lo, hi)` ranges, numbered from 1 in
/// ascending order (their priority order).
struct RangeCutter {
    lo: i64,
    ordinal: i64,
}

/// One range of a [`RangeCutter`].
#[derive(Debug, PartialEq, Eq)]
struct Range {
    lo: i64,
    hi: i64,
    ordinal: i64,
}

impl RangeCutter {
    fn starting_at(lo: i64) -> Self {
        RangeCutter { lo, ordinal: 0 }
    }

    /// Ends the current range at `cut`; `None` unless `cut` lies above the range's start,
    /// so repeated (or lower) cut points make no empty ranges.
    fn cut(&mut self, cut: i64) -> Option<Range> {
        if cut <= self.lo {
            return None;
        }
        self.ordinal += 1;
        let range = Range {
            lo: self.lo,
            hi: cut,
            ordinal: self.ordinal,
        };
        self.lo = cut;
        Some(range)
    }
}

/// Queues the ranges a [`RangeCutter`] makes, `PLAN_BATCH` at a time.
struct RangeQueue<'a> {
    task: &'a Task,
    cutter: RangeCutter,
    batch: ItemBatch,
    added: i64,
}

impl<'a> RangeQueue<'a> {
    fn starting_at(task: &'a Task, lo: i64) -> Self {
        RangeQueue {
            task,
            cutter: RangeCutter::starting_at(lo),
            batch: ItemBatch::default(),
            added: 0,
        }
    }

    /// Ends the current range at `cut` (see [`RangeCutter::cut`]).
    fn cut(&mut self, cut: i64) -> SqlResult<()> {
        let Some(range) = self.cutter.cut(cut) else {
            return Ok(());
        };
        self.batch
            .push(range.lo, Some(range.hi), range.ordinal, None, None);
        if range.ordinal % PLAN_BATCH == 0 {
            self.added += std::mem::take(&mut self.batch).insert(self.task, None)?;
        }
        Ok(())
    }

    fn finish(mut self, end: i64) -> SqlResult<i64> {
        self.cut(end)?;
        Ok(self.added + self.batch.insert(self.task, None)?)
    }
}

/// Plans `[lo, hi)` ranges of `column` holding about `chunk_rows` rows each.
///
/// Every non-NULL key falls in exactly one range: the first starts at the column's
/// minimum, each ends where the next starts, the last ends after the maximum. The cut
/// points are every `chunk_rows`-th key in key order — of all keys for tables up to
/// `EXACT_ROWS` rows, of a BERNOULLI sample above that. Sampling keeps a billion-row
/// table from being sorted (only the sample is), whether or not the column is indexed;
/// walking an index instead would read all of it, and heap pages too where the
/// visibility map is not set. BERNOULLI, not SYSTEM: SYSTEM reads fewer pages but samples
/// whole blocks, and on a table loaded in key order (the usual case) that samples keys in
/// clumps and makes chunk sizes swing widely. Reading every page once is what the chunked
/// statements will do anyway. Equal keys never straddle a cut, so a key held by more than
/// `chunk_rows` rows makes one bigger range.
#[pg_extern(volatile, parallel_unsafe)]
fn plan_ranges(
    task: Option<&str>,
    relation: Option<RegClass>,
    column: Option<&str>,
    chunk_rows: Option<i64>,
) -> i64 {
    let run = || -> SqlResult<i64> {
        let task = range_task(task, "plan_ranges")?;
        let chunk_rows = positive(chunk_rows, "chunk_rows")?;
        let relation = Relation::open(relation)?;
        relation.ensure_kind(
            &['r', 'p', 'm', 'f'],
            "plan_ranges reads tables, partitioned tables, materialized views and foreign tables.",
        )?;
        let column = KeyColumn::find(&relation, column)?;
        Spi::connect(|client| plan_key_ranges(client, &task, &relation, &column, chunk_rows))
    };
    with_pinned_search_path(run).or_raise()
}

fn plan_key_ranges(
    client: &SpiClient<'_>,
    task: &Task,
    relation: &Relation,
    column: &KeyColumn,
    chunk_rows: i64,
) -> SqlResult<i64> {
    let (rel, col) = (&relation.quoted, &column.quoted);
    if !column.not_null {
        warn_about_null_keys(client, rel, col)?;
    }
    let bounds = client
        .select(
            &format!("SELECT min({col})::bigint, max({col})::bigint FROM {rel}"),
            None,
            &[],
        )?
        .first()
        .get_two::<i64, i64>()?;
    let (Some(min), Some(max)) = bounds else {
        return Ok(0); // no keys, no ranges
    };
    let end = max.checked_add(1).ok_or_else(|| {
        SqlError::new(
            PgSqlErrorCode::ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
            format!("column {col} of {rel} holds the largest bigint, which no [lo, hi) range can include"),
        )
        .hint("Plan the rows below it with plan(), or use plan_blocks.")
    })?;

    let rows = relation.estimated_rows(client)?;
    let chunks = (rows / chunk_rows as f64).ceil();
    let sample_rows = (chunks * SAMPLE_ROWS_PER_CHUNK).clamp(EXACT_ROWS, MAX_SAMPLE_ROWS);
    let (sample, step) = if rows <= sample_rows {
        (String::new(), chunk_rows)
    } else {
        let percent = sample_rows / rows * 100.0;
        let step = ((chunk_rows as f64) * percent / 100.0).round().max(1.0) as i64;
        (
            format!("TABLESAMPLE BERNOULLI ({percent}) REPEATABLE (0)"),
            step,
        )
    };
    let cuts = format!(
        "SELECT k FROM (SELECT {col}::bigint AS k, row_number() OVER (ORDER BY {col}) AS rn \
                          FROM {rel} {sample} WHERE {col} IS NOT NULL) s \
          WHERE rn > 1 AND (rn - 1) % $1 = 0 ORDER BY rn"
    );
    let mut ranges = RangeQueue::starting_at(task, min);
    let mut cursor = client.try_open_cursor(&cuts, &[step.into()])?;
    loop {
        let table = cursor.fetch(PLAN_BATCH)?;
        let fetched = table.len();
        for row in table {
            if let Some(cut) = row.get::<i64>(1)? {
                ranges.cut(cut)?;
            }
        }
        if fetched < PLAN_BATCH as usize {
            break;
        }
    }
    ranges.finish(end)
}

/// Rows whose key is NULL fall in no range: say so rather than skip them silently.
fn warn_about_null_keys(client: &SpiClient<'_>, rel: &str, col: &str) -> SqlResult<()> {
    let has_nulls = client
        .select(
            &format!("SELECT EXISTS (SELECT FROM {rel} WHERE {col} IS NULL)"),
            None,
            &[],
        )?
        .first()
        .get_one::<bool>()?;
    if has_nulls == Some(true) {
        warning!("rows of {rel} whose {col} is NULL fall in no range and will not be processed");
    }
    Ok(())
}

/// Plans ranges of `chunk_blocks` heap blocks, `[first block, end block)`, covering the
/// relation as it is now. The statement reads them with
/// `WHERE ctid >= chunkwise.block_tid($1) AND ctid < chunkwise.block_tid($2)`, a TID
/// range scan. Rows a statement moves into later blocks (an UPDATE of the chunked table
/// itself) can be seen again by a later chunk: chunk by blocks to read a table, by key
/// ranges to update it.
#[pg_extern(volatile, parallel_unsafe)]
fn plan_blocks(task: Option<&str>, relation: Option<RegClass>, chunk_blocks: Option<i32>) -> i64 {
    let run = || -> SqlResult<i64> {
        let task = range_task(task, "plan_blocks")?;
        let chunk_blocks = positive(chunk_blocks.map(i64::from), "chunk_blocks")?;
        let relation = Relation::open(relation)?;
        relation.ensure_kind(
            &['r', 'm'],
            "plan_blocks reads the blocks of a table or materialized view; plan each partition of a partitioned table.",
        )?;
        let mut ranges = RangeQueue::starting_at(&task, 0);
        for cut in (chunk_blocks..relation.blocks).step_by(chunk_blocks as usize) {
            ranges.cut(cut)?;
        }
        ranges.finish(relation.blocks)
    };
    with_pinned_search_path(run).or_raise()
}

/// The first tid of heap block `block`: `(block, 0)`. Immutable, so the planner folds it
/// and a `ctid >= block_tid($1) AND ctid < block_tid($2)` qual becomes a TID range scan.
#[pg_extern(immutable, strict, parallel_safe)]
fn block_tid(block: i64) -> pg_sys::ItemPointerData {
    let Ok(block) = u32::try_from(block) else {
        SqlError::new(
            PgSqlErrorCode::ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
            format!("block number {block} is out of range"),
        )
        .hint("Block numbers run from 0 to 4294967295.")
        .raise()
    };
    let mut tid = pg_sys::ItemPointerData::default();
    pgrx::itemptr::item_pointer_set_all(&mut tid, block, 0);
    tid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_points_make_consecutive_ranges_without_empty_ones() {
        let mut cutter = RangeCutter::starting_at(-5);
        let ranges: Vec<Range> = [0, 0, 10, 7, 10, 25]
            .into_iter()
            .filter_map(|cut| cutter.cut(cut))
            .collect();
        assert_eq!(
            ranges,
            [
                Range {
                    lo: -5,
                    hi: 0,
                    ordinal: 1
                },
                Range {
                    lo: 0,
                    hi: 10,
                    ordinal: 2
                },
                Range {
                    lo: 10,
                    hi: 25,
                    ordinal: 3
                },
            ]
        );
        assert_eq!(cutter.cut(25), None, "the end at the last cut adds nothing");
        assert_eq!(
            cutter.cut(26),
            Some(Range {
                lo: 25,
                hi: 26,
                ordinal: 4
            })
        );
    }
}
