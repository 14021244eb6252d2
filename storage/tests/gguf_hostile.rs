//! Malformed GGUF files built in memory (after llama.cpp's test-gguf.cpp and candle's
//! gguf_tests.rs). Each asserts the specific error variant and that the message names the field.

use std::io::Read;

use strata_storage::gguf::{
    ArrayValue, GgufBuilder, GgufError, GgufFile, STRIDED_NAMES_KEY, STRIDED_STRIDES_KEY, Value,
};
use strata_storage::quant::GgmlType;

/// A hand encoder for files the builder would not write.
#[derive(Default)]
struct Raw(Vec<u8>);

impl Raw {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Self {
        let mut r = Raw::default();
        r.bytes(b"GGUF").u32(version).u64(n_tensors).u64(n_kv);
        r
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }
    fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.str(key).u32(4).u32(v)
    }
    /// strata's strided layout: the names of the strided tensors, and their strides.
    fn names(&mut self, names: &[&str]) -> &mut Self {
        self.str(STRIDED_NAMES_KEY)
            .u32(9)
            .u32(8)
            .u64(names.len() as u64);
        for n in names {
            self.str(n);
        }
        self
    }
    fn strides(&mut self, strides: &[u64]) -> &mut Self {
        self.str(STRIDED_STRIDES_KEY)
            .u32(9)
            .u32(10)
            .u64(strides.len() as u64);
        for &s in strides {
            self.u64(s);
        }
        self
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    /// Pads to 32 and appends `n` data bytes.
    fn data(&mut self, n: usize) -> &mut Self {
        let pad = self.0.len().next_multiple_of(32) - self.0.len();
        self.0.extend(std::iter::repeat_n(0u8, pad + n));
        self
    }
    fn pos(&self) -> u64 {
        self.0.len() as u64
    }
    fn parse(&self) -> GgufError {
        GgufFile::from_bytes(&self.0).expect_err("hostile file must be rejected")
    }
}

fn parse_err(bytes: &[u8]) -> GgufError {
    GgufFile::from_bytes(bytes).expect_err("hostile file must be rejected")
}

/// The message mentions every needle.
fn says(e: &GgufError, needles: &[&str]) {
    let msg = e.to_string();
    for n in needles {
        assert!(msg.contains(n), "message {msg:?} should mention {n:?}");
    }
}

/// A valid file exercising every section: several value types, nested arrays, two tensors; the
/// last tensor's size is a multiple of 32 so the file has no trailing padding.
fn valid_file() -> Vec<u8> {
    GgufBuilder::new()
        .kv("general.architecture", Value::String("llama".into()))
        .kv("llama.block_count", Value::U32(2))
        .kv("b", Value::Bool(true))
        .kv("f", Value::F64(0.5))
        .kv(
            "tokens",
            Value::Array(ArrayValue::String(vec!["a".into(), "bc".into()])),
        )
        .kv(
            "nested",
            Value::Array(ArrayValue::Array(vec![ArrayValue::I16(vec![1, -1])])),
        )
        .tensor("w0", &[32, 2], GgmlType::Q8_0, vec![1; 68])
        .tensor("w1", &[8], GgmlType::F32, vec![2; 32])
        .to_bytes()
}

#[test]
fn valid_file_parses() {
    let bytes = valid_file();
    let f = GgufFile::from_bytes(&bytes).expect("valid");
    assert_eq!(f.tensors.len(), 2);
    let last = f.tensors.last().map(|t| f.tensor_range(t).end);
    assert_eq!(last, Some(bytes.len() as u64), "no trailing padding");
}

