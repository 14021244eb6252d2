//! The flags a llama.cpp user types, and an Ollama user's verbs (issue 22): each is accepted
//! with its meaning, or refused by its own name with the reason. Every test here failed before
//! the command line read llama.cpp's spellings whole.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

use strata_tests::{GEMMA, QWEN, model_path, strata_bin};

fn strata(args: &[&str]) -> Output {
    Command::new(strata_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run strata")
}

/// `strata` with `input` on standard input.
fn strata_with_input(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(strata_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn strata");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed ({}): {}",
        out.status,
        text(&out.stderr)
    );
    assert!(!text(&out.stderr).contains("panicked"));
    text(&out.stdout)
}

/// A usage error: exit code 2, one `error:` line naming `needle`, nothing on stdout (no help).
fn refused(out: &Output, needle: &str) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(out.stdout.is_empty(), "stdout: {}", text(&out.stdout));
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in {err}"));
    assert!(line.contains(needle), "{line:?} does not name {needle:?}");
    line.to_owned()
}

/// Greedy completion of gemma with `extra` flags.
fn gemma(prompt: &str, n: &str, extra: &[&str]) -> Output {
    let path = model_path(GEMMA);
    let mut args = vec![
        "run",
        "-m",
        path.to_str().expect("utf-8 path"),
        "-p",
        prompt,
        "-n",
        n,
        "--temp",
        "0",
    ];
    args.extend_from_slice(extra);
    strata(&args)
}

const FRANCE: &str = "The capital of France is";

#[test]
fn multi_letter_flags_are_read_whole_and_mean_what_they_do_in_llama_cpp() {
    let want = ok(&gemma(FRANCE, "8", &[]));
    assert!(
        want.starts_with("The capital of France is the capital"),
        "{want}"
    );
    // `-tb 2` was "invalid value 'b' for '--threads'"; `-sm none` and `-st` were --seed; `-ub`
    // and `-fa` became long flags that did not exist. Threads and batch sizes change where
    // the work runs, not the greedy text.
    for flags in [
        &["-t", "1", "-tb", "2"][..],
        &["-ub", "3", "-b", "5"],
        &["-fa", "on", "-sm", "none"],
        &["-fa", "--no-warmup", "--jinja", "--no-mmap", "-e"],
        &[
            "--threads-batch",
            "1",
            "--split-mode",
            "layer",
            "--flash-attn",
            "off",
        ],
        &["--mlock"],
    ] {
        assert_eq!(ok(&gemma(FRANCE, "8", flags)), want, "{flags:?}");
    }
}

#[test]
fn a_repeated_n_takes_the_last() {
    // Was "the argument '--n-predict' cannot be used multiple times".
    assert_eq!(
        ok(&gemma(FRANCE, "2", &["-n", "5"])),
        ok(&gemma(FRANCE, "5", &[]))
    );
}

#[test]
fn prompts_have_their_escapes_processed_unless_told_not_to() {
    // Was a literal backslash and n.
    let out = ok(&gemma(r"Q: 2+2?\nA:", "1", &[]));
    assert!(out.starts_with("Q: 2+2?\nA:"), "{out:?}");
    let out = ok(&gemma(r"Q: 2+2?\nA:", "1", &["--no-escape"]));
    assert!(out.starts_with(r"Q: 2+2?\nA:"), "{out:?}");
    let out = ok(&gemma(r"a\x41\t", "1", &["-e"]));
    assert!(out.starts_with("aA\t"), "{out:?}");
}

#[test]
fn a_reverse_prompt_stops_generation() {
    // The greedy text runs "… is the capital of the country of France. It is …".
    let out = ok(&gemma(
        FRANCE,
        "32",
        &["-r", "country", "--no-display-prompt"],
    ));
    assert_eq!(out.trim(), "the capital of the country", "{out:?}");
    let out = ok(&gemma(
        FRANCE,
        "32",
        &[
            "--reverse-prompt",
            "zzz",
            "-r",
            "of the",
            "--no-display-prompt",
        ],
    ));
    assert!(out.trim_end().ends_with("capital of the"), "{out:?}");
}

