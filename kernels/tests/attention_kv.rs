//! The attention family's writers on the simulator against the CPU: RoPE (`rope.cu`) against
//! `strata_simd::ops::rope::Rope`, and K/V rows written into pages (`kv.cu`) against the CPU's
//! `quantize_row`, byte for byte.

mod attention_support;
mod common;

use attention_support::{PAGE_TOKENS, ggml, host_pages, real_model};
use common::{devices, get, put, rand_f32};
use strata_kernels::Backend;
use strata_kernels::ops::kv::{KvLayout, KvPageTables, KvType, kv_store};
use strata_kernels::ops::rope::{RopeKind, RopeParams, rope};
use strata_simd::ops::rope::{Rope, RopeKind as CpuKind};

fn cpu_rope(p: &RopeParams, head_dim: usize, x: &mut [f32], pos: &[i32]) {
    let kind = match p.kind {
        RopeKind::Norm => CpuKind::Norm,
        RopeKind::Neox => CpuKind::Neox,
    };
    let r = Rope::new(kind, p.n_rot, p.base, p.freq_scale);
    let mut cs = vec![(0f32, 0f32); p.n_rot / 2];
    let per_tok = x.len() / pos.len();
    for (t, row) in x.chunks_exact_mut(per_tok).enumerate() {
        r.angles(pos[t] as usize, &mut cs);
        r.apply(row, head_dim, &cs);
    }
}

/// Both layouts, partial rotation, bases of gemma3's local and global layers and of qwen,
/// position scaling, and a batch whose tokens sit at unrelated positions (several sequences).
///
/// Tolerance: the angles are the CPU's to the bit (same theta_scale, same chain of f32
/// multiplications), and so is the rotation's arithmetic (products rounded one by one); only
/// cos and sin may differ: CUDA's cosf/sinf are within 2 ulp of the exact value where the
/// host's libm is within 1 — a few 1e-7 of a unit value. On the simulator, which uses the host's
/// libm as the CPU does, the results must be exact.
#[test]
fn rope_matches_the_cpu() {
    let pos: Vec<i32> = vec![0, 1, 7, 255, 256, 1000, 4097, 32767];
    let n_tok = pos.len();
    for dev in devices() {
        let s = dev.stream().unwrap();
        let bpos = put(&s, &pos);
        for (kind, head_dim, n_rot, base, freq_scale, n_head, n_head_kv) in [
            (RopeKind::Neox, 256, 256, 10_000.0, 1.0, 4, 1),
            (RopeKind::Neox, 256, 256, 1_000_000.0, 0.125, 4, 1),
            (RopeKind::Neox, 128, 128, 1_000_000.0, 1.0, 12, 2),
            (RopeKind::Norm, 64, 64, 500_000.0, 1.0, 4, 2),
            (RopeKind::Norm, 128, 32, 10_000.0, 0.5, 2, 2),
            (RopeKind::Neox, 64, 48, 10_000.0, 1.0, 3, 1),
        ] {
            let p = RopeParams {
                kind,
                n_rot,
                base,
                freq_scale,
            };
            let q = rand_f32(n_tok * n_head * head_dim, 11 + n_rot as u64);
            let k = rand_f32(n_tok * n_head_kv * head_dim, 12 + n_rot as u64);
            let (bq, bk) = (put(&s, &q), put(&s, &k));
            rope(
                &s,
                &p,
                head_dim,
                &bpos,
                n_tok,
                &bq,
                n_head,
                Some((&bk, n_head_kv)),
            )
            .unwrap();
            let (gq, gk) = (get::<f32>(&s, &bq, q.len()), get::<f32>(&s, &bk, k.len()));
            let (mut wq, mut wk) = (q.clone(), k.clone());
            cpu_rope(&p, head_dim, &mut wq, &pos);
            cpu_rope(&p, head_dim, &mut wk, &pos);
            for (what, g, w) in [("q", &gq, &wq), ("k", &gk, &wk)] {
                if dev.info().backend == Backend::Sim {
                    assert!(
                        g == w,
                        "{kind:?} hd {head_dim} n_rot {n_rot} {what}: not exact"
                    );
                }
                for (i, (a, b)) in g.iter().zip(w.iter()).enumerate() {
                    assert!(
                        (a - b).abs() <= 2e-6,
                        "{:?} {kind:?} hd {head_dim} n_rot {n_rot} base {base} {what}[{i}]: \
                         {a} vs {b}",
                        dev.info().backend
                    );
                }
            }
        }
        // q alone (k not given), and a bad n_rot refused before anything is queued.
        let q = rand_f32(n_tok * 2 * 64, 5);
        let bq = put(&s, &q);
        let p = RopeParams {
            kind: RopeKind::Norm,
            n_rot: 64,
            base: 10_000.0,
            freq_scale: 1.0,
        };
        rope(&s, &p, 64, &bpos, n_tok, &bq, 2, None).unwrap();
        let mut w = q.clone();
        cpu_rope(&p, 64, &mut w, &pos);
        let g = get::<f32>(&s, &bq, q.len());
        assert!(g.iter().zip(&w).all(|(a, b)| (a - b).abs() <= 2e-6));
        let bad = RopeParams { n_rot: 65, ..p };
        let e = rope(&s, &bad, 64, &bpos, n_tok, &bq, 2, None).unwrap_err();
        assert!(e.to_string().contains("n_rot 65"), "{e}");
    }
}

