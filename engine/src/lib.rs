//! strata-engine (being written).

pub mod chat;
pub mod tokenizer;
