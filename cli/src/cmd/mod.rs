//! One module per subcommand; each exposes `Args` (clap) and `exec`.

pub mod bench;
pub mod calibrate;
pub mod chat;
pub mod common;
pub mod generate;
pub mod gpu;
pub mod kvargs;
pub mod list;
pub mod load;
pub mod optimize;
pub mod perplexity;
pub mod plan;
pub mod ps;
pub mod pull;
pub mod rm;
pub mod run;
pub mod serve;
pub mod show;
pub mod specargs;
pub mod tokenize;
