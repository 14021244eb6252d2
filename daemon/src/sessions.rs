//! Saved sessions through the API: a request's `session` name is checked and its file read
//! and validated here, on a blocking task, before anything is queued — so a bad name or a
//! damaged or foreign file gets its own status, never a broken stream, and the engine thread
//! never waits on a session file it will not use. The engine thread saves the session after
//! the answer (module `worker`).
//!
//! The file format and its crash-safe writing are `strata_storage::session`'s; what a cache
//! must match to be resumed is `strata_engine::session`'s.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use strata_engine::kv::KvOptions;
use strata_engine::{Context, EngineError, Model};
use strata_simd::pool::ThreadPool;
use strata_storage::session::{SessionDir, SessionError};

use crate::error::ApiError;

/// The session directory, opened at start. A directory that cannot be opened is reported on
/// each request that names a session (the daemon still serves the others).
pub struct Sessions {
    dir: Result<SessionDir, String>,
}

/// Where a generation resumes from and saves to.
pub struct SessionPlan {
    pub name: String,
    pub path: PathBuf,
    /// The saved cache, cut to the longest prefix it shares with the new prompt; `None` when
    /// the session is new (or shares nothing).
    pub resume: Option<Resumed>,
}

pub struct Resumed {
    pub ctx: Context,
    /// Prompt tokens already in `ctx`.
    pub reused: usize,
}

/// What became of a session after its answer.
#[derive(Clone, Debug)]
pub enum SessionOutcome {
    Saved {
        name: String,
        tokens: usize,
        bytes: u64,
    },
    /// The save failed; the previous file (if any) is intact.
    Failed { name: String, error: String },
}

impl SessionOutcome {
    pub fn json(&self, reused: usize) -> serde_json::Value {
        match self {
            SessionOutcome::Saved {
                name,
                tokens,
                bytes,
            } => serde_json::json!({
                "name": name, "saved": true, "tokens": tokens, "bytes": bytes,
                "reused_tokens": reused,
            }),
            SessionOutcome::Failed { name, error } => serde_json::json!({
                "name": name, "saved": false, "error": error, "reused_tokens": reused,
            }),
        }
    }
}

impl Sessions {
    /// Opens (creating it 0700) `root`, removing temp files of saves killed midway.
    pub fn open(root: &Path) -> Self {
        let dir = SessionDir::open(root).map_err(|e| e.to_string());
        match &dir {
            Ok(d) => tracing::info!("sessions in {}", d.root().display()),
            Err(e) => tracing::warn!("sessions unavailable: {e}"),
        }
        Self { dir }
    }

    fn dir(&self) -> Result<&SessionDir, ApiError> {
        self.dir
            .as_ref()
            .map_err(|e| ApiError::Internal(format!("the session directory is unusable: {e}")))
    }

    /// The file of session `name`: 400 for a bad name, 422 for a path that is not a regular
    /// file (a symlink planted in the directory, say).
    pub fn path(&self, name: &str) -> Result<PathBuf, ApiError> {
        self.dir()?.path(name).map_err(|e| api_error(name, e))
    }

    /// Reads session `name` for `model` and keeps the longest prefix of it that `prompt`
    /// starts with (at least one prompt token is always left to compute, for its logits).
    pub fn plan(
        &self,
        name: &str,
        model: &Model,
        pool: Arc<ThreadPool>,
        n_ctx: usize,
        kv: &KvOptions,
        prompt: &[u32],
    ) -> Result<SessionPlan, ApiError> {
        let path = self.path(name)?;
        let plan = |resume| SessionPlan {
            name: name.to_owned(),
            path: path.clone(),
            resume,
        };
        if !path.exists() {
            return Ok(plan(None));
        }
        let mut ctx = model
            .new_context_with(n_ctx, pool, kv)
            .map_err(|e| ApiError::Internal(format!("session '{name}': {e}")))?;
        let saved = model.load_session(&mut ctx, &path).map_err(|e| match e {
            EngineError::Session(e) => api_error(name, e),
            other => ApiError::Internal(format!("session '{name}': {other}")),
        })?;
        let common = saved.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let reused = common.min(prompt.len().saturating_sub(1));
        if reused == 0 {
            return Ok(plan(None));
        }
        ctx.truncate(reused)
            .map_err(|e| ApiError::Internal(format!("session '{name}': {e}")))?;
        Ok(plan(Some(Resumed { ctx, reused })))
    }

    /// Saved sessions: name, bytes and modification time (seconds since the epoch).
    pub fn list(&self) -> Result<Vec<serde_json::Value>, ApiError> {
        let dir = self.dir()?;
        let names = dir
            .list()
            .map_err(|e| ApiError::Internal(format!("listing sessions: {e}")))?;
        Ok(names
            .into_iter()
            .filter_map(|n| {
                let meta = std::fs::symlink_metadata(dir.path(&n).ok()?).ok()?;
                let modified = meta
                    .modified()
                    .ok()?
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()?
                    .as_secs();
                Some(serde_json::json!({"name": n, "bytes": meta.len(), "modified": modified}))
            })
            .collect())
    }

    pub fn remove(&self, name: &str) -> Result<(), ApiError> {
        self.dir()?.remove(name).map_err(|e| api_error(name, e))
    }
}

/// A session error as the status that says whose problem it is.
fn api_error(name: &str, e: SessionError) -> ApiError {
    match e {
        SessionError::BadName(_) => ApiError::BadRequest(format!("'session': {e}")),
        SessionError::NotFound(_) => ApiError::NotFound(format!("session '{name}' does not exist")),
        // The file is damaged or not a file: the client can delete it or pick another name.
        SessionError::Corrupt { .. } => {
            ApiError::Unprocessable(format!("session '{name}' cannot be used: {e}"))
        }
        // A good file of another model, tokenizer or context: it stays for that model.
        SessionError::Mismatch { .. } => {
            ApiError::Conflict(format!("session '{name}' belongs elsewhere: {e}"))
        }
        other => ApiError::Internal(format!("session '{name}': {other}")),
    }
}
