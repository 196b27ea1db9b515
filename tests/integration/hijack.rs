//! The class of attack where a role's own functions and operators run with someone
//! else's rights because SQL that someone else runs resolves names through the role's
//! search_path.
//!
//! A hostile role shadows every pg_catalog function, aggregate and operator name that
//! the extension's SQL uses (found from the code: every identifier followed by `(` and
//! every operator symbol in src/ and sql/), each shadow logging the role it runs as. It
//! puts its schema first on its search_path every way it can: `SET`, `ALTER ROLE ... SET`
//! (which its workers inherit) and inside its task's `source`. Then it calls every API
//! function on its own tasks and on another role's, and runs workers; a superuser and
//! another role run its tasks too. Every shadow that ran must have run as the hostile
//! role.

use std::collections::BTreeSet;
use std::path::Path;

use postgres::Client;

use crate::fixtures::live_workers;
use crate::harness::{Cluster, one, test_db, wait_for};

const DB: &str = "hijack";
/// The hostile role and another tenant (roles outlive the test's database: their own names).
const HOSTILE: &str = "hijack_mallory";
const OTHER: &str = "hijack_alice";
const HOSTILE_PATH: &str = "evil, pg_catalog, mal, public";

/// Files whose text holds the extension's SQL.
fn source_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            source_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs" || e == "sql") {
            out.push(path);
        }
    }
}

/// Every word followed by `(` and every run of operator characters in the extension's
/// source: a superset of the function and operator names its SQL uses (the database
/// keeps the ones pg_catalog has).
fn names_in_source() -> (BTreeSet<String>, BTreeSet<String>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    source_files(&root.join("src"), &mut files);
    source_files(&root.join("sql"), &mut files);
    let mut words = BTreeSet::new();
    let mut ops = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(file).unwrap().to_lowercase();
        let chars: Vec<char> = text.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if c.is_ascii_alphabetic() || c == '_' {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j] == ' ' {
                    j += 1;
                }
                if chars.get(j) == Some(&'(') {
                    words.insert(word);
                }
            } else if "+-*/<>=~!@#%^&|`?".contains(c) {
                let start = i;
                while i < chars.len() && "+-*/<>=~!@#%^&|`?".contains(chars[i]) {
                    i += 1;
                }
                let op: String = chars[start..i].iter().collect();
                // SQL spells <> as != too, and a lone symbol may stand inside a longer run.
                ops.insert(op.replace("!=", "<>"));
                for single in op.chars() {
                    ops.insert(single.to_string());
                }
            } else {
                i += 1;
            }
        }
    }
    // The ones the attack was first seen with, whatever the code says today.
    for name in [
        "now",
        "nextval",
        "count",
        "power",
        "extract",
        "make_interval",
    ] {
        words.insert(name.to_string());
    }
    for op in ["*", "=", "-", "+", "<", ">", "<=", ">=", "<>", "||"] {
        ops.insert(op.to_string());
    }
    (words, ops)
}

