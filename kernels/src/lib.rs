//! strata's GPU math.
//!
//! The kernels are CUDA C++ in `kernels/cuda/*.cu`, one file per op family, written once and
//! proven in three layers:
//! - **Compiles**: NVIDIA's NVRTC turns each file into PTX (`kernels/ptx/*.ptx`, committed and
//!   embedded in the binary, see [`ptx`]); CI regenerates it, compares, and assembles it with
//!   `ptxas` for sm_80–sm_90 (`strata-ptx`, `kernels/tools/ci.sh`). Users need only the driver,
//!   which JIT-compiles the PTX for their GPU.
//! - **Computes the right thing**: the same text runs on the CPU in a simulator of CUDA's
//!   execution model ([`Device::sim`], `kernels/sim/`): threads are fibers scheduled in a seeded
//!   random order, shared memory and fresh device memory are poisoned, every access is bounds-
//!   checked and shared-memory races are reported. Every kernel is tested there against the CPU
//!   reference.
//! - **Runs**: [`Device::cuda`] drives a real GPU through the driver (cudarc); the same tests
//!   and a benchmark run there when a GPU is present (`kernels/tools/gpu-check.sh`).
//!
//! The main types: [`Device`] (a GPU or the simulated one; buffers, streams, kernels),
//! [`DeviceBuffer`] (device memory), [`HostBuffer`] (pinned host memory), [`Stream`] and
//! [`Event`] (ordering), and the typed launchers of each kernel family in [`ops`].

#![deny(unsafe_op_in_unsafe_fn)]

mod cuda;
mod device;
pub mod ops;
pub mod ptx;
mod sim;

pub use device::{
    Arg, Backend, Device, DeviceBuffer, DeviceInfo, Event, Graph, GraphExec, HostBuffer,
    HostRegion, Kernel, KernelError, LaunchConfig, SimConfig, Stream, TransferStats,
};
