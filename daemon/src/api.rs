//! OpenAI wire types: what requests may say, checked into typed parameters before anything
//! reaches the engine, and the response bodies.

use serde::{Deserialize, Serialize};
use strata_engine::sampler::SamplerConfig;

use crate::error::ApiError;
use crate::logprobs::{MAX_TOP, TokenLogprob};

/// At most this many stop strings (OpenAI's limit).
const MAX_STOPS: usize = 4;
const MAX_STOP_BYTES: usize = 256;

#[derive(Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub params: RawParams,
}

#[derive(Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// The roles a message may have; `developer` is OpenAI's newer name for `system`.
const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

impl Message {
    /// The role as the chat template knows it: one of [`ROLES`], `developer` as `system`.
    /// `i` is the message's index, for the error.
    pub fn role(&self, i: usize) -> Result<&str, ApiError> {
        match self.role.as_str() {
            "developer" => Ok("system"),
            r if ROLES.contains(&r) => Ok(r),
            other => Err(ApiError::BadRequest(format!(
                "messages[{i}].role must be one of {}, got '{}'",
                ROLES.join(", "),
                strata_storage::text::clip(other, strata_storage::text::QUOTE_CHARS)
            ))),
        }
    }

    /// The message's text; only text parts are supported, and a message must have some
    /// (`content` may be an empty string, not absent or null). `i` is its index, for errors.
    pub fn text(&self, i: usize) -> Result<String, ApiError> {
        match &self.content {
            None => Err(ApiError::BadRequest(format!(
                "messages[{i}].content is required (a string or an array of text parts)"
            ))),
            Some(Content::Text(t)) => Ok(t.clone()),
            Some(Content::Parts(parts)) => {
                let mut out = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => out.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::BadRequest(format!(
                                "message content part of type '{kind}' is not supported (only text)"
                            )));
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

#[derive(Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptField,
    #[serde(flatten)]
    pub params: RawParams,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    One(String),
    Many(Vec<String>),
}

impl PromptField {
    pub fn into_text(self) -> Result<String, ApiError> {
        match self {
            PromptField::One(s) => Ok(s),
            PromptField::Many(mut v) if v.len() == 1 => Ok(v.remove(0)),
            PromptField::Many(_) => Err(ApiError::BadRequest(
                "'prompt' must be one string (batched prompts are not supported)".into(),
            )),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

/// `logprobs`: a boolean on chat, a count of alternatives on legacy completions.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum LogprobsField {
    Flag(bool),
    Count(i64),
}

/// Sampling and length fields as a client sent them; wide numeric types so that an absurd
/// value is reported by [`RawParams::validate`] with its name rather than as a parse error.
#[derive(Deserialize, Default)]
pub struct RawParams {
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub min_p: Option<f64>,
    #[serde(default)]
    pub repeat_penalty: Option<f64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<StopField>,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub repeat_last_n: Option<i64>,
    #[serde(default)]
    pub logprobs: Option<LogprobsField>,
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    /// strata's own: resume from and save to this saved session.
    #[serde(default)]
    pub session: Option<String>,
}

/// Checked parameters of one generation.
#[derive(Clone, Debug)]
pub struct GenParams {
    pub stream: bool,
    /// `None`: what is left of the context.
    pub max_tokens: Option<usize>,
    pub sampler: SamplerConfig,
    pub stop: Vec<String>,
    /// `Some(k)`: report each token's log-probability and its `k` likeliest alternatives.
    pub logprobs: Option<usize>,
    /// A checked session name (module `sessions`).
    pub session: Option<String>,
}

impl RawParams {
    /// `logprobs`/`top_logprobs` as `endpoint` spells them (OpenAI's chat: a flag and a
    /// count; legacy completions: the count in `logprobs`).
    fn logprobs(&self, endpoint: Endpoint) -> Result<Option<usize>, ApiError> {
        let bad = |m: String| Err(ApiError::BadRequest(m));
        let count = |name: &str, n: i64| {
            if (0..=MAX_TOP as i64).contains(&n) {
                Ok(n as usize)
            } else {
                Err(ApiError::BadRequest(format!(
                    "'{name}' must be in [0, {MAX_TOP}], got {n}"
                )))
            }
        };
        let top = self
            .top_logprobs
            .map(|n| count("top_logprobs", n))
            .transpose()?;
        match (&self.logprobs, endpoint) {
            (Some(LogprobsField::Flag(b)), Endpoint::Completion) => bad(format!(
                "'logprobs' must be an integer here (got {b}): the number of alternatives, \
                 0 to {MAX_TOP}"
            )),
            (None | Some(LogprobsField::Flag(false)), _) if top.is_some() => {
                bad("'top_logprobs' needs 'logprobs': true".into())
            }
            (None | Some(LogprobsField::Flag(false)), _) => Ok(None),
            (Some(LogprobsField::Flag(true)), _) => Ok(Some(top.unwrap_or(0))),
            (Some(LogprobsField::Count(n)), Endpoint::Completion) => {
                let n = count("logprobs", *n)?;
                Ok(Some(top.unwrap_or(n)))
            }
            (Some(LogprobsField::Count(n)), Endpoint::Chat) => bad(format!(
                "'logprobs' must be a boolean here (got {n}); ask for alternatives with \
                 'top_logprobs'"
            )),
        }
    }

    pub fn validate(self, endpoint: Endpoint) -> Result<GenParams, ApiError> {
        let bad = |m: String| Err(ApiError::BadRequest(m));
        let logprobs = self.logprobs(endpoint)?;
        if let Some(n) = self.n
            && n != 1
        {
            return bad(format!("'n' must be 1 (got {n}); one choice per request"));
        }
        // Both spellings are checked: a bad value is an error wherever it is, and two that
        // disagree leave no way to tell which one the client meant.
        for (name, v) in [
            ("max_tokens", self.max_tokens),
            ("max_completion_tokens", self.max_completion_tokens),
        ] {
            if let Some(m) = v
                && m < 1
            {
                return bad(format!("'{name}' must be at least 1, got {m}"));
            }
        }
        if let (Some(a), Some(b)) = (self.max_tokens, self.max_completion_tokens)
            && a != b
        {
            return bad(format!(
                "'max_tokens' ({a}) and 'max_completion_tokens' ({b}) disagree; send one"
            ));
        }
        let max_tokens = self
            .max_tokens
            .or(self.max_completion_tokens)
            .map(|m| usize::try_from(m).unwrap_or(usize::MAX));
        let temp = self.temperature.unwrap_or(0.8);
        if !(0.0..=2.0).contains(&temp) {
            return bad(format!("'temperature' must be in [0, 2], got {temp}"));
        }
        let top_p = self.top_p.unwrap_or(0.95);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return bad(format!("'top_p' must be in (0, 1], got {top_p}"));
        }
        let top_k = self.top_k.unwrap_or(40);
        if !(0..=1_000_000).contains(&top_k) {
            return bad(format!("'top_k' must be in [0, 1000000], got {top_k}"));
        }
        let min_p = self.min_p.unwrap_or(0.05);
        if !(0.0..=1.0).contains(&min_p) {
            return bad(format!("'min_p' must be in [0, 1], got {min_p}"));
        }
        let repeat_penalty = self.repeat_penalty.unwrap_or(1.0);
        if !(repeat_penalty > 0.0 && repeat_penalty <= 100.0) {
            return bad(format!(
                "'repeat_penalty' must be in (0, 100], got {repeat_penalty}"
            ));
        }
        let seed = match self.seed {
            Some(s) if s < 0 => return bad(format!("'seed' must be non-negative, got {s}")),
            Some(s) => s as u64,
            None => random_seed(),
        };
        let stop = match self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s],
            Some(StopField::Many(v)) => v,
        };
        if stop.len() > MAX_STOPS {
            return bad(format!(
                "at most {MAX_STOPS} 'stop' strings, got {}",
                stop.len()
            ));
        }
        if let Some(s) = stop
            .iter()
            .find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
        {
            return bad(format!(
                "'stop' strings must be 1 to {MAX_STOP_BYTES} bytes, got {} bytes",
                s.len()
            ));
        }
        let repeat_last_n = self.repeat_last_n.unwrap_or(64);
        if !(0..=65_536).contains(&repeat_last_n) {
            return bad(format!(
                "'repeat_last_n' must be in [0, 65536], got {repeat_last_n}"
            ));
        }
        let sampler = SamplerConfig {
            temp: temp as f32,
            top_k: top_k as usize,
            top_p: top_p as f32,
            min_p: min_p as f32,
            repeat_penalty: repeat_penalty as f32,
            repeat_last_n: repeat_last_n as usize,
            seed,
        };
        sampler.validate().map_err(ApiError::BadRequest)?;
        if let Some(name) = &self.session {
            strata_storage::session::validate_name(name)
                .map_err(|e| ApiError::BadRequest(format!("'session': {e}")))?;
        }
        Ok(GenParams {
            stream: self.stream.unwrap_or(false),
            max_tokens,
            sampler,
            stop,
            logprobs,
            session: self.session,
        })
    }
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    // RandomState is seeded per process and per instance from the OS; enough for sampling.
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// Parses a request body, turning serde's message into a 400 with a JSON error body.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

#[derive(Serialize, Clone, Copy)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptDetails,
}

/// OpenAI's `usage.prompt_tokens_details`: `cached_tokens` are prompt tokens resumed from a
/// saved session instead of computed.
#[derive(Serialize, Clone, Copy)]
pub struct PromptDetails {
    pub cached_tokens: usize,
}

/// Which OpenAI endpoint a generation answers, which decides the shape of its chunks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// Builds the response bodies of one generation.
pub struct Shape {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Shape {
    pub fn new(endpoint: Endpoint, model: &str) -> Self {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        Self {
            endpoint,
            id: format!("{prefix}-{:016x}", random_seed()),
            created,
            model: model.to_owned(),
        }
    }

