//! The open connections and their caps: at most `max_connections` in all and
//! `max_connections_per_peer` per peer (a uid on the Unix socket, an address on TCP), so that
//! no client can use up the daemon's file descriptors.
//!
//! A connection is *busy* from the moment its request's body has been read until its response
//! has been written (a stream to its end), and *idle* otherwise: waiting for its next request
//! (keep-alive), or for the bytes of one still arriving — which is what a slowloris client
//! looks like. When a new connection would pass a cap, the idle connection that has waited
//! longest (of that peer, or of all) is closed to make room; only when every connection it
//! could displace is busy is the new one refused, with a canned 503, before any of its bytes
//! are read. So idle hoarders cannot lock anyone out, and busy connections are bounded by the
//! work the daemon is actually doing.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use http_body::{Frame, SizeHint};
use tokio::sync::{Notify, oneshot};

/// The caps, from the settings.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max: usize,
    pub per_peer: usize,
}

/// Who a cap counts a connection against.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum PeerKey {
    /// The peer's uid on the Unix socket (`None` when SO_PEERCRED failed: all such share one).
    Uid(Option<u32>),
    /// The peer's address on TCP.
    Ip(IpAddr),
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct ConnStats {
    pub accepted: AtomicU64,
    /// New connections answered 503 because every connection they could displace was busy.
    pub refused: AtomicU64,
    /// Idle connections closed to make room for new ones.
    pub evicted: AtomicU64,
}

pub struct Conns {
    limits: Limits,
    inner: Mutex<Inner>,
    /// Woken when an evicted connection's task has ended (its descriptor is closed).
    closed: Notify,
    pub stats: ConnStats,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    /// Bumped on every change of activity; orders the idle connections.
    clock: u64,
    conns: HashMap<u64, Entry>,
    /// Idle connections by when they became idle, oldest first.
    idle: BTreeMap<u64, u64>,
    per_peer: HashMap<PeerKey, usize>,
    /// Evicted connections whose tasks have not ended yet: their descriptors are still open.
    closing: usize,
    /// The most connections open at once since [`Conns::take_peak`] last asked.
    peak: usize,
}

struct Entry {
    peer: PeerKey,
    /// Requests of this connection being answered (HTTP/1.1 answers one at a time, but a
    /// response body may still be streaming when the next request's head is parsed).
    busy: usize,
    /// Its key in `idle` while idle.
    idle_since: Option<u64>,
    /// Closes the connection: fired when it is evicted.
    close: Option<oneshot::Sender<()>>,
}

/// A connection's place in the table; dropping it (when the connection's task ends) frees it.
pub struct Admitted {
    conns: Arc<Conns>,
    id: u64,
}

/// Marks a connection busy, from a request's handler; cheap to clone into request extensions.
#[derive(Clone)]
pub struct Activity {
    conns: Arc<Conns>,
    id: u64,
}

/// Held while a request is being answered; the connection is idle again when the last one
/// is dropped.
pub struct Busy {
    conns: Arc<Conns>,
    id: u64,
}

