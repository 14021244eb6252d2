//! The persistent thread pool: every index runs, results are visible after `run`, and the pool
//! survives many back-to-back jobs, nested calls and panics.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use strata_simd::pool::ThreadPool;

#[test]
fn runs_every_index_once() {
    for n in [1, 2, 3, 8] {
        let pool = ThreadPool::new(n);
        assert_eq!(pool.n_threads(), n);
        let seen = Mutex::new(Vec::new());
        pool.run(|i, nth| {
            assert_eq!(nth, n);
            seen.lock().unwrap().push(i);
        });
        let mut seen = seen.into_inner().unwrap();
        seen.sort();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
    }
}

#[test]
fn zero_threads_means_one() {
    let pool = ThreadPool::new(0);
    assert_eq!(pool.n_threads(), 1);
    let count = AtomicUsize::new(0);
    pool.run(|i, n| {
        assert_eq!((i, n), (0, 1));
        count.fetch_add(1, Ordering::Relaxed);
    });
    assert_eq!(count.load(Ordering::Relaxed), 1);
}

#[test]
fn many_jobs_in_a_row() {
    let pool = ThreadPool::new(4);
    let total = AtomicUsize::new(0);
    for round in 0..20_000 {
        let slots: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(0)).collect();
        pool.run(|i, _| {
            slots[i].store(round + i, Ordering::Relaxed);
            total.fetch_add(1, Ordering::Relaxed);
        });
        // Everything a job wrote is visible once `run` returns.
        for (i, s) in slots.iter().enumerate() {
            assert_eq!(s.load(Ordering::Relaxed), round + i);
        }
    }
    assert_eq!(total.load(Ordering::Relaxed), 80_000);
}

#[test]
fn idle_pool_wakes_after_parking() {
    let pool = ThreadPool::new(3);
    for _ in 0..3 {
        // Long enough for the workers to stop spinning and park.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let count = AtomicUsize::new(0);
        pool.run(|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 3);
    }
}

#[test]
fn nested_run_executes_inline() {
    let pool = ThreadPool::new(2);
    let count = AtomicUsize::new(0);
    pool.run(|_, _| {
        pool.run(|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
    });
    assert_eq!(count.load(Ordering::Relaxed), 4);
}

#[test]
fn worker_panic_is_reraised_and_pool_survives() {
    let pool = ThreadPool::new(3);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pool.run(|i, _| {
            if i == 2 {
                panic!("boom");
            }
        })
    }));
    assert!(r.is_err());
    let count = AtomicUsize::new(0);
    pool.run(|_, _| {
        count.fetch_add(1, Ordering::Relaxed);
    });
    assert_eq!(count.load(Ordering::Relaxed), 3);
}

#[test]
fn shared_between_threads() {
    let pool = ThreadPool::new(2);
    let count = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                for _ in 0..500 {
                    pool.run(|_, _| {
                        count.fetch_add(1, Ordering::Relaxed);
                    });
                }
            });
        }
    });
    assert_eq!(count.load(Ordering::Relaxed), 3 * 500 * 2);
}
