//! Leases of disconnected peers, kept for a grace period so that a resume (RESUME +
//! ticket inside a fresh handshake) gets the same lease back and the netstack keeps
//! the peer's flows.
//!
//! When a peer's worker ends (transport gone, idle timeout, crash, `kill -9`, replaced
//! by a newer session) its lease is *parked* here instead of being released: the lease
//! stays active in the pool (nobody else gets its addresses) and the netstack is not
//! told (`LeaseRemoved` is not sent), so the peer's TCP flows wait. A resume whose
//! ticket names the parked lease takes it back; [`RESUME_GRACE`] later without one the
//! lease is released and the netstack resets its flows. A full handshake (no ticket, or
//! a refused one) and a revocation release the parked lease at once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use vshp::lease::{Lease, LeaseId};

/// How long a disconnected peer's lease and flows are kept for a resume.
pub const RESUME_GRACE: Duration = Duration::from_secs(180);

#[derive(Debug, Clone)]
struct Parked {
    lease: Lease,
    until: Instant,
}

/// The parked leases, at most one per peer key.
#[derive(Debug, Default)]
pub struct ParkedLeases {
    grace: Duration,
    by_peer: HashMap<[u8; 32], Parked>,
}

impl ParkedLeases {
    /// Leases parked for `grace`.
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            by_peer: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.by_peer.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_peer.is_empty()
    }

    /// Parks `lease` of `peer` until `now + grace`. Returns a lease the peer already had
    /// parked (another id), which the caller must release now.
    pub fn park(&mut self, peer: [u8; 32], lease: Lease, now: Instant) -> Option<Lease> {
        let until = now + self.grace;
        let old = self.by_peer.insert(peer, Parked { lease, until })?;
        let new_id = self.by_peer.get(&peer).map(|p| p.lease.id);
        (Some(old.lease.id) != new_id).then_some(old.lease)
    }

    /// The parked lease of `peer` if it is `id` (a valid ticket names it): taken back.
    pub fn resume(&mut self, peer: &[u8; 32], id: LeaseId) -> Option<Lease> {
        match self.by_peer.get(peer) {
            Some(p) if p.lease.id == id => self.by_peer.remove(peer).map(|p| p.lease),
            _ => None,
        }
    }

    /// Removes the parked lease of `peer` (full handshake, revocation): to release.
    pub fn take(&mut self, peer: &[u8; 32]) -> Option<Lease> {
        self.by_peer.remove(peer).map(|p| p.lease)
    }

    /// Whether `id` is parked (for `status`).
    pub fn contains(&self, id: LeaseId) -> bool {
        self.by_peer.values().any(|p| p.lease.id == id)
    }

    /// Removes and returns the leases whose grace period ended by `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<([u8; 32], Lease)> {
        let due: Vec<[u8; 32]> = self
            .by_peer
            .iter()
            .filter(|(_, p)| now >= p.until)
            .map(|(k, _)| *k)
            .collect();
        due.into_iter()
            .filter_map(|k| self.by_peer.remove(&k).map(|p| (k, p.lease)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leases::LeasePool;

    fn lease(pool: &mut LeasePool, peer: u8) -> Lease {
        pool.allocate([peer; 32], 0).unwrap()
    }

    #[test]
    fn a_parked_lease_resumes_once_with_its_id_only() {
        let mut pool = LeasePool::new(1);
        let l = lease(&mut pool, 1);
        let mut p = ParkedLeases::new(RESUME_GRACE);
        let t0 = Instant::now();
        assert!(p.park([1; 32], l.clone(), t0).is_none());
        assert!(p.contains(l.id));
        assert_eq!(p.resume(&[2; 32], l.id), None, "another peer");
        assert_eq!(
            p.resume(&[1; 32], LeaseId(l.id.0 + 100)),
            None,
            "another id"
        );
        assert_eq!(p.resume(&[1; 32], l.id), Some(l.clone()));
        assert_eq!(p.resume(&[1; 32], l.id), None, "taken back once");
        assert!(p.is_empty());
    }

    #[test]
    fn grace_expiry_releases_only_the_due_leases() {
        let mut pool = LeasePool::new(1);
        let a = lease(&mut pool, 1);
        let b = lease(&mut pool, 2);
        let mut p = ParkedLeases::new(Duration::from_secs(180));
        let t0 = Instant::now();
        p.park([1; 32], a.clone(), t0);
        p.park([2; 32], b.clone(), t0 + Duration::from_secs(60));
        assert!(p.expire(t0 + Duration::from_secs(179)).is_empty());
        assert_eq!(p.expire(t0 + Duration::from_secs(180)), vec![([1; 32], a)]);
        assert_eq!(p.len(), 1);
        assert_eq!(p.expire(t0 + Duration::from_secs(240)), vec![([2; 32], b)]);
        assert!(p.is_empty());
    }

    #[test]
    fn reparking_returns_the_superseded_lease_and_take_empties() {
        let mut pool = LeasePool::new(1);
        let a = lease(&mut pool, 1);
        pool.release(a.id);
        let a2 = lease(&mut pool, 1);
        let mut p = ParkedLeases::new(RESUME_GRACE);
        let t0 = Instant::now();
        assert!(p.park([1; 32], a.clone(), t0).is_none());
        assert!(p.park([1; 32], a.clone(), t0).is_none(), "same lease again");
        assert_eq!(p.park([1; 32], a2.clone(), t0), Some(a));
        assert_eq!(p.take(&[1; 32]), Some(a2));
        assert_eq!(p.take(&[1; 32]), None);
    }
}
