//! End-to-end: stratad on the simulated GPU (`device = "sim"`: the CUDA kernels' text run on
//! this CPU) with a tiny generated model. Concurrent streaming requests are decoded together
//! (continuous batching) and answer what the same requests answer one by one and on a CPU
//! daemon; `/api/ps` and `/metrics` report the GPU; GPU settings that cannot work stop the
//! daemon at start with a message naming them.

mod http;
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use strata_engine::model::Arch;
use strata_engine::synth::{GenSpec, Vocab, to_bytes};
use support::{Daemon, lock, parse_stream};

const TINY: &str = "tiny";

/// Logit gaps below this between the two likeliest tokens are near ties: the GPU quantizes
/// activations to q8_1 where the CPU uses Q8_0 and sums in another order, so either side of
/// a near tie is a right answer.
const TIE: f32 = 0.05;

/// Chat prompts that differ from their first word on.
const PROMPTS: [&str; 4] = [
    "Tell me about rivers.",
    "What is 2 + 2?",
    "Name three colours.",
    "Why is the sky blue?",
];

const MAX_TOKENS: u32 = 12;

/// A store holding a tiny llama (six layers, Q8_0, a byte vocabulary) as `tiny`.
fn store() -> tempfile::TempDir {
    let home = tempfile::tempdir().expect("temp dir");
    let models = home.path().join("models");
    std::fs::create_dir_all(&models).expect("mkdir");
    let bytes = to_bytes(&GenSpec::tiny(Arch::Llama), Vocab::Bytes).expect("generate");
    std::fs::write(models.join(format!("{TINY}.gguf")), bytes).expect("write");
    home
}

fn start(home: &Path, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "--model",
        TINY,
        "--ctx-size",
        "256",
        "--threads",
        "2",
        "--parallel",
        "4",
    ];
    args.extend_from_slice(extra);
    let home = home.to_str().expect("utf-8");
    let mut d = Daemon::spawn(&args, &[("STRATA_HOME", home)]);
    d.wait_loaded(TINY);
    d
}

fn ps(d: &Daemon) -> Value {
    let ps = http::get(&d.sock, "/api/ps").expect("GET /api/ps").json();
    ps["models"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == TINY).cloned())
        .unwrap_or(Value::Null)
}

fn metric(d: &Daemon, name: &str) -> f64 {
    d.metric(&format!("{name}{{model=\"{TINY}\"}}"))
}

/// One greedy answer: each token's bytes and the gap between the two likeliest tokens at
/// its position.
#[derive(Debug, Default)]
struct Answer {
    tokens: Vec<Vec<u8>>,
    gaps: Vec<f32>,
}

fn request(prompt: &str) -> String {
    json!({"model": TINY, "messages": [{"role": "user", "content": prompt}],
           "max_tokens": MAX_TOKENS, "temperature": 0, "stream": true,
           "logprobs": true, "top_logprobs": 2})
    .to_string()
}

/// Reads a streamed chat answer's tokens out of its logprobs.
fn answer(body: &str) -> Answer {
    let (events, done) = parse_stream(body);
    assert!(done, "stream did not end with [DONE]: {body}");
    let mut a = Answer::default();
    for e in &events {
        assert!(e.get("error").is_none(), "{e}");
        let Some(content) = e["choices"][0]["logprobs"]["content"].as_array() else {
            continue;
        };
        for t in content {
            let bytes = t["bytes"]
                .as_array()
                .expect("bytes")
                .iter()
                .map(|b| b.as_u64().expect("byte") as u8)
                .collect();
            let top = t["top_logprobs"].as_array().expect("top_logprobs");
            let lp = |i: usize| top[i]["logprob"].as_f64().expect("logprob") as f32;
            a.tokens.push(bytes);
            a.gaps.push(lp(0) - lp(1));
        }
    }
    a
}

/// Every prompt at once, as streams read side by side.
fn concurrently(d: &Daemon) -> Vec<Answer> {
    let streams: Vec<_> = PROMPTS
        .iter()
        .map(|p| {
            http::send(
                &d.sock,
                "POST",
                "/v1/chat/completions",
                request(p).as_bytes(),
            )
            .expect("send")
        })
        .collect();
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut s| std::thread::spawn(move || s.rest().expect("stream")))
        .collect();
    readers
        .into_iter()
        .map(|r| answer(&r.join().expect("reader")))
        .collect()
}

/// Every prompt, each sent after the previous answer ended.
fn one_by_one(d: &Daemon) -> Vec<Answer> {
    PROMPTS
        .iter()
        .map(|p| {
            let mut s = http::send(
                &d.sock,
                "POST",
                "/v1/chat/completions",
                request(p).as_bytes(),
            )
            .expect("send");
            answer(&s.rest().expect("stream"))
        })
        .collect()
}

