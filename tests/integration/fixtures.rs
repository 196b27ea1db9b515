//! Targets shared by several test files.

use postgres::Client;

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
