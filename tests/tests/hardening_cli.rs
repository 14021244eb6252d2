//! The `strata` binary against a careless user and a hostile file or socket (issue 21): the
//! store commands, error lines that quote hostile file content, and a client that will not
//! talk to an impostor's socket.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use strata_storage::gguf::{GgufBuilder, Value};
use strata_storage::quant::GgmlType;
use strata_tests::strata_bin;

/// Runs `strata` with its store in `home`; one still running after 30 s (blocked on a FIFO,
/// waiting on an impostor's socket) is killed, and fails whatever the test asserts.
fn strata(home: &std::path::Path, args: &[&str]) -> Output {
    use std::io::Read;
    let mut child = Command::new(strata_bin())
        .args(args)
        .env("STRATA_HOME", home)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run strata");
    // Read both pipes on threads: a 10 MB error would otherwise fill one and block the child.
    let mut out_pipe = child.stdout.take().expect("stdout");
    let mut err_pipe = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if t0.elapsed() > std::time::Duration::from_secs(30) {
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Regression: `strata pull` of a directory, `/dev/zero`, `/dev/null` or a FIFO said "no
/// such model file"; of `/etc/passwd` named `x.gguf` or an empty file it "pulled" and listed
/// them. Each is one error line saying what the path is or why it is no model, and `strata
/// list` stays empty.
#[test]
fn pull_says_what_a_path_is_and_keeps_out_what_is_no_model() {
    let dir = tempfile::tempdir().expect("dir");
    let home = dir.path().join("home");
    let fifo = dir.path().join("fifo.gguf");
    let c = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("cstring");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let passwd = dir.path().join("x.gguf");
    std::fs::write(&passwd, "root:x:0:0:root:/root:/bin/sh\n").expect("write");
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").expect("write");
    let d = dir.path().to_str().expect("utf-8");
    for (path, needle) in [
        (d, "is a directory, not a model file"),
        ("/dev/zero", "is a character device, not a model file"),
        ("/dev/null", "is a character device, not a model file"),
        (fifo.to_str().expect("utf-8"), "is a FIFO"),
        (passwd.to_str().expect("utf-8"), "not a usable GGUF model"),
        (empty.to_str().expect("utf-8"), "empty"),
    ] {
        let out = strata(&home, &["pull", path]);
        let err = stderr(&out);
        assert!(!out.status.success(), "{path} pulled");
        // Progress lines may come first (a pipe gets a line per step); the error is one line,
        // the last.
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{err}");
        assert!(
            err.trim_end().ends_with(errors[0]) && errors[0].contains(needle),
            "{path}: {err}"
        );
    }
    let list = strata(&home, &["list"]);
    assert!(list.status.success(), "{}", stderr(&list));
    assert!(
        String::from_utf8_lossy(&list.stdout).starts_with("no models"),
        "{}",
        String::from_utf8_lossy(&list.stdout)
    );
}

/// Regression: a 10 MB `general.architecture` was echoed whole, 10,000,139 bytes on stderr,
/// terminal escapes included. The error line quotes a short, escaped prefix.
#[test]
fn an_error_line_quotes_a_short_escaped_prefix_of_the_file() {
    let dir = tempfile::tempdir().expect("dir");
    let model = dir.path().join("huge.gguf");
    let arch = format!("\x1b]0;pwned\x07\x1b[2J{}", "x".repeat(10_000_000));
    let bytes = GgufBuilder::new()
        .kv("general.architecture", Value::String(arch))
        .tensor("w", &[8], GgmlType::F32, vec![0; 32])
        .to_bytes();
    std::fs::write(&model, bytes).expect("write");
    let out = strata(
        dir.path(),
        &[
            "run",
            "-m",
            model.to_str().expect("utf-8"),
            "-p",
            "x",
            "-n",
            "1",
        ],
    );
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.len() < 4096, "{} bytes on stderr", err.len());
    assert!(!err.contains('\x1b') && !err.contains('\x07'), "{err:?}");
    assert!(err.contains("bytes in all"), "{err}");
}

/// Regression: with `/tmp/strata-0` made beforehand by another user, that user's socket in it
/// answered root's `strata ps`. The client refuses a socket in a directory another user
/// controls, before connecting. Root only (staging another user's directory needs chown).
#[test]
fn the_client_refuses_an_impostors_socket() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: skipped");
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).expect("mkdir");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let planted = tmp.join("strata-0");
    std::fs::create_dir(&planted).expect("mkdir");
    let sock = planted.join("strata.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).expect("chown");
    std::os::unix::fs::chown(&sock, Some(65534), Some(65534)).expect("chown");
    let out = strata(
        dir.path(),
        &["ps", "--socket", sock.to_str().expect("utf-8")],
    );
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("refusing to connect") && err.contains("belongs to uid 65534"),
        "{err}"
    );
    assert!(
        listener.accept().is_err(),
        "the client connected to the impostor"
    );
    // A world-writable directory is refused too.
    let open = dir.path().join("open");
    std::fs::create_dir(&open).expect("mkdir");
    let sock2 = open.join("strata.sock");
    let _l2 = std::os::unix::net::UnixListener::bind(&sock2).expect("bind");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let out = strata(
        dir.path(),
        &["ps", "--socket", sock2.to_str().expect("utf-8")],
    );
    assert!(
        stderr(&out).contains("writable by others"),
        "{}",
        stderr(&out)
    );
}
