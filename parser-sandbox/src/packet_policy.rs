//! Which IP packets a peer may send (design §5.6): a pure function over the packet's
//! bytes, the peer's lease and the gateway's policy. No allocation, no panic, no I/O.
//!
//! A packet passes when, in this order:
//!
//! 1. it is a well-formed IPv4 or IPv6 header: IPv4 version 4, IHL ≥ 5, the header
//!    inside the buffer, total length equal to the buffer's length, **header checksum
//!    verified**; IPv6 version 6, payload length + 40 equal to the buffer's length (so
//!    no jumbograms);
//! 2. it is no longer than the lease's MTU;
//! 3. its source is the peer's leased address of that family (an IPv6 packet from a
//!    peer without an IPv6 lease is spoofed by definition);
//! 4. its destination is none of: unspecified (`0.0.0.0/8`, `::`), loopback
//!    (`127/8`, `::1`), link-local (`169.254/16`, `fe80::/10`), multicast (`224/4`,
//!    `ff00::/8`), broadcast or reserved (`255.255.255.255`, `240/4`, the lease
//!    subnet's directed broadcast), IPv4-mapped IPv6 (`::ffff:0:0/96`, which would
//!    reach IPv4 addresses past these checks) — always; and none of the policy's
//!    `denied_prefixes` (the gateway's own LAN subnets) unless `allow_lan`. A lease's
//!    DNS address is exempt from the LAN rule: the netstack answers DNS there.
//!
//! Return packets (netstack → peer) get [`check_return`]: well-formed, within the MTU,
//! addressed to the lease (defence in depth: the netstack is trusted, but a bug there
//! must not deliver another peer's packet).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use vshp::lease::Lease;

const IPV4_MIN_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;

/// An address prefix (`192.168.1.0/24`, `fd00::/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Prefix {
    V4(Ipv4Addr, u8),
    V6(Ipv6Addr, u8),
}

/// Why a prefix could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an address prefix (ADDR/LEN): {0:?}")]
pub struct PrefixParseError(pub String);

impl Prefix {
    /// Whether `addr` lies inside this prefix. Families never match each other.
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self, addr) {
            (Self::V4(net, len), IpAddr::V4(a)) => {
                let len = u32::from((*len).min(32));
                let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                u32::from(*net) & mask == u32::from(a) & mask
            }
            (Self::V6(net, len), IpAddr::V6(a)) => {
                let len = u32::from((*len).min(128));
                let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                u128::from(*net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Prefix {
    type Err = PrefixParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PrefixParseError(s.to_owned());
        let (addr, len) = s.split_once('/').ok_or_else(err)?;
        let len: u8 = len.parse().map_err(|_| err())?;
        match addr.parse::<IpAddr>().map_err(|_| err())? {
            IpAddr::V4(a) if len <= 32 => Ok(Self::V4(a, len)),
            IpAddr::V6(a) if len <= 128 => Ok(Self::V6(a, len)),
            _ => Err(err()),
        }
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::V4(a, l) => write!(f, "{a}/{l}"),
            Self::V6(a, l) => write!(f, "{a}/{l}"),
        }
    }
}

/// The gateway's destination policy, passed by the broker (on the worker's command line).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PacketPolicy {
    /// The gateway's own LAN subnets (and anything else the broker denies).
    pub denied_prefixes: Vec<Prefix>,
    /// Let peers reach `denied_prefixes` after all (the user shares the LAN on purpose).
    pub allow_lan: bool,
}

