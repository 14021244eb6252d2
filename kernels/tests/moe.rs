//! moe.cu on the simulator (and the GPU when asked) against the CPU's MoE pass
//! (`engine/src/model/forward.rs`: `route`, the slot sum of `Model::moe`, the shared expert's
//! gate), at the real models' shapes: qwen3moe (128 experts, top-8, renormalised), qwen2moe
//! (60, top-4, not renormalised, a shared expert), mixtral (8, top-2), olmoe (64, top-8).

mod common;
mod misc;

use common::{devices, get, put, rand_f32};
use misc::{Rng, close, model, rows};
use strata_kernels::ops::moe;
use strata_kernels::{Device, DeviceBuffer, Stream};

const EPS: f32 = f32::EPSILON;

/// The engine's `route` (forward.rs), copied operation for operation: the kernels crate cannot
/// depend on the engine. Softmax per row (sequential sum), then `k` times the highest
/// probability not yet taken, ties to the lower id; renormalised over the chosen when `norm`.
fn cpu_route(logits: &[f32], n: usize, ne: usize, k: usize, norm: bool) -> Vec<(usize, f32)> {
    let mut probs = logits[..n * ne].to_vec();
    for row in probs.chunks_exact_mut(ne) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        row.iter_mut().for_each(|v| *v /= sum);
    }
    let mut out: Vec<(usize, f32)> = Vec::new();
    for row in probs.chunks_exact(ne) {
        let start = out.len();
        for _ in 0..k {
            let best = (0..ne)
                .filter(|i| !out[start..].iter().any(|p| p.0 == *i))
                .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
                .unwrap_or(0);
            out.push((best, row[best]));
        }
        if norm {
            let s: f32 = out[start..].iter().map(|p| p.1).sum();
            if s > 0.0 {
                out[start..].iter_mut().for_each(|p| p.1 /= s);
            }
        }
    }
    out
}

/// The softmax probabilities the CPU ranks by (for judging a near tie).
fn cpu_probs(logits: &[f32], ne: usize) -> Vec<f32> {
    let mut p = logits.to_vec();
    for row in p.chunks_exact_mut(ne) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
        row.iter_mut().for_each(|v| *v = (*v - max).exp() / sum);
    }
    p
}

struct Routed {
    ids: Vec<i32>,
    weights: Vec<f32>,
    bids: DeviceBuffer,
    bw: DeviceBuffer,
}

#[allow(clippy::too_many_arguments)]
fn run_route(s: &Stream, logits: &[f32], n: usize, ne: usize, k: usize, norm: bool) -> Routed {
    let dev = s.device();
    let bl = put(s, logits);
    let (bids, bw) = (dev.alloc(n * k * 4).unwrap(), dev.alloc(n * k * 4).unwrap());
    moe::route(s, &bl, &bids, &bw, n, ne, k, norm).unwrap();
    Routed {
        ids: get(s, &bids, n * k),
        weights: get(s, &bw, n * k),
        bids,
        bw,
    }
}

/// Checks the device's routing against the CPU's. Ids must be the CPU's; where the two
/// orders differ only between experts whose CPU probabilities are within 4 ulp (a near tie
/// that CUDA's `expf`, 2 ulp from libm's, or a different summation order may break the other
/// way) the device's pick is accepted when `exact` is false. Weights: the softmax's sum is a
/// tree on the device and sequential on the CPU (each within about `ne`·ε/2 relative), `expf`
/// adds 2 ulp, the division and the renormalising sum a few more: 8 + ne/2 ulp relative.
#[allow(clippy::too_many_arguments)]
fn check_route(
    what: &str,
    logits: &[f32],
    r: &Routed,
    n: usize,
    ne: usize,
    k: usize,
    norm: bool,
    exact: bool,
) {
    let want = cpu_route(logits, n, ne, k, norm);
    let probs = cpu_probs(logits, ne);
    let mut near_ties = 0;
    for t in 0..n {
        let mut seen = vec![false; ne];
        for s in 0..k {
            let (id, w) = (r.ids[t * k + s], r.weights[t * k + s]);
            let (wid, ww) = want[t * k + s];
            assert!(
                (0..ne as i32).contains(&id),
                "{what}: token {t} slot {s}: id {id}"
            );
            assert!(!seen[id as usize], "{what}: token {t}: expert {id} twice");
            seen[id as usize] = true;
            if id as usize != wid {
                let (pa, pb) = (probs[t * ne + id as usize], probs[t * ne + wid]);
                assert!(
                    !exact && (pa - pb).abs() <= 4.0 * EPS * pa.max(pb),
                    "{what}: token {t} slot {s}: expert {id} (p {pa}), the CPU picks {wid} \
                     (p {pb})"
                );
                near_ties += 1;
                continue;
            }
            let tol = (8.0 + ne as f32 / 2.0) * EPS * ww.abs() + f32::MIN_POSITIVE;
            close(w, ww, tol, &format!("{what}: token {t} slot {s} weight"));
        }
    }
    if near_ties > 0 {
        eprintln!("{what}: {near_ties} near ties resolved the other way");
    }
}

