//! `LeasePool`: tunnel addresses for admitted peers (domain model: `TunnelLease`).
//!
//! IPv4 100.64.0.0/24 (RFC 6598 shared address space, which no home LAN uses): the
//! gateway is .1 (also the in-tunnel DNS forwarder), peers get .2 ..= .254.
//! IPv6 ULA fd56:5348:5000::/64 ("VSH" in the global ID): the gateway is ::1, a peer
//! gets ::N for the same host number N as its IPv4 address.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use vshp::lease::{Ipv4Prefix, Ipv6Prefix, Lease, LeaseId, Route};
use vshp::ticket::TicketLease;

pub const POOL_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 0);
pub const POOL_V4_LEN: u8 = 24;
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
pub const POOL_V6: Ipv6Addr = Ipv6Addr::new(0xfd56, 0x5348, 0x5000, 0, 0, 0, 0, 0);
pub const POOL_V6_LEN: u8 = 64;
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfd56, 0x5348, 0x5000, 0, 0, 0, 0, 1);
/// Peers' host numbers.
pub const FIRST_HOST: u8 = 2;
pub const LAST_HOST: u8 = 254;
/// MTU of the client's interface on a datagram (UDP) transport: 1500 minus the worst
/// tunnel overhead (IPv6 + UDP outer headers, VSHP data header, AEAD tag, message and
/// packet length fields), rounded down. A record then never fragments on the LAN, so
/// one lost Ethernet frame costs one packet, not a 45-fragment datagram (Wi-Fi).
pub const LEASE_MTU: u16 = 1400;
/// MTU of the client's interface on a stream transport (TCP, USB): as large as a lease
/// may be. The stream carries records of up to 64 KiB whatever the LAN's MTU, and the
/// laptop's kernel then hands the TUN 64 KB TCP segments: per byte, 45 times fewer
/// packets to read, seal, check and relay (docs/performance.md). The netstack
/// terminates TCP, so the segments never leave the gateway at this size.
pub const LEASE_MTU_STREAM: u16 = vshp::lease::MAX_LEASE_MTU;

/// The lease MTU for a peer on this kind of transport.
pub fn lease_mtu(kind: ipc_schema::messages::broker_worker::TransportKind) -> u16 {
    match kind {
        ipc_schema::messages::broker_worker::TransportKind::Datagram => LEASE_MTU,
        ipc_schema::messages::broker_worker::TransportKind::Stream => LEASE_MTU_STREAM,
    }
}
/// How long a lease is valid without a new handshake.
pub const LEASE_LIFETIME_SECS: u64 = 24 * 3600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("all {} tunnel addresses are leased", LAST_HOST - FIRST_HOST + 1)]
    Exhausted,
    #[error("the ticket's address is not one of this gateway's or is leased to another peer")]
    Unavailable,
}

#[derive(Debug, Clone)]
struct Active {
    peer: [u8; 32],
    host: u8,
}

/// The address pool. Addresses are sticky: a peer gets the host number it had last
/// time when that one is free.
#[derive(Debug)]
pub struct LeasePool {
    next_id: u64,
    active: HashMap<LeaseId, Active>,
    last_host: HashMap<[u8; 32], u8>,
}

impl Default for LeasePool {
    fn default() -> Self {
        Self::new(1)
    }
}

fn host_of(addr: Ipv4Addr) -> Option<u8> {
    let o = addr.octets();
    let [a, b, c, _] = POOL_V4.octets();
    (o[0] == a && o[1] == b && o[2] == c && (FIRST_HOST..=LAST_HOST).contains(&o[3]))
        .then_some(o[3])
}

impl LeasePool {
    /// `first_id`: the first lease id to hand out (the broker starts from a random
    /// value so ids of a restarted broker do not collide with old tickets' ids).
    pub fn new(first_id: u64) -> Self {
        Self {
            next_id: first_id.max(1),
            active: HashMap::new(),
            last_host: HashMap::new(),
        }
    }

