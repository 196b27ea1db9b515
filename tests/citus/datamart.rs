//! The per-user datamart refresh of examples/datamart over Citus: facts, users and the
//! datamart distributed by user id, the same procedure and task as on one server. Citus
//! routes each of the procedure's statements to the user's shard.

use std::time::Duration;

use postgres::Client;

use crate::cluster::{Citus, citus_or_skip, run_counts};
use crate::harness::{one, two, wait_for};

const USERS: i64 = 600;

fn example(file: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/datamart")
            .join(file),
    )
    .unwrap()
}

/// The example warehouse twice: `dwh` distributed over the worker nodes and `ref`, a
/// local copy of the same data on the coordinator, for the reference refresh.
fn warehouses(db: &mut Client) {
    let schema = example("schema.sql");
    db.batch_execute(&schema).unwrap();
    db.batch_execute(&schema.replace("dwh", "ref")).unwrap();
    db.batch_execute(&example("data.sql").replace(":users", &USERS.to_string()))
        .unwrap();
    db.batch_execute(
        "INSERT INTO ref.dimension_users SELECT * FROM dwh.dimension_users;
         INSERT INTO ref.fact_actions OVERRIDING SYSTEM VALUE SELECT * FROM dwh.fact_actions;
         -- Citus needs the distribution column in every unique constraint of a table.
         ALTER TABLE dwh.fact_actions DROP CONSTRAINT fact_actions_pkey;
         SELECT create_distributed_table('dwh.dimension_users', 'dimension_user_id', shard_count => 8);
         SELECT create_distributed_table('dwh.fact_actions', 'user_id', colocate_with => 'dwh.dimension_users');
         SELECT create_distributed_table('dwh.datamart_users', 'user_id', colocate_with => 'dwh.dimension_users');
         SELECT truncate_local_data_after_distributing_table(t)
           FROM unnest(ARRAY['dwh.dimension_users', 'dwh.fact_actions', 'dwh.datamart_users']::regclass[]) t;",
    )
    .unwrap();
    db.batch_execute(
        "SELECT chunkwise.create_task('datamart',
                  call    => 'dwh.update_datamart_user',
                  after   => 'UPDATE dwh.dimension_users SET modified = false WHERE dimension_user_id = $1',
                  workers => 2, max_attempts => 50,
                  retry_backoff => '20 milliseconds', retry_backoff_max => '200 milliseconds');",
    )
    .unwrap();
    let planned: i64 = one(
        db,
        "SELECT chunkwise.plan_by_activity('datamart', 'SELECT key, last_activity, actions FROM dwh.modified_users')",
    );
    assert_eq!(planned, USERS);
}

/// The refresh done one user at a time on the local copy.
fn reference_refresh(db: &mut Client) {
    db.batch_execute(
        "DO $$ DECLARE u bigint; BEGIN
           FOR u IN SELECT dimension_user_id FROM ref.dimension_users WHERE modified ORDER BY 1 LOOP
             CALL ref.update_datamart_user(u);
           END LOOP;
         END $$;",
    )
    .unwrap();
}

/// Rows of the distributed datamart that differ from the reference, both ways, on every
/// column that does not move with the clock (windows relative to now() would).
fn datamart_differences(db: &mut Client) -> i64 {
    const COLUMNS: &str = "user_id, actions_total, views, clicks, carts, purchases, refunds, logins, \
        revenue_total, refunded_total, net_revenue, avg_order, max_order, min_order, stddev_order, \
        first_seen, last_seen, last_purchase, active_days, active_weeks, click_through, conversion, refund_rate";
    one(
        db,
        &format!(
            "WITH d AS MATERIALIZED (SELECT {COLUMNS} FROM dwh.datamart_users),
                  r AS MATERIALIZED (SELECT {COLUMNS} FROM ref.datamart_users)
             SELECT (SELECT count(*) FROM (SELECT * FROM d EXCEPT SELECT * FROM r) a)
                  + (SELECT count(*) FROM (SELECT * FROM r EXCEPT SELECT * FROM d) b)
                  + abs((SELECT count(*) FROM d) - {USERS})"
        ),
    )
}

fn still_modified(db: &mut Client) -> i64 {
    one(
        db,
        "SELECT count(*) FROM dwh.dimension_users WHERE modified",
    )
}

#[test]
fn the_per_user_datamart_over_distributed_facts_matches_a_local_reference() {
    let citus = citus_or_skip!();
    let mut db = citus.db("citus_datamart");
    warehouses(&mut db);

    assert_eq!(run_counts(&mut db, "datamart"), (USERS, 0, 0));
    reference_refresh(&mut db);
    assert_eq!(datamart_differences(&mut db), 0);
    assert_eq!(still_modified(&mut db), 0);

    // Each user's rows were written on the node of the user's shard: both nodes worked.
    citus.assert_every_node_wrote("citus_datamart", "datamart_users", "n_tup_ins");
    let (done, dead): (i64, i64) = two(
        &mut db,
        "SELECT done, dead FROM chunkwise.task_status WHERE task = 'datamart'",
    );
    assert_eq!((done, dead), (USERS, 0));
}

