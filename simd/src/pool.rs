//! The persistent worker pool every parallel kernel runs on.
//!
//! Workers are spawned once in [`ThreadPool::new`] and live until the pool is dropped. A call
//! to [`ThreadPool::run`] publishes one job (a borrowed closure), wakes the workers, runs the
//! caller's own share as thread 0 and waits for the rest. Waiting is spin-then-park on both
//! sides: back-to-back matmuls (a decode step is a few hundred of them) find the workers still
//! spinning and pay no futex round trip, while an idle pool sleeps and costs nothing.
//!
//! Placement: a pool takes `n` free physical core slots of [`crate::topology`] (one hardware
//! thread per core, NUMA nodes interleaved; slots held by other live pools are skipped) and
//! worker `i` pins itself to the pool's slot `i`, so the OS cannot stack two workers on one
//! core or bounce them between caches; the pool's slot 0 is left for the caller. Threads past
//! the free cores run unpinned. [`Pinning::from_env`] reads `STRATA_PIN`: `0`
//! turns pinning off, `all` also pins the thread that creates the pool to slot 0. Where the
//! topology is unknown or the OS refuses a binding (containers, sandboxes) the pool runs
//! unpinned after one warning.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use crate::topology::{self, TopologyError};

/// How long a waiting thread polls before it parks: longer than the gap between two matmuls
/// of a decode step, short enough that an idle pool stops burning cores at once.
const SPIN_TIME: Duration = Duration::from_micros(50);

/// Spins (polling `done`) for up to `budget`, then parks until `done` holds. Returns early
/// when `done` does.
fn spin_then_park(budget: Duration, mut done: impl FnMut() -> bool) {
    if !budget.is_zero() {
        let start = Instant::now();
        loop {
            for _ in 0..32 {
                if done() {
                    return;
                }
                std::hint::spin_loop();
            }
            if start.elapsed() >= budget {
                break;
            }
        }
    }
    // Whoever makes `done` true unparks us afterwards; a stale or spurious wake-up just loops.
    while !done() {
        thread::park();
    }
}

/// The job as workers see it: a type-erased pointer to the caller's closure.
type Job<'a> = &'a (dyn Fn(usize, usize) + Sync);

struct Shared {
    /// Threads in all, fixed once `new` returns.
    n_threads: AtomicUsize,
    /// Bumped once per job; a worker runs a job when it sees a generation it has not run.
    generation: AtomicUsize,
    /// Points at a `Job` on the stack of the thread inside `run`, valid while `pending > 0`.
    job: AtomicPtr<Job<'static>>,
    /// Workers that have not finished the current job.
    pending: AtomicUsize,
    /// Set when any worker's share panicked; `run` re-raises it on the caller.
    panicked: AtomicBool,
    shutdown: AtomicBool,
    /// The thread inside `run`, unparked by the last worker to finish.
    caller: Mutex<Option<Thread>>,
    /// How long waiting threads spin before parking: zero when the pool has more threads than
    /// the machine has cores, where spinning steals the time slice of the thread waited for.
    spin: Duration,
}

/// Which pool threads are pinned to a physical core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pinning {
    /// No thread is pinned; the OS places them.
    Off,
    /// Worker `i` is pinned to core slot `i`; the caller keeps its own affinity (the OS
    /// normally puts it on slot 0, the one core the workers leave free).
    Workers,
    /// As `Workers`, and the thread calling [`ThreadPool::with_pinning`] is pinned to slot 0.
    /// Only useful when that thread is the one that will call [`ThreadPool::run`].
    All,
}

impl Pinning {
    /// From `STRATA_PIN`: `0`/`off`/`false`/`no` → `Off`, `all` → `All`, unset or `1` →
    /// `Workers`; anything else warns (once) and means `Workers`.
    pub fn from_env() -> Pinning {
        static FROM_ENV: std::sync::OnceLock<Pinning> = std::sync::OnceLock::new();
        *FROM_ENV.get_or_init(|| match std::env::var("STRATA_PIN") {
            Err(_) => Pinning::Workers,
            Ok(v) => Pinning::parse(&v).unwrap_or_else(|| {
                tracing::warn!(value = %v, "STRATA_PIN not understood (0, 1 or all); pinning workers");
                Pinning::Workers
            }),
        })
    }

