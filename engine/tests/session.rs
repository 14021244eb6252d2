//! A saved session resumes exactly: the logits after loading it equal those of the context it
//! was saved from; sessions of another model, truncated files and files that do not fit are
//! refused, and the context is left as it was.

use std::sync::Arc;

use strata_engine::model::Arch;
use strata_engine::synth::{GenSpec, Vocab, to_bytes};
use strata_engine::{Logits, Model};
use strata_simd::pool::ThreadPool;

fn model(dir: &std::path::Path, seed: u64) -> Model {
    let mut spec = GenSpec::tiny(Arch::Qwen2);
    spec.seed = seed;
    let path = dir.join(format!("m{seed}.gguf"));
    std::fs::write(&path, to_bytes(&spec, Vocab::Bytes).expect("generate")).expect("write");
    Model::load(&path).expect("load")
}

const PROMPT: [u32; 12] = [5, 77, 130, 9, 201, 44, 18, 250, 3, 66, 90, 12];

#[test]
fn resumed_session_gives_the_same_logits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = model(dir.path(), 1);
    let pool = Arc::new(ThreadPool::new(2));
    let mut a = m.new_context(64, pool.clone());
    m.forward(&mut a, &PROMPT, Logits::Last).expect("prefill");
    let path = dir.path().join("s.kv");
    let bytes = m.save_session(&a, &PROMPT, &path).expect("save");
    assert!(bytes > 0);

    let mut b = m.new_context(64, pool.clone());
    let tokens = m.load_session(&mut b, &path).expect("load");
    assert_eq!(tokens, PROMPT);
    assert_eq!(b.n_past(), PROMPT.len());
    for tok in [7u32, 100, 42] {
        let la = m.forward(&mut a, &[tok], Logits::Last).expect("a").to_vec();
        let lb = m.forward(&mut b, &[tok], Logits::Last).expect("b").to_vec();
        assert_eq!(la, lb);
    }
}

#[test]
fn foreign_truncated_and_oversized_sessions_are_refused_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m1 = model(dir.path(), 1);
    let m2 = model(dir.path(), 2);
    let pool = Arc::new(ThreadPool::new(2));
    let mut a = m1.new_context(64, pool.clone());
    m1.forward(&mut a, &PROMPT, Logits::Last).expect("prefill");
    let path = dir.path().join("s.kv");
    m1.save_session(&a, &PROMPT, &path).expect("save");

    let mut other = m2.new_context(64, pool.clone());
    m2.forward(&mut other, &[1, 2, 3], Logits::Last)
        .expect("prefill");
    let err = m2
        .load_session(&mut other, &path)
        .expect_err("another model's session");
    assert!(err.to_string().contains("different model"), "{err}");
    assert_eq!(other.n_past(), 3);

    let mut small = m1.new_context(8, pool.clone());
    let err = m1.load_session(&mut small, &path).expect_err("too long");
    assert!(err.to_string().contains("do not fit"), "{err}");
    assert_eq!(small.n_past(), 0);

    let full = std::fs::read(&path).expect("read");
    let cut = dir.path().join("cut.kv");
    std::fs::write(&cut, &full[..full.len() / 2]).expect("write");
    let mut c = m1.new_context(64, pool);
    m1.forward(&mut c, &[9], Logits::Last).expect("one token");
    let err = m1.load_session(&mut c, &cut).expect_err("truncated");
    assert!(err.to_string().contains("truncated"), "{err}");
    assert_eq!(c.n_past(), 1);
    // A token count that does not match the context is refused before writing.
    assert!(
        m1.save_session(&c, &PROMPT, &dir.path().join("x.kv"))
            .is_err()
    );
}
