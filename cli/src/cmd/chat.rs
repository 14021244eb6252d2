//! `strata chat`: an interactive conversation, through the daemon or (`--local`) with the
//! engine in this process.
//!
//! The terminal is a line editor with history; answers stream as they are produced, and Ctrl-C
//! during an answer stops it and returns to the prompt. At the prompt, Ctrl-C clears the line
//! and a second one in a row (or Ctrl-D, or `/bye`) leaves.

mod local;
mod remote;
mod session;

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use rustyline::DefaultEditor;
use rustyline::error::ReadlineError;
use strata_engine::chat::ChatMessage;
use strata_engine::sampler::SamplerConfig;

use crate::client::{Client, NoDaemon};
use crate::interrupt;
use session::{Conversation, Stats};

const PROMPT: &str = ">>> ";
const CONTINUE: &str = "... ";
const BLOCK: &str = "\"\"\"";

const HELP: &str = "\
/reset         forget the conversation (keeps the system prompt)
/system TEXT   set the system prompt (without TEXT: show it)
/save NAME     save a snapshot of the conversation as chats/NAME.json in the store (through
               the daemon, also its KV cache as session NAME); later turns do not change it
/load NAME     continue from a saved conversation (the snapshot itself stays as it was)
/stats         tokens and speed of the last answer
/bye           leave (also Ctrl-D, or Ctrl-C twice)
/help          this list
End a line with \\ to continue on the next, or wrap several lines in \"\"\" … \"\"\".
Ctrl-C stops an answer.";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model: a store name. Through the daemon it defaults to the one model it has loaded;
    /// with --local to qwen2.5-coder-1.5b, an instruct model (a path or URL also works there).
    pub model: Option<String>,
    /// The daemon's socket (default: where stratad puts it).
    #[arg(long, conflicts_with = "local")]
    pub socket: Option<PathBuf>,
    /// Run the engine in this process instead of talking to the daemon.
    #[arg(long)]
    pub local: bool,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Sampling temperature; 0 is greedy (default 0.8).
    #[arg(long, allow_negative_numbers = true)]
    pub temp: Option<f32>,
    /// Most tokens per answer (default: until the model ends it or the context is full).
    #[arg(short = 'n', long = "n-predict")]
    pub n_predict: Option<usize>,
    /// Daemon session NAME: the KV cache is resumed from it and saved to it after each answer,
    /// so a long conversation is not recomputed, also across daemon restarts; the
    /// conversation itself is kept in chats/NAME.json.
    #[arg(long, value_name = "NAME", conflicts_with = "local")]
    pub session: Option<String>,
    /// --local: context size in tokens; 0 means the model's trained length.
    #[arg(
        short = 'c',
        long = "ctx-size",
        default_value_t = 4096,
        requires = "local"
    )]
    pub ctx_size: usize,
    /// --local: threads to compute on (default: one per core).
    #[arg(short = 't', long, requires = "local")]
    pub threads: Option<usize>,
    /// --local: random seed (default: a new one each run).
    #[arg(short = 's', long, requires = "local")]
    pub seed: Option<u64>,
    /// --local: chat template instead of the model's: a built-in name (chatml, gemma, llama3,
    /// llama2) or a Jinja template.
    #[arg(long = "chat-template", value_name = "NAME|JINJA", requires = "local")]
    pub chat_template: Option<String>,
    /// --local: how the weights are held (the daemon's own settings apply otherwise).
    #[command(flatten)]
    pub residency: super::common::LoadArgs,
    /// --local: the KV cache's types and RAM budget.
    #[command(flatten)]
    pub kv: super::kvargs::KvArgs,
    /// --local: speculative decoding (-md, --spec-type, --spec-draft-n-max/-n-min).
    #[command(flatten)]
    pub spec: super::specargs::SpecArgs,
}

/// Where the answers come from.
enum Backend {
    Local(Box<local::Local>),
    Daemon(remote::Remote),
}

impl Backend {
    fn answer(
        &mut self,
        messages: &[ChatMessage],
        out: &mut dyn FnMut(&str) -> std::io::Result<()>,
    ) -> anyhow::Result<(String, Stats)> {
        match self {
            Backend::Local(l) => l.answer(messages, out),
            Backend::Daemon(r) => r.answer(messages, out),
        }
    }

    fn reset(&mut self) {
        if let Backend::Local(l) = self {
            l.reset();
        }
    }

