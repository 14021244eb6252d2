//! End-to-end tests of stratad as a service: systemd's notify protocol and watchdog through a
//! real `NOTIFY_SOCKET`, the config file and its overrides, the socket's group, and
//! `POST /api/pull`.

mod http;
mod support;

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{COUNTING, Daemon, MODEL, completion, lock};

/// The notify socket a test binds, as systemd would, with each datagram's arrival time.
struct NotifySocket {
    sock: UnixDatagram,
    t0: Instant,
    seen: Vec<(f64, String)>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> (NotifySocket, String) {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("binding the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        let n = NotifySocket {
            sock,
            t0: Instant::now(),
            seen: Vec::new(),
        };
        (n, path.to_string_lossy().into_owned())
    }

    /// Reads datagrams for `d`.
    fn read_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push((self.t0.elapsed().as_secs_f64(), msg));
            }
        }
    }

    /// Reads until a datagram equal to `msg` arrives (bounded).
    fn read_until(&mut self, msg: &str, limit: Duration) {
        let end = Instant::now() + limit;
        while !self.seen.iter().any(|(_, m)| m == msg) {
            assert!(
                Instant::now() < end,
                "no {msg:?} within {limit:?}; got {:?}",
                self.messages()
            );
            self.read_for(Duration::from_millis(50));
        }
    }

    fn messages(&self) -> Vec<&str> {
        self.seen.iter().map(|(_, m)| m.as_str()).collect()
    }

    /// Arrival times of `WATCHDOG=1` in `from..to`.
    fn pings(&self, from: f64, to: f64) -> Vec<f64> {
        self.seen
            .iter()
            .filter(|(t, m)| m == "WATCHDOG=1" && *t >= from && *t <= to)
            .map(|(t, _)| *t)
            .collect()
    }
}

fn max_gap(times: &[f64]) -> f64 {
    times.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max)
}

#[test]
fn notify_status_and_watchdog_from_the_engine_loop() {
    let _g = lock();
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut notify, path) = NotifySocket::bind(dir.path());
    // A 200 ms watchdog: pings every 100 ms while every engine thread turns.
    let mut d = Daemon::spawn(
        &[
            "--model",
            MODEL,
            "--ctx-size",
            "2048",
            "--threads",
            "2",
            "--drain-timeout",
            "1",
        ],
        &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "200000")],
    );
    notify.read_until("STATUS=ready: 1 model", Duration::from_secs(60));
    let msgs = notify.messages();
    let pos = |m: &str| msgs.iter().position(|x| *x == m);
    let (ready, loading, loaded) = (
        pos("READY=1"),
        pos("STATUS=loading gemma3-270m\u{2026}"),
        pos("STATUS=ready: 1 model"),
    );
    assert!(
        ready.is_some() && ready < loading && loading < loaded,
        "{msgs:?}"
    );

    // Idle: the engine thread wakes to beat, and pings flow at about half the interval.
    let t_idle = notify.t0.elapsed().as_secs_f64();
    notify.read_for(Duration::from_millis(1500));
    let idle = notify.pings(t_idle, t_idle + 1.5);
    assert!(idle.len() >= 7, "only {} pings in 1.5 s idle", idle.len());
    assert!(max_gap(&idle) < 0.2, "idle ping gap {:.3}s", max_gap(&idle));

    // A long prompt: each 256-token prefill chunk is one engine step, and no ping leaves while
    // it runs (the pings come from the engine loop, not from a timer beside it).
    let sock = d.sock.clone();
    let prompt = "one two three four five six seven eight nine ten ".repeat(60);
    let t_busy = notify.t0.elapsed().as_secs_f64();
    let client = std::thread::spawn(move || {
        http::post(&sock, "/v1/completions", &completion(&prompt, 2, false))
    });
    while !client.is_finished() {
        notify.read_for(Duration::from_millis(50));
    }
    let t_done = notify.t0.elapsed().as_secs_f64();
    let r = client.join().expect("client").expect("request");
    assert_eq!(r.status, 200, "{}", r.body);
    let busy = notify.pings(t_busy, t_done);
    let gap = max_gap(&busy);
    println!(
        "prefill of {} tokens: {:.2}s, {} pings, longest gap {gap:.3}s",
        r.json()["usage"]["prompt_tokens"],
        t_done - t_busy,
        busy.len()
    );
    assert!(
        gap > 0.12,
        "pings kept flowing during engine steps: gap {gap:.3}s"
    );

    let status = d.terminate();
    assert!(status.success(), "{status}");
    notify.read_for(Duration::from_millis(100));
    assert!(
        notify.messages().contains(&"STOPPING=1"),
        "{:?}",
        notify.messages()
    );
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("writing a config file");
    p.to_string_lossy().into_owned()
}

