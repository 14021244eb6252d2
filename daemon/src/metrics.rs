//! Counters for `/metrics`, rendered in Prometheus' text format (0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use strata_storage::residency::{ResidencyStats, Tier};

#[derive(Default)]
pub struct Metrics {
    /// (endpoint, status code) → count. Endpoints are route patterns, so the label set is
    /// bounded whatever paths clients send.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub tokens_generated: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub rejected_queue_full: AtomicU64,
    pub rejected_stopping: AtomicU64,
    pub cancelled: AtomicU64,
    /// Sequences ended by an engine error (a failed weight read, say).
    pub failed: AtomicU64,
    /// Requests that resumed from a saved session, and tokens they did not recompute.
    pub session_resumes: AtomicU64,
    pub session_reused_tokens: AtomicU64,
    pub session_saves: AtomicU64,
    pub session_save_errors: AtomicU64,
    /// Requests that took a shared prefix from another sequence's cache (prompt cache), and
    /// the tokens they did not recompute.
    pub prefix_hits: AtomicU64,
    pub prefix_reused_tokens: AtomicU64,
}

/// Reads one gauge of a model.
type Gauge = fn(&ModelGauges) -> usize;

/// One loaded model's gauges.
pub struct ModelGauges {
    pub name: String,
    pub queued: usize,
    pub active: usize,
    pub kv_bytes: usize,
    /// How the weights are held and what reading them cost so far.
    pub weights: ResidencyStats,
    /// Weight bytes per tier (RAM: resident set and window; SSD: streamed each pass).
    pub tiers: Vec<(Tier, u64)>,
}

impl Metrics {
    pub fn record_request(&self, endpoint: &str, code: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((endpoint.to_owned(), code)).or_default() += 1;
        }
    }

    pub fn render(&self, models: &[ModelGauges]) -> String {
        let mut o = String::new();
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        o.push_str("# HELP strata_requests_total HTTP requests answered, by route and status.\n");
        o.push_str("# TYPE strata_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((ep, code), n) in m.iter() {
                let _ = writeln!(
                    o,
                    "strata_requests_total{{endpoint=\"{}\",code=\"{code}\"}} {n}",
                    escape(ep)
                );
            }
        }
        let counters = [
            (
                "strata_tokens_generated_total",
                "Tokens generated.",
                c(&self.tokens_generated),
            ),
            (
                "strata_prompt_tokens_total",
                "Prompt tokens submitted.",
                c(&self.prompt_tokens),
            ),
            (
                "strata_cancelled_total",
                "Sequences cancelled because the client went away.",
                c(&self.cancelled),
            ),
            (
                "strata_failed_total",
                "Sequences ended by an engine error (such as a failed weight read).",
                c(&self.failed),
            ),
            (
                "strata_session_resumes_total",
                "Requests that resumed from a saved session.",
                c(&self.session_resumes),
            ),
            (
                "strata_session_reused_tokens_total",
                "Prompt tokens taken from saved sessions instead of recomputed.",
                c(&self.session_reused_tokens),
            ),
            (
                "strata_prefix_hits_total",
                "Requests that reused a prompt prefix cached from another sequence.",
                c(&self.prefix_hits),
            ),
            (
                "strata_prefix_reused_tokens_total",
                "Prompt tokens taken from cached prefixes instead of recomputed.",
                c(&self.prefix_reused_tokens),
            ),
            (
                "strata_session_saves_total",
                "Sessions saved after an answer.",
                c(&self.session_saves),
            ),
            (
                "strata_session_save_errors_total",
                "Session saves that failed (the previous file is kept).",
                c(&self.session_save_errors),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        o.push_str("# HELP strata_rejected_total Generation requests refused with 503.\n");
        o.push_str("# TYPE strata_rejected_total counter\n");
        let _ = writeln!(
            o,
            "strata_rejected_total{{reason=\"queue_full\"}} {}",
            c(&self.rejected_queue_full)
        );
        let _ = writeln!(
            o,
            "strata_rejected_total{{reason=\"stopping\"}} {}",
            c(&self.rejected_stopping)
        );
        let gauges: [(&str, &str, Gauge); 3] = [
            ("strata_queue_depth", "Requests waiting for a slot.", |m| {
                m.queued
            }),
            (
                "strata_active_sequences",
                "Sequences being generated.",
                |m| m.active,
            ),
            (
                "strata_kv_cache_bytes",
                "KV cache held by active sequences.",
                |m| m.kv_bytes,
            ),
        ];
        for (name, help, get) in gauges {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge");
            for m in models {
                let _ = writeln!(o, "{name}{{model=\"{}\"}} {}", escape(&m.name), get(m));
            }
        }
        render_weights(&mut o, models);
        let _ = writeln!(
            o,
            "# HELP strata_models_loaded Models loaded.\n# TYPE strata_models_loaded gauge\nstrata_models_loaded {}",
            models.len()
        );
        o
    }
}

