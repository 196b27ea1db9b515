//! `NOTIFY chunkwise` events, as JSON: a run finished, an item went dead, a callback was
//! called or failed, a pipeline asked for a cycle. Sent inside the
//! transaction that makes them true, so listeners hear of them exactly when they commit.
//! Any role may LISTEN on any channel, so a payload carries ids only, never a task name,
//! key or error message: what a listener may know it reads back through the views.

use pgrx::prelude::*;
use pgrx::spi::SpiError;
use serde_json::json;

use crate::security::with_pinned_search_path;

fn send(payload: serde_json::Value) -> Result<(), SpiError> {
    with_pinned_search_path(|| {
        Spi::run_with_args(
            "SELECT pg_catalog.pg_notify('chunkwise', $1)",
            &[payload.to_string().into()],
        )
    })
}

/// An item went dead. Only ids travel: `LISTEN` has no permissions, so a listener reads
/// the details back through `chunkwise.failures`, which shows it only what it may see.
pub fn item_dead(run_id: i64, item_id: i64) -> Result<(), SpiError> {
    send(json!({
        "event": "item_dead",
        "run_id": run_id,
        "item_id": item_id,
    }))
}

/// A run is over; its figures are in `chunkwise.runs` (for those who may see it).
pub fn run_finished(run_id: i64) -> Result<(), SpiError> {
    send(json!({
        "event": "run_finished",
        "run_id": run_id,
    }))
}

/// A run's `on_success` or `on_failure` procedure (`callback`) was called and committed
/// with the run's settling.
pub fn callback_done(run_id: i64, callback: &str) -> Result<(), SpiError> {
    send(json!({
        "event": "callback_done",
        "run_id": run_id,
        "callback": callback,
    }))
}

/// A run's callback failed; it is retried or, after max_attempts, given up
/// (`chunkwise.pipeline` shows its error to those who may see the task).
pub fn callback_failed(run_id: i64, callback: &str) -> Result<(), SpiError> {
    send(json!({
        "event": "callback_failed",
        "run_id": run_id,
        "callback": callback,
    }))
}

/// A cycle of the task `task_id` was asked for by the run `run_id` of a task that has it
/// in its `then`.
pub fn cycle_requested(task_id: i32, run_id: i64) -> Result<(), SpiError> {
    send(json!({
        "event": "cycle_requested",
        "task_id": task_id,
        "run_id": run_id,
    }))
}
