//! Bad input: each refusal has a specific SQLSTATE and a hint, and changes nothing queued.

use crate::harness::{one, queue_snapshot, sql_error, test_db};

#[test]
fn bad_calls_are_refused_with_sqlstate_and_hint_and_change_nothing() {
    let mut db = test_db("bad_input");
    db.batch_execute(
        "CREATE PROCEDURE good(k bigint) LANGUAGE sql AS 'SELECT 1';
         CREATE PROCEDURE takes_text(k text) LANGUAGE sql AS 'SELECT 1';
         CREATE FUNCTION three_ints(a bigint, b bigint, c bigint) RETURNS int LANGUAGE sql AS 'SELECT 1';
         CREATE TABLE t (id bigint, name text);
         CREATE VIEW v AS SELECT * FROM t;
         CREATE TABLE parted (id bigint) PARTITION BY RANGE (id);
         SELECT chunkwise.create_task('existing', call => 'good');
         SELECT chunkwise.create_task('ranges', statement => 'SELECT $1, $2');
         SELECT chunkwise.create_task('seq', call => 'good', sequential_groups => true);
         SELECT chunkwise.enqueue('seq', 1, group_key => 'org1');
         SELECT chunkwise.enqueue('existing', 42, priority => 3);",
    )
    .unwrap();
    let before = queue_snapshot(&mut db);
    let cases: &[(&str, &str)] = &[
        ("SELECT chunkwise.run('nope')", "42704"),
        ("SELECT chunkwise.enqueue('nope', 1)", "42704"),
        ("SELECT chunkwise.drop_task('nope')", "42704"),
        ("SELECT chunkwise.plan('nope', 'SELECT 1 AS key')", "42704"),
        ("SELECT chunkwise.run(NULL)", "22004"),
        (
            "SELECT chunkwise.create_task('x', call => 'takes_text')",
            "42883",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'three_ints')",
            "42883",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'no_such_proc')",
            "42883",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', statement => 'SELECT $1')",
            "22023",
        ),
        ("SELECT chunkwise.create_task('x')", "22023"),
        (
            "SELECT chunkwise.create_task('x', statement => 'SAVEPOINT s1')",
            "0A000",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', after => 'COMMIT')",
            "0A000",
        ),
        (
            "SELECT chunkwise.alter_task('ranges', statement => 'release savepoint s1')",
            "0A000",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', workers => 0)",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', workers => -3)",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', workers => 100000)",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', max_attempts => 0)",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', max_attempts => NULL)",
            "22004",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', retry_backoff => '-1 second')",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', retry_backoff => '1 hour', retry_backoff_max => '1 minute')",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', item_timeout => '0')",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', items_per_commit => 0)",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', statement => 'SELECT 1; SELECT 2')",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', statement => 'SELEC 1')",
            "42601",
        ),
        (
            "SELECT chunkwise.create_task('bad name!', call => 'good')",
            "42602",
        ),
        (
            "SELECT chunkwise.create_task(NULL, call => 'good')",
            "22004",
        ),
        (
            "SELECT chunkwise.create_task('existing', call => 'good')",
            "42710",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', rank_by_activity => true)",
            "22023",
        ),
        ("SELECT chunkwise.enqueue('existing', NULL)", "22004"),
        (
            "SELECT chunkwise.enqueue('existing', 1, priority => NULL)",
            "22004",
        ),
        (
            "SELECT chunkwise.plan('existing', 'SELECT 1 AS id')",
            "42703",
        ),
        (
            "SELECT chunkwise.plan('existing', 'SELECT ''a''::text AS key')",
            "42804",
        ),
        (
            "SELECT chunkwise.plan('existing', 'SELECT NULL::bigint AS key')",
            "22004",
        ),
        ("SELECT chunkwise.plan('existing', NULL)", "22004"),
        (
            "SELECT chunkwise.plan_by_activity('existing', 'SELECT 1::bigint AS key')",
            "42703",
        ),
        (
            "SELECT chunkwise.plan_ranges('existing', 't', 'id', 10)",
            "42809",
        ),
        ("SELECT chunkwise.plan_blocks('existing', 't', 10)", "42809"),
        (
            "SELECT chunkwise.plan_ranges('ranges', 't', 'nope', 10)",
            "42703",
        ),
        (
            "SELECT chunkwise.plan_ranges('ranges', 't', 'ctid', 10)",
            "42703",
        ),
        (
            "SELECT chunkwise.plan_ranges('ranges', 't', 'name', 10)",
            "42804",
        ),
        (
            "SELECT chunkwise.plan_ranges('ranges', 't', 'id', 0)",
            "22023",
        ),
        (
            "SELECT chunkwise.plan_ranges('ranges', 't', 'id', -5)",
            "22023",
        ),
        (
            "SELECT chunkwise.plan_ranges('ranges', 't', 'id', NULL)",
            "22004",
        ),
        (
            "SELECT chunkwise.plan_ranges('ranges', NULL, 'id', 10)",
            "22004",
        ),
        (
            "SELECT chunkwise.plan_ranges('ranges', 't', NULL, 10)",
            "22004",
        ),
        (
            "SELECT chunkwise.plan_ranges('ranges', 'v', 'id', 10)",
            "42809",
        ),
        (
            "SELECT chunkwise.plan_ranges('ranges', 'no_such_table', 'id', 10)",
            "42P01",
        ),
        (
            "SELECT chunkwise.plan_ranges('ranges', 4242424242::oid::regclass, 'id', 10)",
            "42P01",
        ),
        (
            "SELECT chunkwise.plan_ranges('nope', 't', 'id', 10)",
            "42704",
        ),
        ("SELECT chunkwise.plan_blocks('ranges', 't', 0)", "22023"),
        ("SELECT chunkwise.plan_blocks('ranges', 't', -1)", "22023"),
        ("SELECT chunkwise.plan_blocks('ranges', 'v', 10)", "42809"),
        (
            "SELECT chunkwise.plan_blocks('ranges', 'parted', 10)",
            "42809",
        ),
        // Without Citus there is nothing distributed to plan shards of.
        ("SELECT chunkwise.plan_shards('ranges', 't')", "42809"),
        ("SELECT chunkwise.plan_shards('existing', 't')", "42809"),
        ("SELECT chunkwise.plan_shards('ranges', NULL)", "22004"),
        ("SELECT chunkwise.block_tid(-1)", "22003"),
        ("SELECT chunkwise.block_tid(4294967296)", "22003"),
        (
            "SELECT chunkwise.alter_task('nope', max_attempts => 2)",
            "42704",
        ),
        (
            "SELECT chunkwise.alter_task('existing', max_attempts => 0)",
            "22023",
        ),
        (
            "SELECT chunkwise.alter_task('existing', workers => -1)",
            "22023",
        ),
        (
            "SELECT chunkwise.alter_task('existing', call => 'good', statement => 'SELECT $1')",
            "22023",
        ),
        (
            "SELECT chunkwise.alter_task('existing', call => 'takes_text')",
            "42883",
        ),
        (
            "SELECT chunkwise.alter_task('existing', retry_backoff => '2 hours')",
            "22023",
        ),
        (
            "SELECT chunkwise.alter_task('existing', statement => 'SELECT 1; SELECT 2')",
            "22023",
        ),
        ("SELECT chunkwise.enqueue('seq', 2)", "22004"),
        (
            "SELECT chunkwise.plan('seq', 'SELECT 2::bigint AS key')",
            "22004",
        ),
        (
            "SELECT chunkwise.plan_by_activity('seq', 'SELECT 2::bigint AS key, now() AS last_activity, 1 AS actions')",
            "22004",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', sequential_groups => true, items_per_commit => 2)",
            "22023",
        ),
        (
            "SELECT chunkwise.alter_task('seq', sequential_groups => false)",
            "55000",
        ),
        (
            "SELECT chunkwise.alter_task('existing', sequential_groups => true)",
            "55000",
        ),
        ("SELECT chunkwise.skip('existing', 42)", "42704"),
        ("SELECT chunkwise.skip('existing', NULL)", "22004"),
        ("SELECT chunkwise.skip('nope', 1)", "42704"),
        ("SELECT chunkwise.pause('nope')", "42704"),
        ("SELECT chunkwise.resume(NULL)", "22004"),
        ("SELECT chunkwise.cancel('nope')", "42704"),
        ("SELECT chunkwise.retry('nope')", "42704"),
        ("SELECT chunkwise.purge('existing', '-1 day')", "22023"),
        ("SELECT chunkwise.purge('existing', NULL)", "22004"),
        ("SELECT chunkwise.start('nope')", "42704"),
        ("SELECT chunkwise.start('existing', workers => 0)", "22023"),
        ("SELECT * FROM chunkwise.wait(NULL)", "22004"),
        ("SELECT * FROM chunkwise.wait(1, '-1 second')", "22023"),
        ("SELECT * FROM chunkwise.wait(0)", "42704"),
        ("CALL chunkwise.run_cycle('nope')", "42704"),
        ("SELECT chunkwise.run('existing', workers => 0)", "22023"),
        ("SELECT chunkwise.run('existing', workers => 1000)", "22023"),
        ("SELECT chunkwise.run('existing', max_items => 0)", "22023"),
        // Governance.
        (
            "SELECT chunkwise.create_task('x', call => 'good', max_rate => 0)",
            "22023",
        ),
        (
            "SELECT chunkwise.alter_task('existing', max_rate => -5)",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', max_rate => 'NaN')",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', max_load => -1)",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', lock_timeout => '-1 second')",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', max_replication_lag => '0')",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', pause_when => '42')",
            "42804",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', pause_when => 'true) FROM t WHERE (true')",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', pause_when => 'true), (false')",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', pause_when => 'true) UNION SELECT (false')",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', pause_when => 'true; DROP TABLE t')",
            "42601",
        ),
        (
            "SELECT chunkwise.alter_task('existing', pause_when => '(SELECT no_such_column FROM t)')",
            "42703",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', item_timeout => '1s', split_on_timeout => true)",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', statement => 'SELECT $1', item_timeout => '1s', split_on_timeout => true)",
            "22023",
        ),
        (
            "SELECT chunkwise.alter_task('ranges', split_on_timeout => true)",
            "22023",
        ),
        (
            "SELECT chunkwise.alter_task('ranges', item_timeout => '1s', split_on_timeout => true, split_min_width => 0)",
            "22023",
        ),
    ];
    for (sql, code) in cases {
        let (got, message, hint) = sql_error(db.query(*sql, &[]));
        assert_eq!(&got, code, "{sql}: {message}");
        // Syntax errors and unknown regproc/regclass names are PostgreSQL's own errors, raised
        // before pg_chunkwise sees the call; they carry a position, not a hint.
        if *code != "42601" && !sql.contains("no_such_") {
            assert!(!hint.is_empty(), "{sql} should carry a hint ({message})");
        }
        assert_eq!(queue_snapshot(&mut db), before, "{sql} changed the queue");
    }
}

