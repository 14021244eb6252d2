//! Chat templates: turning a list of messages into the prompt text a model was trained on.
//!
//! A GGUF file usually carries its Hugging Face Jinja template in `tokenizer.chat_template`; we
//! render it with minijinja configured like transformers' sandbox (`trim_blocks`,
//! `lstrip_blocks`, `raise_exception`, `tojson`, `strftime_now`, Python string methods). A file
//! without one gets its architecture's known format, written out the way llama.cpp's
//! `llm_chat_apply_template` writes it so prompts match token for token.

use serde::{Deserialize, Serialize};
use strata_storage::gguf::{GgufError, Metadata};

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (or `tool`, for templates that know it).
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Why a template could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChatError {
    #[error("chat template metadata key {key}: {source}")]
    Metadata {
        key: &'static str,
        #[source]
        source: GgufError,
    },
    /// The Jinja source does not parse.
    #[error("chat template does not compile: {source:#}")]
    Compile {
        #[source]
        source: minijinja::Error,
    },
    /// Rendering failed, including the template calling `raise_exception`.
    #[error("chat template failed to render: {source:#}")]
    Render {
        #[source]
        source: minijinja::Error,
    },
}

/// The formats used when a file carries no template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Builtin {
    Gemma,
    ChatMl,
    Llama3,
    Llama2,
}

impl Builtin {
    fn name(self) -> &'static str {
        match self {
            Builtin::Gemma => "gemma",
            Builtin::ChatMl => "chatml",
            Builtin::Llama3 => "llama3",
            Builtin::Llama2 => "llama2",
        }
    }
}

enum Kind {
    Jinja(Box<minijinja::Environment<'static>>),
    Builtin(Builtin),
}

/// A loaded chat template.
pub struct ChatTemplate {
    kind: Kind,
    bos_token: String,
    eos_token: String,
    /// The BOS text when the tokenizer adds BOS by itself.
    bos_prefix: Option<String>,
    /// The file has no template and this is its architecture's built-in format: a guess, which
    /// for a base model (never trained to chat) produces nonsense.
    guessed: bool,
}

const TEMPLATE_NAME: &str = "chat_template";

impl ChatTemplate {
    /// From `tokenizer.chat_template`, or the architecture's built-in format when the file has
    /// none: gemma/gemma2/gemma3 → Gemma turns, qwen2/qwen3 (and anything unknown, as llama.cpp
    /// does) → ChatML, llama/mistral/mixtral → Llama-3 headers when the vocabulary has
    /// `<|start_header_id|>`, else Llama-2 `[INST]`.
    pub fn from_gguf(md: &Metadata, arch: &str) -> Result<Self, ChatError> {
        Self::from_gguf_with(md, arch, None)
    }

    /// As [`ChatTemplate::from_gguf`], with `choice` (llama.cpp's `--chat-template`) taking the
    /// file's place when given: a built-in format's name (`chatml`, `gemma`, `llama3`,
    /// `llama2`) or a Jinja template's source.
    pub fn from_gguf_with(
        md: &Metadata,
        arch: &str,
        choice: Option<&str>,
    ) -> Result<Self, ChatError> {
        fn meta<T>(key: &'static str, r: Result<T, GgufError>) -> Result<T, ChatError> {
            r.map_err(|source| ChatError::Metadata { key, source })
        }
        const TOKENS: &str = "tokenizer.ggml.tokens";
        const TEMPLATE: &str = "tokenizer.chat_template";
        let tokens = meta(TOKENS, md.get_str_array(TOKENS))?.unwrap_or(&[]);
        let text_of = |key: &'static str| -> Result<Option<String>, ChatError> {
            Ok(meta(key, md.get_u32(key))?
                .and_then(|id| tokens.get(id as usize))
                .cloned())
        };
        let bos = text_of("tokenizer.ggml.bos_token_id")?;
        let eos = text_of("tokenizer.ggml.eos_token_id")?;
        let model = meta("tokenizer.ggml.model", md.get_str("tokenizer.ggml.model"))?;
        let add_bos = meta(
            "tokenizer.ggml.add_bos_token",
            md.get_bool("tokenizer.ggml.add_bos_token"),
        )?
        .unwrap_or(model == Some("llama"));
        let from_file = match choice {
            Some(_) => None,
            None => meta(TEMPLATE, md.get_str(TEMPLATE))?,
        };
        let mut tmpl = match (choice.map(|c| (c, Self::builtin(c))), from_file) {
            (Some((_, Some(mut t))), _) => {
                t.bos_token = bos.clone().unwrap_or_default();
                t.eos_token = eos.unwrap_or_default();
                t
            }
            (Some((src, None)), _) => Self::from_jinja(src, bos.clone(), eos.clone())?,
            (None, Some(src)) if !src.trim().is_empty() => {
                Self::from_jinja(src, bos.clone(), eos.clone())?
            }
            (None, _) => {
                let has_llama3_headers = tokens.iter().any(|t| t == "<|start_header_id|>");
                let builtin = match arch {
                    a if a.starts_with("gemma") => Builtin::Gemma,
                    "llama" | "mistral" | "mixtral" if has_llama3_headers => Builtin::Llama3,
                    "llama" | "mistral" | "mixtral" => Builtin::Llama2,
                    a => {
                        if !a.starts_with("qwen") {
                            tracing::warn!(arch = a, "no chat template in file; using ChatML");
                        }
                        Builtin::ChatMl
                    }
                };
                let mut t = Self::builtin_named(builtin);
                t.bos_token = bos.clone().unwrap_or_default();
                t.eos_token = eos.unwrap_or_default();
                t.guessed = true;
                t
            }
        };
        tmpl.bos_prefix = bos.filter(|b| add_bos && !b.is_empty());
        Ok(tmpl)
    }

