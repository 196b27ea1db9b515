//! The dashboard in a real headless Chromium (driven through chromedriver) against a
//! real cluster: live progress without a reload, failures shown as text, actions only
//! when allowed and with the form token, a role seeing only its own tasks, a database
//! that goes away and comes back, and the token, prefix and framing settings.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`make test` installs them).

#[path = "../../../tests/common/harness.rs"]
mod harness;
mod web;

use std::time::{Duration, Instant};

use harness::{Cluster, fresh_db, one, wait_for};
use postgres::Client;
use web::{Browser, Dashboard, http};

pub const CLUSTER: harness::ClusterSpec = harness::ClusterSpec {
    name: "pg_chunkwise_dashboard",
    port: 54_370,
    settings: "shared_preload_libraries = 'pg_chunkwise'\nmax_worker_processes = 32\n\
               chunkwise.max_workers = 16\nfsync = off\nlog_min_messages = warning",
};

const DEADLINE: Duration = Duration::from_secs(60);

/// A fresh database `name` with the extension.
fn database(name: &str) {
    fresh_db(Cluster::get(), name, "CREATE EXTENSION pg_chunkwise");
}

/// A connection to `dbname` as the login role `role` (no superuser, not in pg_monitor),
/// which may create its tables, procedures and tasks there.
fn connect_as(dbname: &str, role: &str) -> Client {
    let mut admin = Cluster::get().connect(dbname);
    admin
        .batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE {role} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
             GRANT CREATE ON SCHEMA public TO {role};"
        ))
        .unwrap();
    Cluster::get().connect_as(dbname, role)
}

/// A fresh database `name` and a connection to it as `role`.
fn database_for(name: &str, role: &str) -> Client {
    database(name);
    connect_as(name, role)
}

/// A task `task` of the connected role whose items sleep `seconds` each and fail (for
/// good: one attempt) on key 13 with `failure` as the message and SQLSTATE CW042.
fn sleepy_task(db: &mut Client, task: &str, seconds: f64, failure: &str, options: &str) {
    db.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS loaded (task text, k bigint);
         CREATE OR REPLACE PROCEDURE {task}_item(k bigint) LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM pg_sleep({seconds});
             IF k = 13 THEN
                 RAISE EXCEPTION USING MESSAGE = {failure}, ERRCODE = 'CW042';
             END IF;
             INSERT INTO loaded VALUES ('{task}', k);
         END $$;
         SELECT chunkwise.create_task('{task}', call => '{task}_item', max_attempts => 1{options});",
        failure = quote_literal(failure),
    ))
    .unwrap();
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Plans keys `from..=to` (key 13 fails).
fn plan(db: &mut Client, task: &str, from: i64, to: i64) {
    db.execute(
        "SELECT chunkwise.plan($1, format('SELECT g AS key FROM generate_series(%s, %s) g', $2::bigint, $3::bigint))",
        &[&task, &from, &to],
    )
    .unwrap();
}

fn done(db: &mut Client, task: &str) -> i64 {
    one(
        db,
        &format!("SELECT done FROM chunkwise.task_status WHERE task = '{task}'"),
    )
}

