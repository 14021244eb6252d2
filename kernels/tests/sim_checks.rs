//! The simulator finds the bugs a GPU would show: each broken kernel in `kernels/sim/broken/`
//! fails with a message that names what is wrong, and the correct twins of the fragment,
//! ldmatrix, cp.async and atomic kernels give the right answers.

mod common;

use common::{get, put, rand_f32, sim, try_get};
use half::f16;
use strata_kernels::{Arg, KernelError, LaunchConfig};

fn run_err(
    kernel: &str,
    block: u32,
    args: impl FnOnce(&strata_kernels::Stream) -> Vec<Arg>,
) -> String {
    let dev = sim();
    let s = dev.stream().unwrap();
    let args = args(&s);
    s.launch(
        dev.kernel(kernel).unwrap(),
        LaunchConfig::linear(1, block),
        &args,
    )
    .unwrap();
    match s.synchronize() {
        Err(KernelError::Launch(m)) => m,
        other => panic!("{kernel}: expected the simulator to report an error, got {other:?}"),
    }
}

#[test]
fn missing_syncthreads_is_a_race() {
    let x = rand_f32(256, 1);
    let mut keep = Vec::new();
    let m = run_err("broken_missing_sync", 256, |s| {
        let (bx, by) = (put(s, &x), put(s, &[0f32; 1]));
        let a = vec![(&bx).into(), (&by).into()];
        keep.push((bx, by));
        a
    });
    assert!(
        m.contains("shared-memory race on `broken_missing_sync::partial`"),
        "{m}"
    );
    assert!(
        m.contains("schedule seed"),
        "the seed is printed for replay: {m}"
    );
}

#[test]
fn out_of_bounds_read_is_reported() {
    let x = rand_f32(100, 2);
    let mut keep = Vec::new();
    let m = run_err("broken_oob_read", 64, |s| {
        let (bx, by) = (put(s, &x), put(s, &[0f32; 1]));
        let a = vec![(&bx).into(), (&by).into(), Arg::I32(100)];
        keep.push((bx, by));
        a
    });
    assert!(m.contains("out-of-bounds device read of 4 bytes"), "{m}");
    assert!(m.contains("0 bytes past the end"), "{m}");
}

#[test]
fn shared_write_race_is_reported() {
    let x = rand_f32(64, 3);
    let mut keep = Vec::new();
    let m = run_err("broken_smem_race", 64, |s| {
        let (bx, by) = (put(s, &x), put(s, &[0f32; 1]));
        let a = vec![(&bx).into(), (&by).into()];
        keep.push((bx, by));
        a
    });
    assert!(
        m.contains("shared-memory race on `broken_smem_race::slot` (byte 4)"),
        "{m}"
    );
    assert!(m.contains("writes it") && m.contains("wrote it"), "{m}");
}

#[test]
fn shared_out_of_bounds_names_the_variable() {
    let x = rand_f32(64, 4);
    let mut keep = Vec::new();
    let m = run_err("broken_smem_oob", 64, |s| {
        let (bx, by) = (put(s, &x), put(s, &[0f32; 64]));
        let a = vec![(&bx).into(), (&by).into()];
        keep.push((bx, by));
        a
    });
    assert!(
        m.contains("out-of-bounds shared-memory read of 4 bytes at byte 256 of `broken_smem_oob::tile` (256 bytes)"),
        "{m}"
    );
}

#[test]
fn shuffle_outside_its_mask_is_reported() {
    let x = rand_f32(32, 5);
    let mut keep = Vec::new();
    let m = run_err("broken_shfl_mask", 32, |s| {
        let (bx, by) = (put(s, &x), put(s, &[0f32; 32]));
        let a = vec![(&bx).into(), (&by).into()];
        keep.push((bx, by));
        a
    });
    assert!(
        m.contains("__shfl_xor_sync with mask 0x0000ffff reads lane 16, which is not in the mask"),
        "{m}"
    );
}

#[test]
fn partial_barrier_is_reported() {
    let x = rand_f32(128, 6);
    let mut keep = Vec::new();
    let m = run_err("broken_partial_barrier", 128, |s| {
        let (bx, by) = (put(s, &x), put(s, &[0f32; 128]));
        let a = vec![(&bx).into(), (&by).into()];
        keep.push((bx, by));
        a
    });
    assert!(
        m.contains("__syncthreads reached by only 64 of 128 threads"),
        "{m}"
    );
}

#[test]
fn host_memory_from_device_code_is_reported() {
    let host = [1.0f32; 32];
    let mut keep = Vec::new();
    let m = run_err("broken_host_pointer", 32, |s| {
        let by = put(s, &[0f32; 32]);
        let a = vec![Arg::U64(host.as_ptr() as u64), (&by).into()];
        keep.push(by);
        a
    });
    assert!(m.contains("bytes of host memory"), "{m}");
}

fn mma_inputs() -> (Vec<u16>, Vec<u16>, Vec<f32>) {
    let a: Vec<f32> = rand_f32(256, 7);
    let b: Vec<f32> = rand_f32(128, 8);
    let a16: Vec<u16> = a.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
    let b16: Vec<u16> = b.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
    let mut d = vec![0f32; 128];
    for r in 0..16 {
        for n in 0..8 {
            d[r * 8 + n] = (0..16)
                .map(|k| {
                    f16::from_bits(a16[r * 16 + k]).to_f32()
                        * f16::from_bits(b16[k * 8 + n]).to_f32()
                })
                .sum();
        }
    }
    (a16, b16, d)
}

