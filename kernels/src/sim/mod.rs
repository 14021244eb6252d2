//! The simulated GPU: kernels run by the simulator (`kernels/sim/`), device memory in an
//! [`arena::Arena`], each stream a thread that runs its queue in order, copies slowed to a
//! modelled link speed so that work that forgets to wait for a copy reads stale memory.

mod arena;
mod ffi;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arena::Arena;

use crate::device::{DeviceInfo, KernelError, LaunchConfig, SimConfig, TransferStats};
use crate::{Arg, Backend};

pub(crate) fn available() -> bool {
    ffi::AVAILABLE
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) struct SimDevice {
    config: SimConfig,
    arena: Mutex<Arena>,
    kernels: HashMap<String, u32>,
    launches: AtomicU64,
    h2d: AtomicU64,
    d2h: AtomicU64,
}

impl SimDevice {
    pub(crate) fn new(config: SimConfig) -> Result<SimDevice, KernelError> {
        if !ffi::AVAILABLE {
            return Err(KernelError::NoSimulator);
        }
        let arena = Arena::new(config.memory as u64)?;
        ffi::register_arena(arena.base(), arena.size(), arena.shadow());
        Ok(SimDevice {
            config,
            arena: Mutex::new(arena),
            kernels: ffi::kernels(),
            launches: AtomicU64::new(0),
            h2d: AtomicU64::new(0),
            d2h: AtomicU64::new(0),
        })
    }

    pub(crate) fn info(&self) -> DeviceInfo {
        DeviceInfo {
            name: "strata GPU simulator".into(),
            backend: Backend::Sim,
            compute_capability: (9, 0),
            total_memory: self.config.memory,
            multiprocessors: 1,
        }
    }

    pub(crate) fn memory(&self) -> (usize, usize) {
        lock(&self.arena).memory()
    }

