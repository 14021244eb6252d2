//! Counters for `/metrics`, rendered in Prometheus' text format (0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use strata_engine::Model;
use strata_engine::model::GpuStats;
use strata_engine::plan::Bottleneck;
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
    /// KV pages in VRAM over the model's caches (module `worker`).
    pub kv_vram_bytes: usize,
    pub decode: DecodeCounts,
    /// `None`: the model runs on the CPU alone.
    pub gpu: Option<GpuGauges>,
}

/// Decode passes, the sequences they advanced, and the widest pass so far (continuous
/// batching at work: sequences / steps is the mean batch).
#[derive(Clone, Copy, Debug, Default)]
pub struct DecodeCounts {
    pub steps: u64,
    pub sequences: u64,
    pub batch_max: usize,
    /// Speculative decoding (while one sequence decodes): the engine's counts.
    pub spec: strata_engine::spec::SpecStats,
}

/// A model's GPU: what it holds and what crossed the link (the engine's `GpuStats`), and
/// what the planner put there and predicts.
#[derive(Clone, Debug)]
pub struct GpuGauges {
    pub stats: GpuStats,
    /// Layers with a phase on the GPU, of `n_layers`.
    pub layers: usize,
    pub n_layers: usize,
    pub predicted_decode_tps: f64,
    /// What limits the predicted decode speed (`gpu_compute`, `cpu_compute`, `pcie`, `disk`).
    pub bottleneck: &'static str,
}

impl GpuGauges {
    /// `None` for a model without a GPU.
    pub fn of(model: &Model) -> Option<GpuGauges> {
        let stats = model.gpu_stats()?;
        let plan = model.plan();
        Some(GpuGauges {
            stats,
            layers: plan.map_or(0, |p| p.gpu_layers()),
            n_layers: model.config.n_layer,
            predicted_decode_tps: plan.map_or(0.0, |p| p.decode.tokens_per_s),
            bottleneck: plan.map_or("unknown", |p| bottleneck_name(p.decode.bottleneck)),
        })
    }
}

/// A bottleneck as a label value.
fn bottleneck_name(b: Bottleneck) -> &'static str {
    match b {
        Bottleneck::CpuCompute => "cpu_compute",
        Bottleneck::GpuCompute => "gpu_compute",
        Bottleneck::Pcie => "pcie",
        Bottleneck::Disk => "disk",
    }
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
        render_decode(&mut o, models);
        render_weights(&mut o, models);
        render_gpu(&mut o, models);
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

