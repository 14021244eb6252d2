//! The device interface: a GPU through the CUDA driver, or the simulator. One closed enum at
//! the top; each backend is a module underneath with the same operations.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::{cuda, sim};

/// Why a device operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// The CUDA driver library is not on this machine.
    #[error(
        "no CUDA driver: libcuda.so.1 was not found (install the NVIDIA driver, or use \
         --device sim for the simulated GPU)"
    )]
    NoDriver,
    /// The driver returned an error.
    #[error("CUDA {op}: {msg}")]
    Driver { op: &'static str, msg: String },
    /// The simulator was not compiled into this build (not x86-64 Linux, or no C++ compiler).
    #[error(
        "the GPU simulator is not part of this build (it needs x86-64 Linux and a C++ compiler)"
    )]
    NoSimulator,
    /// Device memory is exhausted.
    #[error(
        "out of device memory: {requested} bytes requested, {free} of {total} bytes free on {device}"
    )]
    OutOfMemory {
        device: String,
        requested: usize,
        free: usize,
        total: usize,
    },
    /// No kernel of that name in the loaded modules.
    #[error("no kernel named `{0}`")]
    UnknownKernel(String),
    /// A kernel failed: on the simulator, a bounds, race, barrier or shuffle error with the
    /// thread and schedule seed that found it.
    #[error("kernel failed: {0}")]
    Launch(String),
    /// A copy or launch names memory outside a buffer, or sizes that do not agree.
    #[error("{0}")]
    Invalid(String),
    /// An operation that a CUDA graph cannot hold was queued while the stream was capturing
    /// one (a host wait, a copy from pageable memory); the capture is void.
    #[error("graph capture: {0}")]
    Capture(String),
}

/// Which backend a device is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Cuda,
    Sim,
}

/// What the planner and the logs need to know about a device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub name: String,
    pub backend: Backend,
    /// Compute capability (major, minor); the simulator reports (9, 0).
    pub compute_capability: (u32, u32),
    pub total_memory: usize,
    pub multiprocessors: u32,
}

/// How the simulator is set up.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Device memory; allocations past it fail with [`KernelError::OutOfMemory`].
    pub memory: usize,
    /// Host↔device copy speed in bytes per second (each copy takes at least its modelled time,
    /// so a launch that does not wait for a copy sees the old contents), or `None` for instant.
    pub link_bytes_per_sec: Option<f64>,
    /// Base of every launch's schedule seed.
    pub seed: u64,
    /// Report shared-memory races (costs a shadow cell per shared byte).
    pub check_races: bool,
    /// Report device code touching host memory.
    pub check_host_access: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            memory: 1 << 30,
            link_bytes_per_sec: None,
            seed: 0x5eed_5eed,
            check_races: true,
            check_host_access: true,
        }
    }
}

/// Host↔device traffic so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransferStats {
    pub h2d_bytes: u64,
    pub d2h_bytes: u64,
    pub launches: u64,
}

#[derive(Clone)]
pub(crate) enum Inner {
    Sim(Arc<sim::SimDevice>),
    Cuda(Arc<cuda::CudaDevice>),
}

/// A GPU, or the simulated one. Cheap to clone (shared).
#[derive(Clone)]
pub struct Device {
    pub(crate) inner: Inner,
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Device({})", self.info().name)
    }
}

impl Device {
    /// The simulated GPU: the kernel text run on this CPU with every check on.
    pub fn sim(config: SimConfig) -> Result<Device, KernelError> {
        Ok(Device {
            inner: Inner::Sim(Arc::new(sim::SimDevice::new(config)?)),
        })
    }

    /// GPU `ordinal` through the CUDA driver. A clear error, never a panic, where there is no
    /// driver.
    pub fn cuda(ordinal: usize) -> Result<Device, KernelError> {
        Ok(Device {
            inner: Inner::Cuda(Arc::new(cuda::CudaDevice::new(ordinal)?)),
        })
    }

    /// Whether the CUDA driver library can be loaded here (no driver call is made).
    pub fn cuda_driver_present() -> bool {
        cuda::driver_present()
    }

    /// Whether this build has the simulator.
    pub fn sim_available() -> bool {
        sim::available()
    }

    /// The device's streaming multiprocessors (what `info` reports, without building it).
    pub fn multiprocessors(&self) -> u32 {
        match &self.inner {
            Inner::Sim(_) => 1,
            Inner::Cuda(d) => d.multiprocessors(),
        }
    }

