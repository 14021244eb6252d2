//! The store without a network: names, resolution, local-file pulls, list, verify, remove.

#[path = "store_common.rs"]
mod common;

use std::fs;

use common::{Recorder, files_under, sha256_hex, tiny_gguf};
use strata_storage::store::{NoProgress, PullOptions, Store, StoreError};

fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::at(dir.path().join("home"));
    (dir, store)
}

#[test]
fn names_that_could_escape_the_store_are_rejected() {
    let (_dir, store) = temp_store();
    for bad in [
        "../x", "a/b", ".hidden", "", "..", "a..b", "a b", "a\\b", "é",
    ] {
        assert!(
            matches!(store.model_path(bad), Err(StoreError::BadName { .. })),
            "{bad:?} accepted"
        );
        assert!(matches!(store.remove(bad), Err(StoreError::BadName { .. })));
        let opts = PullOptions {
            name: Some(bad.to_owned()),
            ..Default::default()
        };
        assert!(
            store
                .pull_with("gemma3-270m", &opts, &mut NoProgress)
                .is_err()
        );
    }
    for good in ["gemma3-270m", "qwen2.5-coder-1.5b", "A_b-c.d", "x"] {
        let p = store.model_path(good).unwrap();
        assert_eq!(p, store.root().join("models").join(format!("{good}.gguf")));
    }
    // Nothing was created by the rejected requests.
    assert!(
        files_under(store.root())
            .iter()
            .all(|f| f.starts_with("locks/"))
    );
}

#[test]
fn resolve_distinguishes_paths_names_and_missing_models() {
    let (dir, store) = temp_store();
    let file = dir.path().join("some.gguf");
    fs::write(&file, tiny_gguf(0, 64)).unwrap();
    let spec = file.to_str().unwrap();
    assert_eq!(store.resolve(spec).unwrap(), file);

    let missing = dir.path().join("nope.gguf");
    assert!(matches!(
        store.resolve(missing.to_str().unwrap()),
        Err(StoreError::NoSuchFile { .. })
    ));
    assert!(matches!(
        store.resolve("not-here"),
        Err(StoreError::NotPulled { name }) if name == "not-here"
    ));
    assert!(matches!(
        store.resolve(".hidden"),
        Err(StoreError::BadName { .. })
    ));

    store.pull(spec, &mut NoProgress).unwrap();
    let stored = store.model_path("some").unwrap();
    assert_eq!(store.resolve("some").unwrap(), stored);
    // A URL resolves by the name derived from its file name.
    assert_eq!(
        store
            .resolve("https://example.invalid/x/some.gguf")
            .unwrap(),
        stored
    );
    assert!(matches!(
        store.ensure("unknown-model", &mut NoProgress),
        Err(StoreError::UnknownModel { .. })
    ));
}

#[test]
fn local_pull_records_checksum_and_repull_is_up_to_date() {
    let (dir, store) = temp_store();
    let bytes = tiny_gguf(3, 3_000_000);
    let file = dir.path().join("tiny-model.gguf");
    fs::write(&file, &bytes).unwrap();
    let sha = sha256_hex(&bytes);

    let mut rec = Recorder::default();
    let opts = PullOptions {
        sha256: Some(sha.to_uppercase()),
        ..Default::default()
    };
    let path = store
        .pull_with(file.to_str().unwrap(), &opts, &mut rec)
        .unwrap();
    assert_eq!(path, store.model_path("tiny-model").unwrap());
    assert_eq!(fs::read(&path).unwrap(), bytes);
    assert_eq!(rec.started.len(), rec.finished);

    let manifest = store.manifest("tiny-model").unwrap().unwrap();
    assert_eq!(manifest.sha256, sha);
    assert_eq!(manifest.size, bytes.len() as u64);
    assert!(manifest.source.starts_with("file:"));
    assert!(manifest.pulled_at.ends_with('Z'));

    let list = store.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "tiny-model");
    assert_eq!(list[0].size, bytes.len() as u64);
    assert_eq!(list[0].sha256(), Some(sha.as_str()));

    // Pulling the name again verifies the copy instead of fetching anything.
    let mut rec = Recorder::default();
    store.pull("tiny-model", &mut rec).unwrap();
    assert!(
        rec.messages.iter().any(|m| m.contains("up to date")),
        "{rec:?}"
    );
    let v = store.verify("tiny-model", &mut NoProgress).unwrap();
    assert_eq!(
        (v.sha256.as_str(), v.checked_against),
        (sha.as_str(), Some("manifest"))
    );

    // No temp files survive a successful pull.
    assert!(files_under(&store.root().join("tmp")).is_empty());

    store.remove("tiny-model").unwrap();
    assert!(store.list().unwrap().is_empty());
    assert!(matches!(
        store.remove("tiny-model"),
        Err(StoreError::NotPulled { .. })
    ));
    // The original file is untouched.
    assert_eq!(fs::read(&file).unwrap(), bytes);
}

