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
}

impl From<tokio_postgres::Error> for DbError {
    fn from(error: tokio_postgres::Error) -> Self {
        match error.as_db_error() {
            Some(db) => DbError::Sql {
                sqlstate: db.code().code().to_string(),
                message: db.message().to_string(),
                hint: db.hint().map(str::to_string),
            },
            None => DbError::Unavailable(error.to_string()),
        }
    }
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
