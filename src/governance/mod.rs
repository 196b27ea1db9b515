//! Resource governance: how a task's workers yield to the production load around them.
//!
//! Between items every worker passes the task's gates (`max_replication_lag`,
//! `max_load`, `pause_when`) and its rate limit (`max_rate`); while a gate is closed it
//! claims nothing and waits, showing the reason in `chunkwise.workers` and
//! `task_status.throttled`. Inside each item `lock_timeout` keeps it from queueing behind
//! OLTP's locks, and with `split_on_timeout` a `[lo, hi)` item that runs past
//! `item_timeout` comes back as two halves. The worker's side of it is
//! `crate::worker::throttle`; the options live in `chunkwise.tasks` and running workers
//! read them again every second, so `alter_task` steers a run under way.

mod load;
pub mod pause_when;
mod rate;

use std::ffi::CString;

use pgrx::spi::SpiHeapTupleData;

use crate::columns::Columns;
use crate::error::SqlResult;

pub use load::load_per_core;
pub use rate::{RateSchedule, SharedRateSchedule, now_micros};

/// The governance options as running workers read them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Governance {
    /// Items per second across the task's workers.
    pub max_rate: Option<f64>,
    /// Most replication lag of any standby, in seconds.
    pub max_replication_lag_secs: Option<f64>,
    /// Most 1-minute load average per core.
    pub max_load: Option<f64>,
    /// The owner's predicate, as the query that evaluates it.
    pub pause_when: Option<String>,
    /// `lock_timeout` inside each item, as a setting's value (`250ms`).
    pub lock_timeout: Option<CString>,
    pub split_on_timeout: bool,
    pub split_min_width: i64,
}

/// The columns `Governance::from_row` reads from `chunkwise.tasks`.
pub const GOVERNANCE_COLUMNS: &str = "max_rate, \
     extract(epoch FROM max_replication_lag)::float8 AS max_replication_lag_secs, max_load, \
     pause_when, (extract(epoch FROM lock_timeout) * 1000)::bigint AS lock_timeout_ms, \
     split_on_timeout, split_min_width";

impl Governance {
    pub fn from_row(row: &SpiHeapTupleData) -> SqlResult<Governance> {
        let pause_when: Option<String> = row.optional("pause_when")?;
        let lock_timeout_ms: Option<i64> = row.optional("lock_timeout_ms")?;
        Ok(Governance {
            max_rate: row.optional("max_rate")?,
            max_replication_lag_secs: row.optional("max_replication_lag_secs")?,
            max_load: row.optional("max_load")?,
            pause_when: pause_when
                .map(|expression| pause_when::query_of(&expression))
                .transpose()?,
            lock_timeout: lock_timeout_ms.map(lock_timeout_setting),
            split_on_timeout: row.required("split_on_timeout")?,
            split_min_width: row.required("split_min_width")?,
        })
    }

    /// Whether any gate is set: only then do workers look at lag, load or the predicate.
    pub fn has_gates(&self) -> bool {
        self.max_replication_lag_secs.is_some()
            || self.max_load.is_some()
            || self.pause_when.is_some()
    }
}

/// The value of the `lock_timeout` setting for `ms` milliseconds (at least 1: 0 would
/// turn it off).
fn lock_timeout_setting(ms: i64) -> CString {
    CString::new(format!("{}ms", ms.max(1))).expect("digits and 'ms' hold no NUL")
}

/// Where a `[lo, hi)` item that timed out splits: its middle, when both halves are at
/// least `min_width` wide; `None` when it is too narrow to split.
pub fn split_point(lo: i64, hi: i64, min_width: i64) -> Option<i64> {
    let width = i128::from(hi) - i128::from(lo);
    let min_width = i128::from(min_width.max(1));
    if width < 2 * min_width {
        return None;
    }
    Some((i128::from(lo) + width / 2) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_in_the_middle_down_to_the_minimum_width() {
        assert_eq!(split_point(0, 100, 1), Some(50));
        assert_eq!(split_point(0, 101, 1), Some(50));
        assert_eq!(split_point(0, 100, 50), Some(50));
        assert_eq!(split_point(0, 99, 50), None);
        assert_eq!(split_point(7, 8, 1), None);
        assert_eq!(split_point(i64::MIN, i64::MAX, 1), Some(-1));
    }
}
