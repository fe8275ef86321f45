//! VPN detection for the default egress policy (`--egress vpn`).
//!
//! An interface is a VPN when it is a tunnel: it has `tun_flags` in sysfs (tun/tap,
//! OpenVPN, most userspace VPNs) or its link type is `ARPHRD_NONE` (65534: WireGuard,
//! tun) or `ARPHRD_PPP` (512: PPP, L2TP, PPTP). Sharing is available when the routes to
//! the Internet go through such an interface: the longest-prefix match for a probe
//! address in each half of the IPv4 space (so both a plain default route and
//! OpenVPN's `0.0.0.0/1` + `128.0.0.0/1` pair count) must be a VPN interface.
//!
//! The snapshot comes from `/proc/net/route` (the main routing table) and
//! `/sys/class/net`; the broker re-reads it every second. Routes in other tables
//! (policy routing) are not seen. Detection itself ([`detect_vpn`]) is pure.

use std::net::Ipv4Addr;
use std::path::Path;

pub const ARPHRD_NONE: u16 = 65534;
pub const ARPHRD_PPP: u16 = 512;

/// One IPv4 route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route4 {
    pub iface: String,
    pub dest: Ipv4Addr,
    pub prefix_len: u8,
    pub metric: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub ifindex: u32,
    pub arphrd: u16,
    pub has_tun_flags: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteSnapshot {
    pub routes: Vec<Route4>,
    pub links: Vec<Link>,
}

/// The VPN interface carrying the routes to the Internet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpnIface {
    pub name: String,
    pub ifindex: u32,
}

/// Whether the link is a tunnel (the VPN kinds this module recognises).
pub fn is_vpn_link(l: &Link) -> bool {
    l.has_tun_flags || l.arphrd == ARPHRD_NONE || l.arphrd == ARPHRD_PPP
}

fn lookup(routes: &[Route4], dst: Ipv4Addr) -> Option<&Route4> {
    let d = u32::from(dst);
    routes
        .iter()
        .filter(|r| {
            let mask = if r.prefix_len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(r.prefix_len.min(32)))
            };
            d & mask == u32::from(r.dest) & mask
        })
        .max_by(|a, b| {
            a.prefix_len
                .cmp(&b.prefix_len)
                .then(b.metric.cmp(&a.metric))
        })
}

/// The VPN interface that carries the Internet routes, if there is one.
pub fn detect_vpn(s: &RouteSnapshot) -> Option<VpnIface> {
    let probes = [Ipv4Addr::new(1, 0, 0, 1), Ipv4Addr::new(129, 0, 0, 1)];
    let mut found: Option<&Link> = None;
    for p in probes {
        let route = lookup(&s.routes, p)?;
        let link = s.links.iter().find(|l| l.name == route.iface)?;
        if !is_vpn_link(link) {
            return None;
        }
        found.get_or_insert(link);
    }
    found.map(|l| VpnIface {
        name: l.name.clone(),
        ifindex: l.ifindex,
    })
}

/// Parses `/proc/net/route`. Lines that do not parse, and routes not up, are skipped.
pub fn parse_proc_route(text: &str) -> Vec<Route4> {
    const RTF_UP: u32 = 0x1;
    let addr = |s: &str| {
        u32::from_str_radix(s, 16)
            .ok()
            .map(|v| Ipv4Addr::from(v.to_ne_bytes()))
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (iface, dest, flags, metric, mask) =
                (f.first()?, f.get(1)?, f.get(3)?, f.get(6)?, f.get(7)?);
            let flags = u32::from_str_radix(flags, 16).ok()?;
            if flags & RTF_UP == 0 {
                return None;
            }
            let mask = addr(mask)?;
            let ones = u32::from(mask).leading_ones();
            Some(Route4 {
                iface: (*iface).to_owned(),
                dest: addr(dest)?,
                prefix_len: u8::try_from(ones).ok()?,
                metric: metric.parse().ok()?,
            })
        })
        .collect()
}

