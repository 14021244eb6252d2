//! The `strata` binary end to end: real model, real process, real exit codes. Bad input gets a
//! one-line error naming the problem and a non-zero exit, never a panic.

use std::io::Write;
use std::process::{Command, Output};

use strata_storage::gguf::{GgufBuilder, Value};
use strata_tests::{GEMMA, QWEN, ids, model_path, reference, strata_bin};

fn strata(args: &[&str]) -> Output {
    Command::new(strata_bin())
        .args(args)
        .output()
        .expect("run strata")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts a clean failure: non-zero exit, an `error:` line that mentions `needle`, no panic.
fn assert_clean_error(out: &Output, needle: &str) {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in: {err}"));
    assert!(
        line.to_lowercase().contains(&needle.to_lowercase()),
        "error line {line:?} does not mention {needle:?}"
    );
}

#[test]
fn run_greedy_prints_prompt_answer_and_timings() {
    let path = model_path(GEMMA);
    let out = strata(&[
        "run",
        "-m",
        path.to_str().expect("utf-8 path"),
        "-p",
        "The capital of France is",
        "-n",
        "8",
        "--temp",
        "0",
    ]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "stderr: {stderr}");
    // llama.cpp's greedy continuation on this model.
    assert!(
        stdout.starts_with("The capital of France is the capital of the country of France."),
        "stdout: {stdout:?}"
    );
    for needle in [
        "load time =",
        "prompt eval time =",
        "eval time =",
        "tokens per second",
    ] {
        assert!(stderr.contains(needle), "no {needle:?} in: {stderr}");
    }
}

#[test]
fn run_by_store_name_and_no_display_prompt() {
    model_path(GEMMA);
    let out = strata(&[
        "run",
        "-m",
        GEMMA,
        "-p",
        "def fibonacci(n):",
        "-n",
        "4",
        "--temp",
        "0",
        "--no-display-prompt",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("\n    if n"), "stdout: {stdout:?}");
}

#[test]
fn conversation_mode_answers_each_line() {
    let path = model_path(QWEN);
    let mut child = Command::new(strata_bin())
        .args([
            "run",
            "-m",
            path.to_str().expect("path"),
            "-cnv",
            "--temp",
            "0",
            "-n",
            "16",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"What is 2+2? Answer with one number.\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(stdout.contains('4'), "stdout: {stdout:?}");
}

#[test]
fn tokenize_ids_match_llama_cpp() {
    let refs = reference();
    for name in [GEMMA, QWEN] {
        let path = model_path(name);
        let case = &refs["models"][name]["tokenize"][0];
        let out = strata(&[
            "tokenize",
            "-m",
            path.to_str().expect("path"),
            "-p",
            case["text"].as_str().expect("text"),
            "--ids",
        ]);
        assert!(out.status.success(), "stderr: {}", text(&out.stderr));
        let want: Vec<String> = ids(&case["ids"]).iter().map(|i| i.to_string()).collect();
        assert_eq!(text(&out.stdout).trim(), format!("[{}]", want.join(", ")));
    }
}

#[test]
fn perplexity_prints_final_estimate() {
    let path = model_path(GEMMA);
    let out = strata(&[
        "perplexity",
        "-m",
        path.to_str().expect("path"),
        "-f",
        strata_tests::PERPLEXITY_FILE,
        "-c",
        "128",
        "--chunks",
        "2",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("[1]") && stdout.contains("[2]"), "{stdout}");
    assert!(stdout.contains("Final estimate: PPL = "), "{stdout}");
}

#[test]
fn bad_flags_are_clean_errors() {
    assert_clean_error(&strata(&["run", "--bogus-flag"]), "--bogus-flag");
    assert_clean_error(&strata(&["run", "-n", "many"]), "many");
    assert_clean_error(&strata(&["frobnicate"]), "frobnicate");
    let path = model_path(GEMMA);
    let p = path.to_str().expect("path");
    assert_clean_error(&strata(&["run", "-m", p, "-t", "0", "-p", "x"]), "threads");
    assert_clean_error(
        &strata(&["run", "-m", p, "--top-p", "2", "-p", "x"]),
        "top-p",
    );
    assert_clean_error(
        &strata(&["run", "-m", p, "-c", "99999999", "-p", "x"]),
        "ctx-size",
    );
}

#[test]
fn missing_model_file_is_a_clean_error() {
    let out = strata(&["run", "-m", "/nonexistent/dir/model.gguf", "-p", "hi"]);
    assert_clean_error(&out, "model.gguf");
}

#[test]
fn malformed_model_files_are_clean_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a gguf file at all, just some text").expect("write");
    assert_clean_error(
        &strata(&["run", "-m", garbage.to_str().expect("path"), "-p", "x"]),
        "magic",
    );

    // A valid GGUF of an architecture strata does not know.
    let unknown = dir.path().join("unknown.gguf");
    let mut b = GgufBuilder::new();
    b.kv("general.architecture", Value::String("mamba9".into()));
    std::fs::write(&unknown, b.to_bytes()).expect("write");
    assert_clean_error(
        &strata(&["run", "-m", unknown.to_str().expect("path"), "-p", "x"]),
        "mamba9",
    );

    // The real model cut short: caught at load.
    let real = std::fs::read(model_path(GEMMA)).expect("read model");
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &real[..real.len() / 3]).expect("write");
    let out = strata(&["run", "-m", cut.to_str().expect("path"), "-p", "x"]);
    assert!(!out.status.success());
    assert!(
        !text(&out.stderr).contains("panicked"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).starts_with("error:"),
        "{}",
        text(&out.stderr)
    );
}

/// The RAM the weights hold, from `--verbose`'s "weights = …, X MiB in RAM" line.
fn weights_ram_mib(stderr: &str) -> f64 {
    stderr
        .lines()
        .find(|l| l.contains("weights = "))
        .and_then(|l| l.split(", ").find(|p| p.ends_with(" MiB in RAM")))
        .and_then(|p| p.trim_end_matches(" MiB in RAM").parse().ok())
        .unwrap_or_else(|| panic!("no weights line in: {stderr}"))
}

/// `strata run` of 8 greedy tokens after "hello world", with `extra` flags.
fn greedy8(model: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "run",
        "-m",
        model,
        "-p",
        "hello world",
        "-n",
        "8",
        "--temp",
        "0",
    ];
    args.extend_from_slice(extra);
    strata(&args)
}

#[test]
fn tensor_overrides_place_tensors_and_bad_ones_are_clean_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("moe.gguf");
    let m = model.to_str().expect("path");
    let out = strata(&["gen", "--arch", "qwen3moe", "--preset", "tiny", "-o", m]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let run = |extra: &[&str]| greedy8(m, &[&["--verbose", "--no-display-prompt"], extra].concat());
    // Under a budget the experts are cached; pinning two layers' experts holds them in RAM.
    let base = run(&["--ram-budget", "60%"]);
    assert!(base.status.success(), "{}", text(&base.stderr));
    let pinned = run(&["--ram-budget", "60%", "-ot", r"blk\.[01]\.ffn_.*_exps=RAM"]);
    assert!(pinned.status.success(), "{}", text(&pinned.stderr));
    assert_eq!(text(&pinned.stdout), text(&base.stdout));
    let (b, p) = (
        weights_ram_mib(&text(&base.stderr)),
        weights_ram_mib(&text(&pinned.stderr)),
    );
    assert!(p > b + 1.0, "pinned experts hold {p} MiB, unpinned {b} MiB");
    // llama.cpp's MoE flags: on the CPU, where every tensor is without a GPU.
    for flags in [
        &["--cpu-moe"][..],
        &["--n-cpu-moe", "2"],
        &["-ot", "exps=CPU"],
    ] {
        let out = run(flags);
        assert!(out.status.success(), "{flags:?}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), text(&base.stdout), "{flags:?}");
    }
    assert_clean_error(&run(&["-ot", "exps=CUDA0"]), "no GPU device was asked for");
    assert_clean_error(&run(&["-ot", "exps=VRAM"]), "unknown buffer type");
    assert_clean_error(&run(&["-ot", "(exps=CPU"]), "pattern");
    assert_clean_error(&run(&["-ot", "exps"]), "PATTERN=BUFFER_TYPE");
    assert_clean_error(&run(&["--mmap", "-ot", "exps=RAM"]), "--mmap");
    assert_clean_error(&run(&["--cpu-moe", "--n-cpu-moe", "1"]), "cpu-moe");
}

#[test]
fn optimize_lays_experts_out_for_one_read_and_runs_the_same() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |n: &str| dir.path().join(n).to_str().expect("path").to_owned();
    let (m, o) = (path("moe.gguf"), path("moe-opt.gguf"));
    // Q4_K gate and up with Q6_K down: records of mixed types.
    let out = strata(&[
        "gen",
        "--arch",
        "olmoe",
        "--weight-type",
        "q4_k_m",
        "--expert-ff",
        "512",
        "-o",
        &m,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = strata(&["optimize", &m, "-o", &o]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("each expert one read"),
        "{}",
        text(&out.stderr)
    );
    let show = strata(&["show", &o]);
    assert!(text(&show.stdout).contains("laid out expert by expert"));
    let run = |model: &str, extra: &[&str]| {
        let out = greedy8(model, extra);
        assert!(out.status.success(), "{extra:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let want = run(&m, &[]);
    for extra in [
        &[][..],
        &["--ram-budget", "60%"],
        &["--ram-budget", "60%", "-ot", r"blk\.1\.ffn_gate_exps=RAM"],
        &["--mmap"],
    ] {
        assert_eq!(run(&o, extra), want, "{extra:?}");
    }
    // Bad requests: already optimized, no experts, the model itself, no such file.
    assert_clean_error(
        &strata(&["optimize", &o, "-o", &path("x.gguf")]),
        "already optimized",
    );
    let dense = path("dense.gguf");
    assert!(strata(&["gen", "-o", &dense]).status.success());
    assert_clean_error(
        &strata(&["optimize", &dense, "-o", &path("x.gguf")]),
        "no layer has stacked expert tensors",
    );
    assert_clean_error(&strata(&["optimize", &m, "-o", &m]), "must be a new file");
    assert_clean_error(
        &strata(&["optimize", &path("absent.gguf"), "-o", &path("x.gguf")]),
        "absent.gguf",
    );
    assert_clean_error(
        &strata(&["gen", "--weight-type", "q9", "-o", &path("x.gguf")]),
        "not a ggml type",
    );
    assert_clean_error(
        &strata(&["gen", "--expert-ff", "256", "-o", &path("x.gguf")]),
        "has no experts",
    );
    assert!(!dir.path().join("x.gguf").exists());
}

/// Issue 19: `strata calibrate` stores the decode kernels it measured fastest in the hardware
/// profile, and a load on the same CPU takes them (printed under `STRATA_LOG=info`) instead of
/// the SIMD level's defaults; a profile made on another CPU is not used, and a malformed choice
/// is a clean error naming the field.
#[test]
fn calibrated_decode_kernels_are_taken_on_the_same_cpu_only() {
    use strata_engine::plan::HwProfile;
    use strata_engine::plan::calibrate::cpu_id;
    use strata_engine::plan::profile::{DecodeProfile, shipped};
    let dir = tempfile::tempdir().expect("tempdir");
    let write_at = |name: &str, cpu: &str, kernels: &str, revision: u32| {
        let p = HwProfile {
            decode: Some(DecodeProfile {
                cpu: cpu.into(),
                kernels: kernels.into(),
                revision,
            }),
            ..shipped("cpu-2core").expect("shipped profile")
        };
        let path = dir.path().join(name);
        std::fs::write(&path, p.to_toml()).expect("write profile");
        path
    };
    let write = |name: &str, cpu: &str, kernels: &str| {
        write_at(name, cpu, kernels, strata_simd::tune::REVISION)
    };
    let run = |hw: &std::path::Path| {
        Command::new(strata_bin())
            .env("STRATA_LOG", "info")
            // A store of its own: a choice measured here must not land in the user's.
            .env("STRATA_HOME", dir.path())
            .env_remove("STRATA_DECODE")
            .args(["run", "-m", model_path(GEMMA).to_str().expect("utf-8 path")])
            .args([
                "-p",
                "The capital of France is",
                "-n",
                "2",
                "--temp",
                "0",
                "--hw",
            ])
            .arg(hw)
            .output()
            .expect("run strata")
    };
    let kernels = "Q4_K=rows Q6_K=rows Q8_0=rows Q5_0=rows/0";
    let out = run(&write("here.toml", &cpu_id(), kernels));
    let err = text(&out.stderr);
    assert!(out.status.success(), "stderr: {err}");
    assert!(
        err.contains("decode kernels from `strata calibrate`"),
        "{err}"
    );
    let tuning = err
        .lines()
        .find(|l| l.contains("tuning="))
        .unwrap_or_else(|| panic!("no tuning line: {err}"));
    for k in kernels.split_whitespace() {
        assert!(
            tuning.contains(k.split('/').next().unwrap_or(k)),
            "{k}: {tuning}"
        );
    }

    // A profile's choice the load logs as not used (`why`), and does not take.
    let not_used = |hw: &std::path::Path, why: &str| {
        let out = run(hw);
        let err = text(&out.stderr);
        assert!(out.status.success(), "stderr: {err}");
        assert!(err.contains(why) && err.contains("not used"), "{err}");
        assert!(
            !err.contains("decode kernels from `strata calibrate`"),
            "{err}"
        );
    };
    not_used(
        &write(
            "there.toml",
            "Another CPU (family 1 model 2, avx2)",
            kernels,
        ),
        "not on this CPU",
    );
    // Measured on this CPU by kernels that read memory otherwise (an older strata): measured
    // again rather than taken.
    not_used(
        &write_at("old.toml", &cpu_id(), kernels, 1),
        "revision 1 of the decode kernels",
    );

    let out = run(&write("bad.toml", &cpu_id(), "Q4_K=fastest"));
    assert_clean_error(&out, "decode.kernels");
}

/// The first load on a machine measures its decode kernels (rows or interleaved, both widths,
/// the prefetch distance) and keeps the choice in the store's `decode/`, in a file for this
/// CPU and SIMD level; the next load takes it without measuring and prints the same greedy
/// text, and a run at another level (`STRATA_SIMD=scalar`) keeps a file of its own. A malformed
/// file is named in a warning, measured over and replaced, and the run goes on.
#[test]
fn the_first_load_keeps_its_measured_decode_kernels_for_later_loads() {
    let home = tempfile::tempdir().expect("tempdir");
    let path = model_path(GEMMA);
    let run_at = |simd: &str| {
        let mut cmd = Command::new(strata_bin());
        if simd.is_empty() {
            cmd.env_remove("STRATA_SIMD");
        } else {
            cmd.env("STRATA_SIMD", simd);
        }
        let out = cmd
            .args([
                "run",
                "-m",
                path.to_str().expect("utf-8 path"),
                "-p",
                "The capital of France is",
                "-n",
                "4",
                "--temp",
                "0",
            ])
            .env("STRATA_HOME", home.path())
            .env("STRATA_LOG", "info")
            .env_remove("STRATA_DECODE")
            .output()
            .expect("run strata");
        assert!(out.status.success(), "stderr: {}", text(&out.stderr));
        (text(&out.stdout), text(&out.stderr))
    };
    let level = std::env::var("STRATA_SIMD").unwrap_or_default();
    let run = || run_at(&level);
    let dir = home.path().join("decode");
    let (first, log) = run();
    let files: Vec<_> = std::fs::read_dir(&dir)
        .expect("decode/ made")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let file = files[0].clone();
    assert!(log.contains("decode kernels kept in"), "{log}");
    let kept = std::fs::read_to_string(&file).expect("decode.toml written");
    assert!(kept.contains("kernels") && kept.contains("Q4_K="), "{kept}");
    let (second, log) = run();
    assert!(
        log.contains("decode kernels from") && log.contains("earlier load"),
        "{log}"
    );
    assert!(!log.contains("decode kernels measured in"), "{log}");
    assert_eq!(first, second);
    assert_eq!(std::fs::read_to_string(&file).expect("read"), kept);
    if level != "scalar" {
        let (_, log) = run_at("scalar");
        assert!(log.contains("decode kernels kept in"), "{log}");
        assert_eq!(std::fs::read_dir(&dir).expect("list").count(), 2);
        assert_eq!(std::fs::read_to_string(&file).expect("read"), kept);
    }
    std::fs::write(&file, "kernels = [\n").expect("write");
    let (third, log) = run();
    assert!(
        log.contains(&*file.to_string_lossy()) && log.contains("measured again"),
        "{log}"
    );
    assert!(third.starts_with("The capital of France is"), "{third}");
    assert!(
        std::fs::read_to_string(&file)
            .expect("read")
            .contains("Q4_K="),
        "replaced"
    );

    // A choice kept by a load of another model names only that model's types (here Q4_K, as
    // if qwen2.5 had come first without gemma's Q8_0 and Q5_0): this load measures the others
    // and adds them, and the Q4_K choice stands.
    let kept = std::fs::read_to_string(&file).expect("read");
    let line = kept
        .lines()
        .find(|l| l.starts_with("kernels"))
        .unwrap_or_else(|| panic!("no kernels line: {kept}"));
    let q4k = line
        .split(['"', ' '])
        .find(|item| item.starts_with("Q4_K="))
        .unwrap_or_else(|| panic!("no Q4_K: {line}"));
    let partial = kept.replace(line, &format!("kernels = \"{q4k}\""));
    std::fs::write(&file, &partial).expect("write");
    let (fourth, log) = run();
    assert!(
        log.contains("names no decode kernels for") && log.contains("Q8_0"),
        "{log}"
    );
    assert!(
        !log.contains("measured: Q4_K"),
        "Q4_K measured again: {log}"
    );
    let merged = std::fs::read_to_string(&file).expect("read");
    assert!(
        merged.contains(&format!("\"{q4k} "))
            && merged.contains("Q8_0=")
            && merged.contains("Q5_0="),
        "{merged}"
    );
    assert!(fourth.starts_with("The capital of France is"), "{fourth}");
}
