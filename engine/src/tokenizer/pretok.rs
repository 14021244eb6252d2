//! Pre-tokenizers for byte-level BPE vocabularies.
//!
//! llama.cpp splits text with hand-written matchers for the regexes it sees most (GPT-2's and
//! Llama-3's) because a general regex engine is slow and its Unicode classes disagree between
//! platforms. We do the same: each function below is the exact semantics of one regex, written as
//! a single forward scan over code points, so a 100 KB prompt splits in microseconds and no input
//! can make it backtrack.

use std::sync::OnceLock;

/// Which pre-tokenizer regex a vocabulary was trained with (`tokenizer.ggml.pre`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PreTokenizer {
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
    Gpt2,
    /// Llama-3's regex with `\p{N}{1,max_digits}`: Qwen2 uses groups of one digit, Llama-3 of
    /// up to three.
    Llama3 { max_digits: usize },
}

impl PreTokenizer {
    /// Maps a `tokenizer.ggml.pre` value to its splitter, as llama.cpp's `llama_vocab::load`
    /// does; `None` means we do not know it.
    pub(crate) fn from_name(pre: &str) -> Option<Self> {
        Some(match pre {
            "default" | "gpt2" | "gpt-2" | "phi-2" | "olmo" | "jais" | "roberta-bpe" => {
                PreTokenizer::Gpt2
            }
            "qwen2" | "qwen3" | "deepseek-r1-qwen" | "megrez" => {
                PreTokenizer::Llama3 { max_digits: 1 }
            }
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "smollm" | "dbrx" => {
                PreTokenizer::Llama3 { max_digits: 3 }
            }
            _ => return None,
        })
    }

    /// Splits `text` into pre-tokens (sub-slices, in order, covering all of `text`).
    pub(crate) fn split<'a>(&self, text: &'a str) -> Vec<&'a str> {
        let cpts: Vec<(usize, char)> = text.char_indices().collect();
        let lens = match *self {
            PreTokenizer::Gpt2 => split_gpt2(&cpts),
            PreTokenizer::Llama3 { max_digits } => split_llama3(&cpts, max_digits),
        };
        let mut out = Vec::with_capacity(lens.len());
        let mut pos = 0usize;
        for n in lens {
            let start = byte_at(&cpts, text, pos);
            let end = byte_at(&cpts, text, pos + n);
            out.push(&text[start..end]);
            pos += n;
        }
        out
    }
}

/// Byte offset of code point `i` (or the end of `text`).
fn byte_at(cpts: &[(usize, char)], text: &str, i: usize) -> usize {
    cpts.get(i).map_or(text.len(), |&(b, _)| b)
}

/// The three Unicode classes the regexes use; `present` is false past the end of the text,
/// which is what lets a class test double as a bounds test (llama.cpp's `as_uint() != 0`).
#[derive(Clone, Copy, Default)]
struct Flags {
    present: bool,
    letter: bool,
    number: bool,
    whitespace: bool,
}

fn flags(c: char) -> Flags {
    Flags {
        present: true,
        letter: is_letter(c),
        number: c.is_numeric(),
        whitespace: c.is_whitespace(),
    }
}

/// `\p{L}`: general category Letter. `char::is_alphabetic` is wider (it includes combining
/// marks and letter-like numbers), so the ranges come from regex-syntax's Unicode tables.
fn is_letter(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphabetic();
    }
    static RANGES: OnceLock<Vec<(char, char)>> = OnceLock::new();
    let ranges = RANGES.get_or_init(|| {
        use regex_syntax::hir::{Class, HirKind};
        match regex_syntax::Parser::new()
            .parse(r"\p{L}")
            .map(|h| h.into_kind())
        {
            Ok(HirKind::Class(Class::Unicode(cls))) => {
                cls.ranges().iter().map(|r| (r.start(), r.end())).collect()
            }
            _ => Vec::new(),
        }
    });
    if ranges.is_empty() {
        return c.is_alphabetic();
    }
    ranges
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

/// Reads code points and classes with out-of-range positions as "absent".
struct Cursor<'a> {
    cpts: &'a [(usize, char)],
}

impl Cursor<'_> {
    fn cpt(&self, i: usize) -> Option<char> {
        self.cpts.get(i).map(|&(_, c)| c)
    }
    fn flags(&self, i: usize) -> Flags {
        self.cpt(i).map(flags).unwrap_or_default()
    }
}

/// Contractions `'s 't 're 've 'm 'll 'd`; returns the match length in code points.
fn contraction(cur: &Cursor<'_>, pos: usize, case_insensitive: bool) -> Option<usize> {
    if cur.cpt(pos) != Some('\'') {
        return None;
    }
    let low = |c: Option<char>| {
        c.map(|c| {
            if case_insensitive {
                c.to_ascii_lowercase()
            } else {
                c
            }
        })
    };
    let next = low(cur.cpt(pos + 1))?;
    if matches!(next, 's' | 't' | 'm' | 'd') {
        return Some(2);
    }
    let next2 = low(cur.cpt(pos + 2))?;
    if matches!((next, next2), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
        return Some(3);
    }
    None
}