/// Every strict prefix of a valid file is rejected cleanly, both as a short slice and as a
/// reader that ends before the size it declared.
#[test]
fn truncated_at_every_byte() {
    let bytes = valid_file();
    let data_offset = GgufFile::from_bytes(&bytes).expect("valid").data_offset as usize;
    for len in 0..bytes.len() {
        let e = parse_err(&bytes[..len]);
        assert!(
            matches!(
                e,
                GgufError::Truncated { .. }
                    | GgufError::LengthTooLarge { .. }
                    | GgufError::CountTooLarge { .. }
                    | GgufError::TensorOutOfBounds { .. }
            ),
            "prefix of {len} bytes: unexpected {e:?}"
        );
        // The reader stops early although the declared size is whole: only header bytes are
        // read, so a cut inside the data section (or its padding) is not noticed.
        let lying = GgufFile::read_from(&bytes[..len], bytes.len() as u64);
        if len < data_offset - 32 {
            assert!(
                matches!(lying, Err(GgufError::Truncated { .. })),
                "lying reader, {len} bytes: {lying:?}"
            );
        }
    }
}

#[test]
fn bad_magic() {
    let mut b = valid_file();
    b[..4].copy_from_slice(b"GGML");
    let e = parse_err(&b);
    assert!(matches!(e, GgufError::BadMagic { found } if &found == b"GGML"));
    says(&e, &["magic", "GGUF"]);
}

#[test]
fn versions_1_and_4_are_rejected() {
    for v in [1, 4, 0] {
        let e = Raw::header(v, 0, 0).parse();
        assert!(matches!(e, GgufError::UnsupportedVersion { version } if version == v));
        says(&e, &["version", &v.to_string()]);
    }
    let e = Raw::header(3u32.swap_bytes(), 0, 0).parse();
    says(&e, &["big-endian"]);
}

#[test]
fn huge_counts() {
    for (nt, nk, field) in [
        (u64::MAX, 0, "tensor count"),
        (0, u64::MAX, "metadata key count"),
        (1 << 40, 0, "tensor count"),
        (0, 1 << 62, "metadata key count"),
        // Each fits alone in the 100 bytes left, but not both together.
        (2, 3, "tensor count"),
    ] {
        let mut r = Raw::header(3, nt, nk);
        r.bytes(&[0; 100]);
        let e = r.parse();
        assert!(matches!(e, GgufError::CountTooLarge { .. }), "{e:?}");
        says(&e, &[field]);
    }
}

#[test]
fn string_length_2_pow_63() {
    // As a key.
    let mut r = Raw::header(3, 0, 1);
    r.u64(1 << 63).bytes(&[0; 64]);
    let e = r.parse();
    assert!(matches!(e, GgufError::LengthTooLarge { len, offset: 24, .. } if len == 1 << 63));
    says(&e, &["key of metadata entry 0", "byte 24"]);
    // As a value.
    let mut r = Raw::header(3, 0, 1);
    r.str("general.name").u32(8).u64(u64::MAX).bytes(&[0; 64]);
    let e = r.parse();
    assert!(matches!(e, GgufError::LengthTooLarge { .. }));
    says(&e, &["'general.name'"]);
    // As a tensor name.
    let mut r = Raw::header(3, 1, 0);
    r.u64(1 << 63).bytes(&[0; 64]);
    says(&r.parse(), &["name of tensor 0"]);
}

#[test]
fn array_length_2_pow_63() {
    for elem_ty in [0u32, 4, 8, 9, 10] {
        let mut r = Raw::header(3, 0, 1);
        r.str("tokenizer.ggml.tokens")
            .u32(9)
            .u32(elem_ty)
            .u64(1 << 63)
            .bytes(&[0; 64]);
        let e = r.parse();
        assert!(
            matches!(e, GgufError::LengthTooLarge { len, .. } if len == 1 << 63),
            "{e:?}"
        );
        says(&e, &["'tokenizer.ggml.tokens'"]);
    }
    // A count whose byte size overflows u64 (2^62 u64s).
    let mut r = Raw::header(3, 0, 1);
    r.str("a").u32(9).u32(10).u64(1 << 62).bytes(&[0; 64]);
    assert!(matches!(r.parse(), GgufError::LengthTooLarge { .. }));
}