/// Logits as routers make them: a spread of a few units, scaled.
fn logits(n: usize, ne: usize, scale: f32, seed: u64) -> Vec<f32> {
    rand_f32(n * ne, seed).iter().map(|v| v * scale).collect()
}

#[test]
fn route_matches_the_cpu_at_real_shapes() {
    for dev in devices() {
        let s = dev.stream().unwrap();
        // (what, experts, k, renormalised, tokens)
        for (what, ne, k, norm, n) in [
            ("qwen3moe", 128, 8, true, 96),
            ("qwen2moe", 60, 4, false, 64),
            ("mixtral", 8, 2, true, 64),
            ("olmoe", 64, 8, false, 33),
            ("k = n_expert", 8, 8, true, 16),
            ("k = n_expert, 60", 60, 60, false, 5),
            ("k = 1", 128, 1, true, 16),
            ("one expert", 1, 1, true, 3),
            ("the most experts", 512, 10, true, 9),
        ] {
            let l = logits(n, ne, 3.0, ne as u64 * 31 + k as u64);
            let r = run_route(&s, &l, n, ne, k, norm);
            check_route(what, &l, &r, n, ne, k, norm, false);
        }
    }
}

#[test]
fn route_ties_go_to_the_lower_expert_and_large_logits_stay_finite() {
    for dev in devices() {
        let s = dev.stream().unwrap();
        let (ne, k, n) = (128, 8, 48);
        let mut rng = Rng(77);
        // Logits from a handful of values: many exact ties, inside and across a lane's
        // experts and at the top-k boundary.
        let mut l: Vec<f32> = (0..n * ne)
            .map(|_| [0.0f32, 0.5, 1.0, 1.5, -2.0][rng.below(5)])
            .collect();
        // All equal: the first k experts, in id order.
        l[..ne].fill(0.25);
        // Large logits (softmax subtracts the max: no overflow), and a spread so wide the
        // small probabilities underflow to 0 — ties among zeros still go to the lower id.
        for (i, v) in l[ne..2 * ne].iter_mut().enumerate() {
            *v = 80.0 + (i % 3) as f32;
        }
        for (i, v) in l[2 * ne..3 * ne].iter_mut().enumerate() {
            *v = if i % 17 == 0 { 1e4 } else { -1e4 };
        }
        for v in l[3 * ne..4 * ne].iter_mut() {
            *v = -3e38;
        }
        for norm in [true, false] {
            let r = run_route(&s, &l, n, ne, k, norm);
            check_route("ties", &l, &r, n, ne, k, norm, true);
            assert_eq!(&r.ids[..k], &[0, 1, 2, 3, 4, 5, 6, 7], "all-equal row");
            assert!(r.weights.iter().all(|w| w.is_finite()), "finite weights");
        }
        // k = n_expert with underflowed probabilities: every expert, zeros in id order.
        let r = run_route(&s, &l[2 * ne..3 * ne], 1, ne, ne, false);
        check_route(
            "k = ne, zeros",
            &l[2 * ne..3 * ne],
            &r,
            1,
            ne,
            ne,
            false,
            true,
        );
    }
}

