//! End-to-end: the API's `session` field on a real stratad — resuming after a restart gives
//! the uninterrupted run's tokens in a fraction of the time, and bad, damaged, foreign or
//! unsavable sessions are refused or reported with nothing lost.

mod http;
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{COUNTING, Daemon, MODEL, lock, parse_stream};

fn start(sessions: &Path, ctx: &str) -> Daemon {
    let dir = sessions.to_str().expect("utf-8 temp path");
    let mut d = Daemon::spawn(
        &[
            "--model",
            MODEL,
            "--ctx-size",
            ctx,
            "--threads",
            "2",
            "--session-dir",
            dir,
        ],
        &[],
    );
    d.wait_loaded(MODEL);
    d
}

fn request(prompt: &str, max_tokens: u32, session: Option<&str>) -> Value {
    let mut v = json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "stream": true});
    if let Some(s) = session {
        v["session"] = json!(s);
    }
    v
}

/// Streams a completion: its text, the last chunk, and the time to its first text.
fn stream(d: &Daemon, body: &Value) -> (String, Value, Duration) {
    let t0 = Instant::now();
    let mut s = http::send(
        &d.sock,
        "POST",
        "/v1/completions",
        body.to_string().as_bytes(),
    )
    .expect("send");
    assert_eq!(s.status, 200);
    let mut raw = String::new();
    let mut first = None;
    while let Some(c) = s.next_chunk().expect("chunk") {
        if first.is_none() && c.contains("\"text\":\"") && !c.contains("\"text\":\"\"") {
            first = Some(t0.elapsed());
        }
        raw.push_str(&c);
    }
    let (events, done) = parse_stream(&raw);
    assert!(done, "{raw}");
    assert!(events.iter().all(|e| e.get("error").is_none()), "{raw}");
    let text = events
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect();
    let last = events.last().cloned().unwrap_or(Value::Null);
    (text, last, first.unwrap_or_else(|| t0.elapsed()))
}

/// About 1,500 tokens of text that a model continues predictably.
fn long_prompt() -> String {
    let mut p = String::from("A list of facts, one per line.\n");
    for i in 1..=84 {
        p.push_str(&format!("Fact {i}: the number {i} doubled is {}.\n", 2 * i));
    }
    p
}

#[test]
fn a_resumed_session_after_a_restart_matches_the_uninterrupted_run() {
    let _g = lock();
    let sessions = tempfile::tempdir().expect("temp dir");
    let prefix = long_prompt();
    let full = format!("{prefix}Fact 85:");

    let mut d = start(sessions.path(), "2048");
    // Uninterrupted: the whole prompt computed, then 16 tokens.
    let (want, last, ttft_full) = stream(&d, &request(&full, 16, None));
    let n_prompt = last["usage"]["prompt_tokens"].as_u64().expect("usage");
    assert!(n_prompt > 1400, "the prompt is only {n_prompt} tokens");
    assert_eq!(last["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    // The first turn: the prefix, saved with its one answer token's step.
    let (_, last, _) = stream(&d, &request(&prefix, 1, Some("long")));
    assert_eq!(last["session"]["saved"], true, "{last}");
    assert!(sessions.path().join("long.kv").is_file());
    assert!(d.terminate().success());

    let d = start(sessions.path(), "2048");
    let (got, last, ttft_resumed) = stream(&d, &request(&full, 16, Some("long")));
    let cached = last["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    eprintln!(
        "{n_prompt}-token prompt: time to first token {:.0} ms computed, {:.0} ms resumed \
         ({cached} tokens from the session, {:.1}%)",
        ttft_full.as_secs_f64() * 1e3,
        ttft_resumed.as_secs_f64() * 1e3,
        100.0 * ttft_resumed.as_secs_f64() / ttft_full.as_secs_f64()
    );
    assert_eq!(got, want, "resumed text differs from the uninterrupted run");
    assert!(
        cached + 16 >= n_prompt,
        "only {cached} of {n_prompt} tokens resumed"
    );
    assert_eq!(last["session"]["saved"], true, "{last}");
    assert_eq!(d.metric("strata_session_resumes_total"), 1.0);
    // The time to first token is printed above, not asserted: timings belong in benchmarks,
    // and a loaded CI machine makes any fixed ratio flaky.
}

#[test]
fn bad_damaged_and_foreign_sessions_are_refused_and_kept() {
    let _g = lock();
    let sessions = tempfile::tempdir().expect("temp dir");
    let d = start(sessions.path(), "512");
    let post = |body: &Value| http::post(&d.sock, "/v1/completions", body).expect("request");
    let mut body = request(COUNTING, 4, None);
    body["stream"] = json!(false);
    let with = |name: &str| {
        let mut b = body.clone();
        b["session"] = json!(name);
        b
    };

    for bad in ["../etc/passwd", ".hidden", "a/b", ""] {
        let r = post(&with(bad));
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        let msg = r.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        assert!(
            msg.contains("'session'") && msg.contains("letters, digits"),
            "{msg}"
        );
    }

    // A good session to damage.
    let r = post(&with("good"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["session"]["saved"], true, "{}", r.body);
    let good = sessions.path().join("good.kv");
    let mut bytes = std::fs::read(&good).expect("session file");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&good, &bytes).expect("write");
    let r = post(&with("good"));
    assert_eq!(r.status, 422, "{}", r.body);
    let msg = r.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        msg.contains("session 'good'") && msg.contains("checksum"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read(&good).expect("kept"),
        bytes,
        "the file was touched"
    );

    std::fs::write(sessions.path().join("short.kv"), &bytes[..100]).expect("write");
    let r = post(&with("short"));
    assert_eq!(r.status, 422, "{}", r.body);

    std::os::unix::fs::symlink("/etc/passwd", sessions.path().join("link.kv")).expect("symlink");
    let r = post(&with("link"));
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.contains("symlinks are refused"), "{}", r.body);

    // A well-formed session of another model.
    let meta = strata_storage::session::SessionMeta {
        model_id: [7; 32],
        tokenizer_id: [7; 32],
        kv_type: 1,
        n_layer: 1,
        kv_dim: 4,
        tokens: vec![2, 3],
        n_chunks: 0,
    };
    let foreign = sessions.path().join("foreign.kv");
    strata_storage::session::write_atomic(&foreign, &meta, &[&[0u8; 16], &[0u8; 16]])
        .expect("write a foreign session");
    let before = std::fs::read(&foreign).expect("read");
    let r = post(&with("foreign"));
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("different model"), "{}", r.body);
    assert_eq!(std::fs::read(&foreign).expect("kept"), before);

    // Listing and deleting.
    let list = http::get(&d.sock, "/api/sessions").expect("list").json();
    let names: Vec<&str> = list["sessions"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        names.contains(&"good") && names.contains(&"foreign"),
        "{list}"
    );
    let r = http::request(&d.sock, "DELETE", "/api/sessions/short", b"").expect("delete");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!sessions.path().join("short.kv").exists());
    let r = http::request(&d.sock, "DELETE", "/api/sessions/short", b"").expect("delete");
    assert_eq!(r.status, 404, "{}", r.body);
    let r = http::request(&d.sock, "DELETE", "/api/sessions/..", b"").expect("delete");
    assert_eq!(r.status, 400, "{}", r.body);
    // Through all of it, the daemon kept serving.
    assert_eq!(post(&body).status, 200);
}

