//! Listening sockets and the accept loops: the Unix socket (bound here, in a directory no
//! other user controls, or inherited through systemd socket activation), optional loopback TCP
//! with a bearer token, peer credentials, the connection caps of [`crate::conns`], read
//! timeouts, and graceful connection shutdown.
//!
//! Timeouts are hyper's own: with a timer set, its `header_read_timeout` runs from the moment a
//! connection waits for a request head — the first one, and each next one on a kept-alive
//! connection — so one setting bounds slow headers and idle keep-alive alike, at no cost per
//! byte (tower-http's timeout layers bound only the handler, after the head has arrived). The
//! body's deadline is `server::limit_body`'s, which reads every body whole.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, header};
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::conns::{Admitted, Conns, PeerKey};
use crate::error::ApiError;
use crate::server::Peer;

/// The largest request head (request line and headers) read, past which hyper answers 431;
/// also the most a connection's read buffer grows to.
const MAX_HEAD: usize = 64 * 1024;

/// The default socket path (documented in API.md; clients resolve it the same way).
pub fn default_socket_path() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(dir) = env("XDG_RUNTIME_DIR") {
        return PathBuf::from(dir).join("strata/strata.sock");
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let under_systemd = env("INVOCATION_ID").is_some() || env("NOTIFY_SOCKET").is_some();
    if uid == 0 && under_systemd {
        return PathBuf::from("/run/strata/strata.sock");
    }
    PathBuf::from(format!("/tmp/strata-{uid}/strata.sock"))
}

/// The listening socket systemd passed (fd 3), if `LISTEN_PID` names this process.
pub fn activated_listener() -> std::io::Result<Option<std::os::unix::net::UnixListener>> {
    use std::os::fd::FromRawFd;
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let fds = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    if !pid_ok || fds == 0 {
        return Ok(None);
    }
    if fds > 1 {
        tracing::warn!("LISTEN_FDS={fds}; only fd 3 is used");
    }
    const SD_LISTEN_FDS_START: i32 = 3;
    // SAFETY: systemd hands this process fd 3 as an open listening socket (LISTEN_PID is
    // ours), and nothing else in the process owns it.
    let l = unsafe { std::os::unix::net::UnixListener::from_raw_fd(SD_LISTEN_FDS_START) };
    // An fd of another kind fails here rather than later in accept.
    l.local_addr()?;
    l.set_nonblocking(true)?;
    Ok(Some(l))
}

/// Binds `path` mode 0660, creating its directory if needed (0700, or 0710 when a group is
/// given so its members can reach the socket). With `group`, the socket (and a directory
/// created here) belong to that group. The directory must pass
/// [`strata_storage::trust::check_socket_dir`] — owned by this user (or root, or put in place
/// by root for a service), writable by nobody else — so that no other user can replace the
/// socket. A stale socket file of this user's from a crashed daemon is replaced; a live one is
/// an error, and so is anything at `path` that is not a socket.
pub fn bind_unix(path: &Path, group: Option<&str>) -> anyhow::Result<UnixListener> {
    use anyhow::Context as _;
    let gid = group.map(resolve_group).transpose()?;
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        // Created with its mode in one step, so there is no moment at which it is open; one
        // that exists already (ours or anyone's) is checked below instead.
        let mode = if gid.is_some() { 0o710 } else { 0o700 };
        match std::fs::DirBuilder::new().mode(mode).create(dir) {
            Ok(()) => {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
                    .with_context(|| format!("chmod {}", dir.display()))?;
                if gid.is_some() {
                    std::os::unix::fs::chown(dir, None, gid)
                        .with_context(|| format!("chgrp {}", dir.display()))?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
        strata_storage::trust::check_socket_dir(dir).map_err(|e| anyhow::anyhow!(e))?;
    }
    remove_stale_socket(path)?;
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod 0660 {}", path.display()))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).with_context(|| {
            format!(
                "giving {} to group {} (is stratad a member?)",
                path.display(),
                group.unwrap_or_default()
            )
        })?;
    }
    Ok(l)
}

