//! Planning: de-duplication of pending keys, query row order, and the activity ranking.

use std::time::Duration;

use postgres::Client;

use crate::fixtures::{done_order, recorder_task};
use crate::harness::{Cluster, one, sql_error, test_db, wait_for};

const DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn replanning_a_pending_key_updates_its_priority_instead_of_duplicating_it() {
    let mut db = test_db("replan");
    recorder_task(&mut db, "ranked");
    let first: i64 = one(
        &mut db,
        "SELECT chunkwise.enqueue('ranked', 1, priority => 5)",
    );
    let again: i64 = one(
        &mut db,
        "SELECT chunkwise.enqueue('ranked', 1, priority => 2)",
    );
    assert_eq!((first, again), (1, 0));
    let added: i64 = one(
        &mut db,
        "SELECT chunkwise.plan('ranked', 'SELECT k AS key, 9 AS priority FROM unnest(ARRAY[1, 2, 2, 3]) k')",
    );
    assert_eq!(
        added, 2,
        "keys 2 and 3 are new; 1 is pending already, and 2 repeats"
    );
    let rows: Vec<(i64, i64)> = db
        .query(
            "SELECT key, priority FROM chunkwise.items ORDER BY key",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, vec![(1, 9), (2, 9), (3, 9)]);
}

#[test]
fn without_a_priority_column_the_query_order_is_the_processing_order() {
    let mut db = test_db("query_order");
    recorder_task(&mut db, "ranked");
    db.batch_execute("SELECT chunkwise.plan('ranked', 'SELECT k AS key FROM unnest(ARRAY[5, 3, 9, 1, 7]) WITH ORDINALITY AS u(k, o) ORDER BY o')")
        .unwrap();
    db.batch_execute("SELECT * FROM chunkwise.run('ranked', 1)")
        .unwrap();
    assert_eq!(done_order(&mut db), vec![5, 3, 9, 1, 7]);
}

#[test]
fn plan_by_activity_orders_users_by_recency_then_activity() {
    let mut db = test_db("by_activity");
    recorder_task(&mut db, "ranked");
    // (key, days since last activity or NULL for never, actions)
    db.batch_execute(
        "CREATE TABLE users (key bigint, days_ago float8, actions bigint);
         INSERT INTO users VALUES
           (1, 400, 5000),  -- old, very active: recency tier 4, activity tier 1 -> tier 10
           (2, 1, 3),       -- yesterday, few actions: tier 3
           (3, 2, 500),     -- 2 days, >100: tier 1
           (4, 3, 500),     -- 3 days, >100, same actions, older than 3: tier 1, after 3
           (5, 20, 50),     -- 20 days, >10: tier 5
           (6, NULL, 0),    -- never: tier 12
           (7, 60, 101),    -- 60 days, >100: tier 7
           (8, 6, 11),      -- 6 days, >10: tier 2
           (9, 5, 1000),    -- 5 days, 1000: tier 1, before 3 and 4 (more actions)
           (10, 29, 10),    -- 29 days, exactly 10 (not >10): tier 6
           (11, 100, 1),    -- >90 days: tier 12, but has a time: before never
           (12, 0.5, 12);   -- half a day, >10: tier 2, same tier as 8 with more actions",
    )
    .unwrap();
    let query = "SELECT key, CASE WHEN days_ago IS NULL THEN NULL ELSE now() - make_interval(secs => days_ago * 86400) END AS last_activity, actions FROM users";
    let added: i64 = db
        .query_one("SELECT chunkwise.plan_by_activity('ranked', $1)", &[&query])
        .unwrap()
        .get(0);
    assert_eq!(added, 12);
    let tiers: Vec<(i64, i32)> = db
        .query(&format!("SELECT key, chunkwise.activity_tier(last_activity, actions) FROM ({query}) q ORDER BY key"), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        tiers,
        vec![
            (1, 10),
            (2, 3),
            (3, 1),
            (4, 1),
            (5, 5),
            (6, 12),
            (7, 7),
            (8, 2),
            (9, 1),
            (10, 6),
            (11, 12),
            (12, 2)
        ]
    );
    db.batch_execute("SELECT * FROM chunkwise.run('ranked', 1)")
        .unwrap();
    assert_eq!(
        done_order(&mut db),
        vec![9, 3, 4, 12, 8, 2, 5, 10, 7, 1, 11, 6]
    );
}

#[test]
fn ranking_windows_and_thresholds_are_settings() {
    let mut db = test_db("ranking_gucs");
    let tier = |db: &mut Client| -> i32 {
        one(
            db,
            "SELECT chunkwise.activity_tier(now() - interval '10 days', 20)",
        )
    };
    assert_eq!(tier(&mut db), 5, "30-day window, >10 actions");
    db.batch_execute(
        "SET chunkwise.recency_windows = '14,60'; SET chunkwise.activity_thresholds = '50'",
    )
    .unwrap();
    assert_eq!(tier(&mut db), 2, "14-day window, not >50 actions");
    db.batch_execute("SET chunkwise.recency_windows = '30,7'")
        .unwrap();
    let err = db
        .query_one("SELECT chunkwise.activity_tier(now(), 1)", &[])
        .expect_err("bad windows");
    assert_eq!(err.code().map(|c| c.code()), Some("22023"));
}