fn screenshot_path(name: &str) -> std::path::PathBuf {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn the_progress_shown_rises_during_a_run_without_a_reload() {
    let mut db = database_for("dash_progress", "loader");
    sleepy_task(&mut db, "load_files", 0.05, "unused", ", workers => 2");
    sleepy_task(
        &mut db,
        "refresh_datamart",
        0.0,
        "user 13 has no account",
        "",
    );
    plan(&mut db, "refresh_datamart", 1, 40);
    db.execute("SELECT * FROM chunkwise.run('refresh_datamart')", &[])
        .unwrap();
    plan(&mut db, "load_files", 101, 220);

    let dashboard = Dashboard::start("dash_progress", "loader", &[]);
    let browser = Browser::open();
    browser.goto(&dashboard.url("/"));
    let shown = |browser: &Browser| -> i64 {
        browser
            .attribute(r#"tr[data-task="load_files"] td.done"#, "data-value")
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1)
    };
    assert_eq!(shown(&browser), 0, "before the run");
    browser.execute("window.chunkwiseMarker = 'the same page'; return null;");

    db.execute("SELECT chunkwise.start('load_files')", &[])
        .unwrap();
    let mut seen = vec![0];
    let mut screenshot_taken = false;
    let deadline = Instant::now() + DEADLINE;
    while *seen.last().unwrap() < 120 {
        assert!(
            Instant::now() < deadline,
            "the page showed only {seen:?} of 120 items done"
        );
        // -1: the element was swapped for a fresh one between finding and reading it.
        let now = shown(&browser);
        if now >= 0 && now != *seen.last().unwrap() {
            seen.push(now);
        }
        if !screenshot_taken && (30..=90).contains(&now) {
            browser.screenshot(&screenshot_path("tasks-during-a-run.png"));
            screenshot_taken = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "progress went back: {seen:?}"
    );
    assert!(
        seen.len() >= 3,
        "the page should have shown the run under way, saw {seen:?}"
    );
    assert_eq!(done(&mut db, "load_files"), 120);
    assert_eq!(
        browser.execute("return window.chunkwiseMarker;"),
        serde_json::json!("the same page"),
        "the page was reloaded"
    );
    println!("load_files done as the page showed it: {seen:?}");
    browser.goto(&dashboard.url("/tasks/load_files"));
    assert_eq!(
        browser.count("table.runs svg.spark polyline"),
        1,
        "the run's throughput chart"
    );
    browser.screenshot(&screenshot_path("task-runs.png"));
}

#[test]
fn a_failing_item_shows_on_the_failures_page_with_its_sqlstate_as_text() {
    let mut db = database_for("dash_failures", "loader");
    let xss = "<img src=x onerror=alert(1)>";
    sleepy_task(&mut db, "load_orders", 0.0, xss, "");
    plan(&mut db, "load_orders", 1, 20);
    db.execute("SELECT * FROM chunkwise.run('load_orders')", &[])
        .unwrap();

    let dashboard = Dashboard::start("dash_failures", "loader", &["--allow-actions"]);
    let browser = Browser::open();
    browser.goto(&dashboard.url("/tasks/load_orders/failures"));
    let row = r#"tr[data-status="dead"]"#;
    assert_eq!(
        browser.text(&format!("{row} td.key")).as_deref(),
        Some("13")
    );
    assert_eq!(
        browser.text(&format!("{row} td.sqlstate")).as_deref(),
        Some("CW042")
    );
    assert_eq!(
        browser.text(&format!("{row} td.message")).as_deref(),
        Some(xss)
    );
    assert_eq!(
        browser.count("main img"),
        0,
        "the message became an element"
    );
    assert!(!browser.alert_open(), "the message ran a script");
    browser.screenshot(&screenshot_path("failures.png"));

    // The dead item is offered for a skip; skipping it empties the page, live.
    browser.click(r#"button[data-action="skip"]"#);
    wait_for(
        "the skipped item to leave the failures page",
        DEADLINE,
        || (browser.count(row) == 0).then_some(()),
    );
    let (failures, dead): (i64, i64) = harness::two(
        &mut db,
        "SELECT (SELECT count(*) FROM chunkwise.failures), (SELECT dead FROM chunkwise.task_status)",
    );
    assert_eq!((failures, dead), (0, 0), "the dead item was not skipped");
}

#[test]
fn with_allow_actions_pause_stops_the_run_and_resume_finishes_it() {
    let mut db = database_for("dash_actions", "loader");
    // 200 items of 0.15 s on 2 workers: a 15 s run, so that the pause lands in it even
    // when the browser is slow to start on a busy machine (at 0.05 s it once did not).
    sleepy_task(
        &mut db,
        "steady",
        0.15,
        "unused",
        ", workers => 2, always_on => true",
    );
    plan(&mut db, "steady", 101, 300);
    let dashboard = Dashboard::start("dash_actions", "loader", &["--allow-actions"]);
    let browser = Browser::open();
    browser.goto(&dashboard.url("/tasks/steady"));
    wait_for("the pool to be working", DEADLINE, || {
        (done(&mut db, "steady") > 0).then_some(())
    });

    browser.click(r#"button[data-action="pause"]"#);
    wait_for("the pause to stop every worker", DEADLINE, || {
        let (paused, running): (bool, i64) = harness::two(
            &mut db,
            "SELECT paused, running FROM chunkwise.task_status WHERE task = 'steady'",
        );
        (paused && running == 0).then_some(())
    });
    let stopped_at = done(&mut db, "steady");
    assert!(
        stopped_at < 200,
        "the run had finished before the pause: {stopped_at}"
    );
    // The pause is in the database before the browser has rendered the reply to its
    // POST (seen in CI), so the notice is waited for, not read at once.
    wait_for("the page to say the task is paused", DEADLINE, || {
        browser
            .text("p.notice")
            .filter(|notice| notice.starts_with("Paused"))
    });
    // Nothing is claimed while paused (an absence can only be watched for a while).
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        done(&mut db, "steady"),
        stopped_at,
        "items were done while paused"
    );

    browser.click(r#"button[data-action="resume"]"#);
    wait_for("the resumed pool to finish", DEADLINE, || {
        (done(&mut db, "steady") == 200).then_some(())
    });
    let twice: i64 = one(
        &mut db,
        "SELECT count(*) - count(DISTINCT k) FROM loaded WHERE task = 'steady'",
    );
    assert_eq!(twice, 0, "an item was done twice");
}

#[test]
fn a_post_is_refused_without_allow_actions_or_without_the_form_token() {
    let mut db = database_for("dash_refused", "loader");
    sleepy_task(&mut db, "guarded", 0.0, "unused", "");
    let read_only = Dashboard::start("dash_refused", "loader", &[]);
    let (_, _, page) = http(
        &read_only.address,
        "GET",
        &read_only.path("/tasks/guarded"),
        &[],
        "",
    );
    assert!(
        !page.contains("<form"),
        "a read-only dashboard offers buttons"
    );
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let (status, _, body) = http(
        &read_only.address,
        "POST",
        &read_only.path("/tasks/guarded/pause"),
        &form,
        "csrf=x",
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("--allow-actions"), "{body}");

    let steering = Dashboard::start("dash_refused", "loader", &["--allow-actions"]);
    let (status, _, body) = http(
        &steering.address,
        "POST",
        &steering.path("/tasks/guarded/pause"),
        &form,
        "csrf=forged",
    );
    assert_eq!(status, 403, "{body}");
    let paused: bool = one(
        &mut db,
        "SELECT paused FROM chunkwise.task_status WHERE task = 'guarded'",
    );
    assert!(!paused, "a refused POST paused the task");
}

#[test]
fn a_role_sees_nothing_of_a_task_it_does_not_own() {
    let mut mine = database_for("dash_roles", "loader");
    sleepy_task(&mut mine, "my_task", 0.0, "mine failed", "");
    let mut theirs = connect_as("dash_roles", "stranger");
    sleepy_task(&mut theirs, "secret_task", 0.0, "secret message", "");
    plan(&mut theirs, "secret_task", 1, 20);
    theirs
        .execute("SELECT * FROM chunkwise.run('secret_task')", &[])
        .unwrap();

    let dashboard = Dashboard::start("dash_roles", "loader", &["--allow-actions"]);
    for path in ["/", "/workers", "/api/tasks", "/api/workers"] {
        let (status, _, body) = http(&dashboard.address, "GET", &dashboard.path(path), &[], "");
        assert_eq!(status, 200, "{path}: {body}");
        assert!(
            !body.contains("secret"),
            "{path} shows the stranger's task: {body}"
        );
    }
    let (_, _, body) = http(&dashboard.address, "GET", &dashboard.path("/"), &[], "");
    assert!(body.contains("my_task"), "{body}");
    for path in [
        "/tasks/secret_task",
        "/tasks/secret_task/failures",
        "/api/tasks/secret_task",
        "/api/tasks/secret_task/failures",
    ] {
        let (status, _, body) = http(&dashboard.address, "GET", &dashboard.path(path), &[], "");
        assert_eq!(status, 404, "{path}: {body}");
        assert!(!body.contains("secret message"), "{path}: {body}");
    }
    // Its actions are the extension's to refuse: the stranger's task is not the loader's.
    let browser = Browser::open();
    browser.goto(&dashboard.url("/tasks/my_task"));
    let csrf = browser
        .attribute(r#"input[name="csrf"]"#, "value")
        .expect("a form token");
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let (status, _, body) = http(
        &dashboard.address,
        "POST",
        &dashboard.path("/tasks/secret_task/pause"),
        &form,
        &format!("csrf={csrf}"),
    );
    assert!(status == 403 || status == 404, "{status}: {body}");
    let paused: bool = one(
        &mut theirs,
        "SELECT paused FROM chunkwise.task_status WHERE task = 'secret_task'",
    );
    assert!(!paused, "the loader paused the stranger's task");
}

#[test]
fn a_database_that_goes_away_is_shown_and_the_page_recovers_by_itself() {
    let mut db = database_for("dash_down", "loader");
    sleepy_task(&mut db, "survivor", 0.0, "unused", "");
    let dashboard = Dashboard::start("dash_down", "loader", &[]);
    let browser = Browser::open();
    browser.goto(&dashboard.url("/"));
    assert!(browser.count(r#"tr[data-task="survivor"]"#) == 1);
    browser.execute("window.chunkwiseMarker = 'the same page'; return null;");
    drop(db);

    let cluster = Cluster::get();
    cluster.stop("fast");
    wait_for("the page to say the database is down", DEADLINE, || {
        (browser.count("section.down") == 1).then_some(())
    });
    let (status, _, _) = http(&dashboard.address, "GET", &dashboard.path("/"), &[], "");
    assert_eq!(status, 503);
    cluster.start_again();
    wait_for("the page to show the tasks again", DEADLINE, || {
        (browser.count(r#"tr[data-task="survivor"]"#) == 1).then_some(())
    });
    assert_eq!(
        browser.execute("return window.chunkwiseMarker;"),
        serde_json::json!("the same page"),
        "the page was reloaded"
    );
}

#[test]
fn token_prefix_and_framing_are_honoured() {
    let mut db = database_for("dash_settings", "loader");
    sleepy_task(&mut db, "tokened", 0.0, "unused", "");
    let dashboard = Dashboard::start(
        "dash_settings",
        "loader",
        &[
            "--prefix",
            "/ops/chunkwise/",
            "--token",
            "s3cret-t0ken",
            "--frame-ancestors",
            "'self' https://app.example",
        ],
    );
    assert!(
        dashboard.address.starts_with("127.0.0.1:"),
        "{}",
        dashboard.address
    );
    let root = "/ops/chunkwise";
    let (status, headers, _) = http(&dashboard.address, "GET", root, &[], "");
    assert_eq!(status, 401);
    assert!(
        headers.to_lowercase().contains("www-authenticate: bearer"),
        "{headers}"
    );
    let (status, _, _) = http(
        &dashboard.address,
        "GET",
        root,
        &[("Authorization", "Bearer wrong")],
        "",
    );
    assert_eq!(status, 401);

    let bearer = [("Authorization", "Bearer s3cret-t0ken")];
    let (status, headers, body) = http(&dashboard.address, "GET", root, &bearer, "");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("href=\"/ops/chunkwise/tasks/tokened\""),
        "{body}"
    );
    assert!(body.contains("href=\"/ops/chunkwise/workers\""), "{body}");
    let csp = headers
        .lines()
        .find(|l| l.to_lowercase().starts_with("content-security-policy:"))
        .unwrap_or_default()
        .to_string();
    assert!(
        csp.contains("frame-ancestors 'self' https://app.example"),
        "{csp}"
    );
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let (status, _, body) = http(
        &dashboard.address,
        "GET",
        "/ops/chunkwise/api/tasks",
        &bearer,
        "",
    );
    assert_eq!(status, 200);
    let tasks: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(tasks[0]["task"], "tokened", "{body}");
    let (status, _, _) = http(&dashboard.address, "GET", "/api/tasks", &bearer, "");
    assert_eq!(status, 404, "pages answer outside the prefix");

    // A browser brings the token once in the address and keeps it in a cookie.
    let browser = Browser::open();
    browser.goto(&dashboard.url("/?token=s3cret-t0ken"));
    assert_eq!(browser.count(r#"tr[data-task="tokened"]"#), 1);
    assert!(
        !browser.current_url().contains("token"),
        "the token stays in the address"
    );
    browser.goto(&dashboard.url("/workers"));
    assert_eq!(browser.text("h1").as_deref(), Some("Live workers"));
}
