//! The state a run's launcher and workers share: a small dynamic shared memory segment
//! with atomic counters. It makes `max_items` exact across workers without a lock, lets
//! the launcher report progress without querying the queue, carries the cancel flag, and
//! tells the last worker out that it should announce the end of the run.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, Ordering};

use pgrx::pg_sys;

use crate::governance::SharedRateSchedule;
use crate::gucs::MAX_WORKERS_LIMIT;

/// Words of the bitmap of the places that joined a run (one bit per possible worker).
const JOINED_WORDS: usize = (MAX_WORKERS_LIMIT as usize).div_ceil(64);

/// What happened to one attempt at an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Done,
    /// Failed, with a retry scheduled.
    Failed,
    /// Timed out and split in two (`split_on_timeout`): no attempt charged.
    Split,
    /// Failed for the last time: the item is dead.
    Died,
}

/// Counts of attempts: a worker keeps its own, the run keeps the sum in shared memory.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub processed: i64,
    pub failed: i64,
    pub dead: i64,
}

impl Tally {
    /// What was counted since `earlier`, a copy of this tally taken before.
    pub fn since(&self, earlier: &Tally) -> Tally {
        Tally {
            processed: self.processed - earlier.processed,
            failed: self.failed - earlier.failed,
            dead: self.dead - earlier.dead,
        }
    }

    pub fn record(&mut self, attempt: Attempt) {
        match attempt {
            Attempt::Done => self.processed += 1,
            Attempt::Failed => self.failed += 1,
            Attempt::Died => {
                self.failed += 1;
                self.dead += 1;
            }
            Attempt::Split => {}
        }
    }
}

/// A few words one process writes as a whole and others read as a whole, without a
/// lock (a sequence lock): the sequence is odd while a write is under way, and a reader
/// takes the words only when it read the same even sequence before and after them.
#[repr(C)]
struct Versioned<const N: usize> {
    sequence: AtomicU64,
    words: [AtomicI64; N],
}

/// Reads that find a write under way this many times in a row give up (the writer was
/// taken off the CPU mid-write): the caller treats the words as unknown for now.
const VERSIONED_READ_TRIES: usize = 64;

impl<const N: usize> Versioned<N> {
    const fn new() -> Versioned<N> {
        Versioned {
            sequence: AtomicU64::new(0),
            words: [const { AtomicI64::new(0) }; N],
        }
    }

    /// The words and the sequence they were read at (0: never written).
    fn read(&self) -> Option<(u64, [i64; N])> {
        for _ in 0..VERSIONED_READ_TRIES {
            let before = self.sequence.load(Ordering::SeqCst);
            if before.is_multiple_of(2) {
                let words = std::array::from_fn(|i| self.words[i].load(Ordering::SeqCst));
                if self.sequence.load(Ordering::SeqCst) == before {
                    return Some((before, words));
                }
            }
            std::hint::spin_loop();
        }
        None
    }

    /// Writes the words if nobody wrote since sequence `seen` was read; false otherwise.
    fn write_if_unchanged(&self, seen: u64, words: [i64; N]) -> bool {
        if !seen.is_multiple_of(2)
            || self
                .sequence
                .compare_exchange(seen, seen + 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
        {
            return false;
        }
        for (word, value) in self.words.iter().zip(words) {
            word.store(value, Ordering::SeqCst);
        }
        self.sequence.store(seen + 2, Ordering::SeqCst);
        true
    }

    /// Writes the words (one writer: the owner of the words).
    fn write(&self, words: [i64; N]) {
        while let Some((seen, _)) = self.read() {
            if self.write_if_unchanged(seen, words) {
                return;
            }
        }
    }
}

/// A stretch of the queue one worker of a run reserved for itself: the positions
/// (priority, item_id) after `start`, up to and with `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lane {
    pub start: (i64, i64),
    pub end: (i64, i64),
}

