//! Helpers shared by the kernel tests: devices to run on, and typed copies.
#![allow(dead_code, unreachable_pub)]

use strata_kernels::{Device, DeviceBuffer, SimConfig, Stream};

/// The devices every kernel test runs on: the simulator (seeded from `STRATA_SIM_SEED` when
/// set, so that a failure's printed seed can be replayed), and the GPU when
/// `STRATA_TEST_CUDA=1` and a driver is present (kernels/tools/gpu-check.sh sets it).
pub fn devices() -> Vec<Device> {
    let mut v = Vec::new();
    let mut cfg = SimConfig::default();
    if let Some(seed) = std::env::var("STRATA_SIM_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
    {
        cfg.seed = seed;
    }
    v.push(Device::sim(cfg).expect("the simulator is built on this machine"));
    if std::env::var("STRATA_TEST_CUDA").is_ok_and(|v| v == "1") {
        v.push(Device::cuda(0).expect("STRATA_TEST_CUDA=1 but no CUDA device"));
    }
    v
}

pub fn sim() -> Device {
    Device::sim(SimConfig::default()).unwrap()
}

pub fn sim_seeded(seed: u64) -> Device {
    Device::sim(SimConfig {
        seed,
        ..SimConfig::default()
    })
    .unwrap()
}

pub fn put<T: Copy>(s: &Stream, v: &[T]) -> DeviceBuffer {
    let bytes = std::mem::size_of_val(v);
    let b = s.device().alloc(bytes).unwrap();
    // SAFETY: T is plain data (f32, u16, i8, i32, u8 in these tests).
    let raw = unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), bytes) };
    s.upload(&b, 0, raw).unwrap();
    b
}

pub fn get<T: Copy + Default>(s: &Stream, b: &DeviceBuffer, n: usize) -> Vec<T> {
    let mut v = vec![T::default(); n];
    let bytes = n * std::mem::size_of::<T>();
    // SAFETY: T is plain data; the slice covers exactly v's memory.
    let raw = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), bytes) };
    s.download(b, 0, raw).unwrap();
    v
}

pub fn try_get<T: Copy + Default>(
    s: &Stream,
    b: &DeviceBuffer,
    n: usize,
) -> Result<Vec<T>, strata_kernels::KernelError> {
    let mut v = vec![T::default(); n];
    let bytes = n * std::mem::size_of::<T>();
    // SAFETY: as in `get`.
    let raw = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), bytes) };
    s.download(b, 0, raw)?;
    Ok(v)
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn rand_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
