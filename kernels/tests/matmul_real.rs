//! The matmul family on real tensors of both real models (a slice of rows each: the simulator is
//! slow), against the CPU reference: Qwen2.5-Coder-1.5B's Q4_K attention and Q6_K FFN-down and
//! V weights, Gemma-3-270M's Q5_0, Q8_0 and Q4_K weights, both token embeddings gathered by id
//! (Gemma's scaled by √n_embd), and the cuBLAS comparison path. The activations are real too
//! where the shape allows: embedding rows, which is what the first layer multiplies (after a
//! norm that only rescales them). Skipped with a note where a model file is absent.

mod common;
#[path = "matmul/support.rs"]
mod support;

use std::path::Path;

use strata_kernels::Stream;
use strata_kernels::ops::dequant;
use strata_kernels::ops::matmul::{
    At, Weight, matmul, matmul_cublas, matmul_cublas_scratch_bytes, matmul_scratch_bytes,
};
use support::*;

/// `n` activation rows of `cols`: embedding rows `first..` of `model` where its width is
/// `cols`, random values otherwise.
fn activations(model: &Path, cols: usize, n: usize, seed: u64) -> Vec<f32> {
    let (ty, ecols, data) = tensor_rows(model, "token_embd.weight", 1000, n);
    if ecols == cols {
        dequant(ty, &data, n, cols)
    } else {
        random_f32(&mut rng(seed), n * cols)
    }
}

/// `rows` rows of tensor `name` from row `first` through `matmul` for 1, 5 (decode) and 24
/// (prefill) tokens, against the dequantized rows times the q8_1 values ([`tight_bound`]) and
/// times the f32 activations (the
/// activation quantization's error, 3e-4 as in tests/matmul.rs).
fn check_tensor(s: &Stream, model: &Path, name: &str, first: usize, rows: usize) {
    let (ty, cols, data) = tensor_rows(model, name, first, rows);
    let wf = dequant(ty, &data, rows, cols);
    let (_wb, w) = put_weight(s, ty, &data, rows, cols);
    let x = activations(model, cols, 24, 31);
    let xb = put(s, &x);
    for n in [1, 5, 24] {
        let y = scratch(s, n * rows * 4);
        let sc = scratch(s, matmul_scratch_bytes(ty, cols, n));
        matmul(s, &w, At::from(&xb), n, At::from(&y), At::from(&sc)).unwrap();
        let got: Vec<f32> = get(s, &y, 0, n * rows);
        let decode = n <= 8;
        let xq = q8_values(&x[..n * cols], decode);
        let (want, scale) = reference(&wf, &xq, rows, cols, n);
        let tight = error(&got, &want, scale);
        assert!(
            tight < tight_bound(ty, decode),
            "{name} ({ty}) n={n}: {tight:e} against the q8_1 values"
        );
        let (want, scale) = reference(&wf, &x[..n * cols], rows, cols, n);
        let loose = error(&got, &want, scale);
        assert!(
            loose < 3e-4,
            "{name} ({ty}) n={n}: {loose:e} against f32 activations"
        );
        eprintln!("{name} ({ty}, {rows}x{cols}) n={n}: {tight:.2e} / {loose:.2e}");
    }
}

/// Embedding rows `first..first + 8` as a table, gathered by ids into it, times `scale`,
/// against the CPU's dequantized rows times `scale` (exact: one rounding each side).
fn check_embedding(s: &Stream, model: &Path, first: usize, scale: f32) {
    let (ty, cols, data) = tensor_rows(model, "token_embd.weight", first, 8);
    let wf = dequant(ty, &data, 8, cols);
    let (_wb, table) = put_weight(s, ty, &data, 8, cols);
    let ids = [3i32, 0, 7, 3, 5];
    let idb = put(s, &ids);
    let y = scratch(s, ids.len() * cols * 4);
    dequant::get_rows(s, &table, At::from(&idb), ids.len(), At::from(&y), scale).unwrap();
    let got: Vec<f32> = get(s, &y, 0, ids.len() * cols);
    for (k, &id) in ids.iter().enumerate() {
        for c in 0..cols {
            let want = wf[id as usize * cols + c] * scale;
            assert!(
                got[k * cols + c] == want,
                "{ty} embedding row {} col {c}: {} vs {want}",
                first + id as usize,
                got[k * cols + c]
            );
        }
    }
}

#[test]
fn qwen_weights_and_embeddings() {
    let Some(model) = model("qwen2.5-coder-1.5b") else {
        return;
    };
    for dev in common::devices() {
        let s = dev.stream().unwrap();
        check_tensor(&s, &model, "blk.0.attn_q.weight", 0, 64); // Q4_K 1536 → 1536
        check_tensor(&s, &model, "blk.0.attn_q.weight", 700, 37);
        check_tensor(&s, &model, "blk.0.ffn_down.weight", 100, 40); // Q6_K 8960 → 1536
        check_tensor(&s, &model, "blk.0.attn_v.weight", 0, 48); // Q6_K 1536 → 256
        check_embedding(&s, &model, 151_640, 1.0); // Q4_K, the special tokens' rows
    }
}

#[test]
fn gemma_weights_and_embeddings() {
    let Some(model) = model("gemma3-270m") else {
        return;
    };
    for dev in common::devices() {
        let s = dev.stream().unwrap();
        check_tensor(&s, &model, "blk.0.attn_q.weight", 0, 70); // Q5_0 640 → 1024
        check_tensor(&s, &model, "blk.0.attn_v.weight", 0, 33); // Q8_0 640 → 256
        check_tensor(&s, &model, "blk.0.attn_output.weight", 0, 40); // Q4_K 1024 → 640
        check_tensor(&s, &model, "blk.0.ffn_down.weight", 0, 24); // Q6_K 2048 → 640
        // Q8_0 embeddings times √640, as Gemma scales them.
        check_embedding(&s, &model, 2000, (640f32).sqrt());
    }
}

#[test]
fn cublas_path_on_a_real_tensor() {
    let Some(model) = model("qwen2.5-coder-1.5b") else {
        return;
    };
    for dev in common::devices() {
        let s = dev.stream().unwrap();
        let (ty, cols, data) = tensor_rows(&model, "blk.0.attn_q.weight", 0, 32);
        let rows = 32;
        let wf = dequant(ty, &data, rows, cols);
        let (_wb, w): (_, Weight) = put_weight(&s, ty, &data, rows, cols);
        let n = 10;
        let x = activations(&model, cols, n, 32);
        let xb = put(&s, &x);
        let y = scratch(&s, n * rows * 4);
        let sc = scratch(&s, matmul_cublas_scratch_bytes(rows, cols, n));
        matmul_cublas(&s, &w, At::from(&xb), n, At::from(&y), At::from(&sc)).unwrap();
        let got: Vec<f32> = get(&s, &y, 0, n * rows);
        // Both operands rounded to f16 (2⁻¹¹ relative each), exact products, f32 sums.
        let (want, scale) = reference(&wf, &x, rows, cols, n);
        let e = error(&got, &want, scale);
        assert!(e < 2e-6, "{ty}: {e:e}");
        eprintln!("cuBLAS path, attn_q ({ty}) 32x{cols} n={n}: {e:.2e}");
    }
}
