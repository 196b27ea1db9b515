//! The always-on registry: a small struct in the server's shared memory (only with
//! `shared_preload_libraries = 'pg_chunkwise'`) under one LWLock. It knows the launcher,
//! each database's supervisor and each always-on task's pool: its members (workers),
//! which of them sleep idle, and the pool's enqueue-to-start latency histogram.
//!
//! Everybody finds everybody here by PGPROC number, to set their latch: a committing
//! enqueue wakes idle pool members, a steering call or a pool that must grow wakes the
//! database's supervisor, a database without one wakes the launcher. No process polls.
//! Nothing here allocates or raises: the commit callback calls it after the commit.

use std::time::Duration;

use pgrx::pg_sys;
use pgrx::{PGRXSharedMemory, PgLwLock, pg_guard, pg_shmem_init};

use crate::governance::RateSchedule;

/// Databases served at once, always-on tasks at once, and workers in one pool.
const MAX_DATABASES: usize = 32;
pub const MAX_POOLS: usize = 32;
pub const MAX_POOL_MEMBERS: usize = 32;

/// Upper bounds (seconds) of the latency histogram's buckets; +Inf comes after.
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A process as the registry knows it: `pid` 0 = nobody, `STARTING` = launched, not yet
/// joined.
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct Process {
    pid: i32,
    procno: i32,
}

const STARTING: i32 = -1;

impl Process {
    const NOBODY: Process = Process { pid: 0, procno: 0 };

    fn is_running(&self) -> bool {
        self.pid > 0
    }

    fn is_present(&self) -> bool {
        self.pid != 0
    }

    fn me() -> Process {
        // SAFETY: MyProcPid and MyProc are this backend's own, set before any extension
        // code runs.
        unsafe {
            Process {
                pid: pg_sys::MyProcPid,
                procno: (*pg_sys::MyProc).pgprocno,
            }
        }
    }

    fn is_me(&self) -> bool {
        // SAFETY: reads this backend's pid.
        self.pid == unsafe { pg_sys::MyProcPid }
    }

    fn wake(&self) {
        if !self.is_running() {
            return;
        }
        // SAFETY: procno is the PGPROC number the process registered with; PGPROCs live
        // in shared memory for the server's lifetime, so setting the latch of a process
        // that has exited since wakes at most whoever reuses the slot, for nothing.
        unsafe {
            let proc = (*pg_sys::ProcGlobal).allProcs.add(self.procno as usize);
            pg_sys::SetLatch(&raw mut (*proc).procLatch);
        }
    }
}

#[derive(Clone, Copy, Default)]
#[repr(C)]
struct DatabaseSlot {
    database: u32,
    supervisor: Process,
    /// The database has always-on work (or might): a supervisor should run there.
    wanted: bool,
    /// Bumped by every request; a supervisor leaves only if none came since it looked.
    requests: u64,
}

#[derive(Clone, Copy, Default)]
#[repr(C)]
struct Member {
    process: Process,
    run_id: i64,
    /// Sleeping on its latch until items come; cleared by whoever wakes it.
    idle: bool,
    /// Told to leave after its current item (the task changed or is no longer always-on).
    retiring: bool,
}

#[derive(Clone, Copy)]
#[repr(C)]
struct PoolSlot {
    database: u32,
    /// 0 = free slot.
    task_id: i32,
    /// The task is still always-on and running; when false the slot is freed once its
    /// last member leaves.
    wanted: bool,
    /// The run the pool's members join; 0 = the next member starts a new one.
    run_id: i64,
    min_workers: i32,
    max_workers: i32,
    members: [Member; MAX_POOL_MEMBERS],
    latency_buckets: [u64; LATENCY_BUCKETS.len() + 1],
    latency_sum: f64,
    latency_count: u64,
    /// When the pool's next item may start under `max_rate`.
    rate: RateSchedule,
}

impl PoolSlot {
    const FREE: PoolSlot = PoolSlot {
        database: 0,
        task_id: 0,
        wanted: false,
        run_id: 0,
        min_workers: 0,
        max_workers: 0,
        members: [Member {
            process: Process::NOBODY,
            run_id: 0,
            idle: false,
            retiring: false,
        }; MAX_POOL_MEMBERS],
        latency_buckets: [0; LATENCY_BUCKETS.len() + 1],
        latency_sum: 0.0,
        latency_count: 0,
        rate: RateSchedule::ZERO,
    };

