//! GgufBuilder → GgufFile round trips: every value type, nested arrays, every tensor type,
//! alignments and versions.

use strata_storage::gguf::{ArrayValue, GgufBuilder, GgufError, GgufFile, Value};
use strata_storage::quant::GgmlType;

fn all_values() -> Vec<(&'static str, Value)> {
    vec![
        ("general.architecture", Value::String("llama".into())),
        ("t.u8", Value::U8(200)),
        ("t.i8", Value::I8(-100)),
        ("t.u16", Value::U16(60000)),
        ("t.i16", Value::I16(-30000)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-2_000_000_000)),
        ("t.f32", Value::F32(-1.5e-6)),
        ("t.bool.true", Value::Bool(true)),
        ("t.bool.false", Value::Bool(false)),
        ("t.string", Value::String("héllo ▁world 🦀".into())),
        ("t.string.empty", Value::String(String::new())),
        ("t.u64", Value::U64(u64::MAX)),
        ("t.i64", Value::I64(i64::MIN)),
        ("t.f64", Value::F64(std::f64::consts::PI)),
        ("a.u8", Value::Array(ArrayValue::U8(vec![0, 1, 255]))),
        ("a.i8", Value::Array(ArrayValue::I8(vec![-128, 0, 127]))),
        ("a.u16", Value::Array(ArrayValue::U16(vec![0, 65535]))),
        ("a.i16", Value::Array(ArrayValue::I16(vec![-32768, 32767]))),
        ("a.u32", Value::Array(ArrayValue::U32(vec![1, 2, 3]))),
        ("a.i32", Value::Array(ArrayValue::I32(vec![-1, 0, 1]))),
        (
            "a.f32",
            Value::Array(ArrayValue::F32(vec![0.0, -0.25, f32::MAX])),
        ),
        (
            "a.bool",
            Value::Array(ArrayValue::Bool(vec![true, false, true])),
        ),
        (
            "a.string",
            Value::Array(ArrayValue::String(vec![
                "<s>".into(),
                "".into(),
                "Ġthe".into(),
            ])),
        ),
        ("a.u64", Value::Array(ArrayValue::U64(vec![u64::MAX, 0]))),
        (
            "a.i64",
            Value::Array(ArrayValue::I64(vec![i64::MIN, i64::MAX])),
        ),
        ("a.f64", Value::Array(ArrayValue::F64(vec![1e300, -1e-300]))),
        ("a.empty", Value::Array(ArrayValue::F32(vec![]))),
        (
            "a.nested",
            Value::Array(ArrayValue::Array(vec![
                ArrayValue::I32(vec![1, 2]),
                ArrayValue::String(vec!["x".into()]),
                ArrayValue::Array(vec![ArrayValue::Bool(vec![true]), ArrayValue::U8(vec![])]),
                ArrayValue::Array(vec![]),
            ])),
        ),
    ]
}

/// Deterministic, recognisable tensor bytes.
fn bytes_of(n: u64, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn every_value_type_round_trips_in_order() {
    let mut b = GgufBuilder::new();
    for (k, v) in all_values() {
        b.kv(k, v);
    }
    let bytes = b.to_bytes();
    let f = GgufFile::from_bytes(&bytes).expect("parse");
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 32);
    assert_eq!(f.metadata.len(), all_values().len());
    let got: Vec<(&str, &Value)> = f.metadata.iter().collect();
    for ((k, v), (gk, gv)) in all_values().iter().zip(&got) {
        assert_eq!(k, gk);
        assert_eq!(v, *gv, "value of {k}");
    }
    assert!(f.tensors.is_empty());
    assert_eq!(f.data_offset % 32, 0);
    assert_eq!(f.data_offset, bytes.len() as u64);
}

#[test]
fn typed_getters_on_parsed_file() {
    let mut b = GgufBuilder::new();
    for (k, v) in all_values() {
        b.kv(k, v);
    }
    let f = GgufFile::from_bytes(&b.to_bytes()).expect("parse");
    let m = &f.metadata;
    assert_eq!(f.architecture().ok(), Some("llama"));
    assert_eq!(m.get_u32("t.u8").ok().flatten(), Some(200));
    assert_eq!(m.get_u64("t.u32").ok().flatten(), Some(4_000_000_000));
    assert_eq!(m.get_i64("t.i32").ok().flatten(), Some(-2_000_000_000));
    assert!(matches!(
        m.get_u32("t.i8"),
        Err(GgufError::WrongType { .. })
    ));
    assert_eq!(
        m.get_f32("t.f64").ok().flatten(),
        Some(std::f64::consts::PI as f32)
    );
    assert_eq!(m.get_bool("t.bool.true").ok().flatten(), Some(true));
    assert_eq!(
        m.get_str_array("a.string")
            .ok()
            .flatten()
            .map(<[String]>::len),
        Some(3)
    );
    assert_eq!(
        m.get_f32_array("a.f32").ok().flatten().map(<[f32]>::len),
        Some(3)
    );
    assert_eq!(
        m.get_i32_array("a.i32").ok().flatten(),
        Some(&[-1, 0, 1][..])
    );
    assert!(matches!(
        m.get_f32_array("a.i32"),
        Err(GgufError::WrongType { .. })
    ));
    assert_eq!(
        m.get_array("a.nested")
            .ok()
            .flatten()
            .map(|a| a.type_name()),
        Some("array")
    );
    let err = m.require_u32("no.such.key").expect_err("missing");
    assert!(matches!(err, GgufError::MissingKey { .. }));
    assert!(err.to_string().contains("no.such.key"));
    let err = m.get_str("t.u32").expect_err("wrong type");
    assert!(err.to_string().contains("t.u32"), "{err}");
}