impl Conns {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            inner: Mutex::new(Inner::default()),
            closed: Notify::new(),
            stats: ConnStats::default(),
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The table stays consistent across a panic elsewhere: every update is a few map
        // operations that cannot fail half-way.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.lock().conns.len()
    }

    /// The most connections open at once since the last call, and resets it to the number
    /// open now.
    pub fn take_peak(&self) -> usize {
        let mut inner = self.lock();
        let now = inner.conns.len();
        std::mem::replace(&mut inner.peak, now)
    }

    /// Admits a new connection from `peer`, closing the longest-idle connection of that peer
    /// when the peer is at its cap, and the longest-idle of all when the daemon is. `None`
    /// when that would take a busy connection: the caller refuses the new one. The receiver
    /// fires when this connection is later evicted in turn.
    pub fn admit(self: &Arc<Self>, peer: PeerKey) -> Option<(Admitted, oneshot::Receiver<()>)> {
        let mut inner = self.lock();
        let mut evict = Vec::new();
        let of_peer = inner.per_peer.get(&peer).copied().unwrap_or(0);
        if of_peer >= self.limits.per_peer {
            evict.push(inner.oldest_idle(Some(&peer), &evict)?);
        }
        if inner.conns.len() - evict.len() >= self.limits.max {
            evict.push(inner.oldest_idle(None, &evict)?);
        }
        for id in evict {
            inner.remove(id, true);
            inner.closing += 1;
            self.stats.evicted.fetch_add(1, Ordering::Relaxed);
        }
        let (tx, rx) = oneshot::channel();
        inner.next_id += 1;
        inner.clock += 1;
        let (id, clock) = (inner.next_id, inner.clock);
        *inner.per_peer.entry(peer.clone()).or_insert(0) += 1;
        inner.conns.insert(
            id,
            Entry {
                peer,
                busy: 0,
                idle_since: Some(clock),
                close: Some(tx),
            },
        );
        inner.idle.insert(clock, id);
        inner.peak = inner.peak.max(inner.conns.len());
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        Some((
            Admitted {
                conns: self.clone(),
                id,
            },
            rx,
        ))
    }
}

impl Conns {
    /// Waits (at most `limit`) until the connections evicted so far have closed their
    /// descriptors. The accept loops call it after an eviction, so that a burst of new
    /// connections cannot outrun the closing of the ones they displace: the descriptors held
    /// stay within the cap however fast clients connect.
    pub async fn settle(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.closed.notified();
            if self.lock().closing == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    /// Whether evicted connections are still closing.
    pub fn closing(&self) -> bool {
        self.lock().closing > 0
    }

    /// The `/metrics` lines of the connection table.
    pub fn metrics(&self) -> String {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let open = self.open();
        format!(
            "# HELP strata_connections_open Connections open now (Unix socket and TCP).\n\
             # TYPE strata_connections_open gauge\n\
             strata_connections_open {open}\n\
             # HELP strata_connections_total Connections accepted, by outcome: admitted, \
             refused (every connection it could displace was busy) or evicted (an idle one \
             closed to make room).\n\
             # TYPE strata_connections_total counter\n\
             strata_connections_total{{outcome=\"admitted\"}} {}\n\
             strata_connections_total{{outcome=\"refused\"}} {}\n\
             strata_connections_total{{outcome=\"evicted\"}} {}\n",
            c(&self.stats.accepted),
            c(&self.stats.refused),
            c(&self.stats.evicted),
        )
    }
}

impl Inner {
    /// The idle connection (of `peer`, if given) idle the longest, not in `skip`.
    fn oldest_idle(&self, peer: Option<&PeerKey>, skip: &[u64]) -> Option<u64> {
        self.idle
            .values()
            .copied()
            .filter(|id| !skip.contains(id))
            .find(|id| peer.is_none_or(|p| self.conns.get(id).is_some_and(|e| &e.peer == p)))
    }

    /// Takes `id` out of the table (closing it when `close`).
    fn remove(&mut self, id: u64, close: bool) {
        let Some(mut e) = self.conns.remove(&id) else {
            return;
        };
        if let Some(t) = e.idle_since {
            self.idle.remove(&t);
        }
        if let Some(n) = self.per_peer.get_mut(&e.peer) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&e.peer);
            }
        }
        if close && let Some(tx) = e.close.take() {
            let _ = tx.send(());
        }
    }
}

