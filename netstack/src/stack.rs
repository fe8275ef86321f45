//! The netstack: leases, flows, the smoltcp interfaces and the OS sockets.
//!
//! One [`Netstack`] serves every lease of the gateway. Client packets are classified
//! here (bounded parsing in `packet`) and looked up in the sans-IO flow table by their
//! 5-tuple. TCP goes through smoltcp: every open TCP flow has its own small smoltcp
//! `Interface` (any-IP, medium IP, MTU = lease MTU, so smoltcp's MSS follows the lease)
//! with one socket and its own inbound queue, so smoltcp never scans other flows'
//! sockets to match a segment; each lease also has a socket-less interface that answers
//! packets of no flow with RST. UDP, DNS and ICMP echo are handled directly on packets
//! (endpoint-independent mappings need no TCP state machine). All of a lease's
//! interfaces send into one outbound queue per lease, which the caller drains.
//!
//! OS sockets are non-blocking and registered edge-triggered with one `mio::Poll`
//! (epoll). The caller either blocks in [`Netstack::wait`] or puts
//! [`Netstack::as_raw_fd`] into its own event loop, then calls [`Netstack::poll`] with
//! the current time; `poll` returns the next deadline (smoltcp's `poll_at`, flow
//! timeouts), so nothing ever sleep-polls.

use crate::config::{Config, Egress};
use crate::counters::{Counters, DropReason, LeaseStats};
use crate::device::{LeaseQueues, Queue};
use crate::dns::{self, CacheKey, DnsCache};
use crate::egress::{self, Kind, SocketHook};
use crate::flows::{Expiry, FlowId, FlowKey, FlowTable, IdMap};
use crate::packet::{self, IcmpError, Parsed, Transport};
use mio::{Interest, Token};
use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    HardwareAddress, Icmpv4Message, Icmpv4Packet, Icmpv6Message, Icmpv6Packet, IpListenEndpoint,
};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};
use vshp::lease::{Lease, LeaseId};

/// How often flow timeouts are checked while flows exist.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// A listener whose SYN smoltcp did not take within this time is dropped.
const LISTEN_GRACE: Duration = Duration::from_secs(5);
/// Receive buffer for one datagram from the OS.
const SCRATCH_LEN: usize = 65_536;
/// Most mio events handled per `poll`.
const EVENTS: usize = 1024;
/// Tokens at or above this are DNS upstream sockets.
const DNS_TOKEN_BASE: usize = usize::MAX - 64;
/// Most DNS queries awaiting an upstream answer, all leases together.
const MAX_DNS_PENDING_TOTAL: usize = 16_384;
/// Most smoltcp polls per peer per `poll` call in the relay loop.
const RELAY_ROUNDS: usize = 4;
/// Most payload bytes of a datagram taken back from the error queue (an ICMPv6
/// error quotes at most what fits in 1280 bytes anyway).
const ICMP_QUOTE_MAX: usize = 1232;
/// Most datagrams read from one mapping per service.
const DGRAM_BUDGET: usize = 256;

/// Errors of the netstack API.
#[derive(Debug, thiserror::Error)]
pub enum NetstackError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("lease {0:?} is already known")]
    LeaseExists(LeaseId),
    #[error("invalid lease: {0}")]
    BadLease(#[from] vshp::lease::LeaseError),
}

/// A batch of packets in one contiguous buffer: filled by
/// [`Netstack::drain_outbound`], reused by the caller (no per-packet allocation
/// once its capacity has grown).
#[derive(Debug, Default, Clone)]
pub struct PacketBatch {
    data: Vec<u8>,
    ends: Vec<usize>,
}

impl PacketBatch {
    pub fn new() -> Self {
        Self::default()
    }
    /// Empties the batch, keeping its capacity.
    pub fn clear(&mut self) {
        self.data.clear();
        self.ends.clear();
    }
    /// Appends one packet.
    pub fn push(&mut self, packet: &[u8]) {
        self.data.extend_from_slice(packet);
        self.ends.push(self.data.len());
    }
    /// Number of packets.
    pub fn len(&self) -> usize {
        self.ends.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
    /// Total bytes of all packets.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }
    /// The packets, in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .filter_map(|(s, e)| self.data.get(s..e))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct TcpKey {
    lease: LeaseId,
    client: SocketAddr,
    remote: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct UdpKey {
    lease: LeaseId,
    client: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PingKey {
    lease: LeaseId,
    client: IpAddr,
    ident: u16,
}

#[derive(Debug)]
enum TcpState {
    /// OS connect in progress; the client's SYN waits here.
    Connecting { syn: Vec<u8> },
    /// smoltcp socket created; relaying.
    Open(Box<OpenTcp>),
}

/// A relayed TCP flow's smoltcp side: its own interface (any-IP, MTU = lease MTU)
/// with one socket, fed from the flow's own inbound queue. Packets reach it through
/// the flow table's 5-tuple index, so smoltcp never scans other flows' sockets to
/// match a segment, and no other flow's SYN can reach its listener.
struct OpenTcp {
    iface: Interface,
    sockets: SocketSet<'static>,
    handle: SocketHandle,
    rx: Queue,
    opened: Instant,
}

impl std::fmt::Debug for OpenTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenTcp")
            .field("opened", &self.opened)
            .finish_non_exhaustive()
    }
}

/// Relay bookkeeping of a TCP flow's OS side.
#[derive(Debug, Default)]
struct RelayState {
    readable: bool,
    writable: bool,
    os_eof: bool,
    os_shut_wr: bool,
    established: bool,
    /// Bytes written to the OS socket during the current service.
    to_os: usize,
}

#[derive(Debug)]
struct TcpFlow {
    key: TcpKey,
    stream: mio::net::TcpStream,
    state: TcpState,
    relay: RelayState,
}

#[derive(Debug)]
struct UdpFlow {
    key: UdpKey,
    sock: mio::net::UdpSocket,
    readable: bool,
}

#[derive(Debug)]
struct PingFlow {
    key: PingKey,
    sock: mio::net::UdpSocket,
    readable: bool,
}

#[derive(Debug)]
enum Flow {
    Tcp(TcpFlow),
    Udp(UdpFlow),
    Ping(PingFlow),
}

impl TcpKey {
    fn flow_key(&self) -> FlowKey {
        FlowKey::Tcp {
            lease: self.lease,
            client: self.client,
            remote: self.remote,
        }
    }
}

impl UdpKey {
    fn flow_key(&self) -> FlowKey {
        FlowKey::Udp {
            lease: self.lease,
            client: self.client,
        }
    }
}

impl PingKey {
    fn flow_key(&self) -> FlowKey {
        FlowKey::Ping {
            lease: self.lease,
            client: self.client,
            ident: self.ident,
        }
    }
}

struct Peer {
    lease: Lease,
    /// Answers packets that belong to no flow (RST for stray TCP segments and
    /// refused SYNs); it never has a socket.
    iface: Interface,
    sockets: SocketSet<'static>,
    q: LeaseQueues,
    dns_pending: usize,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("lease", &self.lease.id)
            .field("dns_pending", &self.dns_pending)
            .finish_non_exhaustive()
    }
}

impl Peer {
    fn owns_source(&self, src: IpAddr) -> bool {
        match src {
            IpAddr::V4(a) => a == self.lease.ipv4.addr,
            IpAddr::V6(a) => self.lease.ipv6.is_some_and(|p| p.addr == a),
        }
    }

    fn is_dns(&self, dst: IpAddr, port: u16) -> bool {
        port == 53 && self.lease.dns.contains(&dst)
    }

