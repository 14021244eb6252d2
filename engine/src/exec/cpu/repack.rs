//! The CPU executor's weight preparation: where this CPU has the interleaved kernels (AVX2 and
//! above) and they measured faster than the row kernels ([`choose_decode`]), resident matrices are repacked in place at load into [`Layout::Interleaved`] (tiles
//! of 16 rows, see `strata_simd::matmul::interleave`), as ggml's CPU backend repacks into its
//! own buffer type. The layout is the CPU kernels' business: the model's tensors do not carry
//! it; [`CpuWeights`] remembers it per tensor for the executor's matmuls.
//!
//! Experts read from disk into the expert cache are repacked by storage as each slab is read
//! ([`Weights::prepare_on_read`]), on its I/O threads, so that cached experts run the same
//! kernels per byte as resident ones. Streamed layer groups are read again every step, so a
//! pass over them pays only in a prompt's batch: they are repacked as they are read while one
//! runs ([`CpuWeights::prepare_groups`]) and keep the file's layout for decode. Mapped files,
//! strided tensors held whole and matrices cut into parts keep the file's layout, as does
//! everything when repacking is off (identical arithmetic whatever the placement, for
//! comparisons).

use std::sync::Arc;

use strata_simd::matmul::{
    INTERLEAVE_ROWS, Layout, SimdError, can_interleave, interleave, interleave_here,
    interleave_speeds_batches,
};
use strata_simd::pool::ThreadPool;
use strata_simd::tune;
use strata_storage::quant::GgmlType;
use strata_storage::residency::{Prepare, PrepareChecked, TensorHandle, TensorId, Weights};

use crate::error::EngineError;
use crate::model::{DecodeSetting, Ffn, Layer, Mat};
use crate::plan::calibrate::cpu_id;
use crate::plan::profile::DecodeProfile;

/// The weight types of the matrices the CPU executor may repack.
fn matrix_types(layers: &[Layer], output: Mat) -> Vec<GgmlType> {
    let mut types = Vec::new();
    for (m, _) in matrices(layers, output) {
        if !types.contains(&m.ty) {
            types.push(m.ty);
        }
    }
    types
}

/// Every matrix the CPU executor may repack, with its number of slabs (`n_expert` for stacked
/// experts, else 1): each layer's projections, its FFN's (shared experts included), and the
/// output. The MoE router is left alone: expert prediction reads it on its own, and its few
/// rows gain little.
fn matrices(layers: &[Layer], output: Mat) -> Vec<(Mat, usize)> {
    let mut mats = Vec::new();
    for l in layers {
        mats.extend([l.q, l.k, l.v, l.o].map(|m| (m, 1)));
        match &l.ffn {
            Ffn::Dense { gate, up, down } => mats.extend([*gate, *up, *down].map(|m| (m, 1))),
            Ffn::Moe(moe) => {
                if let Some((g, u, d, _)) = &moe.shared {
                    mats.extend([*g, *u, *d].map(|m| (m, 1)));
                }
                mats.extend([moe.gate, moe.up, moe.down].map(|x| (x.mat, x.n_expert)));
            }
        }
    }
    mats.push((output, 1));
    mats
}

