//! A target's plan, kept for the worker's life, whose result rows are thrown away as
//! they come: a target that returns two million rows (a `SELECT f(x) FROM big`, an
//! `UPDATE ... RETURNING`) must not hold them all in the worker's memory, as SPI's usual
//! tuple table would, only for the worker to ignore them.

use std::ffi::{CStr, CString};
use std::ptr::NonNull;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::{self, PgOid};

use crate::error::SqlError;
use crate::target::transaction_control_refused;

pub struct DiscardingPlan {
    plan: NonNull<pg_sys::_SPI_plan>,
}

impl DiscardingPlan {
    /// Prepares and keeps `sql`; call with SPI connected. A syntax or name error is
    /// raised as PostgreSQL raises it.
    pub fn prepare(sql: &str, arg_types: &[PgOid]) -> Result<DiscardingPlan, SqlError> {
        let text = CString::new(sql).map_err(|_| refused(pg_sys::SPI_ERROR_ARGUMENT))?;
        let mut types: Vec<pg_sys::Oid> = arg_types.iter().map(|t| t.value()).collect();
        // SAFETY: SPI is connected (the caller's Spi::connect); the text and the types
        // outlive the call, which copies them into the plan.
        let plan =
            unsafe { pg_sys::SPI_prepare(text.as_ptr(), types.len() as i32, types.as_mut_ptr()) };
        let plan = NonNull::new(plan).ok_or_else(|| {
            // SAFETY: SPI_prepare sets SPI_result when it returns NULL.
            refused(unsafe { pg_sys::SPI_result })
        })?;
        // SAFETY: moves the plan under the cache's memory context, out of SPI's, so that
        // it outlives this connection; freed by `drop`.
        unsafe { pg_sys::SPI_keepplan(plan.as_ptr()) };
        Ok(DiscardingPlan { plan })
    }

    /// Runs the plan with `args` (in `$n` order), its rows going nowhere; call with SPI
    /// connected. PostgreSQL's errors are raised; what SPI refuses is returned.
    pub fn execute(&self, args: &[DatumWithOid<'_>]) -> Result<(), SqlError> {
        // SAFETY: a parameter list of args.len() entries in the current memory context,
        // each filled from an argument that outlives the execution below.
        let params = unsafe {
            let params = pg_sys::makeParamList(args.len() as i32);
            let slots = (*params).params.as_mut_slice(args.len());
            for (slot, arg) in slots.iter_mut().zip(args) {
                *slot = pg_sys::ParamExternData {
                    value: arg
                        .datum()
                        .map_or(pg_sys::Datum::from(0), |d| d.sans_lifetime()),
                    isnull: arg.datum().is_none(),
                    pflags: pg_sys::PARAM_FLAG_CONST as u16,
                    ptype: arg.oid(),
                };
            }
            params
        };
        let options = pg_sys::SPIExecuteOptions {
            params,
            read_only: false,
            allow_nonatomic: false,
            must_return_tuples: false,
            tcount: 0,
            // SAFETY: PostgreSQL's receiver that discards every row.
            dest: unsafe { pg_sys::None_Receiver },
            owner: std::ptr::null_mut(),
        };
        // SAFETY: a kept plan, run with SPI connected.
        let code = unsafe { pg_sys::SPI_execute_plan_extended(self.plan.as_ptr(), &options) };
        if code < 0 {
            return Err(refused(code));
        }
        Ok(())
    }
}

impl Drop for DiscardingPlan {
    fn drop(&mut self) {
        // SAFETY: the plan kept by `prepare`, freed once.
        unsafe { pg_sys::SPI_freeplan(self.plan.as_ptr()) };
    }
}

/// What SPI refused to run, as an error for the item.
fn refused(code: i32) -> SqlError {
    if code == pg_sys::SPI_ERROR_TRANSACTION {
        return transaction_control_refused("the task's SQL");
    }
    // SAFETY: SPI_result_code_string returns a static string for any code.
    let name = unsafe { CStr::from_ptr(pg_sys::SPI_result_code_string(code)) };
    SqlError::new(
        pgrx::PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        format!(
            "pg_chunkwise could not run the task's SQL: {}",
            name.to_string_lossy()
        ),
    )
}
