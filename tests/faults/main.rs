//! Fault injection: worker kills, crashes, restarts, cancelled runs, timeouts, exhausted
//! worker slots and connections, and targets that misbehave, each injected again and
//! again at seeded random moments while real runs work. After every scenario the work is
//! finished and checked: every item's effect happened exactly once (no counter at 0 or
//! above 1), nothing is left pending, running or locked.
//!
//! `CHUNKWISE_FAULT_SEED` (default: 1) picks the moments; `CHUNKWISE_FAULT_ROUNDS`
//! (default: 1) multiplies the rounds for a soak; `CHUNKWISE_FAULT_ONLY=name` runs only
//! the scenarios whose name contains it. The report is printed and written to
//! `target/fault-report.md`.

#[path = "../common/harness.rs"]
mod harness;
mod scenarios;
mod workload;

/// The faults' own cluster: few connections (for the "too many clients" scenario), a
/// short deadlock_timeout, crash restarts on.
pub const CLUSTER: harness::ClusterSpec = harness::ClusterSpec {
    name: "pg_chunkwise_faults",
    port: 54_339,
    settings: "max_worker_processes = 24\nmax_connections = 8\nsuperuser_reserved_connections = 0\n\
               fsync = off\nchunkwise.max_workers = 12\ndeadlock_timeout = '100ms'\n\
               restart_after_crash = on\nlog_min_messages = warning\n\
               log_line_prefix = '%m [%p] %b '",
};

#[test]
fn faults_lose_nothing_duplicate_nothing_and_leave_nothing_stuck() {
    let seed: u64 = std::env::var("CHUNKWISE_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let rounds: usize = std::env::var("CHUNKWISE_FAULT_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let only = std::env::var("CHUNKWISE_FAULT_ONLY").ok();
    let outcomes = scenarios::run_all(seed, rounds, only.as_deref());

    let mut report = format!(
        "Fault injection, seed {seed}, {rounds}x rounds\n\n\
         | scenario | faults injected | items | lost | duplicated | stuck |\n|---|---|---|---|---|---|\n"
    );
    for o in &outcomes {
        report += &format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            o.scenario, o.faults, o.items, o.lost, o.duplicated, o.stuck
        );
    }
    let sum = |f: fn(&workload::Outcome) -> i64| outcomes.iter().map(f).sum::<i64>();
    let (faults, items) = (sum(|o| o.faults), sum(|o| o.items));
    let (lost, duplicated, stuck) = (sum(|o| o.lost), sum(|o| o.duplicated), sum(|o| o.stuck));
    report += &format!("| **total** | {faults} | {items} | {lost} | {duplicated} | {stuck} |\n");
    println!("\n{report}");
    let _ = std::fs::write(
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/fault-report.md"),
        &report,
    );
    assert_eq!((lost, duplicated, stuck), (0, 0, 0), "\n{report}");
    if only.is_none() {
        assert!(
            faults >= 100 * rounds as i64,
            "only {faults} faults\n{report}"
        );
    }
}
