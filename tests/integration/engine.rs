//! Runs: exactly-once under worker termination, failures and retries, priority order,
//! limits, timeouts and cancellation.

use std::time::Duration;

use postgres::Client;

use crate::fixtures::{
    bump_task, counter_histogram, done_order, live_workers, recorder_task, status_counts,
    worker_running_key,
};
use crate::harness::{Cluster, column, one, test_db, two, wait_for};

fn run(client: &mut Client, sql: &str) -> (Option<i64>, i64, i64, i64) {
    let row = client.query_one(sql, &[]).unwrap();
    (
        row.get("run_id"),
        row.get("processed"),
        row.get("failed"),
        row.get("dead"),
    )
}

#[test]
fn every_item_runs_exactly_once_with_four_workers() {
    let mut db = test_db("exactly_once");
    bump_task(&mut db, 20_000, 0.0);
    let (run_id, processed, failed, dead) = run(&mut db, "SELECT * FROM chunkwise.run('bump', 4)");
    assert!(run_id.is_some());
    assert_eq!((processed, failed, dead), (20_000, 0, 0));
    assert_eq!(counter_histogram(&mut db), vec![(1, 20_000)]);
    assert_eq!(status_counts(&mut db, "bump"), (0, 20_000, 0));
    let row = db
        .query_one(
            "SELECT workers_started, workers_exited, processed FROM chunkwise.runs",
            &[],
        )
        .unwrap();
    assert_eq!(
        (
            row.get::<_, i32>(0),
            row.get::<_, i32>(1),
            row.get::<_, i64>(2)
        ),
        (4, 4, 20_000)
    );
}

/// Task `laned`: `items` keys whose priorities run against them (priority order is not
/// the order of planning), each recording in `done_by` which worker did it, in order.
fn laned_task(db: &mut Client, items: i64) {
    db.batch_execute(&format!(
        "CREATE TABLE done_by (k bigint, pid int DEFAULT pg_backend_pid(),
                               seq bigserial PRIMARY KEY);
         SELECT chunkwise.create_task('laned', statement => 'INSERT INTO done_by (k) VALUES ($1)');
         SELECT chunkwise.plan('laned',
                'SELECT g AS key, -g AS priority FROM generate_series(1, {items}) g');"
    ))
    .unwrap();
}

/// Walking the items done in priority order, how often the worker that did them changes.
fn worker_changes_along_the_ranking(db: &mut Client) -> i64 {
    one(
        db,
        "SELECT count(*) FILTER (WHERE pid <> next_pid) FROM (
           SELECT pid, lead(pid) OVER (ORDER BY k DESC) AS next_pid FROM done_by) walk",
    )
}

/// Lanes (`chunkwise.lane_size`, 64 by default): each worker works through a stretch of
/// the queue of its own, and the run stays near priority order. Priorities run against
/// the keys, so that priority order is not the order of planning.
#[test]
fn workers_take_lanes_of_their_own_and_stay_near_priority_order() {
    const ITEMS: i64 = 4_000;
    const WORKERS: i64 = 4;
    const LANE_SIZE: i64 = 64;
    let mut db = test_db("lanes");
    laned_task(&mut db, ITEMS);
    let (_, processed, _, _) = run(
        &mut db,
        &format!("SELECT * FROM chunkwise.run('laned', {WORKERS})"),
    );
    assert_eq!(processed, ITEMS);
    let (rows, keys): (i64, i64) = two(&mut db, "SELECT count(*), count(DISTINCT k) FROM done_by");
    assert_eq!((rows, keys), (ITEMS, ITEMS), "every item once");
    // When n items are done, the items claimed are at most the lanes the workers are in
    // ahead of them: none of the first 1,000 done is further than that in the ranking.
    let furthest: i64 = one(
        &mut db,
        &format!(
            "SELECT max({ITEMS} + 1 - k) FROM (SELECT k FROM done_by ORDER BY seq LIMIT 1000) first"
        ),
    );
    assert!(
        furthest <= 1_000 + WORKERS * LANE_SIZE,
        "an item ranked {furthest} was among the first 1,000 done"
    );
    // Walking the ranking, the worker changes only between lanes: at the front of the
    // queue, every worker claiming the next item, it changed at most positions.
    let changes = worker_changes_along_the_ranking(&mut db);
    assert!(
        changes < ITEMS / 8,
        "the worker changed {changes} times along {ITEMS} items in priority order"
    );
}