#[repr(C)]
pub struct RunState {
    /// Most items the run may claim; 0 = no limit.
    max_items: i64,
    claimed: AtomicI64,
    processed: AtomicI64,
    failed: AtomicI64,
    dead: AtomicI64,
    workers_attached: AtomicI32,
    /// Which places (`WorkerArgs::place`) have joined, for the launcher's wait.
    joined: [AtomicU64; JOINED_WORDS],
    /// Workers the launcher got going; i32::MAX until it knows.
    workers_launched: AtomicI32,
    workers_exited: AtomicI32,
    /// Workers that left because their bookkeeping kept failing (also in workers_exited).
    workers_gave_up: AtomicI32,
    /// The item the worker at each place holds (0: none). A claim passes over the
    /// items other workers hold without trying to lock them (see `Queue::claim`).
    holding: [AtomicI64; MAX_WORKERS_LIMIT as usize],
    /// The queue position (priority, item_id) of the last item the worker at each place
    /// claimed (see `reach`): a claim starts after the furthest any other worker got.
    reached: [Versioned<2>; MAX_WORKERS_LIMIT as usize],
    /// Where the last lane handed out ends (see `advance_lane_frontier`): (priority, item).
    lane_frontier: Versioned<2>,
    /// The lane the worker at each place works in: (1, start, end) or (0, ..): none.
    lanes: [Versioned<5>; MAX_WORKERS_LIMIT as usize],
    /// A run with `max_items`: the position (priority, item) of its `max_items`-th due
    /// pending item when its first lane was handed out; no claim of the run goes past it
    /// (see `fix_limit_bound`).
    limit_bound: Versioned<2>,
    /// Set by whoever announces the end of the run (NOTIFY), so that it is announced once.
    finish_announced: AtomicBool,
    cancel: AtomicBool,
    /// When the run's next item may start under `max_rate`.
    pub rate: SharedRateSchedule,
}

impl RunState {
    fn new(max_items: Option<i64>) -> RunState {
        RunState {
            max_items: max_items.unwrap_or(0),
            claimed: AtomicI64::new(0),
            processed: AtomicI64::new(0),
            failed: AtomicI64::new(0),
            dead: AtomicI64::new(0),
            workers_attached: AtomicI32::new(0),
            joined: [const { AtomicU64::new(0) }; JOINED_WORDS],
            workers_launched: AtomicI32::new(i32::MAX),
            workers_exited: AtomicI32::new(0),
            workers_gave_up: AtomicI32::new(0),
            holding: [const { AtomicI64::new(0) }; MAX_WORKERS_LIMIT as usize],
            reached: [const { Versioned::new() }; MAX_WORKERS_LIMIT as usize],
            lane_frontier: Versioned::new(),
            lanes: [const { Versioned::new() }; MAX_WORKERS_LIMIT as usize],
            limit_bound: Versioned::new(),
            finish_announced: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
            rate: SharedRateSchedule::default(),
        }
    }

    /// Reserves up to `wanted` claims within the run's limit; returns how many it got.
    pub fn reserve(&self, wanted: i64) -> i64 {
        if self.max_items <= 0 {
            return wanted;
        }
        let before = self.claimed.fetch_add(wanted, Ordering::SeqCst);
        let granted = (self.max_items - before).clamp(0, wanted);
        if granted < wanted {
            self.claimed.fetch_sub(wanted - granted, Ordering::SeqCst);
        }
        granted
    }

    /// Whether the run has a `max_items` limit.
    pub fn limited(&self) -> bool {
        self.max_items > 0
    }

    /// The run's `max_items` (0: no limit).
    pub fn max_items(&self) -> i64 {
        self.max_items
    }

    /// The last position a run with `max_items` may claim, once fixed (`None`: not yet).
    pub fn limit_bound(&self) -> Option<(i64, i64)> {
        loop {
            match self.limit_bound.read() {
                Some((0, _)) => return None,
                Some((_, [priority, item])) => return Some((priority, item)),
                None => std::thread::yield_now(), // being fixed right now
            }
        }
    }

    /// Fixes the last position the run may claim to `bound` unless another worker fixed
    /// it first, and returns the one fixed: every worker of the run keeps to the same.
    pub fn fix_limit_bound(&self, bound: (i64, i64)) -> (i64, i64) {
        if self.limit_bound.write_if_unchanged(0, [bound.0, bound.1]) {
            return bound;
        }
        self.limit_bound().unwrap_or(bound)
    }

