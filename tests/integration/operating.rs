//! Operating tasks: pause/resume, cancel, retry, purge, the DBA views, NOTIFY and
//! metrics(), each seen from a client while real workers run.

use std::thread::JoinHandle;
use std::time::Duration;

use postgres::Client;
use postgres::fallible_iterator::FallibleIterator;

use crate::fixtures::{bump_task, counter_histogram, live_workers, run_task, status_counts};
use crate::harness::{Cluster, one, test_db, wait_for};

/// Starts `run(task, workers)` in another session; the handle yields `processed`.
fn run_in_background(db_name: &'static str, task: &'static str, workers: i32) -> JoinHandle<i64> {
    std::thread::spawn(move || {
        let mut client = Cluster::get().connect(db_name);
        client
            .query_one("SELECT * FROM chunkwise.run($1, $2)", &[&task, &workers])
            .unwrap()
            .get("processed")
    })
}

fn bumped(db: &mut Client) -> i64 {
    one(db, "SELECT count(*) FROM counters WHERE n > 0")
}

fn wait_until_bumped(db: &mut Client, at_least: i64) {
    wait_for("the run to be under way", Duration::from_secs(60), || {
        (bumped(db) >= at_least).then_some(())
    });
}

fn processed_now(db: &mut Client, task: &str) -> (Option<i64>, i64) {
    let row = run_task(db, task, None);
    (row.get("run_id"), row.get("processed"))
}

#[test]
fn pause_stops_the_workers_after_their_item_and_resume_lets_the_next_run_finish() {
    let mut db = test_db("pause_resume");
    bump_task(&mut db, 2_000, 5.0);
    let runner = run_in_background("pause_resume", "bump", 2);
    wait_until_bumped(&mut db, 50);
    db.execute("SELECT chunkwise.pause('bump')", &[]).unwrap();
    let first = runner.join().unwrap();
    assert!((50..2_000).contains(&first), "paused mid-run: {first}");
    wait_for("the workers to exit", Duration::from_secs(30), || {
        live_workers(&mut db).is_empty().then_some(())
    });
    assert_eq!(bumped(&mut db), first, "each finished item counted once");
    let paused: bool = one(
        &mut db,
        "SELECT paused FROM chunkwise.task_status WHERE task = 'bump'",
    );
    assert!(paused);

    // While paused, a run starts nothing.
    assert_eq!(processed_now(&mut db, "bump"), (None, 0));

    db.execute("SELECT chunkwise.resume('bump')", &[]).unwrap();
    let (_, second) = processed_now(&mut db, "bump");
    assert_eq!(first + second, 2_000);
    assert_eq!(counter_histogram(&mut db), vec![(1, 2_000)]);
}

#[test]
fn cancel_from_another_session_stops_the_run_and_nothing_is_lost() {
    let mut db = test_db("cancel_task");
    bump_task(&mut db, 2_000, 5.0);
    let runner = run_in_background("cancel_task", "bump", 2);
    wait_until_bumped(&mut db, 50);
    let told: i64 = one(&mut db, "SELECT chunkwise.cancel('bump')");
    assert_eq!(told, 2, "both workers told to stop");
    let first = runner.join().unwrap();
    assert!(first < 2_000);
    wait_for("the workers to exit", Duration::from_secs(30), || {
        live_workers(&mut db).is_empty().then_some(())
    });
    let state: String = one(&mut db, "SELECT state FROM chunkwise.runs");
    assert_eq!(state, "cancelled");

    // The cancel was for that run only: the next one runs to the end.
    let (_, second) = processed_now(&mut db, "bump");
    assert_eq!(first + second, 2_000);
    assert_eq!(counter_histogram(&mut db), vec![(1, 2_000)]);
    assert_eq!(status_counts(&mut db, "bump"), (0, 2_000, 0));
}

/// A task over keys 1..=`keys` whose target fails while `broken` holds the key.
fn fragile_task(db: &mut Client, keys: i64, broken: &[i64]) {
    db.batch_execute(&format!(
        "CREATE TABLE broken (k bigint PRIMARY KEY);
         CREATE TABLE loaded (k bigint PRIMARY KEY);
         INSERT INTO broken SELECT unnest('{{{}}}'::bigint[]);
         CREATE PROCEDURE load(k bigint) LANGUAGE plpgsql AS $$
         BEGIN
           IF EXISTS (SELECT FROM broken b WHERE b.k = load.k) THEN
             RAISE EXCEPTION 'key % is broken', k;
           END IF;
           INSERT INTO loaded VALUES (k);
         END $$;",
        broken
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    ))
    .unwrap();
    db.batch_execute(&format!(
        "SELECT chunkwise.create_task('fragile', call => 'load', max_attempts => 1);
         SELECT chunkwise.plan('fragile', 'SELECT g AS key FROM generate_series(1, {keys}) g');"
    ))
    .unwrap();
}