/// A run with `max_items` takes lanes too, and still exactly the best `max_items` items:
/// four workers in lanes of up to 64 take the 1,000 best-ranked of 4,000, in two runs
/// the next 1,000, however their lanes fall.
#[test]
fn a_run_with_max_items_in_lanes_takes_exactly_the_best_items() {
    const ITEMS: i64 = 4_000;
    let mut db = test_db("lanes_limited");
    laned_task(&mut db, ITEMS);
    for (cycle, best) in [(1, ITEMS - 999..=ITEMS), (2, ITEMS - 1999..=ITEMS - 1000)] {
        let (_, processed, _, _) = run(&mut db, "SELECT * FROM chunkwise.run('laned', 4, 1000)");
        assert_eq!(processed, 1_000, "run {cycle}");
        let (lowest, highest, count, workers): (i64, i64, i64, i64) = db
            .query_one(
                "SELECT min(k), max(k), count(DISTINCT k), count(DISTINCT pid) FROM done_by \
                  WHERE seq > (SELECT coalesce(max(seq), 0) FROM done_by) - 1000",
                &[],
            )
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .unwrap();
        assert_eq!(
            (lowest, highest, count),
            (*best.start(), *best.end(), 1_000),
            "run {cycle} took exactly the best 1,000 left"
        );
        assert!(workers > 1, "run {cycle}: its workers shared the work");
    }
    let changes = worker_changes_along_the_ranking(&mut db);
    assert!(
        changes < 2_000 / 8,
        "the worker changed {changes} times along 2,000 items in priority order: no lanes"
    );
}

#[test]
fn terminating_a_worker_mid_run_loses_and_duplicates_nothing() {
    let mut db = test_db("terminate_worker");
    bump_task(&mut db, 20_000, 0.2);

    let runner = std::thread::spawn(|| {
        let mut client = Cluster::get().connect("terminate_worker");
        run(&mut client, "SELECT * FROM chunkwise.run('bump', 4)")
    });
    wait_for("the run to be under way", Duration::from_secs(60), || {
        let done: i64 = one(&mut db, "SELECT count(*) FROM counters WHERE n > 0");
        (done >= 2_000).then_some(())
    });
    let victim = live_workers(&mut db)[0];
    let terminated: bool = db
        .query_one("SELECT pg_terminate_backend($1)", &[&victim])
        .unwrap()
        .get(0);
    assert!(terminated);
    let (_, first_processed, _, _) = runner.join().unwrap();
    assert!(first_processed > 0);
    wait_for("all workers to exit", Duration::from_secs(30), || {
        live_workers(&mut db).is_empty().then_some(())
    });

    // Whatever the first run left pending, a second run finishes.
    let (_, second_processed, _, _) = run(&mut db, "SELECT * FROM chunkwise.run('bump', 4)");
    assert_eq!(
        first_processed + second_processed,
        20_000,
        "each item counted once across both runs"
    );
    assert_eq!(counter_histogram(&mut db), vec![(1, 20_000)]);
    assert_eq!(status_counts(&mut db, "bump"), (0, 20_000, 0));
    let locked: i64 = one(
        &mut db,
        "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE c.relname = 'items'",
    );
    assert_eq!(locked, 0, "no item is still claimed");
}