    fn parse(v: &str) -> Option<Pinning> {
        match v.trim().to_ascii_lowercase().as_str() {
            "0" | "off" | "false" | "no" => Some(Pinning::Off),
            "1" | "on" | "true" | "yes" | "workers" | "" => Some(Pinning::Workers),
            "all" => Some(Pinning::All),
            _ => None,
        }
    }
}

/// A fixed set of worker threads that run closures on every thread at once.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises `run` calls from different threads.
    run_lock: Mutex<()>,
    pinning: Pinning,
    /// The CPU each thread index is pinned to (`None`: unpinned), fixed by `new`.
    placement: Vec<Option<usize>>,
    /// Core slots this pool holds (see [`acquire_slots`]), released on drop.
    slots: Vec<usize>,
}

/// Warns once per process that pinning failed: every pool of a process fails the same way,
/// and tests create hundreds of pools.
fn warn_unpinned(e: &TopologyError) {
    static WARNED: Once = Once::new();
    WARNED.call_once(|| {
        tracing::warn!(error = %e, "thread pinning unavailable; pool threads run unpinned");
    });
}

/// Core slots held by live pools, so pools that coexist (a daemon serving two models, tests
/// running in parallel) take distinct cores instead of all stacking worker 1 on slot 1.
static SLOTS_IN_USE: Mutex<Vec<bool>> = Mutex::new(Vec::new());

/// Takes up to `n` free core slots, lowest first; fewer (possibly none) when the machine's
/// cores are already held. Returned by [`release_slots`] when the pool drops.
fn acquire_slots(n: usize) -> Vec<usize> {
    let cores = topology::get().cores().len();
    let mut used = SLOTS_IN_USE.lock().unwrap_or_else(|e| e.into_inner());
    used.resize(cores, false);
    let mut got = Vec::with_capacity(n.min(cores));
    for (slot, taken) in used.iter_mut().enumerate() {
        if got.len() == n {
            break;
        }
        if !*taken {
            *taken = true;
            got.push(slot);
        }
    }
    got
}

fn release_slots(slots: &[usize]) {
    let mut used = SLOTS_IN_USE.lock().unwrap_or_else(|e| e.into_inner());
    for &s in slots {
        if let Some(taken) = used.get_mut(s) {
            *taken = false;
        }
    }
}

/// Pins the calling thread to core `slot`; `None` (after one warning per process) when the
/// OS refuses.
fn pin_to_slot(slot: usize) -> Option<usize> {
    match topology::get().pin_current_thread(slot) {
        Ok(core) => Some(core.cpu),
        Err(e) => {
            warn_unpinned(&e);
            None
        }
    }
}

