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
        Ranking::new(&gucs::recency_windows(), &gucs::activity_thresholds())
    }

    /// The ranking of `windows` (days, ascending) and `thresholds` (actions, descending),
    /// both comma-separated as the settings hold them.
    pub fn new(windows: &str, thresholds: &str) -> SqlResult<Ranking> {
        let windows = parse_list(windows, "chunkwise.recency_windows")?;
        let thresholds = parse_list(thresholds, "chunkwise.activity_thresholds")?;
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

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_000 * MICROS_PER_DAY;

    fn days_ago(days: i64) -> Option<i64> {
        Some(NOW - days * MICROS_PER_DAY)
    }

    fn default_ranking() -> Ranking {
        Ranking::new("7,30,90", "100,10").unwrap()
    }

    #[test]
    fn recency_tiers_follow_the_windows() {
        let ranking = default_ranking();
        let tiers: Vec<i32> = [0, 7, 8, 30, 31, 90, 91, 900]
            .map(|d| ranking.recency_tier(NOW, days_ago(d)))
            .to_vec();
        assert_eq!(tiers, [1, 1, 2, 2, 3, 3, 4, 4]);
        assert_eq!(ranking.recency_tier(NOW, None), 4, "never active is last");
    }

    #[test]
    fn action_tiers_follow_the_thresholds() {
        let ranking = default_ranking();
        let tiers: Vec<i32> = [Some(101), Some(100), Some(11), Some(10), Some(0), None]
            .map(|a| ranking.action_tier(a))
            .to_vec();
        assert_eq!(tiers, [1, 2, 2, 3, 3, 3]);
    }

    #[test]
    fn recency_comes_before_activity() {
        let ranking = default_ranking();
        // Active yesterday with one action beats a heavy user last seen 20 days ago.
        assert!(
            ranking.tier(NOW, days_ago(1), Some(1)) < ranking.tier(NOW, days_ago(20), Some(1000))
        );
        assert_eq!(ranking.tier(NOW, days_ago(1), Some(1000)), 1);
        assert_eq!(
            ranking.tier(NOW, None, None),
            12,
            "4 recency tiers x 3 action tiers"
        );
    }

    #[test]
    fn prioritise_orders_by_tier_then_actions_then_newest() {
        let ranking = default_ranking();
        let mut entities = [
            Activity {
                key: 1,
                last_activity: None,
                actions: Some(500),
            },
            Activity {
                key: 2,
                last_activity: days_ago(2),
                actions: Some(50),
            },
            Activity {
                key: 3,
                last_activity: days_ago(3),
                actions: Some(50),
            },
            Activity {
                key: 4,
                last_activity: days_ago(1),
                actions: Some(60),
            },
            Activity {
                key: 5,
                last_activity: days_ago(40),
                actions: Some(5000),
            },
            Activity {
                key: 6,
                last_activity: days_ago(1),
                actions: Some(200),
            },
        ];
        let order = ranking.prioritise(NOW, &mut entities);
        let keys: Vec<i64> = order.iter().map(|(key, _)| *key).collect();
        assert_eq!(keys, [6, 4, 2, 3, 5, 1]);
        let priorities: Vec<i64> = order.iter().map(|(_, p)| *p).collect();
        assert!(priorities.windows(2).all(|w| w[0] < w[1]), "{priorities:?}");
        assert_eq!(
            priorities[0] / TIER_SPAN,
            1,
            "the tier reads back from the priority"
        );
    }

    #[test]
    fn bad_settings_are_refused() {
        for (windows, thresholds) in [
            ("30,7", "100,10"),
            ("", "100"),
            ("0,7", "1"),
            ("7,x", "1"),
            ("7", "10,100"),
        ] {
            assert!(
                Ranking::new(windows, thresholds).is_err(),
                "{windows:?} / {thresholds:?}"
            );
        }
    }
}