    /// Members that count toward the pool's size: present and not retiring.
    fn active(&self) -> impl Iterator<Item = &Member> {
        self.members
            .iter()
            .filter(|m| m.process.is_present() && !m.retiring)
    }

    fn retire_all(&mut self) {
        for member in self.members.iter_mut().filter(|m| m.process.is_present()) {
            member.retiring = true;
            member.idle = false;
            member.process.wake();
        }
        self.run_id = 0;
    }

    fn is_empty(&self) -> bool {
        !self.members.iter().any(|m| m.process.is_present())
    }
}

pub struct Registry {
    launcher: Process,
    databases: [DatabaseSlot; MAX_DATABASES],
    pools: [PoolSlot; MAX_POOLS],
}

// SAFETY: plain integers and arrays of them, no pointers: the same in every process.
unsafe impl PGRXSharedMemory for Registry {}

impl Registry {
    fn new() -> Registry {
        Registry {
            launcher: Process::NOBODY,
            databases: [DatabaseSlot::default(); MAX_DATABASES],
            pools: [PoolSlot::FREE; MAX_POOLS],
        }
    }
}

static REGISTRY: PgLwLock<Registry> = unsafe { PgLwLock::new(c"pg_chunkwise always-on") };

/// Set in the postmaster when the library is preloaded; backends inherit it by fork.
static mut PRELOADED: bool = false;

/// Asks for the shared memory; called from `_PG_init` while libraries are preloaded.
// pgrx's macro names the features of PostgreSQL versions this crate does not build for.
#[allow(unexpected_cfgs)]
pub fn request() {
    pg_shmem_init!(REGISTRY = Registry::new());
    // SAFETY: _PG_init runs once per process, single-threaded, before any reader.
    unsafe { PRELOADED = true };
}

/// Whether the registry exists: the library was preloaded.
pub fn available() -> bool {
    // SAFETY: written once in the postmaster before any backend forked.
    unsafe { PRELOADED }
}

/// Where a pool member is: pool slot and member slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seat {
    pub pool: usize,
    pub member: usize,
}

impl Seat {
    /// A seat within the registry's bounds.
    pub fn new(pool: usize, member: usize) -> Option<Seat> {
        (pool < MAX_POOLS && member < MAX_POOL_MEMBERS).then_some(Seat { pool, member })
    }

    /// The seat as one integer, for an exit callback's argument.
    pub fn encode(&self) -> u64 {
        ((self.pool as u64) << 32) | self.member as u64
    }

    pub fn decode(value: u64) -> Option<Seat> {
        Seat::new((value >> 32) as usize, (value & 0xffff_ffff) as usize)
    }
}

/// What a supervisor sees of one pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolSize {
    pub active: i32,
    pub idle: i32,
}

/// One pool's figures, for `chunkwise.metrics()`.
pub struct PoolFigures {
    pub task_id: i32,
    pub active: i32,
    pub idle: i32,
    pub latency_buckets: [u64; LATENCY_BUCKETS.len() + 1],
    pub latency_sum: f64,
    pub latency_count: u64,
}

// ----- the launcher

/// The launcher registers itself so that requests can wake it.
pub fn launcher_started() {
    REGISTRY.exclusive().launcher = Process::me();
}

/// Marks `databases` as wanting a supervisor (at server start: each looks for work).
/// Returns those that found no free slot, to be tried again once supervisors leave.
pub fn want_supervisors(databases: Vec<pg_sys::Oid>) -> Vec<pg_sys::Oid> {
    let mut registry = REGISTRY.exclusive();
    databases
        .into_iter()
        .filter(
            |database| match database_slot(&mut registry, database.to_u32()) {
                Some(slot) => {
                    slot.wanted = true;
                    false
                }
                None => true,
            },
        )
        .collect()
}

/// Databases that want a supervisor and have none: each is marked as starting, and the
/// launcher either starts one or calls `supervisor_not_started`.
pub fn supervisors_to_start() -> Vec<pg_sys::Oid> {
    let mut registry = REGISTRY.exclusive();
    registry
        .databases
        .iter_mut()
        .filter(|slot| slot.database != 0 && slot.wanted && !slot.supervisor.is_present())
        .map(|slot| {
            slot.supervisor = Process {
                pid: STARTING,
                procno: 0,
            };
            pg_sys::Oid::from(slot.database)
        })
        .collect()
}

