//! `strata pull MODEL`: fetch a model into the store.

use anyhow::Context as _;
use strata_storage::store::{PullOptions, Store};

use crate::progress::BarProgress;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A built-in name (gemma3-270m, qwen2.5-coder-1.5b), an https URL to a .gguf (Hugging Face
    /// links included), or a path to a local .gguf file.
    pub model: String,
    /// Store the model under this name instead of the one taken from the URL or file name.
    #[arg(long)]
    pub name: Option<String>,
    /// Expected SHA-256 of the model file; the pull fails and keeps nothing if it differs.
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,
    /// Download again even when a verified copy is already present.
    #[arg(long)]
    pub force: bool,
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    let store = Store::open_default().context("opening the model store")?;
    let opts = PullOptions {
        name: args.name,
        sha256: args.sha256,
        force: args.force,
    };
    let mut progress = BarProgress::new();
    let path = store
        .pull_with(&args.model, &opts, &mut progress)
        .with_context(|| format!("pulling '{}'", args.model))?;
    drop(progress);
    // The path on stdout lets scripts use `$(strata pull ...)`; everything else went to stderr.
    println!("{}", path.display());
    Ok(())
}