/// Makes the process's decode choices (`strata_simd::tune`) as `setting` says, before the
/// matrices are repacked: measured on this CPU over the model's weight types at one thread
/// and at one per physical core (once per process: later loads keep the first choice), taken
/// from `strata calibrate`'s profile (`stored`) when it was made on this CPU, or fixed by the
/// user.
///
/// `budgeted`: the weights are held under a RAM budget (something streams from disk), so the
/// measurement allocates no more than `tune::MIN_STREAM_BYTES`.
///
/// `memory`: the directory where this machine keeps the choice a first load measured (the
/// model store's `decode/`, a file per CPU and SIMD level: [`DecodeProfile::memory_file`],
/// [`DecodeProfile::remember`]). With `STRATA_DECODE` unset and no `strata
/// calibrate` choice for this CPU, a load takes the file's choice, or measures every
/// candidate (rows or interleaved, both widths, the prefetch distance) and keeps what it
/// found there, so that a CPU where the level's default loses (the 512-bit kernels on Zen 4)
/// runs the measured kernels without anyone calibrating, and every later process on it runs
/// the same ones (the same bits). Without it only the default kernels' prefetch distance is
/// measured.
pub(crate) fn choose_decode(
    setting: DecodeSetting,
    stored: Option<&DecodeProfile>,
    memory: Option<&std::path::Path>,
    layers: &[Layer],
    output: Mat,
    budgeted: bool,
) {
    let with_prefetch = |t: tune::Tuning, p: Option<usize>| match p {
        Some(p) => t.with_prefetch(p),
        None => t,
    };
    match setting {
        DecodeSetting::Current => {}
        DecodeSetting::Fixed { decode, prefetch } => {
            let t = tune::current();
            tune::set(with_prefetch(t.with_decode(decode), prefetch));
        }
        DecodeSetting::Measure { prefetch, kernels } => {
            if tune::is_set() {
                return;
            }
            // `strata calibrate`'s choice, made on this CPU: taken as it is (unless the user
            // asked for a new measurement), so every process runs the measured kernels.
            if let (false, Some(d)) = (kernels, stored) {
                let here = cpu_id();
                if let Some(why) = d.mismatch(&here) {
                    tracing::info!(
                        "the hardware profile's decode kernels were {why}: not used (`strata \
                         calibrate` measures them again)"
                    );
                } else {
                    match d.tuning(tune::current()) {
                        Ok(t) => {
                            tracing::info!(
                                "decode kernels from `strata calibrate` (the hardware profile)"
                            );
                            tune::set(with_prefetch(t, prefetch));
                            return;
                        }
                        Err(e) => tracing::warn!("the hardware profile's {e}: not used"),
                    }
                }
            }
            // A choice an earlier load on this CPU measured and kept.
            let here = cpu_id();
            let memory = memory
                .filter(|_| !kernels)
                .map(|dir| DecodeProfile::memory_file(dir, &here));
            let memory = memory.as_deref();
            // The types with decode choices this model has; a kept choice that names all of
            // them is taken, one that names some has the others measured and added.
            let mut types: Vec<GgmlType> = matrix_types(layers, output)
                .into_iter()
                .filter(|ty| tune::TYPES.contains(ty))
                .collect();
            if let Some(path) = memory {
                match DecodeProfile::recall(path) {
                    Ok(Some(d)) if d.mismatch(&here).is_none() => match d.tuning(tune::current()) {
                        Ok(t) => {
                            let have = d.types();
                            let missing: Vec<GgmlType> = types
                                .iter()
                                .filter(|ty| !have.contains(ty))
                                .copied()
                                .collect();
                            if missing.is_empty() {
                                tracing::info!(
                                    "decode kernels from {} (measured on this CPU at an earlier \
                                     load): {}",
                                    path.display(),
                                    d.kernels
                                );
                                tune::set(with_prefetch(t, prefetch));
                                return;
                            }
                            let names: Vec<String> =
                                missing.iter().map(|t| t.to_string()).collect();
                            tracing::info!(
                                "{} names no decode kernels for {} (an earlier load's model had \
                                 other types): measuring those",
                                path.display(),
                                names.join(", ")
                            );
                            types = missing;
                        }
                        Err(e) => tracing::warn!("{}: {e}: measured again", path.display()),
                    },
                    Ok(Some(d)) => tracing::info!(
                        "{} holds decode kernels {}: measured again",
                        path.display(),
                        d.mismatch(&here).unwrap_or_default()
                    ),
                    Ok(None) => {}
                    Err(e) => tracing::warn!("{e}: measured again"),
                }
            }
            let t0 = std::time::Instant::now();
            let one = ThreadPool::new(1);
            let n = strata_simd::topology::physical_cores();
            let all = (n > 1).then(|| ThreadPool::new(n));
            let pools: Vec<&ThreadPool> = std::iter::once(&one).chain(all.as_ref()).collect();
            let cap = if budgeted {
                tune::MIN_STREAM_BYTES
            } else {
                usize::MAX
            };
            // Kept for every later load, the choice is measured once per machine: two rounds
            // of every candidate (about 1.3 s for qwen2.5-coder-1.5b's two types over 64 MiB
            // flushed from the caches each pass; the 5% margin a candidate must win
            // by keeps noise from replacing the default).
            let reps = if memory.is_some() { 2 } else { 4 };
            let m = tune::measure(&pools, &types, reps, kernels || memory.is_some(), cap);
            for line in tune::describe(&m) {
                tracing::info!("decode kernel measured: {line}");
            }
            tracing::info!(
                "decode kernels measured in {:.0} ms",
                t0.elapsed().as_secs_f64() * 1e3
            );
            let mut tuning = m.tuning;
            if let Some(path) = memory.filter(|_| !types.is_empty()) {
                // The file's choice after this one is added, which another process may have
                // made first for a type: every process on this CPU runs the same.
                let mine = DecodeProfile::measured(here, &tuning, &types);
                match mine.remember(path).and_then(|kept| {
                    kept.tuning(tune::current())
                        .map(|t| (t, kept))
                        .map_err(|e| format!("{}: {e}", path.display()))
                }) {
                    Ok((t, kept)) => {
                        tracing::info!(
                            "decode kernels kept in {} for later loads: {}",
                            path.display(),
                            kept.kernels
                        );
                        tuning = t;
                    }
                    Err(e) => tracing::warn!("keeping the decode kernels: {e}"),
                }
            }
            tune::set(with_prefetch(tuning, prefetch));
        }
    }
}

