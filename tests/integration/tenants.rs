//! Roles sharing one database cannot see or steer each other's tasks through the
//! extension's side channels (notifications, liveness, run ids, the cycle lock), cannot
//! take more than their share of workers, and cannot make a backend balloon or the log
//! fill with a refused value.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use postgres::Client;
use postgres::fallible_iterator::FallibleIterator;

use crate::fixtures::live_workers;
use crate::harness::{Cluster, column, one, sql_error, test_db, wait_for};

/// The cluster-wide name of role `who` ("alice", "mallory") in the test database `db`:
/// roles outlive a test's database, so each test has its own.
fn role(db: &str, who: &str) -> String {
    format!("{db}_{who}")
}

/// `sql` with the roles "alice" and "mallory" named as in `db`.
fn in_db(db: &str, sql: &str) -> String {
    sql.replace("mallory", &role(db, "mallory"))
        .replace("alice", &role(db, "alice"))
}

/// Connects to `db` as its "alice" or "mallory".
fn connect(db: &str, who: &str) -> Client {
    Cluster::get().connect_as(db, &role(db, who))
}

/// A fresh database `db` with its roles `alice` and `mallory`.
fn tenants_db(db: &str) -> Client {
    let mut admin = test_db(db);
    admin
        .batch_execute(&in_db(
            db,
            "DROP ROLE IF EXISTS mallory, alice;
             CREATE ROLE mallory LOGIN;
             CREATE ROLE alice LOGIN;",
        ))
        .unwrap();
    admin
}

/// Roles `alice` and `mallory`, each with a schema, a counter table and a task over it:
/// alice's `a_task` has one finished run (returned) and pending items.
fn two_tenants(db: &str) -> i64 {
    let mut admin = tenants_db(db);
    admin
        .batch_execute(&in_db(
            db,
            "CREATE SCHEMA mal AUTHORIZATION mallory;
             CREATE SCHEMA ali AUTHORIZATION alice;",
        ))
        .unwrap();
    let mut alice = connect(db, "alice");
    alice
        .batch_execute(
            "CREATE TABLE ali.t (k bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
             INSERT INTO ali.t (k) SELECT generate_series(1, 20);
             CREATE PROCEDURE ali.work(k bigint) LANGUAGE plpgsql AS $$
             BEGIN
               IF k = 13 THEN RAISE EXCEPTION 'alice''s secret reason'; END IF;
               UPDATE ali.t SET n = n + 1 WHERE t.k = work.k;
             END $$;
             SELECT chunkwise.create_task('a_task', call => 'ali.work', max_attempts => 1,
                                          source => 'SELECT k AS key FROM ali.t WHERE n = 0');
             SELECT chunkwise.plan('a_task', 'SELECT k AS key FROM ali.t WHERE k <= 10');",
        )
        .unwrap();
    let run_id: i64 = one(&mut alice, "SELECT run_id FROM chunkwise.run('a_task')");
    alice
        .batch_execute("SELECT chunkwise.plan('a_task', 'SELECT k AS key FROM ali.t WHERE k > 10')")
        .unwrap();
    run_id
}

/// Every notification `client` has received within `timeout` after `expected` arrived.
fn notifications(client: &mut Client, expected: usize, timeout: Duration) -> Vec<String> {
    let mut payloads = Vec::new();
    let mut notes = client.notifications();
    let mut waiting = notes.timeout_iter(timeout);
    while payloads.len() < expected {
        match waiting.next().unwrap() {
            Some(note) => payloads.push(note.payload().to_string()),
            None => break,
        }
    }
    payloads
}

