//! systemd's readiness protocol: a datagram of `KEY=VALUE` lines to `$NOTIFY_SOCKET`, whose
//! name starts with `@` for the abstract namespace. Without the variable it does nothing.

use std::os::unix::net::UnixDatagram;

pub fn notify(state: &str) {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET").filter(|p| !p.is_empty()) {
        notify_to(&path, state);
    }
}

/// `STATUS=`: the one-line state `systemctl status` shows.
pub fn status(msg: &str) {
    notify(&format!("STATUS={msg}"));
}

/// Sends `state` to the notify socket `path`; a failure is logged, never fatal.
pub fn notify_to(path: &std::ffi::OsStr, state: &str) {
    if let Err(e) = send(path, state) {
        tracing::warn!("sd_notify {state:?} to {}: {e}", path.to_string_lossy());
    }
}

fn send(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::send;

    #[test]
    fn sends_to_a_path_socket() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("notify");
        let rx = std::os::unix::net::UnixDatagram::bind(&path)?;
        send(path.as_os_str(), "READY=1")?;
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf)?;
        assert_eq!(&buf[..n], b"READY=1");
        Ok(())
    }

    #[test]
    fn sends_to_an_abstract_socket() -> std::io::Result<()> {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("strata-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        let rx = std::os::unix::net::UnixDatagram::bind_addr(&addr)?;
        send(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1")?;
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf)?;
        assert_eq!(&buf[..n], b"STOPPING=1");
        Ok(())
    }
}
