//! The dispatch table: for a weight type and a SIMD level, which activation format to quantize
//! to, which quantizer and which dot product to run.
//!
//! SIMD kernels are `unsafe` (`target_feature` plus raw block reads); the safe wrappers here
//! check the slice lengths and are only handed out by [`kernel`] for levels the CPU has, which
//! is what makes calling them sound.

use strata_storage::quant::GgmlType;

use crate::dispatch::{self, Level};
use crate::scalar;

/// A dot product of `n` elements: weight row bytes, activation row bytes.
pub(crate) type DotFn = fn(usize, &[u8], &[u8]) -> f32;
/// One weight row against `out.len()` (1..=[`MULTI_TOKENS`]) activation rows: element count,
/// weight row bytes, the first activation row's bytes onwards, the stride between activation
/// rows, and where the results go.
pub(crate) type MultiFn = fn(usize, &[u8], &[u8], usize, &mut [f32]);
/// The most tokens one [`MultiFn`] call takes.
pub(crate) const MULTI_TOKENS: usize = 4;
/// Rearranges a quantized activation row of `n` elements for a [`RowDecode`] kernel, into a
/// buffer of the row's size.
pub(crate) type PrepFn = fn(usize, &[u8], &mut [u8]);

/// Decode's kernel over row-major weights: the bits `multi` gives a lone token (a token's
/// outputs must not depend on the batch it came in), with the prefetch spread over each row's
/// blocks, and at some levels fewer instructions.
#[derive(Clone, Copy)]
pub(crate) struct RowDecode {
    /// Rearranges the token's activation row once per piece of rows, for `dot`.
    pub(crate) prep: Option<PrepFn>,
    /// One weight row against the (rearranged) activation row, prefetching as it goes.
    pub(crate) dot: RowDotFn,
}

/// [`DotFn`] with a software prefetch: each weight block asks for the bytes that far ahead.
pub(crate) type RowDotFn = fn(usize, &[u8], &[u8], crate::tune::Ahead) -> f32;

/// Quantizes a row of f32 activations into the partner format.
pub(crate) type QuantFn = fn(&[f32], &mut [u8]);

/// One 16-row tile of an interleaved matrix (`matmul::interleave`) against 1..=
/// [`INTERLEAVED_TOKENS`] tokens: block count, the tile's bytes, the first token's activation
/// row onwards, the stride between activation rows, the token count, where token `t`'s 16
/// results go (`out + t * out_stride`), `out_stride`, and the software prefetch (which may run
/// past the tile's end: a hint never faults).
///
/// # Safety
/// `out + t * out_stride` must be valid for writing 16 f32 for every token `t`, and no other
/// thread may access them during the call. The slices are checked.
pub(crate) type InterleavedFn =
    unsafe fn(usize, &[u8], &[u8], usize, usize, *mut f32, usize, crate::tune::Ahead);
/// The most tokens one [`InterleavedFn`] call takes.
pub(crate) const INTERLEAVED_TOKENS: usize = 4;

/// Weight rows in one tile of the tiled GEMM.
pub(crate) const GEMM_ROWS: usize = 16;

/// The tiled GEMM for prefill: a tile of [`GEMM_ROWS`] weight rows is packed once into a
/// thread's scratch, then multiplied into every token (`arch::x86_64::gemm` at AVX-512 VNNI,
/// `arch::x86_64::gemm_avx2` for interleaved Q4_K and Q6_K below it).
#[derive(Clone, Copy)]
pub(crate) struct Gemm {
    /// Columns per weight block.
    pub(crate) block_k: usize,
    /// Bytes of one packed block of a tile.
    pub(crate) packed_block: usize,
    /// Packs a tile: column count, the tile's first row onwards (`GEMM_ROWS` rows of
    /// `row_bytes`), `row_bytes`, destination (`cols / block_k * packed_block` bytes). `None`
    /// where the GEMM reads only interleaved matrices (AVX2's).
    pub(crate) pack: Option<PackFn>,
    /// Side data computed from each quantized activation row, `side_bytes` per block, or
    /// nothing.
    pub(crate) side: Option<SideFn>,
    /// Bytes of side data per activation block (0 without `side`).
    pub(crate) side_bytes: usize,
    /// Multiplies a packed tile into tokens; see [`GemmRunFn`].
    pub(crate) run: GemmRunFn,
    /// Packs a tile of an interleaved matrix (same arguments as `pack`, the tile's bytes
    /// from its start), for the types that have that layout.
    pub(crate) pack_interleaved: Option<PackFn>,
}

pub(crate) type PackFn = fn(usize, &[u8], usize, &mut [u8]);
/// Computes a quantized activation row's side data.
pub(crate) type SideFn = fn(&[u8], &mut [u8]);

/// Column count, packed tile, activation rows (`act_row` bytes apart), side rows (`side_row`
/// bytes apart), token count, and where token `t`'s 16 results go: `out + t * out_stride`.
///
/// # Safety
/// `out + t * out_stride` must be valid for writing 16 f32 for every token `t`, and no other
/// thread may access them during the call. The slices are checked.
pub(crate) type GemmRunFn =
    unsafe fn(usize, &[u8], &[u8], usize, &[u8], usize, usize, *mut f32, usize);

/// The format activations are converted to before the dot products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Act {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q8_1,
    Q8K,
}

impl Act {
    pub(crate) const fn ty(self) -> GgmlType {
        match self {
            Act::F32 => GgmlType::F32,
            Act::F16 => GgmlType::F16,
            Act::Bf16 => GgmlType::Bf16,
            Act::Q8_0 => GgmlType::Q8_0,
            Act::Q8_1 => GgmlType::Q8_1,
            Act::Q8K => GgmlType::Q8K,
        }
    }

