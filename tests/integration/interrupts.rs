//! Signals and requests that reach a worker mid-run: SIGTERM stops it at once (its item
//! rolled back, uncounted), a cancel fails only the item it hits, pause() ends a batch
//! between items, and errors in the worker's own bookkeeping are ridden out.

use std::time::Duration;

use postgres::Client;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::fixtures::{
    bump_task, counter_histogram, live_workers, status_counts, worker_running_key,
};
use crate::harness::{Cluster, one, test_db, two, wait_for};

/// The pid of a worker of this database that is running an item.
fn busy_worker(db: &mut Client) -> i32 {
    wait_for("a worker to run an item", Duration::from_secs(60), || {
        db.query(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'chunkwise worker' \
               AND datname = current_database() AND state = 'active'",
            &[],
        )
        .unwrap()
        .first()
        .map(|r| r.get(0))
    })
}

fn wait_for_no_workers(db: &mut Client) {
    wait_for("the workers to exit", Duration::from_secs(60), || {
        live_workers(db).is_empty().then_some(())
    });
}

/// Waits for the server log to say that a worker of task `bump`'s run `run_id` failed
/// in its bookkeeping.
fn wait_for_bookkeeping_failure(run_id: i64) {
    wait_for(
        "the worker to report a failure of its bookkeeping",
        Duration::from_secs(60),
        || {
            Cluster::get()
                .server_log()
                .contains(&format!(
                    "pg_chunkwise worker of task \"bump\", run {run_id}: its bookkeeping failed"
                ))
                .then_some(())
        },
    );
}

/// Once the workers are gone: run `run_id` finished, its one worker counted out, all of
/// its `keys` items done and each counter bumped once.
fn assert_finished_by_one_worker(db: &mut Client, run_id: i64, keys: i64) {
    wait_for_no_workers(db);
    let row = db
        .query_one(
            "SELECT state, workers_exited, processed FROM chunkwise.runs WHERE run_id = $1",
            &[&run_id],
        )
        .unwrap();
    assert_eq!(
        (
            row.get::<_, &str>(0),
            row.get::<_, i32>(1),
            row.get::<_, i64>(2)
        ),
        ("finished", 1, keys)
    );
    assert_eq!(counter_histogram(db), vec![(1, keys)]);
}

/// A long item; SIGTERM must not wait for it.
fn sleeper_task(db: &mut Client, items: i64) {
    db.batch_execute(&format!(
        "CREATE TABLE log (k bigint);
         CREATE PROCEDURE sleeper(k bigint) LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO log VALUES (k); PERFORM pg_sleep(CASE WHEN k = 2 THEN 600 ELSE 0 END); END $$;
         SELECT chunkwise.create_task('sleeper', call => 'sleeper');
         SELECT chunkwise.plan('sleeper', 'SELECT g AS key FROM generate_series(1, {items}) g');"
    ))
    .unwrap();
}

#[test]
fn a_terminated_worker_leaves_at_once_its_item_uncounted_and_its_figures_recorded() {
    let mut db = test_db("sigterm");
    sleeper_task(&mut db, 3);
    let run_id: i64 = one(&mut db, "SELECT chunkwise.start('sleeper', workers => 1)");
    let pid = worker_running_key(&mut db, 2);
    db.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    // The item sleeps for ten minutes: the worker does not wait for it.
    wait_for_no_workers(&mut db);
    let (status, attempts): (String, i32) = two(
        &mut db,
        "SELECT status, attempts FROM chunkwise.items WHERE key = 2",
    );
    assert_eq!(
        (status.as_str(), attempts),
        ("pending", 0),
        "rolled back, not counted"
    );
    let logged: i64 = one(&mut db, "SELECT count(*) FROM log WHERE k = 2");
    assert_eq!(logged, 0);
    let row = db
        .query_one(
            "SELECT state, processed, workers_exited FROM chunkwise.runs WHERE run_id = $1",
            &[&run_id],
        )
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "cancelled");
    assert_eq!(row.get::<_, i64>(1), 1, "item 1 was done and counted");
    assert_eq!(row.get::<_, i32>(2), 1, "the worker left cleanly");
}