#[test]
fn colour_is_for_terminals_unless_forced() {
    let plain = ok(&gemma(FRANCE, "2", &[]));
    // A pipe is not a terminal: auto means no colour.
    assert_eq!(ok(&gemma(FRANCE, "2", &["--color", "auto"])), plain);
    assert_eq!(ok(&gemma(FRANCE, "2", &["--color", "off"])), plain);
    let coloured = ok(&gemma(FRANCE, "2", &["-co"]));
    assert!(
        coloured.starts_with("\x1b[33mThe capital of France is\x1b[0m"),
        "{coloured:?}"
    );
    let coloured = ok(&gemma(FRANCE, "2", &["--color", "on"]));
    assert!(coloured.contains("\x1b[33m"), "{coloured:?}");
}

#[test]
fn log_and_timing_flags_quiet_stderr_and_v_says_more() {
    let out = gemma(FRANCE, "2", &["--log-disable"]);
    ok(&out);
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    let out = gemma(FRANCE, "2", &["--no-perf"]);
    ok(&out);
    assert!(
        !text(&out.stderr).contains("eval time"),
        "{}",
        text(&out.stderr)
    );
    let out = gemma(FRANCE, "2", &["-v"]);
    ok(&out);
    let err = text(&out.stderr);
    assert!(err.contains("weights = ") && err.contains("INFO"), "{err}");
    // Logs to a pipe carry no colour codes.
    assert!(!err.contains('\x1b'), "{err:?}");
}

#[test]
fn interactive_mode_takes_turns_with_raw_text() {
    let path = model_path(GEMMA);
    let p = path.to_str().expect("utf-8 path");
    let args = [
        "run", "-m", p, "-i", "-p", "Hello", "-n", "3", "--temp", "0",
    ];
    let out = strata_with_input(&args, "and more\n");
    let stdout = ok(&out);
    assert!(stdout.starts_with("Hello"), "{stdout:?}");
    // The prompt, then the typed line after 3 generated tokens, were both read.
    let err = text(&out.stderr);
    let prompt_tokens: usize = err
        .lines()
        .find(|l| l.contains("prompt eval time"))
        .and_then(|l| l.split('/').nth(1))
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no prompt eval line: {err}"));
    assert!(prompt_tokens >= 5, "{err}");
    // Two tokens decoded after each reading (the first comes from the reading itself).
    let eval_runs: usize = err
        .lines()
        .find(|l| l.contains("       eval time"))
        .and_then(|l| l.split('/').nth(1))
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no eval line: {err}"));
    assert_eq!(eval_runs, 4, "{err}");
}

#[test]
fn single_turn_chat_answers_the_prompt_and_exits() {
    let path = model_path(QWEN);
    let out = strata(&[
        "run",
        "-m",
        path.to_str().expect("utf-8 path"),
        "-st",
        "-p",
        "What is 2+2? Answer with one number.",
        "-n",
        "8",
        "--temp",
        "0",
        "-sys",
        "You are a calculator.",
    ]);
    let stdout = ok(&out);
    assert!(stdout.contains('4'), "{stdout:?}");
}

