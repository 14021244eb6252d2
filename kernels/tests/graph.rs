//! CUDA graphs: a capture records work instead of running it, a launch of the instantiated
//! graph runs it reading the host bytes that are there at launch time, an update takes a
//! later capture's arguments in place, and what a graph cannot hold is refused.

mod common;

use common::{devices, get, put};
use strata_kernels::{Graph, HostBuffer, KernelError, ops};

fn write_f32(h: &mut HostBuffer, v: &[f32]) {
    for (c, x) in h.as_mut_slice().chunks_exact_mut(4).zip(v) {
        c.copy_from_slice(&x.to_le_bytes());
    }
}

fn read_f32(h: &HostBuffer, n: usize) -> Vec<f32> {
    h.as_slice()
        .chunks_exact(4)
        .take(n)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn a_graph_replays_its_copies_from_the_host_bytes_there_at_each_launch() {
    for dev in devices() {
        let s = dev.stream().unwrap();
        let n = 3000;
        let y: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let (x, yb) = (dev.alloc(n * 4).unwrap(), put(&s, &y));
        let mut h_in = dev.alloc_host(n * 4).unwrap();
        let h_out = dev.alloc_host(n * 4).unwrap();
        write_f32(&mut h_in, &vec![-1.0; n]);

        let mut g = Graph::new();
        s.begin_capture().unwrap();
        assert!(s.is_capturing());
        // SAFETY: both host buffers outlive every launch of the graph, which is synchronized
        // before they are read or rewritten.
        unsafe {
            s.upload_async(&x, 0, &h_in, 0, n * 4).unwrap();
            ops::act::add(&s, &x, &yb, n).unwrap();
            s.download_async(&x, 0, &h_out, 0, n * 4).unwrap();
        }
        s.end_capture(&mut g).unwrap();
        assert!(!s.is_capturing() && !g.is_empty());
        // Captured, not run.
        s.synchronize().unwrap();
        assert!(
            read_f32(&h_out, n).iter().all(|&v| v == 0.0),
            "{}",
            dev.info().name
        );

        let exec = g.instantiate().unwrap();
        for step in 0..3 {
            let input: Vec<f32> = (0..n).map(|i| (i * 7 + step) as f32).collect();
            write_f32(&mut h_in, &input);
            s.launch_graph(&exec).unwrap();
            s.synchronize().unwrap();
            let want: Vec<f32> = input.iter().zip(&y).map(|(a, b)| a + b).collect();
            assert_eq!(
                read_f32(&h_out, n),
                want,
                "step {step} on {}",
                dev.info().name
            );
        }
    }
}

#[test]
fn an_update_takes_a_later_captures_arguments_and_refuses_other_work() {
    for dev in devices() {
        let s = dev.stream().unwrap();
        let n = 2048;
        let ones = vec![1.0f32; n];
        let (x, yb) = (put(&s, &vec![0.0f32; n]), put(&s, &ones));
        let capture = |g: &mut Graph, len: usize, clear: bool| {
            s.begin_capture().unwrap();
            if clear {
                s.memset(&x, 0, n * 4, 0).unwrap();
            }
            ops::act::add(&s, &x, &yb, len).unwrap();
            s.end_capture(g).unwrap();
        };
        let mut g = Graph::new();
        capture(&mut g, n, false);
        let mut exec = g.instantiate().unwrap();
        // The same work over a shorter length: an update.
        capture(&mut g, n / 2, false);
        assert!(exec.update(&g).unwrap(), "{}", dev.info().name);
        s.launch_graph(&exec).unwrap();
        let got: Vec<f32> = get(&s, &x, n);
        assert!(
            got[..n / 2].iter().all(|&v| v == 1.0),
            "{}",
            dev.info().name
        );
        assert!(
            got[n / 2..].iter().all(|&v| v == 0.0),
            "{}",
            dev.info().name
        );
        // One more node: the update is refused, and the executable graph is unchanged.
        capture(&mut g, n, true);
        assert!(!exec.update(&g).unwrap(), "{}", dev.info().name);
        s.launch_graph(&exec).unwrap();
        let got: Vec<f32> = get(&s, &x, n);
        assert!(
            got[..n / 2].iter().all(|&v| v == 2.0),
            "{}",
            dev.info().name
        );
        let exec = g.instantiate().unwrap();
        s.launch_graph(&exec).unwrap();
        assert!(
            get::<f32>(&s, &x, n).iter().all(|&v| v == 1.0),
            "{}",
            dev.info().name
        );
    }
}

#[test]
fn host_waits_and_pageable_copies_void_a_capture_and_the_stream_goes_on() {
    for dev in devices() {
        let s = dev.stream().unwrap();
        let x = put(&s, &[0.0f32; 64]);
        let mut g = Graph::new();
        s.begin_capture().unwrap();
        let e = s.upload(&x, 0, &[0u8; 16]).unwrap_err();
        assert!(matches!(e, KernelError::Capture(_)), "{e}");
        assert!(e.to_string().contains("pageable"), "{e}");
        assert!(matches!(s.synchronize(), Err(KernelError::Capture(_))));
        assert!(matches!(s.record(), Err(KernelError::Capture(_))));
        let e = s.end_capture(&mut g).unwrap_err();
        assert!(e.to_string().contains("pageable host memory"), "{e}");
        assert!(g.is_empty());
        assert!(g.instantiate().is_err());
        // Not capturing any more: the same work runs.
        s.upload(&x, 0, &2.5f32.to_le_bytes()).unwrap();
        assert_eq!(get::<f32>(&s, &x, 1), [2.5]);
        assert!(s.end_capture(&mut g).is_err(), "no capture under way");
    }
}