fn head(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Per model: decode passes and how many sequences each advanced.
fn render_decode(o: &mut String, models: &[ModelGauges]) {
    type Count = fn(&DecodeCounts) -> u64;
    let series: [(&str, &str, &str, Count); 7] = [
        (
            "strata_decode_steps_total",
            "counter",
            "Decode passes (each advances every decoding sequence of the model by one token).",
            |d| d.steps,
        ),
        (
            "strata_decode_sequences_total",
            "counter",
            "Sequences advanced by decode passes; divided by the passes, the mean batch.",
            |d| d.sequences,
        ),
        (
            "strata_decode_batch_max",
            "gauge",
            "The most sequences one decode pass has advanced.",
            |d| d.batch_max as u64,
        ),
        (
            "strata_spec_passes_total",
            "counter",
            "Target passes of speculative generation (plain steps and verify passes).",
            |d| d.spec.passes,
        ),
        (
            "strata_spec_tokens_total",
            "counter",
            "Tokens those passes produced; divided by the passes, tokens per target pass.",
            |d| d.spec.tokens,
        ),
        (
            "strata_spec_drafted_total",
            "counter",
            "Tokens drafted for verification.",
            |d| d.spec.drafted,
        ),
        (
            "strata_spec_accepted_total",
            "counter",
            "Drafted tokens the target accepted; divided by the drafted, the acceptance rate.",
            |d| d.spec.accepted,
        ),
    ];
    for (name, kind, help, get) in series {
        head(o, name, kind, help);
        for m in models {
            let _ = writeln!(
                o,
                "{name}{{model=\"{}\"}} {}",
                escape(&m.name),
                get(&m.decode)
            );
        }
    }
    type Ratio = fn(&strata_engine::spec::SpecStats) -> f64;
    let ratios: [(&str, &str, Ratio); 2] = [
        (
            "strata_spec_acceptance_ratio",
            "Drafted tokens accepted per drafted token, so far.",
            |s| s.acceptance(),
        ),
        (
            "strata_spec_tokens_per_pass",
            "Tokens produced per target pass of speculative generation, so far.",
            |s| s.tokens_per_pass(),
        ),
    ];
    for (name, help, get) in ratios {
        head(o, name, "gauge", help);
        for m in models {
            let _ = writeln!(
                o,
                "{name}{{model=\"{}\"}} {:.4}",
                escape(&m.name),
                get(&m.decode.spec)
            );
        }
    }
}

/// Per model on a GPU: VRAM per tier, the GPU's traffic, and the planner's prediction.
fn render_gpu(o: &mut String, models: &[ModelGauges]) {
    let on_gpu: Vec<(&ModelGauges, &GpuGauges)> = models
        .iter()
        .filter_map(|m| m.gpu.as_ref().map(|g| (m, g)))
        .collect();
    head(
        o,
        "strata_gpu_info",
        "gauge",
        "The GPU each model computes on, and what limits its predicted decode speed.",
    );
    for (m, g) in &on_gpu {
        let _ = writeln!(
            o,
            "strata_gpu_info{{model=\"{}\",device=\"{}\",bottleneck=\"{}\"}} 1",
            escape(&m.name),
            escape(&g.stats.device),
            g.bottleneck
        );
    }
    head(
        o,
        "strata_vram_bytes",
        "gauge",
        "VRAM per tier: weights (dense, resident), experts (the VRAM expert cache), kv (KV \
         pages of the model's caches).",
    );
    for (m, g) in &on_gpu {
        for (tier, bytes) in [
            ("weights", g.stats.weights_vram),
            ("experts", g.stats.experts_vram),
            ("kv", m.kv_vram_bytes as u64),
        ] {
            let _ = writeln!(
                o,
                "strata_vram_bytes{{model=\"{}\",tier=\"{tier}\"}} {bytes}",
                escape(&m.name)
            );
        }
    }
    type Stat = fn(&GpuGauges) -> f64;
    let series: [(&str, &str, &str, Stat); 12] = [
        (
            "strata_gpu_layers",
            "gauge",
            "Layers with a phase on the GPU.",
            |g| g.layers as f64,
        ),
        (
            "strata_vram_free_bytes",
            "gauge",
            "Free memory of the model's GPU.",
            |g| g.stats.vram_free as f64,
        ),
        (
            "strata_vram_total_bytes",
            "gauge",
            "Memory of the model's GPU.",
            |g| g.stats.vram_total as f64,
        ),
        (
            "strata_gpu_streamed_bytes_total",
            "counter",
            "Weight bytes copied host to device because VRAM does not hold them (streamed \
             matrices, experts copied in).",
            |g| g.stats.streamed_bytes as f64,
        ),
        (
            "strata_gpu_h2d_bytes_total",
            "counter",
            "Bytes copied host to device (weights, activations, KV pages).",
            |g| g.stats.h2d_bytes as f64,
        ),
        (
            "strata_gpu_d2h_bytes_total",
            "counter",
            "Bytes copied device to host.",
            |g| g.stats.d2h_bytes as f64,
        ),
        (
            "strata_gpu_crossing_bytes_total",
            "counter",
            "Activation bytes that crossed between the CPU and the GPU.",
            |g| g.stats.crossing_bytes as f64,
        ),
        (
            "strata_gpu_wait_seconds_total",
            "counter",
            "Time the GPU's work waited for weight copies.",
            |g| g.stats.wait_us as f64 / 1e6,
        ),
        (
            "strata_gpu_launches_total",
            "counter",
            "Kernels launched (a CUDA graph counts once on a GPU).",
            |g| g.stats.launches as f64,
        ),
        (
            "strata_gpu_graph_steps_total",
            "counter",
            "Decode steps run as one CUDA graph.",
            |g| g.stats.graph_steps as f64,
        ),
        (
            "strata_gpu_graph_instantiations_total",
            "counter",
            "CUDA graphs instantiated (the other graph steps updated the last one in place).",
            |g| g.stats.graph_instantiations as f64,
        ),
        (
            "strata_predicted_decode_tokens_per_second",
            "gauge",
            "The planner's predicted decode speed of one sequence for the model's placement.",
            |g| g.predicted_decode_tps,
        ),
    ];
    for (name, kind, help, get) in series {
        head(o, name, kind, help);
        for (m, g) in &on_gpu {
            let _ = writeln!(o, "{name}{{model=\"{}\"}} {}", escape(&m.name), get(g));
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
            kv_vram_bytes: 0,
            decode: DecodeCounts {
                steps: 3,
                sequences: 7,
                batch_max: 3,
                spec: Default::default(),
            },
            gpu: None,
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
            "strata_decode_steps_total{model=\"g\"} 3",
            "strata_decode_sequences_total{model=\"g\"} 7",
            "strata_decode_batch_max{model=\"g\"} 3",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        // A CPU model has no GPU series.
        assert!(!text.contains("strata_vram_bytes{"), "{text}");
    }

    #[test]
    fn renders_a_models_gpu() {
        let stats = GpuStats {
            device: "NVIDIA H100".into(),
            weights_vram: 1000,
            experts_vram: 200,
            vram_free: 5000,
            vram_total: 8000,
            streamed_bytes: 300,
            streamed_direct_bytes: 200,
            crossing_bytes: 40,
            h2d_bytes: 400,
            d2h_bytes: 50,
            wait_us: 2_500_000,
            launches: 77,
            graph_steps: 30,
            graph_instantiations: 2,
        };
        let text = Metrics::default().render(&[ModelGauges {
            name: "m".into(),
            queued: 0,
            active: 0,
            kv_bytes: 0,
            weights: ResidencyStats::default(),
            tiers: Vec::new(),
            kv_vram_bytes: 64,
            decode: DecodeCounts::default(),
            gpu: Some(GpuGauges {
                stats,
                layers: 5,
                n_layers: 6,
                predicted_decode_tps: 42.5,
                bottleneck: "pcie",
            }),
        }]);
        for line in [
            "strata_gpu_info{model=\"m\",device=\"NVIDIA H100\",bottleneck=\"pcie\"} 1",
            "strata_vram_bytes{model=\"m\",tier=\"weights\"} 1000",
            "strata_vram_bytes{model=\"m\",tier=\"experts\"} 200",
            "strata_vram_bytes{model=\"m\",tier=\"kv\"} 64",
            "strata_vram_free_bytes{model=\"m\"} 5000",
            "strata_vram_total_bytes{model=\"m\"} 8000",
            "strata_gpu_layers{model=\"m\"} 5",
            "strata_gpu_streamed_bytes_total{model=\"m\"} 300",
            "strata_gpu_h2d_bytes_total{model=\"m\"} 400",
            "strata_gpu_d2h_bytes_total{model=\"m\"} 50",
            "strata_gpu_crossing_bytes_total{model=\"m\"} 40",
            "strata_gpu_wait_seconds_total{model=\"m\"} 2.5",
            "strata_gpu_launches_total{model=\"m\"} 77",
            "strata_gpu_graph_steps_total{model=\"m\"} 30",
            "strata_gpu_graph_instantiations_total{model=\"m\"} 2",
            "strata_predicted_decode_tokens_per_second{model=\"m\"} 42.5",
            "# TYPE strata_gpu_wait_seconds_total counter",
            "# TYPE strata_vram_bytes gauge",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }
}