#[test]
fn listeners_get_ids_only_and_read_back_only_what_they_may_see() {
    two_tenants("tenant_notify");
    let mut mallory = connect("tenant_notify", "mallory");
    mallory.batch_execute("LISTEN chunkwise").unwrap();
    let mut alice = connect("tenant_notify", "alice");
    alice
        .batch_execute("SELECT * FROM chunkwise.run('a_task')")
        .unwrap();
    // Key 13 went dead, and the run finished: two events.
    let payloads = notifications(&mut mallory, 2, Duration::from_secs(10));
    assert_eq!(payloads.len(), 2, "{payloads:?}");
    for payload in &payloads {
        for secret in ["a_task", "alice", "secret"] {
            // (role names here are "<db>_alice": "alice" catches them)
            assert!(
                !payload.contains(secret),
                "a notification told another role {secret:?}: {payload}"
            );
        }
        let event: serde_json::Value = serde_json::from_str(payload).unwrap();
        let fields: Vec<&String> = event.as_object().unwrap().keys().collect();
        assert!(
            fields
                .iter()
                .all(|f| ["event", "run_id", "item_id"].contains(&f.as_str())),
            "ids only: {payload}"
        );
        if let Some(item_id) = event["item_id"].as_i64() {
            let seen: i64 = one(
                &mut mallory,
                &format!("SELECT count(*) FROM chunkwise.failures WHERE item_id = {item_id}"),
            );
            assert_eq!(seen, 0, "the failure is not another role's to read");
        }
        let run_id = event["run_id"].as_i64().unwrap();
        let seen: i64 = one(
            &mut mallory,
            &format!("SELECT count(*) FROM chunkwise.runs WHERE run_id = {run_id}"),
        );
        assert_eq!(seen, 0, "the run is not another role's to read");
    }
}

#[test]
fn a_target_that_claims_to_be_another_run_makes_it_neither_live_nor_undroppable() {
    let finished_run = two_tenants("tenant_liveness");
    let mut mallory = connect("tenant_liveness", "mallory");
    // While its item runs, the target dresses its worker up as alice's finished run.
    mallory
        .batch_execute(&format!(
            "CREATE PROCEDURE mal.pose(k bigint) LANGUAGE plpgsql AS $$
             BEGIN
               PERFORM set_config('application_name', 'chunkwise a_task #{finished_run}', false);
               PERFORM pg_sleep(30);
             END $$;
             SELECT chunkwise.create_task('m_pose', call => 'mal.pose', max_attempts => 1);
             SELECT chunkwise.enqueue('m_pose', 1);"
        ))
        .unwrap();
    let pose_run: i64 = one(&mut mallory, "SELECT chunkwise.start('m_pose', 1)");
    let mut admin = Cluster::get().connect("tenant_liveness");
    wait_for("the target to pose", Duration::from_secs(20), || {
        let posing: i64 = one(
            &mut admin,
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'chunkwise a_task #{finished_run}'"
            ),
        );
        (posing > 0).then_some(())
    });
    let mut alice = connect("tenant_liveness", "alice");
    let state: String = one(
        &mut alice,
        &format!("SELECT state FROM chunkwise.wait({finished_run}, '5 seconds')"),
    );
    assert_eq!(
        state, "finished",
        "wait() is not fooled by application_name"
    );
    let workers: i64 = one(
        &mut alice,
        "SELECT active_workers FROM chunkwise.task_status WHERE task = 'a_task'",
    );
    assert_eq!(workers, 0);
    alice
        .batch_execute("SELECT chunkwise.drop_task('a_task')")
        .expect("nothing of alice's runs: her task can be dropped");
    // The poser itself is live, by its own bookkeeping.
    let state: String = one(
        &mut mallory,
        &format!("SELECT state FROM chunkwise.runs WHERE run_id = {pose_run}"),
    );
    assert_eq!(state, "running");
    mallory
        .batch_execute(
            "SELECT chunkwise.cancel('m_pose');
             SELECT pg_cancel_backend(pid) FROM chunkwise.workers WHERE task = 'm_pose';",
        )
        .unwrap();
    wait_for("the poser to exit", Duration::from_secs(30), || {
        live_workers(&mut admin).is_empty().then_some(())
    });
}

