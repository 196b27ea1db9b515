//! A run ends only when no due work is left that its workers could claim: an empty claim
//! because the items or groups left are held by other transactions is not the end.

use std::time::Duration;

use postgres::Client;

use crate::fixtures::counters;
use crate::harness::{Cluster, one, test_db, wait_for};

/// Holds a row lock on what `lock_sql` selects (an item or a group of the queue) in an
/// open transaction of its own, as another worker in the middle of an item would.
fn hold(db_name: &str, lock_sql: &str) -> Client {
    let mut holder = Cluster::get().connect(db_name);
    holder.batch_execute("BEGIN").unwrap();
    let locked = holder.query(lock_sql, &[]).unwrap();
    assert_eq!(locked.len(), 1, "{lock_sql} locks one row");
    holder
}

/// Runs `task` with one worker in the background while `lock_sql`'s row is held; once
/// every other item is done and the run is either over or its worker says it waits for
/// held work, lets the row go. Returns what the run processed.
fn run_past_a_held_row(
    db_name: &'static str,
    task: &'static str,
    lock_sql: &str,
    keys: i64,
) -> i64 {
    let mut db = Cluster::get().connect(db_name);
    let holder = hold(db_name, lock_sql);
    let runner = std::thread::spawn(move || -> i64 {
        let mut client = Cluster::get().connect(db_name);
        one(
            &mut client,
            &format!("SELECT processed FROM chunkwise.run('{task}', 1)"),
        )
    });
    wait_for("the free items to be done", Duration::from_secs(60), || {
        let done: i64 = one(&mut db, "SELECT count(*) FROM counters WHERE n = 1");
        (done == keys - 1).then_some(())
    });
    wait_for(
        "the run to end or wait for the held row",
        Duration::from_secs(60),
        || {
            let waiting: i64 = one(
                &mut db,
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'chunkwise worker' \
               AND query LIKE '%waiting for due items other transactions hold%'",
            );
            (waiting > 0 || runner.is_finished()).then_some(())
        },
    );
    let mut holder = holder;
    holder.batch_execute("COMMIT").unwrap();
    runner.join().unwrap()
}

#[test]
fn a_run_does_not_end_while_due_items_are_held_elsewhere() {
    let mut db = test_db("drain_plain");
    counters(&mut db, 20, 0.0);
    db.batch_execute(
        "SELECT chunkwise.create_task('bump', call => 'bump');
         SELECT chunkwise.plan('bump', 'SELECT k AS key FROM counters');",
    )
    .unwrap();
    let processed = run_past_a_held_row(
        "drain_plain",
        "bump",
        "SELECT item_id FROM chunkwise.items WHERE key = 7 FOR UPDATE",
        20,
    );
    assert_eq!(
        processed, 20,
        "the run took the held item once it was let go"
    );
    let pending: i64 = one(
        &mut db,
        "SELECT count(*) FROM chunkwise.items WHERE status = 'pending'",
    );
    assert_eq!(pending, 0);
}

#[test]
fn a_run_of_sequential_groups_does_not_end_while_a_group_is_held_elsewhere() {
    let mut db = test_db("drain_groups");
    counters(&mut db, 20, 0.0);
    db.batch_execute(
        "SELECT chunkwise.create_task('bump', call => 'bump', sequential_groups => true);
         SELECT chunkwise.enqueue('bump', k, group_key => CASE WHEN k = 20 THEN 'held' ELSE 'free' END)
           FROM counters;",
    )
    .unwrap();
    let processed = run_past_a_held_row(
        "drain_groups",
        "bump",
        "SELECT group_key FROM chunkwise.groups WHERE group_key = 'held' FOR UPDATE",
        20,
    );
    assert_eq!(
        processed, 20,
        "the run took the held group's item once it was let go"
    );
}

/// A worker whose own bookkeeping keeps failing (here its claim, waiting for a row a
/// DBA holds, runs into the database's lock_timeout) gives up after a few tries, with
/// task, run and cause in the log; run() says a worker was lost and what is left, the
/// run shows as interrupted, and nothing is lost.
#[test]
fn a_run_whose_worker_gives_up_says_so_and_what_is_left() {
    let mut db = test_db("drain_lost");
    counters(&mut db, 10, 0.0);
    db.batch_execute(
        "SELECT chunkwise.create_task('gives_up', call => 'bump', sequential_groups => true);
         SELECT chunkwise.enqueue('gives_up', k, group_key => 'g') FROM counters;
         ALTER DATABASE drain_lost SET lock_timeout = '50ms';",
    )
    .unwrap();
    // The group's fifth item is held: the worker's claim of it waits for the row lock.
    let holder = hold(
        "drain_lost",
        "SELECT item_id FROM chunkwise.items WHERE key = 5 FOR UPDATE",
    );
    let (mut client, warnings) = Cluster::get().connect_with_notices("drain_lost");
    client.batch_execute("SET lock_timeout = 0").unwrap();
    let processed: i64 = one(
        &mut client,
        "SELECT processed FROM chunkwise.run('gives_up', 1)",
    );
    let mut holder = holder;
    holder.batch_execute("COMMIT").unwrap();
    assert_eq!(processed, 4, "the worker did the group's first four items");
    let said: Vec<String> = warnings.try_iter().collect();
    assert!(
        said.iter().any(|w| w.starts_with("WARNING")
            && w.contains(
                "1 of the 1 workers of run 1 of task \"gives_up\" ended without finishing"
            )
            && w.contains("6 items are still pending")),
        "run() says a worker was lost and what is left: {said:?}"
    );
    let log = Cluster::get().server_log();
    assert!(
        log.contains(
            "worker of task \"gives_up\", run 1: its bookkeeping failed [SQLSTATE 55P03]: \
             canceling statement due to lock timeout; it gives up after 4 tries"
        ),
        "the worker says why it left"
    );
    let state: String = one(&mut db, "SELECT state FROM chunkwise.runs WHERE run_id = 1");
    assert_eq!(state, "interrupted");
    // Nothing is lost: the next run does the rest.
    let processed: i64 = one(
        &mut db,
        "SELECT processed FROM chunkwise.run('gives_up', 1)",
    );
    assert_eq!(processed, 6);
}
