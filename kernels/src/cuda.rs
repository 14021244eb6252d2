//! A GPU through the CUDA driver (cudarc, loaded at run time). The driver library is probed
//! before any call, since cudarc panics on the first call where it is missing. Kernels come
//! from the embedded PTX ([`crate::ptx`]), JIT-compiled by the driver for this GPU on first use
//! and cached per device.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaModule, result, sys};
use cudarc::nvrtc::Ptx;

use crate::device::{Arg, DeviceInfo, KernelError, LaunchConfig, TransferStats};
use crate::{Backend, ptx};

pub(crate) fn driver_present() -> bool {
    // SAFETY: only tries to open the library; makes no driver call.
    unsafe { sys::is_culib_present() }
}

fn err(op: &'static str) -> impl Fn(result::DriverError) -> KernelError {
    move |e| KernelError::Driver {
        op,
        msg: format!("{e:?}"),
    }
}

/// A kernel handle (valid while its device lives: the device keeps its module loaded).
#[derive(Clone, Copy, Debug)]
pub struct Function(sys::CUfunction);
// SAFETY: a CUfunction is an opaque handle the driver allows on any thread of its context.
unsafe impl Send for Function {}
// SAFETY: as above.
unsafe impl Sync for Function {}

pub(crate) struct CudaDevice {
    ctx: Arc<CudaContext>,
    info: DeviceInfo,
    modules: Mutex<Modules>,
    h2d: AtomicU64,
    d2h: AtomicU64,
    launches: AtomicU64,
}

#[derive(Default)]
struct Modules {
    loaded: HashMap<&'static str, Arc<CudaModule>>,
    functions: HashMap<String, Function>,
}

impl CudaDevice {
    pub(crate) fn new(ordinal: usize) -> Result<CudaDevice, KernelError> {
        if !driver_present() {
            return Err(KernelError::NoDriver);
        }
        let ctx = CudaContext::new(ordinal).map_err(err("context"))?;
        let (major, minor) = ctx.compute_capability().map_err(err("device attributes"))?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(err("device attributes"))?;
        let info = DeviceInfo {
            name: ctx.name().map_err(err("device name"))?,
            backend: Backend::Cuda,
            compute_capability: (major.max(0) as u32, minor.max(0) as u32),
            total_memory: ctx.total_mem().map_err(err("device memory"))?,
            multiprocessors: sms.max(0) as u32,
        };
        Ok(CudaDevice {
            ctx,
            info,
            modules: Mutex::new(Modules::default()),
            h2d: AtomicU64::new(0),
            d2h: AtomicU64::new(0),
            launches: AtomicU64::new(0),
        })
    }

    fn bind(&self) -> Result<(), KernelError> {
        self.ctx.bind_to_thread().map_err(err("bind context"))
    }

    pub(crate) fn info(&self) -> DeviceInfo {
        self.info.clone()
    }

    pub(crate) fn multiprocessors(&self) -> u32 {
        self.info.multiprocessors
    }

    pub(crate) fn memory(&self) -> Result<(usize, usize), KernelError> {
        self.ctx.mem_get_info().map_err(err("memory info"))
    }