thread_local! {
    /// True on a thread that is executing a pool job, so a nested `run` runs inline instead of
    /// deadlocking.
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

impl ThreadPool {
    /// A pool of `n_threads` threads in all, the caller of [`ThreadPool::run`] included, so
    /// `n_threads - 1` workers are spawned (`0` is treated as `1`). Workers are pinned as
    /// `STRATA_PIN` says (see [`Pinning::from_env`]).
    pub fn new(n_threads: usize) -> Self {
        Self::with_pinning(n_threads, Pinning::from_env())
    }

    /// As [`ThreadPool::new`], with the placement given instead of read from `STRATA_PIN`.
    pub fn with_pinning(n_threads: usize, pinning: Pinning) -> Self {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            n_threads: AtomicUsize::new(n_threads),
            generation: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            caller: Mutex::new(None),
            spin: if std::thread::available_parallelism().map_or(1, |n| n.get()) >= n_threads {
                SPIN_TIME
            } else {
                Duration::ZERO
            },
        });
        // Slot `i` of this pool is for thread `i`. The caller's slot is held even when the
        // caller is not pinned: it is the free core the OS will find for it.
        let slots = if pinning == Pinning::Off || !topology::get().can_pin() {
            Vec::new()
        } else {
            acquire_slots(n_threads)
        };
        let mut placement = vec![None; n_threads];
        if pinning == Pinning::All
            && let Some(&slot) = slots.first()
        {
            placement[0] = pin_to_slot(slot);
        }
        // Each worker pins itself first thing and reports where it landed, so `placement` is
        // complete (and the log line true) when `new` returns.
        let (placed_tx, placed_rx) = mpsc::channel::<(usize, Option<usize>)>();
        let mut workers = Vec::with_capacity(n_threads - 1);
        for index in 1..n_threads {
            let s = Arc::clone(&shared);
            let placed = placed_tx.clone();
            let slot = slots.get(index).copied();
            let spawned = thread::Builder::new()
                .name(format!("strata-simd-{index}"))
                .spawn(move || {
                    let cpu = slot.and_then(pin_to_slot);
                    // The receiver lives until every spawned worker has reported.
                    let _ = placed.send((index, cpu));
                    drop(placed);
                    worker_loop(&s, index)
                });
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    // Fewer threads beats failing: the pool shrinks to what could be spawned.
                    // Workers read the count only when a job arrives, after this store.
                    tracing::warn!(error = %e, index, "could not spawn pool worker");
                    break;
                }
            }
        }
        drop(placed_tx);
        // Ends when every spawned worker has sent its report (or died before sending).
        for (index, cpu) in placed_rx {
            if let Some(slot) = placement.get_mut(index) {
                *slot = cpu;
            }
        }
        shared.n_threads.store(workers.len() + 1, Ordering::Relaxed);
        placement.truncate(workers.len() + 1);
        let pool = Self {
            shared,
            workers,
            run_lock: Mutex::new(()),
            pinning,
            placement,
            slots,
        };
        tracing::debug!(summary = %pool.topology_summary(), "thread pool");
        pool
    }

    /// The CPU (OS index) each thread index is pinned to; `None` where it is not pinned.
    /// Index 0 is the caller, pinned only under [`Pinning::All`].
    pub fn placement(&self) -> &[Option<usize>] {
        &self.placement
    }

    /// One line for logs: threads, how many are pinned, and the machine's topology.
    pub fn topology_summary(&self) -> String {
        let pinned = self.placement.iter().filter(|c| c.is_some()).count();
        let cpus: Vec<String> = self
            .placement
            .iter()
            .map(|c| c.map_or_else(|| "-".to_string(), |c| c.to_string()))
            .collect();
        format!(
            "{} threads, {pinned} pinned ({:?}; cpu per thread: {}); {}",
            self.n_threads(),
            self.pinning,
            cpus.join(" "),
            topology::get().summary()
        )
    }

    /// Threads in the pool, the caller included.
    pub fn n_threads(&self) -> usize {
        self.shared.n_threads.load(Ordering::Relaxed)
    }

    /// Runs `f(thread_index, n_threads)` on every thread (the caller is index 0) and returns
    /// when all are done.
    ///
    /// Calls from several threads are serialised. A `run` from inside a job runs every index
    /// inline on the calling thread. If any share panics, the panic is re-raised here after
    /// all threads have finished.
    pub fn run<F: Fn(usize, usize) + Sync>(&self, f: F) {
        let n = self.n_threads();
        if n == 1 || IN_JOB.with(Cell::get) {
            for i in 0..n {
                f(i, n);
            }
            return;
        }
        // A poisoned lock only means an earlier job panicked; the pool state is still sound
        // because `run` always waits for every worker before unlocking.
        let _serial = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        let shared = &*self.shared;

        let job: Job<'_> = &f;
        // SAFETY: only the lifetime is erased. Workers dereference the pointer only between the
        // generation bump below and their decrement of `pending`, and this function does not
        // return (or unwind) before `pending` reaches zero (see `WaitGuard`), so `job` and `f`
        // outlive every use.
        let job_static: Job<'static> = unsafe { std::mem::transmute::<Job<'_>, Job<'static>>(job) };
        let job_slot = job_static;
        shared.panicked.store(false, Ordering::Relaxed);
        {
            let mut caller = shared.caller.lock().unwrap_or_else(|e| e.into_inner());
            if caller.as_ref().map(Thread::id) != Some(thread::current().id()) {
                *caller = Some(thread::current());
            }
        }
        shared.job.store(
            &job_slot as *const Job<'static> as *mut Job<'static>,
            Ordering::Relaxed,
        );
        shared.pending.store(n - 1, Ordering::Relaxed);
        shared.generation.fetch_add(1, Ordering::Release);
        for w in &self.workers {
            w.thread().unpark();
        }

        let guard = WaitGuard { shared };
        IN_JOB.with(|c| c.set(true));
        let mine = catch_unwind(AssertUnwindSafe(|| f(0, n)));
        IN_JOB.with(|c| c.set(false));
        drop(guard);
        shared.job.store(std::ptr::null_mut(), Ordering::Relaxed);

        if let Err(p) = mine {
            resume_unwind(p);
        }
        if shared.panicked.load(Ordering::Acquire) {
            panic!("a strata-simd pool worker panicked");
        }
    }
}

