//! `matmul_shared` (several matrices over the same activations in one pass of the pool) gives
//! exactly the bits of one `matmul` per matrix: every type, both layouts, mixed types, rows
//! that end in a partial tile, 1–4 tokens, 1–3 threads.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use strata_simd::matmul::{
    Layout, MatRef, MatmulScratch, SimdError, interleave, matmul, matmul_shared,
};
use strata_simd::pool::ThreadPool;
use strata_storage::quant::{GgmlType, quantize_row};

fn weights(
    rng: &mut StdRng,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    il: bool,
) -> (Vec<u8>, Layout) {
    let rb = ty.row_bytes(cols);
    let mut data = vec![0u8; rows * rb];
    for row in data.chunks_exact_mut(rb) {
        let src: Vec<f32> = (0..cols).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        quantize_row(ty, &src, row).expect("quantize_row");
    }
    let layout = if il && interleave(ty, &mut data, rows, cols).expect("interleave") {
        Layout::Interleaved
    } else {
        Layout::Rows
    };
    (data, layout)
}

/// Groups of matrices (type, rows) that share one input; the activation formats of the last
/// group differ, so it runs one matrix at a time and must still agree.
const GROUPS: &[&[(GgmlType, usize)]] = &[
    &[
        (GgmlType::Q4K, 64),
        (GgmlType::Q4K, 40),
        (GgmlType::Q6K, 48),
    ],
    &[(GgmlType::Q6K, 32), (GgmlType::Q4K, 272)],
    &[
        (GgmlType::Q8_0, 48),
        (GgmlType::Q5_0, 33),
        (GgmlType::Q4_0, 16),
    ],
    &[(GgmlType::Q5_1, 20), (GgmlType::Q4_1, 48)],
    &[
        (GgmlType::Q5K, 40),
        (GgmlType::Q3K, 16),
        (GgmlType::Q2K, 32),
        (GgmlType::Q4K, 16),
    ],
    &[(GgmlType::F32, 24), (GgmlType::F16, 16)],
    &[(GgmlType::Q4K, 32), (GgmlType::Q8_0, 48)],
];

#[test]
fn shared_pass_equals_one_matmul_per_matrix_exactly() {
    let mut rng = StdRng::seed_from_u64(11);
    let cols = 512;
    for threads in 1..=3 {
        let pool = ThreadPool::new(threads);
        for group in GROUPS {
            for il in [false, true] {
                let mats: Vec<(GgmlType, usize, Vec<u8>, Layout)> = group
                    .iter()
                    .map(|&(ty, rows)| {
                        let (d, l) = weights(&mut rng, ty, rows, cols, il);
                        (ty, rows, d, l)
                    })
                    .collect();
                let ws: Vec<MatRef<'_>> = mats
                    .iter()
                    .map(|(ty, rows, d, l)| MatRef {
                        ty: *ty,
                        data: d,
                        rows: *rows,
                        cols,
                        layout: *l,
                    })
                    .collect();
                for n_tok in 1..=5 {
                    let x: Vec<f32> = (0..n_tok * cols)
                        .map(|_| rng.gen_range(-2.0..2.0))
                        .collect();
                    let mut sc = MatmulScratch::new();
                    let want: Vec<Vec<f32>> = ws
                        .iter()
                        .map(|w| {
                            let mut o = vec![0.0; n_tok * w.rows];
                            matmul(&pool, *w, &x, n_tok, &mut o, &mut sc).expect("matmul");
                            o
                        })
                        .collect();
                    let mut got: Vec<Vec<f32>> =
                        ws.iter().map(|w| vec![f32::NAN; n_tok * w.rows]).collect();
                    let mut outs: Vec<&mut [f32]> = got.iter_mut().map(|o| &mut o[..]).collect();
                    matmul_shared(&pool, &ws, &x, n_tok, &mut outs, &mut sc).expect("shared");
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        let same = g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(
                            same,
                            "{threads} threads, {:?} {:?}, {n_tok} tokens: matrix {i} differs",
                            group[i], ws[i].layout
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn shared_pass_refuses_bad_shapes() {
    let pool = ThreadPool::new(2);
    let mut rng = StdRng::seed_from_u64(3);
    let (d, layout) = weights(&mut rng, GgmlType::Q4K, 32, 256, true);
    let w = MatRef {
        ty: GgmlType::Q4K,
        data: &d,
        rows: 32,
        cols: 256,
        layout,
    };
    let x = vec![0.5f32; 256];
    let mut sc = MatmulScratch::new();
    let (mut a, mut b) = (vec![0.0; 32], vec![0.0; 31]);
    // One output too few.
    let err = matmul_shared(&pool, &[w, w], &x, 1, &mut [&mut a[..]], &mut sc);
    assert!(matches!(err, Err(SimdError::Shape { .. })), "{err:?}");
    // An output of the wrong length.
    let err = matmul_shared(
        &pool,
        &[w, w],
        &x,
        1,
        &mut [&mut a[..], &mut b[..]],
        &mut sc,
    );
    assert!(matches!(err, Err(SimdError::Shape { .. })), "{err:?}");
    // Activations that do not match the columns.
    let mut c = [0.0; 32];
    let err = matmul_shared(
        &pool,
        &[w, w],
        &x[..128],
        1,
        &mut [&mut a[..], &mut c[..]],
        &mut sc,
    );
    assert!(matches!(err, Err(SimdError::Shape { .. })), "{err:?}");
}
