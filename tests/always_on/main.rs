//! Always-on tasks against a real cluster with `shared_preload_libraries = 'pg_chunkwise'`:
//! pools that start at boot, wake at the commit of an enqueue, grow and shrink, come back
//! after a crash, and follow pause, resume and alter. Nothing here calls run().

#[path = "../common/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use harness::{Cluster, one, queue_snapshot, sql_error, test_db, wait_for};
use postgres::Client;

pub const CLUSTER: harness::ClusterSpec = harness::ClusterSpec {
    name: "pg_chunkwise_always_on",
    port: 54_350,
    settings: "shared_preload_libraries = 'pg_chunkwise'\nmax_worker_processes = 32\n\
               chunkwise.max_workers = 16\nfsync = off\nlog_min_messages = warning\n\
               restart_after_crash = on\nlog_line_prefix = '%m [%p] %b '",
};

const DEADLINE: Duration = Duration::from_secs(60);

/// A table the target writes each key to, with when it ran, and an always-on task
/// `task` calling it with `options`.
fn recorder(db: &mut Client, task: &str, options: &str) {
    db.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS log (k bigint, at timestamptz DEFAULT clock_timestamp());
         CREATE OR REPLACE PROCEDURE record(k bigint) LANGUAGE sql AS $$ INSERT INTO log (k) VALUES (k) $$;
         SELECT chunkwise.create_task('{task}', call => 'record', always_on => true{options});"
    ))
    .unwrap();
}

fn pool_size(db: &mut Client, task: &str) -> i64 {
    db.query_one(
        "SELECT active_workers FROM chunkwise.task_status WHERE task = $1",
        &[&task],
    )
    .map(|row| row.get(0))
    .unwrap_or(0)
}

fn wait_for_pool(db: &mut Client, task: &str, size: i64) {
    wait_for(
        &format!("the pool of {task} to have {size} workers"),
        DEADLINE,
        || (pool_size(db, task) == size).then_some(()),
    );
}

fn logged(db: &mut Client) -> (i64, i64) {
    let row = db
        .query_one("SELECT count(*), count(DISTINCT k) FROM log", &[])
        .unwrap();
    (row.get(0), row.get(1))
}

fn wait_for_logged(db: &mut Client, count: i64) {
    wait_for(&format!("{count} keys to be done"), DEADLINE, || {
        (logged(db).0 >= count).then_some(())
    });
}

#[test]
fn items_enqueued_singly_in_bursts_and_by_plan_are_done_once_with_no_run_call() {
    let mut db = test_db("always_on_basics");
    recorder(&mut db, "live", ", workers => 4, min_workers => 1");
    wait_for_pool(&mut db, "live", 1);
    let state: String = one(&mut db, "SELECT state FROM chunkwise.workers");
    assert_eq!(state, "idle", "a pool member with nothing to do sleeps");

    for key in 1..=50_i64 {
        db.execute("SELECT chunkwise.enqueue('live', $1)", &[&key])
            .unwrap();
    }
    wait_for_logged(&mut db, 50);
    // A burst in one transaction: nothing runs before its commit.
    let mut burst = db.transaction().unwrap();
    burst
        .batch_execute("SELECT chunkwise.enqueue('live', k) FROM generate_series(101, 600) k")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let early: i64 = one(
        &mut Cluster::get().connect("always_on_basics"),
        "SELECT count(*) FROM log WHERE k > 100",
    );
    assert_eq!(early, 0, "items are not run before their enqueue commits");
    burst.commit().unwrap();
    wait_for_logged(&mut db, 550);
    db.batch_execute(
        "SELECT chunkwise.plan('live', 'SELECT k AS key FROM generate_series(1001, 1500) k')",
    )
    .unwrap();
    wait_for_logged(&mut db, 1050);

    assert_eq!(logged(&mut db), (1050, 1050), "each key ran exactly once");
    let runs: i64 = one(&mut db, "SELECT count(*) FROM chunkwise.runs");
    assert!(runs >= 1, "the pool's work shows as a run");
    let metrics: String = one(&mut db, "SELECT chunkwise.metrics()");
    let started: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("chunkwise_enqueue_to_start_seconds_count{task=\"live\"} "))
        .expect("the latency histogram is exposed")
        .parse()
        .unwrap();
    assert!(started >= 1050.0, "every start was timed: {started}");
    assert!(metrics.contains("chunkwise_pool_workers{task=\"live\"}"));
}

