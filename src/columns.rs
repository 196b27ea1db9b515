//! Reading query results by column name, with an unexpected NULL as an error that names
//! the column (never a silent 0 or empty string).

use pgrx::datum::{FromDatum, IntoDatum};
use pgrx::prelude::*;
use pgrx::spi::{SpiError, SpiHeapTupleData};

use crate::error::SqlError;

/// A column that could not be read as the code expects: a bug on our side (the SQL and
/// the code disagree), or a NULL where the schema promises none.
#[derive(Debug, thiserror::Error)]
pub enum ColumnError {
    #[error("column \"{column}\" could not be read: {source}")]
    Unreadable {
        column: &'static str,
        source: SpiError,
    },
    #[error("column \"{0}\" is unexpectedly NULL")]
    Null(&'static str),
}

impl From<ColumnError> for SqlError {
    fn from(e: ColumnError) -> Self {
        SqlError::new(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, e.to_string())
    }
}

/// A result row read by column name.
pub trait Columns {
    /// The value of `column`, which may be NULL.
    fn optional<T: IntoDatum + FromDatum>(
        &self,
        column: &'static str,
    ) -> Result<Option<T>, ColumnError>;

    /// The value of `column`, which must not be NULL.
    fn required<T: IntoDatum + FromDatum>(&self, column: &'static str) -> Result<T, ColumnError> {
        self.optional(column)?.ok_or(ColumnError::Null(column))
    }
}

impl Columns for SpiHeapTupleData<'_> {
    fn optional<T: IntoDatum + FromDatum>(
        &self,
        column: &'static str,
    ) -> Result<Option<T>, ColumnError> {
        self.get_by_name(column)
            .map_err(|source| ColumnError::Unreadable { column, source })
    }
}