/// A single enqueue (its own statement, see `INSERT_ONE_ITEM`) keeps the batch's rules:
/// a new key is added (1), a pending key gets the new priority and keeps the group key
/// and payload it had when the new ones are NULL (0), and a finished key is added again.
#[test]
fn a_single_enqueue_adds_a_key_once_and_updates_it_while_pending() {
    let mut db = test_db("planning_single_enqueue");
    db.batch_execute("SELECT chunkwise.create_task('single', statement => 'SELECT $1')")
        .unwrap();
    assert_eq!(
        one::<i64>(
            &mut db,
            "SELECT chunkwise.enqueue('single', 7, priority => 5, group_key => 'g', payload => '{\"a\": 1}')"
        ),
        1
    );
    assert_eq!(
        one::<i64>(
            &mut db,
            "SELECT chunkwise.enqueue('single', 7, priority => 3)"
        ),
        0
    );
    let item: String = one(
        &mut db,
        "SELECT format('%s|%s|%s|%s', count(*), min(priority), min(group_key), min(payload::text)) \
           FROM chunkwise.items i JOIN chunkwise.tasks t USING (task_id) WHERE t.task = 'single'",
    );
    assert_eq!(item, "1|3|g|{\"a\": 1}");
    db.batch_execute("UPDATE chunkwise.items SET status = 'done' WHERE key = 7")
        .unwrap();
    assert_eq!(
        one::<i64>(&mut db, "SELECT chunkwise.enqueue('single', 7)"),
        1,
        "a key that is done is added again"
    );
}

/// Enqueue looks its task up once per transaction and keeps it (see `task_cache`):
/// drop_task waits for a transaction that enqueued, and then deletes its items with the
/// rest instead of leaving them behind without a task.
#[test]
fn drop_task_waits_for_an_open_enqueue_and_leaves_none_of_its_items() {
    dropping_waits_for_an_open_enqueue(
        "planning_enqueue_vs_drop",
        "SELECT chunkwise.create_task('dropped', statement => 'SELECT $1')",
        "SELECT chunkwise.drop_task('dropped')",
    );
}

/// The same for `DROP OWNED BY` the task's owner, whose event trigger drops the task.
#[test]
fn drop_owned_waits_for_an_open_enqueue_and_leaves_none_of_its_items() {
    dropping_waits_for_an_open_enqueue(
        "planning_enqueue_vs_drop_owned",
        "DROP ROLE IF EXISTS short_lived;
         CREATE ROLE short_lived LOGIN;
         SET ROLE short_lived;
         SELECT chunkwise.create_task('dropped', statement => 'SELECT $1');
         RESET ROLE;",
        "DROP OWNED BY short_lived; DROP ROLE short_lived",
    );
}

/// Task `dropped` is made by `create`; while another session has enqueued into it in a
/// transaction still open, `drop` (in a third session) must wait for that transaction,
/// and once it commits, take its items with the task.
fn dropping_waits_for_an_open_enqueue(database: &'static str, create: &str, drop: &'static str) {
    let mut db = test_db(database);
    db.batch_execute(create).unwrap();
    let task_id: i32 = one(
        &mut db,
        "SELECT task_id FROM chunkwise.tasks WHERE task = 'dropped'",
    );
    let mut enqueuer = Cluster::get().connect(database);
    enqueuer
        .batch_execute(
            "BEGIN; SELECT chunkwise.enqueue('dropped', g) FROM generate_series(1, 10) g",
        )
        .unwrap();
    let dropper = std::thread::spawn(move || {
        let mut client = Cluster::get().connect(database);
        client.batch_execute(drop)
    });
    wait_for("the drop to wait for the enqueue", DEADLINE, || {
        let waiting: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query = $1",
                &[&drop],
            )
            .unwrap()
            .get(0);
        (waiting == 1).then_some(())
    });
    enqueuer.batch_execute("COMMIT").unwrap();
    dropper.join().unwrap().unwrap();
    let left: i64 = db
        .query_one(
            "SELECT count(*) FROM chunkwise.items WHERE task_id = $1",
            &[&task_id],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the committed enqueue's items went with the task");
}

/// What an enqueue kept of its task is not used past a change in the same transaction:
/// after drop_task and create_task of the same name the items go to the new task, and
/// after SET ROLE the new role's rights are checked.
#[test]
fn an_enqueue_after_a_change_in_its_transaction_sees_the_change() {
    let mut db = test_db("planning_enqueue_kept_task");
    db.batch_execute(
        "DROP ROLE IF EXISTS enqueue_stranger; CREATE ROLE enqueue_stranger;
         GRANT USAGE ON SCHEMA chunkwise TO enqueue_stranger;
         DO $$
         BEGIN
           PERFORM chunkwise.create_task('renewed', statement => 'SELECT $1');
           PERFORM chunkwise.enqueue('renewed', 1);
           PERFORM chunkwise.drop_task('renewed');
           PERFORM chunkwise.create_task('renewed', statement => 'SELECT $1');
           PERFORM chunkwise.enqueue('renewed', 2);
         END $$;",
    )
    .unwrap();
    let keys: String = one(
        &mut db,
        "SELECT string_agg(i.key::text, ',') FROM chunkwise.items i \
           JOIN chunkwise.tasks t USING (task_id) WHERE t.task = 'renewed'",
    );
    assert_eq!(keys, "2");
    let orphans: i64 = one(
        &mut db,
        "SELECT count(*) FROM chunkwise.items i \
          WHERE NOT EXISTS (SELECT FROM chunkwise.tasks t WHERE t.task_id = i.task_id)",
    );
    assert_eq!(orphans, 0);
    db.batch_execute(
        "BEGIN; SELECT chunkwise.enqueue('renewed', 3); SET LOCAL ROLE enqueue_stranger",
    )
    .unwrap();
    let refused = sql_error(db.batch_execute("SELECT chunkwise.enqueue('renewed', 4)"));
    assert_eq!(
        refused.0, "42704",
        "a task the role may not see does not exist for it: {refused:?}"
    );
    db.batch_execute("ROLLBACK").unwrap();
}