/// The roles, the hostile role's schema of shadows and the objects its tasks use.
fn setup(admin: &mut Client) -> Vec<(String, i32, i32)> {
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {HOSTILE}, {OTHER};
             CREATE ROLE {HOSTILE} LOGIN;
             CREATE ROLE {OTHER} LOGIN;
             CREATE SCHEMA evil AUTHORIZATION {HOSTILE};
             CREATE SCHEMA mal AUTHORIZATION {HOSTILE};
             CREATE SCHEMA ali AUTHORIZATION {OTHER};"
        ))
        .unwrap();
    let mut mallory = Cluster::get().connect_as(DB, HOSTILE);
    mallory
        .batch_execute(
            "GRANT USAGE ON SCHEMA evil TO PUBLIC;
             CREATE TABLE mal.t (k bigint PRIMARY KEY, n int NOT NULL DEFAULT 0,
                                 seen timestamptz, grp text);
             INSERT INTO mal.t (k, grp) SELECT g, 'g' || (g % 3) FROM generate_series(1, 40) g;
             CREATE PROCEDURE mal.work(k bigint) LANGUAGE plpgsql AS $$
             BEGIN
               UPDATE mal.t SET n = n + 1, seen = now() WHERE t.k = work.k;
               IF k % 10 = 0 THEN RAISE EXCEPTION 'ten'; END IF;
             END $$;
             CREATE PROCEDURE mal.work_range(lo bigint, hi bigint) LANGUAGE sql AS
               'UPDATE mal.t SET n = n + 1 WHERE k >= lo AND k < hi';",
        )
        .unwrap();
    mallory
        .batch_execute(include_str!("hostile_shadows.sql"))
        .unwrap();
    let (words, ops) = names_in_source();
    let words: Vec<String> = words.into_iter().collect();
    let ops: Vec<String> = ops.into_iter().collect();
    let made: Vec<(String, i32, i32)> = mallory
        .query("SELECT * FROM evil.make_shadows($1, $2)", &[&words, &ops])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    mallory
        .batch_execute(&format!(
            "ALTER ROLE {HOSTILE} SET search_path = {HOSTILE_PATH}"
        ))
        .unwrap();

    let mut alice = Cluster::get().connect_as(DB, OTHER);
    alice
        .batch_execute(
            "CREATE TABLE ali.t (k bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
             INSERT INTO ali.t (k) SELECT generate_series(1, 20);
             CREATE PROCEDURE ali.work(k bigint) LANGUAGE sql AS
               'UPDATE ali.t SET n = n + 1 WHERE t.k = work.k';
             SELECT chunkwise.create_task('a_task', call => 'ali.work', source => 'SELECT k AS key FROM ali.t');
             SELECT chunkwise.plan('a_task', 'SELECT k AS key FROM ali.t WHERE k <= 10');",
        )
        .unwrap();
    alice
        .batch_execute("SELECT * FROM chunkwise.run('a_task')")
        .unwrap();
    made
}

/// Runs `sql`, keeping going on refusals: the point is what ran, and as whom.
fn attempt(client: &mut Client, sql: &str) -> Result<(), String> {
    client.batch_execute(sql).map_err(|e| {
        format!(
            "{sql}: {}",
            e.as_db_error()
                .map_or(e.to_string(), |d| d.message().to_string())
        )
    })
}