/// The smallest batch during which streamed layer groups are repacked as they are read
/// ([`CpuWeights::prepare_groups`]). The repack runs on the streaming thread between reads, so
/// where the disk is the limit (small batches) it delays the next read: qwen2.5-coder-1.5b
/// with half its layers streamed at `STRATA_SIMD=avx2`, 2 threads, Emerald Rapids, t/s without
/// and with the repack in two rounds: pp8 17.9/16.0 and 26.6/18.4, pp32 49.3/51.6 and
/// 58.4/55.5, pp64 61.2/67.3 and 67.5/75.7, pp512 57–70 against 98–102.
pub(crate) const PREPARE_MIN_TOKENS: usize = 64;

/// Has the streamed layer groups read from now on repacked when a pass of `n` tokens gains
/// from it (see [`PREPARE_MIN_TOKENS`]).
pub(crate) fn prepare_reads_for(weights: &Weights, n: usize) {
    weights.set_preparing(n >= PREPARE_MIN_TOKENS);
}

/// The layout of each tensor as the CPU executor holds it.
#[derive(Clone, Debug, Default)]
pub(crate) struct CpuWeights {
    /// By tensor index; tensors past the end, and those never repacked, are row-major.
    layouts: Vec<Layout>,
    /// Tensors left in the file's layout for the GPU.
    keep: Vec<TensorId>,
}

impl CpuWeights {
    /// How tensor `id`'s bytes are arranged for the CPU kernels where they are held for good
    /// (resident, or in the expert cache).
    pub(crate) fn layout(&self, id: TensorId) -> Layout {
        self.layouts.get(id.index()).copied().unwrap_or_default()
    }

    /// How the bytes `h` holds of tensor `id` are arranged: a streamed group's matrix is
    /// interleaved when its read was prepared ([`Weights::prepare_groups_on_read`]), which
    /// changes from read to read.
    pub(crate) fn layout_of(&self, id: TensorId, h: &TensorHandle) -> Layout {
        if h.prepared() {
            Layout::Interleaved
        } else {
            self.layout(id)
        }
    }

    /// Repacks (when `repack`) every resident matrix of `layers` and the output projection
    /// whose type has the interleaved kernels at this SIMD level: the dense matrices, each
    /// expert's slab of stacked experts, and the output (an embedding table tied to it is
    /// then interleaved too, and its rows are taken out of their tile at lookup).
    /// Tensors in `keep` stay in the file's layout (the GPU copies them from host memory each
    /// step).
    pub(crate) fn prepare(
        weights: &mut Weights,
        layers: &[Layer],
        output: Mat,
        token_embd: TensorId,
        repack: bool,
        keep: &[TensorId],
    ) -> Result<Self, EngineError> {
        let mut me = Self {
            layouts: vec![Layout::Rows; weights.gguf().tensors.len()],
            keep: keep.to_vec(),
        };
        if !repack {
            return Ok(me);
        }
        for (m, slabs) in matrices(layers, output) {
            me.repack(weights, m, slabs)?;
        }
        me.prepare_streamed(weights, layers)?;
        me.prepare_groups(weights, layers, output, token_embd)?;
        Ok(me)
    }

    /// Has storage repack the matrices of streamed layer groups as it reads them, while a
    /// prompt's batch runs ([`prepare_reads_for`]): a batch reads each byte of a group once per
    /// token, so a pass over the group on the streaming thread (a few hundred microseconds
    /// per MiB) buys the interleaved kernels for all of them, while a decode step, which reads
    /// each byte once, keeps the file's layout. Only types whose batches gain from the layout
    /// at this level ([`interleave_speeds_batches`]: not where AVX-512 VNNI's GEMM reads rows
    /// as fast). The token embedding is left alone (its rows are read one by one).
    fn prepare_groups(
        &mut self,
        weights: &Weights,
        layers: &[Layer],
        output: Mat,
        token_embd: TensorId,
    ) -> Result<(), EngineError> {
        let mats = matrices(layers, output);
        let (shapes, ids) = self.candidates(weights, &mats, |m| {
            interleave_speeds_batches(m.ty) && m.id != token_embd
        })?;
        if ids.is_empty() {
            return Ok(());
        }
        let prepare: PrepareChecked = Arc::new(move |id: TensorId, bytes: &mut [u8]| {
            let Some(Some((ty, rows, cols, slabs))) = shapes.get(id.index()).copied() else {
                return false;
            };
            let slab = ty.row_bytes(cols) * rows;
            if slab == 0 || bytes.len() != slab * slabs {
                return false;
            }
            // The slabs share one shape, so either all are repacked or (a refusal of the
            // first) none.
            bytes
                .chunks_exact_mut(slab)
                .all(|s| matches!(interleave_here(ty, s, rows, cols), Ok(true)))
        });
        let taken = weights.prepare_groups_on_read(&ids, prepare)?;
        if !taken.is_empty() {
            tracing::debug!(
                matrices = taken.len(),
                "streamed layer groups repacked as they are read while a prompt runs"
            );
        }
        Ok(())
    }

