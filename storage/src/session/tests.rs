use super::*;

fn meta(n: usize) -> SessionMeta {
    SessionMeta {
        model_id: [7; 32],
        tokenizer_id: [9; 32],
        kv_type: 1,
        n_layer: 2,
        kv_dim: 8,
        tokens: (0..n as u32).collect(),
        n_chunks: 0,
    }
}

fn chunks() -> Vec<Vec<u8>> {
    (0..4u8).map(|i| vec![i; 100 + i as usize]).collect()
}

fn save(dir: &SessionDir, name: &str) -> u64 {
    let c = chunks();
    let refs: Vec<&[u8]> = c.iter().map(|c| &c[..]).collect();
    dir.save(name, &meta(5), &refs).unwrap()
}

#[test]
fn round_trip() {
    let t = tempfile::tempdir().unwrap();
    let dir = SessionDir::open(t.path()).unwrap();
    let n = save(&dir, "chat-1");
    assert_eq!(fs::metadata(dir.path("chat-1").unwrap()).unwrap().len(), n);
    let (m, c) = dir.load("chat-1").unwrap();
    assert_eq!(m.tokens, meta(5).tokens);
    assert_eq!(m.n_chunks, 4);
    assert_eq!(c, chunks());
    assert_eq!(dir.list().unwrap(), vec!["chat-1".to_string()]);
    dir.remove("chat-1").unwrap();
    assert!(matches!(dir.load("chat-1"), Err(SessionError::NotFound(_))));
}

