//! Dequantizes real tensors of the development models (Q4_K, Q5_0, Q6_K, Q8_0) and compares
//! with gguf-py. Offsets were found with gguf-py (`tests/data/gen_quant_real.py`) so this test
//! does not depend on strata's own GGUF parser; it skips a model that is absent or differs.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use sha2::{Digest, Sha256};
use strata_storage::quant::{GgmlType, dequantize_row};

fn models_dir() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share/strata/models"))
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

#[test]
fn real_tensors_match_gguf_py() {
    let data: serde_json::Value =
        serde_json::from_str(include_str!("data/quant_real.json")).expect("quant_real.json parses");
    let Some(dir) = models_dir() else {
        eprintln!("skip: no HOME");
        return;
    };
    let mut checked = 0;
    for t in data["tensors"].as_array().expect("tensors") {
        let file = dir.join(t["file"].as_str().expect("file"));
        let size = t["file_size"].as_u64().expect("file_size");
        let Ok(mut f) = std::fs::File::open(&file) else {
            eprintln!("skip: {} not present", file.display());
            continue;
        };
        let actual = f.metadata().map(|m| m.len()).unwrap_or(0);
        if actual != size {
            eprintln!(
                "skip: {} is {actual} bytes, vectors were made for {size}",
                file.display()
            );
            continue;
        }
        let name = t["tensor"].as_str().expect("tensor");
        let ty_name = t["type"].as_str().expect("type");
        let ty = GgmlType::ALL
            .into_iter()
            .find(|g| g.name() == ty_name)
            .expect("known type");
        let n = t["elements"].as_u64().expect("elements") as usize;
        let nbytes = t["bytes"].as_u64().expect("bytes") as usize;
        assert_eq!(ty.row_bytes(n), nbytes, "{name}");
        let mut raw = vec![0u8; nbytes];
        f.seek(SeekFrom::Start(t["offset"].as_u64().expect("offset")))
            .expect("seek");
        f.read_exact(&mut raw).expect("read tensor");
        let mut out = vec![0f32; n];
        dequantize_row(ty, &raw, &mut out).unwrap_or_else(|e| panic!("{name}: {e}"));

        let first: Vec<f32> = hex(t["first_values"].as_str().expect("first_values"))
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        for (i, (g, w)) in out.iter().zip(&first).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{name} ({ty}) element {i}: {g} vs {w}"
            );
        }
        let mut h = Sha256::new();
        for v in &out {
            h.update(v.to_le_bytes());
        }
        let digest: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            digest,
            t["sha256"].as_str().expect("sha256"),
            "{name} ({ty}) whole tensor"
        );
        checked += 1;
    }
    eprintln!("checked {checked} real tensors");
}