/// Removes what a crashed daemon left at `path`: only a socket, only this user's, and only
/// when nothing answers on it. Anything else there is an error, never deleted.
fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    };
    if !meta.file_type().is_socket() {
        anyhow::bail!(
            "{} exists and is not a socket; not replacing it (choose another --socket)",
            path.display()
        );
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        anyhow::bail!(
            "{} is a socket of uid {}, not this user's; not replacing it",
            path.display(),
            meta.uid()
        );
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!("{} is in use: is another stratad running?", path.display());
    }
    std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))
}

/// A group name (or a numeric id) as a gid.
pub fn resolve_group(group: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(group)
        .map_err(|_| anyhow::anyhow!("socket_group {group:?} contains a NUL byte"))?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // SAFETY: an all-zero `group` is a valid value of this plain C struct.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: `name` is NUL-terminated, `grp` and
        // `out` are live locals, and `buf` is writable for `buf.len()` bytes.
        let rc = unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut out,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            anyhow::bail!(
                "looking up group '{group}': {}",
                std::io::Error::from_raw_os_error(rc)
            );
        }
        if out.is_null() {
            anyhow::bail!("socket_group '{group}': no such group");
        }
        return Ok(grp.gr_gid);
    }
}

/// Reads the bearer token for TCP; the file must not be readable by group or others.
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        anyhow::bail!(
            "{} is mode {:o}; the token file must be 0600 or stricter",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned();
    if token.len() < 16 {
        anyhow::bail!(
            "the token in {} is shorter than 16 characters",
            path.display()
        );
    }
    Ok(token)
}

/// How connections are served: the router, the TCP token, the caps and the read timeout.
#[derive(Clone)]
pub struct Serving {
    pub app: Router,
    pub conns: Arc<Conns>,
    /// How long a request head may take to arrive, and a kept-alive connection may sit idle.
    pub read_timeout: Duration,
}

/// Serves HTTP/1.1 on one connection until it closes, is evicted (`close` fires), or `stop`
/// flips; then it finishes the response in flight (graceful shutdown).
async fn serve_conn<I>(
    io: I,
    serving: Serving,
    peer: Peer,
    token: Option<Arc<str>>,
    admitted: Admitted,
    close: oneshot::Receiver<()>,
    mut stop: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = admitted.activity();
    let app = serving.app.clone();
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let app = app.clone();
        let peer = peer.clone();
        let token = token.clone();
        let activity = activity.clone();
        async move {
            if let Some(token) = &token
                && let Err(e) = check_tcp(&req, token)
            {
                return Ok::<_, std::convert::Infallible>(e.into_response());
            }
            req.extensions_mut().insert(peer);
            req.extensions_mut().insert(activity);
            app.oneshot(req.map(Body::new)).await
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(serving.read_timeout)
        .max_buf_size(MAX_HEAD)
        .max_header_size(MAX_HEAD)
        .serve_connection(TokioIo::new(io), svc);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!("connection ended: {e}");
            }
            return;
        }
        // Evicted while idle: nothing is in flight, so dropping the connection loses nothing.
        Ok(()) = close => {
            tracing::debug!("idle connection closed to make room");
            return;
        }
        _ = stopped(&mut stop) => {}
    }
    conn.as_mut().graceful_shutdown();
    if let Err(e) = conn.await {
        tracing::debug!("connection ended during shutdown: {e}");
    }
    drop(admitted);
}

