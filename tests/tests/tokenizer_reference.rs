//! The tokenizer against llama.cpp on the real models: every reference string must encode to
//! exactly llama.cpp's ids, and the greedy runs' generated ids must decode to the text llama.cpp
//! printed for them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use strata_engine::tokenizer::{StreamDecoder, Tokenizer};
use strata_storage::gguf::GgufFile;

const MODELS: [&str; 2] = ["gemma3-270m", "qwen2.5-coder-1.5b"];

fn reference() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("reference/llama-cpp-outputs.json");
    let text = std::fs::read_to_string(&path).expect("read the reference outputs");
    serde_json::from_str(&text).expect("parse the reference outputs")
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| u32::try_from(x.as_u64().expect("an id")).expect("id fits u32"))
        .collect()
}

/// The model file, pulled into the store on first use (never skipped: CI must run these).
fn model_file(name: &str) -> Option<PathBuf> {
    Some(strata_tests::model_path(name))
}

fn load(name: &str) -> Option<Tokenizer> {
    let path = model_file(name)?;
    let file = GgufFile::open(&path).expect("open the GGUF file");
    let start = Instant::now();
    let tok = Tokenizer::from_gguf(&file.metadata).expect("load the tokenizer");
    eprintln!(
        "{name}: tokenizer of {} tokens built in {:?}",
        tok.n_vocab(),
        start.elapsed()
    );
    Some(tok)
}

#[test]
fn encode_matches_llama_cpp() {
    let reference = reference();
    for name in MODELS {
        let Some(tok) = load(name) else { continue };
        let cases = reference["models"][name]["tokenize"]
            .as_array()
            .expect("tokenize cases");
        let mut failures = Vec::new();
        for case in cases {
            let text = case["text"].as_str().expect("text");
            let want = ids(&case["ids"]);
            let got = tok.encode(text, true, true);
            if got != want {
                failures.push(format!("{name} {text:?}\n  want {want:?}\n  got  {got:?}"));
            }
        }
        for g in reference["models"][name]["greedy"]
            .as_array()
            .expect("greedy runs")
        {
            let prompt = g["prompt"].as_str().expect("prompt");
            let want = ids(&g["prompt_tokens"]);
            let got = tok.encode(prompt, true, true);
            if got != want {
                failures.push(format!(
                    "{name} prompt {prompt:?}\n  want {want:?}\n  got  {got:?}"
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}

#[test]
fn decode_matches_llama_cpp_pieces() {
    let reference = reference();
    for name in MODELS {
        let Some(tok) = load(name) else { continue };
        for g in reference["models"][name]["greedy"]
            .as_array()
            .expect("greedy runs")
        {
            let generated = ids(&g["generated_tokens"]);
            let pieces: Vec<&str> = g["generated_pieces"]
                .as_array()
                .expect("pieces")
                .iter()
                .map(|p| p.as_str().expect("piece"))
                .collect();
            assert_eq!(tok.decode(&generated, false), pieces.concat(), "{name}");
            let mut stream = StreamDecoder::new();
            let mut streamed = String::new();
            for (&id, piece) in generated.iter().zip(&pieces) {
                let bytes = tok.token_to_piece(id, false);
                assert_eq!(String::from_utf8_lossy(&bytes), *piece, "{name} token {id}");
                streamed += &stream.push(&bytes);
            }
            streamed += &stream.finish();
            assert_eq!(streamed, pieces.concat());
        }
    }
}

#[test]
fn special_tokens_and_round_trips() {
    for name in MODELS {
        let Some(tok) = load(name) else { continue };
        for text in [
            "",
            "a",
            " ",
            "naïve café 🦀 数字\n\n\t x",
            "<|im_start|><end_of_turn>",
        ] {
            let ids = tok.encode(text, false, true);
            assert_eq!(tok.decode(&ids, true), text, "{name} {text:?}");
        }
        let eos = tok.eos().expect("eos");
        assert!(tok.is_eog(eos));
        let turn_end = if name.starts_with("gemma") {
            "<end_of_turn>"
        } else {
            "<|im_end|>"
        };
        let id = tok.token_id(turn_end).expect("end-of-turn token");
        assert!(tok.is_eog(id), "{name} {turn_end}");
        assert_eq!(tok.token_text(id), Some(turn_end));
        assert!(tok.token_to_piece(id, false).is_empty());
        assert_eq!(tok.token_to_piece(id, true), turn_end.as_bytes());
        // Without parse_special the control token's text is ordinary text.
        assert_ne!(tok.encode(turn_end, false, false), vec![id]);
    }
}

#[test]
fn arbitrary_bytes_never_panic() {
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for name in MODELS {
        let Some(tok) = load(name) else { continue };
        assert_eq!(tok.encode("", false, true), Vec::<u32>::new());
        for round in 0..300 {
            let len = (next() % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    // Mostly ASCII and UTF-8 lead/continuation bytes, some special-token text.
                    let r = next();
                    if r % 7 == 0 {
                        b"<|>_\n "[(r % 6) as usize]
                    } else {
                        (r >> 8) as u8
                    }
                })
                .collect();
            let text = String::from_utf8_lossy(&bytes);
            let ids = tok.encode(&text, round % 2 == 0, round % 3 == 0);
            assert!(ids.iter().all(|&id| (id as usize) < tok.n_vocab()));
            let _ = tok.decode(&ids, true);
        }
        // One big input: encoding must stay fast (no quadratic special-token scan).
        let big = "fn main() { println!(\"<b>héllo</b> 🦀\"); }\n".repeat(2000);
        let start = Instant::now();
        let ids = tok.encode(&big, true, true);
        eprintln!(
            "{name}: {} bytes → {} tokens in {:?}",
            big.len(),
            ids.len(),
            start.elapsed()
        );
        assert_eq!(tok.decode(&ids, false).trim_start(), big.trim_start());
    }
}
