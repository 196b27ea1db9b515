//! The scenarios: each builds its workload, injects its fault round after round at a
//! random moment, then finishes the work and reports what it found.

use std::time::Duration;

use postgres::Client;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::harness::{Cluster, one};
use crate::workload::{Behaviour, Outcome, Workload};

const RUN_2: &str = "SELECT * FROM chunkwise.run('bump', 2)";
/// Keys added per round: enough that a fault lands mid-run.
const ROUND_KEYS: i64 = 60;

/// Runs every scenario (or those whose function name contains `only`).
pub fn run_all(seed: u64, rounds: usize, only: Option<&str>) -> Vec<Outcome> {
    let mut rng = StdRng::seed_from_u64(seed);
    type Scenario = Box<dyn Fn(&mut StdRng) -> Outcome>;
    let scenarios: Vec<(&str, Scenario)> = vec![
        (
            "terminate_workers",
            Box::new(move |rng| terminate_workers(rng, 15 * rounds)),
        ),
        (
            "kill_9_a_worker",
            Box::new(move |rng| kill_9_a_worker(rng, 8 * rounds)),
        ),
        (
            "restart_immediate",
            Box::new(move |rng| restart(rng, "immediate", 8 * rounds)),
        ),
        (
            "restart_fast",
            Box::new(move |rng| restart(rng, "fast", 8 * rounds)),
        ),
        (
            "cancel_or_kill_the_caller",
            Box::new(move |rng| cancel_or_kill_the_caller(rng, 10 * rounds)),
        ),
        ("item_timeouts", Box::new(move |_| item_timeouts(rounds))),
        (
            "worker_slots_exhausted",
            Box::new(move |_| worker_slots_exhausted(3 * rounds)),
        ),
        (
            "connections_exhausted",
            Box::new(move |_| connections_exhausted(3 * rounds)),
        ),
        (
            "misbehaving_targets",
            Box::new(move |_| misbehaving_targets(rounds)),
        ),
        ("deadlocks", Box::new(move |_| deadlocks(rounds))),
    ];
    scenarios
        .into_iter()
        .filter(|(name, _)| only.is_none_or(|o| name.contains(o)))
        .map(|(_, scenario)| scenario(&mut rng))
        .collect()
}

/// A random pause before the fault, once the round's run is under way.
fn pause(rng: &mut StdRng) {
    std::thread::sleep(Duration::from_millis(rng.random_range(20..250)));
}

/// Starts a round: new keys, a run in the background, some items done.
fn start_round(
    w: &mut Workload,
    rng: &mut StdRng,
) -> (
    i32,
    postgres::CancelToken,
    std::thread::JoinHandle<Result<postgres::Row, postgres::Error>>,
) {
    w.add_keys(ROUND_KEYS, |_| Behaviour::Plain);
    let before = w.done();
    let spawned = w.spawn(RUN_2);
    w.wait_until_busy(before, 1);
    pause(rng);
    spawned
}

/// Scenario 1: pg_terminate_backend of one worker, or of all: they finish their item and go.
fn terminate_workers(rng: &mut StdRng, rounds: usize) -> Outcome {
    let mut w = Workload::new("fault_terminate", 15, "");
    let mut faults = 0;
    for round in 0..rounds {
        let (_, _, runner) = start_round(&mut w, rng);
        let mut victims = w.live_workers();
        if round % 2 == 0 {
            victims.truncate(1);
        }
        let mut client = w.client();
        for pid in &victims {
            client
                .execute("SELECT pg_terminate_backend($1)", &[pid])
                .unwrap();
            faults += 1;
        }
        runner
            .join()
            .unwrap()
            .expect("run() returns after its workers were terminated");
        w.wait_for_no_workers();
    }
    w.finish("pg_terminate_backend of one or all workers", faults)
}

