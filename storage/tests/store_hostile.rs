//! The store against a careless user and a hostile source (issue 21): what is not a GGUF model
//! never enters it, odd paths are named for what they are, a pull killed with `kill -9` or
//! failing at its last step leaves nothing for good, lock files do not pile up, and a private
//! store holds no world-readable file.

#[path = "store_common.rs"]
mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, files_under, tiny_gguf};
use strata_storage::store::{NoProgress, PullOptions, Store, StoreError};

fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::at(dir.path().join("home"));
    (dir, store)
}

/// Everything under the store's root, lock files included: a failed pull leaves none of it.
fn leftovers(store: &Store) -> Vec<String> {
    files_under(store.root())
}

fn pull_path(store: &Store, path: &Path, name: &str) -> Result<std::path::PathBuf, StoreError> {
    let opts = PullOptions {
        name: Some(name.into()),
        ..Default::default()
    };
    store.pull_with(path.to_str().unwrap(), &opts, &mut NoProgress)
}

/// Regression: `/etc/passwd` named `x.gguf`, an empty file, the first 100 bytes, the first
/// MiB and all but the last byte of a real model were each "pulled", listed, and failed only
/// when run. Now each is refused, naming why, and nothing of it stays in the store.
#[test]
fn what_is_not_a_usable_gguf_model_never_enters_the_store() {
    let (dir, store) = temp_store();
    let model = tiny_gguf(9, 3 << 20);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "passwd",
            b"root:x:0:0:root:/root:/bin/bash\n".to_vec(),
            "not a GGUF file",
        ),
        ("empty", Vec::new(), "empty"),
        ("head100", model[..100].to_vec(), "left in the file"),
        ("head1m", model[..1 << 20].to_vec(), "runs past end of file"),
        (
            "allbut1",
            model[..model.len() - 1].to_vec(),
            "runs past end of file",
        ),
    ];
    for (name, bytes, why) in cases {
        let file = dir.path().join(format!("{name}.gguf"));
        fs::write(&file, &bytes).unwrap();
        let err = pull_path(&store, &file, name).expect_err(name);
        let msg = err.to_string();
        assert!(
            matches!(err, StoreError::NotGguf { .. }) && msg.contains(why),
            "{name}: {msg}"
        );
        assert!(store.list().unwrap().is_empty(), "{name} listed");
        assert_eq!(leftovers(&store), Vec::<String>::new(), "{name}");
    }
    // The same bytes over HTTP.
    let server = Server::start();
    server.route("/x.gguf", model[..1 << 20].to_vec());
    let err = store
        .pull(&format!("{}/x.gguf", server.base), &mut NoProgress)
        .expect_err("truncated download");
    assert!(matches!(err, StoreError::NotGguf { .. }), "{err}");
    assert_eq!(leftovers(&store), Vec::<String>::new());
    // A whole file still comes in.
    let file = dir.path().join("whole.gguf");
    fs::write(&file, &model).unwrap();
    pull_path(&store, &file, "whole").unwrap();
    assert_eq!(store.list().unwrap().len(), 1);
}

/// Regression: pulling a directory, `/dev/zero`, `/dev/null` or a FIFO said "no such model
/// file" although the path exists. Now the error says what the path is, and a FIFO does not
/// block the pull waiting for a writer.
#[test]
fn odd_paths_are_named_for_what_they_are() {
    let (dir, store) = temp_store();
    let fifo = dir.path().join("pipe.gguf");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let sub = dir.path().join("adir.gguf");
    fs::create_dir(&sub).unwrap();
    for (path, kind) in [
        (sub.as_path(), "a directory"),
        (Path::new("/dev/zero"), "a character device"),
        (Path::new("/dev/null"), "a character device"),
        (fifo.as_path(), "a FIFO"),
    ] {
        let spec = path.to_str().unwrap();
        for err in [
            store.pull(spec, &mut NoProgress).expect_err(spec),
            store.resolve(spec).expect_err(spec),
        ] {
            let msg = err.to_string();
            assert!(
                matches!(err, StoreError::NotAFile { .. }) && msg.contains(kind),
                "{spec}: {msg}"
            );
            assert!(
                msg.contains(spec) && msg.contains("not a model file"),
                "{msg}"
            );
        }
    }
    let missing = dir.path().join("missing.gguf");
    assert!(matches!(
        store.pull(missing.to_str().unwrap(), &mut NoProgress),
        Err(StoreError::NoSuchFile { .. })
    ));
    assert_eq!(leftovers(&store), Vec::<String>::new());
}