#[test]
fn bad_alignment_values() {
    for (v, why) in [
        (Value::U32(0), "0 is not"),
        (Value::U32(3), "3 is not"),
        (Value::U64(48), "48"),
        (Value::U64(1 << 40), "larger than"),
    ] {
        let b = GgufBuilder::new().kv("general.alignment", v).to_bytes();
        let e = parse_err(&b);
        assert!(matches!(e, GgufError::BadAlignment { .. }), "{e:?}");
        says(&e, &["general.alignment", why]);
    }
    for v in [Value::String("32".into()), Value::I32(32), Value::F32(32.0)] {
        let b = GgufBuilder::new().kv("general.alignment", v).to_bytes();
        let e = parse_err(&b);
        assert!(matches!(e, GgufError::BadAlignment { .. }), "{e:?}");
        says(&e, &["general.alignment", "expected u32"]);
    }
}

#[test]
fn overlapping_tensors() {
    let mut r = Raw::header(3, 2, 0);
    r.tensor("a", &[16], 0, 0)
        .tensor("blk.0.attn_q.weight", &[16], 0, 32)
        .data(128);
    let e = r.parse();
    assert!(
        matches!(&e, GgufError::TensorOverlap { tensor, other, .. } if tensor == "blk.0.attn_q.weight" && other == "a")
    );
    says(&e, &["'blk.0.attn_q.weight'", "overlaps tensor 'a'"]);
    // The same offset twice.
    let mut r = Raw::header(3, 2, 0);
    r.tensor("a", &[8], 0, 0).tensor("b", &[8], 0, 0).data(64);
    assert!(matches!(r.parse(), GgufError::TensorOverlap { .. }));
}

#[test]
fn unknown_type_id() {
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[32], 4, 0).data(64);
    let e = r.parse();
    assert!(matches!(e, GgufError::UnknownType { type_id: 4, .. }));
    says(&e, &["'w'", "type id 4"]);
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[32], u32::MAX, 0).data(64);
    assert!(matches!(r.parse(), GgufError::UnknownType { .. }));
}

#[test]
fn dim_counts_0_and_5() {
    for dims in [&[][..], &[1, 1, 1, 1, 1][..]] {
        let mut r = Raw::header(3, 1, 0);
        r.tensor("w", dims, 0, 0).data(64);
        let e = r.parse();
        assert!(
            matches!(e, GgufError::BadDimCount { n_dims, .. } if n_dims as usize == dims.len())
        );
        says(&e, &["'w'", "dimensions"]);
    }
}

#[test]
fn zero_dim() {
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[4, 0], 0, 0).data(64);
    let e = r.parse();
    assert!(matches!(e, GgufError::ZeroDim { index: 1, .. }));
    says(&e, &["'w'", "dimension 1 is 0"]);
}

#[test]
fn dim_product_overflow() {
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[1 << 32, 1 << 32], 0, 0).data(64);
    let e = r.parse();
    assert!(matches!(e, GgufError::ElementCountOverflow { .. }));
    says(&e, &["'w'", "overflow"]);
    // Elements fit, bytes do not: 2^62 f32s.
    let mut r = Raw::header(3, 1, 0);
    r.tensor("x", &[1 << 31, 1 << 31], 0, 0).data(64);
    assert!(matches!(r.parse(), GgufError::ElementCountOverflow { .. }));
}

#[test]
fn misaligned_offset() {
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[4], 0, 16).data(64);
    let e = r.parse();
    assert!(matches!(
        e,
        GgufError::MisalignedTensor {
            data_offset: 16,
            alignment: 32,
            ..
        }
    ));
    says(&e, &["'w'", "alignment 32"]);
    // With general.alignment = 64, an offset of 32 is misaligned.
    let mut r = Raw::header(3, 1, 1);
    r.kv_u32("general.alignment", 64)
        .tensor("w", &[4], 0, 32)
        .data(128);
    let e = r.parse();
    assert!(matches!(
        e,
        GgufError::MisalignedTensor {
            data_offset: 32,
            alignment: 64,
            ..
        }
    ));
}

