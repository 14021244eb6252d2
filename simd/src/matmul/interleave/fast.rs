//! The packers of the interleaved layouts, four bytes at a time: every layout keeps 4
//! columns of a row in one 32-bit lane, and the row-major blocks keep 4 neighbouring columns'
//! bits in 4 neighbouring bytes, so one lane of a tile block is made from a few 32-bit words
//! of the row block by shifts and masks. The element-by-element packers in the parent module
//! and in [`super::kq`] say what each layout is and remain the tests' reference; these run
//! at load (and wherever a matrix is repacked after a read) tens of times faster.

use super::kq::{Q2K_PARTS, Q2K_SUB, Q3K_PARTS, Q3K_SCALES, Q3K_SUB, Q5K_PARTS, Q5K_SUB};
use super::{
    Nibbles, Q4K_BLOCK, Q4K_TILE_BLOCK, Q6K_BLOCK, Q6K_TILE_BLOCK, Q8_0_BLOCK, Q8_0_TILE_BLOCK,
    TILE_ROWS, q6k_high, q6k_low, q6k_scales,
};

const NIB: u32 = 0x0F0F_0F0F;
const TWO: u32 = 0x0303_0303;
const ONE: u32 = 0x0101_0101;

fn word(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn put(b: &mut [u8], at: usize, w: u32) {
    b[at..at + 4].copy_from_slice(&w.to_le_bytes());
}

/// The tile's lane of a group of 8 columns as Q4_K keeps them: `lo` holds columns `0..4`'s
/// 4-bit values (one per byte), `hi` columns `4..8`'s.
fn nibbles(lo: u32, hi: u32) -> u32 {
    (lo & NIB) | ((hi & NIB) << 4)
}

/// The tile's lane of *2 bits of 16 columns*: `w(i)` holds columns `4 i..4 i + 4`' 2-bit values.
fn two16(w: impl Fn(usize) -> u32) -> u32 {
    (0..4).fold(0, |acc, i| acc | ((w(i) & TWO) << (2 * i)))
}

/// The tile's lane of *top bits of 32 columns*: `w(i)` holds columns `4 i..4 i + 4`' bits in
/// bit 0 of each byte.
fn top32(w: impl Fn(usize) -> u32) -> u32 {
    (0..8).fold(0, |acc, i| acc | ((w(i) & ONE) << i))
}

/// The 16 rows of `nb` blocks of `block` bytes in `src`, and each row's block `b`.
fn rows_of(src: &[u8], nb: usize, block: usize, b: usize) -> impl Iterator<Item = (usize, &[u8])> {
    let row_bytes = nb * block;
    (0..TILE_ROWS).map(move |r| (r, &src[r * row_bytes + b * block..][..block]))
}

/// Q4_K's header (`d`, `dmin`, the 12 scale bytes transposed) of row `r`, shared by Q5_K.
fn q4k_header(blk: &[u8], r: usize, out: &mut [u8]) {
    out[2 * r..2 * r + 2].copy_from_slice(&blk[0..2]);
    out[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&blk[2..4]);
    for j in 0..12 {
        out[64 + 16 * j + r] = blk[4 + j];
    }
}

pub(super) fn pack_q4k_tile(src: &[u8], nb: usize, dst: &mut [u8]) {
    for b in 0..nb {
        let out = &mut dst[b * Q4K_TILE_BLOCK..(b + 1) * Q4K_TILE_BLOCK];
        for (r, blk) in rows_of(src, nb, Q4K_BLOCK, b) {
            q4k_header(blk, r, out);
            let qs = &blk[16..];
            // Group g (8 columns) lies in chunk g / 8 of 64 columns, in the low nibbles of
            // its 32 bytes for the first 32 columns and the high ones for the rest.
            for g in 0..32 {
                let (at, shift) = (32 * (g / 8) + 8 * (g % 4), 4 * (g % 8 / 4) as u32);
                let lane = nibbles(word(qs, at) >> shift, word(qs, at + 4) >> shift);
                put(out, 256 + 64 * g + 4 * r, lane);
            }
        }
    }
}

pub(super) fn pack_q6k_tile(src: &[u8], nb: usize, dst: &mut [u8]) {
    for b in 0..nb {
        let out = &mut dst[b * Q6K_TILE_BLOCK..(b + 1) * Q6K_TILE_BLOCK];
        for (r, blk) in rows_of(src, nb, Q6K_BLOCK, b) {
            out[2 * r..2 * r + 2].copy_from_slice(&blk[208..210]);
            for s in 0..16 {
                out[q6k_scales(s) + r] = blk[192 + s];
                // Columns 16 s.. are elements of half n, quarter k, from l on.
                let (n, k, l) = (s / 8, s % 8 / 2, 16 * (s % 2));
                let ql = 64 * n + l + 32 * (k & 1);
                let low_shift = if k >= 2 { 4 } else { 0 };
                let low = |c: usize| word(blk, ql + c) >> low_shift;
                for gg in 0..2 {
                    let lane = nibbles(low(8 * gg), low(8 * gg + 4));
                    put(out, q6k_low(s) + 64 * gg + 4 * r, lane);
                }
                let qh = 128 + 32 * n + l;
                let lane = two16(|i| word(blk, qh + 4 * i) >> (2 * k));
                put(out, q6k_high(s) + 4 * r, lane);
            }
        }
    }
}

pub(super) fn pack_q8_0_tile(src: &[u8], nb: usize, dst: &mut [u8]) {
    for b in 0..nb {
        let out = &mut dst[b * Q8_0_TILE_BLOCK..(b + 1) * Q8_0_TILE_BLOCK];
        for (r, blk) in rows_of(src, nb, Q8_0_BLOCK, b) {
            out[2 * r..2 * r + 2].copy_from_slice(&blk[0..2]);
            for g in 0..8 {
                put(out, 32 + 64 * g + 4 * r, word(blk, 2 + 4 * g) ^ 0x8080_8080);
            }
        }
    }
}

/// Bit `i` of `bits` (4 bits) into bit 0 of byte `i`.
fn spread4(bits: u32) -> u32 {
    (bits & 1) | ((bits & 2) << 7) | ((bits & 4) << 14) | ((bits & 8) << 21)
}

pub(super) fn pack_nibbles_tile<L: Nibbles>(src: &[u8], nb: usize, dst: &mut [u8]) {
    for b in 0..nb {
        let out = &mut dst[b * L::TILE_BLOCK..(b + 1) * L::TILE_BLOCK];
        for (r, blk) in rows_of(src, nb, L::ROW_BLOCK, b) {
            out[2 * r..2 * r + 2].copy_from_slice(&blk[0..2]);
            if L::MIN {
                out[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&blk[2..4]);
            }
            // Columns c < 16 in the low nibbles of `qs`, the rest in the high ones.
            let low = |c: usize| word(blk, L::ROW_QS + c % 16) >> (4 * (c / 16) as u32);
            for g in 0..4 {
                put(
                    out,
                    L::QUANTS + 64 * g + 4 * r,
                    nibbles(low(8 * g), low(8 * g + 4)),
                );
            }
            if let Some(h) = L::HIGH {
                let qh = word(blk, L::ROW_QH);
                put(out, h + 4 * r, top32(|i| spread4(qh >> (4 * i))));
            }
        }
    }
}

pub(super) fn pack_q5k_tile(src: &[u8], nb: usize, dst: &mut [u8]) {
    let tile_block = TILE_ROWS * 176;
    for b in 0..nb {
        let out = &mut dst[b * tile_block..(b + 1) * tile_block];
        for (r, blk) in rows_of(src, nb, 176, b) {
            q4k_header(blk, r, out);
            // Block: d, dmin, scales[12], qh[32] @16, qs[128] @48.
            for j in 0..8 {
                let part = Q5K_PARTS + Q5K_SUB * j;
                let (qs, shift) = (48 + 32 * (j / 2), 4 * (j % 2) as u32);
                put(out, part + 4 * r, top32(|i| word(blk, 16 + 4 * i) >> j));
                let low = |c: usize| word(blk, qs + c) >> shift;
                for g in 0..4 {
                    put(
                        out,
                        part + 64 + 64 * g + 4 * r,
                        nibbles(low(8 * g), low(8 * g + 4)),
                    );
                }
            }
        }
    }
}

pub(super) fn pack_q3k_tile(src: &[u8], nb: usize, dst: &mut [u8]) {
    let tile_block = TILE_ROWS * 110;
    for b in 0..nb {
        let out = &mut dst[b * tile_block..(b + 1) * tile_block];
        for (r, blk) in rows_of(src, nb, 110, b) {
            // Block: hmask[32] @0, qs[64] @32, scales[12] @96, d @108.
            out[2 * r..2 * r + 2].copy_from_slice(&blk[108..110]);
            for j in 0..12 {
                out[Q3K_SCALES + 16 * j + r] = blk[96 + j];
            }
            for p in 0..8 {
                let part = Q3K_PARTS + Q3K_SUB * p;
                put(out, part + 4 * r, top32(|i| word(blk, 4 * i) >> p));
                let (qs, shift) = (32 + 32 * (p / 4), 2 * (p % 4) as u32);
                for half in 0..2 {
                    let lane = two16(|i| word(blk, qs + 16 * half + 4 * i) >> shift);
                    put(out, part + 64 + 64 * half + 4 * r, lane);
                }
            }
        }
    }
}

pub(super) fn pack_q2k_tile(src: &[u8], nb: usize, dst: &mut [u8]) {
    let tile_block = TILE_ROWS * 84;
    for b in 0..nb {
        let out = &mut dst[b * tile_block..(b + 1) * tile_block];
        for (r, blk) in rows_of(src, nb, 84, b) {
            // Block: scales[16] @0, qs[64] @16, d @80, dmin @82.
            out[2 * r..2 * r + 2].copy_from_slice(&blk[80..82]);
            out[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&blk[82..84]);
            for s in 0..16 {
                let part = Q2K_PARTS + Q2K_SUB * s;
                out[part + r] = blk[s];
                let (qs, shift) = (16 + 32 * (s / 8) + 16 * (s % 2), 2 * (s % 8 / 2) as u32);
                put(
                    out,
                    part + 16 + 4 * r,
                    two16(|i| word(blk, qs + 4 * i) >> shift),
                );
            }
        }
    }
}