    /// The whole answer; `logprobs` is built by [`Shape::logprobs`].
    pub fn full(
        &self,
        text: &str,
        finish: &str,
        usage: Usage,
        logprobs: Option<serde_json::Value>,
    ) -> serde_json::Value {
        let choice = match self.endpoint {
            Endpoint::Chat => serde_json::json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
            Endpoint::Completion => serde_json::json!({
                "index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish,
            }),
        };
        serde_json::json!({
            "id": self.id,
            "object": match self.endpoint {
                Endpoint::Chat => "chat.completion",
                Endpoint::Completion => "text_completion",
            },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        })
    }

    /// One stream chunk: `text` as a delta (`role` too on a chat stream's first chunk) with
    /// the log-probabilities of its tokens, or the final chunk when `finish` is given.
    pub fn chunk(
        &self,
        text: Option<&str>,
        first: bool,
        finish: Option<&str>,
        usage: Option<Usage>,
        logprobs: Option<serde_json::Value>,
    ) -> serde_json::Value {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                serde_json::json!({
                    "index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
                })
            }
            Endpoint::Completion => serde_json::json!({
                "index": 0, "text": text.unwrap_or(""), "logprobs": logprobs,
                "finish_reason": finish,
            }),
        };
        let mut v = serde_json::json!({
            "id": self.id,
            "object": match self.endpoint {
                Endpoint::Chat => "chat.completion.chunk",
                Endpoint::Completion => "text_completion",
            },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if let (Some(u), Some(obj)) = (usage, v.as_object_mut()) {
            obj.insert("usage".into(), serde_json::json!(u));
        }
        v
    }
}

/// Turns token log-probabilities into OpenAI's JSON, one piece of an answer at a time.
pub struct LogprobsWriter {
    endpoint: Endpoint,
    /// Characters of completion text before the next token (legacy `text_offset`).
    offset: usize,
}

impl LogprobsWriter {
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            offset: 0,
        }
    }

