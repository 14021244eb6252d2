//! The interleaved weight layout: a matrix repacked once at load so that decode reads 16 rows at a
//! time with one `vpdpbusd` per 16 rows × 4 columns, as llama.cpp's repacked CPU buffers do.
//!
//! Row-major K-quant blocks make every row's dot product a horizontal reduction: the vector
//! lanes hold one row's columns, so each row pays for its own activation loads, scale
//! shuffles and final sum (about 55 instructions per 256-column block on AVX-512). In the
//! interleaved layout a 512-bit register holds 4 columns of each of 16 rows, one row per 32-bit
//! lane; an activation's 4 bytes are broadcast to every lane, and the 16 results come out in
//! the lanes with no reduction at all (about 16 instructions per row and block).
//!
//! The layout has exactly the bytes of the row-major one, so a resident matrix is repacked in
//! place and costs no memory. Rows past the last whole tile of 16 stay row-major at the end.
//!
//! One tile block of Q4_K (256 columns × 16 rows, [`Q4K_TILE_BLOCK`] = 16 × 144 bytes):
//! - `[0, 32)`: the 16 rows' `d` (f16), `[32, 64)`: their `dmin` (f16);
//! - `[64, 256)`: the 12 bytes of packed 6-bit scales and mins, transposed: byte `j` of row
//!   `r` at `64 + 16 j + r`, so that one 16-byte load holds byte `j` of every row;
//! - `[256, 2304)`: the quants in 32 groups of 8 columns, 64 bytes each: byte `4 r + k` of
//!   group `g` holds column `8 g + k` of row `r` in its low nibble and column `8 g + 4 + k` in
//!   its high nibble (`k` in `0..4`).
//!
//! One tile block of Q6_K ([`Q6K_TILE_BLOCK`] = 16 × 210 bytes):
//! - `[0, 32)`: the rows' `d` (f16);
//! - then 16 parts of 208 bytes, one per 16-column sub-block `s`, so that a kernel reads the
//!   block front to back as one stream (three separate regions read side by side streamed
//!   from DRAM measurably slower than the row kernels):
//!   - 16 bytes: the sub-block's scale (i8) of each row, byte `r`;
//!   - 128 bytes: the low 4 bits of its quants, as two of Q4_K's groups of 8 columns;
//!   - 64 bytes: their top 2 bits: byte `4 r + k` holds, from bit 0 up, columns `16 s + k`,
//!     `16 s + 4 + k`, `16 s + 8 + k`, `16 s + 12 + k`.
//!
//! The legacy types have blocks of 32 columns; one tile block is 16 of them:
//! - Q8_0 ([`Q8_0_TILE_BLOCK`] = 16 × 34 bytes): `[0, 32)` the rows' `d` (f16), then the quants
//!   plus 128 (unsigned) in 8 groups of 4 columns: byte `32 + 64 g + 4 r + k` is column
//!   `4 g + k` of row `r`.
//! - The 4- and 5-bit types ([`Nibbles`]) share one scheme, their fields in the order of the
//!   row-major block (except Q5_0's fifth bits, which came first and stay last): `[0, 32)` the
//!   rows' `d` (f16); Q4_1 and Q5_1: `[32, 64)` their `m` (f16); Q5_1: 64 bytes of fifth bits,
//!   bit `i` of byte `4 r + k` the one of column `4 i + k`; then the low 4 bits in 4 groups of
//!   8 columns, byte `4 r + k` of group `g` holding column `8 g + k` in its low nibble and
//!   `8 g + 4 + k` in its high one; Q5_0: its fifth bits last, as Q5_1's. Q4_0: 288 bytes,
//!   Q4_1: 320, Q5_0: 352 (fifth bits at [`Q5_0_HIGH`]), Q5_1: 384. The kernels read them front
//!   to back.
//!
//! Q5_K, Q3_K and Q2_K: see [`kq`].

mod fast;
pub(crate) mod kq;

use strata_storage::quant::{GgmlType, QK_K};

/// Rows per tile: one per 32-bit lane of a 512-bit register.
pub const TILE_ROWS: usize = 16;

