//! Prefill attention on tensor cores (`attention_prefill.cu`) on the simulator against the
//! CPU's scalar attention: every K×V type pair, from position 0 and continuing a cache across a
//! page boundary, GQA groups of 1 to 16, sliding windows (pages before them taken out of the
//! tables), soft-capping, the real models' shapes and real tensors; and the whole write path —
//! RoPE, K/V written into pages by `kv_store`, prefill, then decode steps that append to the
//! same pages — against the CPU doing the same. Tolerances: `attention_support::ATTN_TOL`.

mod attention_support;
mod common;

use attention_support::{
    DevicePages, HostSeq, PAGE_TOKENS, check_close, cpu_attention, max_abs, real_model, type_pairs,
};
use common::{devices, get, put, rand_f32};
use strata_kernels::Device;
use strata_kernels::ops::attention::{AttnParams, DecodePlan, paged_decode, paged_prefill};
use strata_kernels::ops::kv::{KvLayout, KvPageTables, KvType, kv_store};
use strata_kernels::ops::rope::{RopeKind, RopeParams, rope};

struct Case {
    p: AttnParams,
    layout: KvLayout,
    n_tok: usize,
    pos0: usize,
}

/// Runs one prefill and checks it against the CPU. `values`: real data for q, k and v.
fn run(dev: &Device, c: &Case, values: Option<&[f32]>, seed: u64) {
    let p = &c.p;
    let (hd, width) = (p.head_dim, p.n_head_kv * p.head_dim);
    let len = c.pos0 + c.n_tok;
    let s = dev.stream().unwrap();
    let draw = |n: usize, salt: u64| -> Vec<f32> {
        match values {
            Some(v) => {
                let off = (salt as usize * 7919) % v.len();
                v.iter().cycle().skip(off).take(n).copied().collect()
            }
            None => rand_f32(n, seed * 1000 + salt),
        }
    };
    let k = draw(len * width, 1);
    let v = draw(len * width, 2);
    let host = HostSeq::new(&c.layout, width, &k, &v, len);
    let dp = DevicePages::new(&s, &[&host], seed);
    if let Some(w) = p.window {
        // Pages no query of this batch can see leave the tables.
        for pg in 0..(c.pos0 + 1).saturating_sub(w) / c.layout.page_tokens {
            s.upload(&dp.k_table, 8 * pg, &0u64.to_le_bytes()).unwrap();
            s.upload(&dp.v_table, 8 * pg, &0u64.to_le_bytes()).unwrap();
        }
    }
    let q: Vec<f32> = draw(c.n_tok * p.n_head * hd, 3)
        .iter()
        .map(|x| x * 4.0)
        .collect();
    let bq = put(&s, &q);
    let out = dev.alloc(q.len() * 4).unwrap();
    paged_prefill(&s, p, &c.layout, &dp.tables(), &bq, c.n_tok, c.pos0, &out).unwrap();
    let got: Vec<f32> = get(&s, &out, q.len());
    let want = cpu_attention(p, &c.layout, &host, &q, c.n_tok, c.pos0);
    check_close(
        &got,
        &want,
        max_abs(&v),
        &format!(
            "{:?} heads {}/{} hd {hd} K {:?} V {:?} window {:?} softcap {:?} tokens {} at {}",
            dev.info().backend,
            p.n_head,
            p.n_head_kv,
            c.layout.k_type,
            c.layout.v_type,
            p.window,
            p.softcap,
            c.n_tok,
            c.pos0
        ),
    );
}

fn params(n_head: usize, n_head_kv: usize, head_dim: usize) -> AttnParams {
    AttnParams {
        n_head,
        n_head_kv,
        head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
        window: None,
        softcap: None,
    }
}

fn layout(k_type: KvType, v_type: KvType) -> KvLayout {
    KvLayout {
        k_type,
        v_type,
        page_tokens: PAGE_TOKENS,
    }
}

/// All nine K×V pairs, alternately from position 0 and continuing a cache of 230 positions
/// (the batch then crosses into a second page).
#[test]
fn prefill_every_type_pair() {
    for dev in devices() {
        for (i, (k, v)) in type_pairs().into_iter().enumerate() {
            let c = Case {
                p: params(4, 2, 64),
                layout: layout(k, v),
                n_tok: 40,
                pos0: if i % 2 == 0 { 0 } else { 230 },
            };
            run(&dev, &c, None, 100 + i as u64);
        }
    }
}