    pub(crate) fn stats(&self) -> TransferStats {
        TransferStats {
            h2d_bytes: self.h2d.load(Ordering::Relaxed),
            d2h_bytes: self.d2h.load(Ordering::Relaxed),
            launches: self.launches.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn alloc(&self, bytes: usize) -> Result<u64, KernelError> {
        lock(&self.arena).alloc(bytes as u64, "the simulated GPU")
    }

    pub(crate) fn free(&self, ptr: u64, _len: usize) {
        lock(&self.arena).free(ptr);
    }

    pub(crate) fn kernel(&self, name: &str) -> Result<u32, KernelError> {
        self.kernels
            .get(name)
            .copied()
            .ok_or_else(|| KernelError::UnknownKernel(name.to_string()))
    }

    pub(crate) fn stream(self: &Arc<Self>) -> Result<SimStream, KernelError> {
        let (tx, rx) = sync_channel(QUEUE);
        let shared = Arc::new(Shared::default());
        let dev = Arc::clone(self);
        let sh = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("strata-sim-stream".into())
            .spawn(move || run_stream(&dev, &sh, &rx))
            .map_err(|e| KernelError::Invalid(format!("cannot start a stream thread: {e}")))?;
        Ok(SimStream {
            dev: Arc::clone(self),
            queue: Mutex::new(Queue {
                tx: Some(tx),
                last: 0,
                capture: None,
                spare: Vec::new(),
            }),
            shared,
            handle: Some(handle),
        })
    }

    /// Counts a launch and gives it its own schedule, reproducible from the device's seed.
    fn next_seed(&self) -> u64 {
        let n = self.launches.fetch_add(1, Ordering::Relaxed);
        splitmix(self.config.seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    fn link_delay(&self, bytes: usize) {
        if let Some(bps) = self.config.link_bytes_per_sec
            && bps > 0.0
        {
            std::thread::sleep(Duration::from_secs_f64(bytes as f64 / bps));
        }
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        ffi::unregister_arena(lock(&self.arena).base());
    }
}

/// A raw pointer moved to a stream thread (the caller of the unsafe copy promised liveness).
#[derive(Clone, Copy)]
struct SendPtr(*mut u8);
// SAFETY: the pointee is plain bytes that the enqueuing caller keeps alive until the copy is
// done (the `unsafe` contract of `Stream::upload_async` and the synchronous waits of downloads).
unsafe impl Send for SendPtr {}

/// Most arguments a launch takes (the largest kernel signature has fewer).
pub(crate) const MAX_ARGS: usize = 32;
/// Uploads up to this many bytes travel inside the queued operation; longer ones are copied
/// from the caller's memory by the stream thread while the caller waits, as CUDA stages a
/// copy from pageable memory before returning. Either way queueing allocates nothing.
const INLINE_UPLOAD: usize = 256;
/// Operations a stream holds queued before `send` waits for room (a GPU's queue is bounded
/// too); preallocated, so queueing allocates nothing.
const QUEUE: usize = 4096;

#[derive(Clone)]
enum Op {
    Launch {
        kernel: u32,
        cfg: LaunchConfig,
        n_args: usize,
        args: [u64; MAX_ARGS],
        seed: u64,
    },
    UploadInline {
        dst: u64,
        len: usize,
        data: [u8; INLINE_UPLOAD],
    },
    UploadRaw {
        dst: u64,
        src: SendPtr,
        len: usize,
        /// From pageable memory: read into the stream's staging buffer at once (the caller
        /// waits for that), written to the device after the link's delay.
        staged: bool,
    },
    Download {
        src: u64,
        dst: SendPtr,
        len: usize,
    },
    Copy {
        dst: u64,
        src: u64,
        len: usize,
    },
    Memset {
        dst: u64,
        len: usize,
        value: u8,
    },
    /// Stamps the time this point was reached (`record_timed`).
    Stamp(Arc<Mutex<Option<Instant>>>),
    /// Waits until another stream has run its operations up to a sequence number.
    Wait(Arc<Shared>, u64),
    /// `Stream::gemm_f16`: cuBLAS in the simulator is a reference loop.
    GemmF16 {
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        b: u64,
        c: u64,
    },
}

/// What a stream's owner and its thread share: the first error, and how far the queue has run
/// (operations are numbered from 1 as they are queued; an event is such a number).
#[derive(Default)]
pub(crate) struct Shared {
    error: Mutex<Option<KernelError>>,
    progress: Mutex<Progress>,
    cv: Condvar,
}

/// How far a stream's queue has run, and how far its staged uploads have read their sources.
#[derive(Default)]
struct Progress {
    done: u64,
    staged: u64,
}

impl Shared {
    fn advance(&self, to: u64) {
        let mut p = lock(&self.progress);
        p.done = to;
        p.staged = p.staged.max(to);
        drop(p);
        self.cv.notify_all();
    }

    fn staged(&self, seq: u64) {
        lock(&self.progress).staged = seq;
        self.cv.notify_all();
    }

    fn wait_until(&self, reached: impl Fn(&Progress) -> bool) {
        let mut p = lock(&self.progress);
        while !reached(&p) {
            p = self.cv.wait(p).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn wait_for(&self, seq: u64) {
        self.wait_until(|p| p.done >= seq);
    }

    fn reached(&self, seq: u64) -> bool {
        lock(&self.progress).done >= seq
    }
}

/// Marks the whole queue done when the stream's thread ends, however it ends, so that no
/// waiter waits for work that will never run.
struct EndGuard<'a>(&'a Shared);

impl Drop for EndGuard<'_> {
    fn drop(&mut self) {
        self.0.advance(u64::MAX);
    }
}

fn run_stream(dev: &SimDevice, sh: &Shared, rx: &Receiver<(u64, Op)>) {
    let _end = EndGuard(sh);
    // Grows to the longest staged upload, once (this thread is the GPU's, not the caller's).
    let mut staging = Vec::new();
    while let Ok((seq, op)) = rx.recv() {
        match op {
            Op::Launch {
                kernel,
                cfg,
                n_args,
                mut args,
                seed,
            } => {
                if lock(&sh.error).is_none() {
                    // A failed kernel leaves the stream failed, as on a GPU.
                    let mut flags = 0;
                    if dev.config.check_races {
                        flags |= ffi::FLAG_RACES;
                    }
                    if dev.config.check_host_access {
                        flags |= ffi::FLAG_HOST;
                    }
                    if let Err(msg) = ffi::launch(kernel, cfg, &mut args[..n_args], seed, flags) {
                        lock(&sh.error).get_or_insert(KernelError::Launch(msg));
                    }
                }
            }
            Op::UploadInline { dst, len, data } => {
                dev.link_delay(len);
                // SAFETY: dst..dst+len was checked against a live device buffer when queued.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst as *mut u8, len) };
            }
            Op::UploadRaw {
                dst,
                src,
                len,
                staged,
            } => {
                if staged {
                    staging.resize(len.max(staging.len()), 0);
                    // SAFETY: `upload` waits, holding `src` borrowed, until this read is done.
                    unsafe { std::ptr::copy_nonoverlapping(src.0, staging.as_mut_ptr(), len) };
                    sh.staged(seq);
                    dev.link_delay(len);
                    // SAFETY: dst..dst+len was checked against a live device buffer when queued.
                    unsafe { std::ptr::copy_nonoverlapping(staging.as_ptr(), dst as *mut u8, len) };
                } else {
                    dev.link_delay(len);
                    // SAFETY: bounds checked when queued; the source's liveness is the
                    // caller's promise (`Stream::upload_async`).
                    unsafe { std::ptr::copy_nonoverlapping(src.0, dst as *mut u8, len) };
                }
            }
            Op::Download { src, dst, len } => {
                dev.link_delay(len);
                // SAFETY: bounds checked when queued; the destination outlives the copy
                // because `download` waits for it.
                unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.0, len) };
            }
            Op::Copy { dst, src, len } => {
                // SAFETY: both ranges were checked against live device buffers when queued.
                unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, len) };
            }
            Op::Memset { dst, len, value } => {
                // SAFETY: checked against a live device buffer when queued.
                unsafe { std::ptr::write_bytes(dst as *mut u8, value, len) };
            }
            Op::Stamp(at) => *lock(&at) = Some(Instant::now()),
            Op::Wait(other, upto) => other.wait_for(upto),
            Op::GemmF16 { m, n, k, a, b, c } => {
                if lock(&sh.error).is_none() {
                    dev.launches.fetch_add(1, Ordering::Relaxed);
                    gemm_f16_reference(m, n, k, a, b, c);
                }
            }
        }
        sh.advance(seq);
    }
}