    /// The daemon session in use, if any.
    fn session(&self) -> Option<&str> {
        match self {
            Backend::Daemon(r) => r.session.as_deref(),
            Backend::Local(_) => None,
        }
    }
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    if args.n_predict == Some(0) {
        anyhow::bail!("-n must be at least 1");
    }
    if !args.local && (args.residency.is_given() || args.kv.is_given() || args.spec.is_given()) {
        anyhow::bail!(
            "weight, KV cache and speculative flags (--ram-budget, -ot, --cache-type-k, \
             --kv-budget, -md, --spec-type, …) apply to --local; a daemon uses its own settings"
        );
    }
    let (mut backend, model, via) = if args.local {
        let model = args
            .model
            .clone()
            .unwrap_or_else(|| super::common::DEFAULT_CHAT_MODEL.to_owned());
        let mut cfg = SamplerConfig {
            seed: args.seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            }),
            ..SamplerConfig::default()
        };
        if let Some(t) = args.temp {
            cfg.temp = t;
        }
        let l = local::Local::new(&model, cfg, &args)?;
        (Backend::Local(Box::new(l)), model, "in-process".to_owned())
    } else {
        let client = Client::new(args.socket.clone());
        let via = format!("stratad at {}", client.socket().display());
        let r = remote::Remote::new(client, args.model.clone(), args.temp, args.n_predict)
            .map_err(|e| match e.downcast_ref::<NoDaemon>() {
                Some(nd) => anyhow::anyhow!("{nd}, or chat in-process: strata chat --local"),
                None => e,
            })?;
        let model = r.model.clone();
        (Backend::Daemon(r), model, via)
    };
    interrupt::install().context("installing the Ctrl-C handler")?;
    let mut rl = DefaultEditor::new().context("opening the line editor")?;
    let history = session::chats_dir()
        .ok()
        .and_then(|d| d.parent().map(|p| p.join("chat_history")));
    if let Some(h) = &history {
        // There is no history before the first chat.
        let _ = rl.load_history(h);
    }
    eprintln!("chatting with {model} ({via}); /help lists the commands, /bye or Ctrl-D leaves");
    let mut conv = Conversation {
        system: args.system.clone(),
        turns: Vec::new(),
    };
    if let (Some(name), Backend::Daemon(r)) = (&args.session, &mut backend) {
        let path = session::chat_path(&session::chats_dir()?, name)?;
        if path.exists() {
            conv = session::load(&path)?;
            if args.system.is_some() {
                conv.system = args.system.clone();
            }
            eprintln!("(continuing session {name}: {} messages)", conv.turns.len());
        }
        r.session = Some(name.clone());
    }
    let result = repl(&mut rl, &mut backend, &mut conv, &model);
    if let Some(h) = &history {
        if let Some(dir) = h.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = rl.save_history(h) {
            tracing::warn!("could not save the chat history to {}: {e}", h.display());
        }
    }
    result
}

fn repl(
    rl: &mut DefaultEditor,
    backend: &mut Backend,
    conv: &mut Conversation,
    model: &str,
) -> anyhow::Result<()> {
    let mut last: Option<Stats> = None;
    // Ctrl-C at the prompt only leaves when pressed twice in a row.
    let mut interrupted_once = false;
    loop {
        let text = match read_input(rl)? {
            Input::Eof => return Ok(()),
            Input::Interrupted if interrupted_once => return Ok(()),
            Input::Interrupted => {
                interrupted_once = true;
                eprintln!("(Ctrl-C again, Ctrl-D or /bye to leave)");
                continue;
            }
            Input::Text(t) => t,
        };
        interrupted_once = false;
        if text.trim().is_empty() {
            continue;
        }
        let _ = rl.add_history_entry(text.as_str());
        if let Some(cmd) = text.strip_prefix('/') {
            match command(cmd, backend, conv, model, last.as_ref()) {
                Ok(Flow::Leave) => return Ok(()),
                Ok(Flow::Stay) => {}
                Err(e) => eprintln!("error: {e:#}"),
            }
            continue;
        }
        conv.turns.push(ChatMessage::new("user", text));
        let answering = interrupt::answering();
        let mut ends_with_newline = true;
        let mut out = |piece: &str| -> std::io::Result<()> {
            if let Some(c) = piece.chars().last() {
                ends_with_newline = c == '\n';
            }
            let mut o = std::io::stdout().lock();
            o.write_all(piece.as_bytes())?;
            o.flush()
        };
        let result = backend.answer(&conv.messages(), &mut out);
        drop(answering);
        if !ends_with_newline {
            println!();
        }
        match result {
            Ok((answer, stats)) => {
                if answer.is_empty() && stats.interrupted {
                    // Nothing was said; the question goes too, so it can be asked again.
                    conv.turns.pop();
                } else {
                    conv.turns.push(ChatMessage::new("assistant", answer));
                }
                last = Some(stats);
                // The daemon saved the cache; keep the conversation that goes with it.
                if let Some(name) = backend.session() {
                    let saved = session::chats_dir()
                        .and_then(|d| session::chat_path(&d, name))
                        .and_then(|p| session::save(&p, conv, model));
                    if let Err(e) = saved {
                        eprintln!("warning: saving the conversation: {e:#}");
                    }
                }
            }
            Err(e) if crate::is_broken_pipe(&e) => return Err(e),
            Err(e) => {
                conv.turns.pop();
                eprintln!("error: {e:#}");
            }
        }
    }
}

