//! Block structs that match ggml's `block_q4_0` … `block_q8_K` byte for byte.
//!
//! Each struct is `#[repr(C)]`, made only of integer (and, for Q8_K, `f32`) fields, and has no
//! padding — the size asserts below prove it. That makes every bit pattern a valid value, which
//! is what lets [`as_blocks`] view file bytes as blocks without copying and [`read_block`] copy
//! one out of any (unaligned) position.
//!
//! Scales stored as f16 are kept as their raw bits (`u16`, little-endian in the file, so read
//! them through [`f16_bits_to_f32`]); the helpers on each block do that.

use super::{GgmlType, QK_K, QuantError};

/// A ggml quantization block: plain old data with a fixed size and element count.
///
/// # Safety
///
/// Implementors must be `#[repr(C)]`, contain no padding, no pointers and no fields with invalid
/// bit patterns (only integers, integer arrays and `f32`), so that any `size_of::<Self>()` bytes
/// are a valid value. Only this module implements it.
pub unsafe trait QuantBlock: Copy + sealed::Sealed + 'static {
    /// The GGUF type stored in this block.
    const TYPE: GgmlType;
    /// Elements (weights) per block.
    const ELEMS: usize = Self::TYPE.block_size();
    /// Bytes per block (equal to `size_of::<Self>()`, asserted at compile time).
    const BYTES: usize = Self::TYPE.type_size();
}

mod sealed {
    pub trait Sealed {}
}

/// Converts the raw (little-endian) bits of an f16 to `f32`. Exact for every f16 value.
///
/// Written branch-free (selects only) rather than calling `half`, whose per-call feature check
/// and branches keep loops over f16 rows from vectorising; the subnormal case uses the
/// "magic number" subtraction, which is exact. Agreement with `half` is tested for all 65,536
/// inputs.
#[inline(always)]
pub fn f16_bits_to_f32(bits: u16) -> f32 {
    let h = u32::from(u16::from_le(bits));
    let sign = (h & 0x8000) << 16;
    let o = (h & 0x7fff) << 13;
    let exp = o & 0x0f80_0000;
    // Rebias the exponent from 15 to 127 (112 << 23); Inf/NaN need the maximum exponent (twice
    // that); subnormals become 2^-14 * (1 + m) - 2^-14 = m * 2^-24, exactly.
    let normal = o + 0x3800_0000;
    let inf_nan = o + 0x7000_0000;
    let subnormal = (f32::from_bits(o + 0x3880_0000) - f32::from_bits(0x3880_0000)).to_bits();
    let r = if exp == 0x0f80_0000 {
        inf_nan
    } else if exp == 0 {
        subnormal
    } else {
        normal
    };
    f32::from_bits(r | sign)
}

/// Converts an `f32` to the bits of the nearest f16 (ties to even, like `GGML_FP32_TO_FP16`),
/// ready to store little-endian.
#[inline(always)]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits().to_le()
}

