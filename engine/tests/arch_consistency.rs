//! Every architecture, on a generated model: the forward pass is consistent with itself —
//! one batched prefill gives the same logits as token-by-token decoding (KV cache, RoPE
//! positions, causal and sliding-window masks), as prefill split into small ubatches, and as a
//! single-threaded run.

use std::sync::Arc;

use strata_engine::model::Arch;
use strata_engine::synth::{GenSpec, Vocab, to_bytes};
use strata_engine::{Logits, Model};
use strata_simd::pool::ThreadPool;
use strata_storage::quant::GgmlType;

fn load(spec: &GenSpec) -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.gguf");
    let bytes = to_bytes(spec, Vocab::Bytes).expect("generate");
    std::fs::write(&path, bytes).expect("write");
    let model = Model::load(&path).expect("load generated model");
    (dir, model)
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = a.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

/// How far batched and one-token results may drift apart. Batches of 8 or more tokens go
/// through the tiled GEMM, which sums each exact integer block product in another f32 order
/// than the single-token dot products (as llama.cpp's repacked GEMMs do): about 1e-7 relative
/// per matmul, but where an activation sits on a rounding boundary of the next layer's 8-bit
/// quantization it moves one step, which shows in the logits as a jump of a few 1e-3 (seen:
/// 4.0e-3 on the Q5_0 gemma3 model). A wrong mask, position or cache row is O(1).
const BATCH_TOLERANCE: f32 = 1e-2;

fn check(arch: Arch, ty: GgmlType) {
    let mut spec = GenSpec::tiny(arch);
    spec.weight_type = ty;
    let (_dir, model) = load(&spec);
    let n_vocab = model.config.n_vocab;
    let tokens: Vec<u32> = (0..14u32).map(|i| 3 + (i * 37 + 11) % 256).collect();
    let two = Arc::new(ThreadPool::new(2));

    let mut ctx = model.new_context(64, two.clone());
    let all = model
        .forward(&mut ctx, &tokens, Logits::All)
        .expect("prefill")
        .to_vec();
    assert_eq!(all.len(), tokens.len() * n_vocab);
    assert!(
        all.iter().all(|v| v.is_finite()),
        "{arch:?}: non-finite logits"
    );
    let spread = all.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(spread > 1e-3, "{arch:?}: logits are all ~0");

    let mut step = model.new_context(64, two.clone());
    for (t, &tok) in tokens.iter().enumerate() {
        let l = model
            .forward(&mut step, &[tok], Logits::Last)
            .expect("decode");
        let d = max_rel_diff(&all[t * n_vocab..(t + 1) * n_vocab], l);
        assert!(
            d < BATCH_TOLERANCE,
            "{arch:?} {ty}: token {t}: batched vs incremental differ by {d}"
        );
    }

    let mut split = model.new_context(64, two);
    split.set_n_ubatch(5);
    let s = model
        .forward(&mut split, &tokens, Logits::All)
        .expect("split prefill");
    let d = max_rel_diff(&all, s);
    assert!(d < BATCH_TOLERANCE, "{arch:?}: ubatch split differs by {d}");

    let mut one = model.new_context(64, Arc::new(ThreadPool::new(1)));
    let o = model
        .forward(&mut one, &tokens, Logits::Range(3..9))
        .expect("1 thread");
    let d = max_rel_diff(&all[3 * n_vocab..9 * n_vocab], o);
    assert!(d < 2e-3, "{arch:?}: 1 vs 2 threads differ by {d}");

    // Truncating the cache and re-feeding reproduces the same continuation.
    ctx.truncate(7).unwrap();
    let again = model
        .forward(&mut ctx, &tokens[7..], Logits::All)
        .expect("refill");
    let d = max_rel_diff(&all[7 * n_vocab..], again);
    assert!(
        d < BATCH_TOLERANCE,
        "{arch:?}: truncate + refill differs by {d}"
    );
}

#[test]
fn llama_is_self_consistent() {
    check(Arch::Llama, GgmlType::Q8_0);
    check(Arch::Llama, GgmlType::Q4K);
}

