//! Configuration: egress, DNS upstreams, per-peer caps and timeouts.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

/// Where forwarded traffic may leave the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Egress {
    /// `--egress any`: let the OS routing table decide.
    Any,
    /// `--egress vpn`: outbound sockets must leave only through this interface.
    ///
    /// Each socket is first bound to the device with `SO_BINDTODEVICE` (allowed
    /// unprivileged on Linux ≥ 5.7 for a socket not yet bound to a device). If the
    /// kernel refuses, the socket is bound to the interface's source address of the
    /// right family taken from `addrs`; a family without an address cannot egress.
    Interface {
        /// Interface name, for example `tun0`.
        name: String,
        /// The interface's own addresses (fallback source binding).
        addrs: Vec<IpAddr>,
    },
    /// `--egress vpn` as the broker reports it (`EgressState::VpnUp { ifindex }`):
    /// outbound sockets are bound to the interface with this index
    /// (`SO_BINDTOIFINDEX`, unprivileged on Linux ≥ 5.7 like `SO_BINDTODEVICE`).
    /// The confined netstack cannot map an index to a name or addresses (no netlink,
    /// no interface ioctls), so there is no source-address fallback: a kernel that
    /// refuses the binding refuses the flow (fails closed).
    InterfaceIndex(u32),
}

/// Default [`Caps::max_tcp_flows`]: a browser, sync clients and a few downloads hold
/// hundreds to a few thousand connections; 16,384 leaves room for a busy peer (and
/// for the 10,000-flow benchmark) while one peer still cannot take every descriptor.
pub const DEFAULT_TCP_FLOWS_PER_LEASE: usize = 16_384;
/// Default [`Caps::max_total_flows`] (the netstack's RLIMIT_NOFILE is 65,536).
pub const DEFAULT_TOTAL_FLOWS: usize = 64_000;

/// Per-peer (per-lease) resource caps. One peer cannot exceed these whatever it sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caps {
    /// Open TCP flows (connecting or established) per lease.
    pub max_tcp_flows: usize,
    /// TCP flows still waiting for the OS connect per lease.
    pub max_pending_connects: usize,
    /// UDP mappings (one OS socket per client address:port) per lease.
    pub max_udp_mappings: usize,
    /// ICMP echo mappings (one ping socket per client echo identifier) per lease.
    pub max_ping_mappings: usize,
    /// DNS queries forwarded upstream and not yet answered, per lease.
    pub max_dns_pending: usize,
    /// Bytes of smoltcp TCP socket buffers per lease (their current sizes: buffers
    /// start small and grow with demand). A new flow that does not fit is reset; a
    /// flow whose growth would not fit keeps its size.
    pub max_buffer_bytes: usize,
    /// Bytes of packets queued from the client and not yet processed, per lease.
    pub max_inbound_queue_bytes: usize,
    /// Bytes of packets queued for the client and not yet drained, per lease.
    pub max_outbound_queue_bytes: usize,
    /// All flows of all leases together (bounds file descriptors: each flow holds
    /// one). The process lowers it to what its RLIMIT_NOFILE leaves room for.
    pub max_total_flows: usize,
    /// Entries in the shared DNS cache.
    pub max_dns_cache_entries: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Self {
            max_tcp_flows: DEFAULT_TCP_FLOWS_PER_LEASE,
            max_pending_connects: 256,
            max_udp_mappings: 1024,
            max_ping_mappings: 16,
            max_dns_pending: 64,
            max_buffer_bytes: 192 * 1024 * 1024,
            max_inbound_queue_bytes: 4 * 1024 * 1024,
            max_outbound_queue_bytes: 4 * 1024 * 1024,
            max_total_flows: DEFAULT_TOTAL_FLOWS,
            max_dns_cache_entries: 4096,
        }
    }
}