/// Bytes of one Q4_K block in the row-major layout.
const Q4K_BLOCK: usize = 144;
/// Bytes of one tile block of Q4_K (16 rows × 256 columns).
pub(crate) const Q4K_TILE_BLOCK: usize = TILE_ROWS * Q4K_BLOCK;

/// Bytes of one Q6_K block in the row-major layout.
const Q6K_BLOCK: usize = 210;
/// Bytes of one tile block of Q6_K.
pub(crate) const Q6K_TILE_BLOCK: usize = TILE_ROWS * Q6K_BLOCK;
/// Bytes of one 16-column sub-block's part of a Q6_K tile block: its 16 scales, low bits and
/// top bits, together.
const Q6K_SUB: usize = 16 + 128 + 64;
/// Where sub-block `s`'s scales (one i8 per row) start in a Q6_K tile block.
pub(crate) const fn q6k_scales(s: usize) -> usize {
    32 + Q6K_SUB * s
}
/// Where sub-block `s`'s low 4 bits start (two groups of 8 columns, 64 bytes each).
pub(crate) const fn q6k_low(s: usize) -> usize {
    q6k_scales(s) + 16
}
/// Where sub-block `s`'s top 2 bits start (64 bytes).
pub(crate) const fn q6k_high(s: usize) -> usize {
    q6k_low(s) + 128
}

/// Legacy 32-column blocks: Q8_0 (34 bytes) per row.
const Q8_0_BLOCK: usize = 34;
/// Bytes of one tile block of Q8_0 (16 rows × 32 columns).
pub(crate) const Q8_0_TILE_BLOCK: usize = TILE_ROWS * Q8_0_BLOCK;
/// Bytes of one tile block of Q5_0 (read by the x86 kernels only).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const Q5_0_TILE_BLOCK: usize = Q5_0Tile::TILE_BLOCK;
/// Where the top bits of Q5_0's quants start in its tile block.
pub(crate) const Q5_0_HIGH: usize = 288;

/// The tile block of a legacy 4- or 5-bit type (Q4_0, Q4_1, Q5_0, Q5_1): where the row-major
/// block keeps its fields and where the tile block does (module docs). A trait of constants,
/// so that the kernels are compiled once per type with every offset known.
pub(crate) trait Nibbles {
    /// Bytes of one row-major block.
    const ROW_BLOCK: usize;
    /// Whether blocks carry a min `m` (f16, after `d`): `w = d q + m`; else `w = d (q - o)`,
    /// `o` being 8 for 4 bits and 16 for 5.
    const MIN: bool;
    /// Where the fifth bits start in the tile block (64 bytes), for the 5-bit types.
    const HIGH: Option<usize>;
    /// Where the low 4 bits start in the tile block (4 groups of 64 bytes).
    const QUANTS: usize;
    /// Bytes of one tile block.
    const TILE_BLOCK: usize = TILE_ROWS * Self::ROW_BLOCK;
    /// Where `qh` (u32, the 5-bit types) starts in the row-major block.
    const ROW_QH: usize = if Self::MIN { 4 } else { 2 };
    /// Where `qs` (16 bytes: column `c` in the low nibble of byte `c`, `c + 16` in the high)
    /// starts in the row-major block.
    const ROW_QS: usize = Self::ROW_QH + if Self::HIGH.is_some() { 4 } else { 0 };
}

/// Q4_0: `d`, then the quants (288 bytes).
pub(crate) struct Q4_0Tile;
impl Nibbles for Q4_0Tile {
    const ROW_BLOCK: usize = 18;
    const MIN: bool = false;
    const HIGH: Option<usize> = None;
    const QUANTS: usize = 32;
}

/// Q4_1: `d`, `m`, then the quants (320 bytes).
pub(crate) struct Q4_1Tile;
impl Nibbles for Q4_1Tile {
    const ROW_BLOCK: usize = 20;
    const MIN: bool = true;
    const HIGH: Option<usize> = None;
    const QUANTS: usize = 64;
}

/// Q5_0: `d`, the low 4 bits, then the fifth bits (352 bytes).
pub(crate) struct Q5_0Tile;
impl Nibbles for Q5_0Tile {
    const ROW_BLOCK: usize = 22;
    const MIN: bool = false;
    const HIGH: Option<usize> = Some(Q5_0_HIGH);
    const QUANTS: usize = 32;
}