#[test]
fn retry_makes_dead_items_pending_again_with_their_attempts_reset() {
    let mut db = test_db("retry_dead");
    fragile_task(&mut db, 20, &[3, 7]);
    processed_now(&mut db, "fragile");
    assert_eq!(status_counts(&mut db, "fragile"), (0, 18, 2));

    // Nothing to retry in another task; the fix, then the retry.
    db.batch_execute("DELETE FROM broken").unwrap();
    let revived: i64 = one(&mut db, "SELECT chunkwise.retry('fragile')");
    assert_eq!(revived, 2);
    let attempts: Vec<i32> = db
        .query(
            "SELECT attempts FROM chunkwise.items WHERE key IN (3, 7) ORDER BY key",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(attempts, vec![0, 0]);
    let (_, processed) = processed_now(&mut db, "fragile");
    assert_eq!(processed, 2);
    assert_eq!(status_counts(&mut db, "fragile"), (0, 20, 0));
    let loaded: i64 = one(&mut db, "SELECT count(*) FROM loaded");
    assert_eq!(loaded, 20);
}

#[test]
fn purge_removes_only_finished_items_and_runs_older_than_asked() {
    let mut db = test_db("purge");
    fragile_task(&mut db, 30, &[5]);
    processed_now(&mut db, "fragile");
    db.batch_execute(
        "SELECT chunkwise.enqueue('fragile', 1000);
         UPDATE chunkwise.items SET finished_at = now() - interval '10 days' WHERE key <= 10;
         UPDATE chunkwise.run_history SET finished_at = now() - interval '10 days';",
    )
    .unwrap();
    let removed: i64 = one(&mut db, "SELECT chunkwise.purge('fragile', '7 days')");
    assert_eq!(removed, 10, "keys 1..10: nine done, one dead");
    let left: Vec<(String, i64)> = db
        .query(
            "SELECT status, count(*) FROM chunkwise.items GROUP BY status ORDER BY status",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        left,
        vec![("done".to_string(), 20), ("pending".to_string(), 1)]
    );
    let runs: i64 = one(&mut db, "SELECT count(*) FROM chunkwise.runs");
    assert_eq!(runs, 0, "the old run is gone");
    // A zero interval removes every finished item, never a pending one.
    let removed: i64 = one(&mut db, "SELECT chunkwise.purge('fragile', '0')");
    assert_eq!(removed, 20);
    assert_eq!(status_counts(&mut db, "fragile"), (1, 0, 0));
}

#[test]
fn listeners_hear_when_an_item_goes_dead_and_when_a_run_finishes() {
    let mut db = test_db("notify");
    fragile_task(&mut db, 10, &[4]);
    let mut listener = Cluster::get().connect("notify");
    listener.batch_execute("LISTEN chunkwise").unwrap();
    let (run_id, processed) = processed_now(&mut db, "fragile");
    assert_eq!(processed, 9);

    let mut events: Vec<serde_json::Value> = Vec::new();
    {
        let mut notifications = listener.notifications();
        let mut waiting = notifications.timeout_iter(Duration::from_secs(10));
        while events.len() < 2 {
            let note = waiting
                .next()
                .unwrap()
                .expect("two notifications within 10 s");
            assert_eq!(note.channel(), "chunkwise");
            events.push(serde_json::from_str(note.payload()).unwrap());
        }
    }
    // Payloads carry ids only; the details are read back through the views.
    let dead = events
        .iter()
        .find(|e| e["event"] == "item_dead")
        .expect("an item_dead event");
    assert_eq!(dead["run_id"], serde_json::json!(run_id.unwrap()));
    let item_id = dead["item_id"].as_i64().expect("an item id");
    let row = listener
        .query_one(
            "SELECT task, key, sqlstate, message FROM chunkwise.failures WHERE item_id = $1",
            &[&item_id],
        )
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, i64>(1),
            row.get::<_, String>(2),
            row.get::<_, String>(3)
        ),
        (
            "fragile".to_string(),
            4,
            "P0001".to_string(),
            "key 4 is broken".to_string()
        )
    );
    let finished = events
        .iter()
        .find(|e| e["event"] == "run_finished")
        .expect("a run_finished event");
    assert_eq!(
        finished.as_object().map(|o| o.len()),
        Some(2),
        "event and run_id only: {finished}"
    );
    let row = listener
        .query_one(
            "SELECT task, processed, failed, dead FROM chunkwise.runs WHERE run_id = $1",
            &[&finished["run_id"].as_i64().unwrap()],
        )
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2),
            row.get::<_, i64>(3)
        ),
        ("fragile".to_string(), 9, 1, 1)
    );
}