    /// Queues a packet built by `build` for the client.
    fn emit(
        &mut self,
        counters: &mut Counters,
        build: impl FnOnce(&mut Vec<u8>) -> Result<(), packet::BuildError>,
    ) -> bool {
        let mut buf = self.q.tx_pool.take();
        if build(&mut buf).is_err() {
            self.q.tx_pool.give(buf);
            return false;
        }
        match self.q.tx.push(buf) {
            Ok(()) => true,
            Err(buf) => {
                self.q.tx_pool.give(buf);
                counters.drop(DropReason::QueueFull);
                false
            }
        }
    }

    fn icmp_error(&mut self, counters: &mut Counters, original: &[u8], kind: IcmpError) {
        if self.emit(counters, |b| packet::build_icmp_error(b, original, kind)) {
            counters.icmp_errors_sent += 1;
        }
    }

    /// Queues a client packet of no flow for the stray interface (which answers TCP
    /// with RST; it is polled whenever its queue is not empty).
    fn queue_stray(&mut self, counters: &mut Counters, pkt: &[u8]) {
        if !self.q.push_inbound(None, pkt) {
            counters.drop(DropReason::QueueFull);
        }
    }

    /// Queues a client packet for an open TCP flow's interface (the caller wakes
    /// the flow).
    fn queue_for_flow(&mut self, counters: &mut Counters, rx: &mut Queue, pkt: &[u8]) {
        if !self.q.push_inbound(Some(rx), pkt) {
            counters.drop(DropReason::QueueFull);
        }
    }

    fn new_interface(&mut self, now: SmolInstant, rx: Option<&mut Queue>) -> Interface {
        new_interface(&mut self.q, now, rx)
    }
}

#[derive(Debug)]
struct Upstream {
    addr: SocketAddr,
    sock: Option<mio::net::UdpSocket>,
}

#[derive(Debug)]
struct PendingDns {
    lease: LeaseId,
    client: SocketAddr,
    server: SocketAddr,
    client_id: u16,
    key: Option<CacheKey>,
    query: Vec<u8>,
    upstream: usize,
    deadline: Instant,
}

/// The netstack of one gateway: every lease's flows.
pub struct Netstack {
    config: Config,
    poll: mio::Poll,
    events: mio::Events,
    events_pending: bool,
    /// The last `epoll_wait` filled the event buffer: more may be waiting.
    events_left: bool,
    epoch: Instant,
    peers: IdMap<LeaseId, Peer>,
    flows: FlowTable<Flow>,
    cache: DnsCache,
    upstreams: Vec<Upstream>,
    preferred_upstream: usize,
    dns_pending: HashMap<u16, PendingDns>,
    counters: Counters,
    egress_available: bool,
    ping_unavailable: bool,
    scratch: Vec<u8>,
    ready: Vec<(Token, bool, bool)>,
    next_sweep: Option<Instant>,
    socket_hook: Option<SocketHook>,
    run_scratch: Vec<FlowId>,
}

impl std::fmt::Debug for Netstack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netstack")
            .field("peers", &self.peers.len())
            .field("flows", &self.flows.len())
            .field("egress_available", &self.egress_available)
            .finish_non_exhaustive()
    }
}

fn is_would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// What the client gets when the OS cannot reach a destination (`None`: TCP RST).
fn failure_reply(err: &io::Error) -> Option<IcmpError> {
    match err.raw_os_error() {
        Some(libc::ECONNREFUSED) => None,
        Some(libc::ENETUNREACH) => Some(IcmpError::NetUnreachable),
        Some(libc::EACCES) | Some(libc::EPERM) => Some(IcmpError::AdminProhibited),
        _ => Some(IcmpError::HostUnreachable),
    }
}

impl Netstack {
    /// Creates a netstack (one epoll instance; no lease yet).
    pub fn new(config: Config) -> Result<Self, NetstackError> {
        let upstreams = config
            .dns_upstreams
            .iter()
            .map(|&addr| Upstream { addr, sock: None })
            .collect();
        Ok(Self {
            cache: DnsCache::new(config.caps.max_dns_cache_entries),
            config,
            poll: mio::Poll::new()?,
            events: mio::Events::with_capacity(EVENTS),
            events_pending: false,
            events_left: false,
            epoch: Instant::now(),
            peers: IdMap::default(),
            flows: FlowTable::default(),
            upstreams,
            preferred_upstream: 0,
            dns_pending: HashMap::new(),
            counters: Counters::default(),
            egress_available: true,
            ping_unavailable: false,
            scratch: vec![0; SCRATCH_LEN],
            ready: Vec::with_capacity(EVENTS),
            next_sweep: None,
            socket_hook: None,
            run_scratch: Vec::new(),
        })
    }

    fn smol(&self, now: Instant) -> SmolInstant {
        let micros = now.saturating_duration_since(self.epoch).as_micros();
        SmolInstant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    /// Starts serving a lease.
    pub fn add_lease(&mut self, lease: &Lease) -> Result<(), NetstackError> {
        lease.validate()?;
        if self.peers.contains_key(&lease.id) {
            return Err(NetstackError::LeaseExists(lease.id));
        }
        let caps = &self.config.caps;
        let q = LeaseQueues::new(
            usize::from(lease.mtu),
            caps.max_inbound_queue_bytes,
            caps.max_outbound_queue_bytes,
        );
        let mut q = q;
        let iface = new_interface(&mut q, self.smol(Instant::now()), None);
        let peer = Peer {
            lease: lease.clone(),
            iface,
            sockets: SocketSet::new(Vec::new()),
            q,
            dns_pending: 0,
        };
        self.peers.insert(lease.id, peer);
        Ok(())
    }

    /// Stops serving a lease and drops all its flows (TCP peers get RST).
    pub fn remove_lease(&mut self, id: LeaseId) {
        if self.peers.remove(&id).is_none() {
            return;
        }
        let (tcp, dgram) = self.flows.lease_flows(id);
        for fid in tcp.into_iter().chain(dgram) {
            self.forget_flow(fid, true);
        }
        self.dns_pending.retain(|_, p| p.lease != id);
    }

    /// The leases known now.
    pub fn leases(&self) -> impl Iterator<Item = LeaseId> + '_ {
        self.peers.keys().copied()
    }

    /// Turns forwarding on or off. Off: new flows are refused with ICMP unreachable
    /// and every existing flow is closed (TCP with RST).
    pub fn set_egress_available(&mut self, available: bool) {
        self.egress_available = available;
        if available {
            return;
        }
        for id in self.flows.ids() {
            self.close_flow_abortively(id);
        }
        let pending: Vec<u16> = self.dns_pending.keys().copied().collect();
        for id in pending {
            self.drop_dns_pending(id);
        }
    }

    /// Changes where outbound sockets are bound (the VPN came up on another
    /// interface, or the policy changed). Flows and DNS upstream sockets bound to the
    /// old egress are closed (TCP flows with RST both ways); nothing changes when the
    /// egress is the same.
    pub fn set_egress(&mut self, egress: Egress) {
        if self.config.egress == egress {
            return;
        }
        self.config.egress = egress;
        for id in self.flows.ids() {
            self.close_flow_abortively(id);
        }
        let pending: Vec<u16> = self.dns_pending.keys().copied().collect();
        for id in pending {
            self.drop_dns_pending(id);
        }
        for up in &mut self.upstreams {
            if let Some(mut sock) = up.sock.take() {
                let _ = self.poll.registry().deregister(&mut sock);
            }
        }
    }

    /// The current egress binding.
    pub fn egress(&self) -> &Egress {
        &self.config.egress
    }

    /// Installs the platform hook run on every outbound socket (Android: bind it to
    /// the VPN `Network`). See [`SocketHook`].
    pub fn set_socket_hook(&mut self, hook: SocketHook) {
        self.socket_hook = Some(hook);
    }