/// The same tokens, or tokens that part where one of the answers has a near tie (both are
/// greedy continuations of the same prefix up to there); returns how many tokens agreed.
fn same_up_to_near_tie(what: &str, want: &[Answer], got: &[Answer]) -> usize {
    let mut agreed = 0;
    for (i, (a, b)) in want.iter().zip(got).enumerate() {
        let k = a
            .tokens
            .iter()
            .zip(&b.tokens)
            .take_while(|(x, y)| x == y)
            .count();
        agreed += k;
        if a.tokens.len() == b.tokens.len() && k == a.tokens.len() {
            continue;
        }
        // Where they part (or one ended: its end-of-generation token carries no logprobs),
        // the two likeliest tokens must be near.
        let gap = a
            .gaps
            .get(k)
            .into_iter()
            .chain(b.gaps.get(k))
            .fold(f32::INFINITY, |m, &g| m.min(g));
        assert!(
            gap < TIE,
            "{what}: prompt {i} parts at token {k}, where the two likeliest tokens are {gap} \
             apart:\n{a:?}\n{b:?}"
        );
    }
    let exact = want
        .iter()
        .zip(got)
        .filter(|(a, b)| a.tokens == b.tokens)
        .count();
    eprintln!(
        "{what}: {agreed} tokens agreed, {exact} of {} answers identical",
        want.len()
    );
    agreed
}

#[test]
fn concurrent_streams_on_the_simulated_gpu_are_batched_and_answer_as_alone_and_on_the_cpu() {
    let _g = lock();
    let home = store();
    let cpu = {
        let d = start(home.path(), &["--device", "cpu"]);
        assert_eq!(ps(&d)["device"], "cpu");
        assert_eq!(ps(&d)["gpu"], Value::Null);
        one_by_one(&d)
    };

    let d = start(home.path(), &["--device", "sim"]);
    let m = ps(&d);
    let gpu = &m["gpu"];
    assert_eq!(m["device"], gpu["device"], "{m}");
    assert!(
        gpu["device"]
            .as_str()
            .is_some_and(|s| s.contains("simulator")),
        "{m}"
    );
    assert_eq!(gpu["n_layers"], 6, "{m}");
    assert!(gpu["layers"].as_u64().unwrap_or(0) > 0, "{m}");
    assert!(
        gpu["vram"]["weights_bytes"].as_u64().unwrap_or(0) > 0,
        "{m}"
    );
    assert!(gpu["vram"]["total_bytes"].as_u64().unwrap_or(0) > 0, "{m}");
    assert!(
        gpu["predicted_decode_tps"].as_f64().unwrap_or(0.0) > 0.0,
        "{m}"
    );

    let t0 = Instant::now();
    let together = concurrently(&d);
    eprintln!(
        "{} concurrent streams in {:.1} s",
        PROMPTS.len(),
        t0.elapsed().as_secs_f64()
    );
    for (p, a) in PROMPTS.iter().zip(&together) {
        assert!(!a.tokens.is_empty(), "no answer to {p:?}");
    }
    // Continuous batching: some decode pass advanced several sequences at once.
    let widest = metric(&d, "strata_decode_batch_max");
    assert!(widest >= 2.0, "widest decode pass {widest}");
    let steps = metric(&d, "strata_decode_steps_total");
    let seqs = metric(&d, "strata_decode_sequences_total");
    assert!(seqs > steps, "{seqs} sequences in {steps} passes");

    let alone = one_by_one(&d);
    let n = same_up_to_near_tie("concurrent vs one by one on the GPU", &alone, &together);
    assert!(n >= 2 * MAX_TOKENS as usize, "only {n} tokens agreed");
    let n = same_up_to_near_tie("GPU vs CPU", &cpu, &alone);
    assert!(n >= 2 * MAX_TOKENS as usize, "only {n} tokens agreed");

    // What the GPU holds and did, in /api/ps and in /metrics.
    let m = ps(&d);
    let gpu = &m["gpu"];
    assert!(gpu["launches"].as_u64().unwrap_or(0) > 0, "{m}");
    assert!(gpu["h2d_bytes"].as_u64().unwrap_or(0) > 0, "{m}");
    assert!(gpu["wait_s"].as_f64().is_some(), "{m}");
    assert!(gpu["streamed_bytes"].as_u64().is_some(), "{m}");
    // The finished caches kept for prefix reuse hold their KV pages in VRAM.
    let kv_vram = gpu["vram"]["kv_bytes"].as_u64().unwrap_or(0);
    assert!(kv_vram > 0, "{m}");
    assert_eq!(m["decode"]["batch_max"].as_f64(), Some(widest), "{m}");
    let vram = |tier: &str| {
        d.metric(&format!(
            "strata_vram_bytes{{model=\"{TINY}\",tier=\"{tier}\"}}"
        ))
    };
    assert_eq!(
        vram("weights"),
        gpu["vram"]["weights_bytes"].as_f64().unwrap_or(-1.0)
    );
    assert_eq!(vram("kv"), kv_vram as f64);
    assert_eq!(vram("experts"), 0.0);
    assert!(metric(&d, "strata_gpu_launches_total") > 0.0);
    assert!(metric(&d, "strata_gpu_h2d_bytes_total") > 0.0);
    assert!(metric(&d, "strata_gpu_layers") > 0.0);
    assert!(metric(&d, "strata_vram_total_bytes") > 0.0);
    assert!(metric(&d, "strata_gpu_wait_seconds_total") >= 0.0);
    assert!(metric(&d, "strata_gpu_streamed_bytes_total") >= 0.0);
    assert!(metric(&d, "strata_predicted_decode_tokens_per_second") > 0.0);
    let info = http::get(&d.sock, "/metrics").expect("metrics").body;
    assert!(
        info.lines().any(|l| l.starts_with(&format!(
            "strata_gpu_info{{model=\"{TINY}\",device=\"{}\"",
            gpu["device"].as_str().unwrap_or("")
        ))),
        "{info}"
    );
}