/// A supervisor that could not start, or stopped before it joined.
pub fn supervisor_not_started(database: pg_sys::Oid) {
    let mut registry = REGISTRY.exclusive();
    if let Some(slot) = find_database(&mut registry, database.to_u32())
        && slot.supervisor.pid == STARTING
    {
        slot.supervisor = Process::NOBODY;
    }
}

// ----- a database's supervisor

/// The supervisor takes its database's seat. False when another supervisor has it.
pub fn supervisor_joined(database: pg_sys::Oid) -> bool {
    let mut registry = REGISTRY.exclusive();
    let Some(slot) = database_slot(&mut registry, database.to_u32()) else {
        return false;
    };
    if slot.supervisor.is_running() && !slot.supervisor.is_me() {
        return false;
    }
    slot.supervisor = Process::me();
    true
}

/// The requests counter of the supervisor's database, read before it looks for work.
pub fn supervisor_requests(database: pg_sys::Oid) -> u64 {
    let mut registry = REGISTRY.exclusive();
    find_database(&mut registry, database.to_u32()).map_or(0, |slot| slot.requests)
}

/// The supervisor leaves its database if no request came since it read `seen` and no
/// pool of the database is left; true when it may exit.
pub fn supervisor_leaves(database: pg_sys::Oid, seen: u64) -> bool {
    let mut registry = REGISTRY.exclusive();
    let database = database.to_u32();
    if registry
        .pools
        .iter()
        .any(|pool| pool.database == database && pool.task_id != 0)
    {
        return false;
    }
    let Some(slot) = find_database(&mut registry, database) else {
        return true;
    };
    if slot.requests != seen {
        return false;
    }
    // The slot is free for another database; a later request takes one again.
    *slot = DatabaseSlot::default();
    true
}

/// A supervisor leaving for any other reason (SIGTERM, an error): the launcher starts a
/// new one if the database still wants it.
pub fn supervisor_exited(database: pg_sys::Oid) {
    let mut registry = REGISTRY.exclusive();
    if let Some(slot) = find_database(&mut registry, database.to_u32())
        && slot.supervisor.is_me()
    {
        slot.supervisor = Process::NOBODY;
    }
    registry.launcher.wake();
}

/// The pools of `database` whose tasks are not in `wanted` retire their members; their
/// slots are freed once empty.
pub fn keep_only_pools(database: pg_sys::Oid, wanted: &[i32]) {
    let mut registry = REGISTRY.exclusive();
    for pool in registry
        .pools
        .iter_mut()
        .filter(|p| p.database == database.to_u32() && p.task_id != 0)
    {
        if !wanted.contains(&pool.task_id) {
            if pool.wanted {
                pool.wanted = false;
                pool.retire_all();
            }
            if pool.is_empty() {
                *pool = PoolSlot::FREE;
            }
        }
    }
}

/// The task's pool slot, made if missing (None when every slot is taken), with the
/// task's current bounds.
pub fn pool_for(
    database: pg_sys::Oid,
    task_id: i32,
    min_workers: i32,
    max_workers: i32,
) -> Option<usize> {
    let mut registry = REGISTRY.exclusive();
    let database = database.to_u32();
    let index = match find_pool(&registry, database, task_id) {
        Some(index) => index,
        None => {
            let index = registry.pools.iter().position(|p| p.task_id == 0)?;
            registry.pools[index] = PoolSlot {
                database,
                task_id,
                wanted: true,
                ..PoolSlot::FREE
            };
            index
        }
    };
    let pool = &mut registry.pools[index];
    pool.wanted = true;
    pool.min_workers = min_workers;
    pool.max_workers = max_workers;
    Some(index)
}

pub fn pool_size(pool: usize) -> PoolSize {
    let registry = REGISTRY.share();
    let slot = &registry.pools[pool];
    PoolSize {
        active: slot.active().count() as i32,
        idle: slot.active().filter(|m| m.idle).count() as i32,
    }
}