#[test]
fn another_roles_run_ids_and_task_names_reveal_nothing() {
    let alices_run = two_tenants("tenant_names");
    let mut mallory = connect("tenant_names", "mallory");
    let unknown = sql_error(mallory.query("SELECT * FROM chunkwise.wait(999999)", &[]));
    let (code, message, _) =
        sql_error(mallory.query(&format!("SELECT * FROM chunkwise.wait({alices_run})"), &[]));
    assert_eq!(code, "42704");
    assert_eq!(
        message,
        unknown.1.replace("999999", &alices_run.to_string()),
        "another role's run is answered like a run that does not exist"
    );
    for sql in [
        "SELECT chunkwise.pause('a_task')",
        "SELECT * FROM chunkwise.run('a_task')",
        "SELECT chunkwise.enqueue('a_task', 1)",
    ] {
        let (code, message, hint) = sql_error(mallory.query(sql, &[]));
        let (unknown_code, unknown_message, unknown_hint) =
            sql_error(mallory.query(&sql.replace("a_task", "no_task"), &[]));
        assert_eq!(
            (code, message, hint),
            (
                unknown_code,
                unknown_message.replace("no_task", "a_task"),
                unknown_hint
            ),
            "{sql}: another role's task is answered like one that does not exist"
        );
    }
}

#[test]
fn no_role_can_hold_another_roles_cycle_lock() {
    two_tenants("tenant_cycle");
    let mut mallory = connect("tenant_cycle", "mallory");
    // Every key of the advisory-lock space the cycle lock could live in, for the first
    // task ids: as (int, int) pairs and as bigints.
    mallory
        .batch_execute(
            "SELECT pg_advisory_lock(c, id) FROM unnest('{0, 1, 25463}'::int[]) c,
                    generate_series(1, 3) id;
             SELECT pg_advisory_lock(id) FROM generate_series(1, 3) id;",
        )
        .unwrap();
    let mut alice = connect("tenant_cycle", "alice");
    let before: i64 = one(&mut alice, "SELECT count(*) FROM chunkwise.runs");
    alice
        .batch_execute("CALL chunkwise.run_cycle('a_task')")
        .unwrap();
    let after: i64 = one(&mut alice, "SELECT count(*) FROM chunkwise.runs");
    assert_eq!(
        after,
        before + 1,
        "the cycle ran despite the held advisory locks"
    );
    // A second cycle while the first holds the lock still says so.
    let holder: bool = one(&mut alice, "SELECT chunkwise._cycle_begin('a_task')");
    assert!(holder, "the first cycle takes the lock");
    let mut other = connect("tenant_cycle", "alice");
    let begun: bool = one(&mut other, "SELECT chunkwise._cycle_begin('a_task')");
    assert!(!begun, "the lock is held by the first cycle");
}