/// The queue's sending end and the number of the last operation queued, under one lock so
/// that numbers follow the queue's order.
struct Queue {
    tx: Option<SyncSender<(u64, Op)>>,
    last: u64,
    /// While a capture is on: the operations recorded instead of queued, a graph's nodes.
    capture: Option<Vec<Op>>,
    /// The list the next capture records into (a graph's old list, handed back): captures
    /// reuse two lists, so a warm capture allocates nothing.
    spare: Vec<Op>,
}

pub(crate) struct SimStream {
    dev: Arc<SimDevice>,
    queue: Mutex<Queue>,
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

/// A recorded point of a simulated stream: the number of the last operation queued before it
/// (and, for a timed one, when the stream reached it).
#[derive(Clone)]
pub(crate) struct SimEventMark {
    stream: Arc<Shared>,
    seq: u64,
    at: Option<Arc<Mutex<Option<Instant>>>>,
}

impl SimEventMark {
    pub(crate) fn wait_host(&self) {
        self.stream.wait_for(self.seq);
    }

    pub(crate) fn is_done(&self) -> bool {
        self.stream.reached(self.seq)
    }

    pub(crate) fn elapsed_ms(&self, end: &SimEventMark) -> f32 {
        self.wait_host();
        end.wait_host();
        let at = |m: &SimEventMark| m.at.as_ref().and_then(|a| *lock(a));
        match (at(self), at(end)) {
            (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f32() * 1e3,
            _ => 0.0,
        }
    }
}

impl SimStream {
    /// Queues `op`, or records it while a capture is on (returning 0: nothing was queued).
    fn send(&self, op: Op) -> Result<u64, KernelError> {
        let mut q = lock(&self.queue);
        if let Some(nodes) = &mut q.capture {
            nodes.push(op);
            return Ok(0);
        }
        let seq = q.last + 1;
        let stopped = || KernelError::Invalid("the simulated stream's thread has stopped".into());
        q.tx.as_ref()
            .ok_or_else(stopped)?
            .send((seq, op))
            .map_err(|_| stopped())?;
        q.last = seq;
        Ok(seq)
    }

    pub(crate) fn launch(
        &self,
        kernel: u32,
        cfg: LaunchConfig,
        args: &[Arg],
    ) -> Result<(), KernelError> {
        if args.len() > MAX_ARGS {
            return Err(KernelError::Invalid(format!(
                "a launch takes at most {MAX_ARGS} arguments, not {}",
                args.len()
            )));
        }
        let seed = self.dev.next_seed();
        let mut slots = [0u64; MAX_ARGS];
        for (s, a) in slots.iter_mut().zip(args) {
            *s = a.slot();
        }
        self.send(Op::Launch {
            kernel,
            cfg,
            n_args: args.len(),
            args: slots,
            seed,
        })
        .map(drop)
    }

