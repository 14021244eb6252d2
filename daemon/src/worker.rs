//! The engine thread of one loaded model. It owns every sequence's state (KV cache, sampler,
//! decoder) and is reached only through a bounded queue of typed [`GenRequest`]s; text streams
//! back to the HTTP side over each request's own channel (DESIGN.md invariant 5).
//!
//! Scheduling: up to `parallel` sequences run at once. Each turn every active sequence takes
//! one step — a prompt chunk while prefilling, else one decode token — so a long prompt does
//! not stall the others, and a request that arrives joins at the next turn. A sequence whose
//! response channel is gone (the client disconnected) is dropped, with its KV cache, before
//! the next turn's step.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam::channel::{self, RecvTimeoutError, TryRecvError, TrySendError};

use strata_engine::kv::KvOptions;
use strata_engine::model::Scratch;
use strata_engine::sampler::{Sampler, SamplerConfig};
use strata_engine::spec::{Draft, DraftModel, SpecConfig, SpecStats, SpecType, Speculator};
use strata_engine::tokenizer::StreamDecoder;
use strata_engine::{Context, EngineError, Logits, Model};
use strata_simd::pool::ThreadPool;
use strata_storage::residency::ResidencyError;
use tokio::sync::mpsc;

use crate::logprobs::{TokenLogprob, token_logprob};
use crate::metrics::{DecodeCounts, Metrics};
use crate::sessions::{SessionOutcome, SessionPlan};
use crate::shutdown::Shutdown;
use crate::stop::StopMatcher;
use crate::watchdog::{Heartbeat, Watchdog};

/// One generation, fully checked by the HTTP side.
pub struct GenRequest {
    pub prompt: Vec<u32>,
    /// prompt + max_tokens fits the context (checked before queueing).
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    pub stop: Vec<String>,
    /// Report each token's log-probability and this many alternatives (`None`: no logprobs).
    pub logprobs: Option<usize>,
    /// Resume from (and after the answer save to) a session, already read and checked by
    /// the HTTP side (module `sessions`).
    pub session: Option<SessionPlan>,
    /// Unbounded on purpose: the engine thread must never wait on one slow client, and what a
    /// request can queue here is bounded by its `max_tokens`.
    pub events: mpsc::UnboundedSender<Event>,
}

