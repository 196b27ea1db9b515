//! `pause_when`: a boolean SQL expression the task owner writes (business hours, a flag
//! table); while it is true the task's workers claim nothing. It runs as the owner, in a
//! subtransaction rolled back afterwards, and an error in it closes the gate with the
//! error as the reason instead of stopping the workers.

use pgrx::prelude::*;
use pgrx::{PgList, spi};

use crate::error::{SqlError, SqlResult, excerpt};
use crate::raised::RaisedError;
use crate::security::as_task_owner;
use crate::target::parse_raw;
use crate::transaction::{OnSuccess, in_subtransaction};

/// What the expression said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// True: pause.
    Pause,
    /// False or NULL: go on.
    Go,
    /// It is not boolean (its type's oid): only at validation, the worker never runs one.
    NotBoolean(pg_sys::Oid),
}

/// The query that evaluates `expression`, once it is known to be exactly one expression.
/// The closing parenthesis is on a line of its own, so that a trailing `--` comment
/// cannot swallow it.
pub fn query_of(expression: &str) -> SqlResult<String> {
    let query = format!("SELECT ({expression}\n)");
    if is_one_expression(&query)? {
        return Ok(query);
    }
    Err(SqlError::invalid_parameter(format!(
        "pause_when must be a single boolean expression: \"{}\"",
        excerpt(expression)
    ))
    .hint("For example pause_when => 'extract(hour FROM localtime) BETWEEN 9 AND 17' or '(SELECT paused FROM ops.etl_switch)'."))
}

/// Whether `query` (`SELECT (...)`) parses as a plain SELECT of one expression: nothing
/// smuggled around it by closing the parenthesis (a FROM, a second column, a UNION, a
/// second statement).
fn is_one_expression(query: &str) -> SqlResult<bool> {
    let statements = parse_raw(query, "pause_when")?;
    if statements.len() != 1 {
        return Ok(false);
    }
    // SAFETY: the parser's one RawStmt; its statement is a SelectStmt when the tag says
    // so, and every field read is a pointer or plain value of that node.
    let plain = statements.get_ptr(0).is_some_and(|raw| unsafe {
        let node = (*raw).stmt;
        if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_SelectStmt {
            return false;
        }
        let select = &*(node as *const pg_sys::SelectStmt);
        select.op == pg_sys::SetOperation::SETOP_NONE
            && PgList::<pg_sys::Node>::from_pg(select.targetList).len() == 1
            && select.distinctClause.is_null()
            && select.intoClause.is_null()
            && select.fromClause.is_null()
            && select.whereClause.is_null()
            && select.groupClause.is_null()
            && select.havingClause.is_null()
            && select.windowClause.is_null()
            && select.valuesLists.is_null()
            && select.sortClause.is_null()
            && select.limitOffset.is_null()
            && select.limitCount.is_null()
            && select.lockingClause.is_null()
            && select.withClause.is_null()
    });
    Ok(plain)
}

/// Evaluates `query` (from [`query_of`]) as the current user, in a subtransaction rolled
/// back afterwards: what it did, settings it made and locks it took are undone.
pub fn evaluate(query: &str) -> Result<Answer, RaisedError> {
    in_subtransaction(OnSuccess::RollBack, |_| {
        Spi::connect(|client| -> spi::Result<Answer> {
            let table = client.select(query, Some(1), &[])?;
            let type_oid = table.column_type_oid(1)?.value();
            if type_oid != pg_sys::BOOLOID {
                return Ok(Answer::NotBoolean(type_oid));
            }
            let value = table.first().get_one::<bool>()?;
            Ok(if value == Some(true) {
                Answer::Pause
            } else {
                Answer::Go
            })
        })
        .map_err(SqlError::from)
    })
}

/// Checks `pause_when` for `create_task`/`alter_task`: one expression, boolean, and one
/// the owner may run (it is evaluated once, as the owner, and rolled back).
pub fn ensure_valid(expression: &str, owner: pg_sys::Oid) -> SqlResult<()> {
    let query = query_of(expression)?;
    match as_task_owner(owner, || evaluate(&query)) {
        Ok(Answer::Pause | Answer::Go) => Ok(()),
        Ok(Answer::NotBoolean(type_oid)) => Err(SqlError::new(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!(
                "pause_when must be a boolean expression, not {}",
                type_name(type_oid)
            ),
        )
        .hint("Compare it, e.g. pause_when => '(SELECT count(*) FROM ops.incidents) > 0'.")),
        Err(raised) => Err(SqlError::new(
            raised.code(),
            format!(
                "pause_when failed when it was tried as the task's owner: {}",
                raised.message
            ),
        )
        .hint("pause_when runs as the task's owner: grant the owner what it reads, or change the expression.")),
    }
}

fn type_name(type_oid: pg_sys::Oid) -> String {
    Spi::get_one_with_args::<String>("SELECT $1::regtype::text", &[type_oid.into()])
        .ok()
        .flatten()
        .unwrap_or_else(|| format!("type {}", type_oid.to_u32()))
}
