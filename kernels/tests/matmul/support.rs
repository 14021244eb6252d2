//! What the matmul family's tests share: weights of every type, the CPU references, the error
//! measure. (A folder under tests/, so that Cargo does not build it as a test of its own.)
#![allow(dead_code, unreachable_pub, unused_imports)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use strata_kernels::ops::matmul::Weight;
use strata_kernels::{DeviceBuffer, Stream};
use strata_storage::quant::{GgmlType, dequantize_row, quantize_row};

pub use strata_kernels::ops::matmul::TYPES;

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn random_f32(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

pub fn is_quantized(ty: GgmlType) -> bool {
    !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16)
}

/// Columns per block of the type (1 for float types).
pub fn block(ty: GgmlType) -> usize {
    if is_quantized(ty) { ty.block_size() } else { 1 }
}

/// Byte offsets of the f16 scales in a block, which random bytes must not make inf/NaN.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q2K => &[80, 82],
        GgmlType::Q3K => &[108],
        GgmlType::Q6K => &[208],
        _ => &[],
    }
}

/// Weights of `rows` × `cols`: random bytes with sane f16 scales where `random_bytes` (every
/// bit pattern of the quants, scales and masks, including ones no quantizer writes), else the
/// reference quantizer applied to random floats.
pub fn weights(
    rng: &mut StdRng,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    random_bytes: bool,
) -> Vec<u8> {
    let rb = ty.row_bytes(cols);
    if random_bytes && is_quantized(ty) {
        let mut data: Vec<u8> = (0..rows * rb).map(|_| rng.r#gen()).collect();
        for b in data.chunks_exact_mut(ty.type_size()) {
            for &off in f16_fields(ty) {
                let v = half::f16::from_f32(rng.gen_range(0.001f32..0.02));
                b[off..off + 2].copy_from_slice(&v.to_bits().to_le_bytes());
            }
        }
        return data;
    }
    let mut data = vec![0u8; rows * rb];
    for r in 0..rows {
        let src = random_f32(rng, cols);
        quantize_row(ty, &src, &mut data[r * rb..(r + 1) * rb]).expect("quantize_row");
    }
    data
}

/// The weights dequantized by the CPU reference, `[rows][cols]`.
pub fn dequant(ty: GgmlType, data: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let rb = ty.row_bytes(cols);
    let mut out = vec![0f32; rows * cols];
    for r in 0..rows {
        dequantize_row(
            ty,
            &data[r * rb..(r + 1) * rb],
            &mut out[r * cols..(r + 1) * cols],
        )
        .expect("dequantize_row");
    }
    out
}

/// The values the integer kernels multiply by: each 32 activations quantized as q8_1 (d =
/// amax/127, q = round(x/d)) and scaled back by d — rounded to f16 as the decode layout stores
/// it (`f16_scale`), or the f32 d of the prefill layout.
pub fn q8_values(x: &[f32], f16_scale: bool) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (xs, o) in x.chunks_exact(32).zip(out.chunks_exact_mut(32)) {
        let amax = xs.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let ds = if f16_scale {
            half::f16::from_f32(d).to_f32()
        } else {
            d
        };
        for (v, o) in xs.iter().zip(o) {
            *o = ds * (v * id).round();
        }
    }
    out
}

/// `y[t][r] = Σ_c w[r][c] · x[t][c]` in f64, and Σ (w·x)² over every product (the error scale
/// when nothing cancels, so that a dot product near zero does not inflate the relative error).
pub fn reference(w: &[f32], x: &[f32], rows: usize, cols: usize, n: usize) -> (Vec<f32>, f64) {
    let mut y = vec![0f32; n * rows];
    let mut scale = 0f64;
    for t in 0..n {
        let xt = &x[t * cols..(t + 1) * cols];
        for r in 0..rows {
            let wr = &w[r * cols..(r + 1) * cols];
            let mut acc = 0f64;
            for (a, b) in wr.iter().zip(xt) {
                let p = *a as f64 * *b as f64;
                acc += p;
                scale += p * p;
            }
            y[t * rows + r] = acc as f32;
        }
    }
    (y, scale)
}

