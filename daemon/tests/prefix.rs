//! End-to-end: requests that share a prompt prefix with an earlier or a running sequence take
//! its KV cache instead of recomputing it (llama-server's prompt cache), and answer exactly
//! what a daemon without the cache answers — also when the cache keeps its pages on SSD under
//! a small KV budget, with quantized keys and values.

mod http;
mod support;

use serde_json::{Value, json};
use support::{Daemon, MODEL, lock, parse_stream};

fn start(extra: &[&str]) -> Daemon {
    let mut args = vec!["--model", MODEL, "--ctx-size", "2048", "--threads", "2"];
    args.extend_from_slice(extra);
    let mut d = Daemon::spawn(&args, &[]);
    d.wait_loaded(MODEL);
    d
}

/// A prompt of several KV pages (about 700 tokens).
fn long_prompt() -> String {
    let para = "The quick brown fox jumps over the lazy dog while the river runs past the old \
                mill, and the miller counts sacks of flour one by one until the evening bell. ";
    let mut s = String::new();
    for i in 0..20 {
        s.push_str(&format!("Part {i}. {para}"));
    }
    s
}

fn complete(d: &Daemon, prompt: &str, max_tokens: u32) -> (String, u64, u64) {
    let req = json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                     "temperature": 0});
    let r = http::post(&d.sock, "/v1/completions", &req).expect("completion");
    assert_eq!(r.status, 200, "{}", r.body);
    let v: Value = r.json();
    let text = v["choices"][0]["text"].as_str().expect("text").to_owned();
    let u = &v["usage"];
    (
        text,
        u["prompt_tokens"].as_u64().expect("prompt_tokens"),
        u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached_tokens"),
    )
}

fn check(extra: &[&str]) {
    let base = long_prompt();
    let longer = format!("{base}Part 20. And then, at last,");
    let other = format!("Something else entirely. {base}");
    // The answers without any reuse.
    let want: Vec<String> = {
        let mut flags = extra.to_vec();
        flags.extend(["--prompt-cache", "0"]);
        let d = start(&flags);
        let out = [&base, &longer, &other]
            .iter()
            .map(|p| {
                let (t, _, cached) = complete(&d, p, 12);
                assert_eq!(cached, 0);
                t
            })
            .collect();
        assert_eq!(d.metric("strata_prefix_hits_total "), 0.0);
        out
    };

    let d = start(extra);
    let (t, n, cached) = complete(&d, &base, 12);
    assert_eq!((t.as_str(), cached), (want[0].as_str(), 0));
    assert!(n > 600, "{n} prompt tokens");
    // The same prompt again: all but its last token come from the finished sequence's cache.
    let (t, _, cached) = complete(&d, &base, 12);
    assert_eq!(t, want[0]);
    assert_eq!(cached, n - 1);
    // A longer prompt extends it.
    let (t, _, cached) = complete(&d, &longer, 12);
    assert_eq!(t, want[1]);
    assert!(cached >= n - 1, "{cached} of {n}");
    // A prompt that differs from the first token on shares nothing.
    let (t, _, cached) = complete(&d, &other, 12);
    assert_eq!((t.as_str(), cached), (want[2].as_str(), 0));
    assert!(d.metric("strata_prefix_hits_total ") >= 2.0);

    // While one sequence runs, a second with its prompt shares its pages.
    let sock = d.sock.clone();
    let first = std::thread::spawn(move || {
        let req = json!({"model": MODEL, "prompt": long_prompt(), "max_tokens": 48,
                         "temperature": 0, "stream": true});
        http::post(&sock, "/v1/completions", &req).expect("stream")
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (t, _, cached) = complete(&d, &base, 12);
    assert_eq!(t, want[0]);
    assert!(cached > 0);
    let r = first.join().expect("first request");
    let (events, done) = parse_stream(&r.body);
    assert!(done);
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect();
    assert!(
        streamed.starts_with(&want[0]),
        "{streamed:?} vs {:?}",
        want[0]
    );
}

#[test]
fn shared_prefixes_are_reused_and_change_nothing() {
    let _g = lock();
    check(&["--parallel", "2"]);
}

#[test]
fn reuse_with_pages_on_ssd_and_quantized_caches() {
    let _g = lock();
    let kv = tempfile::tempdir().expect("kv dir");
    let dir = kv.path().to_str().expect("utf-8 path").to_owned();
    check(&[
        "--parallel",
        "2",
        "--kv-budget",
        "1M",
        "--kv-dir",
        &dir,
        "--cache-type-k",
        "q8_0",
        "--cache-type-v",
        "q8_0",
    ]);
}