    pub fn info(&self) -> DeviceInfo {
        match &self.inner {
            Inner::Sim(d) => d.info(),
            Inner::Cuda(d) => d.info(),
        }
    }

    pub fn backend(&self) -> Backend {
        match &self.inner {
            Inner::Sim(_) => Backend::Sim,
            Inner::Cuda(_) => Backend::Cuda,
        }
    }

    /// (free, total) device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize), KernelError> {
        match &self.inner {
            Inner::Sim(d) => Ok(d.memory()),
            Inner::Cuda(d) => d.memory(),
        }
    }

    pub fn transfer_stats(&self) -> TransferStats {
        match &self.inner {
            Inner::Sim(d) => d.stats(),
            Inner::Cuda(d) => d.stats(),
        }
    }

    /// `bytes` of device memory. On the simulator it starts as poison (all bits set: NaN in
    /// every float type); on a GPU its contents are undefined.
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer, KernelError> {
        let ptr = match &self.inner {
            Inner::Sim(d) => d.alloc(bytes)?,
            Inner::Cuda(d) => d.alloc(bytes)?,
        };
        Ok(DeviceBuffer {
            dev: self.clone(),
            ptr,
            len: bytes,
        })
    }

    /// `bytes` of page-locked host memory, cached (not write-combined) so that the CPU can
    /// read it too, 4 KiB-aligned so that O_DIRECT reads can land in it.
    pub fn alloc_host(&self, bytes: usize) -> Result<HostBuffer, KernelError> {
        let (ptr, pinned) = match &self.inner {
            Inner::Sim(_) => (sim::alloc_host(bytes)?, false),
            Inner::Cuda(d) => (d.alloc_host(bytes)?, true),
        };
        Ok(HostBuffer {
            dev: self.clone(),
            ptr,
            len: bytes,
            pinned,
        })
    }

    /// Page-locks `len` bytes of host memory that something else allocated (CUDA's
    /// `cuMemHostRegister`): copies from it then run asynchronously by DMA, with no staging
    /// copy, so a buffer that O_DIRECT reads land in can be copied to the GPU as it is. The
    /// region is unregistered when the returned value drops; the simulator only records it.
    ///
    /// # Safety
    ///
    /// `ptr..ptr + len` must stay allocated until the returned region has dropped.
    pub unsafe fn register_host(
        &self,
        ptr: *const u8,
        len: usize,
    ) -> Result<HostRegion, KernelError> {
        if len == 0 {
            return Err(KernelError::Invalid(
                "registering 0 bytes of host memory".into(),
            ));
        }
        if let Inner::Cuda(d) = &self.inner {
            // SAFETY: forwarded from the caller.
            unsafe { d.register_host(ptr, len)? };
        }
        Ok(HostRegion {
            dev: self.clone(),
            ptr,
            len,
        })
    }

    /// A new stream (work on one stream runs in order; streams run concurrently).
    pub fn stream(&self) -> Result<Stream, KernelError> {
        let inner = match &self.inner {
            Inner::Sim(d) => StreamInner::Sim(d.stream()?),
            Inner::Cuda(d) => StreamInner::Cuda(d.stream()?),
        };
        Ok(Stream {
            dev: self.clone(),
            inner,
            capturing: AtomicBool::new(false),
            void: Mutex::new(None),
        })
    }

    /// The kernel `name` from the embedded modules (loaded once per device).
    pub fn kernel(&self, name: &str) -> Result<Kernel, KernelError> {
        match &self.inner {
            Inner::Sim(d) => d.kernel(name).map(Kernel::Sim),
            Inner::Cuda(d) => d.kernel(name).map(Kernel::Cuda),
        }
    }

    fn free(&self, ptr: u64, len: usize) {
        match &self.inner {
            Inner::Sim(d) => d.free(ptr, len),
            Inner::Cuda(d) => d.free(ptr),
        }
    }
}

/// Device memory. Freed when dropped: the caller must make sure no queued work still uses it
/// (synchronize the streams that do, as with `cudaFree`).
pub struct DeviceBuffer {
    dev: Device,
    ptr: u64,
    len: usize,
}

