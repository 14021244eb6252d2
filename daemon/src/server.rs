//! The HTTP routes: OpenAI-compatible `/v1`, native `/api`, and `/metrics`.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use strata_engine::Model;
use strata_engine::chat::ChatMessage;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::api::{
    ChatRequest, CompletionRequest, Endpoint, GenParams, LogprobsWriter, ModelRef, PromptDetails,
    Shape, Usage, parse_json,
};
use crate::config::AllowPull;
use crate::conns::{Activity, BusyBody, Conns};
use crate::error::ApiError;
use crate::logprobs::TokenLogprob;
use crate::manager::{LoadOutcome, LoadedModel, Manager, store_models};
use crate::metrics::{GpuGauges, Metrics};
use crate::sessions::Sessions;
use crate::shutdown::Shutdown;
use crate::worker::{Event, Finish, GenRequest, SubmitError};

/// Request bodies past this get 413.
pub const MAX_BODY: usize = 2 * 1024 * 1024;

pub struct AppState {
    pub manager: Manager,
    pub metrics: Arc<Metrics>,
    pub shutdown: Arc<Shutdown>,
    pub started: Instant,
    /// What `/api/pull` may fetch besides store names.
    pub allow_pull: AllowPull,
    pub sessions: Arc<Sessions>,
    /// How long a request's body may take to arrive, from when its head did.
    pub read_timeout: Duration,
    /// The open connections, for `/metrics`.
    pub conns: Arc<Conns>,
}

/// Who sent a request, attached by the listener for logging.
#[derive(Clone, Debug)]
pub enum Peer {
    Unix { uid: Option<u32>, pid: Option<i32> },
    Tcp(std::net::SocketAddr),
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/api/health", get(health))
        .route("/api/ps", get(ps))
        .route("/api/load", post(load))
        .route("/api/unload", post(unload))
        .route("/api/pull", post(pull))
        .route("/api/sessions", get(list_sessions))
        .route(
            "/api/sessions/{name}",
            axum::routing::delete(delete_session),
        )
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(state.clone(), limit_body))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Logs each request with its peer's credentials and counts it for `/metrics`.
async fn observe(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", |p| p.as_str())
        .to_owned();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let peer = req.extensions().get::<Peer>().cloned();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    st.metrics.record_request(&endpoint, status);
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    match peer {
        Some(Peer::Unix { uid, pid }) => {
            tracing::info!(%method, path, status, ?uid, ?pid, "request ({ms:.1} ms to headers)")
        }
        Some(Peer::Tcp(addr)) => {
            tracing::info!(%method, path, status, %addr, "request ({ms:.1} ms to headers)")
        }
        None => tracing::info!(%method, path, status, "request ({ms:.1} ms to headers)"),
    }
    resp
}

/// An over-limit body is read and thrown away up to this many bytes, so that the client sees
/// the 413 rather than a reset connection (closing a socket with unread input resets it).
const DRAIN_CAP: usize = 64 * 1024 * 1024;
/// ... and for at most this long.
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Reads each request body whole, up to [`MAX_BODY`] and within the read timeout. Past the
/// limit — declared by `Content-Length` or found while reading a chunked body — it answers 413
/// with `Connection: close` after draining what the client is still sending (bounded by
/// [`DRAIN_CAP`] and [`DRAIN_TIME`]); a body still incomplete at the deadline (a client that
/// sends half of what it declared, or a byte a second) gets 408 and the connection is closed.
/// Only then, with the whole request in hand, is the connection counted busy (until its
/// response has been sent): a connection still waiting for bytes is idle, and the first to go
/// when the daemon is at its connection cap (module `conns`).
async fn limit_body(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut data = body.into_data_stream();
    let mut kept = Vec::new();
    let mut over = declared.is_some_and(|n| n > MAX_BODY as u64);
    if !over {
        let read = async {
            while let Some(chunk) = data.next().await {
                match chunk {
                    Ok(c) if kept.len() + c.len() <= MAX_BODY => kept.extend_from_slice(&c),
                    Ok(_) => return Ok(true),
                    Err(e) => {
                        return Err(ApiError::BadRequest(format!(
                            "reading the request body: {e}"
                        )));
                    }
                }
            }
            Ok(false)
        };
        match tokio::time::timeout(st.read_timeout, read).await {
            Ok(Ok(o)) => over = o,
            Ok(Err(e)) => return e.into_response(),
            Err(_) => {
                let mut resp = ApiError::RequestTimeout(format!(
                    "the request body did not arrive within {} s",
                    st.read_timeout.as_secs_f64()
                ))
                .into_response();
                resp.headers_mut().insert(
                    header::CONNECTION,
                    header::HeaderValue::from_static("close"),
                );
                return resp;
            }
        }
    }
    if over {
        drop(kept);
        let drain = async {
            let mut seen = 0usize;
            while let Some(Ok(c)) = data.next().await {
                seen += c.len();
                if seen > DRAIN_CAP {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
        let mut resp = ApiError::TooLarge { limit: MAX_BODY }.into_response();
        resp.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        return resp;
    }
    let busy = parts.extensions.get::<Activity>().map(Activity::begin);
    let resp = next.run(Request::from_parts(parts, Body::from(kept))).await;
    match busy {
        Some(busy) => resp.map(|b| BusyBody::wrap(b, busy)),
        None => resp,
    }
}

pub(crate) fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge { limit: MAX_BODY }
        } else {
            ApiError::BadRequest(r.body_text())
        }
    })
}

