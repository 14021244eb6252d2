//! The cost model behind [`super::plan`]: a step's time is the largest of
//! - its serial compute: each phase on its device one after another (a token's layers depend on
//!   each other), with a fixed cost for each crossing of the activations between devices;
//! - the PCIe time of weights streamed to the GPU, which prefetching overlaps with compute;
//! - the SSD time of weights (and expert misses) read from disk, overlapped likewise.
//!
//! Matrix products cost their weight bytes over the device's decode rate (decode is
//! memory-bound) or their operations over its GEMM rate (prefill), plus a fixed cost per call.

use strata_storage::quant::GgmlType;

use super::desc::ExpertsDesc;
use super::profile::HwProfile;
use super::{Bottleneck, Budgets, Exec, LayerPlan, MatDesc, ModelDesc, Place, Prediction, Tier};

#[derive(Default)]
struct Acc {
    cpu: f64,
    gpu: f64,
    crossings: f64,
    pcie_bytes: f64,
    disk_bytes: f64,
}

/// Whether a type runs on the GPU's int8 tensor cores (quantized) or its f16 ones.
fn is_quantized(ty: GgmlType) -> bool {
    !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16)
}

struct Ctx<'a> {
    hw: &'a HwProfile,
    at: Exec,
    /// Tokens per step (1 for decode).
    n: f64,
    acc: Acc,
}

impl Ctx<'_> {
    fn cross(&mut self, to: Exec) {
        if to != self.at {
            self.acc.crossings += 1.0;
            self.at = to;
        }
    }

    /// One matrix product of `n` tokens on `exec`.
    fn matmul(&mut self, exec: Exec, mm: &MatDesc, decode: bool) {
        let hw = self.hw;
        match (exec, &hw.gpu) {
            (Exec::Gpu, Some(g)) => {
                let t = if decode {
                    mm.bytes as f64 / (g.mem_gbs * g.matvec_efficiency * 1e9)
                } else {
                    let tops = if is_quantized(mm.ty) {
                        g.int8_tops
                    } else {
                        g.f16_tflops
                    };
                    let ops = 2.0 * self.n * mm.rows as f64 * mm.cols as f64;
                    (ops / (tops * 1e12 * g.gemm_efficiency))
                        .max(mm.bytes as f64 / (g.mem_gbs * g.matvec_efficiency * 1e9))
                };
                // Quantizing the activations is a launch of its own.
                self.acc.gpu += t + 2.0 * g.launch_us * 1e-6;
            }
            _ => {
                let t = if decode {
                    mm.bytes as f64 / (hw.cpu_matvec_gbs(mm.ty) * 1e9)
                } else {
                    (self.n * mm.bytes as f64 / (hw.cpu_gemm_token_gbs(mm.ty) * 1e9))
                        .max(mm.bytes as f64 / (hw.cpu_matvec_gbs(mm.ty) * 1e9))
                };
                self.acc.cpu += t + hw.cpu.matvec_overhead_us * 1e-6;
            }
        }
    }

    /// A group of matrices placed at `p`: compute, plus the bytes it moves each step.
    fn group(&mut self, p: Place, mats: &[MatDesc], decode: bool) {
        if mats.is_empty() {
            return;
        }
        self.cross(p.exec);
        let bytes: u64 = mats.iter().map(|m| m.bytes).sum();
        for mm in mats {
            self.matmul(p.exec, mm, decode);
        }
        match (p.tier, p.exec) {
            (Tier::Ram, Exec::Gpu) => self.acc.pcie_bytes += bytes as f64,
            (Tier::Ssd, Exec::Gpu) => {
                self.acc.pcie_bytes += bytes as f64;
                self.acc.disk_bytes += bytes as f64;
            }
            (Tier::Ssd, Exec::Cpu) => self.acc.disk_bytes += bytes as f64,
            _ => {}
        }
    }

    /// Attention over `kv_bytes` of cache (read once per step; prefill reads it once per block
    /// of queries).
    fn attend(&mut self, exec: Exec, kv_bytes: f64, decode: bool) {
        let hw = self.hw;
        let reads = if decode {
            1.0
        } else {
            (self.n / 16.0).max(1.0)
        };
        match (exec, &hw.gpu) {
            (Exec::Gpu, Some(g)) => {
                self.acc.gpu += reads * kv_bytes / (g.mem_gbs * g.matvec_efficiency * 1e9)
                    + 3.0 * g.launch_us * 1e-6
            }
            _ => self.acc.cpu += reads * kv_bytes / (hw.cpu.attention_gbs * 1e9),
        }
    }

    /// Norms, RoPE, activation and residuals of one layer.
    fn layer_rest(&mut self, exec: Exec) {
        let hw = self.hw;
        match (exec, &hw.gpu) {
            (Exec::Gpu, Some(g)) => self.acc.gpu += 8.0 * g.launch_us * 1e-6,
            _ => self.acc.cpu += self.n.max(1.0) * hw.cpu.layer_overhead_us * 1e-6,
        }
    }

    fn experts(&mut self, x: &ExpertsDesc, e: &super::ExpertPlan, decode: bool) {
        let n = x.n_expert as f64;
        let routed = self.n * x.n_used as f64;
        let bpe = x.bytes_per_expert() as f64;
        let (fv, fr, fs) = (e.vram as f64 / n, e.ram as f64 / n, e.ssd as f64 / n);
        // Experts a step touches: k per token in decode, nearly all in a big prefill batch.
        let touched = if decode {
            routed.min(n)
        } else {
            n * (1.0 - (-routed / n).exp())
        };
        let per_expert = routed / touched.max(1.0);
        let start = self.at;
        if fv > 0.0 {
            self.cross(Exec::Gpu);
            for s in &x.slabs {
                let mm = MatDesc {
                    rows: s.rows,
                    ..s.clone()
                };
                let k = touched * fv;
                let before = self.n;
                self.n = per_expert;
                for _ in 0..k.ceil() as usize {
                    self.matmul(Exec::Gpu, &mm, decode);
                }
                self.n = before;
            }
        }
        let host = touched * (fr + fs);
        if host > 0.0 {
            let to_gpu = self.hw.gpu.is_some() && per_expert >= e.gpu_min_tokens as f64;
            let exec = if to_gpu { Exec::Gpu } else { Exec::Cpu };
            self.cross(exec);
            let before = self.n;
            self.n = per_expert;
            for s in &x.slabs {
                for _ in 0..host.ceil() as usize {
                    self.matmul(exec, s, decode);
                }
            }
            self.n = before;
            if to_gpu {
                self.acc.pcie_bytes += host * bpe;
            }
            self.acc.disk_bytes += touched * fs * bpe;
        }
        self.cross(start);
    }
}