/// Resolves once the stop flag is set (or its sender is gone). The watch guard is dropped
/// here, so the future stays `Send`.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A TCP request needs exactly one `Host`, a loopback name (so a web page cannot reach the
/// daemon through DNS rebinding) — and so does the authority of an absolute-form target
/// (`GET http://evil.com/…`), which a server must prefer to `Host` — and the bearer token.
fn check_tcp(req: &Request<Incoming>, token: &str) -> Result<(), ApiError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next().map(|h| h.to_str().unwrap_or("\u{fffd}"));
    if hosts.next().is_some() {
        return Err(ApiError::BadRequest(
            "more than one Host header; send exactly one".into(),
        ));
    }
    let host = host.unwrap_or("");
    if !is_loopback_host(host) {
        return Err(ApiError::Forbidden(format!(
            "Host '{}' is not a loopback name",
            strata_storage::text::clip(host, strata_storage::text::QUOTE_CHARS)
        )));
    }
    if let Some(auth) = req.uri().authority()
        && !is_loopback_host(auth.as_str())
    {
        return Err(ApiError::Forbidden(format!(
            "request target host '{}' is not a loopback name",
            strata_storage::text::clip(auth.as_str(), strata_storage::text::QUOTE_CHARS)
        )));
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
        return Err(ApiError::Unauthorized(
            "missing or wrong bearer token".into(),
        ));
    }
    Ok(())
}

fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, port)) if port.is_empty() || port.starts_with(':') => h,
            _ => return false,
        }
    } else {
        host.split_once(':').map_or(host, |(h, _)| h)
    };
    matches!(
        name.to_ascii_lowercase().as_str(),
        "localhost" | "127.0.0.1" | "::1"
    )
}

/// Compares without an early exit, so response timing does not leak the token's prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a connection refused at a cap is told, written without reading its request: the
/// same JSON error shape as every other answer.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
Retry-After: 1\r\nConnection: close\r\nContent-Length: 130\r\n\r\n\
{\"error\": {\"message\": \"too many connections are busy; retry shortly\", \"type\": \"overloaded_error\", \"code\": \"too_many_connections\"}}";

/// How long an accept loop waits for evicted connections to close before accepting more: they
/// close at their task's next turn, so this bounds only a stuck runtime.
const SETTLE: Duration = Duration::from_millis(100);

/// Refuses a connection cheaply: one non-blocking write of [`REFUSED`], then close.
fn refuse(write: impl FnOnce(&[u8]) -> std::io::Result<usize>, conns: &Conns) {
    let _ = write(REFUSED);
    conns
        .stats
        .refused
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Backs off after a failed accept (EMFILE: out of descriptors; ENOBUFS…) instead of spinning
/// on an error that will not clear at once: 10 ms doubling to 1 s, one log line when it
/// starts and one with the count when accepting works again.
#[derive(Default)]
struct Backoff {
    failures: u64,
}

impl Backoff {
    async fn failed(&mut self, e: &std::io::Error) {
        if self.failures == 0 {
            tracing::warn!("accept: {e}; backing off");
        }
        self.failures += 1;
        let ms = 10u64 << self.failures.min(7).saturating_sub(1);
        tokio::time::sleep(Duration::from_millis(ms.min(1000))).await;
    }

    fn succeeded(&mut self) {
        if self.failures > 0 {
            tracing::warn!(failures = self.failures, "accepting again");
            self.failures = 0;
        }
    }
}

/// Binds the loopback TCP listener with a backlog of [`TCP_BACKLOG`] (the kernel caps it at
/// `net.core.somaxconn`), as Go's net package does for Ollama. tokio's `TcpListener::bind`
/// listens with 128: a burst of connections fills that queue, the kernel drops the SYNs that
/// follow, and every client behind them — a health check too — waits a 1 s retransmit.
pub fn bind_tcp(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(TCP_BACKLOG)
}

/// The TCP listen backlog asked for; Linux lowers it to `net.core.somaxconn` (4096 by default
/// since 5.4). The Unix socket's is `somaxconn` already (mio listens with -1).
pub const TCP_BACKLOG: u32 = 4096;

/// Accepts Unix connections until `stop` flips; connection tasks go into `conns`.
pub async fn accept_unix(
    l: UnixListener,
    serving: Serving,
    mut stop: watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) {
    let mut backoff = Backoff::default();
    loop {
        let stream = tokio::select! {
            r = l.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    backoff.failed(&e).await;
                    continue;
                }
            },
            // A finished connection's task keeps its allocation (the size of its future) until
            // joined: reap as they finish, or every connection ever served stays in memory.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            _ = stopped(&mut stop) => return,
        };
        backoff.succeeded();
        let peer = match stream.peer_cred() {
            Ok(c) => Peer::Unix {
                uid: Some(c.uid()),
                pid: c.pid(),
            },
            Err(e) => {
                tracing::warn!("SO_PEERCRED: {e}");
                Peer::Unix {
                    uid: None,
                    pid: None,
                }
            }
        };
        let key = match &peer {
            Peer::Unix { uid, .. } => PeerKey::Uid(*uid),
            Peer::Tcp(a) => PeerKey::Ip(a.ip()),
        };
        let Some((admitted, close)) = serving.conns.admit(key) else {
            tracing::debug!(?peer, "connection refused: every connection is busy");
            refuse(|b| stream.try_write(b), &serving.conns);
            continue;
        };
        tracing::debug!(?peer, "connection");
        tasks.spawn(serve_conn(
            stream,
            serving.clone(),
            peer,
            None,
            admitted,
            close,
            stop.clone(),
        ));
        if serving.conns.closing() {
            serving.conns.settle(SETTLE).await;
        }
    }
}

