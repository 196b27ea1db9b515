//! What the handlers share: the settings from the command line, the database, the form
//! token and the live pulse.

use tokio::sync::watch;

use crate::cli::Args;
use crate::db::Database;
use crate::live::Pulse;
use crate::pages::Page;
use std::sync::Arc;

pub struct App {
    pub db: Arc<Database>,
    pub prefix: String,
    pub allow_actions: bool,
    pub token: Option<String>,
    pub frame_ancestors: String,
    /// The token every action form carries: made at start, never leaves the pages, so a
    /// page of another site cannot post a valid form.
    pub csrf: String,
    pub pulses: watch::Sender<Pulse>,
}

impl App {
    /// Connects nothing yet: the first request (or the watcher) does, and a database that
    /// is down at start is shown as such rather than refusing to start.
    pub fn new(args: &Args) -> Result<App, String> {
        let db = Arc::new(Database::new(&args.database_url)?);
        let pulses = crate::live::start_watcher(db.clone(), args.poll_interval());
        Ok(App {
            db,
            prefix: args.prefix.clone(),
            allow_actions: args.allow_actions,
            token: args.token.clone().filter(|t| !t.is_empty()),
            frame_ancestors: args.frame_ancestors.clone(),
            csrf: crate::guard::random_secret(32),
            pulses,
        })
    }

    pub fn page(&self, notice: Option<&'static str>) -> Page<'_> {
        Page {
            prefix: &self.prefix,
            csrf: self.allow_actions.then_some(self.csrf.as_str()),
            version: self.pulses.borrow().version,
            notice,
        }
    }
}
