//! `strata run --prompt-cache` end to end on a real model: the second run resumes from the
//! saved cache (reading one prompt token instead of all of them) and prints exactly the text
//! of the first; a damaged cache file is refused with a clear error and left in place.

use std::process::{Command, Output};

use strata_tests::{GEMMA, model_path, strata_bin};

fn run(cache: &std::path::Path, prompt: &str) -> Output {
    let path = model_path(GEMMA);
    Command::new(strata_bin())
        .args(["run", "-m", path.to_str().expect("utf-8"), "-p", prompt])
        .args(["-n", "12", "--temp", "0", "-c", "1024", "--prompt-cache"])
        .arg(cache)
        .output()
        .expect("run strata")
}

fn prompt() -> String {
    let words = [
        "river", "stone", "light", "early", "market", "north", "quiet", "paper",
    ];
    (0..300)
        .map(|i| words[(i * 7 + i / 3) % words.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn a_resumed_prompt_cache_gives_the_same_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("p.kv");
    let p = prompt();
    let first = run(&cache, &p);
    let err1 = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{err1}");
    assert!(err1.contains("strata: saved"), "{err1}");
    let second = run(&cache, &p);
    let err2 = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{err2}");
    assert!(err2.contains("reused"), "{err2}");
    assert!(
        err2.contains("prompt eval time =") && err2.contains("/     1 tokens"),
        "{err2}"
    );
    assert_eq!(first.stdout, second.stdout);
    // A longer prompt sharing the prefix reuses it and reads only the rest.
    let third = run(&cache, &format!("{p} and then"));
    let err3 = String::from_utf8_lossy(&third.stderr);
    assert!(third.status.success(), "{err3}");
    assert!(err3.contains("reused"), "{err3}");
}

#[test]
fn a_damaged_prompt_cache_is_refused_and_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("p.kv");
    assert!(run(&cache, "one two three four").status.success());
    let mut bytes = std::fs::read(&cache).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&cache, &bytes).expect("write");
    let out = run(&cache, "one two three four");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("checksum") && err.contains("p.kv"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(std::fs::read(&cache).expect("still there"), bytes);
}