impl DeviceBuffer {
    /// The device address, for kernel arguments.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The address `offset` bytes in.
    pub fn at(&self, offset: usize) -> u64 {
        self.ptr + offset as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn device(&self) -> &Device {
        &self.dev
    }

    pub(crate) fn check(&self, offset: usize, bytes: usize) -> Result<(), KernelError> {
        if offset.checked_add(bytes).is_none_or(|e| e > self.len) {
            return Err(KernelError::Invalid(format!(
                "{bytes} bytes at offset {offset} of a {}-byte device buffer",
                self.len
            )));
        }
        Ok(())
    }
}

impl fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceBuffer({:#x}, {} bytes)", self.ptr, self.len)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        self.dev.free(self.ptr, self.len);
    }
}

/// Page-locked host memory (on the simulator, ordinary aligned memory).
pub struct HostBuffer {
    dev: Device,
    ptr: *mut u8,
    len: usize,
    pinned: bool,
}

// SAFETY: the buffer is plain memory owned by this value; access goes through &/&mut self.
unsafe impl Send for HostBuffer {}
// SAFETY: shared access only reads.
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to len bytes owned by self, initialised at allocation.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the driver page-locked it (false on the simulator).
    pub fn is_pinned(&self) -> bool {
        self.pinned
    }

    pub(crate) fn raw(&self) -> *mut u8 {
        self.ptr
    }
}

/// Host memory page-locked by [`Device::register_host`] for as long as this value lives.
pub struct HostRegion {
    dev: Device,
    ptr: *const u8,
    len: usize,
}

// SAFETY: the region is an address range; nothing is read or written through this value.
unsafe impl Send for HostRegion {}
// SAFETY: as above.
unsafe impl Sync for HostRegion {}

impl HostRegion {
    /// Whether `bytes` lies inside the region.
    pub fn contains(&self, bytes: &[u8]) -> bool {
        let (start, end) = (self.ptr as usize, self.ptr as usize + self.len);
        let p = bytes.as_ptr() as usize;
        p >= start && p + bytes.len() <= end
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for HostRegion {
    fn drop(&mut self) {
        if let Inner::Cuda(d) = &self.dev.inner {
            d.unregister_host(self.ptr);
        }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        match &self.dev.inner {
            Inner::Sim(_) => sim::free_host(self.ptr, self.len),
            Inner::Cuda(d) => d.free_host(self.ptr),
        }
    }
}

/// A kernel resolved on a device.
#[derive(Clone, Copy, Debug)]
pub enum Kernel {
    Sim(u32),
    Cuda(cuda::Function),
}

/// Grid and block of a launch (as `<<<grid, block>>>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
}

impl LaunchConfig {
    /// A one-dimensional launch.
    pub fn linear(blocks: u32, threads: u32) -> Self {
        LaunchConfig {
            grid: (blocks, 1, 1),
            block: (threads, 1, 1),
        }
    }
}

/// A kernel argument: a device address or a scalar. Passed to the kernel by value, as
/// `cuLaunchKernel` passes them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    U32(u32),
    I64(i64),
    U64(u64),
    F32(f32),
}

impl Arg {
    /// The argument's bytes, in a slot of 8 (little-endian; a 4-byte parameter reads the first 4).
    pub(crate) fn slot(self) -> u64 {
        match self {
            Arg::Ptr(v) | Arg::U64(v) => v,
            Arg::I64(v) => v as u64,
            Arg::I32(v) => u64::from(v as u32),
            Arg::U32(v) => u64::from(v),
            Arg::F32(v) => u64::from(v.to_bits()),
        }
    }
}

impl From<&DeviceBuffer> for Arg {
    fn from(b: &DeviceBuffer) -> Arg {
        Arg::Ptr(b.ptr)
    }
}

pub(crate) enum StreamInner {
    Sim(sim::SimStream),
    Cuda(cuda::CudaStream),
}

/// An ordered queue of device work.
pub struct Stream {
    dev: Device,
    inner: StreamInner,
    /// Whether the stream is capturing a graph ([`Stream::begin_capture`]).
    capturing: AtomicBool,
    /// Why the capture under way is void, if it is.
    void: Mutex<Option<String>>,
}

/// A point in a stream's work that another stream (or the host) can wait for.
pub struct Event {
    pub(crate) inner: EventInner,
}

pub(crate) enum EventInner {
    Sim(sim::SimEventMark),
    Cuda(cuda::CudaEvent),
}

