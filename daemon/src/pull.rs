//! `POST /api/pull`: fetch a model into the store, with progress as NDJSON lines (Ollama's
//! shape). A request names a store name; an `https://` URL or a local path is refused unless
//! the daemon was started with `--allow-pull urls` / `paths`, since a path would be read with
//! the daemon's permissions and a URL makes it download whatever a client asks.

use std::convert::Infallible;
use std::path::Path;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use strata_storage::store::{
    Progress, PullOptions, Store, StoreError, file_kind, registry, validate_name,
};
use tokio::sync::mpsc;

use crate::config::AllowPull;
use crate::error::ApiError;

#[derive(Deserialize)]
pub struct PullRequest {
    /// A store name; a URL or an absolute path when the daemon allows them.
    pub model: String,
    /// Store under this name instead of the one derived from the source.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub sha256: Option<String>,
    /// Download again even when a verified copy is present.
    #[serde(default)]
    pub force: bool,
    /// NDJSON progress (default), or one JSON answer at the end.
    #[serde(default)]
    pub stream: Option<bool>,
}

/// What a pull request's `model` names.
#[derive(Debug, PartialEq, Eq)]
enum Source {
    Name,
    Url,
    Path,
}

fn classify(model: &str) -> Source {
    let url = ["https://", "http://", "hf.co/", "huggingface.co/"]
        .iter()
        .any(|p| model.starts_with(p));
    if url {
        Source::Url
    } else if validate_name(model).is_ok() {
        Source::Name
    } else {
        Source::Path
    }
}

/// Refuses what the daemon does not allow, before anything is read or fetched.
fn check_allowed(req: &PullRequest, allow: AllowPull) -> Result<Source, ApiError> {
    let source = classify(&req.model);
    match source {
        Source::Name => Ok(source),
        Source::Url if allow.urls => Ok(source),
        Source::Url => Err(ApiError::Forbidden(format!(
            "pulling from a URL is disabled on this daemon (start stratad with \
             --allow-pull urls, or run `strata pull {}` yourself)",
            req.model
        ))),
        Source::Path if !allow.paths => Err(ApiError::Forbidden(
            "'model' must be a store name (letters, digits, '.', '_', '-'); pulling from a \
             file path is disabled on this daemon (start stratad with --allow-pull paths, or \
             run `strata pull PATH` yourself)"
                .into(),
        )),
        Source::Path if !Path::new(&req.model).is_absolute() => Err(ApiError::BadRequest(format!(
            "'{}' is neither a store name nor an absolute path",
            req.model
        ))),
        Source::Path => Ok(source),
    }
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::BadName { .. }
        | StoreError::BadUrl { .. }
        | StoreError::BadSha256 { .. }
        | StoreError::NotAFile { .. } => ApiError::BadRequest(e.to_string()),
        StoreError::NotGguf { .. } => ApiError::Unprocessable(e.to_string()),
        StoreError::UnknownModel { .. }
        | StoreError::NotPulled { .. }
        | StoreError::NoSuchFile { .. } => ApiError::NotFound(e.to_string()),
        other => ApiError::Internal(other.to_string()),
    }
}

