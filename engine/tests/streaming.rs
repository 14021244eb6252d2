//! Weights streamed from disk under a RAM budget give exactly the logits of resident weights:
//! on both I/O engines, with short reads, through `--mmap`, and after an injected read error
//! (which fails that step with a clear error, after which the next step succeeds).

use std::sync::Arc;

use strata_engine::model::Arch;
use strata_engine::model::{ExpertPrefetch, ModelOptions};
use strata_engine::synth::{GenSpec, Vocab, to_bytes};
use strata_engine::{Logits, Model};
use strata_simd::pool::ThreadPool;
use strata_storage::io::{Faults, IoKind, ReaderOptions};
use strata_storage::quant::GgmlType;
use strata_storage::residency::{LoadOptions, ResidencyMode};

fn model_file() -> (tempfile::TempDir, std::path::PathBuf, u64) {
    let mut spec = GenSpec::tiny(Arch::Llama);
    spec.n_layer = 8;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.gguf");
    let bytes = to_bytes(&spec, Vocab::Bytes).expect("generate");
    std::fs::write(&path, &bytes).expect("write");
    (dir, path, bytes.len() as u64)
}

const PROMPT: [u32; 9] = [5, 77, 130, 9, 201, 44, 18, 250, 3];

/// Prefill, then 6 greedy steps; every step's logits.
fn run(model: &Model) -> Vec<Vec<f32>> {
    let pool = Arc::new(ThreadPool::new(2));
    let mut ctx = model.new_context(64, pool);
    let mut out = vec![
        model
            .forward(&mut ctx, &PROMPT, Logits::Last)
            .expect("prefill")
            .to_vec(),
    ];
    for _ in 0..6 {
        let last = out.last().expect("logits");
        let next = (0..last.len())
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .expect("argmax") as u32;
        out.push(
            model
                .forward(&mut ctx, &[next], Logits::Last)
                .expect("decode")
                .to_vec(),
        );
    }
    out
}

fn residency(budget: Option<u64>, kind: IoKind, faults: Option<&str>) -> LoadOptions {
    LoadOptions {
        ram_budget: budget,
        io: ReaderOptions {
            kind: Some(kind),
            faults: faults.map(|f| Faults::parse(f).expect("fault plan")),
            ..ReaderOptions::default()
        },
        ..LoadOptions::default()
    }
}

/// `r` with every matrix in the file's layout: streamed layers keep it, so the resident run
/// that every placement must match bit for bit keeps it too.
fn kept(r: LoadOptions) -> ModelOptions {
    ModelOptions {
        residency: r,
        keep_file_layout: true,
        ..ModelOptions::default()
    }
}

fn opts(budget: Option<u64>, kind: IoKind, faults: Option<&str>) -> ModelOptions {
    kept(residency(budget, kind, faults))
}

#[test]
fn streamed_weights_give_identical_logits() {
    let (_dir, path, size) = model_file();
    let resident = Model::load_with(&path, &opts(None, IoKind::Uring, None)).expect("load");
    assert_eq!(resident.weights().stats().mode, ResidencyMode::Resident);
    let want = run(&resident);
    // With resident matrices repacked for the kernels (the default), the same numbers up to
    // rounding.
    let repacked = Model::load_with(
        &path,
        &ModelOptions {
            keep_file_layout: false,
            ..opts(None, IoKind::Uring, None)
        },
    )
    .expect("load");
    for (a, b) in run(&repacked).iter().zip(&want) {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            diff <= 5e-2 * scale,
            "repacked logits off by {diff} (scale {scale})"
        );
    }
    for kind in [IoKind::Uring, IoKind::Pread] {
        for faults in [None, Some("short=3")] {
            let budget = size * 45 / 100;
            let m = Model::load_with(&path, &opts(Some(budget), kind, faults)).expect("load");
            let s = m.weights().stats();
            assert_eq!(s.mode, ResidencyMode::Streamed, "{kind:?}");
            assert!(s.streamed_layers > 0 && s.window >= 2, "{s:?}");
            assert!(s.ram_bytes <= budget, "{} > {budget}", s.ram_bytes);
            assert_eq!(run(&m), want, "{kind:?} {faults:?}");
            let s = m.weights().stats();
            // 7 passes over the streamed layers, each read once per pass.
            assert!(s.read.bytes >= 7 * s.streamed_per_pass, "{s:?}");
            assert!(s.window_hits + s.stalls + s.misses > 0);
            if faults.is_some() {
                assert!(s.read.resubmits > 0);
            }
        }
    }
    let mapped = Model::load_with(
        &path,
        &kept(LoadOptions {
            mmap: true,
            ..LoadOptions::default()
        }),
    )
    .expect("mmap");
    assert_eq!(mapped.weights().stats().mode, ResidencyMode::Mapped);
    assert_eq!(run(&mapped), want);
}

