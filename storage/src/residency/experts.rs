//! The expert cache: single experts of stacked MoE tensors (`[cols, rows, n_expert]`), each read
//! from disk as one aligned request when first needed or when predicted (a slab per tensor, or
//! one record for gate, up and down in an optimized file), and kept under a byte budget. A slab
//! in use (a handle holds it) is never evicted.
//!
//! The forward pass tells the cache each layer's routing before it computes the layer
//! ([`ExpertCache::route`]): the experts it will use are kept until used, and those absent are
//! read in the background, in the order they will be used, by [`IO_THREADS`] threads with a
//! reader each, while the ones held compute. Guesses ([`ExpertCache::prefetch`], the likeliest
//! first) are read only while no routed read is under way.
//!
//! Policy (measured in `experts/tests.rs` on uniform, skewed and drifting routing traces):
//! evict the slab whose next use is estimated furthest away — Belady's rule with an estimate.
//! Layers run in a cycle, so a slab of tensor `t` that is not used in `t`'s current pass is
//! next needed at `t`'s next pass at the earliest, and with per-pass probability `p` after
//! `1/p` passes on average: its distance is `1/p − f` cycles, `f` the fraction of a cycle since
//! `t`'s pass began. `p` is the slab's use count over the passes since its first use, both
//! decayed by `GAMMA` per pass (popularity drifts with the text), shrunk toward a prior. Under
//! uniform routing this keeps whole layers (what Belady does for a cycle, where LRU evicts
//! each slab just before its layer comes round); under skewed routing it keeps the popular
//! experts (as LFU does), and decay lets go of those that stop being used.
//! `STRATA_EXPERT_POLICY=lru` or `lfu` (LFU with decay by uses) switch for comparison.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;

use crate::buf::AlignedBuf;
use crate::io::{DIRECT_ALIGN, IoError, ReadReq, Reader};

/// (tensor index, expert): one slab, or in strata's strided layout (`strata optimize`) the
/// record of an expert that holds its slabs of every tensor in the group, keyed by the group's
/// first tensor.
pub(super) type Key = (u32, u32);

/// Which slab the expert cache evicts first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    /// Least recently used (for comparison).
    Lru,
    /// Least frequently used, with decay by uses (for comparison).
    LfuDecay,
    /// The slab whose next use is estimated furthest away (the default).
    #[default]
    NextUse,
}

impl Policy {
    /// The policy `STRATA_EXPERT_POLICY` names: `lru`, `lfu`, or (unset, empty or `next-use`)
    /// the default.
    pub fn from_name(s: &str) -> Result<Self, String> {
        match s {
            "lru" => Ok(Policy::Lru),
            "lfu" | "lfu-decay" => Ok(Policy::LfuDecay),
            "" | "next-use" => Ok(Policy::NextUse),
            _ => Err(format!(
                "expert cache policy {s:?}: expected lru, lfu or next-use"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Policy::Lru => "lru",
            Policy::LfuDecay => "lfu-decay",
            Policy::NextUse => "next-use",
        }
    }
}

/// Per-pass decay of an expert's use count and of the passes it is counted over.
const GAMMA: f64 = 0.98;
/// `GAMMA^d` for the first passes (0 beyond: a use that long ago no longer counts).
fn gamma_pow(d: u64) -> f64 {
    static TABLE: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| (0..1024).map(|i| GAMMA.powi(i)).collect());
    t.get(d as usize).copied().unwrap_or(0.0)
}

/// The prior the use rate is shrunk toward, and its weight in passes.
const PRIOR_RATE: f64 = 0.1;
const PRIOR_PASSES: f64 = 4.0;

struct Entry {
    buf: Arc<AlignedBuf>,
    /// Offset of the slab's first byte in `buf` (the read starts at an aligned offset).
    skip: usize,
    score: f64,
    last: u64,
    /// A prefetched slab not used yet is kept until this tick, so that newer guesses and
    /// demand reads do not evict it before its layer runs.
    protect_until: u64,
    /// Brought in by a prefetch and not used yet (its first use counts as a prefetch hit).
    unused_guess: bool,
    /// Brought in by [`ExpertCache::route`] and not used yet (its first use is a miss).
    routed_read: bool,
    /// Routed for the pass under way and not used yet: never evicted.
    needed: bool,
    /// Brought in by a guess that its pass's routing proved wrong, and not used since.
    wrong_guess: bool,
    /// Decayed uses, as of pass `seen` of the slab's tensor.
    uses: f64,
    seen: u64,
    /// The tensor's pass of the slab's first use (`None`: not used yet).
    first: Option<u64>,
}

/// The passes of one tensor (a layer's gate, up or down experts).
#[derive(Clone, Copy, Default)]
struct Passes {
    count: u64,
    /// Tick of the last pass's start.
    start: u64,
}

/// A queued read: the slab, its file range, and what it is for.
type Job = (Key, u64, usize, Why);

/// What a queued read is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Why {
    Guess,
    Routed,
}