/// Live pg_chunkwise workers of the whole cluster, polled until none is left; returns
/// the most seen at once.
fn peak_workers(admin: &mut Client, done: impl Fn() -> bool) -> i64 {
    let mut peak = 0;
    loop {
        let live: i64 = one(
            admin,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'chunkwise worker'",
        );
        peak = peak.max(live);
        if live == 0 && done() {
            return peak;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn runs_started_at_once_stay_within_max_workers_and_each_roles_share() {
    let mut admin = test_db("tenant_slots");
    admin
        .batch_execute(
            "DROP ROLE IF EXISTS greedy, modest;
             CREATE ROLE greedy LOGIN;
             CREATE ROLE modest LOGIN;
             CREATE PROCEDURE public.nap(k bigint) LANGUAGE sql AS 'SELECT pg_sleep(0.2)';
             GRANT EXECUTE ON PROCEDURE public.nap TO PUBLIC;",
        )
        .unwrap();
    for task in ["s1", "s2", "s3"] {
        admin
            .batch_execute(&format!(
                "SELECT chunkwise.create_task('{task}', call => 'public.nap');"
            ))
            .unwrap();
    }
    // The cap is cluster-wide: start from an idle cluster.
    peak_workers(&mut admin, || true);
    // Three runs of three workers each start at the same moment under a cap of four.
    for round in 0..3 {
        for task in ["s1", "s2", "s3"] {
            admin
                .batch_execute(&format!(
                    "SELECT chunkwise.plan('{task}', 'SELECT generate_series(1, 6)::bigint AS key')"
                ))
                .unwrap();
        }
        let barrier = Arc::new(Barrier::new(3));
        let runners: Vec<_> = ["s1", "s2", "s3"]
            .into_iter()
            .map(|task| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    let mut db = Cluster::get().connect("tenant_slots");
                    db.batch_execute("SET chunkwise.max_workers = 4").unwrap();
                    barrier.wait();
                    // A run that finds every slot taken is refused: that is fine here.
                    let _ = db.batch_execute(&format!("SELECT * FROM chunkwise.run('{task}', 3)"));
                })
            })
            .collect();
        let peak = peak_workers(&mut admin, || runners.iter().all(|r| r.is_finished()));
        for runner in runners {
            runner.join().unwrap();
        }
        assert!(
            peak <= 4,
            "round {round}: {peak} workers ran under a cap of 4"
        );
    }

    // One role's share: its second run gets nothing while another role still gets slots.
    admin
        .batch_execute(
            "ALTER ROLE greedy SET chunkwise.max_workers_per_role = 2;
             ALTER ROLE modest SET chunkwise.max_workers_per_role = 2;",
        )
        .unwrap();
    let mut greedy = Cluster::get().connect_as("tenant_slots", "greedy");
    greedy
        .batch_execute(
            "SELECT chunkwise.create_task('g1', call => 'public.nap');
             SELECT chunkwise.create_task('g2', call => 'public.nap');
             SELECT chunkwise.plan('g1', 'SELECT generate_series(1, 20)::bigint AS key');
             SELECT chunkwise.plan('g2', 'SELECT generate_series(1, 20)::bigint AS key');",
        )
        .unwrap();
    greedy
        .batch_execute("SELECT chunkwise.start('g1', 3)")
        .unwrap();
    // start() returns once its workers show in pg_stat_activity.
    let started: i64 = one(
        &mut admin,
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'chunkwise worker' AND usename = 'greedy'",
    );
    assert_eq!(
        started, 2,
        "the run got the role's share, not the 3 it asked for"
    );
    let (code, message, hint) = sql_error(greedy.query("SELECT chunkwise.start('g2', 1)", &[]));
    assert_eq!(code, "53400", "{message}");
    assert!(hint.contains("max_workers_per_role"), "{hint}");
    let mut modest = Cluster::get().connect_as("tenant_slots", "modest");
    modest
        .batch_execute(
            "SELECT chunkwise.create_task('m1', call => 'public.nap');
             SELECT chunkwise.plan('m1', 'SELECT generate_series(1, 2)::bigint AS key');",
        )
        .unwrap();
    let processed: i64 = one(&mut modest, "SELECT processed FROM chunkwise.run('m1', 2)");
    assert_eq!(processed, 2, "another role still gets workers");
    greedy
        .batch_execute("SELECT chunkwise.cancel('g1')")
        .unwrap();
}

/// The most resident memory `pid` has had (VmHWM), in MiB.
fn peak_resident_mib(pid: i32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/PID/status");
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024.0
}

