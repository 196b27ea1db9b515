//! The pg_regress suite in pg_test/ (the SQL surface and its error messages), run
//! against the harness's cluster.

use std::path::PathBuf;
use std::process::Command;

use crate::harness::{Cluster, pg_config_dir};

fn pg_regress() -> PathBuf {
    pg_config_dir("--pkglibdir").join("pgxs/src/test/regress/pg_regress")
}

#[test]
fn sql_surface_matches_the_expected_output() {
    let cluster = Cluster::get();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tests: Vec<String> = std::fs::read_dir(root.join("pg_test/sql"))
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
    assert!(!tests.is_empty());
    let output_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pg_regress");
    std::fs::create_dir_all(&output_dir).unwrap();
    let out = Command::new(pg_regress())
        .arg(format!("--host={}", cluster.dir.display()))
        .arg(format!("--port={}", cluster.port))
        .args(["--user=postgres", "--dbname=chunkwise_regress"])
        .arg(format!("--inputdir={}", root.join("pg_test").display()))
        .arg(format!("--outputdir={}", output_dir.display()))
        .args(&tests)
        .output()
        .expect("run pg_regress");
    let diffs = std::fs::read_to_string(output_dir.join("regression.diffs")).unwrap_or_default();
    assert!(
        out.status.success(),
        "pg_regress failed:\n{}\n{diffs}",
        String::from_utf8_lossy(&out.stdout)
    );
}
