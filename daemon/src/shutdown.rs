//! The daemon's stopping state, shared by the HTTP side and the engine threads.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct Shutdown {
    stopping: AtomicBool,
    /// When running sequences are cut off.
    deadline: OnceLock<Instant>,
}

impl Shutdown {
    /// Stops taking new work; running sequences get `drain` to finish.
    pub fn begin(&self, drain: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.deadline.set(Instant::now() + drain);
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub fn drain_expired(&self) -> bool {
        self.deadline.get().is_some_and(|d| Instant::now() >= *d)
    }
}