/// Serves a parsed pull request under the daemon's `allow` setting; `accepting` says whether
/// the daemon still takes work (asked after the request is validated). The route's handler is
/// the server's, which parses the body.
pub async fn pull(
    req: PullRequest,
    allow: AllowPull,
    accepting: impl FnOnce() -> Result<(), ApiError>,
) -> Result<Response, ApiError> {
    let source = check_allowed(&req, allow)?;
    if let Some(n) = &req.name {
        validate_name(n).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    }
    accepting()?;
    let store = Store::open_default()
        .map_err(|e| ApiError::Internal(format!("opening the model store: {e}")))?;
    // What can be refused before the stream starts is refused with its own status.
    match source {
        Source::Name => {
            let present = store.model_path(&req.model).is_ok_and(|p| p.is_file());
            if !present && registry::lookup(&req.model).is_none() {
                return Err(ApiError::NotFound(format!(
                    "model '{}' is neither in the store nor a built-in name (built in: {})",
                    req.model,
                    registry::BUILTIN
                        .iter()
                        .map(|m| m.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        // What the path is decides the status; the store checks the file it opens again.
        Source::Path => match std::fs::metadata(&req.model) {
            Ok(m) if m.is_file() => {}
            Ok(m) => {
                return Err(store_error(StoreError::NotAFile {
                    path: req.model.clone().into(),
                    kind: file_kind(&m.file_type()),
                }));
            }
            Err(_) => {
                return Err(ApiError::NotFound(format!(
                    "no such model file: {}",
                    req.model
                )));
            }
        },
        Source::Url => {}
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stream = req.stream.unwrap_or(true);
    let opts = PullOptions {
        name: req.name,
        sha256: req.sha256,
        force: req.force,
    };
    let model = req.model;
    let task = tokio::task::spawn_blocking(move || {
        let mut progress = ChannelProgress::new(tx.clone());
        let result = match source {
            Source::Name => store.pull_name(&model, &opts, &mut progress),
            Source::Url | Source::Path => store.pull_with(&model, &opts, &mut progress),
        };
        let line = match result {
            Ok(path) => {
                let name = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                tracing::info!(model = %name, "pulled");
                Ok(serde_json::json!({"status": "success", "model": name}))
            }
            Err(e) => {
                // Both may carry a client's 2 MiB path or URL: the log gets a clipped prefix.
                let clip = |s: &str| strata_storage::text::clip(s, 200).into_owned();
                tracing::warn!(source = %clip(&model), "pull failed: {}", clip(&e.to_string()));
                Err(store_error(e))
            }
        };
        let _ = tx.send(line);
    });
    if !stream {
        // Only the last line matters; progress lines are dropped as they come.
        let mut last = None;
        while let Some(line) = rx.recv().await {
            last = Some(line);
        }
        let _ = task.await;
        return match last {
            Some(Ok(v)) => Ok(Json(v).into_response()),
            Some(Err(e)) => Err(e),
            None => Err(ApiError::Internal(
                "the pull task ended without an answer".into(),
            )),
        };
    }
    // A client that leaves does not stop the pull: a half-done download is cleaned up by
    // the store, and a finished one is useful to the next request.
    let body = async_stream(rx);
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(body),
    )
        .into_response())
}

type Line = Result<serde_json::Value, ApiError>;

/// One NDJSON line per progress event; an error becomes `{"error": {...}}` and ends it.
fn async_stream(
    rx: mpsc::UnboundedReceiver<Line>,
) -> impl tokio_stream::Stream<Item = Result<Bytes, Infallible>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(|line| {
        let v = match line {
            Ok(v) => v,
            Err(e) => e.body(),
        };
        Ok(Bytes::from(format!("{v}\n")))
    })
}

/// The store's progress as JSON lines, at most ~10 per second per transfer.
struct ChannelProgress {
    tx: mpsc::UnboundedSender<Line>,
    label: String,
    total: Option<u64>,
    completed: u64,
    last_sent: Option<Instant>,
}

impl ChannelProgress {
    fn new(tx: mpsc::UnboundedSender<Line>) -> Self {
        Self {
            tx,
            label: String::new(),
            total: None,
            completed: 0,
            last_sent: None,
        }
    }

    fn send_progress(&mut self) {
        self.last_sent = Some(Instant::now());
        let _ = self.tx.send(Ok(serde_json::json!({
            "status": self.label, "total": self.total, "completed": self.completed,
        })));
    }
}

impl Progress for ChannelProgress {
    fn start(&mut self, label: &str, total_bytes: Option<u64>) {
        self.label = label.to_owned();
        self.total = total_bytes;
        self.completed = 0;
        self.send_progress();
    }

    fn advance(&mut self, bytes: u64) {
        self.completed += bytes;
        if self
            .last_sent
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(100))
        {
            self.send_progress();
        }
    }

    fn finish(&mut self) {
        self.send_progress();
    }

    fn message(&mut self, msg: &str) {
        let _ = self.tx.send(Ok(serde_json::json!({"status": msg})));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(model: &str) -> PullRequest {
        PullRequest {
            model: model.into(),
            name: None,
            sha256: None,
            force: false,
            stream: None,
        }
    }

    #[test]
    fn only_names_unless_allowed() {
        let none = AllowPull::default();
        let all = AllowPull {
            urls: true,
            paths: true,
        };
        assert_eq!(
            check_allowed(&req("gemma3-270m"), none).ok(),
            Some(Source::Name)
        );
        for m in [
            "/etc/passwd",
            "../models/x.gguf",
            "./x.gguf",
            "https://example.com/x.gguf",
            "hf.co/a/b/resolve/main/x.gguf",
        ] {
            let e = check_allowed(&req(m), none)
                .err()
                .map(|e| e.status().as_u16());
            assert_eq!(e, Some(403), "{m}");
        }
        assert_eq!(
            check_allowed(&req("/tmp/x.gguf"), all).ok(),
            Some(Source::Path)
        );
        assert_eq!(
            check_allowed(&req("http://x/y.gguf"), all).ok(),
            Some(Source::Url)
        );
        // Relative paths mean nothing to a client on the other end of a socket.
        let e = check_allowed(&req("x/y.gguf"), all).err();
        assert_eq!(e.map(|e| e.status().as_u16()), Some(400));
    }
}
