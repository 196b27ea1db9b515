//! Items whose target crashes the server: the crash counts as a failed attempt, so a
//! poison item dies after max_attempts crashes instead of taking the server down on
//! every run, and the items that were merely in flight elsewhere are not blamed.

use std::time::Duration;

use postgres::Client;

use crate::harness::{Cluster, column, one, test_db};

/// Runs the task until the run crashes the server; returns once it accepts again.
fn run_into_a_crash(task: &str) {
    let cluster = Cluster::get();
    let mut db = cluster.connect("poison");
    let crashed = db.query_one("SELECT * FROM chunkwise.run($1, 2)", &[&task]);
    assert!(
        crashed.is_err(),
        "the run's session dies in the crash restart"
    );
    cluster.wait_until_accepting(Duration::from_secs(60));
}

fn item_states(db: &mut Client) -> Vec<String> {
    column(
        db,
        "SELECT key || ' ' || status || ' ' || attempts FROM chunkwise.items ORDER BY key",
    )
}

#[test]
fn an_item_that_crashes_the_server_dies_after_max_attempts_and_bystanders_are_not_blamed() {
    let mut db = test_db("poison");
    // Key 3 kills its own backend with SIGKILL (the postmaster then restarts every
    // backend), but only once the other worker is busy with an item of its own: that
    // one is stopped by the restart and must not be blamed.
    db.batch_execute(
        "CREATE TABLE log (k bigint);
         CREATE PROCEDURE poisoned(k bigint) LANGUAGE plpgsql AS $$
         BEGIN
           IF k = 3 THEN
             FOR i IN 1..500 LOOP
               EXIT WHEN (SELECT count(*) FROM pg_stat_activity
                           WHERE backend_type = 'chunkwise worker' AND state = 'active') >= 2;
               PERFORM pg_sleep(0.01);
             END LOOP;
             EXECUTE format('COPY (SELECT 1) TO PROGRAM %L', 'kill -9 ' || pg_backend_pid());
           END IF;
           PERFORM pg_sleep(1);
           INSERT INTO log VALUES (k);
         END $$;
         SELECT chunkwise.create_task('poisoned', call => 'poisoned', max_attempts => 2,
                                      retry_backoff => '1 millisecond', retry_backoff_max => '1 millisecond');
         SELECT chunkwise.plan('poisoned', 'SELECT g AS key FROM generate_series(1, 6) g');",
    )
    .unwrap();
    drop(db);

    run_into_a_crash("poisoned");
    let mut db = Cluster::get().connect("poison");
    let after_first: Vec<String> = item_states(&mut db);
    assert_eq!(
        after_first[2], "3 pending 0",
        "not counted until the next run"
    );
    drop(db);

    // The next run's workers count the first crash, then the retry crashes again.
    run_into_a_crash("poisoned");
    let mut db = Cluster::get().connect("poison");
    assert_eq!(item_states(&mut db)[2], "3 pending 1");

    // The third run counts the second crash: the item is dead and the rest is done.
    let row = db
        .query_one("SELECT * FROM chunkwise.run('poisoned', 2)", &[])
        .unwrap();
    assert_eq!(
        row.get::<_, i64>("dead"),
        0,
        "the crashes belong to the runs they ended"
    );
    assert_eq!(
        item_states(&mut db),
        [
            "1 done 0", "2 done 0", "3 dead 2", "4 done 0", "5 done 0", "6 done 0"
        ],
        "only the item that crashed the server is charged"
    );
    let (sqlstate, message): (String, String) = {
        let row = db
            .query_one(
                "SELECT sqlstate, message FROM chunkwise.failures WHERE key = 3",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(sqlstate, "XX000");
    assert!(
        message.starts_with("the server crashed while this item ran"),
        "{message}"
    );
    let logged: Vec<i64> = column(&mut db, "SELECT k FROM log ORDER BY k");
    assert_eq!(logged, [1, 2, 4, 5, 6]);
    // Every in-flight file was taken: none is left to blame anything later.
    let leftover: i64 = one(
        &mut db,
        "SELECT count(*) FROM pg_ls_dir('pg_chunkwise') f WHERE f LIKE 'inflight.' || \
         (SELECT oid FROM pg_database WHERE datname = current_database()) || '.%'",
    );
    assert_eq!(leftover, 0);
}