#[test]
fn checksum_mismatch_leaves_nothing_behind() {
    let (dir, store) = temp_store();
    let file = dir.path().join("m.gguf");
    fs::write(&file, b"not the bytes you expected").unwrap();
    let opts = PullOptions {
        sha256: Some("0".repeat(64)),
        ..Default::default()
    };
    let err = store
        .pull_with(file.to_str().unwrap(), &opts, &mut NoProgress)
        .unwrap_err();
    assert!(matches!(err, StoreError::ChecksumMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&"0".repeat(64)));
    assert!(store.list().unwrap().is_empty());
    let left: Vec<_> = files_under(store.root())
        .into_iter()
        .filter(|f| !f.starts_with("locks/"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    let bad = PullOptions {
        sha256: Some("xyz".into()),
        ..Default::default()
    };
    assert!(matches!(
        store.pull_with(file.to_str().unwrap(), &bad, &mut NoProgress),
        Err(StoreError::BadSha256 { .. })
    ));
}

#[test]
fn models_without_manifest_are_listed_and_verifiable() {
    let (_dir, store) = temp_store();
    let models = store.root().join("models");
    fs::create_dir_all(&models).unwrap();
    fs::write(models.join("handmade.gguf"), b"GGUF....").unwrap();
    fs::write(models.join(".hidden.gguf"), b"x").unwrap();
    fs::write(models.join("notes.txt"), b"x").unwrap();
    fs::write(models.join("broken.gguf"), b"y").unwrap();
    fs::write(models.join("broken.json"), b"{ not json").unwrap();

    let list = store.list().unwrap();
    let names: Vec<_> = list.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["broken", "handmade"]);
    assert!(
        list.iter()
            .all(|e| e.manifest.is_none() && e.sha256().is_none())
    );

    let v = store.verify("handmade", &mut NoProgress).unwrap();
    assert_eq!(v.sha256, sha256_hex(b"GGUF...."));
    assert_eq!(v.checked_against, None);
    assert!(matches!(
        store.verify("absent", &mut NoProgress),
        Err(StoreError::NotPulled { .. })
    ));
}

#[test]
fn edited_model_fails_verification() {
    let (dir, store) = temp_store();
    let file = dir.path().join("edit-me.gguf");
    fs::write(&file, tiny_gguf(5, 64)).unwrap();
    let path = store.pull(file.to_str().unwrap(), &mut NoProgress).unwrap();
    // Replace, not write in place: the store may share the inode with the source by hard link.
    fs::remove_file(&path).unwrap();
    fs::write(&path, b"tampered").unwrap();
    assert!(matches!(
        store.verify("edit-me", &mut NoProgress),
        Err(StoreError::ChecksumMismatch { .. })
    ));
}

#[test]
fn concurrent_pulls_of_one_model_do_not_collide() {
    let (dir, store) = temp_store();
    let file = dir.path().join("shared.gguf");
    let bytes = tiny_gguf(42, 5_000_000);
    fs::write(&file, &bytes).unwrap();
    let spec = file.to_str().unwrap().to_owned();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (store, spec) = (store.clone(), spec.clone());
            std::thread::spawn(move || store.pull(&spec, &mut NoProgress))
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    assert_eq!(store.list().unwrap().len(), 1);
    assert_eq!(
        fs::read(store.model_path("shared").unwrap()).unwrap(),
        bytes
    );
    let left = files_under(&store.root().join("tmp"));
    assert!(left.is_empty(), "{left:?}");
}
