//! What the launcher tells a worker, carried as text in `bgw_extra`.

use pgrx::pg_sys;

/// The database, role, task and run a worker is started for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerArgs {
    pub database: pg_sys::Oid,
    pub owner: pg_sys::Oid,
    pub task_id: i32,
    pub run_id: i64,
    pub workers: i32,
}

impl WorkerArgs {
    pub fn encode(&self) -> String {
        format!(
            "{} {} {} {} {}",
            self.database.to_u32(),
            self.owner.to_u32(),
            self.task_id,
            self.run_id,
            self.workers
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
        };
        assert_eq!(WorkerArgs::decode(&args.encode()), Some(args));
    }

    #[test]
    fn decode_refuses_other_text() {
        for extra in ["", "1 2 3 4", "1 2 3 4 5 6", "1 2 x 4 5", "-1 2 3 4 5"] {
            assert_eq!(WorkerArgs::decode(extra), None, "{extra:?}");
        }
    }
}