/// Timeouts (RFC 5382 / RFC 4787 minimums where they exist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// How long an OS connect may take before the client gets ICMP unreachable.
    pub tcp_connect: Duration,
    /// An established TCP flow with no traffic in either direction is aborted after this.
    pub tcp_idle: Duration,
    /// A UDP mapping with no traffic is closed after this (≥ 2 min).
    pub udp_idle: Duration,
    /// An ICMP echo mapping with no traffic is closed after this.
    pub ping_idle: Duration,
    /// A DNS query forwarded upstream is forgotten after this.
    pub dns_query: Duration,
    /// Upper bound on how long a DNS answer is cached, whatever its TTL says.
    pub dns_max_ttl: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_connect: Duration::from_secs(10),
            tcp_idle: Duration::from_secs(2 * 3600 + 4 * 60),
            udp_idle: Duration::from_secs(300),
            ping_idle: Duration::from_secs(30),
            dns_query: Duration::from_secs(5),
            dns_max_ttl: Duration::from_secs(3600),
        }
    }
}

/// Everything `Netstack::new` needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// DNS servers the forwarder asks (read once at start-up, before confinement).
    pub dns_upstreams: Vec<SocketAddr>,
    /// Which interface/addresses outbound sockets may use.
    pub egress: Egress,
    /// Per-peer caps.
    pub caps: Caps,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Largest size each smoltcp TCP socket buffer (receive and send alike) may grow
    /// to; also sets the window scale offered. Sized for the bandwidth-delay product
    /// of the client's path (256 KiB: 2 Gbit/s at 1 ms), and no larger: smoltcp has
    /// no SACK and retransmits go-back-N, so on a lossy path (the UDP transport) a
    /// 1 MiB window collapsed the flow (netstack/benches/flows.rs `--loss 100`:
    /// 16 MiB took 10 s at 1 MiB, 0.03 s at 256 KiB).
    pub tcp_buffer_size: usize,
    /// Size each TCP socket buffer starts with. Buffers double while the flow's
    /// throughput is limited by them, and go back to this size after
    /// [`tcp_buffer_shrink_after`](Self::tcp_buffer_shrink_after) without traffic, so
    /// an idle flow costs a few KiB.
    pub tcp_buffer_initial: usize,
    /// How long an established flow whose buffers grew must carry no traffic before
    /// they go back to `tcp_buffer_initial` (checked once a second, only when nothing
    /// waits in them).
    pub tcp_buffer_shrink_after: Duration,
    /// Lower bound of the retransmission timeout towards the client (smoltcp's own is
    /// 1 s; 200 ms as Linux: the client is milliseconds away, and a segment lost
    /// where fast retransmit cannot help otherwise stalls the flow for a second).
    pub tcp_min_rto: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            dns_upstreams: Vec::new(),
            egress: Egress::Any,
            caps: Caps::default(),
            timeouts: Timeouts::default(),
            tcp_buffer_size: 256 * 1024,
            tcp_buffer_initial: 4 * 1024,
            tcp_buffer_shrink_after: Duration::from_secs(10),
            tcp_min_rto: Duration::from_millis(200),
        }
    }
}

/// Most nameservers taken from a resolv.conf.
pub const MAX_UPSTREAMS: usize = 8;
/// Largest resolv.conf read.
const MAX_RESOLV_CONF: u64 = 64 * 1024;

/// Reads the `nameserver` lines of a resolv.conf (normally `/etc/resolv.conf`).
///
/// Call this once at start-up, before the process is confined.
pub fn read_resolv_conf(path: &Path) -> std::io::Result<Vec<SocketAddr>> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_RESOLV_CONF)
        .read_to_string(&mut text)?;
    Ok(parse_resolv_conf(&text))
}

/// Parses the `nameserver` lines of resolv.conf text (port 53; scoped addresses skipped).
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next() != Some("nameserver") {
                return None;
            }
            let ip: IpAddr = words.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .take(MAX_UPSTREAMS)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# comment\nsearch example\nnameserver 10.0.0.1\nnameserver ::1\n\
                    nameserver fe80::1%eth0\nnameserver bogus\noptions edns0\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec!["10.0.0.1:53".parse().unwrap(), "[::1]:53".parse().unwrap()]
        );
    }

    #[test]
    fn udp_timeout_is_at_least_two_minutes() {
        assert!(Timeouts::default().udp_idle >= Duration::from_secs(120));
    }
}
