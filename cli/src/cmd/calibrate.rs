//! `strata calibrate`: measures this machine into a hardware profile for `strata plan` (and the
//! placement `run`/`stratad` choose): the CPU kernels' rates, memory and disk bandwidth, and,
//! where a GPU is present, its copy bandwidths.

use anyhow::Context as _;
use strata_engine::plan::HwProfile;
use strata_engine::plan::calibrate::{calibrate_cpu, cpu_id};
use strata_engine::plan::profile::{DecodeProfile, DiskProfile};
use strata_simd::pool::ThreadPool;

use super::common::{resolve_model, threads};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Threads (default: one per physical core, as `run` uses).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Where to write the profile (default: hw.toml in the model store, which `strata plan`
    /// reads).
    #[arg(short = 'o', long)]
    pub output: Option<std::path::PathBuf>,
    /// A model file whose disk is measured (default: the default model, pulled if needed).
    #[arg(short = 'm', long, default_value = super::common::DEFAULT_MODEL)]
    pub model: String,
    /// Smaller measurements (seconds instead of a minute; less exact).
    #[arg(long)]
    pub quick: bool,
}

fn ram_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map_or(0, |k| k * 1024)
}

pub fn exec(a: Args) -> anyhow::Result<()> {
    let n = threads(a.threads)?;
    let pool = ThreadPool::new(n);
    // The decode kernels first (row or interleaved, 256- or 512-bit, prefetch distance), at
    // one thread and at `n`, so that the rates below are those of the kernels chosen; `run`
    // and `stratad` measure the prefetch distance at their first load (and the kernels too
    // under `STRATA_DECODE=auto`: by default they keep the level's, so that every process
    // computes the same bits).
    eprintln!("choosing the decode kernels…");
    let one = ThreadPool::new(1);
    let pools: Vec<&ThreadPool> = if n > 1 { vec![&one, &pool] } else { vec![&one] };
    let reps = if a.quick { 2 } else { 5 };
    let m = strata_simd::tune::measure(&pools, &strata_simd::tune::TYPES, reps, true, usize::MAX);
    for line in strata_simd::tune::describe(&m) {
        eprintln!("  {line}");
    }
    eprintln!("  chosen: {}", m.tuning.summary());
    strata_simd::tune::set(m.tuning);
    drop(one);
    eprintln!("measuring the CPU kernels on {n} threads…");
    let cpu = calibrate_cpu(&pool, a.quick);
    let path = resolve_model(&a.model)?;
    eprintln!("measuring the disk under {}…", path.display());
    let disk = super::bench::measure_disk(&path)?;
    let read_gbs = disk.iter().copied().fold(0.0, f64::max);
    let gpu = super::gpu::calibrate()?;
    let p = HwProfile {
        name: "calibrated".into(),
        source: format!(
            "strata calibrate{} on {} threads, {}",
            if a.quick { " --quick" } else { "" },
            n,
            cpu.description
        ),
        ram_bytes: ram_bytes(),
        cpu,
        disk: DiskProfile {
            description: format!("the disk holding {}", path.display()),
            read_gbs,
        },
        gpu,
        decode: Some(DecodeProfile::measured(
            cpu_id(),
            &m.tuning,
            &strata_simd::tune::TYPES,
        )),
    };
    let text = p.to_toml();
    let out = match a.output {
        Some(o) => o,
        None => super::plan::calibrated_path()?,
    };
    std::fs::write(&out, &text).with_context(|| format!("writing {}", out.display()))?;
    print!("{text}");
    eprintln!("wrote {}", out.display());
    Ok(())
}
