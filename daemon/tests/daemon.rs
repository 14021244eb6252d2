//! End-to-end tests: the real `stratad` binary on a socket in a temp dir, serving the real
//! gemma3-270m from the model store (`strata pull gemma3-270m` first).

mod http;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const MODEL: &str = "gemma3-270m";
/// A prompt a base model continues for as long as it is allowed to.
const COUNTING: &str = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,";

/// The tests share two cores; one daemon at a time keeps their timing honest.
static SERIAL: Mutex<()> = Mutex::new(());

struct Daemon {
    child: Child,
    _dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Daemon {
    fn start(extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let sock = dir.path().join("strata.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_stratad"))
            .arg("--socket")
            .arg(&sock)
            .args(["--model", MODEL, "--ctx-size", "512", "--threads", "2"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting stratad");
        let mut d = Daemon {
            child,
            _dir: dir,
            sock,
        };
        d.wait_loaded();
        d
    }

    /// Waits for the socket, then for the model named by --model to be loaded.
    fn wait_loaded(&mut self) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("stratad exited early with {status}; is {MODEL} in the store?");
            }
            if let Ok(r) = http::get(&self.sock, "/api/ps")
                && r.json()["models"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|m| m["name"] == MODEL))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("stratad did not load {MODEL} within 60 s");
    }

    fn ps_model(&self) -> Value {
        let ps = http::get(&self.sock, "/api/ps")
            .expect("GET /api/ps")
            .json();
        ps["models"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == MODEL).cloned())
            .unwrap_or(Value::Null)
    }

    fn metric(&self, line_prefix: &str) -> f64 {
        let m = http::get(&self.sock, "/metrics").expect("GET /metrics");
        m.body
            .lines()
            .find_map(|l| l.strip_prefix(line_prefix)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {line_prefix} in\n{}", m.body))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn completion(prompt: &str, max_tokens: u32, stream: bool) -> Value {
    json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
           "temperature": 0, "stream": stream})
}

/// Parses an SSE body: the JSON events, and whether it ended with `[DONE]`.
fn parse_stream(body: &str) -> (Vec<Value>, bool) {
    let events = http::sse_events(body);
    let done = events.last().is_some_and(|e| e == "[DONE]");
    let json = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("bad event {e}: {err}")))
        .collect();
    (json, done)
}

#[test]
fn chat_completion_whole_and_streamed_agree() {
    let _g = lock();
    let d = Daemon::start(&[]);
    let req = |stream| {
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}],
               "max_tokens": 8, "temperature": 0, "stream": stream})
    };
    let r = http::post(&d.sock, "/v1/chat/completions", &req(false)).expect("chat");
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let whole = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned();
    let u = &v["usage"];
    let completion = u["completion_tokens"].as_u64().expect("usage");
    assert!((1..=8).contains(&completion), "{u}");
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap_or(0) + completion)
    );

    let r = http::post(&d.sock, "/v1/chat/completions", &req(true)).expect("stream");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let (events, done) = parse_stream(&r.body);
    assert!(done, "no [DONE] in {}", r.body);
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let last = events.last().expect("events");
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
    assert_eq!(
        last["usage"]["completion_tokens"].as_u64(),
        Some(completion)
    );
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    // Greedy decoding: the stream must say exactly what the whole answer said.
    assert_eq!(streamed, whole);
}

#[test]
fn completions_honour_stop_and_max_tokens() {
    let _g = lock();
    let d = Daemon::start(&[]);
    let r = http::post(&d.sock, "/v1/completions", &completion(COUNTING, 5, false)).expect("req");
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let text = v["choices"][0]["text"].as_str().expect("text");
    assert!(text.contains("11"), "{text:?}");

    let mut req = completion(COUNTING, 40, true);
    req["stop"] = json!(["14"]);
    let r = http::post(&d.sock, "/v1/completions", &req).expect("req");
    let (events, done) = parse_stream(&r.body);
    assert!(done);
    let text: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect();
    assert!(text.contains("13") && !text.contains("14"), "{text:?}");
    assert_eq!(
        events
            .last()
            .map(|e| e["choices"][0]["finish_reason"].clone()),
        Some(json!("stop"))
    );
}

