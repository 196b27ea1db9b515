//! The three-node Citus cluster the tests share, and a fresh Citus database per test.

use std::sync::OnceLock;

use postgres::Client;

use crate::harness::{Cluster, ClusterSpec, one, pg_config_dir};

/// Settings every node needs: Citus preloaded, TCP on the loopback interface only (Citus
/// addresses nodes by host and port), prepared transactions for Citus's two-phase commit
/// (room for those a fault leaves behind until Citus's recovery, every second here,
/// finishes them).
macro_rules! node_settings {
    ($extra:literal) => {
        concat!(
            "listen_addresses = '127.0.0.1'\nshared_preload_libraries = 'citus'\n",
            "max_prepared_transactions = 100\nfsync = off\nlog_min_messages = warning\n",
            "log_line_prefix = '%m [%p] %b '\n",
            $extra
        )
    };
}

pub const COORDINATOR_SETTINGS: &str = node_settings!(
    "max_worker_processes = 32\nchunkwise.max_workers = 8\nmax_connections = 60\n\
     citus.recover_2pc_interval = '1s'\n"
);

const WORKER_NODES: [ClusterSpec; 2] = [
    ClusterSpec {
        name: "pg_chunkwise_citus_worker1",
        port: 54_361,
        settings: node_settings!("max_connections = 100\n"),
    },
    ClusterSpec {
        name: "pg_chunkwise_citus_worker2",
        port: 54_362,
        settings: node_settings!("max_connections = 100\n"),
    },
];

pub struct Citus {
    pub coordinator: &'static Cluster,
    pub workers: Vec<Cluster>,
}

static CITUS: OnceLock<Option<Citus>> = OnceLock::new();

/// The cluster, started on first use; `None` where Citus is not installed.
pub fn citus() -> Option<&'static Citus> {
    CITUS
        .get_or_init(|| {
            if !pg_config_dir("--sharedir")
                .join("extension/citus.control")
                .exists()
            {
                return None;
            }
            let coordinator = Cluster::get();
            let workers = WORKER_NODES.iter().map(Cluster::start).collect();
            Some(Citus {
                coordinator,
                workers,
            })
        })
        .as_ref()
}

/// The Citus cluster, or a SKIPPED line and an early return from the test.
macro_rules! citus_or_skip {
    () => {
        match crate::cluster::citus() {
            Some(citus) => citus,
            None => {
                eprintln!(
                    "SKIPPED: Citus is not installed in this PostgreSQL (run `make setup` \
                     with ../shared/citus present, or install Citus from its own packages)"
                );
                return;
            }
        }
    };
}
pub(crate) use citus_or_skip;

impl Citus {
    /// A fresh database of this name on every node, the worker nodes added to the
    /// coordinator's metadata, pg_chunkwise created on the coordinator. Returns a client
    /// of the coordinator's database.
    pub fn db(&self, name: &str) -> Client {
        for node in std::iter::once(self.coordinator).chain(self.workers.iter()) {
            let mut admin = node.connect("postgres");
            for sql in [
                format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                format!("CREATE DATABASE {name}"),
            ] {
                admin.batch_execute(&sql).unwrap();
            }
            node.connect(name)
                .batch_execute("CREATE EXTENSION citus")
                .unwrap();
        }
        let mut db = self.coordinator.connect(name);
        db.execute(
            "SELECT citus_set_coordinator_host('127.0.0.1', $1)",
            &[&i32::from(self.coordinator.port)],
        )
        .unwrap();
        for worker in &self.workers {
            db.execute(
                "SELECT citus_add_node('127.0.0.1', $1)",
                &[&i32::from(worker.port)],
            )
            .unwrap();
        }
        db.batch_execute("CREATE EXTENSION pg_chunkwise").unwrap();
        db
    }

    pub fn worker_db(&self, index: usize, name: &str) -> Client {
        self.workers[index].connect(name)
    }

    /// Asserts that every worker node's shards of `table` in database `name` saw rows
    /// counted by `counter` (a pg_stat_user_tables expression, e.g. `n_tup_ins`): the
    /// work really ran on all the nodes. Citus hides the shard tables from the catalog
    /// views unless told otherwise.
    pub fn assert_every_node_wrote(&self, name: &str, table: &str, counter: &str) {
        for node in 0..self.workers.len() {
            let mut worker = self.worker_db(node, name);
            worker
                .batch_execute("SET citus.override_table_visibility = off")
                .unwrap();
            let written: i64 = one(
                &mut worker,
                &format!(
                    "SELECT coalesce(sum({counter}), 0)::bigint FROM pg_stat_user_tables
                      WHERE relname ~ '^{table}_[0-9]+$'"
                ),
            );
            assert!(
                written > 0,
                "worker node {node} wrote no {table} shard rows"
            );
        }
    }
}

/// `chunkwise.run(task)`: its processed, failed and dead counts.
pub fn run_counts(db: &mut Client, task: &str) -> (i64, i64, i64) {
    let row = db
        .query_one(
            "SELECT processed, failed, dead FROM chunkwise.run($1)",
            &[&task],
        )
        .unwrap_or_else(|e| panic!("run {task}: {e}"));
    (row.get(0), row.get(1), row.get(2))
}