/// The run new members of the pool join, starting a new one with `new_run_id()` when
/// the pool has none.
pub fn pool_run<E>(pool: usize, new_run_id: impl FnOnce() -> Result<i64, E>) -> Result<i64, E> {
    let current = REGISTRY.share().pools[pool].run_id;
    if current != 0 {
        return Ok(current);
    }
    let fresh = new_run_id()?;
    let mut registry = REGISTRY.exclusive();
    let slot = &mut registry.pools[pool];
    if slot.run_id == 0 {
        slot.run_id = fresh;
    }
    Ok(slot.run_id)
}

/// Reserves a member seat for a worker about to be launched into `run_id`.
pub fn reserve_member(pool: usize, run_id: i64) -> Option<Seat> {
    let mut registry = REGISTRY.exclusive();
    let slot = &mut registry.pools[pool];
    if slot.run_id != run_id {
        return None;
    }
    let member = slot.members.iter().position(|m| !m.process.is_present())?;
    slot.members[member] = Member {
        process: Process {
            pid: STARTING,
            procno: 0,
        },
        run_id,
        idle: false,
        retiring: false,
    };
    Some(Seat { pool, member })
}

/// Frees a seat whose worker could not start or stopped before it joined; true when the
/// seat was still waiting for it.
pub fn release_unjoined(seat: Seat) -> bool {
    let mut registry = REGISTRY.exclusive();
    let member = &mut registry.pools[seat.pool].members[seat.member];
    if member.process.pid != STARTING {
        return false;
    }
    *member = Member::default();
    true
}

/// The supervisor's latch wakes at a request for its database; the launcher's when the
/// database has no supervisor (it starts one).
pub fn request_supervisor(database: pg_sys::Oid) {
    let mut registry = REGISTRY.exclusive();
    let Some(slot) = database_slot(&mut registry, database.to_u32()) else {
        return;
    };
    slot.wanted = true;
    slot.requests += 1;
    if slot.supervisor.is_running() {
        slot.supervisor.wake();
    } else {
        registry.launcher.wake();
    }
}

// ----- pool members

/// The worker takes its seat; false when the seat is no longer its to take (the task
/// changed while it started).
pub fn join(seat: Seat, task_id: i32, run_id: i64) -> bool {
    let mut registry = REGISTRY.exclusive();
    let slot = &mut registry.pools[seat.pool];
    let member = &mut slot.members[seat.member];
    if slot.task_id != task_id
        || member.process.pid != STARTING
        || member.run_id != run_id
        || member.retiring
    {
        return false;
    }
    member.process = Process::me();
    true
}

/// Marks the member idle: asleep until a waker takes the mark.
pub fn start_idling(seat: Seat) {
    let mut registry = REGISTRY.exclusive();
    let member = &mut registry.pools[seat.pool].members[seat.member];
    if member.process.is_me() {
        member.idle = true;
    }
}

/// Marks the member busy again; true when a committed enqueue had woken it (the waker
/// took the idle mark), false when it woke by time or was never asleep.
pub fn stop_idling(seat: Seat) -> bool {
    let mut registry = REGISTRY.exclusive();
    let member = &mut registry.pools[seat.pool].members[seat.member];
    if !member.process.is_me() {
        return false;
    }
    let woken = !member.idle;
    member.idle = false;
    woken
}

/// Whether the member must leave: told to retire, or its seat is no longer its own.
pub fn must_leave(seat: Seat) -> bool {
    let registry = REGISTRY.share();
    let member = &registry.pools[seat.pool].members[seat.member];
    member.retiring || !member.process.is_me()
}

/// An idle member leaves when the pool is above its minimum; true when it may go.
pub fn retire_if_above_minimum(seat: Seat) -> bool {
    let mut registry = REGISTRY.exclusive();
    let slot = &mut registry.pools[seat.pool];
    if slot.active().count() as i32 <= slot.min_workers {
        return false;
    }
    slot.members[seat.member].retiring = true;
    true
}

/// The member leaves its seat. True when it was the last member of its run: it then
/// announces the end of the run. The supervisor is woken to keep the pool's minimum.
pub fn leave(seat: Seat) -> bool {
    let mut registry = REGISTRY.exclusive();
    let slot = &mut registry.pools[seat.pool];
    let member = slot.members[seat.member];
    if !member.process.is_me() {
        return false;
    }
    slot.members[seat.member] = Member::default();
    let last_of_run = !slot
        .members
        .iter()
        .any(|m| m.process.is_present() && m.run_id == member.run_id);
    if last_of_run && slot.run_id == member.run_id {
        slot.run_id = 0;
    }
    if !slot.wanted && slot.is_empty() {
        *slot = PoolSlot::FREE;
    }
    let database = slot.database;
    if let Some(db) = find_database(&mut registry, database) {
        db.supervisor.wake();
    }
    last_of_run
}

