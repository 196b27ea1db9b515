//! The upgrade path, as a DBA walks it: work queued and half done under 0.1.0 (its own
//! library, built from git history by `.ci/build-release.sh`, loaded through
//! `dynamic_library_path`), the package upgraded (this build's library), `ALTER
//! EXTENSION pg_chunkwise UPDATE`, the rest of the work. Every item's effect happens
//! exactly once, the history stays, and the updated extension's objects equal a fresh
//! install's, line by line (`fingerprint.sql`), which a forgotten line in the upgrade
//! script would break.

#[path = "../common/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use postgres::Client;

use harness::{Cluster, fresh_db, one, pg_config_dir, queue_snapshot, sql_error, wait_for};

/// The first release, and the commit it was released from.
const FIRST_RELEASE: &str = "0.1.0";
const FIRST_RELEASE_COMMIT: &str = "1fe70fb";
/// Where the old library is put for `dynamic_library_path` to find first.
const OLD_LIBRARY_DIR: &str = "/tmp/pg_chunkwise_old_library";

pub const CLUSTER: harness::ClusterSpec = harness::ClusterSpec {
    name: "pg_chunkwise_upgrade",
    port: 54_345,
    settings: "max_worker_processes = 16\nfsync = off\nlog_min_messages = warning\n\
               dynamic_library_path = '/tmp/pg_chunkwise_old_library:$libdir'",
};

