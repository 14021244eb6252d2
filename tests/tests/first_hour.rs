//! What a new user tripped on in their first hour (issue 22), one test per bug, each failing
//! before its fix: files written beside a bare file name, budgets smaller than they look,
//! generator errors that did not say what to change, the README's word on tensor overrides,
//! and progress that a pipe or a log never saw.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use strata_tests::{GEMMA, model_path, strata_bin};

fn strata_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(strata_bin())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run strata")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(out: &Output) -> (String, String) {
    let (o, e) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "failed ({}): {e}", out.status);
    assert!(!e.contains("panicked"), "{e}");
    (o, e)
}

fn error_line(out: &Output) -> String {
    let e = text(&out.stderr);
    assert!(!out.status.success(), "succeeded: {e}");
    assert!(!e.contains("panicked"), "{e}");
    e.lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in {e}"))
        .to_owned()
}

/// `strata optimize tiny.gguf -o out.gguf` (and with no `-o`) failed with "sync directory :
/// No such file or directory" after writing the file: the parent of a bare name is "".
#[test]
fn optimize_writes_beside_a_bare_file_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    ok(&strata_in(
        d,
        &["gen", "--arch", "qwen3moe", "-o", "tiny.gguf"],
    ));
    ok(&strata_in(d, &["optimize", "tiny.gguf", "-o", "out.gguf"]));
    assert!(d.join("out.gguf").is_file());
    ok(&strata_in(d, &["optimize", "tiny.gguf"]));
    assert!(d.join("tiny-optimized.gguf").is_file());
    // No temp file left beside them.
    let left: Vec<_> = std::fs::read_dir(d)
        .expect("read dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// `--kv-budget 1M` silently kept several MiB: the page of keys and of values each layer is
/// filling stays in RAM. The budget is raised to that floor and the user is told.
#[test]
fn a_kv_budget_below_the_floor_is_said() {
    let path = model_path(GEMMA);
    let dir = tempfile::tempdir().expect("temp dir");
    let kv_dir = dir.path().to_str().expect("utf-8");
    let out = strata_in(
        dir.path(),
        &[
            "run",
            "-m",
            path.to_str().expect("utf-8"),
            "-p",
            "hi",
            "-n",
            "2",
            "--kv-budget",
            "1M",
            "--kv-dir",
            kv_dir,
        ],
    );
    let (_, err) = ok(&out);
    assert!(
        err.contains("warning: --kv-budget 1M is below what the KV cache holds in RAM at least"),
        "{err}"
    );
    let kv_line = err
        .lines()
        .find(|l| l.contains("KV cache ="))
        .unwrap_or_else(|| panic!("no KV line: {err}"));
    assert!(!kv_line.contains("(budget 1.0 MiB)"), "{kv_line}");
}

/// `gen --expert-ff 64 --weight-type q4_k_m` said only "not a valid MoE shape"; `gen --arch
/// foo` listed the architectures without mixtral.
#[test]
fn gen_errors_say_what_to_change() {
    let dir = tempfile::tempdir().expect("temp dir");
    let line = error_line(&strata_in(
        dir.path(),
        &[
            "gen",
            "--arch",
            "qwen3moe",
            "--expert-ff",
            "64",
            "--weight-type",
            "q4_k_m",
            "-o",
            "x.gguf",
        ],
    ));
    assert!(
        line.contains("expert hidden size 64 is not a multiple of") && line.contains("256"),
        "{line}"
    );
    assert!(!dir.path().join("x.gguf").exists());
    let out = strata_in(dir.path(), &["gen", "--arch", "foo", "-o", "x.gguf"]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    for arch in ["llama", "gemma3", "mixtral", "qwen3moe", "olmoe"] {
        assert!(err.contains(arch), "{arch} missing from: {err}");
    }
}

/// The README said `-ot …=CPU|RAM` and `--cpu-moe` keep tensors resident "whatever the
/// budget". `RAM` pins count against the budget (a budget they do not fit is an error that
/// says so); `CPU` and `--cpu-moe` are host memory, where every tensor is without a GPU.
#[test]
fn tensor_overrides_do_what_the_readme_says() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    ok(&strata_in(
        d,
        &["gen", "--arch", "qwen3moe", "-o", "moe.gguf"],
    ));
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run", "-m", "moe.gguf", "-p", "hi", "-n", "4", "--temp", "0", "-v",
        ];
        args.extend_from_slice(extra);
        strata_in(d, &args)
    };
    let weights = |err: &str| -> String {
        err.lines()
            .find(|l| l.contains("weights = "))
            .unwrap_or_else(|| panic!("no weights line: {err}"))
            .to_owned()
    };
    let (base_out, base_err) = ok(&run(&["--ram-budget", "60%"]));
    for flags in [
        &["--cpu-moe"][..],
        &["-ot", "exps=CPU"],
        &["--n-cpu-moe", "2"],
    ] {
        let flags = [&["--ram-budget", "60%"][..], flags].concat();
        let (out, err) = ok(&run(&flags));
        assert_eq!(out, base_out, "{flags:?}");
        assert_eq!(weights(&err), weights(&base_err), "{flags:?}");
    }
    let line = error_line(&run(&["--ram-budget", "30%", "-ot", "ffn=RAM"]));
    assert!(line.contains("too small"), "{line}");
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README");
    assert!(
        !readme.contains("whatever the budget"),
        "README still says so"
    );
}

/// `pull` printed one finished bar per part and no total, and nothing at all into a pipe until
/// it was done; `gen --preset big` printed nothing while it worked. Into a pipe, each step is
/// a line (and no escape codes).
#[test]
fn progress_into_a_pipe_is_a_line_per_step() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    let (_, err) = ok(&strata_in(
        d,
        &[
            "gen", "--arch", "qwen3moe", "--layers", "24", "-o", "moe.gguf",
        ],
    ));
    assert!(err.contains("writing tensors ("), "{err}");
    let steps = err
        .lines()
        .filter(|l| l.starts_with("writing tensors: ") && l.contains("% ("))
        .count();
    assert!(steps >= 3, "{err}");
    assert!(!err.contains('\x1b'), "{err:?}");
    let home = d.join("home");
    let out = Command::new(strata_bin())
        .args(["pull", "./moe.gguf", "--name", "moe"])
        .current_dir(d)
        .env("STRATA_HOME", &home)
        .stdin(Stdio::null())
        .output()
        .expect("run strata");
    let (_, err) = ok(&out);
    assert!(err.contains("importing moe ("), "{err}");
    assert!(err.contains("pulled moe"), "{err}");
    assert!(!err.contains('\x1b'), "{err:?}");
}
