//! Resource governance: max_rate paces a run across its workers (and alter_task changes
//! it mid-run), pause_when and max_load hold a run without claiming, lock_timeout makes
//! an item give way to a row lock, and a range item that runs past item_timeout splits
//! until its halves fit, every row done once.

use std::time::{Duration, Instant};

use postgres::Client;

use crate::harness::{Cluster, one, sql_error, test_db, wait_for};

/// A table of `rows` keys with a counter each, and `bump_range(lo, hi)`, which bumps
/// the counters of `[lo, hi)` and then sleeps `ms_per_row` per row (its cost grows with
/// its range).
fn counted_rows(db: &mut Client, rows: i64, ms_per_row: f64) {
    db.batch_execute(&format!(
        "CREATE TABLE rows (k bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO rows (k) SELECT generate_series(1, {rows});
         CREATE PROCEDURE bump_range(lo bigint, hi bigint) LANGUAGE plpgsql AS $$
         BEGIN
           UPDATE rows SET n = n + 1 WHERE k >= lo AND k < hi;
           PERFORM pg_sleep((hi - lo) * {ms_per_row} / 1000.0);
         END $$;
         CREATE PROCEDURE bump(k bigint) LANGUAGE sql AS 'UPDATE rows SET n = n + 1 WHERE rows.k = bump.k';"
    ))
    .unwrap();
}

/// The task's `throttled` reason in task_status once it has one.
fn throttled_reason(db: &mut Client, task: &str) -> String {
    wait_for(
        &format!("task {task} to show as throttled"),
        Duration::from_secs(60),
        || {
            db.query_one(
                "SELECT throttled FROM chunkwise.task_status WHERE task = $1",
                &[&task],
            )
            .unwrap()
            .get::<_, Option<String>>(0)
        },
    )
}