impl AppState {
    pub(crate) fn accepting(&self) -> Result<(), ApiError> {
        if self.shutdown.stopping() {
            self.metrics
                .rejected_stopping
                .fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::Overloaded("the daemon is shutting down".into()));
        }
        Ok(())
    }
}

async fn pull(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = parse_json(&body_bytes(body)?)?;
    crate::pull::pull(req, st.allow_pull, || st.accepting()).await
}

async fn chat(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse_json(&body_bytes(body)?)?;
    let params = req.params.validate(Endpoint::Chat)?;
    if req.messages.is_empty() {
        return Err(ApiError::BadRequest("'messages' must not be empty".into()));
    }
    let messages = req
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| Ok(ChatMessage::new(m.role(i)?, m.text(i)?)))
        .collect::<Result<Vec<_>, ApiError>>()?;
    st.accepting()?;
    let loaded = st.manager.get(&req.model).await?;
    let l = loaded.clone();
    // Rendering and tokenizing a 2 MiB prompt takes long enough to stall an async worker.
    let prompt = tokio::task::spawn_blocking(move || l.chat_tokens(&messages))
        .await
        .map_err(|e| ApiError::Internal(format!("tokenizer task failed: {e}")))??;
    generate(&st, loaded, prompt, params, Endpoint::Chat).await
}

async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_json(&body_bytes(body)?)?;
    let params = req.params.validate(Endpoint::Completion)?;
    let text = req.prompt.into_text()?;
    st.accepting()?;
    let loaded = st.manager.get(&req.model).await?;
    let l = loaded.clone();
    let prompt = tokio::task::spawn_blocking(move || l.completion_tokens(&text))
        .await
        .map_err(|e| ApiError::Internal(format!("tokenizer task failed: {e}")))?;
    if prompt.is_empty() {
        return Err(ApiError::BadRequest(
            "the prompt is empty and this model adds no BOS token".into(),
        ));
    }
    generate(&st, loaded, prompt, params, Endpoint::Completion).await
}

