//! Greedy decoding matches llama.cpp's on both real models: the same prompt tokens, and the
//! same 32 generated tokens up to the first near tie (where a different but correct engine may
//! take the other branch).
//!
//! A near tie is a step where the top two logits are within [`TIE`] of each other in
//! llama.cpp's run (the reference lists them) or in ours. Ours count too because the logits of
//! a correct engine move by that much with rounding alone: on qwen2.5-coder-1.5b, kernels that
//! agree to 1e-7 relative per matrix product (AVX2, AVX-512, the interleaved layout) give
//! logits up to 0.1 apart, since the 8-bit activation quantization before every product turns
//! a last-bit difference into a one-step change of a quantized value now and then, and 28
//! layers carry it on. At our own near tie llama.cpp's token must still be one of our top two.

use std::sync::Arc;

use strata_engine::sampler::argmax;
use strata_engine::{Logits, Model};
use strata_simd::pool::ThreadPool;
use strata_tests::{GEMMA, QWEN, ids, model_path, reference};

/// Top-two logits closer than this make a near tie.
const TIE: f32 = 0.1;

struct TopTwo {
    first: usize,
    second: usize,
    margin: f32,
}

fn top_two(logits: &[f32]) -> Option<TopTwo> {
    let first = argmax(logits) as usize;
    let second = (0..logits.len())
        .filter(|&i| i != first)
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))?;
    Some(TopTwo {
        first,
        second,
        margin: logits[first] - logits[second],
    })
}

fn check_model(name: &str) {
    let model = Model::load(&model_path(name)).expect("load model");
    let pool = Arc::new(ThreadPool::new(2));
    let refs = reference();
    let cases = refs["models"][name]["greedy"]
        .as_array()
        .expect("greedy cases");
    assert!(!cases.is_empty());
    for case in cases {
        let prompt = case["prompt"].as_str().expect("prompt");
        let want_prompt = ids(&case["prompt_tokens"]);
        let want = ids(&case["generated_tokens"]);
        let ties: Vec<usize> = case["near_ties_steps"]
            .as_array()
            .expect("near ties")
            .iter()
            .map(|v| v.as_u64().expect("step") as usize)
            .collect();
        let must_match = ties.iter().copied().min().unwrap_or(want.len());

        let tokens = model.tokenizer.encode(prompt, true, true);
        assert_eq!(tokens, want_prompt, "{name}: prompt tokens of {prompt:?}");

        let mut ctx = model.new_context(256, pool.clone());
        let logits = model
            .forward(&mut ctx, &tokens, Logits::Last)
            .expect("prefill");
        // The first step's best logit is llama.cpp's to within rounding noise. Measured: qwen2
        // within 0.1; gemma3 up to 0.8, because its activations are large and llama.cpp's CPU
        // path rounds them through f16 (the GELU table, flash-attention's f16 accumulator)
        // where strata keeps f32. Perplexity agrees to 0.2% (perplexity_reference.rs).
        let top = &case["first_step_top5"][0];
        let top_id = top["id"].as_u64().expect("id") as usize;
        let top_logit = top["logit"].as_f64().expect("logit") as f32;
        assert!(
            (logits[top_id] - top_logit).abs() < 1.0,
            "{name} {prompt:?}: logit of token {top_id} is {} vs llama.cpp's {top_logit}",
            logits[top_id]
        );
        let mut got = vec![argmax(logits)];
        let mut our_tie = top_two(logits).filter(|t| t.margin < TIE).map(|t| (0, t));
        while got.len() < want.len() {
            let last = *got.last().expect("a token");
            let logits = model
                .forward(&mut ctx, &[last], Logits::Last)
                .expect("decode");
            got.push(argmax(logits));
            if our_tie.is_none() {
                let step = got.len() - 1;
                our_tie = top_two(logits)
                    .filter(|t| t.margin < TIE)
                    .map(|t| (step, t));
            }
        }
        let must_match = match our_tie {
            Some((step, t)) if step < must_match => {
                let w = want[step] as usize;
                assert!(
                    got[..step] != want[..step] || w == t.first || w == t.second,
                    "{name} {prompt:?}: at our near tie (step {step}, margin {:.3}) llama.cpp's \
                     token {w} is not one of our top two ({}, {})",
                    t.margin,
                    t.first,
                    t.second
                );
                step
            }
            _ => must_match,
        };
        assert_eq!(
            got[..must_match],
            want[..must_match],
            "{name} {prompt:?}: greedy tokens differ before the first near tie (step {must_match})"
        );
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        eprintln!(
            "{name} {prompt:?}: {same}/{} tokens equal (first near tie at {must_match})",
            want.len()
        );
    }
}

#[test]
fn gemma3_greedy_matches_llama_cpp() {
    check_model(GEMMA);
}

#[test]
fn qwen2_greedy_matches_llama_cpp() {
    check_model(QWEN);
}