fn run_mma(kernel: &str) -> Result<(Vec<f32>, Vec<f32>), KernelError> {
    let (a, b, want) = mma_inputs();
    let dev = sim();
    let s = dev.stream().unwrap();
    let (ba, bb, bd) = (put(&s, &a), put(&s, &b), dev.alloc(128 * 4).unwrap());
    s.launch(
        dev.kernel(kernel).unwrap(),
        LaunchConfig::linear(1, 32),
        &[(&ba).into(), (&bb).into(), (&bd).into()],
    )?;
    Ok((try_get::<f32>(&s, &bd, 128)?, want))
}

fn max_err(got: &[f32], want: &[f32]) -> (f32, usize) {
    got.iter()
        .zip(want)
        .enumerate()
        .map(|(i, (g, w))| ((g - w).abs(), i))
        .fold(
            (0.0, 0),
            |a, b| if b.0 > a.0 || b.0.is_nan() { b } else { a },
        )
}

#[test]
fn mma_f16_fragments_follow_the_ptx_layout() {
    let (got, want) = run_mma("mma_f16_ok").unwrap();
    let (e, i) = max_err(&got, &want);
    assert!(
        e < 1e-4,
        "D[{}][{}] = {} vs {}",
        i / 8,
        i % 8,
        got[i],
        want[i]
    );
}

#[test]
fn wrong_mma_fragment_index_gives_wrong_rows() {
    let (got, want) = run_mma("broken_mma_fragment").unwrap();
    let (e, i) = max_err(&got, &want);
    assert!(e > 0.1, "a wrong fragment index must change the result");
    // The swapped A registers hold row g+8's k=0..7 half: rows 8..15 are wrong.
    assert!(i / 8 >= 8, "wrong element D[{}][{}]", i / 8, i % 8);
}

#[test]
fn ldmatrix_and_cp_async_feed_the_mma() {
    let (got, want) = run_mma("ldmatrix_ok").unwrap();
    let (e, i) = max_err(&got, &want);
    assert!(
        e < 1e-4,
        "D[{}][{}] = {} vs {}",
        i / 8,
        i % 8,
        got[i],
        want[i]
    );
}

#[test]
fn forgotten_cp_async_wait_is_reported() {
    match run_mma("broken_cp_async_wait") {
        Err(KernelError::Launch(m)) => {
            assert!(m.contains("shared-memory race on `ldmatrix_tile(unsigned short const*, unsigned short const*, float*, int)::sa`") || m.contains("ldmatrix_tile"), "{m}")
        }
        other => panic!("expected a race between the late copy and ldmatrix, got {other:?}"),
    }
}

#[test]
fn mma_s8_fragments_follow_the_ptx_layout() {
    let a: Vec<i8> = (0..512).map(|i| (i * 37 % 255 - 127) as i8).collect();
    let b: Vec<i8> = (0..256).map(|i| (i * 91 % 255 - 127) as i8).collect();
    let dev = sim();
    let s = dev.stream().unwrap();
    let (ba, bb, bd) = (put(&s, &a), put(&s, &b), dev.alloc(128 * 4).unwrap());
    s.launch(
        dev.kernel("mma_s8_ok").unwrap(),
        LaunchConfig::linear(1, 32),
        &[(&ba).into(), (&bb).into(), (&bd).into()],
    )
    .unwrap();
    let got: Vec<i32> = get(&s, &bd, 128);
    for r in 0..16 {
        for n in 0..8 {
            let want: i32 = (0..32)
                .map(|k| i32::from(a[r * 32 + k]) * i32::from(b[k * 8 + n]))
                .sum();
            assert_eq!(got[r * 8 + n], want, "D[{r}][{n}]");
        }
    }
}

#[test]
fn shared_atomics_do_not_race() {
    let x: Vec<i32> = (0..256).collect();
    let dev = sim();
    let s = dev.stream().unwrap();
    let (bx, by) = (put(&s, &x), put(&s, &[0i32; 1]));
    s.launch(
        dev.kernel("atomic_ok").unwrap(),
        LaunchConfig::linear(1, 256),
        &[(&bx).into(), (&by).into()],
    )
    .unwrap();
    assert_eq!(get::<i32>(&s, &by, 1)[0], 255 * 256 / 2);
}

#[test]
fn shared_memory_in_templates_is_checked_too() {
    // A template's static lives outside the file's shared section (a common symbol): the
    // simulator still poisons it, bounds-checks it and watches it for races.
    let x = rand_f32(64, 9);
    let dev = sim();
    let s = dev.stream().unwrap();
    let (bx, by) = (put(&s, &x), put(&s, &[0f32; 64]));
    s.launch(
        dev.kernel("template_sum_ok").unwrap(),
        LaunchConfig::linear(1, 64),
        &[(&bx).into(), (&by).into()],
    )
    .unwrap();
    let want: f32 = x.iter().sum();
    let got: Vec<f32> = get(&s, &by, 64);
    assert!(
        got.iter().all(|v| (v - want).abs() < 1e-4),
        "{got:?} vs {want}"
    );
    let mut keep = Vec::new();
    let m = run_err("broken_template_race", 32, |s| {
        let (bx, by) = (put(s, &x[..32]), put(s, &[0f32; 32]));
        let a = vec![(&bx).into(), (&by).into()];
        keep.push((bx, by));
        a
    });
    assert!(
        m.contains("shared-memory race on `float template_sum<32>(float, int)::part`"),
        "{m}"
    );
}

#[test]
fn shared_memory_in_inline_functions_is_checked_too() {
    let x = rand_f32(32, 10);
    let mut keep = Vec::new();
    let m = run_err("broken_inline_oob", 32, |s| {
        let (bx, by) = (put(s, &x), put(s, &[0f32; 32]));
        let a = vec![(&bx).into(), (&by).into()];
        keep.push((bx, by));
        a
    });
    assert!(
        m.contains(
            "out-of-bounds shared-memory read of 4 bytes at byte 128 of `inline_shift(float)::line`"
        ),
        "{m}"
    );
}