/// Q5_1: `d`, `m`, the fifth bits, then the low 4 bits (384 bytes).
pub(crate) struct Q5_1Tile;
impl Nibbles for Q5_1Tile {
    const ROW_BLOCK: usize = 24;
    const MIN: bool = true;
    const HIGH: Option<usize> = Some(64);
    const QUANTS: usize = 128;
}

/// The weight types that have an interleaved layout.
pub(crate) fn has_layout(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4K
            | GgmlType::Q6K
            | GgmlType::Q8_0
            | GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
    ) || matches!(ty, GgmlType::Q5K | GgmlType::Q3K | GgmlType::Q2K)
}

/// Q8_0 tile block: the rows' `d` (f16) in `[0, 32)`, then the quants plus 128 (unsigned) in 8
/// groups of 4 columns: byte `32 + 64 g + 4 r + k` is column `4 g + k` of row `r`.
#[cfg(test)]
fn pack_q8_0_tile(src: &[u8], nb: usize, dst: &mut [u8]) {
    let row_bytes = nb * Q8_0_BLOCK;
    for b in 0..nb {
        let out = &mut dst[b * Q8_0_TILE_BLOCK..(b + 1) * Q8_0_TILE_BLOCK];
        for r in 0..TILE_ROWS {
            let blk = &src[r * row_bytes + b * Q8_0_BLOCK..][..Q8_0_BLOCK];
            out[2 * r..2 * r + 2].copy_from_slice(&blk[0..2]);
            for c in 0..32 {
                out[32 + 64 * (c / 4) + 4 * r + c % 4] = blk[2 + c] ^ 0x80;
            }
        }
    }
}

fn unpack_q8_0_tile(src: &[u8], nb: usize, dst: &mut [u8]) {
    let row_bytes = nb * Q8_0_BLOCK;
    for b in 0..nb {
        let tile = &src[b * Q8_0_TILE_BLOCK..(b + 1) * Q8_0_TILE_BLOCK];
        for r in 0..TILE_ROWS {
            let blk = &mut dst[r * row_bytes + b * Q8_0_BLOCK..][..Q8_0_BLOCK];
            blk[0..2].copy_from_slice(&tile[2 * r..2 * r + 2]);
            for c in 0..32 {
                blk[2 + c] = tile[32 + 64 * (c / 4) + 4 * r + c % 4] ^ 0x80;
            }
        }
    }
}

/// Where column `c` of row `r` keeps its low 4 bits in a [`Nibbles`] tile block (byte, high
/// nibble?) and its fifth bit (byte, bit) when the type has one.
fn nibble_pos<L: Nibbles>(r: usize, c: usize) -> ((usize, bool), Option<(usize, u32)>) {
    let (g, k) = (c / 8, c % 8);
    let low = (L::QUANTS + 64 * g + 4 * r + k % 4, k >= 4);
    (low, L::HIGH.map(|h| (h + 4 * r + c % 4, (c / 4) as u32)))
}

/// Column `c` of a row-major block of a [`Nibbles`] type: its low 4 bits and its fifth bit.
#[cfg(test)]
fn nibble_value<L: Nibbles>(blk: &[u8], c: usize) -> (u8, u8) {
    let q = blk[L::ROW_QS + c % 16];
    let low = if c < 16 { q & 0xF } else { q >> 4 };
    let top = match L::HIGH {
        Some(_) => {
            let qh = &blk[L::ROW_QH..L::ROW_QH + 4];
            let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
            ((qh >> c) & 1) as u8
        }
        None => 0,
    };
    (low, top)
}

#[cfg(test)]
fn pack_nibbles_tile<L: Nibbles>(src: &[u8], nb: usize, dst: &mut [u8]) {
    let row_bytes = nb * L::ROW_BLOCK;
    for b in 0..nb {
        let out = &mut dst[b * L::TILE_BLOCK..(b + 1) * L::TILE_BLOCK];
        out.fill(0);
        for r in 0..TILE_ROWS {
            let blk = &src[r * row_bytes + b * L::ROW_BLOCK..][..L::ROW_BLOCK];
            out[2 * r..2 * r + 2].copy_from_slice(&blk[0..2]);
            if L::MIN {
                out[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&blk[2..4]);
            }
            for c in 0..32 {
                let (low, top) = nibble_value::<L>(blk, c);
                let ((at, high), fifth) = nibble_pos::<L>(r, c);
                out[at] |= if high { low << 4 } else { low };
                if let Some((at, bit)) = fifth {
                    out[at] |= top << bit;
                }
            }
        }
    }
}

