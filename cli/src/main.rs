//! `strata`: the llama.cpp-style command line (`run`, `tokenize`, `perplexity`, `bench`,
//! `gen`, `optimize`) running the engine in-process, the model store commands (`pull`, `list`, `rm`,
//! `show`), and the daemon's client (`chat`, `ps`, `load`, `unload`).

// A binary has no public API: `pub` inside it only means "shared between its modules".
#![allow(unreachable_pub)]

mod client;
mod cmd;
mod progress;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "strata", version, about = "Run GGUF language models locally", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text from a prompt, or chat with -cnv (llama-cli's flags).
    Run(cmd::run::Args),
    /// Print the token ids of a text (llama-tokenize).
    Tokenize(cmd::tokenize::Args),
    /// Prompt-processing and generation speed (llama-bench).
    Bench(cmd::bench::Args),
    /// Write a GGUF model with deterministic random weights (tests, larger-than-RAM files).
    #[command(name = "gen")]
    Gen(cmd::generate::Args),
    /// Perplexity of a text file (llama-perplexity).
    Perplexity(cmd::perplexity::Args),
    /// Lay each expert of a MoE model out as one record, read from disk in one request.
    Optimize(cmd::optimize::Args),
    /// Fetch a model into the store: a built-in name, an https URL or a local path.
    Pull(cmd::pull::Args),
    /// List the models in the store.
    #[command(alias = "ls")]
    List(cmd::list::Args),
    /// Remove a model from the store.
    Rm(cmd::rm::Args),
    /// Show a model's metadata and tensors (like gguf-dump).
    Show(cmd::show::Args),
    /// Chat with a model through the daemon, or in-process with --local.
    Chat(cmd::chat::Args),
    /// List the models the daemon has loaded.
    Ps(cmd::ps::Args),
    /// Load a model into the daemon now.
    Load(cmd::load::Args),
    /// Free a model the daemon has loaded.
    Unload(cmd::load::Args),
}

/// llama.cpp's multi-letter single-dash flags, spelled the long way for clap.
const LLAMA_ALIASES: &[(&str, &str)] = &[
    ("-cnv", "--conversation"),
    ("-no-cnv", "--no-conversation"),
    ("-sys", "--system-prompt"),
    ("-ngl", "--n-gpu-layers"),
    ("-ot", "--override-tensor"),
    ("-fa", "--flash-attn"),
    ("-ctk", "--cache-type-k"),
    ("-ctv", "--cache-type-v"),
    ("-ub", "--ubatch-size"),
    ("-nkvo", "--no-kv-offload"),
];

fn rewrite_args(args: impl Iterator<Item = String>) -> Vec<String> {
    args.map(|a| {
        LLAMA_ALIASES
            .iter()
            .find(|(short, _)| *short == a)
            .map_or(a, |(_, long)| long.to_string())
    })
    .collect()
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse_from(rewrite_args(std::env::args())) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match cli.command {
        Command::Run(a) => cmd::run::exec(a),
        Command::Tokenize(a) => cmd::tokenize::exec(a),
        Command::Bench(a) => cmd::bench::exec(a),
        Command::Gen(a) => cmd::generate::exec(a),
        Command::Perplexity(a) => cmd::perplexity::exec(a),
        Command::Optimize(a) => cmd::optimize::exec(a),
        Command::Pull(a) => cmd::pull::exec(a),
        Command::List(a) => cmd::list::exec(a),
        Command::Rm(a) => cmd::rm::exec(a),
        Command::Show(a) => cmd::show::exec(a),
        Command::Chat(a) => cmd::chat::exec(a),
        Command::Ps(a) => cmd::ps::exec(a),
        Command::Load(a) => cmd::load::load(a),
        Command::Unload(a) => cmd::load::unload(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the error quotes (a model file's 10 MB string, escape
            // sequences): clipped, with control characters escaped.
            let msg = format!("{e:#}");
            eprintln!(
                "error: {}",
                strata_storage::text::clip(&msg, MAX_ERROR_CHARS)
            );
            ExitCode::FAILURE
        }
    }
}

/// The longest error line printed, in characters.
const MAX_ERROR_CHARS: usize = 2000;

/// A reader that went away (`strata run … | head`) is not a failure.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