/// Squared error against the reference over its scale (see [`reference`]).
pub fn error(got: &[f32], want: &[f32], scale: f64) -> f64 {
    assert_eq!(got.len(), want.len());
    let e: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| ((g - w) as f64).powi(2))
        .sum();
    if got.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    e / scale.max(1e-30)
}

pub fn put<T: Copy>(s: &Stream, v: &[T]) -> DeviceBuffer {
    let bytes = std::mem::size_of_val(v).max(1);
    let b = s.device().alloc(bytes).expect("alloc");
    // SAFETY: T is plain data (f32, i32, u8 in these tests).
    let raw =
        unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) };
    s.upload(&b, 0, raw).expect("upload");
    b
}

pub fn get<T: Copy + Default>(s: &Stream, b: &DeviceBuffer, offset: usize, n: usize) -> Vec<T> {
    let mut v = vec![T::default(); n];
    // SAFETY: T is plain data; the slice covers exactly v's memory.
    let raw = unsafe {
        std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), n * std::mem::size_of::<T>())
    };
    s.download(b, offset, raw).expect("download");
    v
}

/// Weights on the device: the buffer (kept alive) and the matrix it holds.
pub fn put_weight(
    s: &Stream,
    ty: GgmlType,
    data: &[u8],
    rows: usize,
    cols: usize,
) -> (DeviceBuffer, Weight) {
    let b = put(s, data);
    let w = Weight {
        ptr: b.ptr(),
        ty,
        rows,
        cols,
    };
    (b, w)
}

/// A device buffer of `bytes` (at least 1), poisoned as fresh device memory is.
pub fn scratch(s: &Stream, bytes: usize) -> DeviceBuffer {
    s.device().alloc(bytes.max(1)).expect("alloc")
}

/// Where the real models are, if the store has them.
pub fn model(name: &str) -> Option<std::path::PathBuf> {
    let home = std::env::var_os("HOME")?;
    let p = std::path::PathBuf::from(home)
        .join(".local/share/strata/models")
        .join(format!("{name}.gguf"));
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "note: {} is absent; its real-tensor checks are skipped",
            p.display()
        );
        None
    }
}

/// `rows` rows from row `first` of tensor `name` in a GGUF file: (type, cols, bytes).
pub fn tensor_rows(
    path: &std::path::Path,
    name: &str,
    first: usize,
    rows: usize,
) -> (GgmlType, usize, Vec<u8>) {
    use std::io::{Read, Seek, SeekFrom};
    let g = strata_storage::gguf::GgufFile::open(path).expect("parse gguf");
    let t = g
        .tensor(name)
        .unwrap_or_else(|| panic!("{name} not in {}", path.display()));
    let cols = t.dims[0] as usize;
    let rb = t.ty.row_bytes(cols);
    assert!(
        first + rows <= t.n_rows() as usize,
        "{name} has {} rows",
        t.n_rows()
    );
    let mut f = std::fs::File::open(path).expect("open model");
    f.seek(SeekFrom::Start(
        g.tensor_range(t).start + (first * rb) as u64,
    ))
    .expect("seek");
    let mut buf = vec![0u8; rows * rb];
    f.read_exact(&mut buf).expect("read rows");
    (t.ty, cols, buf)
}

/// Error bound of a product against its reference with the activations as the kernel sees
/// them (q8_1 values for quantized weights, f16/bf16 for the tensor-core GEMM), over the sum of
/// squared products. Float rounding alone gives errors of order 1e-14 here: 1e-10. The exception
/// is the decode layout (`decode`) with weights that have an offset per 32 (Q4_1, Q5_1, Q4_K,
/// Q5_K): its term is `m·s` with q8_1's `s = d·Σq` stored as f16 (as ggml stores it and its GPU
/// kernels use it), off by up to 2⁻¹¹ relative; real Q4_K weights' mins make that term many
/// times the result (they cancel the codes' bias), which measures up to about 1e-6: 3e-6.
pub fn tight_bound(ty: GgmlType, decode: bool) -> f64 {
    let offset = matches!(
        ty,
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K
    );
    if decode && offset { 3e-6 } else { 1e-10 }
}