/// GQA groups of 1, 4 and 16 (a block's 64 rows then hold 4 tokens), windows, soft-capping.
#[test]
fn prefill_gqa_windows_softcap() {
    for dev in devices() {
        for (i, (n_head, n_head_kv, window, softcap, k, v, n_tok, pos0)) in [
            (2, 2, None, None, KvType::F16, KvType::F16, 70, 0),
            (8, 2, Some(64), None, KvType::Q8_0, KvType::Q4_0, 50, 300),
            (
                16,
                1,
                Some(100),
                Some(30.0),
                KvType::Q4_0,
                KvType::Q8_0,
                21,
                250,
            ),
            (6, 2, Some(1), None, KvType::F16, KvType::Q8_0, 17, 5),
        ]
        .into_iter()
        .enumerate()
        {
            let c = Case {
                p: AttnParams {
                    window,
                    softcap,
                    ..params(n_head, n_head_kv, 128)
                },
                layout: layout(k, v),
                n_tok,
                pos0,
            };
            run(&dev, &c, None, 200 + i as u64);
        }
    }
}

/// gemma3-270m's attention (4/1 of 256, with and without its 512-position window; the
/// window's start inside the batch) and qwen2.5-1.5B's (12/2 of 128).
#[test]
fn prefill_real_shapes() {
    for dev in devices() {
        for (i, (p, k, v, n_tok, pos0)) in [
            (
                AttnParams {
                    window: Some(512),
                    ..params(4, 1, 256)
                },
                KvType::F16,
                KvType::F16,
                48,
                500,
            ),
            (params(4, 1, 256), KvType::Q8_0, KvType::Q4_0, 33, 0),
            (params(12, 2, 128), KvType::F16, KvType::F16, 24, 260),
            (params(12, 2, 128), KvType::Q8_0, KvType::Q8_0, 11, 0),
        ]
        .into_iter()
        .enumerate()
        {
            let c = Case {
                p,
                layout: layout(k, v),
                n_tok,
                pos0,
            };
            run(&dev, &c, None, 300 + i as u64);
        }
    }
}

/// q, k and v drawn from the real models' weights at each model's own attention shape.
#[test]
fn prefill_real_tensors() {
    for (file, k, v) in [
        ("gemma3-270m.gguf", KvType::F16, KvType::Q8_0),
        ("qwen2.5-coder-1.5b.gguf", KvType::Q4_0, KvType::F16),
    ] {
        let Some(m) = real_model(file, 2048, 256) else {
            continue;
        };
        for dev in devices() {
            let c = Case {
                p: params(m.n_head, m.n_head_kv, m.head_dim),
                layout: layout(k, v),
                n_tok: 20,
                pos0: 250,
            };
            run(&dev, &c, Some(&m.values), 400);
        }
    }
}