impl Stream {
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// Refuses `what` while a graph is being captured, voiding the capture, as CUDA refuses
    /// host waits and copies from pageable memory in a capture (a graph replays copies from
    /// the addresses it captured, so their bytes must be in page-locked memory that stays).
    fn outside_capture(&self, what: &str) -> Result<(), KernelError> {
        if !self.capturing.load(Ordering::Acquire) {
            return Ok(());
        }
        let msg = format!("{what} cannot be part of a CUDA graph");
        self.void
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(|| msg.clone());
        Err(KernelError::Capture(msg))
    }

    /// Whether the stream is capturing a graph: work queued now is recorded, not run.
    pub fn is_capturing(&self) -> bool {
        self.capturing.load(Ordering::Acquire)
    }

    /// Starts capturing: launches, copies from page-locked memory, device copies and
    /// memsets queued from now on are recorded into a graph instead of running, until
    /// [`Stream::end_capture`]. Host waits, copies from pageable memory, events and cuBLAS
    /// are refused meanwhile (and void the capture).
    pub fn begin_capture(&self) -> Result<(), KernelError> {
        if self.capturing.load(Ordering::Acquire) {
            return Err(KernelError::Invalid(
                "a capture begun on a stream that is capturing".into(),
            ));
        }
        match &self.inner {
            StreamInner::Sim(s) => s.begin_capture(),
            StreamInner::Cuda(s) => s.begin_capture()?,
        }
        *self.void.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.capturing.store(true, Ordering::Release);
        Ok(())
    }

    /// Ends the capture, putting what it recorded into `graph` (replacing what was there).
    /// A capture voided by a refused operation is an error naming it, and `graph` is left
    /// empty.
    pub fn end_capture(&self, graph: &mut Graph) -> Result<(), KernelError> {
        if !self.capturing.swap(false, Ordering::AcqRel) {
            return Err(KernelError::Invalid(
                "a capture ended on a stream that is not capturing".into(),
            ));
        }
        let void = self
            .void
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match &self.inner {
            StreamInner::Sim(s) => {
                let g = match &mut graph.inner {
                    Some(GraphInner::Sim(g)) => g,
                    slot => slot.insert(GraphInner::Sim(sim::SimGraph::default())).sim(),
                };
                s.end_capture(g);
                if void.is_some() {
                    graph.inner = None;
                }
            }
            StreamInner::Cuda(s) => {
                graph.inner = None;
                let g = s.end_capture();
                if void.is_none() {
                    graph.inner = Some(GraphInner::Cuda(g?));
                }
            }
        }
        match void {
            Some(msg) => Err(KernelError::Capture(msg)),
            None => Ok(()),
        }
    }

    /// Queues one run of an instantiated graph.
    pub fn launch_graph(&self, exec: &GraphExec) -> Result<(), KernelError> {
        self.outside_capture("launching a graph")?;
        match (&self.inner, &exec.inner) {
            (StreamInner::Sim(s), GraphExecInner::Sim(g)) => s.launch_graph(g),
            (StreamInner::Cuda(s), GraphExecInner::Cuda(g)) => s.launch_graph(g),
            _ => Err(KernelError::Invalid(
                "a graph launched on another device's stream".into(),
            )),
        }
    }

    /// Queues a kernel launch.
    pub fn launch(&self, k: Kernel, cfg: LaunchConfig, args: &[Arg]) -> Result<(), KernelError> {
        match (&self.inner, k) {
            (StreamInner::Sim(s), Kernel::Sim(i)) => s.launch(i, cfg, args),
            (StreamInner::Cuda(s), Kernel::Cuda(f)) => s.launch(f, cfg, args),
            _ => Err(KernelError::Invalid(
                "a kernel launched on another device's stream".into(),
            )),
        }
    }

    /// Copies `src` into `dst` at `offset`. The source may be reused as soon as this returns.
    pub fn upload(&self, dst: &DeviceBuffer, offset: usize, src: &[u8]) -> Result<(), KernelError> {
        dst.check(offset, src.len())?;
        self.outside_capture("a copy from pageable host memory")?;
        match &self.inner {
            StreamInner::Sim(s) => s.upload(dst.at(offset), src),
            StreamInner::Cuda(s) => s.upload(dst.at(offset), src),
        }
    }

