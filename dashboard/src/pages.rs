//! The HTML pages, server-rendered with maud: every text that comes from the database is
//! escaped by construction (maud escapes whatever is interpolated), so a failure message
//! like `<img src=x onerror=alert(1)>` shows as text.

use maud::{DOCTYPE, Markup, html};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use crate::chart;
use crate::db::DbError;
use crate::views::{Action, FailureRow, RunRow, TaskRow, WorkerRow};

/// Characters escaped in a task name put into a path segment.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'\\')
    .add(b'^')
    .add(b'|')
    .add(b'[')
    .add(b']')
    .add(b'\'');

/// What every page needs beyond its rows.
pub struct Page<'a> {
    /// The configured path prefix ("" or "/path").
    pub prefix: &'a str,
    /// The form token when actions are allowed; no buttons without it.
    pub csrf: Option<&'a str>,
    /// The change counter the page was rendered at: the live script refreshes the page
    /// when the server announces another one.
    pub version: u64,
    /// What an action just did, shown once at the top.
    pub notice: Option<&'static str>,
}

impl Page<'_> {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.prefix, path)
    }

    pub fn task_url(&self, task: &str, rest: &str) -> String {
        format!(
            "{}/tasks/{}{}",
            self.prefix,
            utf8_percent_encode(task, SEGMENT),
            rest
        )
    }

    fn layout(&self, title: &str, content: Markup) -> Markup {
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { (title) " · pg_chunkwise" }
                    link rel="stylesheet" href=(self.url("/assets/style.css"));
                    script src=(self.url("/assets/live.js")) defer {}
                }
                body data-version=(self.version) data-events=(self.url("/events")) {
                    header {
                        strong { "pg_chunkwise" }
                        nav {
                            a href=(self.url("/")) { "Tasks" }
                            a href=(self.url("/workers")) { "Workers" }
                        }
                        span.offline-note { "dashboard unreachable, reconnecting…" }
                    }
                    main {
                        @if let Some(notice) = self.notice {
                            p.notice role="status" { (notice) }
                        }
                        (content)
                    }
                }
            }
        }
    }

    fn action_button(&self, task: &str, action: Action, label: &str, key: Option<i64>) -> Markup {
        html! {
            @if let Some(csrf) = self.csrf {
                form.action method="post" action=(self.task_url(task, &format!("/{}", action.name()))) {
                    input type="hidden" name="csrf" value=(csrf);
                    @if let Some(key) = key {
                        input type="hidden" name="key" value=(key);
                    }
                    button type="submit" data-action=(action.name()) { (label) }
                }
            }
        }
    }

    fn progress(&self, task: &TaskRow) -> Markup {
        let total = task.total();
        let percent = if total > 0 {
            task.done as f64 * 100.0 / total as f64
        } else {
            0.0
        };
        html! {
            div.progress {
                progress value=(task.done) max=(total.max(1)) {}
                span.figures data-done=(task.done) data-total=(total) {
                    (task.done) " / " (total) " (" (format!("{percent:.0}")) " %)"
                }
                @if let Some(rate) = task.items_per_second.filter(|r| *r > 0.0) {
                    span.rate { (format!("{rate:.1}")) " items/s" }
                }
                @if let Some(left) = task.seconds_left.filter(|s| *s >= 1.0) {
                    span.eta { "ETA " (duration(left)) }
                }
            }
        }
    }

    pub fn tasks(&self, tasks: &[TaskRow]) -> Markup {
        self.layout(
            "Tasks",
            html! {
                h1 { "Tasks" }
                @if tasks.is_empty() {
                    p.empty { "No task is visible to this role." }
                } @else {
                    table.tasks {
                        thead { tr {
                            th { "Task" } th { "State" } th { "Progress" } th.n { "Pending" }
                            th.n { "Retrying" } th.n { "Running" } th.n { "Done" } th.n { "Dead" }
                            th.n { "Workers" } th.n { "Blocked groups" }
                        } }
                        tbody {
                            @for task in tasks {
                                tr data-task=(task.task) data-state=(task.state) {
                                    td { a href=(self.task_url(&task.task, "")) { (task.task) } }
                                    td { (state_badge(task)) }
                                    td { (self.progress(task)) }
                                    td.n.pending { (task.pending) }
                                    td.n.retrying { (task.waiting_retry) }
                                    td.n.running { (task.running) }
                                    td.n.done data-value=(task.done) { (task.done) }
                                    td.n.dead data-value=(task.dead) {
                                        @if task.dead > 0 {
                                            a href=(self.task_url(&task.task, "/failures")) { (task.dead) }
                                        } @else { (task.dead) }
                                    }
                                    td.n.workers { (task.active_workers)
                                        @if task.idle_workers > 0 { " (" (task.idle_workers) " idle)" } }
                                    td.n.blocked { (task.blocked_groups) }
                                }
                            }
                        }
                    }
                }
            },
        )
    }

    pub fn task(&self, task: &TaskRow, runs: &[RunRow]) -> Markup {
        self.layout(
            &task.task,
            html! {
                h1 { "Task " (task.task) }
                section.summary data-task=(task.task) {
                    p { (state_badge(task)) " owned by " (task.owner)
                        @if task.always_on { " · always-on pool of " (task.active_workers) } }
                    (self.progress(task))
                    p {
                        a href=(self.task_url(&task.task, "/failures")) {
                            "Failures: " (task.dead) " dead, " (task.waiting_retry) " waiting for a retry"
                        }
                        @if task.blocked_groups > 0 { " · " (task.blocked_groups) " groups blocked" }
                    }
                    div.actions {
                        @if task.paused {
                            (self.action_button(&task.task, Action::Resume, "Resume", None))
                        } @else {
                            (self.action_button(&task.task, Action::Pause, "Pause", None))
                        }
                        @if task.active_workers > 0 {
                            (self.action_button(&task.task, Action::Cancel, "Cancel runs", None))
                        }
                        @if task.dead > 0 {
                            (self.action_button(&task.task, Action::Retry, "Retry dead items", None))
                        }
                    }
                }
                h2 { "Runs" }
                @if runs.is_empty() {
                    p.empty { "No run yet." }
                } @else {
                    table.runs {
                        thead { tr {
                            th.n { "Run" } th { "State" } th { "Outcome" } th { "Started" } th { "Finished" }
                            th.n { "Seconds" } th.n { "Workers" } th.n { "Processed" } th.n { "Failed" }
                            th.n { "Dead" } th { "Items/s over the run" }
                        } }
                        tbody {
                            @for run in runs {
                                tr data-run=(run.run_id) data-state=(run.state) {
                                    td.n { (run.run_id) }
                                    td { (run.state) }
                                    td { (run.outcome.as_deref().unwrap_or("")) }
                                    td { (run.started_at) }
                                    td { (run.finished_at.as_deref().unwrap_or("")) }
                                    td.n { (run.seconds.map(|s| format!("{s:.1}")).unwrap_or_default()) }
                                    td.n { (run.workers) }
                                    td.n.processed { (run.processed) }
                                    td.n { (run.failed) }
                                    td.n { (run.dead) }
                                    td { @if let Some(svg) = chart::throughput(&run.throughput, run.seconds.unwrap_or(0.0)) { (svg) } }
                                }
                            }
                        }
                    }
                }
            },
        )
    }

    pub fn failures(&self, task: &TaskRow, failures: &[FailureRow]) -> Markup {
        self.layout(
            &format!("Failures of {}", task.task),
            html! {
                h1 { "Failures of " a href=(self.task_url(&task.task, "")) { (task.task) } }
                @if failures.is_empty() {
                    p.empty { "No failed item." }
                } @else {
                    table.failures {
                        thead { tr {
                            th { "Key" } th { "Group" } th { "Status" } th.n { "Attempts" } th { "SQLSTATE" }
                            th { "Message" } th { "Last failure" } th { "Next retry" } th {}
                        } }
                        tbody {
                            @for failure in failures {
                                tr data-item=(failure.item_id) data-status=(failure.status) {
                                    td.key { (failure.key) @if let Some(hi) = failure.hi { " – " (hi) } }
                                    td { (failure.group_key.as_deref().unwrap_or(""))
                                        @if failure.blocks_group { " (blocked)" } }
                                    td { (failure.status) }
                                    td.n { (failure.attempts) " / " (failure.max_attempts) }
                                    td.sqlstate { code { (failure.sqlstate.as_deref().unwrap_or("")) } }
                                    td.message { (failure.message.as_deref().unwrap_or("")) }
                                    td { (failure.last_failed_at.as_deref().unwrap_or("")) }
                                    td { (failure.next_retry.as_deref().unwrap_or("")) }
                                    td { @if failure.status == "dead" {
                                        (self.action_button(&task.task, Action::Skip, "Skip", Some(failure.key)))
                                    } }
                                }
                            }
                        }
                    }
                }
            },
        )
    }

    pub fn workers(&self, workers: &[WorkerRow]) -> Markup {
        self.layout(
            "Workers",
            html! {
                h1 { "Live workers" }
                @if workers.is_empty() {
                    p.empty { "No worker is running a task visible to this role." }
                } @else {
                    table.workers {
                        thead { tr {
                            th.n { "PID" } th { "Task" } th.n { "Run" } th { "State" } th.n { "Current key" }
                            th { "Since" } th.n { "Items done" } th { "Started" } th { "Throttled by" }
                        } }
                        tbody {
                            @for worker in workers {
                                tr data-pid=(worker.pid) data-state=(worker.state) {
                                    td.n { (worker.pid) }
                                    td { a href=(self.task_url(&worker.task, "")) { (worker.task) } }
                                    td.n { (worker.run_id) }
                                    td { (worker.state) }
                                    td.n { (worker.current_key.map(|k| k.to_string()).unwrap_or_default()) }
                                    td { (worker.since.as_deref().unwrap_or("")) }
                                    td.n { (worker.items_done) }
                                    td { (worker.started_at) }
                                    td { (worker.throttled.as_deref().unwrap_or("")) }
                                }
                            }
                        }
                    }
                }
            },
        )
    }

    /// The page for a request the database could not answer. An unreachable database
    /// gets a page that says so; the live script keeps it current, so it turns into the
    /// real page when the database is back.
    pub fn error(&self, error: &DbError) -> Markup {
        match error {
            DbError::Unavailable(detail) => self.layout(
                "Database unavailable",
                html! {
                    section.down {
                        h1 { "The database is not reachable" }
                        p { "This page comes back by itself when the database does." }
                        p.detail { (detail) }
                    }
                },
            ),
            DbError::Sql {
                sqlstate,
                message,
                hint,
            } => self.layout(
                "Error",
                html! {
                    section.error {
                        h1 { "The database refused" }
                        p { code.sqlstate { (sqlstate) } " " span.message { (message) } }
                        @if let Some(hint) = hint { p.hint { "Hint: " (hint) } }
                    }
                },
            ),
            DbError::Unreadable(detail) => self.layout(
                "Error",
                html! {
                    section.error {
                        h1 { "The answer could not be read" }
                        p { "Are the dashboard and the extension of the same version?" }
                        p.detail { (detail) }
                    }
                },
            ),
        }
    }

    pub fn message(&self, title: &str, text: &str) -> Markup {
        self.layout(
            title,
            html! {
                section.error { h1 { (title) } p { (text) } }
            },
        )
    }
}

