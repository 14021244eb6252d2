//! Perplexity on the same text and settings as llama-perplexity (`-c 512`) lands within 1% of
//! llama.cpp's number on both real models.

use std::sync::Arc;

use strata_engine::Model;
use strata_engine::perplexity::perplexity;
use strata_simd::pool::ThreadPool;
use strata_tests::{GEMMA, PERPLEXITY_FILE, QWEN, model_path, reference};

fn check(name: &str) {
    let refs = reference();
    let want = refs["perplexity"][name]["ppl"]
        .as_f64()
        .expect("reference ppl");
    let want_chunks = refs["perplexity"][name]["chunks"].as_u64().expect("chunks") as usize;
    let text =
        std::fs::read_to_string(PERPLEXITY_FILE).expect("the GPL-3 text (Debian base-files)");
    let model = Model::load(&model_path(name)).expect("load model");
    let tokens = model.tokenizer.encode(&text, true, false);
    let mut ctx = model.new_context(512, Arc::new(ThreadPool::new(2)));
    let r = perplexity(&model, &mut ctx, &tokens, 512, |_, _| {}).expect("perplexity");
    eprintln!(
        "{name}: PPL = {:.4} +/- {:.5} (llama.cpp {want})",
        r.ppl, r.ppl_err
    );
    assert_eq!(r.chunks, want_chunks, "{name}: chunk count");
    let rel = (r.ppl - want).abs() / want;
    assert!(
        rel < 0.01,
        "{name}: PPL {:.4} is {:.2}% from llama.cpp's {want}",
        r.ppl,
        rel * 100.0
    );
}

#[test]
fn gemma3_perplexity_within_1pct_of_llama_cpp() {
    check(GEMMA);
}

#[test]
fn qwen2_perplexity_within_1pct_of_llama_cpp() {
    check(QWEN);
}
