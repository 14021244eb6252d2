//! The expert cache: single experts of stacked MoE tensors (`[cols, rows, n_expert]`), each read
//! from disk as one aligned request when first needed or when predicted, and kept under a byte
//! budget. A slab in use (a handle holds it) is never evicted.
//!
//! Policy: LFU with decay — each use adds 1 to an expert's score, every score halves each time
//! `decay_every` uses have passed, and the lowest score goes first (ties: least recently used).
//! Routing is skewed toward popular experts in real MoE models, which plain LRU forgets after
//! one sweep of cold experts; `STRATA_EXPERT_POLICY=lru` switches to LRU for comparison.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::buf::AlignedBuf;
use crate::io::{DIRECT_ALIGN, IoError, ReadReq, Reader};

/// (tensor index, expert).
pub(super) type Key = (u32, u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Policy {
    Lru,
    LfuDecay,
}

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
}

/// Cache uses (ticks) a prefetched, unused slab is protected for: a few layers' worth.
const PROTECT: u64 = 512;

struct State {
    entries: HashMap<Key, Entry>,
    loading: HashSet<Key>,
    queue: VecDeque<(Key, u64, usize)>,
    bytes: u64,
    tick: u64,
    shutdown: bool,
}

#[derive(Default)]
pub(super) struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Hits on slabs a prefetch brought in (or was bringing in).
    pub prefetch_hits: AtomicU64,
    pub prefetches: AtomicU64,
    pub evictions: AtomicU64,
}

pub(super) struct Shared {
    reader: Reader,
    budget: u64,
    policy: Policy,
    state: Mutex<State>,
    cv: Condvar,
    pub(super) counters: Counters,
}

pub(super) struct ExpertCache {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

const DECAY_EVERY: u64 = 4096;

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads `[start, start + len)` of the file into a fresh aligned buffer.
    fn read(&self, start: u64, len: usize) -> Result<(Arc<AlignedBuf>, usize), IoError> {
        let mut one = self.read_many(&[((0, 0), start, len)])?;
        one.pop().ok_or_else(|| IoError::Read {
            path: self.reader.path().to_path_buf(),
            offset: start,
            len,
            source: std::io::Error::other("no buffer"),
        })
    }

