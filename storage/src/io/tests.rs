use super::*;
use crate::buf::AlignedBuf;

/// A file of `len` pseudo-random bytes.
fn file(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), &data).unwrap();
    (f, data)
}

fn opts(kind: IoKind, direct: bool, faults: Option<&str>) -> ReaderOptions {
    ReaderOptions {
        kind: Some(kind),
        direct,
        depth: 8,
        chunk: 64 << 10,
        faults: faults.map(|f| Faults::parse(f).unwrap()),
    }
}

const KINDS: [IoKind; 2] = [IoKind::Uring, IoKind::Pread];

/// Reads `[off, off + len)` (aligned outward) and returns the bytes asked for.
fn read_range(r: &Reader, off: u64, len: usize) -> Result<Vec<u8>, IoError> {
    let start = off / 4096 * 4096;
    let end = (off + len as u64).next_multiple_of(4096);
    let mut buf = AlignedBuf::zeroed((end - start) as usize).unwrap();
    let need = (off + len as u64 - start) as usize;
    r.read(&mut [ReadReq {
        offset: start,
        buf: buf.as_mut_slice(),
        need,
        fixed: None,
    }])?;
    let skip = (off - start) as usize;
    Ok(buf.as_slice()[skip..skip + len].to_vec())
}

#[test]
fn both_engines_read_exact_bytes_direct_and_buffered() {
    let (f, data) = file(3 * 1024 * 1024 + 1234);
    for kind in KINDS {
        for direct in [true, false] {
            let r = Reader::open(f.path(), &opts(kind, direct, None)).unwrap();
            for (off, len) in [
                (0, data.len()),
                (5000, 100_000),
                (4096, 4096),
                (data.len() as u64 - 10, 10),
            ] {
                let got = read_range(&r, off, len).unwrap();
                assert_eq!(
                    got,
                    data[off as usize..off as usize + len],
                    "{kind:?} direct={direct} {off}+{len}"
                );
            }
            assert!(r.stats().bytes >= data.len() as u64);
        }
    }
}

#[test]
fn many_requests_in_one_call_and_registered_buffers() {
    let (f, data) = file(2 << 20);
    for kind in KINDS {
        let r = Reader::open(f.path(), &opts(kind, true, None)).unwrap();
        let mut bufs: Vec<AlignedBuf> = (0..4)
            .map(|_| AlignedBuf::zeroed(256 << 10).unwrap())
            .collect();
        let regions: Vec<(*mut u8, usize)> = bufs.iter().map(|b| (b.as_ptr(), b.len())).collect();
        // SAFETY: the buffers outlive the reader (dropped at the end of this iteration, after it).
        let registered = unsafe { r.register_buffers(&regions) };
        assert_eq!(
            registered,
            kind == IoKind::Uring && r.kind() == IoKind::Uring
        );
        let mut reqs: Vec<ReadReq<'_>> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, b)| ReadReq {
                offset: (i as u64) * (512 << 10),
                buf: b.as_mut_slice(),
                need: 256 << 10,
                fixed: Some(i as u16),
            })
            .collect();
        r.read(&mut reqs).unwrap();
        drop(reqs);
        for (i, b) in bufs.iter().enumerate() {
            let off = i * (512 << 10);
            assert_eq!(b.as_slice(), &data[off..off + (256 << 10)]);
        }
        drop(r);
    }
}

#[test]
fn short_reads_are_resubmitted() {
    let (f, data) = file(1 << 20);
    for kind in KINDS {
        for direct in [true, false] {
            let r = Reader::open(f.path(), &opts(kind, direct, Some("short=2"))).unwrap();
            let got = read_range(&r, 0, data.len()).unwrap();
            assert_eq!(got, data, "{kind:?} direct={direct}");
            assert!(r.stats().resubmits > 0);
        }
    }
}

#[test]
fn injected_eio_is_a_typed_error_and_the_next_read_succeeds() {
    let (f, data) = file(1 << 20);
    for kind in KINDS {
        let r = Reader::open(f.path(), &opts(kind, true, Some("eio=3"))).unwrap();
        let err = read_range(&r, 0, data.len()).unwrap_err();
        match &err {
            IoError::Read { source, .. } => assert_eq!(source.raw_os_error(), Some(libc::EIO)),
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("failed"), "{err}");
        assert_eq!(read_range(&r, 0, data.len()).unwrap(), data);
    }
}

#[test]
fn end_of_file_before_the_needed_bytes_is_an_error() {
    let (f, data) = file(200_000);
    for kind in KINDS {
        // A real truncation: ask for more than the file holds.
        let r = Reader::open(f.path(), &opts(kind, true, None)).unwrap();
        let err = read_range(&r, 0, data.len() + 5000).unwrap_err();
        assert!(matches!(err, IoError::Eof { .. }), "{err:?}");
        assert!(err.to_string().contains("truncated"), "{err}");
        // An injected one, then the same read without it succeeds.
        let r = Reader::open(f.path(), &opts(kind, true, Some("eof=100000"))).unwrap();
        assert!(matches!(
            read_range(&r, 0, data.len()),
            Err(IoError::Eof { .. })
        ));
        assert_eq!(read_range(&r, 0, 90_000).unwrap(), data[..90_000]);
    }
}

#[test]
fn delays_only_slow_reads_down() {
    let (f, data) = file(300_000);
    let r = Reader::open(f.path(), &opts(IoKind::Uring, true, Some("delay_ms=2"))).unwrap();
    let t0 = Instant::now();
    assert_eq!(read_range(&r, 0, data.len()).unwrap(), data);
    assert!(t0.elapsed() >= Duration::from_millis(2));
}

#[test]
fn bad_requests_and_fault_plans_are_refused_with_their_reason() {
    let (f, _) = file(10_000);
    let r = Reader::open(f.path(), &opts(IoKind::Pread, false, None)).unwrap();
    let mut buf = vec![0u8; 100];
    let err = r
        .read(&mut [ReadReq {
            offset: 0,
            buf: &mut buf,
            need: 200,
            fixed: None,
        }])
        .unwrap_err();
    assert!(matches!(err, IoError::BadRequest { .. }));
    for bad in ["eio", "eio=0", "short=0", "nope=1", "delay_ms=x"] {
        assert!(Faults::parse(bad).is_err(), "{bad}");
    }
    assert!(
        Reader::open(
            std::path::Path::new("/nonexistent/x"),
            &ReaderOptions::default()
        )
        .is_err()
    );
}

#[test]
fn measure_read_reports_bytes_and_time() {
    let (f, data) = file(5 << 20);
    let (bytes, secs) = measure_read(f.path(), u64::MAX, &opts(IoKind::Uring, true, None)).unwrap();
    assert_eq!(bytes, data.len() as u64 / 4096 * 4096);
    assert!(secs > 0.0);
}
