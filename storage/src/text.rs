//! Text taken from untrusted places (a model file's strings, a client's request) made fit to
//! quote in a one-line message: short, and unable to move a terminal's cursor or change its
//! state.

use std::borrow::Cow;
use std::fmt::Write as _;

/// How many characters of a file's string a message quotes: enough to recognise it.
pub const QUOTE_CHARS: usize = 80;

/// `s` with control characters (newlines, escape sequences, C1 codes) and the invisible
/// characters that reorder or hide text (bidirectional overrides, line separators) written as
/// `\u{…}` escapes, and cut to its first `max` characters, followed by `…` and its full
/// length in bytes, when longer. Borrowed when nothing needed changing.
pub fn clip(s: &str, max: usize) -> Cow<'_, str> {
    let long = s.chars().nth(max).is_some();
    if !long && !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len().min(max * 2) + 32);
    for c in s.chars().take(max) {
        if needs_escape(c) {
            let _ = write!(out, "{}", c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    if long {
        let _ = write!(out, "… ({} bytes in all)", s.len());
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_plain_text_is_borrowed() {
        assert!(matches!(clip("llama", 80), Cow::Borrowed("llama")));
    }

    #[test]
    fn long_text_is_cut_and_says_how_long_it_was() {
        let s = "x".repeat(10_000_000);
        let c = clip(&s, 80);
        assert!(c.starts_with(&"x".repeat(80)));
        assert!(c.ends_with("… (10000000 bytes in all)"), "{c}");
        assert!(c.len() < 120);
    }

    #[test]
    fn terminal_controls_are_escaped() {
        assert_eq!(clip("a\x1b[2Jb\nc", 80), "a\\u{1b}[2Jb\\u{a}c");
        assert_eq!(clip("\u{202e}evil", 80), "\\u{202e}evil");
        // Cut on characters, never inside one.
        assert_eq!(clip("ééé", 2), "éé… (6 bytes in all)");
    }
}
