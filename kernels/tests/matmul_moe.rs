//! The mixture-of-experts products (ggml's MUL_MAT_ID) on the simulator against the CPU: the
//! decode form (`matvec_id_*`, one pair per weight read) and the prefill form (`moe_group` then
//! `gemm_id_*`), through `ops::matmul::matmul_id` for every weight type, with experts chosen on
//! the device, ids out of range, a padded expert stride, and both activation layouts (per token,
//! as the gate and up projections take it, and per (token, slot), as the down projection does).

mod common;
#[path = "matmul/support.rs"]
mod support;

use strata_kernels::ops::gemm;
use strata_kernels::ops::matmul::{At, Experts, matmul_id, matmul_id_scratch_bytes};
use strata_storage::quant::GgmlType;
use support::*;

/// What the kernel multiplies by: q8_1 values (f16 scales when decoding), the f16/bf16 the
/// tensor-core GEMM converts to, or the f32 activations themselves.
fn seen(ty: GgmlType, x: &[f32], decode: bool) -> Vec<f32> {
    match ty {
        GgmlType::F32 => x.to_vec(),
        GgmlType::F16 | GgmlType::Bf16 if decode => x.to_vec(),
        GgmlType::F16 => x.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect(),
        GgmlType::Bf16 => x
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_f32())
            .collect(),
        _ => q8_values(x, decode),
    }
}

/// Runs `matmul_id` on `n_expert` random experts and checks every (token, slot) against the
/// dequantized expert times its activation row; ids out of range must give NaN rows.
#[allow(clippy::too_many_arguments)]
fn check(
    s: &strata_kernels::Stream,
    rng: &mut rand::rngs::StdRng,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    n_expert: usize,
    ids: &[i32],
    n_tok: usize,
    n_slot: usize,
    x_per_slot: bool,
) -> Result<f64, String> {
    let mb = rows * ty.row_bytes(cols);
    // A stride past the matrix, the gap filled with bytes no matrix holds.
    let stride = (mb + 48).div_ceil(16) * 16;
    let mut data: Vec<u8> = (0..stride * n_expert).map(|i| (i * 7 + 3) as u8).collect();
    let mut wf = Vec::new();
    for e in 0..n_expert {
        let m = weights(rng, ty, rows, cols, true);
        wf.push(dequant(ty, &m, rows, cols));
        data[e * stride..e * stride + mb].copy_from_slice(&m);
    }
    let wb = put(s, &data);
    let w = Experts {
        ptr: wb.ptr(),
        ty,
        rows,
        cols,
        n_expert,
        stride,
    };
    let n_pairs = n_tok * n_slot;
    let x_rows = if x_per_slot { n_pairs } else { n_tok };
    let x = random_f32(rng, x_rows * cols);
    let xb = put(s, &x);
    let idb = put(s, ids);
    let y = scratch(s, n_pairs * rows * 4);
    let sc = scratch(
        s,
        matmul_id_scratch_bytes(ty, cols, n_tok, n_slot, n_expert, x_per_slot),
    );
    matmul_id(
        s,
        &w,
        At::from(&xb),
        x_per_slot,
        At::from(&idb),
        n_tok,
        n_slot,
        At::from(&y),
        At::from(&sc),
    )
    .map_err(|e| e.to_string())?;
    let got: Vec<f32> = get(s, &y, 0, n_pairs * rows);
    // Each pair a matrix-vector product (the activations as given, q8_1 with f16 scales), or
    // grouped for the GEMM past 8 tokens where it takes the weights (float rows of 16 bytes).
    let decode =
        n_tok <= 8 || (matches!(ty, GgmlType::F16 | GgmlType::Bf16) && !cols.is_multiple_of(8));
    let xs = seen(ty, &x, decode);
    let (mut err, mut scale) = (0f64, 0f64);
    for p in 0..n_pairs {
        let g = &got[p * rows..(p + 1) * rows];
        let e = ids[p];
        if e < 0 || e as usize >= n_expert {
            if !g.iter().all(|v| v.is_nan()) {
                return Err(format!(
                    "pair {p}: id {e} is out of range but its row is not NaN"
                ));
            }
            continue;
        }
        let xr = if x_per_slot { p } else { p / n_slot };
        let (want, sc) = reference(
            &wf[e as usize],
            &xs[xr * cols..(xr + 1) * cols],
            rows,
            cols,
            1,
        );
        err += g
            .iter()
            .zip(&want)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>();
        if g.iter().any(|v| !v.is_finite()) {
            return Err(format!("pair {p}: non-finite output"));
        }
        scale += sc;
    }
    let e = err / scale.max(1e-30);
    if e >= tight_bound(ty, decode) {
        return Err(format!("error {e:e}"));
    }
    Ok(e)
}