    pub(crate) fn upload(&self, dst: u64, src: &[u8]) -> Result<(), KernelError> {
        self.dev.h2d.fetch_add(src.len() as u64, Ordering::Relaxed);
        if src.len() <= INLINE_UPLOAD {
            let mut data = [0u8; INLINE_UPLOAD];
            data[..src.len()].copy_from_slice(src);
            return self
                .send(Op::UploadInline {
                    dst,
                    len: src.len(),
                    data,
                })
                .map(drop);
        }
        let seq = self.send(Op::UploadRaw {
            dst,
            src: SendPtr(src.as_ptr().cast_mut()),
            len: src.len(),
            staged: true,
        })?;
        // `src` is borrowed only for this call: wait until the stream has staged it (the
        // write to the device follows later, in the stream's order, as in CUDA).
        self.shared.wait_until(|p| p.staged >= seq);
        Ok(())
    }

    /// # Safety
    ///
    /// `src..src+len` must stay valid and unmodified until the copy has run.
    pub(crate) unsafe fn upload_async(
        &self,
        dst: u64,
        src: *const u8,
        len: usize,
    ) -> Result<(), KernelError> {
        self.dev.h2d.fetch_add(len as u64, Ordering::Relaxed);
        self.send(Op::UploadRaw {
            dst,
            src: SendPtr(src.cast_mut()),
            len,
            staged: false,
        })
        .map(drop)
    }

    pub(crate) fn download(&self, src: u64, dst: &mut [u8]) -> Result<(), KernelError> {
        self.dev.d2h.fetch_add(dst.len() as u64, Ordering::Relaxed);
        let seq = self.send(Op::Download {
            src,
            dst: SendPtr(dst.as_mut_ptr()),
            len: dst.len(),
        })?;
        // `dst` must outlive the copy: wait for it even when an earlier error is reported.
        self.shared.wait_for(seq);
        self.error()
    }

    pub(crate) fn copy(&self, dst: u64, src: u64, len: usize) -> Result<(), KernelError> {
        self.send(Op::Copy { dst, src, len }).map(drop)
    }

    pub(crate) fn memset(&self, dst: u64, len: usize, value: u8) -> Result<(), KernelError> {
        self.send(Op::Memset { dst, len, value }).map(drop)
    }

    pub(crate) fn gemm_f16(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        b: u64,
        c: u64,
    ) -> Result<(), KernelError> {
        self.send(Op::GemmF16 { m, n, k, a, b, c }).map(drop)
    }

    /// This point of the queue; queues nothing, allocates nothing.
    pub(crate) fn record(&self) -> SimEventMark {
        SimEventMark {
            stream: Arc::clone(&self.shared),
            seq: lock(&self.queue).last,
            at: None,
        }
    }

    /// This point of the queue, stamped with the time the stream reaches it.
    pub(crate) fn record_timed(&self) -> SimEventMark {
        let at = Arc::new(Mutex::new(None));
        match self.send(Op::Stamp(Arc::clone(&at))) {
            Ok(seq) => SimEventMark {
                stream: Arc::clone(&self.shared),
                seq,
                at: Some(at),
            },
            Err(_) => self.record(), // a stopped stream: nothing left to time
        }
    }

    pub(crate) fn wait(&self, e: &SimEventMark) -> Result<(), KernelError> {
        if e.is_done() {
            return Ok(());
        }
        self.send(Op::Wait(Arc::clone(&e.stream), e.seq)).map(drop)
    }

    pub(crate) fn synchronize(&self) -> Result<(), KernelError> {
        self.record().wait_host();
        self.error()
    }

    /// # Safety
    ///
    /// `dst..dst+len` must stay valid, and not be read, until the copy has run.
    pub(crate) unsafe fn download_async(
        &self,
        src: u64,
        dst: *mut u8,
        len: usize,
    ) -> Result<(), KernelError> {
        self.dev.d2h.fetch_add(len as u64, Ordering::Relaxed);
        self.send(Op::Download {
            src,
            dst: SendPtr(dst),
            len,
        })
        .map(drop)
    }

    /// Starts recording operations instead of queueing them (`cuStreamBeginCapture`).
    pub(crate) fn begin_capture(&self) {
        let mut q = lock(&self.queue);
        let mut nodes = std::mem::take(&mut q.spare);
        nodes.clear();
        q.capture = Some(nodes);
    }

    /// Ends the capture: what it recorded replaces `graph`'s nodes (whose old list is kept
    /// for the next capture).
    pub(crate) fn end_capture(&self, graph: &mut SimGraph) {
        let mut q = lock(&self.queue);
        let nodes = q.capture.take().unwrap_or_default();
        let mut old = std::mem::replace(&mut graph.nodes, nodes);
        old.clear();
        q.spare = old;
    }