    /// Gives back reservations that found no item.
    pub fn release(&self, unused: i64) {
        if self.max_items > 0 && unused > 0 {
            self.claimed.fetch_sub(unused, Ordering::SeqCst);
        }
    }

    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    pub fn record(&self, attempt: Attempt) {
        let counter = match attempt {
            Attempt::Done => &self.processed,
            Attempt::Failed => &self.failed,
            Attempt::Died => {
                self.dead.fetch_add(1, Ordering::SeqCst);
                &self.failed
            }
            Attempt::Split => return,
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }

    /// The run's counts so far.
    pub fn tally(&self) -> Tally {
        Tally {
            processed: self.processed.load(Ordering::SeqCst),
            failed: self.failed.load(Ordering::SeqCst),
            dead: self.dead.load(Ordering::SeqCst),
        }
    }

    /// The worker at `place` has joined the run (it is connected and registered).
    pub fn join(&self, place: usize) {
        if let Some(word) = self.joined.get(place / 64) {
            word.fetch_or(1 << (place % 64), Ordering::SeqCst);
        }
        self.workers_attached.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether the worker at `place` has joined.
    pub fn has_joined(&self, place: usize) -> bool {
        self.joined
            .get(place / 64)
            .is_some_and(|word| word.load(Ordering::SeqCst) & (1 << (place % 64)) != 0)
    }

    /// The worker at `place` holds `item` (None: nothing) until it says otherwise.
    pub fn hold(&self, place: usize, item: Option<i64>) {
        if let Some(slot) = self.holding.get(place) {
            slot.store(item.unwrap_or(0), Ordering::Relaxed);
        }
    }

    /// The items that the workers at other places than `place` hold now. A hint, not a
    /// lock: an item in it may have been let go a moment ago, one missing from it may
    /// have been claimed meanwhile (the row locks of the claim decide).
    pub fn held_by_others(&self, place: usize) -> Vec<i64> {
        self.other_places(place)
            .map(|other| self.holding[other].load(Ordering::Relaxed))
            .filter(|&item| item != 0)
            .collect()
    }

    /// The worker at `place` claimed up to `position` (priority, item_id) of the queue.
    pub fn reach(&self, place: usize, position: (i64, i64)) {
        if let Some(reached) = self.reached.get(place) {
            reached.write([position.0, position.1]);
        }
    }

    /// The furthest queue position any worker at another place than `place` claimed. A
    /// hint too: what lies before it was claimed, is held, or was passed over by a
    /// claim, so a claim that starts after it reads none of that (see `Queue::claim`).
    pub fn reached_by_others(&self, place: usize) -> Option<(i64, i64)> {
        self.other_places(place)
            .filter_map(|other| match self.reached[other].read() {
                Some((version, [priority, item])) if version > 0 => Some((priority, item)),
                _ => None, // never written, or a write under way
            })
            .max()
    }

    /// Where the last lane handed out ends (`None`: no lane yet, or unreadable for the
    /// moment), and the version read, for `advance_lane_frontier`.
    pub fn lane_frontier(&self) -> (u64, Option<(i64, i64)>) {
        match self.lane_frontier.read() {
            // A write under way: an odd version, from which no advance succeeds.
            None => (1, None),
            Some((0, _)) => (0, None),
            Some((version, [priority, item])) => (version, Some((priority, item))),
        }
    }

    /// Hands the lane up to `end` to the caller if nobody took one since it read the
    /// frontier at `version`: lanes never overlap, whoever reads concurrently.
    pub fn advance_lane_frontier(&self, version: u64, end: (i64, i64)) -> bool {
        self.lane_frontier
            .write_if_unchanged(version, [end.0, end.1])
    }

    /// The worker at `place` works in `lane` now (`None`: in none).
    pub fn work_in_lane(&self, place: usize, lane: Option<Lane>) {
        if let Some(slot) = self.lanes.get(place) {
            slot.write(match lane {
                Some(Lane { start, end }) => [1, start.0, start.1, end.0, end.1],
                None => [0; 5],
            });
        }
    }

    /// The lanes the workers of the run work in, with the place of each.
    pub fn lanes(&self) -> Vec<(usize, Lane)> {
        self.joined_places()
            .filter_map(|place| match self.lanes[place].read() {
                Some((_, [1, start_priority, start_item, end_priority, end_item])) => Some((
                    place,
                    Lane {
                        start: (start_priority, start_item),
                        end: (end_priority, end_item),
                    },
                )),
                _ => None,
            })
            .collect()
    }

    /// The places other than `place` that joined the run.
    fn other_places(&self, place: usize) -> impl Iterator<Item = usize> + '_ {
        self.joined_places().filter(move |&other| other != place)
    }

    /// The places that joined the run.
    fn joined_places(&self) -> impl Iterator<Item = usize> + '_ {
        self.joined
            .iter()
            .enumerate()
            .flat_map(move |(word_at, word)| {
                let mut bits = word.load(Ordering::Relaxed);
                std::iter::from_fn(move || {
                    (bits != 0).then(|| {
                        let at = word_at * 64 + bits.trailing_zeros() as usize;
                        bits &= bits - 1;
                        at
                    })
                })
            })
    }

