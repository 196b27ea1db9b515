//! The SQL suites in pg_test/, run against the harness's cluster: pg_regress (sql/: the
//! SQL surface and its error messages) and pg_isolation_regress (specs/: interleavings of
//! concurrent sessions).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{Cluster, pg_config_dir};

/// The names of the files in pg_test/`folder`, without their extension.
fn suite(root: &Path, folder: &str) -> Vec<String> {
    let tests: Vec<String> = std::fs::read_dir(root.join("pg_test").join(folder))
        .unwrap()
        .map(|e| {
            e.unwrap()
                .path()
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert!(!tests.is_empty(), "pg_test/{folder} has tests");
    tests
}

/// Runs `tool` (pg_regress or pg_isolation_regress, from PGXS) over pg_test/`folder`
/// in database `dbname`; fails with the diffs.
fn run_suite(tool: &str, folder: &str, dbname: &str) {
    let cluster = Cluster::get();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tests = suite(&root, folder);
    let output_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(folder);
    std::fs::create_dir_all(&output_dir).unwrap();
    let program = pg_config_dir("--pkglibdir").join(format!("pgxs/src/test/{tool}"));
    let out = Command::new(program)
        .arg(format!("--host={}", cluster.dir.display()))
        .arg(format!("--port={}", cluster.port))
        .args(["--user=postgres", &format!("--dbname={dbname}")])
        .arg(format!("--inputdir={}", root.join("pg_test").display()))
        .arg(format!("--outputdir={}", output_dir.display()))
        .args(&tests)
        .output()
        .unwrap_or_else(|e| panic!("run {tool}: {e}"));
    let diffs = std::fs::read_to_string(output_dir.join("regression.diffs")).unwrap_or_default();
    assert!(
        out.status.success(),
        "{tool} failed:\n{}\n{diffs}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn sql_surface_matches_the_expected_output() {
    run_suite("regress/pg_regress", "sql", "chunkwise_regress");
}

#[test]
fn concurrent_sessions_interleave_as_the_specs_expect() {
    run_suite(
        "isolation/pg_isolation_regress",
        "specs",
        "chunkwise_isolation",
    );
}
