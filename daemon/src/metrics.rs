//! Counters for `/metrics`, rendered in Prometheus' text format (0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

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
}

/// Reads one gauge of a model.
type Gauge = fn(&ModelGauges) -> usize;

/// One loaded model's gauges.
pub struct ModelGauges {
    pub name: String,
    pub queued: usize,
    pub active: usize,
    pub kv_bytes: usize,
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
        let _ = writeln!(
            o,
            "# HELP strata_models_loaded Models loaded.\n# TYPE strata_models_loaded gauge\nstrata_models_loaded {}",
            models.len()
        );
        o
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
        let text = m.render(&[ModelGauges {
            name: "g".into(),
            queued: 2,
            active: 1,
            kv_bytes: 10,
        }]);
        assert!(text.contains("strata_requests_total{endpoint=\"/v1/models\",code=\"200\"} 2"));
        assert!(text.contains("strata_tokens_generated_total 5"));
        assert!(text.contains("strata_queue_depth{model=\"g\"} 2"));
        assert!(text.contains("strata_active_sequences{model=\"g\"} 1"));
        assert!(text.contains("strata_models_loaded 1"));
    }
}