    /// Queues every node of `exec`, in order, as one launch of the graph: copies read their
    /// host memory now, as a replayed graph does, and each kernel gets a new schedule.
    pub(crate) fn launch_graph(&self, exec: &SimGraph) -> Result<(), KernelError> {
        for op in &exec.nodes {
            let mut op = op.clone();
            match &mut op {
                Op::Launch { seed, .. } => *seed = self.dev.next_seed(),
                Op::UploadRaw { len, .. } => {
                    self.dev.h2d.fetch_add(*len as u64, Ordering::Relaxed);
                }
                Op::Download { len, .. } => {
                    self.dev.d2h.fetch_add(*len as u64, Ordering::Relaxed);
                }
                Op::GemmF16 { .. } => {
                    self.dev.launches.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            self.send(op)?;
        }
        Ok(())
    }

    fn error(&self) -> Result<(), KernelError> {
        match &*lock(&self.shared.error) {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

impl Drop for SimStream {
    fn drop(&mut self) {
        // Finish the queue (copies may still read buffers their owners keep until now), then
        // stop the thread by closing the channel.
        self.record().wait_host();
        drop(lock(&self.queue).tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A captured graph, or an instantiated one: the operations in the order they were recorded
/// (a stream's capture is a chain, so the order is the graph's dependency order).
#[derive(Default)]
pub(crate) struct SimGraph {
    nodes: Vec<Op>,
}

impl SimGraph {
    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// An instantiated copy (`cuGraphInstantiate`).
    pub(crate) fn instantiate(&self) -> SimGraph {
        SimGraph {
            nodes: self.nodes.clone(),
        }
    }

    /// `cuGraphExecUpdate`: takes `graph`'s parameters when it has the same nodes — the same
    /// count, each of the same kind, kernels the same function, copies and memsets the same
    /// direction and size class — and returns whether it did (`false`: instantiate anew).
    pub(crate) fn update(&mut self, graph: &SimGraph) -> bool {
        let same = self.nodes.len() == graph.nodes.len()
            && self
                .nodes
                .iter()
                .zip(&graph.nodes)
                .all(|(a, b)| match (a, b) {
                    (Op::Launch { kernel: x, .. }, Op::Launch { kernel: y, .. }) => x == y,
                    (Op::Memset { len: x, .. }, Op::Memset { len: y, .. }) => x == y,
                    _ => std::mem::discriminant(a) == std::mem::discriminant(b),
                });
        if same {
            // Element by element: the list keeps its capacity, so an update allocates nothing.
            for (a, b) in self.nodes.iter_mut().zip(&graph.nodes) {
                a.clone_from(b);
            }
        }
        same
    }
}

/// cuBLAS's `gemm_ex` (f16 inputs, f32 sums and output) as a plain loop: `c[j][i] = Σ_l
/// a[i][l] · b[j][l]`, each product exact in f32 and added in order of `l`.
fn gemm_f16_reference(m: usize, n: usize, k: usize, a: u64, b: u64, c: u64) {
    let (a, b, c) = (a as *const u16, b as *const u16, c as *mut f32);
    let h = |p: *const u16, i: usize| {
        // SAFETY: the ranges were checked against live device buffers (and their alignment)
        // when the operation was queued; reads are by value, as a kernel's are.
        half::f16::from_bits(unsafe { p.add(i).read() }).to_f32()
    };
    for j in 0..n {
        for i in 0..m {
            let mut acc = 0.0f32;
            for l in 0..k {
                acc += h(a, i * k + l) * h(b, j * k + l);
            }
            // SAFETY: as above; c holds n·m f32.
            unsafe { c.add(j * m + i).write(acc) };
        }
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Host memory for the simulator's "pinned" buffers: zeroed, 4 KiB-aligned.
pub(crate) fn alloc_host(bytes: usize) -> Result<*mut u8, KernelError> {
    let layout = host_layout(bytes)?;
    // SAFETY: the layout has a non-zero size.
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    if p.is_null() {
        return Err(KernelError::Invalid(format!(
            "cannot allocate {bytes} bytes of host memory"
        )));
    }
    Ok(p)
}

pub(crate) fn free_host(p: *mut u8, bytes: usize) {
    if let Ok(layout) = host_layout(bytes) {
        // SAFETY: `p` came from `alloc_host` with the same size, hence the same layout.
        unsafe { std::alloc::dealloc(p, layout) };
    }
}

fn host_layout(bytes: usize) -> Result<std::alloc::Layout, KernelError> {
    std::alloc::Layout::from_size_align(bytes.max(1), 4096)
        .map_err(|e| KernelError::Invalid(format!("host buffer of {bytes} bytes: {e}")))
}