#[test]
fn qwen2_is_self_consistent() {
    check(Arch::Qwen2, GgmlType::Q4_0);
}

#[test]
fn qwen3_is_self_consistent() {
    check(Arch::Qwen3, GgmlType::Q6K);
}

#[test]
fn gemma3_is_self_consistent_with_sliding_window() {
    check(Arch::Gemma3, GgmlType::Q5_0);
    check(Arch::Gemma3, GgmlType::F16);
}

#[test]
fn moe_architectures_are_self_consistent() {
    // Routing is per token, so batched prefill must pick the same experts as decoding.
    check(Arch::Qwen3Moe, GgmlType::Q8_0);
    check(Arch::Qwen2Moe, GgmlType::Q4_0);
    check(Arch::Olmoe, GgmlType::Q8_0);
}

#[test]
fn context_overflow_and_bad_tokens_are_errors() {
    let (_dir, model) = load(&GenSpec::tiny(Arch::Llama));
    let mut ctx = model.new_context(8, Arc::new(ThreadPool::new(1)));
    let err = model.forward(&mut ctx, &[1; 9], Logits::Last).unwrap_err();
    assert!(err.to_string().contains("context is full"), "{err}");
    let err = model
        .forward(&mut ctx, &[100_000], Logits::Last)
        .unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
    let err = model.forward(&mut ctx, &[], Logits::Last).unwrap_err();
    assert!(err.to_string().contains("no tokens"), "{err}");
    // The context is untouched by the failures.
    assert_eq!(ctx.n_past(), 0);
    model
        .forward(&mut ctx, &[1, 5, 9], Logits::Last)
        .expect("still usable");
}

/// Continuous batching: one `decode_batch` step over three sequences of different lengths
/// gives each the logits it would get decoding alone.
fn check_decode_batch(arch: Arch) {
    let (_dir, model) = load(&GenSpec::tiny(arch));
    let n_vocab = model.config.n_vocab;
    let pool = Arc::new(ThreadPool::new(2));
    let prompts: [&[u32]; 3] = [&[5, 9, 200, 17], &[3], &[40, 41, 42, 43, 44, 45, 46, 47]];
    let next = [7u32, 250, 99];
    let mut alone = Vec::new();
    for (p, &t) in prompts.iter().zip(&next) {
        let mut ctx = model.new_context(32, pool.clone());
        model.forward(&mut ctx, p, Logits::None).expect("prefill");
        alone.push(
            model
                .forward(&mut ctx, &[t], Logits::Last)
                .expect("decode")
                .to_vec(),
        );
    }
    let mut ctxs: Vec<_> = prompts
        .iter()
        .map(|p| {
            let mut ctx = model.new_context(32, pool.clone());
            model.forward(&mut ctx, p, Logits::None).expect("prefill");
            ctx
        })
        .collect();
    let mut refs: Vec<&mut strata_engine::Context> = ctxs.iter_mut().collect();
    let mut scratch = strata_engine::model::Scratch::new();
    let batch = model
        .decode_batch(&pool, &mut refs, &next, &mut scratch)
        .expect("decode_batch")
        .to_vec();
    for (i, want) in alone.iter().enumerate() {
        let d = max_rel_diff(want, &batch[i * n_vocab..(i + 1) * n_vocab]);
        assert!(d < 2e-3, "{arch:?}: sequence {i} differs by {d} in a batch");
    }
    for (ctx, p) in ctxs.iter().zip(&prompts) {
        assert_eq!(ctx.n_past(), p.len() + 1);
    }
    // A mismatched call is an error, not a panic, and changes nothing.
    let mut refs: Vec<&mut strata_engine::Context> = ctxs.iter_mut().collect();
    assert!(
        model
            .decode_batch(&pool, &mut refs, &[1, 2], &mut scratch)
            .is_err()
    );
    assert_eq!(ctxs[1].n_past(), 2);
}

#[test]
fn decode_batch_matches_single_sequences() {
    check_decode_batch(Arch::Llama);
    check_decode_batch(Arch::Gemma3);
    check_decode_batch(Arch::Qwen3Moe);
}
