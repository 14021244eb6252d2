//! The planner: which weights live where (VRAM, RAM, SSD) and which device runs each part of a
//! step, with the decode and prefill speed that placement should reach and what limits it.
//!
//! [`plan`] is a pure function (DESIGN.md invariant 2) of a [`ModelDesc`] (sizes from the
//! tensor table), a [`HwProfile`] (shipped, or measured by `strata calibrate`), [`Budgets`]
//! and the user's [`Overrides`] (llama.cpp's `-ngl`, `-nkvo`, `--cpu-moe`, `-ot`). The cost
//! model ([`cost`]) is the max of the serial compute of a step (CPU and GPU phases one after
//! another, plus the crossings between them) and each transfer that overlaps it (weights
//! streamed over PCIe, reads from SSD), in the spirit of FlexGen and MoE-Lens.

pub mod calibrate;
pub mod cost;
pub mod desc;
pub mod profile;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt::Write as _;

pub use desc::{ExpertsDesc, LayerDesc, MatDesc, ModelDesc};
pub use profile::HwProfile;

/// Which device runs a phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Exec {
    Cpu,
    Gpu,
}

/// Where bytes rest between steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Vram,
    Ram,
    Ssd,
}

/// A group of weights: where it rests and where it is computed. `Gpu` over `Ram` or `Ssd`
/// means the weights are copied to the GPU each step (streamed); `Cpu` over `Ssd` means they
/// are read from disk each step and computed on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    pub tier: Tier,
    pub exec: Exec,
}

impl Place {
    pub const CPU: Place = Place {
        tier: Tier::Ram,
        exec: Exec::Cpu,
    };
    pub const GPU: Place = Place {
        tier: Tier::Vram,
        exec: Exec::Gpu,
    };
}

/// A MoE layer's experts across the tiers. Experts in VRAM run on the GPU; the others run on
/// the CPU where they lie, unless at least `gpu_min_tokens` tokens of a step are routed to one,
/// when copying it to the GPU costs less (Fiddler's rule, from the cost model).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertPlan {
    pub vram: usize,
    pub ram: usize,
    pub ssd: usize,
    pub gpu_min_tokens: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerPlan {
    /// Q, K, V and output projections (with their norms and biases).
    pub attn: Place,
    /// Attention over the KV cache.
    pub attend: Exec,
    /// Where this layer's KV cache lives.
    pub kv: Tier,
    /// The dense FFN, or a MoE layer's router and shared expert.
    pub ffn: Place,
    pub experts: Option<ExpertPlan>,
}

/// The speed a placement should reach.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prediction {
    pub tokens_per_s: f64,
    /// Seconds of each resource per step (one token for decode, one batch for prefill).
    pub cpu_s: f64,
    pub gpu_s: f64,
    pub crossing_s: f64,
    pub pcie_s: f64,
    pub disk_s: f64,
    pub bottleneck: Bottleneck,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bottleneck {
    CpuCompute,
    GpuCompute,
    Pcie,
    Disk,
}

impl Bottleneck {
    pub fn describe(self) -> &'static str {
        match self {
            Bottleneck::CpuCompute => "CPU compute (memory bandwidth of the CPU's weights)",
            Bottleneck::GpuCompute => "GPU compute",
            Bottleneck::Pcie => "PCIe (weights streamed to the GPU)",
            Bottleneck::Disk => "SSD reads (weights streamed from disk)",
        }
    }
}

/// Bytes resting in each tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierBytes {
    pub vram: u64,
    pub ram: u64,
    pub ssd: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    /// The GPU used, if any.
    pub gpu: Option<String>,
    pub layers: Vec<LayerPlan>,
    pub output: Place,
    /// Where embedding rows are gathered from: RAM (or rows read from SSD) on the CPU, or VRAM
    /// on the GPU when the table is the output projection placed there.
    pub embedding: Tier,
    pub weights: TierBytes,
    /// KV cache at the context size planned for.
    pub kv: TierBytes,
    pub decode: Prediction,
    pub prefill: Prediction,
    /// Decode at this context depth, prefill in batches of this many tokens.
    pub depth: u64,
    pub ubatch: u64,
}