#[test]
fn offset_past_eof() {
    let mut r = Raw::header(3, 1, 0);
    let entry = r.pos();
    r.tensor("blk.0.attn_q.weight", &[16, 4], 0, 0).data(100);
    let size = r.pos();
    let e = r.parse();
    let offset_field = entry + 8 + 19 + 4 + 16 + 4;
    assert!(
        matches!(e, GgufError::TensorOutOfBounds { offset, file_size, .. } if offset == offset_field && file_size == size)
    );
    says(
        &e,
        &[
            "tensor 'blk.0.attn_q.weight' at byte",
            "runs past end of file",
            &format!("size {size}"),
        ],
    );
    // An offset that overflows when added to the data section's start.
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[4], 0, u64::MAX - 31).data(64);
    assert!(matches!(r.parse(), GgufError::TensorOutOfBounds { .. }));
}

#[test]
fn duplicate_key() {
    let b = GgufBuilder::new()
        .kv("general.name", Value::String("a".into()))
        .kv("general.name", Value::U8(1))
        .to_bytes();
    let e = parse_err(&b);
    assert!(matches!(&e, GgufError::DuplicateKey { key, .. } if key == "general.name"));
    says(&e, &["'general.name'", "twice"]);
}

#[test]
fn duplicate_tensor_name() {
    let b = GgufBuilder::new()
        .tensor("w", &[4], GgmlType::F32, vec![0; 16])
        .tensor("w", &[4], GgmlType::F32, vec![0; 16])
        .to_bytes();
    let e = parse_err(&b);
    assert!(matches!(&e, GgufError::DuplicateTensor { tensor, .. } if tensor == "w"));
    says(&e, &["'w'", "twice"]);
}

#[test]
fn bad_bool() {
    let mut r = Raw::header(3, 0, 1);
    r.str("flag").u32(7).bytes(&[2]);
    let e = r.parse();
    assert!(matches!(e, GgufError::BadBool { byte: 2, .. }));
    says(&e, &["'flag'", "bool"]);
    let mut r = Raw::header(3, 0, 1);
    r.str("flags").u32(9).u32(7).u64(3).bytes(&[1, 0, 255]);
    let e = r.parse();
    let at = r.pos() - 1;
    assert!(
        matches!(e, GgufError::BadBool { byte: 255, offset, .. } if offset == at),
        "{e:?}"
    );
}

#[test]
fn bad_value_type() {
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(13).bytes(&[0; 16]);
    let e = r.parse();
    assert!(matches!(e, GgufError::BadValueType { type_id: 13, .. }));
    says(&e, &["'k'", "unknown value type 13"]);
    // As an array element type.
    let mut r = Raw::header(3, 0, 1);
    r.str("arr").u32(9).u32(99).u64(1).bytes(&[0; 16]);
    assert!(matches!(
        r.parse(),
        GgufError::BadValueType { type_id: 99, .. }
    ));
}

#[test]
fn row_not_block_multiple() {
    let mut r = Raw::header(3, 1, 0);
    r.tensor("blk.0.ffn_up.weight", &[100, 2], GgmlType::Q4K.id(), 0)
        .data(1024);
    let e = r.parse();
    assert!(matches!(
        e,
        GgufError::RowNotBlockMultiple {
            row: 100,
            block_size: 256,
            ty: GgmlType::Q4K,
            ..
        }
    ));
    says(&e, &["'blk.0.ffn_up.weight'", "Q4_K", "256"]);
}

#[test]
fn invalid_utf8() {
    let mut r = Raw::header(3, 0, 1);
    r.u64(2).bytes(&[0xff, 0xfe]).u32(0).bytes(&[0]);
    let e = r.parse();
    assert!(matches!(e, GgufError::InvalidUtf8 { offset: 24, .. }));
    says(&e, &["key of metadata entry 0", "UTF-8"]);
    let mut r = Raw::header(3, 0, 1);
    r.str("tokens")
        .u32(9)
        .u32(8)
        .u64(2)
        .str("ok")
        .u64(1)
        .bytes(&[0x80]);
    says(&r.parse(), &["'tokens'[1]", "UTF-8"]);
    let mut r = Raw::header(3, 1, 0);
    r.u64(1).bytes(&[0xc0]).u32(1).u64(4).u32(0).u64(0).data(16);
    says(&r.parse(), &["name of tensor 0", "UTF-8"]);
}

