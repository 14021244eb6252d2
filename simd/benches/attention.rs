//! Attention throughput in GFLOP/s (criterion's "elements" are floating-point operations:
//! 2·hd per query·key product and per probability·value product, causal rows only), on the
//! shapes of the two reference models: gemma3-270m (4 heads, 1 KV head, hd 256) and
//! qwen2.5-1.5b (12 heads, 2 KV heads, hd 128). `prefill` is 512 tokens from an empty cache
//! (the tiled path on AVX-512), `decode` one token after 512.
//!
//! `cargo bench -p strata-simd --bench attention`; `STRATA_BENCH_THREADS` sets the pool size
//! (default 2) and `STRATA_SIMD` the level.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use strata_simd::ops::{AttnParams, attention};
use strata_simd::pool::ThreadPool;

fn bench(c: &mut Criterion) {
    let threads = std::env::var("STRATA_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let pool = ThreadPool::new(threads);
    let mut rng = StdRng::seed_from_u64(5);
    let mut g = c.benchmark_group(format!(
        "attention/{}t/{:?}",
        threads,
        strata_simd::dispatch::level()
    ));
    g.sample_size(10);
    for (name, n_head, n_head_kv, hd) in [("gemma3", 4, 1, 256), ("qwen2", 12, 2, 128)] {
        let ctx = 513;
        let stride = n_head_kv * hd;
        let k: Vec<f16> = (0..ctx * stride)
            .map(|_| f16::from_f32(rng.gen_range(-1.0..1.0)))
            .collect();
        let v = k.clone();
        let p = AttnParams {
            n_head,
            n_head_kv,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
            window: None,
            softcap: None,
        };
        for (case, n_tok, pos0) in [("prefill", 512usize, 0usize), ("decode", 1, 512)] {
            let q: Vec<f32> = (0..n_tok * n_head * hd)
                .map(|_| rng.gen_range(-1.0..1.0))
                .collect();
            let mut out = vec![0f32; q.len()];
            let pairs: usize = (0..n_tok).map(|t| pos0 + t + 1).sum();
            g.throughput(Throughput::Elements((4 * hd * n_head * pairs) as u64));
            g.bench_function(BenchmarkId::new(name, case), |b| {
                b.iter(|| attention(&pool, &p, &q, n_tok, pos0, &k, &v, &mut out))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