/// Memory the planner may use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budgets {
    /// VRAM for weights and KV (default: 90% of the GPU's, less a scratch reserve).
    pub vram: Option<u64>,
    /// RAM for weights (default: 70% of the machine's).
    pub ram: Option<u64>,
    /// Context size the KV cache is sized for.
    pub n_ctx: u64,
    /// Bytes per KV value (2 for f16, 34/32 for q8_0, 18/32 for q4_0).
    pub kv_value_bytes: f64,
    /// Context depth at which decode is predicted.
    pub depth: u64,
    /// Prefill batch.
    pub ubatch: u64,
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            vram: None,
            ram: None,
            n_ctx: 4096,
            kv_value_bytes: 2.0,
            depth: 0,
            ubatch: 512,
        }
    }
}

/// Which device the user asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The GPU when the profile has one.
    #[default]
    Auto,
    Cpu,
    Gpu,
}

/// Where `-ot PATTERN=TARGET` sends a tensor (already matched against names by the caller).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinTarget {
    /// `CPU` / `RAM`: resident in RAM, computed on the CPU.
    Cpu,
    /// `CUDA0`: in VRAM.
    Gpu,
}

/// The user's placement words, as llama.cpp spells them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    pub device: DeviceChoice,
    /// `-ngl N`: the last N of the n_layer + 1 "layers" (the output projection counts as the
    /// last) on the GPU.
    pub n_gpu_layers: Option<usize>,
    /// `-nkvo`: KV cache in host RAM, attention on the CPU.
    pub no_kv_offload: bool,
    /// `--n-cpu-moe N` (`--cpu-moe` is all): the experts of the first N layers stay on the CPU.
    pub n_cpu_moe: Option<usize>,
    /// `-ot`: tensor name → target.
    pub pins: HashMap<String, PinTarget>,
}

/// Why no placement fits.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    #[error(
        "the placement needs {needed} bytes of VRAM ({what}), but the VRAM budget is {budget} \
         bytes: lower -ngl or raise --vram-budget"
    )]
    VramTooSmall {
        needed: u64,
        budget: u64,
        what: String,
    },
    #[error("a GPU placement was asked for ({0}), but the hardware profile has no GPU")]
    NoGpu(&'static str),
}

/// VRAM kept back for activations, scratch and the CUDA context (an eighth of a smaller
/// device's).
const VRAM_RESERVE: u64 = 768 << 20;

