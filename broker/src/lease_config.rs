//! The part of a live lease's configuration that follows the gateway's state at
//! runtime, so that a change reaches connected peers as a VSHP CONFIG_DELTA
//! (docs/resume.md, "Lease changes").
//!
//! Today that is the MTU: a lease never offers more than the MTU of the VPN interface
//! the gateway's traffic leaves through. The netstack re-originates the peer's UDP
//! (QUIC, DNS, games) as datagrams of the same size; one larger than the VPN's MTU would
//! be fragmented by the gateway's kernel or dropped on the way. The VPN's MTU changes at
//! runtime (OpenVPN pushing `tun-mtu`, a WireGuard reconfiguration, `ip link set mtu`),
//! so the broker re-reads it with the routing snapshot and tells the live peers.
//!
//! Only a datagram-transport lease (MTU [`crate::leases::LEASE_MTU`] or less) follows.
//! There the laptop's packets are already VPN-sized, and matching a smaller VPN costs a
//! few percent of throughput while sparing the egress fragmentation of full-size UDP.
//! A stream-transport lease's 64 KB MTU is the segment size of the leg the netstack
//! terminates (laptop ↔ netstack): the gateway's TCP sockets use the VPN's MSS whatever
//! it is, and following the VPN would cost that leg 45 times more packets per byte
//! (docs/performance.md). A laptop UDP datagram larger than the VPN's MTU is then
//! fragmented by the gateway's kernel, as any host's on a large-MTU LAN behind a VPN.
//!
//! The base MTU (what the lease pool chose for the peer, per transport) is never
//! exceeded, and the lease never goes below the IPv6 minimum link MTU. Routes, DNS and
//! addresses do not follow the egress: the lease keeps `::/0` through the tunnel even
//! when the VPN carries no IPv6, so the laptop's IPv6 never leaks around the VPN (the
//! netstack answers it with ICMPv6 "no route" at once).

use vshp::lease::{Lease, MIN_LEASE_MTU};

/// The MTU a lease whose pool-chosen MTU is `base` should have while the egress
/// interface's MTU is `egress_mtu` (`None`: unknown, or `--egress any`).
pub fn effective_mtu(base: u16, egress_mtu: Option<u32>) -> u16 {
    if base > crate::leases::LEASE_MTU {
        // A stream lease: see the module's documentation.
        return base;
    }
    match egress_mtu {
        Some(m) if m < u32::from(base) => u16::try_from(m).unwrap_or(base).max(MIN_LEASE_MTU),
        _ => base,
    }
}

/// `lease` as it should be configured now; `Some` only when that differs from it.
pub fn reconfigured(lease: &Lease, base_mtu: u16, egress_mtu: Option<u32>) -> Option<Lease> {
    let mtu = effective_mtu(base_mtu, egress_mtu);
    (mtu != lease.mtu).then(|| {
        let mut l = lease.clone();
        l.mtu = mtu;
        l
    })
}

/// The MTU of interface `name` (`/sys/class/net/NAME/mtu`), if it can be read.
pub fn link_mtu(name: &str) -> Option<u32> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return None;
    }
    std::fs::read_to_string(
        std::path::Path::new("/sys/class/net")
            .join(name)
            .join("mtu"),
    )
    .ok()?
    .trim()
    .parse()
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leases::LeasePool;

    #[test]
    fn the_lease_mtu_follows_a_smaller_vpn_mtu_within_its_bounds() {
        assert_eq!(effective_mtu(1400, None), 1400);
        assert_eq!(
            effective_mtu(1400, Some(1420)),
            1400,
            "never above the base"
        );
        assert_eq!(effective_mtu(1400, Some(1300)), 1300);
        assert_eq!(
            effective_mtu(1400, Some(576)),
            MIN_LEASE_MTU,
            "never below 1280"
        );
        assert_eq!(effective_mtu(1400, Some(u32::MAX)), 1400);
        let stream = crate::leases::LEASE_MTU_STREAM;
        assert_eq!(
            effective_mtu(stream, Some(1420)),
            stream,
            "a stream lease keeps its 64 KB segments behind any VPN"
        );
        let l = LeasePool::new(1).allocate([1; 32], 0).unwrap();
        assert_eq!(reconfigured(&l, l.mtu, Some(9000)), None);
        let smaller = reconfigured(&l, l.mtu, Some(1300)).unwrap();
        assert_eq!(smaller.mtu, 1300);
        assert_eq!(
            (
                smaller.id,
                smaller.ipv4,
                smaller.ipv6,
                &smaller.routes,
                &smaller.dns
            ),
            (l.id, l.ipv4, l.ipv6, &l.routes, &l.dns),
            "only the MTU changes"
        );
        // Back up again when the VPN's MTU grows.
        assert_eq!(reconfigured(&smaller, l.mtu, None).unwrap().mtu, l.mtu);
    }

    #[test]
    fn link_mtu_reads_sysfs_and_refuses_path_tricks() {
        assert_eq!(link_mtu("lo").map(|m| m > 0), Some(true));
        assert_eq!(link_mtu("../lo"), None);
        assert_eq!(link_mtu(""), None);
        assert_eq!(link_mtu("no-such-link-here"), None);
    }
}
