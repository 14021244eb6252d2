//! Reading a vocabulary out of GGUF metadata into a plain [`VocabData`], so the tokenizer core
//! does not depend on where the vocabulary came from (tests build one in memory).

use strata_storage::gguf::{GgufError, Metadata};

use super::TokenizerError;

/// Everything the tokenizer needs from `tokenizer.ggml.*`, as stored in the file.
#[derive(Clone, Debug, Default)]
pub struct VocabData {
    /// `tokenizer.ggml.model`: `llama` (SentencePiece) or `gpt2` (byte-level BPE).
    pub model: String,
    /// `tokenizer.ggml.pre`: the BPE pre-tokenizer name.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub scores: Option<Vec<f32>>,
    pub token_types: Option<Vec<i32>>,
    pub merges: Option<Vec<String>>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    pub add_space_prefix: Option<bool>,
}

fn meta<T>(key: &'static str, r: Result<T, GgufError>) -> Result<T, TokenizerError> {
    r.map_err(|source| TokenizerError::Metadata { key, source })
}

impl VocabData {
    /// Reads the tokenizer keys; missing optional keys stay `None`.
    pub fn from_gguf(md: &Metadata) -> Result<Self, TokenizerError> {
        const MODEL: &str = "tokenizer.ggml.model";
        const TOKENS: &str = "tokenizer.ggml.tokens";
        let model = meta(MODEL, md.get_str(MODEL))?
            .ok_or(TokenizerError::MissingKey { key: MODEL })?
            .to_owned();
        let tokens = meta(TOKENS, md.get_str_array(TOKENS))?
            .ok_or(TokenizerError::MissingKey { key: TOKENS })?
            .to_vec();
        macro_rules! get {
            ($method:ident, $key:literal) => {
                meta($key, md.$method($key))?
            };
        }
        Ok(VocabData {
            model,
            pre: get!(get_str, "tokenizer.ggml.pre").map(str::to_owned),
            tokens,
            scores: get!(get_f32_array, "tokenizer.ggml.scores").map(<[f32]>::to_vec),
            token_types: get!(get_i32_array, "tokenizer.ggml.token_type").map(<[i32]>::to_vec),
            merges: get!(get_str_array, "tokenizer.ggml.merges").map(<[String]>::to_vec),
            bos: get!(get_u32, "tokenizer.ggml.bos_token_id"),
            eos: get!(get_u32, "tokenizer.ggml.eos_token_id"),
            eot: get!(get_u32, "tokenizer.ggml.eot_token_id"),
            eom: get!(get_u32, "tokenizer.ggml.eom_token_id"),
            unk: get!(get_u32, "tokenizer.ggml.unknown_token_id"),
            pad: get!(get_u32, "tokenizer.ggml.padding_token_id"),
            add_bos: get!(get_bool, "tokenizer.ggml.add_bos_token"),
            add_eos: get!(get_bool, "tokenizer.ggml.add_eos_token"),
            add_space_prefix: get!(get_bool, "tokenizer.ggml.add_space_prefix"),
        })
    }
}
