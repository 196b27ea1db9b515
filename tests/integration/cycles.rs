//! Scheduled work: `run_cycle` (re-plan from source, a per-cycle limit, no overlap),
//! `start`/`wait`, and cycles driven by the real pg_cron.

use std::time::{Duration, Instant};

use postgres::Client;

use crate::harness::{Cluster, one, sql_error, test_db, wait_for};

/// 1,000 users with staggered activity, a procedure refreshing one (sleeping `sleep_ms`,
/// failing once for `failing_user`), and a task `dm` with `workers` workers re-planning
/// the users not yet refreshed by activity, 100 per cycle.
fn datamart(db: &mut Client, sleep_ms: f64, failing_user: Option<i64>, workers: i32) {
    db.batch_execute(&format!(
        "CREATE TABLE users (id bigint PRIMARY KEY, seen timestamptz, actions bigint, refreshed int NOT NULL DEFAULT 0);
         INSERT INTO users SELECT g, now() - g * interval '1 hour', 1000 - g, 0 FROM generate_series(1, 1000) g;
         CREATE TABLE failing (id bigint);
         INSERT INTO failing SELECT {failing} WHERE {failing} IS NOT NULL;
         CREATE SEQUENCE failures;  -- not rolled back with the failed item
         CREATE PROCEDURE refresh(k bigint) LANGUAGE plpgsql AS $$
         BEGIN
           PERFORM pg_sleep({sleep_ms} / 1000.0);
           IF EXISTS (SELECT FROM failing f WHERE f.id = k) AND nextval('failures') = 1 THEN
             RAISE EXCEPTION 'user % not ready', k;
           END IF;
           UPDATE users SET refreshed = refreshed + 1 WHERE id = k;
         END $$;
         SELECT chunkwise.create_task('dm', call => 'refresh', max_items_per_cycle => 100, workers => {workers},
                  rank_by_activity => true, retry_backoff => '1 second', retry_backoff_max => '1 second',
                  source => 'SELECT id AS key, seen AS last_activity, actions FROM users WHERE refreshed = 0');",
        failing = failing_user.map_or("NULL".to_string(), |k| k.to_string()),
    ))
    .unwrap();
}

/// Returns once `session`'s failed transaction has been rolled back: PostgreSQL sends the
/// error to the client before it aborts the transaction (and with it the cycle), so on a
/// busy machine the next cycle from another session could still find the failed one's
/// lock and do nothing. A round trip on the session waits for the abort, as a client's
/// next statement would; the session stays open.
fn session_is_idle(session: &mut Client) {
    session.batch_execute("SELECT 1").unwrap();
}

/// Users refreshed exactly once so far.
fn refreshed_once(db: &mut Client) -> i64 {
    one(db, "SELECT count(*) FROM users WHERE refreshed = 1")
}

/// Waits until the cycle under way has refreshed its first users.
fn wait_for_first_items(db: &mut Client) {
    wait_for("the cycle's first items", Duration::from_secs(30), || {
        (refreshed_once(db) > 0).then_some(())
    });
}

/// `CALL chunkwise.run_cycle('dm')` in database `name`, from a thread of its own.
fn cycle_in_background(name: &'static str) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut client = Cluster::get().connect(name);
        client
            .batch_execute("CALL chunkwise.run_cycle('dm')")
            .unwrap();
    })
}

