//! Streamed layers: a window of slot buffers, filled ahead of the computation by an I/O thread.
//!
//! Layers are used in a cycle (0, 1, …, n−1, then 0 again for the next token), so when group
//! `g` is first acquired the thread is asked to read `g+1 … g+window−1` into the slots whose
//! groups are needed furthest in the future — Belady's choice for a cyclic pattern, which plain
//! LRU gets wrong. A slot holding a pinned handle or a read in flight is never chosen, so the
//! bytes a handle shows stay put while it lives, and no buffer is reused while the kernel may
//! still write into it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::plan::Group;
use super::{Keep, ResidencyError, TensorHandle, Tier};
use crate::buf::AlignedBuf;
use crate::io::{IoError, IoStats, ReadReq, Reader};

#[derive(Clone)]
enum Status {
    Empty,
    Loading,
    Ready,
    Failed(Arc<IoError>),
}

#[derive(Clone)]
struct Slot {
    group: Option<usize>,
    status: Status,
    pins: u32,
}

struct State {
    slots: Vec<Slot>,
    /// Slots whose group the I/O thread should read, in order.
    queue: VecDeque<usize>,
    current: Option<usize>,
    shutdown: bool,
}

/// Counters of the streaming window.
#[derive(Default)]
pub(super) struct Counters {
    /// Acquires that found their group ready in a slot.
    pub hits: AtomicU64,
    /// Acquires that waited for a read already under way (prefetched too late).
    pub stalls: AtomicU64,
    /// Acquires that found their group absent and had to start its read.
    pub misses: AtomicU64,
    /// Reads started ahead of need.
    pub prefetches: AtomicU64,
    /// Time acquires spent waiting for reads.
    pub stall_ns: AtomicU64,
    pub groups_read: AtomicU64,
}

pub(super) struct Shared {
    // Declared before `slots`: the reader (and the io_uring ring that registered the slots)
    // is dropped first.
    reader: Reader,
    groups: Vec<Group>,
    slots: Vec<AlignedBuf>,
    window: usize,
    state: Mutex<State>,
    cv: Condvar,
    pub(super) counters: Counters,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.cv.wait(g).unwrap_or_else(|p| p.into_inner())
    }

    /// How many steps after `g` group `h` is next used.
    fn distance(&self, g: usize, h: usize) -> usize {
        let n = self.groups.len();
        (h + n - g) % n
    }

    /// The free slot (unpinned, no read in flight) whose contents are needed furthest after
    /// `g`, if that is more than `beyond` steps away.
    fn victim(&self, st: &State, g: usize, beyond: usize) -> Option<usize> {
        st.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.pins == 0 && !matches!(s.status, Status::Loading))
            .map(|(i, s)| {
                let d = match (&s.status, s.group) {
                    (Status::Ready, Some(h)) => self.distance(g, h),
                    _ => usize::MAX,
                };
                (d, i)
            })
            .filter(|&(d, _)| d > beyond)
            .max()
            .map(|(_, i)| i)
    }

    fn start_read(&self, st: &mut State, slot: usize, group: usize, urgent: bool) {
        st.slots[slot] = Slot {
            group: Some(group),
            status: Status::Loading,
            pins: 0,
        };
        if urgent {
            st.queue.push_front(slot);
        } else {
            st.queue.push_back(slot);
        }
        self.cv.notify_all();
    }

    /// Asks for the groups after `g`, up to the window, where a slot can be spared.
    fn prefetch(&self, st: &mut State, g: usize) {
        let n = self.groups.len();
        for d in 1..self.window.min(n) {
            let h = (g + d) % n;
            if st.slots.iter().any(|s| s.group == Some(h)) {
                continue;
            }
            match self.victim(st, g, d) {
                Some(slot) => {
                    self.start_read(st, slot, h, false);
                    self.counters.prefetches.fetch_add(1, Ordering::Relaxed);
                }
                None => break,
            }
        }
    }

    fn read_group(&self, slot: usize, group: usize) -> Result<(), IoError> {
        let base = self.slots[slot].as_ptr();
        let mut reqs: Vec<ReadReq<'_>> = self.groups[group]
            .extents
            .iter()
            .map(|e| ReadReq {
                offset: e.start,
                // SAFETY: the slot is Loading, so no handle views it and no other read targets
                // it until this one completes; the extent lies inside the slot (the planner
                // sizes slots to the largest group).
                buf: unsafe {
                    std::slice::from_raw_parts_mut(base.add(e.dst as usize), e.len as usize)
                },
                need: e.need as usize,
                fixed: Some(slot as u16),
            })
            .collect();
        self.reader.read(&mut reqs)
    }
}

