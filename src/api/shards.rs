//! `plan_shards`: one item per shard of a Citus hash- or range-distributed table, so that
//! the coordinator's workers drive the shards in parallel on the worker nodes.
//!
//! An item's `[lo, hi)` is its shard's interval (Citus stores it inclusive; `hi` is its
//! maximum plus one): of the distribution column's hash for a hash-distributed table, of
//! the column itself (an integer column) for a range-distributed one. Its payload says
//! which shard it is and how to reach it:
//! `{"shard_id": 102008, "shard": "stage_102008", "node": "10.0.0.7:5432", "route": 17}`.
//!
//! A range-distributed table needs nothing more: `WHERE col >= $1 AND col < $2` is
//! routed to the one shard. Why the route of a hash-distributed table: Citus sends a
//! statement to a single hash shard only when it filters the distribution column by
//! equality. A statement over a whole hash interval
//! (`WHERE worker_hash(id) >= $1 AND ...`) is planned against every shard, and Citus
//! refuses `worker_hash()` in an UPDATE or DELETE outright because it is volatile. The
//! documented way to run a piece of work where one shard lives is a function distributed
//! with `create_distributed_function(..., distribution_arg_name, colocate_with,
//! force_delegation => true)`: Citus delegates each call to the node holding the shard of
//! its distribution argument, inside the caller's transaction. `route` is a value of the
//! distribution column that falls in the item's shard; the delegated function works on
//! the shard tables (`shard_name(...)`) of that node.
//!
//! pg_chunkwise does not link against Citus: everything Citus-specific is looked up by
//! name through SPI, and without Citus `plan_shards` says so.

use std::collections::HashMap;

use pgrx::JsonB;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use serde_json::{Value, json};

use super::chunks::{Relation, range_task};
use super::planning::ItemBatch;
use crate::columns::Columns;
use crate::error::{OrRaise, SqlError, SqlResult};
use crate::oid_args::RegClass;
use crate::security::with_pinned_search_path;

/// Routing values are searched among the first `n` integers (cast to the distribution
/// column's type), `n` doubling from this many per shard until every shard has one.
const ROUTE_CANDIDATES_PER_SHARD: i64 = 64;
const MAX_ROUTE_CANDIDATES: i64 = 1 << 24;

const NOT_DISTRIBUTED_HINT: &str = "plan_shards plans the shards of a Citus hash- or range-distributed table; for a local table use plan_ranges or plan_blocks.";

/// How a table's rows are spread over its shards.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Distribution {
    /// By the hash of the distribution column: shard intervals are of int4 hash values.
    Hash,
    /// By ranges of an integer distribution column.
    Range,
}

/// A hash- or range-distributed table as Citus's metadata describes it.
struct DistributedTable<'a> {
    relation: &'a Relation,
    distribution: Distribution,
    /// The distribution column's type, as `format_type` spells it (safe to splice).
    column_type: String,
    /// Whether integers cast to that type through text (numbers and strings do), which
    /// is how routing values are found.
    routable: bool,
}

/// One shard, in hash order.
struct Shard {
    id: i64,
    lo: i64,
    hi: i64,
    name: String,
    node: Option<String>,
}

impl<'a> DistributedTable<'a> {
    fn find(relation: &'a Relation) -> SqlResult<Self> {
        let not_distributed = |detail: &str| {
            SqlError::new(
                PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
                format!(
                    "{} is not a hash- or range-distributed table",
                    relation.quoted
                ),
            )
            .detail(detail.to_string())
            .hint(NOT_DISTRIBUTED_HINT)
        };
        let citus =
            Spi::get_one::<bool>("SELECT to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL")?
                .unwrap_or(false);
        if !citus {
            return Err(not_distributed("Citus is not installed in this database."));
        }
        let found = Spi::connect(
            |client| -> SqlResult<Option<(String, String, String, String)>> {
                let table = client.select(
                "SELECT p.partmethod::text AS method, p.repmodel::text AS replication, \
                        coalesce(format_type(a.atttypid, NULL), '') AS column_type, \
                        coalesce(t.typcategory::text, '') AS category \
                   FROM pg_catalog.pg_dist_partition p \
                   LEFT JOIN pg_catalog.pg_attribute a \
                          ON a.attrelid = p.logicalrelid \
                         AND a.attname = pg_catalog.column_to_column_name(p.logicalrelid, p.partkey) \
                   LEFT JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
                  WHERE p.logicalrelid = $1",
                Some(1),
                &[relation.oid.into()],
            )?;
                match table.into_iter().next() {
                    None => Ok(None),
                    Some(row) => Ok(Some((
                        row.required("method")?,
                        row.required("replication")?,
                        row.required("column_type")?,
                        row.required("category")?,
                    ))),
                }
            },
        )?;
        let Some((method, replication, column_type, category)) = found else {
            return Err(not_distributed(
                "It is a local table: Citus has no shards of it.",
            ));
        };
        match method.as_str() {
            "h" => Ok(DistributedTable {
                relation,
                distribution: Distribution::Hash,
                column_type,
                routable: category == "N" || category == "S",
            }),
            "r" if ["smallint", "integer", "bigint"].contains(&column_type.as_str()) => {
                Ok(DistributedTable {
                    relation,
                    distribution: Distribution::Range,
                    column_type,
                    routable: true,
                })
            }
            "n" if replication == "t" => Err(not_distributed(
                "It is a reference table: one shard, copied to every node.",
            )),
            "n" => Err(not_distributed(
                "It is a Citus local table: its one shard lives on the coordinator.",
            )),
            "r" => Err(SqlError::new(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!(
                    "{} is range-distributed by a {column_type} column; plan_shards plans range shards of integer columns",
                    relation.quoted
                ),
            )
            .hint("Redistribute it by hash with alter_distributed_table, or plan its keys with plan().")),
            _ => Err(SqlError::new(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!(
                    "{} is append-distributed; plan_shards plans hash- and range-distributed tables",
                    relation.quoted
                ),
            )
            .hint("Redistribute it by hash with alter_distributed_table.")),
        }
    }

