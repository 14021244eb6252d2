//! The choices of the decode kernels that depend on the microarchitecture, made by
//! measurement rather than from the CPU's name: for each weight type that has an interleaved
//! layout, whether decode runs the row kernels over the file's layout or the interleaved
//! kernels, 256-bit (AVX2) or 512-bit (AVX-512 VNNI); and how far ahead the interleaved kernels
//! prefetch in software.
//!
//! No level is best everywhere: on Zen 4, which executes 512-bit instructions in two halves,
//! the 512-bit interleaved kernels measured slower than the row kernels at 256 bits, while on
//! Intel's server cores they are the fastest. [`measure`] times every candidate the CPU can
//! run on matrices that stream from DRAM (flushed from the caches before each pass, or at
//! least twice the last-level cache), as decode does, alternating the candidates and keeping
//! each one's best pass. [`set`] makes a choice the process's; until then [`current`] is
//! [`Tuning::default_for`] the SIMD level.
//!
//! The layout is the same bytes for both widths, so the width (and the prefetch distance) can
//! change at any time; whether a matrix is interleaved at all is decided when it is loaded
//! (`matmul::can_interleave`).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use strata_storage::quant::GgmlType;

use crate::dispatch::{self, Level};
use crate::matmul::{self, Layout, MatRef, MatmulScratch};
use crate::pool::ThreadPool;

/// How decode multiplies a matrix of one weight type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decode {
    /// Row kernels over the file's row-major layout (the matrix is not repacked).
    Rows,
    /// The interleaved layout, 256-bit kernels (AVX2: `vpmaddubsw` + `vpmaddwd`).
    Interleaved256,
    /// The interleaved layout, 512-bit kernels (AVX-512 VNNI: `vpdpbusd`).
    Interleaved512,
}

impl Decode {
    const ALL: [Decode; 3] = [Decode::Rows, Decode::Interleaved256, Decode::Interleaved512];

    /// The name `STRATA_DECODE` and the logs use.
    pub const fn name(self) -> &'static str {
        match self {
            Decode::Rows => "rows",
            Decode::Interleaved256 => "interleaved256",
            Decode::Interleaved512 => "interleaved512",
        }
    }

    pub fn parse(s: &str) -> Option<Decode> {
        Decode::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(s.trim()))
    }

    /// Whether this CPU, at `level`, has the kernels for this choice.
    pub fn available(self, level: Level) -> bool {
        let level = level.min(dispatch::detected());
        match self {
            Decode::Rows => true,
            Decode::Interleaved256 => level >= Level::Avx2 && cfg!(target_arch = "x86_64"),
            Decode::Interleaved512 => level >= Level::Avx512Vnni,
        }
    }

    const fn code(self) -> u32 {
        match self {
            Decode::Rows => 0,
            Decode::Interleaved256 => 1,
            Decode::Interleaved512 => 2,
        }
    }

    const fn from_code(c: u32) -> Decode {
        match c & 3 {
            1 => Decode::Interleaved256,
            2 => Decode::Interleaved512,
            _ => Decode::Rows,
        }
    }
}

/// The weight types with an interleaved layout, in the order of [`Tuning::decode`].
pub const TYPES: [GgmlType; N_TYPES] = [
    GgmlType::Q4K,
    GgmlType::Q6K,
    GgmlType::Q8_0,
    GgmlType::Q5_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_1,
    GgmlType::Q5K,
    GgmlType::Q3K,
    GgmlType::Q2K,
];
/// How many [`TYPES`] there are.
pub const N_TYPES: usize = 10;

/// The revision of the interleaved kernels' memory behaviour, kept with every stored choice
/// (`strata calibrate`'s, and the one a first load keeps for later loads): a choice measured
/// under another revision is measured again, since a change in how the kernels read memory
/// can move the best prefetch distance or kernel. 1: each tile block's prefetches issued at
/// its start (choices stored before the revision was kept); 2: spread over its sub-blocks;
/// 3: the 512-bit kernels prefetch past a tile's end as the others do, and a prefetch may fill
/// L2 only ([`Ahead::l2`]); 4: the row kernels prefetch too (a stored choice of rows had been
/// timed without it); 5: AVX-512 VNNI decodes Q4_K and Q6_K rows with its 512-bit kernels
/// (`kernels::RowDecode`), a third faster than the rows it had timed.
pub const REVISION: u32 = 5;

