//! Ctrl-C while an answer streams (`strata chat`, `strata run -cnv`/`-i`). While an answer
//! streams the terminal is in its normal mode, so Ctrl-C arrives as SIGINT, which only raises
//! a flag that the answer loops poll: the answer stops, the conversation goes on. At a line
//! editor's prompt the terminal is in raw mode and Ctrl-C is a key the editor reports. A SIGINT
//! at any other time (at `run -cnv`'s plain prompt, or input piped rather than typed) ends the
//! program as usual.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);
static ANSWERING: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    if ANSWERING.load(Ordering::SeqCst) {
        STOP.store(true, Ordering::SeqCst);
    } else {
        // SAFETY: _exit is async-signal-safe; 130 is the shell's code for death by SIGINT.
        unsafe { libc::_exit(130) }
    }
}

pub fn install() -> std::io::Result<()> {
    // SAFETY: the handler only touches atomics and calls _exit, both async-signal-safe;
    // the sigaction struct is fully initialised (zeroed, then its mask emptied) before use.
    // SA_RESTART keeps blocking calls elsewhere from failing with EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Marks an answer as running (Ctrl-C stops it) until the guard is dropped.
pub fn answering() -> Answering {
    STOP.store(false, Ordering::SeqCst);
    ANSWERING.store(true, Ordering::SeqCst);
    Answering
}

pub struct Answering;

impl Drop for Answering {
    fn drop(&mut self) {
        ANSWERING.store(false, Ordering::SeqCst);
    }
}

pub fn requested() -> bool {
    STOP.load(Ordering::SeqCst)
}
