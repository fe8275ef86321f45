//! The tunnel lease: what the gateway grants a peer (the owner's `TunnelLease`).
//!
//! The same type travels in VSHP CONFIG records (gateway → client, own wire encoding,
//! see `docs/protocol.md`) and in IPC messages between the gateway's processes
//! (postcard, via serde). Bounds are part of the type so every decoder can check them
//! before allocating.

use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Most DNS servers a lease may name.
pub const MAX_LEASE_DNS: usize = 4;
/// Most routes a lease may carry.
pub const MAX_LEASE_ROUTES: usize = 32;
/// Smallest MTU a lease may grant (IPv6's minimum link MTU).
pub const MIN_LEASE_MTU: u16 = 1280;
/// Largest MTU a lease may grant (the largest IP packet, kept below 64 KiB).
pub const MAX_LEASE_MTU: u16 = 65_000;

/// Identifies one lease inside one gateway; chosen by the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LeaseId(pub u64);

/// An IPv4 prefix: an address and its prefix length (0..=32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Ipv4Prefix {
    pub addr: Ipv4Addr,
    pub len: u8,
}

/// An IPv6 prefix: an address and its prefix length (0..=128).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Ipv6Prefix {
    pub addr: Ipv6Addr,
    pub len: u8,
}

/// A route the client should send through the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Route {
    V4(Ipv4Prefix),
    V6(Ipv6Prefix),
}

/// Everything a client needs to bring its virtual interface up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: LeaseId,
    /// The client's virtual IPv4 address and the tunnel subnet's prefix length.
    pub ipv4: Ipv4Prefix,
    /// The client's virtual IPv6 (ULA) address, when the gateway offers IPv6.
    pub ipv6: Option<Ipv6Prefix>,
    /// DNS servers to use, normally the gateway's in-tunnel forwarder (≤ `MAX_LEASE_DNS`).
    pub dns: Vec<IpAddr>,
    /// MTU of the client's virtual interface (`MIN_LEASE_MTU..=MAX_LEASE_MTU`).
    pub mtu: u16,
    /// Routes through the tunnel (≤ `MAX_LEASE_ROUTES`); `0.0.0.0/0` and `::/0` for full tunnel.
    pub routes: Vec<Route>,
    /// When the lease ends unless renewed, in seconds since the Unix epoch.
    pub expires_at_unix: u64,
}

/// Why a lease is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("lease names {0} DNS servers, at most {MAX_LEASE_DNS} are allowed")]
    TooManyDns(usize),
    #[error("lease carries {0} routes, at most {MAX_LEASE_ROUTES} are allowed")]
    TooManyRoutes(usize),
    #[error("lease MTU {0} is outside {MIN_LEASE_MTU}..={MAX_LEASE_MTU}")]
    BadMtu(u16),
    #[error("prefix length {0} is too long for its address family")]
    BadPrefixLen(u8),
}

impl Lease {
    /// Checks the bounds every decoder relies on.
    pub fn validate(&self) -> Result<(), LeaseError> {
        if self.dns.len() > MAX_LEASE_DNS {
            return Err(LeaseError::TooManyDns(self.dns.len()));
        }
        if self.routes.len() > MAX_LEASE_ROUTES {
            return Err(LeaseError::TooManyRoutes(self.routes.len()));
        }
        if !(MIN_LEASE_MTU..=MAX_LEASE_MTU).contains(&self.mtu) {
            return Err(LeaseError::BadMtu(self.mtu));
        }
        let v4_lens =
            std::iter::once(self.ipv4.len).chain(self.routes.iter().filter_map(|r| match r {
                Route::V4(p) => Some(p.len),
                Route::V6(_) => None,
            }));
        if let Some(len) = v4_lens.into_iter().find(|&l| l > 32) {
            return Err(LeaseError::BadPrefixLen(len));
        }
        let v6_lens = self
            .ipv6
            .iter()
            .map(|p| p.len)
            .chain(self.routes.iter().filter_map(|r| match r {
                Route::V6(p) => Some(p.len),
                Route::V4(_) => None,
            }));
        if let Some(len) = v6_lens.into_iter().find(|&l| l > 128) {
            return Err(LeaseError::BadPrefixLen(len));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease() -> Lease {
        Lease {
            id: LeaseId(7),
            ipv4: Ipv4Prefix {
                addr: Ipv4Addr::new(100, 64, 0, 2),
                len: 24,
            },
            ipv6: Some(Ipv6Prefix {
                addr: "fd00:5653::2".parse().unwrap(),
                len: 64,
            }),
            dns: vec![IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1))],
            mtu: 1400,
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
            expires_at_unix: 1_800_000_000,
        }
    }

    #[test]
    fn valid_lease_passes() {
        assert_eq!(lease().validate(), Ok(()));
    }

    #[test]
    fn bounds_are_enforced() {
        let mut l = lease();
        l.mtu = 100;
        assert_eq!(l.validate(), Err(LeaseError::BadMtu(100)));
        let mut l = lease();
        l.dns = vec![l.dns[0]; MAX_LEASE_DNS + 1];
        assert_eq!(l.validate(), Err(LeaseError::TooManyDns(MAX_LEASE_DNS + 1)));
        let mut l = lease();
        l.routes = vec![l.routes[0]; MAX_LEASE_ROUTES + 1];
        assert_eq!(
            l.validate(),
            Err(LeaseError::TooManyRoutes(MAX_LEASE_ROUTES + 1))
        );
        let mut l = lease();
        l.ipv4.len = 33;
        assert_eq!(l.validate(), Err(LeaseError::BadPrefixLen(33)));
        let mut l = lease();
        l.routes.push(Route::V6(Ipv6Prefix {
            addr: Ipv6Addr::UNSPECIFIED,
            len: 129,
        }));
        assert_eq!(l.validate(), Err(LeaseError::BadPrefixLen(129)));
    }
}
