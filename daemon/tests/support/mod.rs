//! What the end-to-end tests share: a real `stratad` on a socket in a temp dir, serving the
//! real gemma3-270m from the model store (`strata pull gemma3-270m` first).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::http;

pub(crate) const MODEL: &str = "gemma3-270m";
/// A prompt a base model continues for as long as it is allowed to.
pub(crate) const COUNTING: &str = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,";

/// The tests share two cores; one daemon at a time keeps their timing honest.
static SERIAL: Mutex<()> = Mutex::new(());

pub(crate) struct Daemon {
    pub(crate) child: Child,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) sock: PathBuf,
}

impl Daemon {
    /// Starts stratad with `--model gemma3-270m` and small limits, and waits for the model.
    pub(crate) fn start(extra: &[&str]) -> Daemon {
        let mut args = vec!["--model", MODEL, "--ctx-size", "512", "--threads", "2"];
        args.extend_from_slice(extra);
        let mut d = Daemon::spawn(&args, &[]);
        d.wait_loaded(MODEL);
        d
    }

    /// Starts stratad on a socket in a fresh temp dir with `args` and `envs`, without a config
    /// file (unless `envs` names one), and returns at once.
    pub(crate) fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let sock = dir.path().join("strata.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_stratad"))
            .arg("--socket")
            .arg(&sock)
            .args(args)
            .env("RUST_LOG", "info")
            .env("STRATA_CONFIG", "/dev/null")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting stratad");
        Daemon { child, dir, sock }
    }

    /// Waits for the socket to answer.
    pub(crate) fn wait_up(&mut self) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("stratad exited early with {status}");
            }
            if http::get(&self.sock, "/api/health").is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("stratad did not answer within 30 s");
    }

    /// Waits for the socket, then for `model` to be loaded.
    pub(crate) fn wait_loaded(&mut self, model: &str) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("stratad exited early with {status}; is {model} in the store?");
            }
            if let Ok(r) = http::get(&self.sock, "/api/ps")
                && r.json()["models"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|m| m["name"] == model))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("stratad did not load {model} within 60 s");
    }

    pub(crate) fn ps_model(&self) -> Value {
        let ps = http::get(&self.sock, "/api/ps")
            .expect("GET /api/ps")
            .json();
        ps["models"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == MODEL).cloned())
            .unwrap_or(Value::Null)
    }

    pub(crate) fn metric(&self, line_prefix: &str) -> f64 {
        let m = http::get(&self.sock, "/metrics").expect("GET /metrics");
        m.body
            .lines()
            .find_map(|l| l.strip_prefix(line_prefix)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {line_prefix} in\n{}", m.body))
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub(crate) fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0);
        self.wait_exit(Duration::from_secs(15))
    }

    pub(crate) fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(t0.elapsed() < limit, "stratad did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn completion(prompt: &str, max_tokens: u32, stream: bool) -> Value {
    json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
           "temperature": 0, "stream": stream})
}

/// Parses an SSE body: the JSON events, and whether it ended with `[DONE]`.
pub(crate) fn parse_stream(body: &str) -> (Vec<Value>, bool) {
    let events = http::sse_events(body);
    let done = events.last().is_some_and(|e| e == "[DONE]");
    let json = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("bad event {e}: {err}")))
        .collect();
    (json, done)
}
