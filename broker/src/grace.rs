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
use vshp::ticket::{TicketError, TicketSealer};

use crate::leases::LeasePool;

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

/// Why a presented RESUME ticket gets nothing back (the peer is told `BadTicket`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResumeRefused {
    /// Not opened: forged, sealed before a gateway restart, expired, another peer's,
    /// already redeemed.
    #[error("ticket refused: {0}")]
    Ticket(#[from] TicketError),
    /// The ticket opens but its lease is neither parked nor free to reclaim (another
    /// peer holds its address now).
    #[error("the ticket's lease is gone: {0}")]
    LeaseGone(#[from] crate::leases::LeaseError),
}

/// A trusted peer presents `ticket` inside its handshake: the lease it names, taken back
/// from `parked` (flows kept) or, if not parked (the grace period ended, or the ticket
/// is from an earlier session), reclaimed in `pool` when its address is free. Anything
/// else is refused, and the peer is expected to connect again without a ticket.
pub fn redeem(
    sealer: &mut TicketSealer,
    parked: &mut ParkedLeases,
    pool: &mut LeasePool,
    peer: [u8; 32],
    ticket: &[u8],
    now_unix: u64,
) -> Result<Lease, ResumeRefused> {
    let opened = sealer.open(ticket, &peer, now_unix)?;
    if let Some(l) = parked.resume(&peer, opened.lease.id) {
        return Ok(l);
    }
    Ok(pool.reclaim(peer, &opened.lease, now_unix)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vshp::ticket::{TicketId, TicketLease};

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

    fn seal(sealer: &TicketSealer, peer: u8, l: &Lease, now: u64) -> Vec<u8> {
        sealer
            .seal(
                TicketId::random().unwrap(),
                &[peer; 32],
                &TicketLease::from(l),
                now,
                3600,
            )
            .unwrap()
            .to_vec()
    }

    #[test]
    fn redeem_gives_the_parked_lease_once_and_refuses_every_bad_ticket() {
        let mut pool = LeasePool::new(1);
        let mut parked = ParkedLeases::new(RESUME_GRACE);
        let mut sealer = TicketSealer::new([7; 32]).unwrap();
        let l = lease(&mut pool, 1);
        let t = seal(&sealer, 1, &l, 100);
        parked.park([1; 32], l.clone(), Instant::now());
        assert_eq!(
            redeem(&mut sealer, &mut parked, &mut pool, [1; 32], &t, 101),
            Ok(l.clone())
        );
        // Replayed.
        assert_eq!(
            redeem(&mut sealer, &mut parked, &mut pool, [1; 32], &t, 102),
            Err(ResumeRefused::Ticket(TicketError::Replayed))
        );
        // Another peer's ticket.
        let t2 = seal(&sealer, 1, &l, 100);
        assert_eq!(
            redeem(&mut sealer, &mut parked, &mut pool, [2; 32], &t2, 101),
            Err(ResumeRefused::Ticket(TicketError::WrongPeer))
        );
        // Expired.
        assert!(matches!(
            redeem(
                &mut sealer,
                &mut parked,
                &mut pool,
                [1; 32],
                &t2,
                100 + 3601
            ),
            Err(ResumeRefused::Ticket(TicketError::Expired { .. }))
        ));
        // Sealed by an earlier gateway run (another key), and forged.
        let mut restarted = TicketSealer::new([8; 32]).unwrap();
        let t3 = seal(&sealer, 1, &l, 100);
        assert_eq!(
            redeem(&mut restarted, &mut parked, &mut pool, [1; 32], &t3, 101),
            Err(ResumeRefused::Ticket(TicketError::Forged))
        );
        let mut forged = t3.clone();
        if let Some(b) = forged.last_mut() {
            *b ^= 1;
        }
        assert_eq!(
            redeem(&mut sealer, &mut parked, &mut pool, [1; 32], &forged, 101),
            Err(ResumeRefused::Ticket(TicketError::Forged))
        );
        assert!(matches!(
            redeem(&mut sealer, &mut parked, &mut pool, [1; 32], b"short", 101),
            Err(ResumeRefused::Ticket(TicketError::Malformed))
        ));
        // Valid, but the lease is still held (not parked): its address is not free.
        assert!(matches!(
            redeem(&mut sealer, &mut parked, &mut pool, [1; 32], &t3, 101),
            Err(ResumeRefused::LeaseGone(_))
        ));
        // Valid, not parked, address free: reclaimed with its id and addresses.
        pool.release(l.id);
        let t4 = seal(&sealer, 1, &l, 100);
        let r = redeem(&mut sealer, &mut parked, &mut pool, [1; 32], &t4, 101).unwrap();
        assert_eq!((r.id, r.ipv4, r.ipv6), (l.id, l.ipv4, l.ipv6));
    }
}
