//! `strata gen`: a GGUF model of a chosen architecture with deterministic random weights —
//! for tests, and for files larger than RAM without downloading one.

use std::time::Instant;

use anyhow::Context as _;
use strata_engine::model::Arch;
use strata_engine::synth::{GenSpec, Vocab, write_file};
use strata_storage::gguf::GgufFile;

use super::common::resolve_model;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Architecture: llama, qwen2, qwen3, gemma3, or with experts: mixtral (llama with 8
    /// experts), qwen2moe, qwen3moe, olmoe.
    #[arg(long, default_value = "llama")]
    arch: String,
    /// tiny (a few MB, for tests) or big (about 30 GB, larger than this machine's RAM).
    #[arg(long, default_value = "tiny", value_parser = ["tiny", "big"])]
    preset: String,
    /// Where to write the file.
    #[arg(short = 'o', long)]
    output: std::path::PathBuf,
    /// Copy the tokenizer of this model (store name or path) instead of a 259-token byte vocab.
    #[arg(long)]
    vocab_from: Option<String>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Override the number of layers (to size a file).
    #[arg(long)]
    layers: Option<usize>,
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    let big = args.preset == "big";
    let mut spec = if args.arch == "mixtral" {
        GenSpec::moe(Arch::Llama, big)
    } else {
        let arch = Arch::from_name(&args.arch)?;
        if big {
            GenSpec::big(arch)
        } else {
            GenSpec::tiny(arch)
        }
    };
    spec.seed = args.seed;
    if let Some(l) = args.layers {
        if l == 0 || l > 1024 {
            anyhow::bail!("--layers must be between 1 and 1024");
        }
        spec.n_layer = l;
    }
    let vocab_file = match &args.vocab_from {
        Some(spec) => {
            let path = resolve_model(spec)?;
            Some(GgufFile::open(&path).with_context(|| format!("reading {}", path.display()))?)
        }
        None => None,
    };
    let vocab = match &vocab_file {
        Some(f) => Vocab::From(&f.metadata),
        None => Vocab::Bytes,
    };
    let t0 = Instant::now();
    let bytes = write_file(&spec, vocab, &args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "wrote {} ({}, {} layers, {:.2} GB) in {secs:.1} s ({:.2} GB/s)",
        args.output.display(),
        args.arch,
        spec.n_layer,
        bytes as f64 / 1e9,
        bytes as f64 / 1e9 / secs
    );
    Ok(())
}