#[test]
fn planning_wide_rows_keeps_the_backend_small_and_refused_values_are_not_echoed() {
    let mut db = test_db("tenant_memory");
    db.batch_execute(
        "CREATE PROCEDURE noop(k bigint, p jsonb) LANGUAGE sql AS 'SELECT 1';
         SELECT chunkwise.create_task('wide', call => 'noop');",
    )
    .unwrap();
    let pid: i32 = one(&mut db, "SELECT pg_backend_pid()");
    let before = peak_resident_mib(pid);
    // 200 payloads of almost 1 MiB each: 200 MiB of item data.
    let planned: i64 = one(
        &mut db,
        "SELECT chunkwise.plan('wide', 'SELECT g::bigint AS key, \
           jsonb_build_object(''blob'', repeat(''x'', 1000000)) AS payload \
           FROM generate_series(1, 200) g')",
    );
    assert_eq!(planned, 200);
    let grown = peak_resident_mib(pid) - before;
    assert!(
        grown < 128.0,
        "planning 200 MiB of payloads grew the backend by {grown:.0} MiB"
    );

    let long = "n".repeat(1_000_000);
    for sql in [
        format!("SELECT chunkwise.create_task('{long}', call => 'noop')"),
        format!("SELECT chunkwise.pause('{long}')"),
    ] {
        let (_, message, _) = sql_error(db.query(sql.as_str(), &[]));
        assert!(
            message.len() < 200,
            "a refused value is echoed: {} characters of message",
            message.len()
        );
    }
}

/// Rows of any task left in the extension's tables: tasks, items and run history.
fn rows_of_any_task(admin: &mut Client) -> i64 {
    one(
        admin,
        "SELECT (SELECT count(*) FROM chunkwise.tasks) + (SELECT count(*) FROM chunkwise.items) \
              + (SELECT count(*) FROM chunkwise.run_history)",
    )
}

#[test]
fn task_owners_are_dependencies_for_drop_role_reassign_owned_and_drop_owned() {
    let db = "tenant_owners";
    let mut admin = tenants_db(db);
    admin
        .batch_execute(&in_db(
            db,
            "CREATE TABLE public.ran (k bigint, who text);
             GRANT INSERT ON public.ran TO PUBLIC;
             CREATE PROCEDURE public.work(k bigint) LANGUAGE sql AS
               'INSERT INTO public.ran VALUES (k, current_user)';",
        ))
        .unwrap();
    let mut mallory = connect(db, "mallory");
    mallory
        .batch_execute(
            "SELECT chunkwise.create_task('m1', call => 'public.work');
             SELECT chunkwise.create_task('m2', call => 'public.work');
             SELECT chunkwise.plan('m1', 'SELECT generate_series(1, 3)::bigint AS key');",
        )
        .unwrap();
    mallory
        .batch_execute("SELECT * FROM chunkwise.run('m1')")
        .unwrap();
    drop(mallory);

    let err = admin
        .batch_execute(&in_db(db, "DROP ROLE mallory"))
        .expect_err("an owner of tasks cannot be dropped");
    let db_error = err.as_db_error().unwrap();
    assert_eq!(db_error.code().code(), "2BP01");
    assert!(
        db_error
            .detail()
            .unwrap_or_default()
            .contains("\"task:m1\""),
        "the refusal names the task: {:?}",
        db_error.detail()
    );

    admin
        .batch_execute(&in_db(db, "REASSIGN OWNED BY mallory TO alice"))
        .unwrap();
    let owner: String = one(
        &mut admin,
        "SELECT owner::text FROM chunkwise.task_status WHERE task = 'm1'",
    );
    assert_eq!(owner, role(db, "alice"), "the task went with its anchor");
    let mut alice = connect(db, "alice");
    alice
        .batch_execute(
            "SELECT chunkwise.plan('m1', 'SELECT generate_series(4, 5)::bigint AS key');",
        )
        .unwrap();
    alice
        .batch_execute("SELECT * FROM chunkwise.run('m1')")
        .unwrap();
    let who: Vec<String> = column(
        &mut admin,
        "SELECT DISTINCT who FROM public.ran WHERE k >= 4",
    );
    assert_eq!(
        who,
        vec![role(db, "alice")],
        "workers now run as the new owner"
    );
    admin
        .batch_execute(&in_db(db, "DROP ROLE mallory"))
        .expect("nothing is left of the old owner");

    admin
        .batch_execute(&in_db(db, "DROP OWNED BY alice"))
        .unwrap();
    let left = rows_of_any_task(&mut admin);
    assert_eq!(
        left, 0,
        "DROP OWNED dropped the tasks with their queue and history"
    );
    admin.batch_execute(&in_db(db, "DROP ROLE alice")).unwrap();
}