/// Everything the hostile role does with its own tasks; returns the calls that failed.
fn hostile_workload(mallory: &mut Client) -> Vec<String> {
    let own = [
        "SELECT chunkwise.create_task('m_keys', call => 'mal.work', max_attempts => 2, retry_backoff => '1 millisecond')",
        "SELECT chunkwise.create_task('m_batch', call => 'mal.work', items_per_commit => 5, max_attempts => 1)",
        "SELECT chunkwise.create_task('m_groups', statement => 'UPDATE mal.t SET n = n + 1 WHERE k = $1', sequential_groups => true)",
        "SELECT chunkwise.create_task('m_ranges', call => 'mal.work_range', item_timeout => '1 minute')",
        "SELECT chunkwise.create_task('m_blocks', statement => 'UPDATE mal.t SET n = n + 1 WHERE ctid >= chunkwise.block_tid($1) AND ctid < chunkwise.block_tid($2)')",
        "SELECT chunkwise.create_task('m_cycle', call => 'mal.work', max_items_per_cycle => 5, retry_backoff => '1 millisecond', \
           source => 'SELECT pg_catalog.set_config(''search_path'', ''evil, pg_catalog, public'', false) AS path, k AS key FROM mal.t')",
        "SELECT chunkwise.create_task('m_activity', call => 'mal.work', rank_by_activity => true, retry_backoff => '1 millisecond', \
           source => 'SELECT k AS key, seen AS last_activity, n::bigint AS actions FROM mal.t')",
        "SELECT chunkwise.alter_task('m_keys', workers => 2, after => 'SELECT $1 + 1')",
        "SELECT chunkwise.enqueue('m_keys', 1, priority => 5, payload => '{\"a\": 1}', not_before => now())",
        "SELECT chunkwise.plan('m_keys', 'SELECT k AS key, k * 2 AS priority FROM mal.t WHERE k <= 20')",
        "SELECT chunkwise.plan('m_batch', 'SELECT k AS key FROM mal.t')",
        "SELECT chunkwise.enqueue('m_groups', k, group_key => grp) FROM mal.t",
        "SELECT chunkwise.plan_ranges('m_ranges', 'mal.t', 'k', 7)",
        "SELECT chunkwise.plan_blocks('m_blocks', 'mal.t', 1)",
        "SELECT chunkwise.plan_by_activity('m_activity', 'SELECT k AS key, seen AS last_activity, n::bigint AS actions FROM mal.t')",
        "SELECT chunkwise.activity_tier(now() - interval '3 days', 50)",
        "SELECT * FROM chunkwise.run('m_keys')",
        "SELECT * FROM chunkwise.run('m_batch', 2)",
        "SELECT * FROM chunkwise.run('m_groups', 2)",
        "SELECT * FROM chunkwise.wait(chunkwise.start('m_ranges', 2))",
        "SELECT * FROM chunkwise.run('m_blocks')",
        "CALL chunkwise.run_cycle('m_cycle')",
        "CALL chunkwise.run_cycle('m_activity')",
        "SELECT chunkwise.pause('m_keys')",
        "SELECT chunkwise.resume('m_keys')",
        "SELECT chunkwise.cancel('m_keys')",
        "SELECT chunkwise.skip('m_batch', 10)",
        "SELECT chunkwise.retry('m_batch')",
        "SELECT * FROM chunkwise.run('m_batch')",
        "SELECT * FROM chunkwise.task_status",
        "SELECT * FROM chunkwise.runs",
        "SELECT * FROM chunkwise.workers",
        "SELECT * FROM chunkwise.failures",
        "SELECT * FROM chunkwise.priority_summary",
        "SELECT chunkwise.metrics()",
        "SELECT chunkwise.purge('m_batch', '0')",
        "SELECT chunkwise.drop_task('m_blocks')",
    ];
    own.iter()
        .filter_map(|sql| attempt(mallory, sql).err())
        .collect()
}

/// The hostile role tries every operation on another role's task (all refused).
fn hostile_calls_on_others(mallory: &mut Client) {
    for sql in [
        "SELECT chunkwise.alter_task('a_task', workers => 1)",
        "SELECT chunkwise.enqueue('a_task', 99)",
        "SELECT chunkwise.plan('a_task', 'SELECT 99::bigint AS key')",
        "SELECT chunkwise.plan_by_activity('a_task', 'SELECT 1::bigint AS key, now() AS last_activity, 1::bigint AS actions')",
        "SELECT chunkwise.plan_ranges('a_task', 'mal.t', 'k', 5)",
        "SELECT chunkwise.plan_blocks('a_task', 'mal.t', 1)",
        "SELECT * FROM chunkwise.run('a_task')",
        "SELECT chunkwise.start('a_task')",
        "SELECT * FROM chunkwise.wait(1)",
        "CALL chunkwise.run_cycle('a_task')",
        "SELECT chunkwise.pause('a_task')",
        "SELECT chunkwise.resume('a_task')",
        "SELECT chunkwise.cancel('a_task')",
        "SELECT chunkwise.retry('a_task')",
        "SELECT chunkwise.skip('a_task', 1)",
        "SELECT chunkwise.purge('a_task', '0')",
        "SELECT chunkwise.drop_task('a_task')",
    ] {
        assert!(
            attempt(mallory, sql).is_err(),
            "the hostile role was allowed: {sql}"
        );
    }
}

/// `log_line_prefix` is '%m [%p] %b ': the backend type is the third field.
struct Hit {
    backend: String,
    user: String,
    name: String,
}

