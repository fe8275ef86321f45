//! The gateway's own networks, which peers may not reach (design §5.6: no gateway LAN
//! unless the policy allows it). The broker passes them to each worker as `--deny`.
//!
//! Every subnet of an interface address counts, except loopback (the worker refuses it
//! anyway), IPv6 link-local (likewise) and VPN interfaces (the VPN's own subnet holds
//! its DNS servers and is reached through the VPN, which is the point of sharing it).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// At most this many prefixes are passed to a worker.
pub const MAX_DENY: usize = 32;

/// The network of `addr` under `mask`, as "network/len". `None` for a mask that is not
/// a prefix.
pub fn prefix_of(addr: IpAddr, mask: IpAddr) -> Option<(IpAddr, u8)> {
    match (addr, mask) {
        (IpAddr::V4(a), IpAddr::V4(m)) => {
            let m = u32::from(m);
            let len = m.leading_ones();
            (m.count_ones() == len).then(|| {
                (
                    IpAddr::V4(Ipv4Addr::from(u32::from(a) & m)),
                    u8::try_from(len).unwrap_or(32),
                )
            })
        }
        (IpAddr::V6(a), IpAddr::V6(m)) => {
            let m = u128::from(m);
            let len = m.leading_ones();
            (m.count_ones() == len).then(|| {
                (
                    IpAddr::V6(Ipv6Addr::from(u128::from(a) & m)),
                    u8::try_from(len).unwrap_or(128),
                )
            })
        }
        _ => None,
    }
}

/// One address of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    pub iface: String,
    pub addr: IpAddr,
    pub mask: IpAddr,
    pub loopback: bool,
}

/// The `--deny` prefixes for `addrs`, skipping the interfaces named in `vpn_ifaces`.
pub fn deny_prefixes(addrs: &[IfAddr], vpn_ifaces: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for a in addrs {
        if a.loopback || vpn_ifaces.contains(&a.iface) {
            continue;
        }
        if let IpAddr::V6(v6) = a.addr {
            if v6.segments()[0] & 0xffc0 == 0xfe80 {
                continue;
            }
        }
        let Some((net, len)) = prefix_of(a.addr, a.mask) else {
            continue;
        };
        if len == 0 {
            continue;
        }
        let p = format!("{net}/{len}");
        if !out.contains(&p) && out.len() < MAX_DENY {
            out.push(p);
        }
    }
    out
}

/// This machine's interface addresses (`getifaddrs`).
pub fn read_ifaddrs() -> Vec<IfAddr> {
    let Ok(list) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    list.filter_map(|i| {
        let ip = |s: &nix::sys::socket::SockaddrStorage| -> Option<IpAddr> {
            if let Some(v4) = s.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        };
        Some(IfAddr {
            addr: ip(i.address.as_ref()?)?,
            mask: ip(i.netmask.as_ref()?)?,
            loopback: i
                .flags
                .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK),
            iface: i.interface_name,
        })
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(iface: &str, addr: &str, mask: &str) -> IfAddr {
        IfAddr {
            iface: iface.into(),
            addr: addr.parse().unwrap(),
            mask: mask.parse().unwrap(),
            loopback: iface == "lo",
        }
    }

    #[test]
    fn lan_subnets_are_denied_vpn_loopback_and_link_local_are_not() {
        let addrs = [
            a("lo", "127.0.0.1", "255.0.0.0"),
            a("lan0", "192.168.50.1", "255.255.255.0"),
            a("lan0", "fd00:50::1", "ffff:ffff:ffff:ffff::"),
            a("lan0", "fe80::1", "ffff:ffff:ffff:ffff::"),
            a("wan0", "10.10.0.1", "255.255.255.252"),
            a("wg0", "10.66.0.2", "255.255.255.255"),
            a("lan1", "192.168.50.7", "255.255.255.0"),
        ];
        assert_eq!(
            deny_prefixes(&addrs, &["wg0".to_owned()]),
            ["192.168.50.0/24", "fd00:50::/64", "10.10.0.0/30"]
        );
    }

    #[test]
    fn prefix_of_rejects_non_contiguous_masks() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            prefix_of(ip("10.1.2.3"), ip("255.255.0.0")),
            Some((ip("10.1.0.0"), 16))
        );
        assert_eq!(prefix_of(ip("10.1.2.3"), ip("255.0.255.0")), None);
        assert_eq!(prefix_of(ip("10.1.2.3"), ip("ffff::")), None);
    }

    #[test]
    fn reads_this_machines_addresses() {
        assert!(read_ifaddrs().iter().any(|a| a.loopback));
    }
}
