//! Citus interop: an item's effects on worker nodes must commit exactly when its
//! status does.
//!
//! Citus commits a transaction that modified a single worker node with one-phase
//! commit: it sends COMMIT to the node and then commits on the coordinator, even when
//! that COMMIT failed (it only logs "failed to commit transaction on host:port"). A
//! connection lost at that moment leaves the item marked done on the coordinator and
//! its work rolled back on the node: lost. With two-phase commit Citus PREPAREs on the
//! node first (a failure aborts the whole item transaction, so the item is retried),
//! records the prepared transaction in the coordinator's own transaction, and its
//! recovery finishes any COMMIT PREPARED that did not get through. So every item
//! transaction asks Citus for two-phase commit; Citus uses it only on connections
//! that modified something.
//!
//! pg_chunkwise does not link against Citus. Citus is loaded through
//! `shared_preload_libraries`, whose symbols PostgreSQL makes global, so the switch is
//! looked up by name once per worker; without Citus there is none and this does nothing.

use std::sync::OnceLock;

type Use2pc = unsafe extern "C" fn();

fn use_2pc_switch() -> Option<Use2pc> {
    static SWITCH: OnceLock<Option<usize>> = OnceLock::new();
    let address = *SWITCH.get_or_init(|| {
        // SAFETY: dlsym with RTLD_DEFAULT only searches the loaded objects; the name is
        // NUL-terminated.
        let symbol = unsafe {
            libc::dlsym(
                libc::RTLD_DEFAULT,
                c"Use2PCForCoordinatedTransaction".as_ptr(),
            )
        };
        (!symbol.is_null()).then_some(symbol as usize)
    });
    // SAFETY: the address is Citus's `void Use2PCForCoordinatedTransaction(void)`.
    address.map(|a| unsafe { std::mem::transmute::<usize, Use2pc>(a) })
}

/// Makes the current transaction commit its remote modifications, if any, with
/// two-phase commit (Citus resets the flag at the end of every transaction).
pub fn commit_remote_work_with_2pc() {
    if let Some(switch) = use_2pc_switch() {
        // SAFETY: the function only sets a flag of Citus's transaction manager; it takes
        // no arguments and cannot fail.
        unsafe { switch() };
    }
}
