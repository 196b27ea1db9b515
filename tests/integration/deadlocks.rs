//! Lock waits that the deadlock detector cannot see or that went round in a circle:
//! planning against running groups, and maintenance of the queue tables while a run
//! waits.

use std::time::Duration;

use crate::fixtures::{bump_task, live_workers, status_counts};
use crate::harness::{Cluster, column, one, test_db, wait_for};

/// plan() re-planning items of groups that workers are running used to lock items then
/// groups while a claim locks a group then its head item: 40P01 for the plan() or the
/// worker's claim. Here each step is made to happen in the order that closes the
/// circle (the targets wait for the others to get there).
#[test]
fn planning_into_running_groups_does_not_deadlock_with_claims() {
    let mut db = test_db("plan_vs_claim");
    db.batch_execute(
        "CREATE FUNCTION waiting(who text, what text) RETURNS boolean LANGUAGE sql AS $$
           SELECT EXISTS (SELECT FROM pg_stat_activity WHERE backend_type = who
                             AND wait_event_type = 'Lock' AND query LIKE what) $$;
         -- The heads first hold until the test has seen both run (however slowly the
         -- workers start on a busy machine), then give plan() its window.
         CREATE TABLE seen (at timestamptz);
         CREATE PROCEDURE step(k bigint) LANGUAGE plpgsql AS $$
         BEGIN
           FOR i IN 1..6000 LOOP  -- at most 60 seconds
             EXIT WHEN k NOT IN (1, 4) OR EXISTS (SELECT FROM seen);
             PERFORM pg_sleep(0.01);
           END LOOP;
           FOR i IN 1..300 LOOP  -- at most 3 seconds
             EXIT WHEN k = 1 AND waiting('chunkwise worker', '%');
             EXIT WHEN k = 4 AND waiting('client backend', '%chunkwise.plan%');
             EXIT WHEN k NOT IN (1, 4);
             PERFORM pg_sleep(0.01);
           END LOOP;
         END $$;
         SELECT chunkwise.create_task('steps', call => 'step', sequential_groups => true);
         -- group a: key 1; group b: key 4 (its head), then key 2.
         SELECT chunkwise.enqueue('steps', 1, group_key => 'a');
         SELECT chunkwise.enqueue('steps', 4, group_key => 'b');
         SELECT chunkwise.enqueue('steps', 2, group_key => 'b');",
    )
    .unwrap();
    let run_id: i64 = one(&mut db, "SELECT chunkwise.start('steps', workers => 2)");
    wait_for("both heads to run", Duration::from_secs(60), || {
        let n: i64 = one(
            &mut db,
            "SELECT count(*) FROM chunkwise.workers WHERE current_key IN (1, 4)",
        );
        (n == 2).then_some(())
    });
    db.batch_execute("INSERT INTO seen VALUES (now())").unwrap();
    // Re-plans key 2 (group b), then key 1 (running in group a), and adds key 5 to b.
    // Before the fix this plan() or the claim of a worker failed with 40P01.
    let planned = db.query_one(
        "SELECT chunkwise.plan('steps', $q$SELECT * FROM (VALUES (2::bigint, 'b'), (1, 'a'), (5, 'b')) v(key, group_key)$q$)",
        &[],
    );
    assert!(planned.is_ok(), "plan() ran into no deadlock: {planned:?}");
    wait_for("the workers to exit", Duration::from_secs(60), || {
        live_workers(&mut db).is_empty().then_some(())
    });
    let log = Cluster::get().server_log();
    assert!(
        !log.contains(&format!(
            "task \"steps\", run {run_id}: its bookkeeping failed"
        )),
        "no worker's claim failed"
    );
    // Whatever the interleaving left pending, the next run does.
    db.batch_execute("SELECT chunkwise.run('steps', 2)")
        .unwrap();
    let keys: Vec<i64> = column(
        &mut db,
        "SELECT DISTINCT key FROM chunkwise.items WHERE status = 'done' ORDER BY key",
    );
    assert_eq!(keys, [1, 2, 4, 5]);
    let open: i64 = one(
        &mut db,
        "SELECT count(*) FROM chunkwise.items WHERE status <> 'done'",
    );
    assert_eq!(open, 0);
}

/// `VACUUM FULL` of a queue table while run() or wait() waits for the workers: the
/// waiting backend used to keep its locks on the table from its lookups, the VACUUM
/// queued behind it, the workers' claims behind the VACUUM, and nothing saw the circle.
/// Now the VACUUM goes through as soon as the workers' current transactions end.
#[test]
fn vacuum_full_of_the_queue_tables_goes_through_while_a_run_waits() {
    let mut db = test_db("vacuum_full_run");
    bump_task(&mut db, 400, 10.0);
    for (table, waiter) in [
        (
            "chunkwise.items",
            "SELECT processed FROM chunkwise.run('bump', 2, max_items => 200)",
        ),
        (
            "chunkwise.tasks",
            "SELECT processed FROM chunkwise.wait(chunkwise.start('bump', 2))",
        ),
    ] {
        let runner = std::thread::spawn(move || {
            let mut client = Cluster::get().connect("vacuum_full_run");
            one::<i64>(&mut client, waiter)
        });
        wait_for("the workers to run items", Duration::from_secs(60), || {
            let n: i64 = one(
                &mut db,
                "SELECT count(*) FROM chunkwise.workers WHERE current_item IS NOT NULL",
            );
            (n > 0).then_some(())
        });
        let mut dba = Cluster::get().connect("vacuum_full_run");
        dba.batch_execute("SET lock_timeout = '20s'").unwrap();
        let vacuumed = dba.batch_execute(&format!("VACUUM FULL {table}"));
        assert!(
            vacuumed.is_ok(),
            "VACUUM FULL {table} went through: {vacuumed:?}"
        );
        let processed = runner.join().unwrap();
        assert_eq!(processed, 200, "{waiter} finished its run");
    }
    assert_eq!(status_counts(&mut db, "bump"), (0, 400, 0));
}