#[test]
fn failing_items_retry_with_backoff_then_die_while_workers_go_on() {
    let mut db = test_db("failures");
    db.batch_execute(
        "CREATE TABLE log (k bigint PRIMARY KEY, pid int NOT NULL);
         CREATE FUNCTION flaky(k bigint) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
           IF k % 100 = 0 THEN RAISE EXCEPTION 'key % is cursed', k USING ERRCODE = 'check_violation'; END IF;
           INSERT INTO log VALUES (k, pg_backend_pid());
         END $$;
         SELECT chunkwise.create_task('flaky', call => 'flaky', max_attempts => 3,
                                      retry_backoff => '100 milliseconds', retry_backoff_max => '150 milliseconds');
         SELECT chunkwise.plan('flaky', 'SELECT g AS key FROM generate_series(1, 1000) g');",
    )
    .unwrap();
    let (_, processed, failed, dead) = run(&mut db, "SELECT * FROM chunkwise.run('flaky', 2)");
    assert_eq!((processed, failed, dead), (990, 30, 10));
    assert_eq!(status_counts(&mut db, "flaky"), (0, 990, 10));

    let rows = db
        .query("SELECT key, status, attempts, sqlstate, message, next_retry FROM chunkwise.failures ORDER BY key", &[])
        .unwrap();
    assert_eq!(rows.len(), 10);
    for (i, row) in rows.iter().enumerate() {
        let key: i64 = row.get(0);
        assert_eq!(key, (i as i64 + 1) * 100);
        assert_eq!(row.get::<_, &str>(1), "dead");
        assert_eq!(row.get::<_, i32>(2), 3);
        assert_eq!(row.get::<_, &str>(3), "23514");
        assert_eq!(row.get::<_, String>(4), format!("key {key} is cursed"));
        assert!(
            row.get::<_, Option<std::time::SystemTime>>(5).is_none(),
            "dead items have no next retry"
        );
    }
    // Two workers did all the good items: a failure did not end a worker.
    let pids: i64 = one(&mut db, "SELECT count(DISTINCT pid) FROM log");
    assert!(pids <= 2);
    let logged: i64 = one(&mut db, "SELECT count(*) FROM log");
    assert_eq!(logged, 990);
}

/// A deferred constraint is checked when the transaction commits, after the item's
/// subtransaction is long released (Citus's PREPARE on a worker node that went away
/// fails at the same moment). Such an item fails and is retried like any other, and the
/// worker goes on, rather than the commit's ERROR ending the worker.
#[test]
fn an_item_failing_only_at_commit_is_retried_and_the_worker_goes_on() {
    let mut db = test_db("commit_failures");
    db.batch_execute(
        "CREATE TABLE claimed (k bigint, UNIQUE (k) DEFERRABLE INITIALLY DEFERRED);
         INSERT INTO claimed VALUES (7);
         CREATE TABLE log (k bigint PRIMARY KEY, pid int NOT NULL);
         CREATE PROCEDURE claim(k bigint) LANGUAGE sql AS $$
           INSERT INTO claimed VALUES (k); INSERT INTO log VALUES (k, pg_backend_pid()) $$;
         SELECT chunkwise.create_task('claim', call => 'claim', max_attempts => 2,
                                      retry_backoff => '10 milliseconds', retry_backoff_max => '10 milliseconds');
         SELECT chunkwise.plan('claim', 'SELECT g AS key FROM generate_series(1, 20) g');",
    )
    .unwrap();
    let (_, processed, failed, dead) = run(&mut db, "SELECT * FROM chunkwise.run('claim', 1)");
    assert_eq!((processed, failed, dead), (19, 2, 1));
    let row = db
        .query_one(
            "SELECT status, attempts, sqlstate FROM chunkwise.failures WHERE key = 7",
            &[],
        )
        .unwrap();
    assert_eq!(
        (
            row.get::<_, &str>(0),
            row.get::<_, i32>(1),
            row.get::<_, &str>(2)
        ),
        ("dead", 2, "23505")
    );
    // One worker did every other item, and its run finished rather than broke off.
    let (pids, logged): (i64, i64) = two(&mut db, "SELECT count(DISTINCT pid), count(*) FROM log");
    assert_eq!((pids, logged), (1, 19));
    let state: String = one(&mut db, "SELECT state FROM chunkwise.runs");
    assert_eq!(state, "finished");
}

