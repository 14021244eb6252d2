//! Time to first token of a session resumed after a `stratad` restart, against computing the
//! same prompt from nothing.
//!
//! ```sh
//! cargo build --release -p strata-daemon --bins --examples
//! ./target/release/examples/resume --model qwen2.5-coder-1.5b --tokens 8192 [--drop-caches]
//! ```
//!
//! It starts `stratad` with a temporary session directory and runs, on a prompt of about
//! `--tokens` tokens (numbered facts a model continues predictably):
//! 1. the whole prompt with no session: time to first token of computing it;
//! 2. the prompt less its last line, with `"session": "long"`: computed and saved;
//! 3. a restart of `stratad` (SIGTERM, a new process), and with `--drop-caches` (root) the
//!    page cache dropped, so the session file is read from the disk;
//! 4. the whole prompt with the session: only the last line is computed.
//!
//! It prints both times, their ratio, the tokens taken from the session, and whether the two
//! answers are the same text (they must be).

#[path = "support/spawn.rs"]
mod spawn;

use spawn::http;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn usage() -> ! {
    eprintln!("usage: resume [--model NAME] [--tokens N] [-t THREADS] [--drop-caches]");
    std::process::exit(2)
}

/// Streams a completion: its text, the last event, and the time to its first text.
fn stream(sock: &Path, body: &Value) -> Result<(String, Value, Duration), String> {
    let t0 = Instant::now();
    let mut s = http::send(sock, "POST", "/v1/completions", body.to_string().as_bytes())
        .map_err(|e| e.to_string())?;
    if s.status != 200 {
        let status = s.status;
        return Err(format!("status {status}: {}", s.rest().unwrap_or_default()));
    }
    let mut raw = String::new();
    let mut first = None;
    while let Some(c) = s.next_chunk().map_err(|e| e.to_string())? {
        if first.is_none() && c.contains("\"text\":\"") && !c.contains("\"text\":\"\"") {
            first = Some(t0.elapsed());
        }
        raw.push_str(&c);
    }
    let events: Vec<Value> = http::sse_events(&raw)
        .iter()
        .filter_map(|e| serde_json::from_str(e).ok())
        .collect();
    if let Some(e) = events.iter().find(|e| e.get("error").is_some()) {
        return Err(format!("error event: {e}"));
    }
    let text = events
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect();
    let last = events.last().cloned().unwrap_or(Value::Null);
    Ok((text, last, first.unwrap_or_else(|| t0.elapsed())))
}

fn run() -> Result<(), String> {
    let (mut model, mut tokens, mut threads, mut drop) =
        ("qwen2.5-coder-1.5b".to_owned(), 8192usize, None, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--model" | "-m" => model = val(),
            "--tokens" => tokens = val().parse().unwrap_or_else(|_| usage()),
            "-t" | "--threads" => threads = Some(val()),
            "--drop-caches" => drop = true,
            _ => usage(),
        }
    }
    // About 14 tokens a line for short lists, 18 once the numbers have four digits.
    let lines = (tokens / if tokens > 2000 { 18 } else { 14 }).max(4);
    let mut prefix = String::from("A list of facts, one per line.\n");
    for i in 1..lines {
        prefix.push_str(&format!("Fact {i}: the number {i} doubled is {}.\n", 2 * i));
    }
    let full = format!("{prefix}Fact {lines}:");
    let sessions = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ctx = (tokens + tokens / 2 + 64).to_string();
    let dir = sessions.path().to_str().ok_or("temp path is not UTF-8")?;
    let mut flags = vec!["--ctx-size", &ctx, "--session-dir", dir, "--parallel", "1"];
    if let Some(t) = &threads {
        flags.extend(["--threads", t]);
    }
    // Prefix reuse off: the first run must compute everything, not find the second's cache.
    flags.extend(["--prompt-cache", "0"]);
    let body = |prompt: &str, n: u32, session: Option<&str>| {
        let mut v = json!({"model": model, "prompt": prompt, "max_tokens": n,
                           "temperature": 0, "stream": true});
        if let Some(s) = session {
            v["session"] = json!(s);
        }
        v
    };

    let d = spawn::start_daemon(&model, &flags)?;
    let (want, last, computed) = stream(&d.sock, &body(&full, 16, None))?;
    let n_prompt = last["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
    eprintln!(
        "computed: {n_prompt} tokens, first token after {:.2} s",
        computed.as_secs_f64()
    );
    let (_, last, _) = stream(&d.sock, &body(&prefix, 1, Some("long")))?;
    if last["session"]["saved"] != true {
        return Err(format!("the session was not saved: {last}"));
    }
    d.stop();
    let size = std::fs::metadata(sessions.path().join("long.kv"))
        .map(|m| m.len())
        .unwrap_or(0);
    let dropped = drop
        && std::fs::write("/proc/sys/vm/drop_caches", "3\n")
            .map_err(|e| eprintln!("--drop-caches: {e}"))
            .is_ok();

    let d = spawn::start_daemon(&model, &flags)?;
    let (got, last, resumed) = stream(&d.sock, &body(&full, 16, Some("long")))?;
    let cached = last["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    d.stop();
    println!(
        "| model | prompt tokens | computed TTFT | resumed TTFT | ratio | from session | session file | page cache | same text |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|---|");
    println!(
        "| {model} | {n_prompt} | {:.2} s | {:.3} s | {:.1}% | {cached} | {} MiB | {} | {} |",
        computed.as_secs_f64(),
        resumed.as_secs_f64(),
        100.0 * resumed.as_secs_f64() / computed.as_secs_f64(),
        size >> 20,
        if dropped { "dropped" } else { "warm" },
        if got == want { "yes" } else { "NO" }
    );
    if got != want {
        return Err(format!(
            "the resumed answer differs:\n  computed: {want:?}\n  resumed:  {got:?}"
        ));
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