async fn generate(
    st: &AppState,
    loaded: Arc<LoadedModel>,
    prompt: Vec<u32>,
    params: GenParams,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let n_prompt = prompt.len();
    let room = loaded.n_ctx.saturating_sub(n_prompt);
    let max_tokens = params.max_tokens.unwrap_or(room);
    if room == 0 || max_tokens > room {
        return Err(ApiError::BadRequest(format!(
            "the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds the context size \
             ({} tokens)",
            loaded.n_ctx
        )));
    }
    // A session is read and checked before anything is queued, so a bad one gets its own
    // status rather than a broken stream.
    let (prompt, session) = match params.session.clone() {
        None => (prompt, None),
        Some(name) => {
            let (sessions, l) = (st.sessions.clone(), loaded.clone());
            tokio::task::spawn_blocking(move || {
                let plan =
                    sessions.plan(&name, &l.model, l.pool.clone(), l.n_ctx, &l.kv, &prompt)?;
                Ok::<_, ApiError>((prompt, Some(plan)))
            })
            .await
            .map_err(|e| ApiError::Internal(format!("session task failed: {e}")))??
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let req = GenRequest {
        prompt,
        max_tokens,
        sampler: params.sampler,
        stop: params.stop,
        logprobs: params.logprobs,
        session,
        events: tx,
    };
    loaded.worker.submit(req).map_err(|e| match e {
        SubmitError::Full(_) => {
            st.metrics
                .rejected_queue_full
                .fetch_add(1, Ordering::Relaxed);
            ApiError::Overloaded(format!("model '{}': {e}", loaded.name))
        }
        SubmitError::Closed => ApiError::Internal(e.to_string()),
    })?;
    st.metrics
        .prompt_tokens
        .fetch_add(n_prompt as u64, Ordering::Relaxed);
    let shape = Shape::new(endpoint, &loaded.name);
    let answer = Answer {
        shape,
        model: loaded.model.clone(),
        logprobs: params.logprobs.map(|_| LogprobsWriter::new(endpoint)),
    };
    if params.stream {
        let stream = SseStream {
            rx,
            answer,
            started: false,
            done: false,
        };
        return Ok((
            [
                (header::CONTENT_TYPE, "text/event-stream"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            Body::from_stream(stream),
        )
            .into_response());
    }
    collect(rx, answer).await
}

/// How one generation's events become JSON.
struct Answer {
    shape: Shape,
    /// For the text of tokens named in log-probabilities.
    model: Arc<Model>,
    /// `Some` when the request asked for log-probabilities.
    logprobs: Option<LogprobsWriter>,
}

impl Answer {
    fn logprobs_json(&mut self, entries: &[TokenLogprob]) -> Option<serde_json::Value> {
        let model = &self.model;
        let piece = |id: u32| model.tokenizer.token_to_piece(id, true);
        self.logprobs.as_mut().map(|w| w.json(entries, &piece))
    }
}

/// Waits for a whole answer. If the client goes away, hyper drops this future and with it
/// `rx`, which the engine thread sees as a cancellation.
async fn collect(
    mut rx: mpsc::UnboundedReceiver<Event>,
    mut answer: Answer,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut entries = Vec::new();
    loop {
        match rx.recv().await {
            Some(Event::Text { text: t, logprob }) => {
                text.push_str(&t);
                entries.extend(logprob);
            }
            Some(Event::Done(f)) => {
                let lp = answer.logprobs_json(&entries);
                let mut body = answer.shape.full(&text, f.reason.as_str(), usage(&f), lp);
                add_session(&mut body, &f);
                return Ok(Json(body).into_response());
            }
            Some(Event::Failed(m)) => return Err(ApiError::Internal(m)),
            None => return Err(ApiError::Internal("the engine thread stopped".into())),
        }
    }
}

fn usage(f: &Finish) -> Usage {
    Usage {
        prompt_tokens: f.prompt_tokens,
        completion_tokens: f.completion_tokens,
        total_tokens: f.prompt_tokens + f.completion_tokens,
        prompt_tokens_details: PromptDetails {
            cached_tokens: f.cached_tokens,
        },
    }
}

/// The session's fate, as a top-level `session` object of the answer (or of the last stream
/// chunk): `{"name", "saved": true, "tokens", "bytes", "reused_tokens"}`, or `"saved": false`
/// with `error` when the save failed (the answer itself is complete).
fn add_session(body: &mut serde_json::Value, f: &Finish) {
    if let (Some(s), Some(obj)) = (&f.session, body.as_object_mut()) {
        obj.insert("session".into(), s.json(f.cached_tokens));
    }
}

/// Server-sent events over an engine stream. Dropping it (hyper does when the client
/// disconnects) drops the receiver, which cancels the sequence.
struct SseStream {
    rx: mpsc::UnboundedReceiver<Event>,
    answer: Answer,
    started: bool,
    done: bool,
}

fn sse(v: &serde_json::Value) -> String {
    format!("data: {v}\n\n")
}

impl tokio_stream::Stream for SseStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if !self.started && self.answer.shape.endpoint == Endpoint::Chat {
            // OpenAI opens a chat stream with the role, so clients can print a header early.
            self.started = true;
            let first = sse(&self.answer.shape.chunk(Some(""), true, None, None, None));
            return Poll::Ready(Some(Ok(Bytes::from(first))));
        }
        self.started = true;
        let ev = match self.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(ev) => ev,
        };
        let out = match ev {
            Some(Event::Text { text, logprob }) => {
                let lp = self.answer.logprobs_json(logprob.as_slice());
                sse(&self.answer.shape.chunk(Some(&text), false, None, None, lp))
            }
            Some(Event::Done(f)) => {
                self.done = true;
                let mut last = self.answer.shape.chunk(
                    None,
                    false,
                    Some(f.reason.as_str()),
                    Some(usage(&f)),
                    None,
                );
                add_session(&mut last, &f);
                format!("{}data: [DONE]\n\n", sse(&last))
            }
            Some(Event::Failed(m)) => {
                self.done = true;
                format!("{}data: [DONE]\n\n", sse(&ApiError::Internal(m).body()))
            }
            None => {
                self.done = true;
                let err = ApiError::Internal("the engine thread stopped".into());
                format!("{}data: [DONE]\n\n", sse(&err.body()))
            }
        };
        Poll::Ready(Some(Ok(Bytes::from(out))))
    }
}

async fn models() -> Result<Json<serde_json::Value>, ApiError> {
    let names = tokio::task::spawn_blocking(store_models)
        .await
        .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))??;
    let data: Vec<_> = names
        .iter()
        .map(
            |n| serde_json::json!({"id": n, "object": "model", "created": 0, "owned_by": "strata"}),
        )
        .collect();
    Ok(Json(serde_json::json!({"object": "list", "data": data})))
}

