//! The client side of `stratad`: HTTP/1.1 over its Unix socket, written by hand because the
//! CLI needs four request shapes and one streamed response, not an async runtime.
//!
//! Everything that comes back from the socket is treated as untrusted: header blocks, chunk
//! sizes, lines and bodies are bounded, and a malformed response is an error, never a panic.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};

/// Largest response head (status line and headers) we accept.
const MAX_HEAD: usize = 64 * 1024;
/// Largest non-streamed body we accept; the native API's answers are a few kilobytes.
const MAX_BODY: u64 = 16 * 1024 * 1024;
/// Longest line in a streamed body (one server-sent event's data line).
pub const MAX_LINE: usize = 4 * 1024 * 1024;
/// How long a request may wait for a daemon that accepted the connection but says nothing.
/// Loading a large model on `/api/load` is the slowest legitimate answer.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(600);

/// No daemon listens on the socket; callers print how to start one.
#[derive(Debug)]
pub struct NoDaemon {
    pub socket: PathBuf,
    pub source: std::io::Error,
}

impl std::fmt::Display for NoDaemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no strata daemon is running at {} ({}); start one with `strata serve --model MODEL` \
             (or `stratad --model MODEL`)",
            self.socket.display(),
            self.source
        )
    }
}

impl std::error::Error for NoDaemon {}

/// The system service's socket (`systemd/strata.socket`).
pub const SYSTEM_SOCKET: &str = "/run/strata/strata.sock";

/// The daemon's socket when none is given (daemon/API.md): `$STRATA_SOCKET` when set; else the
/// first that exists of the user's daemon socket (`$XDG_RUNTIME_DIR/strata/strata.sock`, or
/// `/tmp/strata-$UID/strata.sock` without a runtime dir) and the system service's
/// `/run/strata/strata.sock`; else the user's path, which error messages then name.
pub fn default_socket() -> PathBuf {
    let set = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(path) = set("STRATA_SOCKET") {
        return PathBuf::from(path);
    }
    let user = match set("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("strata/strata.sock"),
        None => {
            // SAFETY: getuid has no preconditions and cannot fail.
            let uid = unsafe { libc::getuid() };
            PathBuf::from(format!("/tmp/strata-{uid}/strata.sock"))
        }
    };
    let system = PathBuf::from(SYSTEM_SOCKET);
    if !user.exists() && system.exists() {
        system
    } else {
        user
    }
}

#[derive(Clone)]
pub struct Client {
    socket: PathBuf,
}

/// A response whose body is still on the socket.
pub struct Streaming {
    pub status: u16,
    /// The de-chunked body.
    pub body: Box<dyn BufRead + Send>,
    /// A second handle on the connection: shutting it down unblocks a reader of `body` from
    /// another thread, which is how an answer is stopped.
    pub conn: UnixStream,
}

impl Client {
    pub fn new(socket: Option<PathBuf>) -> Client {
        Client {
            socket: socket.unwrap_or_else(default_socket),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn connect(&self) -> anyhow::Result<UnixStream> {
        // A socket in a directory another user controls may be theirs, not the daemon's: the
        // prompt would go to them. The daemon makes the same check before it binds.
        strata_storage::trust::check_socket(&self.socket)
            .map_err(|e| anyhow::anyhow!("refusing to connect: {e}"))?;
        match UnixStream::connect(&self.socket) {
            Ok(s) => Ok(s),
            // A missing socket file, or one left behind by a daemon that exited.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Err(NoDaemon {
                    socket: self.socket.clone(),
                    source: e,
                }
                .into())
            }
            Err(e) => {
                Err(anyhow::Error::new(e)
                    .context(format!("connecting to {}", self.socket.display())))
            }
        }
    }

    /// Sends a request and reads the response head; the body is left to the caller.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<Streaming> {
        let mut conn = self.connect()?;
        conn.set_read_timeout(Some(RESPONSE_TIMEOUT))?;
        let body = body.map(serde_json::to_vec).transpose()?;
        // One request per connection keeps the framing simple: the body ends at EOF when the
        // server sends neither a length nor chunks.
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        req.push_str("User-Agent: strata-cli\r\nAccept: application/json, text/event-stream\r\n");
        if let Some(b) = &body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        let mut wire = req.into_bytes();
        if let Some(b) = body {
            wire.extend_from_slice(&b);
        }
        conn.write_all(&wire)
            .with_context(|| format!("sending {method} {path}"))?;
        let other = conn.try_clone()?;
        let mut reader = BufReader::new(conn);
        let head = read_head(&mut reader)
            .with_context(|| format!("reading the answer to {method} {path}"))?;
        let body: Box<dyn BufRead + Send> = if head.chunked {
            Box::new(BufReader::new(Chunked::new(reader)))
        } else if let Some(n) = head.content_length {
            Box::new(reader.take(n))
        } else {
            Box::new(reader)
        };
        Ok(Streaming {
            status: head.status,
            body,
            conn: other,
        })
    }

    /// A request whose answer is JSON; a non-2xx status becomes an error carrying the
    /// daemon's own message.
    pub fn json(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let resp = self.send(method, path, body)?;
        let status = resp.status;
        let mut bytes = Vec::new();
        resp.body
            .take(MAX_BODY + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading the answer to {method} {path}"))?;
        if bytes.len() as u64 > MAX_BODY {
            bail!("the answer to {method} {path} is larger than {MAX_BODY} bytes");
        }
        if !(200..300).contains(&status) {
            bail!("{}", error_message(status, &bytes));
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("the answer to {method} {path} is not JSON"))
    }
}