/// The placement of `m` on `hw` within `b`, following `o`.
pub fn plan(
    m: &ModelDesc,
    hw: &HwProfile,
    b: &Budgets,
    o: &Overrides,
) -> Result<Placement, PlanError> {
    let wants_gpu = o.device == DeviceChoice::Gpu
        || o.n_gpu_layers.is_some_and(|n| n > 0)
        || o.pins.values().any(|&t| t == PinTarget::Gpu);
    let gpu = match (o.device, &hw.gpu) {
        (DeviceChoice::Cpu, _) => None,
        (_, Some(g)) => Some(g),
        (_, None) if wants_gpu => {
            return Err(PlanError::NoGpu(if o.n_gpu_layers.is_some() {
                "-ngl"
            } else {
                "--device gpu or -ot …=CUDA0"
            }));
        }
        (_, None) => None,
    };
    let n = m.layers.len();
    let mut layers: Vec<LayerPlan> = m
        .layers
        .iter()
        .map(|l| LayerPlan {
            attn: Place::CPU,
            attend: Exec::Cpu,
            kv: Tier::Ram,
            ffn: Place::CPU,
            experts: l.experts.as_ref().map(|x| ExpertPlan {
                vram: 0,
                ram: x.n_expert,
                ssd: 0,
                gpu_min_tokens: usize::MAX,
            }),
        })
        .collect();
    let mut output = Place::CPU;
    let kv_bytes = |l: &LayerDesc| -> u64 {
        let positions = l.window.map_or(b.n_ctx, |w| w.min(b.n_ctx));
        (positions as f64 * l.kv_values_per_token as f64 * b.kv_value_bytes) as u64
    };
    let pinned = |mats: &[MatDesc]| -> Option<PinTarget> {
        mats.iter().find_map(|mm| o.pins.get(&mm.name).copied())
    };
    let cpu_moe = |il: usize| o.n_cpu_moe.is_some_and(|k| il < k);

    if let Some(g) = gpu {
        // Activations and scratch need room beside the weights (less on a small device): the
        // default budget leaves it; an explicit one is the weights' and KV cache's alone.
        let reserve = match b.vram {
            Some(_) => 0,
            None => VRAM_RESERVE.min(g.vram_bytes / 8),
        };
        let budget = b
            .vram
            .unwrap_or((g.vram_bytes as f64 * 0.9) as u64)
            .saturating_sub(reserve);
        let mut used = 0u64;
        let dense = |l: &LayerDesc| l.attn_bytes() + l.ffn_bytes() + l.vector_bytes;
        // Which layers (and the output) are the GPU's.
        let mut on_gpu = vec![false; n];
        let mut out_on_gpu = false;
        match o.n_gpu_layers {
            Some(ngl) => {
                let start = (n + 1).saturating_sub(ngl);
                for (il, g) in on_gpu.iter_mut().enumerate() {
                    *g = il >= start;
                }
                out_on_gpu = ngl >= 1;
            }
            None => {
                // The output first (every token reads it), then layers from the last down,
                // while their dense weights fit.
                if m.output.bytes <= budget {
                    out_on_gpu = true;
                    used += m.output.bytes;
                }
                for il in (0..n).rev() {
                    let need = dense(&m.layers[il]);
                    if used + need > budget {
                        break;
                    }
                    used += need;
                    on_gpu[il] = true;
                }
                used = 0;
            }
        }
        // Pins win over the layer choice, group by group.
        let mut what = Vec::new();
        if out_on_gpu && pinned(std::slice::from_ref(&m.output)) != Some(PinTarget::Cpu) {
            output = Place::GPU;
            used += m.output.bytes;
            what.push("output".to_string());
        }
        for il in 0..n {
            let l = &m.layers[il];
            for (group, mats) in [(0, &l.attn), (1, &l.ffn)] {
                let go = match pinned(mats) {
                    Some(PinTarget::Gpu) => true,
                    Some(PinTarget::Cpu) => false,
                    None => on_gpu[il],
                };
                if go {
                    let p = if group == 0 {
                        &mut layers[il].attn
                    } else {
                        &mut layers[il].ffn
                    };
                    *p = Place::GPU;
                    used += mats.iter().map(|x| x.bytes).sum::<u64>();
                }
            }
            if on_gpu[il] {
                used += l.vector_bytes;
                what.push(format!("layer {il}"));
            }
        }
        if used > budget {
            return Err(PlanError::VramTooSmall {
                needed: used + reserve,
                budget: budget + reserve,
                what: summarize(&what),
            });
        }
        // KV in VRAM for the GPU's layers, while it fits (never with -nkvo).
        if !o.no_kv_offload {
            for il in (0..n).rev() {
                if layers[il].attn.exec != Exec::Gpu {
                    continue;
                }
                let need = kv_bytes(&m.layers[il]);
                if used + need > budget {
                    break;
                }
                used += need;
                layers[il].kv = Tier::Vram;
                layers[il].attend = Exec::Gpu;
            }
        }
        // Experts: the GPU's layers hold theirs while all fit (-ngl), then what is left of
        // VRAM is an expert cache spread evenly over the MoE layers.
        let moe_layers: Vec<usize> = (0..n)
            .filter(|&il| m.layers[il].experts.is_some() && !cpu_moe(il))
            .collect();
        for &il in &moe_layers {
            let x = m.layers[il].experts.as_ref().map_or(0, |x| x.n_expert);
            let bytes = m.layers[il].expert_bytes();
            let pin = m.layers[il].experts.as_ref().and_then(|x| pinned(&x.slabs));
            if pin == Some(PinTarget::Cpu) {
                continue;
            }
            let want = pin == Some(PinTarget::Gpu) || (o.n_gpu_layers.is_some() && on_gpu[il]);
            if want {
                if used + bytes > budget {
                    return Err(PlanError::VramTooSmall {
                        needed: used + bytes + reserve,
                        budget: budget + reserve,
                        what: format!("the experts of layer {il}"),
                    });
                }
                used += bytes;
                if let Some(e) = &mut layers[il].experts {
                    *e = ExpertPlan {
                        vram: x,
                        ram: 0,
                        ssd: 0,
                        gpu_min_tokens: 1,
                    };
                }
            }
        }
        if o.n_gpu_layers.is_none() {
            let open: Vec<usize> = moe_layers
                .iter()
                .copied()
                .filter(|&il| layers[il].experts.is_some_and(|e| e.vram == 0))
                .filter(|&il| {
                    m.layers[il].experts.as_ref().and_then(|x| pinned(&x.slabs))
                        != Some(PinTarget::Cpu)
                })
                .collect();
            if let Some(&first) = open.first() {
                let bpe = m.layers[first]
                    .experts
                    .as_ref()
                    .map_or(1, ExpertsDesc::bytes_per_expert)
                    .max(1);
                let per_layer = (budget.saturating_sub(used) / bpe / open.len() as u64) as usize;
                for &il in &open {
                    if let (Some(e), Some(x)) = (&mut layers[il].experts, &m.layers[il].experts) {
                        e.vram = per_layer.min(x.n_expert);
                        e.ram = x.n_expert - e.vram;
                    }
                }
            }
        }
        // Layers left on the CPU: stream them to the GPU instead where that makes a decode
        // step faster (PCIe runs alongside compute), one at a time while it helps.
        if o.n_gpu_layers.is_none() {
            loop {
                let best = cost::decode(m, hw, &layers, output, b).tokens_per_s;
                let mut pick = None;
                for il in 0..n {
                    for group in 0..2 {
                        let p = if group == 0 {
                            layers[il].attn
                        } else {
                            layers[il].ffn
                        };
                        let mats = if group == 0 {
                            &m.layers[il].attn
                        } else {
                            &m.layers[il].ffn
                        };
                        if p.exec != Exec::Cpu || pinned(mats).is_some() || mats.is_empty() {
                            continue;
                        }
                        let mut trial = layers.clone();
                        let q = if group == 0 {
                            &mut trial[il].attn
                        } else {
                            &mut trial[il].ffn
                        };
                        q.exec = Exec::Gpu;
                        let t = cost::decode(m, hw, &trial, output, b).tokens_per_s;
                        if t > best * 1.005 && pick.is_none_or(|(_, _, bt)| t > bt) {
                            pick = Some((il, group, t));
                        }
                    }
                }
                let Some((il, group, _)) = pick else { break };
                if group == 0 {
                    layers[il].attn.exec = Exec::Gpu;
                } else {
                    layers[il].ffn.exec = Exec::Gpu;
                }
            }
        }
        for (il, l) in layers.iter_mut().enumerate() {
            if let (Some(e), Some(x)) = (&mut l.experts, &m.layers[il].experts) {
                e.gpu_min_tokens = cost::fiddler_tokens(hw, x);
            }
        }
    }

    // RAM: what is not in VRAM rests in RAM from layer 0 on while the budget lasts (as the
    // residency plan does), the rest on SSD; experts not in VRAM fill what RAM is left.
    let ram_budget = b.ram.unwrap_or((hw.ram_bytes as f64 * 0.7) as u64);
    let mut ram = m.vector_bytes
        + m.layers
            .iter()
            .zip(&layers)
            .filter(|(_, p)| p.attn.tier != Tier::Vram)
            .map(|(l, _)| l.vector_bytes)
            .sum::<u64>()
        + if output.tier == Tier::Ram {
            m.output.bytes
        } else {
            0
        };
    // A tied table is the output projection: rows are gathered where it lives.
    let embedding = if m.tied_output {
        output.tier
    } else if ram + m.embedding.bytes <= ram_budget {
        ram += m.embedding.bytes;
        Tier::Ram
    } else {
        Tier::Ssd
    };
    for (lp, ld) in layers.iter_mut().zip(&m.layers) {
        for group in 0..2 {
            let mats = if group == 0 { &ld.attn } else { &ld.ffn };
            let p = if group == 0 {
                &mut lp.attn
            } else {
                &mut lp.ffn
            };
            if p.tier == Tier::Vram {
                continue;
            }
            let bytes: u64 = mats.iter().map(|x| x.bytes).sum();
            if ram + bytes <= ram_budget || pinned(mats) == Some(PinTarget::Cpu) {
                ram += bytes;
                p.tier = Tier::Ram;
            } else {
                p.tier = Tier::Ssd;
            }
        }
    }
    // Experts share what RAM is left evenly across the MoE layers (each layer's experts are
    // as likely to be used as another's).
    let moe_left: Vec<usize> = (0..n)
        .filter(|&il| layers[il].experts.is_some_and(|e| e.ram > 0))
        .collect();
    let mut share = ram_budget.saturating_sub(ram) / (moe_left.len().max(1) as u64);
    for (k, &il) in moe_left.iter().enumerate() {
        if let (Some(e), Some(x)) = (&mut layers[il].experts, &m.layers[il].experts) {
            let rest = x.n_expert - e.vram;
            let bpe = x.bytes_per_expert().max(1);
            let fit = if pinned(&x.slabs) == Some(PinTarget::Cpu) {
                rest
            } else {
                (share / bpe) as usize
            };
            e.ram = rest.min(fit);
            e.ssd = rest - e.ram;
            ram += e.ram as u64 * bpe;
            // What one layer could not use goes to the next.
            let left = moe_left.len() - k - 1;
            if left > 0 {
                share = ram_budget.saturating_sub(ram) / left as u64;
            }
        }
    }

    let mut weights = TierBytes {
        ram,
        ..TierBytes::default()
    };
    if output.tier == Tier::Vram {
        weights.vram += m.output.bytes;
    }
    if embedding == Tier::Ssd {
        weights.ssd += m.embedding.bytes;
    }
    let mut kv = TierBytes::default();
    for (il, l) in layers.iter().enumerate() {
        let d = &m.layers[il];
        for (p, bytes) in [(l.attn, d.attn_bytes()), (l.ffn, d.ffn_bytes())] {
            match p.tier {
                Tier::Vram => weights.vram += bytes,
                Tier::Ssd => weights.ssd += bytes,
                Tier::Ram => {}
            }
        }
        if l.attn.tier == Tier::Vram {
            weights.vram += d.vector_bytes;
        }
        if let (Some(e), Some(x)) = (&l.experts, &d.experts) {
            weights.vram += e.vram as u64 * x.bytes_per_expert();
            weights.ssd += e.ssd as u64 * x.bytes_per_expert();
        }
        match l.kv {
            Tier::Vram => kv.vram += kv_bytes(d),
            _ => kv.ram += kv_bytes(d),
        }
    }
    let decode = cost::decode(m, hw, &layers, output, b);
    let prefill = cost::prefill(m, hw, &layers, output, b);
    Ok(Placement {
        gpu: gpu.map(|g| g.name.clone()),
        layers,
        output,
        embedding,
        weights,
        kv,
        decode,
        prefill,
        depth: b.depth,
        ubatch: b.ubatch,
    })
}

