//! Parses the real development models and checks facts taken from gguf-py's reader.
//! Each test prints a message and passes when its model file is absent.

use std::path::PathBuf;
use std::time::Instant;

use strata_storage::gguf::GgufFile;
use strata_storage::quant::GgmlType;

fn model(name: &str) -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let p = PathBuf::from(home)
        .join(".local/share/strata/models")
        .join(name);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping: {} not found", p.display());
        None
    }
}

/// Opens a model, timing the parse; parsing must not read tensor data.
fn open_timed(name: &str) -> Option<GgufFile> {
    let path = model(name)?;
    let t = Instant::now();
    let f = GgufFile::open(&path).expect("parse real model");
    let ms = t.elapsed().as_secs_f64() * 1e3;
    eprintln!("{name}: parsed header in {ms:.1} ms");
    // Generous bound for a loaded 2-core CI machine; ~20 ms is typical in release.
    assert!(ms < 2000.0, "parsing {name} took {ms} ms");
    Some(f)
}

#[test]
fn gemma3_270m() {
    let Some(f) = open_timed("gemma3-270m.gguf") else {
        return;
    };
    assert_eq!(f.version, 3);
    assert_eq!(f.architecture().ok(), Some("gemma3"));
    assert_eq!(f.tensors.len(), 236);
    assert_eq!(
        f.metadata.len(),
        36 - 3,
        "gguf-py counts the 3 header fields too"
    );
    assert_eq!(f.metadata.require_u32("gemma3.block_count").ok(), Some(18));
    assert_eq!(
        f.metadata.get_u32("gemma3.context_length").ok().flatten(),
        Some(32768)
    );
    assert_eq!(
        f.metadata.get_str("tokenizer.ggml.model").ok().flatten(),
        Some("llama")
    );
    let tokens = f
        .metadata
        .get_str_array("tokenizer.ggml.tokens")
        .ok()
        .flatten()
        .expect("vocab");
    assert_eq!(tokens.len(), 262_144);
    assert_eq!(&tokens[..3], ["<pad>", "<eos>", "<bos>"]);
    let eps = f
        .metadata
        .require_f32("gemma3.attention.layer_norm_rms_epsilon")
        .ok();
    assert_eq!(eps, Some(1e-6));

    assert_eq!(f.alignment, 32);
    assert_eq!(f.data_offset, 6_525_120);
    let first = &f.tensors[0];
    assert_eq!(first.name, "output_norm.weight");
    assert_eq!(
        (first.dims.as_slice(), first.ty),
        (&[640][..], GgmlType::F32)
    );
    let embd = f.tensor("token_embd.weight").expect("token_embd");
    assert_eq!(embd.dims, [640, 262_144]);
    assert_eq!(embd.ty, GgmlType::Q8_0);
    assert_eq!(f.tensor_range(embd), 6_527_680..6_527_680 + 178_257_920);
    let last = f.tensors.last().expect("tensors");
    assert_eq!(last.name, "blk.17.post_ffw_norm.weight");
    assert_eq!(f.tensor_range(last), 253_110_464..253_113_024);
    assert_eq!(f.file_size, 253_113_024);
}

#[test]
fn qwen2_5_coder_1_5b() {
    let Some(f) = open_timed("qwen2.5-coder-1.5b.gguf") else {
        return;
    };
    assert_eq!(f.architecture().ok(), Some("qwen2"));
    assert_eq!(f.tensors.len(), 339);
    assert_eq!(f.metadata.require_u32("qwen2.block_count").ok(), Some(28));
    assert_eq!(
        f.metadata.require_f32("qwen2.rope.freq_base").ok(),
        Some(1_000_000.0)
    );
    assert_eq!(
        f.metadata.get_str("tokenizer.ggml.model").ok().flatten(),
        Some("gpt2")
    );
    let tokens = f
        .metadata
        .get_str_array("tokenizer.ggml.tokens")
        .ok()
        .flatten();
    assert_eq!(tokens.map(<[String]>::len), Some(151_936));
    let embd = f.tensor("token_embd.weight").expect("token_embd");
    assert_eq!(embd.ty, GgmlType::Q4K);
    assert_eq!(embd.dims, [1536, 151_936]);
    assert_eq!(embd.n_elements, 1536 * 151_936);
    assert_eq!(f.tensor_range(embd), 197_389_888..197_389_888 + 131_272_704);
    let out = f.tensor("output.weight").expect("output");
    assert_eq!(out.ty, GgmlType::Q6K);
    assert_eq!(f.data_offset, 5_950_528);
    assert_eq!(f.tensor_range(out).start, f.data_offset);
    let norm = f.tensors.last().expect("tensors");
    assert_eq!(norm.name, "output_norm.weight");
    assert_eq!(f.tensor_range(norm).end, f.file_size);
}

/// The same result whether the parser reads a file or a byte slice of its header.
#[test]
fn header_bytes_parse_like_the_file() {
    let Some(path) = model("gemma3-270m.gguf") else {
        return;
    };
    let f = GgufFile::open(&path).expect("open");
    let mut header = vec![0u8; f.data_offset as usize];
    let mut file = std::fs::File::open(&path).expect("open");
    std::io::Read::read_exact(&mut file, &mut header).expect("read header");
    // Only the header is supplied; the declared size still covers the tensor data.
    let g = GgufFile::read_from(&header[..], f.file_size).expect("read_from");
    assert_eq!(g.metadata, f.metadata);
    assert_eq!(g.tensors, f.tensors);
    assert_eq!(g.data_offset, f.data_offset);
}

/// Parses every file named in `STRATA_GGUF_TEST_FILES` (colon-separated), e.g. files written by
/// gguf-py's `GGUFWriter`, as a cross-check against another writer. Skipped when unset.
#[test]
fn files_from_env() {
    let Some(list) = std::env::var_os("STRATA_GGUF_TEST_FILES") else {
        eprintln!("skipping: STRATA_GGUF_TEST_FILES not set");
        return;
    };
    for p in std::env::split_paths(&list) {
        let f = GgufFile::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        eprintln!(
            "{}: v{} {} keys, {} tensors, data at {}",
            p.display(),
            f.version,
            f.metadata.len(),
            f.tensors.len(),
            f.data_offset
        );
    }
}