/// What [`moe::group`] must produce, by the definition: experts in id order, each expert's
/// pairs by token then slot; ids out of range left out.
fn cpu_group(ids: &[i32], n: usize, k: usize, ne: usize) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let mut counts = Vec::with_capacity(ne);
    let mut list = Vec::new();
    let mut offsets = Vec::new();
    for e in 0..ne as i32 {
        offsets.push(list.len() as i32);
        let before = list.len();
        // By token, then slot: the flattened order of ids.
        list.extend((0..n * k).filter(|&i| ids[i] == e).map(|i| i as i32));
        counts.push((list.len() - before) as i32);
    }
    offsets.push(list.len() as i32);
    (counts, offsets, list)
}

struct Grouped {
    counts: DeviceBuffer,
    offsets: DeviceBuffer,
    list: DeviceBuffer,
    pos: DeviceBuffer,
}

fn run_group(s: &Stream, bids: &DeviceBuffer, n: usize, k: usize, ne: usize) -> Grouped {
    let dev = s.device();
    let g = Grouped {
        counts: dev.alloc(ne * 4).unwrap(),
        offsets: dev.alloc((ne + 1) * 4).unwrap(),
        list: dev.alloc((n * k).max(1) * 4).unwrap(),
        pos: dev.alloc((n * k).max(1) * 4).unwrap(),
    };
    moe::group(s, bids, n, k, ne, &g.counts, &g.offsets, &g.list, &g.pos).unwrap();
    g
}

fn check_group(what: &str, s: &Stream, ids: &[i32], g: &Grouped, n: usize, k: usize, ne: usize) {
    let (counts, offsets, list) = cpu_group(ids, n, k, ne);
    assert_eq!(get::<i32>(s, &g.counts, ne), counts, "{what}: counts");
    assert_eq!(
        get::<i32>(s, &g.offsets, ne + 1),
        offsets,
        "{what}: offsets"
    );
    let got_list: Vec<i32> = get(s, &g.list, n * k);
    assert_eq!(&got_list[..list.len()], &list[..], "{what}: list");
    let pos: Vec<i32> = get(s, &g.pos, n * k);
    for (i, &p) in pos.iter().enumerate() {
        if (0..ne as i32).contains(&ids[i]) {
            assert_eq!(list[p as usize], i as i32, "{what}: pos[{i}]");
        } else {
            assert_eq!(p, -1, "{what}: pos of the left-out pair {i}");
        }
    }
}

#[test]
fn grouping_lists_pairs_by_expert_then_token_then_slot() {
    for dev in devices() {
        let s = dev.stream().unwrap();
        // From the router at real shapes: a qwen3moe prefill ubatch of 512 tokens (two scan
        // chunks per block), qwen2moe, mixtral.
        for (what, ne, k, n) in [
            ("qwen3moe", 128, 8, 512),
            ("qwen2moe", 60, 4, 37),
            ("mixtral", 8, 2, 300),
        ] {
            // Skewed logits, so that some experts get many tokens and some none.
            let l: Vec<f32> = logits(n, ne, 2.0, 5 + ne as u64)
                .iter()
                .enumerate()
                .map(|(i, v)| v + if i % ne < 3 { 1.5 } else { 0.0 })
                .collect();
            let r = run_route(&s, &l, n, ne, k, true);
            let g = run_group(&s, &r.bids, n, k, ne);
            check_group(what, &s, &r.ids, &g, n, k, ne);
        }
        // Hand-made ids: one expert twice in a token, ids out of range (left out), and
        // experts nobody chose.
        let (ne, k, n) = (10, 3, 270);
        let mut rng = Rng(5);
        let mut ids: Vec<i32> = (0..n * k).map(|_| rng.below(6) as i32).collect();
        ids[4] = ids[3];
        ids[10] = -1;
        ids[11] = 10;
        ids[100] = i32::MAX;
        let bids = put(&s, &ids);
        let g = run_group(&s, &bids, n, k, ne);
        check_group("hand-made", &s, &ids, &g, n, k, ne);
    }
}