#[test]
fn a_read_error_fails_the_step_and_the_next_step_succeeds() {
    let (_dir, path, size) = model_file();
    let want = run(&Model::load_with(&path, &opts(None, IoKind::Uring, None)).expect("load"));
    // Loading the resident set takes a few chunks; the 10th read falls inside streaming.
    let m = Model::load_with(
        &path,
        &opts(Some(size * 45 / 100), IoKind::Uring, Some("eio=10")),
    )
    .expect("load");
    let pool = Arc::new(ThreadPool::new(2));
    let mut failed = false;
    for _ in 0..8 {
        let mut ctx = m.new_context(64, pool.clone());
        match m.forward(&mut ctx, &PROMPT, Logits::Last) {
            Ok(l) => assert_eq!(l, &want[0][..]),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("Input/output error"), "{msg}");
                assert!(msg.contains("m.gguf"), "{msg}");
                failed = true;
            }
        }
    }
    assert!(failed, "the injected error never surfaced");
}

#[test]
fn too_small_a_budget_is_a_clear_error() {
    let (_dir, path, _) = model_file();
    let err = Model::load_with(&path, &opts(Some(4096), IoKind::Uring, None))
        .err()
        .expect("refused");
    assert!(err.to_string().contains("too small"), "{err}");
}

#[test]
fn a_truncated_file_is_caught_at_load() {
    let (_dir, path, size) = model_file();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    f.set_len(size - 1000).expect("truncate");
    drop(f);
    for budget in [None, Some(size / 2)] {
        let err = Model::load_with(&path, &opts(budget, IoKind::Uring, None))
            .err()
            .expect("refused");
        let msg = err.to_string();
        assert!(
            msg.contains("end of file") || msg.contains("truncated"),
            "{msg}"
        );
    }
}

/// A tiny qwen3moe of 16 experts and `n_layer` layers, written to a file: its directory, path
/// and bytes.
fn moe_file(n_layer: usize) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    moe_file_of(n_layer, GgmlType::Q8_0)
}

/// [`moe_file`] with its matrices in `ty`.
fn moe_file_of(n_layer: usize, ty: GgmlType) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    let mut spec = GenSpec::tiny(Arch::Qwen3Moe);
    spec.n_expert = 16;
    spec.n_layer = n_layer;
    (spec.weight_type, spec.down_type) = (ty, ty);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("moe.gguf");
    let bytes = to_bytes(&spec, Vocab::Bytes).expect("generate");
    std::fs::write(&path, &bytes).expect("write");
    (dir, path, bytes)
}

#[test]
fn streamed_experts_give_identical_logits_and_are_predicted() {
    let (_dir, path, bytes) = moe_file(6);
    let want = run(&Model::load_with(&path, &opts(None, IoKind::Uring, None)).expect("load"));
    let m = Model::load_with(
        &path,
        &opts(Some(bytes.len() as u64 * 4 / 10), IoKind::Uring, None),
    )
    .expect("load streamed");
    assert_eq!(run(&m), want);
    let s = m.weights().stats();
    assert!(s.expert_hits + s.expert_misses > 0, "{s:?}");
    assert!(s.expert_prefetches > 0, "{s:?}");
    let p = m.prediction_stats();
    assert!(p.guessed > 0 && p.actual > 0, "{p:?}");
    assert!(p.recall() > 0.0 && p.precision() <= 1.0);

    // Without read-ahead, and with a recorded routing replayed (the oracle): the same logits
    // whatever the cache held when each expert ran, and the replayed guesses all right.
    m.set_expert_prefetch(ExpertPrefetch::Off);
    m.weights().clear_expert_cache();
    assert_eq!(run(&m), want);
    m.set_expert_prefetch(ExpertPrefetch::Record);
    assert_eq!(run(&m), want);
    let log = m.set_expert_prefetch(ExpertPrefetch::Predict);
    m.set_expert_prefetch(ExpertPrefetch::Replay(Arc::new(log)));
    m.weights().clear_expert_cache();
    let before = m.prediction_stats();
    assert_eq!(run(&m), want);
    let after = m.prediction_stats();
    let (guessed, right) = (after.guessed - before.guessed, after.right - before.right);
    assert!(
        guessed > 0 && right == guessed,
        "{guessed} guessed, {right} right"
    );
}