#[test]
fn run_refuses_repeatable_read_and_a_task_created_in_the_same_transaction() {
    let mut db = test_db("bad_run_context");
    db.batch_execute("CREATE PROCEDURE good(k bigint) LANGUAGE sql AS 'SELECT 1'")
        .unwrap();
    let mut tx = db.transaction().unwrap();
    tx.batch_execute("SELECT chunkwise.create_task('fresh', call => 'good'); SELECT chunkwise.enqueue('fresh', 1)").unwrap();
    let (code, _, hint) = sql_error(tx.query("SELECT chunkwise.run('fresh')", &[]));
    assert_eq!(code, "25000");
    assert!(hint.contains("Commit"));
    tx.rollback().unwrap();

    db.batch_execute("SELECT chunkwise.create_task('fresh', call => 'good'); SELECT chunkwise.enqueue('fresh', 1)").unwrap();
    let mut tx = db
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .unwrap();
    let (code, _, _) = sql_error(tx.query("SELECT chunkwise.run('fresh')", &[]));
    assert_eq!(code, "25000");
}

/// `psql -c 'SELECT chunkwise.plan(...); SELECT chunkwise.run(...)'` (or a pg_cron job with
/// both) is one transaction: its workers could not see the items it planned, so the run
/// is refused, and the planning rolls back with it. A savepoint rolled back takes its
/// items with it; one released does not.
#[test]
fn run_refuses_items_queued_in_the_same_transaction() {
    let mut db = test_db("bad_run_queued");
    db.batch_execute(
        "CREATE TABLE done (k bigint);
         SELECT chunkwise.create_task('t', statement => 'INSERT INTO done VALUES ($1)');
         SELECT chunkwise.enqueue('t', 1);",
    )
    .unwrap();
    let before = queue_snapshot(&mut db);
    let refusals = [
        "SELECT chunkwise.plan('t', 'SELECT g AS key FROM generate_series(2, 6) g'); SELECT chunkwise.run('t')",
        "SELECT chunkwise.enqueue('t', 1, priority => 5); SELECT chunkwise.start('t')",
        "BEGIN; SAVEPOINT s; SELECT chunkwise.enqueue('t', 7); RELEASE s; SELECT chunkwise.run('t')",
    ];
    for sql in refusals {
        let (code, message, hint) = sql_error(db.batch_execute(sql));
        assert_eq!(code, "25000", "{sql}: {message}");
        assert!(message.contains("queued in this transaction"), "{message}");
        assert!(hint.contains("run_cycle"), "{hint}");
        db.batch_execute("ROLLBACK").unwrap();
        assert_eq!(queue_snapshot(&mut db), before, "{sql} changed the queue");
    }

    let mut tx = db.transaction().unwrap();
    tx.batch_execute("SAVEPOINT s; SELECT chunkwise.enqueue('t', 8); ROLLBACK TO s")
        .unwrap();
    let processed: i64 = tx
        .query_one("SELECT processed FROM chunkwise.run('t')", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        processed, 1,
        "the committed item, and no trace of the rolled-back one"
    );
    tx.commit().unwrap();

    db.batch_execute("SELECT chunkwise.plan('t', 'SELECT g AS key FROM generate_series(2, 6) g')")
        .unwrap();
    let processed: i64 = one(&mut db, "SELECT processed FROM chunkwise.run('t')");
    assert_eq!(processed, 5, "planned and committed, then run");
    let done: i64 = one(&mut db, "SELECT count(DISTINCT k) FROM done");
    assert_eq!(done, 6);
}

/// This cluster does not preload pg_chunkwise: nothing would start an always-on pool or
/// wake it, so always_on is refused (create and alter) with the setting named, and the
/// task stays as it was. Everything else works without the preload (the other tests).
#[test]
fn always_on_without_the_preloaded_library_is_refused_and_changes_nothing() {
    let mut db = test_db("always_on_unloaded");
    db.batch_execute(
        "CREATE PROCEDURE good(k bigint) LANGUAGE sql AS 'SELECT 1';
         SELECT chunkwise.create_task('plain', call => 'good');
         SELECT chunkwise.enqueue('plain', 1);",
    )
    .unwrap();
    let before = queue_snapshot(&mut db);
    for call in [
        "SELECT chunkwise.create_task('resident', call => 'good', always_on => true)",
        "SELECT chunkwise.alter_task('plain', always_on => true)",
    ] {
        let (sqlstate, message, hint) = sql_error(db.execute(call, &[]));
        assert_eq!(sqlstate, "55000", "{call}: {message}");
        assert!(message.contains("shared_preload_libraries"), "{message}");
        assert!(hint.contains("shared_preload_libraries"), "{hint}");
    }
    assert_eq!(queue_snapshot(&mut db), before);
}