/// The device's write path end to end, as the engine will run it: q and k rotated by `rope`,
/// K and V written into the pages by `kv_store` (quantized there), a prefill of 29 tokens, then
/// three decode steps each appending its token's K and V first — against the CPU running
/// `Rope`, `kv_store_row` and its attention on the same inputs.
#[test]
fn prefill_then_decode_on_device_written_pages() {
    let (p, lay) = (
        params(12, 2, 128),
        KvLayout {
            k_type: KvType::Q8_0,
            v_type: KvType::Q4_0,
            // Small pages: the 32 positions span four of them.
            page_tokens: 8,
        },
    );
    let (hd, width) = (p.head_dim, p.n_head_kv * p.head_dim);
    let (n_pre, n_dec) = (29, 3);
    let total = n_pre + n_dec;
    let rp = RopeParams {
        kind: RopeKind::Neox,
        n_rot: hd,
        base: 1_000_000.0,
        freq_scale: 1.0,
    };
    let q = rand_f32(total * p.n_head * hd, 501)
        .iter()
        .map(|x| x * 4.0)
        .collect::<Vec<f32>>();
    let k = rand_f32(total * width, 502);
    let v = rand_f32(total * width, 503);
    // The CPU: rotate, write rows, attend.
    let cpu_rope = strata_simd::ops::rope::Rope::new(
        strata_simd::ops::rope::RopeKind::Neox,
        hd,
        rp.base,
        rp.freq_scale,
    );
    let (mut qr, mut kr) = (q.clone(), k.clone());
    let mut cs = vec![(0f32, 0f32); hd / 2];
    for t in 0..total {
        cpu_rope.angles(t, &mut cs);
        cpu_rope.apply(&mut qr[t * p.n_head * hd..][..p.n_head * hd], hd, &cs);
        cpu_rope.apply(&mut kr[t * width..][..width], hd, &cs);
    }
    let host = HostSeq::new(&lay, width, &kr, &v, total);
    let want_pre = cpu_attention(&p, &lay, &host, &qr[..n_pre * p.n_head * hd], n_pre, 0);
    let per = p.n_head * hd;
    for dev in devices() {
        let s = dev.stream().unwrap();
        let n_pages = total.div_ceil(lay.page_tokens);
        let (kpb, vpb) = lay.page_bytes(width);
        let (pk, pv) = (
            dev.alloc(n_pages * kpb.next_multiple_of(256)).unwrap(),
            dev.alloc(n_pages * vpb.next_multiple_of(256)).unwrap(),
        );
        let kt: Vec<u64> = (0..n_pages)
            .map(|i| pk.at((n_pages - 1 - i) * kpb.next_multiple_of(256)))
            .collect();
        let vt: Vec<u64> = (0..n_pages)
            .map(|i| pv.at(i * vpb.next_multiple_of(256)))
            .collect();
        let (bkt, bvt) = (put(&s, &kt), put(&s, &vt));
        let tables = KvPageTables {
            k: &bkt,
            v: &bvt,
            n_pages,
        };
        // Prefill: rotate q and k of the first n_pre tokens, store K and V, attend.
        let pos: Vec<i32> = (0..total as i32).collect();
        let bpos = put(&s, &pos[..n_pre]);
        let bq = put(&s, &q[..n_pre * per]);
        let bk = put(&s, &k[..n_pre * width]);
        let bv = put(&s, &v[..n_pre * width]);
        rope(
            &s,
            &rp,
            hd,
            &bpos,
            n_pre,
            &bq,
            p.n_head,
            Some((&bk, p.n_head_kv)),
        )
        .unwrap();
        kv_store(&s, &lay, width, &tables, &bk, &bv, &bpos, n_pre).unwrap();
        let out = dev.alloc(n_pre * per * 4).unwrap();
        paged_prefill(&s, &p, &lay, &tables, &bq, n_pre, 0, &out).unwrap();
        let got: Vec<f32> = get(&s, &out, n_pre * per);
        check_close(
            &got,
            &want_pre,
            max_abs(&v),
            &format!("{:?} prefill on device-written pages", dev.info().backend),
        );
        // Decode: one token a step, K and V appended to the same pages first.
        for t in n_pre..total {
            let bpos = put(&s, &pos[t..t + 1]);
            let bq = put(&s, &q[t * per..][..per]);
            let bk = put(&s, &k[t * width..][..width]);
            let bv = put(&s, &v[t * width..][..width]);
            rope(
                &s,
                &rp,
                hd,
                &bpos,
                1,
                &bq,
                p.n_head,
                Some((&bk, p.n_head_kv)),
            )
            .unwrap();
            kv_store(&s, &lay, width, &tables, &bk, &bv, &bpos, 1).unwrap();
            let bseqs = put(&s, &[0i32, t as i32 + 1]);
            let plan = DecodePlan::with_split(&p, 1, t + 1, DecodePlan::tile(hd)).unwrap();
            let scratch = dev.alloc(plan.scratch_bytes).unwrap();
            let out = dev.alloc(per * 4).unwrap();
            paged_decode(&s, &p, &lay, &tables, &bseqs, &plan, &bq, &scratch, &out).unwrap();
            let got: Vec<f32> = get(&s, &out, per);
            let want = cpu_attention(&p, &lay, &host, &qr[t * per..][..per], 1, t);
            check_close(
                &got,
                &want,
                max_abs(&v),
                &format!("{:?} decode step at {t}", dev.info().backend),
            );
        }
        // The pages the device wrote are the CPU's bytes.
        let mut raw = vec![0u8; pk.len()];
        s.download(&pk, 0, &mut raw).unwrap();
        let rb = lay.k_type.row_bytes(width);
        for pos in 0..total {
            let (pg, r) = (pos / lay.page_tokens, pos % lay.page_tokens);
            let off = (n_pages - 1 - pg) * kpb.next_multiple_of(256) + r * rb;
            assert_eq!(
                &raw[off..off + rb],
                &host.k[pg][r * rb..][..rb],
                "K row {pos} (rotated on the device, quantized by kv_store)"
            );
        }
    }
}

/// Arguments the kernel cannot take are refused with a message naming them.
#[test]
fn prefill_refuses_bad_arguments() {
    let dev = common::sim();
    let s = dev.stream().unwrap();
    let lay = layout(KvType::Q4_0, KvType::F16);
    let host = HostSeq::new(&lay, 64, &rand_f32(64 * 10, 1), &rand_f32(64 * 10, 2), 10);
    let dp = DevicePages::new(&s, &[&host], 1);
    let q = dev.alloc(20 * 2 * 64 * 4).unwrap();
    let out = dev.alloc(20 * 2 * 64 * 4).unwrap();
    let p = params(2, 1, 64);
    // One page of 256 positions cannot hold positions up to 300.
    let e = paged_prefill(&s, &p, &lay, &dp.tables(), &q, 20, 280, &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs 2 pages of 256"), "{e}");
    let e = paged_prefill(&s, &params(2, 1, 32), &lay, &dp.tables(), &q, 5, 0, &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not 32"), "{e}");
    let e = paged_prefill(&s, &p, &lay, &dp.tables(), &q, 30, 0, &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("prefill q"), "{e}");
    let bad = AttnParams {
        window: Some(0),
        ..p
    };
    let e = paged_prefill(&s, &bad, &lay, &dp.tables(), &q, 5, 0, &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("window of 0"), "{e}");
}