/// Why a packet was dropped. Every variant is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum PacketDrop {
    #[error("shorter than its IP header")]
    Truncated,
    #[error("IP version {0} is neither 4 nor 6")]
    BadVersion(u8),
    #[error("IPv4 header length field below 5 words")]
    BadHeaderLength,
    #[error("IP length field disagrees with the packet's size")]
    LengthMismatch,
    #[error("IPv4 header checksum is wrong")]
    BadChecksum,
    #[error("packet of {len} bytes exceeds the lease MTU {mtu}")]
    TooLong { len: usize, mtu: u16 },
    #[error("source address is not the peer's lease")]
    SpoofedSource,
    #[error("destination is not the peer's lease")]
    WrongDestination,
    #[error("destination is unspecified")]
    Unspecified,
    #[error("destination is loopback")]
    Loopback,
    #[error("destination is link-local")]
    LinkLocal,
    #[error("destination is multicast")]
    Multicast,
    #[error("destination is broadcast or reserved")]
    Broadcast,
    #[error("destination is an IPv4-mapped IPv6 address")]
    Ipv4Mapped,
    #[error("destination is in a denied prefix (gateway LAN)")]
    DeniedPrefix,
}

/// The broad class of a drop, for counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropClass {
    /// Not a well-formed IP packet.
    Malformed,
    /// Larger than the lease MTU.
    TooLong,
    /// Source is not the lease (anti-spoofing).
    Spoofed,
    /// Destination is not allowed.
    Forbidden,
}

impl PacketDrop {
    pub fn class(self) -> DropClass {
        match self {
            Self::Truncated
            | Self::BadVersion(_)
            | Self::BadHeaderLength
            | Self::LengthMismatch
            | Self::BadChecksum => DropClass::Malformed,
            Self::TooLong { .. } => DropClass::TooLong,
            Self::SpoofedSource => DropClass::Spoofed,
            Self::WrongDestination
            | Self::Unspecified
            | Self::Loopback
            | Self::LinkLocal
            | Self::Multicast
            | Self::Broadcast
            | Self::Ipv4Mapped
            | Self::DeniedPrefix => DropClass::Forbidden,
        }
    }
}

/// The addresses of a well-formed packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    pub src: IpAddr,
    pub dst: IpAddr,
}

/// Checks that `packet` is a well-formed IPv4 or IPv6 packet and returns its addresses.
pub fn parse_header(packet: &[u8]) -> Result<Addresses, PacketDrop> {
    let first = *packet.first().ok_or(PacketDrop::Truncated)?;
    match first >> 4 {
        4 => parse_v4(packet),
        6 => parse_v6(packet),
        v => Err(PacketDrop::BadVersion(v)),
    }
}

fn parse_v4(p: &[u8]) -> Result<Addresses, PacketDrop> {
    let h: &[u8; IPV4_MIN_HEADER] = p.first_chunk().ok_or(PacketDrop::Truncated)?;
    let ihl = usize::from(h[0] & 0x0f) * 4;
    if ihl < IPV4_MIN_HEADER {
        return Err(PacketDrop::BadHeaderLength);
    }
    let header = p.get(..ihl).ok_or(PacketDrop::Truncated)?;
    let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
    if total != p.len() || total < ihl {
        return Err(PacketDrop::LengthMismatch);
    }
    if ones_complement_sum(header) != 0xffff {
        return Err(PacketDrop::BadChecksum);
    }
    let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
    let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
    Ok(Addresses {
        src: IpAddr::V4(src),
        dst: IpAddr::V4(dst),
    })
}

fn parse_v6(p: &[u8]) -> Result<Addresses, PacketDrop> {
    let h: &[u8; IPV6_HEADER] = p.first_chunk().ok_or(PacketDrop::Truncated)?;
    let payload = usize::from(u16::from_be_bytes([h[4], h[5]]));
    if payload + IPV6_HEADER != p.len() {
        return Err(PacketDrop::LengthMismatch);
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&h[24..40]);
    Ok(Addresses {
        src: IpAddr::V6(Ipv6Addr::from(src)),
        dst: IpAddr::V6(Ipv6Addr::from(dst)),
    })
}

/// The folded 16-bit one's-complement sum (0xffff for a header with a valid checksum).
fn ones_complement_sum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The checksum to store in an IPv4 header whose checksum field is zero (tests and tools).
pub fn ipv4_header_checksum(header: &[u8]) -> u16 {
    !ones_complement_sum(header)
}