    pub(crate) fn stats(&self) -> TransferStats {
        TransferStats {
            h2d_bytes: self.h2d.load(Ordering::Relaxed),
            d2h_bytes: self.d2h.load(Ordering::Relaxed),
            launches: self.launches.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn alloc(&self, bytes: usize) -> Result<u64, KernelError> {
        self.bind()?;
        // SAFETY: a plain allocation in the bound context.
        unsafe { result::malloc_sync(bytes.max(1)) }.map_err(|e| match e.0 {
            sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY => {
                let (free, total) = self.memory().unwrap_or((0, self.info.total_memory));
                KernelError::OutOfMemory {
                    device: self.info.name.clone(),
                    requested: bytes,
                    free,
                    total,
                }
            }
            _ => err("allocate")(e),
        })
    }

    pub(crate) fn free(&self, ptr: u64) {
        if self.bind().is_ok() {
            // SAFETY: `ptr` came from `alloc` and is freed once (DeviceBuffer's drop).
            let _ = unsafe { result::free_sync(ptr) };
        }
    }

    pub(crate) fn alloc_host(&self, bytes: usize) -> Result<*mut u8, KernelError> {
        self.bind()?;
        // SAFETY: page-locked, cached (flags 0: not write-combined) host memory.
        let p =
            unsafe { result::malloc_host(bytes.max(1), 0) }.map_err(err("pinned allocation"))?;
        // Zeroed, so that it is initialised memory for `HostBuffer::as_slice`.
        // SAFETY: p points to `bytes` writable bytes just allocated.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, bytes) };
        Ok(p.cast())
    }

    /// # Safety
    ///
    /// `ptr..ptr + len` stays allocated until `unregister_host(ptr)`.
    pub(crate) unsafe fn register_host(
        &self,
        ptr: *const u8,
        len: usize,
    ) -> Result<(), KernelError> {
        self.bind()?;
        // SAFETY: the caller keeps the range allocated while it is registered; flags 0: used
        // from this context only.
        unsafe { sys::cuMemHostRegister_v2(ptr.cast_mut().cast(), len, 0) }
            .result()
            .map_err(err("page-lock host memory"))
    }

    pub(crate) fn unregister_host(&self, ptr: *const u8) {
        if self.bind().is_ok() {
            // SAFETY: `ptr` was registered by `register_host` and is unregistered once.
            let _ = unsafe { sys::cuMemHostUnregister(ptr.cast_mut().cast()) }.result();
        }
    }

    pub(crate) fn free_host(&self, p: *mut u8) {
        if self.bind().is_ok() {
            // SAFETY: `p` came from `alloc_host` and is freed once.
            let _ = unsafe { result::free_host(p.cast()) };
        }
    }

    pub(crate) fn stream(self: &Arc<Self>) -> Result<CudaStream, KernelError> {
        self.bind()?;
        let s = self.ctx.new_stream().map_err(err("create stream"))?;
        Ok(CudaStream {
            dev: Arc::clone(self),
            s,
            blas: Mutex::new(None),
        })
    }

    pub(crate) fn kernel(&self, name: &str) -> Result<Function, KernelError> {
        let mut m = self.modules.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = m.functions.get(name) {
            return Ok(*f);
        }
        let Some(module) = ptx::module_of(name) else {
            return Err(KernelError::UnknownKernel(name.to_string()));
        };
        let loaded = match m.loaded.get(module.name) {
            Some(l) => Arc::clone(l),
            None => {
                self.bind()?;
                let l = self
                    .ctx
                    .load_module(Ptx::from_src(module.ptx))
                    .map_err(|e| KernelError::Driver {
                        op: "load module (JIT of the embedded PTX)",
                        msg: format!(
                            "{}: {e:?} (the PTX is ISA {}: the driver must support CUDA {} or later)",
                            module.name,
                            ptx::PTX_ISA,
                            ptx::CUDA_VERSION
                        ),
                    })?;
                m.loaded.insert(module.name, Arc::clone(&l));
                l
            }
        };
        let f = loaded.load_function(name).map_err(err("load function"))?;
        let f = Function(f.cu_function());
        m.functions.insert(name.to_string(), f);
        Ok(f)
    }
}

pub(crate) struct CudaStream {
    dev: Arc<CudaDevice>,
    s: Arc<cudarc::driver::CudaStream>,
    /// This stream's cuBLAS handle, made at the first `gemm_f16`.
    blas: Mutex<Option<Arc<CudaBlas>>>,
}

pub(crate) struct CudaEvent(cudarc::driver::CudaEvent);

/// A captured graph (`CUgraph`), destroyed on drop.
pub(crate) struct CudaGraph(sys::CUgraph, Arc<CudaDevice>);
// SAFETY: a graph handle may be used from any thread; the wrapper gives it one owner.
unsafe impl Send for CudaGraph {}
// SAFETY: shared access only reads it (instantiate, update from).
unsafe impl Sync for CudaGraph {}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        let _ = self.1.bind();
        // SAFETY: made by cuStreamEndCapture and destroyed once.
        let _ = unsafe { sys::cuGraphDestroy(self.0) };
    }
}