fn unpack_nibbles_tile<L: Nibbles>(src: &[u8], nb: usize, dst: &mut [u8]) {
    let row_bytes = nb * L::ROW_BLOCK;
    for b in 0..nb {
        let tile = &src[b * L::TILE_BLOCK..(b + 1) * L::TILE_BLOCK];
        for r in 0..TILE_ROWS {
            let blk = &mut dst[r * row_bytes + b * L::ROW_BLOCK..][..L::ROW_BLOCK];
            blk.fill(0);
            blk[0..2].copy_from_slice(&tile[2 * r..2 * r + 2]);
            if L::MIN {
                blk[2..4].copy_from_slice(&tile[32 + 2 * r..32 + 2 * r + 2]);
            }
            let mut qh = 0u32;
            for c in 0..32 {
                let ((at, high), fifth) = nibble_pos::<L>(r, c);
                let low = if high { tile[at] >> 4 } else { tile[at] & 0xF };
                blk[L::ROW_QS + c % 16] |= if c < 16 { low } else { low << 4 };
                if let Some((at, bit)) = fifth {
                    qh |= u32::from((tile[at] >> bit) & 1) << c;
                }
            }
            if L::HIGH.is_some() {
                blk[L::ROW_QH..L::ROW_QH + 4].copy_from_slice(&qh.to_le_bytes());
            }
        }
    }
}

/// The packer and unpacker of a type's tiles.
fn tile_fns(ty: GgmlType) -> (TileFn, TileFn) {
    match ty {
        GgmlType::Q6K => (fast::pack_q6k_tile, unpack_q6k_tile),
        GgmlType::Q8_0 => (fast::pack_q8_0_tile, unpack_q8_0_tile),
        GgmlType::Q4_0 => (
            fast::pack_nibbles_tile::<Q4_0Tile>,
            unpack_nibbles_tile::<Q4_0Tile>,
        ),
        GgmlType::Q4_1 => (
            fast::pack_nibbles_tile::<Q4_1Tile>,
            unpack_nibbles_tile::<Q4_1Tile>,
        ),
        GgmlType::Q5_0 => (
            fast::pack_nibbles_tile::<Q5_0Tile>,
            unpack_nibbles_tile::<Q5_0Tile>,
        ),
        GgmlType::Q5_1 => (
            fast::pack_nibbles_tile::<Q5_1Tile>,
            unpack_nibbles_tile::<Q5_1Tile>,
        ),
        GgmlType::Q5K => (fast::pack_q5k_tile, kq::unpack_q5k_tile),
        GgmlType::Q3K => (fast::pack_q3k_tile, kq::unpack_q3k_tile),
        GgmlType::Q2K => (fast::pack_q2k_tile, kq::unpack_q2k_tile),
        _ => (fast::pack_q4k_tile, unpack_q4k_tile),
    }
}

/// The element-by-element packer of a type's tiles: what the layout is, written out; the
/// reference [`fast`]'s packers are tested against.
#[cfg(test)]
fn reference_pack(ty: GgmlType) -> TileFn {
    match ty {
        GgmlType::Q6K => pack_q6k_tile,
        GgmlType::Q8_0 => pack_q8_0_tile,
        GgmlType::Q4_0 => pack_nibbles_tile::<Q4_0Tile>,
        GgmlType::Q4_1 => pack_nibbles_tile::<Q4_1Tile>,
        GgmlType::Q5_0 => pack_nibbles_tile::<Q5_0Tile>,
        GgmlType::Q5_1 => pack_nibbles_tile::<Q5_1Tile>,
        GgmlType::Q5K => kq::pack_q5k_tile,
        GgmlType::Q3K => kq::pack_q3k_tile,
        GgmlType::Q2K => kq::pack_q2k_tile,
        _ => pack_q4k_tile,
    }
}