    pub fn active(&self) -> usize {
        self.active.len()
    }

    fn in_use(&self, host: u8) -> bool {
        self.active.values().any(|a| a.host == host)
    }

    fn fresh_id(&mut self) -> LeaseId {
        loop {
            let id = LeaseId(self.next_id);
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if !self.active.contains_key(&id) {
                return id;
            }
        }
    }

    /// A new lease for `peer` with the datagram transport's MTU ([`LEASE_MTU`]).
    pub fn allocate(&mut self, peer: [u8; 32], now_unix: u64) -> Result<Lease, LeaseError> {
        self.allocate_with_mtu(peer, now_unix, LEASE_MTU)
    }

    /// A new lease for `peer` whose interface MTU is `mtu` ([`lease_mtu`] of the
    /// peer's transport; clamped to what a lease may carry).
    pub fn allocate_with_mtu(
        &mut self,
        peer: [u8; 32],
        now_unix: u64,
        mtu: u16,
    ) -> Result<Lease, LeaseError> {
        let host = match self.last_host.get(&peer) {
            Some(&h) if !self.in_use(h) => h,
            _ => (FIRST_HOST..=LAST_HOST)
                .find(|h| !self.in_use(*h) && !self.last_host.values().any(|l| l == h))
                .or_else(|| (FIRST_HOST..=LAST_HOST).find(|h| !self.in_use(*h)))
                .ok_or(LeaseError::Exhausted)?,
        };
        let id = self.fresh_id();
        let mut lease = self.take(id, peer, host, now_unix);
        lease.mtu = mtu.clamp(vshp::lease::MIN_LEASE_MTU, vshp::lease::MAX_LEASE_MTU);
        Ok(lease)
    }

    /// Restores the lease a resume ticket names (same id and addresses), if its address
    /// is free or already this peer's.
    pub fn reclaim(
        &mut self,
        peer: [u8; 32],
        t: &TicketLease,
        now_unix: u64,
    ) -> Result<Lease, LeaseError> {
        let host = host_of(t.ipv4.addr).ok_or(LeaseError::Unavailable)?;
        if self.active.contains_key(&t.id) || self.in_use(host) {
            return Err(LeaseError::Unavailable);
        }
        if let Some(v6) = t.ipv6 {
            if v6.addr != v6_of(host) {
                return Err(LeaseError::Unavailable);
            }
        }
        Ok(self.take(t.id, peer, host, now_unix))
    }

    fn take(&mut self, id: LeaseId, peer: [u8; 32], host: u8, now_unix: u64) -> Lease {
        self.active.insert(id, Active { peer, host });
        self.last_host.insert(peer, host);
        lease_for(id, host, now_unix)
    }

    /// Returns the lease's address to the pool.
    pub fn release(&mut self, id: LeaseId) -> Option<[u8; 32]> {
        self.active.remove(&id).map(|a| a.peer)
    }

    /// Leases held by `peer`.
    pub fn leases_of(&self, peer: &[u8; 32]) -> Vec<LeaseId> {
        self.active
            .iter()
            .filter(|(_, a)| &a.peer == peer)
            .map(|(id, _)| *id)
            .collect()
    }
}

fn v6_of(host: u8) -> Ipv6Addr {
    let mut o = POOL_V6.octets();
    o[15] = host;
    Ipv6Addr::from(o)
}