#[derive(Debug)]
pub enum Event {
    /// Text ready to send (held back while it may still become a stop string), and the
    /// log-probability of the token sampled in this step when the request asked for them.
    Text {
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done(Finish),
    Failed(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Shutdown,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Shutdown => "shutdown",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Finish {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens taken from a saved session rather than computed.
    pub cached_tokens: usize,
    /// Whether the session (when the request named one) was saved.
    pub session: Option<SessionOutcome>,
}

#[derive(Clone)]
pub struct WorkerConfig {
    pub n_ctx: usize,
    pub parallel: usize,
    pub max_queue: usize,
    /// Prompt tokens per step.
    pub prefill_chunk: usize,
    /// Each sequence's KV cache: types, and the RAM budget with the SSD beneath it.
    pub kv: KvOptions,
    /// Finished sequences' caches kept for prefix reuse.
    pub prompt_cache: usize,
    /// Speculative decoding while one sequence decodes, and the draft model it uses.
    pub spec: SpecConfig,
    pub draft: Option<Arc<Model>>,
}

/// What the engine thread publishes for `/api/ps` and `/metrics`.
pub struct WorkerStats {
    pub active: AtomicUsize,
    pub kv_bytes: AtomicUsize,
    /// KV pages in VRAM, over every cache the thread holds (finished ones kept for prefix
    /// reuse included: they hold their pages).
    pub kv_vram_bytes: AtomicUsize,
    pub tokens_generated: AtomicU64,
    /// Decode passes, and the sequences they advanced: continuous batching puts every
    /// decoding sequence in one pass, so the ratio is the mean batch.
    pub decode_steps: AtomicU64,
    pub decode_sequences: AtomicU64,
    /// The most sequences one decode pass has advanced.
    pub decode_batch_max: AtomicUsize,
    /// What speculative decoding did (the engine thread's speculator's counts).
    pub spec: Mutex<SpecStats>,
    last_activity: Mutex<Instant>,
}

impl WorkerStats {
    fn new() -> Self {
        Self {
            active: AtomicUsize::new(0),
            kv_bytes: AtomicUsize::new(0),
            kv_vram_bytes: AtomicUsize::new(0),
            tokens_generated: AtomicU64::new(0),
            decode_steps: AtomicU64::new(0),
            decode_sequences: AtomicU64::new(0),
            decode_batch_max: AtomicUsize::new(0),
            spec: Mutex::new(SpecStats::default()),
            // A model loaded at start and never used counts as idle from its load.
            last_activity: Mutex::new(Instant::now()),
        }
    }

    /// The decode counters, for `/api/ps` and `/metrics`.
    pub fn decode_counts(&self) -> DecodeCounts {
        DecodeCounts {
            steps: self.decode_steps.load(Ordering::Relaxed),
            sequences: self.decode_sequences.load(Ordering::Relaxed),
            batch_max: self.decode_batch_max.load(Ordering::Relaxed),
            spec: self.spec.lock().map(|s| *s).unwrap_or_default(),
        }
    }

    pub fn touch(&self) {
        if let Ok(mut t) = self.last_activity.lock() {
            *t = Instant::now();
        }
    }

    /// Seconds since a request was last submitted or a sequence last stepped.
    pub fn idle_s(&self) -> f64 {
        self.last_activity
            .lock()
            .map_or(0.0, |t| t.elapsed().as_secs_f64())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({0} requests waiting)")]
    Full(usize),
    #[error("the model's engine thread has stopped")]
    Closed,
}

/// The HTTP side's end of an engine thread. Dropping every clone ends the thread once its
/// active sequences are done.
#[derive(Clone)]
pub struct WorkerHandle {
    tx: channel::Sender<GenRequest>,
    pub stats: Arc<WorkerStats>,
}

impl WorkerHandle {
    pub fn submit(&self, req: GenRequest) -> Result<(), SubmitError> {
        self.stats.touch();
        self.tx.try_send(req).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::Full(self.tx.capacity().unwrap_or(0)),
            TrySendError::Disconnected(_) => SubmitError::Closed,
        })
    }

    /// Requests waiting for a free slot.
    pub fn queued(&self) -> usize {
        self.tx.len()
    }
}

pub fn spawn(
    name: &str,
    model: Arc<Model>,
    pool: Arc<ThreadPool>,
    cfg: WorkerConfig,
    metrics: Arc<Metrics>,
    shutdown: Arc<Shutdown>,
    watchdog: Option<Arc<Watchdog>>,
) -> std::io::Result<WorkerHandle> {
    let (tx, rx) = channel::bounded(cfg.max_queue.max(1));
    let stats = Arc::new(WorkerStats::new());
    let heartbeat = watchdog.as_ref().map(|w| w.register());
    let spec = speculator(name, &model, &pool, &cfg);
    let worker = Worker {
        spec,
        model,
        pool,
        rx,
        stats: stats.clone(),
        metrics,
        shutdown,
        watchdog: watchdog.zip(heartbeat),
        active: Vec::with_capacity(cfg.parallel),
        idle: Vec::new(),
        batch: Scratch::new(),
        cfg,
    };
    std::thread::Builder::new()
        .name(format!("engine-{name}"))
        .spawn(move || worker.run())?;
    Ok(WorkerHandle { tx, stats })
}

/// The speculator of a worker configured to speculate (a problem is logged, and the model
/// then generates plainly: the draft's vocabulary was checked at load).
fn speculator(
    name: &str,
    model: &Model,
    pool: &Arc<ThreadPool>,
    cfg: &WorkerConfig,
) -> Option<Speculator> {
    if cfg.spec.kind == SpecType::None {
        return None;
    }
    let draft = cfg
        .draft
        .as_ref()
        .map(|d| {
            DraftModel::new(
                d.clone(),
                model,
                cfg.n_ctx,
                pool.clone(),
                &SamplerConfig::greedy(),
            )
        })
        .transpose();
    match draft
        .and_then(|d| Draft::new(&cfg.spec, d))
        .and_then(|d| Speculator::new(cfg.spec.clone(), d))
    {
        Ok(s) => {
            tracing::info!(
                model = name,
                spec = cfg.spec.kind.name(),
                n_max = cfg.spec.n_max,
                "speculative decoding while one sequence decodes"
            );
            Some(s)
        }
        Err(e) => {
            tracing::error!(model = name, "speculative decoding off: {e}");
            None
        }
    }
}

struct Worker {
    /// Drafts and verifies while one sequence decodes.
    spec: Option<Speculator>,
    model: Arc<Model>,
    pool: Arc<ThreadPool>,
    cfg: WorkerConfig,
    rx: channel::Receiver<GenRequest>,
    stats: Arc<WorkerStats>,
    metrics: Arc<Metrics>,
    shutdown: Arc<Shutdown>,
    /// This thread's heartbeat: each turn of the loop beats it (module `watchdog`).
    watchdog: Option<(Arc<Watchdog>, Arc<Heartbeat>)>,
    active: Vec<Sequence>,
    /// Caches of finished sequences, oldest first, kept so that a request that shares their
    /// prefix does not recompute it; with a KV budget their pages wait on SSD.
    idle: Vec<Idle>,
    /// Activations of the batched decode step, reused from step to step.
    batch: Scratch,
}

/// A finished sequence's cache and the tokens it holds, in order.
struct Idle {
    tokens: Vec<u32>,
    ctx: Context,
}

/// Shorter common prefixes are recomputed rather than taken (a lone BOS, say).
const MIN_REUSE: usize = 4;

struct Sequence {
    prompt: Vec<u32>,
    /// Tokens sampled so far, in order (each is fed on the step after it is sampled).
    generated: Vec<u32>,
    /// Prompt tokens resumed from a session.
    cached: usize,
    /// Where to save the session after the answer.
    save_to: Option<(String, std::path::PathBuf)>,
    /// Prompt tokens already in the cache.
    fed: usize,
    /// The last sampled token, to be fed on the next decode step.
    next: u32,
    /// Positions the cache holds past the answer handed out so far: a verify pass's tokens,
    /// cut off if the sequence ends before they are handed out.
    ahead: usize,
    produced: usize,
    max_tokens: usize,
    ctx: Context,
    sampler: Sampler,
    decoder: StreamDecoder,
    stop: StopMatcher,
    logprobs: Option<usize>,
    events: mpsc::UnboundedSender<Event>,
    finished: bool,
}

impl Sequence {
    /// The tokens whose keys and values the cache holds: the prompt and the answer tokens
    /// fed so far.
    fn held(&self) -> Vec<u32> {
        let fed = self.ctx.n_past() - self.ahead;
        let mut tokens: Vec<u32> = self.prompt.iter().take(fed).copied().collect();
        tokens.extend(
            self.generated
                .iter()
                .take(fed.saturating_sub(self.prompt.len())),
        );
        tokens
    }

    fn prefilling(&self) -> bool {
        self.fed < self.prompt.len()
    }

    fn send(&mut self, ev: Event) {
        // A failed send means the client left; the next turn drops the sequence.
        let _ = self.events.send(ev);
    }

    fn finish(&mut self, model: &Model, metrics: &Metrics, reason: FinishReason) {
        if self.ahead > 0 {
            // What a verify pass chose past the end leaves the cache, which then holds what
            // plain steps would have left (and a failure to do so leaves the cache unusable).
            let keep = self.ctx.n_past() - self.ahead;
            if let Err(e) = self.ctx.truncate(keep) {
                tracing::error!("cutting a finished sequence's cache back failed: {e}");
                self.ctx.clear();
            }
            self.ahead = 0;
        }
        let session = self.save(model, metrics);
        // The decoder may hold the start of a UTF-8 sequence, the matcher a possible stop.
        let rest = self.decoder.finish();
        let (mut tail, hit) = self.stop.push(&rest);
        if !hit {
            tail.push_str(&self.stop.finish());
        }
        if !tail.is_empty() {
            self.send(Event::Text {
                text: tail,
                logprob: None,
            });
        }
        self.send(Event::Done(Finish {
            reason,
            prompt_tokens: self.prompt.len(),
            completion_tokens: self.produced,
            cached_tokens: self.cached,
            session,
        }));
        self.finished = true;
    }

    /// Saves the cache (the prompt and the answer tokens fed so far) when the request named
    /// a session. Runs on the engine thread before the final event, so a client that got
    /// its answer can resume from it at once; a failure (disk full, say) is reported in the
    /// final event and logged, and the previous file stays as it was.
    fn save(&mut self, model: &Model, metrics: &Metrics) -> Option<SessionOutcome> {
        let (name, path) = self.save_to.take()?;
        let tokens = self.held();
        let t0 = Instant::now();
        let outcome = match model.save_session(&self.ctx, &tokens, &path) {
            Ok(bytes) => {
                metrics.session_saves.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    session = %name,
                    tokens = tokens.len(),
                    bytes,
                    "session saved in {:.1} ms",
                    t0.elapsed().as_secs_f64() * 1e3
                );
                SessionOutcome::Saved {
                    name,
                    tokens: tokens.len(),
                    bytes,
                }
            }
            Err(e) => {
                metrics.session_save_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(session = %name, "saving the session failed: {e}");
                SessionOutcome::Failed {
                    name,
                    error: format!("saving the session failed: {e}"),
                }
            }
        };
        Some(outcome)
    }

    /// Takes a freshly sampled token: ends the sequence on end-of-generation, a stop string,
    /// `max_tokens` or a full context; else streams its text and keeps it for the next step.
    fn take(&mut self, model: &Model, metrics: &Metrics, tok: u32, logprob: Option<TokenLogprob>) {
        if model.tokenizer.is_eog(tok) {
            self.finish(model, metrics, FinishReason::Stop);
            return;
        }
        self.sampler.accept(tok);
        self.produced += 1;
        self.generated.push(tok);
        let piece = self
            .decoder
            .push(&model.tokenizer.token_to_piece(tok, false));
        let (text, hit) = self.stop.push(&piece);
        if !text.is_empty() || logprob.is_some() {
            self.send(Event::Text { text, logprob });
        }
        if hit {
            // Whatever follows the stop string is not part of the answer.
            self.decoder = StreamDecoder::new();
            self.finish(model, metrics, FinishReason::Stop);
        } else if self.produced >= self.max_tokens
            || self.ctx.n_past() - self.ahead + 1 > self.ctx.n_ctx()
        {
            self.finish(model, metrics, FinishReason::Length);
        } else {
            self.next = tok;
        }
    }
}

impl Worker {
    fn run(mut self) {
        loop {
            if let Some((wd, hb)) = &self.watchdog {
                wd.beat(hb);
            }
            if !self.admit() {
                tracing::debug!("engine thread exits: no handle left and nothing running");
                return;
            }
            self.drop_cancelled();
            if self.shutdown.drain_expired() {
                self.end_all(FinishReason::Shutdown);
            }
            if self.active.is_empty() {
                continue;
            }
            self.stats.touch();
            self.step();
            self.reap();
        }
    }

