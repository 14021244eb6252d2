//! The KV cache: keys and values of every past position, per layer, in f16 in RAM.
//!
//! Layout per layer: `[position][kv_head][head_dim]`, so one position's keys are contiguous
//! (appending a token writes one run) and one head's keys are a strided walk.

use half::f16;
use half::slice::HalfFloatSliceExt;

pub struct KvCache {
    n_ctx: usize,
    kv_dim: usize,
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
    len: usize,
}

impl KvCache {
    /// A cache for `n_ctx` positions of `n_layer` layers with `kv_dim` values per position.
    /// Pages are only touched (and so only cost RAM) as positions are filled.
    pub fn new(n_layer: usize, n_ctx: usize, kv_dim: usize) -> Self {
        let layer = || vec![f16::ZERO; n_ctx * kv_dim];
        Self {
            n_ctx,
            kv_dim,
            k: (0..n_layer).map(|_| layer()).collect(),
            v: (0..n_layer).map(|_| layer()).collect(),
            len: 0,
        }
    }

    /// Positions filled.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Forgets every position from `n` on.
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Bytes held for keys and values.
    pub fn size_bytes(&self) -> usize {
        2 * self.k.len() * self.n_ctx * self.kv_dim * 2
    }

    /// Writes `n` positions starting at `pos0` for layer `il` (k and v are `n × kv_dim` f32).
    pub(crate) fn store(&mut self, il: usize, pos0: usize, k: &[f32], v: &[f32]) {
        let range = pos0 * self.kv_dim..pos0 * self.kv_dim + k.len();
        self.k[il][range.clone()].convert_from_f32_slice(k);
        self.v[il][range].convert_from_f32_slice(v);
    }

    /// Marks positions up to `n` as filled, after every layer has stored them.
    pub(crate) fn set_len(&mut self, n: usize) {
        self.len = n;
    }

    pub(crate) fn layer(&self, il: usize) -> (&[f16], &[f16]) {
        (&self.k[il], &self.v[il])
    }

    /// The filled positions of layer `il` as little-endian f16 bytes: keys, then values.
    pub(crate) fn export(&self, il: usize) -> (Vec<u8>, Vec<u8>) {
        let n = self.len * self.kv_dim;
        let bytes = |v: &[f16]| v[..n].iter().flat_map(|x| x.to_le_bytes()).collect();
        (bytes(&self.k[il]), bytes(&self.v[il]))
    }

    /// Replaces layer `il`'s first `n` positions with `k` and `v` (as from [`KvCache::export`]);
    /// the caller checked the lengths and calls [`KvCache::set_len`] after every layer.
    pub(crate) fn import(&mut self, il: usize, k: &[u8], v: &[u8]) {
        for (dst, src) in [(&mut self.k[il], k), (&mut self.v[il], v)] {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16::from_le_bytes([s[0], s[1]]);
            }
        }
    }

    pub(crate) fn kv_dim(&self) -> usize {
        self.kv_dim
    }
}