fn lease_for(id: LeaseId, host: u8, now_unix: u64) -> Lease {
    let [a, b, c, _] = POOL_V4.octets();
    Lease {
        id,
        ipv4: Ipv4Prefix {
            addr: Ipv4Addr::new(a, b, c, host),
            len: POOL_V4_LEN,
        },
        ipv6: Some(Ipv6Prefix {
            addr: v6_of(host),
            len: POOL_V6_LEN,
        }),
        dns: vec![IpAddr::V4(GATEWAY_V4), IpAddr::V6(GATEWAY_V6)],
        mtu: LEASE_MTU,
        routes: vec![
            Route::V4(Ipv4Prefix {
                addr: Ipv4Addr::UNSPECIFIED,
                len: 0,
            }),
            Route::V6(Ipv6Prefix {
                addr: Ipv6Addr::UNSPECIFIED,
                len: 0,
            }),
        ],
        expires_at_unix: now_unix.saturating_add(LEASE_LIFETIME_SECS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mtu_follows_the_transport() {
        use ipc_schema::messages::broker_worker::TransportKind;
        let mut pool = LeasePool::new(1);
        let udp = pool
            .allocate_with_mtu([1; 32], 0, lease_mtu(TransportKind::Datagram))
            .unwrap();
        let tcp = pool
            .allocate_with_mtu([2; 32], 0, lease_mtu(TransportKind::Stream))
            .unwrap();
        assert_eq!(udp.mtu, LEASE_MTU);
        assert_eq!(tcp.mtu, LEASE_MTU_STREAM);
        udp.validate().unwrap();
        tcp.validate().unwrap();
        // Out of range asks are clamped into what a lease may carry.
        let low = pool.allocate_with_mtu([3; 32], 0, 100).unwrap();
        assert_eq!(low.mtu, vshp::lease::MIN_LEASE_MTU);
        assert_eq!(pool.allocate([4; 32], 0).unwrap().mtu, LEASE_MTU);
    }

    #[test]
    fn allocates_distinct_valid_addresses_and_exhausts() {
        let mut pool = LeasePool::new(10);
        let mut seen = std::collections::HashSet::new();
        for i in 0..253u32 {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_be_bytes());
            let l = pool.allocate(k, 0).unwrap();
            l.validate().unwrap();
            assert_ne!(l.ipv4.addr, GATEWAY_V4);
            assert!(seen.insert(l.ipv4.addr), "duplicate {}", l.ipv4.addr);
            assert_eq!(l.ipv6.unwrap().addr.octets()[15], l.ipv4.addr.octets()[3]);
            assert_eq!(l.expires_at_unix, LEASE_LIFETIME_SECS);
        }
        assert_eq!(pool.allocate([0xff; 32], 0), Err(LeaseError::Exhausted));
    }

    #[test]
    fn release_reuses_and_addresses_are_sticky() {
        let mut pool = LeasePool::new(1);
        let a = pool.allocate([1; 32], 0).unwrap();
        let b = pool.allocate([2; 32], 0).unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!(pool.release(a.id), Some([1; 32]));
        assert_eq!(pool.release(a.id), None);
        // A third peer does not take the address peer 1 had while others are free.
        let c = pool.allocate([3; 32], 0).unwrap();
        assert_ne!(c.ipv4, a.ipv4);
        let a2 = pool.allocate([1; 32], 0).unwrap();
        assert_eq!(a2.ipv4, a.ipv4);
        assert_ne!(a2.id, a.id);
        assert_eq!(pool.leases_of(&[1; 32]), vec![a2.id]);
    }

    #[test]
    fn reclaim_restores_the_ticket_lease_only_when_free() {
        let mut pool = LeasePool::new(1);
        let a = pool.allocate([1; 32], 0).unwrap();
        let t = TicketLease::from(&a);
        assert_eq!(pool.reclaim([1; 32], &t, 5), Err(LeaseError::Unavailable));
        pool.release(a.id);
        let r = pool.reclaim([1; 32], &t, 5).unwrap();
        assert_eq!((r.id, r.ipv4, r.ipv6), (a.id, a.ipv4, a.ipv6));
        let mut bad = t;
        bad.ipv4.addr = Ipv4Addr::new(10, 0, 0, 2);
        pool.release(r.id);
        assert_eq!(pool.reclaim([1; 32], &bad, 5), Err(LeaseError::Unavailable));
    }
}
