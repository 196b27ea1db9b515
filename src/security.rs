//! Who may do what, and as whom the extension's own bookkeeping runs.
//!
//! The queue tables belong to the extension owner and grant nothing to PUBLIC. The
//! chunkwise.* functions run as their caller (so a caller's planning query and a worker's
//! target run with that role's rights, never more) and switch to the extension owner only
//! around the extension's own fixed SQL on its own tables.

use std::cell::Cell;
use std::ffi::CStr;

use pgrx::prelude::*;

use crate::error::{SqlError, SqlResult};
use crate::transaction::{GucScope, SavedIdentity};

thread_local! {
    static EXTENSION_OWNER: Cell<Option<pg_sys::Oid>> = const { Cell::new(None) };
}

/// The search_path of every statement the extension itself runs: nothing a caller or a
/// task owner creates can stand before the built-in functions and operators, and pg_temp
/// comes last, where it is searched for relations only (never for functions or operators).
const PINNED_SEARCH_PATH: &CStr = c"pg_catalog, pg_temp";

/// A GUC nest level of its own with the pinned search_path, undone when it is dropped.
fn pinned_scope() -> GucScope {
    let scope = GucScope::new();
    scope.set(c"search_path", PINNED_SEARCH_PATH);
    scope
}

/// The role that owns the extension (and so its tables). Refuses to go on when the
/// extension's objects in this database are of another version than this library: after
/// a package upgrade, until `ALTER EXTENSION pg_chunkwise UPDATE`, the library would work
/// on tables it does not know.
pub fn extension_owner() -> pg_sys::Oid {
    if let Some(owner) = EXTENSION_OWNER.with(Cell::get) {
        return owner;
    }
    let found = with_pinned_search_path(|| {
        Spi::get_two::<pg_sys::Oid, String>(
            "SELECT extowner, extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_chunkwise'",
        )
    });
    let Ok((Some(owner), Some(version))) = found else {
        SqlError::new(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            "extension \"pg_chunkwise\" is not installed in this database",
        )
        .hint("Run CREATE EXTENSION pg_chunkwise.")
        .raise()
    };
    let library = env!("CARGO_PKG_VERSION");
    if version != library {
        SqlError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "the pg_chunkwise library is version {library}, but this database has the extension at version {version}"
            ),
        )
        .detail("pg_chunkwise leaves its tables alone until the extension is updated.")
        .hint("Run ALTER EXTENSION pg_chunkwise UPDATE (once the runs under way have finished).")
        .raise()
    }
    EXTENSION_OWNER.with(|c| c.set(Some(owner)));
    owner
}

/// Runs the extension's own fixed SQL with the pinned search_path, as whoever is the
/// current user (catalog reads, privilege checks).
pub fn with_pinned_search_path<R>(f: impl FnOnce() -> R) -> R {
    let scope = pinned_scope();
    let result = f();
    drop(scope);
    result
}

/// Runs `f` as the extension owner, for the extension's own fixed SQL on its own tables
/// only, with the pinned search_path in a GUC nest level of its own (as a SECURITY
/// DEFINER function with `SET search_path = pg_catalog, pg_temp` would). Never call
/// user-supplied SQL or user-defined functions inside `f`.
pub fn as_extension_owner<R>(f: impl FnOnce() -> R) -> R {
    as_extension_owner_with(&[], f)
}

/// [`as_extension_owner`] with further `(name, value)` settings in the same nest level.
pub fn as_extension_owner_with<R>(settings: &[(&CStr, &CStr)], f: impl FnOnce() -> R) -> R {
    let _identity =
        SavedIdentity::switch_to(extension_owner(), pg_sys::SECURITY_LOCAL_USERID_CHANGE);
    let scope = pinned_scope();
    for (name, value) in settings {
        scope.set(name, value);
    }
    let result = f();
    drop(scope);
    result
}

/// Runs a task owner's own SQL (its `source`) in the caller's session as the owner:
/// with the owner's rights, never the caller's, inside a GUC nest level so that settings
/// it makes die with it. When the caller is someone else, it is also a
/// security-restricted operation (as VACUUM and REFRESH MATERIALIZED VIEW run their
/// owner's code): it cannot leave temporary objects, prepared state or a role behind in
/// the caller's session.
pub fn as_task_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let restricted = if owner == current_user() {
        0
    } else {
        pg_sys::SECURITY_RESTRICTED_OPERATION
    };
    let _identity =
        SavedIdentity::switch_to(owner, pg_sys::SECURITY_LOCAL_USERID_CHANGE | restricted);
    let scope = GucScope::new();
    let result = f();
    drop(scope);
    result
}

