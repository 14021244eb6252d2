//! sample.cu on the simulator (and the GPU when asked) against the CPU sampler
//! (`engine/src/sampler.rs`): argmax as the greedy sampler picks, top-k as its sort orders
//! candidates, and log-softmax against an f64 reference. Real vocabularies: qwen2.5's 151936
//! and gemma3's 262144, with logits made from the real embedding tables.

mod common;
mod misc;

use common::{devices, get, put, rand_f32};
use misc::{Rng, embedding_logits, model};
use strata_kernels::ops::sample;
use strata_kernels::{Device, Stream};

/// The engine's greedy `argmax` (sampler.rs), copied: the first of equal maxima.
fn cpu_argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// The CPU sampler's order: by logit descending (`total_cmp`), and, for a deterministic
/// reference where its unstable sort leaves equal logits in any order, by lower index.
fn cpu_top_k(v: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut c: Vec<(u32, f32)> = v.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    c.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    c.truncate(k);
    c
}

fn run_argmax(s: &Stream, x: &[f32], rows: usize, n: usize) -> Vec<i32> {
    let dev = s.device();
    let bx = put(s, x);
    let scratch = dev
        .alloc(sample::argmax_scratch_bytes(rows, n).unwrap())
        .unwrap();
    let out = dev.alloc(rows * 4).unwrap();
    sample::argmax(s, &bx, rows, n, &scratch, &out).unwrap();
    get(s, &out, rows)
}

fn run_top_k(s: &Stream, x: &[f32], rows: usize, n: usize, k: usize) -> (Vec<f32>, Vec<i32>) {
    let dev = s.device();
    let bx = put(s, x);
    let scratch = dev
        .alloc(sample::top_k_scratch_bytes(rows, n, k).unwrap())
        .unwrap();
    let (bv, bi) = (
        dev.alloc(rows * k * 4).unwrap(),
        dev.alloc(rows * k * 4).unwrap(),
    );
    sample::top_k(s, &bx, rows, n, k, &scratch, &bv, &bi).unwrap();
    (get(s, &bv, rows * k), get(s, &bi, rows * k))
}

/// Device top-k must equal the reference exactly: values bit for bit, indices in order.
fn check_top_k(what: &str, x: &[f32], n: usize, k: usize, got: &(Vec<f32>, Vec<i32>)) {
    for (r, row) in x.chunks_exact(n).enumerate() {
        let want = cpu_top_k(row, k);
        for (j, &(i, v)) in want.iter().enumerate() {
            assert_eq!(
                (got.1[r * k + j], got.0[r * k + j].to_bits()),
                (i as i32, v.to_bits()),
                "{what}: row {r} rank {j}: device ({}, {}), CPU ({i}, {v})",
                got.1[r * k + j],
                got.0[r * k + j]
            );
        }
    }
}

#[test]
fn argmax_picks_the_first_maximum_as_the_greedy_sampler() {
    for dev in devices() {
        let s = dev.stream().unwrap();
        // Row lengths around the 2048-element chunk, and several rows per launch.
        for (rows, n) in [
            (3usize, 1usize),
            (4, 2047),
            (2, 2048),
            (5, 2049),
            (2, 10_000),
        ] {
            let mut x = rand_f32(rows * n, n as u64);
            // Row 1: the maximum twice, in two chunks; row 2: everything equal; row 3: -inf
            // everywhere but one finite value late in the row.
            if rows > 1 && n > 4 {
                let r = &mut x[n..2 * n];
                r[n / 2] = 5.0;
                r[n - 1] = 5.0;
                r[n / 3] = 5.0;
            }
            if rows > 2 {
                x[2 * n..3 * n].fill(0.5);
            }
            if rows > 3 && n > 1 {
                let r = &mut x[3 * n..4 * n];
                r.fill(f32::NEG_INFINITY);
                r[n - 2] = -1e30;
            }
            let got = run_argmax(&s, &x, rows, n);
            for r in 0..rows {
                assert_eq!(
                    got[r] as u32,
                    cpu_argmax(&x[r * n..(r + 1) * n]),
                    "{rows}x{n} row {r}"
                );
            }
        }
        // -0.0 and +0.0 are equal to the greedy sampler: the first wins.
        let got = run_argmax(&s, &[-1.0, -0.0, 0.0, -0.0], 1, 4);
        assert_eq!(got, [1]);
        // A row of -inf: index 0, as the CPU.
        let got = run_argmax(&s, &[f32::NEG_INFINITY; 5000], 1, 5000);
        assert_eq!(got, [0]);
    }
}

#[test]
fn argmax_over_real_vocabularies() {
    let gemma = model("gemma3-270m.gguf");
    let qwen = model("qwen2.5-coder-1.5b.gguf");
    for dev in devices() {
        let s = dev.stream().unwrap();
        // The vocabulary sizes on random logits, with the maximum near the end and a tie
        // across chunks.
        for n in [151_936usize, 262_144] {
            let mut x = rand_f32(n, n as u64);
            x[n - 3] = 3.0;
            x[n - 1] = 3.0;
            x[70_001] = 2.5;
            let got = run_argmax(&s, &x, 1, n);
            assert_eq!(got[0] as u32, cpu_argmax(&x), "vocab {n}");
        }
        for (what, m) in [("gemma3", &gemma), ("qwen2.5", &qwen)] {
            if let Some((p, f)) = m {
                let x = embedding_logits(p, f, 9_000);
                let n = x.len();
                let got = run_argmax(&s, &x, 1, n);
                assert_eq!(got[0] as u32, cpu_argmax(&x), "{what}: {n} real logits");
                // And the top 40 (the sampler's default top-k).
                let t = run_top_k(&s, &x, 1, n, 40);
                check_top_k(what, &x, n, 40, &t);
            }
        }
    }
}