macro_rules! block {
    ($(#[$doc:meta])* $name:ident, $ty:expr, { $($(#[$fdoc:meta])* $field:ident : $fty:ty),* $(,)? }) => {
        $(#[$doc])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq)]
        pub struct $name {
            $($(#[$fdoc])* pub $field: $fty,)*
        }
        impl sealed::Sealed for $name {}
        // SAFETY: the struct is repr(C), its fields are integers/integer arrays/f32 (every bit
        // pattern valid), and the assert below proves its size equals the sum of the field sizes
        // (no padding) and ggml's type size.
        unsafe impl QuantBlock for $name {
            const TYPE: GgmlType = $ty;
        }
        const _: () = {
            assert!(std::mem::size_of::<$name>() == $ty.type_size());
            assert!(std::mem::size_of::<$name>() == 0 $(+ std::mem::size_of::<$fty>())*);
        };
    };
}

block!(
    /// Q4_0: 32 weights, `x = (q - 8) * d`; element `j < 16` is the low nibble of `qs[j]`,
    /// element `j + 16` its high nibble.
    BlockQ4_0, GgmlType::Q4_0, {
        /// Scale (f16 bits).
        d: u16,
        /// Nibbles.
        qs: [u8; 16],
    }
);

block!(
    /// Q4_1: 32 weights, `x = q * d + m`; nibble order as Q4_0.
    BlockQ4_1, GgmlType::Q4_1, {
        /// Scale (f16 bits).
        d: u16,
        /// Minimum (f16 bits).
        m: u16,
        /// Nibbles.
        qs: [u8; 16],
    }
);

block!(
    /// Q5_0: 32 weights, `x = (q5 - 16) * d`; bit `j` of `qh` (a little-endian u32) is the
    /// fifth bit of element `j`.
    BlockQ5_0, GgmlType::Q5_0, {
        /// Scale (f16 bits).
        d: u16,
        /// Fifth bits, little-endian u32.
        qh: [u8; 4],
        /// Low nibbles, ordered as Q4_0.
        qs: [u8; 16],
    }
);

block!(
    /// Q5_1: 32 weights, `x = q5 * d + m`; bits as Q5_0.
    BlockQ5_1, GgmlType::Q5_1, {
        /// Scale (f16 bits).
        d: u16,
        /// Minimum (f16 bits).
        m: u16,
        /// Fifth bits, little-endian u32.
        qh: [u8; 4],
        /// Low nibbles.
        qs: [u8; 16],
    }
);

block!(
    /// Q8_0: 32 weights, `x = q * d`.
    BlockQ8_0, GgmlType::Q8_0, {
        /// Scale (f16 bits).
        d: u16,
        /// Quants.
        qs: [i8; 32],
    }
);

block!(
    /// Q8_1: 32 weights, `x = q * d`; `s = d * sum(qs)` lets dot products with Q4_1/Q5_1 fold
    /// in the minimum without a second pass.
    BlockQ8_1, GgmlType::Q8_1, {
        /// Scale (f16 bits).
        d: u16,
        /// `d * sum(qs)` (f16 bits).
        s: u16,
        /// Quants.
        qs: [i8; 32],
    }
);

block!(
    /// Q2_K: 256 weights in 16 groups of 16; `x = d * (sc & 15) * q - dmin * (sc >> 4)`.
    BlockQ2K, GgmlType::Q2K, {
        /// Per-group scale (low nibble) and min (high nibble).
        scales: [u8; 16],
        /// 2-bit quants, four per byte (see `dequantize_block_q2_k` for the order).
        qs: [u8; 64],
        /// Super-block scale (f16 bits).
        d: u16,
        /// Super-block scale of the mins (f16 bits).
        dmin: u16,
    }
);

block!(
    /// Q3_K: 256 weights in 16 groups of 16; `x = d * (sc - 32) * (q2 - (hbit ? 0 : 4))`.
    BlockQ3K, GgmlType::Q3K, {
        /// High bit of each quant: element `e` is bit `e / 32` of byte `e % 32`.
        hmask: [u8; 32],
        /// Low 2 bits of each quant.
        qs: [u8; 64],
        /// 16 six-bit scales, packed (see `q3_k_scales`).
        scales: [u8; 12],
        /// Super-block scale (f16 bits).
        d: u16,
    }
);

block!(
    /// Q4_K: 256 weights in 8 groups of 32; `x = d * sc * q - dmin * m` with `(sc, m)` from
    /// [`get_scale_min_k4`].
    BlockQ4K, GgmlType::Q4K, {
        /// Super-block scale (f16 bits).
        d: u16,
        /// Super-block scale of the mins (f16 bits).
        dmin: u16,
        /// 8 six-bit scale/min pairs, packed.
        scales: [u8; 12],
        /// Nibbles: 32 bytes per 64 weights, low nibbles first.
        qs: [u8; 128],
    }
);

block!(
    /// Q5_K: Q4_K plus a fifth bit per weight.
    BlockQ5K, GgmlType::Q5K, {
        /// Super-block scale (f16 bits).
        d: u16,
        /// Super-block scale of the mins (f16 bits).
        dmin: u16,
        /// 8 six-bit scale/min pairs, packed as Q4_K.
        scales: [u8; 12],
        /// Fifth bits: element `e` is bit `e / 32` of byte `e % 32`.
        qh: [u8; 32],
        /// Low nibbles, ordered as Q4_K.
        qs: [u8; 128],
    }
);

block!(
    /// Q6_K: 256 weights in 16 groups of 16; `x = d * scale * (q6 - 32)`.
    BlockQ6K, GgmlType::Q6K, {
        /// Low 4 bits of each quant.
        ql: [u8; 128],
        /// High 2 bits of each quant.
        qh: [u8; 64],
        /// Per-group signed scales.
        scales: [i8; 16],
        /// Super-block scale (f16 bits).
        d: u16,
    }
);

block!(
    /// Q8_K: 256 weights, `x = d * q`, with the sum of each 16 quants precomputed — the
    /// activation format that K-quant dot products consume.
    BlockQ8K, GgmlType::Q8K, {
        /// Scale (a full f32, unlike the other types).
        d: f32,
        /// Quants.
        qs: [i8; QK_K],
        /// `bsums[j] = sum(qs[16 j .. 16 j + 16])`.
        bsums: [i16; QK_K / 16],
    }
);

/// Views `bytes` as a slice of blocks without copying.
///
/// Fails when the length is not a whole number of blocks or the start is not aligned for `B`
/// (2 bytes for most types, 4 for Q8_K); use [`read_block`] for data at arbitrary offsets.
pub fn as_blocks<B: QuantBlock>(bytes: &[u8]) -> Result<&[B], QuantError> {
    check_view::<B>(bytes.as_ptr() as usize, bytes.len())?;
    // SAFETY: check_view proved the pointer is aligned for B and the length is a whole number of
    // size_of::<B>() blocks; QuantBlock guarantees every bit pattern is a valid B. The lifetime
    // and immutability are inherited from `bytes`.
    Ok(unsafe {
        std::slice::from_raw_parts(bytes.as_ptr().cast::<B>(), bytes.len() / size_of::<B>())
    })
}

/// Views `bytes` as a mutable slice of blocks without copying (same checks as [`as_blocks`]).
pub fn as_blocks_mut<B: QuantBlock>(bytes: &mut [u8]) -> Result<&mut [B], QuantError> {
    check_view::<B>(bytes.as_ptr() as usize, bytes.len())?;
    // SAFETY: as in `as_blocks`; additionally any B written through the result is plain bytes,
    // so `bytes` stays a valid [u8]. The exclusive borrow is carried over.
    Ok(unsafe {
        std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<B>(), bytes.len() / size_of::<B>())
    })
}

/// Views a slice of blocks as its bytes (for writing a quantized tensor out).
pub fn blocks_as_bytes<B: QuantBlock>(blocks: &[B]) -> &[u8] {
    // SAFETY: B has no padding (QuantBlock), so all size_of_val(blocks) bytes are initialised;
    // u8 has alignment 1; the lifetime is inherited.
    unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), size_of_val(blocks)) }
}