impl CudaGraph {
    pub(crate) fn instantiate(&self) -> Result<CudaGraphExec, KernelError> {
        self.1.bind()?;
        let mut e = std::ptr::null_mut();
        // SAFETY: a live graph; `e` receives the executable graph.
        unsafe { sys::cuGraphInstantiateWithFlags(&raw mut e, self.0, 0) }
            .result()
            .map_err(err("instantiate graph"))?;
        Ok(CudaGraphExec(e, Arc::clone(&self.1)))
    }
}

/// An executable graph (`CUgraphExec`), destroyed on drop.
pub(crate) struct CudaGraphExec(sys::CUgraphExec, Arc<CudaDevice>);
// SAFETY: as for CudaGraph.
unsafe impl Send for CudaGraphExec {}
// SAFETY: as for CudaGraph.
unsafe impl Sync for CudaGraphExec {}

impl Drop for CudaGraphExec {
    fn drop(&mut self) {
        let _ = self.1.bind();
        // SAFETY: made by cuGraphInstantiateWithFlags and destroyed once.
        let _ = unsafe { sys::cuGraphExecDestroy(self.0) };
    }
}

impl CudaGraphExec {
    /// `cuGraphExecUpdate`: whether `graph`'s parameters were taken (false: its topology
    /// differs, instantiate anew).
    pub(crate) fn update(&mut self, graph: &CudaGraph) -> Result<bool, KernelError> {
        self.1.bind()?;
        // SAFETY: plain data, filled in by the driver.
        let mut info: sys::CUgraphExecUpdateResultInfo = unsafe { std::mem::zeroed() };
        // SAFETY: both handles are live; `info` receives the result.
        let r = unsafe { sys::cuGraphExecUpdate_v2(self.0, graph.0, &raw mut info) };
        match r {
            sys::cudaError_enum::CUDA_SUCCESS => Ok(true),
            sys::cudaError_enum::CUDA_ERROR_GRAPH_EXEC_UPDATE_FAILURE => Ok(false),
            other => Err(err("update graph")(result::DriverError(other))),
        }
    }
}

impl CudaEvent {
    pub(crate) fn synchronize(&self) -> Result<(), KernelError> {
        self.0.synchronize().map_err(err("event synchronize"))
    }

    pub(crate) fn is_done(&self) -> Result<bool, KernelError> {
        self.0.try_is_complete().map_err(err("event query"))
    }

    pub(crate) fn elapsed_ms(&self, end: &CudaEvent) -> Result<f32, KernelError> {
        self.0.elapsed_ms(&end.0).map_err(err("event elapsed time"))
    }
}

impl CudaStream {
    fn raw(&self) -> sys::CUstream {
        self.s.cu_stream()
    }

    pub(crate) fn launch(
        &self,
        f: Function,
        cfg: LaunchConfig,
        args: &[Arg],
    ) -> Result<(), KernelError> {
        self.dev.bind()?;
        const MAX_ARGS: usize = 32;
        if args.len() > MAX_ARGS {
            return Err(KernelError::Invalid(format!(
                "a launch takes at most {MAX_ARGS} arguments, not {}",
                args.len()
            )));
        }
        // Arrays, not vectors: a launch allocates nothing.
        let mut slots = [0u64; MAX_ARGS];
        for (s, a) in slots.iter_mut().zip(args) {
            *s = a.slot();
        }
        let mut params = [std::ptr::null_mut::<std::ffi::c_void>(); MAX_ARGS];
        for (p, s) in params.iter_mut().zip(slots.iter_mut()) {
            *p = std::ptr::from_mut(s).cast();
        }
        let params = &mut params[..args.len()];
        self.dev.launches.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `f` is a function of a module this device keeps loaded; each parameter slot
        // holds the argument's value in its first bytes (little-endian) and the driver copies
        // them before returning.
        unsafe { result::launch_kernel(f.0, cfg.grid, cfg.block, 0, self.raw(), params) }
            .map_err(err("launch"))
    }