    /// Compiles a Hugging Face Jinja chat template.
    pub fn from_jinja(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, ChatError> {
        let mut env = minijinja::Environment::new();
        // transformers renders chat templates with these two on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|source| ChatError::Compile { source })?;
        Ok(ChatTemplate {
            kind: Kind::Jinja(Box::new(env)),
            bos_token: bos_token.unwrap_or_default(),
            eos_token: eos_token.unwrap_or_default(),
            bos_prefix: None,
            guessed: false,
        })
    }

    /// A built-in format by name (`gemma`, `chatml`, `llama3`, `llama2`).
    pub fn builtin(name: &str) -> Option<Self> {
        let b = match name {
            "gemma" => Builtin::Gemma,
            "chatml" => Builtin::ChatMl,
            "llama3" => Builtin::Llama3,
            "llama2" => Builtin::Llama2,
            _ => return None,
        };
        Some(Self::builtin_named(b))
    }

    fn builtin_named(b: Builtin) -> Self {
        ChatTemplate {
            kind: Kind::Builtin(b),
            bos_token: String::new(),
            eos_token: String::new(),
            bos_prefix: None,
            guessed: false,
        }
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends with the header of the
    /// assistant's next turn.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        match &self.kind {
            Kind::Jinja(env) => {
                let tmpl = env
                    .get_template(TEMPLATE_NAME)
                    .map_err(|source| ChatError::Render { source })?;
                tmpl.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => &self.bos_token,
                    eos_token => &self.eos_token,
                })
                .map_err(|source| ChatError::Render { source })
            }
            Kind::Builtin(b) => Ok(render_builtin(*b, messages, add_generation_prompt)),
        }
    }

    /// Text a rendered prompt starts with that the tokenizer already adds (BOS), so callers can
    /// avoid a double BOS: `rendered.strip_prefix(t.bos_prefix()?)`.
    pub fn bos_prefix(&self) -> Option<&str> {
        self.bos_prefix.as_deref()
    }

    /// Whether the file had no template and this is its architecture's built-in format: what
    /// a base model (not trained to chat) has, so chatting with it rarely makes sense.
    pub fn guessed(&self) -> bool {
        self.guessed
    }

    /// "jinja" or the built-in's name.
    pub fn name(&self) -> &str {
        match &self.kind {
            Kind::Jinja(_) => "jinja",
            Kind::Builtin(b) => b.name(),
        }
    }
}

/// The built-in formats, byte for byte as llama.cpp's `llm_chat_apply_template` produces them.
fn render_builtin(b: Builtin, messages: &[ChatMessage], add_generation_prompt: bool) -> String {
    let mut s = String::new();
    match b {
        Builtin::ChatMl => {
            for m in messages {
                s += &format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content);
            }
            if add_generation_prompt {
                s += "<|im_start|>assistant\n";
            }
        }
        Builtin::Gemma => {
            // Gemma has no system role: the system text opens the next user turn.
            let mut system = String::new();
            for m in messages {
                if m.role == "system" {
                    system += m.content.trim();
                    continue;
                }
                let role = if m.role == "assistant" {
                    "model"
                } else {
                    m.role.as_str()
                };
                s += &format!("<start_of_turn>{role}\n");
                if !system.is_empty() && role != "model" {
                    s += &system;
                    s += "\n\n";
                    system.clear();
                }
                s += m.content.trim();
                s += "<end_of_turn>\n";
            }
            if add_generation_prompt {
                s += "<start_of_turn>model\n";
            }
        }
        Builtin::Llama3 => {
            for m in messages {
                s += &format!(
                    "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>",
                    m.role,
                    m.content.trim()
                );
            }
            if add_generation_prompt {
                s += "<|start_header_id|>assistant<|end_header_id|>\n\n";
            }
        }
        Builtin::Llama2 => {
            // The first `[INST]` is opened without BOS; the tokenizer adds that one.
            let mut inside_turn = true;
            s += "[INST] ";
            for m in messages {
                if !inside_turn {
                    inside_turn = true;
                    s += "[INST] ";
                }
                match m.role.as_str() {
                    "system" => s += &format!("<<SYS>>\n{}\n<</SYS>>\n\n", m.content),
                    "user" => s += &format!("{} [/INST]", m.content),
                    _ => {
                        s += &format!("{}</s>", m.content);
                        inside_turn = false;
                    }
                }
            }
        }
    }
    s
}