#[test]
fn views_show_live_workers_their_items_runs_and_priority_tiers() {
    let mut db = test_db("views");
    bump_task(&mut db, 600, 50.0);
    // Two tiers: keys 1..100 in tier 1, the rest in tier 2.
    db.batch_execute(
        "SELECT chunkwise.plan('bump', 'SELECT k AS key, CASE WHEN k <= 100 THEN 1 ELSE 2 END * 1000000000000 + k AS priority FROM counters')",
    )
    .unwrap();
    let runner = run_in_background("views", "bump", 2);
    let workers: Vec<(i32, String, i64, i64)> = wait_for(
        "two busy workers",
        Duration::from_secs(30),
        || {
            let rows: Vec<_> = db
                .query(
                    "SELECT pid, task, run_id, current_key FROM chunkwise.workers WHERE current_key IS NOT NULL",
                    &[],
                )
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
                .collect();
            (rows.len() == 2).then_some(rows)
        },
    );
    assert!(
        workers
            .iter()
            .all(|w| w.1 == "bump" && (1..=600).contains(&w.3))
    );
    let running: (String, i64) = db
        .query_one("SELECT state, workers_live FROM chunkwise.runs", &[])
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(running, ("running".to_string(), 2));
    wait_for("items done to show", Duration::from_secs(30), || {
        let done: i64 = db
            .query_one("SELECT sum(items_done)::bigint FROM chunkwise.workers", &[])
            .unwrap()
            .get::<_, Option<i64>>(0)
            .unwrap_or(0);
        (done > 0).then_some(())
    });
    db.execute("SELECT chunkwise.cancel('bump')", &[]).unwrap();
    runner.join().unwrap();

    let tiers: Vec<(i64, i64, i64)> = db
        .query(
            "SELECT tier, pending + waiting_retry, done FROM chunkwise.priority_summary ORDER BY tier",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(tiers.len(), 2);
    assert_eq!(tiers[0].1 + tiers[0].2, 100);
    assert_eq!(tiers[1].1 + tiers[1].2, 500);
    assert!(
        tiers[0].2 > 0 && tiers[1].2 == 0,
        "tier 1 runs first: {tiers:?}"
    );
}

#[test]
fn metrics_are_valid_prometheus_text_with_a_sample_per_task() {
    let mut db = test_db("metrics");
    fragile_task(&mut db, 10, &[2]);
    processed_now(&mut db, "fragile");
    db.batch_execute(
        "CREATE PROCEDURE nothing(k bigint) LANGUAGE sql AS 'SELECT 1';
         SELECT chunkwise.create_task('idle', call => 'nothing');
         SELECT chunkwise.enqueue('idle', 1);",
    )
    .unwrap();
    let text: String = one(&mut db, "SELECT chunkwise.metrics()");
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition format");
    let value = |name: &str, task: &str| -> f64 {
        let sample = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get("task") == Some(task))
            .unwrap_or_else(|| panic!("{name}{{task={task}}} in:\n{text}"));
        match sample.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: unexpected {other:?}"),
        }
    };
    assert_eq!(value("chunkwise_items_done", "fragile"), 9.0);
    assert_eq!(value("chunkwise_items_dead", "fragile"), 1.0);
    assert_eq!(value("chunkwise_items_processed_total", "fragile"), 9.0);
    assert_eq!(value("chunkwise_item_failures_total", "fragile"), 1.0);
    assert_eq!(value("chunkwise_runs_total", "fragile"), 1.0);
    assert_eq!(value("chunkwise_items_pending", "idle"), 1.0);
    assert_eq!(value("chunkwise_task_paused", "idle"), 0.0);
    for family in ["chunkwise_items_done", "chunkwise_items_processed_total"] {
        assert!(scrape.docs.contains_key(family), "HELP line for {family}");
    }
    assert!(text.contains("# TYPE chunkwise_items_processed_total counter"));
    assert!(text.contains("# TYPE chunkwise_items_pending gauge"));
}

