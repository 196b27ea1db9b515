//! What can go wrong in the worker's own bookkeeping: which statement, and why.

use pgrx::spi::SpiError;

use crate::columns::ColumnError;
use crate::error::SqlError;
use crate::raised::RaisedError;

/// Why one of the worker's own statements on the queue tables failed.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    /// PostgreSQL raised an ERROR: a deadlock with a DBA's statement, a lock or statement
    /// timeout from the owner's settings, a full disk. The step is rolled back and retried.
    #[error("{}", .0.message)]
    Raised(RaisedError),
    /// pgrx could not run the statement or read its result: the SQL and the code disagree.
    #[error("{0}")]
    Spi(#[from] SpiError),
    #[error("{0}")]
    Column(#[from] ColumnError),
    /// The statement found no row where one must be (the claimed item, say).
    #[error("it found no row")]
    NoRow,
}

/// What the extension's own checks refused while reading bookkeeping (a stored option
/// that no longer parses, say), as an ERROR of that code would be.
impl From<SqlError> for Cause {
    fn from(refused: SqlError) -> Self {
        Cause::Raised(RaisedError::from(refused))
    }
}

/// An error in the worker's bookkeeping: which statement, and why.
#[derive(Debug, thiserror::Error)]
#[error("{statement}: {cause}")]
pub struct BookkeepingError {
    pub statement: &'static str,
    pub cause: Cause,
}

impl BookkeepingError {
    pub fn new(statement: &'static str, cause: impl Into<Cause>) -> Self {
        BookkeepingError {
            statement,
            cause: cause.into(),
        }
    }

    /// The SQLSTATE of the log line: the one raised, or XX000 for our own errors.
    pub fn sqlstate(&self) -> &str {
        match &self.cause {
            Cause::Raised(raised) => &raised.sqlstate,
            _ => "XX000",
        }
    }
}

pub type Bookkeeping<T> = Result<T, BookkeepingError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bookkeeping_error_names_its_statement_and_cause() {
        let raised = BookkeepingError::new(
            "mark done",
            Cause::Raised(RaisedError::new("40P01", "deadlock detected")),
        );
        assert_eq!(raised.sqlstate(), "40P01");
        assert_eq!(raised.to_string(), "mark done: deadlock detected");
        let missing = BookkeepingError::new("record failure", Cause::NoRow);
        assert_eq!(missing.sqlstate(), "XX000");
        assert_eq!(missing.to_string(), "record failure: it found no row");
    }
}
