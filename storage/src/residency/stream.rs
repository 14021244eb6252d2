//! Streamed layers: a window of slot buffers, filled ahead of the computation by an I/O thread.
//!
//! Layers are used in a cycle (0, 1, …, n−1, then 0 again for the next token), so when group
//! `g` is first acquired the thread is asked to read `g+1 … g+window−1` into the slots whose
//! groups are needed furthest in the future — Belady's choice for a cyclic pattern, which plain
//! LRU gets wrong. A slot holding a pinned handle or a read in flight is never chosen, so the
//! bytes a handle shows stay put while it lives, and no buffer is reused while the kernel may
//! still write into it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::plan::Group;
use super::{Keep, ResidencyError, TensorHandle, TensorId, Tier};
use crate::buf::AlignedBuf;
use crate::io::{IoError, IoStats, ReadReq, Reader};

#[derive(Clone)]
enum Status {
    Empty,
    Loading,
    /// Read unprepared, and being prepared by the thread that acquired it.
    Preparing,
    Ready,
    Failed(Arc<IoError>),
}

#[derive(Clone)]
struct Slot {
    group: Option<usize>,
    status: Status,
    pins: u32,
    /// The read that filled the slot was prepared ([`GroupPrepare`]): the group's listed
    /// matrices are in the preparation's layout.
    prepared: bool,
}

/// What the I/O thread may do to a group's matrices after reading them, before any handle
/// shows them (the engine's CPU executor repacks them into its kernels' layout): only while
/// [`Streamer::set_preparing`] asks, since the pass holds up the next read.
pub(super) struct GroupPrepare {
    /// By group: each matrix to prepare, as (offset in the slot, bytes, tensor).
    pub(super) by_group: Vec<Vec<(usize, usize, TensorId)>>,
    /// Rewrites one matrix in place; `false` when it could not (the bytes are then unchanged).
    pub(super) prepare: super::PrepareChecked,
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
    /// Groups whose matrices were prepared after their read, or when acquired.
    pub groups_prepared: AtomicU64,
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
    prep: OnceLock<GroupPrepare>,
    /// Whether reads started from now on are prepared.
    preparing: AtomicBool,
    /// A preparation failed: none is run again.
    prep_failed: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.cv.wait(g).unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn n_groups(&self) -> usize {
        self.groups.len()
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
            .filter(|(_, s)| {
                s.pins == 0 && !matches!(s.status, Status::Loading | Status::Preparing)
            })
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
            prepared: false,
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

    /// Whether a slot holding `group` unprepared would be prepared now.
    fn wants_prepare(&self, group: usize) -> bool {
        self.preparing.load(Ordering::Relaxed)
            && !self.prep_failed.load(Ordering::Relaxed)
            && self
                .prep
                .get()
                .and_then(|p| p.by_group.get(group))
                .is_some_and(|l| !l.is_empty())
    }

    /// Runs the preparation over the matrices of `group` just read into `slot` (which is
    /// `Loading` or `Preparing`: no handle views it), when one is set and asked for.
    /// `Some(true)`: all were prepared; `Some(false)`: none was asked; `None`: one failed, so
    /// the slot holds a mix and must be read again (and no preparation runs from now on).
    fn prepare_slot(&self, slot: usize, group: usize) -> Option<bool> {
        let Some(p) = self.prep.get() else {
            return Some(false);
        };
        let list = p.by_group.get(group).map_or(&[][..], Vec::as_slice);
        if list.is_empty()
            || !self.preparing.load(Ordering::Relaxed)
            || self.prep_failed.load(Ordering::Relaxed)
        {
            return Some(false);
        }
        let buf = &self.slots[slot];
        for &(at, len, id) in list {
            if at.checked_add(len).is_none_or(|end| end > buf.len()) {
                self.prep_failed.store(true, Ordering::Relaxed);
                return None;
            }
            // SAFETY: the slot is Loading, so no handle views it and no read targets it; the
            // range lies inside it (checked above).
            let bytes = unsafe { std::slice::from_raw_parts_mut(buf.as_ptr().add(at), len) };
            if !(p.prepare)(id, bytes) {
                self.prep_failed.store(true, Ordering::Relaxed);
                return None;
            }
        }
        self.counters
            .groups_prepared
            .fetch_add(1, Ordering::Relaxed);
        Some(true)
    }

    /// Ends a preparation of `slot` (see [`Shared::prepare_slot`]): the slot is ready, or,
    /// when it failed, empty for the group to be read again.
    fn prepared(&self, st: &mut State, slot: usize, group: usize, prepared: Option<bool>) {
        match prepared {
            Some(p) => {
                st.slots[slot].prepared = p;
                st.slots[slot].status = Status::Ready;
            }
            None => {
                tracing::error!(
                    "preparing streamed group {group} (layer {:?}) failed: it is read again, \
                     and streamed groups keep the file's layout from now on",
                    self.groups[group].layer
                );
                st.slots[slot] = Slot {
                    group: None,
                    status: Status::Empty,
                    pins: 0,
                    prepared: false,
                };
            }
        }
        self.cv.notify_all();
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
                        prepared: false,
                    };
                    window
                ],
                queue: VecDeque::new(),
                current: None,
                shutdown: false,
            }),
            cv: Condvar::new(),
            counters: Counters::default(),
            prep: OnceLock::new(),
            preparing: AtomicBool::new(false),
            prep_failed: AtomicBool::new(false),
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

    /// Sets the preparation of groups' matrices (once; `false` if one was set already).
    pub(super) fn set_prepare(&self, p: GroupPrepare) -> bool {
        self.shared.prep.set(p).is_ok()
    }

    /// Whether reads started from now on run the preparation (a read already done keeps the
    /// layout it has, and its handles say which).
    pub(super) fn set_preparing(&self, on: bool) {
        self.shared.preparing.store(on, Ordering::Relaxed);
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
                    // Read while no batch asked for the preparation, and one does now: prepared
                    // here, where no handle can see it, so every matrix of this pass is in the
                    // same layout.
                    Status::Ready
                        if !st.slots[slot].prepared
                            && st.slots[slot].pins == 0
                            && sh.wants_prepare(group) =>
                    {
                        st.slots[slot].status = Status::Preparing;
                        drop(st);
                        let prepared = sh.prepare_slot(slot, group);
                        st = sh.lock();
                        sh.prepared(&mut st, slot, group, prepared);
                    }
                    Status::Ready => {
                        st.slots[slot].pins += 1;
                        let prepared = st.slots[slot].prepared
                            && sh.prep.get().is_some_and(|p| {
                                p.by_group
                                    .get(group)
                                    .is_some_and(|l| l.iter().any(|e| e.0 == offset))
                            });
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
                            prepared,
                            _keep: Keep::Slot(SlotPin {
                                shared: Arc::clone(&self.shared),
                                slot,
                            }),
                        });
                    }
                    Status::Loading | Status::Preparing => {
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
        match result {
            Ok(()) => {
                let prepared = sh.prepare_slot(slot, group);
                let mut st = sh.lock();
                sh.prepared(&mut st, slot, group, prepared);
            }
            Err(e) => {
                tracing::warn!(
                    "reading streamed group {group} (layer {:?}): {e}",
                    sh.groups[group].layer
                );
                sh.lock().slots[slot].status = Status::Failed(Arc::new(e));
                sh.cv.notify_all();
            }
        }
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