/// A target that terminates its own worker is to blame: that counts as a failed
/// attempt, so it dies after max_attempts instead of ending a worker on every run.
#[test]
fn a_target_that_terminates_its_own_worker_fails_its_attempt() {
    let mut db = test_db("sigterm_self");
    db.batch_execute(
        "CREATE PROCEDURE suicidal(k bigint) LANGUAGE plpgsql AS $$
         BEGIN IF k = 1 THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF; END $$;
         SELECT chunkwise.create_task('suicidal', call => 'suicidal', max_attempts => 2,
                                      retry_backoff => '1 millisecond', retry_backoff_max => '1 millisecond');
         SELECT chunkwise.plan('suicidal', 'SELECT g AS key FROM generate_series(1, 3) g');",
    )
    .unwrap();
    // Each of the first two runs ends when key 1 ends its worker; the third does the rest.
    for _ in 0..3 {
        db.batch_execute("SELECT chunkwise.run('suicidal', 1)")
            .unwrap();
        wait_for_no_workers(&mut db);
    }
    let row = db
        .query_one(
            "SELECT status, attempts, sqlstate, message FROM chunkwise.failures WHERE key = 1",
            &[],
        )
        .unwrap();
    assert_eq!(
        (
            row.get::<_, &str>(0),
            row.get::<_, i32>(1),
            row.get::<_, &str>(2),
            row.get::<_, &str>(3)
        ),
        (
            "dead",
            2,
            "57P01",
            "the item's target terminated its own worker"
        )
    );
    let (_, done, _) = status_counts(&mut db, "suicidal");
    assert_eq!(done, 2, "the other items were done");
}

/// `DROP DATABASE ... WITH (FORCE)` terminates the database's backends and gives up if
/// they are still there after 5 seconds: a worker in a long item must go at once.
#[test]
fn drop_database_with_force_is_not_held_up_by_a_long_item() {
    let mut db = test_db("drop_forced");
    sleeper_task(&mut db, 3);
    db.batch_execute("SELECT chunkwise.start('sleeper', workers => 1)")
        .unwrap();
    worker_running_key(&mut db, 2);
    drop(db);
    let mut admin = Cluster::get().connect("postgres");
    admin
        .batch_execute("DROP DATABASE drop_forced WITH (FORCE)")
        .expect("the worker leaves when terminated");
}

/// pg_cancel_backend() on a worker, at random moments, cancels the item it runs (a
/// failed attempt, retried) or the bookkeeping statement it runs (rolled back and tried
/// again): it never ends the worker.
#[test]
fn cancelling_a_worker_fails_only_its_item_and_never_ends_the_worker() {
    let mut db = test_db("cancel_worker");
    bump_task(&mut db, 1_000, 5.0);
    db.batch_execute(
        "SELECT chunkwise.alter_task('bump', max_attempts => 1000,
                                     retry_backoff => '1 millisecond', retry_backoff_max => '1 millisecond')",
    )
    .unwrap();
    let run_id: i64 = one(&mut db, "SELECT chunkwise.start('bump', workers => 2)");
    let mut rng = StdRng::seed_from_u64(17);
    let mut cancels = 0;
    while cancels < 100 && !live_workers(&mut db).is_empty() {
        for pid in live_workers(&mut db) {
            db.execute("SELECT pg_cancel_backend($1)", &[&pid]).unwrap();
            cancels += 1;
        }
        std::thread::sleep(Duration::from_micros(rng.random_range(0..10_000)));
    }
    wait_for_no_workers(&mut db);
    assert!(cancels >= 50, "the workers outlived {cancels} cancels");
    let row = db
        .query_one(
            "SELECT state, workers_started, workers_exited FROM chunkwise.runs WHERE run_id = $1",
            &[&run_id],
        )
        .unwrap();
    assert_eq!(
        (
            row.get::<_, &str>(0),
            row.get::<_, i32>(1),
            row.get::<_, i32>(2)
        ),
        ("finished", 2, 2),
        "no worker died"
    );
    assert_eq!(status_counts(&mut db, "bump"), (0, 1_000, 0));
    assert_eq!(counter_histogram(&mut db), vec![(1, 1_000)]);
    let cancelled: i64 = one(
        &mut db,
        "SELECT count(*) FROM chunkwise.items WHERE last_sqlstate = '57014'",
    );
    assert!(cancelled > 0, "some cancels hit an item and failed it");
}