#[test]
fn matvec_id_every_type() {
    for dev in common::devices() {
        let s = dev.stream().unwrap();
        let mut rng = rng(21);
        let mut failures = Vec::new();
        // 3 tokens × 2 slots among 4 experts: a repeated expert, and ids 4 and -1 out of range.
        let ids = [2, 0, 3, 2, 4, -1];
        for (i, ty) in TYPES.into_iter().enumerate() {
            let cols = if is_quantized(ty) { 512 } else { 72 };
            let x_per_slot = i % 2 == 1;
            match check(&s, &mut rng, ty, 19, cols, 4, &ids, 3, 2, x_per_slot) {
                Ok(e) => eprintln!("matvec_id {ty}: {e:.2e}"),
                Err(m) => failures.push(format!("{ty} (x_per_slot {x_per_slot}): {m}")),
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}

#[test]
fn gemm_id_every_type() {
    for dev in common::devices() {
        let s = dev.stream().unwrap();
        let mut rng = rng(22);
        let mut failures = Vec::new();
        // 45 tokens × 2 slots among 5 experts: expert 1 takes 70 pairs (two tiles, the second
        // partial), expert 3 none, a few ids out of range; rows not a multiple of the tile.
        let (n_tok, n_slot, n_expert) = (45, 2, 5);
        let ids: Vec<i32> = (0..n_tok * n_slot)
            .map(|p| match p % 9 {
                0 => [0, 2, 4][(p / 9) % 3],
                4 if p % 18 == 4 => -3,
                8 if p == 8 => 9,
                _ => 1,
            })
            .collect();
        for (i, ty) in TYPES.into_iter().enumerate() {
            let cols = if is_quantized(ty) { 256 } else { 96 };
            let x_per_slot = i % 2 == 0;
            match check(
                &s, &mut rng, ty, 70, cols, n_expert, &ids, n_tok, n_slot, x_per_slot,
            ) {
                Ok(e) => eprintln!("gemm_id {ty}: {e:.2e}"),
                Err(m) => failures.push(format!("{ty} (x_per_slot {x_per_slot}): {m}")),
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}

#[test]
fn matmul_id_float_rows_off_16_bytes_take_one_pair_at_a_time() {
    // 12 tokens of 76 columns of f16: the tensor-core GEMM cannot copy these rows, so each pair
    // is a matrix-vector product, whatever the token count.
    let dev = common::sim();
    let s = dev.stream().unwrap();
    let mut rng = rng(23);
    let ids: Vec<i32> = (0..24).map(|p| p % 3).collect();
    for ty in [GgmlType::F16, GgmlType::Bf16] {
        let e = check(&s, &mut rng, ty, 9, 76, 3, &ids, 12, 2, true).unwrap();
        assert!(e < 1e-10, "{ty}: {e:e}");
    }
}

#[test]
fn moe_group_orders_pairs_by_expert_stably() {
    for dev in common::devices() {
        let s = dev.stream().unwrap();
        // 150 pairs among 3 experts (ids 0..3), 1500 among 2 (more than one chunk of 1024), and
        // ids out of range.
        for (n_pairs, n_expert) in [(150usize, 3usize), (1500, 2)] {
            let ids: Vec<i32> = (0..n_pairs)
                .map(|p| {
                    if p % 37 == 5 {
                        -1
                    } else {
                        (p * 7 % n_expert) as i32
                    }
                })
                .collect();
            let idb = put(&s, &ids);
            let max_tiles = gemm::moe_max_tiles(n_pairs, n_expert);
            let pairs = scratch(&s, n_pairs * 4);
            let tiles = scratch(&s, max_tiles * 16);
            gemm::moe_group(
                &s,
                At::from(&idb),
                n_pairs,
                n_expert,
                At::from(&pairs),
                At::from(&tiles),
            )
            .unwrap();
            let gp: Vec<i32> = get(&s, &pairs, 0, n_pairs);
            let gt: Vec<i32> = get(&s, &tiles, 0, max_tiles * 4);
            // The expected order: experts in turn, then the ids out of range, each by index.
            let bucket = |p: usize| {
                let e = ids[p];
                if e >= 0 && (e as usize) < n_expert {
                    e as usize
                } else {
                    n_expert
                }
            };
            let mut want: Vec<usize> = (0..n_pairs).collect();
            want.sort_by_key(|&p| (bucket(p), p));
            assert_eq!(gp.iter().map(|&p| p as usize).collect::<Vec<_>>(), want);
            // Tiles: each expert's run cut into 64s, in order; the rest empty.
            let mut expect = Vec::new();
            let mut at = 0;
            for b in 0..=n_expert {
                let c = want.iter().filter(|&&p| bucket(p) == b).count();
                let mut k = 0;
                while k < c {
                    let e = if b < n_expert { b as i32 } else { -1 };
                    expect.push([e, (at + k) as i32, (c - k).min(64) as i32, 0]);
                    k += 64;
                }
                at += c;
            }
            for (i, t) in gt.chunks_exact(4).enumerate() {
                let want = expect.get(i).copied().unwrap_or([0, 0, 0, 0]);
                assert_eq!(t, want, "tile {i} of {n_pairs} pairs");
            }
        }
    }
}

#[test]
fn matmul_id_refuses_bad_shapes() {
    let dev = common::sim();
    let s = dev.stream().unwrap();
    let buf = scratch(&s, 1 << 16);
    let w = Experts {
        ptr: buf.ptr(),
        ty: GgmlType::Q8_0,
        rows: 4,
        cols: 64,
        n_expert: 3,
        stride: 100, // less than one matrix (4 rows × 68 bytes)
    };
    let e = matmul_id(
        &s,
        &w,
        At::from(&buf),
        false,
        At::from(&buf),
        1,
        1,
        At::from(&buf),
        At::from(&buf),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("stride of 100 bytes"), "{e}");
}
