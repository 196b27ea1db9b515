//! `max_rate`: items per second across all workers of a run (or of an always-on pool),
//! paced by one schedule they share: the time the next item may start.
//!
//! It is the "virtual scheduling" form of the generic cell rate algorithm (ATM's traffic
//! shaper): an item may start when the schedule is not in the future, and moves it one
//! interval (1 / max_rate) on. A worker woken late may reclaim at most one missed
//! interval, so that wake-up delays do not lower the rate, while idle time never saves up
//! into a burst. The schedule remembers the rate it was made for: when `alter_task`
//! changes `max_rate`, the first worker to see the new rate starts the schedule afresh,
//! so that a lower rate set long ago holds nobody back after a raise.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Microseconds on a clock all processes of the machine share (CLOCK_MONOTONIC).
pub fn now_micros() -> i64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given; CLOCK_MONOTONIC always exists
    // on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec * 1_000_000 + now.tv_nsec / 1_000
}

/// Microseconds between two items at `rate` items per second.
fn interval_micros(rate: f64) -> f64 {
    1_000_000.0 / rate
}

/// When `items` may start, given the schedule `next` (µs): `Ok(next)` with the schedule
/// moved on when they may start now, or `Err(wait)` with how long until they may.
fn admit(next: i64, now: i64, items: i64, rate: f64) -> Result<i64, Duration> {
    if next > now {
        return Err(Duration::from_micros((next - now) as u64));
    }
    let interval = interval_micros(rate);
    let from = next.max(now - interval as i64);
    Ok(from + (items as f64 * interval) as i64)
}

/// The schedule as a plain value, for shared memory that a lock protects (always-on
/// pools keep theirs in the registry).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateSchedule {
    next: i64,
    rate: f64,
}

impl RateSchedule {
    /// A schedule that lets the first item start at once.
    pub const ZERO: RateSchedule = RateSchedule { next: 0, rate: 0.0 };

    /// Takes `items` slots at `rate` if they may start now; otherwise says how long to
    /// wait before asking again.
    pub fn take(&mut self, now: i64, items: i64, rate: f64) -> Result<(), Duration> {
        if self.rate != rate {
            *self = RateSchedule { next: now, rate };
        }
        self.next = admit(self.next, now, items, rate)?;
        Ok(())
    }

    /// Gives back slots taken for items that were not there (a claim found fewer).
    pub fn give_back(&mut self, items: i64) {
        if self.rate > 0.0 && items > 0 {
            self.next -= (items as f64 * interval_micros(self.rate)) as i64;
        }
    }
}

/// The schedule in atomics, for a run's dynamic shared memory (no lock there).
#[derive(Debug, Default)]
#[repr(C)]
pub struct SharedRateSchedule {
    next: AtomicI64,
    rate_bits: AtomicU64,
}

impl SharedRateSchedule {
    /// [`RateSchedule::take`] for workers taking slots at once.
    pub fn take(&self, now: i64, items: i64, rate: f64) -> Result<(), Duration> {
        if self.rate_bits.swap(rate.to_bits(), Ordering::SeqCst) != rate.to_bits() {
            self.next.store(now, Ordering::SeqCst);
        }
        let mut next = self.next.load(Ordering::SeqCst);
        loop {
            let moved = admit(next, now, items, rate)?;
            match self
                .next
                .compare_exchange(next, moved, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return Ok(()),
                Err(current) => next = current,
            }
        }
    }

    /// [`RateSchedule::give_back`].
    pub fn give_back(&self, items: i64) {
        let rate = f64::from_bits(self.rate_bits.load(Ordering::SeqCst));
        if rate > 0.0 && items > 0 {
            self.next.fetch_sub(
                (items as f64 * interval_micros(rate)) as i64,
                Ordering::SeqCst,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `workers` workers taking one slot each time they may, each waking exactly
    /// when told (plus `late` µs); returns the start times of the first `items` items.
    fn simulate(rate: f64, items: usize, workers: usize, late: i64) -> Vec<i64> {
        let schedule = SharedRateSchedule::default();
        let mut wake = vec![0i64; workers];
        let mut starts = Vec::new();
        while starts.len() < items {
            let (worker, &now) = wake.iter().enumerate().min_by_key(|(_, t)| **t).unwrap();
            match schedule.take(now, 1, rate) {
                Ok(()) => {
                    starts.push(now);
                    wake[worker] = now + 100; // the item takes 0.1 ms
                }
                Err(wait) => wake[worker] = now + wait.as_micros() as i64 + late,
            }
        }
        starts
    }

    #[test]
    fn two_workers_at_200_per_second_take_five_seconds_for_1000_items() {
        let starts = simulate(200.0, 1001, 2, 0);
        let span = (starts[1000] - starts[0]) as f64 / 1e6;
        assert!((span - 5.0).abs() < 0.01, "1000 intervals took {span} s");
    }

    #[test]
    fn late_wake_ups_do_not_lower_the_rate() {
        // Each wake-up half a millisecond late: the schedule keeps its pace.
        let starts = simulate(200.0, 1001, 2, 500);
        let span = (starts[1000] - starts[0]) as f64 / 1e6;
        assert!((span - 5.0).abs() < 0.05, "1000 intervals took {span} s");
    }

    #[test]
    fn idle_time_does_not_save_up_a_burst() {
        let mut schedule = RateSchedule::default();
        assert_eq!(schedule.take(0, 1, 10.0), Ok(()));
        // Ten seconds idle, then two items at once: the second waits.
        assert_eq!(schedule.take(10_000_000, 1, 10.0), Ok(()));
        assert_eq!(schedule.take(10_000_000, 1, 10.0), Ok(()));
        assert!(schedule.take(10_000_000, 1, 10.0).is_err());
    }

    #[test]
    fn a_new_rate_takes_effect_at_once() {
        let mut schedule = RateSchedule::default();
        assert_eq!(schedule.take(0, 1, 0.01), Ok(()));
        // Next slot at 0.01/s is 100 s away; raised to 100/s it is now.
        assert!(schedule.take(1_000, 1, 0.01).is_err());
        assert_eq!(schedule.take(1_000, 1, 100.0), Ok(()));
        let shared = SharedRateSchedule::default();
        assert_eq!(shared.take(0, 1, 0.01), Ok(()));
        assert!(shared.take(1_000, 1, 0.01).is_err());
        assert_eq!(shared.take(1_000, 1, 100.0), Ok(()));
    }

    #[test]
    fn slots_given_back_are_taken_again() {
        let mut schedule = RateSchedule::default();
        assert_eq!(schedule.take(0, 10, 10.0), Ok(()));
        assert!(schedule.take(0, 1, 10.0).is_err());
        schedule.give_back(10);
        assert_eq!(schedule.take(0, 1, 10.0), Ok(()));
    }
}
