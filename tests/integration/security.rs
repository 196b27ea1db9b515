//! Who may do what (the role matrix printed in the README), hostile input, and targets
//! that try to escape their item or their role.

use postgres::Client;

use crate::harness::{Cluster, one, queue_snapshot, test_db};

const DB: &str = "role_matrix";

/// What each operation of the matrix runs, on task `owned` (and `owned_ranges`).
const OPERATIONS: &[(&str, &str)] = &[
    (
        "alter_task",
        "SELECT chunkwise.alter_task('owned', max_attempts => 2)",
    ),
    ("enqueue", "SELECT chunkwise.enqueue('owned', 100)"),
    (
        "plan",
        "SELECT chunkwise.plan('owned', 'SELECT 101::bigint AS key')",
    ),
    (
        "plan_ranges",
        "SELECT chunkwise.plan_ranges('owned_ranges', 'public.keys', 'k', 10)",
    ),
    (
        "run",
        "SELECT * FROM chunkwise.run('owned', max_items => 1)",
    ),
    (
        "start + wait",
        "SELECT * FROM chunkwise.wait(chunkwise.start('owned', max_items => 1))",
    ),
    ("run_cycle", "CALL chunkwise.run_cycle('owned')"),
    ("pause", "SELECT chunkwise.pause('owned')"),
    ("resume", "SELECT chunkwise.resume('owned')"),
    ("cancel", "SELECT chunkwise.cancel('owned')"),
    ("retry", "SELECT chunkwise.retry('owned')"),
    ("purge", "SELECT chunkwise.purge('owned', '1 day')"),
    ("drop_task", "SELECT chunkwise.drop_task('owned')"),
];

/// Views (and metrics) a caller reads: does it see task `owned`?
const VIEWS: &[(&str, &str)] = &[
    (
        "task_status",
        "SELECT count(*) FROM chunkwise.task_status WHERE task = 'owned'",
    ),
    (
        "runs",
        "SELECT count(*) FROM chunkwise.runs WHERE task = 'owned'",
    ),
    (
        "failures",
        "SELECT count(*) FROM chunkwise.failures WHERE task = 'owned'",
    ),
    (
        "priority_summary",
        "SELECT count(*) FROM chunkwise.priority_summary WHERE task = 'owned'",
    ),
    (
        "metrics()",
        "SELECT count(*) FROM regexp_matches(chunkwise.metrics(), 'task=\"owned\"', 'g')",
    ),
];

/// The roles of the matrix; the procedures belong to postgres and are granted to them.
fn roles(admin: &mut Client) {
    admin
        .batch_execute(
            "CREATE TABLE keys (k bigint);
             INSERT INTO keys SELECT generate_series(1, 100);
             CREATE TABLE log (k bigint, who text);
             GRANT SELECT ON keys TO PUBLIC;
             GRANT INSERT ON log TO PUBLIC;
             CREATE PROCEDURE work(k bigint) LANGUAGE plpgsql AS $$
             BEGIN
               IF k = 13 THEN RAISE EXCEPTION 'thirteen'; END IF;
               INSERT INTO log VALUES (k, current_user);
             END $$;
             CREATE PROCEDURE work_range(lo bigint, hi bigint) LANGUAGE sql AS 'SELECT 1';
             DROP ROLE IF EXISTS owner_r, member_r, stranger, monitor_r, nologin_r, doomed;
             CREATE ROLE owner_r LOGIN;
             CREATE ROLE member_r LOGIN IN ROLE owner_r;
             CREATE ROLE stranger LOGIN;
             CREATE ROLE monitor_r LOGIN IN ROLE pg_monitor;
             CREATE ROLE nologin_r LOGIN;
             CREATE ROLE doomed LOGIN;",
        )
        .unwrap();
}

/// Task `owned` (and `owned_ranges`) as `owner`, with a dead item and a finished run.
fn owned_task(owner: &str) {
    let mut admin = Cluster::get().connect(DB);
    admin
        .batch_execute(
            "SELECT chunkwise.drop_task(task) FROM chunkwise.tasks WHERE task IN ('owned', 'owned_ranges')",
        )
        .unwrap();
    let mut client = Cluster::get().connect_as(DB, owner);
    client
        .batch_execute(
            "SELECT chunkwise.create_task('owned', call => 'work', max_attempts => 1);
             SELECT chunkwise.create_task('owned_ranges', call => 'work_range');
             SELECT chunkwise.enqueue('owned', 13);",
        )
        .unwrap();
    client
        .batch_execute("SELECT * FROM chunkwise.run('owned')")
        .unwrap();
    client
        .batch_execute(
            "SELECT chunkwise.plan('owned', 'SELECT generate_series(1, 5)::bigint AS key')",
        )
        .unwrap();
}