async fn health(State(st): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let status = if st.shutdown.stopping() {
        "stopping"
    } else {
        "ok"
    };
    Json(serde_json::json!({
        "status": status,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": st.started.elapsed().as_secs_f64(),
    }))
}

async fn ps(State(st): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let models: Vec<_> = st
        .manager
        .snapshot()
        .iter()
        .map(|m| {
            let s = &m.worker.stats;
            let w = m.model.weights().stats();
            let tiers: serde_json::Map<String, serde_json::Value> = m
                .model
                .weights()
                .resident_bytes()
                .iter()
                .map(|(t, b)| (format!("{}_bytes", t.name()), (*b).into()))
                .collect();
            let gpu = GpuGauges::of(&m.model);
            let decode = s.decode_counts();
            serde_json::json!({
                "name": m.name,
                "arch": m.model.config.arch.name(),
                "device": gpu.as_ref().map_or("cpu", |g| g.stats.device.as_str()),
                "size_bytes": m.model.size_bytes(),
                "n_ctx": m.n_ctx,
                "parallel": m.parallel,
                "kv_bytes": s.kv_bytes.load(Ordering::Relaxed),
                "active_sequences": s.active.load(Ordering::Relaxed),
                "queued": m.worker.queued(),
                "idle_s": s.idle_s(),
                "keep_alive_s": st.manager.keep_alive().map_or(0, |d| d.as_secs()),
                "keep_loaded": st.manager.keep_alive_of(&m.name).is_none(),
                "tokens_generated": s.tokens_generated.load(Ordering::Relaxed),
                "weights": {
                    "mode": w.mode.name(),
                    "io": w.io,
                    "tiers": tiers,
                    "resident_layers": w.resident_layers,
                    "streamed_layers": w.streamed_layers,
                    "window": w.window,
                },
                "decode": {
                    "steps": decode.steps,
                    "sequences": decode.sequences,
                    "batch_max": decode.batch_max,
                },
                "gpu": gpu.as_ref().map(|g| gpu_json(g, s.kv_vram_bytes.load(Ordering::Relaxed))),
            })
        })
        .collect();
    Json(serde_json::json!({"models": models, "loading": st.manager.loading()}))
}

/// A model's GPU in `/api/ps`: layers placed there, VRAM per tier, the link's traffic and
/// the planner's prediction.
fn gpu_json(g: &GpuGauges, kv_vram_bytes: usize) -> serde_json::Value {
    let t = &g.stats;
    serde_json::json!({
        "device": t.device,
        "layers": g.layers,
        "n_layers": g.n_layers,
        "vram": {
            "weights_bytes": t.weights_vram,
            "experts_bytes": t.experts_vram,
            "kv_bytes": kv_vram_bytes,
            "free_bytes": t.vram_free,
            "total_bytes": t.vram_total,
        },
        "streamed_bytes": t.streamed_bytes,
        "h2d_bytes": t.h2d_bytes,
        "d2h_bytes": t.d2h_bytes,
        "crossing_bytes": t.crossing_bytes,
        "wait_s": t.wait_us as f64 / 1e6,
        "launches": t.launches,
        "predicted_decode_tps": g.predicted_decode_tps,
        "bottleneck": g.bottleneck,
    })
}

async fn load(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req: ModelRef = parse_json(&body_bytes(body)?)?;
    st.accepting()?;
    let (_, outcome) = st.manager.ensure(&req.model).await?;
    let (status, ms) = match outcome {
        LoadOutcome::Loaded { ms } => ("loaded", ms),
        LoadOutcome::AlreadyLoaded => ("already_loaded", 0.0),
    };
    Ok(Json(
        serde_json::json!({"model": req.model, "status": status, "load_ms": ms}),
    ))
}

async fn unload(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req: ModelRef = parse_json(&body_bytes(body)?)?;
    if st.manager.unload(&req.model) {
        Ok(Json(
            serde_json::json!({"model": req.model, "status": "unloaded"}),
        ))
    } else {
        Err(ApiError::NotFound(format!(
            "model '{}' is not loaded",
            req.model
        )))
    }
}

async fn list_sessions(
    State(st): State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let sessions = st.sessions.clone();
    let list = tokio::task::spawn_blocking(move || sessions.list())
        .await
        .map_err(|e| ApiError::Internal(format!("session task failed: {e}")))??;
    Ok(Json(serde_json::json!({"sessions": list})))
}

async fn delete_session(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    st.sessions.remove(&name)?;
    tracing::info!(session = %name, "session deleted");
    Ok(Json(
        serde_json::json!({"session": name, "status": "deleted"}),
    ))
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let mut text = st.metrics.render(&st.manager.gauges());
    text.push_str(&st.conns.metrics());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
