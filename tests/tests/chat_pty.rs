//! `strata chat` driven through a real pseudo-terminal, as a person at a keyboard would: the
//! line editor, streamed answers, Ctrl-C stopping an answer (SIGINT from the terminal's line
//! discipline, not a signal sent by the test), the slash commands, and a clean exit.
//!
//! Every wait is bounded, so a hang fails the test with the transcript instead of blocking CI.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_tests::{QWEN, model_path, strata_bin};

/// Model load plus a prompt on two busy cores; generous so only a real hang trips it.
const SLOW: Duration = Duration::from_secs(240);
const QUICK: Duration = Duration::from_secs(30);

/// A child process whose stdin, stdout and stderr are the slave side of a new pseudo-terminal,
/// which is also its controlling terminal (so Ctrl-C typed on it raises SIGINT in the child).
struct Pty {
    master: File,
    child: Child,
    /// Everything the child has written, appended by a reader thread.
    output: Arc<Mutex<Vec<u8>>>,
    /// How far `expect` has matched.
    pos: usize,
}

impl Pty {
    fn spawn(cmd: &mut Command) -> Pty {
        let mut master: libc::c_int = -1;
        let mut slave: libc::c_int = -1;
        // Wide enough that the line editor never wraps the prompt and echo.
        let size = libc::winsize {
            ws_row: 50,
            ws_col: 250,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two descriptors into the provided ints; the name buffer and
        // termios may be null; `size` outlives the call.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty succeeded, so both are open descriptors that nothing else owns.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let io = |fd: &OwnedFd| Stdio::from(fd.try_clone().expect("dup the pty slave"));
        cmd.stdin(io(&slave)).stdout(io(&slave)).stderr(io(&slave));
        // SAFETY: only async-signal-safe calls between fork and exec: a new session, then the
        // terminal (already on fd 0) becomes its controlling terminal.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn strata");
        // The child has its copies; ours must close so reads end when the child exits.
        drop(slave);
        let master = File::from(master);
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone().expect("dup the pty master");
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once the child has exited and closed the slave.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&buf[..n]);
            }
        });
        Pty {
            master,
            child,
            output,
            pos: 0,
        }
    }

    fn text(&self) -> String {
        let out = self.output.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&out).into_owned()
    }

    fn transcript(&self) -> String {
        let t = self.text();
        let tail: String = t
            .chars()
            .rev()
            .take(3000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("--- transcript (last 3000 chars) ---\n{tail}\n---")
    }

    /// Waits until `needle` appears after what was matched before; returns the text between.
    fn expect(&mut self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let found = {
                let out = self.output.lock().unwrap_or_else(|e| e.into_inner());
                let hay = &out[self.pos.min(out.len())..];
                hay.windows(needle.len())
                    .position(|w| w == needle.as_bytes())
                    .map(|i| {
                        let before = String::from_utf8_lossy(&hay[..i]).into_owned();
                        (before, self.pos + i + needle.len())
                    })
            };
            if let Some((before, end)) = found {
                self.pos = end;
                return before;
            }
            if start.elapsed() > timeout {
                panic!("no {needle:?} within {timeout:?}\n{}", self.transcript());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Give the reader a moment to collect the last output, then look once more.
                std::thread::sleep(Duration::from_millis(200));
                let t = self.text();
                if !t[self.pos.min(t.len())..].contains(needle) {
                    panic!(
                        "strata exited ({status}) before {needle:?}\n{}",
                        self.transcript()
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until at least `n` bytes past the last match have arrived.
    fn expect_bytes(&mut self, n: usize, timeout: Duration) {
        let start = Instant::now();
        while self.output.lock().unwrap_or_else(|e| e.into_inner()).len() < self.pos + n {
            if start.elapsed() > timeout {
                panic!(
                    "fewer than {n} new bytes within {timeout:?}\n{}",
                    self.transcript()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn send(&mut self, bytes: &str) {
        self.master
            .write_all(bytes.as_bytes())
            .expect("write to the pty");
        self.master.flush().expect("flush the pty");
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait for strata") {
                return s;
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                panic!(
                    "strata did not exit within {timeout:?}\n{}",
                    self.transcript()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        // A failed test must not leave a model-sized process behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `strata chat --local` on qwen with the store's state (chats, history) in a temp dir.
fn chat_local(home: &std::path::Path, extra: &[&str]) -> Pty {
    let model = model_path(QWEN);
    let mut cmd = Command::new(strata_bin());
    cmd.args(["chat", "--local"])
        .arg(&model)
        .args(["--temp", "0", "-c", "1024"])
        .args(extra)
        .env("STRATA_HOME", home)
        .env("TERM", "xterm")
        .env_remove("STRATA_LOG");
    Pty::spawn(&mut cmd)
}

#[test]
fn chat_local_streams_stops_on_ctrl_c_and_saves() {
    let home = tempfile::tempdir().expect("temp dir");
    let mut pty = chat_local(home.path(), &["-n", "160"]);
    pty.expect(">>> ", SLOW);

    // A question over two lines (a trailing backslash continues it).
    pty.send("What is 2+2? \\\r");
    pty.expect("... ", QUICK);
    pty.send("Reply with only the number.\r");
    pty.expect("number.", QUICK);
    let answer = pty.expect(">>> ", SLOW);
    assert!(
        answer.contains('4'),
        "answer {answer:?}\n{}",
        pty.transcript()
    );

    pty.send("/stats\r");
    let stats = pty.expect(">>> ", QUICK);
    assert!(stats.contains("last answer: "), "{stats:?}");
    assert!(!stats.contains("stopped by Ctrl-C"), "{stats:?}");

    // A long answer, stopped by Ctrl-C typed on the terminal once it is streaming.
    pty.send("Write a long, detailed essay on the history of the Roman Empire.\r");
    pty.expect("Empire.", QUICK);
    pty.expect_bytes(40, SLOW);
    pty.send("\x03");
    pty.expect(">>> ", QUICK);
    pty.send("/stats\r");
    let stats = pty.expect(">>> ", QUICK);
    assert!(
        stats.contains("stopped by Ctrl-C"),
        "{stats:?}\n{}",
        pty.transcript()
    );
    let tokens: usize = stats
        .split("last answer: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no token count in {stats:?}"));
    assert!((1..160).contains(&tokens), "{tokens} tokens: {stats:?}");

    // The conversation (both questions, the answer and the partial one) saves as JSON.
    pty.send("/save roman\r");
    pty.expect("saved to", QUICK);
    pty.expect(">>> ", QUICK);
    pty.send("/load ../escape\r");
    pty.expect("error: ", QUICK);
    pty.expect(">>> ", QUICK);
    pty.send("/bye\r");
    let status = pty.wait_exit(QUICK);
    assert!(status.success(), "{status}\n{}", pty.transcript());

    let saved = std::fs::read_to_string(home.path().join("chats/roman.json")).expect("saved chat");
    let v: serde_json::Value = serde_json::from_str(&saved).expect("saved chat is JSON");
    let msgs = v["messages"].as_array().expect("messages");
    let roles: Vec<&str> = msgs.iter().filter_map(|m| m["role"].as_str()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"], "{saved}");
    assert_eq!(
        msgs[0]["content"].as_str(),
        Some("What is 2+2? \nReply with only the number.")
    );
}

/// Issue 22: Ctrl-C during an answer in `strata run -cnv` killed the process (exit 130, the
/// conversation lost). As in llama-cli and `strata chat`, it stops the answer and the
/// conversation goes on; Ctrl-D at the prompt leaves.
#[test]
fn run_conversation_stops_an_answer_on_ctrl_c_and_goes_on() {
    let model = model_path(QWEN);
    let mut cmd = Command::new(strata_bin());
    cmd.args(["run", "-m"])
        .arg(&model)
        .args(["-cnv", "--temp", "0", "-c", "1024", "-n", "300"])
        .env("TERM", "xterm")
        .env_remove("STRATA_LOG");
    let mut pty = Pty::spawn(&mut cmd);
    pty.expect("> ", SLOW);
    pty.send("Write a long, detailed essay on the history of the Roman Empire.\r");
    pty.expect("Empire.", QUICK);
    pty.expect_bytes(40, SLOW);
    pty.send("\x03");
    pty.expect("\n> ", QUICK);
    pty.send("What is 2+2? Reply with only the number.\r");
    pty.expect("number.", QUICK);
    let answer = pty.expect("\n> ", SLOW);
    assert!(
        answer.contains('4'),
        "answer {answer:?}\n{}",
        pty.transcript()
    );
    pty.send("\x04");
    let status = pty.wait_exit(QUICK);
    assert!(status.success(), "{status}\n{}", pty.transcript());
}

#[test]
fn chat_local_loads_a_saved_chat_and_leaves_on_double_ctrl_c() {
    let home = tempfile::tempdir().expect("temp dir");
    let chats = home.path().join("chats");
    std::fs::create_dir_all(&chats).expect("chats dir");
    std::fs::write(
        chats.join("good.json"),
        r#"{"messages": [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}]}"#,
    )
    .expect("write a chat");
    std::fs::write(
        chats.join("bad.json"),
        r#"{"messages": [{"role": "user"}]}"#,
    )
    .expect("write a chat");
    // The KV cache flags of `run` apply to --local too.
    let mut pty = chat_local(
        home.path(),
        &["-n", "8", "--cache-type-k", "q8_0", "--kv-budget", "1M"],
    );
    pty.expect(">>> ", SLOW);
    pty.send("/load good\r");
    pty.expect("loaded 2 messages", QUICK);
    pty.expect(">>> ", QUICK);
    pty.send("/system\r");
    pty.expect("You are terse.", QUICK);
    pty.expect(">>> ", QUICK);
    // A malformed file names itself and keeps the conversation that was there.
    pty.send("/load bad\r");
    pty.expect("bad.json is not a saved chat", QUICK);
    pty.expect(">>> ", QUICK);
    pty.send("/system\r");
    pty.expect("You are terse.", QUICK);
    pty.expect(">>> ", QUICK);
    pty.send("/nonsense\r");
    pty.expect("unknown command", QUICK);
    pty.expect(">>> ", QUICK);
    // Ctrl-C at the prompt only warns; a second one leaves, successfully.
    pty.send("\x03");
    pty.expect("Ctrl-C again", QUICK);
    pty.send("\x03");
    let status = pty.wait_exit(QUICK);
    assert!(status.success(), "{status}\n{}", pty.transcript());
}

#[test]
fn client_commands_without_a_daemon_fail_with_one_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = dir.path().join("none.sock");
    let sock = sock.to_str().expect("utf-8 path");
    for args in [
        vec!["chat", "qwen2.5-coder-1.5b", "--socket", sock],
        vec!["ps", "--socket", sock],
        vec!["load", "gemma3-270m", "--socket", sock],
        vec!["unload", "gemma3-270m", "--socket", sock],
    ] {
        let out = Command::new(strata_bin())
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("run strata");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(lines[0].starts_with("error: no strata daemon"), "{err}");
        assert!(lines[0].contains("stratad --model"), "{err}");
    }
}

/// A real `stratad` serving qwen on a socket in a temp dir, stopped (SIGTERM) when dropped.
struct Daemon {
    child: Child,
    sock: std::path::PathBuf,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start(model: &str) -> Daemon {
        let stratad = strata_bin().with_file_name("stratad");
        assert!(
            stratad.exists(),
            "{} is missing: build it with `cargo build --release -p strata-daemon`",
            stratad.display()
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let sock = dir.path().join("strata.sock");
        let child = Command::new(stratad)
            .arg("--socket")
            .arg(&sock)
            .args(["--model", model, "--ctx-size", "1024", "--threads", "2"])
            .arg("--session-dir")
            .arg(dir.path().join("sessions"))
            // Warnings and errors only: the per-request lines would bury the test's output.
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start stratad");
        Daemon { child, sock, dir }
    }

    fn sock(&self) -> &str {
        self.sock.to_str().expect("utf-8 path")
    }

    /// `strata ARGS --socket SOCK`: (exit code, stdout, stderr).
    fn strata(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let out = Command::new(strata_bin())
            .args(args)
            .args(["--socket", self.sock()])
            .stdin(Stdio::null())
            .output()
            .expect("run strata");
        let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), s(&out.stdout), s(&out.stderr))
    }

    /// Polls `strata ps` until `model` is listed.
    fn wait_loaded(&mut self, model: &str) {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("stratad exited early ({status})");
            }
            let (code, out, _) = self.strata(&["ps"]);
            if code == Some(0) && out.contains(model) {
                return;
            }
            assert!(
                start.elapsed() < SLOW,
                "stratad did not load {model} in {SLOW:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid; SIGTERM makes stratad drain and exit.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < QUICK {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn chat_through_the_daemon_with_ps_load_unload() {
    model_path(QWEN);
    let mut daemon = Daemon::start(QWEN);
    daemon.wait_loaded(QWEN);

    let (code, out, err) = daemon.strata(&["ps"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("NAME") && out.contains("qwen2"), "{out}");

    // The chat picks the one loaded model when none is named.
    let home = tempfile::tempdir().expect("temp dir");
    let mut cmd = Command::new(strata_bin());
    cmd.args([
        "chat",
        "--socket",
        daemon.sock(),
        "--temp",
        "0",
        "-n",
        "160",
    ])
    .env("STRATA_HOME", home.path())
    .env("TERM", "xterm");
    let mut pty = Pty::spawn(&mut cmd);
    pty.expect(QWEN, QUICK);
    pty.expect(">>> ", QUICK);
    pty.send("What is 2+2? Reply with only the number.\r");
    pty.expect("number.", QUICK);
    let answer = pty.expect(">>> ", SLOW);
    assert!(
        answer.contains('4'),
        "answer {answer:?}\n{}",
        pty.transcript()
    );

    // Ctrl-C closes the stream, which cancels the request in the daemon.
    pty.send("Write a long, detailed essay on the history of the Roman Empire.\r");
    pty.expect("Empire.", QUICK);
    pty.expect_bytes(40, SLOW);
    pty.send("\x03");
    pty.expect(">>> ", QUICK);
    pty.send("/stats\r");
    let stats = pty.expect(">>> ", QUICK);
    assert!(
        stats.contains("stopped by Ctrl-C"),
        "{stats:?}\n{}",
        pty.transcript()
    );

    // The conversation goes on after the interruption.
    pty.send("Now say OK.\r");
    pty.expect("OK.", QUICK);
    let answer = pty.expect(">>> ", SLOW);
    assert!(
        !answer.contains("error"),
        "{answer:?}\n{}",
        pty.transcript()
    );

    // Issue 22: after `/save snap` and `/reset`, the next answer overwrote chats/snap.json and
    // the daemon's session snap. A saved chat is a snapshot.
    pty.send("/save snap\r");
    pty.expect("KV cache saved in the daemon as session snap", SLOW);
    pty.expect(">>> ", QUICK);
    let kv = daemon.dir.path().join("sessions/snap.kv");
    let stamp = |p: &std::path::Path| {
        let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        (m.len(), m.modified().expect("mtime"))
    };
    let kv_before = stamp(&kv);
    pty.send("/reset\r");
    pty.expect(">>> ", QUICK);
    pty.send("Say hi.\r");
    pty.expect("hi.", QUICK);
    pty.expect(">>> ", SLOW);
    pty.send("/bad name\r");
    let err = pty.expect(">>> ", QUICK);
    assert!(err.contains("unknown command /bad"), "{err:?}");
    pty.send("/save ../x\r");
    let err = pty.expect(">>> ", QUICK);
    assert!(err.contains("invalid chat name"), "{err:?}");
    pty.send("/bye\r");
    let status = pty.wait_exit(QUICK);
    assert!(status.success(), "{status}\n{}", pty.transcript());
    let saved = std::fs::read_to_string(home.path().join("chats/snap.json")).expect("snap.json");
    assert!(
        saved.contains("2+2") && !saved.contains("Say hi."),
        "{saved}"
    );
    assert_eq!(stamp(&kv), kv_before, "session snap changed after /save");

    let (code, out, err) = daemon.strata(&["unload", QWEN]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), format!("unloaded {QWEN}"));
    let (_, out, _) = daemon.strata(&["ps"]);
    assert!(out.contains("no models loaded"), "{out}");
    let (code, _, err) = daemon.strata(&["unload", QWEN]);
    assert_eq!(code, Some(1));
    assert!(err.starts_with("error: the daemon answered 404"), "{err}");
    let (code, out, err) = daemon.strata(&["load", QWEN]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with(&format!("loaded {QWEN} in ")), "{out}");
    let (_, out, _) = daemon.strata(&["load", QWEN]);
    assert_eq!(out.trim(), format!("{QWEN} was already loaded"));
    let (code, _, err) = daemon.strata(&["load", "no-such-model"]);
    assert_eq!(code, Some(1));
    assert!(err.starts_with("error: the daemon answered 404"), "{err}");
}

#[test]
fn run_through_the_daemon_prints_what_in_process_greedy_prints() {
    const GEMMA: &str = "gemma3-270m";
    model_path(GEMMA);
    let mut daemon = Daemon::start(GEMMA);
    daemon.wait_loaded(GEMMA);
    for (prompt, extra) in [
        ("The capital of France is", &[][..]),
        ("1, 2, 3, 4, 5,", &["--no-display-prompt"][..]),
    ] {
        let run = ["run", "-m", GEMMA, "-p", prompt, "-n", "24", "--temp", "0"];
        let local = Command::new(strata_bin())
            .args(run)
            .args(extra)
            .args(["-t", "2"])
            .stdin(Stdio::null())
            .output()
            .expect("run strata");
        assert!(local.status.success());
        let local = String::from_utf8_lossy(&local.stdout).into_owned();
        let mut args = run.to_vec();
        args.extend_from_slice(extra);
        let (code, remote, err) = daemon.strata(&args);
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(remote, local, "through the daemon vs in-process");
        assert!(err.contains("through stratad at"), "{err}");
    }
    // In-process-only flags are refused, not ignored.
    let (code, _, err) = daemon.strata(&["run", "-m", GEMMA, "-p", "hi", "-c", "64"]);
    assert_eq!(code, Some(1));
    assert!(err.starts_with("error: -c/--ctx-size"), "{err}");
    // A path is not a store name: the daemon refuses it.
    let (code, _, err) = daemon.strata(&["run", "-m", "/etc/passwd", "-p", "hi"]);
    assert_eq!(code, Some(1));
    assert!(err.starts_with("error: the daemon answered 400"), "{err}");
}