/// Cache uses (ticks) a prefetched, unused slab is protected for: a few layers' worth.
const PROTECT: u64 = 512;

struct State {
    entries: HashMap<Key, Entry>,
    loading: HashSet<Key>,
    queue: VecDeque<Job>,
    bytes: u64,
    tick: u64,
    passes: HashMap<u32, Passes>,
    /// Buffers of evicted slabs, by length, reused for the next reads (no allocation, zeroing
    /// or page faults per miss once the cache is full); at most 1/16 of the budget.
    pool: HashMap<usize, Vec<AlignedBuf>>,
    pool_bytes: u64,
    /// Ticks between two passes of one tensor (a moving average): one cycle of the layers.
    cycle: f64,
    /// I/O threads reading guesses now (at most [`GUESS_THREADS`]).
    guessing: usize,
    /// I/O threads reading routed slabs now: guesses wait until there are none.
    routing: usize,
    /// [`ExpertCache::route`]'s sets of the keys and tensors routed, kept for their capacity
    /// (a routing allocates nothing once warm).
    routed: HashSet<Key>,
    tensors: Vec<u32>,
    shutdown: bool,
}

impl State {
    /// The estimated distance to the next use of `e` (key `k`), in layer cycles; the
    /// largest is evicted first.
    fn distance(&self, k: Key, e: &Entry) -> f64 {
        if e.wrong_guess {
            return f64::INFINITY;
        }
        let p = self.passes.get(&k.0).copied().unwrap_or_default();
        let (uses, n) = match e.first {
            Some(first) => {
                let since = p.count.saturating_sub(first);
                let uses = e.uses * gamma_pow(p.count.saturating_sub(e.seen));
                (uses, (1.0 - gamma_pow(since + 1)) / (1.0 - GAMMA))
            }
            None => (0.0, 0.0),
        };
        let rate = (uses + PRIOR_RATE * PRIOR_PASSES) / (n + PRIOR_PASSES);
        let into_cycle = if self.cycle > 0.0 {
            ((self.tick.saturating_sub(p.start)) as f64 / self.cycle).min(1.0)
        } else {
            0.0
        };
        1.0 / rate - into_cycle
    }
}

#[derive(Default)]
pub(super) struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Hits on slabs a prefetch brought in (or was bringing in).
    pub prefetch_hits: AtomicU64,
    pub prefetches: AtomicU64,
    pub evictions: AtomicU64,
    /// Nanoseconds callers of [`ExpertCache::get`] waited for a slab being read.
    pub wait_ns: AtomicU64,
}

pub(super) struct Shared {
    /// The first reads on demand ([`ExpertCache::get`]); each of the others serves one I/O
    /// thread (the first too when it is alone).
    readers: Vec<Reader>,
    budget: u64,
    policy: Policy,
    state: Mutex<State>,
    cv: Condvar,
    pub(super) counters: Counters,
    /// What is done to a slab or record after its read, before it enters the cache
    /// ([`ExpertCache::set_prepare`]).
    prepare: OnceLock<PrepareKey>,
}

