//! Pipelines: a run that is over calls its task's on_success or on_failure once, a
//! successful run starts a cycle of each task in its `then` (which plans from its own
//! source), `depends_on` holds a cycle until every upstream task's latest run succeeded,
//! and all of it happens exactly once even when the worker calling the callback is
//! killed and the server restarts.

use std::time::Duration;

use postgres::Client;

use crate::harness::{Cluster, one, queue_snapshot, sql_error, test_db, wait_for};

const DEADLINE: Duration = Duration::from_secs(60);

/// An inbox of keys and tasks over it: `calls` records every callback, `seen` every item
/// a task handled. `stage(name, extra)` creates a task whose items record themselves and
/// whose source is every inbox key.
fn pipeline_db(name: &str) -> Client {
    let mut db = test_db(name);
    db.batch_execute(
        "CREATE TABLE inbox (k bigint PRIMARY KEY);
         CREATE TABLE seen (task text, k bigint);
         CREATE TABLE calls (callback text, task text, run_id bigint, processed bigint,
                             failed bigint, dead bigint);
         CREATE PROCEDURE succeeded(task text, run_id bigint, processed bigint, failed bigint, dead bigint)
         LANGUAGE sql AS $$ INSERT INTO calls VALUES ('on_success', task, run_id, processed, failed, dead) $$;
         CREATE PROCEDURE failed(task text, run_id bigint, processed bigint, failed bigint, dead bigint)
         LANGUAGE sql AS $$ INSERT INTO calls VALUES ('on_failure', task, run_id, processed, failed, dead) $$;
         INSERT INTO inbox SELECT generate_series(1, 5);",
    )
    .unwrap();
    db
}

/// Creates a task whose items insert (task, key) into `seen` and whose source is every
/// inbox key (with `options` added to create_task).
fn stage(db: &mut Client, task: &str, options: &str) {
    db.batch_execute(&format!(
        "SELECT chunkwise.create_task('{task}',
             statement => 'INSERT INTO seen VALUES (''{task}'', $1)',
             source => 'SELECT k AS key FROM inbox'{options})"
    ))
    .unwrap();
}

fn runs_of(db: &mut Client, task: &str) -> i64 {
    db.query_one(
        "SELECT count(*) FROM chunkwise.runs WHERE task = $1",
        &[&task],
    )
    .unwrap()
    .get(0)
}

/// Waits until `task` has `count` runs that are over and settled (its pipeline view row
/// shows the latest one's outcome).
fn wait_for_settled_runs(db: &mut Client, task: &str, count: i64) {
    wait_for(&format!("{count} settled runs of {task}"), DEADLINE, || {
        let settled: i64 = db
            .query_one(
                "SELECT count(*) FROM chunkwise.runs r \
                       JOIN chunkwise.pipeline p USING (task) \
                      WHERE r.task = $1 AND r.state <> 'running' \
                        AND p.last_run IN ('succeeded', 'failed')",
                &[&task],
            )
            .unwrap()
            .get(0);
        (settled >= count).then_some(())
    });
}

fn calls(db: &mut Client, callback: &str, task: &str) -> i64 {
    db.query_one(
        "SELECT count(*) FROM calls WHERE callback = $1 AND task = $2",
        &[&callback, &task],
    )
    .unwrap()
    .get(0)
}

