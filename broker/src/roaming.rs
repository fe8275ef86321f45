//! Roaming by NAT rebinding on UDP (docs/resume.md, Roaming): a datagram session moves
//! to a new client address when an *authenticated* record arrives from there.
//!
//! Each UDP peer's worker reads a socket `connect()`ed to the peer's address, so a
//! record from any other address (the client's NAT gave it a new port) lands on the
//! broker's listener. The broker cannot authenticate it — only the worker holds the
//! session keys — so it routes a DATA record from an unknown address by its receiver
//! index to the one live session with that index, as a *probe*; the worker opens it
//! (AEAD and replay window) and answers; only an authenticated probe makes the broker
//! hand the worker a new socket connected to the new address. An unauthenticated record
//! (forged, replayed, garbage with a guessed index) never moves anything.
//!
//! [`RoamState`] is one session's side of that, sans-IO: at most one probe in flight,
//! probes rate-limited, an unanswered probe forgotten after [`PROBE_TIMEOUT`].

use std::net::SocketAddr;
use std::time::Duration;

use crate::ratelimit::{Bucket, Rate};

/// Probes per session: a burst of 4, then 2 a second. A rebinding needs one.
pub const PROBE_RATE: Rate = Rate {
    burst: 4.0,
    per_sec: 2.0,
};
/// A probe without a verdict for this long is forgotten (the next may go).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a record from an unknown address is not probed (a counted drop).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RoamDrop {
    #[error("the session has no receiver index (not an admitted datagram session)")]
    NoIndex,
    #[error("another receiver index")]
    OtherIndex,
    #[error("a probe of this session is already in flight")]
    InFlight,
    #[error("probe rate limit")]
    RateLimited,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Probe {
    id: u64,
    from: SocketAddr,
    at: Duration,
}

/// One datagram session's roaming state.
#[derive(Debug, Clone)]
pub struct RoamState {
    index: Option<u32>,
    probe: Option<Probe>,
    bucket: Bucket,
}

impl RoamState {
    pub fn new(now: Duration) -> Self {
        Self {
            index: None,
            probe: None,
            bucket: Bucket::full(PROBE_RATE, now),
        }
    }

    /// The receiver index the peer's DATA records carry (the worker tells it at each
    /// admission; a new handshake brings a new one).
    pub fn set_index(&mut self, index: u32) {
        self.index = Some(index);
        self.probe = None;
    }

    pub fn index(&self) -> Option<u32> {
        self.index
    }

    /// A DATA record for receiver `index` arrived from `from`, which is not this
    /// session's address: `Ok(())` when it may be probed now as probe `id` (then it is
    /// in flight).
    pub fn offer(
        &mut self,
        index: u32,
        from: SocketAddr,
        id: u64,
        now: Duration,
    ) -> Result<(), RoamDrop> {
        match self.index {
            None => return Err(RoamDrop::NoIndex),
            Some(i) if i != index => return Err(RoamDrop::OtherIndex),
            Some(_) => {}
        }
        if let Some(p) = self.probe {
            if now.saturating_sub(p.at) < PROBE_TIMEOUT {
                return Err(RoamDrop::InFlight);
            }
        }
        if !self.bucket.take(PROBE_RATE, now) {
            return Err(RoamDrop::RateLimited);
        }
        self.probe = Some(Probe { id, from, at: now });
        Ok(())
    }

    /// The worker's verdict on probe `id`: the address to move the session to, only
    /// when it is the probe in flight and the worker authenticated it.
    pub fn verdict(&mut self, id: u64, authenticated: bool) -> Option<SocketAddr> {
        match self.probe {
            Some(p) if p.id == id => {
                self.probe = None;
                authenticated.then_some(p.from)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 7], port))
    }

    #[test]
    fn only_an_authenticated_verdict_on_the_probe_in_flight_moves_the_session() {
        let t = Duration::from_secs(10);
        let mut r = RoamState::new(t);
        assert_eq!(r.offer(7, addr(1), 1, t), Err(RoamDrop::NoIndex));
        r.set_index(7);
        assert_eq!(r.offer(8, addr(1), 1, t), Err(RoamDrop::OtherIndex));
        assert_eq!(r.offer(7, addr(1), 1, t), Ok(()));
        // At most one in flight: a second address waits.
        assert_eq!(r.offer(7, addr(2), 2, t), Err(RoamDrop::InFlight));
        // A verdict for another probe, or an unauthenticated one, moves nothing.
        assert_eq!(r.verdict(2, true), None);
        assert_eq!(r.verdict(1, false), None);
        assert_eq!(r.verdict(1, true), None, "the probe is answered once");
        assert_eq!(r.offer(7, addr(3), 3, t), Ok(()));
        assert_eq!(r.verdict(3, true), Some(addr(3)));
    }

    #[test]
    fn probes_are_rate_limited_and_an_unanswered_one_times_out() {
        let t = Duration::from_secs(10);
        let mut r = RoamState::new(t);
        r.set_index(7);
        for id in 0..4 {
            assert_eq!(r.offer(7, addr(1), id, t), Ok(()));
            assert_eq!(r.verdict(id, false), None);
        }
        assert_eq!(r.offer(7, addr(1), 9, t), Err(RoamDrop::RateLimited));
        let t2 = t + Duration::from_secs(1);
        assert_eq!(r.offer(7, addr(1), 10, t2), Ok(()));
        assert_eq!(r.offer(7, addr(1), 11, t2), Err(RoamDrop::InFlight));
        // Never answered: after PROBE_TIMEOUT the next may go, and the late verdict of
        // the forgotten probe moves nothing.
        let t3 = t2 + PROBE_TIMEOUT;
        assert_eq!(r.offer(7, addr(2), 12, t3), Ok(()));
        assert_eq!(r.verdict(10, true), None);
        assert_eq!(r.verdict(12, true), Some(addr(2)));
        // A new handshake's index replaces the old one and drops a probe in flight.
        assert_eq!(r.offer(7, addr(3), 13, t3 + PROBE_TIMEOUT), Ok(()));
        r.set_index(99);
        assert_eq!(r.verdict(13, true), None);
        assert_eq!(r.index(), Some(99));
    }
}