/// The preparation of the bytes read for a key.
pub(super) type PrepareKey = Box<dyn Fn(Key, &mut [u8]) + Send + Sync>;

pub(super) struct ExpertCache {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

const DECAY_EVERY: u64 = 4096;

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops the guesses still queued (stale once newer ones or the real routing come).
    fn drop_guesses(&self, st: &mut State) {
        let State { queue, loading, .. } = st;
        queue.retain(|j| {
            let stale = j.3 == Why::Guess;
            if stale {
                loading.remove(&j.0);
            }
            !stale
        });
    }

    /// Reads `[start, start + len)` of the file (key `key`) into an aligned buffer (from the
    /// pool or new).
    fn read(&self, key: Key, start: u64, len: usize) -> Result<(Arc<AlignedBuf>, usize), IoError> {
        let mut one = self.read_many(&self.readers[0], &[(key, start, len)])?;
        one.pop().ok_or_else(|| IoError::Read {
            path: self.readers[0].path().to_path_buf(),
            offset: start,
            len,
            source: std::io::Error::other("no buffer"),
        })
    }

    /// Reads several `(key, start, len)` ranges in one call (all in flight together), each
    /// prepared as [`ExpertCache::set_prepare`] says.
    fn read_many(
        &self,
        reader: &Reader,
        ranges: &[(Key, u64, usize)],
    ) -> Result<Vec<(Arc<AlignedBuf>, usize)>, IoError> {
        let a = DIRECT_ALIGN as u64;
        let mut bufs = Vec::with_capacity(ranges.len());
        for &(_, start, len) in ranges {
            let lo = start / a * a;
            let hi = (start + len as u64).next_multiple_of(a);
            let buf = self.buffer((hi - lo) as usize).map_err(|e| IoError::Read {
                path: reader.path().to_path_buf(),
                offset: start,
                len,
                source: std::io::Error::other(e),
            })?;
            bufs.push((buf, (start - lo) as usize, lo, len));
        }
        let mut reqs: Vec<ReadReq<'_>> = bufs
            .iter_mut()
            .map(|(buf, skip, lo, len)| ReadReq {
                offset: *lo,
                buf: buf.as_mut_slice(),
                need: *skip + *len,
                fixed: None,
            })
            .collect();
        reader.read(&mut reqs)?;
        drop(reqs);
        if let Some(prepare) = self.prepare.get() {
            for ((buf, skip, _, len), &(key, _, _)) in bufs.iter_mut().zip(ranges) {
                prepare(key, &mut buf.as_mut_slice()[*skip..*skip + *len]);
            }
        }
        Ok(bufs
            .into_iter()
            .map(|(b, skip, _, _)| (Arc::new(b), skip))
            .collect())
    }