impl ThreadPool {
    /// Calls `f(first_row, rows_a, rows_b)` over contiguous ranges of the rows of `a` (rows of
    /// `row_a` elements) and of `b` (as many rows, of `row_b` elements), one range per thread,
    /// when there are at least `min_elems` elements of `a` (below that, waking the pool costs
    /// more than it saves, and the caller's thread does it all). For the per-token element-wise
    /// steps of a pass (norms, RoPE, activations, residuals), which decode leaves on one
    /// thread and prefill spreads. Pass an empty `b` with `row_b == 0` when there is one buffer.
    ///
    /// # Panics
    /// If a row length is zero where its buffer is not empty, or the buffers do not hold the same
    /// number of rows (a caller's bug, never input-dependent).
    pub fn for_rows2<A: Send, B: Send>(
        &self,
        a: &mut [A],
        row_a: usize,
        b: &mut [B],
        row_b: usize,
        min_elems: usize,
        f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
    ) {
        let rows = a.len().checked_div(row_a).unwrap_or(0);
        assert!(
            rows * row_a == a.len() && (row_b == 0 && b.is_empty() || b.len() == rows * row_b),
            "for_rows2: buffers of {} and {} elements are not rows of {row_a} and {row_b}",
            a.len(),
            b.len()
        );
        if a.len() < min_elems || self.n_threads() == 1 || rows < 2 {
            f(0, a, b);
            return;
        }
        let (pa, pb) = (SyncPtr(a.as_mut_ptr()), SyncPtr(b.as_mut_ptr()));
        self.run(|ith, nth| {
            let (r0, r1) = (rows * ith / nth, rows * (ith + 1) / nth);
            // SAFETY: rows r0..r1 of both buffers are this thread's alone (the ranges of the
            // threads are disjoint and inside `rows`), and `run` returns before `a` and `b`
            // are used again.
            let (ca, cb) = unsafe {
                (
                    std::slice::from_raw_parts_mut(pa.get().add(r0 * row_a), (r1 - r0) * row_a),
                    std::slice::from_raw_parts_mut(pb.get().add(r0 * row_b), (r1 - r0) * row_b),
                )
            };
            f(r0, ca, cb);
        });
    }

    /// [`ThreadPool::for_rows2`] over one buffer.
    pub fn for_rows<A: Send>(
        &self,
        a: &mut [A],
        row: usize,
        min_elems: usize,
        f: impl Fn(usize, &mut [A]) + Sync,
    ) {
        self.for_rows2(a, row, &mut [] as &mut [u8], 0, min_elems, |r0, ca, _| {
            f(r0, ca)
        });
    }
}

/// Waits for every worker to finish the current job, even while unwinding.
struct WaitGuard<'a> {
    shared: &'a Shared,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let shared = self.shared;
        spin_then_park(shared.spin, || shared.pending.load(Ordering::Acquire) == 0);
    }
}

fn worker_loop(shared: &Shared, index: usize) {
    let mut seen = 0usize;
    loop {
        spin_then_park(shared.spin, || {
            shared.generation.load(Ordering::Acquire) != seen
                || shared.shutdown.load(Ordering::Acquire)
        });
        let generation = shared.generation.load(Ordering::Acquire);
        seen = generation;
        if shared.shutdown.load(Ordering::Acquire) {
            return;
        }
        let ptr = shared.job.load(Ordering::Relaxed);
        // SAFETY: the generation bump (Release) happened after the store of `job`, and we
        // loaded the generation with Acquire, so `ptr` is the current job; the thread in `run`
        // keeps it alive until we decrement `pending` below.
        let job: Job<'static> = unsafe { *ptr };
        IN_JOB.with(|c| c.set(true));
        let r = catch_unwind(AssertUnwindSafe(|| {
            job(index, shared.n_threads.load(Ordering::Relaxed))
        }));
        IN_JOB.with(|c| c.set(false));
        if r.is_err() {
            shared.panicked.store(true, Ordering::Release);
        }
        if shared.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            let caller = shared.caller.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = caller.as_ref() {
                t.unpark();
            }
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.generation.fetch_add(1, Ordering::Release);
        for w in self.workers.drain(..) {
            w.thread().unpark();
            let _ = w.join();
        }
        release_slots(&self.slots);
    }
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("n_threads", &self.n_threads())
            .field("pinning", &self.pinning)
            .field("placement", &self.placement)
            .finish()
    }
}