    pub(crate) fn upload(&self, dst: u64, src: &[u8]) -> Result<(), KernelError> {
        self.dev.bind()?;
        self.dev.h2d.fetch_add(src.len() as u64, Ordering::Relaxed);
        // SAFETY: dst..dst+len is a checked range of a live device buffer; from pageable memory
        // the driver stages the source before returning, so it may be reused at once.
        unsafe { result::memcpy_htod_async(dst, src, self.raw()) }.map_err(err("copy to device"))
    }

    /// # Safety
    ///
    /// `src..src+len` (pinned) must stay valid and unmodified until the copy completes.
    pub(crate) unsafe fn upload_async(
        &self,
        dst: u64,
        src: *const u8,
        len: usize,
    ) -> Result<(), KernelError> {
        self.dev.bind()?;
        self.dev.h2d.fetch_add(len as u64, Ordering::Relaxed);
        // SAFETY: the caller keeps the source alive; the range was checked.
        let s = unsafe { std::slice::from_raw_parts(src, len) };
        // SAFETY: as above.
        unsafe { result::memcpy_htod_async(dst, s, self.raw()) }.map_err(err("copy to device"))
    }

    pub(crate) fn download(&self, src: u64, dst: &mut [u8]) -> Result<(), KernelError> {
        self.dev.bind()?;
        self.dev.d2h.fetch_add(dst.len() as u64, Ordering::Relaxed);
        // SAFETY: a checked range of a live buffer; `dst` outlives the copy because the stream
        // is synchronized before returning.
        unsafe { result::memcpy_dtoh_async(dst, src, self.raw()) }.map_err(err("copy to host"))?;
        self.synchronize()
    }

    pub(crate) fn copy(&self, dst: u64, src: u64, len: usize) -> Result<(), KernelError> {
        self.dev.bind()?;
        // SAFETY: both ranges were checked against live buffers.
        unsafe { result::memcpy_dtod_async(dst, src, len, self.raw()) }.map_err(err("device copy"))
    }

    pub(crate) fn memset(&self, dst: u64, len: usize, value: u8) -> Result<(), KernelError> {
        self.dev.bind()?;
        // SAFETY: a checked range of a live buffer.
        unsafe { result::memset_d8_async(dst, value, len, self.raw()) }.map_err(err("memset"))
    }

    pub(crate) fn record(&self) -> Result<CudaEvent, KernelError> {
        self.dev.bind()?;
        let e = self.s.record_event(None).map_err(err("record event"))?;
        Ok(CudaEvent(e))
    }

    pub(crate) fn record_timed(&self) -> Result<CudaEvent, KernelError> {
        self.dev.bind()?;
        let e = self
            .s
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(err("record event"))?;
        Ok(CudaEvent(e))
    }

    pub(crate) fn wait(&self, e: &CudaEvent) -> Result<(), KernelError> {
        self.s.wait(&e.0).map_err(err("wait event"))
    }

    pub(crate) fn synchronize(&self) -> Result<(), KernelError> {
        self.s.synchronize().map_err(err("synchronize"))
    }

    /// # Safety
    ///
    /// `dst..dst+len` (pinned) must stay valid, and not be read, until the copy completes.
    pub(crate) unsafe fn download_async(
        &self,
        src: u64,
        dst: *mut u8,
        len: usize,
    ) -> Result<(), KernelError> {
        self.dev.bind()?;
        self.dev.d2h.fetch_add(len as u64, Ordering::Relaxed);
        // SAFETY: a checked range of a live buffer; the caller keeps `dst` alive until done.
        unsafe { sys::cuMemcpyDtoHAsync_v2(dst.cast(), src, len, self.raw()) }
            .result()
            .map_err(err("copy to host"))
    }

