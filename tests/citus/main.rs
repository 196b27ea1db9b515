//! Scale-out over Citus, on a real local cluster of three PostgreSQL instances: a
//! coordinator (where pg_chunkwise runs) and two worker nodes. The tests skip, saying
//! why, where Citus is not installed (`make setup` installs the build in
//! `../shared/citus` when that folder is there).

mod cluster;
#[path = "../common/harness.rs"]
mod harness;

mod datamart;
mod shards;

/// The coordinator: pg_chunkwise's workers run here and reach the worker nodes over
/// TCP on the loopback interface, which is how Citus names its nodes.
pub const CLUSTER: harness::ClusterSpec = harness::ClusterSpec {
    name: "pg_chunkwise_citus_coordinator",
    port: 54_360,
    settings: cluster::COORDINATOR_SETTINGS,
};