/// Copies one block out of `bytes`, which must be exactly `B::BYTES` long, at any alignment.
pub fn read_block<B: QuantBlock>(bytes: &[u8]) -> Result<B, QuantError> {
    if bytes.len() != size_of::<B>() {
        return Err(QuantError::NotWholeBlocks {
            ty: B::TYPE,
            bytes: bytes.len(),
            block_bytes: size_of::<B>(),
        });
    }
    // SAFETY: the length was checked to be size_of::<B>(); read_unaligned has no alignment
    // requirement; QuantBlock guarantees any bit pattern is a valid B.
    Ok(unsafe { bytes.as_ptr().cast::<B>().read_unaligned() })
}

/// Copies one block out of a chunk already known to be `size_of::<B>()` long (the hot loops
/// iterate with `chunks_exact`, which guarantees it).
#[inline(always)]
pub(crate) fn read_block_exact<B: QuantBlock>(chunk: &[u8]) -> B {
    assert_eq!(
        chunk.len(),
        size_of::<B>(),
        "caller passes chunks_exact(size_of::<B>())"
    );
    // SAFETY: the length was just asserted; read_unaligned has no alignment requirement;
    // QuantBlock guarantees any bit pattern is a valid B.
    unsafe { chunk.as_ptr().cast::<B>().read_unaligned() }
}

fn check_view<B: QuantBlock>(addr: usize, len: usize) -> Result<(), QuantError> {
    if !len.is_multiple_of(size_of::<B>()) {
        return Err(QuantError::NotWholeBlocks {
            ty: B::TYPE,
            bytes: len,
            block_bytes: size_of::<B>(),
        });
    }
    if !addr.is_multiple_of(align_of::<B>()) {
        return Err(QuantError::Misaligned {
            ty: B::TYPE,
            addr,
            align: align_of::<B>(),
        });
    }
    Ok(())
}

