//! Counters: flows, DNS, and drops by reason.

/// Why a packet or a flow was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not a well-formed IPv4/IPv6 packet (bad length, version, checksum...).
    Malformed,
    /// IPv4 fragment (the worker reassembles nothing; clients honour the MTU).
    Fragment,
    /// Protocol the netstack does not forward (IPv6 extension headers, GRE, ...).
    Unsupported,
    /// Packet for a lease the netstack does not know.
    UnknownLease,
    /// Source address is not the lease's address.
    WrongSource,
    /// Packet larger than the lease MTU (answered with ICMP too-big).
    TooBig,
    /// Per-lease TCP flow cap reached.
    TcpFlowCap,
    /// Per-lease pending connect cap reached.
    PendingConnectCap,
    /// Per-lease UDP mapping cap reached.
    UdpMappingCap,
    /// Per-lease ICMP echo mapping cap reached.
    PingMappingCap,
    /// Per-lease buffer memory cap reached.
    BufferCap,
    /// Per-lease queue (inbound or outbound) full.
    QueueFull,
    /// Global flow cap reached.
    TotalFlowCap,
    /// Egress is unavailable (no VPN): refused with ICMP unreachable.
    EgressUnavailable,
    /// Unprivileged ping sockets are not allowed on this system.
    PingUnavailable,
    /// A DNS query the forwarder could not parse.
    DnsMalformed,
    /// Per-lease DNS pending cap reached or no upstream configured.
    DnsUnavailable,
    /// An OS send failed (would block or error).
    SendFailed,
    /// A datagram for the client larger than the lease MTU.
    ReturnTooBig,
}

/// Number of [`DropReason`] variants.
pub const DROP_REASONS: usize = 19;

impl DropReason {
    /// Every reason, in index order.
    pub const ALL: [DropReason; DROP_REASONS] = [
        DropReason::Malformed,
        DropReason::Fragment,
        DropReason::Unsupported,
        DropReason::UnknownLease,
        DropReason::WrongSource,
        DropReason::TooBig,
        DropReason::TcpFlowCap,
        DropReason::PendingConnectCap,
        DropReason::UdpMappingCap,
        DropReason::PingMappingCap,
        DropReason::BufferCap,
        DropReason::QueueFull,
        DropReason::TotalFlowCap,
        DropReason::EgressUnavailable,
        DropReason::PingUnavailable,
        DropReason::DnsMalformed,
        DropReason::DnsUnavailable,
        DropReason::SendFailed,
        DropReason::ReturnTooBig,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// A snapshot of the netstack's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets accepted from clients.
    pub packets_in: u64,
    /// Packets produced for clients.
    pub packets_out: u64,
    /// TCP flows open now (connecting or established).
    pub tcp_flows: u64,
    /// TCP flows waiting for their OS connect now.
    pub pending_connects: u64,
    /// UDP mappings open now.
    pub udp_flows: u64,
    /// ICMP echo mappings open now.
    pub ping_flows: u64,
    /// TCP flows whose OS connect succeeded (total).
    pub tcp_connected: u64,
    /// TCP connects refused (client got RST).
    pub tcp_refused: u64,
    /// TCP connects unreachable or timed out (client got ICMP unreachable).
    pub tcp_unreachable: u64,
    /// Flows closed for idleness.
    pub idle_timeouts: u64,
    /// TCP flows whose buffers doubled because they limited the flow.
    pub tcp_buffer_grows: u64,
    /// Idle TCP flows whose buffers went back to their initial size.
    pub tcp_buffer_shrinks: u64,
    /// DNS queries received from clients.
    pub dns_queries: u64,
    /// DNS queries answered from the cache.
    pub dns_cache_hits: u64,
    /// DNS queries forwarded upstream.
    pub dns_upstream_queries: u64,
    /// DNS upstream answers relayed to clients.
    pub dns_upstream_answers: u64,
    /// ICMP errors sent to clients (unreachable, too big).
    pub icmp_errors_sent: u64,
    drops: [u64; DROP_REASONS],
}

impl Counters {
    /// Drops for one reason.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops.get(reason.index()).copied().unwrap_or(0)
    }

    /// All drops together.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    pub(crate) fn drop(&mut self, reason: DropReason) {
        if let Some(c) = self.drops.get_mut(reason.index()) {
            *c = c.saturating_add(1);
        }
    }
}

/// What one lease uses now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseStats {
    pub tcp_flows: usize,
    pub pending_connects: usize,
    pub udp_flows: usize,
    pub ping_flows: usize,
    pub dns_pending: usize,
    pub buffer_bytes: usize,
    pub inbound_queue_bytes: usize,
    pub outbound_queue_bytes: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_slot() {
        let mut c = Counters::default();
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            c.drop(*r);
        }
        assert_eq!(c.total_drops(), DROP_REASONS as u64);
    }
}
