//! SQL arguments of the OID alias types (`regproc`, `regclass`): PostgreSQL resolves the
//! caller's name to an OID before the function runs, so a typo is its error, not ours.

use pgrx::callconv::{Arg, ArgAbi};
use pgrx::nullable::Nullable;
use pgrx::prelude::*;

/// Declares a newtype over `pg_sys::Oid` that pgrx passes as the given SQL type.
macro_rules! oid_alias_type {
    ($(#[$doc:meta])* $name:ident, $sql:literal, $type_oid:path) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy)]
        pub struct $name(pub pg_sys::Oid);

        impl FromDatum for $name {
            unsafe fn from_polymorphic_datum(
                datum: pg_sys::Datum,
                is_null: bool,
                _: pg_sys::Oid,
            ) -> Option<Self> {
                // SAFETY: OID alias types are OIDs passed by value.
                unsafe { pg_sys::Oid::from_polymorphic_datum(datum, is_null, pg_sys::OIDOID) }
                    .map($name)
            }
        }

        impl IntoDatum for $name {
            fn into_datum(self) -> Option<pg_sys::Datum> {
                self.0.into_datum()
            }
            fn type_oid() -> pg_sys::Oid {
                $type_oid
            }
        }

        impl_sql_translatable!($name, $sql);

        // SAFETY: unboxed with the FromDatum impl above, as pgrx does for its own OID types.
        unsafe impl<'fcx> ArgAbi<'fcx> for $name {
            unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
                // SAFETY: the caller guarantees a non-NULL argument.
                unsafe { arg.unbox_arg_using_from_datum() }
                    .expect(concat!("a non-NULL ", $sql, " argument"))
            }

            unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
                // SAFETY: an argument of this type, NULL or not.
                unsafe { arg.unbox_arg_using_from_datum::<$name>() }.into()
            }
        }
    };
}

oid_alias_type!(
    /// A `regproc` argument: a procedure's OID.
    RegProc,
    "regproc",
    pg_sys::REGPROCOID
);

oid_alias_type!(
    /// A `regclass` argument: a relation's OID.
    RegClass,
    "regclass",
    pg_sys::REGCLASSOID
);
