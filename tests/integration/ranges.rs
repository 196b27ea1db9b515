//! Chunked set-based work: key ranges and block ranges cover every row exactly once, a
//! chunked upsert leaves the target as one statement would (also when its run is killed
//! or the server restarts halfway), grouped commits and asynchronous commit.

use std::time::Duration;

use postgres::Client;

use crate::fixtures::{done_order, recorder_task};
use crate::harness::{Cluster, one, test_db, wait_for};

/// A task whose statement takes `[lo, hi)` and does nothing: for planning tests.
fn noop_range_task(db: &mut Client, task: &str) {
    db.execute(
        "SELECT chunkwise.create_task($1, statement => 'SELECT $1, $2')",
        &[&task],
    )
    .unwrap();
}

/// The task's ranges in key order, with how many rows of `table` each holds.
fn ranges_with_rows(db: &mut Client, task: &str, table: &str) -> Vec<(i64, i64, i64)> {
    db.query(
        &format!(
            "SELECT i.key, i.hi, (SELECT count(*) FROM {table} t WHERE t.k >= i.key AND t.k < i.hi) \
               FROM chunkwise.items i JOIN chunkwise.tasks USING (task_id) \
              WHERE task = $1 ORDER BY i.key"
        ),
        &[&task],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// Plans `table.k` in chunks of `chunk_rows` and checks that every non-NULL row falls in
/// exactly one range: the ranges are non-empty and do not overlap, and the rows they
/// hold add up to the table's rows. Returns the rows per range, in key order.
fn plan_and_check_coverage(db: &mut Client, table: &str, chunk_rows: i64) -> Vec<i64> {
    let task = format!("cover_{table}");
    noop_range_task(db, &task);
    let planned: i64 = db
        .query_one(
            "SELECT chunkwise.plan_ranges($1, $2::text::regclass, 'k', $3)",
            &[&task, &table, &chunk_rows],
        )
        .unwrap()
        .get(0);
    let ranges = ranges_with_rows(db, &task, table);
    assert_eq!(
        planned as usize,
        ranges.len(),
        "{table}: items returned vs queued"
    );
    for pair in ranges.windows(2) {
        assert!(
            pair[0].0 < pair[0].1 && pair[0].1 <= pair[1].0,
            "{table}: ranges {pair:?} overlap or are empty"
        );
    }
    let rows: i64 = db
        .query_one(&format!("SELECT count(k) FROM {table}"), &[])
        .unwrap()
        .get(0);
    let covered: i64 = ranges.iter().map(|r| r.2).sum();
    assert_eq!(
        covered, rows,
        "{table}: rows in ranges vs rows in the table"
    );
    ranges.iter().map(|r| r.2).collect()
}

#[test]
fn key_ranges_cover_every_row_once_for_dense_sparse_negative_skewed_and_empty_keys() {
    let mut db = test_db("plan_ranges_coverage");
    db.batch_execute(
        "CREATE TABLE dense (k bigint PRIMARY KEY);
         INSERT INTO dense SELECT generate_series(1, 10000);
         CREATE TABLE sparse (k bigint);
         INSERT INTO sparse SELECT g::bigint * g * 7919 FROM generate_series(1, 5000) g;
         CREATE TABLE negative (k integer);
         INSERT INTO negative SELECT generate_series(-7000, 2999);
         CREATE TABLE skewed (k smallint);
         INSERT INTO skewed SELECT generate_series(1, 3000);
         INSERT INTO skewed SELECT 7 FROM generate_series(1, 4000);
         CREATE TABLE with_nulls (k bigint);
         INSERT INTO with_nulls SELECT CASE WHEN g % 10 = 0 THEN NULL ELSE g END FROM generate_series(1, 2000) g;
         CREATE TABLE empty (k bigint);",
    )
    .unwrap();

    // Distinct keys: every range but the last holds exactly chunk_rows rows.
    assert_eq!(
        plan_and_check_coverage(&mut db, "dense", 1000),
        vec![1000; 10]
    );
    let sparse = plan_and_check_coverage(&mut db, "sparse", 300);
    assert_eq!(sparse.len(), 17);
    assert!(sparse[..16].iter().all(|&n| n == 300) && sparse[16] == 200);
    let negative = plan_and_check_coverage(&mut db, "negative", 999);
    assert_eq!(negative.len(), 11);
    assert!(negative[..10].iter().all(|&n| n == 999) && negative[10] == 10);

    // A key held by 4,000 rows cannot be split: its range is the big one, the others stay
    // within chunk_rows.
    let skewed = plan_and_check_coverage(&mut db, "skewed", 500);
    let (big, rest): (Vec<i64>, Vec<i64>) = skewed.iter().partition(|&&n| n > 500);
    assert_eq!(big.len(), 1, "{skewed:?}");
    assert!(big[0] >= 4000 && rest.iter().all(|&n| n > 0), "{skewed:?}");

    let with_nulls = plan_and_check_coverage(&mut db, "with_nulls", 600);
    assert_eq!(with_nulls, vec![600, 600, 600]);

    assert!(plan_and_check_coverage(&mut db, "empty", 100).is_empty());
}

#[test]
fn key_ranges_of_a_large_table_are_cut_from_a_sample_and_stay_near_chunk_rows() {
    let mut db = test_db("plan_ranges_sampled");
    // 1.2M skewed keys (squares: dense at the start, sparse at the end): over the
    // exact-planning limit, so the cut points come from a BERNOULLI sample.
    db.batch_execute(
        "CREATE TABLE big (k bigint PRIMARY KEY);
         INSERT INTO big SELECT g::bigint * g FROM generate_series(1, 1200000) g;
         ANALYZE big;",
    )
    .unwrap();
    let sizes = plan_and_check_coverage(&mut db, "big", 100_000);
    assert!((11..=13).contains(&sizes.len()), "{sizes:?}");
    let (last, full) = sizes.split_last().unwrap();
    assert!(
        full.iter().all(|&n| (80_000..=120_000).contains(&n)) && *last <= 120_000,
        "every range within 20% of chunk_rows: {sizes:?}"
    );
}

#[test]
fn block_ranges_cover_the_heap_and_run_as_tid_range_scans() {
    let mut db = test_db("plan_blocks");
    db.batch_execute(
        "CREATE TABLE src (id bigint, pad text);
         INSERT INTO src SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g;
         CREATE TABLE copied (id bigint PRIMARY KEY);
         SELECT chunkwise.create_task('copy', statement =>
           'INSERT INTO copied SELECT id FROM src WHERE ctid >= chunkwise.block_tid($1) AND ctid < chunkwise.block_tid($2)');",
    )
    .unwrap();
    let blocks: i64 = one(
        &mut db,
        "SELECT pg_relation_size('src') / current_setting('block_size')::bigint",
    );
    let planned: i64 = one(&mut db, "SELECT chunkwise.plan_blocks('copy', 'src', 10)");
    assert_eq!(planned, (blocks + 9) / 10);
    let ranges: Vec<(i64, i64)> = db
        .query("SELECT key, hi FROM chunkwise.items ORDER BY key", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(ranges.first().unwrap().0, 0);
    assert_eq!(ranges.last().unwrap().1, blocks);
    assert!(ranges.windows(2).all(|p| p[0].1 == p[1].0));

    // A generic plan (parameters unknown at planning time) still scans only the range.
    db.batch_execute(
        "SET plan_cache_mode = force_generic_plan;
         PREPARE chunk(bigint, bigint) AS
           SELECT id FROM src WHERE ctid >= chunkwise.block_tid($1) AND ctid < chunkwise.block_tid($2);",
    )
    .unwrap();
    let plan: String = db
        .query("EXPLAIN EXECUTE chunk(10, 20)", &[])
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        plan.contains("Tid Range Scan") && !plan.contains("Seq Scan"),
        "{plan}"
    );

    let processed: i64 = one(&mut db, "SELECT processed FROM chunkwise.run('copy', 2)");
    assert_eq!(processed, planned);
    let (rows, distinct): (i64, i64) = db
        .query_one("SELECT count(*), count(DISTINCT id) FROM copied", &[])
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((rows, distinct), (20_000, 20_000));
}

/// A stage table of `rows` rows (90% updates of existing keys, 10% new keys) to upsert
/// into a target of 4x as many rows, an `expected` copy of the target upserted by one
/// statement, and a task `upsert` doing it by key ranges of 200 stage rows, each chunk
/// sleeping `sleep_ms` to leave time to interfere.
fn upsert_fixture(db: &mut Client, rows: i64, sleep_ms: i64) -> i64 {
    db.batch_execute(&format!(
        "CREATE TABLE target (id bigint PRIMARY KEY, v bigint NOT NULL, note text);
         CREATE INDEX ON target (v);
         INSERT INTO target SELECT g, 0, 'old' FROM generate_series(1, 4 * {rows}) g;
         CREATE TABLE stage (id bigint PRIMARY KEY, v bigint NOT NULL);
         INSERT INTO stage
           SELECT CASE WHEN g % 10 = 0 THEN 4 * {rows} + g ELSE g * 3 END, g
             FROM generate_series(1, {rows}) g;
         CREATE TABLE expected AS SELECT * FROM target;
         ALTER TABLE expected ADD PRIMARY KEY (id);
         INSERT INTO expected (id, v, note) SELECT id, v, 'new' FROM stage
           ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v, note = 'upd';
         SELECT chunkwise.create_task('upsert', statement =>
           'INSERT INTO target (id, v, note) SELECT s.id, s.v, ''new'' FROM stage s, pg_sleep({sleep_ms} / 1000.0)
             WHERE s.id >= $1 AND s.id < $2
            ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v, note = ''upd''');"
    ))
    .unwrap();
    one(
        db,
        "SELECT chunkwise.plan_ranges('upsert', 'stage', 'id', 200)",
    )
}

/// Rows in which the chunked target and the one-statement result differ.
fn target_differences(db: &mut Client) -> i64 {
    one(
        db,
        "SELECT count(*) FROM ((TABLE target EXCEPT TABLE expected) UNION ALL (TABLE expected EXCEPT TABLE target)) d",
    )
}

fn done_items(db: &mut Client) -> i64 {
    one(
        db,
        "SELECT count(*) FROM chunkwise.items WHERE status = 'done'",
    )
}

fn processed_by(db: &mut Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).unwrap().get("processed")
}

#[test]
fn chunked_upsert_resumes_after_its_workers_are_killed_and_matches_one_statement() {
    let mut db = test_db("upsert_resume_kill");
    let chunks = upsert_fixture(&mut db, 20_000, 40);
    assert_eq!(chunks, 100);

    let runner = std::thread::spawn(|| {
        let mut client = Cluster::get().connect("upsert_resume_kill");
        processed_by(&mut client, "SELECT * FROM chunkwise.run('upsert', 2)")
    });
    wait_for("20 chunks done", Duration::from_secs(60), || {
        (done_items(&mut db) >= 20).then_some(())
    });
    db.batch_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'chunkwise worker'",
    )
    .unwrap();
    let first = runner.join().unwrap();
    assert!(
        first < chunks,
        "the killed run stopped early ({first} chunks)"
    );
    assert_eq!(first, done_items(&mut db));

    let second = processed_by(&mut db, "SELECT * FROM chunkwise.run('upsert', 2)");
    assert_eq!(first + second, chunks, "only the ranges not done run again");
    assert_eq!(target_differences(&mut db), 0);
}

#[test]
fn chunked_upsert_resumes_after_an_immediate_restart_and_matches_one_statement() {
    let mut db = test_db("upsert_resume_crash");
    let chunks = upsert_fixture(&mut db, 20_000, 40);

    let runner = std::thread::spawn(|| {
        let mut client = Cluster::get().connect("upsert_resume_crash");
        client.query_one("SELECT * FROM chunkwise.run('upsert', 2)", &[])
    });
    wait_for("20 chunks done", Duration::from_secs(60), || {
        (done_items(&mut db) >= 20).then_some(())
    });
    Cluster::get().restart_immediately();
    assert!(
        runner.join().unwrap().is_err(),
        "the run's session died with the server"
    );

    let mut db = Cluster::get().connect("upsert_resume_crash");
    let state: String = one(&mut db, "SELECT state FROM chunkwise.runs");
    assert_eq!(
        state, "interrupted",
        "a run whose workers died is not running"
    );
    let survived = done_items(&mut db);
    assert!(
        (20..chunks).contains(&survived),
        "{survived} chunks survived"
    );
    let second = processed_by(&mut db, "SELECT * FROM chunkwise.run('upsert', 2)");
    assert_eq!(
        survived + second,
        chunks,
        "only the ranges not done run again"
    );
    assert_eq!(target_differences(&mut db), 0);
}

#[test]
fn items_per_commit_groups_items_in_one_transaction_and_a_failing_one_rolls_back_alone() {
    let mut db = test_db("items_per_commit");
    recorder_task(&mut db, "unused");
    db.batch_execute(
        "CREATE PROCEDURE record_but_three(k bigint) LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO done_order (k) VALUES (k);
           IF k = 3 THEN RAISE EXCEPTION 'item three fails'; END IF;
         END $$;
         SELECT chunkwise.create_task('batched', call => 'record_but_three',
                                      items_per_commit => 5, max_attempts => 1);
         SELECT chunkwise.plan('batched', 'SELECT g AS key FROM generate_series(1, 10) g');",
    )
    .unwrap();
    let row = db
        .query_one("SELECT * FROM chunkwise.run('batched', 1)", &[])
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>("processed"), row.get::<_, i64>("dead")),
        (9, 1)
    );
    // Item three's insert was rolled back with it; its batch-mates' were not.
    assert_eq!(done_order(&mut db), vec![1, 2, 4, 5, 6, 7, 8, 9, 10]);
    let (status, error): (String, String) = db
        .query_one(
            "SELECT status, last_error FROM chunkwise.items WHERE key = 3",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(
        (status.as_str(), error.as_str()),
        ("dead", "item three fails")
    );
    // Ten items, five per transaction: two commits wrote all the statuses.
    let transactions: i64 = one(
        &mut db,
        "SELECT count(DISTINCT xmin::text) FROM chunkwise.items",
    );
    assert_eq!(transactions, 2);
}

#[test]
fn synchronous_commit_false_makes_the_workers_commit_asynchronously() {
    let mut db = test_db("async_commit");
    db.batch_execute(
        "CREATE TABLE seen (task text, setting text);
         CREATE PROCEDURE note_setting(k bigint) LANGUAGE sql AS
           $$INSERT INTO seen SELECT split_part(current_setting('application_name'), ' ', 2),
                                     current_setting('synchronous_commit')$$;
         SELECT chunkwise.create_task('fast', call => 'note_setting', synchronous_commit => false);
         SELECT chunkwise.create_task('safe', call => 'note_setting');
         SELECT chunkwise.enqueue('fast', 1), chunkwise.enqueue('safe', 1);",
    )
    .unwrap();
    for task in ["fast", "safe"] {
        db.query_one("SELECT * FROM chunkwise.run($1)", &[&task])
            .unwrap();
    }
    let seen: Vec<(String, String)> = db
        .query("SELECT task, setting FROM seen ORDER BY task", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("fast".to_string(), "off".to_string()),
            ("safe".to_string(), "on".to_string())
        ]
    );
}

#[test]
fn a_key_column_of_nulls_only_is_planned_as_nothing_with_a_warning() {
    let mut db = test_db("ranges_all_null");
    db.batch_execute(
        "CREATE TABLE only_nulls (k bigint);
         INSERT INTO only_nulls SELECT NULL FROM generate_series(1, 50);
         SELECT chunkwise.create_task('chunks', statement => 'SELECT $1, $2');",
    )
    .unwrap();
    drop(db);
    let (mut client, notices) = Cluster::get().connect_with_notices("ranges_all_null");
    let planned: i64 = one(
        &mut client,
        "SELECT chunkwise.plan_ranges('chunks', 'only_nulls', 'k', 10)",
    );
    assert_eq!(planned, 0);
    let said: Vec<String> = notices.try_iter().collect();
    assert!(
        said.iter()
            .any(|n| n.starts_with("WARNING") && n.contains("is NULL fall in no range")),
        "50 rows that no range covers are worth a WARNING: {said:?}"
    );
}