/// One item of a batch that fails only at commit (a deferred constraint) rolls the whole
/// batch back: its items are then run one per transaction, so that only the culprit is
/// charged and the 99 innocent items are done.
#[test]
fn a_batch_failing_at_commit_charges_only_the_item_that_fails() {
    let mut db = test_db("batch_blame");
    db.batch_execute(
        "CREATE TABLE claimed (k bigint, UNIQUE (k) DEFERRABLE INITIALLY DEFERRED);
         INSERT INTO claimed VALUES (37);
         CREATE PROCEDURE claim(k bigint) LANGUAGE sql AS 'INSERT INTO claimed VALUES (k)';
         SELECT chunkwise.create_task('claim', call => 'claim', max_attempts => 1, items_per_commit => 100);
         SELECT chunkwise.plan('claim', 'SELECT g AS key FROM generate_series(1, 100) g');",
    )
    .unwrap();
    let (_, processed, failed, dead) = run(&mut db, "SELECT * FROM chunkwise.run('claim', 1)");
    assert_eq!((processed, failed, dead), (99, 1, 1));
    let dead_keys: Vec<i64> = column(
        &mut db,
        "SELECT key FROM chunkwise.items WHERE status = 'dead'",
    );
    assert_eq!(dead_keys, [37]);
    let innocent_attempts: i64 = one(
        &mut db,
        "SELECT count(*) FROM chunkwise.items WHERE attempts > 0 AND key <> 37",
    );
    assert_eq!(innocent_attempts, 0);
}

/// alter_task(max_attempts) takes effect for running workers, and their log says the
/// limit that applied.
#[test]
fn a_changed_max_attempts_applies_at_once_and_the_log_says_so() {
    let mut db = test_db("attempts_changed");
    db.batch_execute(
        "CREATE TABLE seen (n int);
         CREATE PROCEDURE fails_twice(k bigint) LANGUAGE plpgsql AS $$
         BEGIN
           IF (SELECT attempts FROM chunkwise.items WHERE key = k) = 1 THEN
             PERFORM * FROM dblink('dbname=attempts_changed host=' || current_setting('unix_socket_directories')
                                   || ' port=' || current_setting('port') || ' user=postgres',
                                   $q$SELECT chunkwise.alter_task('limit_changed', max_attempts => 2)::text$q$)
                       AS altered(result text);
           END IF;
           RAISE EXCEPTION 'no luck with %', k;
         END $$;
         CREATE EXTENSION dblink;
         SELECT chunkwise.create_task('limit_changed', call => 'fails_twice', max_attempts => 5,
                                      retry_backoff => '1 millisecond', retry_backoff_max => '1 millisecond');
         SELECT chunkwise.enqueue('limit_changed', 4242);",
    )
    .unwrap();
    let (_, _, failed, dead) = run(&mut db, "SELECT * FROM chunkwise.run('limit_changed', 1)");
    assert_eq!((failed, dead), (2, 1), "the second attempt was the last");
    assert!(
        Cluster::get().server_log().contains(
            "pg_chunkwise task \"limit_changed\" key 4242 failed on attempt 2 of 2 [SQLSTATE P0001]: no luck with 4242; the item is dead"
        ),
        "the log gives the limit that applied"
    );
}