/// Physical cores this process may use: the default thread count (see
/// [`topology::physical_cores`]).
pub fn physical_cores() -> usize {
    topology::physical_cores()
}

/// A raw pointer that may be shared with the pool's threads, for handing each of them a
/// disjoint part of one buffer; each use says why its writes are disjoint.
pub(crate) struct SyncPtr<T>(pub(crate) *mut T);

// By hand: the derives would ask `T: Copy`, and the pointer is copied whatever it points at.
impl<T> Clone for SyncPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// A method (not field access) so that closures capture the whole `Sync` wrapper.
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

// SAFETY: the pointer is only dereferenced for disjoint ranges per thread (see each use).
unsafe impl<T> Sync for SyncPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Send for SyncPtr<T> {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    type Affinity = Result<Vec<usize>, TopologyError>;

    /// Every row of both buffers reaches `f` once, with its index, whether the rows are spread
    /// over the threads or (below `min_elems`, or with one thread) all done on the caller's.
    #[test]
    fn for_rows_hands_out_every_row_once() {
        for threads in [1, 3] {
            let pool = ThreadPool::new(threads);
            for (rows, min) in [(0, 0), (1, 0), (7, 0), (7, 1 << 20), (64, 0)] {
                let mut a = vec![0usize; rows * 3];
                let mut b = vec![0u32; rows * 2];
                pool.for_rows2(&mut a, 3, &mut b, 2, min, |r0, a, b| {
                    assert_eq!(a.len() / 3, b.len() / 2);
                    for (i, (ra, rb)) in
                        a.chunks_exact_mut(3).zip(b.chunks_exact_mut(2)).enumerate()
                    {
                        ra.iter_mut().for_each(|v| *v += r0 + i + 1);
                        rb.iter_mut().for_each(|v| *v += 1);
                    }
                });
                let want: Vec<usize> = (0..rows).flat_map(|r| [r + 1; 3]).collect();
                assert_eq!(a, want, "threads={threads} rows={rows}");
                assert!(b.iter().all(|&v| v == 1));
                let mut one = vec![0u8; rows * 4];
                pool.for_rows(&mut one, 4, 0, |_, a| a.iter_mut().for_each(|v| *v += 1));
                assert!(one.iter().all(|&v| v == 1));
            }
        }
    }

    /// The CPUs thread `i` of `pool` may run on, read from inside a job on that thread.
    fn affinities(pool: &ThreadPool) -> Vec<Affinity> {
        let out: Vec<Mutex<Option<Affinity>>> =
            (0..pool.n_threads()).map(|_| Mutex::new(None)).collect();
        pool.run(|i, _| {
            *out[i].lock().unwrap() = Some(topology::get().current_thread_cpus());
        });
        out.into_iter()
            .map(|m| m.into_inner().unwrap().expect("every index ran"))
            .collect()
    }

    fn count_runs(pool: &ThreadPool) -> usize {
        let count = AtomicUsize::new(0);
        for _ in 0..100 {
            pool.run(|_, _| {
                count.fetch_add(1, Ordering::Relaxed);
            });
        }
        count.load(Ordering::Relaxed)
    }

