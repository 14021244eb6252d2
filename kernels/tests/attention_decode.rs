//! Decode attention over paged KV (`attention.cu`) on the simulator against the CPU's scalar
//! attention (`strata_simd::ops::attention::attention_at`): every K×V type pair, GQA groups of
//! 1 to 16 (more than one block's worth of heads), sliding windows (with the pages before the
//! window taken out of the tables), soft-capping, batches of sequences of different lengths
//! over 1–3 pages with a partial last page, forced and device-chosen splits, the real models'
//! shapes and real tensors. Tolerances: `attention_support::ATTN_TOL`.

mod attention_support;
mod common;

use attention_support::{
    DevicePages, HostSeq, PAGE_TOKENS, check_close, cpu_attention, max_abs, real_model, type_pairs,
};
use common::{devices, get, put, rand_f32};
use strata_kernels::Device;
use strata_kernels::ops::attention::{AttnParams, DecodePlan, paged_decode};
use strata_kernels::ops::kv::{KvLayout, KvType};

struct Case {
    p: AttnParams,
    layout: KvLayout,
    lens: Vec<usize>,
    /// Positions per split; `None`: the device's plan.
    split: Option<usize>,
}

/// Runs one decode batch and checks every sequence against the CPU. `values`: real data to
/// draw q, k and v from (random in [-1, 1) otherwise).
fn run(dev: &Device, c: &Case, values: Option<&[f32]>, seed: u64) {
    let p = &c.p;
    let (hd, width) = (p.head_dim, p.n_head_kv * p.head_dim);
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
    let mut hosts = Vec::new();
    let mut vmax = 0f32;
    for (i, &len) in c.lens.iter().enumerate() {
        let k = draw(len * width, 3 * i as u64 + 1);
        let v = draw(len * width, 3 * i as u64 + 2);
        vmax = vmax.max(max_abs(&v));
        hosts.push(HostSeq::new(&c.layout, width, &k, &v, len));
    }
    let refs: Vec<&HostSeq> = hosts.iter().collect();
    let dp = DevicePages::new(&s, &refs, seed);
    // Pages wholly before a sliding window leave the tables: reading one would be an access
    // outside every buffer, which the simulator reports.
    if let Some(w) = p.window {
        for (i, &len) in c.lens.iter().enumerate() {
            for pg in 0..len.saturating_sub(w) / c.layout.page_tokens {
                s.upload(&dp.k_table, 8 * (dp.first[i] + pg), &0u64.to_le_bytes())
                    .unwrap();
                s.upload(&dp.v_table, 8 * (dp.first[i] + pg), &0u64.to_le_bytes())
                    .unwrap();
            }
        }
    }
    let seqs: Vec<i32> = c
        .lens
        .iter()
        .enumerate()
        .flat_map(|(i, &len)| [dp.first[i] as i32, len as i32])
        .collect();
    let bseqs = put(&s, &seqs);
    let n_seq = c.lens.len();
    let max_len = c.lens.iter().copied().max().unwrap_or(0);
    // q scaled so that the softmax is neither flat nor one-hot.
    let q: Vec<f32> = draw(n_seq * p.n_head * hd, 99)
        .iter()
        .map(|x| x * 4.0)
        .collect();
    let bq = put(&s, &q);
    let plan = match c.split {
        Some(sp) => DecodePlan::with_split(p, n_seq, max_len, sp).unwrap(),
        None => DecodePlan::new(dev, p, n_seq, max_len).unwrap(),
    };
    let scratch = dev.alloc(plan.scratch_bytes.max(4)).unwrap();
    let out = dev.alloc(q.len() * 4).unwrap();
    paged_decode(
        &s,
        p,
        &c.layout,
        &dp.tables(),
        &bseqs,
        &plan,
        &bq,
        &scratch,
        &out,
    )
    .unwrap();
    let got: Vec<f32> = get(&s, &out, q.len());
    let per = p.n_head * hd;
    for (i, host) in hosts.iter().enumerate() {
        let want = cpu_attention(p, &c.layout, host, &q[i * per..][..per], 1, host.len - 1);
        check_close(
            &got[i * per..][..per],
            &want,
            vmax,
            &format!(
                "{:?} heads {}/{} hd {hd} K {:?} V {:?} window {:?} softcap {:?} split {} \
                 seq {i} of {n_seq} (length {})",
                dev.info().backend,
                p.n_head,
                p.n_head_kv,
                c.layout.k_type,
                c.layout.v_type,
                p.window,
                p.softcap,
                plan.split,
                host.len
            ),
        );
    }
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

/// All nine K×V type pairs on a batch of three sequences over one, two and three pages, cut
/// into splits of one tile (128 positions here) so that the combine step has up to 5 splits.
#[test]
fn decode_every_type_pair() {
    for dev in devices() {
        for (i, (k, v)) in type_pairs().into_iter().enumerate() {
            let c = Case {
                p: params(4, 2, 64),
                layout: layout(k, v),
                lens: vec![1, 300, 600],
                split: Some(DecodePlan::tile(64)),
            };
            run(&dev, &c, None, 10 + i as u64);
        }
    }
}

/// GQA groups of 1, 4 and 16 (two blocks of 8 query heads per KV head), windows that start
/// inside a page and past whole pages, soft-capping.
#[test]
fn decode_gqa_windows_softcap() {
    for dev in devices() {
        for (i, (n_head, n_head_kv, window, softcap, k, v)) in [
            (4, 4, None, None, KvType::F16, KvType::F16),
            (8, 2, Some(300), None, KvType::Q8_0, KvType::Q4_0),
            (16, 1, Some(200), Some(30.0), KvType::Q4_0, KvType::Q8_0),
            (6, 2, Some(1), None, KvType::F16, KvType::Q8_0),
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
                lens: vec![257, 1, 700],
                split: Some(DecodePlan::tile(128)),
            };
            run(&dev, &c, None, 30 + i as u64);
        }
    }
}