/// pause() stops a run between the items of a batch, not after the whole batch.
#[test]
fn pause_ends_a_batch_between_items() {
    let mut db = test_db("pause_batch");
    bump_task(&mut db, 200, 50.0);
    db.batch_execute("SELECT chunkwise.alter_task('bump', items_per_commit => 200)")
        .unwrap();
    db.batch_execute("SELECT chunkwise.start('bump', workers => 1)")
        .unwrap();
    busy_worker(&mut db);
    db.batch_execute("SELECT chunkwise.pause('bump')").unwrap();
    wait_for_no_workers(&mut db);
    let (_, done, _) = status_counts(&mut db, "bump");
    assert!(
        done < 100,
        "the batch of 200 items (10 s) ended soon after the pause, with {done} done"
    );
    let bumped: i64 = one(&mut db, "SELECT count(*) FROM counters WHERE n > 0");
    assert_eq!(
        bumped, done,
        "what the batch did before the pause is committed"
    );
}

/// Errors in the worker's own bookkeeping (here its claims run into lock_timeout while
/// a DBA holds the queue table) are retried: the worker rides them out and the run
/// finishes as if nothing happened. A cancel that reaches it while it naps after such an
/// error is dropped: it once escaped the worker's error handling there and ended the
/// worker (its run then showed as interrupted).
#[test]
fn a_worker_rides_out_errors_in_its_own_bookkeeping() {
    let mut db = test_db("rides_out");
    bump_task(&mut db, 200, 5.0);
    db.batch_execute(
        "SELECT chunkwise.alter_task('bump', items_per_commit => 1);
         ALTER DATABASE rides_out SET lock_timeout = '50ms';",
    )
    .unwrap();
    let run_id: i64 = one(&mut db, "SELECT chunkwise.start('bump', workers => 1)");
    busy_worker(&mut db);
    let mut dba = Cluster::get().connect("rides_out");
    dba.batch_execute(
        "SET lock_timeout = 0; BEGIN; LOCK TABLE chunkwise.items IN ACCESS EXCLUSIVE MODE",
    )
    .unwrap();
    wait_for_bookkeeping_failure(run_id);
    let napping = wait_for(
        "the worker to nap after its failed claim",
        Duration::from_secs(60),
        || {
            db.query(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'chunkwise worker' \
                   AND datname = current_database() AND wait_event_type = 'Extension'",
                &[],
            )
            .unwrap()
            .first()
            .map(|r| r.get::<_, i32>(0))
        },
    );
    db.execute("SELECT pg_cancel_backend($1)", &[&napping])
        .unwrap();
    dba.batch_execute("COMMIT").unwrap();
    assert_finished_by_one_worker(&mut db, run_id, 200);
}

/// A cancel that reaches a worker while it leaves its run (here it waits for a lock a
/// DBA holds on the workers' session table) makes it try again: it leaves counted and
/// the run finishes. (Such a cancel once ended the worker uncounted, its run interrupted.)
#[test]
fn a_cancel_while_a_worker_leaves_its_run_is_ridden_out() {
    let mut db = test_db("cancel_leaving");
    bump_task(&mut db, 50, 20.0);
    let run_id: i64 = one(&mut db, "SELECT chunkwise.start('bump', workers => 1)");
    let pid = busy_worker(&mut db);
    let mut dba = Cluster::get().connect("cancel_leaving");
    dba.batch_execute("BEGIN; LOCK TABLE chunkwise.worker_sessions IN SHARE MODE")
        .unwrap();
    wait_for(
        "the worker to wait for the lock as it leaves",
        Duration::from_secs(60),
        || {
            db.query(
                "SELECT FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
                &[&pid],
            )
            .unwrap()
            .first()
            .map(|_| ())
        },
    );
    db.execute("SELECT pg_cancel_backend($1)", &[&pid]).unwrap();
    wait_for_bookkeeping_failure(run_id);
    dba.batch_execute("COMMIT").unwrap();
    assert_finished_by_one_worker(&mut db, run_id, 50);
}
