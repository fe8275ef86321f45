//! Resume tickets: the broker's sealed promise "this peer may have this lease back".
//!
//! After a transport interruption the client presents its ticket (RESUME message)
//! inside a fresh handshake; the broker opens it, checks it belongs to the peer that
//! just authenticated, and hands back the same lease so the client's TCP connections
//! survive. Tickets are opaque to clients and workers: only the broker holds the key.
//!
//! Layout (fixed [`TICKET_LEN`] = 100 bytes; integers big-endian):
//! ```text
//!  off len
//!  0    1  version = 1
//!  1   12  ticket id (random; also the AEAD nonce)
//!  13   8  expires_at, Unix seconds
//!  21  63  ChaCha20-Poly1305 ciphertext of:
//!            peer static public key 32 | lease id u64 | IPv4 addr 4 | IPv4 prefix len 1 |
//!            IPv6 present 1 (0/1) | IPv6 addr 16 | IPv6 prefix len 1  (zeros when absent)
//!  84  16  tag; associated data = bytes 0..21
//! ```
//! A ticket is single-use: the sealer remembers redeemed ids until their expiry, in a
//! set bounded by its capacity ([`DEFAULT_REDEEMED_CAPACITY`] entries, about 40 bytes
//! each). When the set is full of unexpired ids, opening fails closed
//! ([`TicketError::ReplayCacheFull`]): the client falls back to a full handshake and a
//! new lease instead of risking a replay.

use crate::lease::{Ipv4Prefix, Ipv6Prefix, Lease, LeaseId};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Ticket format version.
pub const TICKET_VERSION: u8 = 1;
/// Length of a ticket id (and of the AEAD nonce it doubles as).
pub const TICKET_ID_LEN: usize = 12;
const HEAD_LEN: usize = 1 + TICKET_ID_LEN + 8;
const BODY_LEN: usize = 32 + 8 + 4 + 1 + 1 + 16 + 1;
const TAG_LEN: usize = 16;
/// Every ticket is exactly this long.
pub const TICKET_LEN: usize = HEAD_LEN + BODY_LEN + TAG_LEN;
/// Longest lifetime a ticket may be sealed with (one day).
pub const MAX_TICKET_LIFETIME_SECS: u64 = 24 * 3600;
/// Default bound of the redeemed-id set.
pub const DEFAULT_REDEEMED_CAPACITY: usize = 4096;

/// A ticket's unique id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TicketId(pub [u8; TICKET_ID_LEN]);

impl TicketId {
    /// A fresh random id from the system RNG.
    pub fn random() -> Result<Self, TicketError> {
        let mut id = [0u8; TICKET_ID_LEN];
        SystemRandom::new()
            .fill(&mut id)
            .map_err(|_| TicketError::Rng)?;
        Ok(Self(id))
    }
}

/// The part of a lease a ticket binds: its id and addresses (what the client's open
/// connections depend on). DNS, MTU and routes come from the broker's current policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TicketLease {
    pub id: LeaseId,
    pub ipv4: Ipv4Prefix,
    pub ipv6: Option<Ipv6Prefix>,
}

impl From<&Lease> for TicketLease {
    fn from(l: &Lease) -> Self {
        Self {
            id: l.id,
            ipv4: l.ipv4,
            ipv6: l.ipv6,
        }
    }
}

/// What an opened ticket says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenedTicket {
    pub id: TicketId,
    pub peer_static: [u8; 32],
    pub lease: TicketLease,
    pub expires_at_unix: u64,
}

/// Why a ticket was not sealed or not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("ticket is malformed")]
    Malformed,
    #[error("ticket is forged or corrupted (tag did not verify)")]
    Forged,
    #[error("ticket expired at {expired_at} (now {now})")]
    Expired { expired_at: u64, now: u64 },
    #[error("ticket belongs to another peer")]
    WrongPeer,
    #[error("ticket was already redeemed")]
    Replayed,
    #[error("too many unexpired redeemed tickets to check replays")]
    ReplayCacheFull,
    #[error("ticket lifetime {0}s exceeds {MAX_TICKET_LIFETIME_SECS}s")]
    LifetimeTooLong(u64),
    #[error("ticket key setup failed")]
    Key,
    #[error("the system random number generator failed")]
    Rng,
}