#[test]
fn concurrent_streaming_clients_are_all_served() {
    let _g = lock();
    let d = Daemon::start(&["--parallel", "4"]);
    let before = d.metric("strata_tokens_generated_total");
    let sock = d.sock.clone();
    let clients: Vec<_> = (0..6)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let prompt = format!("{COUNTING} {}", 11 + i);
                http::post(&sock, "/v1/completions", &completion(&prompt, 6, true))
            })
        })
        .collect();
    let mut total = 0;
    for c in clients {
        let r = c.join().expect("client thread").expect("request");
        assert_eq!(r.status, 200, "{}", r.body);
        let (events, done) = parse_stream(&r.body);
        assert!(done, "{}", r.body);
        let last = events.last().expect("events");
        total += last["usage"]["completion_tokens"].as_u64().expect("usage");
    }
    assert_eq!(total, 36);
    // The counter is bumped after the step whose events the clients already read: wait for it
    // (bounded) rather than racing it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut after = d.metric("strata_tokens_generated_total");
    while after - before < 36.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        after = d.metric("strata_tokens_generated_total");
    }
    assert_eq!(after - before, 36.0);
    assert_eq!(d.ps_model()["active_sequences"], 0);
}

#[test]
fn dropped_client_frees_its_sequence() {
    let _g = lock();
    let d = Daemon::start(&[]);
    let body = completion(COUNTING, 400, true).to_string();
    let mut s = http::send(&d.sock, "POST", "/v1/completions", body.as_bytes()).expect("send");
    assert_eq!(s.status, 200);
    // Wait for generated text, so the sequence is decoding when the client leaves.
    let mut seen = String::new();
    while !seen.contains("\"text\":\"") {
        seen.push_str(&s.next_chunk().expect("chunk").expect("stream ended early"));
    }
    assert_eq!(d.ps_model()["active_sequences"], 1);
    drop(s);
    let t0 = Instant::now();
    loop {
        let m = d.ps_model();
        if m["active_sequences"] == 0 {
            assert_eq!(m["kv_bytes"], 0);
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "sequence still active: {m}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(d.metric("strata_cancelled_total"), 1.0);
    // Far fewer than 400 tokens were generated.
    assert!(d.metric("strata_tokens_generated_total") < 200.0);
}

#[test]
fn queue_overflow_answers_503_and_resets_nothing() {
    let _g = lock();
    let d = Daemon::start(&["--parallel", "1", "--max-queue", "1"]);
    let sock = d.sock.clone();
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                http::post(&sock, "/v1/completions", &completion(COUNTING, 24, false))
            })
        })
        .collect();
    let (mut ok, mut busy) = (0, 0);
    for c in clients {
        // An io::Error here would be a reset connection.
        let r = c
            .join()
            .expect("client thread")
            .expect("no connection error");
        match r.status {
            200 => ok += 1,
            503 => {
                busy += 1;
                assert_eq!(r.header("retry-after"), Some("1"));
                assert_eq!(r.json()["error"]["type"], "overloaded_error");
            }
            s => panic!("unexpected status {s}: {}", r.body),
        }
    }
    assert!(ok >= 1 && busy >= 1, "ok={ok} busy={busy}");
    assert_eq!(
        d.metric("strata_rejected_total{reason=\"queue_full\"}"),
        busy as f64
    );
    // The daemon still serves once the queue drains.
    let r = http::post(&d.sock, "/v1/completions", &completion(COUNTING, 2, false)).expect("req");
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn bad_requests_get_4xx_and_the_daemon_keeps_serving() {
    let _g = lock();
    let d = Daemon::start(&[]);
    let raw = |body: &[u8]| {
        http::request(&d.sock, "POST", "/v1/chat/completions", body).expect("request")
    };
    let check = |r: http::Response, status: u16, kind: &str| {
        assert_eq!(r.status, status, "{}", r.body);
        assert_eq!(r.json()["error"]["type"], kind, "{}", r.body);
        assert!(r.json()["error"]["message"].is_string());
    };
    check(raw(b"{\"model\": "), 400, "invalid_request_error");
    check(raw(b"[1, 2, 3]"), 400, "invalid_request_error");
    let big = vec![b' '; 3 * 1024 * 1024];
    check(raw(&big), 413, "invalid_request_error");
    let chat = |model: &str, extra: Value| {
        let mut v = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        http::post(&d.sock, "/v1/chat/completions", &v).expect("request")
    };
    check(chat("no-such-model", json!({})), 404, "not_found_error");
    check(
        chat("../../etc/passwd", json!({})),
        400,
        "invalid_request_error",
    );
    check(
        chat(MODEL, json!({"max_tokens": 100000})),
        400,
        "invalid_request_error",
    );
    check(
        chat(MODEL, json!({"temperature": -1})),
        400,
        "invalid_request_error",
    );
    check(
        chat(MODEL, json!({"top_p": 7})),
        400,
        "invalid_request_error",
    );
    check(
        chat(MODEL, json!({"max_tokens": -3})),
        400,
        "invalid_request_error",
    );
    let long = "word ".repeat(2000);
    let r = http::post(&d.sock, "/v1/completions", &completion(&long, 1, false)).expect("req");
    check(r, 400, "invalid_request_error");
    check(
        http::get(&d.sock, "/v1/chat/completions").expect("get"),
        405,
        "invalid_request_error",
    );
    check(
        http::get(&d.sock, "/nope").expect("get"),
        404,
        "not_found_error",
    );

    assert_eq!(
        http::get(&d.sock, "/api/health").expect("health").json()["status"],
        "ok"
    );
    let r = http::post(&d.sock, "/v1/completions", &completion(COUNTING, 2, false)).expect("req");
    assert_eq!(r.status, 200, "{}", r.body);
    let models = http::get(&d.sock, "/v1/models").expect("models").json();
    assert!(
        models["data"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["id"] == MODEL))
    );
}