enum Flow {
    Stay,
    Leave,
}

fn command(
    cmd: &str,
    backend: &mut Backend,
    conv: &mut Conversation,
    model: &str,
    last: Option<&Stats>,
) -> anyhow::Result<Flow> {
    let (name, arg) = match cmd.split_once(char::is_whitespace) {
        Some((n, a)) => (n, a.trim()),
        None => (cmd.trim(), ""),
    };
    match name {
        "bye" | "exit" | "quit" => return Ok(Flow::Leave),
        "help" | "?" => println!("{HELP}"),
        "reset" | "clear" => {
            conv.reset();
            backend.reset();
            println!("(conversation cleared)");
        }
        "system" if arg.is_empty() => match &conv.system {
            Some(s) => println!("{s}"),
            None => println!("(no system prompt)"),
        },
        "system" => {
            conv.system = Some(arg.to_owned());
            println!("(system prompt set)");
        }
        "save" | "load" if arg.is_empty() => anyhow::bail!("/{name} needs a NAME"),
        // A saved chat is a snapshot: what follows in this chat never changes it (issue 22:
        // after `/save snap` and `/reset`, the next answer overwrote both).
        "save" => {
            let path = session::chat_path(&session::chats_dir()?, arg)?;
            session::save(&path, conv, model)?;
            println!("(saved to {})", path.display());
            if let Backend::Daemon(r) = backend
                && r.session.as_deref() != Some(arg)
                && !conv.turns.is_empty()
            {
                r.save_session(arg, &conv.messages())?;
                println!("(KV cache saved in the daemon as session {arg})");
            }
        }
        "load" => {
            let path = session::chat_path(&session::chats_dir()?, arg)?;
            *conv = session::load(&path)?;
            backend.reset();
            println!(
                "(loaded {} messages from {}; the saved chat stays as it was)",
                conv.turns.len(),
                path.display()
            );
        }
        "stats" => match last {
            Some(s) => println!("{}", s.describe()),
            None => println!("(no answer yet)"),
        },
        _ => anyhow::bail!("unknown command /{name}; /help lists them"),
    }
    Ok(Flow::Stay)
}

enum Input {
    Text(String),
    Interrupted,
    Eof,
}

/// A line, or why there is none (Ctrl-C or Ctrl-D).
fn line(rl: &mut DefaultEditor, prompt: &str) -> anyhow::Result<Result<String, Input>> {
    match rl.readline(prompt) {
        Ok(l) => Ok(Ok(l)),
        Err(ReadlineError::Interrupted) => Ok(Err(Input::Interrupted)),
        Err(ReadlineError::Eof) => Ok(Err(Input::Eof)),
        Err(e) => Err(anyhow::Error::new(e).context("reading the terminal")),
    }
}

/// Reads one message: a line, lines joined by a trailing `\`, or a `"""` block.
fn read_input(rl: &mut DefaultEditor) -> anyhow::Result<Input> {
    let first = match line(rl, PROMPT)? {
        Ok(l) => l,
        Err(stop) => return Ok(stop),
    };
    let mut lines = Vec::new();
    if let Some(rest) = first.trim_start().strip_prefix(BLOCK) {
        if let Some(inner) = rest.trim_end().strip_suffix(BLOCK) {
            return Ok(Input::Text(inner.to_owned()));
        }
        if !rest.is_empty() {
            lines.push(rest.to_owned());
        }
        loop {
            let l = match line(rl, CONTINUE)? {
                Ok(l) => l,
                Err(stop) => return Ok(stop),
            };
            if let Some(head) = l.trim_end().strip_suffix(BLOCK) {
                if !head.is_empty() {
                    lines.push(head.to_owned());
                }
                return Ok(Input::Text(lines.join("\n")));
            }
            lines.push(l);
        }
    }
    let mut l = first;
    while let Some(head) = l.strip_suffix('\\') {
        lines.push(head.to_owned());
        l = match line(rl, CONTINUE)? {
            Ok(l) => l,
            Err(stop) => return Ok(stop),
        };
    }
    lines.push(l);
    Ok(Input::Text(lines.join("\n")))
}
