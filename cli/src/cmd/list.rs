//! `strata list`: the models in the store.

use std::io::Write as _;
use std::time::SystemTime;

use anyhow::Context as _;
use strata_storage::store::Store;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print full SHA-256 digests and paths.
    #[arg(long, short)]
    pub verbose: bool,
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    let store = Store::open_default().context("opening the model store")?;
    let models = store
        .list()
        .with_context(|| format!("listing {}", store.root().display()))?;
    let mut out = std::io::stdout().lock();
    if models.is_empty() {
        writeln!(
            out,
            "no models in {}; try `strata pull gemma3-270m`",
            store.root().display()
        )?;
        return Ok(());
    }
    let width = models
        .iter()
        .map(|m| m.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    let sha_width = if args.verbose { 64 } else { 12 };
    writeln!(
        out,
        "{:width$}  {:>9}  {:sha_width$}  MODIFIED",
        "NAME", "SIZE", "SHA256"
    )?;
    let now = SystemTime::now();
    for m in &models {
        let sha = m.sha256().map_or("-", |s| &s[..sha_width.min(s.len())]);
        write!(
            out,
            "{:width$}  {:>9}  {:sha_width$}  {}",
            m.name,
            human_size(m.size),
            sha,
            age(now, m.modified)
        )?;
        if args.verbose {
            write!(out, "  {}", m.path.display())?;
        }
        writeln!(out)?;
    }
    Ok(())
}

/// Decimal units, as download sizes are usually quoted.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if v < 10.0 {
        format!("{v:.1} {}", UNITS[unit])
    } else {
        format!("{v:.0} {}", UNITS[unit])
    }
}

/// "3 hours ago" for recent times, the UTC date for older ones.
fn age(now: SystemTime, then: SystemTime) -> String {
    let Ok(d) = now.duration_since(then) else {
        return "just now".to_owned();
    };
    let s = d.as_secs();
    let plural = |n: u64, unit: &str| format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" });
    match s {
        0..60 => "just now".to_owned(),
        60..3600 => plural(s / 60, "minute"),
        3600..86_400 => plural(s / 3600, "hour"),
        86_400..2_592_000 => plural(s / 86_400, "day"),
        _ => strata_storage::store::format_utc(then)[..10].to_owned(),
    }
}