fn check_mtu(packet: &[u8], lease: &Lease) -> Result<(), PacketDrop> {
    if packet.len() > usize::from(lease.mtu) {
        return Err(PacketDrop::TooLong {
            len: packet.len(),
            mtu: lease.mtu,
        });
    }
    Ok(())
}

/// Checks a packet the peer sent (see the module docs for the rules and their order).
pub fn check_outbound(
    packet: &[u8],
    lease: &Lease,
    policy: &PacketPolicy,
) -> Result<Addresses, PacketDrop> {
    let a = parse_header(packet)?;
    check_mtu(packet, lease)?;
    let own = match a.src {
        IpAddr::V4(s) => s == lease.ipv4.addr,
        IpAddr::V6(s) => lease.ipv6.is_some_and(|p| p.addr == s),
    };
    if !own {
        return Err(PacketDrop::SpoofedSource);
    }
    check_destination(a.dst, lease)?;
    let is_dns = lease.dns.contains(&a.dst);
    if !policy.allow_lan && !is_dns && policy.denied_prefixes.iter().any(|p| p.contains(a.dst)) {
        return Err(PacketDrop::DeniedPrefix);
    }
    Ok(a)
}

/// The destination rules that hold whatever the policy says.
fn check_destination(dst: IpAddr, lease: &Lease) -> Result<(), PacketDrop> {
    match dst {
        IpAddr::V4(d) => {
            let o = d.octets();
            if o[0] == 0 {
                Err(PacketDrop::Unspecified)
            } else if d.is_loopback() {
                Err(PacketDrop::Loopback)
            } else if d.is_link_local() {
                Err(PacketDrop::LinkLocal)
            } else if d.is_multicast() {
                Err(PacketDrop::Multicast)
            } else if o[0] >= 240 || is_directed_broadcast(d, lease) {
                Err(PacketDrop::Broadcast)
            } else {
                Ok(())
            }
        }
        IpAddr::V6(d) => {
            if d.is_unspecified() {
                Err(PacketDrop::Unspecified)
            } else if d.is_loopback() {
                Err(PacketDrop::Loopback)
            } else if d.is_unicast_link_local() {
                Err(PacketDrop::LinkLocal)
            } else if d.is_multicast() {
                Err(PacketDrop::Multicast)
            } else if d.to_ipv4_mapped().is_some() {
                Err(PacketDrop::Ipv4Mapped)
            } else {
                Ok(())
            }
        }
    }
}

/// The broadcast address of the lease's own subnet (for prefixes shorter than /31).
fn is_directed_broadcast(d: Ipv4Addr, lease: &Lease) -> bool {
    let len = u32::from(lease.ipv4.len.min(32));
    if len >= 31 {
        return false;
    }
    let host_mask = u32::MAX >> len;
    let net = u32::from(lease.ipv4.addr) & !host_mask;
    u32::from(d) == net | host_mask
}

/// Checks a packet the netstack sends to the peer: well-formed, within the MTU,
/// addressed to the lease.
pub fn check_return(packet: &[u8], lease: &Lease) -> Result<Addresses, PacketDrop> {
    let a = parse_header(packet)?;
    check_mtu(packet, lease)?;
    let to_lease = match a.dst {
        IpAddr::V4(d) => d == lease.ipv4.addr,
        IpAddr::V6(d) => lease.ipv6.is_some_and(|p| p.addr == d),
    };
    if !to_lease {
        return Err(PacketDrop::WrongDestination);
    }
    Ok(a)
}

/// Builds IP packets for tests, fuzzing and examples.
pub mod build {
    use super::*;

