//! plan_shards over a hash-distributed table: coverage, routing, a distributed upsert
//! driven shard by shard, and the refusals.

use postgres::Client;

use crate::cluster::{citus_or_skip, run_counts};
use crate::harness::{one, sql_error, two};

const SHARDS: i64 = 8;

/// A target and a colocated stage that half updates and half extends it, each with the
/// same copy `target_ref` for the one-statement reference.
fn upsert_tables(db: &mut Client) {
    db.batch_execute(&format!(
        "CREATE TABLE target (id bigint PRIMARY KEY, v int NOT NULL, touched int NOT NULL DEFAULT 0);
         CREATE TABLE target_ref (LIKE target INCLUDING ALL);
         CREATE TABLE stage (id bigint PRIMARY KEY, v int NOT NULL);
         SELECT create_distributed_table('target', 'id', shard_count => {SHARDS});
         SELECT create_distributed_table('target_ref', 'id', colocate_with => 'target');
         SELECT create_distributed_table('stage', 'id', colocate_with => 'target');
         INSERT INTO target (id, v) SELECT g, 0 FROM generate_series(1, 20000) g;
         INSERT INTO target_ref SELECT * FROM target;
         INSERT INTO stage SELECT g, g % 97 + 1 FROM generate_series(10001, 30000) g;"
    ))
    .unwrap();
}

/// The per-shard upsert as Citus runs work where one shard lives: a function distributed
/// by a value of the distribution column, delegated to that value's node inside the
/// caller's transaction, working on the shard tables there. (On the coordinator the
/// shard tables do not exist, so a call that was not delegated fails.)
fn upsert_shard_function(db: &mut Client) {
    db.batch_execute(
        "CREATE FUNCTION upsert_shard(route bigint, lo bigint, hi bigint) RETURNS bigint
         LANGUAGE plpgsql AS $$
         DECLARE n bigint;
         BEGIN
           EXECUTE format(
             'INSERT INTO %s AS t SELECT id, v FROM %s WHERE worker_hash(id) >= $1 AND worker_hash(id) < $2
              ON CONFLICT (id) DO UPDATE SET v = excluded.v, touched = t.touched + 1',
             shard_name('target', get_shard_id_for_distribution_column('target', route)),
             shard_name('stage', get_shard_id_for_distribution_column('stage', route)))
           USING lo, hi;
           GET DIAGNOSTICS n = ROW_COUNT;
           RETURN n;
         END $$;
         SELECT create_distributed_function('upsert_shard(bigint,bigint,bigint)', 'route',
                                            colocate_with => 'target', force_delegation => true);
         SELECT chunkwise.create_task('upsert',
                  statement => $$SELECT upsert_shard(($3->>'route')::bigint, $1, $2)$$, workers => 2);",
    )
    .unwrap();
}