fn outcome(client: &mut Client, sql: &str) -> String {
    match client.batch_execute(sql) {
        Ok(()) => "yes".to_string(),
        Err(e) => e
            .code()
            .map_or_else(|| format!("error: {e}"), |c| c.code().to_string()),
    }
}

/// One row of the matrix: `caller` does every operation and reads every view.
fn matrix_row(label: &str, caller: &str) -> Vec<String> {
    let mut client = Cluster::get().connect_as(DB, caller);
    let mut row = vec![label.to_string()];
    for (_, sql) in VIEWS {
        let seen: i64 = one(&mut client, sql);
        row.push(if seen > 0 { "sees" } else { "hidden" }.to_string());
    }
    for (_, sql) in OPERATIONS {
        row.push(outcome(&mut client, sql));
    }
    row
}

fn markdown(rows: &[Vec<String>]) -> String {
    let header: Vec<&str> = std::iter::once("caller")
        .chain(VIEWS.iter().map(|v| v.0))
        .chain(OPERATIONS.iter().map(|o| o.0))
        .collect();
    let mut out = format!("| {} |\n", header.join(" | "));
    out += &format!("|{}\n", "---|".repeat(header.len()));
    for row in rows {
        out += &format!("| {} |\n", row.join(" | "));
    }
    out
}

#[test]
fn role_matrix_only_owners_members_and_superusers_manage_and_monitors_only_see() {
    let mut admin = test_db(DB);
    roles(&mut admin);
    let mut rows = Vec::new();
    for (label, caller) in [
        ("superuser", "postgres"),
        ("owner", "owner_r"),
        ("member of the owner role", "member_r"),
        ("pg_monitor member", "monitor_r"),
        ("unrelated role", "stranger"),
    ] {
        owned_task("owner_r");
        rows.push(matrix_row(label, caller));
    }

    // An owner that lost LOGIN, and one that was dropped: nobody can run the task, and
    // the refusal says why; everything else stays possible for a superuser.
    owned_task("nologin_r");
    admin.batch_execute("ALTER ROLE nologin_r NOLOGIN").unwrap();
    rows.push(matrix_row("superuser, owner NOLOGIN", "postgres"));
    // An owner cannot be dropped while it owns tasks; REASSIGN OWNED hands them over.
    owned_task("doomed");
    let (code, _, _) = crate::harness::sql_error(admin.batch_execute("DROP ROLE doomed"));
    assert_eq!(code, "2BP01", "DROP ROLE of a task owner is refused");
    admin
        .batch_execute("REASSIGN OWNED BY doomed TO owner_r; DROP ROLE doomed;")
        .unwrap();
    rows.push(matrix_row("superuser, owner reassigned", "postgres"));

    let table = markdown(&rows);
    let allowed = |row: &Vec<String>| row[1 + VIEWS.len()..].iter().all(|c| c == "yes");
    let refused = |row: &Vec<String>, code: &str| row[1 + VIEWS.len()..].iter().all(|c| c == code);
    let sees = |row: &Vec<String>| row[1..=VIEWS.len()].iter().all(|c| c == "sees");
    let hidden = |row: &Vec<String>| row[1..=VIEWS.len()].iter().all(|c| c == "hidden");
    assert!(rows[..3].iter().all(|r| allowed(r) && sees(r)), "\n{table}");
    assert!(refused(&rows[3], "42501") && sees(&rows[3]), "\n{table}");
    // A task the caller may not even see is answered as if it did not exist.
    assert!(refused(&rows[4], "42704") && hidden(&rows[4]), "\n{table}");
    let runs = |row: &Vec<String>| -> Vec<String> {
        ["run", "start + wait", "run_cycle"]
            .iter()
            .map(|op| {
                let i = OPERATIONS.iter().position(|o| o.0 == *op).unwrap();
                row[1 + VIEWS.len() + i].clone()
            })
            .collect()
    };
    assert_eq!(runs(&rows[5]), vec!["28000"; 3], "\n{table}");
    assert!(allowed(&rows[6]) && sees(&rows[6]), "\n{table}");

    // The README prints this very matrix.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(
        readme.contains(&table),
        "README.md should contain the role matrix:\n{table}"
    );
}

