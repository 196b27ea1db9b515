//! Who may do what, and as whom the extension's own bookkeeping runs.
//!
//! The queue tables belong to the extension owner and grant nothing to PUBLIC. The
//! chunkwise.* functions run as their caller (so a caller's planning query and a worker's
//! target run with that role's rights, never more) and switch to the extension owner only
//! around the extension's own fixed SQL on its own tables.

use std::cell::Cell;

use pgrx::prelude::*;

use crate::error::{SqlError, SqlResult};

thread_local! {
    static EXTENSION_OWNER: Cell<Option<pg_sys::Oid>> = const { Cell::new(None) };
}

/// The role that owns the extension (and so its tables).
pub fn extension_owner() -> pg_sys::Oid {
    if let Some(owner) = EXTENSION_OWNER.with(Cell::get) {
        return owner;
    }
    let owner = Spi::get_one::<pg_sys::Oid>(
        "SELECT extowner FROM pg_catalog.pg_extension WHERE extname = 'pg_chunkwise'",
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| {
        SqlError::new(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            "extension \"pg_chunkwise\" is not installed in this database",
        )
        .hint("Run CREATE EXTENSION pg_chunkwise.")
        .raise()
    });
    EXTENSION_OWNER.with(|c| c.set(Some(owner)));
    owner
}

/// Restores the user id and security context saved when it was made.
struct RestoreUser {
    user: pg_sys::Oid,
    context: i32,
}

impl Drop for RestoreUser {
    fn drop(&mut self) {
        // SAFETY: plain assignment of backend-local globals to values read from them earlier
        // in this backend; (sub)transaction abort would restore the same values.
        unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.context) };
    }
}

/// Runs `f` as the extension owner, for the extension's own bookkeeping SQL only. Never
/// call user-supplied SQL or user-defined functions inside `f`.
pub fn as_extension_owner<R>(f: impl FnOnce() -> R) -> R {
    as_role(extension_owner(), f)
}

/// Runs `f` as `role` (as a SECURITY DEFINER function of that role would), restoring the
/// caller's identity afterwards, also on error.
pub fn as_role<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let owner = role;
    let mut user = pg_sys::InvalidOid;
    let mut context = 0;
    // SAFETY: both out-parameters point to live locals.
    unsafe { pg_sys::GetUserIdAndSecContext(&mut user, &mut context) };
    let _restore = RestoreUser { user, context };
    // SAFETY: SECURITY_LOCAL_USERID_CHANGE marks the switch as local, as PostgreSQL does for
    // SECURITY DEFINER functions; `_restore` puts the previous identity back, also on unwind.
    unsafe {
        pg_sys::SetUserIdAndSecContext(owner, context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32)
    };
    f()
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
pub fn ensure_may_manage(task: &str, owner: pg_sys::Oid, action: &str) -> SqlResult<()> {
    // SAFETY: a catalog lookup on two role OIDs; raises no error for unknown roles.
    if unsafe { pg_sys::has_privs_of_role(current_user(), owner) } {
        return Ok(());
    }
    Err(SqlError::new(
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("permission denied to {action} task \"{task}\""),
    )
    .detail(format!(
        "The task is owned by role \"{}\".",
        role_name(owner)
    ))
    .hint("Only the task's owner, a member of the owning role, or a superuser may do this."))
}

/// Workers connect as the task owner, so the owner must exist and be able to log in.
pub fn ensure_owner_can_run(task: &str, owner: pg_sys::Oid) -> SqlResult<()> {
    let can_login = Spi::get_one_with_args::<bool>(
        "SELECT rolcanlogin FROM pg_catalog.pg_roles WHERE oid = $1",
        &[owner.into()],
    )
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
    Spi::get_one_with_args::<bool>(sql, args)
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
