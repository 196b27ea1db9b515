//! The command line: where the database is, where to listen, and what the dashboard may do.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "chunkwise-dashboard",
    version,
    about = "A web dashboard for pg_chunkwise: tasks, runs, failures and workers, live, as one role sees them"
)]
pub struct Args {
    /// The database to watch, as a libpq connection string or URL. The dashboard shows
    /// exactly what this role may see through the extension's views.
    #[arg(long, env = "CHUNKWISE_DATABASE_URL")]
    pub database_url: String,

    /// Address and port to listen on (port 0 picks a free one; the address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Path under which every page is served, e.g. /ops/chunkwise behind a proxy.
    #[arg(long, default_value = "", value_parser = parse_prefix)]
    pub prefix: String,

    /// Offer pause, resume, cancel, retry and skip (performed as the connected role).
    #[arg(long)]
    pub allow_actions: bool,

    /// Require this bearer token (`Authorization: Bearer <token>`, or `?token=<token>`
    /// once in a browser, which then keeps it in a cookie). Prefer the environment
    /// variable: a command line is visible to every local user.
    #[arg(long, env = "CHUNKWISE_DASHBOARD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Who may frame the pages (the CSP frame-ancestors sources), e.g.
    /// "'self' https://app.example.com".
    #[arg(long, default_value = "'self'", value_parser = parse_frame_ancestors)]
    pub frame_ancestors: String,

    /// How often the views are read for changes while a page is open, in milliseconds
    /// (NOTIFY chunkwise events arrive at once in any case).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub poll_ms: u64,
}

impl Args {
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_ms)
    }
}

/// A path prefix: empty, or `/` followed by plain path characters, without a trailing
/// slash. Anything else could break out of the links it is put into.
pub fn parse_prefix(raw: &str) -> Result<String, String> {
    let prefix = raw.trim_end_matches('/');
    if prefix.is_empty() {
        return Ok(String::new());
    }
    let plain = |c: char| c.is_ascii_alphanumeric() || "/-_.~".contains(c);
    if !prefix.starts_with('/') || !prefix.chars().all(plain) || prefix.contains("//") {
        return Err(format!(
            "prefix {raw:?} must look like /path/to/dashboard (letters, digits, - _ . ~)"
        ));
    }
    Ok(prefix.to_string())
}

/// CSP source expressions: anything but the characters that end a directive or header.
pub fn parse_frame_ancestors(raw: &str) -> Result<String, String> {
    let sources = raw.trim();
    if sources.is_empty()
        || sources
            .chars()
            .any(|c| c == ';' || c == ',' || c.is_control())
    {
        return Err(format!(
            "frame ancestors {raw:?} must be CSP sources separated by spaces, e.g. \"'self' https://app.example.com\" or \"'none'\""
        ));
    }
    Ok(sources.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_normalised_or_refused() {
        assert_eq!(parse_prefix("").unwrap(), "");
        assert_eq!(parse_prefix("/").unwrap(), "");
        assert_eq!(parse_prefix("/ops/chunkwise/").unwrap(), "/ops/chunkwise");
        for bad in ["ops", "/a b", "/a\"><script>", "//evil.example", "/a?b"] {
            assert!(parse_prefix(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn frame_ancestors_cannot_add_directives() {
        assert_eq!(
            parse_frame_ancestors(" 'self' https://a.example ").unwrap(),
            "'self' https://a.example"
        );
        for bad in ["", "'self'; script-src *", "a\r\nSet-Cookie: x", "a, b"] {
            assert!(parse_frame_ancestors(bad).is_err(), "{bad:?} accepted");
        }
    }
}
