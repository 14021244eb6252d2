//! The store's [`Progress`] on stderr: one indicatif bar per operation at a terminal, a line
//! per step otherwise.
//!
//! An operation is a single transfer (a download, a copy, a verification) or a task of several
//! (a model published in parts): a task is one bar with the task's total, each part a step
//! named in the bar's message. When stderr is not a terminal (a pipe, a log file), nothing is
//! drawn; each step is a line when it begins, with one more per tenth of the operation done,
//! so a log shows that something is happening without escape codes.

use std::io::IsTerminal as _;

use indicatif::{ProgressBar, ProgressStyle};
use strata_storage::store::Progress;

/// What is being reported: its label, size and progress (for the plain lines).
struct Unit {
    label: String,
    total: Option<u64>,
    done: u64,
    /// Tenths of `total` already reported.
    tenths: u64,
}

impl Unit {
    fn new(label: &str, total: Option<u64>) -> Unit {
        Unit {
            label: label.to_owned(),
            total,
            done: 0,
            tenths: 0,
        }
    }

    /// A line for each tenth newly done, when the size is known and large enough to take a
    /// while (a small file's tenths would be lines printed all at once).
    fn advance(&mut self, bytes: u64) -> Option<String> {
        self.done += bytes;
        let total = self.total.filter(|&t| t >= 16 << 20)?;
        let tenths = (self.done.min(total) * 10 / total).min(9);
        if tenths <= self.tenths {
            return None;
        }
        self.tenths = tenths;
        Some(format!(
            "{}: {}% ({} of {})",
            self.label,
            tenths * 10,
            human(self.done),
            human(total)
        ))
    }
}

pub struct BarProgress {
    tty: bool,
    /// The current transfer's bar (outside a task).
    bar: Option<ProgressBar>,
    /// The current task's bar.
    task_bar: Option<ProgressBar>,
    task: Option<Unit>,
    transfer: Option<Unit>,
}

impl Default for BarProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl BarProgress {
    pub fn new() -> Self {
        Self::with_terminal(std::io::stderr().is_terminal())
    }

    fn with_terminal(tty: bool) -> Self {
        Self {
            tty,
            bar: None,
            task_bar: None,
            task: None,
            transfer: None,
        }
    }

    fn new_bar(&self, label: &str, total: Option<u64>) -> ProgressBar {
        let bar = match total {
            Some(total) => ProgressBar::new(total),
            None => ProgressBar::new_spinner(),
        };
        bar.set_style(style(total.is_some()));
        bar.set_message(label.to_owned());
        bar
    }

    /// The unit a byte count belongs to: the task's when there is one.
    fn unit(&mut self) -> Option<&mut Unit> {
        self.task.as_mut().or(self.transfer.as_mut())
    }
}

