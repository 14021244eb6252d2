//! Listening sockets and the accept loops: the Unix socket (bound here, or inherited through
//! systemd socket activation), optional loopback TCP with a bearer token, peer credentials,
//! and graceful connection shutdown.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, header};
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::error::ApiError;
use crate::server::Peer;

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
/// created here) belong to that group. A stale socket file from a crashed daemon is replaced;
/// a live one is an error.
pub fn bind_unix(path: &Path, group: Option<&str>) -> anyhow::Result<UnixListener> {
    use anyhow::Context as _;
    let gid = group.map(resolve_group).transpose()?;
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mode = if gid.is_some() { 0o710 } else { 0o700 };
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", dir.display()))?;
        if gid.is_some() {
            std::os::unix::fs::chown(dir, None, gid)
                .with_context(|| format!("chgrp {}", dir.display()))?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("{} is in use: is another stratad running?", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
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

/// Serves HTTP/1.1 on one connection until it closes or `stop` flips, then finishes the
/// response in flight (graceful shutdown).
async fn serve_conn<I>(
    io: I,
    app: Router,
    peer: Peer,
    token: Option<Arc<str>>,
    mut stop: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let app = app.clone();
        let peer = peer.clone();
        let token = token.clone();
        async move {
            if let Some(token) = &token
                && let Err(e) = check_tcp(&req, token)
            {
                return Ok::<_, std::convert::Infallible>(e.into_response());
            }
            req.extensions_mut().insert(peer);
            app.oneshot(req.map(Body::new)).await
        }
    });
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), svc);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!("connection ended: {e}");
            }
            return;
        }
        _ = stopped(&mut stop) => {}
    }
    conn.as_mut().graceful_shutdown();
    if let Err(e) = conn.await {
        tracing::debug!("connection ended during shutdown: {e}");
    }
}

/// Resolves once the stop flag is set (or its sender is gone). The watch guard is dropped
/// here, so the future stays `Send`.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A TCP request needs a loopback `Host` (so a web page cannot reach the daemon through DNS
/// rebinding) and the bearer token.
fn check_tcp(req: &Request<Incoming>, token: &str) -> Result<(), ApiError> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !is_loopback_host(host) {
        return Err(ApiError::Forbidden(format!(
            "Host '{host}' is not a loopback name"
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

/// Accepts Unix connections until `stop` flips; connection tasks go into `conns`.
pub async fn accept_unix(
    l: UnixListener,
    app: Router,
    mut stop: watch::Receiver<bool>,
    conns: &mut JoinSet<()>,
) {
    loop {
        let stream = tokio::select! {
            r = l.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => return,
        };
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
        tracing::debug!(?peer, "connection");
        conns.spawn(serve_conn(stream, app.clone(), peer, None, stop.clone()));
    }
}

/// Accepts TCP connections (token-checked) until `stop` flips.
pub async fn accept_tcp(
    l: TcpListener,
    app: Router,
    token: Arc<str>,
    mut stop: watch::Receiver<bool>,
    conns: &mut JoinSet<()>,
) {
    loop {
        let (stream, addr) = tokio::select! {
            r = l.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => return,
        };
        tracing::debug!(%addr, "tcp connection");
        conns.spawn(serve_conn(
            stream,
            app.clone(),
            Peer::Tcp(addr),
            Some(token.clone()),
            stop.clone(),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
