//! What the launcher tells a worker, carried as text in `bgw_extra`.

use pgrx::pg_sys;

use crate::always_on::Seat;

/// The database, role, task and run a worker is started for, and its seat when it is a
/// member of an always-on pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerArgs {
    pub database: pg_sys::Oid,
    pub owner: pg_sys::Oid,
    pub task_id: i32,
    pub run_id: i64,
    pub workers: i32,
    /// Its place among the run's workers, from 0 (0 for a pool member): the launcher
    /// waits until each place has joined the run or stopped.
    pub place: i32,
    pub seat: Option<Seat>,
}

impl WorkerArgs {
    pub fn encode(&self) -> String {
        let (pool, member) = self
            .seat
            .map_or((-1, -1), |seat| (seat.pool as i64, seat.member as i64));
        format!(
            "{} {} {} {} {} {} {pool} {member}",
            self.database.to_u32(),
            self.owner.to_u32(),
            self.task_id,
            self.run_id,
            self.workers,
            self.place
        )
    }

    /// The arguments `encode` wrote; `None` for any other text.
    pub fn decode(extra: &str) -> Option<WorkerArgs> {
        let mut parts = extra.split_whitespace();
        let args = WorkerArgs {
            database: pg_sys::Oid::from(parts.next()?.parse::<u32>().ok()?),
            owner: pg_sys::Oid::from(parts.next()?.parse::<u32>().ok()?),
            task_id: parts.next()?.parse().ok()?,
            run_id: parts.next()?.parse().ok()?,
            workers: parts.next()?.parse().ok()?,
            place: parts.next()?.parse().ok().filter(|place| *place >= 0)?,
            seat: match (
                parts.next()?.parse::<i64>().ok()?,
                parts.next()?.parse::<i64>().ok()?,
            ) {
                (-1, -1) => None,
                (pool, member) => Some(Seat::new(
                    usize::try_from(pool).ok()?,
                    usize::try_from(member).ok()?,
                )?),
            },
        };
        parts.next().is_none().then_some(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_reads_what_encode_wrote() {
        let args = WorkerArgs {
            database: pg_sys::Oid::from(16384),
            owner: pg_sys::Oid::from(10),
            task_id: 7,
            run_id: 9_000_000_000,
            workers: 4,
            place: 3,
            seat: None,
        };
        assert_eq!(WorkerArgs::decode(&args.encode()), Some(args));
        let member = WorkerArgs {
            seat: Seat::new(3, 11),
            ..args
        };
        assert_eq!(WorkerArgs::decode(&member.encode()), Some(member));
    }

    #[test]
    fn decode_refuses_other_text() {
        for extra in [
            "",
            "1 2 3 4 5 0",
            "1 2 3 4 5 0 -1 -1 8",
            "1 2 x 4 5 0 -1 -1",
            "-1 2 3 4 5 0 -1 -1",
            "1 2 3 4 5 -1 -1 -1",
            "1 2 3 4 5 0 -2 4",
            "1 2 3 4 5 0 4000 1",
        ] {
            assert_eq!(WorkerArgs::decode(extra), None, "{extra:?}");
        }
    }
}