#[test]
fn arrays_nested_too_deep() {
    let mut r = Raw::header(3, 0, 1);
    r.str("deep").u32(9);
    for _ in 0..20 {
        r.u32(9).u64(1);
    }
    r.u32(0).u64(0);
    let e = r.parse();
    assert!(matches!(e, GgufError::ArrayTooDeep { .. }), "{e:?}");
    says(&e, &["'deep'", "nested"]);
    // Eight levels are fine.
    let mut r = Raw::header(3, 0, 1);
    r.str("ok").u32(9);
    for _ in 0..7 {
        r.u32(9).u64(1);
    }
    r.u32(0).u64(0);
    assert!(GgufFile::from_bytes(&r.0).is_ok());
}

#[test]
fn missing_and_mistyped_architecture() {
    let f = GgufFile::from_bytes(&GgufBuilder::new().to_bytes()).expect("empty file");
    let e = f.architecture().expect_err("absent");
    assert!(matches!(e, GgufError::MissingKey { .. }));
    says(&e, &["general.architecture"]);
    let b = GgufBuilder::new()
        .kv("general.architecture", Value::U32(1))
        .to_bytes();
    let f = GgufFile::from_bytes(&b).expect("parse");
    let e = f.architecture().expect_err("wrong type");
    assert!(matches!(e, GgufError::WrongType { .. }));
    says(&e, &["general.architecture", "u32 1"]);
}

#[test]
fn open_missing_file() {
    let e = GgufFile::open(std::path::Path::new("/nonexistent/model.gguf")).expect_err("absent");
    assert!(matches!(e, GgufError::Open { .. }));
    says(&e, &["/nonexistent/model.gguf"]);
}

/// A reader that fails after `ok` bytes, as a disk might.
struct FailingReader<'a> {
    bytes: &'a [u8],
    ok: usize,
}

impl Read for FailingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.ok == 0 {
            return Err(std::io::Error::other("injected EIO"));
        }
        let n = buf.len().min(self.ok).min(self.bytes.len());
        buf[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        self.ok -= n;
        Ok(n)
    }
}

#[test]
fn io_errors_are_reported_with_the_field() {
    let bytes = valid_file();
    let e = GgufFile::read_from(
        FailingReader {
            bytes: &bytes,
            ok: 30,
        },
        bytes.len() as u64,
    )
    .expect_err("EIO");
    assert!(matches!(e, GgufError::Io { offset: 30, .. }), "{e:?}");
    says(&e, &["injected EIO", "byte 30"]);
}

/// A file-size claim much larger than the bytes present must not size any allocation: the
/// reader runs out long before anything 2^40 bytes large is reserved.
#[test]
fn lying_file_size_does_not_allocate() {
    let mut r = Raw::header(3, 0, 1);
    r.str("big").u32(8).u64(1 << 40).bytes(b"abc");
    let e = GgufFile::read_from(&r.0[..], 1 << 41).expect_err("short reader");
    assert!(matches!(e, GgufError::Truncated { .. }), "{e:?}");
    let mut r = Raw::header(3, 0, 1);
    r.str("big").u32(9).u32(0).u64(1 << 40).bytes(b"abc");
    let e = GgufFile::read_from(&r.0[..], 1 << 41).expect_err("short reader");
    assert!(matches!(e, GgufError::Truncated { .. }), "{e:?}");
}

/// Prints a sample of messages (run with --nocapture) so their wording can be reviewed.
#[test]
fn sample_messages() {
    let bytes = valid_file();
    for len in [3, 10, 30, 60, bytes.len() - 5] {
        eprintln!("{}", parse_err(&bytes[..len]));
    }
    let mut r = Raw::header(3, 1, 0);
    r.tensor("blk.0.attn_q.weight", &[16, 4], 0, 0).data(100);
    eprintln!("{}", r.parse());
    eprintln!("{}", Raw::header(1, 0, 0).parse());
    eprintln!("{}", Raw::header(3, 1 << 40, 0).parse());
}