    #[test]
    fn pinned_workers_sit_on_distinct_cores() {
        let topo = topology::get();
        let cores = topo.cores().len();
        let n = cores.clamp(2, 8);
        let pool = ThreadPool::with_pinning(n, Pinning::Workers);
        assert_eq!(pool.n_threads(), n);
        assert_eq!(count_runs(&pool), 100 * n);
        assert_eq!(
            pool.placement()[0],
            None,
            "the caller is not pinned under Workers"
        );
        if !topo.can_pin() || pool.placement()[1..].iter().all(Option::is_none) {
            // Topology unavailable or binding refused (sandbox): the pool still works, unpinned.
            return;
        }
        let affinity = affinities(&pool);
        let mut seen = Vec::new();
        let workers = pool.placement().iter().zip(&affinity).enumerate().skip(1);
        for (i, (placed, affinity)) in workers.take(n.min(cores) - 1) {
            // Pools of tests running in parallel hold some cores: a worker may be unpinned.
            let Some(cpu) = *placed else {
                continue;
            };
            assert_eq!(
                *affinity,
                Ok(vec![cpu]),
                "worker {i} can run only on its core"
            );
            seen.push(cpu);
        }
        let pinned = seen.len();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), pinned, "no two workers share a core");
        assert!(pool.topology_summary().contains("pinned"));
    }

    #[test]
    fn pinning_off_leaves_threads_unpinned() {
        let pool = ThreadPool::with_pinning(3, Pinning::Off);
        assert_eq!(pool.placement(), &[None, None, None]);
        assert_eq!(count_runs(&pool), 300);
        let topo = topology::get();
        if let Ok(before) = topo.current_thread_cpus() {
            // Workers inherit the spawning thread's affinity untouched.
            for a in affinities(&pool).into_iter().skip(1) {
                assert_eq!(a, Ok(before.clone()));
            }
        }
    }

    #[test]
    fn more_threads_than_cores_are_unpinned_past_the_core_count() {
        let cores = topology::get().cores().len();
        let n = cores + 3;
        let pool = ThreadPool::with_pinning(n, Pinning::Workers);
        assert_eq!(pool.n_threads(), n);
        assert_eq!(count_runs(&pool), 100 * n);
        assert!(pool.placement()[cores..].iter().all(Option::is_none));
        let pinned: Vec<usize> = pool.placement().iter().flatten().copied().collect();
        let mut distinct = pinned.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), pinned.len());
    }

    #[test]
    fn pinning_all_pins_the_creating_thread() {
        // On a scratch thread: pinning the test runner's thread would leak into other tests.
        let r = thread::spawn(|| {
            let pool = ThreadPool::with_pinning(2, Pinning::All);
            let here = topology::get().current_thread_cpus();
            (pool.placement().to_vec(), count_runs(&pool), here)
        })
        .join();
        let Ok((placement, runs, here)) = r else {
            panic!("pool thread panicked")
        };
        assert_eq!(runs, 200);
        let topo = topology::get();
        if let Some(cpu) = placement[0] {
            assert!(topo.cores().iter().any(|c| c.cpu == cpu));
            assert_eq!(here, Ok(vec![cpu]));
            assert_ne!(placement[1], Some(cpu));
        } else {
            assert!(!topo.can_pin() || placement.iter().all(Option::is_none));
        }
    }

    #[test]
    fn coexisting_pools_take_distinct_cores_and_give_them_back() {
        // Holds the slot table for the test: other tests' pools may come and go meanwhile, so
        // only this test's own acquisitions are compared.
        let a = acquire_slots(usize::MAX);
        let b = acquire_slots(usize::MAX);
        assert!(b.iter().all(|s| !a.contains(s)), "{a:?} and {b:?} overlap");
        release_slots(&a);
        let c = acquire_slots(a.len());
        assert!(c.iter().all(|s| !b.contains(s)));
        release_slots(&b);
        release_slots(&c);
        let cores = topology::get().cores().len();
        assert!(a.len() + b.len() <= cores);
    }

    #[test]
    fn pin_env_values() {
        assert_eq!(Pinning::parse("0"), Some(Pinning::Off));
        assert_eq!(Pinning::parse(" OFF "), Some(Pinning::Off));
        assert_eq!(Pinning::parse("1"), Some(Pinning::Workers));
        assert_eq!(Pinning::parse(""), Some(Pinning::Workers));
        assert_eq!(Pinning::parse("all"), Some(Pinning::All));
        assert_eq!(Pinning::parse("numa"), None);
        // CI runs the suite once with STRATA_PIN=0: then `new` must pin nothing.
        let pool = ThreadPool::new(2);
        assert_eq!(count_runs(&pool), 200);
        if Pinning::from_env() == Pinning::Off {
            assert_eq!(pool.placement(), &[None, None]);
        }
        assert!(physical_cores() >= 1);
    }
}
