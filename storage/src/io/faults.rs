//! Injected I/O faults: the seam of DESIGN.md invariant 6.
//!
//! A plan is a comma-separated list, e.g. `STRATA_IO_FAULTS=eio=3,short=2,delay_ms=5`:
//! - `eio=N` — the N-th completed chunk (counting from 1 over the reader's life) fails with EIO;
//!   `eio=N+K` fails K chunks from the N-th on. Later reads succeed again.
//! - `short=N` — every N-th completion returns half of what it read (a short read).
//! - `eof=BYTES` — the file seems to end at BYTES (reads past it return 0, reads across it are cut).
//! - `delay_ms=N` — every completion is held back N milliseconds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Clone, Debug, Default)]
pub struct Faults {
    eio_from: Option<u64>,
    eio_count: u64,
    short_every: Option<u64>,
    eof_at: Option<u64>,
    delay: Duration,
    seen: Arc<AtomicU64>,
}

impl Faults {
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut f = Faults::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not KEY=VALUE"))?;
            let num = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| format!("{key}: {v:?} is not a whole number"))
            };
            match key {
                "eio" => {
                    let (from, count) = match value.split_once('+') {
                        Some((a, b)) => (num(a)?, num(b)?),
                        None => (num(value)?, 1),
                    };
                    if from == 0 {
                        return Err("eio: chunks are counted from 1".into());
                    }
                    f.eio_from = Some(from);
                    f.eio_count = count;
                }
                "short" => {
                    let n = num(value)?;
                    if n == 0 {
                        return Err("short: must be at least 1".into());
                    }
                    f.short_every = Some(n);
                }
                "eof" => f.eof_at = Some(num(value)?),
                "delay_ms" => f.delay = Duration::from_millis(num(value)?.min(60_000)),
                _ => {
                    return Err(format!(
                        "unknown fault {key:?} (known: eio, short, eof, delay_ms)"
                    ));
                }
            }
        }
        Ok(f)
    }

    /// The result the reader sees for a chunk of `len` bytes at `off` that really returned
    /// `res`.
    pub(super) fn apply(&self, off: u64, len: usize, res: i64) -> i64 {
        let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        if res < 0 {
            return res;
        }
        if let Some(from) = self.eio_from
            && n >= from
            && n - from < self.eio_count
        {
            return -i64::from(libc::EIO);
        }
        let mut res = res;
        if let Some(end) = self.eof_at {
            res = res.min(end.saturating_sub(off) as i64);
        }
        if let Some(every) = self.short_every
            && n.is_multiple_of(every)
            && res > 1
            && res as usize == len
        {
            res /= 2;
        }
        res
    }
}
