//! The interleaved layouts of Q5_K, Q3_K and Q2_K (see the parent module for the idea). Each
//! tile block is a small header, then one part per sub-block (or pair of sub-blocks) holding
//! everything its columns need, so that a kernel reads the block front to back as one stream
//! (Q6_K's lesson: regions read side by side streamed from DRAM slower than the row kernels).
//! Every layout has exactly the bytes of the row-major one (repacking is in place).
//!
//! Two bit formats recur, both keeping 4 columns of a row in one 32-bit lane:
//! - *top bits of 32 columns* (64 bytes): bit `i` of byte `4 r + k` is column `4 i + k` of row
//!   `r` (Q5_0's format);
//! - *2 bits of 16 columns* (64 bytes): bits `2 i..2 i + 2` of byte `4 r + k` are column
//!   `4 i + k` of row `r` (Q6_K's top bits).
//!
//! One tile block of Q5_K ([`Q5K_TILE_BLOCK`] = 16 × 176 bytes):
//! - `[0, 256)`: as Q4_K's: `d`, `dmin`, and the 12 packed scale bytes transposed;
//! - then 8 parts of [`Q5K_SUB`] = 320 bytes, one per 32-column sub-block `j`: the 5th bits
//!   (top bits of 32 columns), then the low 4 bits as four of Q4_K's groups of 8 columns.
//!
//! One tile block of Q3_K ([`Q3K_TILE_BLOCK`] = 16 × 110 bytes):
//! - `[0, 32)`: the rows' `d` (f16); `[32, 224)`: the 12 packed scale bytes transposed, byte `j`
//!   of row `r` at `32 + 16 j + r`;
//! - then 8 parts of [`Q3K_SUB`] = 192 bytes, one per 32 columns `p` (16-column sub-blocks
//!   `2 p` and `2 p + 1`): the `hmask` bits (top bits of 32 columns), then the low 2 bits of
//!   each sub-block in turn (2 bits of 16 columns).
//!
//! One tile block of Q2_K ([`Q2K_TILE_BLOCK`] = 16 × 84 bytes):
//! - `[0, 32)`: `d` (f16), `[32, 64)`: `dmin` (f16);
//! - then 16 parts of [`Q2K_SUB`] = 80 bytes, one per 16-column sub-block `s`: the rows' scale
//!   bytes (scale in the low nibble, min in the high one, byte `r`), then the quants (2 bits of
//!   16 columns).

use strata_storage::quant::QK_K;

use super::TILE_ROWS;

const Q5K_BLOCK: usize = 176;
const Q3K_BLOCK: usize = 110;
const Q2K_BLOCK: usize = 84;
/// Bytes of one tile block of Q5_K / Q3_K / Q2_K (read by the x86 kernels only).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const Q5K_TILE_BLOCK: usize = TILE_ROWS * Q5K_BLOCK;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const Q3K_TILE_BLOCK: usize = TILE_ROWS * Q3K_BLOCK;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const Q2K_TILE_BLOCK: usize = TILE_ROWS * Q2K_BLOCK;

/// Where Q5_K's sub-block parts start, and the bytes of each.
pub(crate) const Q5K_PARTS: usize = 256;
pub(crate) const Q5K_SUB: usize = 64 + 256;
/// Where Q3_K's parts start (after `d` and the scales), and the bytes of each.
pub(crate) const Q3K_SCALES: usize = 32;
pub(crate) const Q3K_PARTS: usize = 32 + 192;
pub(crate) const Q3K_SUB: usize = 64 + 128;
/// Where Q2_K's sub-block parts start, and the bytes of each.
pub(crate) const Q2K_PARTS: usize = 64;
pub(crate) const Q2K_SUB: usize = 16 + 64;

/// A bit field of an element's value: byte, shift, width in bits.
type Field = (usize, u32, u32);

/// One type's element placement: where element `e` of a row-major block keeps its value's bit
/// fields, and where element `e` of row `r` keeps them in a tile block. A field is (byte, shift,
/// width in bits), listed from the value's low bits up.
struct Placement {
    block: usize,
    /// Copies the header fields (scales, `d`, …) of row `r` between a row block and a tile
    /// block: `(row, tile, r, to_tile)`.
    header: fn(&mut [u8], &mut [u8], usize, bool),
    row: fn(usize) -> [Field; 2],
    tile: fn(usize, usize) -> [Field; 2],
}

fn get(bytes: &[u8], (at, shift, bits): Field) -> u8 {
    (bytes[at] >> shift) & ((1 << bits) - 1)
}

fn put(bytes: &mut [u8], (at, shift, _): Field, v: u8) {
    bytes[at] |= v << shift;
}