#[test]
fn hostile_names_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let dir = SessionDir::open(t.path()).unwrap();
    let long = "a".repeat(129);
    for bad in ["", "a/b", "../x", "..", ".hidden", "x\0y", "a b", &long[..]] {
        assert!(
            matches!(dir.path(bad), Err(SessionError::BadName(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn a_symlink_out_of_the_directory_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let dir = SessionDir::open(t.path()).unwrap();
    let target = outside.path().join("victim.kv");
    fs::write(&target, b"precious").unwrap();
    std::os::unix::fs::symlink(&target, t.path().join("evil.kv")).unwrap();
    assert!(dir.load("evil").is_err());
    let c = chunks();
    let refs: Vec<&[u8]> = c.iter().map(|c| &c[..]).collect();
    assert!(dir.save("evil", &meta(1), &refs).is_err());
    assert_eq!(fs::read(&target).unwrap(), b"precious");
}

#[test]
fn every_truncation_and_bit_flip_is_caught() {
    let t = tempfile::tempdir().unwrap();
    let dir = SessionDir::open(t.path()).unwrap();
    save(&dir, "s");
    let p = dir.path("s").unwrap();
    let good = fs::read(&p).unwrap();
    let bad = t.path().join("bad.kv");
    for cut in 0..good.len() {
        fs::write(&bad, &good[..cut]).unwrap();
        assert!(read(&bad).is_err(), "truncated at {cut} accepted");
    }
    for at in 0..good.len() {
        for bit in [0, 3, 7] {
            let mut b = good.clone();
            b[at] ^= 1 << bit;
            fs::write(&bad, &b).unwrap();
            assert!(
                read(&bad).is_err(),
                "bit {bit} of byte {at} flipped and accepted"
            );
        }
    }
    let mut long = good.clone();
    long.push(0);
    fs::write(&bad, &long).unwrap();
    assert!(read(&bad).unwrap_err().to_string().contains("trailing"));
}

#[test]
fn a_huge_claimed_length_allocates_nothing() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("x.kv");
    let mut b = Vec::new();
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&u64::MAX.to_le_bytes());
    fs::write(&p, &b).unwrap();
    let e = read(&p).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
}

#[test]
fn a_failed_save_leaves_the_previous_file_intact() {
    let t = tempfile::tempdir().unwrap();
    let dir = SessionDir::open(t.path()).unwrap();
    save(&dir, "keep");
    let before = fs::read(dir.path("keep").unwrap()).unwrap();
    // Creating the temp file fails: every temp name this process could use next already
    // exists as a directory (root ignores permission bits, so those cannot do it).
    let blockers: Vec<_> = (0..4096)
        .map(|n| {
            t.path()
                .join(format!(".keep.kv.{}.{n}.tmp", std::process::id()))
        })
        .collect();
    blockers.iter().for_each(|b| fs::create_dir(b).unwrap());
    let c = chunks();
    let refs: Vec<&[u8]> = c.iter().map(|c| &c[..]).collect();
    assert!(dir.save("keep", &meta(9), &refs).is_err());
    assert_eq!(fs::read(dir.path("keep").unwrap()).unwrap(), before);
    blockers.iter().for_each(|b| fs::remove_dir(b).unwrap());
}

#[test]
fn disk_full_mid_save_keeps_the_previous_file() {
    // A 64 KiB tmpfs; skipped where mounting is not allowed.
    let t = tempfile::tempdir().unwrap();
    let fs_type = std::ffi::CString::new("tmpfs").unwrap();
    let target = std::ffi::CString::new(t.path().to_str().unwrap()).unwrap();
    let opts = std::ffi::CString::new("size=64k").unwrap();
    // SAFETY: plain C strings that live across the call.
    let rc = unsafe {
        libc::mount(
            fs_type.as_ptr(),
            target.as_ptr(),
            fs_type.as_ptr(),
            0,
            opts.as_ptr().cast(),
        )
    };
    if rc != 0 {
        eprintln!(
            "skipped: cannot mount a tmpfs here ({})",
            std::io::Error::last_os_error()
        );
        return;
    }
    let result = std::panic::catch_unwind(|| {
        let dir = SessionDir::open(t.path()).unwrap();
        save(&dir, "s");
        let before = fs::read(dir.path("s").unwrap()).unwrap();
        let big = vec![1u8; 100 << 10];
        let err = dir.save("s", &meta(3), &[&big]).unwrap_err();
        assert!(err.to_string().contains("No space"), "{err}");
        assert_eq!(fs::read(dir.path("s").unwrap()).unwrap(), before);
        // Nothing half-written is left behind.
        assert_eq!(fs::read_dir(t.path()).unwrap().count(), 1);
    });
    // SAFETY: unmounting what this test mounted.
    unsafe { libc::umount(target.as_ptr()) };
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn model_identity_prefers_the_manifest() {
    let t = tempfile::tempdir().unwrap();
    let m = t.path().join("m.gguf");
    fs::write(&m, b"GGUF header bytes, then tensor data").unwrap();
    let t1 = [(17u64, 18u64)];
    let a = model_identity(&m, 10, 35, &t1);
    assert_eq!(a, model_identity(&m, 10, 35, &t1));
    assert_ne!(a, model_identity(&m, 10, 36, &t1));
    // Same header, other weights: another identity.
    fs::write(&m, b"GGUF header bytes, then other data!").unwrap();
    assert_ne!(a, model_identity(&m, 10, 35, &t1));
    fs::write(
        t.path().join("m.json"),
        format!("{{\"sha256\": \"{}\"}}", "ab".repeat(32)),
    )
    .unwrap();
    assert_eq!(model_identity(&m, 10, 35, &t1), [0xab; 32]);
}

/// Regression (issue 21): the session directory was created 0755 although the comment (and
/// the 0600 files in it) meant it to be private.
#[test]
fn a_new_session_directory_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("state/strata/sessions");
    SessionDir::open(&root).unwrap();
    for d in [&root, &t.path().join("state")] {
        let mode = fs::metadata(d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} is {mode:o}", d.display());
    }
}

/// Regression (issue 21): removing a session whose entry is a symlink, a directory or a FIFO
/// failed (422 through the API), so such an entry could never be removed. A symlink goes,
/// never what it points to.
#[test]
fn any_entry_can_be_removed_and_a_symlink_target_survives() {
    let t = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let dir = SessionDir::open(t.path()).unwrap();
    let target = outside.path().join("victim.kv");
    fs::write(&target, b"precious").unwrap();
    std::os::unix::fs::symlink(&target, t.path().join("link.kv")).unwrap();
    fs::create_dir_all(t.path().join("adir.kv/inner")).unwrap();
    std::os::unix::fs::symlink(&target, t.path().join("adir.kv/inner/ln")).unwrap();
    let fifo = std::ffi::CString::new(t.path().join("pipe.kv").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    for name in ["link", "adir", "pipe"] {
        dir.remove(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(fs::symlink_metadata(t.path().join(format!("{name}.kv"))).is_err());
        assert!(matches!(dir.remove(name), Err(SessionError::NotFound(_))));
    }
    assert_eq!(fs::read(&target).unwrap(), b"precious");
    assert!(matches!(dir.remove("../x"), Err(SessionError::BadName(_))));
}
