//! `strata calibrate`'s CPU half: the rates of this machine's kernels, measured with the same
//! code paths the engine runs (interleaved where the engine interleaves), fitted to the cost
//! model's form (a fixed cost per call plus bytes over a rate).

use std::collections::BTreeMap;
use std::time::Instant;

use strata_simd::matmul::{Layout, MatRef, MatmulScratch, can_interleave, interleave, matmul};
use strata_simd::ops::attention::KvPages;
use strata_simd::ops::{AttnParams, attention::attention_paged, rms_norm, silu_mul};
use strata_simd::pool::ThreadPool;
use strata_storage::quant::{GgmlType, quantize_row};

use super::profile::{CpuProfile, type_key};

/// The weight types measured (others fall back to the `default` rate: Q4_K's).
const TYPES: [GgmlType; 6] = [
    GgmlType::Q4K,
    GgmlType::Q6K,
    GgmlType::Q8_0,
    GgmlType::Q5_0,
    GgmlType::Q4_0,
    GgmlType::F16,
];

/// A matrix of `rows` × `cols` in `ty` laid out as the engine keeps a resident one: one
/// properly quantized row repeated (the kernels' speed does not depend on the values).
fn matrix(ty: GgmlType, rows: usize, cols: usize) -> (Vec<u8>, Layout) {
    let src: Vec<f32> = (0..cols)
        .map(|i| ((i * 7919) % 97) as f32 / 48.0 - 1.0)
        .collect();
    let rb = ty.row_bytes(cols);
    let mut row = vec![0u8; rb];
    let _ = quantize_row(ty, &src, &mut row);
    let mut data = Vec::with_capacity(rows * rb);
    for _ in 0..rows {
        data.extend_from_slice(&row);
    }
    let mut layout = Layout::Rows;
    if can_interleave(ty)
        && rows >= strata_simd::matmul::INTERLEAVE_ROWS
        && let Ok(true) = interleave(ty, &mut data, rows, cols)
    {
        layout = Layout::Interleaved;
    }
    (data, layout)
}

/// Median seconds of `reps` runs of `f` after one warm-up.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Measures the CPU's rates on `pool`'s threads. `quick` uses smaller matrices (tests).
pub fn calibrate_cpu(pool: &ThreadPool, quick: bool) -> CpuProfile {
    let cols = 2048;
    let big_bytes = if quick { 8 << 20 } else { 128 << 20 };
    let reps = if quick { 3 } else { 9 };
    let mut matvec = BTreeMap::new();
    let mut gemm = BTreeMap::new();
    let mut overheads = Vec::new();
    let mut mm = MatmulScratch::new();
    for ty in TYPES {
        let rb = ty.row_bytes(cols);
        let small_rows = 256;
        let big_rows = (big_bytes / rb).next_multiple_of(16);
        let mut point = |rows: usize, n: usize| -> (f64, f64) {
            let (data, layout) = matrix(ty, rows, cols);
            let w = MatRef {
                ty,
                data: &data,
                rows,
                cols,
                layout,
            };
            let x = vec![0.5f32; n * cols];
            let mut y = vec![0f32; n * rows];
            let t = time(reps, || {
                let _ = matmul(pool, w, &x, n, &mut y, &mut mm);
            });
            (data.len() as f64, t)
        };
        let (bs, ts) = point(small_rows, 1);
        let (bl, tl) = point(big_rows, 1);
        let rate = if tl > ts {
            (bl - bs) / (tl - ts)
        } else {
            bl / tl
        };
        overheads.push((ts - bs / rate).max(0.0));
        matvec.insert(type_key(ty), rate / 1e9);
        let n = 64;
        let (bg, tg) = point(
            if quick {
                small_rows * 4
            } else {
                small_rows * 16
            },
            n,
        );
        gemm.insert(type_key(ty), n as f64 * bg / tg / 1e9);
    }
    for table in [&mut matvec, &mut gemm] {
        let d = table.get("q4_k").copied().unwrap_or(1.0);
        table.insert("default".into(), d);
    }
    overheads.sort_by(f64::total_cmp);
    let overhead_us = overheads[overheads.len() / 2] * 1e6;

    // Attention in decode over an f16 cache: qwen2.5-1.5B's shape at 8k positions.
    let (heads, kv_heads, hd, positions) = (12, 2, 128, if quick { 1024 } else { 8192 });
    let width = kv_heads * hd;
    let kv = vec![0u8; positions * width * 2];
    let pages = [kv.as_slice()];
    let kp = KvPages::new(GgmlType::F16, positions, width, &pages);
    let q = vec![0.1f32; heads * hd];
    let mut out = vec![0f32; heads * hd];
    let p = AttnParams {
        n_head: heads,
        n_head_kv: kv_heads,
        head_dim: hd,
        scale: 0.088,
        window: None,
        softcap: None,
    };
    let t = time(reps, || {
        attention_paged(pool, &p, &q, 1, positions - 1, &kp, &kp, &mut out)
    });
    let attention_gbs = (2 * kv.len()) as f64 / t / 1e9;

    // The rest of a layer for one token: two norms, an activation, two residual adds.
    let e = 1536;
    let (x, w) = (vec![0.3f32; e], vec![1.0f32; e]);
    let (mut xb, mut g, u) = (vec![0f32; e], vec![0.2f32; 8960], vec![0.1f32; 8960]);
    let t = time(reps * 10, || {
        rms_norm(&x, &w, 1e-6, &mut xb);
        rms_norm(&x, &w, 1e-6, &mut xb);
        silu_mul(&mut g, &u);
        xb.iter_mut().zip(&x).for_each(|(a, b)| *a += b);
    });
    let buf = vec![1u64; if quick { 4 << 20 } else { 64 << 20 }];
    let mem = strata_simd::membw::read_bandwidth(pool, &buf, if quick { 2 } else { 5 });
    CpuProfile {
        description: cpu_name(),
        threads: pool.n_threads() as u32,
        mem_read_gbs: mem / 1e9,
        matvec_gbs: matvec,
        matvec_overhead_us: overhead_us,
        gemm_token_gbs: gemm,
        attention_gbs,
        layer_overhead_us: t * 1e6,
    }
}

/// The CPU as a stored decode choice names it ([`super::profile::DecodeProfile`]): its model
/// name, family and model numbers (a VM may show every EPYC as "AMD EPYC": Zen 3 is family
/// 25 model 1, Zen 4 family 25 model 17) and the SIMD level the process runs at (what the CPU
/// has, or lower under `STRATA_SIMD`: kernels measured at one level are not another's choice).
pub fn cpu_id() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .take_while(|l| !l.trim().is_empty())
            .find(|l| l.split(':').next().map(str::trim) == Some(name))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
    };
    let numbers = match (field("cpu family"), field("model")) {
        (Some(f), Some(m)) => format!("family {f} model {m}, "),
        _ => String::new(),
    };
    format!(
        "{} ({numbers}{})",
        cpu_name(),
        strata_simd::dispatch::level().name()
    )
}

/// The CPU's model name, as /proc/cpuinfo gives it.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|n| n.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}
