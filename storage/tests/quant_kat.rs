//! Known-answer tests: block bytes and floats computed independently with gguf-py (llama.cpp's
//! numpy reference) by `tests/data/gen_quant_kat.py`. Dequantization must match bit for bit;
//! so must the round-to-nearest reference quantizers.

use strata_storage::quant::{GgmlType, dequantize_row, quantize_row};

fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn f32s(s: &str) -> Vec<f32> {
    hex(s)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn ty(name: &str) -> GgmlType {
    GgmlType::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("unknown type {name}"))
}

fn kat() -> serde_json::Value {
    let text = include_str!("data/quant_kat.json");
    serde_json::from_str(text).expect("quant_kat.json parses")
}

#[test]
fn dequantize_matches_gguf_py_bit_for_bit() {
    let kat = kat();
    let cases = kat["dequant"].as_array().expect("dequant cases");
    let mut seen = Vec::new();
    for case in cases {
        let t = ty(case["type"].as_str().expect("type"));
        let n = case["elements"].as_u64().expect("elements") as usize;
        let src = hex(case["bytes"].as_str().expect("bytes"));
        let want = f32s(case["values"].as_str().expect("values"));
        assert_eq!(want.len(), n);
        let mut got = vec![f32::NAN; n];
        dequantize_row(t, &src, &mut got).unwrap_or_else(|e| panic!("{t}: {e}"));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{t} element {i}: got {g}, want {w}"
            );
        }
        // The same bytes at an odd address (file data is not always aligned).
        let mut shifted = vec![0u8; src.len() + 1];
        shifted[1..].copy_from_slice(&src);
        let mut got2 = vec![f32::NAN; n];
        dequantize_row(t, &shifted[1..], &mut got2).unwrap_or_else(|e| panic!("{t}: {e}"));
        assert!(
            got.iter()
                .zip(&got2)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{t} unaligned"
        );
        seen.push(t);
    }
    for t in GgmlType::ALL.into_iter().filter(|t| t.can_dequantize()) {
        assert!(seen.contains(&t), "no known-answer vector for {t}");
    }
}

#[test]
fn reference_quantizers_match_bit_for_bit() {
    let kat = kat();
    for case in kat["quantize"].as_array().expect("quantize cases") {
        let t = ty(case["type"].as_str().expect("type"));
        let x = f32s(case["input"].as_str().expect("input"));
        let want = hex(case["bytes"].as_str().expect("bytes"));
        let mut got = vec![0u8; t.row_bytes(x.len())];
        quantize_row(t, &x, &mut got).unwrap_or_else(|e| panic!("{t}: {e}"));
        let bs = t.type_size();
        for (b, (g, w)) in got.chunks(bs).zip(want.chunks(bs)).enumerate() {
            assert_eq!(g, w, "{t} block {b}");
        }
    }
}
