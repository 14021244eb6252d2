//! What the attention family's tests share: KV pages built on the host by the CPU's own row
//! writer and copied to the device (into one pool in shuffled order, so that the page tables
//! are really followed), the CPU reference (`strata_simd`'s scalar attention), real tensors,
//! and error measures.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;

use strata_kernels::ops::attention::AttnParams;
use strata_kernels::ops::kv::{KvLayout, KvPageTables, KvType};
use strata_kernels::{DeviceBuffer, Stream};
use strata_simd::dispatch::Level;
use strata_simd::ops::attention::{self as cpu, KvPages, kv_store_row};
use strata_simd::pool::ThreadPool;
use strata_storage::quant::GgmlType;

use crate::common::put;

/// The engine's page size.
pub const PAGE_TOKENS: usize = 256;

pub fn ggml(ty: KvType) -> GgmlType {
    match ty {
        KvType::F16 => GgmlType::F16,
        KvType::Q8_0 => GgmlType::Q8_0,
        KvType::Q4_0 => GgmlType::Q4_0,
    }
}

/// Every (K, V) type pair.
pub fn type_pairs() -> Vec<(KvType, KvType)> {
    KvType::ALL
        .iter()
        .flat_map(|&k| KvType::ALL.iter().map(move |&v| (k, v)))
        .collect()
}

/// Pages of `ty` holding `rows` (`len` rows of `width` f32), written by the CPU's
/// `kv_store_row`; rows past `len` are 0xFF bytes (NaN in f16 and in a block's scale), which
/// would poison any output that read them.
pub fn host_pages(
    ty: KvType,
    page_tokens: usize,
    width: usize,
    rows: &[f32],
    len: usize,
) -> Vec<Vec<u8>> {
    let rb = ty.row_bytes(width);
    (0..len.div_ceil(page_tokens).max(1))
        .map(|pi| {
            let mut page = vec![0xffu8; page_tokens * rb];
            for r in 0..page_tokens {
                let pos = pi * page_tokens + r;
                if pos < len {
                    kv_store_row(
                        ggml(ty),
                        &rows[pos * width..][..width],
                        &mut page[r * rb..][..rb],
                    );
                }
            }
            page
        })
        .collect()
}

/// One sequence's keys and values on the host.
pub struct HostSeq {
    pub len: usize,
    pub k: Vec<Vec<u8>>,
    pub v: Vec<Vec<u8>>,
}

impl HostSeq {
    pub fn new(layout: &KvLayout, width: usize, k: &[f32], v: &[f32], len: usize) -> Self {
        HostSeq {
            len,
            k: host_pages(layout.k_type, layout.page_tokens, width, k, len),
            v: host_pages(layout.v_type, layout.page_tokens, width, v, len),
        }
    }
}

/// The pages of several sequences on the device: one pool buffer per side holding every page
/// at a shuffled slot (256-byte aligned), and the page tables, each sequence's pages in order
/// from `first[i]`.
pub struct DevicePages {
    pub k_pool: DeviceBuffer,
    pub v_pool: DeviceBuffer,
    pub k_table: DeviceBuffer,
    pub v_table: DeviceBuffer,
    pub n_pages: usize,
    pub first: Vec<usize>,
    /// Each page's slot in the pools.
    pub slots: Vec<usize>,
    pub k_stride: usize,
    pub v_stride: usize,
}

impl DevicePages {
    pub fn new(s: &Stream, seqs: &[&HostSeq], seed: u64) -> Self {
        let n_pages: usize = seqs.iter().map(|q| q.k.len()).sum();
        let k_stride = seqs[0].k[0].len().next_multiple_of(256);
        let v_stride = seqs[0].v[0].len().next_multiple_of(256);
        // A permutation of the slots (Fisher-Yates on a xorshift).
        let mut slots: Vec<usize> = (0..n_pages).collect();
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for i in (1..n_pages).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            slots.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let dev = s.device();
        let k_pool = dev.alloc(n_pages * k_stride).unwrap();
        let v_pool = dev.alloc(n_pages * v_stride).unwrap();
        let (mut kt, mut vt, mut first) = (Vec::new(), Vec::new(), Vec::new());
        for q in seqs {
            first.push(kt.len());
            for (kp, vp) in q.k.iter().zip(&q.v) {
                let slot = slots[kt.len()];
                s.upload(&k_pool, slot * k_stride, kp).unwrap();
                s.upload(&v_pool, slot * v_stride, vp).unwrap();
                kt.push(k_pool.at(slot * k_stride));
                vt.push(v_pool.at(slot * v_stride));
            }
        }
        DevicePages {
            k_table: put(s, &kt),
            v_table: put(s, &vt),
            k_pool,
            v_pool,
            n_pages,
            first,
            slots,
            k_stride,
            v_stride,
        }
    }

    pub fn tables(&self) -> KvPageTables<'_> {
        KvPageTables {
            k: &self.k_table,
            v: &self.v_table,
            n_pages: self.n_pages,
        }
    }
}

pub fn cpu_params(p: &AttnParams) -> cpu::AttnParams {
    cpu::AttnParams {
        n_head: p.n_head,
        n_head_kv: p.n_head_kv,
        head_dim: p.head_dim,
        scale: p.scale,
        window: p.window,
        softcap: p.softcap,
    }
}