/// The pids of this cluster's processes of `backend_type`, in order.
fn pids_of(db: &mut Client, backend_type: &str) -> Vec<i32> {
    db.query(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = $1 ORDER BY pid",
        &[&backend_type],
    )
    .unwrap()
    .iter()
    .map(|row| row.get(0))
    .collect()
}

/// A DBA's `pg_cancel_backend` reaches the launcher, the supervisor and an idle pool
/// member while they sleep: each drops it and goes on, with nothing to report (an idle
/// member once reported it as a failure of its bookkeeping).
#[test]
fn a_cancel_ends_no_sleeping_launcher_supervisor_or_pool_member() {
    let mut db = test_db("always_on_cancel");
    recorder(&mut db, "cancelled", ", workers => 2, min_workers => 1");
    wait_for_pool(&mut db, "cancelled", 1);
    let kinds = [
        "chunkwise launcher",
        "chunkwise supervisor",
        "chunkwise worker",
    ];
    let before: Vec<Vec<i32>> = kinds.iter().map(|kind| pids_of(&mut db, kind)).collect();
    for (kind, pids) in kinds.iter().zip(&before) {
        assert!(!pids.is_empty(), "a {kind} is running");
        for pid in pids {
            let sent: bool = db
                .query_one("SELECT pg_cancel_backend($1)", &[pid])
                .unwrap()
                .get(0);
            assert!(sent, "the cancel reached the {kind} {pid}");
        }
    }
    for key in 1..=20_i64 {
        db.execute("SELECT chunkwise.enqueue('cancelled', $1)", &[&key])
            .unwrap();
    }
    wait_for_logged(&mut db, 20);
    assert_eq!(logged(&mut db), (20, 20));
    for (kind, pids) in kinds.iter().zip(&before) {
        let now = pids_of(&mut db, kind);
        assert!(
            pids.iter().all(|pid| now.contains(pid)),
            "every {kind} cancelled is still running: {pids:?} then, {now:?} now"
        );
    }
    let log = Cluster::get().server_log();
    assert!(
        !log.contains("pg_chunkwise worker of task \"cancelled\""),
        "the pool reported nothing: {log}"
    );
}

#[test]
fn the_pool_grows_with_a_backlog_and_shrinks_to_min_workers_when_idle() {
    let mut db = test_db("always_on_elastic");
    db.batch_execute(
        "CREATE TABLE log (k bigint, at timestamptz DEFAULT clock_timestamp());
         CREATE PROCEDURE slow(k bigint) LANGUAGE sql AS $$ SELECT pg_sleep(0.01); INSERT INTO log (k) VALUES (k) $$;
         SELECT chunkwise.create_task('elastic', call => 'slow', always_on => true, workers => 3,
                                      min_workers => 1, idle_timeout => '1 second');",
    )
    .unwrap();
    wait_for_pool(&mut db, "elastic", 1);
    db.batch_execute(
        "SELECT chunkwise.plan('elastic', 'SELECT k AS key FROM generate_series(1, 600) k')",
    )
    .unwrap();
    let mut largest = 0;
    wait_for("the backlog to be done", DEADLINE, || {
        largest = largest.max(pool_size(&mut db, "elastic"));
        (logged(&mut db).0 >= 600).then_some(())
    });
    assert_eq!(largest, 3, "the pool grew to workers under a backlog");
    wait_for_pool(&mut db, "elastic", 1);
    assert_eq!(logged(&mut db), (600, 600));
}

#[test]
fn a_retry_runs_when_its_backoff_ends_not_at_a_poll_tick() {
    let mut db = test_db("always_on_retry");
    db.batch_execute(
        "CREATE SEQUENCE tries;
         CREATE TABLE log (k bigint, at timestamptz DEFAULT clock_timestamp());
         CREATE PROCEDURE flaky(k bigint) LANGUAGE plpgsql AS $$
         BEGIN
           IF nextval('tries') = 1 THEN RAISE EXCEPTION 'first try fails'; END IF;
           INSERT INTO log (k) VALUES (k);
         END $$;
         SELECT chunkwise.create_task('flaky', call => 'flaky', always_on => true,
                                      retry_backoff => '2 seconds');",
    )
    .unwrap();
    wait_for_pool(&mut db, "flaky", 1);
    db.batch_execute("SELECT chunkwise.enqueue('flaky', 7)")
        .unwrap();
    wait_for_logged(&mut db, 1);
    let gap: f64 = one(
        &mut db,
        "SELECT extract(epoch FROM l.at - i.last_failed_at)::float8 \
           FROM chunkwise.items i, log l WHERE i.key = 7",
    );
    assert!(
        (1.5..=2.5).contains(&gap),
        "the retry ran {gap:.3} s after the failure, not 2 s"
    );
}

