//! The worker's side of resource governance (see `crate::governance`): before each claim
//! it reads the task's options again if a second has passed, passes the gates
//! (`max_replication_lag`, `max_load`, `pause_when`, looked at again at most every
//! second while open) and takes its slots of `max_rate`. While it may not go on, it says
//! why in pg_stat_activity (`chunkwise.workers.throttled`) and sleeps on its latch.

use std::time::{Duration, Instant};

use pgrx::prelude::*;

use super::error::Bookkeeping;
use super::queue::Queue;
use crate::governance::pause_when::{self, Answer};
use crate::governance::{Governance, load_per_core};
use crate::latch;
use crate::transaction::StatementTimer;

/// How often running workers read the task's governance options again: `alter_task`
/// steers a run under way within this.
const REREAD_INTERVAL: Duration = Duration::from_secs(1);
/// How long an open gate's verdict holds before the gates are looked at again, and how
/// long a worker waits before it looks at a closed gate again.
pub const GATE_RECHECK: Duration = Duration::from_secs(1);
/// Longest `pause_when` may run: one that hangs on a lock must not hang the worker.
const PAUSE_WHEN_TIMEOUT_MS: i64 = 10_000;

pub struct Throttle {
    governance: Governance,
    read_at: Option<Instant>,
    /// The gates' last verdict (the reason one is closed) and when it was reached.
    verdict: Option<(Instant, Option<String>)>,
    /// The `pause_when` error last logged: a failing predicate is logged when its error
    /// changes, not every second.
    logged_error: Option<String>,
}

impl Throttle {
    pub fn new() -> Throttle {
        Throttle {
            governance: Governance::default(),
            read_at: None,
            verdict: None,
            logged_error: None,
        }
    }

    /// The options as last read.
    pub fn governance(&self) -> &Governance {
        &self.governance
    }

    /// Whether the next [`reread_if_due`](Self::reread_if_due) or
    /// [`closed_gate`](Self::closed_gate) would look at anything: most steps need
    /// neither, and then no transaction is spent on them.
    ///
    /// A task without gates or rate limit spends nothing here: its options are read
    /// again inside the batch's own transaction (see `reread_if_due`), so a gate set
    /// by `alter_task` holds from the claim after next.
    pub fn due_for_a_look(&self) -> bool {
        let g = &self.governance;
        let reread = (g.has_gates() || g.max_rate.is_some())
            && self
                .read_at
                .is_none_or(|at| at.elapsed() >= REREAD_INTERVAL);
        reread || (g.has_gates() && !self.open_verdict_holds())
    }

    /// Reads the task's options again when `REREAD_INTERVAL` has passed; call inside a
    /// transaction. A task dropped meanwhile keeps the options last read (the claim ends
    /// its run).
    pub fn reread_if_due(&mut self, queue: &Queue, task_id: i32) -> Bookkeeping<()> {
        if self
            .read_at
            .is_some_and(|at| at.elapsed() < REREAD_INTERVAL)
        {
            return Ok(());
        }
        if let Some(governance) = queue.governance(task_id)? {
            if governance != self.governance {
                // New gates are looked at now, not when the old verdict runs out.
                self.verdict = None;
            }
            self.governance = governance;
        }
        self.read_at = Some(Instant::now());
        Ok(())
    }

    /// Why a gate is closed now, or `None` when all are open; call inside a transaction.
    /// An open verdict holds for `GATE_RECHECK`; a closed one is looked at again each
    /// call (the caller waits `GATE_RECHECK` between calls).
    pub fn closed_gate(&mut self, queue: &Queue, task: &str) -> Bookkeeping<Option<String>> {
        if !self.governance.has_gates() {
            return Ok(None);
        }
        if self.open_verdict_holds() {
            return Ok(None);
        }
        let reason = self.look_at_gates(queue, task)?;
        self.verdict = Some((Instant::now(), reason.clone()));
        Ok(reason)
    }

    /// The gates were found open less than `GATE_RECHECK` ago.
    fn open_verdict_holds(&self) -> bool {
        matches!(&self.verdict, Some((at, None)) if at.elapsed() < GATE_RECHECK)
    }

    fn look_at_gates(&mut self, queue: &Queue, task: &str) -> Bookkeeping<Option<String>> {
        let g = &self.governance;
        if let Some(most) = g.max_replication_lag_secs {
            let lag = queue.replication_lag_secs()?;
            if lag > most {
                return Ok(Some(format!(
                    "max_replication_lag (a standby is {lag:.1} s behind, at most {most} s)"
                )));
            }
        }
        if let Some(most) = g.max_load {
            match load_per_core() {
                Ok(load) if load > most => {
                    return Ok(Some(format!(
                        "max_load (load {load:.2} per core, at most {most})"
                    )));
                }
                Ok(_) => {}
                Err(why) => return Ok(Some(format!("max_load ({why})"))),
            }
        }
        if let Some(query) = g.pause_when.clone() {
            return Ok(self.ask_pause_when(&query, task));
        }
        Ok(None)
    }

    /// Runs the owner's predicate as the owner (the worker's own user). An error in it
    /// closes the gate with the error as the reason, logged once per error: a predicate
    /// that cannot say whether to pause must not let the work run over production.
    fn ask_pause_when(&mut self, query: &str, task: &str) -> Option<String> {
        let timer = StatementTimer::arm(Some(PAUSE_WHEN_TIMEOUT_MS));
        let answer = pause_when::evaluate(query);
        drop(timer);
        latch::forget_cancel();
        match answer {
            Ok(Answer::Go) => {
                self.logged_error = None;
                None
            }
            Ok(Answer::Pause) => {
                self.logged_error = None;
                Some("pause_when".to_string())
            }
            Ok(Answer::NotBoolean(_)) => Some("pause_when (it is no longer boolean)".into()),
            Err(raised) => {
                let reason = format!(
                    "pause_when failed [SQLSTATE {}]: {}",
                    raised.sqlstate, raised.message
                );
                if self.logged_error.as_deref() != Some(reason.as_str()) {
                    latch::cancels_held(|| {
                        warning!(
                            "pg_chunkwise task \"{task}\": {reason}; its workers wait until it answers"
                        )
                    });
                    self.logged_error = Some(reason.clone());
                }
                Some(reason)
            }
        }
    }
}
