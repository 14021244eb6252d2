//! What the act, moe and sample tests share: rows of the real models' tensors, and typed
//! uploads that keep the bytes' meaning (i32 lists, f32 rows).
#![allow(dead_code, unreachable_pub)]

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use strata_storage::gguf::GgufFile;
use strata_storage::quant::dequantize_row;

/// A real model from the shared store, or `None` (with a note) when it is absent.
pub fn model(name: &str) -> Option<(PathBuf, GgufFile)> {
    let home = std::env::var_os("HOME")?;
    let p = PathBuf::from(home)
        .join(".local/share/strata/models")
        .join(name);
    if !p.exists() {
        eprintln!("skipping the real-tensor part: {} not found", p.display());
        return None;
    }
    let f = GgufFile::open(&p).expect("the real model parses");
    Some((p, f))
}

/// Rows `first .. first + count` of tensor `name`, dequantized to f32, and the row length.
pub fn rows(
    path: &PathBuf,
    f: &GgufFile,
    name: &str,
    first: usize,
    count: usize,
) -> (Vec<f32>, usize) {
    let t = f
        .tensor(name)
        .unwrap_or_else(|| panic!("{name} in {}", path.display()));
    let cols = t.dims[0] as usize;
    let count = count.min(t.n_rows() as usize - first);
    let rb = t.ty.row_bytes(cols);
    let mut raw = vec![0u8; rb * count];
    let mut file = File::open(path).unwrap();
    file.seek(SeekFrom::Start(
        f.data_offset + t.offset + (first * rb) as u64,
    ))
    .unwrap();
    file.read_exact(&mut raw).unwrap();
    let mut out = vec![0f32; cols * count];
    for (src, dst) in raw.chunks_exact(rb).zip(out.chunks_exact_mut(cols)) {
        dequantize_row(t.ty, src, dst).unwrap();
    }
    (out, cols)
}

/// Logits as a tied-embedding model makes them: every token's embedding row dotted with a
/// hidden state, here the embedding of token `tok` itself (a realistic spread over the real
/// vocabulary size, with the peak at `tok` or a near-synonym). Rows are read in batches so
/// that the whole table is never held as f32.
pub fn embedding_logits(path: &PathBuf, f: &GgufFile, tok: usize) -> Vec<f32> {
    let t = f.tensor("token_embd.weight").unwrap();
    let vocab = t.n_rows() as usize;
    let (h, cols) = rows(path, f, "token_embd.weight", tok, 1);
    let mut logits = Vec::with_capacity(vocab);
    let batch = 4096;
    let mut first = 0;
    while first < vocab {
        let (r, _) = rows(path, f, "token_embd.weight", first, batch);
        logits.extend(
            r.chunks_exact(cols)
                .map(|row| row.iter().zip(&h).map(|(a, b)| a * b).sum::<f32>()),
        );
        first += batch;
    }
    logits
}

/// Deterministic pseudo-random u64s (xorshift), for ids and shuffles.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// `|a - b| <= tol`, with a message naming `what` and the index.
#[track_caller]
pub fn close(a: f32, b: f32, tol: f32, what: &str) {
    assert!(
        (a - b).abs() <= tol || (a.is_nan() && b.is_nan()),
        "{what}: {a} vs {b} (tolerance {tol:e})"
    );
}