    /// Makes room for `need` more bytes, evicting unused slabs by policy.
    fn make_room(&self, st: &mut State, need: u64) {
        if st.bytes + need <= self.budget {
            return;
        }
        // Ranking every slab costs a pass over the cache: evict down to a little below the
        // budget at once, so that the next few inserts need none.
        let target = self.budget.saturating_sub(need + self.budget / 64);
        let tick = st.tick;
        let mut ranked: Vec<(Key, f64, u64)> = st
            .entries
            .iter()
            .filter(|(_, e)| Arc::strong_count(&e.buf) == 1 && e.protect_until <= tick && !e.needed)
            .map(|(k, e)| {
                // Larger first, then the least recently used.
                let first = match self.policy {
                    Policy::Lru => 0.0,
                    Policy::LfuDecay => -e.score,
                    Policy::NextUse => st.distance(*k, e),
                };
                (*k, first, e.last)
            })
            .collect();
        ranked.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.2.cmp(&b.2)));
        for (k, _, _) in ranked {
            if st.bytes <= target {
                break;
            }
            if let Some(e) = st.entries.remove(&k) {
                let len = e.buf.len();
                st.bytes -= len as u64;
                self.counters.evictions.fetch_add(1, Ordering::Relaxed);
                if st.pool_bytes + len as u64 <= self.budget / 16
                    && let Ok(buf) = Arc::try_unwrap(e.buf)
                {
                    st.pool_bytes += len as u64;
                    st.pool.entry(len).or_default().push(buf);
                }
            }
        }
    }

    /// A buffer of `len` bytes: one from the pool, else a new one.
    fn buffer(&self, len: usize) -> Result<AlignedBuf, crate::buf::AllocError> {
        {
            let mut st = self.lock();
            if let Some(buf) = st.pool.get_mut(&len).and_then(Vec::pop) {
                st.pool_bytes -= len as u64;
                return Ok(buf);
            }
        }
        AlignedBuf::zeroed(len)
    }

    fn insert(
        &self,
        st: &mut State,
        key: Key,
        buf: Arc<AlignedBuf>,
        skip: usize,
        why: Option<Why>,
    ) {
        self.make_room(st, buf.len() as u64);
        st.bytes += buf.len() as u64;
        let tick = st.tick;
        let seen = st.passes.get(&key.0).map_or(0, |p| p.count);
        st.entries.insert(
            key,
            Entry {
                buf,
                skip,
                score: 0.0,
                last: tick,
                protect_until: if why == Some(Why::Guess) {
                    tick + PROTECT
                } else {
                    0
                },
                unused_guess: why == Some(Why::Guess),
                routed_read: why == Some(Why::Routed),
                needed: why == Some(Why::Routed),
                wrong_guess: false,
                uses: 0.0,
                seen,
                first: None,
            },
        );
    }

    /// Records a use of `key`; its buffer, offset, and how it came to be there (told once, to
    /// the first use that `counts`).
    fn touch(&self, st: &mut State, key: Key, counts: bool) -> Option<Touched> {
        st.tick += 1;
        let tick = st.tick;
        if tick.is_multiple_of(DECAY_EVERY) {
            st.entries.values_mut().for_each(|e| e.score *= 0.5);
        }
        let pass = st.passes.get(&key.0).map_or(0, |p| p.count);
        let e = st.entries.get_mut(&key)?;
        e.score += 1.0;
        e.last = tick;
        e.protect_until = 0;
        e.needed = false;
        e.wrong_guess = false;
        // One use per pass counts (a batch's several tokens on one expert are one use).
        if e.first.is_none() || e.seen != pass {
            e.uses = e.uses * gamma_pow(pass.saturating_sub(e.seen)) + 1.0;
            e.seen = pass;
            e.first.get_or_insert(pass);
        }
        Some(Touched {
            buf: Arc::clone(&e.buf),
            skip: e.skip,
            guessed: counts && std::mem::take(&mut e.unused_guess),
            routed_read: counts && std::mem::take(&mut e.routed_read),
        })
    }
}

struct Touched {
    buf: Arc<AlignedBuf>,
    skip: usize,
    guessed: bool,
    routed_read: bool,
}

