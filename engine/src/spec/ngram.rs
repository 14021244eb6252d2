//! Model-free drafts: prompt lookup. The sequence so far (prompt and answer) is searched for an
//! earlier occurrence of its last few tokens, and the tokens that followed it are proposed —
//! llama.cpp's `--spec-type ngram-simple` (a backward scan) and `ngram-map-k` (a map from each
//! key of `k` tokens to where it last occurred, kept up to date as the sequence grows). Editing
//! prompts, where the answer copies long stretches of the input, are where they pay.

use std::collections::HashMap;

/// Key lengths tried by the scan, longest first.
const SCAN_KEYS: [usize; 2] = [3, 2];
/// The map's key length.
const MAP_KEY: usize = 3;

/// The sequence a draft has seen, kept in step with the caller's (which may be cut back, or
/// replaced by another conversation's).
#[derive(Default)]
pub(crate) struct Seen {
    pub(crate) tokens: Vec<u32>,
}

impl Seen {
    /// Makes `tokens` equal `history` followed by `last`; returns how many leading tokens were
    /// kept.
    pub(crate) fn sync(&mut self, history: &[u32], last: u32) -> usize {
        let common = self
            .tokens
            .iter()
            .zip(history.iter().chain(std::iter::once(&last)))
            .take_while(|(a, b)| a == b)
            .count();
        self.tokens.truncate(common);
        if common <= history.len() {
            self.tokens.extend_from_slice(&history[common..]);
            self.tokens.push(last);
        }
        common
    }
}

/// `ngram-simple`: scans back for the latest earlier occurrence of the last 3 (else 2) tokens.
pub(crate) fn lookup_scan(seq: &[u32], n: usize, out: &mut Vec<u32>) {
    out.clear();
    for key in SCAN_KEYS {
        if seq.len() <= key {
            continue;
        }
        let tail = &seq[seq.len() - key..];
        // Occurrences that end before the sequence's own last token, latest first.
        let found = (0..seq.len() - key)
            .rev()
            .find(|&i| &seq[i..i + key] == tail);
        if let Some(i) = found {
            let from = i + key;
            out.extend_from_slice(&seq[from..(from + n).min(seq.len())]);
            return;
        }
    }
}

/// `ngram-map-k`: each key of [`MAP_KEY`] tokens mapped to the position after its latest
/// occurrence, indexed as the sequence grows.
#[derive(Default)]
pub struct NgramMap {
    seen: Seen,
    /// Keys ending before this position are in the map.
    indexed: usize,
    map: HashMap<[u32; MAP_KEY], usize>,
}

impl NgramMap {
    pub(crate) fn propose(&mut self, history: &[u32], last: u32, n: usize, out: &mut Vec<u32>) {
        out.clear();
        let kept = self.seen.sync(history, last);
        // Keys read tokens up to `indexed + MAP_KEY`; any of those changed invalidates them.
        if kept < self.indexed + MAP_KEY {
            // The sequence was cut back or replaced: index it again.
            self.map.clear();
            self.indexed = 0;
        }
        let seq = &self.seen.tokens;
        // Index every key that ends before the last token (the last key is what we look up).
        while self.indexed + MAP_KEY < seq.len() {
            let i = self.indexed;
            let key: [u32; MAP_KEY] = seq[i..i + MAP_KEY].try_into().expect("key length");
            self.map.insert(key, i + MAP_KEY);
            self.indexed += 1;
        }
        if seq.len() < MAP_KEY {
            return;
        }
        let key: [u32; MAP_KEY] = seq[seq.len() - MAP_KEY..].try_into().expect("key length");
        if let Some(&from) = self.map.get(&key) {
            out.extend_from_slice(&seq[from..(from + n).min(seq.len())]);
        }
    }
}

/// `ngram-simple` with its own copy of the sequence.
#[derive(Default)]
pub struct NgramScan {
    seen: Seen,
}

impl NgramScan {
    pub(crate) fn propose(&mut self, history: &[u32], last: u32, n: usize, out: &mut Vec<u32>) {
        self.seen.sync(history, last);
        lookup_scan(&self.seen.tokens, n, out);
    }
}