/// The stored options of task `t` that alter_task touches, as text.
fn options_of(db: &mut Client) -> Vec<Option<String>> {
    let row = db
        .query_one(
            "SELECT call::text, statement, after, workers::text, max_attempts::text, item_timeout::text, \
                    max_items_per_cycle::text \
               FROM chunkwise.tasks WHERE task = 't'",
            &[],
        )
        .unwrap();
    (0..7).map(|i| row.get(i)).collect()
}

#[test]
fn alter_task_changes_what_it_is_given_clears_with_empty_values_and_refuses_bad_ones() {
    let mut db = test_db("alter_task");
    crate::fixtures::counters(&mut db, 10, 0.0);
    db.batch_execute(
        "SELECT chunkwise.create_task('t', call => 'bump', after => 'SELECT $1', workers => 3,
                                      item_timeout => '1 minute', max_items_per_cycle => 50);",
    )
    .unwrap();
    let some = |s: &str| Some(s.to_string());
    db.execute("SELECT chunkwise.alter_task('t', max_attempts => 9)", &[])
        .unwrap();
    assert_eq!(
        options_of(&mut db),
        vec![
            some("bump(bigint)"),
            None,
            some("SELECT $1"),
            some("3"),
            some("9"),
            some("00:01:00"),
            some("50")
        ]
    );

    db.execute(
        "SELECT chunkwise.alter_task('t', statement => 'UPDATE counters SET n = n + 10 WHERE k = $1', \
                                     after => '', workers => 0, item_timeout => '0', max_items_per_cycle => 0)",
        &[],
    )
    .unwrap();
    let altered = options_of(&mut db);
    assert_eq!(
        altered,
        vec![
            None,
            some("UPDATE counters SET n = n + 10 WHERE k = $1"),
            None,
            None,
            some("9"),
            None,
            None
        ]
    );

    let (code, _, hint) = crate::harness::sql_error(db.query(
        "SELECT chunkwise.alter_task('t', items_per_commit => 0)",
        &[],
    ));
    assert_eq!(code, "22023");
    assert!(!hint.is_empty());
    assert_eq!(
        options_of(&mut db),
        altered,
        "a refused alter changes nothing"
    );

    // The next run uses the new statement.
    db.execute("SELECT chunkwise.enqueue('t', 4)", &[]).unwrap();
    db.query_one("SELECT * FROM chunkwise.run('t')", &[])
        .unwrap();
    let n: i32 = one(&mut db, "SELECT n FROM counters WHERE k = 4");
    assert_eq!(n, 10);
}

#[test]
fn settings_reload_on_sighup_without_a_restart() {
    let mut db = test_db("reload_settings");
    bump_task(&mut db, 10, 0.0);
    // A new session reads the reloaded configuration.
    let setting = || -> String {
        Cluster::get()
            .connect("reload_settings")
            .query_one("SHOW chunkwise.max_workers", &[])
            .unwrap()
            .get(0)
    };
    db.batch_execute("ALTER SYSTEM SET chunkwise.max_workers = 2")
        .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_for("the reload", Duration::from_secs(10), || {
        (setting() == "2").then_some(())
    });
    let mut fresh = Cluster::get().connect("reload_settings");
    let (code, message, _) =
        crate::harness::sql_error(fresh.query("SELECT * FROM chunkwise.run('bump', 3)", &[]));
    db.batch_execute("ALTER SYSTEM RESET chunkwise.max_workers")
        .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    assert_eq!(code, "22023", "{message}");
    assert!(message.contains("chunkwise.max_workers (2)"), "{message}");
    wait_for("the reset", Duration::from_secs(10), || {
        (setting() == "24").then_some(())
    });
}

/// The README's `ALTER SYSTEM SET chunkwise.max_workers = ...` works in a session that
/// has not loaded the library (a fresh psql as the DBA opens it), and the value reaches
/// sessions that do.
#[test]
fn the_readmes_alter_system_works_in_a_fresh_session() {
    let cluster = Cluster::get();
    let mut fresh = cluster.connect("postgres");
    let loaded: i64 = one(
        &mut fresh,
        "SELECT count(*) FROM pg_settings WHERE name = 'chunkwise.max_workers'",
    );
    assert_eq!(loaded, 0, "this session has not loaded pg_chunkwise");
    fresh
        .batch_execute("ALTER SYSTEM SET chunkwise.max_workers = 16")
        .expect("the README's command works as written");
    fresh.batch_execute("SELECT pg_reload_conf()").unwrap();
    let setting = || -> String {
        let mut client = cluster.connect("postgres");
        client.batch_execute("LOAD 'pg_chunkwise'").unwrap();
        client
            .query_one("SHOW chunkwise.max_workers", &[])
            .unwrap()
            .get(0)
    };
    wait_for("the reload", Duration::from_secs(10), || {
        (setting() == "16").then_some(())
    });
    fresh
        .batch_execute("ALTER SYSTEM RESET chunkwise.max_workers")
        .unwrap();
    fresh.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_for("the reset", Duration::from_secs(10), || {
        (setting() == "24").then_some(())
    });
}