#[test]
fn a_cycle_limit_of_100_over_1000_items_takes_10_cycles_highest_priorities_first() {
    let mut db = test_db("cycle_limit");
    datamart(&mut db, 0.0, None, 2);
    for cycle in 1..=10 {
        db.batch_execute("CALL chunkwise.run_cycle('dm')").unwrap();
        let refreshed = refreshed_once(&mut db);
        assert_eq!(refreshed, 100 * cycle, "after cycle {cycle}");
    }
    db.batch_execute("CALL chunkwise.run_cycle('dm')").unwrap();
    let (runs, over): (i64, i64) = db
        .query_one(
            "SELECT (SELECT count(*) FROM chunkwise.runs), (SELECT count(*) FROM users WHERE refreshed > 1)",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(
        (runs, over),
        (10, 0),
        "an eleventh cycle finds nothing to do"
    );

    // Every cycle took the best 100 that were left: user ids are in activity order here
    // (lower ids are both more recent and more active), so cycle k did users 100k-99..100k.
    let runs: Vec<(i64, i64, i64, i64)> = db
        .query(
            "SELECT run_id, min(key), max(key), count(*) FROM chunkwise.items GROUP BY run_id ORDER BY run_id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let ranges: Vec<(i64, i64, i64)> = runs.iter().map(|r| (r.1, r.2, r.3)).collect();
    let expected: Vec<(i64, i64, i64)> =
        (0..10).map(|k| (k * 100 + 1, k * 100 + 100, 100)).collect();
    assert_eq!(ranges, expected, "cycles in priority order");
}

#[test]
fn a_failed_item_is_retried_first_in_the_next_cycle() {
    let mut db = test_db("cycle_retry");
    datamart(&mut db, 0.0, Some(50), 1);
    db.batch_execute("CALL chunkwise.run_cycle('dm')").unwrap();
    let (status, attempts): (String, i32) = db
        .query_one(
            "SELECT status, attempts FROM chunkwise.items WHERE key = 50",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((status.as_str(), attempts), ("pending", 1));

    // Once its backoff is due, the next cycle runs it before anything else.
    wait_for("the retry to fall due", Duration::from_secs(10), || {
        let due: bool = one(
            &mut db,
            "SELECT not_before <= now() FROM chunkwise.items WHERE key = 50",
        );
        due.then_some(())
    });
    db.batch_execute("CALL chunkwise.run_cycle('dm')").unwrap();
    let first_of_second_cycle: i64 = one(
        &mut db,
        "SELECT key FROM chunkwise.items WHERE run_id = (SELECT max(run_id) FROM chunkwise.runs) \
              ORDER BY finished_at LIMIT 1",
    );
    assert_eq!(first_of_second_cycle, 50);
}

#[test]
fn a_second_concurrent_cycle_returns_at_once_and_does_no_work() {
    let mut db = test_db("cycle_overlap");
    datamart(&mut db, 30.0, None, 2);
    let first = cycle_in_background("cycle_overlap");
    wait_for("the first cycle's run", Duration::from_secs(30), || {
        let running: i64 = one(
            &mut db,
            "SELECT count(*) FROM chunkwise.runs WHERE state = 'running'",
        );
        (running == 1).then_some(())
    });
    let started = Instant::now();
    db.batch_execute("CALL chunkwise.run_cycle('dm')").unwrap();
    let second_took = started.elapsed();
    let still_running: i64 = one(
        &mut db,
        "SELECT count(*) FROM chunkwise.runs WHERE state = 'running'",
    );
    assert_eq!(
        still_running, 1,
        "the second cycle returned ({second_took:?}) while the first still ran"
    );
    first.join().unwrap();
    let (runs, refreshed): (i64, i64) = db
        .query_one(
            "SELECT (SELECT count(*) FROM chunkwise.runs), (SELECT count(*) FROM users WHERE refreshed = 1)",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((runs, refreshed), (1, 100), "one cycle's work, done once");

    // Inside a transaction block a cycle cannot commit its planning: refused.
    let mut tx = db.transaction().unwrap();
    let (code, _, _) = sql_error(tx.batch_execute("CALL chunkwise.run_cycle('dm')"));
    assert_eq!(code, "25001");
}

/// A cycle commits while it waits for its workers: VACUUM can remove a row deleted
/// while the cycle's run is under way. A cycle that waited in one statement held a
/// snapshot from before the delete until its run ended, and the row stayed "dead but not
/// yet removable" all that time.
#[test]
fn vacuum_removes_rows_deleted_while_a_cycle_runs() {
    let mut db = test_db("cycle_horizon");
    datamart(&mut db, 100.0, None, 2);
    db.batch_execute(
        "CREATE TABLE gone (id int) WITH (autovacuum_enabled = false);
         INSERT INTO gone VALUES (1);",
    )
    .unwrap();
    let cycle = cycle_in_background("cycle_horizon");
    wait_for_first_items(&mut db);
    db.batch_execute("DELETE FROM gone").unwrap();
    let removed_while_running = wait_for(
        "VACUUM to remove the deleted row, or the cycle to end",
        Duration::from_secs(60),
        || {
            db.batch_execute("VACUUM gone").unwrap();
            let (dead, running): (i64, i64) = db
                .query_one(
                    "SELECT (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'gone'),
                            (SELECT count(*) FROM chunkwise.runs WHERE state = 'running')",
                    &[],
                )
                .map(|r| (r.get(0), r.get(1)))
                .unwrap();
            match (dead, running) {
                (0, 1) => Some(true),
                (_, 0) => Some(false),
                _ => None,
            }
        },
    );
    cycle.join().unwrap();
    assert!(
        removed_while_running,
        "the row deleted during the cycle stayed unremovable until its run ended"
    );
    let refreshed = refreshed_once(&mut db);
    assert_eq!(refreshed, 100, "the cycle did its 100 users");
}

/// A cancelled cycle stops its workers after their current item, as a cancelled run()
/// does, and lets its lock go: the next cycle runs, from another session while the
/// cancelled one is still open.
#[test]
fn a_cancelled_cycle_stops_its_workers_and_the_next_cycle_runs() {
    let mut db = test_db("cycle_cancel");
    datamart(&mut db, 50.0, None, 2);
    let mut caller = Cluster::get().connect("cycle_cancel");
    let cancel = caller.cancel_token();
    let cycle = std::thread::spawn(move || {
        let ended = caller.batch_execute("CALL chunkwise.run_cycle('dm')");
        (caller, ended)
    });
    wait_for_first_items(&mut db);
    cancel.cancel_query(postgres::NoTls).unwrap();
    let (mut caller, ended) = cycle.join().unwrap();
    let (code, _, _) = sql_error(ended);
    assert_eq!(code, "57014");
    session_is_idle(&mut caller);
    let state = wait_for("the cancelled run to end", Duration::from_secs(30), || {
        let state: String = one(&mut db, "SELECT state FROM chunkwise.runs WHERE run_id = 1");
        (state != "running").then_some(state)
    });
    assert_eq!(state, "cancelled");
    let first = refreshed_once(&mut db);
    assert!(first < 100, "cancelled before the end of its 100 users");

    db.batch_execute("CALL chunkwise.run_cycle('dm')").unwrap();
    drop(caller);
    let (runs, over): (i64, i64) = db
        .query_one(
            "SELECT (SELECT count(*) FROM chunkwise.runs WHERE state = 'finished'),
                    (SELECT count(*) FROM users WHERE refreshed > 1)",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(
        (runs, over),
        (1, 0),
        "the next cycle ran, and no user twice"
    );
}

/// A cycle whose planning fails raises the error and lets its lock go: the next cycle,
/// with the source mended, runs from another session while the first is still open.
#[test]
fn a_cycle_whose_source_fails_leaves_no_lock_behind() {
    let mut db = test_db("cycle_source_fails");
    datamart(&mut db, 0.0, None, 2);
    db.batch_execute(
        "SELECT chunkwise.alter_task('dm', source => 'SELECT id AS key, seen AS last_activity, actions \
           FROM users WHERE 1 / (refreshed - refreshed) = 1')",
    )
    .unwrap();
    let mut failing = Cluster::get().connect("cycle_source_fails");
    let (code, _, _) = sql_error(failing.batch_execute("CALL chunkwise.run_cycle('dm')"));
    assert_eq!(code, "22012", "the source's own error");
    session_is_idle(&mut failing);
    db.batch_execute(
        "SELECT chunkwise.alter_task('dm', source => 'SELECT id AS key, seen AS last_activity, actions \
           FROM users WHERE refreshed = 0')",
    )
    .unwrap();
    db.batch_execute("CALL chunkwise.run_cycle('dm')").unwrap();
    assert_eq!(refreshed_once(&mut db), 100, "the next cycle ran");
    drop(failing);
}

#[test]
fn start_returns_a_run_id_at_once_and_wait_returns_the_finished_run() {
    let mut db = test_db("start_wait");
    datamart(&mut db, 10.0, None, 2);
    db.batch_execute(
        "SELECT chunkwise.plan_by_activity('dm', 'SELECT id AS key, seen AS last_activity, actions FROM users WHERE id <= 200')",
    )
    .unwrap();
    let run_id: i64 = one(&mut db, "SELECT chunkwise.start('dm', 2)");
    let (state, processed): (String, i64) = db
        .query_one(
            "SELECT state, processed FROM chunkwise.wait($1, '10 milliseconds')",
            &[&run_id],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(
        state, "running",
        "start() returned before the work was done"
    );
    assert!(processed < 200);

    let row = db
        .query_one("SELECT * FROM chunkwise.wait($1)", &[&run_id])
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>("task"),
            row.get::<_, String>("state"),
            row.get::<_, i64>("processed")
        ),
        ("dm".to_string(), "finished".to_string(), 200)
    );
    let (code, _, hint) = sql_error(db.query("SELECT * FROM chunkwise.wait(424242)", &[]));
    assert_eq!(code, "42704");
    assert!(!hint.is_empty());
    let nothing: Option<i64> = one(&mut db, "SELECT chunkwise.start('dm')");
    assert_eq!(nothing, None, "nothing pending: no run");
}

#[test]
fn pg_cron_runs_a_cycle_every_minute() {
    let mut db = test_db("cron_cycles");
    datamart(&mut db, 0.0, None, 2);
    let mut cron = Cluster::get().connect("postgres");
    cron.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_cron")
        .unwrap();
    let job: i64 = one(
        &mut cron,
        "SELECT cron.schedule_in_database('datamart', '* * * * *', 'CALL chunkwise.run_cycle(''dm'')', 'cron_cycles')",
    );
    // Two cron ticks are at most two minutes away.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(
            "two cycles run by pg_cron",
            Duration::from_secs(150),
            || {
                let succeeded: i64 = cron
                .query_one(
                    "SELECT count(*) FROM cron.job_run_details WHERE jobid = $1 AND status = 'succeeded'",
                    &[&job],
                )
                .unwrap()
                .get(0);
                let runs: i64 = one(
                    &mut db,
                    "SELECT count(*) FROM chunkwise.runs WHERE state = 'finished' AND processed = 100",
                );
                (succeeded >= 2 && runs >= 2).then_some(())
            },
        )
    }));
    cron.execute("SELECT cron.unschedule($1::bigint)", &[&job])
        .unwrap();
    outcome.unwrap();
    let over: i64 = one(&mut db, "SELECT count(*) FROM users WHERE refreshed > 1");
    assert_eq!(over, 0);
}