/// The I/O thread and the window it fills.
pub(super) struct Streamer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Streamer {
    pub(super) fn new(
        reader: Reader,
        groups: Vec<Group>,
        window: usize,
        slot_bytes: usize,
    ) -> Result<Self, ResidencyError> {
        let slots = (0..window)
            .map(|_| AlignedBuf::zeroed(slot_bytes))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ResidencyError::Alloc { bytes: e.bytes })?;
        let regions: Vec<(*mut u8, usize)> = slots.iter().map(|b| (b.as_ptr(), b.len())).collect();
        // SAFETY: the slots live in `Shared` beside the reader, which is dropped first, and are
        // only written by reads through it.
        unsafe { reader.register_buffers(&regions) };
        let shared = Arc::new(Shared {
            reader,
            groups,
            slots,
            window,
            state: Mutex::new(State {
                slots: vec![
                    Slot {
                        group: None,
                        status: Status::Empty,
                        pins: 0,
                    };
                    window
                ],
                queue: VecDeque::new(),
                current: None,
                shutdown: false,
            }),
            cv: Condvar::new(),
            counters: Counters::default(),
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("strata-prefetch".into())
            .spawn(move || io_thread(&worker))
            .map_err(|source| ResidencyError::Io {
                path: shared.reader.path().to_path_buf(),
                source,
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    pub(super) fn buffers(&self) -> Vec<(*const u8, usize)> {
        let slots = &self.shared.slots;
        slots
            .iter()
            .map(|b| (b.as_ptr().cast_const(), b.len()))
            .collect()
    }

    pub(super) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Holds group `group` in a slot and returns `len` bytes at `offset` of it.
    pub(super) fn acquire(
        &self,
        group: usize,
        offset: usize,
        len: usize,
    ) -> Result<TensorHandle, ResidencyError> {
        let sh = &*self.shared;
        let mut st = sh.lock();
        if st.current != Some(group) {
            st.current = Some(group);
            sh.prefetch(&mut st, group);
        }
        let mut waited: Option<Instant> = None;
        let mut missed = false;
        loop {
            if let Some(slot) = st.slots.iter().position(|s| s.group == Some(group)) {
                match st.slots[slot].status.clone() {
                    Status::Ready => {
                        st.slots[slot].pins += 1;
                        drop(st);
                        let c = &sh.counters;
                        match waited {
                            None => c.hits.fetch_add(1, Ordering::Relaxed),
                            Some(t0) => {
                                c.stall_ns
                                    .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                                if missed {
                                    c.misses.fetch_add(1, Ordering::Relaxed)
                                } else {
                                    c.stalls.fetch_add(1, Ordering::Relaxed)
                                }
                            }
                        };
                        // SAFETY: the slot is pinned until the handle's `Keep::Slot` is
                        // dropped, so its bytes do not change; the range lies in the slot.
                        let ptr = unsafe { sh.slots[slot].as_ptr().add(offset) };
                        return Ok(TensorHandle {
                            ptr,
                            len,
                            tier: Tier::Ram,
                            _keep: Keep::Slot(SlotPin {
                                shared: Arc::clone(&self.shared),
                                slot,
                            }),
                        });
                    }
                    Status::Loading => {
                        waited.get_or_insert_with(Instant::now);
                        st = sh.wait(st);
                    }
                    Status::Failed(e) => {
                        st.slots[slot].group = None;
                        st.slots[slot].status = Status::Empty;
                        return Err(ResidencyError::Read(e));
                    }
                    Status::Empty => st.slots[slot].group = None,
                }
                continue;
            }
            match sh.victim(&st, group, 0) {
                Some(slot) => {
                    sh.start_read(&mut st, slot, group, true);
                    missed = true;
                    waited.get_or_insert_with(Instant::now);
                }
                // Every slot is pinned or being read: wait for one to come free.
                None => {
                    waited.get_or_insert_with(Instant::now);
                    st = sh.wait(st);
                }
            }
        }
    }

    pub(super) fn io_stats(&self) -> IoStats {
        self.shared.reader.stats()
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            // The thread finishes the read in flight (its buffer is still owned) and exits.
            let _ = t.join();
        }
    }
}

fn io_thread(sh: &Shared) {
    loop {
        let (slot, group) = {
            let mut st = sh.lock();
            loop {
                if st.shutdown {
                    return;
                }
                if let Some(slot) = st.queue.pop_front() {
                    if let (Status::Loading, Some(g)) =
                        (&st.slots[slot].status, st.slots[slot].group)
                    {
                        break (slot, g);
                    }
                    continue;
                }
                st = sh.wait(st);
            }
        };
        let result = sh.read_group(slot, group);
        sh.counters.groups_read.fetch_add(1, Ordering::Relaxed);
        let mut st = sh.lock();
        st.slots[slot].status = match result {
            Ok(()) => Status::Ready,
            Err(e) => {
                tracing::warn!(
                    "reading streamed group {group} (layer {:?}): {e}",
                    sh.groups[group].layer
                );
                Status::Failed(Arc::new(e))
            }
        };
        sh.cv.notify_all();
    }
}

/// A pin on a slot, released when the last handle holding it is dropped.
pub(super) struct SlotPin {
    shared: Arc<Shared>,
    slot: usize,
}

impl Clone for SlotPin {
    fn clone(&self) -> Self {
        self.shared.lock().slots[self.slot].pins += 1;
        Self {
            shared: Arc::clone(&self.shared),
            slot: self.slot,
        }
    }
}

impl Drop for SlotPin {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        let s = &mut st.slots[self.slot];
        s.pins = s.pins.saturating_sub(1);
        if s.pins == 0 {
            self.shared.cv.notify_all();
        }
    }
}

/// Stall time as a duration.
pub(super) fn stall(c: &Counters) -> Duration {
    Duration::from_nanos(c.stall_ns.load(Ordering::Relaxed))
}