/// Accepts TCP connections (token-checked) until `stop` flips.
pub async fn accept_tcp(
    l: TcpListener,
    serving: Serving,
    token: Arc<str>,
    mut stop: watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) {
    let mut backoff = Backoff::default();
    loop {
        let (stream, addr) = tokio::select! {
            r = l.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    backoff.failed(&e).await;
                    continue;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            _ = stopped(&mut stop) => return,
        };
        backoff.succeeded();
        let Some((admitted, close)) = serving.conns.admit(PeerKey::Ip(addr.ip())) else {
            tracing::debug!(%addr, "connection refused: every connection is busy");
            refuse(|b| stream.try_write(b), &serving.conns);
            continue;
        };
        tracing::debug!(%addr, "tcp connection");
        tasks.spawn(serve_conn(
            stream,
            serving.clone(),
            Peer::Tcp(addr),
            Some(token.clone()),
            admitted,
            close,
            stop.clone(),
        ));
        if serving.conns.closing() {
            serving.conns.settle(SETTLE).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: the TCP listener queued 128 connections (tokio's default), so the 129th
    /// client of a burst waited for a 1 s SYN retransmit before the daemon could even accept
    /// it (the hardening test's health check took 1.02 s). 600 connections to a listener that
    /// accepts none must all complete their handshake at once.
    #[test]
    fn the_tcp_listener_queues_a_burst_of_connections() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _rt = rt.enter();
        let l = bind_tcp("127.0.0.1:0".parse().unwrap()).expect("bind");
        let addr = l.local_addr().unwrap();
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(4096);
        let n = 600.min(somaxconn);
        let mut held = Vec::new();
        for i in 0..n {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(s) => held.push(s),
                Err(e) => panic!("connection {i} of {n} not queued: {e}"),
            }
        }
        drop(l);
    }

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:1",
            "[::1]:11434",
            "[::1]",
            "LOCALHOST",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "",
            "evil.com",
            "127.0.0.1.evil.com",
            "[::1]x",
            "10.0.0.1:80",
            "localhost.evil",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn the_refusal_is_one_whole_json_answer() {
        let text = std::str::from_utf8(REFUSED).expect("ascii");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["error"]["type"], "overloaded_error");
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn token_file_must_be_private() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("token");
        std::fs::write(&p, "0123456789abcdef0123\n")?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))?;
        assert!(read_token(&p).is_err());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
        assert_eq!(read_token(&p)?, "0123456789abcdef0123");
        Ok(())
    }
}