/// Scenario 2: kill -9 of a worker: the postmaster restarts the whole cluster.
fn kill_9_a_worker(rng: &mut StdRng, rounds: usize) -> Outcome {
    let mut w = Workload::new("fault_kill9", 15, "");
    let mut faults = 0;
    for _ in 0..rounds {
        let (_, _, runner) = start_round(&mut w, rng);
        if let Some(&pid) = w.live_workers().first() {
            // SAFETY: sends SIGKILL to a server process of our own test cluster.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            faults += 1;
        }
        let _ = runner.join().unwrap(); // its session died in the crash restart
        Cluster::get().wait_until_accepting(Duration::from_secs(60));
    }
    let outcome = w.finish("kill -9 of a worker (crash restart)", faults);
    assert!(
        w.runs_in_state("interrupted") > 0,
        "crashed runs show as interrupted"
    );
    outcome
}

/// Scenario 3, 4: pg_ctl stop -m immediate / fast, then start, mid-run.
fn restart(rng: &mut StdRng, mode: &'static str, rounds: usize) -> Outcome {
    let mut w = Workload::new(&format!("fault_stop_{mode}"), 15, "");
    let mut faults = 0;
    for _ in 0..rounds {
        let (_, _, runner) = start_round(&mut w, rng);
        Cluster::get().restart(mode);
        faults += 1;
        let _ = runner.join().unwrap();
    }
    let scenario = if mode == "immediate" {
        "pg_ctl stop -m immediate, start"
    } else {
        "pg_ctl stop -m fast, start"
    };
    w.finish(scenario, faults)
}

/// Scenario 5: The caller of run() is cancelled (statement cancel: the workers stop after their
/// item, the run shows as cancelled) or its session is killed, as when the client goes
/// away (the workers carry on without it).
fn cancel_or_kill_the_caller(rng: &mut StdRng, rounds: usize) -> Outcome {
    let mut w = Workload::new("fault_cancel", 15, "");
    let mut faults = 0;
    for round in 0..rounds {
        let (caller, cancel, runner) = start_round(&mut w, rng);
        if round % 2 == 0 {
            cancel.cancel_query(postgres::NoTls).unwrap();
        } else {
            w.client()
                .execute("SELECT pg_terminate_backend($1)", &[&caller])
                .unwrap();
        }
        faults += 1;
        assert!(runner.join().unwrap().is_err(), "the caller's run() fails");
        w.wait_for_no_workers();
    }
    let outcome = w.finish("run() cancelled, or its session killed", faults);
    assert!(w.runs_in_state("cancelled") > 0);
    outcome
}

/// Scenario 6: item_timeout shorter than some items: they fail with 57014 and retry.
fn item_timeouts(rounds: usize) -> Outcome {
    let mut w = Workload::new("fault_timeout", 2, ", item_timeout => '100 milliseconds'");
    for _ in 0..rounds {
        w.add_keys(80, |k| {
            if k % 4 == 0 {
                Behaviour::SlowFirst
            } else {
                Behaviour::Plain
            }
        });
        w.client().query_one(RUN_2, &[]).unwrap();
    }
    let outcome = w.finish("item_timeout shorter than some items", 0);
    Outcome {
        faults: w.failures_with("57014"),
        ..outcome
    }
}

/// A task of slow items occupying `workers` of the worker slots.
fn hog(client: &mut Client, workers: i32) {
    client
        .query_one("SELECT chunkwise.start('hog', $1)", &[&workers])
        .unwrap();
}