    pub fn workers_attached(&self) -> i32 {
        self.workers_attached.load(Ordering::SeqCst)
    }

    /// Workers that left cleanly (a worker that dies mid-run never counts itself).
    pub fn workers_exited(&self) -> i32 {
        self.workers_exited.load(Ordering::SeqCst) - self.workers_gave_up.load(Ordering::SeqCst)
    }

    /// The launcher tells how many workers it started. True when they have all exited
    /// already: then the launcher announces the end of the run.
    pub fn set_launched(&self, workers: i32) -> bool {
        self.workers_launched.store(workers, Ordering::SeqCst);
        self.workers_exited.load(Ordering::SeqCst) >= workers && self.claim_announcement()
    }

    /// A worker is leaving, having given up or not. True for the last one out: it
    /// announces the end of the run.
    pub fn worker_exited(&self, gave_up: bool) -> bool {
        if gave_up {
            self.workers_gave_up.fetch_add(1, Ordering::SeqCst);
        }
        let exited = self.workers_exited.fetch_add(1, Ordering::SeqCst) + 1;
        exited >= self.workers_launched.load(Ordering::SeqCst) && self.claim_announcement()
    }

    fn claim_announcement(&self) -> bool {
        !self.finish_announced.swap(true, Ordering::SeqCst)
    }
}

/// A mapping of a run's shared segment in this process; dropping it unmaps the segment,
/// which PostgreSQL frees when the last process lets go.
pub enum SharedRun {
    Segment(*mut pg_sys::dsm_segment),
    Private(Box<RunState>),
}

impl SharedRun {
    /// Creates the segment for a new run (launcher). It lives while any process maps it.
    pub fn create(max_items: Option<i64>) -> SharedRun {
        // SAFETY: dsm_create returns a mapped segment of the requested size or raises.
        let segment = unsafe { pg_sys::dsm_create(std::mem::size_of::<RunState>(), 0) };
        // SAFETY: the segment is at least size_of::<RunState>() bytes, suitably aligned
        // (DSM mappings are page aligned), and nobody else maps it yet.
        unsafe {
            std::ptr::write(
                pg_sys::dsm_segment_address(segment).cast::<RunState>(),
                RunState::new(max_items),
            )
        };
        SharedRun::Segment(segment)
    }

    /// Keeps the mapping past the end of the transaction that made it, until this value
    /// is dropped (or the session ends): a cycle waits for its run across commits.
    pub fn keep_for_session(&self) {
        if let SharedRun::Segment(segment) = self {
            // SAFETY: `segment` is this value's own live mapping; unpinned by `drop`'s
            // dsm_detach.
            unsafe { pg_sys::dsm_pin_mapping(*segment) };
        }
    }

    /// The state of a worker of an always-on pool: nobody else reads it (the pool's
    /// members are counted in the pool registry, which decides who announces a run's
    /// end), so it lives in the worker's own memory.
    pub fn private() -> SharedRun {
        SharedRun::Private(Box::new(RunState::new(None)))
    }

    /// Maps an existing run's segment (worker); `None` when the run is already gone.
    pub fn attach(handle: u32) -> Option<SharedRun> {
        // SAFETY: dsm_attach returns NULL when no segment with this handle exists.
        let segment = unsafe { pg_sys::dsm_attach(handle) };
        (!segment.is_null()).then_some(SharedRun::Segment(segment))
    }

    /// The segment's handle, which workers attach with; 0 for a private state.
    pub fn handle(&self) -> u32 {
        match self {
            // SAFETY: `segment` is a live mapping owned by this value.
            SharedRun::Segment(segment) => unsafe { pg_sys::dsm_segment_handle(*segment) },
            SharedRun::Private(_) => 0,
        }
    }