    /// Chat: `{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}`. Legacy
    /// completions: `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, parallel
    /// lists. `piece` gives a token's bytes.
    pub fn json(
        &mut self,
        entries: &[TokenLogprob],
        piece: &dyn Fn(u32) -> Vec<u8>,
    ) -> serde_json::Value {
        let text = |id: u32| {
            let bytes = piece(id);
            (String::from_utf8_lossy(&bytes).into_owned(), bytes)
        };
        match self.endpoint {
            Endpoint::Chat => {
                let item = |id: u32, lp: f32| {
                    let (token, bytes) = text(id);
                    serde_json::json!({"token": token, "logprob": lp, "bytes": bytes})
                };
                let content: Vec<_> = entries
                    .iter()
                    .map(|e| {
                        let mut v = item(e.id, e.logprob);
                        let top: Vec<_> = e.top.iter().map(|&(id, lp)| item(id, lp)).collect();
                        v["top_logprobs"] = top.into();
                        v
                    })
                    .collect();
                serde_json::json!({"content": content, "refusal": null})
            }
            Endpoint::Completion => {
                let mut tokens = Vec::new();
                let mut offsets = Vec::new();
                for e in entries {
                    let (t, _) = text(e.id);
                    offsets.push(self.offset);
                    self.offset += t.chars().count();
                    tokens.push(t);
                }
                let top: Vec<serde_json::Map<String, serde_json::Value>> = entries
                    .iter()
                    .map(|e| {
                        e.top
                            .iter()
                            .map(|&(id, lp)| (text(id).0, lp.into()))
                            .collect()
                    })
                    .collect();
                let lps: Vec<f32> = entries.iter().map(|e| e.logprob).collect();
                serde_json::json!({
                    "tokens": tokens, "token_logprobs": lps, "top_logprobs": top,
                    "text_offset": offsets,
                })
            }
        }
    }
}

