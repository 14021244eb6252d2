//! `kill -9` in the middle of session saves never leaves a file that is accepted partially:
//! a child process (this test binary, re-run) saves two alternating sessions under one name in
//! a loop; it is killed at random moments, and after each kill the file is either absent or one
//! of the two complete versions, read back whole.

use std::process::{Command, Stdio};
use std::time::Duration;

use strata_storage::session::{SessionDir, SessionMeta};

const ENV: &str = "STRATA_SESSION_WRITER_DIR";

fn meta(v: u32) -> SessionMeta {
    SessionMeta {
        model_id: [v as u8; 32],
        tokenizer_id: [1; 32],
        kv_type: 1,
        n_layer: 4,
        kv_dim: 64,
        tokens: vec![v; 1000],
        n_chunks: 0,
    }
}

fn payload(v: u32) -> Vec<Vec<u8>> {
    (0..8).map(|i| vec![(v as u8) ^ i; 2 << 20]).collect()
}

/// The child: saves versions 1 and 2 alternately until killed.
#[test]
#[ignore = "run by session_saves_survive_kill_9 as a child process"]
fn writer_child() {
    let Some(dir) = std::env::var_os(ENV) else {
        return;
    };
    let dir = SessionDir::open(std::path::Path::new(&dir)).expect("dir");
    let versions = [payload(1), payload(2)];
    for i in 0.. {
        let v = 1 + (i % 2) as u32;
        let refs: Vec<&[u8]> = versions[i % 2].iter().map(|c| &c[..]).collect();
        dir.save("s", &meta(v), &refs).expect("save");
    }
}

#[test]
fn session_saves_survive_kill_9() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut seen = [0usize; 3];
    for _ in 0..12 {
        let mut child = Command::new(&exe)
            .args(["--exact", "writer_child", "--ignored", "--nocapture"])
            .env(ENV, tmp.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn writer");
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(150 + seed % 400));
        child.kill().expect("SIGKILL");
        let _ = child.wait();
        let dir = SessionDir::open(tmp.path()).expect("dir");
        match dir.load("s") {
            Ok((m, chunks)) => {
                let v = m.tokens[0];
                assert!(v == 1 || v == 2, "unknown version {v}");
                assert_eq!(
                    m,
                    SessionMeta {
                        n_chunks: 8,
                        ..meta(v)
                    }
                );
                assert_eq!(chunks, payload(v));
                seen[v as usize] += 1;
            }
            Err(strata_storage::session::SessionError::NotFound(_)) => seen[0] += 1,
            Err(e) => panic!("a killed save left a file that does not read back: {e}"),
        }
        // Leftover temp files are hidden and never listed as sessions.
        assert!(dir.list().expect("list").iter().all(|n| n == "s"));
    }
    assert!(seen[1] + seen[2] > 0, "no save ever completed: {seen:?}");
}

#[test]
fn temp_files_of_dead_savers_are_cleaned_up() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // PID 2^22 + 1 is above the kernel's pid_max default; no such process.
    let stale = tmp.path().join(".s.kv.4194305.0.tmp");
    let live = tmp
        .path()
        .join(format!(".s.kv.{}.3.tmp", std::process::id()));
    std::fs::write(&stale, b"half").expect("write");
    std::fs::write(&live, b"in progress").expect("write");
    SessionDir::open(tmp.path()).expect("open");
    assert!(!stale.exists());
    assert!(live.exists());
}