    /// Moves queued requests into free slots; waits while there is nothing to do (waking
    /// for the watchdog's heartbeat). Returns false when the thread should exit.
    fn admit(&mut self) -> bool {
        while self.active.len() < self.cfg.parallel {
            let req = if self.active.is_empty() {
                let wake = self
                    .watchdog
                    .as_ref()
                    .map_or(Duration::from_secs(3600), |(wd, _)| wd.idle_wake());
                match self.rx.recv_timeout(wake) {
                    Ok(r) => r,
                    // An idle turn: the loop beats the heartbeat and comes back.
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return false,
                }
            } else {
                match self.rx.try_recv() {
                    Ok(r) => r,
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            };
            if req.events.is_closed() {
                self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let mut sampler = Sampler::new(req.sampler);
            req.prompt.iter().for_each(|&t| sampler.accept(t));
            let (resumed, save_to) = match req.session {
                Some(plan) => (plan.resume, Some((plan.name, plan.path))),
                None => (None, None),
            };
            let (mut ctx, fed) = match resumed {
                Some(r) => {
                    self.metrics.session_resumes.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .session_reused_tokens
                        .fetch_add(r.reused as u64, Ordering::Relaxed);
                    (r.ctx, r.reused)
                }
                None => match self.reuse_prefix(&req.prompt) {
                    Some(x) => x,
                    None => match self.model.new_context_with(
                        self.cfg.n_ctx,
                        self.pool.clone(),
                        &self.cfg.kv,
                    ) {
                        Ok(ctx) => (ctx, 0),
                        Err(e) => {
                            tracing::error!("a new KV cache: {e}");
                            self.metrics.failed.fetch_add(1, Ordering::Relaxed);
                            let _ = req.events.send(Event::Failed(format!("KV cache: {e}")));
                            continue;
                        }
                    },
                },
            };
            ctx.set_n_ubatch(self.cfg.prefill_chunk);
            self.make_room_in_vram();
            self.active.push(Sequence {
                prompt: req.prompt,
                generated: Vec::new(),
                cached: fed,
                save_to,
                fed,
                next: 0,
                ahead: 0,
                produced: 0,
                max_tokens: req.max_tokens,
                ctx,
                sampler,
                decoder: StreamDecoder::new(),
                stop: StopMatcher::new(req.stop),
                logprobs: req.logprobs,
                events: req.events,
                finished: false,
            });
        }
        self.publish();
        true
    }

    fn drop_cancelled(&mut self) {
        let before = self.active.len();
        self.active.retain(|s| !s.events.is_closed());
        let gone = before - self.active.len();
        if gone > 0 {
            tracing::info!(sequences = gone, "client gone; sequence cancelled");
            self.metrics
                .cancelled
                .fetch_add(gone as u64, Ordering::Relaxed);
            self.publish();
        }
    }

    fn end_all(&mut self, reason: FinishReason) {
        for s in &mut self.active {
            s.finish(&self.model, &self.metrics, reason);
        }
        while let Ok(req) = self.rx.try_recv() {
            let _ = req.events.send(Event::Done(Finish {
                reason,
                prompt_tokens: req.prompt.len(),
                completion_tokens: 0,
                cached_tokens: 0,
                session: None,
            }));
        }
        self.reap();
    }

    fn step(&mut self) {
        let model = self.model.clone();
        let chunk = self.cfg.prefill_chunk;
        let before: usize = self.active.iter().map(|s| s.produced).sum();
        let mut decoding: Vec<&mut Sequence> = Vec::with_capacity(self.active.len());
        let metrics = &*self.metrics;
        for s in &mut self.active {
            if s.prefilling() {
                prefill(&model, metrics, s, chunk);
            } else {
                decoding.push(s);
            }
        }
        let spec = self.spec.as_mut();
        let passes = decode(
            &model,
            metrics,
            (&self.pool, &mut self.batch, spec),
            &mut decoding,
        );
        if let (Some(s), Ok(mut out)) = (&self.spec, self.stats.spec.lock()) {
            *out = s.stats();
        }
        let st = &self.stats;
        let steps = passes.singles + usize::from(passes.batch > 0);
        st.decode_steps.fetch_add(steps as u64, Ordering::Relaxed);
        st.decode_sequences
            .fetch_add((passes.singles + passes.batch) as u64, Ordering::Relaxed);
        let widest = passes.batch.max(passes.singles.min(1));
        st.decode_batch_max.fetch_max(widest, Ordering::Relaxed);
        // Counted after the step: a prefill's last chunk also yields a token.
        let produced: usize = self.active.iter().map(|s| s.produced).sum::<usize>() - before;
        self.stats
            .tokens_generated
            .fetch_add(produced as u64, Ordering::Relaxed);
        self.metrics
            .tokens_generated
            .fetch_add(produced as u64, Ordering::Relaxed);
    }

    /// The longest prefix of `prompt` that a cache already holds (an idle one is taken; an
    /// active sequence's full pages are shared), leaving at least one token to compute.
    fn reuse_prefix(&mut self, prompt: &[u32]) -> Option<(Context, usize)> {
        let limit = prompt.len().saturating_sub(1);
        let common = |held: &[u32]| held.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let best_idle = self
            .idle
            .iter()
            .enumerate()
            .map(|(i, x)| (common(&x.tokens).min(limit), i))
            .max();
        let best_active = self
            .active
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.finished)
            .map(|(i, s)| (common(&s.held()).min(limit), i))
            .max();
        let (n, from_idle, i) = match (best_idle, best_active) {
            (Some((a, i)), Some((b, _))) if a >= b => (a, true, i),
            (_, Some((b, j))) => (b, false, j),
            (Some((a, i)), None) => (a, true, i),
            (None, None) => return None,
        };
        if n < MIN_REUSE {
            return None;
        }
        let ctx = if from_idle {
            let mut ctx = self.idle.remove(i).ctx;
            ctx.truncate(n).ok()?;
            ctx
        } else {
            let mut ctx = self
                .model
                .new_context_with(self.cfg.n_ctx, self.pool.clone(), &self.cfg.kv)
                .ok()?;
            if let Err(e) = ctx.share_prefix(&self.active[i].ctx, n) {
                tracing::warn!("sharing a prefix failed ({e}); recomputing it");
                return None;
            }
            ctx
        };
        self.metrics.prefix_hits.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .prefix_reused_tokens
            .fetch_add(n as u64, Ordering::Relaxed);
        tracing::debug!(tokens = n, from_idle, "prompt prefix reused");
        Some((ctx, n))
    }

    fn reap(&mut self) {
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|s| s.finished);
        self.active = running;
        if self.cfg.prompt_cache > 0 {
            for s in done {
                let tokens = s.held();
                if tokens.len() < MIN_REUSE {
                    continue;
                }
                let mut ctx = s.ctx;
                // An idle cache gives its RAM back when there is an SSD tier for it.
                if let Err(e) = ctx.kv_spill_all() {
                    tracing::warn!("writing an idle KV cache to disk failed: {e}");
                    continue;
                }
                self.idle.push(Idle { tokens, ctx });
                if self.idle.len() > self.cfg.prompt_cache {
                    self.idle.remove(0);
                }
            }
        }
        self.publish();
    }

