//! The generated mixture-of-experts models of every MoE architecture read the same way in
//! strata and llama.cpp: perplexity on the same text within 1% of the number llama.cpp gave
//! for the same deterministic file (`tests/reference/moe-perplexity.json`).

use std::sync::Arc;

use strata_engine::Model;
use strata_engine::model::Arch;
use strata_engine::perplexity::perplexity;
use strata_engine::synth::{GenSpec, Vocab, to_bytes};
use strata_simd::pool::ThreadPool;
use strata_tests::PERPLEXITY_FILE;

fn check(name: &str, spec: GenSpec) {
    let refs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/reference/moe-perplexity.json"
        ))
        .expect("reference file"),
    )
    .expect("json");
    let want = refs[name].as_f64().expect("reference ppl");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(format!("{name}.gguf"));
    std::fs::write(&path, to_bytes(&spec, Vocab::Bytes).expect("generate")).expect("write");
    let model = Model::load(&path).expect("load");
    let bytes = std::fs::read(PERPLEXITY_FILE).expect("the GPL-3 text (Debian base-files)");
    let text = String::from_utf8_lossy(&bytes[..6000]);
    let tokens = model.tokenizer.encode(&text, true, false);
    let mut ctx = model.new_context(128, Arc::new(ThreadPool::new(2)));
    let r = perplexity(&model, &mut ctx, &tokens, 128, |_, _| {}).expect("perplexity");
    let rel = (r.ppl - want).abs() / want;
    eprintln!(
        "{name}: PPL {:.4} vs llama.cpp {want} ({:.3}%)",
        r.ppl,
        rel * 100.0
    );
    assert!(
        rel < 0.01,
        "{name}: PPL {:.4} is {:.2}% from llama.cpp's {want}",
        r.ppl,
        rel * 100.0
    );
}

#[test]
fn moe_perplexity_within_1pct_of_llama_cpp() {
    check("qwen3moe", GenSpec::tiny(Arch::Qwen3Moe));
    check("qwen2moe", GenSpec::tiny(Arch::Qwen2Moe));
    check("mixtral", GenSpec::moe(Arch::Llama, false));
    check("olmoe", GenSpec::tiny(Arch::Olmoe));
}
