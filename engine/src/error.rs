//! The engine's error type.

use strata_storage::gguf::GgufError;
use strata_storage::residency::ResidencyError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Residency(#[from] ResidencyError),
    #[error(transparent)]
    Session(#[from] strata_storage::session::SessionError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error(transparent)]
    Simd(#[from] strata_simd::matmul::SimdError),
    #[error(
        "unknown architecture '{0}' (supported: llama, qwen2, qwen3, gemma3, qwen2moe, qwen3moe, olmoe)"
    )]
    UnknownArch(String),
    #[error("missing metadata key '{0}'")]
    MissingKey(String),
    #[error("bad metadata '{key}': {problem}")]
    BadMetadata { key: String, problem: String },
    #[error("missing tensor '{0}'")]
    MissingTensor(String),
    #[error("tensor '{name}' has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<u64>,
        actual: Vec<u64>,
    },
    #[error("tensor '{name}' has type {ty}, which strata cannot compute with yet")]
    UnsupportedType { name: String, ty: String },
    #[error("token id {id} is out of range (vocabulary has {n_vocab} tokens)")]
    BadToken { id: u32, n_vocab: usize },
    #[error("context is full: {needed} tokens needed, context size is {n_ctx}")]
    ContextFull { needed: usize, n_ctx: usize },
    #[error("KV cache: {0}")]
    Kv(String),
    /// The GPU (or the simulated one) failed: a driver error, memory, or a kernel.
    #[error("GPU: {0}")]
    Gpu(String),
    /// No placement of the model fits the device.
    #[error(transparent)]
    Plan(#[from] crate::plan::PlanError),
    #[error("{0}")]
    Invalid(String),
}
