//! The plans of the extension's hottest fixed statements (the task lookup, enqueue's
//! insert), prepared once per backend and kept (`SPI_keepplan`), instead of parsed,
//! analysed and planned again by every call: an enqueue from a trigger runs once per
//! row changed.
//!
//! Only the extension's own constant SQL is kept (keyed by the `&'static str` itself),
//! always run with the pinned search_path it was prepared with. PostgreSQL's plan cache
//! re-plans a kept plan when a table or function it uses changes (ALTER EXTENSION
//! UPDATE, a dropped and re-created extension), and checks privileges at every
//! execution, as the current user.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::PgOid;
use pgrx::datum::{DatumWithOid, FromDatum, IntoDatum};
use pgrx::spi::{OwnedPreparedStatement, Spi, SpiClient, SpiResult};

thread_local! {
    static KEPT: RefCell<HashMap<&'static str, Rc<OwnedPreparedStatement>>> =
        RefCell::new(HashMap::new());
}

/// Whether the statement only reads (`Reads`) or also writes (`Writes`): SPI runs a
/// read-only plan with the snapshot of the calling statement.
#[derive(Clone, Copy)]
pub enum Access {
    Reads,
    Writes,
}

/// The kept plan of `sql` with parameters of `types`, prepared on first use.
pub fn kept(
    client: &SpiClient<'_>,
    sql: &'static str,
    types: &[PgOid],
    access: Access,
) -> SpiResult<Rc<OwnedPreparedStatement>> {
    if let Some(plan) = KEPT.with(|kept| kept.borrow().get(sql).cloned()) {
        return Ok(plan);
    }
    let prepared = match access {
        Access::Reads => client.prepare(sql, types)?,
        Access::Writes => client.prepare_mut(sql, types)?,
    };
    let plan = Rc::new(prepared.keep());
    KEPT.with(|kept| kept.borrow_mut().insert(sql, plan.clone()));
    Ok(plan)
}

/// Runs the kept plan of the writing statement `sql` with `args` and returns the first
/// column of its first row.
pub fn write_returning<T: FromDatum + IntoDatum>(
    sql: &'static str,
    types: &[PgOid],
    args: &[DatumWithOid],
) -> SpiResult<Option<T>> {
    Spi::connect_mut(|client| {
        let plan = kept(client, sql, types, Access::Writes)?;
        client.update(&*plan, None, args)?.first().get_one::<T>()
    })
}