#[test]
fn gather_reads_each_listed_token_row() {
    let qwen = model("qwen2.5-coder-1.5b.gguf");
    for dev in devices() {
        let s = dev.stream().unwrap();
        let (n, k, ne) = (12, 4, 60);
        // qwen2.5's embedding rows as the tokens' normed inputs, or random rows without it.
        let (x, e) = match &qwen {
            Some((p, f)) => rows(p, f, "token_embd.weight", 1234, n),
            None => (rand_f32(n * 1536, 9), 1536),
        };
        let bx = put(&s, &x);
        let l = logits(n, ne, 3.0, 17);
        let r = run_route(&s, &l, n, ne, k, false);
        let g = run_group(&s, &r.bids, n, k, ne);
        let offsets: Vec<i32> = get(&s, &g.offsets, ne + 1);
        let list: Vec<i32> = get(&s, &g.list, n * k);
        // One expert's rows (a start inside the list), then every pair's at once.
        let e_busy = (0..ne)
            .max_by_key(|&e| offsets[e + 1] - offsets[e])
            .unwrap();
        for (start, m) in [
            (
                offsets[e_busy] as usize,
                (offsets[e_busy + 1] - offsets[e_busy]) as usize,
            ),
            (0, n * k),
        ] {
            let out = dev.alloc(m * e * 4).unwrap();
            moe::gather(&s, &bx, n, e, &g.list, start, m, k, &out).unwrap();
            let got: Vec<f32> = get(&s, &out, m * e);
            for i in 0..m {
                let t = list[start + i] as usize / k;
                assert_eq!(
                    &got[i * e..(i + 1) * e],
                    &x[t * e..(t + 1) * e],
                    "row {i} (token {t})"
                );
            }
        }
        // An entry that names no token gives a row of zeros, not an out-of-bounds read.
        let bad = put(&s, &[-4i32, (n * k) as i32, 5]);
        let out = dev.alloc(3 * e * 4).unwrap();
        moe::gather(&s, &bx, n, e, &bad, 0, 3, k, &out).unwrap();
        let got: Vec<f32> = get(&s, &out, 3 * e);
        assert!(got[..2 * e].iter().all(|&v| v == 0.0));
        assert_eq!(&got[2 * e..], &x[(5 / k) * e..(5 / k + 1) * e]);
    }
}

/// The CPU's slot sum (forward.rs): each slot `w · y` first, then added to the token's
/// accumulator in slot order from 0.
fn cpu_weighted_sum(y: &[f32], w: &[f32], n: usize, k: usize, e: usize) -> Vec<f32> {
    let mut acc = vec![0f32; n * e];
    for t in 0..n {
        for s in 0..k {
            let ws = w[t * k + s];
            let yr = &y[(t * k + s) * e..(t * k + s + 1) * e];
            for i in 0..e {
                acc[t * e + i] += ws * yr[i];
            }
        }
    }
    acc
}

/// The tolerance of a slot sum: each of the `k` steps rounds once (or, fused on a GPU, the
/// product is exact and the add rounds): within k ulp of Σ|w·y|.
fn sum_tol(y: &[f32], w: &[f32], t: usize, i: usize, k: usize, e: usize) -> f32 {
    let mag: f32 = (0..k)
        .map(|s| (w[t * k + s] * y[(t * k + s) * e + i]).abs())
        .sum();
    (k as f32 + 1.0) * EPS * mag + f32::MIN_POSITIVE
}

#[test]
fn weighted_sum_adds_slots_in_order_whichever_layout() {
    for dev in devices() {
        let s = dev.stream().unwrap();
        for (what, ne, k, n, e, norm) in [
            ("qwen3moe", 128, 8, 24, 2048, true),
            ("mixtral", 8, 2, 7, 4096, true),
            ("qwen2moe", 60, 4, 5, 2048, false),
        ] {
            let l = logits(n, ne, 3.0, 3 + k as u64);
            let r = run_route(&s, &l, n, ne, k, norm);
            // Expert outputs: y[t][s] rows, with a wide range of magnitudes.
            let y: Vec<f32> = rand_f32(n * k * e, 99)
                .iter()
                .enumerate()
                .map(|(i, v)| v * (1 + i % 7) as f32)
                .collect();
            let by = put(&s, &y);
            let out = dev.alloc(n * e * 4).unwrap();
            moe::weighted_sum(&s, &by, &r.bw, None, &out, n, k, e).unwrap();
            let got: Vec<f32> = get(&s, &out, n * e);
            let want = cpu_weighted_sum(&y, &r.weights, n, k, e);
            for t in 0..n {
                for i in 0..e {
                    close(
                        got[t * e + i],
                        want[t * e + i],
                        sum_tol(&y, &r.weights, t, i, k, e),
                        &format!("{what} out[{t}][{i}]"),
                    );
                }
            }
            // The same outputs in list order (as a grouped GEMM writes them), read through
            // pos: the very same bits, since the slots are still summed in slot order.
            let g = run_group(&s, &r.bids, n, k, ne);
            let list: Vec<i32> = get(&s, &g.list, n * k);
            let mut y_listed = vec![0f32; n * k * e];
            for (p, &pair) in list.iter().enumerate() {
                let pair = pair as usize;
                y_listed[p * e..(p + 1) * e].copy_from_slice(&y[pair * e..(pair + 1) * e]);
            }
            let byl = put(&s, &y_listed);
            let out2 = dev.alloc(n * e * 4).unwrap();
            moe::weighted_sum(&s, &byl, &r.bw, Some(&g.pos), &out2, n, k, e).unwrap();
            let got2: Vec<f32> = get(&s, &out2, n * e);
            assert!(
                got.iter()
                    .zip(&got2)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{what}: list order changed the sum"
            );
        }
    }
}

