//! Feeds arbitrary bytes to the GGUF parser. Beyond "no panic, no OOM", a file that parses must
//! keep the parser's promises: every tensor inside the file and findable by name, and a rewrite
//! through `GgufBuilder` that parses again and rewrites to the same bytes. Every error, of the
//! parser or of a typed metadata lookup, quotes at most a short prefix of the file's strings,
//! and a number read with `get_f32` is finite. `gguf.dict` (libFuzzer's `-dict=`) holds the
//! tokens that reach those cases quickly: the magic, hyperparameter keys, NaN, infinities and
//! negative floats.

#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_storage::gguf::{GgufBuilder, GgufFile};

fn rebuild(f: &GgufFile, bytes: &[u8]) -> Vec<u8> {
    let mut b = GgufBuilder::new();
    b.version(f.version).alignment(f.alignment);
    for (k, v) in f.metadata.iter() {
        b.kv(k, v.clone());
    }
    for t in &f.tensors {
        let data = f
            .tensor_bytes(bytes, t)
            .expect("validated tensor lies inside the file");
        b.tensor(&t.name, &t.dims, t.ty, data.to_vec());
    }
    b.to_bytes()
}

/// Longer than any message of the parser with its quotes clipped; far shorter than a string
/// the fuzzer can put in a file.
const MAX_MESSAGE: usize = 2048;

fuzz_target!(|data: &[u8]| {
    let f = match GgufFile::from_bytes(data) {
        Ok(f) => f,
        Err(e) => {
            assert!(e.to_string().len() < MAX_MESSAGE, "message echoes the file: {e}");
            return;
        }
    };
    for (k, _) in f.metadata.iter() {
        match f.metadata.get_f32(k) {
            Ok(Some(v)) => assert!(v.is_finite()),
            Ok(None) => {}
            Err(e) => assert!(e.to_string().len() < MAX_MESSAGE),
        }
        if let Err(e) = f.metadata.get_str(k) {
            assert!(e.to_string().len() < MAX_MESSAGE);
        }
    }
    assert!(f.data_offset % f.alignment == 0);
    for t in &f.tensors {
        let r = f.tensor_range(t);
        assert!(r.end <= f.file_size && r.start >= f.data_offset);
        assert_eq!(f.tensor(&t.name), Some(t));
        assert_eq!(t.ty.bytes_for(t.n_elements), Some(t.n_bytes));
    }
    let once = rebuild(&f, data);
    let g = GgufFile::from_bytes(&once).expect("a rewritten valid file parses");
    assert_eq!(g.tensors.len(), f.tensors.len());
    assert_eq!(rebuild(&g, &once), once, "rewrite is stable");
});