/// The prefetch distance the interleaved kernels used before it was measured: two Q4_K tile
/// blocks.
pub const DEFAULT_PREFETCH: usize = 4608;

/// The software prefetch an interleaved kernel runs: how far ahead of the block it computes,
/// and into which cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ahead {
    /// Bytes ahead (0: no software prefetch).
    pub bytes: usize,
    /// Into L2 only (`prefetcht1`) rather than L1 (`prefetcht0`). On an Emerald Rapids Xeon
    /// the kernels streamed 4-8% faster so (qwen2.5-coder-1.5b decode: 13.4 / 25.3 t/s at 1 /
    /// 2 threads, against 12.4 / 23.5): a line bound for L1 holds one of the core's few L1
    /// fill buffers until it arrives, while L2's queue is several times longer, and the
    /// kernel's own load finds the line in L2 a few hundred cycles later.
    pub l2: bool,
}

impl Ahead {
    /// No software prefetch.
    pub const NONE: Ahead = Ahead {
        bytes: 0,
        l2: false,
    };

    /// What the kernels run before anything was measured: [`DEFAULT_PREFETCH`] bytes ahead,
    /// into L1.
    pub const DEFAULT: Ahead = Ahead {
        bytes: DEFAULT_PREFETCH,
        l2: false,
    };
}

/// The decode choices of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Per type of [`TYPES`], in that order.
    pub decode: [Decode; N_TYPES],
    /// Per type of [`TYPES`]: the interleaved kernels' software prefetch, its distance a
    /// multiple of 64 up to [`MAX_PREFETCH`].
    pub ahead: [Ahead; N_TYPES],
}

/// The farthest prefetch distance a [`Tuning`] holds.
pub const MAX_PREFETCH: usize = 255 * 64;

impl Tuning {
    /// What the process uses before anything was measured or set: the widest interleaved
    /// kernels `level` has for each type, else rows.
    pub fn default_for(level: Level) -> Tuning {
        Tuning {
            decode: TYPES.map(|ty| widest(ty, level)),
            ahead: [Ahead::DEFAULT; N_TYPES],
        }
    }

    /// This tuning with every type's choice `d` ([`set`] lowers it to what the level has for
    /// each type: the 256-bit kernels for a type without a 512-bit one).
    pub fn with_decode(mut self, d: Decode) -> Tuning {
        self.decode = [d; N_TYPES];
        self
    }

    /// The choice for `ty` (types without an interleaved layout: rows).
    pub fn decode(&self, ty: GgmlType) -> Decode {
        TYPES
            .iter()
            .position(|&t| t == ty)
            .map_or(Decode::Rows, |i| self.decode[i])
    }

    /// The interleaved kernels' prefetch distance for `ty`.
    pub fn prefetch(&self, ty: GgmlType) -> usize {
        self.ahead(ty).bytes
    }

    /// The interleaved kernels' whole software prefetch for `ty`.
    pub fn ahead(&self, ty: GgmlType) -> Ahead {
        TYPES
            .iter()
            .position(|&t| t == ty)
            .map_or(Ahead::DEFAULT, |i| self.ahead[i])
    }

    /// This tuning with `ty`'s choice replaced.
    pub fn with(mut self, ty: GgmlType, d: Decode, ahead: Ahead) -> Tuning {
        if let Some(i) = TYPES.iter().position(|&t| t == ty) {
            self.decode[i] = d;
            self.ahead[i] = ahead;
        }
        self
    }

    /// This tuning with every type's prefetch distance `p` (rounded up to a cache line); the
    /// cache each fills stays.
    pub fn with_prefetch(mut self, p: usize) -> Tuning {
        for a in &mut self.ahead {
            a.bytes = p.next_multiple_of(64).min(MAX_PREFETCH);
        }
        self
    }

    /// One line for the logs: `Q4_K=interleaved256/4608 Q6_K=interleaved512/6720/l2 Q8_0=rows
    /// …` (choice/prefetch distance, `/l2` where the prefetches fill L2 only).
    pub fn summary(&self) -> String {
        self.summary_of(&TYPES)
    }