fn state_badge(task: &TaskRow) -> Markup {
    html! {
        span.state class=(task.state) title=(task.throttled.as_deref().unwrap_or("")) {
            (task.state)
            @if let Some(reason) = &task.throttled { ": " (reason) }
        }
    }
}

/// `3725.0` → "1h 02m"; `190.0` → "3m 10s"; `12.0` → "12s".
pub fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> Page<'static> {
        Page {
            prefix: "/ops",
            csrf: Some("t0ken"),
            version: 7,
            notice: None,
        }
    }

    fn failure(message: &str) -> FailureRow {
        FailureRow {
            item_id: 1,
            key: 13,
            hi: None,
            group_key: Some("org \"a\"".into()),
            status: "dead".into(),
            attempts: 3,
            max_attempts: 3,
            sqlstate: Some("CW042".into()),
            message: Some(message.into()),
            last_failed_at: None,
            next_retry: None,
            blocks_group: false,
        }
    }

    #[test]
    fn durations_read_like_a_person_would_say_them() {
        assert_eq!(duration(12.4), "12s");
        assert_eq!(duration(190.0), "3m 10s");
        assert_eq!(duration(3725.0), "1h 02m");
    }

    #[test]
    fn task_names_are_encoded_in_links() {
        assert_eq!(
            page().task_url("a b/c?d", "/failures"),
            "/ops/tasks/a%20b%2Fc%3Fd/failures"
        );
    }

    fn task(name: &str) -> TaskRow {
        TaskRow {
            task: name.into(),
            owner: "o".into(),
            state: "idle",
            paused: false,
            always_on: false,
            pending: 0,
            waiting_retry: 0,
            running: 0,
            done: 0,
            dead: 1,
            active_workers: 0,
            idle_workers: 0,
            blocked_groups: 0,
            items_per_second: None,
            seconds_left: None,
            throttled: None,
        }
    }

    #[test]
    fn database_text_is_escaped() {
        let html = page()
            .failures(
                &task("<b>t</b>"),
                &[failure("<img src=x onerror=alert(1)>")],
            )
            .into_string();
        assert!(
            html.contains("&lt;img src=x onerror=alert(1)&gt;"),
            "{html}"
        );
        assert!(!html.contains("<img"), "{html}");
        assert!(!html.contains("<b>t</b>"), "{html}");
        assert!(html.contains("name=\"csrf\" value=\"t0ken\""), "{html}");
    }

    #[test]
    fn no_buttons_without_a_form_token() {
        let page = Page {
            csrf: None,
            ..page()
        };
        let html = page.failures(&task("t"), &[failure("x")]).into_string();
        assert!(!html.contains("<form"), "{html}");
    }
}