/// Reads the current snapshot from `/proc/net/route` and `/sys/class/net`.
pub fn read_snapshot() -> std::io::Result<RouteSnapshot> {
    let routes = parse_proc_route(&std::fs::read_to_string("/proc/net/route")?);
    let mut links = Vec::new();
    let net = Path::new("/sys/class/net");
    for entry in std::fs::read_dir(net)?.flatten() {
        let dir = entry.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
        let (Some(ifindex), Some(ty)) = (read("ifindex"), read("type")) else {
            continue;
        };
        let (Ok(ifindex), Ok(arphrd)) = (ifindex.trim().parse(), ty.trim().parse()) else {
            continue;
        };
        links.push(Link {
            name: entry.file_name().to_string_lossy().into_owned(),
            ifindex,
            arphrd,
            has_tun_flags: dir.join("tun_flags").exists(),
        });
    }
    Ok(RouteSnapshot { routes, links })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str, ifindex: u32, arphrd: u16, tun: bool) -> Link {
        Link {
            name: name.into(),
            ifindex,
            arphrd,
            has_tun_flags: tun,
        }
    }

    fn route(iface: &str, dest: [u8; 4], len: u8, metric: u32) -> Route4 {
        Route4 {
            iface: iface.into(),
            dest: dest.into(),
            prefix_len: len,
            metric,
        }
    }

    fn links() -> Vec<Link> {
        vec![
            link("lo", 1, 772, false),
            link("eth0", 2, 1, false),
            link("wg0", 3, ARPHRD_NONE, false),
            link("tun0", 4, ARPHRD_NONE, true),
            link("ppp0", 5, ARPHRD_PPP, false),
        ]
    }

    #[test]
    fn default_route_through_wireguard_is_a_vpn() {
        let s = RouteSnapshot {
            routes: vec![
                route("wg0", [0; 4], 0, 0),
                route("eth0", [192, 168, 1, 0], 24, 0),
            ],
            links: links(),
        };
        assert_eq!(
            detect_vpn(&s),
            Some(VpnIface {
                name: "wg0".into(),
                ifindex: 3
            })
        );
    }

    #[test]
    fn default_route_through_ethernet_is_not() {
        let s = RouteSnapshot {
            routes: vec![
                route("eth0", [0; 4], 0, 100),
                route("wg0", [10, 66, 0, 0], 24, 0),
            ],
            links: links(),
        };
        assert_eq!(detect_vpn(&s), None);
        assert_eq!(
            detect_vpn(&RouteSnapshot {
                routes: vec![],
                links: links()
            }),
            None
        );
    }

    #[test]
    fn openvpn_split_default_and_metrics() {
        // OpenVPN: two /1 routes via tun0 override the default via eth0.
        let s = RouteSnapshot {
            routes: vec![
                route("eth0", [0; 4], 0, 100),
                route("tun0", [0; 4], 1, 0),
                route("tun0", [128, 0, 0, 0], 1, 0),
            ],
            links: links(),
        };
        assert_eq!(detect_vpn(&s).map(|v| v.ifindex), Some(4));
        // Only one half through the VPN: traffic to the other half would leak.
        let half = RouteSnapshot {
            routes: vec![route("eth0", [0; 4], 0, 100), route("tun0", [0; 4], 1, 0)],
            links: links(),
        };
        assert_eq!(detect_vpn(&half), None);
        // Two defaults: the lower metric wins.
        let two = RouteSnapshot {
            routes: vec![route("eth0", [0; 4], 0, 600), route("ppp0", [0; 4], 0, 50)],
            links: links(),
        };
        assert_eq!(detect_vpn(&two).map(|v| v.name), Some("ppp0".into()));
    }

    #[test]
    fn parses_proc_net_route() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
wg0\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t0000A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n\
eth1\t0000000A\t00000000\t0000\t0\t0\t0\t000000FF\t0\t0\t0\n";
        let r = parse_proc_route(text);
        assert_eq!(
            r,
            vec![
                route("wg0", [0; 4], 0, 0),
                route("eth0", [192, 168, 0, 0], 24, 100)
            ]
        );
    }

    #[test]
    fn reads_this_machines_snapshot() {
        let s = read_snapshot().unwrap();
        assert!(s.links.iter().any(|l| l.name == "lo"));
    }
}
