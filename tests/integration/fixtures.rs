//! Targets, fixtures and checks shared by several test files.

use postgres::Client;

use crate::harness::one;

/// A task whose target appends each key it runs to `done_order`, so tests can read the
/// processing order back.
pub fn recorder_task(client: &mut Client, task: &str) {
    client
        .batch_execute(
            "CREATE TABLE done_order (seq bigserial, k bigint);
             CREATE PROCEDURE record(k bigint) LANGUAGE sql AS 'INSERT INTO done_order (k) VALUES (k)';",
        )
        .unwrap();
    client
        .execute(
            "SELECT chunkwise.create_task($1, call => 'record')",
            &[&task],
        )
        .unwrap();
}

/// The keys the recorder task ran, in the order it ran them.
pub fn done_order(client: &mut Client) -> Vec<i64> {
    client
        .query("SELECT k FROM done_order ORDER BY seq", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A counter per key, and a procedure that bumps one (optionally sleeping first so a
/// run lasts long enough to interfere with).
pub fn counters(client: &mut Client, keys: i64, sleep_ms: f64) {
    client
        .batch_execute(&format!(
            "CREATE TABLE counters (k bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
             INSERT INTO counters (k) SELECT g FROM generate_series(1, {keys}) g;
             CREATE PROCEDURE bump(k bigint) LANGUAGE plpgsql AS $$
             BEGIN
               IF {sleep_ms} > 0 THEN PERFORM pg_sleep({sleep_ms} / 1000.0); END IF;
               UPDATE counters SET n = n + 1 WHERE counters.k = bump.k;
             END $$;"
        ))
        .unwrap();
}

/// The counters fixture plus a task `bump` over it with every key planned.
pub fn bump_task(client: &mut Client, keys: i64, sleep_ms: f64) {
    counters(client, keys, sleep_ms);
    client
        .batch_execute("SELECT chunkwise.create_task('bump', call => 'bump')")
        .unwrap();
    let planned: i64 = one(
        client,
        "SELECT chunkwise.plan('bump', 'SELECT k AS key FROM counters')",
    );
    assert_eq!(planned, keys);
}

pub fn counter_histogram(client: &mut Client) -> Vec<(i32, i64)> {
    client
        .query(
            "SELECT n, count(*) FROM counters GROUP BY n ORDER BY n",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

pub fn status_counts(client: &mut Client, task: &str) -> (i64, i64, i64) {
    let row = client
        .query_one(
            "SELECT pending + waiting_retry, done, dead FROM chunkwise.task_status WHERE task = $1",
            &[&task],
        )
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// Pids of the live pg_chunkwise workers of the current database.
pub fn live_workers(client: &mut Client) -> Vec<i32> {
    client
        .query("SELECT pid FROM pg_stat_activity WHERE backend_type = 'chunkwise worker' AND datname = current_database()", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// `chunkwise.run(task, workers)` (the task's own workers when `None`): its summary row.
pub fn run_task(client: &mut Client, task: &str, workers: Option<i32>) -> postgres::Row {
    client
        .query_one("SELECT * FROM chunkwise.run($1, $2)", &[&task, &workers])
        .unwrap_or_else(|e| panic!("run {task}: {e}"))
}

/// The pid of the worker of this database that is running `key`, once one is.
pub fn worker_running_key(client: &mut Client, key: i64) -> i32 {
    crate::harness::wait_for(
        &format!("a worker to run key {key}"),
        std::time::Duration::from_secs(60),
        || {
            client
                .query(
                    "SELECT pid FROM chunkwise.workers WHERE current_key = $1",
                    &[&key],
                )
                .unwrap()
                .first()
                .map(|r| r.get(0))
        },
    )
}