    /// Whether forwarding is on.
    pub fn egress_available(&self) -> bool {
        self.egress_available
    }

    /// The epoll descriptor: readable when OS sockets have events; put it in an
    /// outer event loop and call [`poll`](Self::poll) when it fires.
    pub fn as_raw_fd(&self) -> RawFd {
        self.poll.as_raw_fd()
    }

    /// Blocks until an OS socket has an event or `timeout` passes. The events are
    /// handled by the next [`poll`](Self::poll).
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<(), NetstackError> {
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {
                self.events_pending = true;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> Counters {
        let mut c = self.counters.clone();
        for id in self.peers.keys() {
            let u = self.flows.usage(*id);
            c.tcp_flows += u.tcp as u64;
            c.pending_connects += u.pending_connects as u64;
            c.udp_flows += u.udp as u64;
            c.ping_flows += u.ping as u64;
        }
        c
    }

    /// What one lease uses now.
    pub fn lease_stats(&self, id: LeaseId) -> Option<LeaseStats> {
        let p = self.peers.get(&id)?;
        let u = self.flows.usage(id);
        Some(LeaseStats {
            tcp_flows: u.tcp,
            pending_connects: u.pending_connects,
            udp_flows: u.udp,
            ping_flows: u.ping,
            dns_pending: p.dns_pending,
            buffer_bytes: u.buffer_bytes,
            inbound_queue_bytes: p.q.inbound_bytes,
            outbound_queue_bytes: p.q.tx.bytes(),
        })
    }

    /// Leases with packets waiting to be drained.
    pub fn leases_with_output(&self) -> impl Iterator<Item = LeaseId> + '_ {
        self.peers
            .iter()
            .filter(|(_, p)| !p.q.tx.is_empty())
            .map(|(id, _)| *id)
    }

    /// Moves packets for the client of `lease` into `batch` (appending), up to
    /// `max_bytes` (at least one packet when any waits). Returns how many.
    pub fn drain_outbound(
        &mut self,
        lease: LeaseId,
        batch: &mut PacketBatch,
        max_bytes: usize,
    ) -> usize {
        let Some(peer) = self.peers.get_mut(&lease) else {
            return 0;
        };
        let mut n = 0;
        while let Some(len) = peer.q.tx.front_len() {
            if n > 0 && batch.bytes().saturating_add(len) > max_bytes {
                break;
            }
            let Some(buf) = peer.q.tx.pop() else { break };
            batch.push(&buf);
            peer.q.tx_pool.give(buf);
            n += 1;
        }
        if n > 0 {
            // Room in the queue: smoltcp and blocked datagram readers may go on.
            self.flows.unblock_lease(lease);
            self.counters.packets_out += n as u64;
        }
        n
    }

    /// Hands the netstack packets the client of `lease` sent (already validated by
    /// the worker; bounded again here). Call [`poll`](Self::poll) afterwards.
    pub fn push_packets<'a>(&mut self, lease: LeaseId, packets: impl Iterator<Item = &'a [u8]>) {
        let now = Instant::now();
        for pkt in packets {
            self.push_one(lease, pkt, now);
        }
    }

    fn push_one(&mut self, lease: LeaseId, pkt: &[u8], now: Instant) {
        let Some(peer) = self.peers.get_mut(&lease) else {
            self.counters.drop(DropReason::UnknownLease);
            return;
        };
        let parsed = match packet::parse(pkt) {
            Ok(p) => p,
            Err(reason) => {
                self.counters.drop(reason);
                return;
            }
        };
        if !peer.owns_source(parsed.src) {
            self.counters.drop(DropReason::WrongSource);
            return;
        }
        self.counters.packets_in += 1;
        let mtu = peer.lease.mtu;
        if pkt.len() > usize::from(mtu) {
            self.counters.drop(DropReason::TooBig);
            peer.icmp_error(&mut self.counters, pkt, IcmpError::TooBig(mtu));
            return;
        }
        match parsed.transport.clone() {
            Transport::Tcp {
                syn,
                ack,
                rst,
                dst_port,
                ..
            } => {
                let gateway = peer.lease.dns.contains(&parsed.dst);
                if gateway && (dst_port != 53 || self.upstreams.is_empty()) {
                    // The gateway address is no real host and serves only DNS: the
                    // SYN meets no listener, smoltcp answers RST.
                    peer.queue_stray(&mut self.counters, pkt);
                    return;
                }
                self.tcp_packet(lease, pkt, &parsed, syn && !ack && !rst, now)
            }
            Transport::Udp {
                src_port,
                dst_port,
                payload,
            } => {
                let client = SocketAddr::new(parsed.src, src_port);
                let remote = SocketAddr::new(parsed.dst, dst_port);
                let data = pkt.get(payload).unwrap_or(&[]);
                if peer.is_dns(parsed.dst, dst_port) {
                    self.dns_query(lease, client, remote, data, now);
                } else if peer.lease.dns.contains(&parsed.dst) {
                    peer.icmp_error(&mut self.counters, pkt, IcmpError::PortUnreachable);
                } else {
                    self.udp_packet(lease, pkt, client, remote, data, now);
                }
            }
            Transport::EchoRequest { ident, seq, data } => {
                let data = pkt.get(data).unwrap_or(&[]);
                if peer.lease.dns.contains(&parsed.dst) {
                    // The in-tunnel gateway/DNS address answers pings itself.
                    peer.emit(&mut self.counters, |b| {
                        packet::build_echo_reply(b, parsed.dst, parsed.src, ident, seq, data)
                    });
                } else {
                    self.echo_request(lease, pkt, &parsed, ident, seq, data, now);
                }
            }
            Transport::OtherIcmp => self.counters.drop(DropReason::Unsupported),
        }
    }

    /// Whether a new flow may be created: egress up (else ICMP unreachable) and
    /// within the caps (else a counted silent drop; the client retries or gives up).
    fn admit(&mut self, key: &FlowKey, pkt: &[u8]) -> bool {
        if !self.egress_available {
            self.counters.drop(DropReason::EgressUnavailable);
            if let Some(peer) = self.peers.get_mut(&key.lease()) {
                peer.icmp_error(&mut self.counters, pkt, IcmpError::NetUnreachable);
            }
            return false;
        }
        match self.flows.admit(key, &self.config.caps) {
            Ok(()) => true,
            Err(reason) => {
                self.counters.drop(reason);
                false
            }
        }
    }

    // ---------------------------------------------------------------- TCP

