//! The activity-recency ranking behind `plan_by_activity` and `activity_tier`:
//! recency tier (active within 7 / 30 / 90 days, then older or never), then activity
//! tier (more than 100 / more than 10 actions, then the rest), then actions descending,
//! then last activity descending with "never" last. Windows and thresholds are GUCs.

use std::cmp::Ordering;

use crate::error::{SqlError, SqlResult};
use crate::gucs;

const MICROS_PER_DAY: i64 = 86_400 * 1_000_000;

/// Items planned by activity get `priority = tier * TIER_SPAN + rank`, so the tier can be
/// read back from a priority and ranks never spill into the next tier.
pub const TIER_SPAN: i64 = 1_000_000_000_000;

#[derive(Debug, Clone)]
pub struct Ranking {
    /// Recency windows in microseconds, ascending.
    windows: Vec<i64>,
    /// Action thresholds, descending.
    thresholds: Vec<i64>,
}

/// One entity to rank: its key, last activity (PostgreSQL microseconds) and action count.
#[derive(Debug, Clone, Copy)]
pub struct Activity {
    pub key: i64,
    pub last_activity: Option<i64>,
    pub actions: Option<i64>,
}

impl Ranking {
    /// The ranking as the current settings define it.
    pub fn from_settings() -> SqlResult<Ranking> {
        let windows = parse_list(&gucs::recency_windows(), "chunkwise.recency_windows")?;
        let thresholds = parse_list(
            &gucs::activity_thresholds(),
            "chunkwise.activity_thresholds",
        )?;
        if windows.is_empty() || !windows.windows(2).all(|w| w[0] < w[1]) || windows[0] <= 0 {
            return Err(SqlError::invalid_parameter(
                "chunkwise.recency_windows must be positive day counts in ascending order",
            )
            .hint("For example: SET chunkwise.recency_windows = '7,30,90'."));
        }
        if !thresholds.windows(2).all(|w| w[0] > w[1]) {
            return Err(SqlError::invalid_parameter(
                "chunkwise.activity_thresholds must be action counts in descending order",
            )
            .hint("For example: SET chunkwise.activity_thresholds = '100,10'."));
        }
        Ok(Ranking {
            windows: windows.into_iter().map(|d| d * MICROS_PER_DAY).collect(),
            thresholds,
        })
    }

    fn activity_tiers(&self) -> i32 {
        self.thresholds.len() as i32 + 1
    }

    /// 1 = active within the first window, ..., last = older than every window or never.
    pub fn recency_tier(&self, now: i64, last_activity: Option<i64>) -> i32 {
        let Some(seen) = last_activity else {
            return self.windows.len() as i32 + 1;
        };
        let age = now.saturating_sub(seen);
        self.windows
            .iter()
            .position(|&w| age <= w)
            .unwrap_or(self.windows.len()) as i32
            + 1
    }

    /// 1 = more actions than the first threshold, ..., last = the rest (or unknown).
    pub fn action_tier(&self, actions: Option<i64>) -> i32 {
        let actions = actions.unwrap_or(0);
        self.thresholds
            .iter()
            .position(|&t| actions > t)
            .unwrap_or(self.thresholds.len()) as i32
            + 1
    }

    /// The combined tier: recency first, activity within it; 1 is the most urgent.
    pub fn tier(&self, now: i64, last_activity: Option<i64>, actions: Option<i64>) -> i32 {
        (self.recency_tier(now, last_activity) - 1) * self.activity_tiers()
            + self.action_tier(actions)
    }

    /// Sorts entities into processing order and returns each with its priority.
    pub fn prioritise(&self, now: i64, entities: &mut [Activity]) -> Vec<(i64, i64)> {
        let mut keyed: Vec<(i32, &Activity)> = entities
            .iter()
            .map(|e| (self.tier(now, e.last_activity, e.actions), e))
            .collect();
        keyed.sort_by(|(ta, a), (tb, b)| {
            ta.cmp(tb)
                .then_with(|| b.actions.unwrap_or(0).cmp(&a.actions.unwrap_or(0)))
                .then_with(|| newest_first(a.last_activity, b.last_activity))
        });
        keyed
            .iter()
            .enumerate()
            .map(|(rank, (tier, e))| (e.key, i64::from(*tier) * TIER_SPAN + rank as i64))
            .collect()
    }
}

/// Descending by time, with "never" after every real time.
fn newest_first(a: Option<i64>, b: Option<i64>) -> Ordering {
    match (a, b) {
        (Some(a), Some(b)) => b.cmp(&a),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

fn parse_list(text: &str, guc: &str) -> SqlResult<Vec<i64>> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<i64>().map_err(|_| {
                SqlError::invalid_parameter(format!("invalid value \"{s}\" in {guc}"))
                    .hint("Use a comma-separated list of whole numbers.")
            })
        })
        .collect()
}
