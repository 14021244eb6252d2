//! The attention family: decode (flash-decoding over paged KV) at 1k, 8k and 32k positions and
//! a 512-token prefill, at qwen2.5-1.5B's shape (12 heads, 2 KV heads of 128) and a 7B-class
//! shape (32/8 of 128: llama-3-8B, mistral-7B); RoPE and the K/V writer at decode and prefill
//! sizes. Decode's GB/s counts the K and V bytes read; its FLOPs are q·k and p·v.

use strata_kernels::ops::attention::{
    AttnParams, DecodePlan, decode_kv_bytes, paged_decode, paged_prefill,
};
use strata_kernels::ops::kv::{KvLayout, KvPageTables, KvType, kv_store};
use strata_kernels::ops::rope::{RopeKind, RopeParams, rope};
use strata_kernels::{Device, DeviceBuffer, KernelError, Stream};

use crate::Case;

const PAGE: usize = 256;

/// One sequence's pages in one pool per side, and its page tables.
struct Pages {
    _k_pool: DeviceBuffer,
    _v_pool: DeviceBuffer,
    k_table: DeviceBuffer,
    v_table: DeviceBuffer,
    n_pages: usize,
}

impl Pages {
    fn new(dev: &Device, layout: &KvLayout, width: usize, len: usize) -> Result<Self, KernelError> {
        let s = dev.stream()?;
        let n_pages = len.div_ceil(PAGE);
        let (kb, vb) = layout.page_bytes(width);
        let (ks, vs) = (kb.next_multiple_of(256), vb.next_multiple_of(256));
        let (k_pool, v_pool) = (dev.alloc(n_pages * ks)?, dev.alloc(n_pages * vs)?);
        // Zeros: finite keys and values (fresh memory may hold NaNs).
        s.memset(&k_pool, 0, k_pool.len(), 0)?;
        s.memset(&v_pool, 0, v_pool.len(), 0)?;
        let table = |pool: &DeviceBuffer, stride: usize| -> Result<DeviceBuffer, KernelError> {
            let t: Vec<u8> = (0..n_pages)
                .flat_map(|i| pool.at(i * stride).to_le_bytes())
                .collect();
            let b = dev.alloc(t.len())?;
            s.upload(&b, 0, &t)?;
            Ok(b)
        };
        let (k_table, v_table) = (table(&k_pool, ks)?, table(&v_pool, vs)?);
        s.synchronize()?;
        Ok(Pages {
            _k_pool: k_pool,
            _v_pool: v_pool,
            k_table,
            v_table,
            n_pages,
        })
    }

    fn tables(&self) -> KvPageTables<'_> {
        KvPageTables {
            k: &self.k_table,
            v: &self.v_table,
            n_pages: self.n_pages,
        }
    }
}

fn zeros(dev: &Device, s: &Stream, bytes: usize) -> Result<DeviceBuffer, KernelError> {
    let b = dev.alloc(bytes.max(4))?;
    s.memset(&b, 0, b.len(), 0)?;
    Ok(b)
}

fn params(n_head: usize, n_head_kv: usize) -> AttnParams {
    AttnParams {
        n_head,
        n_head_kv,
        head_dim: 128,
        scale: 1.0 / (128f32).sqrt(),
        window: None,
        softcap: None,
    }
}