/// gemma3-270m's attention (4 heads, 1 KV head of 256; its local layers' 512-position window)
/// and qwen2.5-1.5B's (12/2 of 128), with the device's own plan and with one-tile splits.
#[test]
fn decode_real_shapes() {
    for dev in devices() {
        for (i, (p, k, v, lens)) in [
            (
                AttnParams {
                    window: Some(512),
                    ..params(4, 1, 256)
                },
                KvType::F16,
                KvType::F16,
                vec![700, 5, 768],
            ),
            (params(4, 1, 256), KvType::Q8_0, KvType::Q8_0, vec![300]),
            (
                params(12, 2, 128),
                KvType::F16,
                KvType::F16,
                vec![600, 33, 256],
            ),
            (params(12, 2, 128), KvType::Q4_0, KvType::Q4_0, vec![513]),
        ]
        .into_iter()
        .enumerate()
        {
            for split in [None, Some(DecodePlan::tile(p.head_dim))] {
                let c = Case {
                    p,
                    layout: layout(k, v),
                    lens: lens.clone(),
                    split,
                };
                run(&dev, &c, None, 50 + i as u64);
            }
        }
    }
}

/// q, k and v drawn from the real models' weights (their first layer's K projection, rows
/// scaled to unit RMS), at each model's own attention shape.
#[test]
fn decode_real_tensors() {
    for (file, k, v) in [
        ("gemma3-270m.gguf", KvType::Q8_0, KvType::F16),
        ("qwen2.5-coder-1.5b.gguf", KvType::F16, KvType::Q4_0),
    ] {
        let Some(m) = real_model(file, 2048, 256) else {
            continue;
        };
        for dev in devices() {
            let c = Case {
                p: params(m.n_head, m.n_head_kv, m.head_dim),
                layout: layout(k, v),
                lens: vec![280, 90],
                split: Some(DecodePlan::tile(m.head_dim)),
            };
            run(&dev, &c, Some(&m.values), 70);
        }
    }
}

/// Arguments the kernels cannot take are refused with a message naming them.
#[test]
fn decode_refuses_bad_arguments() {
    let dev = common::sim();
    let s = dev.stream().unwrap();
    let host = HostSeq::new(
        &layout(KvType::F16, KvType::F16),
        128,
        &rand_f32(128 * 10, 1),
        &rand_f32(128 * 10, 2),
        10,
    );
    let dp = DevicePages::new(&s, &[&host], 1);
    let bseqs = put(&s, &[0i32, 10]);
    let p = params(4, 2, 64);
    let plan = DecodePlan::new(&dev, &p, 1, 10).unwrap();
    let q = dev.alloc(4 * 64 * 4).unwrap();
    let out = dev.alloc(4 * 64 * 4).unwrap();
    let scratch = dev.alloc(plan.scratch_bytes).unwrap();
    let lay = layout(KvType::F16, KvType::F16);
    let call = |p: &AttnParams, plan: &DecodePlan, scratch: &strata_kernels::DeviceBuffer| {
        paged_decode(&s, p, &lay, &dp.tables(), &bseqs, plan, &q, scratch, &out)
            .unwrap_err()
            .to_string()
    };
    let e = call(&params(4, 2, 96), &plan, &scratch);
    assert!(e.contains("not 96"), "{e}");
    let e = call(&params(5, 2, 64), &plan, &scratch);
    assert!(e.contains("not a multiple of 2 KV heads"), "{e}");
    let other = DecodePlan::new(&dev, &params(8, 2, 64), 1, 10).unwrap();
    let e = call(&p, &other, &scratch);
    assert!(e.contains("made for other attention parameters"), "{e}");
    let small = dev.alloc(8).unwrap();
    let e = call(&p, &plan, &small);
    assert!(e.contains("decode scratch"), "{e}");
    let e = DecodePlan::with_split(&p, 1, 10, 100)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a multiple of the 128-position tile"), "{e}");
    paged_decode(
        &s,
        &p,
        &lay,
        &dp.tables(),
        &bseqs,
        &plan,
        &q,
        &scratch,
        &out,
    )
    .unwrap();
    s.synchronize().unwrap();
}
