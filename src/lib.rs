//! pg_chunkwise: parallel, chunked, crash-safe ETL inside PostgreSQL.
//!
//! SQL callers define tasks and plan items (`api`); `chunkwise.run()` launches a pool of
//! dynamic background workers (`launcher`) that claim items in priority order and run
//! each in its own transaction with its status update (`worker`).

use pgrx::prelude::*;

mod always_on;
mod api;
mod catalog;
mod columns;
mod error;
mod governance;
mod gucs;
mod item_status;
mod kept_plans;
mod latch;
mod launcher;
mod locks;
mod notify;
mod oid_args;
mod open_groups;
mod ownership;
mod pipeline;
mod queued_in_transaction;
mod raised;
mod ranking;
mod retention;
mod run_state;
mod security;
mod target;
mod task_cache;
mod transaction;
mod worker;

::pgrx::pg_module_magic!();

extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    always_on::init();
}
