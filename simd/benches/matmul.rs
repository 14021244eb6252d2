//! matmul throughput on the shapes of a 1.5B model's FFN (1536 × 8960 and 8960 × 1536): the
//! K-quants of qwen2.5 and the legacy types of gemma3 (whose largest tensor is a Q8_0 output
//! matrix), and the K-quants of Q5_K_M, Q3_K_M and Q2_K files. `n_tok=1` is decode (the single-token kernels), reported in weight bytes per second
//! so it reads against memory bandwidth; `n_tok=4` the multi-token kernels (small batches),
//! `n_tok=64` and `n_tok=256` prefill (the tiled GEMM where the level has one), reported as
//! operations (`2 · n_tok · rows · cols` per call) in criterion's "elements": `Gelem/s` reads
//! GFLOP/s.
//!
//! Two more shapes time decode and small batches (`n_tok` 1 and 4) where the weights sit in L2
//! (256 × 1536: 216 to 288 KiB in the legacy 4- and 5-bit types) and where they stream from
//! DRAM (65536 × 2048: 72 to 96 MiB, past any last-level cache of a desktop or a CCX).
//!
//! `cargo bench -p strata-simd --bench matmul`; `STRATA_BENCH_THREADS` sets the pool size
//! (default 2), `STRATA_SIMD` the level and `STRATA_BENCH_TYPES` the weight types (`q4_0,q5_1`;
//! default all: building the DRAM-size matrices takes a while).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use strata_simd::matmul::{Layout, MatRef, MatmulScratch, interleave, matmul};
use strata_simd::pool::ThreadPool;
use strata_storage::quant::{GgmlType, quantize_row};

fn weights(ty: GgmlType, rows: usize, cols: usize, rng: &mut StdRng) -> Vec<u8> {
    let rb = ty.row_bytes(cols);
    let mut data = vec![0u8; rows * rb];
    let mut src = vec![0f32; cols];
    for row in data.chunks_exact_mut(rb) {
        src.iter_mut().for_each(|v| *v = rng.gen_range(-1.0..1.0));
        quantize_row(ty, &src, row).expect("quantize");
    }
    data
}

fn bench(c: &mut Criterion) {
    let threads = std::env::var("STRATA_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let pool = ThreadPool::new(threads);
    let mut rng = StdRng::seed_from_u64(1);
    let mut g = c.benchmark_group(format!(
        "matmul/{}t/{:?}",
        threads,
        strata_simd::dispatch::level()
    ));
    g.sample_size(20);
    let only = std::env::var("STRATA_BENCH_TYPES").ok();
    let types = [
        GgmlType::Q4K,
        GgmlType::Q6K,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q5K,
        GgmlType::Q3K,
        GgmlType::Q2K,
    ];
    let wanted = |ty: GgmlType| {
        only.as_deref().is_none_or(|list| {
            list.split(',')
                .any(|n| n.trim().eq_ignore_ascii_case(ty.name()))
        })
    };
    for ty in types.into_iter().filter(|&ty| wanted(ty)) {
        // ffn_up/gate (8960 rows of 1536) and ffn_down (1536 rows of 8960), then the L2- and
        // DRAM-size shapes.
        for (rows, cols) in [(8960, 1536), (1536, 8960), (256, 1536), (65536, 2048)] {
            let rows_data = weights(ty, rows, cols, &mut rng);
            let mut il_data = rows_data.clone();
            let interleaved = interleave(ty, &mut il_data, rows, cols).expect("interleave");
            for (layout, data) in [(Layout::Rows, &rows_data), (Layout::Interleaved, &il_data)] {
                if layout == Layout::Interleaved && !interleaved {
                    continue;
                }
                let w = MatRef {
                    ty,
                    data,
                    rows,
                    cols,
                    layout,
                };
                let toks: &[usize] = if rows == 256 || rows == 65536 {
                    &[1, 4]
                } else {
                    &[1, 4, 64, 256]
                };
                for &n_tok in toks {
                    let x: Vec<f32> = (0..n_tok * cols)
                        .map(|_| rng.gen_range(-1.0..1.0))
                        .collect();
                    let mut out = vec![0f32; n_tok * rows];
                    let mut scratch = MatmulScratch::new();
                    g.throughput(if n_tok == 1 {
                        Throughput::Bytes(data.len() as u64)
                    } else {
                        Throughput::Elements((2 * n_tok * rows * cols) as u64)
                    });
                    let id = BenchmarkId::new(
                        format!("{ty}/{rows}x{cols}/{layout:?}"),
                        format!("n_tok={n_tok}"),
                    );
                    g.bench_function(id, |b| {
                        b.iter(|| {
                            matmul(&pool, w, &x, n_tok, &mut out, &mut scratch).expect("matmul")
                        })
                    });
                }
            }
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