/// The CPU's attention (scalar level) for `n_tok` queries at `pos0 ..` over `seq`'s pages.
pub fn cpu_attention(
    p: &AttnParams,
    layout: &KvLayout,
    seq: &HostSeq,
    q: &[f32],
    n_tok: usize,
    pos0: usize,
) -> Vec<f32> {
    let width = p.n_head_kv * p.head_dim;
    let ks: Vec<&[u8]> = seq.k.iter().map(Vec::as_slice).collect();
    let vs: Vec<&[u8]> = seq.v.iter().map(Vec::as_slice).collect();
    let kp = KvPages::new(ggml(layout.k_type), layout.page_tokens, width, &ks);
    let vp = KvPages::new(ggml(layout.v_type), layout.page_tokens, width, &vs);
    let mut out = vec![f32::NAN; n_tok * p.n_head * p.head_dim];
    let pool = ThreadPool::new(2);
    cpu::attention_at(
        Level::Scalar,
        &pool,
        &cpu_params(p),
        q,
        n_tok,
        pos0,
        &kp,
        &vp,
        &mut out,
    );
    out
}

/// Largest absolute difference and normalised MSE (sum of squared differences over the sum of
/// squares of `want`).
pub fn errors(got: &[f32], want: &[f32]) -> (f32, f64) {
    assert_eq!(got.len(), want.len());
    let (mut max, mut num, mut den) = (0f32, 0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        let d = if g.is_finite() {
            (g - w).abs()
        } else {
            f32::INFINITY
        };
        max = max.max(d);
        num += f64::from(d) * f64::from(d);
        den += f64::from(w) * f64::from(w);
    }
    (max, num / den.max(1e-30))
}

/// Attention's tolerance against the CPU, per output element, as a fraction of the largest
/// |value| in the cache: the CPU rounds each normalised probability to f16 (relative error up
/// to 2^-11) and the GPU does not (decode) or rounds the unnormalised one instead (prefill), so
/// the two weightings differ by up to 2 * 2^-11 of each probability — at most ~1e-3 of the
/// largest value when every difference points the same way; quantized K and V are rounded to
/// f16 in the GPU's tiles (2^-12 relative), and sums run in another order (~1e-6). 2e-3 covers
/// the worst case with room; the nmse bound (1e-5) checks that typical errors are far smaller
/// (they are random in sign: observed nmse is ~1e-7).
pub const ATTN_TOL: f32 = 2e-3;
pub const ATTN_NMSE: f64 = 1e-5;

pub fn check_close(got: &[f32], want: &[f32], vmax: f32, what: &str) {
    let (max, nmse) = errors(got, want);
    assert!(
        max <= ATTN_TOL * vmax && nmse <= ATTN_NMSE,
        "{what}: max error {max:.3e} (allowed {:.3e}), nmse {nmse:.3e} (allowed {ATTN_NMSE:.0e})",
        ATTN_TOL * vmax
    );
}

pub fn model_path(name: &str) -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let p = PathBuf::from(home)
        .join(".local/share/strata/models")
        .join(name);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipped: {} is absent", p.display());
        None
    }
}

/// A real model's attention shape and `rows` f32 rows of `width` values cut from its first
/// layer's K projection (dequantized): real weights' magnitudes and outliers as test data.
pub struct RealModel {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub values: Vec<f32>,
}

pub fn real_model(file: &str, rows: usize, width: usize) -> Option<RealModel> {
    use std::io::{Read, Seek, SeekFrom};
    use strata_storage::gguf::GgufFile;
    use strata_storage::quant::dequantize_row;
    let path = model_path(file)?;
    let g = GgufFile::open(&path).unwrap();
    let arch = g.architecture().unwrap().to_string();
    let md = &g.metadata;
    let n_head = md
        .require_u32(&format!("{arch}.attention.head_count"))
        .unwrap() as usize;
    let n_head_kv = md
        .get_u32(&format!("{arch}.attention.head_count_kv"))
        .unwrap()
        .map_or(n_head, |v| v as usize);
    let n_embd = md.require_u32(&format!("{arch}.embedding_length")).unwrap() as usize;
    let head_dim = md
        .get_u32(&format!("{arch}.attention.key_length"))
        .unwrap()
        .map_or(n_embd / n_head, |v| v as usize);
    let t = g.tensor("blk.0.attn_k.weight").unwrap();
    let row_len = t.dims[0] as usize;
    let row_bytes = t.ty.row_bytes(row_len);
    let n_rows = (t.n_rows() as usize).min(rows * width.div_ceil(row_len) + 1);
    let mut f = std::fs::File::open(&path).unwrap();
    f.seek(SeekFrom::Start(g.tensor_range(t).start)).unwrap();
    let mut raw = vec![0u8; n_rows * row_bytes];
    f.read_exact(&mut raw).unwrap();
    let mut all = vec![0f32; n_rows * row_len];
    for (src, dst) in raw
        .chunks_exact(row_bytes)
        .zip(all.chunks_exact_mut(row_len))
    {
        dequantize_row(t.ty, src, dst).unwrap();
    }
    // Each weight row scaled to unit RMS, then cut into `width`-wide vectors.
    for r in all.chunks_exact_mut(row_len) {
        let rms = (r.iter().map(|x| x * x).sum::<f32>() / row_len as f32).sqrt();
        r.iter_mut().for_each(|x| *x /= rms.max(1e-12));
    }
    let values = all.iter().copied().cycle().take(rows * width).collect();
    Some(RealModel {
        n_head,
        n_head_kv,
        head_dim,
        values,
    })
}

pub fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, v| m.max(v.abs()))
}
