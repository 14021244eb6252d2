//! A minimal HTTP/1.1 client over a Unix socket for the end-to-end tests: enough to send one
//! request per connection and read a response whole or chunk by chunk (SSE).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: String,
}

impl Response {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// A response whose head has been read; the body is read on demand.
pub(crate) struct Streaming {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    reader: BufReader<UnixStream>,
    chunked: bool,
    ended: bool,
}

impl Streaming {
    /// The next piece of the body, or `None` at its end.
    pub(crate) fn next_chunk(&mut self) -> std::io::Result<Option<String>> {
        if self.ended {
            return Ok(None);
        }
        if !self.chunked {
            let mut s = String::new();
            self.reader.read_to_string(&mut s)?;
            self.ended = true;
            return Ok(if s.is_empty() { None } else { Some(s) });
        }
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            self.ended = true;
            return Ok(None);
        }
        let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|e| std::io::Error::other(format!("bad chunk size {line:?}: {e}")))?;
        let mut buf = vec![0u8; size + 2];
        self.reader.read_exact(&mut buf)?;
        if size == 0 {
            self.ended = true;
            return Ok(None);
        }
        buf.truncate(size);
        String::from_utf8(buf)
            .map(Some)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    /// Reads the rest of the body.
    pub(crate) fn rest(&mut self) -> std::io::Result<String> {
        let mut out = String::new();
        while let Some(c) = self.next_chunk()? {
            out.push_str(&c);
        }
        Ok(out)
    }

    pub(crate) fn into_response(mut self) -> std::io::Result<Response> {
        let body = self.rest()?;
        Ok(Response {
            status: self.status,
            headers: self.headers,
            body,
        })
    }
}

/// Sends raw body bytes (any content) and reads the head.
pub(crate) fn send(
    sock: &Path,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<Streaming> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    // A server may answer (413) and close before reading everything; that is not our error.
    let _ = s.write_all(body);
    let mut reader = BufReader::new(s);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    Ok(Streaming {
        status,
        headers,
        reader,
        chunked,
        ended: false,
    })
}

pub(crate) fn request(
    sock: &Path,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<Response> {
    send(sock, method, path, body)?.into_response()
}

pub(crate) fn get(sock: &Path, path: &str) -> std::io::Result<Response> {
    request(sock, "GET", path, b"")
}

pub(crate) fn post(sock: &Path, path: &str, body: &serde_json::Value) -> std::io::Result<Response> {
    request(sock, "POST", path, body.to_string().as_bytes())
}

/// The `data:` payloads of an SSE body, in order.
pub(crate) fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: ").map(str::to_owned))
        .collect()
}
