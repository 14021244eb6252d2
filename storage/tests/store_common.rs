//! Helpers shared by the store tests: a progress recorder and a tiny HTTP server.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

use strata_storage::store::Progress;

/// Records what the store reported.
#[derive(Default, Debug)]
pub struct Recorder {
    pub started: Vec<(String, Option<u64>)>,
    pub advanced: u64,
    pub finished: usize,
    pub messages: Vec<String>,
    /// Tasks begun (label, total) and how each ended.
    pub tasks: Vec<(String, Option<u64>)>,
    pub task_ends: Vec<bool>,
}

impl Progress for Recorder {
    fn start(&mut self, label: &str, total: Option<u64>) {
        self.started.push((label.to_owned(), total));
    }
    fn advance(&mut self, bytes: u64) {
        self.advanced += bytes;
    }
    fn finish(&mut self) {
        self.finished += 1;
    }
    fn message(&mut self, msg: &str) {
        self.messages.push(msg.to_owned());
    }
    fn begin_task(&mut self, label: &str, total: Option<u64>) {
        self.tasks.push((label.to_owned(), total));
    }
    fn end_task(&mut self, ok: bool) {
        self.task_ends.push(ok);
    }
}

/// Files left anywhere under `dir`, relative; the test asserts on these.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// A small valid GGUF file (one f32 tensor of `data_len` bytes, rounded down to whole
/// floats, filled from `seed`): the store takes GGUF models only.
pub fn tiny_gguf(seed: u8, data_len: usize) -> Vec<u8> {
    use strata_storage::gguf::{GgufBuilder, Value};
    use strata_storage::quant::GgmlType;
    let n = (data_len / 4).max(1);
    let data: Vec<u8> = (0..n * 4)
        .map(|i| (i as u32).wrapping_mul(7).wrapping_add(u32::from(seed)) as u8 % 251)
        .collect();
    GgufBuilder::new()
        .kv("general.architecture", Value::String("llama".into()))
        .tensor("w", &[n as u64], GgmlType::F32, data)
        .to_bytes()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Serves fixed responses (path → body; others 404) on 127.0.0.1 from a background thread.
pub struct Server {
    pub base: String,
    pub routes: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    pub hits: Arc<Mutex<Vec<String>>>,
}

impl Server {
    pub fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let routes: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
        let hits: Arc<Mutex<Vec<String>>> = Arc::default();
        let (r, h) = (routes.clone(), hits.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                loop {
                    let mut header = String::new();
                    match reader.read_line(&mut header) {
                        Ok(0) | Err(_) => break,
                        Ok(_) if header == "\r\n" => break,
                        Ok(_) => {}
                    }
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
                h.lock().unwrap().push(path.clone());
                let body = r.lock().unwrap().get(&path).cloned();
                let (status, body) = match body {
                    Some(b) => ("200 OK", b),
                    None => ("404 Not Found", b"not found".to_vec()),
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(&body);
            }
        });
        Server { base, routes, hits }
    }

    pub fn route(&self, path: &str, body: impl Into<Vec<u8>>) {
        self.routes
            .lock()
            .unwrap()
            .insert(path.to_owned(), body.into());
    }
}