/// The rows a target returns are thrown away as they come, not collected in the
/// worker's memory: after an item that returns two million rows, the worker's peak
/// resident memory stays far below what holding them takes (over 100 MB).
#[test]
fn rows_a_target_returns_are_not_held_in_worker_memory() {
    let mut db = test_db("many_rows");
    db.batch_execute(
        "CREATE TABLE measured (done boolean);
         CREATE FUNCTION rows_or_wait(k bigint) RETURNS SETOF bigint LANGUAGE plpgsql AS $$
         BEGIN
           IF k = 1 THEN RETURN QUERY SELECT g::bigint FROM generate_series(1, 2000000) g; RETURN; END IF;
           FOR i IN 1..3000 LOOP  -- item 2 waits (at most 30 s) while the test looks
             EXIT WHEN EXISTS (SELECT FROM measured);
             PERFORM pg_sleep(0.01);
           END LOOP;
         END $$;
         SELECT chunkwise.create_task('many_rows', statement => 'SELECT rows_or_wait($1)');
         SELECT chunkwise.enqueue('many_rows', 1);
         SELECT chunkwise.enqueue('many_rows', 2);",
    )
    .unwrap();
    let run_id: i64 = one(&mut db, "SELECT chunkwise.start('many_rows', workers => 1)");
    let pid = worker_running_key(&mut db, 2);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peak_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status");
    db.batch_execute("INSERT INTO measured VALUES (true)")
        .unwrap();
    let (state, processed): (String, i64) = two(
        &mut db,
        &format!("SELECT state, processed FROM chunkwise.wait({run_id})"),
    );
    assert_eq!((state.as_str(), processed), ("finished", 2));
    assert!(
        peak_kb < 60 * 1024,
        "the worker's peak resident memory was {peak_kb} kB"
    );
}

/// A target that enqueues its own key again (a follow-up: "run me once more") gets the
/// follow-up: the item stays pending and runs again, instead of the enqueue being merged
/// into the running item and lost when it is marked done.
#[test]
fn a_target_enqueuing_its_own_key_runs_again() {
    let mut db = test_db("requeue_self");
    db.batch_execute(
        "CREATE TABLE ran (k bigint);
         CREATE PROCEDURE again(k bigint) LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO ran VALUES (k);
           IF k = 2 AND (SELECT count(*) FROM ran WHERE ran.k = again.k) = 1 THEN
             PERFORM chunkwise.enqueue('again', k);
           END IF;
         END $$;
         SELECT chunkwise.create_task('again', call => 'again');
         SELECT chunkwise.plan('again', 'SELECT g AS key FROM generate_series(1, 3) g');",
    )
    .unwrap();
    let (_, processed, _, _) = run(&mut db, "SELECT * FROM chunkwise.run('again', 1)");
    assert_eq!(processed, 4);
    let runs: Vec<i64> = column(&mut db, "SELECT k FROM ran ORDER BY k");
    assert_eq!(runs, [1, 2, 2, 3]);
    let states: Vec<String> = column(
        &mut db,
        "SELECT key || ' ' || status FROM chunkwise.items ORDER BY key",
    );
    assert_eq!(states, ["1 done", "2 done", "3 done"]);
}

/// A target's own SQLSTATE is recorded as raised, also when PostgreSQL does not define
/// it (pgrx alone would turn P0042 into XX000), when a notice came after it was caught
/// and re-raised, and when a deferred trigger raises it at commit.
#[test]
fn user_defined_sqlstates_are_recorded_as_raised() {
    let mut db = test_db("raised_codes");
    db.batch_execute(
        "CREATE FUNCTION inner_fail(k bigint) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'supplier file % missing', k USING ERRCODE = 'P0042'; END $$;
         CREATE FUNCTION coded(k bigint) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
           RAISE WARNING 'about to try key %', k;
           IF k = 1 THEN PERFORM inner_fail(k); END IF;
           IF k = 2 THEN
             BEGIN PERFORM inner_fail(k);
             EXCEPTION WHEN SQLSTATE 'P0042' THEN
               RAISE NOTICE 'caught it'; RAISE;
             END;
           END IF;
           IF k = 3 THEN RAISE EXCEPTION 'a builtin' USING ERRCODE = 'check_violation'; END IF;
           IF k = 4 THEN INSERT INTO late VALUES (k); END IF;
         END $$;
         CREATE TABLE late (k bigint);
         CREATE FUNCTION refuse_late() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'too late for %', NEW.k USING ERRCODE = 'Z9X99'; END $$;
         CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON late DEFERRABLE INITIALLY DEFERRED
           FOR EACH ROW EXECUTE FUNCTION refuse_late();
         SELECT chunkwise.create_task('coded', call => 'coded', max_attempts => 1);
         SELECT chunkwise.plan('coded', 'SELECT g AS key FROM generate_series(1, 5) g');",
    )
    .unwrap();
    let (_, processed, _, dead) = run(&mut db, "SELECT * FROM chunkwise.run('coded', 1)");
    assert_eq!((processed, dead), (1, 4));
    let codes: Vec<String> = column(
        &mut db,
        "SELECT key || ' ' || sqlstate FROM chunkwise.failures ORDER BY key",
    );
    assert_eq!(codes, ["1 P0042", "2 P0042", "3 23514", "4 Z9X99"]);
}

