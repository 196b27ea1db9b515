//! `chunkwise.groups.open`: how many of a sequential group's items are pending or dead.
//! A claim passes over groups with none open, so the count must follow every item that
//! enters or leaves those two statuses. Every statement that changes it is built here,
//! from a CTE of the items concerned (columns `task_id`, `group_key`):
//! - planned (a new pending item): [`open_items_of_groups!`];
//! - done, skipped, or dead and purged: [`close_items_of_groups!`].
//!
//! A failed attempt (pending to dead) and `retry()` (dead to pending) leave it alone.

/// An INSERT that counts the items of `$items` (a CTE or subquery with `task_id` and
/// `group_key`) as open in their groups, creating the groups it lacks.
macro_rules! open_items_of_groups {
    ($($items:tt)+) => {
        concat!(
            "INSERT INTO chunkwise.groups AS g (task_id, group_key, open) \
             SELECT task_id, group_key, count(*) FROM ",
            $($items)+,
            " GROUP BY task_id, group_key \
             ON CONFLICT (task_id, group_key) DO UPDATE SET open = g.open + EXCLUDED.open"
        )
    };
}
pub(crate) use open_items_of_groups;

/// An UPDATE that counts the items of `$items` (a CTE or subquery with `task_id` and
/// `group_key`; NULL groups match nothing) as no longer open in their groups.
macro_rules! close_items_of_groups {
    ($($items:tt)+) => {
        concat!(
            "UPDATE chunkwise.groups g SET open = g.open - c.closed \
               FROM (SELECT task_id, group_key, count(*) AS closed FROM ",
            $($items)+,
            " GROUP BY task_id, group_key) c \
              WHERE g.task_id = c.task_id AND g.group_key = c.group_key"
        )
    };
}
pub(crate) use close_items_of_groups;