    /// Copies `len` bytes of pinned `src` from `src_offset` into `dst` at `offset` without
    /// staging: the copy reads `src` when the stream reaches it.
    ///
    /// # Safety
    ///
    /// `src` must stay alive and unmodified until the copy has completed (an event recorded
    /// after it has fired, or the stream was synchronized).
    pub unsafe fn upload_async(
        &self,
        dst: &DeviceBuffer,
        offset: usize,
        src: &HostBuffer,
        src_offset: usize,
        len: usize,
    ) -> Result<(), KernelError> {
        dst.check(offset, len)?;
        if src_offset.checked_add(len).is_none_or(|e| e > src.len()) {
            return Err(KernelError::Invalid(format!(
                "{len} bytes at offset {src_offset} of a {}-byte host buffer",
                src.len()
            )));
        }
        // SAFETY: in bounds (checked); liveness is the caller's promise.
        let p = unsafe { src.raw().add(src_offset) };
        match &self.inner {
            // SAFETY: forwarded from the caller.
            StreamInner::Sim(s) => unsafe { s.upload_async(dst.at(offset), p, len) },
            // SAFETY: forwarded from the caller.
            StreamInner::Cuda(s) => unsafe { s.upload_async(dst.at(offset), p, len) },
        }
    }

    /// Queues a copy of `src`, which lies in the page-locked `region`, to `dst` at `offset`,
    /// returning at once (a DMA on a GPU: no staging copy on the CPU).
    ///
    /// # Safety
    ///
    /// `src` must stay alive and unmodified until the copy has completed (an event recorded
    /// after it has fired, or the stream was synchronized).
    pub unsafe fn upload_async_region(
        &self,
        dst: &DeviceBuffer,
        offset: usize,
        region: &HostRegion,
        src: &[u8],
    ) -> Result<(), KernelError> {
        dst.check(offset, src.len())?;
        if !region.contains(src) {
            return Err(KernelError::Invalid(format!(
                "{} bytes at {:p} are not inside the registered host region of {} bytes at {:p}",
                src.len(),
                src.as_ptr(),
                region.len,
                region.ptr
            )));
        }
        match &self.inner {
            // SAFETY: forwarded from the caller.
            StreamInner::Sim(s) => unsafe {
                s.upload_async(dst.at(offset), src.as_ptr(), src.len())
            },
            // SAFETY: forwarded from the caller.
            StreamInner::Cuda(s) => unsafe {
                s.upload_async(dst.at(offset), src.as_ptr(), src.len())
            },
        }
    }

    /// Copies `dst.len()` bytes of `src` from `offset` to the host, waiting for the stream's
    /// earlier work and the copy.
    pub fn download(
        &self,
        src: &DeviceBuffer,
        offset: usize,
        dst: &mut [u8],
    ) -> Result<(), KernelError> {
        src.check(offset, dst.len())?;
        self.outside_capture("a copy to the host that waits for it")?;
        match &self.inner {
            StreamInner::Sim(s) => s.download(src.at(offset), dst),
            StreamInner::Cuda(s) => s.download(src.at(offset), dst),
        }
    }

    /// Queues a copy of `len` bytes of `src` from `offset` into page-locked `dst` at
    /// `dst_offset`, returning at once (it may be captured into a graph).
    ///
    /// # Safety
    ///
    /// `dst` must stay alive, and its bytes there must not be read, until the copy has
    /// completed (an event recorded after it has fired, or the stream was synchronized).
    pub unsafe fn download_async(
        &self,
        src: &DeviceBuffer,
        offset: usize,
        dst: &HostBuffer,
        dst_offset: usize,
        len: usize,
    ) -> Result<(), KernelError> {
        src.check(offset, len)?;
        if dst_offset.checked_add(len).is_none_or(|e| e > dst.len()) {
            return Err(KernelError::Invalid(format!(
                "{len} bytes at offset {dst_offset} of a {}-byte host buffer",
                dst.len()
            )));
        }
        // SAFETY: in bounds (checked); liveness is the caller's promise.
        let p = unsafe { dst.raw().add(dst_offset) };
        match &self.inner {
            // SAFETY: forwarded from the caller.
            StreamInner::Sim(s) => unsafe { s.download_async(src.at(offset), p, len) },
            // SAFETY: forwarded from the caller.
            StreamInner::Cuda(s) => unsafe { s.download_async(src.at(offset), p, len) },
        }
    }