    /// `cuStreamBeginCapture` in relaxed mode (allocations stay allowed while capturing).
    pub(crate) fn begin_capture(&self) -> Result<(), KernelError> {
        self.dev.bind()?;
        // SAFETY: a live stream of the bound context.
        unsafe {
            sys::cuStreamBeginCapture_v2(
                self.raw(),
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
            )
        }
        .result()
        .map_err(err("begin graph capture"))
    }

    /// `cuStreamEndCapture`: the captured graph (an invalidated capture is an error).
    pub(crate) fn end_capture(&self) -> Result<CudaGraph, KernelError> {
        self.dev.bind()?;
        let mut g = std::ptr::null_mut();
        // SAFETY: a live stream that is capturing; `g` receives the graph.
        unsafe { sys::cuStreamEndCapture(self.raw(), &raw mut g) }
            .result()
            .map_err(err("end graph capture"))?;
        Ok(CudaGraph(g, Arc::clone(&self.dev)))
    }

    /// `cuGraphLaunch` of `exec` on this stream.
    pub(crate) fn launch_graph(&self, exec: &CudaGraphExec) -> Result<(), KernelError> {
        self.dev.bind()?;
        self.dev.launches.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `exec` was instantiated in this context and lives through the call; the
        // buffers its nodes name are kept alive by the caller until the stream has run it.
        unsafe { sys::cuGraphLaunch(exec.0, self.raw()) }
            .result()
            .map_err(err("launch graph"))
    }

    /// The stream's cuBLAS handle; cuBLAS is probed first, since cudarc panics where the
    /// library is missing.
    fn blas(&self) -> Result<Arc<CudaBlas>, KernelError> {
        let mut g = self.blas.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = &*g {
            return Ok(Arc::clone(b));
        }
        // SAFETY: only tries to open the library.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(KernelError::Driver {
                op: "cuBLAS",
                msg: "libcublas.so.12 was not found (cuBLAS comes with the CUDA toolkit; strata's \
                      own kernels do not need it)"
                    .into(),
            });
        }
        self.dev.bind()?;
        let b = Arc::new(
            CudaBlas::new(Arc::clone(&self.s)).map_err(|e| KernelError::Driver {
                op: "cuBLAS handle",
                msg: format!("{e:?}"),
            })?,
        );
        *g = Some(Arc::clone(&b));
        Ok(b)
    }

    /// `cublasGemmEx`: c (f32, [n][m] row-major) = b (f16 [n][k]) · a (f16 [m][k])ᵀ, f32 sums.
    /// In cuBLAS's column-major terms: C (m×n, ldc m) = op(A)·B with A the k×m matrix `a` (lda
    /// k) transposed and B the k×n matrix `b` (ldb k).
    pub(crate) fn gemm_f16(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        b: u64,
        c: u64,
    ) -> Result<(), KernelError> {
        use cudarc::cublas::sys::{
            cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
        };
        let blas = self.blas()?;
        self.dev.bind()?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        self.dev.launches.fetch_add(1, Ordering::Relaxed);
        // SAFETY: a, b and c are checked ranges of live device buffers (Stream::gemm_f16) of the
        // sizes the dimensions give; alpha and beta are host scalars (the default pointer mode)
        // read before the call returns; the handle is bound to this stream.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                m as i32,
                n as i32,
                k as i32,
                (&raw const alpha).cast(),
                a as *const std::ffi::c_void,
                cudaDataType_t::CUDA_R_16F,
                k as i32,
                b as *const std::ffi::c_void,
                cudaDataType_t::CUDA_R_16F,
                k as i32,
                (&raw const beta).cast(),
                c as *mut std::ffi::c_void,
                cudaDataType_t::CUDA_R_32F,
                m as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| KernelError::Driver {
            op: "cublasGemmEx",
            msg: format!("{e:?}"),
        })
    }
}
