//! systemd's watchdog (`WatchdogSec=`), fed by the engine threads themselves.
//!
//! systemd sets `WATCHDOG_USEC`; the service must send `WATCHDOG=1` more often than that or be
//! restarted. An independent timer would keep pinging while an engine thread is stuck in a
//! kernel or a deadlock, which defeats the point, so the pings come from the engine loops:
//! every engine thread records a heartbeat each turn (and wakes at least every quarter
//! interval when idle), and a ping goes out only when every live engine thread has beaten
//! within the last half interval. One stuck thread therefore stops the pings for the whole
//! daemon, and systemd restarts it. With no model loaded there is no engine loop; then the
//! async runtime's housekeeping tick pings ([`Watchdog::idle_tick`]), so a wedged runtime
//! also stops them.

use std::ffi::OsString;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// One engine thread's last turn.
pub struct Heartbeat {
    last: Mutex<Instant>,
}

impl Heartbeat {
    fn age(&self, now: Instant) -> Duration {
        self.last
            .lock()
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(*t))
    }
}

pub struct Watchdog {
    /// Half of `WATCHDOG_USEC`: how often to ping, and how old a heartbeat may be.
    period: Duration,
    target: OsString,
    state: Mutex<State>,
}

struct State {
    last_ping: Option<Instant>,
    beats: Vec<Weak<Heartbeat>>,
    /// A stale engine thread is logged once per stall, not once per turn.
    warned: bool,
}

impl Watchdog {
    /// The watchdog systemd asked for, if any: `WATCHDOG_USEC` set (and `WATCHDOG_PID`, when
    /// set, naming this process) and a `NOTIFY_SOCKET` to ping.
    pub fn from_env() -> Option<Arc<Watchdog>> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
        if usec == 0 {
            return None;
        }
        if let Ok(pid) = std::env::var("WATCHDOG_PID")
            && pid.trim().parse::<u32>().ok() != Some(std::process::id())
        {
            return None;
        }
        let target = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty())?;
        Some(Arc::new(Watchdog::new(Duration::from_micros(usec), target)))
    }

    /// A watchdog that must be pinged within `interval`, through `target` (a notify socket).
    pub fn new(interval: Duration, target: OsString) -> Watchdog {
        Watchdog {
            period: interval / 2,
            target,
            state: Mutex::new(State {
                last_ping: None,
                beats: Vec::new(),
                warned: false,
            }),
        }
    }

    /// How long an idle engine thread may sleep between turns.
    pub fn idle_wake(&self) -> Duration {
        (self.period / 2).max(Duration::from_millis(1))
    }

    /// A heartbeat for a new engine thread; dropping it unregisters the thread.
    pub fn register(&self) -> Arc<Heartbeat> {
        let hb = Arc::new(Heartbeat {
            last: Mutex::new(Instant::now()),
        });
        if let Ok(mut st) = self.state.lock() {
            st.beats.push(Arc::downgrade(&hb));
        }
        hb
    }

    /// An engine thread's turn: records it, and pings if every engine thread is alive.
    pub fn beat(&self, hb: &Heartbeat) {
        let now = Instant::now();
        if let Ok(mut t) = hb.last.lock() {
            *t = now;
        }
        self.maybe_ping(now, true);
    }

    /// The async side's housekeeping tick: pings only while no engine thread exists.
    pub fn idle_tick(&self) {
        self.maybe_ping(Instant::now(), false);
    }

    fn maybe_ping(&self, now: Instant, from_engine: bool) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        st.beats.retain(|w| w.strong_count() > 0);
        if !from_engine && !st.beats.is_empty() {
            return;
        }
        if st
            .last_ping
            .is_some_and(|t| now.saturating_duration_since(t) < self.period)
        {
            return;
        }
        let stale = st
            .beats
            .iter()
            .filter_map(Weak::upgrade)
            .map(|hb| hb.age(now))
            .max()
            .filter(|age| *age > self.period);
        if let Some(age) = stale {
            if !st.warned {
                tracing::warn!(
                    "an engine thread has not run for {:.1}s; withholding watchdog pings",
                    age.as_secs_f64()
                );
                st.warned = true;
            }
            return;
        }
        st.warned = false;
        st.last_ping = Some(now);
        drop(st);
        crate::notify::notify_to(&self.target, "WATCHDOG=1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    fn pings(rx: &UnixDatagram) -> usize {
        let mut n = 0;
        let mut buf = [0u8; 64];
        while let Ok(len) = rx.recv(&mut buf) {
            assert_eq!(&buf[..len], b"WATCHDOG=1");
            n += 1;
        }
        n
    }

    #[test]
    fn a_stuck_engine_thread_stops_the_pings() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path)?;
        rx.set_nonblocking(true)?;
        let wd = Watchdog::new(Duration::from_millis(100), path.into_os_string());

        // No engine thread: the housekeeping tick pings.
        wd.idle_tick();
        assert_eq!(pings(&rx), 1);

        let a = wd.register();
        let b = wd.register();
        // With engine threads, the tick no longer pings; the engines do, at most once a period.
        std::thread::sleep(Duration::from_millis(60));
        wd.idle_tick();
        assert_eq!(pings(&rx), 0);
        wd.beat(&b);
        wd.beat(&a);
        wd.beat(&a);
        assert_eq!(pings(&rx), 1);

        // `b` stops turning: `a` alone cannot ping.
        for _ in 0..6 {
            std::thread::sleep(Duration::from_millis(30));
            wd.beat(&a);
        }
        assert_eq!(pings(&rx), 0);

        // `b` turns again (or goes away): pings resume.
        wd.beat(&b);
        assert_eq!(pings(&rx), 1);
        drop(b);
        std::thread::sleep(Duration::from_millis(60));
        wd.beat(&a);
        assert_eq!(pings(&rx), 1);
        Ok(())
    }
}