type TileFn = fn(&[u8], usize, &mut [u8]);

/// One interleaved tile back to its 16 row-major rows (`tile` and `dst` are 16 rows' bytes).
pub(crate) fn unpack_tile(ty: GgmlType, tile: &[u8], cols: usize, dst: &mut [u8]) {
    (tile_fns(ty).1)(tile, cols / ty.block_size(), dst);
}

/// Element `e` of a row-major Q6_K block: (byte of `ql`, high nibble?, byte of `qh`, shift).
fn q6k_row_pos(e: usize) -> (usize, bool, usize, usize) {
    let (n, k, l) = (e / 128, e % 128 / 32, e % 32);
    (64 * n + l + 32 * (k & 1), k >= 2, 128 + 32 * n + l, 2 * k)
}

/// Element `e` of row `r` in a Q6_K tile block: (low-bits byte, high nibble?, top-bits byte,
/// shift).
fn q6k_tile_pos(r: usize, e: usize) -> (usize, bool, usize, usize) {
    let (g, k) = (e / 8, e % 8);
    let (h, q) = (e / 16, e % 16 / 4);
    (
        q6k_low(g / 2) + 64 * (g % 2) + 4 * r + k % 4,
        k >= 4,
        q6k_high(h) + 4 * r + e % 4,
        2 * q,
    )
}

#[cfg(test)]
fn pack_q6k_tile(src: &[u8], nb: usize, dst: &mut [u8]) {
    let row_bytes = nb * Q6K_BLOCK;
    for b in 0..nb {
        let out = &mut dst[b * Q6K_TILE_BLOCK..(b + 1) * Q6K_TILE_BLOCK];
        out.fill(0);
        for r in 0..TILE_ROWS {
            let blk = &src[r * row_bytes + b * Q6K_BLOCK..][..Q6K_BLOCK];
            out[2 * r..2 * r + 2].copy_from_slice(&blk[208..210]);
            for s in 0..16 {
                out[q6k_scales(s) + r] = blk[192 + s];
            }
            for e in 0..QK_K {
                let (l, lh, h, sh) = q6k_row_pos(e);
                let low = if lh { blk[l] >> 4 } else { blk[l] & 0xF };
                let top = (blk[h] >> sh) & 3;
                let (tl, tlh, th, tsh) = q6k_tile_pos(r, e);
                out[tl] |= if tlh { low << 4 } else { low };
                out[th] |= top << tsh;
            }
        }
    }
}

fn unpack_q6k_tile(src: &[u8], nb: usize, dst: &mut [u8]) {
    let row_bytes = nb * Q6K_BLOCK;
    for b in 0..nb {
        let tile = &src[b * Q6K_TILE_BLOCK..(b + 1) * Q6K_TILE_BLOCK];
        for r in 0..TILE_ROWS {
            let blk = &mut dst[r * row_bytes + b * Q6K_BLOCK..][..Q6K_BLOCK];
            blk[208..210].copy_from_slice(&tile[2 * r..2 * r + 2]);
            for s in 0..16 {
                blk[192 + s] = tile[q6k_scales(s) + r];
            }
            blk[..192].fill(0);
            for e in 0..QK_K {
                let (tl, tlh, th, tsh) = q6k_tile_pos(r, e);
                let low = if tlh { tile[tl] >> 4 } else { tile[tl] & 0xF };
                let top = (tile[th] >> tsh) & 3;
                let (l, lh, h, sh) = q6k_row_pos(e);
                blk[l] |= if lh { low << 4 } else { low };
                blk[h] |= top << sh;
            }
        }
    }
}

/// Where element `e` (0..256) of a row-major Q4_K block keeps its nibble: byte of `qs`, and
/// whether it is the high nibble.
fn q4k_row_nibble(e: usize) -> (usize, bool) {
    let (j, within) = (e / 64, e % 64);
    (32 * j + within % 32, within >= 32)
}

/// Where element `e` of row `r` goes in a tile block's quants (offset from the block start).
fn q4k_tile_nibble(r: usize, e: usize) -> (usize, bool) {
    let (g, k) = (e / 8, e % 8);
    (256 + 64 * g + 4 * r + k % 4, k >= 4)
}

