//! `strata chat` through the daemon: `POST /v1/chat/completions` with `stream: true`, read as
//! server-sent events on a reader thread so Ctrl-C can close the connection (which cancels the
//! request in stratad) without waiting for the next token.

use std::io::{BufRead, Read as _};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use strata_engine::chat::ChatMessage;

use super::session::Stats;
use crate::client::{Client, error_message, read_sse};
use crate::interrupt;

/// How often the waiting loop looks at the Ctrl-C flag.
const POLL: Duration = Duration::from_millis(50);

pub struct Remote {
    client: Client,
    pub model: String,
    temperature: Option<f32>,
    max_tokens: Option<usize>,
    /// The daemon session this chat's KV cache is resumed from and saved to after each answer.
    pub session: Option<String>,
}

/// What the reader thread passes on.
enum Event {
    /// The daemon accepted the request; shutting this down cancels it.
    Connected(UnixStream),
    Piece(String),
    Usage {
        prompt_tokens: Option<usize>,
        completion_tokens: Option<usize>,
    },
    /// The daemon's report on the session save (`"saved": false` with `error` on failure).
    Session(Value),
    Failed(anyhow::Error),
    Done,
}

impl Remote {
    /// Connects to the daemon and settles which model to talk to: the one named, else the
    /// only one loaded (or being loaded, as right after `stratad --model X` starts). A model
    /// not loaded yet is loaded now, saying so, rather than behind a silent first question.
    pub fn new(
        client: Client,
        model: Option<String>,
        temperature: Option<f32>,
        max_tokens: Option<usize>,
    ) -> anyhow::Result<Remote> {
        let ps = client.json("GET", "/api/ps", None)?;
        let names = |key: &str, field: Option<&str>| -> Vec<String> {
            ps[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|m| field.map_or(m, |f| &m[f]).as_str())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        let loaded = names("models", Some("name"));
        let loading = names("loading", None);
        let model = match model {
            Some(m) => m,
            None => match (loaded.as_slice(), loading.as_slice()) {
                ([one], _) | ([], [one]) => one.clone(),
                ([], []) => bail!("no model is loaded in the daemon; name one: strata chat MODEL"),
                ([], many) => bail!(
                    "the daemon is loading {} models ({}); name one: strata chat MODEL",
                    many.len(),
                    many.join(", ")
                ),
                (many, _) => bail!(
                    "the daemon has {} models loaded ({}); name one: strata chat MODEL",
                    many.len(),
                    many.join(", ")
                ),
            },
        };
        if !loaded.contains(&model) {
            load_showing(&client, &model)?;
        }
        Ok(Remote {
            client,
            model,
            temperature,
            max_tokens,
            session: None,
        })
    }

    /// Computes the conversation's KV cache in the daemon and saves it as session `name`
    /// (one token is generated and dropped): a snapshot, which the chat's own session (if it
    /// has one) does not become.
    pub fn save_session(&self, name: &str, messages: &[ChatMessage]) -> anyhow::Result<()> {
        let body = json!({
            "model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0,
            "session": name,
        });
        let v = self
            .client
            .json("POST", "/v1/chat/completions", Some(&body))?;
        session_saved(&v["session"])?;
        Ok(())
    }

    pub fn answer(
        &mut self,
        messages: &[ChatMessage],
        out: &mut dyn FnMut(&str) -> std::io::Result<()>,
    ) -> anyhow::Result<(String, Stats)> {
        let mut body = json!({
            "model": self.model,
            "messages": messages,
            "stream": true,
        });
        if let Some(t) = self.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(n) = self.max_tokens {
            body["max_tokens"] = json!(n);
        }
        if let Some(s) = &self.session {
            body["session"] = json!(s);
        }
        let t0 = Instant::now();
        let (tx, rx) = mpsc::channel();
        // The request itself goes on the reader thread too: a busy daemon may hold the answer's
        // head back while the request waits in its queue, and Ctrl-C must work then as well.
        let client = self.client.clone();
        let reader = std::thread::spawn(move || {
            match client.send("POST", "/v1/chat/completions", Some(&body)) {
                Ok(resp) if (200..300).contains(&resp.status) => {
                    let mut body = resp.body;
                    if tx.send(Event::Connected(resp.conn)).is_ok() {
                        read_events(&mut body, &tx);
                    }
                }
                Ok(resp) => {
                    let mut bytes = Vec::new();
                    let _ = resp.body.take(1 << 20).read_to_end(&mut bytes);
                    let e = anyhow::anyhow!("{}", error_message(resp.status, &bytes));
                    let _ = tx.send(Event::Failed(e));
                }
                Err(e) => {
                    let _ = tx.send(Event::Failed(e));
                }
            }
        });
        let mut conn = None;
        let mut stats = Stats::default();
        let mut answer = String::new();
        let mut t_first = None;
        let mut usage_tokens = None;
        let result = loop {
            if interrupt::requested() {
                stats.interrupted = true;
                break Ok(());
            }
            match rx.recv_timeout(POLL) {
                Ok(Event::Piece(p)) => {
                    if p.is_empty() {
                        continue;
                    }
                    let now = Instant::now();
                    let first = *t_first.get_or_insert_with(|| {
                        stats.first_token_ms = (now - t0).as_secs_f64() * 1e3;
                        now
                    });
                    // One event is one token in stratad; usage corrects the count at the end.
                    stats.tokens += 1;
                    stats.gen_ms = (now - first).as_secs_f64() * 1e3;
                    if let Err(e) = out(&p) {
                        break Err(e.into());
                    }
                    answer.push_str(&p);
                }
                Ok(Event::Usage {
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    stats.prompt_tokens = prompt_tokens;
                    usage_tokens = completion_tokens;
                }
                Ok(Event::Connected(c)) => conn = Some(c),
                Ok(Event::Session(v)) => {
                    // The answer is complete either way; a failed save only loses the cache.
                    if let Err(e) = session_saved(&v) {
                        eprintln!("\nwarning: {e:#}");
                    }
                }
                Ok(Event::Failed(e)) => break Err(e),
                Ok(Event::Done) | Err(mpsc::RecvTimeoutError::Disconnected) => break Ok(()),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        };
        // Closing the connection is how a request is cancelled; it also unblocks the reader.
        // Without a connection yet the reader is still waiting for the answer's head: it ends
        // on its own once that comes and finds no one listening.
        drop(rx);
        if let Some(c) = conn {
            let _ = c.shutdown(std::net::Shutdown::Both);
            let _ = reader.join();
        }
        result?;
        if let Some(n) = usage_tokens {
            stats.tokens = n;
        }
        Ok((answer, stats))
    }
}

/// Asks the daemon to load `model` (waiting for a load already under way), with a spinner at a
/// terminal and a line otherwise.
fn load_showing(client: &Client, model: &str) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    let what = format!("loading {model} in stratad");
    let spinner = std::io::stderr().is_terminal().then(|| {
        let s = indicatif::ProgressBar::new_spinner();
        s.set_message(format!("{what}\u{2026}"));
        s.enable_steady_tick(Duration::from_millis(120));
        s
    });
    if spinner.is_none() {
        eprintln!("{what}\u{2026}");
    }
    let t0 = std::time::Instant::now();
    let r = client.json("POST", "/api/load", Some(&json!({"model": model})));
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    r.with_context(|| format!("loading {model}"))?;
    eprintln!("loaded {model} in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// Whether the daemon's `session` report says the save worked.
fn session_saved(v: &Value) -> anyhow::Result<()> {
    if v["saved"] == true {
        return Ok(());
    }
    let name = v["name"].as_str().unwrap_or("?");
    let why = v["error"].as_str().unwrap_or("no report from the daemon");
    bail!("the daemon did not save session '{name}': {why}")
}

/// Reads `data:` events until `[DONE]` or the end of the stream, passing on text and usage.
fn read_events(body: &mut dyn BufRead, tx: &mpsc::Sender<Event>) {
    let result = read_sse(body, &mut |v| {
        // A failed send: the chat stopped listening (Ctrl-C).
        parse_chunk(v).into_iter().all(|e| tx.send(e).is_ok())
    });
    let _ = tx.send(match result {
        Ok(()) => Event::Done,
        Err(e) => Event::Failed(e),
    });
}

/// The events in one `chat.completion.chunk`.
fn parse_chunk(v: &Value) -> Vec<Event> {
    let mut events = Vec::new();
    if let Some(choices) = v["choices"].as_array() {
        for c in choices {
            if let Some(text) = c["delta"]["content"].as_str() {
                events.push(Event::Piece(text.to_owned()));
            }
        }
    }
    if let Some(s) = v.get("session").filter(|s| s.is_object()) {
        events.push(Event::Session(s.clone()));
    }
    if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
        let n = |k: &str| u[k].as_u64().and_then(|x| usize::try_from(x).ok());
        events.push(Event::Usage {
            prompt_tokens: n("prompt_tokens"),
            completion_tokens: n("completion_tokens"),
        });
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(stream: &str) -> (String, Option<usize>, Option<String>) {
        let (tx, rx) = mpsc::channel();
        read_events(&mut stream.as_bytes(), &tx);
        let (mut text, mut usage, mut err) = (String::new(), None, None);
        for e in rx.try_iter() {
            match e {
                Event::Piece(p) => text.push_str(&p),
                Event::Usage {
                    completion_tokens, ..
                } => usage = completion_tokens,
                Event::Failed(e) => err = Some(format!("{e:#}")),
                Event::Done | Event::Connected(_) | Event::Session(_) => {}
            }
        }
        (text, usage, err)
    }

    #[test]
    fn openai_stream_is_reassembled() {
        let s = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n\
                 : keep-alive\n\n\
                 data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\r\n\r\n\
                 data:{\"choices\":[{\"delta\":{\"content\":\"lo\\n\"}}]}\n\n\
                 data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n\
                 data: [DONE]\n\n";
        assert_eq!(events(s), ("Hello\n".into(), Some(2), None));
    }

    #[test]
    fn a_failed_session_save_is_reported_and_a_good_one_is_not() {
        let v: Value = serde_json::from_str(
            r#"{"choices":[{"delta":{},"finish_reason":"stop"}],
                "session":{"name":"s","saved":false,"error":"No space left on device"}}"#,
        )
        .expect("json");
        let report = parse_chunk(&v).into_iter().find_map(|e| match e {
            Event::Session(s) => Some(s),
            _ => None,
        });
        let err = session_saved(&report.expect("a session event")).err();
        assert!(err.is_some_and(|e| e.to_string().contains("'s': No space left")));
        assert!(session_saved(&serde_json::json!({"name": "s", "saved": true})).is_ok());
    }

    #[test]
    fn errors_and_truncation_are_reported() {
        let (_, _, err) =
            events("data: {\"error\":{\"message\":\"engine broke\"}}\n\ndata: [DONE]\n\n");
        assert!(err.is_some_and(|e| e.contains("engine broke")));
        let (text, _, err) = events("data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n");
        assert_eq!(text, "a");
        assert!(err.is_some_and(|e| e.contains("before [DONE]")));
        let (_, _, err) = events("data: {not json\n\n");
        assert!(err.is_some_and(|e| e.contains("malformed")));
    }
}