/// `DROP OWNED BY` the owner of a task whose workers are running: the DDL is not refused
/// (drop_task refuses a running task; a role's drop should not depend on it), it does
/// not deadlock with the workers, and the workers leave at their next claim, leaving
/// nothing of the task behind.
#[test]
fn drop_owned_of_a_running_tasks_owner_sends_its_workers_off() {
    let db = "tenant_drop_running";
    let mut admin = tenants_db(db);
    admin
        .batch_execute(&in_db(
            db,
            "CREATE TABLE public.slow_done (k bigint);
             GRANT INSERT ON public.slow_done TO PUBLIC;
             CREATE PROCEDURE public.slow(k bigint) LANGUAGE sql AS
               'INSERT INTO public.slow_done VALUES (k); SELECT pg_sleep(0.02)';",
        ))
        .unwrap();
    let mut alice = connect(db, "alice");
    alice
        .batch_execute(
            "SELECT chunkwise.create_task('slow', call => 'public.slow');
             SELECT chunkwise.plan('slow', 'SELECT generate_series(1, 2000)::bigint AS key');",
        )
        .unwrap();
    let _run_id: i64 = one(&mut alice, "SELECT chunkwise.start('slow', 4)");
    wait_for("the run to be under way", Duration::from_secs(60), || {
        let done: i64 = one(&mut admin, "SELECT count(*) FROM public.slow_done");
        (done >= 20).then_some(())
    });
    assert!(
        !live_workers(&mut admin).is_empty(),
        "the workers are running"
    );

    admin
        .batch_execute(&in_db(db, "DROP OWNED BY alice"))
        .expect("DROP OWNED goes through while the task's workers run");
    wait_for("the workers to leave", Duration::from_secs(30), || {
        live_workers(&mut admin).is_empty().then_some(())
    });
    let left = rows_of_any_task(&mut admin);
    assert_eq!(left, 0, "nothing of the task is left");
    let done: i64 = one(&mut admin, "SELECT count(*) FROM public.slow_done");
    assert!(
        done < 2000,
        "the workers stopped with the task ({done} of 2000 ran)"
    );
    drop(alice);
    admin
        .batch_execute(&in_db(db, "DROP ROLE alice"))
        .expect("nothing is left of the owner");
}

#[test]
fn another_databases_run_with_the_same_id_is_not_this_ones() {
    let mut a = test_db("tenant_db_a");
    let mut b = test_db("tenant_db_b");
    for db in [&mut a, &mut b] {
        db.batch_execute(
            "CREATE PROCEDURE nap(k bigint) LANGUAGE sql AS 'SELECT pg_sleep(0.3)';
             SELECT chunkwise.create_task('t', call => 'nap');
             SELECT chunkwise.plan('t', 'SELECT generate_series(1, 20)::bigint AS key');",
        )
        .unwrap();
    }
    a.batch_execute("SELECT * FROM chunkwise.run('t', 4)")
        .unwrap();
    // Run ids are per database: B's first run is run 1 too, and it is under way.
    let b_run: i64 = one(&mut b, "SELECT chunkwise.start('t', 2)");
    assert_eq!(b_run, 1);
    let (state, workers): (String, i64) = crate::harness::two(
        &mut a,
        "SELECT r.state, (SELECT count(*) FROM chunkwise.workers) FROM chunkwise.runs r WHERE r.run_id = 1",
    );
    assert_eq!(
        (state.as_str(), workers),
        ("finished", 0),
        "database B's workers are not database A's"
    );
    let waited: String = one(&mut a, "SELECT state FROM chunkwise.wait(1, '2 seconds')");
    assert_eq!(waited, "finished");
    b.batch_execute("SELECT chunkwise.cancel('t')").unwrap();
    wait_for("B's workers to stop", Duration::from_secs(30), || {
        let live: i64 = one(&mut b, "SELECT count(*) FROM chunkwise.workers");
        (live == 0).then_some(())
    });
}