    /// An IPv4/UDP-looking packet of `len` bytes (≥ 20) with a valid header checksum.
    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, len: usize) -> Vec<u8> {
        let len = len.clamp(IPV4_MIN_HEADER, usize::from(u16::MAX));
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        let c = ipv4_header_checksum(&p[..IPV4_MIN_HEADER]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        for (i, b) in p.iter_mut().enumerate().skip(IPV4_MIN_HEADER) {
            *b = i as u8;
        }
        p
    }

    /// An IPv6/UDP-looking packet of `len` bytes (≥ 40).
    pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, len: usize) -> Vec<u8> {
        let len = len.clamp(IPV6_HEADER, IPV6_HEADER + usize::from(u16::MAX));
        let mut p = vec![0u8; len];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((len - IPV6_HEADER) as u16).to_be_bytes());
        p[6] = 17;
        p[7] = 64;
        p[8..24].copy_from_slice(&src.octets());
        p[24..40].copy_from_slice(&dst.octets());
        p
    }
}

#[cfg(test)]
mod tests {
    use super::build::{ipv4, ipv6};
    use super::*;
    use vshp::lease::{Ipv4Prefix, Ipv6Prefix, LeaseId, Route};

    fn lease() -> Lease {
        Lease {
            id: LeaseId(1),
            ipv4: Ipv4Prefix {
                addr: Ipv4Addr::new(100, 64, 0, 2),
                len: 24,
            },
            ipv6: Some(Ipv6Prefix {
                addr: "fd56:5348::2".parse().unwrap(),
                len: 64,
            }),
            dns: vec![
                IpAddr::V4(Ipv4Addr::new(192, 168, 1, 53)),
                "fd56:5348::1".parse().unwrap(),
            ],
            mtu: 1400,
            routes: vec![Route::V4(Ipv4Prefix {
                addr: Ipv4Addr::UNSPECIFIED,
                len: 0,
            })],
            expires_at_unix: 2_000_000_000,
        }
    }

    fn policy() -> PacketPolicy {
        PacketPolicy {
            denied_prefixes: vec![
                "192.168.1.0/24".parse().unwrap(),
                "fd00:1234::/32".parse().unwrap(),
            ],
            allow_lan: false,
        }
    }

    const ME: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
    const WEB: Ipv4Addr = Ipv4Addr::new(93, 184, 216, 34);

    fn me6() -> Ipv6Addr {
        "fd56:5348::2".parse().unwrap()
    }

    fn web6() -> Ipv6Addr {
        "2001:db8::80".parse().unwrap()
    }

    fn out(p: &[u8]) -> Result<Addresses, PacketDrop> {
        check_outbound(p, &lease(), &policy())
    }

    #[test]
    fn valid_packets_pass() {
        let a = out(&ipv4(ME, WEB, 60)).unwrap();
        assert_eq!(a.dst, IpAddr::V4(WEB));
        let a = out(&ipv6(me6(), web6(), 80)).unwrap();
        assert_eq!(a.src, IpAddr::V6(me6()));
        // Exactly the MTU is fine.
        assert!(out(&ipv4(ME, WEB, 1400)).is_ok());
        // The gateway address inside the tunnel subnet is reachable (ping, DNS).
        assert!(out(&ipv4(ME, Ipv4Addr::new(100, 64, 0, 1), 28)).is_ok());
    }

    #[test]
    fn spoofed_sources_are_refused() {
        let other = Ipv4Addr::new(100, 64, 0, 3);
        assert_eq!(out(&ipv4(other, WEB, 60)), Err(PacketDrop::SpoofedSource));
        assert_eq!(
            out(&ipv4(Ipv4Addr::UNSPECIFIED, WEB, 60)),
            Err(PacketDrop::SpoofedSource)
        );
        let other6: Ipv6Addr = "fd56:5348::3".parse().unwrap();
        assert_eq!(
            out(&ipv6(other6, web6(), 60)),
            Err(PacketDrop::SpoofedSource)
        );
        // No IPv6 lease: every IPv6 source is spoofed.
        let mut l = lease();
        l.ipv6 = None;
        assert_eq!(
            check_outbound(&ipv6(me6(), web6(), 60), &l, &policy()),
            Err(PacketDrop::SpoofedSource)
        );
    }