#[test]
fn every_tensor_type_round_trips_with_data() {
    let mut b = GgufBuilder::new();
    b.kv("general.architecture", Value::String("test".into()));
    let mut expect = Vec::new();
    for (i, ty) in GgmlType::ALL.into_iter().enumerate() {
        let row = ty.block_size() as u64 * 2;
        let dims = [row, 3, 1, 2];
        let dims = &dims[..1 + i % 4];
        let n: u64 = dims.iter().product();
        let nb = ty.bytes_for(n).expect("whole blocks");
        let name = format!("t.{i}.{}", ty.name());
        b.tensor(&name, dims, ty, bytes_of(nb, i as u8));
        expect.push((name, dims.to_vec(), ty, n, nb));
    }
    let bytes = b.to_bytes();
    let f = GgufFile::from_bytes(&bytes).expect("parse");
    assert_eq!(f.tensors.len(), expect.len());
    for (i, (name, dims, ty, n, nb)) in expect.iter().enumerate() {
        let t = f.tensor(name).expect("by name");
        assert_eq!(&f.tensors[i], t, "file order");
        assert_eq!(&t.dims, dims);
        assert_eq!(t.ty, *ty);
        assert_eq!(t.n_elements, *n);
        assert_eq!(t.n_bytes, *nb);
        assert_eq!(t.offset % 32, 0);
        let r = f.tensor_range(t);
        assert_eq!(r.end - r.start, *nb);
        assert_eq!(f.tensor_bytes(&bytes, t), Some(&bytes_of(*nb, i as u8)[..]));
    }
    assert!(f.tensor("absent").is_none());
}

#[test]
fn alignment_and_version_are_honoured() {
    for (version, align) in [(2, 32), (3, 1), (3, 64), (2, 4096)] {
        let bytes = GgufBuilder::new()
            .version(version)
            .alignment(align)
            .tensor("a", &[3], GgmlType::F32, bytes_of(12, 1))
            .tensor("b", &[5], GgmlType::F16, bytes_of(10, 2))
            .to_bytes();
        let f = GgufFile::from_bytes(&bytes).expect("parse");
        assert_eq!(f.version, version);
        assert_eq!(f.alignment, align);
        assert_eq!(f.data_offset % align, 0);
        assert_eq!(
            f.metadata.get_u64("general.alignment").ok().flatten(),
            (align != 32).then_some(align)
        );
        let b = f.tensor("b").expect("b");
        assert_eq!(b.offset, 12u64.next_multiple_of(align));
        assert_eq!(f.tensor_bytes(&bytes, b), Some(&bytes_of(10, 2)[..]));
    }
}

#[test]
fn write_to_reports_length_and_matches_to_bytes() {
    let mut b = GgufBuilder::new();
    b.kv("k", Value::U8(1))
        .tensor("w", &[32], GgmlType::Q8_0, bytes_of(34, 0));
    let mut out = Vec::new();
    let n = b.write_to(&mut out).expect("write");
    assert_eq!(n, out.len() as u64);
    assert_eq!(out, b.to_bytes());
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("x.gguf");
    std::fs::write(&path, &out).expect("write file");
    let f = GgufFile::open(&path).expect("open");
    assert_eq!(f.file_size, n);
    assert_eq!(f.tensor("w").map(|t| t.n_bytes), Some(34));
}

/// Random metadata tables round-trip exactly (a cheap property test).
#[test]
fn random_metadata_round_trips() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for round in 0..200 {
        let mut b = GgufBuilder::new();
        let mut expect = Vec::new();
        for i in 0..rng.gen_range(0..12) {
            let v = match rng.gen_range(0..8) {
                0 => Value::U32(rng.r#gen()),
                1 => Value::I64(rng.r#gen()),
                2 => Value::F32(rng.r#gen()),
                3 => Value::Bool(rng.r#gen()),
                4 => Value::String(
                    (0..rng.gen_range(0..20))
                        .map(|_| rng.gen_range('a'..='z'))
                        .collect(),
                ),
                5 => Value::Array(ArrayValue::I32(
                    (0..rng.gen_range(0..50)).map(|_| rng.r#gen()).collect(),
                )),
                6 => Value::Array(ArrayValue::String(vec!["a".into(); rng.gen_range(0..5)])),
                _ => Value::Array(ArrayValue::Array(vec![
                    ArrayValue::F64(vec![rng.r#gen()]);
                    rng.gen_range(0..3)
                ])),
            };
            let k = format!("r{round}.k{i}");
            b.kv(&k, v.clone());
            expect.push((k, v));
        }
        let f = GgufFile::from_bytes(&b.to_bytes()).expect("parse");
        let got: Vec<(String, Value)> = f
            .metadata
            .iter()
            .map(|(k, v)| (k.to_owned(), v.clone()))
            .collect();
        assert_eq!(got, expect);
    }
}
