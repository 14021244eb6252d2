//! Text ↔ token ids, reproducing llama.cpp's `llama_tokenize` and `llama_token_to_piece`.
//!
//! A [`Tokenizer`] is built from a GGUF file's `tokenizer.ggml.*` metadata (or from a plain
//! [`VocabData`], which is what the GGUF loader fills). Two vocabulary kinds are supported:
//!
//! * SentencePiece (`llama`): score-driven pair merging over UTF-8 characters with byte
//!   fallback (Llama 1/2, Gemma, Mistral v1);
//! * byte-level BPE (`gpt2`): a pre-tokenizer regex, then rank-ordered merges (Qwen, Llama 3).
//!
//! Encoding first carves special tokens out of the text (control tokens only when the caller
//! asks to parse them, user-defined tokens always), exactly as llama.cpp's
//! `tokenizer_st_partition` does, so prompts tokenize to the same ids llama.cpp produces.

mod bpe;
mod load;
mod pretok;
mod special;
mod spm;
mod stream;

use std::collections::{HashMap, HashSet};

pub use load::VocabData;
pub use stream::StreamDecoder;

use bpe::Bpe;
use pretok::PreTokenizer;
use special::{Fragment, SpecialMatcher};

/// Why a vocabulary could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    #[error("tokenizer metadata key {key}: {source}")]
    Metadata {
        key: &'static str,
        #[source]
        source: strata_storage::gguf::GgufError,
    },
    #[error("tokenizer metadata key {key} is missing")]
    MissingKey { key: &'static str },
    #[error("unsupported tokenizer model {model:?} (tokenizer.ggml.model); supported: llama, gpt2")]
    UnknownModel { model: String },
    #[error("unsupported pre-tokenizer {pre:?} (tokenizer.ggml.pre)")]
    UnknownPreTokenizer { pre: String },
    #[error("{key} has {found} entries but the vocabulary has {expected} tokens")]
    LengthMismatch {
        key: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("merge #{index} {merge:?} is not two space-separated symbols")]
    BadMerge { index: usize, merge: String },
    #[error("{key} = {id} is out of range for a vocabulary of {n_vocab} tokens")]
    TokenIdOutOfRange {
        key: &'static str,
        id: u32,
        n_vocab: usize,
    },
    #[error("the vocabulary is empty")]
    EmptyVocab,
    #[error("vocabulary of {n_vocab} tokens does not fit token ids in u32")]
    VocabTooLarge { n_vocab: usize },
}

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenType {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_i32(v: i32) -> Self {
        match v {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }
}

struct TokenData {
    text: Box<str>,
    score: f32,
    ty: TokenType,
}

/// The token table both algorithms look words up in.
struct Vocab {
    tokens: Vec<TokenData>,
    /// Text → id; on duplicate texts the last id wins, as in llama.cpp.
    token_to_id: HashMap<Box<str>, u32>,
    /// Byte → `<0xXX>` token (SentencePiece byte fallback).
    byte_tokens: [Option<u32>; 256],
    unk: Option<u32>,
}

impl Vocab {
    fn byte_token(&self, b: u8) -> Option<u32> {
        self.byte_tokens[usize::from(b)].or(self.unk)
    }
}

enum Model {
    Spm,
    Bpe(Box<Bpe>),
}

/// A loaded vocabulary: encodes text to token ids and renders ids back to bytes.
pub struct Tokenizer {
    vocab: Vocab,
    model: Model,
    special: SpecialMatcher,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    eog: HashSet<u32>,
}

/// Token texts llama.cpp treats as end-of-generation whatever the metadata says
/// (`llama_vocab::impl::load`, "maintain a list of tokens that cause end-of-generation").
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

/// Fill-in-the-middle pad/repo/separator tokens, which llama.cpp also stops on.
const FIM_EOG_TEXTS: &[&str] = &[
    "<|fim_pad|>",
    "<fim-pad>",
    "<PAD>",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<|file_sep|>",
];

impl Tokenizer {
    /// Builds a tokenizer from a GGUF file's metadata.
    pub fn from_gguf(md: &strata_storage::gguf::Metadata) -> Result<Self, TokenizerError> {
        Self::from_vocab(VocabData::from_gguf(md)?)
    }

    /// Builds a tokenizer from already-extracted vocabulary data.
    pub fn from_vocab(data: VocabData) -> Result<Self, TokenizerError> {
        let n = data.tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        if u32::try_from(n).is_err() {
            return Err(TokenizerError::VocabTooLarge { n_vocab: n });
        }
        let check_len = |key: &'static str, found: usize| {
            if found == n {
                Ok(())
            } else {
                Err(TokenizerError::LengthMismatch {
                    key,
                    expected: n,
                    found,
                })
            }
        };
        if let Some(s) = &data.scores {
            check_len("tokenizer.ggml.scores", s.len())?;
        }
        if let Some(t) = &data.token_types {
            check_len("tokenizer.ggml.token_type", t.len())?;
        }
        let is_spm = match data.model.as_str() {
            "llama" => true,
            "gpt2" => false,
            other => {
                return Err(TokenizerError::UnknownModel {
                    model: other.to_owned(),
                });
            }
        };
        let check_id = |key: &'static str, id: Option<u32>| match id {
            Some(id) if id as usize >= n => Err(TokenizerError::TokenIdOutOfRange {
                key,
                id,
                n_vocab: n,
            }),
            _ => Ok(id),
        };
        // llama.cpp's defaults for SentencePiece files that omit the special ids.
        let (def_bos, def_eos, def_unk) = if is_spm {
            (Some(1), Some(2), Some(0))
        } else {
            (None, None, None)
        };
        let bos = check_id("tokenizer.ggml.bos_token_id", data.bos.or(def_bos))?;
        let eos = check_id("tokenizer.ggml.eos_token_id", data.eos.or(def_eos))?;
        let unk = check_id("tokenizer.ggml.unknown_token_id", data.unk.or(def_unk))?;
        let eot = check_id("tokenizer.ggml.eot_token_id", data.eot)?;
        let eom = check_id("tokenizer.ggml.eom_token_id", data.eom)?;

        let mut tokens = Vec::with_capacity(n);
        let mut token_to_id = HashMap::with_capacity(n);
        for (i, text) in data.tokens.into_iter().enumerate() {
            // llama.cpp renames empty tokens so they can never match.
            let text: Box<str> = if text.is_empty() {
                format!("[EMPTY_{i}]").into()
            } else {
                text.into()
            };
            let ty = data
                .token_types
                .as_ref()
                .map_or(TokenType::Normal, |t| TokenType::from_i32(t[i]));
            let score = data.scores.as_ref().map_or(0.0, |s| s[i]);
            token_to_id.insert(text.clone(), i as u32);
            tokens.push(TokenData { text, score, ty });
        }

        // End-of-generation set, and the tokens in it promoted to control like llama.cpp does.
        let mut eog = HashSet::new();
        for t in EOG_TEXTS.iter().chain(FIM_EOG_TEXTS) {
            if let Some(&id) = token_to_id.get(*t) {
                eog.insert(id);
            }
        }
        eog.extend([eos, eot, eom].into_iter().flatten());
        for &id in &eog {
            let t = &mut tokens[id as usize];
            if t.ty != TokenType::Control {
                tracing::debug!(
                    id,
                    text = &*t.text,
                    "end-of-generation token promoted to control"
                );
                t.ty = TokenType::Control;
            }
        }

        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            let name = format!("<0x{b:02X}>");
            *slot = token_to_id.get(name.as_str()).copied().or_else(|| {
                let one = [b as u8];
                std::str::from_utf8(&one)
                    .ok()
                    .and_then(|s| token_to_id.get(s).copied())
            });
        }
        let vocab = Vocab {
            tokens,
            token_to_id,
            byte_tokens,
            unk,
        };
        let special = SpecialMatcher::new(vocab.tokens.iter().enumerate().filter_map(|(i, t)| {
            matches!(
                t.ty,
                TokenType::Control | TokenType::UserDefined | TokenType::Unknown
            )
            .then_some((i as u32, &*t.text, t.ty == TokenType::UserDefined))
        }));

        let (model, add_bos_default) = if is_spm {
            (Model::Spm, true)
        } else {
            let pre_name = data.pre.as_deref().unwrap_or("default");
            let pre = PreTokenizer::from_name(pre_name).ok_or_else(|| {
                TokenizerError::UnknownPreTokenizer {
                    pre: pre_name.to_owned(),
                }
            })?;
            let llama3 = matches!(pre, PreTokenizer::Llama3 { max_digits: 3 });
            let merges = data.merges.as_deref().ok_or(TokenizerError::MissingKey {
                key: "tokenizer.ggml.merges",
            })?;
            (
                Model::Bpe(Box::new(Bpe::new(&vocab, merges, pre, llama3)?)),
                llama3,
            )
        };
        Ok(Tokenizer {
            vocab,
            model,
            special,
            bos,
            eos,
            add_bos: data.add_bos.unwrap_or(add_bos_default),
            add_eos: data.add_eos.unwrap_or(false),
            add_space_prefix: data.add_space_prefix.unwrap_or(is_spm),
            eog,
        })
    }

    /// llama.cpp's `llama_tokenize`: `add_special` adds BOS/EOS per the model's add_bos/add_eos;
    /// `parse_special` matches special/control tokens' text in the input.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special
            && self.add_bos
            && let Some(bos) = self.bos
        {
            out.push(bos);
        }
        let fragments = self.special.partition(text, parse_special);
        // SentencePiece puts a space before text that starts the input or follows a special
        // token, when the model asks for a space prefix.
        let mut prev_special = true;
        let mut buf = String::new();
        for frag in fragments {
            match frag {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(range) => {
                    let raw = &text[range];
                    match &self.model {
                        Model::Spm => {
                            buf.clear();
                            if self.add_space_prefix && prev_special {
                                buf.push('\u{2581}');
                            }
                            for c in raw.chars() {
                                buf.push(if c == ' ' { '\u{2581}' } else { c });
                            }
                            spm::encode(&self.vocab, &buf, &mut out);
                        }
                        Model::Bpe(bpe) => bpe.encode(&self.vocab, raw, &mut out),
                    }
                    prev_special = false;
                }
            }
        }
        if add_special
            && self.add_eos
            && let Some(eos) = self.eos
        {
            out.push(eos);
        }
        out
    }

    /// The bytes a token prints (llama.cpp's `token_to_piece`): control and unknown tokens
    /// print their text only when `special`; unused and out-of-range ids print nothing.
    pub fn token_to_piece(&self, id: u32, special: bool) -> Vec<u8> {
        let mut out = Vec::new();
        self.append_piece(id, special, &mut out);
        out
    }

    fn append_piece(&self, id: u32, special: bool, out: &mut Vec<u8>) {
        let Some(t) = self.vocab.tokens.get(id as usize) else {
            return;
        };
        match t.ty {
            TokenType::Control | TokenType::Unknown => {
                if special {
                    out.extend_from_slice(t.text.as_bytes());
                }
            }
            TokenType::UserDefined => out.extend_from_slice(t.text.as_bytes()),
            TokenType::Normal => match &self.model {
                Model::Spm => {
                    for c in t.text.chars() {
                        let c = if c == '\u{2581}' { ' ' } else { c };
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                }
                Model::Bpe(bpe) => bpe.decode_text(&t.text, out),
            },
            TokenType::Byte => match &self.model {
                Model::Spm => {
                    if let Some(b) = parse_byte_token(&t.text) {
                        out.push(b);
                    }
                }
                Model::Bpe(bpe) => bpe.decode_text(&t.text, out),
            },
            TokenType::Unused | TokenType::Undefined => {}
        }
    }

    /// Concatenates the tokens' pieces, then converts to UTF-8 lossily (once, so a character
    /// split across tokens survives).
    pub fn decode(&self, ids: &[u32], special: bool) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            self.append_piece(id, special, &mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn n_vocab(&self) -> usize {
        self.vocab.tokens.len()
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Whether `encode(.., add_special = true, ..)` starts with BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// End-of-generation: eos, eot, eom, and the end-of-turn tokens llama.cpp recognises by
    /// their text (`<end_of_turn>`, `<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`, FIM pads…).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// The id of the token whose text is exactly `text`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.token_to_id.get(text).copied()
    }

    /// A token's text as stored in the vocabulary (SentencePiece `▁`, GPT-2 stand-in bytes).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.tokens.get(id as usize).map(|t| &*t.text)
    }
}

/// `<0xAB>` → 0xAB.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests;