/// Templates call `raise_exception("…")` to reject conversations they cannot format.
fn raise_exception(message: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        format!("template raised an exception: {message}"),
    ))
}

/// transformers' `tojson`, which replaces Jinja's: plain `json.dumps` (no HTML escaping,
/// non-ASCII kept, Python's `", "` and `": "` separators, or `indent=N` pretty-printing), so
/// tool schemas render byte for byte as in training. `ensure_ascii`, `separators` and
/// `sort_keys` are accepted and ignored.
fn tojson(
    value: minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> Result<minijinja::Value, minijinja::Error> {
    use serde::Serialize;
    let indent: Option<usize> = kwargs.get("indent")?;
    for ignored in ["ensure_ascii", "separators", "sort_keys"] {
        let _: Option<minijinja::Value> = kwargs.get(ignored)?;
    }
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&pad);
            value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, fmt))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out,
            PythonSeparators,
        )),
    };
    written.map_err(|e| {
        minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("tojson: {e}"),
        )
    })?;
    Ok(minijinja::Value::from_safe_string(
        String::from_utf8_lossy(&out).into_owned(),
    ))
}

/// `json.dumps`'s default separators: `", "` between items and `": "` after keys.
struct PythonSeparators;

impl serde_json::ser::Formatter for PythonSeparators {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// transformers' `strftime_now(format)`: the current UTC time formatted with the common
/// `strftime` directives (`%Y %y %m %d %e %B %b %A %a %H %M %S %j %%`); others are kept as
/// written.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_time(&format, secs)
}

fn format_time(format: &str, unix_secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let month = MONTHS[(m - 1) as usize];
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    const CUM: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[(m - 1) as usize] + d + u32::from(leap && m > 2);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out += &y.to_string(),
            Some('y') => out += &format!("{:02}", y.rem_euclid(100)),
            Some('m') => out += &format!("{m:02}"),
            Some('d') => out += &format!("{d:02}"),
            Some('e') => out += &format!("{d:>2}"),
            Some('B') => out += month,
            Some('b') => out += &month[..3],
            Some('A') => out += weekday,
            Some('a') => out += &weekday[..3],
            Some('H') => out += &format!("{:02}", rem / 3600),
            Some('M') => out += &format!("{:02}", rem / 60 % 60),
            Some('S') => out += &format!("{:02}", rem % 60),
            Some('j') => out += &format!("{yday:03}"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 → (year, month 1–12, day 1–31); Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-02-29 13:05:09 UTC was a Thursday.
        let t = 1_709_211_909;
        assert_eq!(format_time("%d %b %Y", t), "29 Feb 2024");
        assert_eq!(
            format_time("%A %B %e, %H:%M:%S %j %%", t),
            "Thursday February 29, 13:05:09 060 %"
        );
        assert_eq!(format_time("%Y-%m-%d", 0), "1970-01-01");
    }

    #[test]
    fn jinja_helpers() {
        let t = ChatTemplate::from_jinja(
            "{{ bos_token }}{% for m in messages %}{{ m.content.strip() | upper }}{% endfor %}\
             {% if messages | length > 1 %}{{ raise_exception('one only') }}{% endif %}",
            Some("<s>".into()),
            None,
        )
        .expect("compiles");
        let one = [ChatMessage::new("user", "  hi ")];
        assert_eq!(t.render(&one, false).expect("renders"), "<s>HI");
        let two = [one[0].clone(), one[0].clone()];
        let err = t.render(&two, false).expect_err("raises");
        assert!(err.to_string().contains("one only"), "{err}");
    }

    #[test]
    fn tojson_is_pythons_json_dumps() {
        let t = ChatTemplate::from_jinja(
            "{{ {'name': 'f<x>', 'b': [1, 'é'], 'a': none} | tojson }}|{{ [1] | tojson(indent=2) }}",
            None,
            None,
        )
        .expect("compiles");
        assert_eq!(
            t.render(&[], false).expect("renders"),
            "{\"name\": \"f<x>\", \"b\": [1, \"é\"], \"a\": null}|[\n  1\n]"
        );
    }

    #[test]
    fn llama_builtins() {
        let msgs = [
            ChatMessage::new("system", "sys"),
            ChatMessage::new("user", "hi"),
            ChatMessage::new("assistant", "yo"),
            ChatMessage::new("user", "again"),
        ];
        let l2 = ChatTemplate::builtin("llama2").expect("known");
        assert_eq!(
            l2.render(&msgs, true).expect("renders"),
            "[INST] <<SYS>>\nsys\n<</SYS>>\n\nhi [/INST]yo</s>[INST] again [/INST]"
        );
        let l3 = ChatTemplate::builtin("llama3").expect("known");
        assert!(l3.render(&msgs, true).expect("renders").ends_with(
            "<|start_header_id|>user<|end_header_id|>\n\nagain<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        ));
    }
}