/// Builds (or finds) the first release's library and puts it where the cluster looks
/// first.
fn install_old_library() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join(".ci/build-release.sh"))
        .args([FIRST_RELEASE_COMMIT, OLD_LIBRARY_DIR])
        .output()
        .expect("run .ci/build-release.sh");
    assert!(
        out.status.success(),
        "building release {FIRST_RELEASE}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Restarts the cluster with this build's library (the package upgrade).
fn upgrade_the_package(cluster: &Cluster) {
    cluster.stop("fast");
    let conf = cluster.dir.join("data/postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("dynamic_library_path = '$libdir'\n");
    std::fs::write(&conf, text).unwrap();
    cluster.start_again();
}

fn fingerprint(db: &mut Client) -> Vec<String> {
    db.query(include_str!("fingerprint.sql"), &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The lines only one of the two fingerprints has.
fn difference(a: &[String], b: &[String]) -> Vec<String> {
    let only = |x: &[String], y: &[String], mark: &str| -> Vec<String> {
        x.iter()
            .filter(|l| !y.contains(l))
            .map(|l| format!("{mark} {l}"))
            .collect()
    };
    let mut lines = only(a, b, "-");
    lines.extend(only(b, a, "+"));
    lines
}

fn create_db(cluster: &Cluster, name: &str, version: Option<&str>) -> Client {
    let version = version.map_or(String::new(), |v| format!(" VERSION '{v}'"));
    fresh_db(
        cluster,
        name,
        &format!("CREATE EXTENSION pg_chunkwise{version}"),
    )
}

/// Work under 0.1.0: a task of a non-superuser owner with items done, pending and one
/// dead; a sequential-groups task half done; runs in the history.
fn work_under_the_first_release(db: &mut Client, cluster: &Cluster) -> Vec<i64> {
    db.batch_execute(
        "DROP ROLE IF EXISTS upgrader;
         CREATE ROLE upgrader LOGIN;
         CREATE TABLE counters (k bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO counters (k) SELECT generate_series(1, 70);
         CREATE TABLE broken (k bigint PRIMARY KEY);
         INSERT INTO broken VALUES (13);
         GRANT SELECT, UPDATE ON counters TO upgrader;
         GRANT SELECT ON broken TO upgrader;
         CREATE PROCEDURE bump(k bigint) LANGUAGE plpgsql AS $$
         BEGIN
           IF EXISTS (SELECT FROM broken b WHERE b.k = bump.k) THEN RAISE EXCEPTION 'broken %', k; END IF;
           UPDATE counters SET n = n + 1 WHERE counters.k = bump.k;
         END $$;
         CREATE PROCEDURE slow_bump(k bigint) LANGUAGE sql AS
           'SELECT pg_sleep(0.5); UPDATE counters SET n = n + 1 WHERE counters.k = slow_bump.k';
         SELECT chunkwise.create_task('grouped', statement => 'CALL public.bump($1)', sequential_groups => true);
         SELECT chunkwise.enqueue('grouped', k, group_key => 'g' || k % 3) FROM generate_series(41, 60) k;
         SELECT chunkwise.create_task('slow', call => 'slow_bump');
         SELECT chunkwise.plan('slow', 'SELECT generate_series(61, 70)::bigint AS key');",
    )
    .unwrap();
    let mut owner = cluster.connect_as("upgraded", "upgrader");
    owner
        .batch_execute(
            "SELECT chunkwise.create_task('plain', call => 'public.bump', max_attempts => 1);
             SELECT chunkwise.plan('plain', 'SELECT generate_series(1, 40)::bigint AS key');",
        )
        .unwrap();
    let mut runs = Vec::new();
    for (client, sql) in [
        (
            &mut owner,
            "SELECT run_id FROM chunkwise.run('plain', 2, max_items => 20)",
        ),
        (
            &mut *db,
            "SELECT run_id FROM chunkwise.run('grouped', 2, max_items => 5)",
        ),
    ] {
        runs.push(one::<i64>(client, sql));
    }
    // Exact counts are not 0.1.0's promise: its runs could end early when a claim came
    // back empty under contention (the race of issue 17). What matters is a queue with
    // done, pending and dead items.
    let (done, dead): (i64, i64) = harness::two(
        db,
        "SELECT count(*) FILTER (WHERE status = 'done'), count(*) FILTER (WHERE status = 'dead') FROM chunkwise.items",
    );
    assert_eq!(dead, 1, "key 13 died under 0.1.0");
    assert!(
        (1..=24).contains(&done),
        "some items were done under 0.1.0: {done}"
    );
    runs
}

#[test]
fn an_upgrade_loses_nothing_and_yields_the_schema_of_a_fresh_install() {
    install_old_library();
    let cluster = Cluster::get();
    let mut db = create_db(cluster, "upgraded", Some(FIRST_RELEASE));
    let runs = work_under_the_first_release(&mut db, cluster);

    // While workers run, the update is refused and changes nothing.
    let slow: i64 = one(&mut db, "SELECT chunkwise.start('slow', 1)");
    let (code, message, hint) = sql_error(db.batch_execute("ALTER EXTENSION pg_chunkwise UPDATE"));
    assert_eq!(code, "55006", "{message}");
    assert!(hint.contains("chunkwise.cancel()"), "{hint}");
    let version: String = one(
        &mut db,
        "SELECT extversion FROM pg_extension WHERE extname = 'pg_chunkwise'",
    );
    assert_eq!(version, FIRST_RELEASE);
    db.batch_execute("SELECT chunkwise.cancel('slow')").unwrap();
    wait_for("the slow run to stop", Duration::from_secs(30), || {
        let state: String = one(
            &mut db,
            &format!("SELECT state FROM chunkwise.runs WHERE run_id = {slow}"),
        );
        (state != "running").then_some(())
    });
    let before = queue_snapshot(&mut db);
    drop(db);

    // The package is upgraded: this build's library runs against the 0.1.0 tables only
    // to say so, and changes nothing.
    upgrade_the_package(cluster);
    let mut db = cluster.connect("upgraded");
    let (code, message, hint) = sql_error(db.query("SELECT * FROM chunkwise.run('grouped')", &[]));
    assert_eq!(code, "55000", "{message}");
    assert!(
        hint.contains("ALTER EXTENSION pg_chunkwise UPDATE"),
        "{hint}"
    );
    assert_eq!(queue_snapshot(&mut db), before);
    let (code, _, _) =
        sql_error(db.batch_execute("ALTER EXTENSION pg_chunkwise UPDATE TO '9.9.9'"));
    assert_eq!(code, "22023", "an unknown version is refused");
    assert_eq!(queue_snapshot(&mut db), before);

    db.batch_execute("ALTER EXTENSION pg_chunkwise UPDATE")
        .unwrap();
    let version: String = one(
        &mut db,
        "SELECT extversion FROM pg_extension WHERE extname = 'pg_chunkwise'",
    );
    assert_eq!(version, env!("CARGO_PKG_VERSION"));

    // The rest of the work, with the dead item retried once its cause is fixed.
    db.batch_execute("DELETE FROM broken; SELECT chunkwise.retry('plain');")
        .unwrap();
    for task in ["plain", "grouped", "slow"] {
        db.batch_execute(&format!("SELECT * FROM chunkwise.run('{task}', 2)"))
            .unwrap();
    }
    let counts: Vec<(i32, i64)> = db
        .query(
            "SELECT n, count(*) FROM counters GROUP BY n ORDER BY n",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(counts, vec![(1, 70)], "every item's effect exactly once");
    let pending: i64 = one(
        &mut db,
        "SELECT count(*) FROM chunkwise.items WHERE status <> 'done'",
    );
    assert_eq!(pending, 0);
    for run in &runs {
        let kept: i64 = one(
            &mut db,
            &format!("SELECT count(*) FROM chunkwise.runs WHERE run_id = {run}"),
        );
        assert_eq!(kept, 1, "run {run} of 0.1.0 is still in the history");
    }
    // Tasks from before the update got their anchors: their owner cannot be dropped.
    let (code, _, _) = sql_error(db.batch_execute("DROP ROLE upgrader"));
    assert_eq!(code, "2BP01");

    // The updated extension is the fresh one, object for object.
    let upgraded = fingerprint(&mut db);
    let mut fresh_db = create_db(cluster, "fresh", None);
    let fresh = fingerprint(&mut fresh_db);
    assert!(upgraded.len() > 100, "the fingerprint sees the objects");
    let diff = difference(&fresh, &upgraded);
    assert!(
        diff.is_empty(),
        "the updated extension differs from a fresh install (- fresh, + updated):\n{}",
        diff.join("\n")
    );
}

/// An upgrade script left one line short, installed under a version of its own.
struct ShortScript {
    path: PathBuf,
}

impl Drop for ShortScript {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[test]
fn the_schema_check_catches_a_line_missing_from_the_upgrade_script() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let version = env!("CARGO_PKG_VERSION");
    let script = std::fs::read_to_string(
        root.join(format!("sql/pg_chunkwise--{FIRST_RELEASE}--{version}.sql")),
    )
    .unwrap();
    let forgotten = "REVOKE ALL ON chunkwise.worker_sessions FROM PUBLIC;";
    assert!(script.contains(forgotten));
    let short = ShortScript {
        path: pg_config_dir("--sharedir").join(format!(
            "extension/pg_chunkwise--{FIRST_RELEASE}--{version}-short.sql"
        )),
    };
    std::fs::write(&short.path, script.replace(forgotten, "")).unwrap();

    let cluster = Cluster::get();
    // The update runs this build's library (the script creates functions the first
    // release's library lacks): upgrade the package here too when this test runs first.
    let mut probe = cluster.connect("postgres");
    let path: String = one(&mut probe, "SHOW dynamic_library_path");
    drop(probe);
    if path.contains(OLD_LIBRARY_DIR) {
        upgrade_the_package(cluster);
    }
    let mut fresh_db = create_db(cluster, "fresh_for_short", None);
    let fresh = fingerprint(&mut fresh_db);
    let mut db = create_db(cluster, "short", Some(FIRST_RELEASE));
    db.batch_execute(&format!(
        "ALTER EXTENSION pg_chunkwise UPDATE TO '{version}-short'"
    ))
    .unwrap();
    let diff = difference(&fresh, &fingerprint(&mut db));
    assert!(
        diff.iter().any(|l| l.contains("worker_sessions")),
        "the missing REVOKE shows in the comparison: {diff:?}"
    );
}
