//! How the store reports long transfers without knowing who is watching.

/// Receives progress from long store operations (downloads, copies, verification).
///
/// The store calls `start` once per transfer, `advance` as bytes move, and `finish` when the
/// transfer is done or abandoned; `message` carries one-line notes such as "up to date". The CLI
/// renders this with indicatif; the daemon and tests can ignore it with [`NoProgress`].
pub trait Progress {
    /// A transfer called `label` begins; `total_bytes` is known when the server said so.
    fn start(&mut self, label: &str, total_bytes: Option<u64>);
    /// `bytes` more bytes of the current transfer are done.
    fn advance(&mut self, bytes: u64);
    /// The current transfer ended (successfully or not).
    fn finish(&mut self);
    /// A note for the user; ignored unless overridden.
    fn message(&mut self, msg: &str) {
        let _ = msg;
    }
    /// Several transfers that make one task begin (a model published in parts):
    /// `total_bytes` is all of them together, so a display can draw one bar for the task and
    /// name each transfer as a step of it. Ignored unless overridden.
    fn begin_task(&mut self, label: &str, total_bytes: Option<u64>) {
        let _ = (label, total_bytes);
    }
    /// The task begun last ended, `ok` or not. Ignored unless overridden.
    fn end_task(&mut self, ok: bool) {
        let _ = ok;
    }
}

/// A [`Progress`] that reports nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&mut self, _label: &str, _total_bytes: Option<u64>) {}
    fn advance(&mut self, _bytes: u64) {}
    fn finish(&mut self) {}
}

/// Ends a transfer on every exit path, so an error does not leave a bar running.
pub(crate) struct Transfer<'a> {
    progress: &'a mut dyn Progress,
}

impl<'a> Transfer<'a> {
    pub(crate) fn start(progress: &'a mut dyn Progress, label: &str, total: Option<u64>) -> Self {
        progress.start(label, total);
        Self { progress }
    }

    pub(crate) fn advance(&mut self, bytes: u64) {
        self.progress.advance(bytes);
    }
}

impl Drop for Transfer<'_> {
    fn drop(&mut self) {
        self.progress.finish();
    }
}