/// The shared expert's gate as the CPU computes it: z summed in order, `1 / (1 + e^−z)`.
fn cpu_shared_gate(x: &[f32], gate_inp: &[f32], y: &[f32], acc: &mut [f32], e: usize) {
    for t in 0..acc.len() / e {
        let xr = &x[t * e..(t + 1) * e];
        let z: f32 = xr.iter().zip(gate_inp).map(|(a, b)| a * b).sum();
        let g = 1.0 / (1.0 + (-z).exp());
        acc[t * e..(t + 1) * e]
            .iter_mut()
            .zip(&y[t * e..(t + 1) * e])
            .for_each(|(a, y)| *a += g * y);
    }
}

#[test]
fn shared_expert_gate_matches_the_cpu() {
    let qwen = model("qwen2.5-coder-1.5b.gguf");
    for dev in devices() {
        let s = dev.stream().unwrap();
        let e = 2048; // qwen2moe-a2.7b's n_embd
        let n = 6;
        let mut x = rand_f32(n * e, 61);
        // Gates near 0, near 1 and in between.
        x[..e].iter_mut().for_each(|v| *v *= 0.01);
        let mut cases = vec![("random".to_string(), x, rand_f32(e, 62), e)];
        if let Some((p, f)) = &qwen {
            // qwen2.5's embedding rows as inputs and another row as the gate vector.
            let (x, e) = rows(p, f, "token_embd.weight", 4000, 4);
            let (gi, _) = rows(p, f, "token_embd.weight", 17, 1);
            let gi = gi.iter().map(|v| v * 40.0).collect();
            cases.push(("qwen2.5 rows".to_string(), x, gi, e));
        }
        for (what, x, gi, e) in cases {
            let n = x.len() / e;
            let y = rand_f32(n * e, 63);
            let acc0 = rand_f32(n * e, 64);
            let (bx, bgi, by, bacc) = (put(&s, &x), put(&s, &gi), put(&s, &y), put(&s, &acc0));
            moe::shared_gate(&s, &bx, &bgi, &by, &bacc, n, e).unwrap();
            let got: Vec<f32> = get(&s, &bacc, n * e);
            let mut want = acc0.clone();
            cpu_shared_gate(&x, &gi, &y, &mut want, e);
            for t in 0..n {
                // z: two summation orders of e products, each within e·ε/2 of Σ|x·g| (a
                // loose bound; the sums are typically far closer); the sigmoid's slope is at
                // most 1/4, CUDA's expf adds 2 ulp; then one product and one add.
                let mag: f32 = (0..e).map(|i| (x[t * e + i] * gi[i]).abs()).sum();
                let dg = 0.25 * e as f32 * EPS * mag + 4.0 * EPS;
                for i in 0..e {
                    let tol = y[t * e + i].abs() * dg + 2.0 * EPS * want[t * e + i].abs();
                    close(
                        got[t * e + i],
                        want[t * e + i],
                        tol + f32::MIN_POSITIVE,
                        &format!("{what} acc[{t}][{i}]"),
                    );
                }
            }
        }
    }
}