fn hits() -> Vec<Hit> {
    let log = std::fs::read_to_string(Cluster::get().dir.join("server.log")).unwrap();
    let marker = format!("hostile-hit db={DB} user=");
    log.lines()
        .filter_map(|line| {
            let at = line.find(&marker)?;
            let rest = &line[at + marker.len()..];
            let (user, name) = rest.split_once(" name=")?;
            let prefix = &line[..at];
            let backend = prefix
                .split_once("] ")
                .map(|(_, b)| b.trim_end().trim_end_matches("LOG:").trim_end().to_string())
                .unwrap_or_default();
            Some(Hit {
                backend,
                user: user.to_string(),
                name: name.to_string(),
            })
        })
        .collect()
}

#[test]
fn no_shadowing_function_or_operator_ever_runs_with_another_roles_rights() {
    let mut admin = test_db(DB);
    let made = setup(&mut admin);
    println!("shadows built (kind, made, could not be made): {made:?}");
    let count = |kind: &str| made.iter().find(|m| m.0 == kind).map_or(0, |m| m.1);
    assert!(
        count("function") > 100 && count("operator") > 100 && count("aggregate") > 10,
        "the hostile role built its shadows: {made:?}"
    );

    let mut mallory = Cluster::get().connect_as(DB, HOSTILE);
    let path: String = one(&mut mallory, "SHOW search_path");
    assert_eq!(path, HOSTILE_PATH, "ALTER ROLE ... SET reached the session");
    let mut failed = hostile_workload(&mut mallory);
    hostile_calls_on_others(&mut mallory);

    // A superuser and another role run the hostile role's tasks, and read the views.
    let mut admin = Cluster::get().connect(DB);
    let before: String = one(&mut admin, "SHOW search_path");
    for sql in [
        "SELECT chunkwise.plan('m_keys', 'SELECT k AS key FROM mal.t')",
        "SELECT * FROM chunkwise.run('m_keys')",
        "CALL chunkwise.run_cycle('m_cycle')",
        "SELECT * FROM chunkwise.task_status",
        "SELECT chunkwise.metrics()",
    ] {
        failed.extend(attempt(&mut admin, sql).err());
    }
    let after: String = one(&mut admin, "SHOW search_path");
    assert_eq!(
        after, before,
        "run_cycle of another role's task left its source's settings in the caller's session"
    );
    // Would reach a shadow if the hostile path had leaked into this session.
    let _: i64 = one(
        &mut admin,
        "SELECT count(*) + 1 FROM pg_class WHERE now() = now()",
    );
    let mut alice = Cluster::get().connect_as(DB, OTHER);
    for sql in [
        "SELECT * FROM chunkwise.run('a_task')",
        "SELECT * FROM chunkwise.task_status",
    ] {
        failed.extend(attempt(&mut alice, sql).err());
    }
    wait_for(
        "every worker to exit",
        std::time::Duration::from_secs(60),
        || live_workers(&mut admin).is_empty().then_some(()),
    );

    let hits = hits();
    let foreign: BTreeSet<String> = hits
        .iter()
        .filter(|h| h.user != HOSTILE)
        .map(|h| format!("{} ran as {} in a {}", h.name, h.user, h.backend))
        .collect();
    assert!(
        foreign.is_empty(),
        "the hostile role's shadows ran with another role's rights:\n{}",
        foreign.into_iter().collect::<Vec<_>>().join("\n")
    );
    assert!(
        failed.is_empty(),
        "calls that must work under any search_path failed:\n{}",
        failed.join("\n")
    );
    // The shadows were live all along: they ran, as the hostile role, in its own
    // sessions and in its workers (whose search_path came from ALTER ROLE).
    assert!(
        hits.iter().any(|h| h.backend == "chunkwise worker"),
        "no shadow ran in a worker: the test would prove nothing"
    );
    assert!(
        hits.iter().any(|h| h.backend == "client backend"),
        "no shadow ran in a client session: the test would prove nothing"
    );
}