    /// Copies between device buffers.
    pub fn copy(
        &self,
        dst: &DeviceBuffer,
        dst_offset: usize,
        src: &DeviceBuffer,
        src_offset: usize,
        len: usize,
    ) -> Result<(), KernelError> {
        dst.check(dst_offset, len)?;
        src.check(src_offset, len)?;
        match &self.inner {
            StreamInner::Sim(s) => s.copy(dst.at(dst_offset), src.at(src_offset), len),
            StreamInner::Cuda(s) => s.copy(dst.at(dst_offset), src.at(src_offset), len),
        }
    }

    /// Sets `len` bytes of `dst` from `offset` to `value`.
    pub fn memset(
        &self,
        dst: &DeviceBuffer,
        offset: usize,
        len: usize,
        value: u8,
    ) -> Result<(), KernelError> {
        dst.check(offset, len)?;
        match &self.inner {
            StreamInner::Sim(s) => s.memset(dst.at(offset), len, value),
            StreamInner::Cuda(s) => s.memset(dst.at(offset), len, value),
        }
    }

    /// cuBLAS's GEMM with f16 inputs and f32 output and sums, queued on this stream:
    /// `c[j][i] = Σ_l a[i][l] · b[j][l]` for `i < m`, `j < n`, `l < k`, every matrix row-major —
    /// `a` f16 `[m][k]` (weights), `b` f16 `[n][k]` (activations), `c` f32 `[n][m]`; each given
    /// as a buffer and a byte offset. On a GPU this is `cublasGemmEx` (cuBLAS loaded at first
    /// use, its handle bound to this stream); cuBLAS in the simulator is a reference loop on the
    /// stream's thread (f32 sums in order of `l`), there to check the path around it.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_f16(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: (&DeviceBuffer, usize),
        b: (&DeviceBuffer, usize),
        c: (&DeviceBuffer, usize),
    ) -> Result<(), KernelError> {
        let too_big = || KernelError::Invalid(format!("gemm_f16: {m}x{n}x{k} is too large"));
        let ab = m
            .checked_mul(k)
            .and_then(|v| v.checked_mul(2))
            .ok_or_else(too_big)?;
        let bb = n
            .checked_mul(k)
            .and_then(|v| v.checked_mul(2))
            .ok_or_else(too_big)?;
        let cb = n
            .checked_mul(m)
            .and_then(|v| v.checked_mul(4))
            .ok_or_else(too_big)?;
        if [m, n, k].iter().any(|&v| v > i32::MAX as usize) {
            return Err(too_big());
        }
        a.0.check(a.1, ab)?;
        b.0.check(b.1, bb)?;
        c.0.check(c.1, cb)?;
        let (pa, pb, pc) = (a.0.at(a.1), b.0.at(b.1), c.0.at(c.1));
        if pa % 2 != 0 || pb % 2 != 0 || pc % 4 != 0 {
            return Err(KernelError::Invalid(
                "gemm_f16: a and b must be 2-byte aligned, c 4-byte aligned".into(),
            ));
        }
        self.outside_capture("cuBLAS")?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        match &self.inner {
            StreamInner::Sim(s) => s.gemm_f16(m, n, k, pa, pb, pc),
            StreamInner::Cuda(s) => s.gemm_f16(m, n, k, pa, pb, pc),
        }
    }

    /// Marks this point of the stream.
    pub fn record(&self) -> Result<Event, KernelError> {
        self.outside_capture("an event")?;
        let inner = match &self.inner {
            StreamInner::Sim(s) => EventInner::Sim(s.record()),
            StreamInner::Cuda(s) => EventInner::Cuda(s.record()?),
        };
        Ok(Event { inner })
    }

    /// Marks this point of the stream with a timestamp, for [`Event::elapsed_ms`].
    pub fn record_timed(&self) -> Result<Event, KernelError> {
        self.outside_capture("an event")?;
        let inner = match &self.inner {
            StreamInner::Sim(s) => EventInner::Sim(s.record_timed()),
            StreamInner::Cuda(s) => EventInner::Cuda(s.record_timed()?),
        };
        Ok(Event { inner })
    }

    /// Makes later work on this stream wait for `event`.
    pub fn wait(&self, event: &Event) -> Result<(), KernelError> {
        self.outside_capture("a wait for an event")?;
        match (&self.inner, &event.inner) {
            (StreamInner::Sim(s), EventInner::Sim(e)) => s.wait(e),
            (StreamInner::Cuda(s), EventInner::Cuda(e)) => s.wait(e),
            _ => Err(KernelError::Invalid(
                "an event waited for on another device".into(),
            )),
        }
    }

    /// Waits for everything queued so far; returns the first error a queued operation hit.
    pub fn synchronize(&self) -> Result<(), KernelError> {
        self.outside_capture("a host wait for the stream")?;
        match &self.inner {
            StreamInner::Sim(s) => s.synchronize(),
            StreamInner::Cuda(s) => s.synchronize(),
        }
    }
}