#[test]
fn plan_shards_covers_every_row_exactly_once_and_routes_each_item_to_its_shard() {
    let citus = citus_or_skip!();
    let mut db = citus.db("citus_plan_shards");
    upsert_tables(&mut db);
    upsert_shard_function(&mut db);

    let planned: i64 = one(&mut db, "SELECT chunkwise.plan_shards('upsert', 'target')");
    assert_eq!(planned, SHARDS);

    // The items tile the whole int4 hash space, in order, without gaps or overlaps.
    let (first, last, gaps): (i64, i64, i64) = {
        let row = db
            .query_one(
                "SELECT min(key), max(hi), count(*) FILTER (WHERE next_key IS NOT NULL AND next_key <> hi)
                   FROM (SELECT key, hi, lead(key) OVER (ORDER BY key) AS next_key FROM chunkwise.items) i",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!((first, last, gaps), (-(1_i64 << 31), 1_i64 << 31, 0));

    // Every row lies in exactly one item, and that item names the row's shard.
    let (rows, once_in_own_shard): (i64, i64) = two(&mut db, "WITH h AS MATERIALIZED (SELECT id, worker_hash(id) AS h FROM target),
                      m AS (SELECT h.id, count(i.item_id) AS n,
                                   bool_and((i.payload->>'shard_id')::bigint
                                            = get_shard_id_for_distribution_column('target', h.id)) AS own
                              FROM h LEFT JOIN chunkwise.items i ON h.h >= i.key AND h.h < i.hi
                             GROUP BY h.id)
                 SELECT count(*), count(*) FILTER (WHERE n = 1 AND own) FROM m");
    assert_eq!((rows, once_in_own_shard), (20_000, 20_000));

    // Each route is a value Citus places in the item's shard, and the node is the shard's.
    let misrouted: i64 = one(
        &mut db,
        "SELECT count(*) FROM chunkwise.items i
           JOIN pg_dist_shard s ON s.shardid = (i.payload->>'shard_id')::bigint
           JOIN pg_dist_placement p USING (shardid) JOIN pg_dist_node n USING (groupid)
          WHERE get_shard_id_for_distribution_column('target', (i.payload->>'route')::bigint) <> s.shardid
             OR i.payload->>'node' <> n.nodename || ':' || n.nodeport
             OR i.payload->>'shard' <> shard_name('target', s.shardid)",
    );
    assert_eq!(misrouted, 0);

    // Text distribution columns get string routes.
    db.batch_execute(
        "CREATE TABLE names (name text PRIMARY KEY);
         SELECT create_distributed_table('names', 'name', shard_count => 4);
         SELECT chunkwise.create_task('names', statement => 'SELECT $1, $2');",
    )
    .unwrap();
    let text_routes: i64 = one(&mut db, "SELECT chunkwise.plan_shards('names', 'names')");
    assert_eq!(text_routes, 4);
    let misrouted_text: i64 = one(
        &mut db,
        "SELECT count(*) FROM chunkwise.items i JOIN chunkwise.tasks t USING (task_id)
          WHERE t.task = 'names'
            AND (jsonb_typeof(i.payload->'route') <> 'string'
                 OR get_shard_id_for_distribution_column('names', i.payload->>'route')
                    <> (i.payload->>'shard_id')::bigint)",
    );
    assert_eq!(misrouted_text, 0);
}

#[test]
fn a_distributed_upsert_shard_by_shard_equals_one_distributed_statement() {
    let citus = citus_or_skip!();
    let mut db = citus.db("citus_upsert");
    upsert_tables(&mut db);
    upsert_shard_function(&mut db);
    db.batch_execute(
        "INSERT INTO target_ref AS t SELECT id, v FROM stage
             ON CONFLICT (id) DO UPDATE SET v = excluded.v, touched = t.touched + 1",
    )
    .unwrap();

    let planned: i64 = one(&mut db, "SELECT chunkwise.plan_shards('upsert', 'target')");
    assert_eq!(planned, SHARDS);
    assert_eq!(run_counts(&mut db, "upsert"), (SHARDS, 0, 0));

    // Same rows, and every stage row applied once (touched counts applications).
    let differences: i64 = one(
        &mut db,
        "SELECT (SELECT count(*) FROM (SELECT * FROM target EXCEPT SELECT * FROM target_ref) a)
              + (SELECT count(*) FROM (SELECT * FROM target_ref EXCEPT SELECT * FROM target) b)",
    );
    assert_eq!(differences, 0);
    let (rows, touched_once): (i64, i64) = two(
        &mut db,
        "SELECT count(*), count(*) FILTER (WHERE touched = 1) FROM target",
    );
    assert_eq!((rows, touched_once), (30_000, 10_000));

    // The work ran on both worker nodes, in their shard tables.
    citus.assert_every_node_wrote("citus_upsert", "target", "n_tup_ins + n_tup_upd");

    // The views tell the same story as on one server.
    let (state, processed): (String, i64) =
        two(&mut db, "SELECT state, processed FROM chunkwise.runs");
    assert_eq!((state.as_str(), processed), ("finished", SHARDS));
}

/// A range-distributed table: items are the shards' key ranges, and a plain key-range
/// statement is routed by Citus to the one shard.
#[test]
fn plan_shards_plans_the_key_ranges_of_a_range_distributed_table() {
    let citus = citus_or_skip!();
    let mut db = citus.db("citus_range_shards");
    db.batch_execute(
        "CREATE TABLE ranged (id bigint NOT NULL, v int NOT NULL);
         SELECT create_distributed_table('ranged', 'id', 'range');",
    )
    .unwrap();
    // Range shards are made empty and given their ranges by hand (Citus's way).
    for (lo, hi) in [("1", "1000"), ("1001", "2000"), ("2001", "3000")] {
        let shard: i64 = one(&mut db, "SELECT master_create_empty_shard('ranged')");
        db.execute(
            "UPDATE pg_dist_shard SET shardminvalue = $2, shardmaxvalue = $3 WHERE shardid = $1",
            &[&shard, &lo, &hi],
        )
        .unwrap();
    }
    db.batch_execute(
        "INSERT INTO ranged SELECT g, 0 FROM generate_series(1, 3000) g;
         SELECT chunkwise.create_task('bump', statement => 'UPDATE ranged SET v = v + 1 WHERE id >= $1 AND id < $2');",
    )
    .unwrap();

    let planned: i64 = one(&mut db, "SELECT chunkwise.plan_shards('bump', 'ranged')");
    assert_eq!(planned, 3);
    let ranges: Vec<(i64, i64, i64)> = db
        .query(
            "SELECT key, hi, (payload->>'route')::bigint FROM chunkwise.items ORDER BY key",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        ranges,
        vec![(1, 1001, 1), (1001, 2001, 1001), (2001, 3001, 2001)]
    );
    // Each item's statement is routed to its one shard.
    let plan: Vec<String> = db
        .query(
            "EXPLAIN UPDATE ranged SET v = v + 1 WHERE id >= 1001 AND id < 2001",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter().any(|line| line.trim() == "Task Count: 1"),
        "{plan:?}"
    );

    assert_eq!(run_counts(&mut db, "bump"), (3, 0, 0));
    let (rows, once): (i64, i64) = two(
        &mut db,
        "SELECT count(*), count(*) FILTER (WHERE v = 1) FROM ranged",
    );
    assert_eq!((rows, once), (3000, 3000));
}

#[test]
fn plan_shards_refuses_tables_without_shards_to_plan_and_changes_nothing() {
    let citus = citus_or_skip!();
    let mut db = citus.db("citus_refusals");
    db.batch_execute(
        "CREATE TABLE local_t (id bigint PRIMARY KEY);
         CREATE TABLE ref_t (id bigint PRIMARY KEY);
         SELECT create_reference_table('ref_t');
         CREATE TABLE append_t (id bigint);
         SELECT create_distributed_table('append_t', 'id', 'append');
         CREATE TABLE dist_t (id bigint PRIMARY KEY);
         SELECT create_distributed_table('dist_t', 'id', shard_count => 4);
         SELECT chunkwise.create_task('ranges', statement => 'SELECT $1, $2');
         SELECT chunkwise.plan_shards('ranges', 'dist_t');",
    )
    .unwrap();
    // Citus wants a function created in a transaction of its own after distributing.
    db.batch_execute(
        "CREATE PROCEDURE one_key(k bigint) LANGUAGE sql AS 'SELECT k';
         SELECT chunkwise.create_task('keys', call => 'one_key');",
    )
    .unwrap();
    let before: String = one(
        &mut db,
        "SELECT string_agg(i::text, '|' ORDER BY item_id) FROM chunkwise.items i",
    );

    let cases: [(&str, &str, &str); 6] = [
        (
            "SELECT chunkwise.plan_shards('ranges', 'local_t')",
            "42809",
            "It is a local table",
        ),
        (
            "SELECT chunkwise.plan_shards('ranges', 'append_t')",
            "0A000",
            "",
        ),
        (
            "SELECT chunkwise.plan_shards('ranges', 'ref_t')",
            "42809",
            "It is a reference table",
        ),
        (
            "SELECT chunkwise.plan_shards('keys', 'dist_t')",
            "42809",
            "",
        ),
        (
            "SELECT chunkwise.plan_shards('nope', 'dist_t')",
            "42704",
            "",
        ),
        ("SELECT chunkwise.plan_shards('ranges', NULL)", "22004", ""),
    ];
    for (sql, code, detail) in cases {
        let err = db.query(sql, &[]).expect_err(sql);
        let server = err.as_db_error().unwrap_or_else(|| panic!("{sql}: {err}"));
        assert_eq!(server.code().code(), code, "{sql}: {}", server.message());
        assert!(server.hint().is_some(), "{sql}: no hint");
        assert!(
            server.detail().unwrap_or_default().starts_with(detail),
            "{sql}: detail {:?}",
            server.detail()
        );
    }
    let (code, _, hint) =
        sql_error(db.query("SELECT chunkwise.plan_shards('ranges', 'local_t')", &[]));
    assert_eq!(code, "42809");
    assert!(hint.contains("plan_ranges"), "{hint}");

    let after: String = one(
        &mut db,
        "SELECT string_agg(i::text, '|' ORDER BY item_id) FROM chunkwise.items i",
    );
    assert_eq!(before, after);
}