#[test]
fn optimized_experts_are_read_in_one_request_each_with_identical_logits() {
    let (dir, path, _) = moe_file(4);
    let fused = dir.path().join("moe-optimized.gguf");
    let done =
        strata_engine::optimize::optimize(&path, &fused, &mut strata_storage::store::NoProgress)
            .expect("optimize");
    assert_eq!(done.layers, 4);
    assert_eq!(done.record_bytes % 4096, 0);

    let want = run(&Model::load_with(&path, &opts(None, IoKind::Uring, None)).expect("load"));
    let resident = Model::load_with(&fused, &opts(None, IoKind::Uring, None)).expect("load");
    assert_eq!(run(&resident), want, "resident");
    let mapped = kept(LoadOptions {
        mmap: true,
        ..residency(None, IoKind::Uring, None)
    });
    assert_eq!(
        run(&Model::load_with(&fused, &mapped).expect("mmap")),
        want,
        "mapped"
    );
    // Streamed: every miss is one request (a chunk, the experts are small), for a slab of the
    // original and for a whole expert of the optimized file, which counts one use per expert
    // where the original counts three.
    let mut uses = Vec::new();
    for file in [&path, &fused] {
        let len = std::fs::metadata(file).expect("size").len();
        for kind in [IoKind::Uring, IoKind::Pread] {
            let m = Model::load_with(file, &opts(Some(len * 4 / 10), kind, None)).expect("load");
            m.set_expert_prefetch(ExpertPrefetch::Off);
            assert_eq!(run(&m), want, "{} on {kind:?}", file.display());
            let s = m.weights().stats();
            assert!(s.expert_misses > 0, "{s:?}");
            assert_eq!(s.expert_read.chunks, s.expert_misses, "{s:?}");
            uses.push(s.expert_hits + s.expert_misses);
        }
    }
    assert_eq!(uses[0], 3 * uses[2], "{uses:?}");
    assert_eq!((uses[0], uses[2]), (uses[1], uses[3]));
    // One layer's gate experts pinned in RAM (`-ot`): the same logits, and its up and down
    // still count one use per expert.
    let len = std::fs::metadata(&fused).expect("size").len();
    let pinned = kept(LoadOptions {
        overrides: strata_storage::residency::overrides::parse_overrides(
            r"blk\.1\.ffn_gate_exps=RAM",
        )
        .expect("rule"),
        ..residency(Some(len * 4 / 10), IoKind::Uring, None)
    });
    let m = Model::load_with(&fused, &pinned).expect("load pinned");
    m.set_expert_prefetch(ExpertPrefetch::Off);
    assert_eq!(run(&m), want, "one part pinned");
    let s = m.weights().stats();
    assert_eq!(s.expert_hits + s.expert_misses, uses[2], "{s:?}");
}

