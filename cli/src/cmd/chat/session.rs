//! A conversation: the system prompt, the turns so far, and saving them as JSON under the
//! store's `chats/` folder so `/load` can pick a conversation up again.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use strata_engine::chat::ChatMessage;

/// Largest saved chat `/load` reads; a conversation past this would not fit any context.
const MAX_FILE: u64 = 64 * 1024 * 1024;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Conversation {
    pub system: Option<String>,
    /// Alternating user and assistant turns.
    pub turns: Vec<ChatMessage>,
}

/// The file format of `/save`: the messages in the order a chat template takes them.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedChat {
    /// The model the conversation was held with; informational, `/load` works across models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    messages: Vec<ChatMessage>,
}

impl Conversation {
    /// The messages to render: the system prompt first, then the turns.
    pub fn messages(&self) -> Vec<ChatMessage> {
        let sys = self
            .system
            .iter()
            .map(|s| ChatMessage::new("system", s.clone()));
        sys.chain(self.turns.iter().cloned()).collect()
    }

    /// Forgets the turns, keeping the system prompt.
    pub fn reset(&mut self) {
        self.turns.clear();
    }

    fn from_messages(messages: Vec<ChatMessage>) -> anyhow::Result<Conversation> {
        let mut conv = Conversation::default();
        for (i, m) in messages.into_iter().enumerate() {
            match m.role.as_str() {
                "system" if i == 0 => conv.system = Some(m.content),
                "system" => bail!("message {i} is a system message; only the first may be"),
                "user" | "assistant" => conv.turns.push(m),
                other => {
                    bail!("message {i} has role {other:?} (expected system, user or assistant)")
                }
            }
        }
        Ok(conv)
    }
}

/// Where saved chats live: `chats/` beside the store's `models/`.
pub fn chats_dir() -> anyhow::Result<PathBuf> {
    let store = strata_storage::store::Store::open_default().context("opening the model store")?;
    Ok(store.root().join("chats"))
}

/// The file for chat `name`; names follow the model-name rules, so none can leave `dir`.
pub fn chat_path(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    strata_storage::store::validate_name(name).map_err(|e| match e {
        strata_storage::store::StoreError::BadName { reason, .. } => {
            anyhow::anyhow!("invalid chat name {name:?}: {reason}")
        }
        other => anyhow::Error::new(other),
    })?;
    Ok(dir.join(format!("{name}.json")))
}

/// Writes the conversation to `path` through a temp file and a rename, so a crash or a full
/// disk never leaves a half-written chat where a good one was.
pub fn save(path: &Path, conv: &Conversation, model: &str) -> anyhow::Result<()> {
    let dir = path.parent().context("a chat path has a parent folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let saved = SavedChat {
        model: Some(model.to_owned()),
        messages: conv.messages(),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".chat-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    serde_json::to_writer_pretty(&mut tmp, &saved)?;
    tmp.write_all(b"\n")?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Reads a saved conversation; any problem is an error naming the file, and the caller's
/// current conversation is untouched.
pub fn load(path: &Path) -> anyhow::Result<Conversation> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata()?.len();
    if len > MAX_FILE {
        bail!(
            "{} is {len} bytes, more than a saved chat can be",
            path.display()
        );
    }
    let saved: SavedChat = serde_json::from_reader(std::io::BufReader::new(file))
        .with_context(|| format!("{} is not a saved chat", path.display()))?;
    Conversation::from_messages(saved.messages)
        .with_context(|| format!("{} is not a saved chat", path.display()))
}

/// What `/stats` reports about the last answer.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Prompt tokens evaluated for this answer (only the part not already cached), when known.
    pub prompt_tokens: Option<usize>,
    /// Time from sending the question to the first token of the answer.
    pub first_token_ms: f64,
    /// Tokens in the answer.
    pub tokens: usize,
    /// Time from the first token to the last.
    pub gen_ms: f64,
    /// Ctrl-C stopped the answer.
    pub interrupted: bool,
}

impl Stats {
    /// Generation speed as llama.cpp counts it: tokens after the first (which comes out of the
    /// prompt pass) over the time they took.
    pub fn tokens_per_second(&self) -> Option<f64> {
        (self.tokens > 1 && self.gen_ms > 0.0).then(|| (self.tokens - 1) as f64 * 1e3 / self.gen_ms)
    }

    pub fn describe(&self) -> String {
        let mut s = format!("last answer: {} tokens", self.tokens);
        if let Some(tps) = self.tokens_per_second() {
            s.push_str(&format!(", {tps:.2} t/s"));
        }
        s.push_str(&format!(
            ", first token after {:.0} ms",
            self.first_token_ms
        ));
        if let Some(p) = self.prompt_tokens {
            s.push_str(&format!(" ({p} prompt tokens)"));
        }
        if self.interrupted {
            s.push_str(", stopped by Ctrl-C");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Conversation {
        Conversation {
            system: Some("Be brief.".into()),
            turns: vec![
                ChatMessage::new("user", "hi \"there\"\n"),
                ChatMessage::new("assistant", "héllo"),
            ],
        }
    }

    #[test]
    fn save_then_load_round_trips() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = chat_path(dir.path(), "my-chat")?;
        save(&path, &sample(), "m")?;
        assert_eq!(load(&path)?, sample());
        // Overwriting goes through a rename and leaves no temp file behind.
        save(&path, &Conversation::default(), "m")?;
        assert_eq!(load(&path)?, Conversation::default());
        assert_eq!(std::fs::read_dir(dir.path())?.count(), 1);
        Ok(())
    }

    #[test]
    fn names_cannot_leave_the_folder() {
        for bad in ["", "../x", "a/b", ".hidden", "a\\b", "x y"] {
            // Issue 22: a bad `/save` name was called an "invalid model name".
            let e = chat_path(Path::new("/tmp"), bad)
                .expect_err(bad)
                .to_string();
            assert!(e.starts_with("invalid chat name"), "{bad:?}: {e}");
            assert!(!e.contains("model"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn malformed_files_are_errors_naming_the_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        for (i, text) in [
            "",
            "not json",
            "[]",
            r#"{"messages": [{"role": "user"}]}"#,
            r#"{"messages": [{"role": "wizard", "content": "x"}]}"#,
            r#"{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]}"#,
            r#"{"messages": [], "extra": 1}"#,
        ]
        .iter()
        .enumerate()
        {
            let path = dir.path().join(format!("c{i}.json"));
            std::fs::write(&path, text)?;
            let err = match load(&path) {
                Ok(c) => panic!("{text:?} loaded as {c:?}"),
                Err(e) => format!("{e:#}"),
            };
            assert!(err.contains(&format!("c{i}.json")), "{err}");
        }
        assert!(load(&dir.path().join("missing.json")).is_err());
        Ok(())
    }

    #[test]
    fn speed_excludes_the_first_token() {
        let s = Stats {
            tokens: 11,
            gen_ms: 1000.0,
            ..Stats::default()
        };
        assert_eq!(s.tokens_per_second(), Some(10.0));
        assert_eq!(Stats::default().tokens_per_second(), None);
    }
}
