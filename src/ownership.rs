//! A task's owner as PostgreSQL itself sees it.
//!
//! Tasks are rows, and a row cannot depend on a role: `DROP ROLE` would succeed and leave
//! tasks whose workers can never connect. So each task has an anchor, a domain
//! `chunkwise."task:<name>"` owned by the task's owner. PostgreSQL records that
//! ownership as a shared dependency, and its own commands do the rest:
//! - `DROP ROLE` of an owner fails, naming the anchor (`owner of type
//!   chunkwise."task:datamart"`);
//! - `REASSIGN OWNED BY old TO new` hands the anchor over, and with it the task: a
//!   task's owner is its anchor's owner (`chunkwise._owner`);
//! - `DROP OWNED BY old` drops the anchor, and the event trigger
//!   `chunkwise_forget_dropped_tasks` drops the task with its queue and history.
//!
//! The anchors live in the extension's schema but are not members of the extension, so
//! pg_dump keeps them with the tasks (whose `anchor` column names them).

use pgrx::prelude::*;
use pgrx::spi::quote_identifier;

use crate::error::SqlResult;
use crate::locks::{TaskLock, lock_task};
use crate::security::{as_extension_owner_with, role_name};

/// Citus would create every anchor on every node: they belong to the coordinator only.
const SETTINGS: &[(&std::ffi::CStr, &std::ffi::CStr)] =
    &[(c"citus.enable_ddl_propagation", c"off")];

/// The anchor's name, quoted and schema-qualified.
fn anchor_name(task: &str) -> String {
    format!("chunkwise.{}", quote_identifier(format!("task:{task}")))
}

/// Creates the anchor of a task just inserted, owned by `owner`, and records it.
pub fn anchor_task(task_id: i32, task: &str, owner: pg_sys::Oid) -> SqlResult<()> {
    let anchor = anchor_name(task);
    as_extension_owner_with(SETTINGS, || -> SqlResult<()> {
        drop_stale_anchor(&anchor)?;
        Spi::run(&format!("CREATE DOMAIN {anchor} AS pg_catalog.bool"))?;
        Spi::run(&format!(
            "COMMENT ON DOMAIN {anchor} IS {}",
            pgrx::spi::quote_literal(format!(
                "Owner of pg_chunkwise task {task}: DROP OWNED drops the task, REASSIGN OWNED hands it over."
            ))
        ))?;
        Spi::run(&format!(
            "ALTER DOMAIN {anchor} OWNER TO {}",
            quote_identifier(role_name(owner))
        ))?;
        Spi::run_with_args(
            "UPDATE chunkwise.tasks SET anchor = $2::pg_catalog.regtype WHERE task_id = $1",
            &[task_id.into(), anchor.as_str().into()],
        )?;
        Ok(())
    })
}

/// Drops an anchor of this name that no task has: one left behind by `DROP EXTENSION`,
/// which drops the tasks table but neither the anchors (not members, on purpose) nor the
/// schema they live in (the control file's schema is no member either). Task names are
/// unique, and this task's row is already in, so such an anchor belongs to nobody; without
/// this, a task could never again have the name of one that lived before a reinstall.
fn drop_stale_anchor(anchor: &str) -> SqlResult<()> {
    let stale = Spi::get_one_with_args::<bool>(
        "SELECT pg_catalog.to_regtype($1) IS NOT NULL",
        &[anchor.into()],
    )?
    .unwrap_or(false);
    if stale {
        notice!(
            "pg_chunkwise: dropping {anchor}, the owner anchor of an earlier task of this name that DROP EXTENSION left behind"
        );
        Spi::run(&format!("DROP DOMAIN {anchor}"))?;
    }
    Ok(())
}

/// Drops the anchor of a task whose rows are gone.
pub fn drop_anchor(task: &str) -> SqlResult<()> {
    let anchor = anchor_name(task);
    as_extension_owner_with(SETTINGS, || {
        Spi::run(&format!("DROP DOMAIN IF EXISTS {anchor}"))
    })?;
    Ok(())
}

/// Takes the definition locks of the tasks whose anchors a `DROP OWNED` (or `DROP
/// DOMAIN`) is dropping, as drop_task does for its task, before the event trigger
/// `chunkwise._forget_dropped_tasks` deletes them: it waits for the transactions that
/// enqueue into them (see `task_cache`), whose items it would otherwise miss and leave
/// behind without a task. In task id order, so two such drops cannot deadlock.
/// Executable by the extension owner only (the trigger's function runs as it).
#[pg_extern(name = "_lock_task_definitions", volatile, parallel_unsafe)]
fn lock_task_definitions(task_ids: Vec<i32>) {
    let mut task_ids = task_ids;
    task_ids.sort_unstable();
    task_ids.dedup();
    for task_id in task_ids {
        lock_task(task_id, TaskLock::Changes);
    }
}

extension_sql!(
    "REVOKE ALL ON FUNCTION chunkwise._lock_task_definitions(int[]) FROM PUBLIC;",
    name = "lock_task_definitions_revoked",
    requires = [lock_task_definitions]
);