/// Per model: where the weights are and what streaming them has cost (storage's
/// `ResidencyStats`).
fn render_weights(o: &mut String, models: &[ModelGauges]) {
    let head = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    head(
        o,
        "strata_weights_info",
        "gauge",
        "How each model's weights are held (mode: resident, streamed, mmap; io: io_uring, pread).",
    );
    for m in models {
        let _ = writeln!(
            o,
            "strata_weights_info{{model=\"{}\",mode=\"{}\",io=\"{}\"}} 1",
            escape(&m.name),
            m.weights.mode,
            m.weights.io
        );
    }
    head(
        o,
        "strata_weights_bytes",
        "gauge",
        "Weight bytes per tier: ram (resident set and streaming window), ssd (streamed each pass).",
    );
    for m in models {
        for (tier, bytes) in &m.tiers {
            let _ = writeln!(
                o,
                "strata_weights_bytes{{model=\"{}\",tier=\"{}\"}} {bytes}",
                escape(&m.name),
                tier.name()
            );
        }
    }
    type Stat = fn(&ResidencyStats) -> f64;
    let series: [(&str, &str, &str, Stat); 7] = [
        (
            "strata_weights_streamed_layers",
            "gauge",
            "Layers read from disk on every pass.",
            |s| s.streamed_layers as f64,
        ),
        (
            "strata_weights_read_bytes_total",
            "counter",
            "Bytes of weights read from disk since load (the resident set included).",
            |s| s.read.bytes as f64,
        ),
        (
            "strata_weights_read_chunks_total",
            "counter",
            "Read requests (of up to 1 MiB) completed for weights since load.",
            |s| s.read.chunks as f64,
        ),
        (
            "strata_weights_read_seconds_total",
            "counter",
            "Time the weight reader was busy reading.",
            |s| s.read.busy.as_secs_f64(),
        ),
        (
            "strata_weights_stall_seconds_total",
            "counter",
            "Time compute waited for weight reads (I/O stall).",
            |s| s.stall.as_secs_f64(),
        ),
        (
            "strata_weights_prefetches_total",
            "counter",
            "Streamed layers read ahead of their use.",
            |s| s.prefetches as f64,
        ),
        (
            "strata_weights_cold_rows_total",
            "counter",
            "Rows of cold tensors (embeddings) read on demand.",
            |s| s.cold_rows as f64,
        ),
    ];
    for (name, kind, help, get) in series {
        head(o, name, kind, help);
        for m in models {
            let _ = writeln!(
                o,
                "{name}{{model=\"{}\"}} {}",
                escape(&m.name),
                get(&m.weights)
            );
        }
    }
    head(
        o,
        "strata_weights_acquires_total",
        "counter",
        "Weight acquires by outcome: resident, window_hit (read ahead in time), waited (for a \
         read under way), missed (had to start its own read).",
    );
    for m in models {
        let s = &m.weights;
        for (outcome, n) in [
            ("resident", s.hot_hits),
            ("window_hit", s.window_hits),
            ("waited", s.stalls),
            ("missed", s.misses),
        ] {
            let _ = writeln!(
                o,
                "strata_weights_acquires_total{{model=\"{}\",outcome=\"{outcome}\"}} {n}",
                escape(&m.name)
            );
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_gauges() {
        let m = Metrics::default();
        m.record_request("/v1/models", 200);
        m.record_request("/v1/models", 200);
        m.tokens_generated.fetch_add(5, Ordering::Relaxed);
        let weights = ResidencyStats {
            mode: strata_storage::residency::ResidencyMode::Streamed,
            io: "pread",
            hot_hits: 7,
            misses: 2,
            stall: std::time::Duration::from_millis(1500),
            ..ResidencyStats::default()
        };
        let text = m.render(&[ModelGauges {
            name: "g".into(),
            queued: 2,
            active: 1,
            kv_bytes: 10,
            weights,
            tiers: vec![(Tier::Ram, 100), (Tier::Ssd, 900)],
        }]);
        assert!(text.contains("strata_requests_total{endpoint=\"/v1/models\",code=\"200\"} 2"));
        assert!(text.contains("strata_tokens_generated_total 5"));
        assert!(text.contains("strata_queue_depth{model=\"g\"} 2"));
        assert!(text.contains("strata_active_sequences{model=\"g\"} 1"));
        assert!(text.contains("strata_models_loaded 1"));
        for line in [
            "strata_weights_info{model=\"g\",mode=\"streamed\",io=\"pread\"} 1",
            "strata_weights_bytes{model=\"g\",tier=\"ram\"} 100",
            "strata_weights_bytes{model=\"g\",tier=\"ssd\"} 900",
            "strata_weights_stall_seconds_total{model=\"g\"} 1.5",
            "strata_weights_acquires_total{model=\"g\",outcome=\"resident\"} 7",
            "strata_weights_acquires_total{model=\"g\",outcome=\"missed\"} 2",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }
}
