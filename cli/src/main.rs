//! `strata`: the llama.cpp-style command line (`run`, `tokenize`, `perplexity`, `bench`,
//! `gen`, `optimize`) running the engine in-process, the model store commands (`pull`, `list`, `rm`,
//! `show`), and the daemon's client (`chat`, `ps`, `load`, `unload`/`stop`, `serve`).
//! llama.cpp's spellings (`-ngl`, `-tb`, `-cnv`) are read by [`llama_flags`] before clap.

// A binary has no public API: `pub` inside it only means "shared between its modules".
#![allow(unreachable_pub)]

mod client;
mod cmd;
mod interrupt;
mod llama_flags;
mod progress;

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "strata", version, about = "Run GGUF language models locally", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// llama.cpp takes the last of a repeated flag (`-n 8 -n 16`); `args_override_self` does that
// for the llama-style commands.
#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text from a prompt, or chat (llama-cli's flags; Ollama's `run MODEL [PROMPT]`).
    #[command(args_override_self = true)]
    Run(cmd::run::Args),
    /// Print the token ids of a text (llama-tokenize).
    #[command(args_override_self = true)]
    Tokenize(cmd::tokenize::Args),
    /// Prompt-processing and generation speed (llama-bench).
    #[command(args_override_self = true)]
    Bench(cmd::bench::Args),
    /// Write a GGUF model with deterministic random weights (tests, larger-than-RAM files).
    #[command(name = "gen")]
    Gen(cmd::generate::Args),
    /// Where a model's weights, KV cache and work would go on a machine, and how fast it runs.
    Plan(cmd::plan::Args),
    /// Measure this machine into a hardware profile for `strata plan`.
    Calibrate(cmd::calibrate::Args),
    /// Perplexity of a text file (llama-perplexity).
    #[command(args_override_self = true)]
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
    /// Free a model the daemon has loaded (Ollama's `stop`; the same as `unload`).
    Stop(cmd::load::Args),
    /// Run the daemon, stratad, with these flags (Ollama's `serve`).
    Serve(cmd::serve::Args),
    /// Print strata's version.
    Version,
}

impl Command {
    /// The log filter when STRATA_LOG does not say: `None` for no logs at all.
    fn log_level(&self) -> Option<&'static str> {
        match self {
            Command::Run(a) if a.log_disable => None,
            Command::Run(a) if a.verbose => Some("info"),
            _ => Some("warn"),
        }
    }
}

fn main() -> ExitCode {
    let mut clap_cmd = Cli::command();
    clap_cmd.build();
    let args = match llama_flags::rewrite(&clap_cmd, std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if let Some(level) = cli.command.log_level() {
        // Colour only for a person at a terminal: logs sent to a file or a pipe stay plain text.
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
            )
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init();
    }
    let result = match cli.command {
        Command::Run(a) => cmd::run::exec(a),
        Command::Tokenize(a) => cmd::tokenize::exec(a),
        Command::Bench(a) => cmd::bench::exec(a),
        Command::Gen(a) => cmd::generate::exec(a),
        Command::Perplexity(a) => cmd::perplexity::exec(a),
        Command::Plan(a) => cmd::plan::exec(a),
        Command::Calibrate(a) => cmd::calibrate::exec(a),
        Command::Optimize(a) => cmd::optimize::exec(a),
        Command::Pull(a) => cmd::pull::exec(a),
        Command::List(a) => cmd::list::exec(a),
        Command::Rm(a) => cmd::rm::exec(a),
        Command::Show(a) => cmd::show::exec(a),
        Command::Chat(a) => cmd::chat::exec(a),
        Command::Ps(a) => cmd::ps::exec(a),
        Command::Load(a) => cmd::load::load(a),
        Command::Unload(a) | Command::Stop(a) => cmd::load::unload(a),
        Command::Serve(a) => cmd::serve::exec(a),
        Command::Version => {
            println!("strata {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the error quotes (a model file's 10 MB string, escape
            // sequences): each cause said once, clipped, with control characters escaped.
            eprintln!(
                "error: {}",
                strata_storage::text::clip(&report(&e), MAX_ERROR_CHARS)
            );
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each said once: many errors quote their cause in
/// their own message, which `{:#}` would print again.
fn report(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg
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