/// With the CPU's own layout (the default), experts read from disk into the expert cache are
/// repacked as they are read, as resident ones are at load: the plain file's slabs and an
/// optimized file's expert records give the resident model's logits bit for bit (the same
/// kernels on the same bytes), cached or read again. Streamed layer groups keep the file's
/// layout in a short prompt's batch and decode (the plain run's rounding).
#[test]
fn streamed_experts_run_in_the_cpus_layout_with_identical_logits() {
    let repacked = |r: LoadOptions| ModelOptions {
        residency: r,
        ..ModelOptions::default()
    };
    // Q4_K: its row and interleaved kernels sum in different orders (Q8_0's give the same
    // bits for a lone token).
    let (dir, path, bytes) = moe_file_of(4, GgmlType::Q4K);
    let fused = dir.path().join("moe-optimized.gguf");
    strata_engine::optimize::optimize(&path, &fused, &mut strata_storage::store::NoProgress)
        .expect("optimize");
    let want = run(
        &Model::load_with(&path, &repacked(residency(None, IoKind::Uring, None))).expect("load"),
    );
    // The file's layout gives other bits: the comparison below can tell the two apart (where
    // this process's SIMD level has an interleaved layout at all: not under
    // `STRATA_SIMD=scalar`, where both runs keep the file's layout).
    let rows = run(&Model::load_with(&path, &opts(None, IoKind::Uring, None)).expect("load"));
    assert_eq!(
        rows != want,
        strata_simd::matmul::can_interleave(GgmlType::Q4K),
        "the repacked and row-major runs should round differently exactly when Q4_K is repacked"
    );
    for file in [&path, &fused] {
        for kind in [IoKind::Uring, IoKind::Pread] {
            let m = Model::load_with(
                file,
                &repacked(residency(Some(bytes.len() as u64 * 4 / 10), kind, None)),
            )
            .expect("load streamed experts");
            assert!(m.weights().experts_streamed_any());
            assert!(
                run(&m) == want,
                "streamed experts of {} on {kind:?}",
                file.display()
            );
            m.weights().clear_expert_cache();
            assert!(run(&m) == want, "read again, {}", file.display());
        }
    }
}

/// A dense model of `n_layer` layers whose matrices are all `ty`, written to a file.
fn dense_file_of(n_layer: usize, ty: GgmlType) -> (tempfile::TempDir, std::path::PathBuf, u64) {
    let mut spec = GenSpec::tiny(Arch::Llama);
    spec.n_layer = n_layer;
    (spec.weight_type, spec.down_type) = (ty, ty);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dense.gguf");
    let bytes = to_bytes(&spec, Vocab::Bytes).expect("generate");
    std::fs::write(&path, &bytes).expect("write");
    (dir, path, bytes.len() as u64)
}

/// Every token's logits of one prompt, in a fresh context.
fn prefill_all(model: &Model, prompt: &[u32]) -> Vec<f32> {
    let mut ctx = model.new_context(256, Arc::new(ThreadPool::new(2)));
    model
        .forward(&mut ctx, prompt, Logits::All)
        .expect("prefill")
        .to_vec()
}

/// A prompt's batch runs streamed layer groups in the CPU's layout (where this SIMD level's
/// batches gain from it): storage repacks each group as it is read, or when the pass first
/// takes a group read earlier, so the prompt's logits are the resident model's bit for bit
/// (not the file layout's rounding); decode steps between prompts read the file's layout and
/// the next prompt is again the resident model's. Where no type gains (`STRATA_SIMD=scalar`,
/// or AVX-512 VNNI's GEMM for Q4_K) nothing is repacked.
#[test]
fn a_prompt_runs_streamed_layer_groups_in_the_cpus_layout() {
    let gains = [GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q3K, GgmlType::Q6K]
        .into_iter()
        .find(|&t| strata_simd::matmul::interleave_speeds_batches(t));
    let (_dir, path, len) = dense_file_of(8, gains.unwrap_or(GgmlType::Q4K));
    let prompt: Vec<u32> = (0..80u32).map(|i| (i * 37 + 5) % 256).collect();
    let repacked = |r: LoadOptions| ModelOptions {
        residency: r,
        ..ModelOptions::default()
    };
    let want = prefill_all(
        &Model::load_with(&path, &repacked(residency(None, IoKind::Uring, None))).expect("load"),
        &prompt,
    );
    for kind in [IoKind::Uring, IoKind::Pread] {
        let m = Model::load_with(&path, &repacked(residency(Some(len * 4 / 10), kind, None)))
            .expect("load streamed");
        assert!(m.weights().stats().streamed_layers > 0);
        let got = prefill_all(&m, &prompt);
        let prepared = m.weights().stats().groups_prepared;
        if gains.is_none() {
            assert_eq!(prepared, 0);
            continue;
        }
        assert!(prepared > 0, "{kind:?}");
        assert!(got == want, "the prompt over streamed groups, {kind:?}");
        // Decode steps (9-token prompt, then single tokens) read groups in the file's layout;
        // the next long prompt prepares what they left in the window.
        run(&m);
        assert!(
            prefill_all(&m, &prompt) == want,
            "a prompt after decoding, {kind:?}"
        );
    }
    if gains.is_some() {
        let rows = prefill_all(
            &Model::load_with(&path, &opts(Some(len * 4 / 10), IoKind::Uring, None)).expect("load"),
            &prompt,
        );
        assert!(rows != want, "the file's layout should round otherwise");
    }
}