impl Admitted {
    pub fn activity(&self) -> Activity {
        Activity {
            conns: self.conns.clone(),
            id: self.id,
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut inner = self.conns.lock();
        if inner.conns.contains_key(&self.id) {
            inner.remove(self.id, false);
        } else {
            // Evicted earlier: its descriptor closes as this task ends.
            inner.closing = inner.closing.saturating_sub(1);
            drop(inner);
            self.conns.closed.notify_waiters();
        }
    }
}

impl Activity {
    /// The connection is busy until the returned guard is dropped.
    pub fn begin(&self) -> Busy {
        let mut inner = self.conns.lock();
        if let Some(e) = inner.conns.get_mut(&self.id) {
            e.busy += 1;
            if let Some(t) = e.idle_since.take() {
                inner.idle.remove(&t);
            }
        }
        Busy {
            conns: self.conns.clone(),
            id: self.id,
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut guard = self.conns.lock();
        let inner = &mut *guard;
        inner.clock += 1;
        let clock = inner.clock;
        if let Some(e) = inner.conns.get_mut(&self.id) {
            e.busy = e.busy.saturating_sub(1);
            if e.busy == 0 && e.idle_since.is_none() {
                e.idle_since = Some(clock);
                inner.idle.insert(clock, self.id);
            }
        }
    }
}

/// A response body that keeps its connection busy until it has been sent (or dropped).
pub struct BusyBody {
    inner: Body,
    _busy: Busy,
}

impl BusyBody {
    pub fn wrap(inner: Body, busy: Busy) -> Body {
        Body::new(BusyBody { inner, _busy: busy })
    }
}

impl HttpBody for BusyBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_peer: usize) -> Arc<Conns> {
        Conns::new(Limits { max, per_peer })
    }

    #[test]
    fn a_peer_at_its_cap_gives_up_its_longest_idle_connection() {
        let c = limits(10, 2);
        let a = PeerKey::Uid(Some(1));
        let (first, mut first_rx) = c.admit(a.clone()).expect("room");
        let (second, mut second_rx) = c.admit(a.clone()).expect("room");
        let (_third, _) = c.admit(a.clone()).expect("an idle one gives way");
        assert!(
            first_rx.try_recv().is_ok(),
            "the oldest idle was not closed"
        );
        assert!(second_rx.try_recv().is_err());
        drop(first);
        assert_eq!(c.open(), 2);
        // Another peer is not affected by a's cap.
        assert!(c.admit(PeerKey::Uid(Some(2))).is_some());
        drop(second);
    }

    #[test]
    fn busy_connections_are_never_displaced() {
        let c = limits(2, 2);
        let ip = PeerKey::Ip("127.0.0.1".parse().expect("ip"));
        let (a, mut a_rx) = c.admit(ip.clone()).expect("room");
        let (b, mut b_rx) = c.admit(ip.clone()).expect("room");
        let busy_a = a.activity().begin();
        let busy_b = b.activity().begin();
        assert!(c.admit(ip.clone()).is_none(), "admitted past two busy ones");
        assert!(
            c.admit(PeerKey::Uid(Some(0))).is_none(),
            "past the total cap"
        );
        drop(busy_a);
        // a is idle again, and now gives way; b stays.
        assert!(c.admit(ip.clone()).is_some());
        assert!(a_rx.try_recv().is_ok());
        assert!(b_rx.try_recv().is_err());
        drop(busy_b);
        assert_eq!(c.stats.evicted.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_total_cap_takes_the_longest_idle_of_anyone() {
        let c = limits(2, 8);
        let (p, q) = (PeerKey::Uid(Some(1)), PeerKey::Uid(Some(2)));
        let (a, mut a_rx) = c.admit(p.clone()).expect("room");
        let (b, _b_rx) = c.admit(q.clone()).expect("room");
        // a was used recently, so b has been idle longer.
        drop(a.activity().begin());
        let (_c, _) = c.admit(q).expect("room made");
        assert!(a_rx.try_recv().is_err());
        drop(b);
        assert_eq!(c.open(), 2);
        assert_eq!(c.take_peak(), 2);
        drop(a);
        assert_eq!(c.take_peak(), 2, "the peak since the last call");
        assert_eq!(c.take_peak(), 1);
    }
}
