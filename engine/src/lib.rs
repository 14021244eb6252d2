//! strata-engine: models as data over shared blocks.
//!
//! - [`model::Model`] loads a GGUF file (llama, qwen2, qwen3, gemma3), validates every tensor's
//!   shape against the metadata, and runs [`model::Model::forward`] over a
//!   [`model::Context`] (the KV cache and scratch of one sequence).
//! - [`tokenizer::Tokenizer`] encodes and decodes with the file's own vocabulary
//!   (SentencePiece or GPT-2 BPE); [`chat::ChatTemplate`] renders conversations.
//! - [`sampler::Sampler`] picks tokens; [`perplexity`] scores text like llama-perplexity.
//!
//! The engine knows nothing about JSON, sockets or tokio.

pub mod chat;
pub mod error;
pub mod exec;
pub mod kv;
pub mod model;
pub mod optimize;
pub mod perplexity;
pub mod sampler;
pub mod session;
pub mod synth;
pub mod tokenizer;

pub use error::EngineError;
pub use model::{Context, Logits, Model};