#[test]
fn targets_run_as_the_owner_and_cannot_keep_a_role_or_setting_past_their_item() {
    let mut admin = test_db("escape");
    admin
        .batch_execute(
            "DROP ROLE IF EXISTS plain_owner;
             CREATE ROLE plain_owner LOGIN;
             CREATE TABLE seen (k bigint, who text, path text, app text);
             GRANT INSERT ON seen TO plain_owner;
             CREATE PROCEDURE sneaky(k bigint) LANGUAGE plpgsql AS $$
             BEGIN
               INSERT INTO public.seen VALUES (k, current_user, current_setting('search_path'),
                                               current_setting('application_name'));
               IF k = 1 THEN
                 PERFORM set_config('search_path', 'evil', false);
                 PERFORM set_config('application_name', 'not chunkwise', false);
               ELSIF k = 2 THEN
                 SET ROLE postgres;  -- not a member: refused
               END IF;
             END $$;",
        )
        .unwrap();
    let mut owner = Cluster::get().connect_as("escape", "plain_owner");
    owner
        .batch_execute(
            "SELECT chunkwise.create_task('t', call => 'public.sneaky', max_attempts => 1);
             SELECT chunkwise.plan('t', 'SELECT generate_series(1, 4)::bigint AS key');",
        )
        .unwrap();
    let row = owner
        .query_one("SELECT * FROM chunkwise.run('t', 1)", &[])
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>("processed"), row.get::<_, i64>("dead")),
        (3, 1)
    );
    let failure: String = one(
        &mut admin,
        "SELECT sqlstate FROM chunkwise.failures WHERE key = 2",
    );
    assert_eq!(failure, "42501", "SET ROLE to a role it is not a member of");
    let seen: Vec<(i64, String, String, String)> = admin
        .query(
            "SELECT k, who, path, app FROM seen WHERE k <> 2 ORDER BY k",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    for (k, who, path, app) in &seen {
        assert_eq!(who, "plain_owner", "item {k} ran as the owner");
        assert_eq!(
            path, "\"$user\", public",
            "item {k} saw the default search_path"
        );
        assert_eq!(
            app, "chunkwise t #1",
            "item {k} saw the worker's application_name"
        );
    }
    assert_eq!(seen.len(), 3);
}

