//! strata-engine: models as data over shared blocks.
//!
//! - [`model::Model`] loads a GGUF file of any supported architecture (llama and mixtral,
//!   qwen2, qwen3, gemma3, and the mixtures of experts qwen2moe, qwen3moe and olmoe),
//!   validates every tensor's shape against the metadata, and runs [`model::Model::forward`]
//!   and [`model::Model::decode_batch`] over [`model::Context`]s (the KV cache and scratch of
//!   one sequence). [`model::ModelOptions`] says how (residency, expert prediction), built by
//!   the CLI and the daemon with [`model::LoadSettings::options`].
//! - [`exec`] runs the forward pass: each layer as phases (attention input, attention,
//!   output and FFN) on the executor of the device a [`exec::Placement`] names, with the
//!   activations crossing between devices at one point of the layer loop.
//! - [`tokenizer::Tokenizer`] encodes and decodes with the file's own vocabulary
//!   (SentencePiece or GPT-2 BPE); [`chat::ChatTemplate`] renders conversations.
//! - [`sampler::Sampler`] picks tokens; [`perplexity`] scores text like llama-perplexity.
//! - [`spec`] is speculative decoding: drafts (prompt lookup, a draft model) verified in
//!   one pass of the target, with the draft length tuned by measurement.
//! - [`kv`] is the paged KV cache (with its SSD tier), [`session`] saves and resumes it;
//!   [`optimize`] rewrites MoE files into the strided layout; [`synth`] writes test models.
//!
//! The engine knows nothing about JSON, sockets or tokio, and reads no environment variable.

pub mod chat;
pub mod error;
pub mod exec;
pub mod kv;
pub mod model;
pub mod optimize;
pub mod perplexity;
pub mod plan;
pub mod sampler;
pub mod session;
pub mod spec;
pub mod synth;
pub mod tokenizer;

pub use error::EngineError;
pub use model::{Context, Logits, Model};
