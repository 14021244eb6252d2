//! Weights streamed to the GPU each step: matrices (or row parts of them) that are not in VRAM
//! are uploaded on a copy stream of their own into two device buffers used in turn, so that
//! while one part computes the next one is already crossing PCIe. Events order it all: a copy
//! into a buffer waits until the product that read it last has run, and a product waits until
//! its copy has landed. Which part comes next is learned from the order the pass asks for them
//! (the same every step).
//!
//! The copies read the weights where storage put them: the resident set and the streaming
//! window's slots (which io_uring's O_DIRECT reads fill) are page-locked with the driver at
//! start ([`Device::register_host`]), so a copy is a DMA from them with no copy on the CPU; the
//! ring holds the weight's handle (and so its window slot) until the copy has landed. Where
//! that cannot be (a mapped file, memory the driver would not lock, a window of fewer than
//! three slots, which two held handles could starve) the part goes through a page-locked
//! staging buffer instead.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::time::Instant;

use strata_kernels::{Device, DeviceBuffer, Event, HostBuffer, HostRegion, Stream};
use strata_storage::residency::{TensorHandle, TensorId, Weights};

use super::weights::{GpuCounters, gpu_err};
use crate::error::EngineError;

/// A streamed matrix part: the tensor and the part index (0 for a whole matrix).
pub(crate) type Key = (TensorId, usize);

struct Slot {
    dev: Option<DeviceBuffer>,
    host: Option<HostBuffer>,
    holds: Option<Key>,
    rows: Range<u64>,
    /// The copy into `dev` has landed (recorded on the copy stream).
    ready: Option<Event>,
    /// The last product reading `dev` has run (recorded on the compute stream).
    free: Option<Event>,
    /// The weights a direct copy reads, held until it has landed.
    keep: Option<TensorHandle>,
}

impl Slot {
    fn empty() -> Self {
        Slot {
            dev: None,
            host: None,
            holds: None,
            rows: 0..0,
            ready: None,
            free: None,
            keep: None,
        }
    }
}

pub(crate) struct Ring {
    copy: Stream,
    slots: [Slot; 2],
    /// The order the pass asks for streamed parts, and each part's place in it.
    order: Vec<Key>,
    place: HashMap<Key, usize>,
    /// The weights' host buffers, page-locked (empty: every part is staged).
    regions: Vec<HostRegion>,
}

/// Fewest streaming-window slots for direct copies: the ring holds two handles, and a layer
/// computed on the CPU meanwhile needs a slot of its own.
const DIRECT_MIN_WINDOW: usize = 3;

impl Ring {
    /// `direct`: page-lock the weights' buffers so that copies read them in place (the
    /// executor asks for it only when some weights are streamed to the GPU).
    pub(crate) fn new(dev: &Device, weights: &Weights, direct: bool) -> Result<Ring, EngineError> {
        let mut regions = Vec::new();
        let window = weights.stats().window;
        let buffers = weights.host_buffers();
        if direct && (window == 0 || window >= DIRECT_MIN_WINDOW) {
            for (ptr, len) in buffers {
                // SAFETY: the buffers live as long as `weights`, which the model keeps beyond
                // its executor (and so this ring); the regions drop with the ring.
                match unsafe { dev.register_host(ptr, len) } {
                    Ok(r) => regions.push(r),
                    Err(e) => {
                        tracing::info!(
                            "weights' host buffer of {len} bytes not page-locked ({e}); \
                             streamed weights go through a staging buffer"
                        );
                        regions.clear();
                        break;
                    }
                }
            }
        }
        Ok(Ring {
            copy: dev.stream().map_err(gpu_err)?,
            slots: [Slot::empty(), Slot::empty()],
            order: Vec::new(),
            place: HashMap::new(),
            regions,
        })
    }

    /// Whether streamed weights are copied to the GPU straight from storage's buffers.
    pub(crate) fn direct(&self) -> bool {
        !self.regions.is_empty()
    }

