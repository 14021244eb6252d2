//! Disk read bandwidth through `io::Reader` with chosen depth and chunk size:
//! `cargo run --release -p strata-storage --example diskbw -- FILE GIB DEPTH CHUNK_KIB [pread]`.

use strata_storage::io::{IoKind, ReaderOptions, measure_read};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 5 {
        eprintln!("usage: diskbw FILE GIB DEPTH CHUNK_KIB [pread]");
        std::process::exit(2);
    }
    let num = |i: usize| {
        a[i].parse::<u64>()
            .unwrap_or_else(|_| panic!("{} is not a number", a[i]))
    };
    let opts = ReaderOptions {
        kind: Some(if a.get(5).is_some_and(|k| k == "pread") {
            IoKind::Pread
        } else {
            IoKind::Uring
        }),
        depth: num(3) as usize,
        chunk: (num(4) as usize) << 10,
        ..ReaderOptions::default()
    };
    match measure_read(std::path::Path::new(&a[1]), num(2) << 30, &opts) {
        Ok((bytes, secs)) => println!(
            "{:.2} GB/s ({} MiB in {secs:.2} s, depth {}, chunk {} KiB)",
            bytes as f64 / secs / 1e9,
            bytes >> 20,
            opts.depth,
            opts.chunk >> 10
        ),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
