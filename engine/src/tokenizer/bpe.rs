//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`), as llama.cpp's `llm_tokenizer_bpe_session`
//! does it: pre-tokenize, map each byte to its GPT-2 stand-in character, then merge adjacent
//! symbols lowest merge rank first.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use super::pretok::PreTokenizer;
use super::{TokenizerError, Vocab};

/// Merge tables of a BPE vocabulary.
///
/// Symbols are interned as ids: a vocabulary token's id, or an id at or past `n_vocab` for a
/// merge operand that is not itself a token. That makes a merge lookup one hash of two `u32`s
/// instead of building and hashing strings in the inner loop.
pub(super) struct Bpe {
    pre: PreTokenizer,
    /// Llama-3 emits a pre-token that is already a whole token without merging it.
    ignore_merges: bool,
    /// `(left, right)` → `(rank, merged symbol)`.
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Interned merge operands and results that are not vocabulary tokens.
    extra: HashMap<Box<str>, u32>,
    /// Byte → its GPT-2 stand-in character.
    byte_char: [char; 256],
    /// Stand-in character → byte, for decoding.
    char_byte: HashMap<char, u8>,
}

/// GPT-2's `bytes_to_unicode`: printable Latin-1 bytes stand for themselves, the rest are moved
/// to U+0100 upwards so every byte is a visible character.
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[usize::from(b)] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + n).unwrap_or('\u{FFFD}');
            n += 1;
            c
        };
    }
    table
}

impl Bpe {
    pub(super) fn new(
        vocab: &Vocab,
        merges: &[String],
        pre: PreTokenizer,
        ignore_merges: bool,
    ) -> Result<Self, TokenizerError> {
        let n_vocab = vocab.tokens.len() as u32;
        let mut extra: HashMap<Box<str>, u32> = HashMap::new();
        let mut intern = |s: &str| -> u32 {
            if let Some(&id) = vocab.token_to_id.get(s) {
                return id;
            }
            let next = n_vocab + extra.len() as u32;
            *extra.entry(s.into()).or_insert(next)
        };
        let mut table = HashMap::with_capacity(merges.len());
        let mut joined = String::new();
        for (rank, merge) in merges.iter().enumerate() {
            // llama.cpp searches for the separator from byte 1, so a left operand may be " ".
            let sep = merge
                .as_bytes()
                .iter()
                .skip(1)
                .position(|&b| b == b' ')
                .map(|p| p + 1)
                .ok_or_else(|| TokenizerError::BadMerge {
                    index: rank,
                    merge: merge.clone(),
                })?;
            let (left, right) = (&merge[..sep], &merge[sep + 1..]);
            joined.clear();
            joined.push_str(left);
            joined.push_str(right);
            let key = (intern(left), intern(right));
            let merged = intern(&joined);
            // The first (lowest-rank) occurrence of a pair wins, as in llama.cpp's bpe_ranks.
            table.entry(key).or_insert((rank as u32, merged));
        }
        let byte_char = byte_chars();
        let char_byte = byte_char
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        Ok(Bpe {
            pre,
            ignore_merges,
            merges: table,
            extra,
            byte_char,
            char_byte,
        })
    }

    fn symbol_id(&self, vocab: &Vocab, s: &str) -> Option<u32> {
        vocab
            .token_to_id
            .get(s)
            .or_else(|| self.extra.get(s))
            .copied()
    }

    /// Appends the tokens of raw `text` to `out`.
    pub(super) fn encode(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
        let mut mapped = String::new();
        for word in self.pre.split(text) {
            mapped.clear();
            mapped.extend(word.bytes().map(|b| self.byte_char[usize::from(b)]));
            self.encode_word(vocab, &mapped, out);
        }
    }

    fn encode_word(&self, vocab: &Vocab, word: &str, out: &mut Vec<u32>) {
        if word.is_empty() {
            return;
        }
        if self.ignore_merges
            && let Some(&id) = vocab.token_to_id.get(word)
        {
            out.push(id);
            return;
        }
        // (byte start, byte len, symbol id, prev, next)
        struct Sym {
            start: usize,
            len: usize,
            id: Option<u32>,
            prev: Option<usize>,
            next: Option<usize>,
        }
        let mut syms: Vec<Sym> = Vec::with_capacity(word.len());
        for (i, (start, c)) in word.char_indices().enumerate() {
            let len = c.len_utf8();
            syms.push(Sym {
                start,
                len,
                id: self.symbol_id(vocab, &word[start..start + len]),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                syms[i - 1].next = Some(i);
            }
        }
        // Min-heap on (rank, left index): llama.cpp's `llm_bigram_bpe::comparator`.
        let mut heap: BinaryHeap<Reverse<(u32, usize, usize, usize)>> = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<_>, syms: &[Sym], l: Option<usize>, r: Option<usize>| {
            let (Some(l), Some(r)) = (l, r) else { return };
            let (Some(a), Some(b)) = (syms[l].id, syms[r].id) else {
                return;
            };
            if let Some(&(rank, _)) = self.merges.get(&(a, b)) {
                heap.push(Reverse((rank, l, r, syms[l].len + syms[r].len)));
            }
        };
        for i in 1..syms.len() {
            push(&mut heap, &syms, Some(i - 1), Some(i));
        }
        while let Some(Reverse((_, l, r, size))) = heap.pop() {
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != size {
                continue;
            }
            let (Some(a), Some(b)) = (syms[l].id, syms[r].id) else {
                continue;
            };
            let merged = self.merges.get(&(a, b)).map(|&(_, m)| m);
            let rlen = syms[r].len;
            let rnext = syms[r].next;
            syms[l].len += rlen;
            syms[l].id = merged;
            syms[l].next = rnext;
            syms[r].len = 0;
            if let Some(n) = rnext {
                syms[n].prev = Some(l);
            }
            let lprev = syms[l].prev;
            push(&mut heap, &syms, lprev, Some(l));
            push(&mut heap, &syms, Some(l), rnext);
        }
        let n_vocab = vocab.tokens.len() as u32;
        let mut i = Some(0);
        while let Some(idx) = i {
            let s = &syms[idx];
            match s.id {
                Some(id) if id < n_vocab => out.push(id),
                _ => {
                    // llama.cpp's fallback: look each raw byte up as a one-byte token.
                    let piece = &word[s.start..s.start + s.len];
                    for b in piece.bytes() {
                        let one = [b];
                        if let Some(&id) = std::str::from_utf8(&one)
                            .ok()
                            .and_then(|s| vocab.token_to_id.get(s))
                        {
                            out.push(id);
                        }
                    }
                }
            }
            i = s.next;
        }
    }

    /// The bytes a normal BPE token stands for: each stand-in character mapped back to its
    /// byte. Characters outside the table (never in a well-formed vocabulary) pass through as
    /// their UTF-8.
    pub(super) fn decode_text(&self, text: &str, out: &mut Vec<u8>) {
        for c in text.chars() {
            match self.char_byte.get(&c) {
                Some(&b) => out.push(b),
                None => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
    }
}