    /// Starts copying `key` into slot `i` (after the product that last read it has run).
    fn load(
        &mut self,
        i: usize,
        key: Key,
        weights: &Weights,
        counters: &GpuCounters,
    ) -> Result<(), EngineError> {
        // The slot's last copy must have landed before its buffers take another part; the
        // weights it read are let go first, so that acquiring the next part never waits for
        // a window slot this ring holds.
        self.release(i)?;
        let (h, rows) = match weights.parts(key.0)? {
            1 => {
                let h = weights.acquire(key.0)?;
                let rows = 0..0;
                (h, rows)
            }
            _ => weights.acquire_part(key.0, key.1)?,
        };
        let bytes = h.bytes();
        let n = bytes.len();
        let t0 = Instant::now();
        let slot = &mut self.slots[i];
        if let Some(e) = slot.free.take() {
            self.copy.wait(&e).map_err(gpu_err)?;
        }
        let dev = self.copy.device().clone();
        if slot.dev.as_ref().is_none_or(|b| b.len() < bytes.len()) {
            // Nothing queued reads the old buffer: its product's event was waited for above
            // by the copy stream, and the copy stream runs in order.
            self.copy.synchronize().map_err(gpu_err)?;
            slot.dev = Some(dev.alloc(bytes.len()).map_err(gpu_err)?);
        }
        let Some(dbuf) = &slot.dev else {
            unreachable!("allocated above")
        };
        if let Some(region) = self.regions.iter().find(|r| r.contains(bytes)) {
            // SAFETY: `h` (and with it the buffer `bytes` lies in) is kept in the slot until
            // this copy's `ready` event has been waited for (`release`, or the ring's drop).
            unsafe { self.copy.upload_async_region(dbuf, 0, region, bytes) }.map_err(gpu_err)?;
            slot.keep = Some(h);
            counters
                .streamed_direct_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
        } else {
            if slot.host.as_ref().is_none_or(|b| b.len() < bytes.len()) {
                slot.host = Some(dev.alloc_host(bytes.len()).map_err(gpu_err)?);
            }
            let Some(host) = &mut slot.host else {
                unreachable!("allocated above")
            };
            host.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
            // SAFETY: `host` lives in the slot until this copy's `ready` event has been
            // waited for (`release`, before the next copy into it, or the ring's drop).
            unsafe { self.copy.upload_async(dbuf, 0, host, 0, bytes.len()) }.map_err(gpu_err)?;
        }
        slot.ready = Some(self.copy.record().map_err(gpu_err)?);
        slot.holds = Some(key);
        slot.rows = rows;
        counters
            .streamed_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        counters
            .wait_us
            .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The device buffer holding `key` (and its row range, for a part), with the compute stream
    /// `s` made to wait for its copy; the part after it in the pass's order starts copying into
    /// the other buffer. Call [`Ring::used`] once the product reading it is queued.
    pub(crate) fn get(
        &mut self,
        s: &Stream,
        key: Key,
        weights: &Weights,
        counters: &GpuCounters,
    ) -> Result<(u64, Range<u64>, usize), EngineError> {
        let i = match self.slots.iter().position(|sl| sl.holds == Some(key)) {
            Some(i) => i,
            None => {
                // Not prefetched: into the slot not holding the part before it.
                let i = self
                    .slots
                    .iter()
                    .position(|sl| sl.holds.is_none())
                    .unwrap_or(0);
                self.load(i, key, weights, counters)?;
                i
            }
        };
        if !self.place.contains_key(&key) {
            self.place.insert(key, self.order.len());
            self.order.push(key);
        }
        if let Some(e) = &self.slots[i].ready {
            s.wait(e).map_err(gpu_err)?;
        }
        let ptr = self.slots[i].dev.as_ref().map_or(0, DeviceBuffer::ptr);
        Ok((ptr, self.slots[i].rows.clone(), i))
    }

    /// The product reading slot `i` is queued on `s`: mark when it is done, and start copying
    /// the next part of the pass into the other slot.
    pub(crate) fn used(
        &mut self,
        s: &Stream,
        i: usize,
        weights: &Weights,
        counters: &GpuCounters,
    ) -> Result<(), EngineError> {
        self.slots[i].free = Some(s.record().map_err(gpu_err)?);
        self.release_landed();
        let Some(key) = self.slots[i].holds else {
            return Ok(());
        };
        let Some(&at) = self.place.get(&key) else {
            return Ok(());
        };
        if self.order.len() < 2 {
            return Ok(());
        }
        let next = self.order[(at + 1) % self.order.len()];
        if self.slots.iter().any(|sl| sl.holds == Some(next)) {
            return Ok(());
        }
        self.load(1 - i, next, weights, counters)
    }
}

impl Ring {
    /// Waits until slot `i`'s copy has landed and lets go of the weights it read.
    fn release(&mut self, i: usize) -> Result<(), EngineError> {
        let slot = &mut self.slots[i];
        if let Some(e) = slot.ready.take() {
            e.synchronize().map_err(gpu_err)?;
        }
        slot.keep = None;
        Ok(())
    }

    /// Lets go of the weights of copies that have landed, without waiting (window slots free
    /// for the CPU's layers as early as can be).
    fn release_landed(&mut self) {
        for slot in &mut self.slots {
            if slot.keep.is_some()
                && slot
                    .ready
                    .as_ref()
                    .is_some_and(|e| e.is_done().unwrap_or(false))
            {
                slot.keep = None;
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Copies in flight read the staging buffers or the held weights: let them land first.
        let _ = self.copy.synchronize();
        for slot in &mut self.slots {
            slot.keep = None;
        }
        // The regions unregister after this, as the fields drop.
    }
}