/// Copies `n` bytes between `row[a..]` and `tile[b..]`, in the direction `to_tile` says.
fn copy(row: &mut [u8], a: usize, tile: &mut [u8], b: usize, n: usize, to_tile: bool) {
    if to_tile {
        tile[b..b + n].copy_from_slice(&row[a..a + n]);
    } else {
        row[a..a + n].copy_from_slice(&tile[b..b + n]);
    }
}

/// Top bits of 32 columns: column `c` of row `r`, from `base`.
fn top32(base: usize, r: usize, c: usize) -> Field {
    (base + 4 * r + c % 4, (c / 4) as u32, 1)
}

/// 2 bits of 16 columns: column `c` of row `r`, from `base`.
fn two16(base: usize, r: usize, c: usize) -> Field {
    (base + 4 * r + c % 4, 2 * (c / 4) as u32, 2)
}

const Q5K: Placement = Placement {
    block: Q5K_BLOCK,
    header: |row, tile, r, to_tile| {
        copy(row, 0, tile, 2 * r, 2, to_tile);
        copy(row, 2, tile, 32 + 2 * r, 2, to_tile);
        for j in 0..12 {
            copy(row, 4 + j, tile, 64 + 16 * j + r, 1, to_tile);
        }
    },
    // Block: d, dmin, scales[12], qh[32] @16, qs[128] @48.
    row: |e| {
        let (j, l) = (e / 32, e % 32);
        [
            (48 + 32 * (j / 2) + l, 4 * (j as u32 % 2), 4),
            (16 + l, j as u32, 1),
        ]
    },
    tile: |r, e| {
        let (part, c) = (Q5K_PARTS + Q5K_SUB * (e / 32), e % 32);
        let (g, k) = (c / 8, c % 8);
        [
            (part + 64 + 64 * g + 4 * r + k % 4, 4 * (k >= 4) as u32, 4),
            top32(part, r, c),
        ]
    },
};

const Q3K: Placement = Placement {
    block: Q3K_BLOCK,
    header: |row, tile, r, to_tile| {
        copy(row, 108, tile, 2 * r, 2, to_tile);
        for j in 0..12 {
            copy(row, 96 + j, tile, Q3K_SCALES + 16 * j + r, 1, to_tile);
        }
    },
    // Block: hmask[32] @0, qs[64] @32, scales[12] @96, d @108.
    row: |e| {
        let (half, shift, k) = (e / 128, (e % 128 / 32) as u32, e % 32);
        [(32 + 32 * half + k, 2 * shift, 2), (k, (e / 32) as u32, 1)]
    },
    tile: |r, e| {
        let (part, c) = (Q3K_PARTS + Q3K_SUB * (e / 32), e % 32);
        [
            two16(part + 64 + 64 * (c / 16), r, c % 16),
            top32(part, r, c),
        ]
    },
};

const Q2K: Placement = Placement {
    block: Q2K_BLOCK,
    header: |row, tile, r, to_tile| {
        copy(row, 80, tile, 2 * r, 2, to_tile);
        copy(row, 82, tile, 32 + 2 * r, 2, to_tile);
        for s in 0..16 {
            copy(row, s, tile, Q2K_PARTS + Q2K_SUB * s + r, 1, to_tile);
        }
    },
    // Block: scales[16] @0, qs[64] @16, d @80, dmin @82. The second field is empty.
    row: |e| {
        let (half, shift, k) = (e / 128, (e % 128 / 32) as u32, e % 32);
        [(16 + 32 * half + k, 2 * shift, 2), (0, 0, 0)]
    },
    tile: |r, e| {
        let (s, c) = (e / 16, e % 16);
        [two16(Q2K_PARTS + Q2K_SUB * s + 16, r, c), (0, 0, 0)]
    },
};

/// The value of element `e` in `bytes` where `fields` says it lives.
fn value(bytes: &[u8], fields: [Field; 2]) -> u8 {
    let [lo, hi] = fields;
    get(bytes, lo) | (get(bytes, hi) << lo.2)
}

fn place(bytes: &mut [u8], fields: [Field; 2], v: u8) {
    let [lo, hi] = fields;
    put(bytes, lo, v & ((1 << lo.2) - 1));
    put(bytes, hi, v >> lo.2);
}

/// Repacks one tile (`src`: 16 rows of `nb` blocks; `dst`: `nb` tile blocks), or its inverse.
fn repack(p: &Placement, src: &[u8], nb: usize, dst: &mut [u8], to_tile: bool) {
    let row_bytes = nb * p.block;
    let tile_block = TILE_ROWS * p.block;
    dst.fill(0);
    let mut tmp = vec![0u8; p.block.max(tile_block)];
    for b in 0..nb {
        for r in 0..TILE_ROWS {
            let row_at = r * row_bytes + b * p.block;
            let tile_at = b * tile_block;
            if to_tile {
                let blk = &src[row_at..row_at + p.block];
                let out = &mut dst[tile_at..tile_at + tile_block];
                tmp[..p.block].copy_from_slice(blk);
                (p.header)(&mut tmp[..p.block], out, r, true);
                for e in 0..QK_K {
                    place(out, (p.tile)(r, e), value(blk, (p.row)(e)));
                }
            } else {
                let tile = &src[tile_at..tile_at + tile_block];
                let blk = &mut dst[row_at..row_at + p.block];
                tmp[..tile_block].copy_from_slice(tile);
                (p.header)(blk, &mut tmp[..tile_block], r, false);
                for e in 0..QK_K {
                    place(blk, (p.row)(e), value(tile, (p.tile)(r, e)));
                }
            }
        }
    }
}