/// Scenario 7: Worker slots taken by another task: fewer workers with a WARNING, then none free:
/// a clear ERROR (53400), and the queue unharmed.
fn worker_slots_exhausted(rounds: usize) -> Outcome {
    let mut w = Workload::new("fault_slots", 2, "");
    let mut client = w.client();
    client
        .batch_execute(
            "CREATE PROCEDURE nap(k bigint) LANGUAGE sql AS 'SELECT pg_sleep(0.5)';
             SELECT chunkwise.create_task('hog', call => 'nap');",
        )
        .unwrap();
    let mut faults = 0;
    for _ in 0..rounds {
        client
            .batch_execute(
                "SELECT chunkwise.plan('hog', 'SELECT generate_series(1, 200)::bigint AS key')",
            )
            .unwrap();
        w.add_keys(ROUND_KEYS, |_| Behaviour::Plain);
        hog(&mut client, 11); // 11 of chunkwise.max_workers = 12
        let row = client
            .query_one("SELECT * FROM chunkwise.run('bump', 4)", &[])
            .unwrap();
        assert!(
            row.get::<_, i64>("processed") > 0,
            "ran with the one free slot"
        );
        faults += 1;
        w.add_keys(ROUND_KEYS, |_| Behaviour::Plain);
        hog(&mut client, 1);
        let busy: i64 = one(
            &mut client,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'chunkwise worker'",
        );
        let setting: String = one(&mut client, "SHOW chunkwise.max_workers");
        let refused = client.query_one("SELECT * FROM chunkwise.run('bump', 4)", &[]);
        let code = refused
            .map_err(|e| e.code().map(|c| c.code().to_string()))
            .map(|r| {
                format!(
                    "ran {} with {busy} busy of {setting}",
                    r.get::<_, i64>("processed")
                )
            })
            .expect_err("no slot free");
        assert_eq!(code.as_deref(), Some("53400"));
        faults += 1;
        client
            .batch_execute("SELECT chunkwise.cancel('hog')")
            .unwrap();
        w.wait_for_no_workers();
    }
    w.finish("worker slots exhausted by another task", faults)
}

/// Scenario 8: Every connection slot taken (max_connections = 8): a run of 8 workers still works,
/// because workers are not client connections.
fn connections_exhausted(rounds: usize) -> Outcome {
    let mut w = Workload::new("fault_connections", 2, "");
    let mut faults = 0;
    for _ in 0..rounds {
        w.add_keys(ROUND_KEYS, |_| Behaviour::Plain);
        let mut runner = w.client();
        let mut hogs = Vec::new();
        let full = loop {
            match postgres::Client::connect(
                &format!(
                    "host={} port={} user=postgres dbname={}",
                    Cluster::get().dir.display(),
                    Cluster::get().port,
                    w.db
                ),
                postgres::NoTls,
            ) {
                Ok(c) => hogs.push(c),
                Err(e) => break e,
            }
            assert!(hogs.len() < 20, "max_connections should stop us");
        };
        assert_eq!(
            full.as_db_error().map(|e| e.code().code()),
            Some("53300"),
            "too many clients: {full}"
        );
        let row = runner
            .query_one("SELECT * FROM chunkwise.run('bump', 8)", &[])
            .unwrap();
        assert_eq!(row.get::<_, i64>("processed"), ROUND_KEYS);
        faults += 1;
        drop(hogs);
    }
    w.finish("max_connections exhausted, 8 workers asked", faults)
}

/// Scenario 9: Targets that end their own backend, leak a session lock, or try to COMMIT.
fn misbehaving_targets(rounds: usize) -> Outcome {
    let mut w = Workload::new("fault_targets", 2, "");
    for _ in 0..rounds {
        w.add_keys(90, |k| match k % 9 {
            0 => Behaviour::TerminateSelf,
            1 => Behaviour::LeakLock,
            2 => Behaviour::CommitFirst,
            _ => Behaviour::TakeLock,
        });
    }
    let outcome = w.finish("targets: terminate own backend, leak a lock, COMMIT", 0);
    let mut client = w.client();
    let misbehaving: i64 = one(
        &mut client,
        "SELECT count(*) FROM behaviour WHERE kind IN ('terminate_self', 'leak_lock')",
    );
    Outcome {
        faults: misbehaving + w.failures_with("2D000"),
        ..outcome
    }
}

/// Scenario 10: Two items that lock the same rows in opposite order: one is the deadlock victim,
/// retried, and both end done.
fn deadlocks(rounds: usize) -> Outcome {
    let mut w = Workload::new("fault_deadlocks", 0, "");
    for _ in 0..rounds {
        w.add_keys(40, |k| {
            if k % 2 == 1 {
                Behaviour::LockAb
            } else {
                Behaviour::LockBa
            }
        });
        w.client().query_one(RUN_2, &[]).unwrap();
    }
    let outcome = w.finish("deadlocks between two items", 0);
    Outcome {
        faults: w.failures_with("40P01"),
        ..outcome
    }
}