#[test]
fn n_gpu_layers_and_no_kv_offload_reach_the_placement() {
    let _g = lock();
    let home = store();
    let cpu = {
        let d = start(home.path(), &["--device", "cpu"]);
        one_by_one(&d)
    };
    // -ngl 3: the last two layers and the output; -nkvo: their attention on the CPU, over
    // KV caches in RAM.
    let d = start(
        home.path(),
        &["--device", "sim", "--n-gpu-layers", "3", "--no-kv-offload"],
    );
    let gpu = ps(&d)["gpu"].clone();
    assert_eq!(gpu["layers"], 2, "{gpu}");
    let got = one_by_one(&d);
    let m = ps(&d);
    assert_eq!(m["gpu"]["vram"]["kv_bytes"], 0, "{m}");
    assert!(m["kv_bytes"].as_u64().is_some(), "{m}");
    assert!(m["gpu"]["launches"].as_u64().unwrap_or(0) > 0, "{m}");
    let n = same_up_to_near_tie("-ngl 3 -nkvo vs CPU", &cpu, &got);
    assert!(n >= 2 * MAX_TOKENS as usize, "only {n} tokens agreed");
}

/// Runs stratad with `args` and `envs` until it exits (it must, within 30 s); returns the
/// exit code and what it wrote to stderr.
fn start_failure(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_stratad"))
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .args(args)
        .env("STRATA_CONFIG", "/dev/null")
        .env("STRATA_HOME", dir.path())
        .envs(envs.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting stratad");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("stratad {args:?} did not stop");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    (status.code(), err)
}

#[test]
fn bad_gpu_settings_stop_the_daemon_at_start_naming_the_key() {
    let _g = lock();
    // Flags, environment, and what the error must say.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        (
            &["--device", "tpu"],
            &[],
            &["--device", "cpu, cuda, cuda:N or sim"],
        ),
        (
            &[],
            &[("STRATA_DEVICE", "gpu0")],
            &["STRATA_DEVICE", "cuda:N"],
        ),
        (
            &["--n-gpu-layers", "all"],
            &[],
            &["--n-gpu-layers", "expected an integer"],
        ),
        (
            &["--n-gpu-layers=-2"],
            &[],
            &["--n-gpu-layers", "0..=65536"],
        ),
        (&["--vram-budget", "half"], &[], &["--vram-budget", "K/M/G"]),
        (
            &["--hw-profile", "no-such-gpu"],
            &[],
            &["--hw-profile", "no hardware profile"],
        ),
        (
            &["--device", "cpu"],
            &[("STRATA_N_GPU_LAYERS", "4")],
            &[
                "n_gpu_layers (set by STRATA_N_GPU_LAYERS) needs a GPU",
                "device is cpu (set by --device)",
            ],
        ),
        (
            &["--device", "cpu", "--no-kv-offload"],
            &[],
            &["no_kv_offload (set by --no-kv-offload) needs a GPU"],
        ),
    ];
    for (args, envs, want) in cases {
        let (code, err) = start_failure(args, envs);
        assert_eq!(code, Some(2), "{args:?} {envs:?}: {err}");
        for w in *want {
            assert!(err.contains(w), "{args:?} {envs:?}: {w:?} not in {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
    }
    // Without an NVIDIA driver the default device is the CPU, and -ngl asks for a GPU.
    if !strata_kernels::Device::cuda_driver_present() {
        let (code, err) = start_failure(&["--n-gpu-layers", "4"], &[]);
        assert_eq!(code, Some(2), "{err}");
        assert!(
            err.contains("n_gpu_layers (set by --n-gpu-layers) needs a GPU")
                && err.contains("no NVIDIA driver")
                && err.contains("sim"),
            "{err}"
        );
    }
}
