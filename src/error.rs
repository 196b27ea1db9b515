//! Errors as the SQL caller sees them: every refusal carries a SQLSTATE, a message and,
//! where the caller can do something about it, a hint.

use std::borrow::Cow;

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

/// An error to report at the SQL boundary. Built with [`SqlError::new`] and the
/// `detail`/`hint` setters, raised with [`SqlError::raise`].
#[derive(Debug, Clone)]
pub struct SqlError {
    code: PgSqlErrorCode,
    message: Cow<'static, str>,
    detail: Option<String>,
    hint: Option<String>,
}

pub type SqlResult<T> = Result<T, SqlError>;

impl SqlError {
    pub fn new(code: PgSqlErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        SqlError {
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// A required argument that was NULL: "`name` must not be NULL", with what to pass.
    pub fn null_argument(name: &str, hint: impl Into<String>) -> Self {
        SqlError::new(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            format!("{name} must not be NULL"),
        )
        .hint(hint)
    }

    pub fn invalid_parameter(message: impl Into<Cow<'static, str>>) -> Self {
        SqlError::new(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, message)
    }

    /// The five-character SQLSTATE.
    pub fn sqlstate(&self) -> String {
        sqlstate(self.code)
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// Raises the error as a PostgreSQL ERROR: the current (sub)transaction aborts.
    pub fn raise(self) -> ! {
        let mut report = ErrorReport::new(self.code, self.message, "pg_chunkwise");
        if let Some(detail) = self.detail {
            report = report.set_detail(detail);
        }
        if let Some(hint) = self.hint {
            report = report.set_hint(hint);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("an ERROR report does not return")
    }
}

/// Unwraps a result at the SQL boundary, raising the error if there is one.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for SqlResult<T> {
    fn or_raise(self) -> T {
        self.unwrap_or_else(|e| e.raise())
    }
}

/// Characters of a caller's value that an error message or log line repeats.
const EXCERPT_CHARS: usize = 64;

/// `value` as a message repeats it: whole when short, else its start and how long it
/// was, so that a megabyte of refused input is not echoed into errors and the log.
pub fn excerpt(value: &str) -> Cow<'_, str> {
    excerpt_of(value, EXCERPT_CHARS)
}

/// [`excerpt`] keeping up to `chars` characters.
pub fn excerpt_of(value: &str, chars: usize) -> Cow<'_, str> {
    match value.char_indices().nth(chars) {
        None => Cow::Borrowed(value),
        Some((cut, _)) => Cow::Owned(format!(
            "{}... ({} characters)",
            &value[..cut],
            value.chars().count()
        )),
    }
}

/// The five-character SQLSTATE of an error code (PostgreSQL packs it six bits a character).
pub fn sqlstate(code: PgSqlErrorCode) -> String {
    sqlstate_of(code as i32)
}

/// The five-character SQLSTATE of a packed error code as PostgreSQL raised it.
pub fn sqlstate_of(packed: i32) -> String {
    (0..5)
        .map(|i| char::from(((packed >> (6 * i)) & 0x3f) as u8 + b'0'))
        .collect()
}

/// The packed error code of a five-character SQLSTATE (the reverse of [`sqlstate_of`]).
pub fn packed_sqlstate(sqlstate: &str) -> i32 {
    sqlstate
        .bytes()
        .take(5)
        .enumerate()
        .map(|(i, c)| (i32::from(c.wrapping_sub(b'0')) & 0x3f) << (6 * i))
        .sum()
}

/// pgrx's own SPI errors (type mismatches, bad ordinals) are bugs on our side, not the
/// caller's: PostgreSQL errors inside SPI are raised directly.
impl From<pgrx::spi::SpiError> for SqlError {
    fn from(e: pgrx::spi::SpiError) -> Self {
        SqlError::new(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("SPI: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_pack_and_unpack() {
        for state in ["57014", "55P03", "P0042", "42501", "XX000"] {
            assert_eq!(sqlstate_of(packed_sqlstate(state)), state);
        }
        assert_eq!(
            packed_sqlstate("55P03"),
            PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE as i32
        );
    }
}