#[test]
fn retry_is_scheduled_with_exponential_backoff() {
    let mut db = test_db("backoff");
    db.batch_execute(
        "CREATE FUNCTION always_fails(k bigint) RETURNS void LANGUAGE sql AS 'SELECT 1/0';
         SELECT chunkwise.create_task('fails', call => 'always_fails', max_attempts => 10,
                                      retry_backoff => '1 minute', retry_backoff_max => '3 minutes');
         SELECT chunkwise.enqueue('fails', 7);",
    )
    .unwrap();
    // Each run makes one attempt: the next retry is minutes away, beyond retry_wait_max.
    let mut delays = Vec::new();
    for _ in 0..3 {
        let (_, _, failed, _) = run(&mut db, "SELECT * FROM chunkwise.run('fails', 1)");
        assert_eq!(failed, 1);
        let secs: f64 = one(
            &mut db,
            "SELECT extract(epoch FROM next_retry - last_failed_at)::float8 FROM chunkwise.failures",
        );
        delays.push(secs.round() as i64);
        // Make the retry due now for the next round (as the extension owner may).
        db.batch_execute("UPDATE chunkwise.items SET not_before = now() - interval '1 second'")
            .unwrap();
    }
    assert_eq!(
        delays,
        vec![60, 120, 180],
        "1 min, doubled, then capped at retry_backoff_max"
    );
}

#[test]
fn one_worker_runs_items_in_priority_order() {
    let mut db = test_db("priority");
    recorder_task(&mut db, "ordered");
    // key -> priority, enqueued in scrambled order; ties keep enqueue order.
    let items: Vec<(i64, i64)> = (1..=200).map(|k| (k, (k * 7919) % 13)).collect();
    for (key, priority) in &items {
        db.execute(
            "SELECT chunkwise.enqueue('ordered', $1, $2)",
            &[key, priority],
        )
        .unwrap();
    }
    run(&mut db, "SELECT * FROM chunkwise.run('ordered', 1)");
    let done = done_order(&mut db);
    let mut expected = items.clone();
    expected.sort_by_key(|&(key, priority)| (priority, key));
    assert_eq!(done, expected.iter().map(|&(k, _)| k).collect::<Vec<_>>());
    // The done timestamps agree with the order.
    let ordered: bool = one(
        &mut db,
        "SELECT bool_and(ok) FROM (SELECT finished_at >= lag(finished_at) OVER (ORDER BY priority, item_id) \
               OR lag(finished_at) OVER (ORDER BY priority, item_id) IS NULL AS ok FROM chunkwise.items) s",
    );
    assert!(ordered);
}