/// The daemon's message for a failed request: `{"error": {"message": …}}` (OpenAI),
/// `{"error": "…"}` (native), or the raw body.
pub fn error_message(status: u16, body: &[u8]) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let msg = parsed.as_ref().and_then(|v| {
        let e = v.get("error")?;
        e.as_str()
            .or_else(|| e.get("message").and_then(|m| m.as_str()))
            .map(str::to_owned)
    });
    match msg {
        Some(m) => format!("the daemon answered {status}: {m}"),
        None => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                format!("the daemon answered {status}")
            } else {
                let short: String = text.chars().take(300).collect();
                format!("the daemon answered {status}: {short}")
            }
        }
    }
}

/// Reads server-sent events until `[DONE]`, giving each event's JSON to `on_event`, which
/// returns false to stop reading. An `{"error": …}` event, a malformed event, or a stream
/// that ends before `[DONE]` is an error.
pub fn read_sse(
    body: &mut dyn BufRead,
    on_event: &mut dyn FnMut(&serde_json::Value) -> bool,
) -> anyhow::Result<()> {
    let mut data = String::new();
    loop {
        let line = read_line_bounded(body, MAX_LINE).context("reading the answer stream")?;
        let Some(line) = line else {
            bail!("the daemon closed the stream before [DONE]");
        };
        let line = String::from_utf8(line).context("the answer stream is not UTF-8")?;
        if let Some(d) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(d.strip_prefix(' ').unwrap_or(d));
            continue;
        }
        // Comments (`:`) and other fields are ignored; a blank line ends an event.
        if !line.is_empty() || data.is_empty() {
            continue;
        }
        let event = std::mem::take(&mut data);
        if event == "[DONE]" {
            return Ok(());
        }
        let v: serde_json::Value = serde_json::from_str(&event)
            .with_context(|| format!("a malformed event in the answer stream: {event:.200}"))?;
        if let Some(e) = v.get("error") {
            let msg = e["message"]
                .as_str()
                .or(e.as_str())
                .unwrap_or("unknown error");
            bail!("the daemon failed mid-answer: {msg}");
        }
        if !on_event(&v) {
            return Ok(());
        }
    }
}

struct Head {
    status: u16,
    content_length: Option<u64>,
    chunked: bool,
}

/// Reads one `\n`-terminated line of at most `max` bytes; `None` at a clean EOF.
pub fn read_line_bounded(
    r: &mut (impl BufRead + ?Sized),
    max: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = Read::take(&mut *r, max as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.len() > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a line longer than {max} bytes"),
        ));
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    Ok(Some(line))
}

