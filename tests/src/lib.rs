//! Shared helpers for strata's end-to-end tests: the real models (pulled into the store on
//! first use, exactly as a user's `strata pull` would), llama.cpp's reference outputs, and the
//! path of the built `strata` binary.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use strata_storage::store::{NoProgress, Store};

/// The two real models the reference outputs were measured on.
pub const GEMMA: &str = "gemma3-270m";
pub const QWEN: &str = "qwen2.5-coder-1.5b";

static PULL_LOCK: Mutex<()> = Mutex::new(());
static SERIAL: Mutex<()> = Mutex::new(());

/// Held while a test runs a real model on its own 2-thread pool: the test harness runs a
/// binary's tests two at a time on CI's 2 cores, and two such pools at once spin against each
/// other for the same cores (each waits for its other thread), slower than one after the other.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The model file for a built-in name, pulled into the default store if it is not there yet.
/// Fails the test when the model can't be had: CI must never silently skip the real-model
/// checks.
pub fn model_path(name: &str) -> PathBuf {
    let _guard = PULL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let store = Store::open_default().expect("open the model store");
    match store.ensure(name, &mut NoProgress) {
        Ok(p) => p,
        Err(e) => panic!("model {name} is not in the store and could not be pulled: {e}"),
    }
}

/// llama.cpp's outputs on the real models (tests/reference/llama-cpp-outputs.json).
pub fn reference() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("reference/llama-cpp-outputs.json");
    let text = std::fs::read_to_string(&path).expect("read the reference outputs");
    serde_json::from_str(&text).expect("parse the reference outputs")
}

/// Reads a JSON array of integers as token ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// The `strata` binary cargo built for this test run.
pub fn strata_bin() -> PathBuf {
    // tests run from target/<profile>/deps/<test>-<hash>; the binaries sit one level up.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir");
    let bin = dir.join("strata");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build --release -p strata-cli` (cargo test --workspace does)",
        bin.display()
    );
    bin
}

/// The text llama-perplexity was measured on.
pub const PERPLEXITY_FILE: &str = "/usr/share/common-licenses/GPL-3";
