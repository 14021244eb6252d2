//! strata's strided layout (`strata optimize`): tensors whose slices along the outermost
//! dimension lie a stride apart, interleaved record by record. Written by the builder, read
//! back exactly; hostile tables refused with an error that names the tensor.

use strata_storage::gguf::{
    GgufBuilder, GgufError, GgufFile, STRIDED_NAMES_KEY, STRIDED_STRIDES_KEY, Value, record_layout,
};
use strata_storage::quant::GgmlType;

/// Slice `e` of part `k` as written: every byte says which part and slice it belongs to.
fn fill(k: usize, e: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (k as u64 * 64 + e * 8 + i % 8) as u8)
        .collect()
}

/// A plain tensor, a group of three strided tensors of 3 slices (their slices 64, 32 and 96
/// bytes), another plain tensor.
fn file(record_align: u64) -> Vec<u8> {
    let parts: [(&str, &[u64], GgmlType); 3] = [
        ("g", &[8, 2, 3], GgmlType::F32),
        ("u", &[8, 1, 3], GgmlType::F32),
        ("d", &[8, 3, 3], GgmlType::F32),
    ];
    let slices = [64u64, 32, 96];
    let (at, stride) = record_layout(&slices, 32, record_align);
    let mut b = GgufBuilder::new();
    b.kv("general.architecture", Value::String("test".into()))
        .tensor("a", &[8], GgmlType::F32, vec![7; 32]);
    b.strided_group(&parts, record_align).expect("group");
    b.tensor("z", &[8], GgmlType::F32, vec![9; 32]);
    let mut out = Vec::new();
    b.write_with(&mut out, |name, w| {
        assert_eq!(name, "g");
        for e in 0..3 {
            let mut rec = vec![0u8; stride as usize];
            for (k, (&a, &s)) in at.iter().zip(&slices).enumerate() {
                rec[a as usize..(a + s) as usize].copy_from_slice(&fill(k, e, s));
            }
            std::io::Write::write_all(w, &rec)?;
        }
        Ok(())
    })
    .expect("write");
    out
}

#[test]
fn strided_group_reads_back_slice_by_slice() {
    for record_align in [32, 256] {
        let bytes = file(record_align);
        let f = GgufFile::from_bytes(&bytes).expect("parse");
        let names: Vec<_> = f.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "g", "u", "d", "z"], "the suffix is taken off");
        let g = f.tensor("g").expect("g");
        let stride = g.stride.expect("strided");
        assert_eq!(stride % record_align, 0);
        // In the data section (the file's alignment, 32 here, aligns the section itself).
        assert_eq!(g.offset % record_align, 0, "records start aligned");
        for (k, name) in ["g", "u", "d"].iter().enumerate() {
            let t = f.tensor(name).expect("part");
            assert_eq!(t.stride, Some(stride));
            let (n, slice) = t.slices();
            assert_eq!(n, 3);
            assert_eq!(t.span(), 2 * stride + slice);
            for e in 0..n {
                let at = (f.data_offset + t.offset + e * stride) as usize;
                assert_eq!(&bytes[at..at + slice as usize], fill(k, e, slice));
            }
        }
        assert!(f.tensor("a").expect("a").stride.is_none());
        let z = f.tensor("z").expect("z");
        let at = (f.data_offset + z.offset) as usize;
        assert_eq!(&bytes[at..at + 32], &[9; 32]);
        assert!(f.tensor_range(g).end <= f.tensor_range(z).start);
    }
}

/// Encodes a file by hand: metadata arrays, tensor entries and data as given.
struct Raw(Vec<u8>);

impl Raw {
    fn new(n_tensors: u64, n_kv: u64) -> Self {
        let mut r = Raw(Vec::new());
        r.bytes(b"GGUF").u32(3).u64(n_tensors).u64(n_kv);
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
    /// An f32 tensor.
    fn tensor(&mut self, name: &str, dims: &[u64], offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(0).u64(offset)
    }
    fn data(&mut self, n: usize) -> GgufError {
        let pad = self.0.len().next_multiple_of(32) - self.0.len();
        self.0.extend(std::iter::repeat_n(0u8, pad + n));
        GgufFile::from_bytes(&self.0).expect_err("hostile file must be rejected")
    }
}

fn says(e: &GgufError, needles: &[&str]) {
    let msg = e.to_string();
    for n in needles {
        assert!(msg.contains(n), "message {msg:?} should mention {n:?}");
    }
}

#[test]
fn hostile_strided_tables_are_refused_by_name() {
    // Two tensors of 2 slices of 32 bytes ([8, 1, 2] f32), records of 64 bytes: valid.
    let good = || {
        let mut r = Raw::new(2, 2);
        r.names(&["g", "u"]).strides(&[64, 64]);
        r.tensor("g.strided", &[8, 1, 2], 0)
            .tensor("u.strided", &[8, 1, 2], 32);
        r
    };
    let mut ok = good();
    let pad = ok.0.len().next_multiple_of(32) - ok.0.len();
    ok.0.extend(std::iter::repeat_n(0u8, pad + 128));
    let f = GgufFile::from_bytes(&ok.0).expect("the valid table");
    assert_eq!(f.tensor("u").and_then(|t| t.stride), Some(64));

    // The data ends before the last record does.
    let e = good().data(96);
    assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e}");