    #[test]
    fn forbidden_ipv4_destinations_are_refused() {
        let cases = [
            (Ipv4Addr::new(127, 0, 0, 1), PacketDrop::Loopback),
            (Ipv4Addr::new(127, 8, 9, 10), PacketDrop::Loopback),
            (Ipv4Addr::new(0, 0, 0, 0), PacketDrop::Unspecified),
            (Ipv4Addr::new(0, 1, 2, 3), PacketDrop::Unspecified),
            (Ipv4Addr::new(169, 254, 169, 254), PacketDrop::LinkLocal),
            (Ipv4Addr::new(224, 0, 0, 251), PacketDrop::Multicast),
            (Ipv4Addr::new(239, 255, 255, 250), PacketDrop::Multicast),
            (Ipv4Addr::new(255, 255, 255, 255), PacketDrop::Broadcast),
            (Ipv4Addr::new(240, 0, 0, 1), PacketDrop::Broadcast),
            (Ipv4Addr::new(100, 64, 0, 255), PacketDrop::Broadcast),
            (Ipv4Addr::new(192, 168, 1, 1), PacketDrop::DeniedPrefix),
            (Ipv4Addr::new(192, 168, 1, 254), PacketDrop::DeniedPrefix),
        ];
        for (dst, why) in cases {
            assert_eq!(out(&ipv4(ME, dst, 40)), Err(why), "{dst}");
            assert_eq!(why.class(), DropClass::Forbidden);
        }
        // Next to the denied prefix is fine.
        assert!(out(&ipv4(ME, Ipv4Addr::new(192, 168, 2, 1), 40)).is_ok());
    }

    #[test]
    fn forbidden_ipv6_destinations_are_refused() {
        let cases = [
            ("::1", PacketDrop::Loopback),
            ("::", PacketDrop::Unspecified),
            ("fe80::1", PacketDrop::LinkLocal),
            ("febf::1", PacketDrop::LinkLocal),
            ("ff02::fb", PacketDrop::Multicast),
            ("ff05::1:3", PacketDrop::Multicast),
            ("::ffff:127.0.0.1", PacketDrop::Ipv4Mapped),
            ("fd00:1234::5", PacketDrop::DeniedPrefix),
        ];
        for (dst, why) in cases {
            let d: Ipv6Addr = dst.parse().unwrap();
            assert_eq!(out(&ipv6(me6(), d, 48)), Err(why), "{dst}");
        }
    }

    #[test]
    fn allow_lan_opens_denied_prefixes_only() {
        let mut p = policy();
        p.allow_lan = true;
        let l = lease();
        assert!(check_outbound(&ipv4(ME, Ipv4Addr::new(192, 168, 1, 1), 40), &l, &p).is_ok());
        assert_eq!(
            check_outbound(&ipv4(ME, Ipv4Addr::new(127, 0, 0, 1), 40), &l, &p),
            Err(PacketDrop::Loopback)
        );
        assert_eq!(
            check_outbound(&ipv4(ME, Ipv4Addr::new(169, 254, 1, 1), 40), &l, &p),
            Err(PacketDrop::LinkLocal)
        );
    }

    #[test]
    fn lease_dns_is_allowed_inside_a_denied_prefix() {
        assert!(out(&ipv4(ME, Ipv4Addr::new(192, 168, 1, 53), 60)).is_ok());
        assert_eq!(
            out(&ipv4(ME, Ipv4Addr::new(192, 168, 1, 54), 60)),
            Err(PacketDrop::DeniedPrefix)
        );
    }

    #[test]
    fn mtu_is_enforced() {
        assert_eq!(
            out(&ipv4(ME, WEB, 1401)),
            Err(PacketDrop::TooLong {
                len: 1401,
                mtu: 1400
            })
        );
        assert_eq!(
            out(&ipv6(me6(), web6(), 1500)).map_err(PacketDrop::class),
            Err(DropClass::TooLong)
        );
    }

