//! Reads the one server constant the extension needs that pgrx does not bind: the
//! `TimeoutId` of the statement timeout (utils/timeout.h), which a worker arms around each
//! item. It is taken from the headers of the PostgreSQL the extension is built for, so a
//! server whose enum differs fails the build instead of arming another timer.

use std::env;
use std::fs;
use std::path::PathBuf;

use pgrx_pg_config::Pgrx;

const FEATURES: [&str; 4] = ["pg15", "pg16", "pg17", "pg18"];

fn main() {
    println!("cargo::rerun-if-env-changed=PGRX_PG_CONFIG_PATH");
    let label = FEATURES
        .iter()
        .find(|pg| env::var_os(format!("CARGO_FEATURE_{}", pg.to_uppercase())).is_some())
        .expect("one of the features pg15, pg16, pg17 or pg18 is enabled");
    let pg_config = Pgrx::from_config()
        .and_then(|pgrx| pgrx.get(label))
        .unwrap_or_else(|e| panic!("no pg_config for {label} (run cargo pgrx init): {e}"));
    let header = pg_config
        .includedir_server()
        .expect("pg_config --includedir-server")
        .join("utils/timeout.h");
    println!("cargo::rerun-if-changed={}", header.display());
    let text = fs::read_to_string(&header)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", header.display()));
    let id = timeout_id(&text, "STATEMENT_TIMEOUT")
        .unwrap_or_else(|| panic!("{} has no TimeoutId STATEMENT_TIMEOUT", header.display()));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    fs::write(
        out.join("timeout_ids.rs"),
        format!(
            "/// `STATEMENT_TIMEOUT` of `enum TimeoutId` in {}.\npub const STATEMENT_TIMEOUT: u32 = {id};\n",
            header.display()
        ),
    )
    .expect("write timeout_ids.rs");
}

/// The value of `name` in `typedef enum TimeoutId { ... }`: its position, as long as no
/// member up to it has an explicit value (then `None`).
fn timeout_id(header: &str, name: &str) -> Option<u32> {
    let body = header.split("typedef enum TimeoutId").nth(1)?;
    let body = &body[body.find('{')? + 1..body.find('}')?];
    let without_comments = body
        .split("/*")
        .enumerate()
        .map(|(i, part)| {
            if i == 0 {
                part
            } else {
                part.split_once("*/").map_or("", |(_, rest)| rest)
            }
        })
        .collect::<String>();
    let members: Vec<&str> = without_comments
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .collect();
    let position = members.iter().position(|m| *m == name)?;
    if members[..position].iter().any(|m| m.contains('=')) {
        return None;
    }
    Some(position as u32)
}
