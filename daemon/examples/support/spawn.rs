//! Starting a `stratad` for the examples: the binary next to the examples' folder, on a socket
//! in a temp dir, waited for until the model is loaded, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../../tests/http.rs"]
pub(crate) mod http;

/// A daemon an example started; killed on drop.
pub(crate) struct Spawned {
    child: Child,
    pub(crate) sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Spawned {
    /// SIGTERM, and wait for the drain to finish.
    #[allow(dead_code)] // throughput leaves its daemon to drop
    pub(crate) fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Starts `stratad --model MODEL ARGS…` and waits (up to 300 s) until `/api/ps` lists it.
pub(crate) fn start_daemon(model: &str, args: &[&str]) -> Result<Spawned, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let stratad = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("stratad"))
        .filter(|p| p.is_file())
        .ok_or("no stratad next to this binary: cargo build --release -p strata-daemon")?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let sock = dir.path().join("strata.sock");
    let child = Command::new(stratad)
        .arg("--socket")
        .arg(&sock)
        .args(["--model", model])
        .args(args)
        .env("STRATA_CONFIG", "/dev/null")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting stratad: {e}"))?;
    let mut d = Spawned {
        child,
        sock,
        _dir: dir,
    };
    let t0 = Instant::now();
    loop {
        if let Ok(Some(st)) = d.child.try_wait() {
            return Err(format!("stratad exited with {st}"));
        }
        if let Ok(r) = http::get(&d.sock, "/api/ps")
            && r.body.contains(&format!("\"name\":\"{model}\""))
        {
            return Ok(d);
        }
        if t0.elapsed() > Duration::from_secs(300) {
            return Err("stratad did not load the model within 300 s".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