/// The pieces together, as a prefill MoE pass would run them, against the CPU's pass with
/// stand-in experts (expert `e` maps a row to `row · (e + 1) / 8`, computed on the host in
/// list order as a grouped GEMM would): route, group, gather, weighted sum, shared gate.
#[test]
fn a_moe_pass_from_the_pieces_matches_the_cpu() {
    for dev in devices() {
        let s = dev.stream().unwrap();
        let (ne, k, n, e) = (60, 4, 20, 256);
        let x = rand_f32(n * e, 71);
        let l = logits(n, ne, 2.5, 72);
        let gate_inp = rand_f32(e, 73);
        let y_shared = rand_f32(n * e, 74);
        let bx = put(&s, &x);
        let r = run_route(&s, &l, n, ne, k, false);
        let g = run_group(&s, &r.bids, n, k, ne);
        let gathered = dev.alloc(n * k * e * 4).unwrap();
        moe::gather(&s, &bx, n, e, &g.list, 0, n * k, k, &gathered).unwrap();
        // The experts, on the host, over the gathered rows in list order.
        let rows_: Vec<f32> = get(&s, &gathered, n * k * e);
        let offsets: Vec<i32> = get(&s, &g.offsets, ne + 1);
        let mut y = vec![0f32; n * k * e];
        for ex in 0..ne {
            for p in offsets[ex] as usize..offsets[ex + 1] as usize {
                for i in 0..e {
                    y[p * e + i] = rows_[p * e + i] * (ex + 1) as f32 / 8.0;
                }
            }
        }
        let by = put(&s, &y);
        let out = dev.alloc(n * e * 4).unwrap();
        moe::weighted_sum(&s, &by, &r.bw, Some(&g.pos), &out, n, k, e).unwrap();
        let (bgi, bys) = (put(&s, &gate_inp), put(&s, &y_shared));
        moe::shared_gate(&s, &bx, &bgi, &bys, &out, n, e).unwrap();
        let got: Vec<f32> = get(&s, &out, n * e);

        // The CPU's pass (forward.rs's `moe`) with the same stand-in experts.
        let route = cpu_route(&l, n, ne, k, false);
        let mut slots = vec![0f32; n * k * e];
        for (si, &(ex, w)) in route.iter().enumerate() {
            let t = si / k;
            for i in 0..e {
                slots[si * e + i] = w * (x[t * e + i] * (ex + 1) as f32 / 8.0);
            }
        }
        let mut want = vec![0f32; n * e];
        for (si, yv) in slots.chunks_exact(e).enumerate() {
            let t = si / k;
            want[t * e..(t + 1) * e]
                .iter_mut()
                .zip(yv)
                .for_each(|(a, y)| *a += y);
        }
        cpu_shared_gate(&x, &gate_inp, &y_shared, &mut want, e);
        for i in 0..n * e {
            // Routing weights within a few ulp, the slot sum and the gate as above: 64 ulp of
            // the largest term is far more than they need and far less than a wrong slot.
            let tol = 64.0 * EPS * (1.0 + want[i].abs());
            close(got[i], want[i], tol, &format!("out[{i}]"));
        }
    }
}

#[test]
fn wrong_shapes_are_errors() {
    let dev: Device = common::sim();
    let s = dev.stream().unwrap();
    let b = dev.alloc(1 << 16).unwrap();
    let e = moe::route(&s, &b, &b, &b, 4, 600, 8, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("600 experts"), "{e}");
    let e = moe::route(&s, &b, &b, &b, 4, 8, 9, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("top-9 of 8"), "{e}");
    let small = dev.alloc(16).unwrap();
    let e = moe::route(&s, &b, &small, &b, 4, 8, 2, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("route ids"), "{e}");
    let e = moe::group(&s, &b, 4, 2, 2000, &b, &b, &b, &b)
        .unwrap_err()
        .to_string();
    assert!(e.contains("2000 experts"), "{e}");
    let e = moe::gather(&s, &b, 4, 64, &small, 2, 4, 2, &b)
        .unwrap_err()
        .to_string();
    assert!(e.contains("gather list"), "{e}");
    let e = moe::weighted_sum(&s, &b, &b, Some(&small), &b, 4, 2, 64)
        .unwrap_err()
        .to_string();
    assert!(e.contains("weighted_sum pos"), "{e}");
}