/// Unpacks scale and min `j` (0..8) of a Q4_K/Q5_K block: eight 6-bit pairs in 12 bytes.
///
/// Bytes 0..4 hold scales 0..4 in their low 6 bits, bytes 4..8 mins 0..4; scales and mins 4..8
/// keep their low nibbles in bytes 8..12 and their top 2 bits in the spare top bits of bytes
/// 0..8. `j >= 8` is a caller bug and panics on the index.
#[inline(always)]
pub fn get_scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Packs eight 6-bit scales and mins (each `< 64`) the way [`get_scale_min_k4`] unpacks them.
pub fn pack_scale_min_k4(scales: &[u8; 8], mins: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..8 {
        let (ls, lm) = (scales[j] & 63, mins[j] & 63);
        if j < 4 {
            q[j] |= ls;
            q[j + 4] |= lm;
        } else {
            q[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            q[j - 4] |= (ls >> 4) << 6;
            q[j] |= (lm >> 4) << 6;
        }
    }
    q
}

/// Unpacks the 16 six-bit scales of a Q3_K block, already offset by −32 (range −32..=31).
///
/// Scale `i` has its low nibble in byte `i % 8` (low half for `i < 8`, high half otherwise) and
/// its top two bits in byte `8 + i % 4` at bit `2 * (i / 4)`.
#[inline(always)]
pub fn q3_k_scales(packed: &[u8; 12]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let low = (packed[i % 8] >> (4 * (i / 8))) & 0xF;
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = ((low | (high << 4)) as i8) - 32;
    }
    out
}

/// Packs 16 signed scales (each in −32..=31) the way [`q3_k_scales`] unpacks them.
pub fn pack_q3_k_scales(scales: &[i8; 16]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for (i, &s) in scales.iter().enumerate() {
        let l = (s.clamp(-32, 31) + 32) as u8;
        q[i % 8] |= (l & 0xF) << (4 * (i / 8));
        q[8 + i % 4] |= (l >> 4) << (2 * (i / 4));
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_matches_half_for_every_value() {
        for bits in 0..=u16::MAX {
            let want = half::f16::from_bits(bits).to_f32();
            let got = f16_bits_to_f32(bits.to_le());
            if want.is_nan() {
                assert!(got.is_nan(), "{bits:#06x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn scale_min_k4_round_trips() {
        let scales = [0, 1, 17, 63, 62, 33, 5, 48];
        let mins = [63, 0, 31, 32, 1, 60, 15, 16];
        let packed = pack_scale_min_k4(&scales, &mins);
        for j in 0..8 {
            assert_eq!(
                get_scale_min_k4(j, &packed),
                (scales[j], mins[j]),
                "pair {j}"
            );
        }
    }

    #[test]
    fn q3_k_scales_round_trip() {
        let s: [i8; 16] = std::array::from_fn(|i| (i as i8) * 4 - 32);
        assert_eq!(q3_k_scales(&pack_q3_k_scales(&s)), s);
    }

    #[test]
    fn views_check_length_and_alignment() {
        let buf = vec![0u64; 64];
        // SAFETY: u64 -> u8 reinterpretation of an initialised buffer, length scaled by 8.
        let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), 512) };
        assert_eq!(as_blocks::<BlockQ4K>(&bytes[..288]).map(|b| b.len()), Ok(2));
        assert!(matches!(
            as_blocks::<BlockQ4K>(&bytes[..287]),
            Err(QuantError::NotWholeBlocks { .. })
        ));
        assert!(matches!(
            as_blocks::<BlockQ4K>(&bytes[1..289]),
            Err(QuantError::Misaligned { align: 2, .. })
        ));
        assert!(matches!(
            as_blocks::<BlockQ8K>(&bytes[2..294]),
            Err(QuantError::Misaligned { align: 4, .. })
        ));
        assert!(read_block::<BlockQ4K>(&bytes[1..145]).is_ok());
        assert!(read_block::<BlockQ4K>(&bytes[1..146]).is_err());
    }
}
