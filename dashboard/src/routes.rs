//! The routes: pages, the same data as JSON under `/api`, the event stream, the two
//! assets and the actions, all under the configured prefix.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Json, Redirect, Response};
use axum::routing::{get, post};
use maud::Markup;
use serde::Deserialize;

use crate::app::App;
use crate::db::DbError;
use crate::{guard, live, views};

/// How many runs and failures a page shows (newest first).
const RUNS_SHOWN: i64 = 50;
const FAILURES_SHOWN: i64 = 500;

pub fn router(app: Arc<App>) -> Router {
    let routes = Router::new()
        .route("/", get(tasks_page))
        .route("/tasks/{task}", get(task_page))
        .route("/tasks/{task}/failures", get(failures_page))
        .route("/tasks/{task}/{action}", post(act))
        .route("/workers", get(workers_page))
        .route("/api/tasks", get(api_tasks))
        .route("/api/tasks/{task}", get(api_task))
        .route("/api/tasks/{task}/failures", get(api_failures))
        .route("/api/workers", get(api_workers))
        .route("/events", get(events))
        .route("/assets/live.js", get(live_js))
        .route("/assets/style.css", get(style_css))
        .with_state(app.clone());
    let routes = if app.prefix.is_empty() {
        routes
    } else {
        let home = app.prefix.clone();
        Router::new().nest(&app.prefix, routes).route(
            &format!("{}/", app.prefix),
            get(move || async move { Redirect::permanent(&home) }),
        )
    };
    // Outside the nesting, so that the guard sees the whole path.
    routes.layer(middleware::from_fn_with_state(app, guard::check))
}

/// `?did=<action>` after an action redirected back to the page.
#[derive(Deserialize)]
struct Did {
    did: Option<String>,
}

impl Did {
    fn notice(&self) -> Option<&'static str> {
        self.did
            .as_deref()
            .and_then(views::Action::parse)
            .map(views::Action::done_text)
    }
}

/// A page, or the page that says why not (503 while the database is unreachable).
fn page_or_error(app: &App, result: Result<Markup, DbError>) -> Response {
    match result {
        Ok(markup) => markup.into_response(),
        Err(error) => (status_of(&error), app.page(None).error(&error)).into_response(),
    }
}