#[cfg(test)]
pub(super) fn pack_q5k_tile(src: &[u8], nb: usize, dst: &mut [u8]) {
    repack(&Q5K, src, nb, dst, true);
}
pub(super) fn unpack_q5k_tile(src: &[u8], nb: usize, dst: &mut [u8]) {
    repack(&Q5K, src, nb, dst, false);
}
#[cfg(test)]
pub(super) fn pack_q3k_tile(src: &[u8], nb: usize, dst: &mut [u8]) {
    repack(&Q3K, src, nb, dst, true);
}
pub(super) fn unpack_q3k_tile(src: &[u8], nb: usize, dst: &mut [u8]) {
    repack(&Q3K, src, nb, dst, false);
}
#[cfg(test)]
pub(super) fn pack_q2k_tile(src: &[u8], nb: usize, dst: &mut [u8]) {
    repack(&Q2K, src, nb, dst, true);
}
pub(super) fn unpack_q2k_tile(src: &[u8], nb: usize, dst: &mut [u8]) {
    repack(&Q2K, src, nb, dst, false);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every bit of a tile block has exactly one owner, header or element field, and so has
    /// every bit of a row block: the placement is a bijection of the same byte count.
    #[test]
    fn placements_are_bijections() {
        for (name, p) in [("Q5_K", Q5K), ("Q3_K", Q3K), ("Q2_K", Q2K)] {
            let tile_block = TILE_ROWS * p.block;
            // Header bits: copy all-ones through the header function alone.
            let mut tile = vec![0u8; tile_block];
            let mut ones = vec![0xFFu8; p.block];
            for r in 0..TILE_ROWS {
                (p.header)(&mut ones, &mut tile, r, true);
            }
            let mut owned = tile;
            // Header bytes of a row: those read back from an all-ones tile.
            let mut full = vec![0xFFu8; tile_block];
            let mut row_claim = vec![0u8; p.block];
            (p.header)(&mut row_claim, &mut full, 0, false);
            for r in 0..TILE_ROWS {
                for e in 0..QK_K {
                    for f in (p.tile)(r, e) {
                        let mask = (((1u16 << f.2) - 1) << f.1) as u8;
                        assert_eq!(owned[f.0] & mask, 0, "{name}: tile bit of {r},{e} taken");
                        owned[f.0] |= mask;
                    }
                }
            }
            for e in 0..QK_K {
                for f in (p.row)(e) {
                    let mask = (((1u16 << f.2) - 1) << f.1) as u8;
                    assert_eq!(row_claim[f.0] & mask, 0, "{name}: row bit of {e} taken");
                    row_claim[f.0] |= mask;
                }
            }
            assert!(
                owned.iter().all(|&b| b == 0xFF),
                "{name}: a tile bit is unused"
            );
            assert!(
                row_claim.iter().all(|&b| b == 0xFF),
                "{name}: a row bit is unused"
            );
        }
    }

    #[test]
    fn tiles_place_element_values() {
        // Row 5, element 200 (sub-block 6 of Q5_K, pair 6 of Q3_K, sub-block 12 of Q2_K) holds
        // the largest value of each type; every other quant bit is 0.
        for (p, v) in [(Q5K, 31u8), (Q3K, 7), (Q2K, 3)] {
            let mut src = vec![0u8; TILE_ROWS * p.block];
            place(&mut src[5 * p.block..6 * p.block], (p.row)(200), v);
            let mut dst = vec![0u8; TILE_ROWS * p.block];
            repack(&p, &src, 1, &mut dst, true);
            assert_eq!(value(&dst, (p.tile)(5, 200)), v);
            let set: u32 = dst.iter().map(|b| b.count_ones()).sum();
            assert_eq!(set, v.count_ones());
        }
        // Q5_K element 200 of row 5: part 6, group 1, k = 0 → low nibble of byte
        // 256 + 6 · 320 + 64 + 64 + 20; its top bit is bit 2 of byte 256 + 6 · 320 + 20.
        assert_eq!((Q5K.tile)(5, 200)[0], (256 + 6 * 320 + 128 + 20, 0, 4));
        assert_eq!((Q5K.tile)(5, 200)[1], (256 + 6 * 320 + 20, 2, 1));
    }
}