#[test]
fn top_k_orders_as_the_sampler_with_ties_to_the_lower_index() {
    for dev in devices() {
        let s = dev.stream().unwrap();
        let mut rng = Rng(3);
        // (rows, n, k): k = n, k not a power of two, the largest k, one chunk and several,
        // a partial last chunk.
        for (rows, n, k) in [
            (2usize, 128usize, 128usize),
            (3, 1000, 1),
            (2, 5000, 3),
            (2, 9000, 40),
            (1, 20_000, 100),
            (2, 12_288, 128),
        ] {
            // Values from a small set: ties everywhere, including at the k-th place.
            let mut x: Vec<f32> = (0..rows * n)
                .map(|_| (rng.below(64) as f32 - 32.0) * 0.25)
                .collect();
            // Signed zeros (total_cmp: -0 < +0), infinities, the largest finite values.
            for (j, v) in [
                -0.0f32,
                0.0,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::MAX,
                -f32::MAX,
                f32::MIN_POSITIVE,
            ]
            .into_iter()
            .enumerate()
            {
                let i = (j * 997) % (rows * n);
                x[i] = v;
            }
            let got = run_top_k(&s, &x, rows, n, k);
            check_top_k(&format!("{rows}x{n} top-{k}"), &x, n, k, &got);
            // Distinct random values too.
            let x = rand_f32(rows * n, (n + k) as u64);
            let got = run_top_k(&s, &x, rows, n, k);
            check_top_k(&format!("{rows}x{n} top-{k} distinct"), &x, n, k, &got);
        }
    }
}

/// The second pass merges at most 4096 / k2 − 1 chunks at a time next to the best so far:
/// a vocabulary of 151936 is 38 chunks, more than one batch at k = 128.
#[test]
fn top_k_128_over_a_real_vocabulary_size() {
    for dev in devices() {
        let s = dev.stream().unwrap();
        let n = 151_936;
        let mut x = rand_f32(n, 8);
        // The largest values spread over every chunk, some tied.
        for c in 0..n / 4096 {
            x[c * 4096 + c] = 10.0 + (c % 5) as f32;
        }
        let got = run_top_k(&s, &x, 1, n, 128);
        check_top_k("151936 top-128", &x, n, 128, &got);
    }
}

#[test]
fn log_softmax_matches_f64() {
    for dev in devices() {
        let s = dev.stream().unwrap();
        for (rows, n, scale) in [(3usize, 1000usize, 10.0f32), (1, 151_936, 30.0)] {
            let x: Vec<f32> = rand_f32(rows * n, 41).iter().map(|v| v * scale).collect();
            let (bx, out) = (put(&s, &x), dev.alloc(rows * n * 4).unwrap());
            sample::log_softmax(&s, &bx, &out, rows, n).unwrap();
            let got: Vec<f32> = get(&s, &out, rows * n);
            for (r, row) in x.chunks_exact(n).enumerate() {
                // The perplexity code's formula, in f64.
                let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let sum: f64 = row.iter().map(|&l| ((l - max) as f64).exp()).sum();
                for i in 0..n {
                    let want = (row[i] - max) as f64 - sum.ln();
                    // The device sums exp in f32 (a tree: within log2(n) ulp of the sum, so
                    // 18 ulp at most here) and takes logf (1 ulp); the log of a relative error
                    // δ is an absolute error δ; max + log(sum) rounds (ulp of |max|), and so
                    // does the subtraction (ulp of |out|).
                    let eps = f32::EPSILON as f64;
                    let tol = (24.0 + max.abs() as f64) * eps + 2.0 * eps * want.abs();
                    assert!(
                        (got[r * n + i] as f64 - want).abs() <= tol,
                        "row {r} [{i}]: {} vs {want}",
                        got[r * n + i]
                    );
                }
            }
        }
    }
}

#[test]
fn wrong_arguments_are_errors() {
    let dev: Device = common::sim();
    let s = dev.stream().unwrap();
    let b = dev.alloc(1 << 16).unwrap();
    let small = dev.alloc(8).unwrap();
    let e = sample::top_k(&s, &b, 1, 1000, 129, &b, &b, &b)
        .unwrap_err()
        .to_string();
    assert!(e.contains("k = 129"), "{e}");
    let e = sample::top_k(&s, &b, 1, 10, 20, &b, &b, &b)
        .unwrap_err()
        .to_string();
    assert!(e.contains("k = 20 of 10"), "{e}");
    let e = sample::top_k(&s, &b, 1, 1000, 8, &small, &b, &b)
        .unwrap_err()
        .to_string();
    assert!(e.contains("top_k scratch"), "{e}");
    let e = sample::argmax(&s, &b, 2, 1000, &small, &b)
        .unwrap_err()
        .to_string();
    assert!(e.contains("argmax scratch"), "{e}");
    let e = sample::argmax(&s, &b, 1, 0, &b, &b)
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty row"), "{e}");
    let e = sample::argmax(&s, &b, 70_000, 1, &b, &b)
        .unwrap_err()
        .to_string();
    assert!(e.contains("70000 rows"), "{e}");
}