    pub fn state(&self) -> &RunState {
        match self {
            // SAFETY: the segment was initialised with a RunState by `create` and stays
            // mapped while `self` lives; all shared fields are atomics.
            SharedRun::Segment(segment) => unsafe {
                &*pg_sys::dsm_segment_address(*segment).cast::<RunState>()
            },
            SharedRun::Private(state) => state,
        }
    }
}

impl Drop for SharedRun {
    fn drop(&mut self) {
        if let SharedRun::Segment(segment) = self
            && !segment.is_null()
        {
            // SAFETY: `segment` is this value's own live mapping and is not used afterwards.
            unsafe { pg_sys::dsm_detach(*segment) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_sees_what_the_others_hold_and_not_its_own() {
        let state = RunState::new(None);
        for place in [0, 5, 64, 70] {
            state.join(place);
        }
        state.hold(0, Some(10));
        state.hold(5, Some(11));
        state.hold(64, Some(12));
        state.hold(70, None);
        state.hold(3, Some(99)); // a place that never joined is not read
        let mut held = state.held_by_others(5);
        held.sort_unstable();
        assert_eq!(held, [10, 12]);
        state.hold(0, None);
        assert_eq!(state.held_by_others(5), [12]);
    }

    #[test]
    fn a_worker_sees_the_furthest_position_the_others_reached() {
        let state = RunState::new(None);
        assert_eq!(state.reached_by_others(0), None);
        for place in [0, 1, 65] {
            state.join(place);
        }
        state.reach(0, (5, 900)); // its own: not counted
        state.reach(1, (1, 40));
        state.reach(65, (1, 30));
        state.reach(7, (9, 9)); // a place that never joined is not read
        assert_eq!(state.reached_by_others(0), Some((1, 40)));
        state.reach(65, (2, 10)); // a worse priority is further, whatever the id
        assert_eq!(state.reached_by_others(0), Some((2, 10)));
        assert_eq!(state.reached_by_others(65), Some((5, 900)));
    }

    #[test]
    fn lanes_are_handed_out_once_whoever_asks_at_the_same_time() {
        let state = RunState::new(None);
        let (version, frontier) = state.lane_frontier();
        assert_eq!(frontier, None, "no lane yet");
        assert!(state.advance_lane_frontier(version, (0, 64)));
        // A second worker that read the frontier at the same time loses and reads again.
        assert!(!state.advance_lane_frontier(version, (0, 64)));
        let (again, frontier) = state.lane_frontier();
        assert_eq!(frontier, Some((0, 64)));
        assert!(state.advance_lane_frontier(again, (1, 3)));
        assert_eq!(state.lane_frontier().1, Some((1, 3)));
    }

    #[test]
    fn the_first_limit_bound_fixed_holds_for_every_worker() {
        let state = RunState::new(Some(1000));
        assert_eq!(state.limit_bound(), None, "not fixed yet");
        assert_eq!(state.fix_limit_bound((0, 1000)), (0, 1000));
        // A worker that found another bound (more items planned meanwhile) keeps to the
        // one fixed first.
        assert_eq!(state.fix_limit_bound((0, 1200)), (0, 1000));
        assert_eq!(state.limit_bound(), Some((0, 1000)));
    }

    #[test]
    fn a_worker_sees_the_lanes_of_the_places_that_joined() {
        let state = RunState::new(None);
        for place in [0, 2, 64] {
            state.join(place);
        }
        let lane = |end| Lane {
            start: (0, end - 64),
            end: (0, end),
        };
        state.work_in_lane(0, Some(lane(64)));
        state.work_in_lane(64, Some(lane(128)));
        state.work_in_lane(5, Some(lane(192))); // a place that never joined is not read
        assert_eq!(state.lanes(), [(0, lane(64)), (64, lane(128))]);
        state.work_in_lane(0, None);
        state.work_in_lane(2, Some(lane(256)));
        assert_eq!(state.lanes(), [(2, lane(256)), (64, lane(128))]);
    }

    #[test]
    fn each_place_joins_on_its_own() {
        let state = RunState::new(None);
        for place in [0, 63, 64, MAX_WORKERS_LIMIT as usize - 1] {
            assert!(!state.has_joined(place));
            state.join(place);
            assert!(state.has_joined(place), "place {place}");
        }
        assert!(!state.has_joined(1), "a neighbour is not taken for joined");
        assert!(
            !state.has_joined(MAX_WORKERS_LIMIT as usize),
            "beyond the limit"
        );
        assert_eq!(state.workers_attached(), 4);
    }
}