    fn tcp_packet(&mut self, lease: LeaseId, pkt: &[u8], p: &Parsed, syn: bool, now: Instant) {
        let key = TcpKey {
            lease,
            client: SocketAddr::new(p.src, p.src_port()),
            remote: SocketAddr::new(p.dst, p.dst_port()),
        };
        if let Some(id) = self.flows.lookup(&key.flow_key()) {
            // While the OS connect runs, a retransmitted SYN is dropped: the held one
            // answers it.
            if let Some(Flow::Tcp(flow)) = self.flows.get_mut(id)
                && let TcpState::Open(open) = &mut flow.state
                && let Some(peer) = self.peers.get_mut(&lease)
            {
                peer.queue_for_flow(&mut self.counters, &mut open.rx, pkt);
                self.flows.wake(id);
            }
            return;
        }
        let Some(peer) = self.peers.get_mut(&lease) else {
            return;
        };
        if !syn {
            // No flow: smoltcp answers with RST (it has no socket for it).
            peer.queue_stray(&mut self.counters, pkt);
            return;
        }
        let to_dns = peer.is_dns(p.dst, key.remote.port());
        if !packet::tcp_checksum_ok(pkt, p.src, p.dst) {
            self.counters.drop(DropReason::Malformed);
            return;
        }
        if !self.admit(&key.flow_key(), pkt) {
            return;
        }
        // TCP DNS to the lease's DNS address goes to the first upstream.
        let target = match self.upstreams.first() {
            Some(up) if to_dns => up.addr,
            _ => key.remote,
        };
        let mut stream =
            match egress::tcp_connect(target, &self.config.egress, self.socket_hook.as_mut()) {
                Ok(s) => s,
                Err(e) => {
                    self.connect_failed(lease, pkt, &e);
                    return;
                }
            };
        let registered = self.poll.registry().register(
            &mut stream,
            Token(self.flows.next_id() as usize),
            Interest::READABLE | Interest::WRITABLE,
        );
        if let Err(e) = registered {
            tracing::warn!(error = %e, "cannot register a TCP socket");
            self.counters.drop(DropReason::SendFailed);
            return;
        }
        self.flows.insert(
            key.flow_key(),
            Flow::Tcp(TcpFlow {
                key,
                stream,
                state: TcpState::Connecting { syn: pkt.to_vec() },
                relay: RelayState::default(),
            }),
            now,
            Some(now + self.config.timeouts.tcp_connect),
        );
        self.schedule_sweep(now);
    }

    fn connect_failed(&mut self, lease: LeaseId, syn: &[u8], err: &io::Error) {
        let Some(peer) = self.peers.get_mut(&lease) else {
            return;
        };
        match failure_reply(err) {
            None => {
                self.counters.tcp_refused += 1;
                // No listener exists for it: smoltcp answers the SYN with RST.
                peer.queue_stray(&mut self.counters, syn);
            }
            Some(kind) => {
                self.counters.tcp_unreachable += 1;
                peer.icmp_error(&mut self.counters, syn, kind);
            }
        }
    }