/// strata's strided layout (`strata optimize`): each inconsistency named.
#[test]
fn hostile_strided_tables_are_refused_by_name() {
    // Two tensors of 2 slices of 32 bytes ([8, 1, 2] f32), records of 64 bytes: valid.
    let good = || {
        let mut r = Raw::header(3, 2, 2);
        r.names(&["g", "u"]).strides(&[64, 64]);
        r.tensor("g.strided", &[8, 1, 2], 0, 0)
            .tensor("u.strided", &[8, 1, 2], 0, 32);
        r
    };
    let mut ok = good();
    ok.data(128);
    let f = GgufFile::from_bytes(&ok.0).expect("the valid table");
    assert_eq!(f.tensor("u").and_then(|t| t.stride), Some(64));

    // The data ends before the last record does.
    let e = good().data(96).parse();
    assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e}");

    // A strided name the metadata does not list.
    let mut r = Raw::header(3, 1, 2);
    r.names(&["x"])
        .strides(&[64])
        .tensor("g.strided", &[8, 1, 2], 0, 0);
    let e = r.data(128).parse();
    says(&e, &["'g'", "not listed"]);

    // Listed, but no such tensor (or only its plain namesake).
    let mut r = Raw::header(3, 1, 2);
    r.names(&["g"]).strides(&[64]).tensor("g", &[8, 1, 2], 0, 0);
    says(&r.data(128).parse(), &["'g'", "no tensor 'g.strided'"]);

    // A stride shorter than a slice, or off the alignment, or zero.
    for (stride, needle) in [
        (32, "more than the stride"),
        (48, "multiple"),
        (0, "positive"),
    ] {
        let mut r = Raw::header(3, 1, 2);
        r.names(&["g"])
            .strides(&[stride])
            .tensor("g.strided", &[8, 2, 2], 0, 0);
        says(&r.data(128).parse(), &["'g'", needle]);
    }

    // A stride near 2^64: its span overflows (2 slices), or is just its one slice.
    let huge = u64::MAX / 32 * 32;
    let mut r = Raw::header(3, 1, 2);
    r.names(&["g"])
        .strides(&[huge])
        .tensor("g.strided", &[8, 1, 2], 0, 0);
    assert!(matches!(
        r.data(128).parse(),
        GgufError::TensorOutOfBounds { .. }
    ));
    let mut r = Raw::header(3, 2, 2);
    r.names(&["g", "u"]).strides(&[huge, huge]);
    r.tensor("g.strided", &[8, 1, 1], 0, 0)
        .tensor("u.strided", &[8, 1, 1], 0, 32);
    r.data(64);
    let f = GgufFile::from_bytes(&r.0).expect("one slice each");
    assert_eq!(f.tensor("u").map(|t| t.span()), Some(32));

    // A 1-D strided tensor.
    let mut r = Raw::header(3, 1, 2);
    r.names(&["g"])
        .strides(&[64])
        .tensor("g.strided", &[8], 0, 0);
    says(&r.data(128).parse(), &["'g'", "1-D"]);

    // Names and strides that do not pair up, or one without the other.
    let mut r = Raw::header(3, 0, 2);
    r.names(&["g", "u"]).strides(&[64]);
    says(
        &r.data(0).parse(),
        &[STRIDED_STRIDES_KEY, "1 strides for 2 names"],
    );
    let mut r = Raw::header(3, 0, 1);
    r.names(&["g"]);
    says(&r.data(0).parse(), &[STRIDED_STRIDES_KEY, "missing"]);

    // The same name twice.
    let mut r = Raw::header(3, 0, 2);
    r.names(&["g", "g"]).strides(&[64, 64]);
    says(&r.data(0).parse(), &["'g'", "twice"]);

    // Two group members whose slices overlap in a record.
    let mut r = Raw::header(3, 2, 2);
    r.names(&["g", "u"]).strides(&[64, 64]);
    r.tensor("g.strided", &[8, 1, 2], 0, 0)
        .tensor("u.strided", &[8, 2, 2], 0, 32);
    let e = r.data(256).parse();
    assert!(matches!(e, GgufError::TensorOverlap { .. }), "{e}");
    says(&e, &["'u'", "overlaps tensor 'g'"]);

    // A member that starts inside another's slice.
    let mut r = Raw::header(3, 2, 2);
    r.names(&["g", "u"]).strides(&[128, 128]);
    r.tensor("g.strided", &[8, 2, 2], 0, 0)
        .tensor("u.strided", &[8, 1, 2], 0, 32);
    says(&r.data(256).parse(), &["'u'", "overlaps tensor 'g'"]);

    // A plain tensor inside a group's records.
    let mut r = Raw::header(3, 2, 2);
    r.names(&["g"]).strides(&[64]);
    r.tensor("g.strided", &[8, 1, 2], 0, 0)
        .tensor("p", &[8], 0, 32);
    says(&r.data(128).parse(), &["overlaps"]);
}

