//! The statuses of an item, as `chunkwise.items.status` holds them: `pending` (waiting
//! for its turn or its retry), `done`, `dead` (out of attempts, blocking its group) and
//! `skipped` (given up by `skip()`). The SQL the extension runs names them through
//! [`item_status!`], so each is spelled once here and a misspelt one does not compile;
//! the table's CHECK constraint in sql/bootstrap.sql lists the same four (a unit test
//! holds them together).

/// An item status as a quoted SQL literal, for `concat!` and `format!`:
/// `item_status!(pending)` is `'pending'`.
macro_rules! item_status {
    (pending) => {
        "'pending'"
    };
    (done) => {
        "'done'"
    };
    (dead) => {
        "'dead'"
    };
    (skipped) => {
        "'skipped'"
    };
}
pub(crate) use item_status;

#[cfg(test)]
mod tests {
    #[test]
    fn the_table_allows_exactly_these_statuses() {
        let bootstrap = include_str!("../sql/bootstrap.sql");
        // The CHECK is an array constant (see bootstrap.sql), the macro's literals unquoted.
        let statuses = [
            item_status!(pending),
            item_status!(done),
            item_status!(dead),
            item_status!(skipped),
        ]
        .map(|quoted| quoted.trim_matches('\''))
        .join(",");
        let check = format!("CHECK (status = ANY ('{{{statuses}}}'::text[]))");
        assert!(bootstrap.contains(&check), "bootstrap.sql has {check}");
    }
}
