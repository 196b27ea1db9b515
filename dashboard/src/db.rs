//! The connection to the database: one shared client, made again when it is lost, so
//! that the dashboard recovers by itself when the database comes back.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::{Client, Config, Connection, NoTls, Socket, tls::NoTlsStream};

/// Why a read or an action did not happen.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database cannot be reached (down, restarting, refused the connection).
    #[error("the database is not reachable: {0}")]
    Unavailable(String),
    /// The database answered with an error: shown with its SQLSTATE and hint.
    #[error("{message} (SQLSTATE {sqlstate})")]
    Sql {
        sqlstate: String,
        message: String,
        hint: Option<String>,
    },
    /// The answer could not be read (a column of an unexpected type: a dashboard and an
    /// extension of different versions, say). Not the database's fault, nor passing.
    #[error("the dashboard could not read the database's answer: {0}")]
    Unreadable(String),
}

impl From<tokio_postgres::Error> for DbError {
    fn from(error: tokio_postgres::Error) -> Self {
        if let Some(db) = error.as_db_error() {
            let sqlstate = db.code().code();
            if sqlstate_means_unreachable(sqlstate) {
                return DbError::Unavailable(error.to_string());
            }
            return DbError::Sql {
                sqlstate: sqlstate.to_string(),
                message: db.message().to_string(),
                hint: db.hint().map(str::to_string),
            };
        }
        if unreadable_answer(&error) {
            DbError::Unreadable(error.to_string())
        } else {
            // Closed, I/O, connect, timeout, authentication: the database is not reachable.
            DbError::Unavailable(error.to_string())
        }
    }
}

/// Whether the error is about reading an answer that came: a column of another type, an
/// unexpected NULL, a column that is not there.
fn unreadable_answer(error: &tokio_postgres::Error) -> bool {
    use tokio_postgres::types::{WasNull, WrongType};
    let conversion = std::error::Error::source(error)
        .is_some_and(|source| source.is::<WrongType>() || source.is::<WasNull>());
    // tokio-postgres has no public kind for a missing column; its message is stable.
    conversion || error.to_string().starts_with("invalid column")
}

/// Whether the server said it went away or cannot take connections: class 08, or
/// 57P01-57P03 (shut down, crashed, not yet accepting).
fn sqlstate_means_unreachable(sqlstate: &str) -> bool {
    sqlstate.starts_with("08") || matches!(sqlstate, "57P01" | "57P02" | "57P03")
}

pub struct Database {
    config: Config,
    shared: Mutex<Option<Arc<Client>>>,
}

impl Database {
    /// Parses the libpq connection string or URL; names the connection after the
    /// dashboard (pg_stat_activity) and bounds the connect time unless the string does.
    pub fn new(url: &str) -> Result<Database, String> {
        let mut config: Config = url
            .parse()
            .map_err(|e| format!("--database-url is not a libpq connection string or URL: {e}"))?;
        if config.get_application_name().is_none() {
            config.application_name("chunkwise-dashboard");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(3));
        }
        Ok(Database {
            config,
            shared: Mutex::new(None),
        })
    }

    /// The shared client, connected again if the last one was lost.
    pub async fn client(&self) -> Result<Arc<Client>, DbError> {
        let mut shared = self.shared.lock().await;
        if let Some(client) = shared.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        *shared = None;
        let (client, connection) = self.connect().await?;
        tokio::spawn(async move {
            // Ends when the connection does; the next request connects again.
            let _ = connection.await;
        });
        let client = Arc::new(client);
        *shared = Some(client.clone());
        Ok(client)
    }

    /// A connection of its own (LISTEN needs its messages read from the connection).
    pub async fn connect(&self) -> Result<(Client, Connection<Socket, NoTlsStream>), DbError> {
        Ok(self.config.connect(NoTls).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::sqlstate_means_unreachable;

    #[test]
    fn only_connection_and_shutdown_states_mean_the_database_is_gone() {
        for gone in ["08006", "08001", "57P01", "57P02", "57P03"] {
            assert!(sqlstate_means_unreachable(gone), "{gone}");
        }
        for answered in ["42501", "42704", "22023", "55006", "57014", "XX000"] {
            assert!(!sqlstate_means_unreachable(answered), "{answered}");
        }
    }
}
