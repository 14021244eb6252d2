//! The GPU half of `strata calibrate`: present only where the CUDA driver is.

use strata_engine::plan::profile::GpuProfile;
use strata_kernels::{Device, ops};

/// Published dense tensor-core peaks (f16 with f32 accumulation TFLOPS, int8 TOPS) by name;
/// the kernels' share of them is measured where a benchmark exists.
fn peaks(name: &str) -> (f64, f64) {
    let n = name.to_ascii_lowercase();
    for (k, v) in [
        ("h200", (989.0, 1979.0)),
        ("h100", (989.0, 1979.0)),
        ("a100", (312.0, 624.0)),
        ("l40s", (362.0, 733.0)),
        ("4090", (165.0, 660.0)),
        ("3090", (71.0, 284.0)),
    ] {
        if n.contains(k) {
            return v;
        }
    }
    (50.0, 200.0)
}

/// Measures the GPU when a driver is present; `None` (no GPU section) otherwise.
pub fn calibrate() -> anyhow::Result<Option<GpuProfile>> {
    if !Device::cuda_driver_present() {
        eprintln!("no CUDA driver (libcuda.so.1): the profile has no GPU");
        return Ok(None);
    }
    let dev = Device::cuda(0)?;
    let info = dev.info();
    eprintln!("measuring {} …", info.name);
    let s = dev.stream()?;
    let n = 256 << 20;
    let host = dev.alloc_host(n)?;
    let (a, b) = (dev.alloc(n)?, dev.alloc(n)?);
    let time = |f: &dyn Fn() -> Result<(), strata_kernels::KernelError>| -> anyhow::Result<f64> {
        f()?;
        s.synchronize()?;
        let t0 = s.record_timed()?;
        for _ in 0..5 {
            f()?;
        }
        let t1 = s.record_timed()?;
        t1.synchronize()?;
        Ok(f64::from(t0.elapsed_ms(&t1)?) * 1e-3 / 5.0)
    };
    // SAFETY: `host` outlives the copies (the stream is synchronized inside `time`).
    let h2d = n as f64 / time(&|| unsafe { s.upload_async(&a, 0, &host, 0, n) })? / 1e9;
    let d2d = 2.0 * n as f64 / time(&|| s.copy(&b, 0, &a, 0, n))? / 1e9;
    let mut back = vec![0u8; 64 << 20];
    let t0 = std::time::Instant::now();
    s.download(&a, 0, &mut back)?;
    let d2h = back.len() as f64 / t0.elapsed().as_secs_f64() / 1e9;
    // Launch cost: a one-row norm, many times.
    let (x, w, y) = (dev.alloc(4096)?, dev.alloc(4096)?, dev.alloc(4096)?);
    let launch = time(&|| {
        for _ in 0..200 {
            ops::norm::rms_norm(&s, &x, &w, &y, 1, 1024, 1e-6)?;
        }
        Ok(())
    })? / 200.0;
    let (f16, int8) = peaks(&info.name);
    Ok(Some(GpuProfile {
        name: info.name,
        vram_bytes: info.total_memory as u64,
        // A device copy reads and writes: its rate is a practical peak of device memory.
        mem_gbs: d2d,
        matvec_efficiency: 0.5,
        f16_tflops: f16,
        int8_tops: int8,
        gemm_efficiency: 0.5,
        h2d_gbs: h2d,
        d2h_gbs: d2h,
        launch_us: launch * 1e6,
        crossing_us: 15.0,
    }))
}