/// Storage's side of the preparation of streamed groups, with a preparation of the test's own
/// on a model that keeps the file's layout: handles say which bytes were rewritten, reads made
/// while it is off show the file's bytes, and a preparation that fails has its group read
/// again (the file's bytes, not a half-rewritten slot) and turns the preparation off for good.
#[test]
fn streamed_group_preparation_is_seen_by_handles_and_a_failure_reads_again() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (_dir, path, len) = dense_file_of(8, GgmlType::Q8_0);
    let file = Model::load_with(&path, &opts(None, IoKind::Uring, None)).expect("load");
    let m = Model::load_with(&path, &opts(Some(len * 4 / 10), IoKind::Uring, None))
        .expect("load streamed");
    let w = m.weights();
    let last = w.stats().resident_layers..8;
    assert!(!last.is_empty());
    let ids: Vec<_> = last
        .clone()
        .map(|l| w.id(&format!("blk.{l}.attn_q.weight")).expect("tensor"))
        .collect();
    let calls = Arc::new(AtomicUsize::new(0));
    let fail_from = Arc::new(AtomicUsize::new(usize::MAX));
    let (c, f) = (Arc::clone(&calls), Arc::clone(&fail_from));
    let taken = w
        .prepare_groups_on_read(
            &ids,
            Arc::new(move |_, bytes: &mut [u8]| {
                if c.fetch_add(1, Ordering::SeqCst) >= f.load(Ordering::SeqCst) {
                    return false;
                }
                bytes.iter_mut().for_each(|b| *b ^= 0xa5);
                true
            }),
        )
        .expect("prepare");
    assert_eq!(taken, ids, "every streamed attn_q is in a group");
    let file_bytes = |id| {
        file.weights()
            .acquire(id)
            .expect("acquire")
            .bytes()
            .to_vec()
    };
    // Off: every layer's handle shows the file's bytes.
    for &id in &ids {
        let h = w.acquire(id).expect("acquire");
        assert!(!h.prepared());
        assert_eq!(h.bytes(), file_bytes(id));
    }
    // On: prepared as read, or when taken (the last layer's group is still in the window,
    // read unprepared); each handle sees the rewrite exactly once.
    w.set_preparing(true);
    let before = w.stats();
    let l = *ids.last().expect("a layer");
    let h = w.acquire(l).expect("acquire");
    let after = w.stats();
    assert_eq!(
        (after.window_hits, after.misses),
        (before.window_hits + 1, before.misses),
        "taken from the window, not read again"
    );
    assert!(h.prepared(), "prepared when taken");
    drop(h);
    for _ in 0..2 {
        for &id in &ids {
            let h = w.acquire(id).expect("acquire");
            assert!(h.prepared());
            let x: Vec<u8> = file_bytes(id).iter().map(|b| b ^ 0xa5).collect();
            assert!(h.bytes() == x, "prepared once");
        }
    }
    assert!(w.stats().groups_prepared >= ids.len() as u64);
    // A failing preparation: the group is read again and shows the file's bytes, and no
    // preparation runs after it.
    fail_from.store(calls.load(Ordering::SeqCst), Ordering::SeqCst);
    for _ in 0..2 {
        for &id in &ids {
            let h = w.acquire(id).expect("acquire after a failure");
            if !h.prepared() {
                assert_eq!(h.bytes(), file_bytes(id));
            }
        }
    }
    let before = calls.load(Ordering::SeqCst);
    for _ in 0..2 {
        for &id in &ids {
            let h = w.acquire(id).expect("acquire");
            assert!(!h.prepared());
            assert_eq!(h.bytes(), file_bytes(id));
        }
    }
    assert!(
        calls.load(Ordering::SeqCst) <= before + 1,
        "turned off after the failure"
    );
}