#[test]
fn hostile_input_is_refused_or_harmless_and_changes_nothing() {
    let mut db = test_db("hostile");
    db.batch_execute(
        "CREATE TABLE victim (k bigint);
         INSERT INTO victim VALUES (1);
         CREATE PROCEDURE good(k bigint) LANGUAGE sql AS 'SELECT 1';
         SELECT chunkwise.create_task('kept', call => 'good');
         SELECT chunkwise.enqueue('kept', 1);
         SELECT chunkwise.create_task('ranges', statement => 'SELECT $1, $2');",
    )
    .unwrap();
    let before = queue_snapshot(&mut db);
    let huge = "x".repeat(2_000_000);
    let long_group = "g".repeat(1_001);
    let owned: Vec<String> = vec![
        format!(
            "SELECT chunkwise.enqueue('kept', 2, payload => jsonb_build_object('blob', '{huge}'))"
        ),
        format!("SELECT chunkwise.enqueue('kept', 2, group_key => '{long_group}')"),
        format!(
            "SELECT chunkwise.create_task('{}', call => 'good')",
            "n".repeat(41)
        ),
    ];
    let cases: Vec<(&str, &str)> = vec![
        // Task names: quotes, semicolons, dollar quotes, unicode, control characters.
        (
            "SELECT chunkwise.create_task('x''; DROP TABLE victim; --', call => 'good')",
            "42602",
        ),
        (
            "SELECT chunkwise.create_task('x\"y', call => 'good')",
            "42602",
        ),
        (
            "SELECT chunkwise.create_task('$$x$$', call => 'good')",
            "42602",
        ),
        (
            "SELECT chunkwise.create_task('tâche', call => 'good')",
            "42602",
        ),
        (
            "SELECT chunkwise.create_task('名前', call => 'good')",
            "42602",
        ),
        (
            "SELECT chunkwise.create_task(E'a\\nb', call => 'good')",
            "42602",
        ),
        ("SELECT chunkwise.create_task('', call => 'good')", "42602"),
        ("SELECT chunkwise.create_task(' ', call => 'good')", "42602"),
        (
            "SELECT chunkwise.create_task('a b', call => 'good')",
            "42602",
        ),
        (
            "SELECT chunkwise.create_task('a/b', call => 'good')",
            "42602",
        ),
        (
            "SELECT chunkwise.run('kept''; DROP TABLE victim; --')",
            "42704",
        ),
        ("SELECT chunkwise.pause('kept'' OR ''1''=''1')", "42704"),
        ("SELECT chunkwise.drop_task('%')", "42704"),
        ("SELECT chunkwise.drop_task('k_pt')", "42704"),
        // Statements: more than one, or not SQL.
        (
            "SELECT chunkwise.create_task('x', statement => 'SELECT $1; DROP TABLE victim')",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', statement => 'SELECT 1 $$; DROP TABLE victim; $$')",
            "42601",
        ),
        (
            "SELECT chunkwise.create_task('x', statement => E'SELECT 1\\\\; DROP TABLE victim')",
            "42601",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', after => 'SELECT 1; DROP TABLE victim')",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', source => 'SELECT 1 AS key; DROP TABLE victim')",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', statement => '')",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', statement => ';;;')",
            "22023",
        ),
        (
            "SELECT chunkwise.plan('kept', 'SELECT 1::bigint AS key; DROP TABLE victim')",
            "22023",
        ),
        (
            "SELECT chunkwise.plan('kept', 'DROP TABLE victim')",
            "42P11",
        ),
        ("SELECT chunkwise.plan('kept', '')", "22023"),
        // Names that are not identifiers of anything.
        (
            "SELECT chunkwise.create_task('x', call => 'good; DROP TABLE victim')",
            "42602",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'pg_catalog.pg_terminate_backend')",
            "42883",
        ),
        (
            "SELECT chunkwise.plan_ranges('ranges', 'victim; DROP TABLE victim', 'k', 1)",
            "42602",
        ),
        (
            "SELECT chunkwise.plan_ranges('ranges', 'victim', 'k\"; DROP TABLE victim; --', 1)",
            "42703",
        ),
        (
            "SELECT chunkwise.plan_ranges('ranges', 'victim', 'k) FROM victim; DROP TABLE victim; --', 1)",
            "42703",
        ),
        (
            "SELECT chunkwise.plan_ranges('ranges', 'pg_catalog.pg_authid', 'oid', 1)",
            "42804",
        ),
        (
            "SELECT chunkwise.plan_blocks('ranges', 'pg_stat_activity', 1)",
            "42809",
        ),
        // Absurd numbers.
        (
            "SELECT chunkwise.create_task('x', call => 'good', workers => 2147483647)",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', max_attempts => -2147483648)",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', max_attempts => 1000001)",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', items_per_commit => 100000000)",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', max_items_per_cycle => -1)",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', retry_backoff => '-1000 years')",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', item_timeout => '-1 ms')",
            "22023",
        ),
        (
            "SELECT chunkwise.run('kept', max_items => -9223372036854775808)",
            "22023",
        ),
        ("SELECT chunkwise.run('kept', workers => -1)", "22023"),
        (
            "SELECT chunkwise.plan_ranges('ranges', 'victim', 'k', -9223372036854775808)",
            "22023",
        ),
        (
            "SELECT chunkwise.plan_blocks('ranges', 'victim', -2147483648)",
            "22023",
        ),
        ("SELECT chunkwise.block_tid(9223372036854775807)", "22003"),
        ("SELECT chunkwise.purge('kept', '-1 millisecond')", "22023"),
        ("SELECT * FROM chunkwise.wait(-1)", "42704"),
        ("SELECT * FROM chunkwise.wait(9223372036854775807)", "42704"),
        // NULLs everywhere.
        (
            "SELECT chunkwise.create_task(NULL, call => 'good')",
            "22004",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', max_attempts => NULL)",
            "22004",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', retry_backoff => NULL)",
            "22004",
        ),
        (
            "SELECT chunkwise.create_task('x', call => 'good', synchronous_commit => NULL)",
            "22004",
        ),
        ("SELECT chunkwise.enqueue(NULL, 1)", "22004"),
        (
            "SELECT chunkwise.enqueue('kept', 1, not_before => NULL)",
            "22004",
        ),
        (
            "SELECT chunkwise.plan(NULL, 'SELECT 1::bigint AS key')",
            "22004",
        ),
        (
            "SELECT chunkwise.plan_blocks('ranges', 'victim', NULL)",
            "22004",
        ),
        ("SELECT chunkwise.pause(NULL)", "22004"),
        ("SELECT chunkwise.cancel(NULL)", "22004"),
        ("SELECT chunkwise.retry(NULL)", "22004"),
        ("SELECT chunkwise.purge(NULL, '1 day')", "22004"),
        ("SELECT chunkwise.alter_task(NULL)", "22004"),
        ("CALL chunkwise.run_cycle(NULL)", "22004"),
    ];
    let mut all: Vec<(String, &str)> = cases.iter().map(|(s, c)| (s.to_string(), *c)).collect();
    all.push((owned[0].clone(), "54000"));
    all.push((owned[1].clone(), "54000"));
    all.push((owned[2].clone(), "42602"));
    assert!(all.len() >= 50, "{} cases", all.len());
    let mut unexpected = Vec::new();
    for (sql, code) in &all {
        let got = outcome(&mut db, sql);
        let shown: String = sql.chars().take(120).collect();
        if &got != code {
            unexpected.push(format!("{shown}: got {got}, expected {code}"));
        }
        assert_eq!(queue_snapshot(&mut db), before, "{shown} changed the queue");
    }
    assert!(unexpected.is_empty(), "{}", unexpected.join("\n"));
    let victim: i64 = one(&mut db, "SELECT count(*) FROM victim");
    assert_eq!(victim, 1, "the victim table is untouched");

    // Made harmless rather than refused: quotes, semicolons and unicode in values that
    // travel as parameters, and huge keys and priorities.
    db.batch_execute(
        "SELECT chunkwise.enqueue('kept', 9223372036854775807, priority => -9223372036854775808,
                                  group_key => 'org''; DROP TABLE victim; --',
                                  payload => '{\"path\": \"/tmp/x''; DROP TABLE victim; --\", \"ü\": \"名前\"}');",
    )
    .unwrap();
    let (group, path): (String, String) = db
        .query_one(
            "SELECT group_key, payload->>'path' FROM chunkwise.items WHERE key = 9223372036854775807",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(group, "org'; DROP TABLE victim; --");
    assert_eq!(path, "/tmp/x'; DROP TABLE victim; --");
    let victim: i64 = one(&mut db, "SELECT count(*) FROM victim");
    assert_eq!(victim, 1);
}

