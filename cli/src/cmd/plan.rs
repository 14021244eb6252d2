//! `strata plan`: where each part of a model would live and run on a machine, the speed that
//! placement should reach and what limits it — without loading anything.

use std::collections::HashMap;

use anyhow::Context as _;
use strata_engine::model::names::cpu_moe;
use strata_engine::plan::{
    Budgets, DeviceChoice, HwProfile, ModelDesc, Overrides, PinTarget, plan,
};
use strata_storage::gguf::GgufFile;
use strata_storage::residency::overrides::{Target, parse_overrides, target_of};
use strata_storage::residency::parse_size;
use strata_storage::store::Store;

use super::common::resolve_model;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model: a store name, a path to a .gguf file, or an https URL.
    #[arg(short = 'm', long, default_value = super::common::DEFAULT_MODEL)]
    pub model: String,
    /// Hardware profile: a shipped name (cpu-2core, h100-sxm, h200, a100-80g, l40s, rtx4090,
    /// rtx3090, laptop-8g) or a TOML file. Default: this machine's, from `strata calibrate`.
    #[arg(long = "hw", value_name = "PROFILE")]
    pub hw: Option<String>,
    /// VRAM the weights and KV cache may use (bytes with K/M/G, or a % of the GPU's).
    #[arg(long = "vram-budget", value_name = "SIZE")]
    pub vram_budget: Option<String>,
    /// RAM the weights may use (bytes with K/M/G, or a % of the model's weights).
    #[arg(long = "ram-budget", value_name = "SIZE")]
    pub ram_budget: Option<String>,
    /// Context size the KV cache is sized for.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    pub ctx: u64,
    /// Context depth at which decode speed is predicted (llama-bench's -d).
    #[arg(short = 'd', long = "depth", default_value_t = 0)]
    pub depth: u64,
    /// Prefill batch.
    #[arg(long = "ubatch", default_value_t = 512)]
    pub ubatch: u64,
    /// llama.cpp's -ngl: the last N of the layers (the output counts as one) on the GPU.
    #[arg(long = "n-gpu-layers", visible_alias = "ngl", value_name = "N")]
    pub n_gpu_layers: Option<usize>,
    /// Keep the KV cache in host RAM and run attention on the CPU.
    #[arg(long = "no-kv-offload", visible_alias = "nkvo")]
    pub no_kv_offload: bool,
    /// Keep every layer's experts on the CPU.
    #[arg(long = "cpu-moe")]
    pub cpu_moe: bool,
    /// Keep the experts of the first N layers on the CPU.
    #[arg(long = "n-cpu-moe", value_name = "N")]
    pub n_cpu_moe: Option<usize>,
    /// Placement overrides, as llama.cpp's -ot: PATTERN=CPU|RAM|CUDA0.
    #[arg(
        long = "override-tensor",
        visible_alias = "ot",
        value_name = "PATTERN=TYPE"
    )]
    pub override_tensor: Vec<String>,
    /// auto (the GPU when the profile has one), cpu, or gpu.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// KV cache type (f16, q8_0, q4_0), for its size.
    #[arg(long = "cache-type-k", visible_alias = "ctk", default_value = "f16")]
    pub cache_type: String,
}

/// This machine's calibrated profile, where `strata calibrate` writes it.
pub fn calibrated_path() -> anyhow::Result<std::path::PathBuf> {
    Ok(Store::open_default()
        .context("opening the model store")?
        .root()
        .join("hw.toml"))
}

/// The profile `--hw` names, or this machine's calibrated one, or (with a note) cpu-2core.
pub fn load_profile(hw: Option<&str>) -> anyhow::Result<HwProfile> {
    if let Some(h) = hw {
        return Ok(HwProfile::load(h)?);
    }
    let path = calibrated_path()?;
    if path.exists() {
        return HwProfile::load(&path.display().to_string())
            .with_context(|| format!("the calibrated profile {}", path.display()));
    }
    eprintln!(
        "note: no calibrated profile at {} (run `strata calibrate`); using the shipped cpu-2core",
        path.display()
    );
    Ok(HwProfile::load("cpu-2core")?)
}

pub fn exec(a: Args) -> anyhow::Result<()> {
    let path = resolve_model(&a.model)?;
    let g = GgufFile::open(&path).with_context(|| format!("reading {}", path.display()))?;
    let desc = ModelDesc::from_gguf(&a.model, &g)?;
    let hw = load_profile(a.hw.as_deref())?;
    let vram = match (&a.vram_budget, &hw.gpu) {
        (Some(s), Some(gpu)) => {
            Some(parse_size(s, gpu.vram_bytes).map_err(|e| anyhow::anyhow!("--vram-budget: {e}"))?)
        }
        (Some(_), None) => anyhow::bail!("--vram-budget: the profile {} has no GPU", hw.name),
        (None, _) => None,
    };
    let ram = a
        .ram_budget
        .as_deref()
        .map(|s| parse_size(s, desc.total_bytes()))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--ram-budget: {e}"))?;
    let kv_value_bytes = match a.cache_type.to_ascii_lowercase().as_str() {
        "f16" => 2.0,
        "q8_0" => 34.0 / 32.0,
        "q4_0" => 18.0 / 32.0,
        other => anyhow::bail!("--cache-type-k {other}: expected f16, q8_0 or q4_0"),
    };
    let device = match a.device.as_str() {
        "auto" => DeviceChoice::Auto,
        "cpu" => DeviceChoice::Cpu,
        "gpu" | "cuda" | "sim" => DeviceChoice::Gpu,
        other => anyhow::bail!("--device {other}: expected auto, cpu or gpu"),
    };
    // -ot rules resolved against this file's tensor names.
    let mut rules = Vec::new();
    for spec in &a.override_tensor {
        rules.extend(parse_overrides(spec).map_err(|e| anyhow::anyhow!("-ot {spec}: {e}"))?);
    }
    if a.cpu_moe || a.n_cpu_moe.is_some() {
        rules.push(cpu_moe(if a.cpu_moe { None } else { a.n_cpu_moe }));
    }
    let mut pins = HashMap::new();
    for t in &g.tensors {
        if let Some(target) = target_of(&rules, &t.name) {
            let pin = match target {
                Target::Cpu | Target::Ram => PinTarget::Cpu,
                Target::Gpu(_) => PinTarget::Gpu,
            };
            pins.insert(t.name.clone(), pin);
        }
    }
    let b = Budgets {
        vram,
        ram,
        n_ctx: a.ctx,
        kv_value_bytes,
        depth: a.depth,
        ubatch: a.ubatch,
    };
    let o = Overrides {
        device,
        n_gpu_layers: a.n_gpu_layers,
        no_kv_offload: a.no_kv_offload,
        n_cpu_moe: None,
        pins,
    };
    let p = plan(&desc, &hw, &b, &o)?;
    print!("{}", p.explain(&desc, &hw));
    println!("profile: {} ({})", hw.name, hw.source);
    Ok(())
}
