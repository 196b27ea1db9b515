//! What every request passes through: the optional bearer token, the security headers
//! (framing only by the configured ancestors, scripts and styles only from the
//! dashboard itself), and the form token that makes a cross-site POST useless.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};

use crate::app::App;

const TOKEN_COOKIE: &str = "chunkwise_dashboard_token";

/// Equality that takes as long for every string of a given length, so a token cannot be
/// guessed a character at a time from response times.
pub fn same_secret(given: &str, expected: &str) -> bool {
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

/// A random hex string of `bytes` bytes from the operating system.
pub fn random_secret(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    getrandom::fill(&mut raw).expect("the operating system's random numbers");
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

fn query_token(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == "token")
        .map(|(_, value)| value)
}

/// Checks the token (when one is configured) and adds the security headers.
pub async fn check(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if let Some(expected) = app.token.as_deref() {
        let headers = request.headers();
        let presented = bearer(headers).or_else(|| cookie(headers, TOKEN_COOKIE));
        if !presented.is_some_and(|t| same_secret(t, expected)) {
            // A browser brings the token once in the address; it is kept in a cookie
            // the page's scripts cannot read, and the address loses it.
            if let Some(t) = query_token(request.uri().query()).filter(|t| same_secret(t, expected))
            {
                let cookie = format!(
                    "{TOKEN_COOKIE}={t}; Path={}; HttpOnly; SameSite=Strict",
                    if app.prefix.is_empty() {
                        "/"
                    } else {
                        &app.prefix
                    }
                );
                let mut response = Redirect::to(request.uri().path()).into_response();
                if let Ok(value) = HeaderValue::from_str(&cookie) {
                    response.headers_mut().insert(header::SET_COOKIE, value);
                }
                return with_security_headers(&app, response);
            }
            let mut response = (
                StatusCode::UNAUTHORIZED,
                "a bearer token is required (Authorization: Bearer <token>, or ?token=<token> once)\n",
            )
                .into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return with_security_headers(&app, response);
        }
    }
    let response = next.run(request).await;
    with_security_headers(&app, response)
}

fn with_security_headers(app: &App, mut response: Response) -> Response {
    let headers = response.headers_mut();
    if let Ok(csp) = HeaderValue::from_str(&format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
         form-action 'self'; base-uri 'none'; frame-ancestors {}",
        app.frame_ancestors
    )) {
        headers.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abd", "abc"));
        assert!(!same_secret("ab", "abc"));
        assert!(!same_secret("", "abc"));
    }

    #[test]
    fn random_secrets_differ_and_are_hex() {
        let (a, b) = (random_secret(32), random_secret(32));
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn tokens_are_found_where_clients_put_them() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; chunkwise_dashboard_token=s3"),
        );
        assert_eq!(cookie(&headers, TOKEN_COOKIE), Some("s3"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer s4"));
        assert_eq!(bearer(&headers), Some("s4"));
        assert_eq!(query_token(Some("x=1&token=s5")), Some("s5"));
        assert_eq!(query_token(None), None);
    }
}
