use strata_kernels::{Device, SimConfig, ops};

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}
fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn rms_norm_runs() {
    let dev = Device::sim(SimConfig::default()).unwrap();
    let s = dev.stream().unwrap();
    let (rows, n) = (3, 1000);
    let x: Vec<f32> = (0..rows * n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 10.0)
        .collect();
    let w: Vec<f32> = (0..n).map(|i| 1.0 + (i % 7) as f32 / 10.0).collect();
    let (bx, bw, by) = (
        dev.alloc(rows * n * 4).unwrap(),
        dev.alloc(n * 4).unwrap(),
        dev.alloc(rows * n * 4).unwrap(),
    );
    s.upload(&bx, 0, &bytes(&x)).unwrap();
    s.upload(&bw, 0, &bytes(&w)).unwrap();
    ops::norm::rms_norm(&s, &bx, &bw, &by, rows, n, 1e-6).unwrap();
    let mut out = vec![0u8; rows * n * 4];
    s.download(&by, 0, &mut out).unwrap();
    let y = f32s(&out);
    for r in 0..rows {
        let xr = &x[r * n..(r + 1) * n];
        let ms: f64 = xr.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / n as f64;
        let sc = 1.0 / (ms + 1e-6).sqrt();
        for i in 0..n {
            let want = (xr[i] as f64 * sc * w[i] as f64) as f32;
            assert!(
                (y[r * n + i] - want).abs() < 1e-4,
                "row {r} col {i}: {} vs {want}",
                y[r * n + i]
            );
        }
    }
}

#[test]
fn cuda_without_a_driver_is_a_clear_error() {
    if Device::cuda_driver_present() {
        return;
    }
    let e = Device::cuda(0).unwrap_err().to_string();
    assert!(e.contains("libcuda.so.1"), "{e}");
}

#[test]
fn out_of_device_memory_names_the_bytes() {
    let dev = Device::sim(SimConfig {
        memory: 1 << 20,
        ..SimConfig::default()
    })
    .unwrap();
    let _a = dev.alloc(768 << 10).unwrap();
    let e = dev.alloc(512 << 10).unwrap_err().to_string();
    assert!(
        e.contains("524288 bytes requested") && e.contains("of 1048576 bytes free"),
        "{e}"
    );
}

#[test]
fn a_launch_that_does_not_wait_for_its_copy_sees_stale_memory() {
    // The copy stream's link is slow (16 KiB take half a second, far longer than a busy
    // machine delays the other stream's launch); the compute stream forgets to wait for it.
    let dev = Device::sim(SimConfig {
        link_bytes_per_sec: Some(32e3),
        ..SimConfig::default()
    })
    .unwrap();
    let (copy, compute) = (dev.stream().unwrap(), dev.stream().unwrap());
    let n = 4096;
    let x = vec![1.0f32; n];
    let w = vec![1.0f32; n];
    let (bx, bw, by) = (
        dev.alloc(n * 4).unwrap(),
        dev.alloc(n * 4).unwrap(),
        dev.alloc(n * 4).unwrap(),
    );
    compute.upload(&bw, 0, &bytes(&w)).unwrap();
    compute.synchronize().unwrap();
    copy.upload(&bx, 0, &bytes(&x)).unwrap();
    ops::norm::rms_norm(&compute, &bx, &bw, &by, 1, n, 1e-6).unwrap();
    let mut out = vec![0u8; n * 4];
    compute.download(&by, 0, &mut out).unwrap();
    assert!(
        f32s(&out).iter().all(|v| v.is_nan()),
        "the kernel read poison, not the copy"
    );
    // With the event, the result is right.
    let done = copy.record().unwrap();
    compute.wait(&done).unwrap();
    ops::norm::rms_norm(&compute, &bx, &bw, &by, 1, n, 1e-6).unwrap();
    compute.download(&by, 0, &mut out).unwrap();
    assert!(f32s(&out).iter().all(|v| (v - 1.0).abs() < 1e-5));
}

#[test]
fn copies_from_registered_host_memory_run_in_place_and_stay_inside_it() {
    let dev = Device::sim(SimConfig::default()).unwrap();
    let s = dev.stream().unwrap();
    let host: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    // SAFETY: `host` outlives the region (dropped at the end of the test, after it).
    let region = unsafe { dev.register_host(host.as_ptr(), host.len()) }.unwrap();
    let d = dev.alloc(4096).unwrap();
    // SAFETY: `host` is alive and unmodified until the synchronize below.
    unsafe { s.upload_async_region(&d, 0, &region, &host[1000..5096]) }.unwrap();
    let mut out = vec![0u8; 4096];
    s.download(&d, 0, &mut out).unwrap();
    assert_eq!(out, host[1000..5096]);
    let other = vec![0u8; 64];
    // SAFETY: refused before anything is queued.
    let e = unsafe { s.upload_async_region(&d, 0, &region, &other) }
        .unwrap_err()
        .to_string();
    assert!(e.contains("not inside the registered host region"), "{e}");
    // SAFETY: as above.
    assert!(unsafe { dev.register_host(host.as_ptr(), 0) }.is_err());
}
