//! End-to-end: stratad with speculative decoding (`--spec-type ngram-simple`) answers a greedy
//! request with the text a plain daemon gives, reports its drafts in `/metrics`, and a request
//! that ends in the middle of a verified batch (`max_tokens`) leaves a cache that the next
//! request, sharing its prefix, continues from as a plain daemon's would.

mod http;
mod support;

use serde_json::Value;
use support::{Daemon, MODEL, completion, lock};

/// A prompt whose continuation copies it: lookup drafts are right most of the time.
const PROMPT: &str = "apple, banana, cherry, date, elderberry, fig, grape; apple, banana, cherry, date, elderberry, fig, grape; apple, banana,";

fn answer(d: &Daemon, prompt: &str, max_tokens: u32) -> String {
    let r = http::post(
        &d.sock,
        "/v1/completions",
        &completion(prompt, max_tokens, false),
    )
    .expect("request");
    assert_eq!(r.status, 200, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).expect("json");
    v["choices"][0]["text"].as_str().expect("text").to_owned()
}

#[test]
fn a_speculating_daemon_answers_as_a_plain_one_and_counts_its_drafts() {
    let _serial = lock();
    let texts = |d: &Daemon| {
        let first = answer(d, PROMPT, 13);
        // Continues the first answer: the finished sequence's cache is reused as its prefix.
        let second = answer(d, &format!("{PROMPT}{first}"), 20);
        (first, second)
    };
    let mut plain = Daemon::start(&[]);
    let want = texts(&plain);
    plain.terminate();
    let mut spec = Daemon::start(&["--spec-type", "ngram-simple"]);
    let got = texts(&spec);
    assert_eq!(got, want);
    let m = |name: &str| spec.metric(&format!("{name}{{model=\"{MODEL}\"}}"));
    assert!(m("strata_spec_drafted_total") > 0.0);
    assert!(m("strata_spec_accepted_total") > 0.0);
    assert!(m("strata_spec_tokens_per_pass") > 1.0);
    spec.terminate();
}