/// Rows whose quantization has edge cases: a block of zeros (Q4_0's scale is then -0), equal
/// magnitudes of both signs (Q4_0 keeps the first), values whose scaled form ends in exactly
/// .5 (Q8_0 rounds halves away from zero), tiny values (f16 subnormals), and large ones.
fn edge_rows(width: usize) -> Vec<f32> {
    let mut v = Vec::new();
    v.extend(std::iter::repeat_n(0.0f32, width));
    v.extend((0..width).map(|i| if i % 3 == 0 { -2.0 } else { 2.0 }));
    v.extend((0..width).map(|i| {
        if i % 32 == 5 {
            127.0
        } else {
            (i % 32) as f32 * 0.5 - 8.0
        }
    }));
    v.extend((0..width).map(|i| (i as f32 - 40.0) * 1e-6));
    v.extend((0..width).map(|i| (i as f32 - 60.0) * 700.0));
    v.extend((0..width).map(|i| {
        if i % 32 == 31 {
            -8.0
        } else {
            (i % 17) as f32 - 8.0
        }
    }));
    v
}

/// Every cache type, K and V of different types in one launch, tokens at scattered positions
/// over three pages (page tables of shuffled pages), random rows, edge-case rows and real
/// weights: the pages equal the CPU's bytes exactly (f16 conversion and both quantizers use the
/// same correctly rounded operations in the same order, with no fma contraction), and the rows
/// no token addresses are untouched.
#[test]
fn kv_store_writes_the_cpu_bytes() {
    let width = 2 * 128;
    let positions: Vec<i32> = vec![0, 1, 255, 256, 300, 511, 512, 700, 3];
    let n_tok = positions.len();
    let mut rows = rand_f32(n_tok * width, 77);
    // Scale the random rows per token so that magnitudes vary.
    for (t, r) in rows.chunks_exact_mut(width).enumerate() {
        r.iter_mut()
            .for_each(|x| *x *= 0.01 * 10f32.powi(t as i32 % 5));
    }
    let edges = edge_rows(width);
    rows[..edges.len()].copy_from_slice(&edges);
    let mut sources = vec![("random and edge rows", rows)];
    for file in ["gemma3-270m.gguf", "qwen2.5-coder-1.5b.gguf"] {
        if let Some(m) = real_model(file, n_tok, width) {
            sources.push((file, m.values));
        }
    }
    for dev in devices() {
        let s = dev.stream().unwrap();
        let bpos = put(&s, &positions);
        for (what, rows) in &sources {
            for (k_type, v_type) in [
                (KvType::F16, KvType::Q8_0),
                (KvType::Q8_0, KvType::Q4_0),
                (KvType::Q4_0, KvType::F16),
            ] {
                let layout = KvLayout {
                    k_type,
                    v_type,
                    page_tokens: PAGE_TOKENS,
                };
                let n_pages = 3;
                let (kpb, vpb) = layout.page_bytes(width);
                // Pages in one pool, in reverse order, pre-filled with a marker byte.
                let pool_k = dev.alloc(n_pages * kpb.next_multiple_of(256)).unwrap();
                let pool_v = dev.alloc(n_pages * vpb.next_multiple_of(256)).unwrap();
                s.memset(&pool_k, 0, pool_k.len(), 0xA5).unwrap();
                s.memset(&pool_v, 0, pool_v.len(), 0xA5).unwrap();
                let slot = |i: usize| n_pages - 1 - i;
                let kt: Vec<u64> = (0..n_pages)
                    .map(|i| pool_k.at(slot(i) * kpb.next_multiple_of(256)))
                    .collect();
                let vt: Vec<u64> = (0..n_pages)
                    .map(|i| pool_v.at(slot(i) * vpb.next_multiple_of(256)))
                    .collect();
                let (bkt, bvt) = (put(&s, &kt), put(&s, &vt));
                // V rows are K rows reversed, so that the two sides differ.
                let vrows: Vec<f32> = rows.iter().rev().copied().collect();
                let (bk, bv) = (put(&s, &rows[..]), put(&s, &vrows[..]));
                let tables = KvPageTables {
                    k: &bkt,
                    v: &bvt,
                    n_pages,
                };
                kv_store(&s, &layout, width, &tables, &bk, &bv, &bpos, n_tok).unwrap();
                for (ty, pool, stride, src) in [
                    (k_type, &pool_k, kpb.next_multiple_of(256), &rows[..]),
                    (v_type, &pool_v, vpb.next_multiple_of(256), &vrows[..]),
                ] {
                    let got: Vec<u8> = get(&s, pool, pool.len());
                    let rb = ty.row_bytes(width);
                    // The expected pages: marker bytes, and each token's row as the CPU writes it.
                    let mut want = vec![0xA5u8; pool.len()];
                    for (t, &p) in positions.iter().enumerate() {
                        let p = p as usize;
                        let off = slot(p / PAGE_TOKENS) * stride + (p % PAGE_TOKENS) * rb;
                        let one = host_pages(ty, 1, width, &src[t * width..][..width], 1);
                        want[off..off + rb].copy_from_slice(&one[0]);
                    }
                    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
                        let (page, r) = (i / stride, (i % stride) / rb);
                        panic!(
                            "{:?} {what} {ty:?} ({:?}): byte {i} (pool slot {page}, row {r}, \
                             byte {} of the row) is {:#04x}, the CPU's is {:#04x}",
                            dev.info().backend,
                            ggml(ty),
                            i % stride % rb,
                            got[i],
                            want[i]
                        );
                    }
                }
            }
        }
        // A token past the tables is skipped, not written out of bounds.
        let layout = KvLayout {
            k_type: KvType::Q8_0,
            v_type: KvType::F16,
            page_tokens: PAGE_TOKENS,
        };
        let (kpb, vpb) = layout.page_bytes(width);
        let (pk, pv) = (dev.alloc(kpb).unwrap(), dev.alloc(vpb).unwrap());
        let (bkt, bvt) = (put(&s, &[pk.ptr()]), put(&s, &[pv.ptr()]));
        let far = put(&s, &[5i32, 256, -1]);
        let src = put(&s, &rand_f32(3 * width, 9));
        let tables = KvPageTables {
            k: &bkt,
            v: &bvt,
            n_pages: 1,
        };
        kv_store(&s, &layout, width, &tables, &src, &src, &far, 3).unwrap();
        s.synchronize().unwrap();
        // A width that is no whole number of Q8_0 blocks is refused.
        let e = kv_store(&s, &layout, 48, &tables, &src, &src, &far, 1).unwrap_err();
        assert!(e.to_string().contains("multiple of 32"), "{e}");
    }
}