/// Splits on GPT-2's regex; returns pre-token lengths in code points.
fn split_gpt2(cpts: &[(usize, char)]) -> Vec<usize> {
    let cur = Cursor { cpts };
    let n = cpts.len();
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < n {
        let start = pos;
        let c = cpts[pos].1;
        if let Some(len) = contraction(&cur, pos, false) {
            out.push(len);
            pos += len;
            continue;
        }
        let mut f2 = if c == ' ' {
            cur.flags(pos + 1)
        } else {
            flags(c)
        };
        // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`
        let class: Option<fn(Flags) -> bool> = if f2.letter {
            Some(|f| f.letter)
        } else if f2.number {
            Some(|f| f.number)
        } else if f2.present && !(f2.whitespace || f2.letter || f2.number) {
            Some(|f| f.present && !(f.whitespace || f.letter || f.number))
        } else {
            None
        };
        if let Some(class) = class {
            pos += usize::from(c == ' ');
            while class(f2) {
                pos += 1;
                f2 = cur.flags(pos);
            }
            out.push(pos - start);
            continue;
        }
        pos = whitespace_run(&cur, pos, false);
        out.push(pos - start);
    }
    out
}

/// `\s*[\r\n]+` (only when `newline_rule`), `\s+(?!\S)`, `\s+`, or one code point that
/// nothing matched; returns the end position.
fn whitespace_run(cur: &Cursor<'_>, pos: usize, newline_rule: bool) -> usize {
    let mut count = 0usize;
    let mut last_newline_end = 0usize;
    while cur.flags(pos + count).whitespace {
        if matches!(cur.cpt(pos + count), Some('\r' | '\n')) {
            last_newline_end = pos + count + 1;
        }
        count += 1;
    }
    if newline_rule && last_newline_end > 0 {
        return last_newline_end;
    }
    if count > 1 && cur.cpt(pos + count).is_some() {
        // Leave the last space to prefix the next word.
        return pos + count - 1;
    }
    if count > 0 {
        return pos + count;
    }
    pos + 1
}

/// Splits on Llama-3's regex (Qwen2's when `max_digits == 1`):
/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,k}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
fn split_llama3(cpts: &[(usize, char)], max_digits: usize) -> Vec<usize> {
    let cur = Cursor { cpts };
    let n = cpts.len();
    let max_digits = max_digits.max(1);
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < n {
        let start = pos;
        let c = cpts[pos].1;
        let f = flags(c);
        if let Some(len) = contraction(&cur, pos, true) {
            out.push(len);
            pos += len;
            continue;
        }
        // `[^\r\n\p{L}\p{N}]?\p{L}+`
        if !(c == '\r' || c == '\n' || f.number) && (f.letter || cur.flags(pos + 1).letter) {
            pos += 1;
            while cur.flags(pos).letter {
                pos += 1;
            }
            out.push(pos - start);
            continue;
        }
        // `\p{N}{1,k}`
        if f.number {
            let mut group = pos;
            while cur.flags(pos).number {
                pos += 1;
                if pos - group >= max_digits {
                    out.push(pos - group);
                    group = pos;
                }
            }
            if pos > group {
                out.push(pos - group);
            }
            continue;
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
        let mut f2 = if c == ' ' { cur.flags(pos + 1) } else { f };
        if f2.present && !(f2.whitespace || f2.letter || f2.number) {
            pos += usize::from(c == ' ');
            while f2.present && !(f2.whitespace || f2.letter || f2.number) {
                pos += 1;
                f2 = cur.flags(pos);
            }
            while matches!(cur.cpt(pos), Some('\r' | '\n')) {
                pos += 1;
            }
            out.push(pos - start);
            continue;
        }
        pos = whitespace_run(&cur, pos, true);
        out.push(pos - start);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen2_splits_digits_singly_and_keeps_space_before_words() {
        let p = PreTokenizer::Llama3 { max_digits: 1 };
        assert_eq!(p.split("ab 12 x"), vec!["ab", " ", "1", "2", " x"]);
        assert_eq!(p.split("a  \n\n b"), vec!["a", "  \n\n", " b"]);
        assert_eq!(p.split("don't"), vec!["don", "'t"]);
        assert_eq!(p.split("  two  "), vec![" ", " two", "  "]);
    }

    #[test]
    fn llama3_groups_three_digits() {
        let p = PreTokenizer::Llama3 { max_digits: 3 };
        assert_eq!(p.split("1234567"), vec!["123", "456", "7"]);
    }

    #[test]
    fn gpt2_split() {
        let p = PreTokenizer::Gpt2;
        assert_eq!(
            p.split("Hello world's 123!!"),
            vec!["Hello", " world", "'s", " 123", "!!"]
        );
        assert!(p.split("").is_empty());
    }

    #[test]
    fn combining_mark_is_not_a_letter() {
        assert!(is_letter('é'));
        assert!(!is_letter('\u{0301}'));
        assert!(is_letter('数'));
    }
}