impl ExpertCache {
    /// `readers` (at least one): the first for reads on demand, one I/O thread for each of the
    /// others (or one on the first when it is alone).
    pub(super) fn with_policy(
        readers: Vec<Reader>,
        budget: u64,
        policy: Policy,
    ) -> Result<Self, std::io::Error> {
        if readers.is_empty() {
            return Err(std::io::Error::other("expert cache: no reader"));
        }
        let n_threads = (readers.len() - 1).max(1);
        let shared = Arc::new(Shared {
            readers,
            budget,
            policy,
            state: Mutex::new(State {
                entries: HashMap::new(),
                loading: HashSet::new(),
                queue: VecDeque::new(),
                bytes: 0,
                tick: 0,
                passes: HashMap::new(),
                pool: HashMap::new(),
                pool_bytes: 0,
                cycle: 0.0,
                guessing: 0,
                routing: 0,
                routed: HashSet::new(),
                tensors: Vec::new(),
                shutdown: false,
            }),
            cv: Condvar::new(),
            counters: Counters::default(),
            prepare: OnceLock::new(),
        });
        let mut cache = Self {
            shared,
            threads: Vec::with_capacity(n_threads),
        };
        for i in 0..n_threads {
            let worker = Arc::clone(&cache.shared);
            let r = if worker.readers.len() == 1 { 0 } else { i + 1 };
            // On failure `cache` is dropped, which stops the threads already started.
            cache.threads.push(
                std::thread::Builder::new()
                    .name(format!("strata-experts-{i}"))
                    .spawn(move || io_thread(&worker, r))?,
            );
        }
        Ok(cache)
    }

    pub(super) fn shared(&self) -> &Shared {
        &self.shared
    }

    pub(super) fn policy(&self) -> Policy {
        self.shared.policy
    }

    pub(super) fn io_stats(&self) -> crate::io::IoStats {
        let mut s = crate::io::IoStats::default();
        for r in &self.shared.readers {
            s += r.stats();
        }
        s
    }

    pub(super) fn bytes(&self) -> u64 {
        self.shared.lock().bytes
    }

