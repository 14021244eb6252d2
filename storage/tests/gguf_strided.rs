//! strata's strided layout (`strata optimize`): tensors whose slices along the outermost
//! dimension lie a stride apart, interleaved record by record. Written by the builder, read
//! back exactly; mutated headers fail cleanly (the hostile tables, each refused by name, are in
//! `gguf_hostile.rs`).

use strata_storage::gguf::{GgufBuilder, GgufFile, Value, record_layout};
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
