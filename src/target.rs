//! What a worker runs for each item: the task's `call` (a procedure or function) or its
//! `statement`, and the optional `after` statement. Validated once at task creation and
//! turned into parameterised SQL: item values always travel as SPI parameters.

use std::ffi::CString;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::PgOid;
use pgrx::prelude::*;
use pgrx::{JsonB, PgList, spi};

use crate::catalog::Task;
use crate::columns::Columns;
use crate::error::{SqlError, SqlResult};
use crate::security::with_pinned_search_path;

/// The kind of item a target takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemShape {
    /// One entity key: `(bigint)`.
    Key,
    /// A key range `[lo, hi)`: `(bigint, bigint)`.
    Range,
}

/// Parameterised SQL for one item.
#[derive(Debug, Clone)]
pub struct Target {
    pub sql: String,
    /// `None` for statements, which may use `$1` alone or `$1` and `$2`.
    pub shape: Option<ItemShape>,
    pub takes_payload: bool,
}

const SIGNATURE_HINT: &str = "The target must take (bigint) for key items or (bigint, bigint) for \
     [lo, hi) range items, optionally followed by a jsonb payload argument.";

/// A procedure or function as pg_proc describes it.
pub struct Routine {
    schema: String,
    name: String,
    /// `p` procedure, `f` function, `a` aggregate, `w` window function.
    pub kind: String,
    pub arg_types: Vec<pg_sys::Oid>,
    /// `schema.name(argument types)`, as `regprocedure` prints it.
    pub signature: String,
}

impl Routine {
    /// Looks the routine up; one dropped since its OID was taken is an error.
    pub fn describe(proc: pg_sys::Oid) -> SqlResult<Routine> {
        let found = with_pinned_search_path(|| {
            Spi::connect(|client| -> SqlResult<Option<Routine>> {
                let table = client.select(
                    "SELECT n.nspname::text AS schema, p.proname::text AS name, p.prokind::text AS kind, \
                        p.proargtypes::oid[] AS arg_types, p.oid::regprocedure::text AS signature \
                   FROM pg_catalog.pg_proc p \
                   JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
                  WHERE p.oid = $1",
                    Some(1),
                    &[proc.into()],
                )?;
                match table.into_iter().next() {
                    None => Ok(None),
                    Some(row) => Ok(Some(Routine {
                        schema: row.required("schema")?,
                        name: row.required("name")?,
                        kind: row.required("kind")?,
                        arg_types: row.required("arg_types")?,
                        signature: row.required("signature")?,
                    })),
                }
            })
        })?;
        found.ok_or_else(|| {
            SqlError::new(
                PgSqlErrorCode::ERRCODE_UNDEFINED_FUNCTION,
                format!("function with OID {} does not exist", proc.to_u32()),
            )
            .hint("It was dropped; point the task at another with chunkwise.alter_task().")
        })
    }

    /// `"schema"."name"`, each part quoted: safe to splice into SQL.
    pub fn qualified_name(&self) -> String {
        format!(
            "{}.{}",
            spi::quote_identifier(&self.schema),
            spi::quote_identifier(&self.name)
        )
    }
}

impl Target {
    /// A statement (`statement` or `after`): `$1` = key or lo, `$2` = hi, `$3` = payload.
    pub fn for_statement(sql: &str) -> Target {
        Target {
            sql: sql.to_string(),
            shape: None,
            takes_payload: true,
        }
    }

    /// The task's target: its `call` or its `statement`.
    pub fn of_task(task: &Task) -> SqlResult<Target> {
        match (task.call, &task.statement) {
            (Some(proc), _) => Target::for_call(proc),
            (None, Some(sql)) => Ok(Target::for_statement(sql)),
            (None, None) => unreachable!("a task has call or statement (table CHECK)"),
        }
    }

    /// Whether items may be `[lo, hi)` ranges: a `(bigint, bigint)` call or a statement.
    pub fn takes_ranges(&self) -> bool {
        self.shape != Some(ItemShape::Key)
    }

    /// A procedure or function, checked to take one of the supported signatures.
    pub fn for_call(proc: pg_sys::Oid) -> SqlResult<Target> {
        let routine = Routine::describe(proc)?;
        let (arg_types, signature) = (&routine.arg_types, &routine.signature);
        let (shape, takes_payload) = signature_shape(arg_types).ok_or_else(|| {
            SqlError::new(
                PgSqlErrorCode::ERRCODE_UNDEFINED_FUNCTION,
                format!("{signature} cannot be a pg_chunkwise target: wrong argument types"),
            )
            .hint(SIGNATURE_HINT)
        })?;
        let verb = match routine.kind.as_str() {
            "p" => "CALL",
            "f" => "SELECT",
            _ => {
                return Err(SqlError::new(
                    PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
                    format!("{signature} is an aggregate or window function, not a procedure or function"),
                )
                .hint(SIGNATURE_HINT));
            }
        };
        let args = (1..=arg_types.len())
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!("{verb} {}({args})", routine.qualified_name());
        Ok(Target {
            sql,
            shape: Some(shape),
            takes_payload,
        })
    }