/// drop_task takes the task's items, groups and runs with it (and only the task's): the
/// groups and runs by their foreign keys, the items by its own delete.
#[test]
fn drop_task_removes_the_tasks_items_groups_and_runs_and_nothing_else() {
    let mut db = test_db("drop_task_rows");
    db.batch_execute(
        "CREATE TABLE done_keys (k bigint);
         CREATE PROCEDURE note(k bigint) LANGUAGE sql AS 'INSERT INTO done_keys VALUES (k)';
         SELECT chunkwise.create_task('gone', call => 'note', sequential_groups => true);
         SELECT chunkwise.create_task('kept', call => 'note', sequential_groups => true);",
    )
    .unwrap();
    for task in ["gone", "kept"] {
        let planned: i64 = one(
            &mut db,
            &format!(
                "SELECT chunkwise.plan('{task}', 'SELECT k AS key, (k % 3)::text AS group_key \
                   FROM generate_series(1, 30) k')"
            ),
        );
        assert_eq!(planned, 30);
        // Half of each run: done items, pending items and a run row all exist.
        let processed: i64 = one(
            &mut db,
            &format!("SELECT processed FROM chunkwise.run('{task}', 2, max_items => 15)"),
        );
        assert_eq!(processed, 15);
    }
    let rows_of = |db: &mut Client, task: &str| -> (i64, i64, i64) {
        let row = db
            .query_one(
                "SELECT (SELECT count(*) FROM chunkwise.items i WHERE i.task_id = t.task_id), \
                        (SELECT count(*) FROM chunkwise.groups g WHERE g.task_id = t.task_id), \
                        (SELECT count(*) FROM chunkwise.run_history r WHERE r.task_id = t.task_id) \
                   FROM chunkwise.tasks t WHERE t.task = $1",
                &[&task],
            )
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(rows_of(&mut db, "gone"), (30, 3, 1));
    let gone_id: i32 = one(
        &mut db,
        "SELECT task_id FROM chunkwise.tasks WHERE task = 'gone'",
    );
    db.batch_execute("SELECT chunkwise.drop_task('gone')")
        .unwrap();
    let left: (i64, i64, i64) = {
        let row = db
            .query_one(
                "SELECT (SELECT count(*) FROM chunkwise.items WHERE task_id = $1), \
                        (SELECT count(*) FROM chunkwise.groups WHERE task_id = $1), \
                        (SELECT count(*) FROM chunkwise.run_history WHERE task_id = $1)",
                &[&gone_id],
            )
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(left, (0, 0, 0), "nothing of the dropped task is left");
    assert_eq!(
        rows_of(&mut db, "kept"),
        (30, 3, 1),
        "the other task is untouched"
    );
}

/// DROP EXTENSION leaves the tasks' owner anchors behind (they are not members of the
/// extension); a reinstalled extension still creates a task of an old name.
#[test]
fn a_task_of_an_old_name_can_be_created_after_the_extension_is_reinstalled() {
    let mut db = test_db("reinstalled");
    db.batch_execute(
        "SELECT chunkwise.create_task('refresh', statement => 'SELECT $1');
         DROP EXTENSION pg_chunkwise CASCADE;
         CREATE EXTENSION pg_chunkwise;
         SELECT chunkwise.create_task('refresh', statement => 'SELECT $1');
         SELECT chunkwise.enqueue('refresh', 7);",
    )
    .unwrap();
    let anchored: bool = one(
        &mut db,
        "SELECT t.anchor = ty.oid FROM chunkwise.tasks t, pg_type ty \
          WHERE t.task = 'refresh' AND ty.typname = 'task:refresh'",
    );
    assert!(
        anchored,
        "the new task is anchored to the anchor of its name"
    );
    let anchors: i64 = one(
        &mut db,
        "SELECT count(*) FROM pg_type WHERE typname = 'task:refresh'",
    );
    assert_eq!(anchors, 1, "one anchor, the new task's");
}