#[test]
fn a_base_model_is_not_chatted_with_unless_a_template_is_named() {
    let path = model_path(GEMMA);
    let p = path.to_str().expect("utf-8 path");
    // Was a built-in Gemma template producing nonsense.
    let out = strata(&["run", "-m", p, "-cnv"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("has no chat template"), "{err}");
    assert!(!err.contains("load time"), "loaded before refusing: {err}");
    let out = strata(&["chat", "--local", p]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("has no chat template"), "{err}");
    let out = strata(&[
        "run",
        "-m",
        p,
        "-st",
        "--chat-template",
        "gemma",
        "-p",
        "Hi",
        "-n",
        "2",
    ]);
    ok(&out);
}

#[test]
fn no_prompt_and_no_terminal_is_an_error_before_loading() {
    model_path(GEMMA);
    let t0 = std::time::Instant::now();
    let out = strata(&["run"]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("no prompt"), "{err}");
    assert!(!err.contains("load time"), "{err}");
    assert!(t0.elapsed().as_secs() < 30);
}

#[test]
fn gpu_flags_are_taken_and_download_flags_refused_by_their_own_name() {
    for (args, needle, why) in [
        (&["run", "-mg", "0"][..], "-mg", "--device cuda:N"),
        (&["run", "-ts", "1,1"], "-ts", "one GPU"),
        // `-hf` used to print the help and exit 0.
        (&["run", "-hf", "user/repo"], "-hf", "resolve/main"),
        (&["run", "--hf-repo", "user/repo"], "--hf-repo", "URL"),
        (&["run", "-xyz"], "-xyz", "read whole"),
    ] {
        let line = refused(&strata(args), needle);
        assert!(line.contains(why), "{args:?}: {line}");
    }
    if strata_kernels::Device::cuda_driver_present() {
        return;
    }
    // Without a driver, GPU words are taken, and say what to do: one line, exit 1.
    let path = model_path(GEMMA);
    let m = path.to_str().expect("utf-8 path");
    for args in [
        &["run", "-m", m, "-p", "hi", "-n", "1", "-ngl", "99"][..],
        &["run", "-m", m, "-p", "hi", "-n", "1", "-nkvo"],
        &["bench", "-m", m, "-p", "8", "-n", "0", "-ngl", "99"],
    ] {
        let out = strata(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("libcuda.so.1") && err.contains("--device sim"),
            "{args:?}: {err}"
        );
    }
    let out = strata(&["run", "-m", m, "-p", "hi", "-n", "1", "--device", "cuda"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{err}"
    );
    assert!(err.contains("libcuda.so.1"), "{err}");
    let out = strata(&["run", "-m", m, "-p", "hi", "-n", "1", "-dev", "none"]);
    assert!(text(&out.stderr).contains("expected cpu, cuda, cuda:N or sim"));
}

#[test]
fn bench_takes_llama_bench_flags() {
    let path = model_path(GEMMA);
    let out = strata(&[
        "bench",
        "-m",
        path.to_str().expect("utf-8 path"),
        "-p",
        "8",
        "-n",
        "0",
        "-pg",
        "8,2",
        "-b",
        "64",
        "-ub",
        "32",
        "-fa",
        "1",
        "-r",
        "1",
        "-t",
        "1",
        "-o",
        "csv",
        "--progress",
    ]);
    let stdout = ok(&out);
    let mut lines = stdout.lines();
    let header = lines.next().expect("a header");
    assert!(header.starts_with("model_type,model_size"), "{header}");
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    // n_batch, n_ubatch, then n_prompt and n_gen of the -pg test.
    assert!(rows[0].contains(",64,32,1,"), "{}", rows[0]);
    assert!(rows[1].contains(",8,2,0,"), "{}", rows[1]);
    let err = text(&out.stderr);
    assert!(err.contains("test 2/2: pp8+tg2: repetition 1/1"), "{err}");
    let md = ok(&strata(&[
        "bench",
        "-m",
        path.to_str().expect("utf-8 path"),
        "-p",
        "0",
        "-n",
        "0",
        "-pg",
        "4,2",
        "-r",
        "1",
    ]));
    assert!(md.contains("pp4+tg2"), "{md}");
    let out = strata(&["bench", "-pg", "8"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("-pg \"8\""),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn ollama_verbs_and_positional_models() {
    model_path(GEMMA);
    // `strata run MODEL PROMPT` as Ollama takes it; was "unexpected argument".
    let want = ok(&gemma(FRANCE, "4", &[]));
    assert_eq!(
        ok(&strata(&["run", GEMMA, FRANCE, "-n", "4", "--temp", "0"])),
        want
    );
    assert_eq!(
        ok(&strata(&[
            "run", GEMMA, "-p", FRANCE, "-n", "4", "--temp", "0"
        ])),
        want
    );
    let out = strata(&["run", GEMMA, "-m", QWEN, "-p", "x"]);
    assert!(text(&out.stderr).contains("two models named"));
    let v = ok(&strata(&["version"]));
    assert!(v.starts_with("strata "), "{v}");
    // `serve` runs stratad, built beside strata.
    let v = ok(&strata(&["serve", "--", "--version"]));
    assert!(v.starts_with("stratad "), "{v}");
    // `stop` is unload: without a daemon, it says how to start one.
    let out = strata(&["stop", GEMMA, "--socket", "/nonexistent/strata-test.sock"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("stratad"),
        "{}",
        text(&out.stderr)
    );
}