#[test]
fn config_file_then_environment_then_flags() {
    let _g = lock();
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = write(
        dir.path(),
        "strata.toml",
        &format!(
            "models = [\"{MODEL}\"]\nctx_size = 256\nthreads = 2\nkeep_alive = 77\nparallel = 3\n"
        ),
    );
    // The file alone.
    let mut d = Daemon::spawn(&[], &[("STRATA_CONFIG", &cfg)]);
    d.wait_loaded(MODEL);
    let m = d.ps_model();
    assert_eq!(
        (m["n_ctx"].clone(), m["keep_alive_s"].clone()),
        (json!(256), json!(77))
    );
    assert_eq!(m["parallel"], 3);
    drop(d);
    // The environment over the file, flags over both (--config over $STRATA_CONFIG).
    let mut d = Daemon::spawn(
        &["--config", &cfg, "--parallel", "2"],
        &[
            ("STRATA_CONFIG", "/nonexistent.toml"),
            ("STRATA_CTX_SIZE", "384"),
            ("STRATA_PARALLEL", "5"),
        ],
    );
    d.wait_loaded(MODEL);
    let m = d.ps_model();
    assert_eq!(
        (m["n_ctx"].clone(), m["parallel"].clone()),
        (json!(384), json!(2))
    );
    assert_eq!(m["keep_alive_s"], 77);
    let r = http::post(&d.sock, "/v1/completions", &completion(COUNTING, 2, false)).expect("req");
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Runs stratad with `args` and `envs` and expects it to refuse to start with a message
/// containing `needle`.
fn refused(dir: &Path, args: &[&str], envs: &[(&str, &str)], needle: &str) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stratad"))
        .arg("--socket")
        .arg(dir.join("s.sock"))
        .args(args)
        .env("STRATA_CONFIG", "/dev/null")
        .envs(envs.iter().copied())
        .output()
        .expect("running stratad");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} {envs:?} started");
    assert!(err.contains(needle), "{args:?} {envs:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_settings_are_refused_naming_the_key() {
    let _g = lock();
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    for (file, text, needle) in [
        ("a.toml", "max_qeue = 4\n", "unknown key 'max_qeue'"),
        ("b.toml", "keep_alive = \"5m\"\n", "keep_alive"),
        ("c.toml", "listen = \"0.0.0.0:8080\"\n", "only loopback"),
        ("d.toml", "socket = [\n", "d.toml"),
    ] {
        let cfg = write(d, file, text);
        refused(d, &[], &[("STRATA_CONFIG", &cfg)], needle);
    }
    refused(d, &[], &[("STRATA_MAX_QUEUE", "0")], "STRATA_MAX_QUEUE");
    refused(d, &["--threads", "lots"], &[], "--threads");
    refused(
        d,
        &["--config", "/nonexistent/strata.toml"],
        &[],
        "/nonexistent/strata.toml",
    );
    refused(
        d,
        &["--socket-group", "no-such-group-strata"],
        &[],
        "no-such-group-strata",
    );
}

#[test]
fn socket_gets_the_configured_group() {
    let _g = lock();
    // SAFETY: getgid has no preconditions.
    let gid = unsafe { libc::getgid() };
    let mut d = Daemon::spawn(&["--socket-group", &gid.to_string()], &[]);
    d.wait_up();
    let meta = std::fs::metadata(&d.sock).expect("socket metadata");
    assert_eq!(meta.gid(), gid);
    assert_eq!(meta.mode() & 0o777, 0o660);
}

/// Reads an NDJSON pull answer.
fn ndjson(body: &str) -> Vec<Value> {
    body.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l}: {e}")))
        .collect()
}

#[test]
fn pull_takes_names_and_paths_only_when_allowed() {
    let _g = lock();
    let source = strata_storage::store::Store::open_default()
        .and_then(|s| s.model_path(MODEL))
        .expect("store path");
    assert!(source.is_file(), "{MODEL} is not in the store");
    let source = source.to_string_lossy().into_owned();
    let home = tempfile::tempdir().expect("temp store");
    let home_s = home.path().to_string_lossy().into_owned();

    // Default: names only.
    let mut d = Daemon::spawn(&["--threads", "2"], &[("STRATA_HOME", &home_s)]);
    d.wait_up();
    for model in [source.as_str(), "https://example.com/x.gguf", "../models/x"] {
        let r = http::post(&d.sock, "/api/pull", &json!({"model": model})).expect("pull");
        assert_eq!(r.status, 403, "{model}: {}", r.body);
        assert_eq!(r.json()["error"]["type"], "permission_error");
        assert!(r.body.contains("--allow-pull"), "{}", r.body);
    }
    let r = http::post(&d.sock, "/api/pull", &json!({"model": "no-such-model"})).expect("pull");
    assert_eq!(r.status, 404, "{}", r.body);
    drop(d);

    // With paths allowed: a local file comes in under a name, with progress lines.
    let mut d = Daemon::spawn(
        &[
            "--threads",
            "2",
            "--allow-pull",
            "paths",
            "--ctx-size",
            "256",
        ],
        &[("STRATA_HOME", &home_s)],
    );
    d.wait_up();
    let r = http::post(
        &d.sock,
        "/api/pull",
        &json!({"model": source, "name": "gemma-copy"}),
    )
    .expect("pull");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    let lines = ndjson(&r.body);
    let last = lines.last().expect("lines");
    assert_eq!(last, &json!({"status": "success", "model": "gemma-copy"}));
    let size = std::fs::metadata(&source).expect("size").len();
    assert!(
        lines
            .iter()
            .any(|l| l["completed"].as_u64() == Some(size) && l["total"].as_u64() == Some(size)),
        "no completed progress line in {lines:?}"
    );
    assert!(home.path().join("models/gemma-copy.gguf").is_file());

    // By name now that it is present: verified, not fetched again; `stream: false` gives one
    // answer.
    let r = http::post(
        &d.sock,
        "/api/pull",
        &json!({"model": "gemma-copy", "stream": false}),
    )
    .expect("pull");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"status": "success", "model": "gemma-copy"})
    );

    // The pulled model serves.
    let mut req = completion(COUNTING, 3, false);
    req["model"] = json!("gemma-copy");
    let r = http::post(&d.sock, "/v1/completions", &req).expect("completion");
    assert_eq!(r.status, 200, "{}", r.body);
    // A path that is not there is an error line, not a dropped connection.
    let r = http::post(
        &d.sock,
        "/api/pull",
        &json!({"model": "/nonexistent/x.gguf"}),
    )
    .expect("pull");
    let lines = ndjson(&r.body);
    assert!(
        r.status == 404
            || lines
                .last()
                .is_some_and(|l| l["error"]["message"].is_string()),
        "{}",
        r.body
    );
}
