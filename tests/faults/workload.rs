//! The workload every scenario runs: one counter per key, and a task whose target bumps
//! the key's counter once. After the faults, the work is finished and the counters tell
//! what was lost (0) or duplicated (> 1); items not done, runs still "running" and locks
//! still held are stuck.

use std::ops::Range;
use std::thread::JoinHandle;
use std::time::Duration;

use postgres::{Client, Row};

use crate::harness::{Cluster, one, test_db, wait_for};

/// How a key's target misbehaves (see the procedure in `Workload::new`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    Plain,
    /// Sleeps 300 ms on its first attempt (longer than the scenario's item_timeout).
    SlowFirst,
    /// Calls pg_terminate_backend() on its own worker on its first attempt (a failed
    /// attempt: retried).
    TerminateSelf,
    /// Takes a session-level advisory lock and keeps it.
    LeakLock,
    /// Takes the same advisory lock for the transaction (blocks while one is leaked).
    TakeLock,
    /// Tries to COMMIT inside the item on its first attempt.
    CommitFirst,
    /// Locks row 1 then row 2 of `pairs` (and the next key 2 then 1): a deadlock.
    LockAb,
    LockBa,
}

impl Behaviour {
    fn name(self) -> &'static str {
        match self {
            Behaviour::Plain => "plain",
            Behaviour::SlowFirst => "slow_first",
            Behaviour::TerminateSelf => "terminate_self",
            Behaviour::LeakLock => "leak_lock",
            Behaviour::TakeLock => "take_lock",
            Behaviour::CommitFirst => "commit_first",
            Behaviour::LockAb => "lock_ab",
            Behaviour::LockBa => "lock_ba",
        }
    }
}

/// One scenario's line of the report.
pub struct Outcome {
    pub scenario: &'static str,
    pub faults: i64,
    pub items: i64,
    pub lost: i64,
    pub duplicated: i64,
    pub stuck: i64,
}

pub struct Workload {
    pub db: String,
    next_key: i64,
}