    fn publish(&self) {
        self.stats
            .active
            .store(self.active.len(), Ordering::Relaxed);
        let kv: usize = self.active.iter().map(|s| s.ctx.kv_bytes()).sum();
        self.stats.kv_bytes.store(kv, Ordering::Relaxed);
        let vram: usize = self
            .active
            .iter()
            .map(|s| &s.ctx)
            .chain(self.idle.iter().map(|x| &x.ctx))
            .map(Context::kv_vram_bytes)
            .sum();
        self.stats.kv_vram_bytes.store(vram, Ordering::Relaxed);
    }

    /// Drops the oldest finished caches that hold VRAM until they and the running sequences
    /// (one more about to start included) number at most `parallel`: the VRAM the planner
    /// left for KV caches is sized for `parallel` sequences, and finished caches keep their
    /// VRAM pages, so keeping more would take the pages a running sequence needs.
    fn make_room_in_vram(&mut self) {
        let holding = |x: &Idle| x.ctx.kv_vram_bytes() > 0;
        while self.active.len() + 1 + self.idle.iter().filter(|x| holding(x)).count()
            > self.cfg.parallel
        {
            let Some(i) = self.idle.iter().position(holding) else {
                break;
            };
            self.idle.remove(i);
            tracing::debug!("dropped a finished KV cache to free its VRAM");
        }
    }
}

/// Feeds the next chunk of a sequence's prompt; the last chunk yields its first token.
fn prefill(model: &Model, metrics: &Metrics, s: &mut Sequence, chunk: usize) {
    let end = (s.fed + chunk).min(s.prompt.len());
    let last = end == s.prompt.len();
    let logits = if last { Logits::Last } else { Logits::None };
    let result = model.forward(&mut s.ctx, &s.prompt[s.fed..end], logits);
    s.fed = end;
    match result {
        Ok(l) if last => {
            let (tok, lp) = pick(&mut s.sampler, s.logprobs, l);
            s.take(model, metrics, tok, lp);
        }
        Ok(_) => {}
        Err(e) => fail(metrics, s, &e),
    }
}

/// One new token for every decoding sequence, in one forward pass over all of them
/// (continuous batching: each weight matrix is read once per step, whatever the number of
/// sequences).
///
/// When the batched pass fails, every cache is first cut back to where the step began (an
/// error after the layers, in the output projection, would otherwise leave the step's
/// position in them). Then what failed decides:
/// - a read of the weights (an I/O error) belongs to the step, not to any one sequence: all
///   of them needed those bytes, so every sequence of the step fails with the error and is
///   dropped, and the engine goes on with the next step (which reads again);
/// - anything else is checked before any sequence is touched and concerns one of them (a full
///   context, say), so they are stepped one by one and only the one at fault fails.
fn decode(
    model: &Model,
    metrics: &Metrics,
    (pool, batch, spec): (&ThreadPool, &mut Scratch, Option<&mut Speculator>),
    seqs: &mut [&mut Sequence],
) -> Passes {
    let mut passes = Passes::default();
    if let (Some(spec), [s]) = (spec, &mut *seqs)
        && s.logprobs.is_none()
    {
        speculate(model, metrics, spec, s);
        passes.singles = 1;
        return passes;
    }
    if seqs.len() > 1 {
        let tokens: Vec<u32> = seqs.iter().map(|s| s.next).collect();
        let before: Vec<usize> = seqs.iter().map(|s| s.ctx.n_past()).collect();
        let mut ctxs: Vec<&mut Context> = seqs.iter_mut().map(|s| &mut s.ctx).collect();
        match model.decode_batch(pool, &mut ctxs, &tokens, batch) {
            Ok(logits) => {
                let n_vocab = model.config.n_vocab;
                for (s, row) in seqs.iter_mut().zip(logits.chunks_exact(n_vocab)) {
                    let (tok, lp) = pick(&mut s.sampler, s.logprobs, row);
                    s.take(model, metrics, tok, lp);
                }
                passes.batch = seqs.len();
                return passes;
            }
            Err(e) => {
                let mut cut = Ok(());
                for (s, &n) in seqs.iter_mut().zip(&before) {
                    cut = cut.and(s.ctx.truncate(n));
                }
                // A cache that could not be cut back cannot take the steps one by one either.
                if is_io(&e) || cut.is_err() {
                    for s in seqs.iter_mut() {
                        fail(metrics, s, &e);
                    }
                    return passes;
                }
            }
        }
    }
    for s in seqs.iter_mut() {
        let next = s.next;
        match model.forward(&mut s.ctx, &[next], Logits::Last) {
            Ok(logits) => {
                let (tok, lp) = pick(&mut s.sampler, s.logprobs, logits);
                s.take(model, metrics, tok, lp);
                passes.singles += 1;
            }
            Err(e) => fail(metrics, s, &e),
        }
    }
    passes
}

/// The decode passes of one step that produced tokens: one batched pass over `batch`
/// sequences (0: none), and `singles` passes of one sequence each.
/// One speculative step of the only decoding sequence: its last token and a draft in one
/// pass; every token chosen is taken in order until the sequence ends, and the cache keeps the
/// positions of those not handed out yet (`ahead`) until it does.
fn speculate(model: &Model, metrics: &Metrics, spec: &mut Speculator, s: &mut Sequence) {
    if spec.draft_sampler() != Some(s.sampler.config()) {
        spec.set_draft_sampler(s.sampler.config());
    }
    let history = s.held();
    let out = match spec.step(model, &mut s.ctx, &mut s.sampler, &history, s.next) {
        Ok(out) => out.to_vec(),
        Err(e) => {
            // The step's own positions leave the cache; the sequence fails as a plain step's.
            let _ = s.ctx.truncate(history.len());
            fail(metrics, s, &e);
            return;
        }
    };
    let k = out.len() - 1;
    for (i, &tok) in out.iter().enumerate() {
        s.ahead = k - i;
        s.take(model, metrics, tok, None);
        if s.finished {
            return;
        }
    }
    s.ahead = 0;
}

#[derive(Default)]
struct Passes {
    batch: usize,
    singles: usize,
}

/// Whether reading the weights failed (as opposed to a problem of one sequence).
fn is_io(e: &EngineError) -> bool {
    matches!(
        e,
        EngineError::Residency(ResidencyError::Read(_) | ResidencyError::Io { .. })
    )
}

/// Samples the next token, with its log-probability when the request asked for them.
fn pick(
    sampler: &mut Sampler,
    logprobs: Option<usize>,
    logits: &[f32],
) -> (u32, Option<TokenLogprob>) {
    let tok = sampler.sample(logits);
    (tok, logprobs.map(|k| token_logprob(logits, tok, k)))
}

/// Ends a sequence with an error; it is dropped with its cache, and its session file (if it
/// named one) is left as it was.
fn fail(metrics: &Metrics, s: &mut Sequence, e: &EngineError) {
    let msg = if is_io(e) {
        format!("reading the model's weights failed: {e}")
    } else {
        format!("generation failed: {e}")
    };
    tracing::error!("{msg}");
    metrics.failed.fetch_add(1, Ordering::Relaxed);
    s.send(Event::Failed(msg));
    s.finished = true;
}