impl Event {
    /// Waits on the host until the work before the event is done.
    pub fn synchronize(&self) -> Result<(), KernelError> {
        match &self.inner {
            EventInner::Sim(e) => {
                e.wait_host();
                Ok(())
            }
            EventInner::Cuda(e) => e.synchronize(),
        }
    }

    /// Milliseconds from this event to `end` (both from [`Stream::record_timed`], both done).
    pub fn elapsed_ms(&self, end: &Event) -> Result<f32, KernelError> {
        match (&self.inner, &end.inner) {
            (EventInner::Sim(a), EventInner::Sim(b)) => Ok(a.elapsed_ms(b)),
            (EventInner::Cuda(a), EventInner::Cuda(b)) => a.elapsed_ms(b),
            _ => Err(KernelError::Invalid("events of two devices".into())),
        }
    }

    /// Whether the work before the event is done.
    pub fn is_done(&self) -> Result<bool, KernelError> {
        match &self.inner {
            EventInner::Sim(e) => Ok(e.is_done()),
            EventInner::Cuda(e) => e.is_done(),
        }
    }
}

pub(crate) enum GraphInner {
    Sim(sim::SimGraph),
    Cuda(cuda::CudaGraph),
}

impl GraphInner {
    fn sim(&mut self) -> &mut sim::SimGraph {
        match self {
            GraphInner::Sim(g) => g,
            GraphInner::Cuda(_) => unreachable!("made as a simulator graph by the caller"),
        }
    }
}

/// A captured graph ([`Stream::end_capture`]): the work of a capture, not yet runnable.
/// Empty until a capture fills it; refilled by each capture (on the simulator reusing its
/// memory, so that capturing every step allocates nothing once warm).
#[derive(Default)]
pub struct Graph {
    inner: Option<GraphInner>,
}

impl Graph {
    pub fn new() -> Graph {
        Graph::default()
    }

    /// Whether no capture has filled it.
    pub fn is_empty(&self) -> bool {
        self.inner.is_none()
    }

    /// An executable copy (`cuGraphInstantiate`), to launch with [`Stream::launch_graph`].
    pub fn instantiate(&self) -> Result<GraphExec, KernelError> {
        let inner = match &self.inner {
            None => return Err(KernelError::Invalid("instantiating an empty graph".into())),
            Some(GraphInner::Sim(g)) => GraphExecInner::Sim(g.instantiate()),
            Some(GraphInner::Cuda(g)) => GraphExecInner::Cuda(g.instantiate()?),
        };
        Ok(GraphExec { inner })
    }
}

pub(crate) enum GraphExecInner {
    Sim(sim::SimGraph),
    Cuda(cuda::CudaGraphExec),
}

/// An instantiated graph.
pub struct GraphExec {
    inner: GraphExecInner,
}

impl GraphExec {
    /// Takes the parameters of `graph` — a later capture of the same work, with other
    /// arguments, sizes or grids — in place (`cuGraphExecUpdate`, much cheaper than
    /// instantiating). Returns false, changing nothing, when `graph`'s nodes differ in kind
    /// or number: then instantiate it instead.
    pub fn update(&mut self, graph: &Graph) -> Result<bool, KernelError> {
        match (&mut self.inner, &graph.inner) {
            (GraphExecInner::Sim(e), Some(GraphInner::Sim(g))) => Ok(e.update(g)),
            (GraphExecInner::Cuda(e), Some(GraphInner::Cuda(g))) => e.update(g),
            (_, None) => Err(KernelError::Invalid("updating from an empty graph".into())),
            _ => Err(KernelError::Invalid("a graph of another device".into())),
        }
    }

    /// Its number of nodes on the simulator (the driver does not say; 0 there).
    pub fn nodes(&self) -> usize {
        match &self.inner {
            GraphExecInner::Sim(g) => g.len(),
            GraphExecInner::Cuda(_) => 0,
        }
    }
}
