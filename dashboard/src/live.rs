//! Live updates. One watcher per dashboard listens on `NOTIFY chunkwise` and, while a
//! page is open, reads the views every poll interval; when what they show has changed it
//! counts up a version that every open page hears of through server-sent events. The
//! page then fetches itself again (assets/live.js). Nothing is read while nobody watches.

use std::collections::hash_map::DefaultHasher;
use std::convert::Infallible;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::{Stream, StreamExt};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_postgres::AsyncMessage;
use tokio_stream::wrappers::WatchStream;

use crate::db::{Database, DbError};
use crate::views;

/// What the open pages are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Pulse {
    /// Counts up whenever what the pages show may have changed.
    pub version: u64,
    /// Whether the watcher can reach the database.
    pub database_up: bool,
}

/// How long the watcher waits before connecting again after losing the database.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

pub fn start_watcher(db: Arc<Database>, poll: Duration) -> watch::Sender<Pulse> {
    let (pulses, _) = watch::channel(Pulse {
        version: 0,
        database_up: true,
    });
    let sender = pulses.clone();
    tokio::spawn(async move {
        loop {
            let lost = watch_while_connected(&db, &sender, poll).await;
            eprintln!("chunkwise-dashboard: watching the database: {lost}");
            mark(&sender, false, true);
            tokio::time::sleep(RECONNECT_AFTER).await;
        }
    });
    pulses
}

/// Sets whether the database is up, counting the version up when `changed` or when the
/// reachability itself changed.
fn mark(pulses: &watch::Sender<Pulse>, up: bool, changed: bool) {
    pulses.send_if_modified(|pulse| {
        if changed || pulse.database_up != up {
            pulse.version += 1;
            pulse.database_up = up;
            true
        } else {
            false
        }
    });
}

/// Listens and polls until the connection is lost; returns why.
async fn watch_while_connected(
    db: &Database,
    pulses: &watch::Sender<Pulse>,
    poll: Duration,
) -> DbError {
    let (client, mut connection) = match db.connect().await {
        Ok(pair) => pair,
        Err(error) => return error,
    };
    let (notified, mut notifications) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(_) = message {
                let _ = notified.send(());
            }
        }
        // Dropping `notified` tells the loop below that the connection is gone.
    });
    if let Err(error) = client.batch_execute("LISTEN chunkwise").await {
        return error.into();
    }
    let mut ticks = tokio::time::interval(poll);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<u64> = None;
    loop {
        let notification = tokio::select! {
            _ = ticks.tick() => false,
            heard = notifications.recv() => match heard {
                Some(()) => true,
                None => return DbError::Unavailable("the connection was closed".into()),
            },
        };
        if pulses.receiver_count() == 0 {
            // Nobody watches: read nothing, and compare afresh when someone comes.
            last = None;
            continue;
        }
        match views::fingerprint(&client).await {
            Ok(text) => {
                let mut hasher = DefaultHasher::new();
                text.hash(&mut hasher);
                let now = Some(hasher.finish());
                // A notification (a run ended, an item died) may change what the views'
                // figures do not show, e.g. a run's outcome: always announce it.
                mark(
                    pulses,
                    true,
                    notification || last.is_some_and(|l| Some(l) != now),
                );
                last = now;
            }
            Err(error @ DbError::Unavailable(_)) => return error,
            Err(error) => {
                // The views themselves fail (e.g. the extension was dropped): say so on the
                // pages, which show the error, and go on trying.
                eprintln!("chunkwise-dashboard: reading the views: {error}");
                mark(pulses, true, last.is_some());
                last = None;
            }
        }
        if client.is_closed() {
            return DbError::Unavailable("the connection was closed".into());
        }
    }
}

/// `GET /events`: a `change` event with the current pulse at once and at every change.
pub fn events(
    pulses: &watch::Sender<Pulse>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>> + use<>> {
    let stream = WatchStream::new(pulses.subscribe()).map(|pulse| {
        Ok(Event::default()
            .event("change")
            .data(serde_json::to_string(&pulse).unwrap_or_default()))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