    fn shards(&self, client: &SpiClient<'_>) -> SqlResult<Vec<Shard>> {
        let table = client.select(
            "SELECT s.shardid, s.shardminvalue::bigint AS lo, s.shardmaxvalue::bigint + 1 AS hi, \
                    pg_catalog.shard_name(s.logicalrelid, s.shardid) AS name, \
                    (SELECT n.nodename || ':' || n.nodeport \
                       FROM pg_catalog.pg_dist_placement p \
                       JOIN pg_catalog.pg_dist_node n ON n.groupid = p.groupid \
                      WHERE p.shardid = s.shardid AND n.noderole = 'primary' \
                      ORDER BY n.nodeid LIMIT 1) AS node \
               FROM pg_catalog.pg_dist_shard s \
              WHERE s.logicalrelid = $1 \
                AND s.shardminvalue IS NOT NULL AND s.shardmaxvalue IS NOT NULL \
              ORDER BY 2",
            None,
            &[self.relation.oid.into()],
        )?;
        let mut shards = Vec::with_capacity(table.len());
        for row in table {
            shards.push(Shard {
                id: row.required("shardid")?,
                lo: row.required("lo")?,
                hi: row.required("hi")?,
                name: row.required("name")?,
                node: row.optional("node")?,
            });
        }
        Ok(shards)
    }

    /// A value of the distribution column in each shard. For a range shard, its first
    /// value. For a hash shard, the smallest integer (cast to the column's type) that Citus
    /// places there: Citus itself decides, so the route is right whatever hash function
    /// the type uses.
    fn routes(&self, client: &SpiClient<'_>, shards: &[Shard]) -> SqlResult<HashMap<i64, Value>> {
        if self.distribution == Distribution::Range {
            return Ok(shards.iter().map(|s| (s.id, Value::from(s.lo))).collect());
        }
        let mut routes = HashMap::new();
        if !self.routable || shards.is_empty() {
            return Ok(routes);
        }
        let shards = shards.len();
        let value = format!("g::text::{}", self.column_type);
        let sql = format!(
            "SELECT DISTINCT ON (sid) sid, to_jsonb(v) FROM ( \
               SELECT g, {value} AS v, \
                      pg_catalog.get_shard_id_for_distribution_column($1, {value}) AS sid \
                 FROM generate_series(0, $2 - 1) g) c \
              ORDER BY sid, g"
        );
        let mut candidates = ROUTE_CANDIDATES_PER_SHARD * shards as i64;
        loop {
            let table =
                client.select(&sql, None, &[self.relation.oid.into(), candidates.into()])?;
            for row in table {
                if let (Some(sid), Some(route)) = (row.get::<i64>(1)?, row.get::<JsonB>(2)?) {
                    routes.insert(sid, route.0);
                }
            }
            if routes.len() >= shards || candidates >= MAX_ROUTE_CANDIDATES {
                return Ok(routes);
            }
            candidates *= 2;
        }
    }
}

/// Plans one `[lo, hi)` item per shard of a hash- or range-distributed Citus table, in
/// interval order (shards whose range is not set yet are left out). The payload names
/// the shard, the node it was on when planned, and `route`: a value of the distribution
/// column that Citus places in that shard, for delegating a distributed function to its
/// node (NULL for hash distribution columns of types that integers do not cast to, such
/// as uuid).
#[pg_extern(volatile, parallel_unsafe)]
fn plan_shards(task: Option<&str>, relation: Option<RegClass>) -> i64 {
    let run = || -> SqlResult<i64> {
        let task = range_task(task, "plan_shards")?;
        let relation = Relation::open(relation)?;
        let table = DistributedTable::find(&relation)?;
        let (shards, routes) = Spi::connect(|client| -> SqlResult<_> {
            let shards = table.shards(client)?;
            let routes = table.routes(client, &shards)?;
            Ok((shards, routes))
        })?;
        let mut batch = ItemBatch::default();
        for (ordinal, shard) in shards.iter().enumerate() {
            let payload = json!({
                "shard_id": shard.id,
                "shard": shard.name,
                "node": shard.node,
                "route": routes.get(&shard.id).cloned().unwrap_or(Value::Null),
            });
            batch.push(
                shard.lo,
                Some(shard.hi),
                ordinal as i64,
                None,
                Some(JsonB(payload)),
            );
        }
        batch.insert(&task, None)
    };
    with_pinned_search_path(run).or_raise()
}