/// Repacks one tile: `src` holds 16 row-major rows of `nb` Q4_K blocks, `dst` receives `nb`
/// tile blocks. Both are `16 * nb * 144` bytes.
#[cfg(test)]
fn pack_q4k_tile(src: &[u8], nb: usize, dst: &mut [u8]) {
    let row_bytes = nb * Q4K_BLOCK;
    for b in 0..nb {
        let out = &mut dst[b * Q4K_TILE_BLOCK..(b + 1) * Q4K_TILE_BLOCK];
        out[256..].fill(0);
        for r in 0..TILE_ROWS {
            let blk = &src[r * row_bytes + b * Q4K_BLOCK..][..Q4K_BLOCK];
            out[2 * r..2 * r + 2].copy_from_slice(&blk[0..2]);
            out[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&blk[2..4]);
            for j in 0..12 {
                out[64 + 16 * j + r] = blk[4 + j];
            }
            let qs = &blk[16..];
            // A group of 8 columns lies in one half of one 64-column chunk: 8 bytes of `qs`.
            for g in 0..QK_K / 8 {
                let (i, high) = q4k_row_nibble(8 * g);
                let nib = |b: u8| if high { b >> 4 } else { b & 0xF };
                let dst = &mut out[256 + 64 * g + 4 * r..][..4];
                for k in 0..4 {
                    dst[k] = nib(qs[i + k]) | (nib(qs[i + 4 + k]) << 4);
                }
            }
        }
    }
}

/// The inverse of [`pack_q4k_tile`].
fn unpack_q4k_tile(src: &[u8], nb: usize, dst: &mut [u8]) {
    let row_bytes = nb * Q4K_BLOCK;
    for b in 0..nb {
        let tile = &src[b * Q4K_TILE_BLOCK..(b + 1) * Q4K_TILE_BLOCK];
        for r in 0..TILE_ROWS {
            let blk = &mut dst[r * row_bytes + b * Q4K_BLOCK..][..Q4K_BLOCK];
            blk[0..2].copy_from_slice(&tile[2 * r..2 * r + 2]);
            blk[2..4].copy_from_slice(&tile[32 + 2 * r..32 + 2 * r + 2]);
            for j in 0..12 {
                blk[4 + j] = tile[64 + 16 * j + r];
            }
            let qs = &mut blk[16..];
            qs.fill(0);
            for e in 0..QK_K {
                let (o, from_high) = q4k_tile_nibble(r, e);
                let v = if from_high {
                    tile[o] >> 4
                } else {
                    tile[o] & 0xF
                };
                let (i, high) = q4k_row_nibble(e);
                qs[i] |= if high { v << 4 } else { v };
            }
        }
    }
}

/// Bytes below which a matrix is repacked on the calling thread alone.
const PARALLEL_BYTES: usize = 4 << 20;

/// Applies `f(src_tile, nb, dst_tile)` to every whole tile of a matrix in place, on as many
/// threads as the machine has (a load-time pass over the whole model).
fn each_tile(
    data: &mut [u8],
    rows: usize,
    row_bytes: usize,
    nb: usize,
    f: fn(&[u8], usize, &mut [u8]),
    parallel: bool,
) {
    let tile_bytes = TILE_ROWS * row_bytes;
    let tiles = rows / TILE_ROWS;
    if tiles == 0 {
        return;
    }
    // Threads for a whole model's matrices at load; one for a small matrix (a slab read into
    // a cache), where starting them would cost more than the work.
    let threads = if !parallel || tiles * tile_bytes < PARALLEL_BYTES {
        1
    } else {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(tiles)
    };
    let per = tiles.div_ceil(threads);
    let run = |chunk: &mut [u8]| {
        let mut tmp = vec![0u8; tile_bytes];
        for tile in chunk.chunks_exact_mut(tile_bytes) {
            f(tile, nb, &mut tmp);
            tile.copy_from_slice(&tmp);
        }
    };
    let whole = &mut data[..tiles * tile_bytes];
    if threads == 1 {
        run(whole);
        return;
    }
    std::thread::scope(|s| {
        for chunk in whole.chunks_mut(per * tile_bytes) {
            s.spawn(|| run(chunk));
        }
    });
}