/// Mounts a tmpfs of `size` on `dir`; `false` where this process may not mount.
fn mount_tmpfs(dir: &Path, size: &str) -> bool {
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (fs, target, opts) = (
        c("tmpfs"),
        c(dir.to_str().expect("utf-8")),
        c(&format!("size={size}")),
    );
    // SAFETY: plain C strings that live across the call.
    let rc = unsafe {
        libc::mount(
            fs.as_ptr(),
            target.as_ptr(),
            fs.as_ptr(),
            0,
            opts.as_ptr().cast(),
        )
    };
    if rc != 0 {
        eprintln!(
            "skipped: cannot mount a tmpfs here ({})",
            std::io::Error::last_os_error()
        );
    }
    rc == 0
}

struct Unmount(std::ffi::CString);

impl Drop for Unmount {
    fn drop(&mut self) {
        // SAFETY: unmounting what this test mounted; MNT_DETACH in case a file is still open.
        unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn a_full_disk_during_a_save_keeps_the_previous_file_and_the_answer() {
    let _g = lock();
    let sessions = tempfile::tempdir().expect("temp dir");
    // gemma3-270m's cache takes 18 KiB a token: a short session fits, a long one does not.
    if !mount_tmpfs(sessions.path(), "256k") {
        return;
    }
    let _unmount =
        Unmount(std::ffi::CString::new(sessions.path().to_str().expect("utf-8")).expect("no NUL"));
    let d = start(sessions.path(), "512");
    let (_, last, _) = stream(&d, &request("Hello", 2, Some("s")));
    assert_eq!(last["session"]["saved"], true, "{last}");
    let file = sessions.path().join("s.kv");
    let before = std::fs::read(&file).expect("saved");

    let long = format!("Hello{}", " and hello again".repeat(12));
    let (text, last, _) = stream(&d, &request(&long, 4, Some("s")));
    assert!(!text.is_empty(), "the answer was lost");
    assert_eq!(last["choices"][0]["finish_reason"], "length", "{last}");
    assert_eq!(last["session"]["saved"], false, "{last}");
    let err = last["session"]["error"].as_str().unwrap_or("");
    assert!(err.contains("No space left"), "{err}");
    assert_eq!(std::fs::read(&file).expect("kept"), before);
    assert_eq!(
        std::fs::read_dir(sessions.path()).expect("list").count(),
        1,
        "a temp file was left behind"
    );
    assert_eq!(d.metric("strata_session_save_errors_total"), 1.0);
    // The daemon keeps serving, and the old session still resumes.
    let (_, last, _) = stream(&d, &request("Hello there", 2, Some("s")));
    assert_eq!(last["session"]["saved"], true, "{last}");
    assert!(last["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64() > Some(0));
}