/// Waits for run `run_id` to end; returns its state and processed count.
fn wait_run(db: &mut Client, run_id: i64, timeout: Duration) -> (String, i64) {
    let row = db
        .query_one(
            "SELECT state, processed FROM chunkwise.wait($1, $2::text::interval)",
            &[&run_id, &format!("{} seconds", timeout.as_secs())],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

fn done_items(db: &mut Client, task: &str) -> i64 {
    db.query_one(
        "SELECT done FROM chunkwise.task_status WHERE task = $1",
        &[&task],
    )
    .unwrap()
    .get(0)
}

#[test]
fn max_rate_paces_two_workers_to_200_items_a_second() {
    let mut db = test_db("gov_max_rate");
    counted_rows(&mut db, 1000, 0.0);
    db.batch_execute(
        "SELECT chunkwise.create_task('paced', call => 'bump', workers => 2, max_rate => 200);
         SELECT chunkwise.plan('paced', 'SELECT k AS key FROM rows');",
    )
    .unwrap();
    let started = Instant::now();
    let (run_id, processed): (i64, i64) = {
        let row = db
            .query_one("SELECT run_id, processed FROM chunkwise.run('paced')", &[])
            .unwrap();
        (row.get(0), row.get(1))
    };
    let took = started.elapsed().as_secs_f64();
    assert_eq!(processed, 1000);
    let workers: i32 = db
        .query_one(
            "SELECT workers_started FROM chunkwise.runs WHERE run_id = $1",
            &[&run_id],
        )
        .unwrap()
        .get(0);
    assert_eq!(workers, 2, "both workers ran");
    eprintln!("1,000 items at max_rate 200 with 2 workers: {took:.3} s");
    // 1,000 items at 200/s: 999 intervals of 5 ms, plus the workers' start.
    assert!(
        (4.25..=5.75).contains(&took),
        "1,000 items at max_rate 200 took {took:.2} s, not 5 s (± 15%)"
    );
    assert_eq!(
        one::<i64>(&mut db, "SELECT count(*) FROM rows WHERE n <> 1"),
        0
    );
}

#[test]
fn alter_task_changes_max_rate_of_a_run_under_way() {
    let mut db = test_db("gov_max_rate_alter");
    counted_rows(&mut db, 1000, 0.0);
    db.batch_execute(
        "SELECT chunkwise.create_task('steered', call => 'bump', workers => 2, max_rate => 5);
         SELECT chunkwise.plan('steered', 'SELECT k AS key FROM rows');",
    )
    .unwrap();
    let run_id: i64 = one(&mut db, "SELECT chunkwise.start('steered')");
    let reason = throttled_reason(&mut db, "steered");
    assert!(reason.starts_with("max_rate"), "{reason}");
    let workers: Vec<String> = db
        .query(
            "SELECT state FROM chunkwise.workers WHERE task = 'steered'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!workers.is_empty(), "the run's workers are live");
    // At 5/s the rest would take over three minutes; raised, it ends within seconds.
    let altered = Instant::now();
    db.batch_execute("SELECT chunkwise.alter_task('steered', max_rate => 0)")
        .unwrap();
    let (state, processed) = wait_run(&mut db, run_id, Duration::from_secs(60));
    assert_eq!((state.as_str(), processed), ("finished", 1000));
    assert!(
        altered.elapsed() < Duration::from_secs(30),
        "the run took {:?} after max_rate was lifted",
        altered.elapsed()
    );
}

#[test]
fn a_closed_pause_when_holds_a_run_with_nothing_claimed_until_it_opens() {
    let mut db = test_db("gov_pause_when");
    counted_rows(&mut db, 200, 0.0);
    db.batch_execute(
        "CREATE TABLE etl_switch (paused boolean NOT NULL);
         INSERT INTO etl_switch VALUES (true);
         SELECT chunkwise.create_task('held', call => 'bump', workers => 2,
                                      pause_when => '(SELECT paused FROM etl_switch)');
         SELECT chunkwise.plan('held', 'SELECT k AS key FROM rows');",
    )
    .unwrap();
    let run_id: i64 = one(&mut db, "SELECT chunkwise.start('held')");
    assert_eq!(throttled_reason(&mut db, "held"), "pause_when");
    // Both workers wait, throttled, and have claimed nothing: no item done, none locked.
    wait_for("both workers throttled", Duration::from_secs(60), || {
        (one::<i64>(
            &mut db,
            "SELECT count(*) FROM chunkwise.workers WHERE task = 'held' AND state = 'throttled' AND throttled = 'pause_when'",
        ) == 2)
            .then_some(())
    });
    assert_eq!(done_items(&mut db, "held"), 0);
    assert_eq!(
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM (SELECT FROM chunkwise.items FOR UPDATE SKIP LOCKED) unlocked"
        ),
        200,
        "no item is claimed"
    );
    assert_eq!(
        one::<i64>(&mut db, "SELECT count(*) FROM rows WHERE n > 0"),
        0
    );
    db.batch_execute("UPDATE etl_switch SET paused = false")
        .unwrap();
    let (state, processed) = wait_run(&mut db, run_id, Duration::from_secs(60));
    assert_eq!((state.as_str(), processed), ("finished", 200));
    assert_eq!(
        one::<i64>(&mut db, "SELECT count(*) FROM rows WHERE n <> 1"),
        0
    );
}

#[test]
fn a_failing_pause_when_holds_the_run_and_says_why_until_it_is_changed() {
    let mut db = test_db("gov_pause_when_fails");
    counted_rows(&mut db, 50, 0.0);
    db.batch_execute(
        "CREATE TABLE etl_switch (paused boolean NOT NULL);
         INSERT INTO etl_switch VALUES (false);
         SELECT chunkwise.create_task('orphaned', call => 'bump',
                                      pause_when => '(SELECT paused FROM etl_switch)');
         SELECT chunkwise.plan('orphaned', 'SELECT k AS key FROM rows');
         DROP TABLE etl_switch;",
    )
    .unwrap();
    let run_id: i64 = one(&mut db, "SELECT chunkwise.start('orphaned')");
    let reason = throttled_reason(&mut db, "orphaned");
    assert!(
        reason.starts_with("pause_when failed [SQLSTATE 42P01]"),
        "{reason}"
    );
    assert_eq!(done_items(&mut db, "orphaned"), 0);
    db.batch_execute("SELECT chunkwise.alter_task('orphaned', pause_when => '')")
        .unwrap();
    let (state, processed) = wait_run(&mut db, run_id, Duration::from_secs(60));
    assert_eq!((state.as_str(), processed), ("finished", 50));
}

#[test]
fn max_load_holds_a_run_while_the_load_is_above_it() {
    let mut db = test_db("gov_max_load");
    counted_rows(&mut db, 50, 0.0);
    // The workers read the load from this file (chunkwise.loadavg_file, set for this
    // database only): far above any max_load, then idle.
    let file = std::env::temp_dir().join("pg_chunkwise_gov_loadavg");
    std::fs::write(&file, "512.00 512.00 512.00 9/999 4242\n").unwrap();
    db.batch_execute(&format!(
        "ALTER DATABASE gov_max_load SET chunkwise.loadavg_file = '{}';
         SELECT chunkwise.create_task('loaded', call => 'bump', max_load => 2);
         SELECT chunkwise.plan('loaded', 'SELECT k AS key FROM rows');",
        file.display()
    ))
    .unwrap();
    let run_id: i64 = one(&mut db, "SELECT chunkwise.start('loaded')");
    let reason = throttled_reason(&mut db, "loaded");
    assert!(reason.starts_with("max_load (load "), "{reason}");
    assert_eq!(done_items(&mut db, "loaded"), 0);
    std::fs::write(&file, "0.00 0.00 0.00 1/999 4242\n").unwrap();
    let (state, processed) = wait_run(&mut db, run_id, Duration::from_secs(60));
    assert_eq!((state.as_str(), processed), ("finished", 50));
    let _ = std::fs::remove_file(&file);
}

#[test]
fn an_item_behind_a_row_lock_gives_up_with_55p03_and_succeeds_once_the_lock_is_gone() {
    let mut db = test_db("gov_lock_timeout");
    counted_rows(&mut db, 3, 0.0);
    db.batch_execute(
        "SELECT chunkwise.create_task('polite', call => 'bump', lock_timeout => '100ms',
                                      retry_backoff => '1 second', max_attempts => 100);
         SELECT chunkwise.plan('polite', 'SELECT k AS key FROM rows');",
    )
    .unwrap();
    let mut oltp = Cluster::get().connect("gov_lock_timeout");
    let mut holder = oltp.transaction().unwrap();
    holder
        .batch_execute("SELECT * FROM rows WHERE k = 2 FOR UPDATE")
        .unwrap();
    let run_id: i64 = one(&mut db, "SELECT chunkwise.start('polite')");
    let (sqlstate, attempts): (String, i32) = wait_for(
        "key 2 to fail on the row lock",
        Duration::from_secs(60),
        || {
            db.query_opt(
                "SELECT sqlstate, attempts FROM chunkwise.failures WHERE task = 'polite' AND key = 2",
                &[],
            )
            .unwrap()
            .map(|r| (r.get(0), r.get(1)))
        },
    );
    assert_eq!(sqlstate, "55P03");
    assert!(attempts >= 1);
    // The other keys went on meanwhile.
    wait_for("keys 1 and 3 done", Duration::from_secs(60), || {
        (one::<i64>(&mut db, "SELECT count(*) FROM rows WHERE n = 1 AND k <> 2") == 2).then_some(())
    });
    holder.commit().unwrap();
    let (state, processed) = wait_run(&mut db, run_id, Duration::from_secs(60));
    assert_eq!((state.as_str(), processed), ("finished", 3));
    assert_eq!(
        one::<i64>(&mut db, "SELECT count(*) FROM rows WHERE n <> 1"),
        0
    );
}

#[test]
fn range_items_that_exceed_item_timeout_split_until_they_fit_and_every_row_is_done_once() {
    let mut db = test_db("gov_split");
    // 1 ms per row, 400 ms allowed: the one 1,024-row chunk (1 s) halves until its
    // parts hold 256 rows (0.26 s) or fewer.
    counted_rows(&mut db, 1024, 1.0);
    db.batch_execute(
        "SELECT chunkwise.create_task('halving', call => 'bump_range', workers => 2,
                                      item_timeout => '400ms', split_on_timeout => true);
         SELECT chunkwise.plan_ranges('halving', 'rows'::regclass, 'k', 2000);",
    )
    .unwrap();
    assert_eq!(
        one::<i64>(&mut db, "SELECT count(*) FROM chunkwise.items"),
        1
    );
    let row = db
        .query_one(
            "SELECT processed, failed, dead FROM chunkwise.run('halving')",
            &[],
        )
        .unwrap();
    let (processed, failed, dead): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let tree: Vec<(i64, i64, i64, String, i32)> = db
        .query(
            "SELECT item_id, key, hi, status, attempts FROM chunkwise.items ORDER BY key",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    for (item, lo, hi, status, attempts) in &tree {
        eprintln!(
            "item {item:>3} [{lo:>4}, {hi:>4}) {:>4} rows  {status}  attempts {attempts}",
            hi - lo
        );
    }
    assert_eq!((failed, dead), (0, 0), "splits are not failures");
    assert_eq!(processed as usize, tree.len());
    assert!(
        tree.len() >= 4,
        "1,024 rows at 1 ms a row in 400 ms chunks: at least 4 items"
    );
    assert!(
        tree.iter().all(|t| t.3 == "done" && t.4 == 0),
        "all done, no attempt charged: {tree:?}"
    );
    assert!(
        tree.iter().all(|t| t.2 - t.1 <= 512),
        "no chunk over 512 rows ran to its end: {tree:?}"
    );
    // The halves tile the first range exactly: no row twice, none left out.
    assert_eq!(tree.first().map(|t| t.1), Some(1));
    for pair in tree.windows(2) {
        assert_eq!(pair[0].2, pair[1].1, "ranges meet: {pair:?}");
    }
    assert_eq!(
        one::<i64>(&mut db, "SELECT count(*) FROM rows WHERE n <> 1"),
        0,
        "every row done exactly once"
    );
}

/// pause_when runs as the task's owner: one the owner may not run is refused when the
/// task is made (42501, with a hint), and nothing is created.
#[test]
fn a_pause_when_the_owner_may_not_run_is_refused() {
    let mut db = test_db("gov_pause_when_rights");
    db.batch_execute(
        "DROP ROLE IF EXISTS gov_etl;
         CREATE ROLE gov_etl LOGIN;
         GRANT CREATE ON SCHEMA public TO gov_etl;
         CREATE TABLE secret_switch (paused boolean);
         CREATE PROCEDURE good(k bigint) LANGUAGE sql AS 'SELECT 1';
         GRANT EXECUTE ON PROCEDURE good(bigint) TO gov_etl;",
    )
    .unwrap();
    let mut etl = Cluster::get().connect_as("gov_pause_when_rights", "gov_etl");
    let (code, message, hint) = sql_error(etl.execute(
        "SELECT chunkwise.create_task('peeking', call => 'good', pause_when => '(SELECT bool_or(paused) FROM secret_switch)')",
        &[],
    ));
    assert_eq!(code, "42501", "{message}");
    assert!(message.contains("pause_when"), "{message}");
    assert!(hint.contains("owner"), "{hint}");
    assert_eq!(
        one::<i64>(&mut db, "SELECT count(*) FROM chunkwise.tasks"),
        0
    );
    drop(etl);
    db.batch_execute("DROP OWNED BY gov_etl; DROP ROLE gov_etl")
        .unwrap();
}
