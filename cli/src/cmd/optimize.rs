//! `strata optimize`: rewrites a mixture-of-experts model so that each expert's gate, up and
//! down matrices lie side by side, and an expert streamed from disk is one read.

use std::path::PathBuf;
use std::time::Instant;

use super::common::resolve_model;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model: a store name, a path or a URL.
    model: String,
    /// Where to write the result (default: MODEL's file name with "-optimized", in the current
    /// directory). Only strata reads it; keep the original for other tools.
    #[arg(short = 'o', long)]
    output: Option<PathBuf>,
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    let input = resolve_model(&args.model)?;
    let output = match args.output {
        Some(o) => o,
        None => {
            let stem = input
                .file_stem()
                .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
            PathBuf::from(format!("{stem}-optimized.gguf"))
        }
    };
    let t0 = Instant::now();
    let mut progress = crate::progress::BarProgress::new();
    let done = strata_engine::optimize::optimize(&input, &output, &mut progress)?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "wrote {} in {secs:.1} s ({:.2} GB/s): {} MoE layers, each expert one read of {} KiB",
        output.display(),
        done.bytes_written as f64 / 1e9 / secs.max(1e-9),
        done.layers,
        done.record_bytes >> 10,
    );
    eprintln!(
        "run it with: strata run -m {} (other GGUF readers cannot: keep {})",
        output.display(),
        input.display()
    );
    Ok(())
}