    /// SPI argument types, in `$n` order.
    pub fn arg_types(&self) -> Vec<PgOid> {
        let int8 = PgOid::BuiltIn(pg_sys::BuiltinOid::INT8OID);
        let jsonb = PgOid::BuiltIn(pg_sys::BuiltinOid::JSONBOID);
        let mut types = match self.shape {
            Some(ItemShape::Key) => vec![int8],
            Some(ItemShape::Range) | None => vec![int8, int8],
        };
        if self.takes_payload {
            types.push(jsonb);
        }
        types
    }

    /// SPI arguments for one item, matching [`Target::arg_types`].
    pub fn args(
        &self,
        key: i64,
        hi: Option<i64>,
        payload: Option<JsonB>,
    ) -> Vec<DatumWithOid<'static>> {
        let mut args: Vec<DatumWithOid<'static>> = vec![key.into()];
        if self.takes_ranges() {
            args.push(hi.into());
        }
        if self.takes_payload {
            args.push(match payload {
                Some(p) => p.into(),
                None => DatumWithOid::null::<JsonB>(),
            });
        }
        args
    }
}

/// Maps a procedure's argument types to the item shape it accepts.
fn signature_shape(arg_types: &[pg_sys::Oid]) -> Option<(ItemShape, bool)> {
    let int8 = pg_sys::INT8OID;
    let jsonb = pg_sys::JSONBOID;
    match arg_types {
        [a] if *a == int8 => Some((ItemShape::Key, false)),
        [a, p] if *a == int8 && *p == jsonb => Some((ItemShape::Key, true)),
        [a, b] if *a == int8 && *b == int8 => Some((ItemShape::Range, false)),
        [a, b, p] if *a == int8 && *b == int8 && *p == jsonb => Some((ItemShape::Range, true)),
        _ => None,
    }
}

/// The raw parse trees of `sql` (the caller's `what`), as the server's parser makes
/// them; a syntax error is raised as such, a NUL byte refused.
pub fn parse_raw(sql: &str, what: &str) -> SqlResult<PgList<pg_sys::RawStmt>> {
    let text = CString::new(sql).map_err(|_| {
        SqlError::new(
            PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            format!("{what} contains a NUL byte"),
        )
    })?;
    // SAFETY: raw_parser reads the NUL-terminated string and returns a List of RawStmt
    // allocated in the current memory context, or raises a syntax error.
    Ok(unsafe {
        PgList::<pg_sys::RawStmt>::from_pg(pg_sys::raw_parser(
            text.as_ptr(),
            pg_sys::RawParseMode::RAW_PARSE_DEFAULT,
        ))
    })
}

/// Checks that `sql` is exactly one SQL statement, and not transaction control; a syntax
/// error is raised as such.
pub fn ensure_single_statement(sql: &str, what: &str) -> SqlResult<()> {
    let statements = parse_raw(sql, what)?;
    if statements.len() != 1 {
        return Err(SqlError::invalid_parameter(format!(
            "{what} must be exactly one SQL statement, found {}",
            statements.len()
        ))
        .hint("Wrap several statements in a procedure and use call => instead."));
    }
    // SAFETY: the parser's one RawStmt and its statement node.
    let is_transaction_control = statements.get_ptr(0).is_some_and(|raw| unsafe {
        let node = (*raw).stmt;
        !node.is_null() && (*node).type_ == pg_sys::NodeTag::T_TransactionStmt
    });
    if is_transaction_control {
        return Err(transaction_control_refused(what));
    }
    Ok(())
}

/// BEGIN, COMMIT, SAVEPOINT and the like cannot be an item's SQL.
pub fn transaction_control_refused(what: &str) -> SqlError {
    SqlError::new(
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
        format!("{what} cannot be a transaction control statement (BEGIN, COMMIT, SAVEPOINT, ...)"),
    )
    .hint(
        "pg_chunkwise runs each item in a subtransaction of its own and commits it; to catch \
         errors inside an item, use a PL/pgSQL procedure with an EXCEPTION block (call => ...).",
    )
}
