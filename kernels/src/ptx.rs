//! The PTX of every kernel file, made by NVRTC from `kernels/cuda/*.cu` (`strata-ptx gen`),
//! committed under `kernels/ptx/` and embedded here, so that a user's build needs no CUDA
//! toolkit: the driver JIT-compiles it for the GPU it runs on.

/// NVRTC release the committed PTX comes from (the Python package `nvidia-cuda-nvrtc-cu12`).
pub const NVRTC_VERSION: &str = "12.9.86";
/// The PTX ISA version NVRTC 12.9 writes; a driver must support it to load the modules.
pub const PTX_ISA: &str = "8.8";
/// The CUDA release whose drivers first load that ISA.
pub const CUDA_VERSION: &str = "12.9";
/// The virtual architecture the PTX is made for: every GPU from Ampere on can run it.
pub const ARCH: &str = "compute_80";

/// One kernel file's PTX.
#[derive(Clone, Copy, Debug)]
pub struct Module {
    /// The file's stem (`norm` for `cuda/norm.cu`).
    pub name: &'static str,
    pub ptx: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/ptx_modules.rs"));

/// The kernels (`.entry` names) of a module's PTX.
pub fn entries(ptx: &str) -> impl Iterator<Item = &str> {
    ptx.lines().filter_map(|l| {
        let l = l.trim_start();
        let rest = l
            .strip_prefix(".visible .entry ")
            .or_else(|| l.strip_prefix(".entry "))?;
        Some(rest.split('(').next().unwrap_or(rest).trim())
    })
}

/// The module that holds kernel `name`.
pub fn module_of(name: &str) -> Option<Module> {
    MODULES
        .iter()
        .copied()
        .find(|m| entries(m.ptx).any(|e| e == name))
}