    /// [`Tuning::summary`] of the types `types` names only (in [`TYPES`]' order).
    pub fn summary_of(&self, types: &[GgmlType]) -> String {
        let mut s = Vec::new();
        for (i, (ty, d)) in TYPES.iter().zip(self.decode).enumerate() {
            if !types.contains(ty) {
                continue;
            }
            let l2 = if self.ahead[i].l2 { "/l2" } else { "" };
            s.push(match d {
                Decode::Rows => format!("{ty}={}", d.name()),
                _ => format!("{ty}={}/{}{l2}", d.name(), self.ahead[i].bytes),
            });
        }
        s.join(" ")
    }

    /// The inverse of [`Tuning::summary`]: `base` with the choices `s` names replaced (a type
    /// `s` does not name keeps `base`'s). `strata calibrate` stores its choice this way.
    pub fn parse(s: &str, base: Tuning) -> Result<Tuning, String> {
        let mut t = base;
        for item in s.split_whitespace() {
            let (name, choice) = item
                .split_once('=')
                .ok_or_else(|| format!("`{item}`: expected TYPE=CHOICE[/PREFETCH[/l2]]"))?;
            let i = type_named(name)
                .and_then(|ty| TYPES.iter().position(|&t| t == ty))
                .ok_or_else(|| format!("`{item}`: `{name}` is not a type with decode choices"))?;
            let mut parts = choice.split('/');
            let d = parts.next().unwrap_or_default();
            let p = parts.next();
            // The cache the prefetches fill: L1 unless named.
            t.ahead[i].l2 = match parts.next() {
                None => false,
                Some(c) if c.eq_ignore_ascii_case("l2") => true,
                Some(c) if c.eq_ignore_ascii_case("l1") => false,
                Some(c) => return Err(format!("`{item}`: `{c}` is not a cache (l1 or l2)")),
            };
            if parts.next().is_some() {
                return Err(format!("`{item}`: expected TYPE=CHOICE[/PREFETCH[/l2]]"));
            }
            t.decode[i] = Decode::parse(d).ok_or_else(|| {
                format!("`{item}`: `{d}` is not rows, interleaved256 or interleaved512")
            })?;
            if let Some(p) = p {
                t.ahead[i].bytes = match p.parse::<usize>() {
                    Ok(p) if p <= MAX_PREFETCH => p.next_multiple_of(64),
                    _ => {
                        return Err(format!(
                            "`{item}`: prefetch `{p}` is not a distance in bytes up to \
                             {MAX_PREFETCH}"
                        ));
                    }
                };
            }
        }
        Ok(t)
    }

    /// Type `i`'s choice as one word: 1 (set), the decode choice's code at bits 1..3, the
    /// prefetch distance in cache lines at bits 8..16, whether it fills L2 only at bit 16.
    fn encode(&self, i: usize) -> u32 {
        1 | self.decode[i].code() << 1
            | (self.ahead[i].bytes.div_ceil(64).min(255) as u32) << 8
            | u32::from(self.ahead[i].l2) << 16
    }

    fn decode_word(v: u32) -> (Decode, Ahead) {
        let ahead = Ahead {
            bytes: ((v >> 8) & 0xFF) as usize * 64,
            l2: v & 1 << 16 != 0,
        };
        (Decode::from_code(v >> 1), ahead)
    }
}

/// The type of [`TYPES`] named `name` (`Q4_K`, any case), as [`Tuning::summary`] writes it.
pub fn type_named(name: &str) -> Option<GgmlType> {
    TYPES
        .into_iter()
        .find(|ty| ty.to_string().eq_ignore_ascii_case(name))
}

/// The widest interleaved kernels `level` has for `ty`, else rows.
fn widest(ty: GgmlType, level: Level) -> Decode {
    if Decode::Interleaved512.available(level) && matmul::has_interleaved_512(ty, level) {
        Decode::Interleaved512
    } else if Decode::Interleaved256.available(level) {
        Decode::Interleaved256
    } else {
        Decode::Rows
    }
}

/// Choice `d` for `ty`, lowered to what `level` has: the widest kernels below it.
fn lower(ty: GgmlType, d: Decode, level: Level) -> Decode {
    match d {
        Decode::Rows => Decode::Rows,
        Decode::Interleaved512 => widest(ty, level),
        Decode::Interleaved256 if Decode::Interleaved256.available(level) => d,
        Decode::Interleaved256 => Decode::Rows,
    }
}