/// Terminates the coordinator's connections on a worker node: every statement an item
/// had in flight there fails, as it would when the node restarts.
fn kill_citus_connections(worker: &mut Client) -> i64 {
    one(
        worker,
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
            AND datname = current_database()) k",
    )
}

/// Runs until nothing is pending, whatever failed in between.
fn run_to_completion(db: &mut Client) {
    wait_for(
        "the datamart queue to drain",
        Duration::from_secs(120),
        || {
            db.query("SELECT * FROM chunkwise.run('datamart')", &[])
                .unwrap();
            let pending: i64 = one(
                db,
                "SELECT pending + waiting_retry FROM chunkwise.task_status WHERE task = 'datamart'",
            );
            (pending == 0).then_some(())
        },
    );
}

fn run_state(db: &mut Client, run: i64) -> String {
    db.query_one(
        "SELECT state FROM chunkwise.runs WHERE run_id = $1",
        &[&run],
    )
    .unwrap()
    .get(0)
}

#[test]
fn killing_worker_node_backends_and_a_worker_node_mid_run_loses_nothing() {
    let citus: &Citus = citus_or_skip!();
    let mut db = citus.db("citus_faults");
    warehouses(&mut db);
    // Each user first holds its shard's node for 10 ms (a routed query sleeping there),
    // so that faults on the nodes land inside items.
    db.batch_execute(
        "CREATE PROCEDURE dwh.slow_update(p_user bigint) LANGUAGE plpgsql AS $$
         BEGIN
           PERFORM pg_sleep(0.01) FROM dwh.dimension_users WHERE dimension_user_id = p_user;
           CALL dwh.update_datamart_user(p_user);
         END $$;
         SELECT chunkwise.alter_task('datamart', call => 'dwh.slow_update');",
    )
    .unwrap();

    let run: i64 = one(&mut db, "SELECT chunkwise.start('datamart')");
    wait_for(
        "the first users to be refreshed",
        Duration::from_secs(30),
        || {
            let done: i64 = one(
                &mut db,
                "SELECT count(*) FROM chunkwise.items WHERE status = 'done'",
            );
            (done >= 20).then_some(())
        },
    );
    // Worker node 2 goes down as a crash would, and comes back.
    citus.workers[1].stop("immediate");
    // (A worker whose commit fails at this moment exits, leaving its item pending for the
    // next run; so the run may already be interrupted, but it must not have finished.)
    assert_ne!(
        run_state(&mut db, run),
        "finished",
        "the run ended before the fault"
    );
    std::thread::sleep(Duration::from_millis(300)); // the node stays down a while
    citus.workers[1].start_again();
    // Then the coordinator's connections on worker node 1 are killed, again and again,
    // until the run ends.
    let mut worker = citus.worker_db(0, "citus_faults");
    let mut kills = 0;
    wait_for("the run to end", Duration::from_secs(120), || {
        if run_state(&mut db, run) != "running" {
            return Some(());
        }
        kills += kill_citus_connections(&mut worker);
        std::thread::sleep(Duration::from_millis(80)); // a kill every 100 ms or so
        None
    });
    assert!(kills > 0, "no connection was killed while the run went on");
    // This session's own connections to the nodes were among those killed.
    let mut db = citus.coordinator.connect("citus_faults");
    run_to_completion(&mut db);
    // A COMMIT PREPARED that a fault cut off is finished by Citus's 2PC recovery, every
    // citus.recover_2pc_interval (1 minute); run it now rather than wait.
    db.batch_execute("SELECT recover_prepared_transactions()")
        .unwrap();

    reference_refresh(&mut db);
    let differences = datamart_differences(&mut db);
    if differences > 0 {
        let detail: String = one(
            &mut db,
            "WITH d AS MATERIALIZED (SELECT user_id, actions_total, refreshed_at FROM dwh.datamart_users)
             SELECT string_agg(format('user %s: ref %s, dist %s, item %s', r.user_id, r.actions_total,
                                      d.actions_total, (SELECT i::text FROM chunkwise.items i WHERE i.key = r.user_id)), E'\n')
               FROM ref.datamart_users r LEFT JOIN d USING (user_id)
              WHERE d.actions_total IS DISTINCT FROM r.actions_total",
        );
        panic!("{differences} datamart rows differ from the reference:\n{detail}");
    }
    assert_eq!(still_modified(&mut db), 0);
    let (done, dead, retried): (i64, i64, i64) = {
        let row = db
            .query_one(
                "SELECT count(*) FILTER (WHERE status = 'done'), count(*) FILTER (WHERE status = 'dead'),
                        count(*) FILTER (WHERE attempts > 0 AND last_error IS NOT NULL)
                   FROM chunkwise.items",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!((done, dead), (USERS, 0));
    assert!(
        retried > 0,
        "no item recorded a failure: the faults missed every item"
    );
}