/// Counts one item's wait from enqueue (or its retry time) to its start.
pub fn record_latency(seat: Seat, seconds: f64) {
    let mut registry = REGISTRY.exclusive();
    let slot = &mut registry.pools[seat.pool];
    let bucket = LATENCY_BUCKETS
        .iter()
        .position(|&bound| seconds <= bound)
        .unwrap_or(LATENCY_BUCKETS.len());
    slot.latency_buckets[bucket] += 1;
    slot.latency_sum += seconds.max(0.0);
    slot.latency_count += 1;
}

/// Takes `items` slots of the pool's `max_rate` schedule (see `governance`).
pub fn take_rate(seat: Seat, now: i64, items: i64, rate: f64) -> Result<(), Duration> {
    REGISTRY.exclusive().pools[seat.pool]
        .rate
        .take(now, items, rate)
}

/// Gives back slots taken for items a claim did not find.
pub fn give_back_rate(seat: Seat, items: i64) {
    REGISTRY.exclusive().pools[seat.pool].rate.give_back(items);
}

// ----- committing backends

/// At the commit of `items` new items of an always-on task: wakes up to that many idle
/// members of its pool. Returns true when the supervisor should look (no pool, or more
/// items than idle members and room to grow).
pub fn wake_for_items(database: pg_sys::Oid, task_id: i32, items: i64) -> bool {
    let mut registry = REGISTRY.exclusive();
    let Some(index) = find_pool(&registry, database.to_u32(), task_id) else {
        return true;
    };
    let slot = &mut registry.pools[index];
    let mut woken = 0;
    for member in slot
        .members
        .iter_mut()
        .filter(|m| m.process.is_running() && m.idle && !m.retiring)
    {
        if woken >= items {
            break;
        }
        member.idle = false;
        member.process.wake();
        woken += 1;
    }
    woken < items && (slot.active().count() as i32) < slot.max_workers
}

/// At the commit of a change to an always-on task (alter, pause, resume, cancel, drop):
/// its pool's members leave after their current item; the supervisor restarts the pool
/// with the task as it now is.
pub fn retire_pool(database: pg_sys::Oid, task_id: i32) {
    let mut registry = REGISTRY.exclusive();
    if let Some(index) = find_pool(&registry, database.to_u32(), task_id) {
        registry.pools[index].retire_all();
    }
}

// ----- views

/// The figures of this database's pools (none where the library is not preloaded).
pub fn pool_figures(database: pg_sys::Oid) -> Vec<PoolFigures> {
    if !available() {
        return Vec::new();
    }
    let registry = REGISTRY.share();
    registry
        .pools
        .iter()
        .filter(|p| p.database == database.to_u32() && p.task_id != 0)
        .map(|p| PoolFigures {
            task_id: p.task_id,
            active: p.active().count() as i32,
            idle: p.active().filter(|m| m.idle).count() as i32,
            latency_buckets: p.latency_buckets,
            latency_sum: p.latency_sum,
            latency_count: p.latency_count,
        })
        .collect()
}

fn find_pool(registry: &Registry, database: u32, task_id: i32) -> Option<usize> {
    registry
        .pools
        .iter()
        .position(|p| p.database == database && p.task_id == task_id)
}

fn find_database(registry: &mut Registry, database: u32) -> Option<&mut DatabaseSlot> {
    registry
        .databases
        .iter_mut()
        .find(|slot| slot.database == database)
}

/// The database's slot, taken if it has none (None when every slot is taken).
fn database_slot(registry: &mut Registry, database: u32) -> Option<&mut DatabaseSlot> {
    let index = registry
        .databases
        .iter()
        .position(|slot| slot.database == database)
        .or_else(|| {
            registry
                .databases
                .iter()
                .position(|slot| slot.database == 0)
        })?;
    let slot = &mut registry.databases[index];
    slot.database = database;
    Some(slot)
}