#[derive(Deserialize)]
pub struct ModelRef {
    pub model: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(json: &str) -> Result<GenParams, ApiError> {
        parse_json::<RawParams>(json.as_bytes())?.validate(Endpoint::Chat)
    }

    fn completion_params(json: &str) -> Result<GenParams, ApiError> {
        parse_json::<RawParams>(json.as_bytes())?.validate(Endpoint::Completion)
    }

    #[test]
    fn logprobs_follow_each_endpoint() {
        let ok = |r: Result<GenParams, ApiError>| r.map_err(|e| e.to_string()).map(|p| p.logprobs);
        assert_eq!(ok(params("{}")), Ok(None));
        assert_eq!(ok(params(r#"{"logprobs": true}"#)), Ok(Some(0)));
        assert_eq!(
            ok(params(r#"{"logprobs": true, "top_logprobs": 20}"#)),
            Ok(Some(20))
        );
        assert_eq!(ok(completion_params(r#"{"logprobs": 5}"#)), Ok(Some(5)));
        assert_eq!(ok(completion_params(r#"{"logprobs": 0}"#)), Ok(Some(0)));
        for (json, field) in [
            (r#"{"logprobs": true, "top_logprobs": 21}"#, "top_logprobs"),
            (r#"{"logprobs": true, "top_logprobs": -1}"#, "top_logprobs"),
            (r#"{"top_logprobs": 3}"#, "top_logprobs"),
            (r#"{"logprobs": 3}"#, "'logprobs' must be a boolean"),
        ] {
            let err = ok(params(json)).err().unwrap_or_default();
            assert!(err.contains(field), "{json}: {err}");
        }
        for json in [r#"{"logprobs": 21}"#, r#"{"logprobs": -1}"#] {
            let err = ok(completion_params(json)).err().unwrap_or_default();
            assert!(
                err.contains("'logprobs' must be in [0, 20]"),
                "{json}: {err}"
            );
        }
    }

    /// Regression (issue 21): `max_completion_tokens` of 0 or -1 was ignored when
    /// `max_tokens` was also set, and `/v1/completions` took `logprobs: true` where a number is
    /// expected.
    #[test]
    fn every_spelling_of_a_field_is_checked() {
        let err = |r: Result<GenParams, ApiError>| r.err().map(|e| e.to_string());
        for json in [
            r#"{"max_tokens": 5, "max_completion_tokens": 0}"#,
            r#"{"max_tokens": 5, "max_completion_tokens": -1}"#,
            r#"{"max_tokens": 0, "max_completion_tokens": 5}"#,
        ] {
            let e = err(params(json)).unwrap_or_default();
            assert!(e.contains("must be at least 1"), "{json}: {e}");
        }
        let e = err(params(r#"{"max_tokens": 5, "max_completion_tokens": 6}"#));
        assert!(e.is_some_and(|e| e.contains("disagree")));
        let p = params(r#"{"max_tokens": 5, "max_completion_tokens": 5}"#).ok();
        assert_eq!(p.and_then(|p| p.max_tokens), Some(5));
        let p = params(r#"{"max_completion_tokens": 7}"#).ok();
        assert_eq!(p.and_then(|p| p.max_tokens), Some(7));
        for json in [r#"{"logprobs": true}"#, r#"{"logprobs": false}"#] {
            let e = err(completion_params(json)).unwrap_or_default();
            assert!(e.contains("must be an integer"), "{json}: {e}");
        }
    }

    /// Regression (issue 21): messages with no `content`, or with `role: "bogus"`, got 200.
    #[test]
    fn messages_need_a_known_role_and_content() {
        let msgs = |json: &str| -> Vec<Message> { parse_json(json.as_bytes()).unwrap_or_default() };
        let m = msgs(r#"[{"role": "user"}, {"role": "user", "content": null}]"#);
        for (i, m) in m.iter().enumerate() {
            let e = m.text(i).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(
                e.contains(&format!("messages[{i}].content is required")),
                "{e}"
            );
        }
        let m =
            msgs(r#"[{"role": "bogus", "content": "x"}, {"role": "developer", "content": ""}]"#);
        let e = m[0]
            .role(0)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("messages[0].role must be one of") && e.contains("'bogus'"),
            "{e}"
        );
        assert_eq!(m[1].role(1).ok(), Some("system"));
        assert_eq!(m[1].text(1).ok().as_deref(), Some(""));
    }

    #[test]
    fn defaults_are_llama_cpp_sampling() {
        let p = params("{}").map_err(|e| e.to_string()).expect("valid");
        assert!(!p.stream);
        assert_eq!(p.max_tokens, None);
        assert!((p.sampler.temp - 0.8).abs() < 1e-6);
    }

    #[test]
    fn absurd_values_are_rejected_by_name() {
        for (json, field) in [
            (r#"{"max_tokens": 0}"#, "max_tokens"),
            (r#"{"max_tokens": -5}"#, "max_tokens"),
            (r#"{"temperature": -1}"#, "temperature"),
            (r#"{"temperature": 1e300}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"top_p": 1.5}"#, "top_p"),
            (r#"{"seed": -1}"#, "seed"),
            (r#"{"stop": ""}"#, "stop"),
            (r#"{"stop": ["a","b","c","d","e"]}"#, "stop"),
            (r#"{"n": 3}"#, "'n'"),
            (r#"{"session": "../etc"}"#, "'session'"),
            (r#"{"session": ".hidden"}"#, "'session'"),
            (r#"{"session": ""}"#, "'session'"),
        ] {
            let err = params(json)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(field), "{json}: {err}");
        }
    }

    #[test]
    fn stop_accepts_string_or_list() {
        let p = params(r#"{"stop": "\n"}"#)
            .map_err(|e| e.to_string())
            .expect("valid");
        assert_eq!(p.stop, vec!["\n".to_string()]);
        let p = params(r#"{"stop": ["x", "y"], "seed": 7}"#)
            .map_err(|e| e.to_string())
            .expect("valid");
        assert_eq!(p.stop.len(), 2);
        assert_eq!(p.sampler.seed, 7);
    }
}