fn run(
    m: &ModelDesc,
    hw: &HwProfile,
    layers: &[LayerPlan],
    output: Place,
    b: &Budgets,
    decode: bool,
) -> Prediction {
    let n = if decode { 1.0 } else { b.ubatch.max(1) as f64 };
    let mut c = Ctx {
        hw,
        at: Exec::Cpu,
        n,
        acc: Acc::default(),
    };
    // The embedding rows: read from disk when the table is cold; gathered on the GPU when the
    // table is the output projection in VRAM.
    if m.tied_output && output.tier == Tier::Vram {
        c.at = Exec::Gpu;
    }
    for (l, d) in layers.iter().zip(&m.layers) {
        c.group(l.attn, &d.attn, decode);
        c.layer_rest(l.attn.exec);
        let positions = if decode {
            b.depth as f64 + 1.0
        } else {
            b.depth as f64 + n / 2.0
        };
        let positions = d.window.map_or(positions, |w| positions.min(w as f64));
        let kv = positions * d.kv_values_per_token as f64 * b.kv_value_bytes;
        if l.attend != l.attn.exec {
            // q, k and v go to the attention's device, its output comes back.
            c.cross(l.attend);
            c.attend(l.attend, kv, decode);
            c.cross(l.attn.exec);
        } else {
            c.attend(l.attend, kv, decode);
        }
        c.group(l.ffn, &d.ffn, decode);
        if let (Some(x), Some(e)) = (&d.experts, &l.experts) {
            c.experts(x, e, decode);
        }
    }
    c.group(output, std::slice::from_ref(&m.output), decode);
    let crossing_s = match &hw.gpu {
        Some(g) => {
            c.acc.crossings * (g.crossing_us * 1e-6 + n * m.n_embd as f64 * 4.0 / (g.h2d_gbs * 1e9))
        }
        None => 0.0,
    };
    let pcie_s = hw
        .gpu
        .as_ref()
        .map_or(0.0, |g| c.acc.pcie_bytes / (g.h2d_gbs * 1e9));
    let disk_s = c.acc.disk_bytes / (hw.disk.read_gbs * 1e9);
    let compute = c.acc.cpu + c.acc.gpu + crossing_s;
    let t = compute.max(pcie_s).max(disk_s).max(1e-9);
    let bottleneck = if t == disk_s && disk_s > compute.max(pcie_s) {
        Bottleneck::Disk
    } else if t == pcie_s && pcie_s > compute {
        Bottleneck::Pcie
    } else if c.acc.gpu > c.acc.cpu {
        Bottleneck::GpuCompute
    } else {
        Bottleneck::CpuCompute
    };
    Prediction {
        tokens_per_s: n / t,
        cpu_s: c.acc.cpu,
        gpu_s: c.acc.gpu,
        crossing_s,
        pcie_s,
        disk_s,
        bottleneck,
    }
}

/// One decode step (a token) of a placement.
pub fn decode(
    m: &ModelDesc,
    hw: &HwProfile,
    layers: &[LayerPlan],
    output: Place,
    b: &Budgets,
) -> Prediction {
    run(m, hw, layers, output, b, true)
}

/// One prefill batch of `b.ubatch` tokens.
pub fn prefill(
    m: &ModelDesc,
    hw: &HwProfile,
    layers: &[LayerPlan],
    output: Place,
    b: &Budgets,
) -> Prediction {
    run(m, hw, layers, output, b, false)
}

/// Fiddler's rule: the fewest tokens routed to one host-resident expert in a step for which
/// copying its weights to the GPU costs less than computing it on the CPU. `usize::MAX`
/// without a GPU.
pub fn fiddler_tokens(hw: &HwProfile, x: &ExpertsDesc) -> usize {
    let Some(g) = &hw.gpu else {
        return usize::MAX;
    };
    let bytes = x.bytes_per_expert() as f64;
    let ty = x.slabs.first().map_or(GgmlType::Q4K, |s| s.ty);
    let copy = bytes / (g.h2d_gbs * 1e9) + g.crossing_us * 1e-6;
    for t in 1..=4096usize {
        let cpu = (bytes / (hw.cpu_matvec_gbs(ty) * 1e9))
            .max(t as f64 * bytes / (hw.cpu_gemm_token_gbs(ty) * 1e9));
        if cpu >= copy {
            return t;
        }
    }
    usize::MAX
}