#[test]
fn load_unload_and_ps() {
    let _g = lock();
    let d = Daemon::start(&[]);
    let m = d.ps_model();
    assert_eq!(m["n_ctx"], 512);
    assert_eq!(m["arch"], "gemma3");
    let r = http::post(&d.sock, "/api/unload", &json!({"model": MODEL})).expect("unload");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(d.ps_model(), Value::Null);
    let r = http::post(&d.sock, "/api/unload", &json!({"model": MODEL})).expect("unload");
    assert_eq!(r.status, 404);
    let r = http::post(&d.sock, "/api/load", &json!({"model": MODEL})).expect("load");
    assert_eq!(r.json()["status"], "loaded", "{}", r.body);
    let r = http::post(&d.sock, "/api/load", &json!({"model": MODEL})).expect("load");
    assert_eq!(r.json()["status"], "already_loaded");
    let r = http::post(&d.sock, "/api/load", &json!({"model": "absent-model"})).expect("load");
    assert_eq!(r.status, 404);
}

#[test]
fn idle_model_is_unloaded_after_keep_alive() {
    let _g = lock();
    let d = Daemon::start(&["--keep-alive", "1"]);
    let t0 = Instant::now();
    while d.ps_model() != Value::Null {
        assert!(t0.elapsed() < Duration::from_secs(10), "still loaded");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The next request loads it again.
    let r = http::post(&d.sock, "/v1/completions", &completion(COUNTING, 2, false)).expect("req");
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn sigterm_mid_stream_ends_it_and_exits_zero() {
    let _g = lock();
    let mut d = Daemon::start(&["--drain-timeout", "1"]);
    let body = completion(COUNTING, 400, true).to_string();
    let mut s = http::send(&d.sock, "POST", "/v1/completions", body.as_bytes()).expect("send");
    let mut seen = s.next_chunk().expect("chunk").expect("first event");
    // SAFETY: kill has no memory-safety preconditions; the pid is our own child.
    let rc = unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    seen.push_str(&s.rest().expect("rest of the stream"));
    let (events, done) = parse_stream(&seen);
    assert!(done, "stream did not end with [DONE]: {seen}");
    let reason = &events.last().expect("events")["choices"][0]["finish_reason"];
    assert!(
        reason == "shutdown" || reason == "length" || reason == "stop",
        "{reason}"
    );
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = d.child.try_wait().expect("try_wait") {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "stratad did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(!d.sock.exists(), "socket file left behind");
}