/// Workers claim after the furthest item any of them reached, so a retry that falls due
/// mid-run lies behind them: the rescan each does every second finds it, and the worker
/// that found it sweeps on through the others in order, well before the run's end (not
/// one straggler per worker per rescan).
#[test]
fn retries_that_fall_due_mid_run_are_swept_up_in_order() {
    let mut db = test_db("stragglers");
    db.batch_execute(
        "CREATE TABLE log (k bigint, at timestamptz DEFAULT clock_timestamp());
         -- Items 1-60 come first and fail until other items have been done.
         CREATE PROCEDURE slow_then_flaky(k bigint) LANGUAGE plpgsql AS $$
         BEGIN
           PERFORM pg_sleep(0.01);
           IF k <= 60 AND (SELECT count(*) FROM log) < 5 THEN
             RAISE EXCEPTION 'not yet' USING ERRCODE = 'lock_not_available';
           END IF;
           INSERT INTO log (k) VALUES (k);
         END $$;
         SELECT chunkwise.create_task('sweep', call => 'slow_then_flaky', max_attempts => 10,
                                      retry_backoff => '100 milliseconds', retry_backoff_max => '100 milliseconds');
         SELECT chunkwise.plan('sweep', 'SELECT g AS key FROM generate_series(1, 1200) g');",
    )
    .unwrap();
    let (_, processed, _, dead) = run(&mut db, "SELECT * FROM chunkwise.run('sweep', 4)");
    assert_eq!((processed, dead), (1200, 0));
    // Items 1-60 failed at their first try (at the start of the run) and fell due 100 ms
    // later; the run lasts about 3 s. All of them must be done before the last 200 items
    // of the queue start.
    let late: i64 = one(
        &mut db,
        "SELECT count(*) FROM log WHERE k <= 60 AND at > (SELECT min(at) FROM log WHERE k > 1000)",
    );
    assert_eq!(late, 0, "retried items waited for the end of the run");
}

#[test]
fn max_items_is_exact_across_workers() {
    let mut db = test_db("max_items");
    bump_task(&mut db, 500, 0.0);
    let (_, processed, _, _) = run(
        &mut db,
        "SELECT * FROM chunkwise.run('bump', 4, max_items => 137)",
    );
    assert_eq!(processed, 137);
    assert_eq!(counter_histogram(&mut db), vec![(0, 363), (1, 137)]);
    assert_eq!(status_counts(&mut db, "bump"), (363, 137, 0));
}

#[test]
fn item_timeout_fails_slow_items_with_query_canceled() {
    let mut db = test_db("item_timeout");
    db.batch_execute(
        "CREATE PROCEDURE slow(k bigint) LANGUAGE sql AS 'SELECT pg_sleep(CASE WHEN k = 2 THEN 5 ELSE 0 END)';
         SELECT chunkwise.create_task('slow', call => 'slow', item_timeout => '200 milliseconds', max_attempts => 1);
         SELECT chunkwise.plan('slow', 'SELECT g AS key FROM generate_series(1, 3) g');",
    )
    .unwrap();
    let (_, processed, failed, dead) = run(&mut db, "SELECT * FROM chunkwise.run('slow', 1)");
    assert_eq!((processed, failed, dead), (2, 1, 1));
    let row = db
        .query_one("SELECT key, sqlstate, message FROM chunkwise.failures", &[])
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 2);
    assert_eq!(row.get::<_, &str>(1), "57014");
    assert!(row.get::<_, &str>(2).contains("statement timeout"));
}

#[test]
fn cancelling_run_stops_workers_after_their_current_item() {
    let mut db = test_db("cancel_run");
    bump_task(&mut db, 5_000, 2.0);
    let mut caller = Cluster::get().connect("cancel_run");
    let cancel = caller.cancel_token();
    let runner = std::thread::spawn(move || {
        caller
            .query("SELECT * FROM chunkwise.run('bump', 2)", &[])
            .map(|_| ())
    });
    wait_for("items to be done", Duration::from_secs(60), || {
        let done: i64 = one(&mut db, "SELECT count(*) FROM counters WHERE n > 0");
        (done >= 20).then_some(())
    });
    cancel.cancel_query(postgres::NoTls).unwrap();
    let err = runner.join().unwrap().expect_err("run() was cancelled");
    assert_eq!(err.code().map(|c| c.code()), Some("57014"));
    wait_for("the workers to stop", Duration::from_secs(30), || {
        live_workers(&mut db).is_empty().then_some(())
    });
    let (pending, done, dead) = status_counts(&mut db, "bump");
    assert!(pending > 0, "cancelled before the end");
    assert_eq!(pending + done + dead, 5_000);
    let bumped: i64 = one(&mut db, "SELECT count(*) FROM counters WHERE n = 1");
    assert_eq!(
        bumped, done,
        "every done item bumped its counter once, and no pending one did"
    );
    let over: i64 = one(&mut db, "SELECT count(*) FROM counters WHERE n > 1");
    assert_eq!(over, 0);
    let state: String = one(&mut db, "SELECT state FROM chunkwise.runs");
    assert_eq!(state, "cancelled");
}