impl Workload {
    /// A fresh database with the counters, the target and task `bump` (`options` are
    /// extra create_task arguments). Attempts are plentiful and retries quick, so that
    /// faults delay items but never kill them.
    pub fn new(db: &str, sleep_ms: u32, options: &str) -> Workload {
        let mut client = test_db(db);
        client
            .batch_execute(&format!(
                "CREATE TABLE counters (k bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
                 CREATE TABLE behaviour (k bigint PRIMARY KEY, kind text NOT NULL);
                 CREATE TABLE pairs (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
                 INSERT INTO pairs VALUES (1), (2);
                 CREATE PROCEDURE bump(k bigint) LANGUAGE plpgsql AS $$
                 DECLARE
                   kind text := coalesce((SELECT b.kind FROM behaviour b WHERE b.k = bump.k), 'plain');
                   first boolean := (SELECT i.attempts = 0 FROM chunkwise.items i
                                      JOIN chunkwise.tasks t USING (task_id)
                                      WHERE t.task = 'bump' AND i.key = bump.k AND i.status = 'pending');
                 BEGIN
                   PERFORM pg_sleep({sleep_ms} / 1000.0);
                   CASE kind
                     WHEN 'slow_first' THEN IF first THEN PERFORM pg_sleep(0.3); END IF;
                     WHEN 'terminate_self' THEN IF first THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF;
                     WHEN 'leak_lock' THEN PERFORM pg_advisory_lock(42);
                     WHEN 'take_lock' THEN PERFORM pg_advisory_xact_lock(42);
                     WHEN 'commit_first' THEN IF first THEN COMMIT; END IF;
                     WHEN 'lock_ab' THEN
                       UPDATE pairs SET n = n + 1 WHERE id = 1; PERFORM pg_sleep(0.2);
                       UPDATE pairs SET n = n + 1 WHERE id = 2;
                     WHEN 'lock_ba' THEN
                       UPDATE pairs SET n = n + 1 WHERE id = 2; PERFORM pg_sleep(0.2);
                       UPDATE pairs SET n = n + 1 WHERE id = 1;
                     ELSE NULL;
                   END CASE;
                   UPDATE counters SET n = n + 1 WHERE counters.k = bump.k;
                 END $$;
                 SELECT chunkwise.create_task('bump', call => 'bump', max_attempts => 1000,
                          retry_backoff => '10 milliseconds', retry_backoff_max => '200 milliseconds'{options});"
            ))
            .unwrap();
        Workload {
            db: db.to_string(),
            next_key: 1,
        }
    }

    pub fn client(&self) -> Client {
        Cluster::get().connect(&self.db)
    }

    /// Adds `count` keys, planned in key order, with the behaviour `kind` gives each.
    pub fn add_keys(&mut self, count: i64, kind: impl Fn(i64) -> Behaviour) -> Range<i64> {
        let keys = self.next_key..self.next_key + count;
        self.next_key += count;
        let mut client = self.client();
        let mut tx = client.transaction().unwrap();
        for k in keys.clone() {
            tx.execute("INSERT INTO counters (k) VALUES ($1)", &[&k])
                .unwrap();
            let behaviour = kind(k);
            if behaviour != Behaviour::Plain {
                tx.execute(
                    "INSERT INTO behaviour VALUES ($1, $2)",
                    &[&k, &behaviour.name()],
                )
                .unwrap();
            }
        }
        tx.execute(
            "SELECT chunkwise.plan('bump', format('SELECT g AS key FROM generate_series(%s, %s) g', $1::bigint, $2::bigint))",
            &[&keys.start, &(keys.end - 1)],
        )
        .unwrap();
        tx.commit().unwrap();
        keys
    }

    /// Runs `sql` (a chunkwise.run) on a connection of its own; its pid comes first.
    pub fn spawn(
        &self,
        sql: &'static str,
    ) -> (
        i32,
        postgres::CancelToken,
        JoinHandle<Result<Row, postgres::Error>>,
    ) {
        let mut client = self.client();
        let pid: i32 = one(&mut client, "SELECT pg_backend_pid()");
        let cancel = client.cancel_token();
        let handle = std::thread::spawn(move || client.query_one(sql, &[]));
        (pid, cancel, handle)
    }

    /// Pids of the task's live workers.
    pub fn live_workers(&self) -> Vec<i32> {
        self.client()
            .query(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'chunkwise worker' AND datname = current_database()",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Waits for the run to have workers and `done` more items done than `before`.
    pub fn wait_until_busy(&self, before: i64, done: i64) {
        wait_for("the run to get going", Duration::from_secs(60), || {
            let now = self.done();
            (now >= before + done && !self.live_workers().is_empty()).then_some(())
        });
    }

    pub fn done(&self) -> i64 {
        one(
            &mut self.client(),
            "SELECT count(*) FROM chunkwise.items WHERE status = 'done' AND task_id = \
               (SELECT task_id FROM chunkwise.tasks WHERE task = 'bump')",
        )
    }

    /// Items whose last failure had this SQLSTATE (kept when they are done later).
    pub fn failures_with(&self, sqlstate: &str) -> i64 {
        self.client()
            .query_one(
                "SELECT count(*) FROM chunkwise.items WHERE last_sqlstate = $1 AND task_id = \
                   (SELECT task_id FROM chunkwise.tasks WHERE task = 'bump')",
                &[&sqlstate],
            )
            .unwrap()
            .get(0)
    }

    pub fn wait_for_no_workers(&self) {
        wait_for("the workers to exit", Duration::from_secs(60), || {
            self.live_workers().is_empty().then_some(())
        });
    }

    /// Runs until nothing is pending (a bounded number of runs), then counts what was
    /// lost, duplicated or stuck.
    pub fn finish(&self, scenario: &'static str, faults: i64) -> Outcome {
        Cluster::get().wait_until_accepting(Duration::from_secs(60));
        self.wait_for_no_workers();
        let mut client = self.client();
        // A hang (a lock nobody releases) fails the scenario instead of the whole suite.
        client
            .batch_execute("SET statement_timeout = '120s'")
            .unwrap();
        for _ in 0..30 {
            let left: i64 = one(
                &mut client,
                "SELECT count(*) FROM chunkwise.items i JOIN chunkwise.tasks t USING (task_id) \
                  WHERE t.task = 'bump' AND i.status = 'pending'",
            );
            if left == 0 {
                break;
            }
            client
                .query_one("SELECT * FROM chunkwise.run('bump', 4)", &[])
                .unwrap_or_else(|e| panic!("{scenario}: finishing run: {e}"));
        }
        self.wait_for_no_workers();
        let items: i64 = one(&mut client, "SELECT count(*) FROM counters");
        let lost: i64 = one(&mut client, "SELECT count(*) FROM counters WHERE n = 0");
        let duplicated: i64 = one(&mut client, "SELECT count(*) FROM counters WHERE n > 1");
        let stuck: i64 = one(
            &mut client,
            "SELECT (SELECT count(*) FROM chunkwise.items i JOIN chunkwise.tasks t USING (task_id) \
                      WHERE t.task = 'bump' AND i.status <> 'done') \
                  + (SELECT count(*) FROM chunkwise.runs WHERE state = 'running') \
                  + (SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
                      WHERE c.relname = 'items' AND l.pid <> pg_backend_pid())",
        );
        Outcome {
            scenario,
            faults,
            items,
            lost,
            duplicated,
            stuck,
        }
    }

    /// Runs shown as interrupted or cancelled (never as running once their workers died).
    pub fn runs_in_state(&self, state: &str) -> i64 {
        self.client()
            .query_one(
                "SELECT count(*) FROM chunkwise.runs WHERE state = $1",
                &[&state],
            )
            .unwrap()
            .get(0)
    }
}
