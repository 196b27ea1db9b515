//! Pipelines: what follows a run once it is over.
//!
//! Every run is recorded `armed` when its first worker registers it. When it is over
//! (its last worker left, or it was interrupted: no worker of it is alive), one
//! transaction *settles* it: decides its outcome, calls the task's `on_success` or
//! `on_failure` procedure as the task's owner, asks for a cycle of each task in its
//! `then` list when it succeeded (planning them from their `source`), and marks the run
//! `done`. That transaction is the only place a callback's effects can commit, so a
//! callback takes effect exactly once whatever crashes: a worker killed inside it leaves
//! the run armed, and the next settling (the task's next run or `run_cycle`) does it.
//! Asked-for cycles are started after that commit by whoever settled, and the request is
//! taken in the transaction that launches the cycle's workers, so each request starts
//! one run.
//!
//! - [`links`]: `then` and `depends_on`, resolved to task ids and kept free of circles.
//! - [`callback`]: the callbacks' signature and their call.
//! - [`settle`]: settling the runs that are over.
//! - [`downstream`]: the cycles a settled run asked for, and what `depends_on` waits for.

pub mod callback;
pub mod downstream;
pub mod links;
pub mod settle;