    /// The OS connect of flow `id` finished (or an event arrived while connecting).
    /// On Linux a connecting TCP socket reports writability only once it is connected
    /// (`tcp_poll` in SYN_SENT) and a failure through `SO_ERROR`, so a writable event
    /// without an error is the connection: one syscall per connection, not two
    /// (`getpeername` confirmed it before).
    fn tcp_connect_event(&mut self, id: FlowId, writable: bool, now: Instant) {
        let Some(Flow::Tcp(flow)) = self.flows.get_mut(id) else {
            return;
        };
        let result = match flow.stream.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) if writable => Ok(()),
            Ok(None) => return,
        };
        let TcpState::Connecting { syn, .. } = &mut flow.state else {
            return;
        };
        let syn = std::mem::take(syn);
        let lease = flow.key.lease;
        match result {
            Err(e) => {
                self.forget_flow(id, false);
                self.connect_failed(lease, &syn, &e);
            }
            Ok(()) => self.tcp_open(id, syn, now),
        }
    }

    fn tcp_open(&mut self, id: FlowId, syn: Vec<u8>, now: Instant) {
        let smol_now = self.smol(now);
        let max = self.config.tcp_buffer_size.max(1);
        let bufsize = self.config.tcp_buffer_initial.clamp(1, max);
        let need = bufsize.saturating_mul(2);
        let Some(key) = self.flows.key(id) else {
            return;
        };
        if let Err(reason) = self.flows.connected(id, need, &self.config.caps, now) {
            self.counters.drop(reason);
            if let Some(peer) = self.peers.get_mut(&key.lease()) {
                peer.queue_stray(&mut self.counters, &syn); // no listener: RST
            }
            self.forget_flow(id, true);
            return;
        }
        let Some(Flow::Tcp(flow)) = self.flows.get_mut(id) else {
            return;
        };
        let Some(peer) = self.peers.get_mut(&flow.key.lease) else {
            return;
        };
        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; bufsize]),
            tcp::SocketBuffer::new(vec![0; bufsize]),
        );
        let local = IpListenEndpoint {
            addr: Some(flow.key.remote.ip().into()),
            port: flow.key.remote.port(),
        };
        if sock.listen(local).is_err() {
            self.counters.drop(DropReason::Malformed);
            self.forget_flow(id, true);
            return;
        }
        sock.set_nagle_enabled(false);
        // The window scale is offered in the SYN-ACK: choose it for the largest
        // buffer the flow may grow to.
        sock.set_max_rx_capacity(max);
        sock.set_min_rto(smoltcp::time::Duration::from_millis(
            u64::try_from(self.config.tcp_min_rto.as_millis()).unwrap_or(u64::MAX),
        ));
        let mut rx = Queue::new(usize::MAX);
        let iface = peer.new_interface(smol_now, Some(&mut rx));
        let mut sockets = SocketSet::new(Vec::with_capacity(1));
        let handle = sockets.add(sock);
        let mut open = Box::new(OpenTcp {
            iface,
            sockets,
            handle,
            rx,
            opened: now,
        });
        // The held SYN goes to the flow's own interface, whose only socket listens on
        // its destination; smoltcp answers SYN-ACK.
        peer.queue_for_flow(&mut self.counters, &mut open.rx, &syn);
        {
            let OpenTcp {
                iface, sockets, rx, ..
            } = &mut *open;
            iface.poll(smol_now, &mut peer.q.link(rx), sockets);
        }
        flow.state = TcpState::Open(open);
        // The connect consumed the socket's first (edge-triggered) events: assume
        // both ways ready until the OS says would-block.
        flow.relay.readable = true;
        flow.relay.writable = true;
        self.counters.tcp_connected += 1;
        self.flows.wake(id);
        // A listener whose SYN smoltcp did not take is forgotten after the grace.
        self.flows.set_timer(id, now + LISTEN_GRACE);
    }

    /// The smoltcp side of an open TCP flow.
    fn open_tcp(&mut self, id: FlowId) -> Option<&mut OpenTcp> {
        match self.flows.get_mut(id) {
            Some(Flow::Tcp(TcpFlow {
                state: TcpState::Open(open),
                ..
            })) => Some(open),
            _ => None,
        }
    }

    /// Gives flows idle for `Config::tcp_buffer_shrink_after` their initial buffers back
    /// (when nothing waits in them), so that a flow that once moved a lot costs a few
    /// KiB while it idles.
    fn shrink_idle_buffers(&mut self, now: Instant) {
        let initial = self
            .config
            .tcp_buffer_initial
            .clamp(1, self.config.tcp_buffer_size.max(1));
        let ids = self
            .flows
            .oversized_idle(now, self.config.tcp_buffer_shrink_after, initial * 2);
        for id in ids {
            let Some(open) = self.open_tcp(id) else {
                continue;
            };
            let sock = open.sockets.get_mut::<tcp::Socket>(open.handle);
            if sock.recv_queue() > 0 || sock.send_queue() > 0 || sock.has_out_of_order_data() {
                continue;
            }
            let _ = sock.replace_rx_buffer(vec![0; initial]);
            let _ = sock.replace_tx_buffer(vec![0; initial]);
            let bytes = sock.recv_capacity() + sock.send_capacity();
            let _ = self.flows.resize_buffers(id, bytes, &self.config.caps);
            self.counters.tcp_buffer_shrinks += 1;
        }
    }

    /// Drops a flow's state (sockets closed; `abortive`: TCP peer gets RST).
    fn forget_flow(&mut self, id: FlowId, abortive: bool) {
        let Some((key, flow)) = self.flows.remove(id) else {
            return;
        };
        match flow {
            Flow::Tcp(mut f) => {
                let _ = self.poll.registry().deregister(&mut f.stream);
                if abortive {
                    egress::set_abortive(&f.stream);
                }
                if let TcpState::Open(mut open) = f.state
                    && let Some(peer) = self.peers.get_mut(&key.lease())
                {
                    peer.q.discard(&mut open.rx);
                }
            }
            Flow::Udp(mut f) => {
                let _ = self.poll.registry().deregister(&mut f.sock);
            }
            Flow::Ping(mut f) => {
                let _ = self.poll.registry().deregister(&mut f.sock);
            }
        }
    }

    /// Closes a flow now: TCP flows are aborted (RST both ways), connecting ones get
    /// ICMP unreachable, datagram mappings are dropped.
    fn close_flow_abortively(&mut self, id: FlowId) {
        match self.flows.get_mut(id) {
            Some(Flow::Tcp(flow)) => {
                let lease = flow.key.lease;
                match &mut flow.state {
                    TcpState::Connecting { syn, .. } => {
                        let syn = std::mem::take(syn);
                        self.forget_flow(id, true);
                        if let Some(peer) = self.peers.get_mut(&lease) {
                            peer.icmp_error(&mut self.counters, &syn, IcmpError::NetUnreachable);
                        }
                    }
                    TcpState::Open(open) => {
                        egress::set_abortive(&flow.stream);
                        let _ = flow.stream.shutdown(Shutdown::Both);
                        flow.relay.os_eof = true;
                        flow.relay.os_shut_wr = true;
                        open.sockets.get_mut::<tcp::Socket>(open.handle).abort();
                        self.flows.wake(id);
                    }
                }
            }
            Some(_) => self.forget_flow(id, false),
            None => {}
        }
    }

    // ---------------------------------------------------------------- UDP

    fn udp_packet(
        &mut self,
        lease: LeaseId,
        pkt: &[u8],
        client: SocketAddr,
        remote: SocketAddr,
        data: &[u8],
        now: Instant,
    ) {
        let key = UdpKey { lease, client };
        let id = match self.flows.lookup(&key.flow_key()) {
            Some(id) => id,
            None => {
                if !self.admit(&key.flow_key(), pkt) {
                    return;
                }
                let mut sock = match egress::udp_bind(
                    Kind::Udp,
                    client.is_ipv6(),
                    &self.config.egress,
                    self.socket_hook.as_mut(),
                ) {
                    Ok(s) => s,
                    Err(e) => {
                        self.counters.drop(DropReason::SendFailed);
                        self.datagram_error(lease, pkt, &e);
                        return;
                    }
                };
                // ICMP errors answering the mapping's datagrams come back through
                // the error queue and are relayed to the client (best effort).
                if let Err(e) = egress::enable_recv_err(&sock, client.is_ipv6()) {
                    tracing::debug!(error = %e, "IP_RECVERR refused");
                }
                let token = Token(self.flows.next_id() as usize);
                if self
                    .poll
                    .registry()
                    .register(&mut sock, token, Interest::READABLE)
                    .is_err()
                {
                    self.counters.drop(DropReason::SendFailed);
                    return;
                }
                let flow = Flow::Udp(UdpFlow {
                    key,
                    sock,
                    readable: false,
                });
                let id = self.flows.insert(key.flow_key(), flow, now, None);
                self.schedule_sweep(now);
                id
            }
        };
        self.flows.touch(id, now);
        let Some(Flow::Udp(flow)) = self.flows.get_mut(id) else {
            return;
        };
        match flow.sock.send_to(data, remote) {
            Ok(_) => {}
            Err(e) if is_would_block(&e) => self.counters.drop(DropReason::SendFailed),
            Err(e) => {
                self.counters.drop(DropReason::SendFailed);
                self.datagram_error(lease, pkt, &e);
            }
        }
    }

    /// An OS send of a client datagram failed: tell the client when it is final.
    fn datagram_error(&mut self, lease: LeaseId, pkt: &[u8], err: &io::Error) {
        let kind = match err.raw_os_error() {
            Some(libc::ENETUNREACH) => IcmpError::NetUnreachable,
            Some(libc::EHOSTUNREACH) => IcmpError::HostUnreachable,
            Some(libc::EACCES) | Some(libc::EPERM) => IcmpError::AdminProhibited,
            Some(libc::EMSGSIZE) => match self.peers.get(&lease) {
                Some(p) => IcmpError::TooBig(p.lease.mtu),
                None => return,
            },
            _ => return,
        };
        if let Some(peer) = self.peers.get_mut(&lease) {
            peer.icmp_error(&mut self.counters, pkt, kind);
        }
    }

    /// Reads datagrams of a UDP or ping mapping into the client's queue, as long as
    /// the queue has room (backpressure: otherwise the flow stays readable).
    fn dgram_read(&mut self, id: FlowId, now: Instant) {
        enum Target {
            Udp(SocketAddr),
            Ping(IpAddr, u16),
        }
        let Some(flow) = self.flows.get_mut(id) else {
            return;
        };
        let (sock, readable, lease, target) = match flow {
            Flow::Udp(f) => (
                &f.sock,
                &mut f.readable,
                f.key.lease,
                Target::Udp(f.key.client),
            ),
            Flow::Ping(f) => (
                &f.sock,
                &mut f.readable,
                f.key.lease,
                Target::Ping(f.key.client, f.key.ident),
            ),
            Flow::Tcp(_) => return,
        };
        let mut active = false;
        let Some(peer) = self.peers.get_mut(&lease) else {
            return;
        };
        let mtu = usize::from(peer.lease.mtu);
        let mut exhausted = true;
        let mut blocked = false;
        for _ in 0..DGRAM_BUDGET {
            if !*readable {
                exhausted = false;
                break;
            }
            if !peer.q.tx.has_room(mtu) {
                exhausted = false;
                blocked = true;
                break;
            }
            let (n, from) = match sock.recv_from(&mut self.scratch) {
                Ok(r) => r,
                Err(e) if is_would_block(&e) => {
                    *readable = false;
                    exhausted = false;
                    break;
                }
                // A socket error: an ICMP error answered an earlier datagram. Relay
                // what the error queue holds to the client, then go on reading.
                Err(_) => {
                    if let Target::Udp(client) = target {
                        let mut body = [0u8; ICMP_QUOTE_MAX];
                        while let Some(qe) = egress::read_error_queue(sock, &mut body) {
                            let kind = packet::icmp_error_from_os(
                                qe.dest.is_ipv6(),
                                qe.icmp_type,
                                qe.code,
                                qe.info,
                            );
                            let Some(kind) = kind else { continue };
                            // Rebuild the client's datagram the error quotes.
                            let mut orig = peer.q.tx_pool.take();
                            let data = body.get(..qe.len).unwrap_or(&[]);
                            if packet::build_udp(&mut orig, client, qe.dest, data).is_ok() {
                                peer.icmp_error(&mut self.counters, &orig, kind);
                            }
                            peer.q.tx_pool.give(orig);
                        }
                    }
                    continue;
                }
            };
            active = true;
            let data = self.scratch.get(..n).unwrap_or(&[]);
            match target {
                Target::Udp(client) => {
                    if n + packet::udp_overhead(from.is_ipv6()) > mtu {
                        self.counters.drop(DropReason::ReturnTooBig);
                        continue;
                    }
                    peer.emit(&mut self.counters, |b| {
                        packet::build_udp(b, from, client, data)
                    });
                }
                Target::Ping(client, ident) => {
                    let reply = if client.is_ipv6() {
                        Icmpv6Packet::new_checked(data).ok().and_then(|p| {
                            (p.msg_type() == Icmpv6Message::EchoReply).then(|| p.echo_seq_no())
                        })
                    } else {
                        Icmpv4Packet::new_checked(data).ok().and_then(|p| {
                            (p.msg_type() == Icmpv4Message::EchoReply).then(|| p.echo_seq_no())
                        })
                    };
                    let body = data.get(packet::ICMP_ECHO_HEADER_LEN..).unwrap_or(&[]);
                    if let Some(seq) = reply
                        && n + packet::udp_overhead(client.is_ipv6()) <= mtu
                    {
                        peer.emit(&mut self.counters, |b| {
                            packet::build_echo_reply(b, from.ip(), client, ident, seq, body)
                        });
                    }
                }
            }
        }
        if active {
            self.flows.touch(id, now);
        }
        if blocked {
            // Readable, but the client's queue is full: wait for a drain.
            self.flows.block(id);
        } else if exhausted {
            // Budget spent with data left: come back at once.
            self.flows.wake(id);
        }
    }

    // ---------------------------------------------------------------- ICMP echo

    #[allow(clippy::too_many_arguments)]
    fn echo_request(
        &mut self,
        lease: LeaseId,
        pkt: &[u8],
        p: &Parsed,
        ident: u16,
        seq: u16,
        data: &[u8],
        now: Instant,
    ) {
        if self.ping_unavailable {
            self.counters.drop(DropReason::PingUnavailable);
            return;
        }
        let key = PingKey {
            lease,
            client: p.src,
            ident,
        };
        let id = match self.flows.lookup(&key.flow_key()) {
            Some(id) => id,
            None => {
                if !self.admit(&key.flow_key(), pkt) {
                    return;
                }
                let mut sock = match egress::udp_bind(
                    Kind::Ping,
                    p.src.is_ipv6(),
                    &self.config.egress,
                    self.socket_hook.as_mut(),
                ) {
                    Ok(s) => s,
                    Err(e) => {
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EACCES | libc::EPERM | libc::EPROTONOSUPPORT)
                        ) {
                            // net.ipv4.ping_group_range excludes us: remember it.
                            tracing::info!("unprivileged ICMP echo sockets are not allowed");
                            self.ping_unavailable = true;
                        }
                        self.counters.drop(DropReason::PingUnavailable);
                        return;
                    }
                };
                let token = Token(self.flows.next_id() as usize);
                if self
                    .poll
                    .registry()
                    .register(&mut sock, token, Interest::READABLE)
                    .is_err()
                {
                    self.counters.drop(DropReason::SendFailed);
                    return;
                }
                let flow = Flow::Ping(PingFlow {
                    key,
                    sock,
                    readable: false,
                });
                let id = self.flows.insert(key.flow_key(), flow, now, None);
                self.schedule_sweep(now);
                id
            }
        };
        self.flows.touch(id, now);
        let Some(Flow::Ping(flow)) = self.flows.get_mut(id) else {
            return;
        };
        // The kernel fills in the identifier (the socket's "port") and the checksum.
        let mut msg = Vec::with_capacity(8 + data.len());
        msg.extend_from_slice(&[if p.src.is_ipv6() { 128 } else { 8 }, 0, 0, 0]);
        msg.extend_from_slice(&ident.to_be_bytes());
        msg.extend_from_slice(&seq.to_be_bytes());
        msg.extend_from_slice(data);
        if let Err(e) = flow.sock.send_to(&msg, SocketAddr::new(p.dst, 0)) {
            self.counters.drop(DropReason::SendFailed);
            if !is_would_block(&e) {
                self.datagram_error(lease, pkt, &e);
            }
        }
    }

    // ---------------------------------------------------------------- DNS

    fn dns_query(
        &mut self,
        lease: LeaseId,
        client: SocketAddr,
        server: SocketAddr,
        data: &[u8],
        now: Instant,
    ) {
        self.counters.dns_queries += 1;
        let query = match dns::parse_query(data) {
            Ok(q) => q,
            Err(_) => {
                self.counters.drop(DropReason::DnsMalformed);
                return;
            }
        };
        let Some(peer) = self.peers.get_mut(&lease) else {
            return;
        };
        let mtu = usize::from(peer.lease.mtu);
        if let Some(key) = &query.key
            && let Some(mut answer) = self.cache.answer(key, data, now)
        {
            if answer.len() + packet::udp_overhead(client.is_ipv6()) > mtu {
                answer = match dns::error_reply(data, simple_dns::RCODE::NoError, true) {
                    Some(a) => a,
                    None => return,
                };
            }
            self.counters.dns_cache_hits += 1;
            peer.emit(&mut self.counters, |b| {
                packet::build_udp(b, server, client, &answer)
            });
            return;
        }
        let unavailable = !self.egress_available
            || self.upstreams.is_empty()
            || peer.dns_pending >= self.config.caps.max_dns_pending
            || self.dns_pending.len() >= MAX_DNS_PENDING_TOTAL;
        if unavailable {
            self.counters.drop(DropReason::DnsUnavailable);
            if let Some(reply) = dns::error_reply(data, simple_dns::RCODE::ServerFailure, false) {
                peer.emit(&mut self.counters, |b| {
                    packet::build_udp(b, server, client, &reply)
                });
            }
            return;
        }
        let Some(upstream_idx) = self.upstream_socket() else {
            self.counters.drop(DropReason::DnsUnavailable);
            return;
        };
        let mut upstream_id = rand::random::<u16>();
        let mut tries = 0;
        while self.dns_pending.contains_key(&upstream_id) && tries < 16 {
            upstream_id = rand::random();
            tries += 1;
        }
        if self.dns_pending.contains_key(&upstream_id) {
            self.counters.drop(DropReason::DnsUnavailable);
            return;
        }
        let mut forwarded = data.to_vec();
        dns::set_id(&mut forwarded, upstream_id);
        let Some(up) = self.upstreams.get(upstream_idx) else {
            return;
        };
        let Some(sock) = &up.sock else { return };
        match sock.send_to(&forwarded, up.addr) {
            Ok(_) => {}
            Err(_) => {
                self.counters.drop(DropReason::SendFailed);
                return;
            }
        }
        self.counters.dns_upstream_queries += 1;
        if let Some(peer) = self.peers.get_mut(&lease) {
            peer.dns_pending += 1;
        }
        self.dns_pending.insert(
            upstream_id,
            PendingDns {
                lease,
                client,
                server,
                client_id: query.id,
                key: query.key,
                query: data.to_vec(),
                upstream: upstream_idx,
                deadline: now + self.config.timeouts.dns_query,
            },
        );
        self.schedule_sweep(now);
    }

    /// The preferred upstream, its socket created (and registered) if need be.
    fn upstream_socket(&mut self) -> Option<usize> {
        let idx = self.preferred_upstream % self.upstreams.len().max(1);
        let up = self.upstreams.get_mut(idx)?;
        if up.sock.is_none() {
            let mut sock = egress::udp_bind(
                Kind::Udp,
                up.addr.is_ipv6(),
                &self.config.egress,
                self.socket_hook.as_mut(),
            )
            .ok()?;
            self.poll
                .registry()
                .register(&mut sock, Token(DNS_TOKEN_BASE + idx), Interest::READABLE)
                .ok()?;
            up.sock = Some(sock);
        }
        Some(idx)
    }

    fn drop_dns_pending(&mut self, id: u16) {
        if let Some(p) = self.dns_pending.remove(&id)
            && let Some(peer) = self.peers.get_mut(&p.lease)
        {
            peer.dns_pending = peer.dns_pending.saturating_sub(1);
        }
    }

    fn dns_read(&mut self, idx: usize, now: Instant) {
        loop {
            let Some(up) = self.upstreams.get(idx) else {
                return;
            };
            let Some(sock) = &up.sock else { return };
            let (n, from) = match sock.recv_from(&mut self.scratch) {
                Ok(r) => r,
                Err(e) if is_would_block(&e) => return,
                Err(_) => continue,
            };
            if from != up.addr {
                continue;
            }
            let Some(resp) = self.scratch.get(..n) else {
                continue;
            };
            let Ok(id) = simple_dns::Packet::parse(resp).map(|p| p.id()) else {
                self.counters.drop(DropReason::DnsMalformed);
                continue;
            };
            let Some(pending) = self.dns_pending.get(&id) else {
                continue;
            };
            if pending.upstream != idx {
                continue;
            }
            let ttl = match dns::check_response(
                resp,
                id,
                pending.key.as_ref(),
                self.config.timeouts.dns_max_ttl,
            ) {
                Ok(ttl) => ttl,
                Err(_) => {
                    // Not an answer to this question: ignore it (spoofing attempt or
                    // stale), the query stays pending.
                    self.counters.drop(DropReason::DnsMalformed);
                    continue;
                }
            };
            let mut answer = resp.to_vec();
            let Some(pending) = self.dns_pending.remove(&id) else {
                continue;
            };
            if let (Some(key), Some(ttl)) = (pending.key.clone(), ttl) {
                self.cache.insert(key, &answer, ttl, now);
            }
            let Some(peer) = self.peers.get_mut(&pending.lease) else {
                continue;
            };
            peer.dns_pending = peer.dns_pending.saturating_sub(1);
            dns::set_id(&mut answer, pending.client_id);
            if answer.len() + packet::udp_overhead(pending.client.is_ipv6())
                > usize::from(peer.lease.mtu)
            {
                match dns::error_reply(&pending.query, simple_dns::RCODE::NoError, true) {
                    Some(a) => answer = a,
                    None => continue,
                }
            }
            self.counters.dns_upstream_answers += 1;
            peer.emit(&mut self.counters, |b| {
                packet::build_udp(b, pending.server, pending.client, &answer)
            });
        }
    }

    // ---------------------------------------------------------------- the loop

    fn schedule_sweep(&mut self, now: Instant) {
        if self.next_sweep.is_none() {
            self.next_sweep = Some(now + SWEEP_INTERVAL);
        }
    }

    /// Does all pending work: OS socket events, client packets, smoltcp timers, flow
    /// timeouts. Returns when it next needs to run (`None`: only on new input).
    ///
    /// Only flows with work are serviced: those woken by a packet, an OS event or a
    /// drain, and those whose smoltcp timer is due. Idle flows cost nothing here.
    pub fn poll(&mut self, now: Instant) -> Option<Instant> {
        if self.events_pending {
            self.events_pending = false;
            self.collect_events();
            self.handle_ready(now);
        }
        self.events_left = false;
        if self
            .poll
            .poll(&mut self.events, Some(Duration::ZERO))
            .is_ok()
        {
            self.collect_events();
            // A full buffer may have left events behind.
            self.events_left = self.ready.len() >= EVENTS;
            self.handle_ready(now);
        }
        let smol_now = self.smol(now);
        for p in self.peers.values_mut() {
            if !p.q.stray_rx.is_empty() {
                p.iface
                    .poll(smol_now, &mut p.q.stray_link(), &mut p.sockets);
            }
        }
        let mut run = std::mem::take(&mut self.run_scratch);
        self.flows.take_runnable(now, &mut run);
        for &id in &run {
            self.service_flow(id, now, smol_now);
        }
        self.run_scratch = run;
        if self.next_sweep.is_some_and(|t| t <= now) {
            self.next_sweep = None;
            self.sweep(now);
            if !self.flows.is_empty() || !self.dns_pending.is_empty() {
                self.next_sweep = Some(now + SWEEP_INTERVAL);
            }
        }
        if self.has_work() {
            return Some(now);
        }
        let next = self.flows.next_timer().map(|t| t.max(now));
        match (next, self.next_sweep) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether [`poll`](Self::poll) has work at once: runnable flows (new packets,
    /// room after [`drain_outbound`](Self::drain_outbound)) or OS socket events its
    /// last `epoll_wait` could not take. An event loop sleeps only when this is false.
    pub fn has_work(&self) -> bool {
        self.flows.has_runnable() || self.events_left
    }

    fn collect_events(&mut self) {
        self.ready.clear();
        for ev in self.events.iter() {
            self.ready.push((
                ev.token(),
                ev.is_readable() || ev.is_read_closed() || ev.is_error(),
                ev.is_writable() || ev.is_write_closed() || ev.is_error(),
            ));
        }
    }

    fn handle_ready(&mut self, now: Instant) {
        let ready = std::mem::take(&mut self.ready);
        for &(token, readable, writable) in &ready {
            if token.0 >= DNS_TOKEN_BASE {
                self.dns_read(token.0 - DNS_TOKEN_BASE, now);
                continue;
            }
            let id = token.0 as FlowId;
            match self.flows.get_mut(id) {
                Some(Flow::Tcp(f)) => {
                    if matches!(f.state, TcpState::Connecting { .. }) {
                        self.tcp_connect_event(id, writable, now);
                        continue;
                    }
                    f.relay.readable |= readable;
                    f.relay.writable |= writable;
                }
                Some(Flow::Udp(f)) => f.readable |= readable,
                Some(Flow::Ping(f)) => f.readable |= readable,
                None => continue,
            }
            self.flows.wake(id);
        }
        self.ready = ready;
    }

    /// Services one flow that has work: a datagram mapping reads what its OS socket
    /// holds; an open TCP flow runs its smoltcp interface and relays both ways, then
    /// asks for its next smoltcp timer (or waits for a drain when the lease's
    /// outbound queue is full, so that a stalled client never makes the loop spin).
    fn service_flow(&mut self, id: FlowId, now: Instant, smol_now: SmolInstant) {
        let Some(flow) = self.flows.get_mut(id) else {
            return;
        };
        let flow = match flow {
            Flow::Tcp(f) => f,
            Flow::Udp(_) | Flow::Ping(_) => {
                self.dgram_read(id, now);
                return;
            }
        };
        let TcpFlow {
            key,
            stream,
            state,
            relay: st,
        } = flow;
        let TcpState::Open(open) = state else {
            return;
        };
        let Some(peer) = self.peers.get_mut(&key.lease) else {
            return;
        };
        let OpenTcp {
            iface,
            sockets,
            handle,
            rx,
            opened,
        } = &mut **open;
        iface.poll(smol_now, &mut peer.q.link(rx), sockets);
        st.to_os = 0;
        let mut moved_any = false;
        let mut again = false;
        let mut rounds = 0;
        loop {
            let moved = relay(
                stream,
                st,
                key.client,
                sockets.get_mut::<tcp::Socket>(*handle),
            );
            iface.poll(smol_now, &mut peer.q.link(rx), sockets);
            if !moved {
                break;
            }
            moved_any = true;
            rounds += 1;
            if rounds == RELAY_ROUNDS {
                // Still moving: give the other flows and leases a turn, and come
                // back at once (the OS side may not signal again: edge-triggered).
                again = true;
                break;
            }
        }
        let blocked = !peer.q.tx.has_room(peer.q.mtu);
        let sock = sockets.get::<tcp::Socket>(*handle);
        if let Some(abortive) = finished_state(st, sock, *opened, now) {
            self.forget_flow(id, abortive);
            return;
        }
        // Buffers that limit the flow double (up to the configured size, within the
        // lease's buffer cap); the new room is used at once.
        let (rx_cap, tx_cap) = (sock.recv_capacity(), sock.send_capacity());
        let (grow_rx, grow_tx) = grow_wanted(st, sock, self.config.tcp_buffer_size);
        let (new_rx, new_tx) = (rx_cap.max(grow_rx), tx_cap.max(grow_tx));
        if (new_rx, new_tx) != (rx_cap, tx_cap)
            && self
                .flows
                .resize_buffers(id, new_rx + new_tx, &self.config.caps)
                .is_ok()
            && let Some(open) = self.open_tcp(id)
        {
            let sock = open.sockets.get_mut::<tcp::Socket>(open.handle);
            if new_rx != rx_cap {
                let _ = sock.replace_rx_buffer(vec![0; new_rx]);
            }
            if new_tx != tx_cap {
                let _ = sock.replace_tx_buffer(vec![0; new_tx]);
            }
            // Growing keeps all data, so both succeed; keep the books right anyway.
            let bytes = sock.recv_capacity() + sock.send_capacity();
            let _ = self.flows.resize_buffers(id, bytes, &self.config.caps);
            self.counters.tcp_buffer_grows += 1;
            again = true;
        }
        let Some(open) = self.open_tcp(id) else {
            return;
        };
        let next = open.iface.poll_at(smol_now, &open.sockets);
        if moved_any {
            self.flows.touch(id, now);
        }
        if blocked {
            self.flows.block(id);
        } else if again {
            self.flows.wake(id);
        } else if let Some(t) = next {
            self.flows.set_timer(id, std_time(self.epoch, t));
        }
    }

    fn sweep(&mut self, now: Instant) {
        for (id, why) in self.flows.expired(now, &self.config.timeouts) {
            match why {
                Expiry::ConnectTimeout => {
                    let Some(Flow::Tcp(flow)) = self.flows.get_mut(id) else {
                        continue;
                    };
                    let TcpState::Connecting { syn } = &mut flow.state else {
                        continue;
                    };
                    let syn = std::mem::take(syn);
                    let lease = flow.key.lease;
                    self.forget_flow(id, true);
                    self.counters.tcp_unreachable += 1;
                    if let Some(peer) = self.peers.get_mut(&lease) {
                        peer.icmp_error(&mut self.counters, &syn, IcmpError::HostUnreachable);
                    }
                }
                Expiry::Idle => {
                    self.counters.idle_timeouts += 1;
                    self.close_flow_abortively(id);
                }
            }
        }
        self.shrink_idle_buffers(now);
        let late: Vec<u16> = self
            .dns_pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        if !late.is_empty() && !self.upstreams.is_empty() {
            // The preferred upstream did not answer: try the next one next time.
            self.preferred_upstream = (self.preferred_upstream + 1) % self.upstreams.len();
        }
        for id in late {
            self.drop_dns_pending(id);
        }
        self.cache.expire(now);
    }
}

/// A smoltcp interface in any-IP mode over `rx` (a flow's queue) or, for `None`,
/// the lease's stray queue; MTU = the lease MTU, so smoltcp's MSS follows it.
fn new_interface(q: &mut LeaseQueues, now: SmolInstant, rx: Option<&mut Queue>) -> Interface {
    let mut cfg = smoltcp::iface::Config::new(HardwareAddress::Ip);
    cfg.random_seed = rand::random();
    let mut iface = match rx {
        Some(rx) => Interface::new(cfg, &mut q.link(rx), now),
        None => Interface::new(cfg, &mut q.stray_link(), now),
    };
    iface.set_any_ip(true);
    iface
}

fn std_time(epoch: Instant, t: SmolInstant) -> Instant {
    epoch + Duration::from_micros(u64::try_from(t.total_micros()).unwrap_or(0))
}

/// Moves data both ways between a flow's OS socket and its smoltcp socket, as far as
/// each side's buffers allow. Returns whether anything moved.
fn relay(
    stream: &mio::net::TcpStream,
    st: &mut RelayState,
    client: SocketAddr,
    sock: &mut tcp::Socket<'static>,
) -> bool {
    let mut moved = false;
    if !st.established {
        use tcp::State::*;
        if !matches!(
            sock.state(),
            Established | FinWait1 | FinWait2 | CloseWait | Closing | LastAck | TimeWait
        ) {
            return false;
        }
        if sock
            .remote_endpoint()
            .map(|e| SocketAddr::new(e.addr.into(), e.port))
            != Some(client)
        {
            // Cannot happen (the interface only sees this flow's packets): refuse
            // rather than mix two flows.
            sock.abort();
            return true;
        }
        st.established = true;
    }
    // Client → OS, as fast as the OS socket takes it.
    while st.writable && sock.can_recv() {
        let r = sock.recv(|buf| match (&*stream).write(buf) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        });
        match r {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => {
                st.to_os += n;
                moved = true;
            }
            Ok(Err(e)) if is_would_block(&e) => st.writable = false,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(_)) => {
                sock.abort();
                st.os_eof = true;
                return true;
            }
        }
    }
    // Client's FIN, once its data is out: half-close the OS side. (CLOSED without
    // that is the client's RST: the flow is then closed abortively, RST to the server,
    // not FIN.)
    if !st.os_shut_wr
        && !sock.may_recv()
        && sock.recv_queue() == 0
        && sock.state() != tcp::State::Closed
    {
        let _ = stream.shutdown(Shutdown::Write);
        st.os_shut_wr = true;
        moved = true;
    }
    // OS → client, only as far as the smoltcp send buffer has room.
    while st.readable && !st.os_eof && sock.may_send() && sock.send_queue() < sock.send_capacity() {
        let r = sock.send(|buf| {
            if buf.is_empty() {
                return (0, Ok(None));
            }
            match (&*stream).read(buf) {
                Ok(n) => (n, Ok(Some(n))),
                Err(e) => (0, Err(e)),
            }
        });
        match r {
            Ok(Ok(Some(0))) => {
                st.os_eof = true;
                sock.close();
                moved = true;
            }
            Ok(Ok(Some(_))) => moved = true,
            Ok(Ok(None)) | Err(_) => break,
            Ok(Err(e)) if is_would_block(&e) => st.readable = false,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(_)) => {
                // Reset by the server: reset the client.
                sock.abort();
                st.os_eof = true;
                st.os_shut_wr = true;
                return true;
            }
        }
    }
    moved
}