pub fn current_user() -> pg_sys::Oid {
    // SAFETY: reads a backend-local global.
    unsafe { pg_sys::GetUserId() }
}

pub fn role_name(role: pg_sys::Oid) -> String {
    // SAFETY: with noerr = true this returns NULL for an unknown role instead of raising.
    let name = unsafe { pg_sys::GetUserNameFromId(role, true) };
    if name.is_null() {
        format!("role with OID {}", role.to_u32())
    } else {
        // SAFETY: a non-NULL result is a palloc'd NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    }
}

/// The caller may manage a task when it has the privileges of the task's owner role
/// (is the owner, a member of it, or a superuser).
pub fn may_manage(owner: pg_sys::Oid) -> bool {
    // SAFETY: a catalog lookup on two role OIDs; raises no error for unknown roles.
    unsafe { pg_sys::has_privs_of_role(current_user(), owner) }
}

/// The caller may see a task (in the views, in error messages) when it may manage it or
/// is a member of pg_monitor: the rule of `chunkwise._visible`.
pub fn may_see(owner: pg_sys::Oid) -> bool {
    // SAFETY: as in `may_manage`.
    may_manage(owner)
        || unsafe {
            pg_sys::has_privs_of_role(current_user(), pg_sys::Oid::from(pg_sys::ROLE_PG_MONITOR))
        }
}

/// The refusal of an action on a task the caller may see but not manage.
pub fn permission_denied(task: &str, owner: pg_sys::Oid, action: &str) -> SqlError {
    SqlError::new(
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("permission denied to {action} task \"{task}\""),
    )
    .detail(format!(
        "The task is owned by role \"{}\".",
        role_name(owner)
    ))
    .hint("Only the task's owner, a member of the owning role, or a superuser may do this.")
}

/// Workers connect as the task owner, so the owner must exist and be able to log in.
pub fn ensure_owner_can_run(task: &str, owner: pg_sys::Oid) -> SqlResult<()> {
    let can_login = with_pinned_search_path(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT rolcanlogin FROM pg_catalog.pg_roles WHERE oid = $1",
            &[owner.into()],
        )
    })
    .ok()
    .flatten();
    match can_login {
        Some(true) => ensure_owner_may_connect(task, owner),
        Some(false) => Err(SqlError::new(
            PgSqlErrorCode::ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
            format!(
                "owner \"{}\" of task \"{task}\" cannot log in",
                role_name(owner)
            ),
        )
        .detail("pg_chunkwise workers connect as the task's owner.")
        .hint("Create or own the task as a role with LOGIN, or ALTER ROLE ... LOGIN.")),
        None => Err(SqlError::new(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("owner of task \"{task}\" no longer exists"),
        )
        .hint("Drop the task and create it again as an existing role.")),
    }
}

/// Whether a `has_*_privilege` check (`sql`, with `args`) says yes; an unknown role or
/// object counts as no.
fn privilege_granted(sql: &str, args: &[pgrx::datum::DatumWithOid]) -> bool {
    with_pinned_search_path(|| Spi::get_one_with_args::<bool>(sql, args))
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Workers connect to this database as the owner: it needs the CONNECT privilege.
fn ensure_owner_may_connect(task: &str, owner: pg_sys::Oid) -> SqlResult<()> {
    if privilege_granted(
        "SELECT pg_catalog.has_database_privilege($1, pg_catalog.current_database(), 'CONNECT')",
        &[owner.into()],
    ) {
        return Ok(());
    }
    Err(SqlError::new(
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!(
            "owner \"{}\" of task \"{task}\" may not connect to this database",
            role_name(owner)
        ),
    )
    .detail("pg_chunkwise workers connect as the task's owner.")
    .hint("GRANT CONNECT ON DATABASE ... TO the owner."))
}

/// Workers call the target as the task owner: the owner needs EXECUTE on it.
pub fn ensure_owner_may_execute(owner: pg_sys::Oid, proc: pg_sys::Oid) -> SqlResult<()> {
    if privilege_granted(
        "SELECT pg_catalog.has_function_privilege($1, $2, 'EXECUTE')",
        &[owner.into(), proc.into()],
    ) {
        return Ok(());
    }
    Err(SqlError::new(
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        "the task owner may not execute the target procedure",
    )
    .hint("GRANT EXECUTE on it to the role creating the task; workers run as that role."))
}
