//! The gate that needs a standby: `max_replication_lag` holds a run while a streaming
//! standby is further behind than it allows, and lets it go on once the standby has
//! caught up. A primary and a standby of its own (the standby applies WAL late on
//! purpose, with `recovery_min_apply_delay`).

#[path = "../common/harness.rs"]
mod harness;

use std::time::Duration;

use harness::{Cluster, one, test_db, wait_for};
use postgres::Client;

pub const CLUSTER: harness::ClusterSpec = harness::ClusterSpec {
    name: "pg_chunkwise_primary",
    port: 54_360,
    settings: "fsync = off\nlog_min_messages = warning\nmax_worker_processes = 16",
};

/// Applies each commit 4 s late and reports its progress every second (the primary
/// forgets a caught-up standby's lag at its second report in a row).
const STANDBY: harness::ClusterSpec = harness::ClusterSpec {
    name: "pg_chunkwise_standby",
    port: 54_361,
    settings: "recovery_min_apply_delay = '4s'\nwal_receiver_status_interval = '1s'",
};

const DEADLINE: Duration = Duration::from_secs(60);

/// A commit on the primary: WAL for the standby to apply (late).
fn tick(db: &mut Client) {
    db.batch_execute("INSERT INTO ticks VALUES (clock_timestamp())")
        .unwrap();
}

#[test]
fn max_replication_lag_holds_a_run_while_a_standby_lags_and_lets_it_go_once_caught_up() {
    let mut db = test_db("gov_replication_lag");
    db.batch_execute(
        "CREATE TABLE ticks (at timestamptz);
         CREATE TABLE rows (k bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO rows (k) SELECT generate_series(1, 100);
         CREATE PROCEDURE bump(k bigint) LANGUAGE sql AS 'UPDATE rows SET n = n + 1 WHERE rows.k = bump.k';
         SELECT chunkwise.create_task('lagged', call => 'bump', workers => 2,
                                      max_replication_lag => '1 second');
         SELECT chunkwise.plan('lagged', 'SELECT k AS key FROM rows');",
    )
    .unwrap();
    let standby = Cluster::get().start_standby(&STANDBY);
    let lag: f64 = wait_for("the standby's replay lag to pass 2 s", DEADLINE, || {
        tick(&mut db);
        std::thread::sleep(Duration::from_millis(100));
        one::<Option<f64>>(
            &mut db,
            "SELECT extract(epoch FROM max(replay_lag))::float8 FROM pg_stat_replication",
        )
        .filter(|&lag| lag > 2.0)
    });
    eprintln!("standby replay lag: {lag:.1} s");

    let run_id: i64 = one(&mut db, "SELECT chunkwise.start('lagged')");
    let reason: String = wait_for("the run to be held by the lag", DEADLINE, || {
        tick(&mut db);
        one::<Option<String>>(
            &mut db,
            "SELECT throttled FROM chunkwise.task_status WHERE task = 'lagged'",
        )
    });
    assert!(
        reason.starts_with("max_replication_lag (a standby is "),
        "{reason}"
    );
    assert_eq!(
        one::<i64>(
            &mut db,
            "SELECT done FROM chunkwise.task_status WHERE task = 'lagged'"
        ),
        0,
        "nothing ran while the standby lagged"
    );

    // The standby applies at once again: it catches up, the primary forgets its lag, and
    // the run goes on.
    let mut replica = standby.connect("postgres");
    replica
        .batch_execute("ALTER SYSTEM SET recovery_min_apply_delay = 0")
        .unwrap();
    replica.batch_execute("SELECT pg_reload_conf()").unwrap();
    let row = db
        .query_one(
            "SELECT state, processed FROM chunkwise.wait($1, '60 seconds')",
            &[&run_id],
        )
        .unwrap();
    let (state, processed): (String, i64) = (row.get(0), row.get(1));
    assert_eq!((state.as_str(), processed), ("finished", 100));
    assert_eq!(
        one::<i64>(&mut db, "SELECT count(*) FROM rows WHERE n <> 1"),
        0
    );
}