/// The buffer sizes a flow should grow to, `(rx, tx)` (0: no change): the receive
/// buffer when the client filled at least half of it since the last service and the
/// OS socket took it all (the window, not the server, was the limit); the send
/// buffer when it is full, the server has more, and the client's window would take
/// more (the buffer, not a slow client, is the limit).
fn grow_wanted(st: &RelayState, sock: &tcp::Socket<'static>, max: usize) -> (usize, usize) {
    let (rx_cap, tx_cap) = (sock.recv_capacity(), sock.send_capacity());
    let rx = if rx_cap < max && st.writable && st.to_os >= rx_cap / 2 {
        (rx_cap * 2).min(max)
    } else {
        0
    };
    let tx = if tx_cap < max
        && st.readable
        && !st.os_eof
        && sock.may_send()
        && sock.send_queue() >= tx_cap
        && sock.remote_window() >= tx_cap
    {
        (tx_cap * 2).min(max)
    } else {
        0
    };
    (rx, tx)
}

/// Whether a flow is over: `Some(abortive)` when it can be forgotten.
fn finished_state(
    st: &RelayState,
    sock: &tcp::Socket<'static>,
    opened: Instant,
    now: Instant,
) -> Option<bool> {
    match sock.state() {
        // Aborted, reset by the client, or closed after LAST-ACK.
        tcp::State::Closed => Some(!(st.os_eof && st.os_shut_wr)),
        tcp::State::TimeWait if sock.recv_queue() == 0 => Some(false),
        tcp::State::Listen if now.duration_since(opened) >= LISTEN_GRACE => Some(true),
        _ => None,
    }
}