#[test]
fn workers_show_in_pg_stat_activity_and_run_as_the_owner() {
    let mut db = test_db("activity");
    db.batch_execute(
        "CREATE ROLE etl_owner LOGIN;
         CREATE TABLE seen (k bigint, who name, app text);
         GRANT INSERT ON seen TO etl_owner;
         CREATE PROCEDURE note(k bigint) LANGUAGE sql AS
           $$ INSERT INTO seen SELECT k, current_user, current_setting('application_name'); SELECT pg_sleep(0.05) $$;
         GRANT EXECUTE ON PROCEDURE note(bigint) TO etl_owner;",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut owner = Cluster::get().connect_as("activity", "etl_owner");
    owner
        .batch_execute(
            "SELECT chunkwise.create_task('noted', call => 'note');
             SELECT chunkwise.plan('noted', 'SELECT g AS key FROM generate_series(1, 40) g');",
        )
        .unwrap();
    let runner =
        std::thread::spawn(move || run(&mut owner, "SELECT * FROM chunkwise.run('noted', 2)"));
    let (app, query): (String, String) = wait_for(
        "a worker in pg_stat_activity",
        Duration::from_secs(30),
        || {
            db.query(
            "SELECT application_name, query FROM pg_stat_activity \
              WHERE backend_type = 'chunkwise worker' AND state = 'active' AND datname = 'activity'",
            &[],
        )
        .unwrap()
        .first()
        .map(|r| (r.get(0), r.get(1)))
        },
    );
    assert!(app.starts_with("chunkwise noted #"), "{app}");
    assert!(query.starts_with("task noted: key "), "{query}");
    let (_, processed, _, _) = runner.join().unwrap();
    assert_eq!(processed, 40);
    let who: Vec<String> = column(&mut db, "SELECT DISTINCT who::text FROM seen");
    assert_eq!(
        who,
        vec!["etl_owner".to_string()],
        "targets run as the task owner, not a superuser"
    );
}

#[test]
fn a_run_gets_fewer_workers_when_slots_are_busy_and_an_error_when_none_are_free() {
    let mut db = test_db("worker_slots");
    bump_task(&mut db, 10, 0.0);
    db.batch_execute(
        "CREATE PROCEDURE hold(k bigint) LANGUAGE sql AS 'SELECT pg_sleep(3)';
         SELECT chunkwise.create_task('hold', call => 'hold');
         SELECT chunkwise.enqueue('hold', 1);",
    )
    .unwrap();
    let holder = std::thread::spawn(|| {
        let mut client = Cluster::get().connect("worker_slots");
        run(&mut client, "SELECT * FROM chunkwise.run('hold', 1)")
    });
    wait_for("the holding worker", Duration::from_secs(30), || {
        (live_workers(&mut db).len() == 1).then_some(())
    });
    // chunkwise.max_workers = 1 and one worker busy: nothing free.
    db.batch_execute("SET chunkwise.max_workers = 1").unwrap();
    let (code, _, hint) =
        crate::harness::sql_error(db.query("SELECT * FROM chunkwise.run('bump', 1)", &[]));
    assert_eq!(code, "53400");
    assert!(hint.contains("chunkwise.max_workers"));
    // Two allowed, one busy: the run goes ahead with one worker.
    db.batch_execute("SET chunkwise.max_workers = 2").unwrap();
    let (run_id, processed, _, _) = run(&mut db, "SELECT * FROM chunkwise.run('bump', 2)");
    assert_eq!(processed, 10);
    let started: i32 = db
        .query_one(
            "SELECT workers_started FROM chunkwise.runs WHERE run_id = $1",
            &[&run_id],
        )
        .unwrap()
        .get(0);
    assert_eq!(started, 1);
    assert_eq!(holder.join().unwrap().1, 1);
}