/// The process's tuning, one word per type of [`TYPES`] ([`Tuning::encode`]; 0: not set, the
/// level's default). Each word is its type's whole choice, so a reader never sees one type's
/// width with another's prefetch distance.
static CURRENT: [AtomicU32; N_TYPES] = [const { AtomicU32::new(0) }; N_TYPES];

/// The process's decode choices: the last [`set`], else [`Tuning::default_for`] the process's
/// SIMD level. Cheap (one atomic load per type): every matmul asks.
pub fn current() -> Tuning {
    let mut t = Tuning::default_for(dispatch::level());
    for (i, c) in CURRENT.iter().enumerate() {
        let v = c.load(Ordering::Relaxed);
        if v != 0 {
            (t.decode[i], t.ahead[i]) = Tuning::decode_word(v);
        }
    }
    t
}

/// Makes `t` the process's tuning, its choices lowered to what the process's SIMD level has.
/// Matrices interleaved before keep their layout (it is the same for both widths).
pub fn set(t: Tuning) {
    let level = dispatch::level();
    let mut t = t;
    for (d, ty) in t.decode.iter_mut().zip(TYPES) {
        *d = lower(ty, *d, level);
    }
    tracing::info!(tuning = %t.summary(), "decode kernels");
    for (i, c) in CURRENT.iter().enumerate() {
        c.store(t.encode(i), Ordering::Relaxed);
    }
}

/// Whether [`set`] has been called in this process.
pub fn is_set() -> bool {
    CURRENT[0].load(Ordering::Relaxed) != 0
}

/// The least a measurement streams ([`stream_bytes`]), and what [`measure`] allocates for a
/// process that holds its weights under a RAM budget.
pub const MIN_STREAM_BYTES: usize = 64 << 20;

/// Bytes of weights each measured pass streams. Where the CPU can evict them from every cache
/// before a pass ([`evict`]), [`MIN_STREAM_BYTES`]; elsewhere twice the last-level cache,
/// within 64 MiB to 256 MiB, so that most of them come from DRAM as they do in decode.
fn stream_bytes() -> usize {
    if can_evict() {
        return MIN_STREAM_BYTES;
    }
    let l3 = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index3/size")
        .ok()
        .and_then(|s| {
            let s = s.trim();
            let (n, mul) = match s.strip_suffix('K') {
                Some(n) => (n, 1 << 10),
                None => match s.strip_suffix('M') {
                    Some(n) => (n, 1 << 20),
                    None => (s, 1),
                },
            };
            n.parse::<usize>().ok().map(|n| n * mul)
        })
        .unwrap_or(32 << 20);
    (2 * l3).clamp(MIN_STREAM_BYTES, 256 << 20)
}