fn read_head(r: &mut impl BufRead) -> anyhow::Result<Head> {
    let mut budget = MAX_HEAD;
    let mut next = |r: &mut dyn BufRead| -> anyhow::Result<String> {
        let line = read_line_bounded(r, budget)?;
        let line = line.context("the daemon closed the connection without answering")?;
        budget = budget.saturating_sub(line.len() + 2);
        if budget == 0 {
            bail!("the response head is larger than {MAX_HEAD} bytes");
        }
        String::from_utf8(line).context("the response head is not UTF-8")
    };
    // Status lines look like `HTTP/1.1 200 OK`; 1xx interim answers are skipped.
    let status = loop {
        let line = next(r)?;
        let mut parts = line.splitn(3, ' ');
        let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
            bail!("malformed status line {line:?}");
        };
        if !version.starts_with("HTTP/1.") {
            bail!("not an HTTP/1 answer: {line:?}");
        }
        let code: u16 = code
            .parse()
            .with_context(|| format!("malformed status line {line:?}"))?;
        if (100..200).contains(&code) {
            while !next(r)?.is_empty() {}
            continue;
        }
        break code;
    };
    let mut head = Head {
        status,
        content_length: None,
        chunked: false,
    };
    loop {
        let line = next(r)?;
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            bail!("malformed header line {line:?}");
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.content_length = Some(
                value
                    .parse()
                    .with_context(|| format!("malformed Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        }
    }
    Ok(head)
}

/// HTTP/1.1 chunked transfer decoding (RFC 9112 §7.1); trailers are read and dropped.
struct Chunked<R> {
    inner: R,
    /// Bytes left in the current chunk.
    left: u64,
    done: bool,
}

impl<R: BufRead> Chunked<R> {
    fn new(inner: R) -> Self {
        Chunked {
            inner,
            left: 0,
            done: false,
        }
    }

    fn bad(msg: String) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
    }

    /// Reads the next chunk-size line; at the last chunk, reads the trailers too.
    fn next_chunk(&mut self) -> std::io::Result<()> {
        let line = read_line_bounded(&mut self.inner, 4096)?
            .ok_or_else(|| Self::bad("the stream ended inside a chunked body".into()))?;
        let line = String::from_utf8_lossy(&line);
        let size = line.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size, 16)
            .map_err(|_| Self::bad(format!("malformed chunk size {size:?}")))?;
        if size == 0 {
            // Trailer fields, then the empty line that ends the message.
            while let Some(l) = read_line_bounded(&mut self.inner, 4096)? {
                if l.is_empty() {
                    break;
                }
            }
            self.done = true;
        }
        self.left = size;
        Ok(())
    }
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.left == 0 {
            if self.done {
                return Ok(0);
            }
            self.next_chunk()?;
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(Self::bad("the stream ended inside a chunk".into()));
        }
        self.left -= n as u64;
        if self.left == 0 {
            // Each chunk's data is followed by CRLF.
            let crlf = read_line_bounded(&mut self.inner, 2)?;
            if crlf.is_none_or(|l| !l.is_empty()) {
                return Err(Self::bad("a chunk is not followed by CRLF".into()));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_of(raw: &str) -> anyhow::Result<(Head, Vec<u8>)> {
        let mut r = BufReader::new(raw.as_bytes());
        let head = read_head(&mut r)?;
        let mut body = Vec::new();
        if head.chunked {
            Chunked::new(r).read_to_end(&mut body)?;
        } else {
            r.read_to_end(&mut body)?;
        }
        Ok((head, body))
    }

    #[test]
    fn chunked_body_is_reassembled() -> anyhow::Result<()> {
        let raw = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-T: 1\r\n\r\n";
        let (head, body) = head_of(raw)?;
        assert_eq!(head.status, 200);
        assert_eq!(body, b"hello, world");
        Ok(())
    }

    #[test]
    fn interim_answers_are_skipped_and_length_read() -> anyhow::Result<()> {
        let raw =
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}";
        let (head, _) = head_of(raw)?;
        assert_eq!(head.status, 404);
        assert_eq!(head.content_length, Some(2));
        Ok(())
    }

    #[test]
    fn hostile_heads_and_chunks_are_errors() {
        for raw in [
            "",
            "SSH-2.0-OpenSSH\r\n\r\n",
            "HTTP/1.1 abc OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        ] {
            assert!(head_of(raw).is_err(), "accepted {raw:?}");
        }
        let huge = format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert!(head_of(&huge).is_err());
    }

    #[test]
    fn error_messages_come_from_the_body() {
        assert_eq!(
            error_message(404, br#"{"error":{"message":"model 'x' not found"}}"#),
            "the daemon answered 404: model 'x' not found"
        );
        assert_eq!(
            error_message(400, br#"{"error":"bad name"}"#),
            "the daemon answered 400: bad name"
        );
        assert_eq!(error_message(500, b""), "the daemon answered 500");
    }

    #[test]
    fn a_missing_socket_is_no_daemon() {
        let c = Client::new(Some(PathBuf::from("/nonexistent/strata-test.sock")));
        let e = match c.json("GET", "/api/health", None) {
            Ok(v) => panic!("got {v}"),
            Err(e) => e,
        };
        assert!(e.downcast_ref::<NoDaemon>().is_some(), "{e:#}");
        assert!(e.to_string().contains("stratad --model"), "{e}");
    }
}