/// Seals and opens tickets with a key only the broker holds. Sans-IO: time is passed in
/// as Unix seconds (tickets outlive processes, so it must be wall-clock time).
pub struct TicketSealer {
    key: LessSafeKey,
    redeemed: HashMap<TicketId, u64>,
    capacity: usize,
}

impl fmt::Debug for TicketSealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TicketSealer")
            .field("redeemed", &self.redeemed.len())
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl TicketSealer {
    /// A sealer with the default redeemed-set bound.
    pub fn new(key: [u8; 32]) -> Result<Self, TicketError> {
        Self::with_capacity(key, DEFAULT_REDEEMED_CAPACITY)
    }

    /// A sealer remembering at most `capacity` redeemed ids.
    pub fn with_capacity(key: [u8; 32], capacity: usize) -> Result<Self, TicketError> {
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &key).map_err(|_| TicketError::Key)?;
        Ok(Self {
            key: LessSafeKey::new(unbound),
            redeemed: HashMap::new(),
            capacity,
        })
    }

    /// Number of redeemed ids currently remembered.
    pub fn redeemed_len(&self) -> usize {
        self.redeemed.len()
    }

    /// Seals a ticket for `peer_static` and `lease`, valid for `lifetime_secs` from
    /// `now_unix`. `id` must be unique per key: use [`TicketId::random`].
    pub fn seal(
        &self,
        id: TicketId,
        peer_static: &[u8; 32],
        lease: &TicketLease,
        now_unix: u64,
        lifetime_secs: u64,
    ) -> Result<[u8; TICKET_LEN], TicketError> {
        if lifetime_secs > MAX_TICKET_LIFETIME_SECS {
            return Err(TicketError::LifetimeTooLong(lifetime_secs));
        }
        let expires = now_unix.saturating_add(lifetime_secs);
        let mut t = [0u8; TICKET_LEN];
        t[0] = TICKET_VERSION;
        t[1..13].copy_from_slice(&id.0);
        t[13..21].copy_from_slice(&expires.to_be_bytes());
        let body = &mut t[HEAD_LEN..HEAD_LEN + BODY_LEN];
        body[0..32].copy_from_slice(peer_static);
        body[32..40].copy_from_slice(&lease.id.0.to_be_bytes());
        body[40..44].copy_from_slice(&lease.ipv4.addr.octets());
        body[44] = lease.ipv4.len;
        if let Some(v6) = lease.ipv6 {
            body[45] = 1;
            body[46..62].copy_from_slice(&v6.addr.octets());
            body[62] = v6.len;
        }
        let mut aad = [0u8; HEAD_LEN];
        aad.copy_from_slice(&t[..HEAD_LEN]);
        let (_, rest) = t.split_at_mut(HEAD_LEN);
        let (body, tag_out) = rest.split_at_mut(BODY_LEN);
        let tag = self
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(id.0), Aad::from(aad), body)
            .map_err(|_| TicketError::Key)?;
        tag_out.copy_from_slice(tag.as_ref());
        Ok(t)
    }

    /// Opens a ticket presented by the peer whose static key the handshake just
    /// authenticated, and marks it redeemed. Checks, in order: shape, tag, expiry,
    /// peer, replay. A refused ticket is not marked redeemed.
    pub fn open(
        &mut self,
        ticket: &[u8],
        peer_static: &[u8; 32],
        now_unix: u64,
    ) -> Result<OpenedTicket, TicketError> {
        let t: &[u8; TICKET_LEN] = ticket.try_into().map_err(|_| TicketError::Malformed)?;
        if t[0] != TICKET_VERSION {
            return Err(TicketError::Malformed);
        }
        let mut id = [0u8; TICKET_ID_LEN];
        id.copy_from_slice(&t[1..13]);
        let mut exp = [0u8; 8];
        exp.copy_from_slice(&t[13..21]);
        let expires_at_unix = u64::from_be_bytes(exp);
        let mut aad = [0u8; HEAD_LEN];
        aad.copy_from_slice(&t[..HEAD_LEN]);
        let mut sealed = [0u8; BODY_LEN + TAG_LEN];
        sealed.copy_from_slice(&t[HEAD_LEN..]);
        let body = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(id),
                Aad::from(aad),
                &mut sealed,
            )
            .map_err(|_| TicketError::Forged)?;
        if now_unix >= expires_at_unix {
            return Err(TicketError::Expired {
                expired_at: expires_at_unix,
                now: now_unix,
            });
        }
        let opened = decode_body(TicketId(id), expires_at_unix, body)?;
        // Constant time is not needed: the key is public, the ticket authentic.
        if &opened.peer_static != peer_static {
            return Err(TicketError::WrongPeer);
        }
        if self.redeemed.contains_key(&opened.id) {
            return Err(TicketError::Replayed);
        }
        if self.redeemed.len() >= self.capacity {
            self.purge_expired(now_unix);
            if self.redeemed.len() >= self.capacity {
                return Err(TicketError::ReplayCacheFull);
            }
        }
        self.redeemed.insert(opened.id, expires_at_unix);
        Ok(opened)
    }

    /// Forgets redeemed ids whose tickets have expired (they can no longer be replayed).
    pub fn purge_expired(&mut self, now_unix: u64) {
        self.redeemed.retain(|_, exp| *exp > now_unix);
    }
}