fn status_of(error: &DbError) -> StatusCode {
    match error {
        DbError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        DbError::Sql { sqlstate, .. } => match sqlstate.as_str() {
            "42501" => StatusCode::FORBIDDEN,
            "42704" => StatusCode::NOT_FOUND,
            s if s.starts_with("22") || s.starts_with("55") => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        },
        DbError::Unreadable(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn not_visible(app: &App, task: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        app.page(None).message(
            "No such task",
            &format!("No task \"{task}\" is visible to the role the dashboard connects as."),
        ),
    )
        .into_response()
}

async fn tasks_page(State(app): State<Arc<App>>, Query(did): Query<Did>) -> Response {
    let page = app.page(did.notice());
    let result = async { Ok(page.tasks(&views::tasks(&*app.db.client().await?).await?)) }.await;
    page_or_error(&app, result)
}

/// The two pages about one task.
#[derive(Clone, Copy)]
enum TaskPage {
    Runs,
    Failures,
}

/// A page about one task; 404 when the role may not see it.
async fn task_scoped_page(app: &App, task: &str, did: &Did, which: TaskPage) -> Response {
    let page = app.page(did.notice());
    let result = async {
        let db = app.db.client().await?;
        let Some(row) = views::task(&db, task).await? else {
            return Ok(None);
        };
        Ok(Some(match which {
            TaskPage::Runs => page.task(&row, &views::runs(&db, task, RUNS_SHOWN).await?),
            TaskPage::Failures => {
                page.failures(&row, &views::failures(&db, task, FAILURES_SHOWN).await?)
            }
        }))
    }
    .await;
    match result {
        Ok(None) => not_visible(app, task),
        other => page_or_error(app, other.map(Option::unwrap_or_default)),
    }
}

async fn task_page(
    State(app): State<Arc<App>>,
    Path(task): Path<String>,
    Query(did): Query<Did>,
) -> Response {
    task_scoped_page(&app, &task, &did, TaskPage::Runs).await
}

async fn failures_page(
    State(app): State<Arc<App>>,
    Path(task): Path<String>,
    Query(did): Query<Did>,
) -> Response {
    task_scoped_page(&app, &task, &did, TaskPage::Failures).await
}

async fn workers_page(State(app): State<Arc<App>>) -> Response {
    let page = app.page(None);
    let result = async { Ok(page.workers(&views::workers(&*app.db.client().await?).await?)) }.await;
    page_or_error(&app, result)
}

/// JSON, or `{"error": {...}}` with the status a page would get.
fn json_or_error<T: serde::Serialize>(result: Result<Option<T>, DbError>) -> Response {
    match result {
        Ok(Some(value)) => Json(value).into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": {"message": "no such task visible to this role"}})),
        )
            .into_response(),
        Err(error) => {
            let body = match &error {
                DbError::Unavailable(detail) => {
                    serde_json::json!({"database": "unreachable", "message": detail})
                }
                DbError::Sql {
                    sqlstate,
                    message,
                    hint,
                } => {
                    serde_json::json!({"sqlstate": sqlstate, "message": message, "hint": hint})
                }
                DbError::Unreadable(detail) => serde_json::json!({"message": detail}),
            };
            (status_of(&error), Json(serde_json::json!({"error": body}))).into_response()
        }
    }
}

async fn api_tasks(State(app): State<Arc<App>>) -> Response {
    json_or_error(async { Ok(Some(views::tasks(&*app.db.client().await?).await?)) }.await)
}

async fn api_task(State(app): State<Arc<App>>, Path(task): Path<String>) -> Response {
    json_or_error(
        async {
            let db = app.db.client().await?;
            Ok(match views::task(&db, &task).await? {
                Some(row) => Some(serde_json::json!({
                    "task": row,
                    "runs": views::runs(&db, &task, RUNS_SHOWN).await?,
                })),
                None => None,
            })
        }
        .await,
    )
}

async fn api_failures(State(app): State<Arc<App>>, Path(task): Path<String>) -> Response {
    json_or_error(
        async {
            let db = app.db.client().await?;
            Ok(match views::task(&db, &task).await? {
                Some(_) => Some(views::failures(&db, &task, FAILURES_SHOWN).await?),
                None => None,
            })
        }
        .await,
    )
}

async fn api_workers(State(app): State<Arc<App>>) -> Response {
    json_or_error(async { Ok(Some(views::workers(&*app.db.client().await?).await?)) }.await)
}

async fn events(State(app): State<Arc<App>>) -> Response {
    live::events(&app.pulses).into_response()
}

async fn live_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../assets/live.js"),
    )
        .into_response()
}

async fn style_css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../assets/style.css"),
    )
        .into_response()
}

#[derive(Deserialize)]
struct ActionForm {
    csrf: String,
    key: Option<i64>,
}

/// `POST /tasks/<task>/<action>`: only with `--allow-actions` and the form token, made
/// as the connected role; back to the page it came from with what was done.
async fn act(
    State(app): State<Arc<App>>,
    Path((task, action)): Path<(String, String)>,
    Form(form): Form<ActionForm>,
) -> Response {
    let page = app.page(None);
    let Some(action) = views::Action::parse(&action) else {
        return (
            StatusCode::NOT_FOUND,
            page.message(
                "No such action",
                "Actions are pause, resume, cancel, retry and skip.",
            ),
        )
            .into_response();
    };
    if !app.allow_actions {
        return (
            StatusCode::FORBIDDEN,
            page.message(
                "Actions are off",
                "This dashboard only shows; start it with --allow-actions to steer tasks.",
            ),
        )
            .into_response();
    }
    if !guard::same_secret(&form.csrf, &app.csrf) {
        return (
            StatusCode::FORBIDDEN,
            page.message(
                "Form expired",
                "The form's token does not match this dashboard: load the page again and retry.",
            ),
        )
            .into_response();
    }
    let done = async {
        action
            .perform(&*app.db.client().await?, &task, form.key)
            .await
    }
    .await;
    match done {
        Ok(()) => {
            let back = if action == views::Action::Skip {
                "/failures"
            } else {
                ""
            };
            Redirect::to(&format!(
                "{}?did={}",
                page.task_url(&task, back),
                action.name()
            ))
            .into_response()
        }
        Err(error) => (status_of(&error), page.error(&error)).into_response(),
    }
}