    /// Has storage repack each expert's slab read into the expert cache (experts that stream
    /// from disk under a RAM budget) before it enters the cache, so that cached experts run the
    /// kernels resident ones run: the repacking is a pass over bytes the read just brought
    /// into the CPU's cache, on the I/O threads, once for all the slab's uses. Streamed layer
    /// groups are [`CpuWeights::prepare_groups`]'s.
    fn prepare_streamed(&mut self, weights: &Weights, layers: &[Layer]) -> Result<(), EngineError> {
        let mut mats: Vec<(Mat, usize)> = Vec::new();
        for l in layers {
            if let Ffn::Moe(moe) = &l.ffn {
                mats.extend([moe.gate, moe.up, moe.down].map(|x| (x.mat, x.n_expert)));
            }
        }
        let (shapes, ids) = self.candidates(weights, &mats, |m| can_interleave(m.ty))?;
        if ids.is_empty() {
            return Ok(());
        }
        let prepare: Prepare = Arc::new(move |id: TensorId, bytes: &mut [u8]| {
            // Called with one expert's slab.
            if let Some(Some((ty, rows, cols, _))) = shapes.get(id.index()) {
                // The shapes were checked against the tensors, and the slab sizes are theirs.
                if let Err(e) = interleave_here(*ty, bytes, *rows, *cols) {
                    tracing::error!("repacking a streamed matrix: {e}");
                }
            }
        });
        let taken = weights.prepare_on_read(&ids, prepare)?;
        if !taken.is_empty() {
            tracing::debug!(
                matrices = taken.len(),
                "streamed experts repacked as they are read into the cache"
            );
        }
        for id in taken {
            if let Some(l) = self.layouts.get_mut(id.index()) {
                *l = Layout::Interleaved;
            }
        }
        Ok(())
    }

    /// The matrices of `mats` (each with its number of slabs) that a preparation on read may
    /// repack: `accept`ed, at least a tile of rows, their bytes exactly their slabs, not kept
    /// for the GPU and not repacked already. Their shapes by tensor index (type, rows, columns,
    /// slabs), and their ids.
    #[expect(
        clippy::type_complexity,
        reason = "a table and its keys, used together once"
    )]
    fn candidates(
        &self,
        weights: &Weights,
        mats: &[(Mat, usize)],
        accept: impl Fn(&Mat) -> bool,
    ) -> Result<(Vec<Option<(GgmlType, usize, usize, usize)>>, Vec<TensorId>), EngineError> {
        let mut shapes = vec![None; self.layouts.len()];
        let mut ids = Vec::new();
        for &(m, slabs) in mats {
            let bytes = weights.info(m.id)?.n_bytes;
            let fits = bytes == (m.ty.row_bytes(m.cols) * m.rows * slabs) as u64;
            if m.rows < INTERLEAVE_ROWS
                || !accept(&m)
                || !fits
                || self.keep.contains(&m.id)
                || self.layout(m.id) == Layout::Interleaved
            {
                continue;
            }
            if let Some(s) = shapes.get_mut(m.id.index())
                && s.is_none()
            {
                *s = Some((m.ty, m.rows, m.cols, slabs));
                ids.push(m.id);
            }
        }
        Ok((shapes, ids))
    }

    /// Interleaves tensor `m` in place, as `slabs` matrices of `m`'s shape one after another
    /// (1 for a plain matrix; `n_expert` for stacked experts), when it is resident in this
    /// process's memory and its type has the layout at this SIMD level.
    fn repack(&mut self, weights: &mut Weights, m: Mat, slabs: usize) -> Result<(), EngineError> {
        if m.rows < INTERLEAVE_ROWS || !can_interleave(m.ty) || self.keep.contains(&m.id) {
            return Ok(());
        }
        let (ty, rows, cols) = (m.ty, m.rows, m.cols);
        let slab = ty.row_bytes(cols) * rows;
        let done = weights.rewrite_resident(m.id, |bytes| {
            if slab == 0 || bytes.len() != slab * slabs {
                return Ok::<_, SimdError>(false);
            }
            for s in bytes.chunks_exact_mut(slab) {
                if !interleave(ty, s, rows, cols)? {
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        if done && let Some(l) = self.layouts.get_mut(m.id.index()) {
            *l = Layout::Interleaved;
        }
        Ok(())
    }
}