/// Regression: with `--allow-pull paths` a client copied `/proc/self/environ` into the store,
/// world-readable. A pseudo-file is no model (it says it is empty), and what a private store
/// creates is readable by its owner only.
#[test]
fn pseudo_files_are_refused_and_a_private_store_stays_private() {
    let (dir, store) = temp_store();
    let err = store
        .pull_with(
            "/proc/self/environ",
            &PullOptions {
                name: Some("environ".into()),
                ..Default::default()
            },
            &mut NoProgress,
        )
        .expect_err("/proc/self/environ pulled");
    assert!(err.to_string().contains("empty"), "{err}");
    assert_eq!(leftovers(&store), Vec::<String>::new());

    fs::create_dir_all(store.root()).unwrap();
    fs::set_permissions(store.root(), fs::Permissions::from_mode(0o700)).unwrap();
    let server = Server::start();
    server.route("/m.gguf", tiny_gguf(1, 4096));
    let path = store
        .pull(&format!("{}/m.gguf", server.base), &mut NoProgress)
        .unwrap();
    // A copy from another file system is written by the store too (a hard link keeps the
    // source's own mode: the same inode, readable as before through its own path).
    let mut written = vec![path.clone(), path.with_extension("json")];
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let src = tempfile::Builder::new()
            .suffix(".gguf")
            .tempfile_in(shm)
            .unwrap();
        fs::write(src.path(), tiny_gguf(2, 4096)).unwrap();
        fs::set_permissions(src.path(), fs::Permissions::from_mode(0o644)).unwrap();
        let copied = pull_path(&store, src.path(), "copied").unwrap();
        let same_fs = {
            use std::os::unix::fs::MetadataExt;
            fs::metadata(shm).unwrap().dev() == fs::metadata(dir.path()).unwrap().dev()
        };
        if !same_fs {
            written.push(copied);
        }
    }
    for p in written {
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", p.display());
    }
    // An open store gives its files the usual modes.
    fs::set_permissions(store.root(), fs::Permissions::from_mode(0o755)).unwrap();
    server.route("/open.gguf", tiny_gguf(3, 4096));
    let p = store
        .pull(&format!("{}/open.gguf", server.base), &mut NoProgress)
        .unwrap();
    let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode & 0o044, 0o044, "mode {mode:o}");
}

/// Regression: a failure writing the manifest (disk full) after the model was renamed into
/// place left the model listed without a checksum. A pull is all or nothing: here the
/// manifest's place is taken by a directory, so that writing it fails.
#[test]
fn a_manifest_that_cannot_be_written_leaves_no_model() {
    let (dir, store) = temp_store();
    let file = dir.path().join("exact.gguf");
    fs::write(&file, tiny_gguf(4, 1 << 20)).unwrap();
    let blocker = store.root().join("models/exact.json");
    fs::create_dir_all(blocker.join("in-the-way")).unwrap();
    let err = store
        .pull(file.to_str().unwrap(), &mut NoProgress)
        .expect_err("pull with an unwritable manifest");
    assert!(err.to_string().contains("exact.json"), "{err}");
    assert!(store.list().unwrap().is_empty(), "{:?}", store.list());
    assert!(!store.root().join("models/exact.gguf").exists());
    assert!(files_under(&store.root().join("tmp")).is_empty());
}

const CHILD_ENV: &str = "STRATA_STORE_CHILD";

/// The child of the tests below (this test binary, run again): does what `CHILD_ENV` says.
#[test]
#[ignore = "run by other tests as a child process"]
fn store_child() {
    let Ok(what) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = what.splitn(3, '|');
    let (op, root, spec) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let store = Store::at(root.into());
    if op == "fsize" {
        // A file system that fills up: every write past 64 bytes fails with EFBIG (SIGXFSZ
        // ignored, as a full disk sends no signal).
        // SAFETY: plain syscalls on this process's own limits and signal dispositions.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: 64,
                rlim_max: libc::RLIM_INFINITY,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
        }
    }
    let r = store.pull(spec, &mut NoProgress);
    println!("child pull: {r:?}");
}