pub(crate) fn cases(dev: &Device, quick: bool) -> Result<Vec<Case>, KernelError> {
    let mut v = Vec::new();
    let s = dev.stream()?;
    let shapes = [("qwen 12/2", params(12, 2)), ("7B 32/8", params(32, 8))];
    let f16 = KvLayout {
        k_type: KvType::F16,
        v_type: KvType::F16,
        page_tokens: PAGE,
    };
    let q8 = KvLayout {
        k_type: KvType::Q8_0,
        v_type: KvType::Q8_0,
        ..f16
    };
    for (shape, p) in shapes {
        let width = p.n_head_kv * p.head_dim;
        let (hd, nh) = (p.head_dim, p.n_head);
        // Decode, one sequence.
        for (layout, ctxs) in [(f16, &[1024usize, 8192, 32768][..]), (q8, &[32768][..])] {
            for &ctx in ctxs {
                let len = if quick { ctx / 32 } else { ctx };
                let pages = Pages::new(dev, &layout, width, len)?;
                let seqs = dev.alloc(8)?;
                s.upload(
                    &seqs,
                    0,
                    &[0i32.to_le_bytes(), (len as i32).to_le_bytes()].concat(),
                )?;
                let plan = DecodePlan::new(dev, &p, 1, len)?;
                let (q, out) = (zeros(dev, &s, nh * hd * 4)?, zeros(dev, &s, nh * hd * 4)?);
                let scratch = zeros(dev, &s, plan.scratch_bytes)?;
                v.push(Case {
                    family: "attention",
                    name: format!(
                        "decode {shape} {}/{} ctx {len} ({} splits)",
                        layout.k_type.name(),
                        layout.v_type.name(),
                        plan.max_splits
                    ),
                    bytes: decode_kv_bytes(&p, &layout, &[len]),
                    flops: (4 * nh * hd * len) as u64,
                    run: Box::new(move |s| {
                        paged_decode(
                            s,
                            &p,
                            &layout,
                            &pages.tables(),
                            &seqs,
                            &plan,
                            &q,
                            &scratch,
                            &out,
                        )
                    }),
                });
            }
        }
        // Decode, a batch of 8 sequences of 4k (one launch).
        {
            let (n_seq, len) = (8usize, if quick { 128 } else { 4096 });
            let pages = Pages::new(dev, &f16, width, n_seq * len)?;
            let per = len.div_ceil(PAGE);
            let t: Vec<u8> = (0..n_seq)
                .flat_map(|i| [((i * per) as i32).to_le_bytes(), (len as i32).to_le_bytes()])
                .flatten()
                .collect();
            let seqs = dev.alloc(t.len())?;
            s.upload(&seqs, 0, &t)?;
            let plan = DecodePlan::new(dev, &p, n_seq, len)?;
            let (q, out) = (
                zeros(dev, &s, n_seq * nh * hd * 4)?,
                zeros(dev, &s, n_seq * nh * hd * 4)?,
            );
            let scratch = zeros(dev, &s, plan.scratch_bytes)?;
            v.push(Case {
                family: "attention",
                name: format!("decode {shape} f16 batch {n_seq}x{len}"),
                bytes: decode_kv_bytes(&p, &f16, &vec![len; n_seq]),
                flops: (4 * nh * hd * len * n_seq) as u64,
                run: Box::new(move |s| {
                    paged_decode(
                        s,
                        &p,
                        &f16,
                        &pages.tables(),
                        &seqs,
                        &plan,
                        &q,
                        &scratch,
                        &out,
                    )
                }),
            });
        }
        // Prefill of 512 tokens from position 0 (causal: half the square).
        for layout in [f16, q8] {
            let n = if quick { 64 } else { 512 };
            let pages = Pages::new(dev, &layout, width, n)?;
            let (q, out) = (
                zeros(dev, &s, n * nh * hd * 4)?,
                zeros(dev, &s, n * nh * hd * 4)?,
            );
            let (kb, vb) = layout.page_bytes(width);
            v.push(Case {
                family: "attention",
                name: format!(
                    "prefill {shape} {}/{} {n} tokens",
                    layout.k_type.name(),
                    layout.v_type.name()
                ),
                bytes: ((kb + vb) / PAGE * n + 2 * n * nh * hd * 4) as u64,
                flops: (4 * nh * hd * n * (n + 1) / 2) as u64,
                run: Box::new(move |s| {
                    paged_prefill(s, &p, &layout, &pages.tables(), &q, n, 0, &out)
                }),
            });
        }
        // RoPE of q and k, and the K/V writer, for a decode step and a 512-token batch.
        for n in [1usize, if quick { 64 } else { 512 }] {
            let (q, k) = (
                zeros(dev, &s, n * nh * hd * 4)?,
                zeros(dev, &s, n * width * 4)?,
            );
            let pos = zeros(dev, &s, n * 4)?;
            let rp = RopeParams {
                kind: RopeKind::Neox,
                n_rot: hd,
                base: 1e6,
                freq_scale: 1.0,
            };
            v.push(Case {
                family: "attention",
                name: format!("rope {shape} {n} tokens"),
                bytes: (2 * n * (nh * hd + width) * 4) as u64,
                flops: (6 * n * (nh + p.n_head_kv) * hd / 2) as u64,
                run: Box::new(move |s| rope(s, &rp, hd, &pos, n, &q, nh, Some((&k, p.n_head_kv)))),
            });
            let pages = Pages::new(dev, &q8, width, n)?;
            let (kv_k, kv_v) = (
                zeros(dev, &s, n * width * 4)?,
                zeros(dev, &s, n * width * 4)?,
            );
            let pos: Vec<u8> = (0..n as i32).flat_map(i32::to_le_bytes).collect();
            let bpos = dev.alloc(pos.len())?;
            s.upload(&bpos, 0, &pos)?;
            let (kb, vb) = q8.page_bytes(width);
            v.push(Case {
                family: "attention",
                name: format!("kv_store {shape} q8_0 {n} tokens"),
                bytes: (2 * n * width * 4 + (kb + vb) / PAGE * n) as u64,
                flops: (4 * n * width) as u64,
                run: Box::new(move |s| {
                    kv_store(s, &q8, width, &pages.tables(), &kv_k, &kv_v, &bpos, n)
                }),
            });
        }
    }
    s.synchronize()?;
    Ok(v)
}