/// Whether [`evict`] works on this CPU (`clflushopt`: Intel since Skylake, AMD since Zen).
fn can_evict() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUID leaf 7, EBX bit 23 (std's feature detection does not name clflushopt); leaf 7
        // is asked only where the highest leaf reaches it.
        let max = std::arch::x86_64::__cpuid(0).eax;
        max >= 7 && std::arch::x86_64::__cpuid_count(7, 0).ebx & (1 << 23) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Writes `buf`'s lines back and drops them from every cache, so that the next pass reads
/// them from DRAM as decode reads a model larger than the caches; a no-op where
/// [`can_evict`] is false. Without it a pass over twice a large last-level cache (this
/// project's Xeon reports 260 MiB) partly read from that cache: the 1-thread GB/s measured
/// stood above the memory's read bandwidth. `clflushopt` takes about 3 ms for 64 MiB there;
/// plain `clflush`, 150 ms.
fn evict(buf: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    if can_evict() {
        // SAFETY: clflushopt is present (checked just above).
        unsafe { evict_clflushopt(buf) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = buf;
}

/// # Safety
/// The CPU must have `clflushopt`.
#[cfg(target_arch = "x86_64")]
unsafe fn evict_clflushopt(buf: &[u8]) {
    // Every line that holds a byte of `buf`: its start may not be line-aligned, so the last
    // byte's line is flushed too.
    let last = buf.len().checked_sub(1);
    for off in (0..buf.len()).step_by(64).chain(last) {
        // SAFETY: the address is inside `buf`; clflushopt only writes the line back and
        // invalidates it (the data is unchanged), and the CPU has it (caller). Rust names no
        // intrinsic for it, hence the one instruction of assembly.
        unsafe {
            std::arch::asm!(
                "clflushopt [{p}]",
                p = in(reg) buf.as_ptr().add(off),
                options(nostack, preserves_flags)
            );
        }
    }
    // Orders the flushes before the timed loads that follow.
    // SAFETY: SSE2 is part of x86_64.
    unsafe { std::arch::x86_64::_mm_mfence() };
}

/// One candidate's timings.
#[derive(Clone, Debug)]
pub struct Timing {
    pub ty: GgmlType,
    pub decode: Decode,
    pub ahead: Ahead,
    pub threads: usize,
    /// Weight bytes per second of the best pass.
    pub bytes_per_s: f64,
}

/// What [`measure`] found: the tuning it chose and every timing behind it.
#[derive(Clone, Debug)]
pub struct Measured {
    pub tuning: Tuning,
    pub timings: Vec<Timing>,
}

/// Columns of the measured matrices (a hidden size between the small and the large models').
const COLS: usize = 2048;
/// Bytes of one measured matrix: a projection of a mid-sized model.
const MATRIX_BYTES: usize = 4 << 20;

/// Times decode (one token) of `ty` under each candidate on each pool, over matrices cut from
/// `buf`, alternating the candidates `reps` times; returns GB/s per (candidate, pool), best
/// pass each.
fn time_candidates(
    pools: &[&ThreadPool],
    buf: &[u8],
    ty: GgmlType,
    cands: &[(Decode, Ahead)],
    reps: usize,
) -> Vec<Vec<f64>> {
    let level = dispatch::level();
    let rb = ty.row_bytes(COLS);
    let rows = (MATRIX_BYTES / rb) / 16 * 16;
    let mat = rows * rb;
    let n_mats = (buf.len() / mat).max(1);
    let x: Vec<f32> = (0..COLS)
        .map(|i| ((i * 7919) % 97) as f32 / 48.0 - 1.0)
        .collect();
    let mut out = vec![0f32; rows];
    let mut scratch = MatmulScratch::new();
    let mut best = vec![vec![0f64; pools.len()]; cands.len()];
    for _ in 0..reps {
        for (pi, pool) in pools.iter().enumerate() {
            for (ci, &(d, ahead)) in cands.iter().enumerate() {
                let t = Tuning {
                    decode: [d; N_TYPES],
                    ahead: [ahead; N_TYPES],
                };
                let layout = if d == Decode::Rows {
                    Layout::Rows
                } else {
                    Layout::Interleaved
                };
                evict(&buf[..n_mats * mat]);
                let t0 = Instant::now();
                for m in 0..n_mats {
                    let w = MatRef {
                        ty,
                        data: &buf[m * mat..(m + 1) * mat],
                        rows,
                        cols: COLS,
                        layout,
                    };
                    // The shapes are right by construction; a refusal only loses this pass.
                    let _ = matmul::matmul_tuned(level, t, pool, w, &x, 1, &mut out, &mut scratch);
                }
                let gbs = (n_mats * mat) as f64 / t0.elapsed().as_secs_f64() / 1e9;
                best[ci][pi] = best[ci][pi].max(gbs);
            }
        }
    }
    best
}

/// How much faster than the default a candidate must measure to replace it: a shared machine's
/// noise must not flip a choice, while a real loss (the 512-bit kernels on Zen 4 ran a third
/// slower than the 256-bit row kernels) is far larger.
const MARGIN: f64 = 1.05;

/// The candidate whose GB/s, summed over the pools, is highest, if it beats candidate `default`
/// by [`MARGIN`]; else `default`.
fn fastest(gbs: &[Vec<f64>], default: usize) -> usize {
    let best = best_of(gbs, 0..gbs.len()).unwrap_or(default);
    if score(gbs, best) > MARGIN * score(gbs, default) {
        best
    } else {
        default
    }
}

/// Candidate `i`'s GB/s summed over the pools.
fn score(gbs: &[Vec<f64>], i: usize) -> f64 {
    gbs[i].iter().sum()
}

/// The candidate of `among` with the highest [`score`].
fn best_of(gbs: &[Vec<f64>], among: impl Iterator<Item = usize>) -> Option<usize> {
    among.max_by(|&a, &b| score(gbs, a).total_cmp(&score(gbs, b)))
}

/// Measures the decode candidates this CPU has for `types` (others keep the default) on each
/// of `pools` (one thread and all cores, say: a choice must suit both) and returns the fastest
/// of each where it beats the level's default by [`MARGIN`], with the timings; each type's
/// software prefetch distance is measured with its interleaved kernels. Takes a fraction of a second; allocates [`stream_bytes`] for the
/// time it runs.
///
/// With `choose_kernels` false only the prefetch distance of the level's default kernels is
/// measured: a hint that changes no result, so every process on a machine computes the same
/// bits. Choosing between row and interleaved kernels, or the two widths, changes the rounding
/// (their sums run in other orders), and a choice made from noisy timings may differ between
/// two processes: a daemon and a `strata run` could then print different greedy text.
///
/// `max_bytes` caps what it allocates (at least [`MIN_STREAM_BYTES`]): a process that holds
/// its weights under a RAM budget must not spend a quarter of a GiB on a measurement (on a CPU
/// with a large last-level cache the measured bytes then partly come from it, and the prefetch
/// distance measured is a rougher hint).
pub fn measure(
    pools: &[&ThreadPool],
    types: &[GgmlType],
    reps: usize,
    choose_kernels: bool,
    max_bytes: usize,
) -> Measured {
    let level = dispatch::level();
    let mut tuning = Tuning::default_for(level);
    let mut timings = Vec::new();
    let types: Vec<GgmlType> = TYPES.into_iter().filter(|t| types.contains(t)).collect();
    if types.is_empty() || !Decode::Interleaved256.available(level) || pools.is_empty() {
        return Measured { tuning, timings };
    }
    // The bytes do not change the kernels' speed; 0x3C makes every f16 scale about 1 (no
    // infinities or subnormals on the way).
    let len = stream_bytes().min(max_bytes.max(MIN_STREAM_BYTES));
    let raw = vec![0x3Cu8; len + 4096];
    // Page-aligned, as a model's weights are (a large allocation starts 16 bytes into a page).
    let start = raw.as_ptr().align_offset(4096);
    let buf = &raw[start..start + len];
    let record = |timings: &mut Vec<Timing>, ty, cands: &[(Decode, Ahead)], gbs: &[Vec<f64>]| {
        for (c, g) in cands.iter().zip(gbs) {
            for (p, v) in pools.iter().zip(g) {
                timings.push(Timing {
                    ty,
                    decode: c.0,
                    ahead: c.1,
                    threads: p.n_threads(),
                    bytes_per_s: v * 1e9,
                });
            }
        }
    };

    // Per type: the row kernels, and each interleaved width at no software prefetch and at
    // 1, 2 and 4 tile blocks ahead (rounded to cache lines), into L1 and into L2.
    for ty in types {
        let tile = ty.row_bytes(ty.block_size()) * matmul::INTERLEAVE_ROWS;
        let want = tuning.decode(ty);
        // The row kernels only where the level's prefill GEMM reads rows: elsewhere a type
        // kept in rows for a faster decode would run every prompt through the row kernels
        // (qwen2.5-coder-1.5b pp512 at `STRATA_SIMD=avx2`: 47 t/s in rows, 107 interleaved).
        let rows = choose_kernels && matmul::has_row_gemm(ty, level);
        let mut cands = Vec::new();
        for d in [Decode::Rows, Decode::Interleaved256, Decode::Interleaved512] {
            // A type without a 512-bit kernel would time its 256-bit one twice.
            let has = match d {
                Decode::Rows => rows,
                Decode::Interleaved256 => d.available(level),
                Decode::Interleaved512 => {
                    d.available(level) && matmul::has_interleaved_512(ty, level)
                }
            };
            if has && (choose_kernels || d == want) {
                cands.push((d, Ahead::NONE));
                for l2 in [false, true] {
                    for k in [1, 2, 4] {
                        let bytes = (k * tile).next_multiple_of(64).min(MAX_PREFETCH);
                        cands.push((d, Ahead { bytes, l2 }));
                    }
                }
            }
        }
        let gbs = time_candidates(pools, buf, ty, &cands, reps);
        let default = cands
            .iter()
            .position(|c| c.0 == want && !c.1.l2 && c.1.bytes >= DEFAULT_PREFETCH.min(2 * tile))
            .unwrap_or(0);
        // The kernels must beat the default's by the margin (their rounding differs, and noise
        // must not flip it); the prefetch, which changes no bit, is then simply the fastest of
        // the chosen kernels'.
        let d = cands[fastest(&gbs, default)].0;
        let pick = best_of(&gbs, (0..cands.len()).filter(|&i| cands[i].0 == d)).unwrap_or(default);
        tuning = tuning.with(ty, d, cands[pick].1);
        record(&mut timings, ty, &cands, &gbs);
    }
    Measured { tuning, timings }
}

/// The timings as log lines' text: `Q4_K interleaved256 prefetch 4608: 1t 17.2 GB/s 2t 24.0
/// GB/s` (`prefetch 4608 l2` where the prefetches fill L2 only).
pub fn describe(m: &Measured) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut i = 0;
    while i < m.timings.len() {
        let t = &m.timings[i];
        let l2 = if t.ahead.l2 { " l2" } else { "" };
        let mut s = format!(
            "{} {} prefetch {}{l2}:",
            t.ty,
            t.decode.name(),
            t.ahead.bytes
        );
        let mut j = i;
        while j < m.timings.len()
            && m.timings[j].ty == t.ty
            && m.timings[j].decode == t.decode
            && m.timings[j].ahead == t.ahead
        {
            let u = &m.timings[j];
            s.push_str(&format!(" {}t {:.1} GB/s", u.threads, u.bytes_per_s / 1e9));
            j += 1;
        }
        lines.push(s);
        i = j;
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `can_evict` reads the same CPUID bit the kernel lists as `clflushopt`; eviction leaves
    /// the bytes as they were; and where it works a measurement streams only 64 MiB.
    #[test]
    fn eviction_follows_the_cpu_and_keeps_the_bytes() {
        if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo")
            && let Some(flags) = info.lines().find(|l| l.starts_with("flags"))
        {
            let listed = flags.split_whitespace().any(|f| f == "clflushopt");
            assert_eq!(can_evict(), listed, "{flags}");
        }
        let buf: Vec<u8> = (0..(1usize << 20) + 100).map(|i| (i * 31) as u8).collect();
        evict(&buf);
        evict(&buf[3..77]);
        assert!(buf.iter().enumerate().all(|(i, &b)| b == (i * 31) as u8));
        if can_evict() {
            assert_eq!(stream_bytes(), MIN_STREAM_BYTES);
        }
    }

    #[test]
    fn tuning_round_trips_through_its_encoding() {
        let a = |bytes, l2| Ahead { bytes, l2 };
        let t = Tuning::default_for(Level::Scalar)
            .with(GgmlType::Q4K, Decode::Interleaved256, a(9216, true))
            .with(GgmlType::Q6K, Decode::Rows, Ahead::NONE)
            .with(GgmlType::Q8_0, Decode::Interleaved512, a(3392, false))
            .with(
                GgmlType::Q5_0,
                Decode::Interleaved256,
                a(MAX_PREFETCH, true),
            )
            .with(GgmlType::Q4_1, Decode::Interleaved256, a(128, false))
            .with(GgmlType::Q5_1, Decode::Interleaved512, a(4608, true))
            .with(GgmlType::Q2K, Decode::Interleaved256, a(64, false));
        for i in 0..N_TYPES {
            assert_eq!(Tuning::decode_word(t.encode(i)), (t.decode[i], t.ahead[i]));
        }
        assert_eq!(t.ahead(GgmlType::Q5_0), a(MAX_PREFETCH, true));
        assert_eq!(t.ahead(GgmlType::Q8_0), a(3392, false));
        assert_eq!(t.decode(GgmlType::Q8_0), Decode::Interleaved512);
        assert_eq!(t.decode(GgmlType::Q4_0), Decode::Rows);
        assert_eq!(t.decode(GgmlType::Q5K), Decode::Rows);
        assert_eq!(t.decode(GgmlType::F16), Decode::Rows);
        for d in Decode::ALL {
            assert_eq!(Decode::parse(d.name()), Some(d));
        }
    }

    #[test]
    fn tuning_round_trips_through_its_summary() {
        let base = Tuning::default_for(Level::Scalar);
        let t = base
            .with(
                GgmlType::Q4K,
                Decode::Interleaved256,
                Ahead {
                    bytes: 9216,
                    l2: true,
                },
            )
            .with(GgmlType::Q6K, Decode::Interleaved512, Ahead::NONE)
            .with(GgmlType::Q8_0, Decode::Rows, Ahead::DEFAULT);
        assert!(t.summary().contains("Q4_K=interleaved256/9216/l2 "));
        assert_eq!(Tuning::parse(&t.summary(), base), Ok(t));
        // A choice stored before the cache was named fills L1; `l1` names it too.
        for s in ["Q4_K=interleaved256/9216", "Q4_K=interleaved256/9216/L1"] {
            let p = Tuning::parse(s, t).expect("parse");
            assert_eq!(p.ahead(GgmlType::Q4K).bytes, 9216);
            assert!(!p.ahead(GgmlType::Q4K).l2);
        }
        // Types not named keep the base's choice; names are not case-sensitive.
        let p = Tuning::parse("q6_k=ROWS", t).expect("parse");
        assert_eq!(p.decode(GgmlType::Q6K), Decode::Rows);
        assert_eq!(p.decode(GgmlType::Q4K), Decode::Interleaved256);
        assert_eq!(Tuning::parse("", t), Ok(t));
        for bad in [
            "Q4_K",
            "Q4_K=fast",
            "F32=rows",
            "Q4_K=interleaved256/-1",
            "Q4_K=interleaved256/999999",
            "Q4_K=interleaved256/x",
            "Q4_K=interleaved256/4608/l3",
            "Q4_K=interleaved256/4608/l2/l2",
        ] {
            let e = Tuning::parse(bad, base).expect_err(bad);
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn a_candidate_must_beat_the_default_by_the_margin() {
        let gbs = vec![vec![10.0, 20.0], vec![10.2, 20.3], vec![8.0, 15.0]];
        assert_eq!(fastest(&gbs, 0), 0);
        let gbs = vec![vec![10.0, 20.0], vec![12.0, 22.0], vec![8.0, 15.0]];
        assert_eq!(fastest(&gbs, 0), 1);
        assert_eq!(fastest(&gbs, 2), 1);
    }

    #[test]
    fn measure_picks_a_candidate_this_cpu_has() {
        let pool = ThreadPool::new(1);
        let m = measure(&[&pool], &[GgmlType::Q4K], 1, true, MIN_STREAM_BYTES);
        let level = dispatch::level();
        assert!(m.tuning.decode(GgmlType::Q4K).available(level));
        if Decode::Interleaved256.available(level) {
            // Seven prefetches of each interleaved width (none, and 1, 2 and 4 tile blocks
            // ahead into L1 and into L2), and of the row kernels exactly where the level's
            // prefill GEMM reads rows (elsewhere rows would slow prompts).
            let rows = m.timings.iter().any(|t| t.decode == Decode::Rows);
            assert_eq!(rows, matmul::has_row_gemm(GgmlType::Q4K, level));
            let n_rows = m
                .timings
                .iter()
                .filter(|t| t.decode == Decode::Rows)
                .count();
            assert_eq!(n_rows, if rows { 7 } else { 0 }, "{:?}", m.timings);
            assert!(m.timings.len() >= 7 + n_rows, "{:?}", m.timings);
            for l2 in [false, true] {
                assert_eq!(
                    m.timings
                        .iter()
                        .filter(|t| t.decode == Decode::Interleaved256 && t.ahead.l2 == l2)
                        .count(),
                    3 + usize::from(!l2),
                    "{:?}",
                    m.timings
                );
            }
            assert!(m.timings.iter().all(|t| t.bytes_per_s > 0.0));
            assert!(rows || m.tuning.decode(GgmlType::Q4K) != Decode::Rows);
        }
        // Without choosing kernels, only the default's prefetch distances are timed, and the
        // kernels stay the level's defaults (the same bits in every process).
        let m = measure(&[&pool], &[GgmlType::Q4K], 1, false, usize::MAX);
        let default = Tuning::default_for(level).decode(GgmlType::Q4K);
        assert_eq!(m.tuning.decode(GgmlType::Q4K), default);
        assert!(
            m.timings.iter().all(|t| t.decode == default),
            "{:?}",
            m.timings
        );
    }
}
