//! The store's [`Progress`] drawn as indicatif bars on stderr.

use indicatif::{ProgressBar, ProgressStyle};
use strata_storage::store::Progress;

/// One bar per transfer (download, copy, verification). indicatif draws nothing when stderr is
/// not a terminal, so piped and logged runs stay clean; messages are printed either way.
#[derive(Default)]
pub struct BarProgress {
    bar: Option<ProgressBar>,
}

impl BarProgress {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Byte bars when the size is known, a spinner with a byte count when it is not.
fn style(known_total: bool) -> ProgressStyle {
    let template = if known_total {
        "{msg:24!} [{bar:32.cyan/blue}] {bytes:>10}/{total_bytes:10} {binary_bytes_per_sec:>12} {eta:>4}"
    } else {
        "{spinner} {msg:24!} {bytes:>10} {binary_bytes_per_sec:>12}"
    };
    // The templates are constants; the fallback only guards against an indicatif change.
    ProgressStyle::with_template(template)
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

impl Progress for BarProgress {
    fn start(&mut self, label: &str, total_bytes: Option<u64>) {
        self.finish();
        let bar = match total_bytes {
            Some(total) => ProgressBar::new(total),
            None => ProgressBar::new_spinner(),
        };
        bar.set_style(style(total_bytes.is_some()));
        bar.set_message(label.to_owned());
        self.bar = Some(bar);
    }

    fn advance(&mut self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    fn finish(&mut self) {
        // `abandon` keeps the bar where it stopped, so a failed transfer is not drawn as done.
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }

    fn message(&mut self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{msg}")),
            None => eprintln!("{msg}"),
        }
    }
}

impl Drop for BarProgress {
    fn drop(&mut self) {
        self.finish();
    }
}