    /// The slab `key` (file range `start..start + len`): from the cache, waiting for a prefetch
    /// under way, or read now. `count`: the use counts as a hit or a miss (a record that
    /// serves several tensors counts once).
    pub(super) fn get(
        &self,
        key: Key,
        start: u64,
        len: usize,
        count: bool,
    ) -> Result<(Arc<AlignedBuf>, usize), IoError> {
        let sh = &*self.shared;
        let mut st = sh.lock();
        let mut waited: Option<std::time::Instant> = None;
        loop {
            if let Some(t) = sh.touch(&mut st, key, count) {
                drop(st);
                if let Some(w) = waited {
                    sh.counters
                        .wait_ns
                        .fetch_add(w.elapsed().as_nanos() as u64, Ordering::Relaxed);
                }
                if count {
                    if t.routed_read {
                        sh.counters.misses.fetch_add(1, Ordering::Relaxed);
                    } else {
                        sh.counters.hits.fetch_add(1, Ordering::Relaxed);
                    }
                    if t.guessed {
                        sh.counters.prefetch_hits.fetch_add(1, Ordering::Relaxed);
                    }
                }
                return Ok((t.buf, t.skip));
            }
            if !st.loading.contains(&key) {
                break;
            }
            waited.get_or_insert_with(std::time::Instant::now);
            st = sh.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.loading.insert(key);
        drop(st);
        if count {
            sh.counters.misses.fetch_add(1, Ordering::Relaxed);
        }
        let t0 = waited.unwrap_or_else(std::time::Instant::now);
        let r = sh.read(key, start, len);
        sh.counters
            .wait_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let mut st = sh.lock();
        st.loading.remove(&key);
        sh.cv.notify_all();
        let (buf, skip) = r?;
        sh.insert(&mut st, key, Arc::clone(&buf), skip, None);
        sh.touch(&mut st, key, count);
        Ok((buf, skip))
    }

    /// The routing of a pass about to run: `keys` are the slabs it will use, of one or more
    /// tensors (each tensor's pass is counted once). Slabs present are kept until used; absent
    /// ones are read in the background in the order of `keys`, and count as misses when used.
    /// Guesses still queued join them when right (they too count as misses) and are dropped
    /// when wrong: this pass's routing is known now.
    pub(super) fn route(&self, keys: &[(Key, u64, usize)]) {
        let sh = &*self.shared;
        let mut st = sh.lock();
        let mut routed = std::mem::take(&mut st.routed);
        let mut tensors = std::mem::take(&mut st.tensors);
        routed.clear();
        routed.extend(keys.iter().map(|k| k.0));
        tensors.clear();
        for k in keys {
            if !tensors.contains(&k.0.0) {
                tensors.push(k.0.0);
            }
        }
        // This pass's guesses not read yet leave the queue: the wrong ones for good, the right
        // ones to be read with the routed slabs below, in this pass's order (they count as
        // misses: they were not there in time).
        {
            let State { queue, loading, .. } = &mut *st;
            queue.retain(|j| {
                let stale = j.3 == Why::Guess && tensors.contains(&j.0.0);
                if stale {
                    loading.remove(&j.0);
                }
                !stale
            });
        }
        let tick = st.tick;
        for &t in &tensors {
            let p = st.passes.entry(t).or_default();
            let gap = tick.saturating_sub(p.start) as f64;
            let first = p.count == 0;
            p.count += 1;
            p.start = tick;
            if !first && gap > 0.0 {
                st.cycle = if st.cycle == 0.0 {
                    gap
                } else {
                    0.9 * st.cycle + 0.1 * gap
                };
            }
        }
        // Slabs of these tensors guessed and not routed were wrong guesses: unprotected, and
        // the first to go.
        for (k, e) in st.entries.iter_mut() {
            if e.unused_guess && tensors.contains(&k.0) && !routed.contains(k) {
                e.unused_guess = false;
                e.protect_until = 0;
                e.last = 0;
                e.wrong_guess = true;
            }
        }
        for &(key, start, len) in keys {
            if let Some(e) = st.entries.get_mut(&key) {
                e.needed = true;
                continue;
            }
            if st.loading.insert(key) {
                st.queue.push_back((key, start, len, Why::Routed));
            }
        }
        st.routed = routed;
        st.tensors = tensors;
        sh.cv.notify_all();
    }

    /// Orders experts `es` so that those whose slabs of every tensor in `tensors` are in the
    /// cache now (a `get` would not wait) come first, keeping the order within each part.
    pub(super) fn sort_held_first(
        &self,
        tensors: impl Iterator<Item = u32> + Clone,
        es: &mut [usize],
    ) {
        let st = self.shared.lock();
        es.sort_by_key(|&e| {
            !tensors
                .clone()
                .all(|t| st.entries.contains_key(&(t, e as u32)))
        });
    }

    /// Has `prepare` run on the bytes of every later read (once only). Slabs read before are
    /// dropped, so that every byte a handle shows from now on has been prepared; an error
    /// while one is in use.
    pub(super) fn set_prepare(&self, prepare: PrepareKey) -> Result<(), String> {
        let sh = &*self.shared;
        let mut st = sh.lock();
        while !st.loading.is_empty() {
            st = sh.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.entries.retain(|_, e| Arc::strong_count(&e.buf) > 1);
        if !st.entries.is_empty() {
            return Err("an expert slab is held while its preparation is set".into());
        }
        st.bytes = 0;
        sh.prepare
            .set(prepare)
            .map_err(|_| "expert slabs prepared twice".to_string())
    }

    /// Drops every slab not in use (a cold start for a measurement); counters are kept.
    pub(super) fn clear(&self) {
        let sh = &*self.shared;
        let mut st = sh.lock();
        sh.drop_guesses(&mut st);
        let before = st.entries.len();
        st.entries
            .retain(|_, e| Arc::strong_count(&e.buf) > 1 || e.needed);
        st.bytes = st.entries.values().map(|e| e.buf.len() as u64).sum();
        tracing::debug!(dropped = before - st.entries.len(), "expert cache cleared");
    }

    /// Asks for slabs to be read in the background (those absent and not already coming).
    /// The guesses for a pass stay queued until its routing comes ([`ExpertCache::route`]
    /// drops the wrong ones not read yet).
    pub(super) fn prefetch(&self, keys: &[(Key, u64, usize)]) {
        let sh = &*self.shared;
        let mut st = sh.lock();
        for &(key, start, len) in keys {
            if st.entries.contains_key(&key) || st.loading.contains(&key) {
                continue;
            }
            st.loading.insert(key);
            st.queue.push_back((key, start, len, Why::Guess));
            sh.counters.prefetches.fetch_add(1, Ordering::Relaxed);
        }
        sh.cv.notify_all();
    }
}

impl Drop for ExpertCache {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.cv.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// I/O threads reading experts (each its own reader, so that their reads are in flight
/// together); [`GUESS_THREADS`] of them at most read guesses at a time, in batches of
/// [`GUESS_BATCH_BYTES`], and only while no routed read is under way: a routing's reads find
/// a thread free and wait for little more than one small batch of guesses, and the disk
/// spends on guesses only the time the passes leave it. (More guess threads, or larger
/// batches, read more wrong guesses per token and made a slow disk slower.)
pub(super) const IO_THREADS: usize = 4;
const GUESS_THREADS: usize = 1;

/// Bytes of routed slabs read in one batch (at least one slab), and of guesses: small, so
/// that a pass's misses arrive as they are read and spread over the threads, and wrong
/// guesses not read yet can still be dropped.
const BATCH_BYTES: usize = 4 << 20;
const GUESS_BATCH_BYTES: usize = 2 << 20;

/// The next reads to issue: routed ones if any are queued (in queue order, up to
/// [`BATCH_BYTES`]), else guesses when `guesses` allows (up to [`GUESS_BATCH_BYTES`]); `None`
/// when there is nothing to take.
fn take_batch(queue: &mut VecDeque<Job>, guesses: bool) -> Option<(Vec<Job>, Why)> {
    let why = if queue.iter().any(|j| j.3 == Why::Routed) {
        Why::Routed
    } else if guesses && !queue.is_empty() {
        Why::Guess
    } else {
        return None;
    };
    let cap = match why {
        Why::Routed => BATCH_BYTES,
        Why::Guess => GUESS_BATCH_BYTES,
    };
    let (mut bytes, mut take) = (0usize, Vec::new());
    for (i, j) in queue.iter().enumerate() {
        if j.3 != why {
            continue;
        }
        if take.len() == 64 || (!take.is_empty() && bytes + j.2 > cap) {
            break;
        }
        bytes += j.2;
        take.push(i);
    }
    let batch = take.iter().map(|&i| queue[i]).collect();
    for &i in take.iter().rev() {
        queue.remove(i);
    }
    Some((batch, why))
}

/// One I/O thread: takes batches off the queue and reads them with reader `r`.
fn io_thread(sh: &Shared, r: usize) {
    loop {
        let (jobs, why) = {
            let mut st = sh.lock();
            loop {
                if st.shutdown {
                    return;
                }
                // Guesses only while no routed read is under way: a pass waits for those, and
                // a wrong guess is bandwidth taken from them.
                let guesses = st.guessing < GUESS_THREADS && st.routing == 0;
                if let Some(b) = take_batch(&mut st.queue, guesses) {
                    match b.1 {
                        Why::Guess => st.guessing += 1,
                        Why::Routed => st.routing += 1,
                    }
                    break b;
                }
                st = sh.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        };
        let reads: Vec<(Key, u64, usize)> = jobs.iter().map(|&(k, s, l, _)| (k, s, l)).collect();
        let res = sh.read_many(&sh.readers[r], &reads);
        let mut st = sh.lock();
        match why {
            Why::Guess => st.guessing -= 1,
            Why::Routed => st.routing -= 1,
        }
        for (key, _, _, _) in &jobs {
            st.loading.remove(key);
        }
        match res {
            Ok(bufs) => {
                for ((key, _, _, why), (buf, skip)) in jobs.iter().zip(bufs) {
                    sh.insert(&mut st, *key, buf, skip, Some(*why));
                }
            }
            // A failed prefetch is only a lost guess: the demand read reports the error.
            Err(e) => tracing::debug!("expert prefetch failed: {e}"),
        }
        sh.cv.notify_all();
    }
}

#[cfg(test)]
mod tests;
