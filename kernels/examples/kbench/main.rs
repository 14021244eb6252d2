//! Kernel benchmark: each kernel family's representative shapes, timed with device events,
//! printed as one table with achieved GB/s and TFLOPS against the device's peak.
//!
//! `cargo run --release -p strata-kernels --example kbench -- [--device cuda|sim] [--quick]`
//! On the simulator the figures only show that every case runs (`--quick` shrinks them).

mod cases;

use std::time::Instant;

use strata_kernels::{Device, KernelError, SimConfig, Stream};

/// What a case runs: its kernels, queued on the stream.
pub type Run = Box<dyn FnMut(&Stream) -> Result<(), KernelError>>;

/// One benchmark case: a kernel (or a short sequence) at one shape.
pub(crate) struct Case {
    pub family: &'static str,
    pub name: String,
    /// Bytes the case must move to and from device memory (weights, activations, outputs).
    pub bytes: u64,
    /// Arithmetic operations (a multiply-add counts two).
    pub flops: u64,
    pub run: Run,
}

/// Published peaks (memory GB/s, dense f16 TFLOPS, int8 TOPS) by device name.
fn peak(name: &str) -> Option<(f64, f64, f64)> {
    let n = name.to_ascii_lowercase();
    let table = [
        ("h200", (4800.0, 989.0, 1979.0)),
        ("h100 pcie", (2000.0, 756.0, 1513.0)),
        ("h100", (3350.0, 989.0, 1979.0)),
        ("a100", (2039.0, 312.0, 624.0)),
        ("l40s", (864.0, 362.0, 733.0)),
        ("4090", (1008.0, 165.0, 660.0)),
        ("3090", (936.0, 71.0, 284.0)),
    ];
    table.iter().find(|(k, _)| n.contains(k)).map(|(_, v)| *v)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), KernelError> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let which = args
        .iter()
        .position(|a| a == "--device")
        .and_then(|i| args.get(i + 1))
        .map_or("cuda", String::as_str);
    let dev = match which {
        "sim" => Device::sim(SimConfig {
            memory: 4 << 30,
            check_races: false,
            ..SimConfig::default()
        })?,
        _ => Device::cuda(0)?,
    };
    let info = dev.info();
    let s = dev.stream()?;
    // The measured device-to-device copy bandwidth (read + write), as a practical peak.
    let copy_gbs = {
        let n = if quick { 1 << 20 } else { 1 << 30 };
        let (a, b) = (dev.alloc(n)?, dev.alloc(n)?);
        s.copy(&b, 0, &a, 0, n)?;
        s.synchronize()?;
        let t0 = s.record_timed()?;
        let reps = if quick { 1 } else { 10 };
        for _ in 0..reps {
            s.copy(&b, 0, &a, 0, n)?;
        }
        let t1 = s.record_timed()?;
        t1.synchronize()?;
        2.0 * (n * reps) as f64 / (t0.elapsed_ms(&t1)? as f64 * 1e-3) / 1e9
    };
    let published = peak(&info.name);
    println!(
        "device: {} (sm_{}{}, {} SMs, {:.1} GiB); measured copy {:.0} GB/s{}",
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.multiprocessors,
        info.total_memory as f64 / (1u64 << 30) as f64,
        copy_gbs,
        published.map_or(String::new(), |p| format!(
            "; published {:.0} GB/s, {:.0} f16 TFLOPS, {:.0} int8 TOPS",
            p.0, p.1, p.2
        ))
    );
    println!(
        "{:<10} {:<44} {:>10} {:>9} {:>7} {:>9}",
        "family", "case", "time (us)", "GB/s", "% copy", "TFLOPS"
    );
    let started = Instant::now();
    for mut c in cases::all(&dev, quick)? {
        (c.run)(&s)?;
        s.synchronize()?;
        let reps = if quick || dev.info().backend == strata_kernels::Backend::Sim {
            1
        } else {
            20
        };
        let t0 = s.record_timed()?;
        for _ in 0..reps {
            (c.run)(&s)?;
        }
        let t1 = s.record_timed()?;
        t1.synchronize()?;
        s.synchronize()?;
        let us = t0.elapsed_ms(&t1)? as f64 * 1e3 / reps as f64;
        let gbs = c.bytes as f64 / (us * 1e-6) / 1e9;
        let tflops = c.flops as f64 / (us * 1e-6) / 1e12;
        println!(
            "{:<10} {:<44} {:>10.1} {:>9.1} {:>6.0}% {:>9.2}",
            c.family,
            c.name,
            us,
            gbs,
            100.0 * gbs / copy_gbs,
            tflops
        );
    }
    println!("({:.1} s)", started.elapsed().as_secs_f64());
    Ok(())
}