fn child(op: &str, store: &Store, spec: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "store_child", "--ignored", "--nocapture"])
        .env(CHILD_ENV, format!("{op}|{}|{spec}", store.root().display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Disk full while writing the manifest, as a file-size limit on a child that pulls by hard
/// link (the model itself needs no writes): the model must not appear without its checksum.
#[test]
fn disk_full_at_the_manifest_leaves_nothing_listed() {
    let (dir, store) = temp_store();
    let file = dir.path().join("exact.gguf");
    fs::write(&file, tiny_gguf(6, 1 << 20)).unwrap();
    fs::create_dir_all(store.root()).unwrap();
    let status = child("fsize", &store, file.to_str().unwrap())
        .wait()
        .unwrap();
    assert!(status.success(), "{status}");
    let list = store.list().unwrap();
    assert!(
        list.iter().all(|m| m.sha256().is_some()),
        "listed without a checksum: {list:?}"
    );
    assert!(list.is_empty(), "{list:?}");
    let left: Vec<_> = leftovers(&store);
    assert!(left.is_empty(), "{left:?}");
}

/// An HTTP server that sends the head and the first part of a body, then nothing: a pull from
/// it sits mid-download until it is killed.
fn stalling_server(body: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(&body[..body.len() / 2]);
            held.push(stream);
        }
    });
    base
}

/// Regression: `kill -9` during a pull left `tmp/*.partial` for good (201 MB and 215 MB, and
/// hard-linked partials). A live pull's temp file is kept by `list` and other pulls; once its
/// process is dead, the next `list` removes it, and so the next pull does for a dead
/// hard-linked import's.
#[test]
fn kill_9_during_a_pull_leaves_nothing_for_good() {
    let (dir, store) = temp_store();
    let base = stalling_server(tiny_gguf(7, 4 << 20));
    let mut c = child("pull", &store, &format!("{base}/big.gguf"));
    let tmp = store.root().join("tmp");
    let t0 = Instant::now();
    let partial = loop {
        let found = fs::read_dir(&tmp).ok().and_then(|mut r| {
            r.find_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| fs::metadata(p).is_ok_and(|m| m.len() > 0))
        });
        if let Some(p) = found {
            break p;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "no partial file");
        std::thread::sleep(Duration::from_millis(20));
    };
    // A dead hard-linked import of the same name: no lock of its own, and its name's lock is
    // the live pull's, so it is kept too for now.
    let src = dir.path().join("src.gguf");
    fs::write(&src, tiny_gguf(8, 4096)).unwrap();
    let linked = tmp.join("big.999999.0.partial");
    fs::hard_link(&src, &linked).unwrap();
    // And a file of that pull not locked yet (between its creation and its flock), named as a
    // built-in's wheels are: `NAME.wheelN`.
    let unlocked = tmp.join("big.wheel1.999999.1.partial");
    fs::write(&unlocked, b"PK").unwrap();
    store.list().unwrap();
    assert!(partial.exists(), "a live pull's temp file was removed");
    assert!(
        linked.exists(),
        "a temp file of a name being pulled was removed"
    );
    assert!(
        unlocked.exists(),
        "a live pull's not yet locked file was removed"
    );

    c.kill().unwrap();
    c.wait().unwrap();
    assert!(store.list().unwrap().is_empty());
    assert!(
        !partial.exists(),
        "{} survived its writer",
        partial.display()
    );
    assert!(!linked.exists(), "{} survived", linked.display());
    assert!(!unlocked.exists(), "{} survived", unlocked.display());
    assert_eq!(leftovers(&store), Vec::<String>::new());
    assert!(src.exists(), "the source of a hard link is untouched");

    // The next pull cleans up too, and a temp file that is not ours (no `.PID.N.partial`
    // name) is left alone.
    fs::hard_link(&src, tmp.join("other.1.2.partial")).unwrap();
    fs::write(tmp.join("notes.txt"), b"x").unwrap();
    pull_path(&store, &src, "src").unwrap();
    assert_eq!(
        files_under(&tmp),
        vec!["notes.txt".to_string()],
        "stale temp file kept by a pull"
    );
}

/// Regression: `locks/*.lock` were never removed (86 piled up). A released lock takes its
/// file with it, also when pulls of one name race.
#[test]
fn lock_files_do_not_pile_up() {
    let (dir, store) = temp_store();
    let file = dir.path().join("m.gguf");
    fs::write(&file, tiny_gguf(1, 1 << 20)).unwrap();
    let spec = file.to_str().unwrap().to_owned();
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let (store, spec) = (store.clone(), spec.clone());
            std::thread::spawn(move || {
                for _ in 0..5 {
                    store.pull(&spec, &mut NoProgress).unwrap();
                    if i % 2 == 0 {
                        let _ = store.remove("m");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for n in 0..20 {
        let _ = store.remove(&format!("absent{n}"));
    }
    assert!(files_under(&store.root().join("locks")).is_empty());
    assert!(files_under(&store.root().join("tmp")).is_empty());
}
