//! The persistent worker pool every parallel kernel runs on.
//!
//! Workers are spawned once in [`ThreadPool::new`] and live until the pool is dropped. A call
//! to [`ThreadPool::run`] publishes one job (a borrowed closure), wakes the workers, runs the
//! caller's own share as thread 0 and waits for the rest. Waiting is spin-then-park on both
//! sides: back-to-back matmuls (a decode step is a few hundred of them) find the workers still
//! spinning and pay no futex round trip, while an idle pool sleeps and costs nothing.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

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

/// A fixed set of worker threads that run closures on every thread at once.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises `run` calls from different threads.
    run_lock: Mutex<()>,
}

thread_local! {
    /// True on a thread that is executing a pool job, so a nested `run` runs inline instead of
    /// deadlocking.
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

impl ThreadPool {
    /// A pool of `n_threads` threads in all, the caller of [`ThreadPool::run`] included, so
    /// `n_threads - 1` workers are spawned (`0` is treated as `1`).
    pub fn new(n_threads: usize) -> Self {
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
        let mut workers = Vec::with_capacity(n_threads - 1);
        for index in 1..n_threads {
            let s = Arc::clone(&shared);
            let spawned = thread::Builder::new()
                .name(format!("strata-simd-{index}"))
                .spawn(move || worker_loop(&s, index));
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
        shared.n_threads.store(workers.len() + 1, Ordering::Relaxed);
        Self {
            shared,
            workers,
            run_lock: Mutex::new(()),
        }
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
    }
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("n_threads", &self.n_threads())
            .finish()
    }
}
