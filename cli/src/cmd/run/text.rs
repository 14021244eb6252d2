//! Text as llama-cli treats it: escape sequences in prompts, reverse prompts found in the
//! output, and the colours that tell the prompt and your input from generated text.

use std::io::IsTerminal as _;

/// llama.cpp's `string_process_escapes` (on by default, `-e`; off with `--no-escape`): `\n`,
/// `\r`, `\t`, `\'`, `\"`, `\\` and `\xHH` become the characters they name; any other
/// backslash stays as typed. `\xHH` escapes are bytes, so several may spell one UTF-8
/// character; bytes that are not UTF-8 in the end are an error.
pub fn process_escapes(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' || i + 1 == b.len() {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let c = b[i + 1];
        let simple = match c {
            b'n' => Some(b'\n'),
            b'r' => Some(b'\r'),
            b't' => Some(b'\t'),
            b'\'' => Some(b'\''),
            b'"' => Some(b'"'),
            b'\\' => Some(b'\\'),
            _ => None,
        };
        if let Some(v) = simple {
            out.push(v);
            i += 2;
            continue;
        }
        if c == b'x'
            && let Some(hex) = b.get(i + 2..i + 4)
            && let Ok(hex) = std::str::from_utf8(hex)
            && hex.bytes().all(|h| h.is_ascii_hexdigit())
            && let Ok(v) = u8::from_str_radix(hex, 16)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.extend_from_slice(&[b'\\', c]);
        i += 2;
    }
    String::from_utf8(out).map_err(|_| {
        format!("the \\x escapes in {s:?} do not spell UTF-8 text (or pass --no-escape)")
    })
}

/// Where a reverse prompt (`-r`) appears in `text` after the latest piece: searched in the
/// tail that the piece could complete, as llama-cli searches its last output.
pub fn find_reverse(text: &str, piece_len: usize, reverse: &[String]) -> bool {
    reverse.iter().any(|r| {
        let mut start = text.len().saturating_sub(r.len() + piece_len);
        while !text.is_char_boundary(start) {
            start -= 1;
        }
        !r.is_empty() && text[start..].contains(r.as_str())
    })
}

/// ANSI colours for `--color`: the prompt yellow, what you type bold green, generated text
/// as the terminal draws it (llama-cli's choice). All empty when colour is off.
#[derive(Clone, Copy, Debug, Default)]
pub struct Palette {
    pub prompt: &'static str,
    pub input: &'static str,
    pub reset: &'static str,
}

impl Palette {
    /// `--color` as given: `on`, `off` or `auto` (standard output is a terminal); absent is off.
    pub fn from_flag(flag: Option<&str>) -> Palette {
        let on = match flag {
            Some("on") => true,
            Some("auto") => std::io::stdout().is_terminal(),
            _ => false,
        };
        if on {
            Palette {
                prompt: "\x1b[33m",
                input: "\x1b[1;32m",
                reset: "\x1b[0m",
            }
        } else {
            Palette::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_processed_as_llama_cpp_does() {
        assert_eq!(
            process_escapes(r"Q: 2+2?\nA:").as_deref(),
            Ok("Q: 2+2?\nA:")
        );
        assert_eq!(
            process_escapes(r#"a\tb\rc\'d\"e\\f"#).as_deref(),
            Ok("a\tb\rc'd\"e\\f")
        );
        assert_eq!(process_escapes(r"\x41\x42").as_deref(), Ok("AB"));
        // Three bytes that spell one character.
        assert_eq!(process_escapes(r"\xe2\x82\xac").as_deref(), Ok("€"));
        // Unknown escapes, short or bad hex and a trailing backslash stay as typed.
        assert_eq!(process_escapes(r"\q\x4\xzz\").as_deref(), Ok(r"\q\x4\xzz\"));
        assert_eq!(process_escapes("é\\n").as_deref(), Ok("é\n"));
        assert!(process_escapes(r"\xff").is_err());
    }

    #[test]
    fn reverse_prompts_are_found_in_the_tail() {
        let r = vec!["User:".to_string()];
        assert!(find_reverse("Hi.\nUser:", 3, &r));
        // The piece ran past the reverse prompt.
        assert!(find_reverse("Hi.\nUser: x", 4, &r));
        assert!(!find_reverse("User: then more text", 4, &r));
        assert!(!find_reverse("abc", 1, &[]));
        assert!(!find_reverse("ééé", 2, &["x".into()]));
    }
}