fn decode_body(id: TicketId, expires_at_unix: u64, b: &[u8]) -> Result<OpenedTicket, TicketError> {
    let b: &[u8; BODY_LEN] = b.try_into().map_err(|_| TicketError::Malformed)?;
    let mut peer_static = [0u8; 32];
    peer_static.copy_from_slice(&b[0..32]);
    let mut lid = [0u8; 8];
    lid.copy_from_slice(&b[32..40]);
    let mut v4 = [0u8; 4];
    v4.copy_from_slice(&b[40..44]);
    let v4_len = b[44];
    let mut v6 = [0u8; 16];
    v6.copy_from_slice(&b[46..62]);
    let v6_len = b[62];
    if v4_len > 32 {
        return Err(TicketError::Malformed);
    }
    let ipv6 = match b[45] {
        0 if v6 == [0u8; 16] && v6_len == 0 => None,
        1 if v6_len <= 128 => Some(Ipv6Prefix {
            addr: Ipv6Addr::from(v6),
            len: v6_len,
        }),
        _ => return Err(TicketError::Malformed),
    };
    Ok(OpenedTicket {
        id,
        peer_static,
        lease: TicketLease {
            id: LeaseId(u64::from_be_bytes(lid)),
            ipv4: Ipv4Prefix {
                addr: Ipv4Addr::from(v4),
                len: v4_len,
            },
            ipv6,
        },
        expires_at_unix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;
    const PEER: [u8; 32] = [0xAB; 32];

    fn lease() -> TicketLease {
        TicketLease {
            id: LeaseId(42),
            ipv4: Ipv4Prefix {
                addr: Ipv4Addr::new(100, 64, 0, 2),
                len: 24,
            },
            ipv6: Some(Ipv6Prefix {
                addr: "fd00:5653::2".parse().unwrap(),
                len: 64,
            }),
        }
    }

    fn sealer() -> TicketSealer {
        TicketSealer::new([7u8; 32]).unwrap()
    }

    #[test]
    fn round_trip_binds_everything() {
        let mut s = sealer();
        let id = TicketId::random().unwrap();
        let t = s.seal(id, &PEER, &lease(), NOW, 3600).unwrap();
        assert_eq!(t.len(), TICKET_LEN);
        assert_eq!(TICKET_LEN, 100);
        let o = s.open(&t, &PEER, NOW + 10).unwrap();
        assert_eq!(o.lease, lease());
        assert_eq!(o.peer_static, PEER);
        assert_eq!(o.id, id);
        assert_eq!(o.expires_at_unix, NOW + 3600);
        // IPv4-only leases too.
        let l4 = TicketLease {
            ipv6: None,
            ..lease()
        };
        let t = s.seal(TicketId([1; 12]), &PEER, &l4, NOW, 60).unwrap();
        assert_eq!(s.open(&t, &PEER, NOW).unwrap().lease, l4);
    }

    #[test]
    fn forged_tickets_are_refused() {
        let mut s = sealer();
        let t = s
            .seal(TicketId([2; 12]), &PEER, &lease(), NOW, 3600)
            .unwrap();
        for i in 1..TICKET_LEN {
            let mut bad = t;
            bad[i] ^= 0x01;
            assert_eq!(
                s.open(&bad, &PEER, NOW),
                Err(TicketError::Forged),
                "byte {i}"
            );
        }
        let other = TicketSealer::new([8u8; 32]).unwrap();
        let t2 = other
            .seal(TicketId([3; 12]), &PEER, &lease(), NOW, 3600)
            .unwrap();
        assert_eq!(s.open(&t2, &PEER, NOW), Err(TicketError::Forged));
        assert_eq!(s.redeemed_len(), 0);
    }

    #[test]
    fn malformed_expired_wrong_peer_replayed() {
        let mut s = sealer();
        let t = s
            .seal(TicketId([4; 12]), &PEER, &lease(), NOW, 100)
            .unwrap();
        assert_eq!(s.open(&t[..99], &PEER, NOW), Err(TicketError::Malformed));
        assert_eq!(s.open(&[], &PEER, NOW), Err(TicketError::Malformed));
        let mut v = t;
        v[0] = 2;
        assert_eq!(s.open(&v, &PEER, NOW), Err(TicketError::Malformed));
        assert_eq!(
            s.open(&t, &PEER, NOW + 100),
            Err(TicketError::Expired {
                expired_at: NOW + 100,
                now: NOW + 100
            })
        );
        assert_eq!(s.open(&t, &[0xCD; 32], NOW), Err(TicketError::WrongPeer));
        assert!(s.open(&t, &PEER, NOW).is_ok());
        assert_eq!(s.open(&t, &PEER, NOW + 1), Err(TicketError::Replayed));
        assert_eq!(
            s.seal(
                TicketId([5; 12]),
                &PEER,
                &lease(),
                NOW,
                MAX_TICKET_LIFETIME_SECS + 1
            ),
            Err(TicketError::LifetimeTooLong(MAX_TICKET_LIFETIME_SECS + 1))
        );
    }

    #[test]
    fn redeemed_set_is_bounded_and_purged() {
        let mut s = TicketSealer::with_capacity([9u8; 32], 2).unwrap();
        let t = |i: u8, life: u64| {
            TicketSealer::with_capacity([9u8; 32], 0)
                .unwrap()
                .seal(TicketId([i; 12]), &PEER, &lease(), NOW, life)
                .unwrap()
        };
        s.open(&t(1, 10), &PEER, NOW).unwrap();
        s.open(&t(2, 1000), &PEER, NOW).unwrap();
        assert_eq!(
            s.open(&t(3, 1000), &PEER, NOW),
            Err(TicketError::ReplayCacheFull)
        );
        // Once ticket 1 expired its slot is free again.
        s.open(&t(3, 1000), &PEER, NOW + 20).unwrap();
        assert_eq!(s.redeemed_len(), 2);
        assert_eq!(
            s.open(&t(2, 1000), &PEER, NOW + 20),
            Err(TicketError::Replayed)
        );
    }
}
