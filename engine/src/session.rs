//! Saving a context's KV cache with the tokens that produced it, and resuming from it: the
//! engine half of sessions (`strata run --prompt-cache`, `strata chat --session`, the
//! daemon's `session` field). The file format, its checksums and crash-safe writing are
//! `strata_storage::session`'s; here is what the cache must match to be resumed.

use std::path::Path;

use sha2::{Digest, Sha256};
use strata_storage::gguf::Value;
use strata_storage::quant::GgmlType;
use strata_storage::session::{self, SessionError, SessionMeta};

use crate::error::EngineError;
use crate::model::{Context, Model};

/// The cache types as a session records them: a GGML type id when keys and values share it
/// (f16 is 1, as files before per-side types wrote it), else `k | v << 8`.
fn kv_type_code((k, v): (GgmlType, GgmlType)) -> u32 {
    if k == v { k.id() } else { k.id() | v.id() << 8 }
}

fn kv_type_name(code: u32) -> String {
    let name = |id: u32| GgmlType::from_id(id).map_or(format!("#{id}"), |t| t.name().to_string());
    if code < 256 {
        name(code)
    } else {
        format!("{}/{}", name(code & 0xff), name(code >> 8))
    }
}

impl Model {
    /// The model and tokenizer identity a session of this model carries.
    pub fn session_ids(&self) -> ([u8; 32], [u8; 32]) {
        *self.session_ids.get_or_init(|| {
            let g = self.weights().gguf();
            let ranges: Vec<(u64, u64)> = g
                .tensors
                .iter()
                .filter(|t| t.n_bytes > 0)
                .map(|t| (g.data_offset + t.offset, t.span()))
                .collect();
            let model =
                session::model_identity(self.weights().path(), g.data_offset, g.file_size, &ranges);
            let mut h = Sha256::new();
            for (k, v) in g
                .metadata
                .iter()
                .filter(|(k, _)| k.starts_with("tokenizer."))
            {
                h.update(k.as_bytes());
                hash_value(&mut h, v);
            }
            (model, h.finalize().into())
        })
    }

    /// Saves the context's cache and `tokens` (the ids it holds, one per position) to `path`,
    /// crash-safely. Returns the bytes written.
    pub fn save_session(
        &self,
        ctx: &Context,
        tokens: &[u32],
        path: &Path,
    ) -> Result<u64, EngineError> {
        if tokens.len() != ctx.n_past() {
            return Err(EngineError::Invalid(format!(
                "session of {} tokens for a context holding {}",
                tokens.len(),
                ctx.n_past()
            )));
        }
        let (model_id, tokenizer_id) = self.session_ids();
        let meta = SessionMeta {
            model_id,
            tokenizer_id,
            kv_type: kv_type_code(ctx.kv.types()),
            n_layer: self.config.n_layer as u32,
            kv_dim: ctx.kv.kv_dim() as u32,
            tokens: tokens.to_vec(),
            n_chunks: 0,
        };
        let layers: Vec<(Vec<u8>, Vec<u8>)> = (0..self.config.n_layer)
            .map(|il| ctx.kv.export(il))
            .collect::<Result<_, _>>()?;
        let chunks: Vec<&[u8]> = layers.iter().flat_map(|(k, v)| [&k[..], &v[..]]).collect();
        Ok(session::write_atomic(path, &meta, &chunks)?)
    }

    /// Reads and validates the session at `path` completely — format, checksums, that it
    /// belongs to this model and tokenizer, that it fits the context — and only then replaces
    /// the context's cache with it. Returns its tokens. On any error the context is untouched.
    pub fn load_session(&self, ctx: &mut Context, path: &Path) -> Result<Vec<u32>, EngineError> {
        let (meta, chunks) = session::read(path)?;
        let mismatch = |reason: String| {
            EngineError::Session(SessionError::Mismatch {
                path: path.to_path_buf(),
                reason,
            })
        };
        let (model_id, tokenizer_id) = self.session_ids();
        if meta.model_id != model_id {
            return Err(mismatch("saved with a different model".into()));
        }
        if meta.tokenizer_id != tokenizer_id {
            return Err(mismatch("saved with a different tokenizer".into()));
        }
        let kv_dim = ctx.kv.kv_dim();
        let types = ctx.kv.types();
        if meta.kv_type != kv_type_code(types)
            || meta.n_layer as usize != self.config.n_layer
            || meta.kv_dim as usize != kv_dim
        {
            return Err(mismatch(format!(
                "cache shape (type {}, {} layers × {}) differs from this context's (type {}, {} × {kv_dim})",
                kv_type_name(meta.kv_type),
                meta.n_layer,
                meta.kv_dim,
                kv_type_name(kv_type_code(types)),
                self.config.n_layer
            )));
        }
        let n = meta.tokens.len();
        if n > ctx.n_ctx() {
            return Err(mismatch(format!(
                "{n} tokens do not fit a context of {}",
                ctx.n_ctx()
            )));
        }
        if let Some(t) = meta
            .tokens
            .iter()
            .find(|&&t| t as usize >= self.config.n_vocab)
        {
            return Err(mismatch(format!("token id {t} is outside the vocabulary")));
        }
        let (want_k, want_v) = ctx.kv.export_len(n);
        if chunks.len() != 2 * self.config.n_layer
            || chunks
                .chunks_exact(2)
                .any(|c| c[0].len() != want_k || c[1].len() != want_v)
        {
            return Err(mismatch(format!(
                "expected {} chunks of {want_k} and {want_v} bytes",
                2 * self.config.n_layer
            )));
        }
        ctx.kv.begin_import(n);
        for il in 0..self.config.n_layer {
            ctx.kv.import(il, &chunks[2 * il], &chunks[2 * il + 1])?;
        }
        Ok(meta.tokens)
    }
}

fn hash_value(h: &mut Sha256, v: &Value) {
    h.update(format!("{v:?}").as_bytes());
}
