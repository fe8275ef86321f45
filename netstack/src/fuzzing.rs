//! Fuzz entry points (the `netstack/fuzz` cargo-fuzz crate and the corpus replay
//! test call these).
//!
//! No fuzz input can make the netstack contact a real address: egress is switched
//! off, or every outbound socket is refused by the socket hook before it is used.
//! Every path up to the OS socket (parsing, caps, ICMP errors, DNS errors, smoltcp's
//! handling of stray segments) still runs.

use crate::{Config, Netstack, PacketBatch};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;
use vshp::lease::{Ipv4Prefix, Ipv6Prefix, Lease, LeaseId};

/// The lease fuzz inputs are pushed for.
pub fn fuzz_lease() -> Lease {
    Lease {
        id: LeaseId(1),
        ipv4: Ipv4Prefix {
            addr: Ipv4Addr::new(100, 64, 0, 2),
            len: 24,
        },
        ipv6: Some(Ipv6Prefix {
            addr: Ipv6Addr::new(0xfd00, 0x5653, 0, 0, 0, 0, 0, 2),
            len: 64,
        }),
        dns: vec![IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1))],
        mtu: 1400,
        routes: Vec::new(),
        expires_at_unix: u64::MAX,
    }
}

/// Splits fuzz input into packets: each is a 2-byte big-endian length then that many
/// bytes (a short tail is taken as it is).
pub fn split_packets(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([data[0], data[1]]));
        let rest = &data[2..];
        let take = len.min(rest.len());
        out.push(&rest[..take]);
        data = &rest[take..];
    }
    out
}

/// Feeds `data` (see [`split_packets`]) to a fresh netstack and drains its output.
///
/// The first byte picks how outbound sockets are refused: egress switched off (new
/// flows get ICMP unreachable before any socket exists), or egress on with a socket
/// hook that refuses every socket (the connect/send failure paths run).
pub fn push_packets(data: &[u8]) {
    let Ok(mut ns) = Netstack::new(Config::default()) else {
        return;
    };
    if data.first().is_some_and(|b| b & 1 == 1) {
        ns.set_socket_hook(Box::new(|_, _, _| {
            Err(std::io::Error::from_raw_os_error(libc::ENETUNREACH))
        }));
    } else {
        ns.set_egress_available(false);
    }
    let lease = fuzz_lease();
    if ns.add_lease(&lease).is_err() {
        return;
    }
    let packets = split_packets(data);
    ns.push_packets(lease.id, packets.iter().copied());
    ns.push_packets(LeaseId(99), packets.iter().copied());
    let _ = ns.poll(Instant::now());
    let mut batch = PacketBatch::new();
    while ns.drain_outbound(lease.id, &mut batch, 1 << 20) > 0 {}
    for p in batch.iter() {
        // Everything the netstack emits must itself parse as IP.
        debug_assert!(p.first().is_some_and(|b| b >> 4 == 4 || b >> 4 == 6));
    }
    ns.remove_lease(lease.id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_handles_short_input() {
        assert!(split_packets(&[]).is_empty());
        assert_eq!(split_packets(&[0, 3, 1, 2]), vec![&[1u8, 2][..]]);
        assert_eq!(split_packets(&[0, 1, 9, 0, 0]), vec![&[9u8][..], &[][..]]);
    }
}
