//! Whether a directory may hold a Unix socket that a client will trust: the checks ssh-agent
//! and systemd make before they use a socket directory, shared by the daemon (before it binds)
//! and its client (before it connects), so that another local user cannot put an impostor
//! socket where either looks for the real one.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The sticky bit: in such a directory only an entry's owner may rename or remove it.
const STICKY: u32 = 0o1000;

/// Checks that `dir` is a directory (not a symlink) that no other user could have put in place
/// or can write to: owned by this user or root, or — a system service's directory such as
/// `/run/strata` — by another user in a parent that only root or this user could have created
/// it in; and not writable by group or others unless sticky (`/tmp`). The error says why.
pub fn check_socket_dir(dir: &Path) -> Result<(), String> {
    let shown = dir.display();
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("checking {shown}: {e}"))?;
    if meta.file_type().is_symlink() {
        return Err(format!(
            "{shown} is a symbolic link; a socket directory must be a real directory"
        ));
    }
    if !meta.is_dir() {
        return Err(format!("{shown} is not a directory"));
    }
    if let Some(who) = open_to(meta.mode()) {
        return Err(format!(
            "{shown} is writable by {who} (mode {:o}): another user could replace the socket; \
             make it 0700 or choose another --socket",
            meta.mode() & 0o7777
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let owner = meta.uid();
    if owner == me || owner == 0 {
        return Ok(());
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    let placed_by_admin = parent
        .and_then(|p| std::fs::metadata(p).ok())
        .is_some_and(|p| {
            (p.uid() == 0 || p.uid() == me) && open_to(p.mode()).is_none() && p.mode() & STICKY == 0
        });
    if placed_by_admin {
        Ok(())
    } else {
        Err(format!(
            "{shown} belongs to uid {owner}, not to this user (uid {me}), and sits where any \
             user can create directories: it may hold an impostor's socket; remove it or \
             choose another --socket"
        ))
    }
}

/// Checks the socket at `path` before connecting: its directory passes [`check_socket_dir`],
/// and the socket belongs to this user, root, or the directory's owner.
pub fn check_socket(path: &Path) -> Result<(), String> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        // Absent (or its directory is): connecting says so.
        return Ok(());
    };
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        check_socket_dir(dir)?;
    }
    let dir_owner = path
        .parent()
        .and_then(|d| {
            std::fs::metadata(if d.as_os_str().is_empty() {
                Path::new(".")
            } else {
                d
            })
            .ok()
        })
        .map(|m| m.uid());
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let owner = meta.uid();
    if owner == me || owner == 0 || Some(owner) == dir_owner {
        Ok(())
    } else {
        Err(format!(
            "{} belongs to uid {owner}, not to this user, root or its directory's owner: it \
             may be an impostor's socket",
            path.display()
        ))
    }
}

/// Who besides the owner may write, for a mode without the sticky bit.
fn open_to(mode: u32) -> Option<&'static str> {
    if mode & STICKY != 0 {
        return None;
    }
    match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (_, true) => Some("others"),
        (true, false) => Some("its group"),
        (false, false) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_and_sticky_directories_pass_open_ones_do_not() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("s");
        std::fs::create_dir(&d).unwrap();
        for (mode, ok) in [
            (0o700, true),
            (0o710, true),
            (0o755, true),
            (0o777, false),
            (0o770, false),
            (0o1777, true),
        ] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(
                check_socket_dir(&d).is_ok(),
                ok,
                "mode {mode:o}: {:?}",
                check_socket_dir(&d)
            );
        }
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        assert!(check_socket_dir(&link).is_err_and(|e| e.contains("symbolic link")));
        assert!(check_socket_dir(&t.path().join("absent")).is_err());
    }
}