    /// The partner format of a weight type (ggml's `vec_dot_type`).
    pub(crate) const fn for_weight(ty: GgmlType) -> Option<Act> {
        Some(match ty {
            GgmlType::F32 => Act::F32,
            GgmlType::F16 => Act::F16,
            GgmlType::Bf16 => Act::Bf16,
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => Act::Q8_0,
            GgmlType::Q4_1 | GgmlType::Q5_1 => Act::Q8_1,
            GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => {
                Act::Q8K
            }
            _ => return None,
        })
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Kernel {
    pub(crate) act: Act,
    pub(crate) quantize: QuantFn,
    pub(crate) dot: DotFn,
    /// The multi-token kernel for prefill, where this type and level have one.
    pub(crate) multi: Option<MultiFn>,
    /// Decode's single-token kernel over row-major weights, for the types with `multi`.
    pub(crate) row_decode: Option<RowDecode>,
    /// The tiled GEMM for larger batches, where this type and level have one.
    pub(crate) gemm: Option<Gemm>,
    /// The kernel over the interleaved layout, where this type and level have one (matrices
    /// are only interleaved then).
    pub(crate) interleaved: Option<InterleavedFn>,
}

/// The kernel for `ty` at `level`, lowered to what this CPU has; `None` for unsupported types.
/// The interleaved kernel is the 512-bit one when `wide` and `level` has it, else the 256-bit
/// one.
pub(crate) fn kernel(ty: GgmlType, level: Level, wide: bool) -> Option<Kernel> {
    let act = Act::for_weight(ty)?;
    let level = level.min(dispatch::detected());
    Some(Kernel {
        act,
        quantize: quantizer(act, level),
        dot: dot(ty, level)?,
        multi: multi(ty, level),
        row_decode: row_decode(ty, level),
        gemm: gemm(ty, level),
        interleaved: interleaved(ty, level, wide),
    })
}

fn scalar_dot(ty: GgmlType) -> Option<DotFn> {
    use scalar::dot::*;
    Some(match ty {
        GgmlType::F32 => dot_f32,
        GgmlType::F16 => dot_f16,
        GgmlType::Bf16 => dot_bf16,
        GgmlType::Q4_0 => dot_q4_0,
        GgmlType::Q4_1 => dot_q4_1,
        GgmlType::Q5_0 => dot_q5_0,
        GgmlType::Q5_1 => dot_q5_1,
        GgmlType::Q8_0 => dot_q8_0,
        GgmlType::Q2K => dot_q2_k,
        GgmlType::Q3K => dot_q3_k,
        GgmlType::Q4K => dot_q4_k,
        GgmlType::Q5K => dot_q5_k,
        GgmlType::Q6K => dot_q6_k,
        _ => return None,
    })
}

fn scalar_quantizer(act: Act) -> QuantFn {
    use scalar::act::*;
    match act {
        Act::F32 => copy_f32,
        Act::F16 => quantize_f16,
        Act::Bf16 => quantize_bf16,
        Act::Q8_0 => quantize_q8_0,
        Act::Q8_1 => quantize_q8_1,
        Act::Q8K => quantize_q8_k,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn dot(ty: GgmlType, level: Level) -> Option<DotFn> {
    // NEON (with `sdot` where the CPU has it) for the types it covers; `STRATA_SIMD=scalar`
    // lowers `level` below `Neon` and so forces the scalar twins.
    #[cfg(target_arch = "aarch64")]
    if level >= Level::Neon
        && let Some(k) = crate::arch::aarch64::dot(ty)
    {
        return Some(k);
    }
    let _ = level;
    scalar_dot(ty)
}

#[cfg(not(target_arch = "x86_64"))]
fn quantizer(act: Act, _level: Level) -> QuantFn {
    scalar_quantizer(act)
}

#[cfg(not(target_arch = "x86_64"))]
fn multi(_ty: GgmlType, _level: Level) -> Option<MultiFn> {
    None
}

#[cfg(not(target_arch = "x86_64"))]
fn row_decode(_ty: GgmlType, _level: Level) -> Option<RowDecode> {
    None
}

#[cfg(not(target_arch = "x86_64"))]
fn gemm(_ty: GgmlType, _level: Level) -> Option<Gemm> {
    None
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn interleaved(_ty: GgmlType, _level: Level, _wide: bool) -> Option<InterleavedFn> {
    None
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn has_interleaved_512(_ty: GgmlType, _level: Level) -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
use x86::{dot, gemm, multi, quantizer, row_decode};
#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{has_interleaved_512, interleaved};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use crate::arch::x86_64::{
        avx2, avx512, gemm as tiled, gemm_avx2 as il2gemm, interleaved as il,
        interleaved_avx2 as il2, interleaved_avx2_kq as il2kq, interleaved_vnni256 as il_vnni,
        multi,
    };

    /// Panics unless `w` holds a row of `n` elements of `ty` and `a` one of `act`: what makes
    /// a dot product's block reads sound.
    fn check_rows(ty: GgmlType, act: Act, n: usize, w: &[u8], a: &[u8]) {
        assert!(
            n.is_multiple_of(ty.block_size())
                && w.len() >= ty.row_bytes(n)
                && a.len() >= act.ty().row_bytes(n),
            "dot kernel called with short rows"
        );
    }

    /// A safe wrapper around an `unsafe` SIMD dot product. Sound because [`dot`] hands it out
    /// only when `dispatch::detected()` is at least the level the kernel needs, and the
    /// lengths are checked here.
    macro_rules! wrap_dot {
        ($name:ident, $kernel:path, $wty:expr, $act:expr) => {
            fn $name(n: usize, w: &[u8], a: &[u8]) -> f32 {
                check_rows($wty, $act, n, w, a);
                // SAFETY: the CPU has the kernel's features (see the macro docs) and both rows
                // hold `n` elements (checked above).
                unsafe { $kernel(n, w, a) }
            }
        };
    }

    macro_rules! wrap_quant {
        ($name:ident, $kernel:path, $act:expr) => {
            fn $name(x: &[f32], y: &mut [u8]) {
                let ty = $act.ty();
                assert!(
                    x.len().is_multiple_of(ty.block_size()) && y.len() >= ty.row_bytes(x.len()),
                    "quantizer called with a bad row"
                );
                // SAFETY: the CPU has the kernel's features (handed out by `quantizer` only
                // then) and `y` holds the quantized row (checked above).
                unsafe { $kernel(x, y) }
            }
        };
    }

    /// A safe wrapper around a family of `unsafe` multi-token kernels (`multi::$lvl::$k::<NT>`),
    /// sound for the same reasons as `wrap_dot!`: handed out by [`multi`] only for levels the
    /// CPU has, and every row length checked here.
    macro_rules! wrap_multi {
        ($name:ident, $lvl:ident :: $k:ident, $wty:expr, $act:expr) => {
            fn $name(n: usize, w: &[u8], a: &[u8], act_row: usize, out: &mut [f32]) {
                let nt = out.len();
                assert!(
                    (1..=MULTI_TOKENS).contains(&nt)
                        && n.is_multiple_of($wty.block_size())
                        && w.len() >= $wty.row_bytes(n)
                        && act_row >= $act.ty().row_bytes(n)
                        && a.len() >= (nt - 1) * act_row + $act.ty().row_bytes(n),
                    "multi-token kernel called with short rows"
                );
                let (w, a) = (w.as_ptr(), a.as_ptr());
                // SAFETY: the CPU has the kernel's features (see the macro docs); the weight
                // row and `nt` activation rows `act_row` apart hold `n` elements (checked).
                unsafe {
                    match nt {
                        1 => call::<1>(n, w, a, act_row, out, multi::$lvl::$k::<1>),
                        2 => call::<2>(n, w, a, act_row, out, multi::$lvl::$k::<2>),
                        3 => call::<3>(n, w, a, act_row, out, multi::$lvl::$k::<3>),
                        _ => call::<4>(n, w, a, act_row, out, multi::$lvl::$k::<4>),
                    }
                }
            }
        };
    }

    /// A [`RowDotFn`] from a family of multi-token kernels: its one-token kernel, prefetching.
    /// Sound as `wrap_multi!`.
    macro_rules! wrap_multi_row {
        ($name:ident, $lvl:ident :: $k:ident, $wty:expr, $act:expr) => {
            fn $name(n: usize, w: &[u8], a: &[u8], ahead: crate::tune::Ahead) -> f32 {
                check_rows($wty, $act, n, w, a);
                let mut out = [0f32];
                // SAFETY: the CPU has the kernel's features (handed out by `row_decode` only
                // then); the rows hold `n` elements (checked); the prefetch is a hint.
                unsafe { multi::$lvl::$k::<1>(n, w.as_ptr(), a.as_ptr(), 0, &mut out, ahead) };
                out[0]
            }
        };
    }

    /// Runs a kernel for exactly `NT` tokens into `out` (whose length is `NT`).
    ///
    /// # Safety
    /// As for the kernel `k`.
    unsafe fn call<const NT: usize>(
        n: usize,
        w: *const u8,
        a: *const u8,
        act_row: usize,
        out: &mut [f32],
        k: unsafe fn(usize, *const u8, *const u8, usize, &mut [f32; NT], crate::tune::Ahead),
    ) {
        let mut r = [0f32; NT];
        // SAFETY: forwarded contract.
        unsafe { k(n, w, a, act_row, &mut r, crate::tune::Ahead::NONE) };
        out.copy_from_slice(&r);
    }

    use GgmlType as T;
    wrap_multi!(avx2_multi_q4_k, avx2::q4_k, T::Q4K, Act::Q8K);
    wrap_multi!(avx2_multi_q6_k, avx2::q6_k, T::Q6K, Act::Q8K);
    wrap_multi!(avx2_multi_q3_k, avx2::q3_k, T::Q3K, Act::Q8K);
    wrap_multi!(avx2_multi_q2_k, avx2::q2_k, T::Q2K, Act::Q8K);
    wrap_multi!(avx2_multi_q4_0, avx2::q4_0, T::Q4_0, Act::Q8_0);
    wrap_multi!(avx2_multi_q5_0, avx2::q5_0, T::Q5_0, Act::Q8_0);
    wrap_multi!(avx2_multi_q8_0, avx2::q8_0, T::Q8_0, Act::Q8_0);
    wrap_multi!(vnni_multi_q4_k, vnni::q4_k, T::Q4K, Act::Q8K);
    wrap_multi!(vnni_multi_q6_k, vnni::q6_k, T::Q6K, Act::Q8K);
    wrap_multi!(vnni_multi_q3_k, vnni::q3_k, T::Q3K, Act::Q8K);
    wrap_multi!(vnni_multi_q2_k, vnni::q2_k, T::Q2K, Act::Q8K);
    wrap_multi!(vnni_multi_q4_0, vnni::q4_0, T::Q4_0, Act::Q8_0);
    wrap_multi!(vnni_multi_q5_0, vnni::q5_0, T::Q5_0, Act::Q8_0);
    wrap_multi!(vnni_multi_q8_0, vnni::q8_0, T::Q8_0, Act::Q8_0);
    wrap_multi_row!(avx2_row_q4_k, avx2::q4_k, T::Q4K, Act::Q8K);
    wrap_multi_row!(avx2_row_q6_k, avx2::q6_k, T::Q6K, Act::Q8K);
    wrap_multi_row!(avx2_row_q3_k, avx2::q3_k, T::Q3K, Act::Q8K);
    wrap_multi_row!(avx2_row_q2_k, avx2::q2_k, T::Q2K, Act::Q8K);
    wrap_multi_row!(avx2_row_q4_0, avx2::q4_0, T::Q4_0, Act::Q8_0);
    wrap_multi_row!(avx2_row_q5_0, avx2::q5_0, T::Q5_0, Act::Q8_0);
    wrap_multi_row!(avx2_row_q8_0, avx2::q8_0, T::Q8_0, Act::Q8_0);
    wrap_multi_row!(vnni_row_q3_k, vnni::q3_k, T::Q3K, Act::Q8K);
    wrap_multi_row!(vnni_row_q2_k, vnni::q2_k, T::Q2K, Act::Q8K);
    wrap_multi_row!(vnni_row_q4_0, vnni::q4_0, T::Q4_0, Act::Q8_0);
    wrap_multi_row!(vnni_row_q5_0, vnni::q5_0, T::Q5_0, Act::Q8_0);
    wrap_multi_row!(vnni_row_q8_0, vnni::q8_0, T::Q8_0, Act::Q8_0);

    /// A type's multi-token kernels and decode's row kernel (with its activation
    /// rearrangement, if any) at one level.
    type Family = (GgmlType, MultiFn, RowDotFn, Option<PrepFn>);

    /// Decode's row kernels are each type's one-token `multi` kernel, prefetching block by
    /// block (a row at a time, a long row's lines had filled the core's queues in a burst);
    /// at AVX-512 VNNI, Q4_K and Q6_K have 512-bit ones that do `multi::vnni`'s arithmetic lane
    /// for lane (`fold_i32x16` adds the two 256-bit halves' exact integer sums into the lanes
    /// the 256-bit kernel fills) with half its vector instructions per block, the Q4_K one on
    /// activations rearranged once per piece of rows.
    const VNNI_FAMILIES: [Family; 7] = [
        (
            T::Q4K,
            vnni_multi_q4_k,
            vnni_q4_k_rows,
            Some(avx512::prep_q4_k),
        ),
        (T::Q6K, vnni_multi_q6_k, vnni_q6_k_rows, None),
        (T::Q3K, vnni_multi_q3_k, vnni_row_q3_k, None),
        (T::Q2K, vnni_multi_q2_k, vnni_row_q2_k, None),
        (T::Q4_0, vnni_multi_q4_0, vnni_row_q4_0, None),
        (T::Q5_0, vnni_multi_q5_0, vnni_row_q5_0, None),
        (T::Q8_0, vnni_multi_q8_0, vnni_row_q8_0, None),
    ];
    const AVX2_FAMILIES: [Family; 7] = [
        (T::Q4K, avx2_multi_q4_k, avx2_row_q4_k, None),
        (T::Q6K, avx2_multi_q6_k, avx2_row_q6_k, None),
        (T::Q3K, avx2_multi_q3_k, avx2_row_q3_k, None),
        (T::Q2K, avx2_multi_q2_k, avx2_row_q2_k, None),
        (T::Q4_0, avx2_multi_q4_0, avx2_row_q4_0, None),
        (T::Q5_0, avx2_multi_q5_0, avx2_row_q5_0, None),
        (T::Q8_0, avx2_multi_q8_0, avx2_row_q8_0, None),
    ];

    fn family(ty: GgmlType, level: Level) -> Option<&'static Family> {
        let table: &[Family] = if level >= Level::Avx512Vnni {
            &VNNI_FAMILIES
        } else if level >= Level::Avx2 {
            &AVX2_FAMILIES
        } else {
            return None;
        };
        table.iter().find(|f| f.0 == ty)
    }

    pub(super) fn row_decode(ty: GgmlType, level: Level) -> Option<RowDecode> {
        family(ty, level).map(|&(_, _, dot, prep)| RowDecode { prep, dot })
    }

    pub(super) fn multi(ty: GgmlType, level: Level) -> Option<MultiFn> {
        family(ty, level).map(|f| f.1)
    }

    /// A tile's packer, sound for the same reasons as `wrap_dot!`: handed out by [`gemm`] only
    /// when the CPU has AVX-512 VNNI, and the lengths are checked here.
    macro_rules! wrap_pack {
        ($name:ident, $kernel:path, $wty:expr, $packed:expr) => {
            fn $name(cols: usize, w: &[u8], row_bytes: usize, dst: &mut [u8]) {
                let nb = cols / $wty.block_size();
                assert!(
                    cols.is_multiple_of($wty.block_size())
                        && row_bytes >= $wty.row_bytes(cols)
                        && GEMM_ROWS * row_bytes <= i32::MAX as usize
                        && w.len() >= (GEMM_ROWS - 1) * row_bytes + $wty.row_bytes(cols)
                        && dst.len() >= nb * $packed,
                    "tile packer called with short rows"
                );
                // SAFETY: the CPU has the features (see the macro docs); 16 rows of `nb`
                // blocks and `nb` packed blocks are in bounds (checked above).
                unsafe { $kernel(w.as_ptr(), row_bytes, nb, dst.as_mut_ptr()) }
            }
        };
    }

    wrap_pack!(pack_q4_k, tiled::pack_q4_k, T::Q4K, tiled::Q4K_PACKED);
    wrap_pack!(pack_q6_k, tiled::pack_q6_k, T::Q6K, tiled::Q6K_PACKED);

    /// Packers of interleaved tiles, sound as `wrap_pack!`'s: handed out by [`gemm`] only
    /// with AVX-512 VNNI, lengths checked here.
    macro_rules! wrap_pack_interleaved {
        ($name:ident, $kernel:path, $wty:expr, $tile_block:expr, $packed:expr) => {
            fn $name(cols: usize, w: &[u8], row_bytes: usize, dst: &mut [u8]) {
                let nb = cols / 256;
                assert!(
                    cols.is_multiple_of(256)
                        && row_bytes == $wty.row_bytes(cols)
                        && w.len() >= nb * $tile_block
                        && dst.len() >= nb * $packed,
                    "interleaved tile packer called with short rows"
                );
                // SAFETY: the CPU has the features; `nb` tile blocks and packed blocks are in
                // bounds (checked above).
                unsafe { $kernel(w.as_ptr(), nb, dst.as_mut_ptr()) }
            }
        };
    }
    wrap_pack_interleaved!(
        pack_q4_k_interleaved,
        tiled::pack_q4_k_interleaved,
        T::Q4K,
        crate::matmul::interleave::Q4K_TILE_BLOCK,
        tiled::Q4K_PACKED
    );
    wrap_pack_interleaved!(
        pack_q6_k_interleaved,
        tiled::pack_q6_k_interleaved,
        T::Q6K,
        crate::matmul::interleave::Q6K_TILE_BLOCK,
        tiled::Q6K_PACKED
    );
    fn pack_legacy_interleaved(ty: tiled::Legacy, cols: usize, w: &[u8], dst: &mut [u8]) {
        use crate::matmul::interleave::{Q5_0_TILE_BLOCK, Q8_0_TILE_BLOCK};
        let nb = cols / 32;
        let block = if ty == tiled::Legacy::Q5_0 {
            Q5_0_TILE_BLOCK
        } else {
            Q8_0_TILE_BLOCK
        };
        assert!(
            cols.is_multiple_of(32)
                && w.len() >= nb * block
                && dst.len() >= nb * tiled::LEGACY_PACKED,
            "interleaved tile packer called with short rows"
        );
        // SAFETY: the CPU has the features (handed out by [`gemm`] only with AVX-512 VNNI);
        // `nb` tile blocks and packed blocks are in bounds (checked above).
        unsafe { tiled::pack_legacy_interleaved(ty, w.as_ptr(), nb, dst.as_mut_ptr()) }
    }
    fn pack_q8_0_interleaved(cols: usize, w: &[u8], _row_bytes: usize, dst: &mut [u8]) {
        pack_legacy_interleaved(tiled::Legacy::Q8_0, cols, w, dst)
    }
    fn pack_q5_0_interleaved(cols: usize, w: &[u8], _row_bytes: usize, dst: &mut [u8]) {
        pack_legacy_interleaved(tiled::Legacy::Q5_0, cols, w, dst)
    }
    wrap_pack!(pack_q4_0, tiled::pack_q4_0, T::Q4_0, tiled::LEGACY_PACKED);
    wrap_pack!(pack_q5_0, tiled::pack_q5_0, T::Q5_0, tiled::LEGACY_PACKED);
    wrap_pack!(pack_q8_0, tiled::pack_q8_0, T::Q8_0, tiled::LEGACY_PACKED);

    fn side_q4_0(act: &[u8], side: &mut [u8]) {
        tiled::legacy_side(tiled::Legacy::Q4_0, act, side)
    }
    fn side_q5_0(act: &[u8], side: &mut [u8]) {
        tiled::legacy_side(tiled::Legacy::Q5_0, act, side)
    }
    fn side_q8_0(act: &[u8], side: &mut [u8]) {
        tiled::legacy_side(tiled::Legacy::Q8_0, act, side)
    }

    /// Runs a tile kernel over `n_tok` tokens in groups of `$nt` (its `TILE_TOKENS`);
    /// `$k!(NT, ...)` is one group, and `$n` lists the smaller group sizes.
    macro_rules! wrap_run {
        ($name:ident, $packed:expr, $act:expr, $side_bytes:expr, $k:ident, $nt:expr; $($n:literal),*) => {
            /// # Safety
            /// See [`GemmRunFn`]; the CPU has the kernel's features (handed out by [`gemm`]
            /// only then).
            #[allow(clippy::too_many_arguments)]
            unsafe fn $name(
                cols: usize,
                packed: &[u8],
                act: &[u8],
                act_row: usize,
                side: &[u8],
                side_row: usize,
                n_tok: usize,
                out: *mut f32,
                out_stride: usize,
            ) {
                let ty = $act.ty();
                let nb = cols / ty.block_size();
                let side_bytes: usize = $side_bytes;
                // At least one block: the 256-bit kernels keep their running sums in `out`.
                assert!(
                    cols.is_multiple_of(ty.block_size())
                        && nb > 0
                        && packed.len() >= nb * $packed
                        && act_row >= ty.row_bytes(cols)
                        && (n_tok == 0 || act.len() >= (n_tok - 1) * act_row + ty.row_bytes(cols))
                        && (side_bytes == 0
                            || (side_row >= nb * side_bytes
                                && (n_tok == 0
                                    || side.len() >= (n_tok - 1) * side_row + nb * side_bytes))),
                    "tile kernel called with short rows"
                );
                const NT: usize = $nt;
                let (pk, a, s) = (packed.as_ptr(), act.as_ptr(), side.as_ptr());
                let mut t0 = 0;
                while t0 < n_tok {
                    let nt = (n_tok - t0).min(NT);
                    // SAFETY: the CPU has the features; tokens t0..t0 + nt are in bounds
                    // (checked above) and their outputs writable (caller's contract).
                    unsafe {
                        let (a, s, o) = (
                            a.add(t0 * act_row),
                            s.add(t0 * side_row),
                            out.add(t0 * out_stride),
                        );
                        match nt {
                            $($n => $k!($n, nb, pk, a, act_row, s, side_row, o, out_stride),)*
                            _ => $k!(NT, nb, pk, a, act_row, s, side_row, o, out_stride),
                        }
                    }
                    t0 += nt;
                }
            }
        };
    }

    macro_rules! call_q4_k {
        ($nt:expr, $nb:expr, $pk:expr, $a:expr, $ar:expr, $s:expr, $sr:expr, $o:expr, $os:expr) => {{
            let _ = ($s, $sr);
            tiled::k_quant::<$nt, 8>($nb, $pk, $a, $ar, $o, $os)
        }};
    }
    macro_rules! call_q6_k {
        ($nt:expr, $nb:expr, $pk:expr, $a:expr, $ar:expr, $s:expr, $sr:expr, $o:expr, $os:expr) => {{
            let _ = ($s, $sr);
            tiled::k_quant::<$nt, 16>($nb, $pk, $a, $ar, $o, $os)
        }};
    }
    macro_rules! call_legacy {
        ($nt:expr, $nb:expr, $pk:expr, $a:expr, $ar:expr, $s:expr, $sr:expr, $o:expr, $os:expr) => {
            tiled::legacy::<$nt>($nb, $pk, $a, $ar, $s, $sr, $o, $os)
        };
    }
    const TT: usize = tiled::TILE_TOKENS;
    wrap_run!(run_q4_k, tiled::Q4K_PACKED, Act::Q8K, 0, call_q4_k, TT; 1, 2, 3, 4, 5, 6, 7);
    wrap_run!(run_q6_k, tiled::Q6K_PACKED, Act::Q8K, 0, call_q6_k, TT; 1, 2, 3, 4, 5, 6, 7);
    wrap_run!(run_legacy, tiled::LEGACY_PACKED, Act::Q8_0, 8, call_legacy, TT; 1, 2, 3, 4, 5, 6, 7);

    /// The side data of a Q8_K row for AVX2's and AVX-VNNI's GEMMs (`il2gemm::$kernel`,
    /// `$bytes` per block); sound as `wrap_dot!`: handed out by [`gemm`] only at AVX2 and above,
    /// lengths checked here.
    macro_rules! wrap_side_avx2 {
        ($name:ident, $kernel:ident, $bytes:expr) => {
            fn $name(act: &[u8], side: &mut [u8]) {
                let nb = act.len() / T::Q8K.row_bytes(256);
                assert!(
                    side.len() >= nb * $bytes,
                    "side data called with a short row"
                );
                // SAFETY: the CPU has AVX2 (see above); `nb` blocks and their side bytes are
                // in bounds (checked).
                unsafe { il2gemm::$kernel(act.as_ptr(), nb, side.as_mut_ptr()) }
            }
        };
    }
    wrap_side_avx2!(side_q4_k_avx2, side_q4k, il2gemm::Q4K_SIDE);
    wrap_side_avx2!(side_q6_k_vnni, side_q6k_vnni, il2gemm::Q6K_SIDE_VNNI);

    /// Packers of interleaved K-quant tiles for AVX2's and AVX-VNNI's GEMMs (`$vnni`: scales
    /// as f32 for the latter); sound as `wrap_side_avx2!`'s.
    macro_rules! wrap_pack_avx2 {
        ($name:ident, $kernel:ident, $vnni:expr, $wty:expr, $tile_block:expr, $packed:expr) => {
            fn $name(cols: usize, w: &[u8], row_bytes: usize, dst: &mut [u8]) {
                let nb = cols / 256;
                assert!(
                    cols.is_multiple_of(256)
                        && row_bytes == $wty.row_bytes(cols)
                        && w.len() >= nb * $tile_block
                        && dst.len() >= nb * $packed,
                    "interleaved tile packer called with short rows"
                );
                // SAFETY: the CPU has AVX2; `nb` tile blocks and packed blocks are in bounds
                // (checked above).
                unsafe { il2gemm::$kernel::<$vnni>(w.as_ptr(), nb, dst.as_mut_ptr()) }
            }
        };
    }
    use crate::matmul::interleave::{Q4K_TILE_BLOCK, Q6K_TILE_BLOCK};
    wrap_pack_avx2!(
        pack_q4_k_avx2,
        pack_q4k_interleaved,
        false,
        T::Q4K,
        Q4K_TILE_BLOCK,
        il2gemm::Q4K_PACKED
    );
    wrap_pack_avx2!(
        pack_q4_k_vnni,
        pack_q4k_interleaved,
        true,
        T::Q4K,
        Q4K_TILE_BLOCK,
        il2gemm::Q4K_PACKED
    );
    wrap_pack_avx2!(
        pack_q6_k_avx2,
        pack_q6k_interleaved,
        false,
        T::Q6K,
        Q6K_TILE_BLOCK,
        il2gemm::Q6K_PACKED
    );
    wrap_pack_avx2!(
        pack_q6_k_vnni,
        pack_q6k_interleaved,
        true,
        T::Q6K,
        Q6K_TILE_BLOCK,
        il2gemm::Q6K_PACKED
    );

    // One group of AVX2's or AVX-VNNI's tile kernels, for `wrap_run!`.
    macro_rules! call_q4_k_avx2 {
        ($nt:expr, $nb:expr, $pk:expr, $a:expr, $ar:expr, $s:expr, $sr:expr, $o:expr, $os:expr) => {
            il2gemm::q4k::<$nt>($nb, $pk, $a, $ar, $s, $sr, $o, $os)
        };
    }
    macro_rules! call_q6_k_avx2 {
        ($nt:expr, $nb:expr, $pk:expr, $a:expr, $ar:expr, $s:expr, $sr:expr, $o:expr, $os:expr) => {
            il2gemm::q6k::<$nt>($nb, $pk, $a, $ar, $s, $sr, $o, $os)
        };
    }
    macro_rules! call_q4_k_vnni {
        ($nt:expr, $nb:expr, $pk:expr, $a:expr, $ar:expr, $s:expr, $sr:expr, $o:expr, $os:expr) => {
            il2gemm::vnni::q4k::<$nt>($nb, $pk, $a, $ar, $s, $sr, $o, $os)
        };
    }
    macro_rules! call_q6_k_vnni {
        ($nt:expr, $nb:expr, $pk:expr, $a:expr, $ar:expr, $s:expr, $sr:expr, $o:expr, $os:expr) => {
            il2gemm::vnni::q6k::<$nt>($nb, $pk, $a, $ar, $s, $sr, $o, $os)
        };
    }
    const T2: usize = il2gemm::TILE_TOKENS;
    use il2gemm::{Q4K_PACKED as P4, Q4K_SIDE as S4, Q6K_PACKED as P6, Q6K_SIDE_VNNI as S6};
    wrap_run!(run_q4_k_avx2, P4, Act::Q8K, S4, call_q4_k_avx2, T2; 1, 2, 3);
    wrap_run!(run_q6_k_avx2, P6, Act::Q8K, 0, call_q6_k_avx2, T2; 1, 2, 3);
    wrap_run!(run_q4_k_vnni, P4, Act::Q8K, S4, call_q4_k_vnni, T2; 1, 2, 3);
    wrap_run!(run_q6_k_vnni, P6, Act::Q8K, S6, call_q6_k_vnni, T2; 1, 2, 3);

    pub(super) fn gemm(ty: GgmlType, level: Level) -> Option<Gemm> {
        if level < Level::Avx512Vnni {
            // AVX2's and AVX-VNNI's GEMMs read interleaved tiles only (their prefill in rows
            // keeps the row kernels).
            let vnni = level == Level::AvxVnni;
            if level < Level::Avx2 || (vnni && !dispatch::has_avx_vnni()) {
                return None;
            }
            let k = |packed_block, side, side_bytes, run, pack| Gemm {
                block_k: 256,
                packed_block,
                pack: None,
                side,
                side_bytes,
                run,
                pack_interleaved: Some(pack),
            };
            let (q4, q6) = (il2gemm::Q4K_PACKED, il2gemm::Q6K_PACKED);
            let side4: Option<SideFn> = Some(side_q4_k_avx2);
            return match (ty, vnni) {
                (T::Q4K, false) => Some(k(
                    q4,
                    side4,
                    il2gemm::Q4K_SIDE,
                    run_q4_k_avx2,
                    pack_q4_k_avx2,
                )),
                (T::Q6K, false) => Some(k(q6, None, 0, run_q6_k_avx2, pack_q6_k_avx2)),
                (T::Q4K, true) => Some(k(
                    q4,
                    side4,
                    il2gemm::Q4K_SIDE,
                    run_q4_k_vnni,
                    pack_q4_k_vnni,
                )),
                (T::Q6K, true) => Some(k(
                    q6,
                    Some(side_q6_k_vnni),
                    il2gemm::Q6K_SIDE_VNNI,
                    run_q6_k_vnni,
                    pack_q6_k_vnni,
                )),
                _ => None,
            };
        }
        let k_quant = |pack: PackFn, packed_block, run, pack_interleaved| Gemm {
            block_k: 256,
            packed_block,
            pack: Some(pack),
            side: None,
            side_bytes: 0,
            run,
            pack_interleaved,
        };
        let legacy = |pack: PackFn, side: SideFn, pack_interleaved| Gemm {
            block_k: 32,
            packed_block: tiled::LEGACY_PACKED,
            pack: Some(pack),
            side: Some(side),
            side_bytes: 8,
            run: run_legacy,
            pack_interleaved,
        };
        Some(match ty {
            T::Q4K => k_quant(
                pack_q4_k,
                tiled::Q4K_PACKED,
                run_q4_k,
                Some(pack_q4_k_interleaved as PackFn),
            ),
            T::Q6K => k_quant(
                pack_q6_k,
                tiled::Q6K_PACKED,
                run_q6_k,
                Some(pack_q6_k_interleaved as PackFn),
            ),
            T::Q4_0 => legacy(pack_q4_0, side_q4_0, None),
            T::Q5_0 => legacy(pack_q5_0, side_q5_0, Some(pack_q5_0_interleaved as PackFn)),
            T::Q8_0 => legacy(pack_q8_0, side_q8_0, Some(pack_q8_0_interleaved as PackFn)),
            _ => return None,
        })
    }

    /// A safe-to-hand-out wrapper around an interleaved kernel family
    /// (`$m::$k::<NT, $g>`: `il` for AVX-512 VNNI, `il2` for AVX2; `$g` a second generic
    /// argument where the family has one), sound as `wrap_dot!`'s:
    /// [`interleaved`] hands it out only when the CPU has the family's features, and the
    /// lengths are checked here.
    macro_rules! wrap_interleaved {
        ($name:ident, $m:ident :: $k:ident $(, $g:tt)?; $tile_block:expr, $act:expr, $bs:expr) => {
            /// # Safety
            /// See [`InterleavedFn`].
            #[allow(clippy::too_many_arguments)]
            unsafe fn $name(
                nb: usize,
                tile: &[u8],
                act: &[u8],
                act_row: usize,
                nt: usize,
                out: *mut f32,
                out_stride: usize,
                ahead: crate::tune::Ahead,
            ) {
                let row = $act.row_bytes(nb * $bs);
                assert!(
                    (1..=INTERLEAVED_TOKENS).contains(&nt)
                        && tile.len() >= nb * $tile_block
                        && act_row >= row
                        && act.len() >= (nt - 1) * act_row + row,
                    "interleaved kernel called with short rows"
                );
                let (w, a) = (tile.as_ptr(), act.as_ptr());
                // SAFETY: the CPU has the features (see above); the tile and `nt` activation
                // rows hold `nb` blocks (checked); the outputs are the caller's.
                unsafe {
                    match nt {
                        1 => $m::$k::<1 $(, $g)?>(nb, w, a, act_row, out, out_stride, ahead),
                        2 => $m::$k::<2 $(, $g)?>(nb, w, a, act_row, out, out_stride, ahead),
                        3 => $m::$k::<3 $(, $g)?>(nb, w, a, act_row, out, out_stride, ahead),
                        _ => $m::$k::<4 $(, $g)?>(nb, w, a, act_row, out, out_stride, ahead),
                    }
                }
            }
        };
    }
    use crate::matmul::interleave as ilv;
    wrap_interleaved!(il_q4_k, il::q4k; ilv::Q4K_TILE_BLOCK, T::Q8K, 256);
    wrap_interleaved!(il_q6_k, il::q6k; ilv::Q6K_TILE_BLOCK, T::Q8K, 256);
    wrap_interleaved!(il_q8_0, il::legacy, false; ilv::Q8_0_TILE_BLOCK, T::Q8_0, 32);
    wrap_interleaved!(il_q5_0, il::legacy, true; ilv::Q5_0_TILE_BLOCK, T::Q8_0, 32);
    wrap_interleaved!(il2_q4_k, il2::q4k; ilv::Q4K_TILE_BLOCK, T::Q8K, 256);
    wrap_interleaved!(il2_q6_k, il2::q6k; ilv::Q6K_TILE_BLOCK, T::Q8K, 256);
    wrap_interleaved!(il2_q8_0, il2::legacy, false; ilv::Q8_0_TILE_BLOCK, T::Q8_0, 32);
    wrap_interleaved!(il2_q5_0, il2::legacy, true; ilv::Q5_0_TILE_BLOCK, T::Q8_0, 32);
    use ilv::{Nibbles, Q4_0Tile, Q4_1Tile, Q5_1Tile};
    wrap_interleaved!(il2_q4_0, il2::nibbles, Q4_0Tile; Q4_0Tile::TILE_BLOCK, T::Q8_0, 32);
    wrap_interleaved!(il2_q4_1, il2::nibbles, Q4_1Tile; Q4_1Tile::TILE_BLOCK, T::Q8_1, 32);
    wrap_interleaved!(il2_q5_1, il2::nibbles, Q5_1Tile; Q5_1Tile::TILE_BLOCK, T::Q8_1, 32);

    use il_vnni::{evex, vex};
    wrap_interleaved!(vex_q4_k, vex::q4k; ilv::Q4K_TILE_BLOCK, T::Q8K, 256);
    wrap_interleaved!(vex_q6_k, vex::q6k; ilv::Q6K_TILE_BLOCK, T::Q8K, 256);
    wrap_interleaved!(vex_q8_0, vex::legacy, false; ilv::Q8_0_TILE_BLOCK, T::Q8_0, 32);
    wrap_interleaved!(vex_q5_0, vex::legacy, true; ilv::Q5_0_TILE_BLOCK, T::Q8_0, 32);
    wrap_interleaved!(evex_q4_k, evex::q4k; ilv::Q4K_TILE_BLOCK, T::Q8K, 256);
    wrap_interleaved!(evex_q6_k, evex::q6k; ilv::Q6K_TILE_BLOCK, T::Q8K, 256);
    wrap_interleaved!(evex_q8_0, evex::legacy, false; ilv::Q8_0_TILE_BLOCK, T::Q8_0, 32);
    wrap_interleaved!(evex_q5_0, evex::legacy, true; ilv::Q5_0_TILE_BLOCK, T::Q8_0, 32);
    wrap_interleaved!(vex_q4_0, vex::nibbles, Q4_0Tile; Q4_0Tile::TILE_BLOCK, T::Q8_0, 32);
    wrap_interleaved!(vex_q4_1, vex::nibbles, Q4_1Tile; Q4_1Tile::TILE_BLOCK, T::Q8_1, 32);
    wrap_interleaved!(vex_q5_1, vex::nibbles, Q5_1Tile; Q5_1Tile::TILE_BLOCK, T::Q8_1, 32);
    wrap_interleaved!(vex_q5_k, vex::q5k; ilv::kq::Q5K_TILE_BLOCK, T::Q8K, 256);
    wrap_interleaved!(evex_q5_k, evex::q5k; ilv::kq::Q5K_TILE_BLOCK, T::Q8K, 256);
    wrap_interleaved!(vex_q3_k, vex::q3k; ilv::kq::Q3K_TILE_BLOCK, T::Q8K, 256);
    wrap_interleaved!(evex_q3_k, evex::q3k; ilv::kq::Q3K_TILE_BLOCK, T::Q8K, 256);
    wrap_interleaved!(vex_q2_k, vex::q2k; ilv::kq::Q2K_TILE_BLOCK, T::Q8K, 256);
    wrap_interleaved!(evex_q2_k, evex::q2k; ilv::kq::Q2K_TILE_BLOCK, T::Q8K, 256);
    wrap_interleaved!(evex_q4_0, evex::nibbles, Q4_0Tile; Q4_0Tile::TILE_BLOCK, T::Q8_0, 32);
    wrap_interleaved!(evex_q4_1, evex::nibbles, Q4_1Tile; Q4_1Tile::TILE_BLOCK, T::Q8_1, 32);
    wrap_interleaved!(evex_q5_1, evex::nibbles, Q5_1Tile; Q5_1Tile::TILE_BLOCK, T::Q8_1, 32);

    wrap_interleaved!(il2_q5_k, il2kq::q5k; ilv::kq::Q5K_TILE_BLOCK, T::Q8K, 256);
    wrap_interleaved!(il2_q3_k, il2kq::q3k; ilv::kq::Q3K_TILE_BLOCK, T::Q8K, 256);
    wrap_interleaved!(il2_q2_k, il2kq::q2k; ilv::kq::Q2K_TILE_BLOCK, T::Q8K, 256);

    /// The 512-bit (AVX-512 VNNI) interleaved kernel of `ty`, where there is one.
    fn interleaved_512(ty: GgmlType) -> Option<InterleavedFn> {
        match ty {
            T::Q4K => Some(il_q4_k),
            T::Q6K => Some(il_q6_k),
            T::Q8_0 => Some(il_q8_0),
            T::Q5_0 => Some(il_q5_0),
            _ => None,
        }
    }

    /// Whether `ty` has a 512-bit interleaved kernel at `level` on this CPU.
    pub(crate) fn has_interleaved_512(ty: GgmlType, level: Level) -> bool {
        level.min(dispatch::detected()) >= Level::Avx512Vnni && interleaved_512(ty).is_some()
    }

    /// The kernel over the interleaved layout for `ty` at `level`: the 512-bit VNNI one when
    /// `wide` and the CPU has it, else the 256-bit one (AVX2 and above; also for the types
    /// that have no 512-bit kernel: Q4_0, Q4_1, Q5_1).
    pub(crate) fn interleaved(ty: GgmlType, level: Level, wide: bool) -> Option<InterleavedFn> {
        let level = level.min(dispatch::detected());
        if wide
            && level >= Level::Avx512Vnni
            && let Some(k) = interleaved_512(ty)
        {
            return Some(k);
        }
        // 256-bit `vpdpbusd`: EVEX-encoded at AVX-512 VNNI (the narrow choice), VEX-encoded
        // at AVX-VNNI where the CPU has it (a CPU with AVX-512 but no VNNI of either kind
        // reaches this level only through a caller's explicit level: it gets AVX2's).
        let vnni: Option<InterleavedFn> = match (level, ty) {
            (Level::Avx512Vnni, T::Q4K) => Some(evex_q4_k),
            (Level::Avx512Vnni, T::Q6K) => Some(evex_q6_k),
            (Level::Avx512Vnni, T::Q8_0) => Some(evex_q8_0),
            (Level::Avx512Vnni, T::Q5_0) => Some(evex_q5_0),
            (Level::Avx512Vnni, T::Q4_0) => Some(evex_q4_0),
            (Level::Avx512Vnni, T::Q4_1) => Some(evex_q4_1),
            (Level::Avx512Vnni, T::Q5_1) => Some(evex_q5_1),
            (Level::Avx512Vnni, T::Q5K) => Some(evex_q5_k),
            (Level::Avx512Vnni, T::Q3K) => Some(evex_q3_k),
            (Level::Avx512Vnni, T::Q2K) => Some(evex_q2_k),
            (Level::AvxVnni, _) if !dispatch::has_avx_vnni() => None,
            (Level::AvxVnni, T::Q4K) => Some(vex_q4_k),
            (Level::AvxVnni, T::Q6K) => Some(vex_q6_k),
            (Level::AvxVnni, T::Q8_0) => Some(vex_q8_0),
            (Level::AvxVnni, T::Q5_0) => Some(vex_q5_0),
            (Level::AvxVnni, T::Q4_0) => Some(vex_q4_0),
            (Level::AvxVnni, T::Q4_1) => Some(vex_q4_1),
            (Level::AvxVnni, T::Q5_1) => Some(vex_q5_1),
            (Level::AvxVnni, T::Q5K) => Some(vex_q5_k),
            (Level::AvxVnni, T::Q3K) => Some(vex_q3_k),
            (Level::AvxVnni, T::Q2K) => Some(vex_q2_k),
            _ => None,
        };
        if vnni.is_some() {
            return vnni;
        }
        if level >= Level::Avx2 {
            return match ty {
                T::Q4K => Some(il2_q4_k),
                T::Q6K => Some(il2_q6_k),
                T::Q8_0 => Some(il2_q8_0),
                T::Q4_0 => Some(il2_q4_0),
                T::Q4_1 => Some(il2_q4_1),
                T::Q5_0 => Some(il2_q5_0),
                T::Q5_1 => Some(il2_q5_1),
                T::Q5K => Some(il2_q5_k),
                T::Q3K => Some(il2_q3_k),
                T::Q2K => Some(il2_q2_k),
                _ => None,
            };
        }
        None
    }

    wrap_dot!(avx2_f32, avx2::dot_f32, T::F32, Act::F32);
    wrap_dot!(avx2_f16, avx2::dot_f16, T::F16, Act::F16);
    wrap_dot!(avx2_bf16, avx2::dot_bf16, T::Bf16, Act::Bf16);
    wrap_dot!(avx2_q4_0, avx2::dot_q4_0, T::Q4_0, Act::Q8_0);
    wrap_dot!(avx2_q4_1, avx2::dot_q4_1, T::Q4_1, Act::Q8_1);
    wrap_dot!(avx2_q5_0, avx2::dot_q5_0, T::Q5_0, Act::Q8_0);
    wrap_dot!(avx2_q5_1, avx2::dot_q5_1, T::Q5_1, Act::Q8_1);
    wrap_dot!(avx2_q8_0, avx2::dot_q8_0, T::Q8_0, Act::Q8_0);
    wrap_dot!(avx2_q4_k, avx2::dot_q4_k, T::Q4K, Act::Q8K);
    wrap_dot!(avx2_q5_k, avx2::dot_q5_k, T::Q5K, Act::Q8K);
    wrap_dot!(avx2_q6_k, avx2::dot_q6_k, T::Q6K, Act::Q8K);
    wrap_dot!(avx2_q3_k, avx2::dot_q3_k, T::Q3K, Act::Q8K);
    wrap_dot!(avx2_q2_k, avx2::dot_q2_k, T::Q2K, Act::Q8K);

    wrap_dot!(avx512_f32, avx512::dot_f32, T::F32, Act::F32);
    wrap_dot!(vnni_q4_0, avx512::dot_q4_0, T::Q4_0, Act::Q8_0);
    wrap_dot!(vnni_q4_1, avx512::dot_q4_1, T::Q4_1, Act::Q8_1);
    wrap_dot!(vnni_q5_0, avx512::dot_q5_0, T::Q5_0, Act::Q8_0);
    wrap_dot!(vnni_q5_1, avx512::dot_q5_1, T::Q5_1, Act::Q8_1);
    wrap_dot!(vnni_q8_0, avx512::dot_q8_0, T::Q8_0, Act::Q8_0);
    wrap_dot!(vnni_q4_k, avx512::dot_q4_k, T::Q4K, Act::Q8K);
    wrap_dot!(vnni_q6_k, avx512::dot_q6_k, T::Q6K, Act::Q8K);

    /// `wrap_dot!` for a [`RowDotFn`].
    macro_rules! wrap_row_dot {
        ($name:ident, $kernel:path, $wty:expr, $act:expr) => {
            fn $name(n: usize, w: &[u8], a: &[u8], ahead: crate::tune::Ahead) -> f32 {
                check_rows($wty, $act, n, w, a);
                // SAFETY: as for `wrap_dot!`: handed out only for levels the CPU has, and the
                // rows hold `n` elements (checked above); the prefetch is a hint.
                unsafe { $kernel(n, w, a, ahead) }
            }
        };
    }
    wrap_row_dot!(vnni_q4_k_rows, avx512::dot_q4_k_prepared, T::Q4K, Act::Q8K);
    wrap_row_dot!(vnni_q6_k_rows, avx512::dot_q6_k_ahead, T::Q6K, Act::Q8K);

    wrap_quant!(avx2_quant_q8_0, avx2::quantize_q8_0, Act::Q8_0);
    wrap_quant!(avx2_quant_q8_1, avx2::quantize_q8_1, Act::Q8_1);
    wrap_quant!(avx2_quant_q8_k, avx2::quantize_q8_k, Act::Q8K);

    pub(super) fn dot(ty: GgmlType, level: Level) -> Option<DotFn> {
        let scalar = scalar_dot(ty)?;
        if level >= Level::Avx512Vnni {
            match ty {
                T::Q4_0 => return Some(vnni_q4_0),
                T::Q4_1 => return Some(vnni_q4_1),
                T::Q5_0 => return Some(vnni_q5_0),
                T::Q5_1 => return Some(vnni_q5_1),
                T::Q8_0 => return Some(vnni_q8_0),
                T::Q4K => return Some(vnni_q4_k),
                T::Q6K => return Some(vnni_q6_k),
                _ => {}
            }
        }
        if level >= Level::Avx512 && ty == T::F32 {
            return Some(avx512_f32);
        }
        if level >= Level::Avx2 {
            let k: Option<DotFn> = match ty {
                T::F32 => Some(avx2_f32),
                T::F16 => Some(avx2_f16),
                T::Bf16 => Some(avx2_bf16),
                T::Q4_0 => Some(avx2_q4_0),
                T::Q4_1 => Some(avx2_q4_1),
                T::Q5_0 => Some(avx2_q5_0),
                T::Q5_1 => Some(avx2_q5_1),
                T::Q8_0 => Some(avx2_q8_0),
                T::Q4K => Some(avx2_q4_k),
                T::Q5K => Some(avx2_q5_k),
                T::Q6K => Some(avx2_q6_k),
                T::Q3K => Some(avx2_q3_k),
                T::Q2K => Some(avx2_q2_k),
                _ => None,
            };
            if let Some(k) = k {
                return Some(k);
            }
        }
        Some(scalar)
    }

    pub(super) fn quantizer(act: Act, level: Level) -> QuantFn {
        if level >= Level::Avx2 {
            match act {
                Act::Q8_0 => return avx2_quant_q8_0,
                Act::Q8_1 => return avx2_quant_q8_1,
                Act::Q8K => return avx2_quant_q8_k,
                _ => {}
            }
        }
        scalar_quantizer(act)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::{self, Level};
    use strata_storage::quant::quantize_row;

    /// Every type's single-row `dot` at every level this CPU has against its scalar twin, on
    /// the same activation bytes. `matmul` reaches `dot` only for types without a `multi`
    /// kernel (and `tune`'s rows), so the matmul tests alone would not notice a broken one.
    #[test]
    fn every_dot_matches_its_scalar_twin() {
        let cols = 512;
        let mut seed = 7u64;
        let mut rand = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        // Every type matmul takes: those with a scalar twin.
        for ty in GgmlType::ALL {
            let (Some(act), Some(scalar)) = (Act::for_weight(ty), scalar_dot(ty)) else {
                continue;
            };
            for _ in 0..8 {
                let w: Vec<f32> = (0..cols).map(|_| rand()).collect();
                let x: Vec<f32> = (0..cols).map(|_| 4.0 * rand()).collect();
                let mut wq = vec![0u8; ty.row_bytes(cols)];
                quantize_row(ty, &w, &mut wq).expect("quantize weights");
                let mut xq = vec![0u8; act.ty().row_bytes(cols)];
                scalar_quantizer(act)(&x, &mut xq);
                let want = scalar(cols, &wq, &xq);
                let scale: f32 = w.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
                for level in Level::ALL
                    .into_iter()
                    .filter(|&l| l > Level::Scalar && l <= dispatch::detected())
                    .filter(|&l| cfg!(target_arch = "aarch64") || l != Level::Neon)
                {
                    let Some(k) = dot(ty, level) else { continue };
                    let got = k(cols, &wq, &xq);
                    assert!(
                        (got - want).abs() <= 1e-4 * scale.max(1.0),
                        "{ty} at {level:?}: {got} against the scalar {want}"
                    );
                }
            }
        }
    }
}