    #[test]
    fn truncated_and_malformed_headers_are_refused() {
        assert_eq!(out(&[]), Err(PacketDrop::Truncated));
        let p = ipv4(ME, WEB, 60);
        for n in 1..IPV4_MIN_HEADER {
            assert_eq!(out(&p[..n]), Err(PacketDrop::Truncated), "{n}");
        }
        // Cut after the header: the total length no longer matches.
        assert_eq!(out(&p[..40]), Err(PacketDrop::LengthMismatch));
        let mut long = p.clone();
        long.push(0);
        assert_eq!(out(&long), Err(PacketDrop::LengthMismatch));
        let mut bad = p.clone();
        bad[0] = 0x44; // IHL 4
        assert_eq!(out(&bad), Err(PacketDrop::BadHeaderLength));
        let mut bad = p.clone();
        bad[0] = 0x4f; // IHL 15 = 60 bytes, exactly the packet: checksum then fails
        assert_eq!(out(&bad), Err(PacketDrop::BadChecksum));
        let mut bad = ipv4(ME, WEB, 20);
        bad[0] = 0x46; // IHL 6 = 24 bytes > 20-byte packet
        assert_eq!(out(&bad), Err(PacketDrop::Truncated));
        let mut bad = p.clone();
        bad[10] ^= 1;
        assert_eq!(out(&bad), Err(PacketDrop::BadChecksum));
        let mut bad = p;
        bad[0] = 0x55;
        assert_eq!(out(&bad), Err(PacketDrop::BadVersion(5)));
        // IPv6.
        let p = ipv6(me6(), web6(), 60);
        for n in 1..IPV6_HEADER {
            assert_eq!(out(&p[..n]), Err(PacketDrop::Truncated), "{n}");
        }
        assert_eq!(out(&p[..50]), Err(PacketDrop::LengthMismatch));
        let mut jumbo = p.clone();
        jumbo[4..6].fill(0);
        assert_eq!(out(&jumbo), Err(PacketDrop::LengthMismatch));
    }

    #[test]
    fn every_prefix_of_a_packet_is_refused_without_panic() {
        for p in [ipv4(ME, WEB, 100), ipv6(me6(), web6(), 100)] {
            for n in 0..p.len() {
                assert!(out(&p[..n]).is_err());
            }
        }
    }

    #[test]
    fn return_packets_must_be_addressed_to_the_lease() {
        let l = lease();
        assert!(check_return(&ipv4(WEB, ME, 60), &l).is_ok());
        assert!(check_return(&ipv6(web6(), me6(), 60), &l).is_ok());
        assert_eq!(
            check_return(&ipv4(WEB, Ipv4Addr::new(100, 64, 0, 3), 60), &l),
            Err(PacketDrop::WrongDestination)
        );
        assert_eq!(
            check_return(&ipv4(WEB, ME, 1500), &l).map_err(PacketDrop::class),
            Err(DropClass::TooLong)
        );
    }

    #[test]
    fn prefixes_parse_and_match() {
        let p: Prefix = "10.0.0.0/8".parse().unwrap();
        assert!(p.contains(IpAddr::V4(Ipv4Addr::new(10, 200, 1, 1))));
        assert!(!p.contains(IpAddr::V4(Ipv4Addr::new(11, 0, 0, 1))));
        assert!(!p.contains(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        let all: Prefix = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(IpAddr::V4(WEB)));
        let host: Prefix = "fd00::1/128".parse().unwrap();
        assert!(host.contains("fd00::1".parse().unwrap()));
        assert!(!host.contains("fd00::2".parse().unwrap()));
        assert_eq!(p.to_string(), "10.0.0.0/8");
        for bad in ["10.0.0.0", "10.0.0.0/33", "x/8", "::/129", "10.0.0.0/-1"] {
            assert!(bad.parse::<Prefix>().is_err(), "{bad}");
        }
    }
}
