//! Unit tests on tiny in-memory vocabularies; the real-model comparisons with llama.cpp live in
//! `tests/tests/tokenizer_reference.rs`.

use super::*;

fn spm() -> Tokenizer {
    // ids: 0 <unk>, 1 <s>, 2 </s>, 3..=258 bytes, then pieces.
    let mut tokens = vec!["<unk>".to_owned(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let pieces = [
        ("▁", -1.0),
        ("h", -2.0),
        ("e", -2.0),
        ("l", -2.0),
        ("o", -2.0),
        ("he", -1.5),
        ("ll", -1.2),
        ("hell", -1.0),
        ("hello", -0.5),
        ("▁hello", -0.1),
        ("<tag>", 0.0),
    ];
    let mut scores = vec![0.0; tokens.len()];
    for (p, s) in pieces {
        tokens.push(p.into());
        types.push(if p == "<tag>" { 4 } else { 1 });
        scores.push(s);
    }
    Tokenizer::from_vocab(VocabData {
        model: "llama".into(),
        tokens,
        scores: Some(scores),
        token_types: Some(types),
        bos: Some(1),
        eos: Some(2),
        unk: Some(0),
        add_space_prefix: Some(true),
        ..VocabData::default()
    })
    .expect("valid vocab")
}

#[test]
fn spm_merges_by_score_and_falls_back_to_bytes() {
    let t = spm();
    let hello = t.token_id("▁hello").expect("token");
    assert_eq!(t.encode("hello", true, true), vec![1, hello]);
    // "é" is not in the vocabulary: two byte tokens.
    assert_eq!(
        t.encode("é", false, false),
        vec![t.token_id("▁").unwrap_or(0), 3 + 0xC3, 3 + 0xA9]
    );
    assert_eq!(
        t.decode(&t.encode("hello é", false, false), false),
        " hello é"
    );
    // Control text is only parsed on request; user-defined always is.
    let tag = t.token_id("<tag>").expect("tag");
    assert!(t.encode("<s>", false, true) == vec![1]);
    assert!(t.encode("<s>", false, false).len() > 1);
    assert_eq!(t.encode("<tag>", false, false), vec![tag]);
    assert_eq!(t.token_to_piece(1, false), b"");
    assert_eq!(t.token_to_piece(1, true), b"<s>");
    assert!(t.is_eog(2));
}

fn bpe() -> Tokenizer {
    let tokens: Vec<String> = ["a", "b", "c", "Ġ", "ab", "abc", "Ġa", "<|end|>", "1", "2"]
        .into_iter()
        .map(String::from)
        .collect();
    let mut types = vec![1; tokens.len()];
    types[7] = 3;
    Tokenizer::from_vocab(VocabData {
        model: "gpt2".into(),
        pre: Some("qwen2".into()),
        tokens,
        token_types: Some(types),
        merges: Some(vec!["a b".into(), "ab c".into(), "Ġ a".into()]),
        eos: Some(7),
        ..VocabData::default()
    })
    .expect("valid vocab")
}

#[test]
fn bpe_merges_by_rank() {
    let t = bpe();
    // "a b" outranks "Ġ a", so the space stays alone.
    assert_eq!(t.encode("abc abc", true, true), vec![5, 3, 5]);
    assert_eq!(t.encode(" ab", true, true), vec![3, 4]);
    assert_eq!(t.encode(" ac", true, true), vec![6, 2]);
    assert_eq!(t.encode("ab<|end|>", true, true), vec![4, 7]);
    assert_eq!(t.decode(&[5, 6, 1, 2], false), "abc abc");
    assert!(t.is_eog(7));
    assert!(!t.add_bos());
}

#[test]
fn bad_vocab_is_an_error() {
    let err = Tokenizer::from_vocab(VocabData {
        model: "wordpiece-9000".into(),
        tokens: vec!["a".into()],
        ..VocabData::default()
    });
    assert!(matches!(err, Err(TokenizerError::UnknownModel { .. })));
    let err = Tokenizer::from_vocab(VocabData {
        model: "gpt2".into(),
        tokens: vec!["a".into()],
        merges: Some(vec!["nospace".into()]),
        ..VocabData::default()
    });
    assert!(matches!(err, Err(TokenizerError::BadMerge { .. })));
    let err = Tokenizer::from_vocab(VocabData {
        model: "llama".into(),
        tokens: vec!["a".into()],
        bos: Some(5),
        ..VocabData::default()
    });
    assert!(matches!(err, Err(TokenizerError::TokenIdOutOfRange { .. })));
    assert!(matches!(
        Tokenizer::from_vocab(VocabData::default()),
        Err(TokenizerError::EmptyVocab)
    ));
}

#[test]
fn arbitrary_input_never_panics() {
    let (s, b) = (spm(), bpe());
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for len in 0..200 {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let text = String::from_utf8_lossy(&bytes);
        for t in [&s, &b] {
            let ids = t.encode(&text, true, true);
            let _ = t.decode(&ids, true);
        }
    }
    assert_eq!(s.encode("", true, true), vec![1]);
    assert!(b.encode("", true, true).is_empty());
    assert!(s.token_to_piece(u32::MAX, true).is_empty());
}

#[test]
fn shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<StreamDecoder>();
    assert_send_sync::<crate::chat::ChatTemplate>();
}
