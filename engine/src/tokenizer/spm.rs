//! SentencePiece (`tokenizer.ggml.model = "llama"`) encoding, as llama.cpp's
//! `llm_tokenizer_spm_session` does it: split into UTF-8 characters, then repeatedly merge the
//! adjacent pair whose concatenation is the vocabulary token with the highest score, and spell
//! whatever is left that is not a token with byte tokens `<0xXX>`.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::Vocab;

/// One symbol of the linked list being merged: a byte range of the text.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge. The heap pops the highest score first, and on ties the leftmost pair,
/// which is llama.cpp's `llm_bigram_spm::comparator`.
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// Appends the tokens of `text` (spaces already escaped to U+2581) to `out`.
pub(super) fn encode(vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
    if text.is_empty() {
        return;
    }
    let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
    for (i, (start, c)) in text.char_indices().enumerate() {
        symbols.push(Symbol {
            start,
            len: c.len_utf8(),
            prev: i.checked_sub(1),
            next: None,
        });
        if i > 0 {
            symbols[i - 1].next = Some(i);
        }
    }
    let mut heap = BinaryHeap::new();
    let mut buf = String::new();
    let try_add = |heap: &mut BinaryHeap<Bigram>,
                   buf: &mut String,
                   symbols: &[Symbol],
                   left: Option<usize>,
                   right: Option<usize>| {
        let (Some(left), Some(right)) = (left, right) else {
            return;
        };
        let (l, r) = (symbols[left], symbols[right]);
        buf.clear();
        buf.push_str(&text[l.start..l.start + l.len]);
        buf.push_str(&text[r.start..r.start + r.len]);
        if let Some(id) = vocab.token_to_id.get(buf.as_str()) {
            heap.push(Bigram {
                left,
                right,
                score: vocab.tokens[*id as usize].score,
                size: buf.len(),
            });
        }
    };
    for i in 1..symbols.len() {
        try_add(&mut heap, &mut buf, &symbols, Some(i - 1), Some(i));
    }
    while let Some(bigram) = heap.pop() {
        let (l, r) = (symbols[bigram.left], symbols[bigram.right]);
        // A pair is stale once either side has been merged into something else.
        if l.len == 0 || r.len == 0 || l.len + r.len != bigram.size {
            continue;
        }
        symbols[bigram.left].len += r.len;
        symbols[bigram.left].next = r.next;
        symbols[bigram.right].len = 0;
        if let Some(next) = r.next {
            symbols[next].prev = Some(bigram.left);
        }
        let left = symbols[bigram.left];
        try_add(&mut heap, &mut buf, &symbols, left.prev, Some(bigram.left));
        try_add(&mut heap, &mut buf, &symbols, Some(bigram.left), left.next);
    }
    let mut i = Some(0);
    while let Some(idx) = i {
        let s = symbols[idx];
        let piece = &text[s.start..s.start + s.len];
        match vocab.token_to_id.get(piece) {
            Some(&id) => out.push(id),
            None => out.extend(piece.bytes().filter_map(|b| vocab.byte_token(b))),
        }
        i = s.next;
    }
}
