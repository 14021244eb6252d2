//! End-to-end tests: the real `stratad` binary on a socket in a temp dir, serving the real
//! gemma3-270m from the model store (`strata pull gemma3-270m` first).

mod http;
mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{COUNTING, Daemon, MODEL, completion, lock, parse_stream};

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
    // The same body without a length (chunked) is cut off while reading, and still answered.
    let head = chunked_status(&d.sock, &big);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
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
    // Loaded on demand, not named at start: the keep-alive applies.
    let mut d = Daemon::spawn(
        &["--keep-alive", "1", "--ctx-size", "512", "--threads", "2"],
        &[],
    );
    d.wait_up();
    let r = http::post(&d.sock, "/api/load", &json!({"model": MODEL})).expect("load");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(d.ps_model()["keep_loaded"], false);
    let t0 = Instant::now();
    while d.ps_model() != Value::Null {
        assert!(t0.elapsed() < Duration::from_secs(10), "still loaded");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The next request loads it again.
    let r = http::post(&d.sock, "/v1/completions", &completion(COUNTING, 2, false)).expect("req");
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Issue 22: `stratad --model X` unloaded X after the keep-alive, after which `strata chat`
/// found no model. Models named at start stay.
#[test]
fn models_named_at_start_stay_loaded_past_the_keep_alive() {
    let _g = lock();
    let d = Daemon::start(&["--keep-alive", "1"]);
    assert_eq!(d.ps_model()["keep_loaded"], true, "{}", d.ps_model());
    std::thread::sleep(Duration::from_secs(3));
    assert_ne!(d.ps_model(), Value::Null, "unloaded while idle");
}

/// Issue 22: `stratad --model nope` logged an error and ran with nothing. A model named at
/// start that is not in the store, or does not load, stops the daemon with an error.
#[test]
fn a_model_named_at_start_that_cannot_load_is_fatal() {
    let _g = lock();
    let home = tempfile::tempdir().expect("temp dir");
    let models = home.path().join("models");
    std::fs::create_dir_all(&models).expect("mkdir");
    std::fs::write(models.join("broken.gguf"), b"GGUF but not really").expect("write");
    let home_s = home.path().to_str().expect("utf-8").to_owned();
    for name in ["not-in-the-store", "broken"] {
        let mut d = Daemon::spawn(&["--model", name], &[("STRATA_HOME", &home_s)]);
        let status = d.wait_exit(Duration::from_secs(30));
        assert!(!status.success(), "{name}: {status}");
        assert_eq!(status.code(), Some(1), "{name}: {status}");
    }
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
    let status = d.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status}");
    assert!(!d.sock.exists(), "socket file left behind");
}

/// Regression (issue 21): after SIGTERM new connections were refused and idle keep-alive ones
/// cut, so no client could see the `"status": "stopping"` health answer or the 503 that
/// API.md describes. While a stream drains, the socket still answers.
#[test]
fn a_draining_daemon_says_so_and_refuses_new_work_with_503() {
    let _g = lock();
    let mut d = Daemon::start(&["--drain-timeout", "5"]);
    let body = completion(COUNTING, 400, true).to_string();
    let mut s = http::send(&d.sock, "POST", "/v1/completions", body.as_bytes()).expect("send");
    let mut seen = s.next_chunk().expect("chunk").expect("first event");
    // SAFETY: kill has no memory-safety preconditions; the pid is our own child.
    let rc = unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    std::thread::sleep(Duration::from_millis(300));
    let h = http::get(&d.sock, "/api/health").expect("health while draining");
    assert_eq!(h.status, 200, "{}", h.body);
    assert_eq!(h.json()["status"], "stopping");
    let r = http::post(&d.sock, "/v1/completions", &completion(COUNTING, 2, false))
        .expect("new work while draining");
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["error"]["type"], "overloaded_error");
    seen.push_str(&s.rest().expect("rest of the stream"));
    let (events, done) = parse_stream(&seen);
    assert!(done, "stream did not end with [DONE]: {seen}");
    assert!(!events.is_empty());
    let status = d.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    assert!(!d.sock.exists(), "socket file left behind");
}

/// Checks one token's OpenAI chat logprob entry: a log-probability (≤ 0), its bytes, and
/// `k` alternatives sorted most likely first.
fn check_chat_entry(e: &Value, k: usize) {
    let lp = e["logprob"].as_f64().expect("logprob");
    assert!(lp <= 0.0, "{e}");
    let bytes: Vec<u8> = e["bytes"]
        .as_array()
        .expect("bytes")
        .iter()
        .map(|b| b.as_u64().expect("byte") as u8)
        .collect();
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        e["token"].as_str().expect("token")
    );
    let top = e["top_logprobs"].as_array().expect("top_logprobs");
    assert_eq!(top.len(), k, "{e}");
    let lps: Vec<f64> = top
        .iter()
        .map(|t| t["logprob"].as_f64().expect("lp"))
        .collect();
    assert!(lps.windows(2).all(|w| w[0] >= w[1]), "not sorted: {lps:?}");
    assert!(lps.iter().all(|&l| l <= 0.0));
    // The chosen token is among the alternatives or less likely than all of them.
    assert!(lp <= lps[0] + 1e-6);
}

