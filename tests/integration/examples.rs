//! The file-loading example (examples/files) run against the test cluster: good files
//! load in order per organisation, the malformed one is reported and, once fixed and
//! retried, loads with the rest of its organisation.

use std::path::PathBuf;
use std::process::Command;

use crate::harness::{Cluster, one, test_db};

const DB: &str = "files_example";

fn example(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/files")
        .join(file)
}

#[test]
fn the_file_example_loads_good_files_in_order_and_reports_the_bad_one() {
    let incoming = std::env::temp_dir().join("pg_chunkwise_files_example");
    let generated = Command::new("bash")
        .arg(example("generate.sh"))
        .arg(&incoming)
        .status()
        .unwrap();
    assert!(generated.success());

    let mut admin = test_db(DB);
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS files_loader;
             CREATE ROLE files_loader LOGIN;
             GRANT pg_read_server_files TO files_loader;
             GRANT CREATE ON DATABASE {DB} TO files_loader;"
        ))
        .unwrap();
    let mut loader = Cluster::get().connect_as(DB, "files_loader");
    loader
        .batch_execute(&std::fs::read_to_string(example("schema.sql")).unwrap())
        .unwrap();
    let manifest = std::fs::read_to_string(incoming.join("manifest.csv")).unwrap();
    let mut tx = loader.transaction().unwrap();
    for line in manifest.lines() {
        let (org, path) = line.split_once(',').unwrap();
        tx.execute(
            "INSERT INTO loads.files (org, path) VALUES ($1, $2)",
            &[&org, &path],
        )
        .unwrap();
    }
    tx.commit().unwrap();

    loader
        .batch_execute("CALL chunkwise.run_cycle('load_files')")
        .unwrap();
    let loaded: i64 = one(
        &mut loader,
        "SELECT count(*) FROM loads.files WHERE loaded_at IS NOT NULL",
    );
    assert_eq!(loaded, 325, "every file but initech's 2nd and 3rd");
    let (org, sqlstate, blocks): (String, String, bool) = loader
        .query_one(
            "SELECT group_key, sqlstate, blocks_group FROM chunkwise.failures",
            &[],
        )
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .unwrap();
    assert_eq!(
        (org.as_str(), sqlstate.as_str(), blocks),
        ("initech", "22P02", true)
    );
    let waiting: i64 = one(
        &mut loader,
        "SELECT count(*) FROM loads.files WHERE org = 'initech' AND loaded_at IS NULL",
    );
    assert_eq!(waiting, 2, "the bad file and the one after it wait");
    // The small senders did not wait for the big one's backlog.
    let acme_before_small_done: i64 = one(
        &mut loader,
        "SELECT count(*) FROM loads.files WHERE org = 'acme' AND loaded_at <
           (SELECT max(loaded_at) FROM loads.files WHERE org NOT IN ('acme', 'initech'))",
    );
    assert!(
        acme_before_small_done < 75,
        "{acme_before_small_done} of acme's 300 files first"
    );

    // Fix the file, retry, next cycle: the rest of initech loads, in order.
    let bad = incoming.join("initech/00002.csv");
    let fixed = std::fs::read_to_string(&bad)
        .unwrap()
        .replace(",twelve", ",12.00");
    std::fs::write(&bad, fixed).unwrap();
    let retried: i64 = one(&mut loader, "SELECT chunkwise.retry('load_files')");
    assert_eq!(retried, 1);
    loader
        .batch_execute("CALL chunkwise.run_cycle('load_files')")
        .unwrap();
    let (files, orders): (i64, i64) = loader
        .query_one(
            "SELECT (SELECT count(*) FROM loads.files WHERE loaded_at IS NOT NULL),
                    (SELECT count(*) FROM loads.orders)",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((files, orders), (327, 327 * 20));
    let out_of_order: i64 = one(
        &mut loader,
        "SELECT count(*) FROM (SELECT loaded_at < lag(loaded_at) OVER (PARTITION BY org ORDER BY file_id) AS early
                                 FROM loads.files) s WHERE early",
    );
    assert_eq!(out_of_order, 0);
}

/// The pipeline example (examples/pipeline/run.sh), on a cluster of its own: one cycle
/// of the first task with a malformed file fails and starts nothing downstream; after
/// the fix, one cycle runs every stage once and the callback refreshes the top users.
/// The script checks its own results and exits non-zero when they are wrong.
#[test]
fn the_pipeline_example_runs_every_stage_once_from_one_cycle() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/pipeline/run.sh");
    let ran = Command::new("bash")
        .arg(script)
        .env(
            "PIPELINE_DEMO_DIR",
            std::env::temp_dir().join("pg_chunkwise_pipeline_example"),
        )
        .env("PIPELINE_DEMO_PORT", "54334")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&ran.stdout);
    let stderr = String::from_utf8_lossy(&ran.stderr);
    assert!(ran.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("every stage ran once, in order"),
        "{stdout}"
    );
}