fn summarize(what: &[String]) -> String {
    match what.len() {
        0 => "nothing".into(),
        1..=3 => what.join(", "),
        k => format!("{}, … {} ({k} parts)", what[0], what[k - 1]),
    }
}

fn gib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

fn place_name(p: Place) -> &'static str {
    match (p.tier, p.exec) {
        (Tier::Vram, _) => "GPU (VRAM)",
        (Tier::Ram, Exec::Cpu) => "CPU (RAM)",
        (Tier::Ssd, Exec::Cpu) => "CPU (streamed from SSD)",
        (Tier::Ram, Exec::Gpu) => "GPU (streamed from RAM)",
        (Tier::Ssd, Exec::Gpu) => "GPU (streamed from SSD)",
    }
}

impl Placement {
    /// How many layers run their projections on the GPU.
    pub fn gpu_layers(&self) -> usize {
        self.layers
            .iter()
            .filter(|l| l.attn.exec == Exec::Gpu || l.ffn.exec == Exec::Gpu)
            .count()
    }

    /// The placement as `strata plan` prints it: runs of layers placed alike, bytes per tier,
    /// the predicted speeds and what limits them.
    pub fn explain(&self, m: &ModelDesc, hw: &HwProfile) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "model {} ({}, {} layers, {} of weights) on {} — {}",
            m.name,
            m.arch,
            m.layers.len(),
            gib(m.total_bytes()),
            hw.name,
            self.gpu.as_deref().unwrap_or("no GPU")
        );
        let mut i = 0;
        while i < self.layers.len() {
            let mut j = i + 1;
            while j < self.layers.len() && self.layers[j] == self.layers[i] {
                j += 1;
            }
            let l = &self.layers[i];
            let range = if j - i == 1 {
                format!("layer {i}")
            } else {
                format!("layers {i}-{}", j - 1)
            };
            let _ = write!(
                s,
                "  {range:<14} attention weights {:<24} attention {} (KV in {})  FFN {}",
                place_name(l.attn),
                if l.attend == Exec::Gpu { "GPU" } else { "CPU" },
                match l.kv {
                    Tier::Vram => "VRAM",
                    Tier::Ram => "RAM",
                    Tier::Ssd => "SSD",
                },
                place_name(l.ffn)
            );
            if let Some(e) = l.experts {
                let _ = write!(
                    s,
                    "  experts {} VRAM / {} RAM / {} SSD (GPU from {} tokens)",
                    e.vram,
                    e.ram,
                    e.ssd,
                    if e.gpu_min_tokens == usize::MAX {
                        "never".to_string()
                    } else {
                        e.gpu_min_tokens.to_string()
                    }
                );
            }
            s.push('\n');
            i = j;
        }
        let _ = writeln!(
            s,
            "  output         {}; embedding rows from {}",
            place_name(self.output),
            match self.embedding {
                Tier::Vram => "VRAM",
                Tier::Ram => "RAM",
                Tier::Ssd => "SSD",
            }
        );
        let _ = writeln!(
            s,
            "weights: {} VRAM, {} RAM, {} SSD; KV cache: {} VRAM, {} RAM",
            gib(self.weights.vram),
            gib(self.weights.ram),
            gib(self.weights.ssd),
            gib(self.kv.vram),
            gib(self.kv.ram)
        );
        for (what, p, unit) in [
            (
                format!("decode at depth {}", self.depth),
                &self.decode,
                "ms/token",
            ),
            (
                format!("prefill of {} tokens", self.ubatch),
                &self.prefill,
                "ms/batch",
            ),
        ] {
            let _ = writeln!(
                s,
                "{what}: {:.1} t/s — limited by {} (CPU {:.2}, GPU {:.2}, crossings {:.2}, PCIe {:.2}, SSD {:.2} {unit})",
                p.tokens_per_s,
                p.bottleneck.describe(),
                p.cpu_s * 1e3,
                p.gpu_s * 1e3,
                p.crossing_s * 1e3,
                p.pcie_s * 1e3,
                p.disk_s * 1e3
            );
        }
        s
    }
}