/// Regression (issue 21): a 10 MB `general.architecture`, key or tensor name was echoed whole
/// by every error that named it (10,000,139 bytes on stderr, 10 MB HTTP 500 bodies). Errors
/// quote at most a short, escaped prefix of what the file holds.
#[test]
fn errors_quote_only_a_short_escaped_prefix_of_file_strings() {
    let huge = format!("\x1b[2J{}", "a".repeat(10_000_000));
    // A duplicate key, named in the message.
    let mut r = Raw::header(3, 0, 2);
    r.kv_u32(&huge, 1).kv_u32(&huge, 2);
    let e = r.parse();
    assert!(matches!(e, GgufError::DuplicateKey { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.len() < 400, "{} bytes", msg.len());
    assert!(msg.contains("10000004 bytes in all"), "{msg}");
    assert!(
        !msg.contains('\x1b'),
        "terminal escape passed through: {msg:?}"
    );
    // A tensor name, in a tensor error.
    let mut r = Raw::header(3, 1, 0);
    r.tensor(&huge, &[0], 0, 0);
    let msg = r.parse().to_string();
    assert!(
        msg.len() < 400 && msg.contains("dimension 0 is 0"),
        "{msg:.400}"
    );
    // A string value, in a typed lookup's error.
    let bytes = GgufBuilder::new()
        .kv("general.architecture", Value::String(huge.clone()))
        .kv(&huge, Value::String("x".into()))
        .to_bytes();
    let f = GgufFile::from_bytes(&bytes).expect("long strings are legal");
    let msg = f.metadata.get_u32(&huge).err().map(|e| e.to_string());
    assert!(msg.as_ref().is_some_and(|m| m.len() < 400), "{msg:.400?}");
}

/// Regression (issue 21): a NaN `rope.freq_base` or `layer_norm_rms_epsilon` loaded and
/// generated garbage. A number read through `get_f32` is finite or an error naming its key.
#[test]
fn non_finite_numbers_are_refused_naming_the_key() {
    for v in [
        Value::F32(f32::NAN),
        Value::F32(f32::INFINITY),
        Value::F32(f32::NEG_INFINITY),
        Value::F64(f64::NAN),
        Value::F64(1e300),
    ] {
        let bytes = GgufBuilder::new()
            .kv("llama.rope.freq_base", v.clone())
            .kv("llama.attention.layer_norm_rms_epsilon", v.clone())
            .to_bytes();
        let f = GgufFile::from_bytes(&bytes).expect("the parser keeps any value");
        for key in [
            "llama.rope.freq_base",
            "llama.attention.layer_norm_rms_epsilon",
        ] {
            let e = f.metadata.get_f32(key).expect_err("non-finite accepted");
            says(&e, &[key, "expected a finite number"]);
        }
    }
    let bytes = GgufBuilder::new()
        .kv("llama.attention.layer_norm_rms_epsilon", Value::F32(-1e-6))
        .to_bytes();
    let f = GgufFile::from_bytes(&bytes).expect("valid");
    // A finite value is the loader's to range-check (a negative epsilon is the engine's call).
    assert_eq!(
        f.metadata
            .get_f32("llama.attention.layer_norm_rms_epsilon")
            .ok()
            .flatten(),
        Some(-1e-6)
    );
}