    // A strided name the metadata does not list.
    let mut r = Raw::new(1, 2);
    r.names(&["x"])
        .strides(&[64])
        .tensor("g.strided", &[8, 1, 2], 0);
    let e = r.data(128);
    says(&e, &["'g'", "not listed"]);

    // Listed, but no such tensor (or only its plain namesake).
    let mut r = Raw::new(1, 2);
    r.names(&["g"]).strides(&[64]).tensor("g", &[8, 1, 2], 0);
    says(&r.data(128), &["'g'", "no tensor 'g.strided'"]);

    // A stride shorter than a slice, or off the alignment, or zero.
    for (stride, needle) in [
        (32, "more than the stride"),
        (48, "multiple"),
        (0, "positive"),
    ] {
        let mut r = Raw::new(1, 2);
        r.names(&["g"])
            .strides(&[stride])
            .tensor("g.strided", &[8, 2, 2], 0);
        says(&r.data(128), &["'g'", needle]);
    }

    // A stride near 2^64: its span overflows (2 slices), or is just its one slice.
    let huge = u64::MAX / 32 * 32;
    let mut r = Raw::new(1, 2);
    r.names(&["g"])
        .strides(&[huge])
        .tensor("g.strided", &[8, 1, 2], 0);
    assert!(matches!(r.data(128), GgufError::TensorOutOfBounds { .. }));
    let mut r = Raw::new(2, 2);
    r.names(&["g", "u"]).strides(&[huge, huge]);
    r.tensor("g.strided", &[8, 1, 1], 0)
        .tensor("u.strided", &[8, 1, 1], 32);
    let pad = r.0.len().next_multiple_of(32) - r.0.len();
    r.0.extend(std::iter::repeat_n(0u8, pad + 64));
    let f = GgufFile::from_bytes(&r.0).expect("one slice each");
    assert_eq!(f.tensor("u").map(|t| t.span()), Some(32));

    // A 1-D strided tensor.
    let mut r = Raw::new(1, 2);
    r.names(&["g"]).strides(&[64]).tensor("g.strided", &[8], 0);
    says(&r.data(128), &["'g'", "1-D"]);

    // Names and strides that do not pair up, or one without the other.
    let mut r = Raw::new(0, 2);
    r.names(&["g", "u"]).strides(&[64]);
    says(&r.data(0), &[STRIDED_STRIDES_KEY, "1 strides for 2 names"]);
    let mut r = Raw::new(0, 1);
    r.names(&["g"]);
    says(&r.data(0), &[STRIDED_STRIDES_KEY, "missing"]);

    // The same name twice.
    let mut r = Raw::new(0, 2);
    r.names(&["g", "g"]).strides(&[64, 64]);
    says(&r.data(0), &["'g'", "twice"]);

    // Two group members whose slices overlap in a record.
    let mut r = Raw::new(2, 2);
    r.names(&["g", "u"]).strides(&[64, 64]);
    r.tensor("g.strided", &[8, 1, 2], 0)
        .tensor("u.strided", &[8, 2, 2], 32);
    let e = r.data(256);
    assert!(matches!(e, GgufError::TensorOverlap { .. }), "{e}");
    says(&e, &["'u'", "overlaps tensor 'g'"]);

    // A member that starts inside another's slice.
    let mut r = Raw::new(2, 2);
    r.names(&["g", "u"]).strides(&[128, 128]);
    r.tensor("g.strided", &[8, 2, 2], 0)
        .tensor("u.strided", &[8, 1, 2], 32);
    says(&r.data(256), &["'u'", "overlaps tensor 'g'"]);

    // A plain tensor inside a group's records.
    let mut r = Raw::new(2, 2);
    r.names(&["g"]).strides(&[64]);
    r.tensor("g.strided", &[8, 1, 2], 0).tensor("p", &[8], 32);
    says(&r.data(128), &["overlaps"]);
}

/// Every byte of a strided file's header set to values that break counts, strides and
/// offsets: each parse succeeds or fails cleanly, never panics.
#[test]
fn every_header_byte_of_a_strided_file_mutated_parses_or_fails_cleanly() {
    let bytes = file(256);
    let header = GgufFile::from_bytes(&bytes).expect("parse").data_offset as usize;
    for at in 0..header {
        for v in [0x00, 0x01, 0x7f, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[at] = v;
            let _ = GgufFile::from_bytes(&b);
        }
    }
}