/// Repacks a row-major matrix of `ty` into the interleaved layout, in place, on threads of its
/// own when `parallel` and the matrix is large. The caller checked that `ty` has one
/// ([`has_layout`]) and that `data` is `rows` rows of `cols` columns.
pub(crate) fn pack(ty: GgmlType, data: &mut [u8], rows: usize, cols: usize, parallel: bool) {
    debug_assert!(has_layout(ty));
    let nb = cols / ty.block_size();
    each_tile(data, rows, ty.row_bytes(cols), nb, tile_fns(ty).0, parallel);
}

/// The inverse of [`pack`].
pub(crate) fn unpack(ty: GgmlType, data: &mut [u8], rows: usize, cols: usize) {
    debug_assert!(has_layout(ty));
    let nb = cols / ty.block_size();
    each_tile(data, rows, ty.row_bytes(cols), nb, tile_fns(ty).1, true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trips_and_leaves_the_tail() {
        for ty in [
            GgmlType::Q4K,
            GgmlType::Q6K,
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q5K,
            GgmlType::Q3K,
            GgmlType::Q2K,
        ] {
            let (rows, cols) = (37, 512);
            let bytes = ty.row_bytes(cols) * rows;
            let orig: Vec<u8> = (0..bytes).map(|i| (i * 7919 % 251) as u8).collect();
            let mut data = orig.clone();
            pack(ty, &mut data, rows, cols, true);
            assert_ne!(data, orig);
            // The tail rows (past 32) are untouched.
            let tail = 32 * ty.row_bytes(cols);
            assert_eq!(data[tail..], orig[tail..]);
            unpack(ty, &mut data, rows, cols);
            assert_eq!(data, orig, "{ty}");
        }
    }

    /// The packers the layouts run at load give the bytes of the element-by-element ones,
    /// bit for bit, on random blocks of every type, one and several blocks per row.
    #[test]
    fn fast_packers_match_the_reference() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for ty in GgmlType::ALL.into_iter().filter(|&t| has_layout(t)) {
            for nb in [1, 3] {
                let bytes = TILE_ROWS * nb * ty.type_size();
                let src: Vec<u8> = (0..bytes)
                    .map(|_| {
                        seed = seed
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        (seed >> 56) as u8
                    })
                    .collect();
                let (mut fast, mut slow) = (vec![0xA5u8; bytes], vec![0x5Au8; bytes]);
                (tile_fns(ty).0)(&src, nb, &mut fast);
                reference_pack(ty)(&src, nb, &mut slow);
                assert!(fast == slow, "{ty}, {nb} blocks per row");
            }
        }
    }

    #[test]
    fn q6k_tile_positions_are_a_bijection() {
        // Every byte of a tile block has one owner: d, a scale, low bits or top bits, and every
        // bit of the quants' bytes belongs to exactly one element.
        #[derive(Clone, Copy, PartialEq, Debug)]
        enum Owner {
            Free,
            D,
            Scale,
            Low,
            High,
        }
        let mut owner = vec![Owner::Free; Q6K_TILE_BLOCK];
        let mut claim = |byte: usize, o: Owner| {
            assert!(
                owner[byte] == Owner::Free || owner[byte] == o,
                "byte {byte}: {:?} and {o:?}",
                owner[byte]
            );
            owner[byte] = o;
        };
        (0..32).for_each(|b| claim(b, Owner::D));
        for s in 0..16 {
            (0..TILE_ROWS).for_each(|r| claim(q6k_scales(s) + r, Owner::Scale));
        }
        let mut low = vec![0u8; Q6K_TILE_BLOCK];
        let mut top = vec![0u8; Q6K_TILE_BLOCK];
        for r in 0..TILE_ROWS {
            for e in 0..QK_K {
                let (l, lh, h, sh) = q6k_tile_pos(r, e);
                claim(l, Owner::Low);
                claim(h, Owner::High);
                let bit = if lh { 2 } else { 1 };
                assert_eq!(low[l] & bit, 0, "low bits of {r},{e} collide");
                low[l] |= bit;
                assert_eq!(top[h] & (1 << sh), 0, "top bits of {r},{e} collide");
                top[h] |= 1 << sh;
            }
        }
        assert!(!owner.contains(&Owner::Free), "a tile block byte is unused");
        assert!(
            low.iter()
                .zip(&owner)
                .all(|(&b, &o)| o != Owner::Low || b == 3)
        );
        assert!(
            top.iter()
                .zip(&owner)
                .all(|(&b, &o)| o != Owner::High || b == 0x55)
        );
    }

    /// Every byte of a [`Nibbles`] tile block has one owner (`d`, `m`, low bits or fifth
    /// bits), every bit of the quants' bytes belongs to exactly one element, and all are used.
    fn nibble_positions_are_a_bijection<L: Nibbles>() {
        let mut owner = vec![0u8; L::TILE_BLOCK];
        let mut bits = vec![0u8; L::TILE_BLOCK];
        let mut claim = |byte: usize, o: u8, bit: u8| {
            assert!(owner[byte] == 0 || owner[byte] == o, "byte {byte}: {o}");
            owner[byte] = o;
            assert_eq!(
                bits[byte] & bit,
                0,
                "bit {bit} of byte {byte} claimed twice"
            );
            bits[byte] |= bit;
        };
        for r in 0..TILE_ROWS {
            claim(2 * r, 1, 0xFF);
            claim(2 * r + 1, 1, 0xFF);
            if L::MIN {
                claim(32 + 2 * r, 2, 0xFF);
                claim(33 + 2 * r, 2, 0xFF);
            }
            for c in 0..32 {
                let ((at, high), fifth) = nibble_pos::<L>(r, c);
                claim(at, 3, if high { 0xF0 } else { 0x0F });
                if let Some((at, bit)) = fifth {
                    claim(at, 4, 1 << bit);
                }
            }
        }
        assert!(
            bits.iter().all(|&b| b == 0xFF),
            "a tile block bit is unused"
        );
    }

    #[test]
    fn nibble_tile_positions_are_a_bijection() {
        nibble_positions_are_a_bijection::<Q4_0Tile>();
        nibble_positions_are_a_bijection::<Q4_1Tile>();
        nibble_positions_are_a_bijection::<Q5_0Tile>();
        nibble_positions_are_a_bijection::<Q5_1Tile>();
    }

    #[test]
    fn q5_1_tile_places_element_values() {
        // Row 5, column 21 of block 0 is 0b1_0110 (fifth bit set, low bits 6).
        let mut src = vec![0u8; TILE_ROWS * 24];
        let blk = &mut src[5 * 24..6 * 24];
        blk[4..8].copy_from_slice(&(1u32 << 21).to_le_bytes());
        blk[8 + 5] = 6 << 4;
        let mut dst = vec![0u8; Q5_1Tile::TILE_BLOCK];
        pack_nibbles_tile::<Q5_1Tile>(&src, 1, &mut dst);
        // Column 21: group 2, k = 5 → byte 128 + 128 + 20 + 1, high nibble; fifth bit: byte
        // 64 + 20 + 1, bit 5.
        assert_eq!(dst[128 + 128 + 21], 6 << 4);
        assert_eq!(dst[64 + 21], 1 << 5);
        assert_eq!(dst.iter().filter(|&&b| b != 0).count(), 2);
    }

    #[test]
    fn q4k_tile_places_element_values() {
        // Row 3, element 70 of block 0 holds 9; it must appear at its tile position.
        let nb = 1;
        let mut src = vec![0u8; TILE_ROWS * Q4K_BLOCK];
        let (i, high) = q4k_row_nibble(70);
        src[3 * Q4K_BLOCK + 16 + i] = if high { 9 << 4 } else { 9 };
        let mut dst = vec![0u8; Q4K_TILE_BLOCK];
        pack_q4k_tile(&src, nb, &mut dst);
        // Element 70: group 8, k = 6 → byte 256 + 512 + 12 + 2, high nibble.
        assert_eq!(dst[256 + 64 * 8 + 4 * 3 + 2], 9 << 4);
        assert_eq!(dst.iter().filter(|&&b| b != 0).count(), 1);
    }
}
