//! `strata tokenize`: llama-tokenize's output on the model's own vocabulary.

use std::io::Write;

use anyhow::Context as _;
use strata_engine::tokenizer::Tokenizer;
use strata_storage::gguf::GgufFile;

use super::common::{DEFAULT_MODEL, resolve_model};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model: a store name, a path to a .gguf, or a URL.
    #[arg(short = 'm', long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Text to tokenize.
    #[arg(short = 'p', long, conflicts_with = "file")]
    prompt: Option<String>,
    /// Read the text from a file.
    #[arg(short = 'f', long)]
    file: Option<std::path::PathBuf>,
    /// Print only the ids, as `[id, id, …]`.
    #[arg(long)]
    ids: bool,
    /// Do not add BOS/EOS even when the model asks for them.
    #[arg(long)]
    no_bos: bool,
    /// Treat special tokens' text as plain text.
    #[arg(long)]
    no_parse_special: bool,
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    let text = match (&args.prompt, &args.file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        (None, None) => anyhow::bail!("give the text with -p TEXT or -f FILE"),
    };
    let path = resolve_model(&args.model)?;
    // Only the header is needed: the vocabulary lives in the metadata.
    let gguf = GgufFile::open(&path).with_context(|| format!("reading {}", path.display()))?;
    let tok = Tokenizer::from_gguf(&gguf.metadata)?;
    let ids = tok.encode(&text, !args.no_bos, !args.no_parse_special);
    let mut out = std::io::stdout().lock();
    if args.ids {
        let list: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        writeln!(out, "[{}]", list.join(", "))?;
    } else {
        for id in ids {
            let piece = String::from_utf8_lossy(&tok.token_to_piece(id, true)).into_owned();
            writeln!(out, "{id:>6} -> '{piece}'")?;
        }
    }
    Ok(())
}