/// Byte bars when the size is known, a spinner with a byte count when it is not.
fn style(known_total: bool) -> ProgressStyle {
    let template = if known_total {
        "{msg:32!} [{bar:32.cyan/blue}] {bytes:>10}/{total_bytes:10} {binary_bytes_per_sec:>12} {eta:>4}"
    } else {
        "{spinner} {msg:32!} {bytes:>10} {binary_bytes_per_sec:>12}"
    };
    // The templates are constants; the fallback only guards against an indicatif change.
    ProgressStyle::with_template(template)
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// Bytes as people read them (binary units, as the bars show them).
fn human(b: u64) -> String {
    indicatif::BinaryBytes(b).to_string()
}

fn sized(label: &str, total: Option<u64>) -> String {
    match total {
        Some(t) => format!("{label} ({})", human(t)),
        None => label.to_owned(),
    }
}

impl Progress for BarProgress {
    fn begin_task(&mut self, label: &str, total_bytes: Option<u64>) {
        self.end_task(false);
        if self.tty {
            self.task_bar = Some(self.new_bar(label, total_bytes));
        } else {
            eprintln!("{}", sized(label, total_bytes));
        }
        self.task = Some(Unit::new(label, total_bytes));
    }

    fn end_task(&mut self, ok: bool) {
        self.finish();
        if let Some(bar) = self.task_bar.take() {
            if ok {
                // Parts may pack a little tighter or looser than the whole: done is full.
                if let Some(len) = bar.length() {
                    bar.set_position(len);
                }
                bar.finish();
            } else {
                bar.abandon();
            }
        }
        if let Some(t) = self.task.take()
            && ok
            && !self.tty
        {
            eprintln!("{}: done ({})", t.label, human(t.done));
        }
    }

    fn start(&mut self, label: &str, total_bytes: Option<u64>) {
        self.finish();
        if !self.tty {
            eprintln!("{}", sized(label, total_bytes));
        }
        match &self.task_bar {
            // A step of the task: the task's bar names it.
            Some(bar) => bar.set_message(label.to_owned()),
            None if self.tty && self.task.is_none() => {
                self.bar = Some(self.new_bar(label, total_bytes));
            }
            None => {}
        }
        if self.task.is_none() {
            self.transfer = Some(Unit::new(label, total_bytes));
        }
    }

    fn advance(&mut self, bytes: u64) {
        if let Some(bar) = self.task_bar.as_ref().or(self.bar.as_ref()) {
            bar.inc(bytes);
            // Parts may add up to a little more than the task's total.
            if let Some(len) = bar.length()
                && bar.position() > len
            {
                bar.set_length(bar.position());
            }
        }
        let tty = self.tty;
        if let Some(line) = self.unit().and_then(|u| u.advance(bytes))
            && !tty
        {
            eprintln!("{line}");
        }
    }

    fn finish(&mut self) {
        // `abandon` keeps the bar where it stopped, so a failed transfer is not drawn as done.
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
        self.transfer = None;
    }

    fn message(&mut self, msg: &str) {
        match self.task_bar.as_ref().or(self.bar.as_ref()) {
            Some(bar) => bar.suspend(|| eprintln!("{msg}")),
            None => eprintln!("{msg}"),
        }
    }
}

impl Drop for BarProgress {
    fn drop(&mut self) {
        self.finish();
        if let Some(bar) = self.task_bar.take() {
            bar.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_come_once_per_tenth() {
        const M: u64 = 1 << 20;
        let mut u = Unit::new("pulling x", Some(1000 * M));
        assert_eq!(u.advance(50 * M), None);
        assert_eq!(
            u.advance(60 * M).as_deref(),
            Some("pulling x: 10% (110.00 MiB of 1000.00 MiB)")
        );
        assert_eq!(u.advance(10 * M), None);
        assert_eq!(
            u.advance(400 * M).map(|l| l.starts_with("pulling x: 50%")),
            Some(true)
        );
        // Past the end: the last line says 90%, and "done" is the caller's to say.
        assert!(u.advance(10_000 * M).is_some_and(|l| l.contains("90%")));
        assert_eq!(u.advance(1), None);
        // A small file's tenths would all print at once: none.
        let mut small = Unit::new("z", Some(1000));
        assert_eq!(small.advance(1000), None);
        let mut unknown = Unit::new("y", None);
        assert_eq!(unknown.advance(1 << 30), None);
    }

    #[test]
    fn a_task_is_one_unit_whatever_its_steps() {
        let mut p = BarProgress::with_terminal(false);
        const M: u64 = 1 << 20;
        p.begin_task("pulling m", Some(100 * M));
        p.start("m part 1/2", Some(50 * M));
        p.advance(50 * M);
        p.finish();
        p.start("m part 2/2", Some(50 * M));
        p.advance(30 * M);
        let t = p.task.as_ref().expect("a task");
        assert_eq!((t.done, t.tenths), (80 * M, 8));
        p.end_task(true);
        assert!(p.task.is_none() && p.transfer.is_none());
    }
}
