//! Aggregate decode throughput of `stratad` with 1, 4, 8… concurrent streaming clients.
//!
//! ```sh
//! cargo build --release -p strata-daemon --bins --examples
//! ./target/release/examples/throughput --model qwen2.5-coder-1.5b --clients 1,4,8 -n 64
//! ```
//!
//! Without `--socket` it starts `stratad` (next to this binary's folder) on a socket in a temp
//! dir with `--parallel` = the largest client count, and stops it at the end; with
//! `--socket PATH` it measures a daemon already running there. Each client streams a greedy
//! completion of `-n` tokens. The table gives, per client count, the aggregate decode rate —
//! tokens all streams received while every stream was decoding (from the last stream's first
//! token to the first stream's end), per second — and the end-to-end rate (all tokens over
//! the whole wall time, prompt processing included).

#[path = "support/spawn.rs"]
mod spawn;

use spawn::http;
use std::path::{Path, PathBuf};
use std::time::Instant;

struct Opts {
    socket: Option<PathBuf>,
    model: String,
    clients: Vec<usize>,
    tokens: usize,
    threads: Option<String>,
    runs: usize,
}

fn usage() -> ! {
    eprintln!(
        "usage: throughput [--socket PATH] [--model NAME] [--clients 1,4,8] [-n TOKENS] \
         [-t THREADS] [-r RUNS]"
    );
    std::process::exit(2)
}

fn parse_args() -> Opts {
    let mut o = Opts {
        socket: None,
        model: "qwen2.5-coder-1.5b".into(),
        clients: vec![1, 4, 8],
        tokens: 64,
        threads: None,
        runs: 1,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--socket" => o.socket = Some(PathBuf::from(val())),
            "--model" | "-m" => o.model = val(),
            "--clients" => {
                o.clients = val()
                    .split(',')
                    .map(|c| c.trim().parse().unwrap_or_else(|_| usage()))
                    .collect()
            }
            "-n" => o.tokens = val().parse().unwrap_or_else(|_| usage()),
            "-t" | "--threads" => o.threads = Some(val()),
            "-r" | "--runs" => o.runs = val().parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    if o.clients.is_empty() || o.clients.contains(&0) || o.tokens == 0 || o.runs == 0 {
        usage();
    }
    o
}

fn start(o: &Opts, parallel: usize) -> Result<spawn::Spawned, String> {
    let parallel = parallel.to_string();
    let mut args = vec![
        "--parallel",
        &parallel,
        "--ctx-size",
        "1024",
        "--max-queue",
        "256",
    ];
    if let Some(t) = &o.threads {
        args.extend(["--threads", t]);
    }
    spawn::start_daemon(&o.model, &args)
}

/// One stream: its token count, and when each text event arrived (seconds from `t0`).
fn stream(
    sock: &Path,
    model: &str,
    i: usize,
    tokens: usize,
    t0: Instant,
) -> Result<(u64, Vec<f64>), String> {
    // Distinct prompts, so no two sequences are identical; each is a list a model continues.
    let prompt = (1..=8)
        .map(|k| (k * (i + 2)).to_string())
        .collect::<Vec<_>>()
        .join(", ")
        + ",";
    let body = serde_json::json!({
        "model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
        "stream": true,
    });
    let mut s = http::send(sock, "POST", "/v1/completions", body.to_string().as_bytes())
        .map_err(|e| e.to_string())?;
    if s.status != 200 {
        let status = s.status;
        return Err(format!("status {status}: {}", s.rest().unwrap_or_default()));
    }
    let mut times = Vec::new();
    let mut seen = String::new();
    while let Some(chunk) = s.next_chunk().map_err(|e| e.to_string())? {
        let now = t0.elapsed().as_secs_f64();
        // One event per token; a read may carry several.
        let events = chunk.matches("\"text\":\"").count() - chunk.matches("\"text\":\"\"").count();
        times.extend(std::iter::repeat_n(now, events));
        seen.push_str(&chunk);
    }
    let n = http::sse_events(&seen)
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .find_map(|v| v["usage"]["completion_tokens"].as_u64())
        .ok_or("no usage in the stream")?;
    if times.len() < 2 {
        return Err(format!(
            "stream {i} produced only {} text events",
            times.len()
        ));
    }
    Ok((n, times))
}

fn round(sock: &Path, model: &str, clients: usize, tokens: usize) -> Result<(f64, f64), String> {
    let start = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let sock = sock.to_path_buf();
            let model = model.to_owned();
            std::thread::spawn(move || stream(&sock, &model, i, tokens, start))
        })
        .collect();
    let mut results = Vec::new();
    for h in handles {
        results.push(h.join().map_err(|_| "client thread panicked")??);
    }
    let wall = start.elapsed().as_secs_f64();
    let total: u64 = results.iter().map(|r| r.0).sum();
    // The span in which every stream was decoding.
    let all_started = results.iter().map(|r| r.1[0]).fold(0.0, f64::max);
    let first_done = results
        .iter()
        .map(|r| r.1[r.1.len() - 1])
        .fold(f64::INFINITY, f64::min);
    let in_span: usize = results
        .iter()
        .map(|r| {
            r.1.iter()
                .filter(|&&t| t > all_started && t <= first_done)
                .count()
        })
        .sum();
    if first_done <= all_started {
        return Err("no span in which all streams were decoding; raise -n".into());
    }
    Ok((
        in_span as f64 / (first_done - all_started),
        total as f64 / wall,
    ))
}

fn main() {
    let o = parse_args();
    let max_clients = o.clients.iter().copied().max().unwrap_or(1);
    let (_daemon, sock) = match &o.socket {
        Some(s) => (None, s.clone()),
        None => match start(&o, max_clients) {
            Ok(d) => {
                let s = d.sock.clone();
                (Some(d), s)
            }
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        },
    };
    // Warm-up: page the weights in and let the pool spin up.
    if let Err(e) = round(&sock, &o.model, 1, 8) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    println!(
        "| model | clients | tokens/client | decode t/s (aggregate) | per stream | end-to-end t/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let mut base = None;
    for &c in &o.clients {
        let mut decode = Vec::new();
        let mut e2e = Vec::new();
        for _ in 0..o.runs {
            match round(&sock, &o.model, c, o.tokens) {
                Ok((d, e)) => {
                    decode.push(d);
                    e2e.push(e);
                }
                Err(e) => {
                    eprintln!("error: {c} clients: {e}");
                    std::process::exit(1);
                }
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (d, e) = (mean(&decode), mean(&e2e));
        let base_rate = *base.get_or_insert(d);
        println!(
            "| {} | {c} | {} | {d:.2} ({:.2}x) | {:.2} | {e:.2} |",
            o.model,
            o.tokens,
            d / base_rate,
            d / c as f64
        );
    }
}
