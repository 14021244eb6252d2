//! `strata gen`: a GGUF model of a chosen architecture with deterministic random weights —
//! for tests, and for files larger than RAM without downloading one.

use std::time::Instant;

use anyhow::Context as _;
use strata_engine::model::Arch;
use strata_engine::synth::{GenSpec, Vocab, write_file};
use strata_storage::gguf::GgufFile;
use strata_storage::quant::GgmlType;

use super::common::resolve_model;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Architecture: llama, qwen2, qwen3, gemma3, or with experts: mixtral (llama with 8
    /// experts), qwen2moe, qwen3moe, olmoe.
    #[arg(long, default_value = "llama", value_parser = [
        "llama", "qwen2", "qwen3", "gemma3", "mixtral", "qwen2moe", "qwen3moe", "olmoe",
    ])]
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
    /// Override each expert's hidden size (MoE architectures; smaller experts, smaller reads).
    #[arg(long, value_name = "N")]
    expert_ff: Option<usize>,
    /// The matrices' quant type (q8_0, q4_k, ...; q4_k_m: q4_k with q6_k for the down and
    /// value projections, as llama-quantize's Q4_K_M).
    #[arg(long, value_name = "TYPE")]
    weight_type: Option<String>,
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
    if let Some(ff) = args.expert_ff {
        if spec.n_expert == 0 {
            anyhow::bail!("--expert-ff: {} has no experts", args.arch);
        }
        if ff == 0 || ff > 1 << 16 {
            anyhow::bail!("--expert-ff must be between 1 and 65536");
        }
        spec.n_ff_exp = ff;
        // Mixtral (llama) and OLMoE size their experts with feed_forward_length.
        if matches!(spec.arch, Arch::Llama | Arch::Olmoe) {
            spec.n_ff = ff;
        }
    }
    if let Some(t) = &args.weight_type {
        let name = t.to_ascii_lowercase();
        let find = |n: &str| {
            GgmlType::ALL
                .into_iter()
                .find(|ty| ty.name().eq_ignore_ascii_case(n))
        };
        let (w, d) = match name.as_str() {
            "q4_k_m" => (GgmlType::Q4K, GgmlType::Q6K),
            n => {
                let ty = find(n).ok_or_else(|| {
                    anyhow::anyhow!(
                        "--weight-type {t:?}: not a ggml type (q8_0, q4_k, q4_k_m, ...)"
                    )
                })?;
                (ty, ty)
            }
        };
        spec.weight_type = w;
        spec.down_type = d;
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
    let mut progress = crate::progress::BarProgress::new();
    let bytes = write_file(&spec, vocab, &args.output, &mut progress)
        .with_context(|| format!("writing {}", args.output.display()))?;
    drop(progress);
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
