//! `NOTIFY chunkwise` events, as JSON: a run finished, an item went dead. Sent inside the
//! transaction that makes them true, so listeners hear of them exactly when they commit.

use pgrx::prelude::*;
use serde_json::json;

/// Characters of an error message kept in a payload (NOTIFY payloads must stay under
/// 8000 bytes).
const MESSAGE_CHARS: usize = 1000;

fn send(payload: serde_json::Value) {
    Spi::run_with_args(
        "SELECT pg_catalog.pg_notify('chunkwise', $1)",
        &[payload.to_string().into()],
    )
    .expect("pg_notify takes a short text payload");
}

pub fn item_dead(task: &str, run_id: i64, key: i64, attempts: i32, sqlstate: &str, message: &str) {
    send(json!({
        "event": "item_dead",
        "task": task,
        "run_id": run_id,
        "key": key,
        "attempts": attempts,
        "sqlstate": sqlstate,
        "message": message.chars().take(MESSAGE_CHARS).collect::<String>(),
    }));
}

pub fn run_finished(task: &str, run_id: i64, processed: i64, failed: i64, dead: i64, seconds: f64) {
    send(json!({
        "event": "run_finished",
        "task": task,
        "run_id": run_id,
        "processed": processed,
        "failed": failed,
        "dead": dead,
        "seconds": (seconds * 1000.0).round() / 1000.0,
    }));
}