/// a then b then c: one cycle of a runs b and c once each (each planning from its own
/// source), and on_success is called once with the run's figures; a second cycle of a
/// runs them once more.
#[test]
fn a_chain_runs_each_downstream_task_once_per_successful_run() {
    let mut db = pipeline_db("pipeline_chain");
    stage(&mut db, "c", "");
    stage(&mut db, "b", ", \"then\" => '{c}'");
    stage(
        &mut db,
        "a",
        ", \"then\" => ARRAY['b'], on_success => 'succeeded', on_failure => 'failed'",
    );
    assert_eq!(
        one::<String>(
            &mut db,
            "SELECT format('%s|%s|%s', started_by, depends_on, starts) FROM chunkwise.pipeline WHERE task = 'b'"
        ),
        "{a}|{}|{c}"
    );

    for round in 1..=2 {
        db.batch_execute("CALL chunkwise.run_cycle('a')").unwrap();
        wait_for_settled_runs(&mut db, "c", round);
        assert_eq!(runs_of(&mut db, "a"), round);
        assert_eq!(runs_of(&mut db, "b"), round, "b runs once per run of a");
        assert_eq!(runs_of(&mut db, "c"), round, "c runs once per run of b");
        assert_eq!(calls(&mut db, "on_success", "a"), round);
        assert_eq!(calls(&mut db, "on_failure", "a"), 0);
        for task in ["a", "b", "c"] {
            let seen: i64 = db
                .query_one("SELECT count(*) FROM seen WHERE task = $1", &[&task])
                .unwrap()
                .get(0);
            assert_eq!(seen, 5 * round, "{task} planned from its own source");
        }
    }
    let (processed, run_matches): (i64, bool) = {
        let row = db
            .query_one(
                "SELECT c.processed, c.run_id = (SELECT max(run_id) FROM chunkwise.runs WHERE task = 'a') \
                   FROM calls c ORDER BY c.run_id DESC LIMIT 1",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(processed, 5, "the callback gets the run's figures");
    assert!(run_matches, "and its run id");
}

/// A run with a dead item calls on_failure (with its figures), not on_success, and starts
/// nothing downstream.
#[test]
fn a_failing_run_calls_on_failure_and_starts_nothing() {
    let mut db = pipeline_db("pipeline_failure");
    stage(&mut db, "after_failure", "");
    db.batch_execute(
        "SELECT chunkwise.create_task('fragile', statement => 'SELECT 1 / ($1 - 2)',
             max_attempts => 1, on_success => 'succeeded', on_failure => 'failed',
             \"then\" => '{after_failure}');
         SELECT chunkwise.plan('fragile', 'SELECT k AS key FROM inbox');",
    )
    .unwrap();
    let dead: i64 = one(&mut db, "SELECT dead FROM chunkwise.run('fragile')");
    assert_eq!(dead, 1);
    // The run's last worker settles it before it exits, and run() waits for it.
    assert_eq!(calls(&mut db, "on_failure", "fragile"), 1);
    assert_eq!(calls(&mut db, "on_success", "fragile"), 0);
    assert_eq!(
        one::<i64>(&mut db, "SELECT dead FROM calls WHERE task = 'fragile'"),
        1
    );
    assert_eq!(
        one::<String>(
            &mut db,
            "SELECT last_run FROM chunkwise.pipeline WHERE task = 'fragile'"
        ),
        "failed"
    );
    assert_eq!(runs_of(&mut db, "after_failure"), 0);
    assert!(!one::<bool>(
        &mut db,
        "SELECT cycle_requested FROM chunkwise.pipeline WHERE task = 'after_failure'"
    ));
}

/// Fan-in: report depends on (and is started by) both loads. After the first load alone
/// it waits, saying for what; run_cycle of it waits too; after the second load it runs,
/// once.
#[test]
fn fan_in_waits_for_every_upstream_task() {
    let mut db = pipeline_db("pipeline_fan_in");
    stage(&mut db, "load_a", "");
    stage(&mut db, "load_b", "");
    stage(&mut db, "report", ", depends_on => '{load_a,load_b}'");
    db.batch_execute(
        "SELECT chunkwise.alter_task('load_a', \"then\" => '{report}');
         SELECT chunkwise.alter_task('load_b', \"then\" => '{report}');
         SELECT chunkwise.plan('load_a', 'SELECT k AS key FROM inbox');
         SELECT chunkwise.plan('load_b', 'SELECT k AS key FROM inbox');",
    )
    .unwrap();
    db.batch_execute("SELECT * FROM chunkwise.run('load_a')")
        .unwrap();
    assert_eq!(runs_of(&mut db, "report"), 0, "load_b has not run yet");
    let waiting: String = one(
        &mut db,
        "SELECT waiting_for FROM chunkwise.pipeline WHERE task = 'report'",
    );
    assert_eq!(waiting, "load_b (no run yet)");

    let (mut notices_db, notices) = Cluster::get().connect_with_notices("pipeline_fan_in");
    notices_db
        .batch_execute("CALL chunkwise.run_cycle('report')")
        .unwrap();
    let said: Vec<String> = notices.try_iter().collect();
    assert!(
        said.iter()
            .any(|n| n.contains("waits for load_b (no run yet)")),
        "{said:?}"
    );
    assert_eq!(runs_of(&mut db, "report"), 0);

    db.batch_execute("SELECT * FROM chunkwise.run('load_b')")
        .unwrap();
    wait_for_settled_runs(&mut db, "report", 1);
    assert_eq!(runs_of(&mut db, "report"), 1);
    assert_eq!(
        one::<Option<String>>(
            &mut db,
            "SELECT waiting_for FROM chunkwise.pipeline WHERE task = 'report'"
        ),
        None
    );
}

/// The worker settling a run is killed (SIGKILL, from inside the on_success call: the
/// postmaster restarts every backend) and the server is then restarted with -m
/// immediate. The next cycle settles the run: on_success takes effect exactly once and
/// the downstream task runs exactly once.
#[test]
fn a_kill_during_the_callback_and_a_restart_still_give_one_callback_and_one_downstream_run() {
    let mut db = pipeline_db("pipeline_kill");
    db.batch_execute(
        "-- The first call kills its own backend; a marker file in the data directory
         -- (which the crash does not roll back) says it happened.
         COPY (SELECT 1) TO PROGRAM 'cat > /dev/null; rm -f pipeline_kill.marker';
         CREATE PROCEDURE killed_once(task text, run_id bigint, processed bigint, failed bigint, dead bigint)
         LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO calls VALUES ('on_success', task, run_id, processed, failed, dead);
           EXECUTE format('COPY (SELECT 1) TO PROGRAM %L',
                          'cat > /dev/null; test -e pipeline_kill.marker || { touch pipeline_kill.marker; kill -9 '
                          || pg_backend_pid() || '; }');
         END $$;",
    )
    .unwrap();
    stage(&mut db, "downstream", "");
    db.batch_execute(
        "SELECT chunkwise.create_task('upstream',
             statement => 'INSERT INTO seen VALUES (''upstream'', $1)',
             source => 'SELECT k AS key FROM inbox WHERE k NOT IN (SELECT k FROM seen WHERE task = ''upstream'')',
             on_success => 'killed_once', \"then\" => '{downstream}');",
    )
    .unwrap();
    drop(db);
    let cluster = Cluster::get();
    let mut cycle = cluster.connect("pipeline_kill");
    let ready_before = cluster.times_ready();
    // The session survives or not depending on when the crash restart reaches it.
    let _ = cycle.batch_execute("CALL chunkwise.run_cycle('upstream')");
    drop(cycle);
    cluster.wait_until_restarted(ready_before, DEADLINE);
    cluster.restart_immediately();
    let mut db = cluster.connect("pipeline_kill");
    assert!(
        one::<bool>(
            &mut db,
            "SELECT (pg_stat_file('pipeline_kill.marker', true)).size IS NOT NULL"
        ),
        "the callback ran and killed its worker"
    );
    assert_eq!(
        calls(&mut db, "on_success", "upstream"),
        0,
        "the killed call's effects are gone"
    );
    assert_eq!(runs_of(&mut db, "downstream"), 0);

    db.batch_execute("CALL chunkwise.run_cycle('upstream')")
        .unwrap();
    wait_for_settled_runs(&mut db, "downstream", 1);
    assert_eq!(calls(&mut db, "on_success", "upstream"), 1);
    assert_eq!(runs_of(&mut db, "upstream"), 1, "nothing new to load");
    assert_eq!(runs_of(&mut db, "downstream"), 1);
    assert_eq!(
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM seen WHERE task = 'downstream'"
        ),
        5
    );
    // Another cycle finds nothing to settle and nothing to start.
    db.batch_execute("CALL chunkwise.run_cycle('upstream')")
        .unwrap();
    assert_eq!(calls(&mut db, "on_success", "upstream"), 1);
    assert_eq!(runs_of(&mut db, "downstream"), 1);
}

/// A callback that fails is logged and retried after the task's retry_backoff, while
/// the run's last worker waits for it (as a run waits for its items' retries).
#[test]
fn a_failing_callback_is_retried_after_its_backoff() {
    let mut db = pipeline_db("pipeline_retry");
    db.batch_execute(
        "CREATE SEQUENCE attempts;
         CREATE PROCEDURE flaky_callback(task text, run_id bigint, processed bigint, failed bigint, dead bigint)
         LANGUAGE plpgsql AS $$
         BEGIN
           IF nextval('attempts') = 1 THEN
             RAISE EXCEPTION 'report server not reachable' USING ERRCODE = '08006';
           END IF;
           INSERT INTO calls VALUES ('on_success', task, run_id, processed, failed, dead);
         END $$;",
    )
    .unwrap();
    stage(
        &mut db,
        "retried",
        ", on_success => 'flaky_callback', retry_backoff => '1 second'",
    );
    // Two transactions: the run's workers see only committed items.
    db.batch_execute("SELECT chunkwise.plan('retried', 'SELECT k AS key FROM inbox')")
        .unwrap();
    let processed: i64 = one(&mut db, "SELECT processed FROM chunkwise.run('retried')");
    assert!(processed > 0, "the run did the planned items");
    assert_eq!(calls(&mut db, "on_success", "retried"), 1);
    assert_eq!(one::<i64>(&mut db, "SELECT last_value FROM attempts"), 2);
    let (followup, attempts): (String, i32) = {
        let row = db
            .query_one(
                "SELECT followup, followup_attempts FROM chunkwise.run_history",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((followup.as_str(), attempts), ("done", 1));
}

/// Bad pipeline options are refused with a SQLSTATE and a hint and change nothing: a
/// circle, an unknown task, a callback of the wrong kind or signature, another owner's
/// task, and dropping a task that another chains to.
#[test]
fn bad_pipeline_options_are_refused_and_change_nothing() {
    let mut db = pipeline_db("pipeline_bad_input");
    db.batch_execute(
        "CREATE PROCEDURE short_callback(task text, run_id bigint) LANGUAGE sql AS 'SELECT 1';
         CREATE FUNCTION function_callback(task text, run_id bigint, processed bigint, failed bigint, dead bigint)
         RETURNS int LANGUAGE sql AS 'SELECT 1';
         DROP ROLE IF EXISTS pipeline_watcher;
         CREATE ROLE pipeline_watcher LOGIN IN ROLE pg_monitor;
         GRANT CREATE ON SCHEMA public TO pipeline_watcher;
         GRANT EXECUTE ON ALL ROUTINES IN SCHEMA public TO pipeline_watcher;",
    )
    .unwrap();
    stage(&mut db, "first", "");
    stage(&mut db, "second", ", \"then\" => '{first}'");
    stage(&mut db, "third", ", depends_on => '{second}'");
    db.batch_execute("SELECT chunkwise.enqueue('first', 1)")
        .unwrap();
    let before = queue_snapshot(&mut db);
    for (call, code) in [
        // first -> second -> first.
        (
            "SELECT chunkwise.alter_task('first', \"then\" => '{second}')",
            "22023",
        ),
        // third waits for second, which would wait for third.
        (
            "SELECT chunkwise.alter_task('second', depends_on => '{third}')",
            "22023",
        ),
        (
            "SELECT chunkwise.alter_task('first', \"then\" => '{first}')",
            "22023",
        ),
        (
            "SELECT chunkwise.alter_task('first', \"then\" => '{nowhere}')",
            "42704",
        ),
        (
            "SELECT chunkwise.create_task('x', statement => 'SELECT $1', depends_on => '{nowhere}')",
            "42704",
        ),
        (
            "SELECT chunkwise.alter_task('first', on_success => 'short_callback')",
            "42883",
        ),
        (
            "SELECT chunkwise.alter_task('first', on_failure => 'function_callback')",
            "42883",
        ),
        ("SELECT chunkwise.drop_task('first')", "2BP01"),
    ] {
        let (sqlstate, message, hint) = sql_error(db.execute(call, &[]));
        assert_eq!(sqlstate, code, "{call}: {message}");
        assert!(!hint.is_empty(), "{call}: a hint");
    }
    // Someone who may see the tasks (pg_monitor) but not manage them cannot chain them.
    let mut watcher = Cluster::get().connect_as("pipeline_bad_input", "pipeline_watcher");
    let (sqlstate, message, hint) = sql_error(watcher.execute(
        "SELECT chunkwise.create_task('mine', statement => 'SELECT $1', \"then\" => '{first}')",
        &[],
    ));
    assert_eq!(sqlstate, "42501", "{message}");
    assert!(!hint.is_empty());
    drop(watcher);
    assert_eq!(
        queue_snapshot(&mut db),
        before,
        "refused calls change nothing"
    );
    assert_eq!(
        one::<String>(
            &mut db,
            "SELECT format('%s %s', (SELECT then_tasks FROM chunkwise.tasks WHERE task = 'first'), \
                                  (SELECT count(*) FROM chunkwise.tasks))"
        ),
        "{} 3"
    );
    db.batch_execute("DROP OWNED BY pipeline_watcher; DROP ROLE pipeline_watcher")
        .unwrap();
}

/// A run started in the background (`start()`, as downstream cycles are) is settled by
/// its last worker however its workers' starts interleave with its work: here one worker
/// often does both items and leaves before the other has joined, which once left the run
/// with nobody to count it out (the late worker found its segment gone), so its
/// on_success never came. Many short runs make that interleaving likely, more so under
/// CPU contention (`make test-stress`).
#[test]
fn every_run_started_in_the_background_calls_its_on_success_once() {
    let mut db = pipeline_db("pipeline_background_starts");
    db.batch_execute(
        "SELECT chunkwise.create_task('quick', statement => 'SELECT $1',
             workers => 2, on_success => 'succeeded');",
    )
    .unwrap();
    const RUNS: i64 = 40;
    let mut started = Vec::new();
    for round in 0..RUNS {
        // Planned and committed first: workers see only committed items.
        db.execute(
            "SELECT chunkwise.plan('quick', format('SELECT %s AS key UNION ALL SELECT %s', $1::bigint * 2, $1::bigint * 2 + 1))",
            &[&round],
        )
        .unwrap();
        let run_id: Option<i64> = one(&mut db, "SELECT chunkwise.start('quick')");
        let run_id = run_id.unwrap_or_else(|| panic!("round {round}: two items were pending"));
        started.push(run_id);
        // The next start waits for this run's workers: one run at a time.
        wait_for(&format!("run {run_id} to end"), DEADLINE, || {
            let state: String = db
                .query_one(
                    "SELECT state FROM chunkwise.runs WHERE run_id = $1",
                    &[&run_id],
                )
                .unwrap()
                .get(0);
            (state != "running").then_some(())
        });
    }
    wait_for(&format!("{RUNS} on_success calls"), DEADLINE, || {
        (calls(&mut db, "on_success", "quick") >= RUNS).then_some(())
    });
    let called: Vec<i64> = db
        .query(
            "SELECT run_id FROM calls WHERE task = 'quick' ORDER BY run_id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(called, started, "one call per run, none twice");
    assert_eq!(
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM chunkwise.run_history h JOIN chunkwise.tasks t USING (task_id) \
              WHERE t.task = 'quick' AND (h.followup <> 'done' OR h.workers_exited <> h.workers_started)"
        ),
        0,
        "every run counted its workers out and was settled"
    );
}
