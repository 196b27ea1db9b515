//! Client tests against a real PostgreSQL cluster started by the harness: what the
//! background workers do can only be seen from outside the calling transaction.

mod fixtures;
#[path = "../common/harness.rs"]
mod harness;

mod bad_input;
mod crashes;
mod cycles;
mod deadlocks;
mod draining;
mod engine;
mod examples;
mod governance;
mod groups;
mod hijack;
mod interrupts;
mod operating;
mod pipelines;
mod planning;
mod ranges;
mod regress;
mod retention;
mod security;
mod tenants;

/// The shared cluster of these tests (pg_cron preloaded for the scheduling tests).
pub const CLUSTER: harness::ClusterSpec = harness::ClusterSpec {
    name: "pg_chunkwise_tests",
    port: 54_329,
    settings: "max_worker_processes = 48\nmax_connections = 60\nfsync = off\n\
               chunkwise.max_workers = 24\nlog_min_messages = warning\n\
               log_line_prefix = '%m [%p] %b '\n\
               shared_preload_libraries = 'pg_cron'\ncron.database_name = 'postgres'\n\
               cron.use_background_workers = on",
};