#[test]
fn pause_resume_alter_and_always_on_off_steer_the_pool() {
    let mut db = test_db("always_on_steering");
    recorder(&mut db, "steered", ", workers => 3, min_workers => 1");
    wait_for_pool(&mut db, "steered", 1);

    db.batch_execute("SELECT chunkwise.pause('steered')")
        .unwrap();
    wait_for_pool(&mut db, "steered", 0);
    db.batch_execute("SELECT chunkwise.enqueue('steered', 1)")
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(logged(&mut db).0, 0, "a paused task's item waits");
    db.batch_execute("SELECT chunkwise.resume('steered')")
        .unwrap();
    wait_for_logged(&mut db, 1);

    db.batch_execute("SELECT chunkwise.alter_task('steered', min_workers => 2)")
        .unwrap();
    wait_for_pool(&mut db, "steered", 2);

    let (sqlstate, _, hint) = sql_error(db.execute("SELECT chunkwise.drop_task('steered')", &[]));
    assert_eq!(sqlstate, "55006");
    assert!(hint.contains("always_on => false"), "{hint}");
    db.batch_execute("SELECT chunkwise.alter_task('steered', always_on => false)")
        .unwrap();
    wait_for_pool(&mut db, "steered", 0);
    // A look of the supervisor that read the tasks just before the alter committed may
    // still start a member, which leaves at the look the commit wakes; until then
    // drop_task rightly says the task has running workers (55006).
    wait_for("drop_task once the pool is gone", DEADLINE, || {
        match db.execute("SELECT chunkwise.drop_task('steered')", &[]) {
            Ok(_) => Some(()),
            Err(error) => {
                let (sqlstate, message, _) = sql_error(Err::<u64, _>(error));
                assert_eq!(sqlstate, "55006", "{message}");
                None
            }
        }
    });
}

#[test]
fn bad_options_are_refused_with_sqlstate_and_hint_and_change_nothing() {
    let mut db = test_db("always_on_bad_input");
    recorder(&mut db, "kept", ", workers => 2, min_workers => 0");
    let before = queue_snapshot(&mut db);
    for (call, expected) in [
        (
            "SELECT chunkwise.create_task('more', call => 'record', always_on => true, workers => 2, min_workers => 3)",
            "min_workers",
        ),
        (
            "SELECT chunkwise.alter_task('kept', min_workers => 5)",
            "min_workers",
        ),
        (
            "SELECT chunkwise.alter_task('kept', idle_timeout => '-1 second')",
            "idle_timeout",
        ),
        (
            "SELECT chunkwise.create_task('more', call => 'record', always_on => true, idle_timeout => '0')",
            "idle_timeout",
        ),
        (
            "SELECT chunkwise.create_task('more', call => 'record', always_on => NULL)",
            "always_on",
        ),
    ] {
        let (sqlstate, message, hint) = sql_error(db.execute(call, &[]));
        assert!(
            sqlstate == "22023" || sqlstate == "22004",
            "{call}: {sqlstate} {message}"
        );
        assert!(message.contains(expected), "{call}: {message}");
        assert!(!hint.is_empty(), "{call}: a hint");
    }
    assert_eq!(
        queue_snapshot(&mut db),
        before,
        "refused calls change nothing"
    );
}

