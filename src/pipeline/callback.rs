//! `on_success` and `on_failure`: procedures `(task text, run_id bigint, processed bigint,
//! failed bigint, dead bigint)` called once per run when it is over.

use pgrx::prelude::*;

use crate::error::{SqlError, SqlResult};
use crate::raised::RaisedError;
use crate::security::{as_task_owner, ensure_owner_may_execute};
use crate::target::Routine;
use crate::transaction::{OnSuccess, in_subtransaction};

const SIGNATURE_HINT: &str = "A callback is a procedure taking (task text, run_id bigint, \
     processed bigint, failed bigint, dead bigint), which the task's owner may execute.";

/// Checks that `proc` can be the task's `option` (on_success or on_failure).
pub fn ensure_callback(proc: pg_sys::Oid, owner: pg_sys::Oid, option: &str) -> SqlResult<()> {
    let routine = Routine::describe(proc)?;
    let expected = [
        pg_sys::TEXTOID,
        pg_sys::INT8OID,
        pg_sys::INT8OID,
        pg_sys::INT8OID,
        pg_sys::INT8OID,
    ];
    if routine.kind != "p" || routine.arg_types != expected {
        return Err(SqlError::new(
            PgSqlErrorCode::ERRCODE_UNDEFINED_FUNCTION,
            format!(
                "{} cannot be {option}: wrong kind or argument types",
                routine.signature
            ),
        )
        .hint(SIGNATURE_HINT));
    }
    ensure_owner_may_execute(owner, proc)
}

/// What a callback is told about the run.
pub struct RunFigures<'a> {
    pub task: &'a str,
    pub run_id: i64,
    pub processed: i64,
    pub failed: i64,
    pub dead: i64,
}

/// Calls the callback as the task's owner in a subtransaction of the caller's
/// transaction: its effects commit with the run's settling, or an error in it rolls
/// back the callback alone and comes back.
pub fn call(
    proc: pg_sys::Oid,
    owner: pg_sys::Oid,
    figures: &RunFigures,
) -> Result<(), RaisedError> {
    in_subtransaction(OnSuccess::Keep, |_| {
        let routine = Routine::describe(proc)?;
        let sql = format!("CALL {}($1, $2, $3, $4, $5)", routine.qualified_name());
        as_task_owner(owner, || {
            Spi::run_with_args(
                &sql,
                &[
                    figures.task.into(),
                    figures.run_id.into(),
                    figures.processed.into(),
                    figures.failed.into(),
                    figures.dead.into(),
                ],
            )
        })?;
        Ok(())
    })
}