#[test]
fn a_session_lock_a_target_keeps_is_released_after_its_item() {
    let mut db = test_db("leaked_lock");
    db.batch_execute(
        "CREATE PROCEDURE keep_lock(k bigint) LANGUAGE plpgsql AS $$
         BEGIN
           IF k = 1 THEN PERFORM pg_advisory_lock(42); ELSE PERFORM pg_sleep(3); END IF;
         END $$;
         SELECT chunkwise.create_task('t', call => 'keep_lock');
         SELECT chunkwise.plan('t', 'SELECT generate_series(1, 2)::bigint AS key');",
    )
    .unwrap();
    let runner = std::thread::spawn(|| {
        Cluster::get()
            .connect("leaked_lock")
            .query_one("SELECT * FROM chunkwise.run('t', 1)", &[])
            .unwrap()
            .get::<_, i64>("processed")
    });
    // While the worker sleeps in item 2, nobody holds the lock item 1 took.
    crate::harness::wait_for(
        "item 2 to start",
        std::time::Duration::from_secs(30),
        || {
            let key: Option<i64> = one(&mut db, "SELECT max(current_key) FROM chunkwise.workers");
            (key == Some(2)).then_some(())
        },
    );
    let held: i64 = one(
        &mut db,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 42 AND granted",
    );
    assert_eq!(held, 0, "the advisory lock of item 1 was let go");
    assert_eq!(runner.join().unwrap(), 2);
}

#[test]
fn a_temp_table_or_prepared_statement_a_target_leaves_is_gone_before_the_next_item() {
    let mut db = test_db("leaks");
    db.batch_execute(
        "CREATE TABLE seen (k bigint);
         CREATE PROCEDURE leaves_things(k bigint) LANGUAGE plpgsql AS $$
         BEGIN
           CREATE TEMP TABLE scratch (x bigint);
           INSERT INTO scratch VALUES (k);
           EXECUTE 'PREPARE leftover AS SELECT 1';
           INSERT INTO seen SELECT x FROM scratch;
         END $$;
         SELECT chunkwise.create_task('t', call => 'leaves_things', max_attempts => 1);
         SELECT chunkwise.plan('t', 'SELECT generate_series(1, 20)::bigint AS key');",
    )
    .unwrap();
    let row = db
        .query_one("SELECT processed, dead FROM chunkwise.run('t', 1)", &[])
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (20, 0),
        "each item found no temp table or prepared statement of the one before"
    );
    let seen: i64 = one(&mut db, "SELECT count(DISTINCT k) FROM seen");
    assert_eq!(seen, 20);
}