/// Kills the pool's worker with SIGKILL (the postmaster then restarts every process) and
/// restarts the server with `-m immediate`: each time the pool is back and serves a new
/// item within 5 s of the server accepting connections, with nobody calling anything.
#[test]
fn the_pool_is_back_within_5_s_after_a_crash_and_an_immediate_restart() {
    let cluster = Cluster::get();
    let mut db = test_db("always_on_restarts");
    recorder(&mut db, "resident", ", min_workers => 1");
    wait_for_pool(&mut db, "resident", 1);
    let mut next_key = 1_i64;
    let mut serves_again = |how: &str| -> Duration {
        cluster.wait_until_accepting(DEADLINE);
        let back = Instant::now();
        let mut db = cluster.connect("always_on_restarts");
        db.execute("SELECT chunkwise.enqueue('resident', $1)", &[&next_key])
            .unwrap();
        wait_for(
            &format!("key {next_key} to be done after {how}"),
            DEADLINE,
            || {
                let done: i64 = one(
                    &mut db,
                    &format!("SELECT count(*) FROM log WHERE k = {next_key}"),
                );
                (done == 1).then_some(())
            },
        );
        next_key += 1;
        back.elapsed()
    };

    let pid: i32 = one(&mut db, "SELECT pid FROM chunkwise.workers");
    drop(db);
    let ready_before = cluster.times_ready();
    // SAFETY: sends SIGKILL to the worker process this test found.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    // The postmaster notices, kills every backend and restarts; wait until it has.
    cluster.wait_until_restarted(ready_before, DEADLINE);
    let after_kill = serves_again("a worker was killed");
    assert!(
        after_kill < Duration::from_secs(5),
        "back {after_kill:?} after the crash"
    );

    cluster.restart_immediately();
    let after_restart = serves_again("an immediate restart");
    assert!(
        after_restart < Duration::from_secs(5),
        "back {after_restart:?} after the restart"
    );
    let mut db = cluster.connect("always_on_restarts");
    assert_eq!(logged(&mut db), (2, 2));
    println!(
        "back after SIGKILL: {after_kill:?}; after pg_ctl restart -m immediate: {after_restart:?}"
    );
}

/// Pipelines with the preloaded library: the worker settling a run is killed inside its
/// on_success call (SIGKILL: the postmaster restarts every process) and nobody calls
/// anything afterwards. The supervisor that every database gets at a restart settles
/// the run: on_success takes effect once and the downstream task runs once.
#[test]
fn after_a_kill_inside_a_callback_the_restart_settles_the_run_with_nobody_calling() {
    let cluster = Cluster::get();
    let mut db = test_db("always_on_pipeline_kill");
    db.batch_execute(
        "CREATE TABLE seen (task text, k bigint);
         CREATE TABLE calls (task text, run_id bigint);
         COPY (SELECT 1) TO PROGRAM 'cat > /dev/null; rm -f always_on_pipeline_kill.marker';
         -- The first call kills its own backend; the marker file (not rolled back by the
         -- crash) says that it did.
         CREATE PROCEDURE killed_once(task text, run_id bigint, processed bigint, failed bigint, dead bigint)
         LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO calls VALUES (task, run_id);
           EXECUTE format('COPY (SELECT 1) TO PROGRAM %L',
                          'cat > /dev/null; test -e always_on_pipeline_kill.marker || { touch always_on_pipeline_kill.marker; kill -9 '
                          || pg_backend_pid() || '; }');
         END $$;
         SELECT chunkwise.create_task('after', statement => 'INSERT INTO seen VALUES (''after'', $1)',
                                      source => 'SELECT g AS key FROM generate_series(1, 3) g');
         SELECT chunkwise.create_task('before', statement => 'INSERT INTO seen VALUES (''before'', $1)',
                                      on_success => 'killed_once', \"then\" => '{after}');
         SELECT chunkwise.plan('before', 'SELECT g AS key FROM generate_series(1, 5) g');",
    )
    .unwrap();
    let ready_before = cluster.times_ready();
    assert!(
        db.batch_execute("SELECT * FROM chunkwise.run('before')")
            .is_err(),
        "the run's session dies in the crash restart"
    );
    drop(db);
    cluster.wait_until_restarted(ready_before, DEADLINE);
    let mut db = cluster.connect("always_on_pipeline_kill");
    wait_for("the downstream task's run", DEADLINE, || {
        let settled: i64 = one(
            &mut db,
            "SELECT count(*) FROM chunkwise.runs WHERE task = 'after' AND outcome IS NOT NULL",
        );
        (settled == 1).then_some(())
    });
    assert!(one::<bool>(
        &mut db,
        "SELECT (pg_stat_file('always_on_pipeline_kill.marker', true)).size IS NOT NULL"
    ));
    assert_eq!(one::<i64>(&mut db, "SELECT count(*) FROM calls"), 1);
    assert_eq!(
        one::<i64>(&mut db, "SELECT count(*) FROM seen WHERE task = 'after'"),
        3
    );
    assert_eq!(
        one::<String>(
            &mut db,
            "SELECT string_agg(task || ':' || outcome, ' ' ORDER BY run_id) FROM chunkwise.runs"
        ),
        "before:succeeded after:succeeded"
    );
}