#[test]
fn chat_logprobs_whole_and_streamed() {
    let _g = lock();
    let d = Daemon::start(&[]);
    let req = |stream| {
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Count to five."}],
               "max_tokens": 6, "temperature": 0, "stream": stream,
               "logprobs": true, "top_logprobs": 5})
    };
    let r = http::post(&d.sock, "/v1/chat/completions", &req(false)).expect("chat");
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let choice = &v["choices"][0];
    let content = choice["logprobs"]["content"].as_array().expect("content");
    assert_eq!(
        Some(content.len() as u64),
        v["usage"]["completion_tokens"].as_u64(),
        "{v}"
    );
    for e in content {
        check_chat_entry(e, 5);
        // Greedy: the chosen token is the most likely one, with the same log-probability.
        assert_eq!(e["token"], e["top_logprobs"][0]["token"], "{e}");
        assert_eq!(e["logprob"], e["top_logprobs"][0]["logprob"], "{e}");
    }
    let joined: String = content.iter().filter_map(|e| e["token"].as_str()).collect();
    assert_eq!(joined, choice["message"]["content"].as_str().unwrap_or(""));

    let r = http::post(&d.sock, "/v1/chat/completions", &req(true)).expect("stream");
    let (events, done) = parse_stream(&r.body);
    assert!(done);
    let streamed: Vec<Value> = events
        .iter()
        .filter_map(|e| e["choices"][0]["logprobs"]["content"].as_array())
        .flatten()
        .cloned()
        .collect();
    assert_eq!(
        &streamed, content,
        "streamed logprobs differ from the whole answer's"
    );
    // Without the request, no logprobs.
    let mut plain = req(false);
    plain["logprobs"] = json!(false);
    plain.as_object_mut().map(|o| o.remove("top_logprobs"));
    let v = http::post(&d.sock, "/v1/chat/completions", &plain)
        .expect("chat")
        .json();
    assert_eq!(v["choices"][0]["logprobs"], Value::Null);
}

#[test]
fn completion_logprobs_in_the_legacy_shape() {
    let _g = lock();
    let d = Daemon::start(&[]);
    let mut req = completion(COUNTING, 5, true);
    req["logprobs"] = json!(3);
    // The test reads the body with serde_json built with `preserve_order` (the workspace's),
    // so an object's order is the daemon's.
    let r = http::post(&d.sock, "/v1/completions", &req).expect("stream");
    assert_eq!(r.status, 200, "{}", r.body);
    let (events, done) = parse_stream(&r.body);
    assert!(done);
    let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for e in &events {
        let lp = &e["choices"][0]["logprobs"];
        if lp.is_null() {
            continue;
        }
        let list = |k: &str| lp[k].as_array().cloned().unwrap_or_default();
        tokens.extend(list("tokens"));
        lps.extend(list("token_logprobs"));
        tops.extend(list("top_logprobs"));
        offsets.extend(list("text_offset"));
    }
    assert_eq!(tokens.len(), 5);
    assert_eq!(lps.len(), 5);
    assert_eq!(offsets.first(), Some(&json!(0)));
    let text: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect();
    let joined: String = tokens.iter().filter_map(|t| t.as_str()).collect();
    assert_eq!(joined, text);
    for ((t, lp), top) in tokens.iter().zip(&lps).zip(&tops) {
        let lp = lp.as_f64().expect("logprob");
        assert!(lp <= 0.0);
        let top = top.as_object().expect("top_logprobs entry");
        assert!(!top.is_empty() && top.len() <= 3, "{top:?}");
        // Issue 22: they came in key order; API.md (and OpenAI) list the likeliest first.
        let values: Vec<f64> = top.values().filter_map(Value::as_f64).collect();
        assert!(
            values.windows(2).all(|w| w[0] >= w[1]),
            "not most likely first: {top:?}"
        );
        // Greedy: the chosen token is the likeliest.
        let best = top
            .values()
            .filter_map(Value::as_f64)
            .fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(lp, best, "{t}: {top:?}");
        assert_eq!(
            top.get(t.as_str().unwrap_or("")).and_then(Value::as_f64),
            Some(lp)
        );
    }
}

#[test]
fn logprobs_out_of_range_are_400() {
    let _g = lock();
    let d = Daemon::start(&[]);
    let chat = |extra: Value| {
        let mut v = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": 1});
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        http::post(&d.sock, "/v1/chat/completions", &v).expect("request")
    };
    for extra in [
        json!({"logprobs": true, "top_logprobs": 21}),
        json!({"logprobs": true, "top_logprobs": -1}),
        json!({"top_logprobs": 2}),
        json!({"logprobs": "yes"}),
    ] {
        let r = chat(extra.clone());
        assert_eq!(r.status, 400, "{extra}: {}", r.body);
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    }
    let mut req = completion(COUNTING, 1, false);
    req["logprobs"] = json!(21);
    let r = http::post(&d.sock, "/v1/completions", &req).expect("request");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("logprobs"), "{}", r.body);
    let r = chat(json!({"logprobs": true, "top_logprobs": 20}));
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Sends `body` as a chunked POST on a raw socket and returns the response's status line.
fn chunked_status(sock: &std::path::Path, body: &[u8]) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let head = "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
                Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    s.write_all(head.as_bytes()).expect("head");
    for c in body.chunks(64 * 1024) {
        // The server may answer and stop reading once past its limit.
        if s.write_all(format!("{:x}\r\n", c.len()).as_bytes())
            .is_err()
            || s.write_all(c).is_err()
            || s.write_all(b"\r\n").is_err()
        {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("status line");
    line
}