    /// Reads several slabs in one call (all in flight together).
    fn read_many(
        &self,
        jobs: &[(Key, u64, usize)],
    ) -> Result<Vec<(Arc<AlignedBuf>, usize)>, IoError> {
        let a = DIRECT_ALIGN as u64;
        let mut bufs = Vec::with_capacity(jobs.len());
        for &(_, start, len) in jobs {
            let lo = start / a * a;
            let hi = (start + len as u64).next_multiple_of(a);
            let buf = AlignedBuf::zeroed((hi - lo) as usize).map_err(|e| IoError::Read {
                path: self.reader.path().to_path_buf(),
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
        self.reader.read(&mut reqs)?;
        drop(reqs);
        Ok(bufs
            .into_iter()
            .map(|(b, skip, _, _)| (Arc::new(b), skip))
            .collect())
    }

    /// Makes room for `need` more bytes, evicting unused slabs by policy.
    fn make_room(&self, st: &mut State, need: u64) {
        while st.bytes + need > self.budget {
            let tick = st.tick;
            let victim = st
                .entries
                .iter()
                .filter(|(_, e)| Arc::strong_count(&e.buf) == 1 && e.protect_until <= tick)
                .min_by(|a, b| match self.policy {
                    Policy::Lru => a.1.last.cmp(&b.1.last),
                    Policy::LfuDecay => {
                        a.1.score
                            .total_cmp(&b.1.score)
                            .then(a.1.last.cmp(&b.1.last))
                    }
                })
                .map(|(k, _)| *k);
            let Some(k) = victim else { return };
            if let Some(e) = st.entries.remove(&k) {
                st.bytes -= e.buf.len() as u64;
                self.counters.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn insert(
        &self,
        st: &mut State,
        key: Key,
        buf: Arc<AlignedBuf>,
        skip: usize,
        prefetched: bool,
    ) {
        self.make_room(st, buf.len() as u64);
        st.bytes += buf.len() as u64;
        let tick = st.tick;
        st.entries.insert(
            key,
            Entry {
                buf,
                skip,
                score: 0.0,
                last: tick,
                protect_until: if prefetched { tick + PROTECT } else { 0 },
                unused_guess: prefetched,
            },
        );
    }

    /// Records a use of `key`; its buffer, offset, and whether a prefetch brought it in.
    fn touch(&self, st: &mut State, key: Key) -> Option<(Arc<AlignedBuf>, usize, bool)> {
        st.tick += 1;
        let tick = st.tick;
        if tick.is_multiple_of(DECAY_EVERY) {
            st.entries.values_mut().for_each(|e| e.score *= 0.5);
        }
        let e = st.entries.get_mut(&key)?;
        e.score += 1.0;
        e.last = tick;
        e.protect_until = 0;
        let guessed = std::mem::take(&mut e.unused_guess);
        Some((Arc::clone(&e.buf), e.skip, guessed))
    }
}

impl ExpertCache {
    pub(super) fn new(reader: Reader, budget: u64) -> Result<Self, std::io::Error> {
        let policy = match std::env::var("STRATA_EXPERT_POLICY").ok().as_deref() {
            Some("lru") => Policy::Lru,
            _ => Policy::LfuDecay,
        };
        let shared = Arc::new(Shared {
            reader,
            budget,
            policy,
            state: Mutex::new(State {
                entries: HashMap::new(),
                loading: HashSet::new(),
                queue: VecDeque::new(),
                bytes: 0,
                tick: 0,
                shutdown: false,
            }),
            cv: Condvar::new(),
            counters: Counters::default(),
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("strata-experts".into())
            .spawn(move || prefetch_thread(&worker))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    pub(super) fn shared(&self) -> &Shared {
        &self.shared
    }

    pub(super) fn policy(&self) -> Policy {
        self.shared.policy
    }

    pub(super) fn io_stats(&self) -> crate::io::IoStats {
        self.shared.reader.stats()
    }

    pub(super) fn bytes(&self) -> u64 {
        self.shared.lock().bytes
    }

    /// The slab `key` (file range `start..start + len`): from the cache, waiting for a prefetch
    /// under way, or read now.
    pub(super) fn get(
        &self,
        key: Key,
        start: u64,
        len: usize,
    ) -> Result<(Arc<AlignedBuf>, usize), IoError> {
        let sh = &*self.shared;
        let mut st = sh.lock();
        loop {
            if let Some((buf, skip, guessed)) = sh.touch(&mut st, key) {
                drop(st);
                sh.counters.hits.fetch_add(1, Ordering::Relaxed);
                if guessed {
                    sh.counters.prefetch_hits.fetch_add(1, Ordering::Relaxed);
                }
                return Ok((buf, skip));
            }
            if !st.loading.contains(&key) {
                break;
            }
            st = sh.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.loading.insert(key);
        drop(st);
        sh.counters.misses.fetch_add(1, Ordering::Relaxed);
        let r = sh.read(start, len);
        let mut st = sh.lock();
        st.loading.remove(&key);
        sh.cv.notify_all();
        let (buf, skip) = r?;
        sh.insert(&mut st, key, Arc::clone(&buf), skip, false);
        sh.touch(&mut st, key);
        Ok((buf, skip))
    }

    /// Asks for slabs to be read in the background (those absent and not already coming).
    /// Guesses still queued from before are dropped: they were for the layer computing now,
    /// which reads what it lacks itself, and a backlog would only read stale guesses.
    pub(super) fn prefetch(&self, keys: &[(Key, u64, usize)]) {
        let sh = &*self.shared;
        let mut st = sh.lock();
        let stale: Vec<Key> = st.queue.drain(..).map(|(k, _, _)| k).collect();
        for k in stale {
            st.loading.remove(&k);
        }
        for &(key, start, len) in keys {
            if st.entries.contains_key(&key) || st.loading.contains(&key) {
                continue;
            }
            st.loading.insert(key);
            st.queue.push_back((key, start, len));
            sh.counters.prefetches.fetch_add(1, Ordering::Relaxed);
        }
        sh.cv.notify_all();
    }
}

impl Drop for ExpertCache {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn prefetch_thread(sh: &Shared) {
    loop {
        // Every queued guess at once (up to 64), so the reads are all in flight together.
        let jobs: Vec<(Key, u64, usize)> = {
            let mut st = sh.lock();
            loop {
                if st.shutdown {
                    return;
                }
                if !st.queue.is_empty() {
                    let n = st.queue.len().min(64);
                    break st.queue.drain(..n).collect();
                }
                st = sh.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        };
        let r = sh.read_many(&jobs);
        let mut st = sh.lock();
        for (key, _, _) in &jobs {
            st.loading.remove(key);
        }
        match r {
            Ok(bufs) => {
                for ((key, _, _), (buf, skip)) in jobs.iter().zip(bufs) {
                    sh.insert(&mut st, *key, buf, skip, true);
                }
            }
            // A failed prefetch is only a lost guess: the demand read reports the error.
            Err(e) => tracing::debug!("expert prefetch failed: {e}"),
        }
        sh.cv.notify_all();
    }
}
