//! Chat templates on the real models' metadata: Qwen's own Jinja template, Gemma's built-in
//! format, and malformed templates failing cleanly.

use std::path::PathBuf;

use strata_engine::chat::{ChatError, ChatMessage, ChatTemplate};
use strata_engine::tokenizer::Tokenizer;
use strata_storage::gguf::GgufFile;

/// The model file, pulled into the store on first use (never skipped: CI must run these).
fn model_file(name: &str) -> Option<PathBuf> {
    Some(strata_tests::model_path(name))
}

fn open(name: &str) -> Option<GgufFile> {
    Some(GgufFile::open(&model_file(name)?).expect("open the GGUF file"))
}

#[test]
fn qwen_jinja_template() {
    let Some(file) = open("qwen2.5-coder-1.5b") else {
        return;
    };
    let t = ChatTemplate::from_gguf(&file.metadata, "qwen2").expect("load template");
    assert_eq!(t.name(), "jinja");
    assert_eq!(t.bos_prefix(), None);
    let msgs = [
        ChatMessage::new("system", "You are terse."),
        ChatMessage::new("user", "Hi there"),
    ];
    assert_eq!(
        t.render(&msgs, true).expect("render"),
        "<|im_start|>system\nYou are terse.<|im_end|>\n\
         <|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    );
    // Without a system message the template supplies Qwen's default one.
    let user_only = [ChatMessage::new("user", "Hi")];
    assert_eq!(
        t.render(&user_only, false).expect("render"),
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful \
         assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
    // The rendered prompt's markers tokenize to single special tokens.
    let tok = Tokenizer::from_gguf(&file.metadata).expect("tokenizer");
    let ids = tok.encode(&t.render(&user_only, true).expect("render"), true, true);
    assert_eq!(ids.first().copied(), tok.token_id("<|im_start|>"));
}

#[test]
fn gemma_builtin_template() {
    let Some(file) = open("gemma3-270m") else {
        return;
    };
    let t = ChatTemplate::from_gguf(&file.metadata, "gemma3").expect("load template");
    assert_eq!(t.name(), "gemma");
    assert_eq!(t.bos_prefix(), Some("<bos>"));
    let msgs = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hello"),
        ChatMessage::new("assistant", "Hi!"),
        ChatMessage::new("user", "Why?"),
    ];
    assert_eq!(
        t.render(&msgs, true).expect("render"),
        "<start_of_turn>user\nBe brief.\n\nHello<end_of_turn>\n\
         <start_of_turn>model\nHi!<end_of_turn>\n\
         <start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n"
    );
    let tok = Tokenizer::from_gguf(&file.metadata).expect("tokenizer");
    let ids = tok.encode(&t.render(&msgs[1..2], true).expect("render"), true, true);
    assert_eq!(ids, [2, 105, 2364, 107, 9259, 106, 107, 105, 4368, 107]);
}

#[test]
fn builtin_chatml() {
    let t = ChatTemplate::builtin("chatml").expect("known");
    let msgs = [ChatMessage::new("user", "hi")];
    assert_eq!(
        t.render(&msgs, true).expect("render"),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert!(ChatTemplate::builtin("no-such-format").is_none());
}

#[test]
fn malformed_templates_are_errors() {
    for src in [
        "{% for m in messages %}",
        "{{ messages[0].content ",
        "{% endif %}",
        "{{ 1 + }}",
    ] {
        match ChatTemplate::from_jinja(src, None, None) {
            Err(ChatError::Compile { .. }) => {}
            Err(e) => panic!("{src:?}: unexpected error {e}"),
            Ok(_) => panic!("{src:?} compiled"),
        }
    }
    // Compiles, but fails at render time: still an error, not a panic.
    let t = ChatTemplate::from_jinja(
        "{{ messages[0].content.upper() }}{{ raise_exception('no') }}",
        None,
        None,
    )
    .expect("compiles");
    let err = t.render(&[], true).expect_err("render fails");
    assert!(matches!(err, ChatError::Render { .. }), "{err}");
    let err = t
        .render(&[ChatMessage::new("user", "x")], true)
        .expect_err("raises");
    assert!(err.to_string().contains("no"), "{err}");
}
