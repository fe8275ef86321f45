//! The `vpnshare-netstack` process: start-up, confinement and the event loop around
//! [`Netstack`]. See `docs/netstack.md` ("The process") for the contract.
//!
//! One thread, one mio (epoll) loop over
//! - the netstack's own epoll descriptor ([`Netstack::as_raw_fd`], its OS sockets),
//! - the broker channel (fd 3, `ipc_schema` `broker-netstack`, this end `NetstackEnd`),
//! - one data channel per lease (`worker-netstack`, from `LeaseAdded`).
//!
//! The broker is trusted and sends small frames: its channel is an
//! [`ipc_schema::Channel`], read only once a whole frame is queued (peeked), so a
//! receive never waits. Workers are not trusted and their frames are large (a batch is
//! up to 256 KiB): a data channel is driven without blocking in either direction by
//! [`DataPath`], which frames with ipc-schema's own `frame`, `hello`, `codec` and
//! `data` functions — the same bytes `Channel` reads and writes, the same checks, the
//! same bad-message rule — but keeps partial frames in per-lease buffers instead of
//! waiting for the rest. A worker that stalls mid-frame or stops reading therefore
//! costs one lease's buffers, never the loop.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ipc_schema::frame::{self, HEADER_LEN};
use ipc_schema::hello::{self, ChannelKind, Hello, HelloError};
use ipc_schema::limits::{MAX_FRAME_BROKER_NETSTACK, MAX_FRAME_DATA, MAX_FRAME_HELLO};
use ipc_schema::messages::Protocol;
use ipc_schema::messages::broker_netstack::{
    self as bn, BrokerToNetstack, EgressState, NetstackCounters, NetstackToBroker,
};
use ipc_schema::messages::data::{self, Credit, DataEvent, DataMsgRef};
use ipc_schema::{Channel, ChannelError, SCHEMA_VERSION, codec};
use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, recv, recvmsg, send};
use security::{ConfineOptions, Confinement, Role, Threads};
use vshp::lease::{Lease, LeaseId};

use crate::counters::DropReason;
use crate::{Config, Egress, Netstack, NetstackError, PacketBatch as DrainBatch};

/// The broker channel's descriptor number (process contract).
pub const BROKER_FD: RawFd = 3;

/// Credit the netstack grants a worker when its data channel opens: at least one full
/// batch (256 packets, 256 KiB), as the worker requires, and twice that so the worker
/// can send the next batch while the previous one is processed. The worker never has
/// more than this in flight towards the netstack; it is re-granted as batches are
/// handed to the netstack.
pub const INITIAL_CREDIT: Credit = Credit {
    packets: 512,
    bytes: 512 * 1024,
};

/// Bytes drained from the netstack for one lease at a time (then cut into batches of
/// at most 256 packets / 256 KiB, each sent only while the worker's credit covers it):
/// one full batch, so that large packets (a lease MTU up to 65,000) still travel
/// several to a message.
const DRAIN_BYTES: usize = 64 * 1024;

/// Encoded frames waiting in a lease's send buffer beyond which nothing more is
/// drained for it: its packets then wait in the netstack's bounded outbound queue,
/// whose fullness stalls smoltcp and, through the OS socket buffers, the servers.
/// One full batch may wait while the next is drained.
const SEND_HIGH_WATER: usize = 64 * 1024;

/// The receive buffer of a data channel: one largest frame plus room to read ahead.
const RECV_BUF: usize = 4 + MAX_FRAME_DATA + 64 * 1024;

/// Read (and write) timeout of the broker socket: a backstop only, since a broker
/// frame is read once it is completely queued.
const BROKER_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Room for the encoding of a hello (7 bytes) or a credit (two varints).
const SMALL_BODY: usize = 32;

const TOKEN_NETSTACK: Token = Token(0);
const TOKEN_BROKER: Token = Token(1);
const FIRST_DATA_TOKEN: usize = 2;

/// Process exit codes.
pub mod exit_code {
    /// `Shutdown` from the broker.
    pub const OK: i32 = 0;
    /// Start-up failed (arguments, fd 3, hello, confinement).
    pub const STARTUP: i32 = 1;
    /// The broker channel closed or failed.
    pub const BROKER_GONE: i32 = 2;
    /// The event loop failed (epoll).
    pub const LOOP: i32 = 3;
}

/// Why the process could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("usage: {0}")]
    Usage(String),
    #[error("descriptor {BROKER_FD} (the broker channel) is not open")]
    NoBrokerFd,
    #[error("broker channel: {0}")]
    Channel(#[from] ChannelError),
    #[error("broker socket: {0}")]
    Socket(#[source] io::Error),
    #[error("confinement failed: {0}")]
    Confine(#[from] security::Error),
    #[error("netstack: {0}")]
    Netstack(#[from] NetstackError),
}

/// Why the loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("broker channel: {0}")]
    Broker(#[source] ChannelError),
    #[error("event loop: {0}")]
    Poll(#[source] io::Error),
}

impl RunError {
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Broker(_) => exit_code::BROKER_GONE,
            Self::Poll(_) => exit_code::LOOP,
        }
    }
}

/// The command line: `vpnshare-netstack [--resolv-conf PATH] [--max-flows-per-peer N]
/// [--max-flows N]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// Where the DNS upstreams are read from (once, before confinement).
    pub resolv_conf: PathBuf,
    /// TCP flows per lease (`Caps::max_tcp_flows`; default
    /// [`DEFAULT_TCP_FLOWS_PER_LEASE`](crate::config::DEFAULT_TCP_FLOWS_PER_LEASE)).
    pub max_flows_per_peer: Option<usize>,
    /// Flows of all leases (`Caps::max_total_flows`; default
    /// [`DEFAULT_TOTAL_FLOWS`](crate::config::DEFAULT_TOTAL_FLOWS)), lowered to what the
    /// RLIMIT_NOFILE leaves room for.
    pub max_flows: Option<usize>,
}

pub const USAGE: &str = "vpnshare-netstack [--resolv-conf PATH] [--max-flows-per-peer N] [--max-flows N]   (fd 3: the broker channel; logs on stderr)";

/// Descriptors kept out of the flow budget: stdio, the broker channel, the epoll
/// instances, one data channel per lease, the DNS upstream sockets (at most a quarter
/// of a small limit).
pub const RESERVED_FDS: usize = 1024;

fn count_arg(name: &str, v: Option<String>) -> Result<usize, StartError> {
    v.and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n >= 1)
        .ok_or_else(|| StartError::Usage(format!("{name} needs a count of at least 1\n{USAGE}")))
}

impl Args {
    pub fn parse(mut it: impl Iterator<Item = String>) -> Result<Self, StartError> {
        let mut args = Self {
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            max_flows_per_peer: None,
            max_flows: None,
        };
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--resolv-conf" => {
                    let v = it.next().ok_or_else(|| {
                        StartError::Usage(format!("--resolv-conf needs a path\n{USAGE}"))
                    })?;
                    args.resolv_conf = PathBuf::from(v);
                }
                "--max-flows-per-peer" => {
                    args.max_flows_per_peer = Some(count_arg(&arg, it.next())?);
                }
                "--max-flows" => args.max_flows = Some(count_arg(&arg, it.next())?),
                other => {
                    return Err(StartError::Usage(format!(
                        "unknown argument {other:?}\n{USAGE}"
                    )));
                }
            }
        }
        Ok(args)
    }
}

/// A netstack process that has read its files, opened the broker channel and
/// confined itself.
#[derive(Debug)]
pub struct Started {
    pub broker: Channel<bn::NetstackEnd>,
    pub config: Config,
    pub confinement: Confinement,
}

/// Start-up, in the contract's order: read the DNS upstreams, open the broker channel
/// on fd 3 (hello), `confine(Role::Netstack)` keeping fd 3 and stdio.
pub fn start(args: &Args) -> Result<Started, StartError> {
    let dns_upstreams = match crate::read_resolv_conf(&args.resolv_conf) {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(path = %args.resolv_conf.display(), error = %e,
                "cannot read the DNS upstreams: DNS queries will get SERVFAIL");
            Vec::new()
        }
    };
    tracing::info!(upstreams = ?dns_upstreams, "DNS upstreams");
    // SAFETY: F_GETFD on a plain descriptor number only reads its flags.
    if unsafe { libc::fcntl(BROKER_FD, libc::F_GETFD) } < 0 {
        return Err(StartError::NoBrokerFd);
    }
    // SAFETY: the process contract gives fd 3 to this process as the broker channel; it
    // is open (checked above) and nothing else in this process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(BROKER_FD) };
    let sock = UnixStream::from(owned);
    sock.set_read_timeout(Some(BROKER_IO_TIMEOUT))
        .map_err(StartError::Socket)?;
    sock.set_write_timeout(Some(BROKER_IO_TIMEOUT))
        .map_err(StartError::Socket)?;
    let broker = Channel::<bn::NetstackEnd>::open(sock)?;
    // What `confine` will set RLIMIT_NOFILE to: the role's value, or the hard limit
    // if that is lower (read now: getrlimit is not in the confined allowlist).
    let nofile = security::profile(Role::Netstack).max_open_files.min(
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(_, hard)| hard)
            .unwrap_or(u64::MAX),
    );
    let caps = caps_for(args, nofile);
    tracing::info!(
        max_flows_per_peer = caps.max_tcp_flows,
        max_flows = caps.max_total_flows,
        nofile,
        "flow caps"
    );
    let options = ConfineOptions {
        keep_fds: vec![BROKER_FD],
        keep_stdio: true,
        threads: Threads::Forbidden,
        ..ConfineOptions::default()
    };
    let confinement = security::confine(Role::Netstack, &options)?;
    Ok(Started {
        broker,
        config: Config {
            dns_upstreams,
            caps,
            ..Config::default()
        },
        confinement,
    })
}

/// The caps from the command line, the total lowered to what `nofile` descriptors
/// leave room for (one per flow, [`RESERVED_FDS`] — or a quarter of a smaller limit —
/// kept for the rest), and the per-lease TCP cap to the total.
pub fn caps_for(args: &Args, nofile: u64) -> crate::Caps {
    let mut caps = crate::Caps::default();
    let nofile = usize::try_from(nofile).unwrap_or(usize::MAX);
    let room = nofile.saturating_sub(RESERVED_FDS.min(nofile / 4)).max(1);
    caps.max_total_flows = args.max_flows.unwrap_or(caps.max_total_flows).min(room);
    caps.max_tcp_flows = args
        .max_flows_per_peer
        .unwrap_or(caps.max_tcp_flows)
        .min(caps.max_total_flows);
    caps
}

/// Runs until `Shutdown` (returns [`exit_code::OK`]) or until the broker channel ends.
pub fn run(started: Started) -> Result<i32, RunError> {
    let Started { broker, config, .. } = started;
    let mut ns = Netstack::new(config).map_err(|e| RunError::Poll(io::Error::other(e)))?;
    // Nothing leaves before the broker says where it may (fail closed).
    ns.set_egress_available(false);
    let poll = mio::Poll::new().map_err(RunError::Poll)?;
    let mut p = Process {
        ns,
        broker,
        poll,
        leases: HashMap::new(),
        tokens: HashMap::new(),
        next_token: FIRST_DATA_TOKEN,
        rx_batch: ipc_schema::PacketBatch::new(LeaseId(0)),
        tx_batch: ipc_schema::PacketBatch::new(LeaseId(0)),
        stats: ProcessStats::default(),
        scratch_ids: Vec::new(),
        peek: vec![0; HEADER_LEN + MAX_FRAME_BROKER_NETSTACK],
    };
    let inner = p.ns.as_raw_fd();
    p.poll
        .registry()
        .register(&mut SourceFd(&inner), TOKEN_NETSTACK, Interest::READABLE)
        .map_err(RunError::Poll)?;
    let broker_fd = p.broker.as_fd().as_raw_fd();
    p.poll
        .registry()
        .register(&mut SourceFd(&broker_fd), TOKEN_BROKER, Interest::READABLE)
        .map_err(RunError::Poll)?;
    p.run()
}

#[derive(Debug, Default)]
struct ProcessStats {
    bytes_in: u64,
    bytes_out: u64,
    wrong_lease: u64,
    bad_messages: u64,
}

struct Process {
    ns: Netstack,
    broker: Channel<bn::NetstackEnd>,
    poll: mio::Poll,
    leases: HashMap<LeaseId, DataPath>,
    tokens: HashMap<Token, LeaseId>,
    next_token: usize,
    rx_batch: ipc_schema::PacketBatch,
    tx_batch: ipc_schema::PacketBatch,
    stats: ProcessStats,
    scratch_ids: Vec<LeaseId>,
    peek: Vec<u8>,
}

/// What the broker asked for.
enum BrokerOutcome {
    Continue,
    Shutdown,
}

impl Process {
    fn run(&mut self) -> Result<i32, RunError> {
        let mut events = Events::with_capacity(256);
        loop {
            let next = self.ns.poll(Instant::now());
            self.pump_all();
            // Every wake-up costs a request/response exchange latency, so sleep as soon
            // as nothing is runnable: what is left waits for an event (worker credit,
            // socket space) or a timer. The netstack's epoll descriptor is registered
            // edge-triggered; `has_work` also covers events its own bounded
            // `epoll_wait` left behind, which would raise no new edge.
            let timeout = if self.ns.has_work() {
                Some(Duration::ZERO)
            } else {
                next.map(|t| t.saturating_duration_since(Instant::now()))
            };
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(RunError::Poll(e)),
            }
            for ev in events.iter() {
                match ev.token() {
                    TOKEN_NETSTACK => {}
                    TOKEN_BROKER => {
                        if let BrokerOutcome::Shutdown = self.on_broker()? {
                            return Ok(exit_code::OK);
                        }
                    }
                    t => {
                        let Some(&lease) = self.tokens.get(&t) else {
                            continue;
                        };
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.on_data_readable(lease);
                        }
                        if ev.is_writable() || ev.is_error() {
                            self.flush(lease);
                        }
                    }
                }
            }
        }
    }

    // ----- the broker channel -----

    /// Handles every complete frame the broker has queued.
    fn on_broker(&mut self) -> Result<BrokerOutcome, RunError> {
        loop {
            match self.broker_frame_ready() {
                FrameReady::No => return Ok(BrokerOutcome::Continue),
                FrameReady::Closed => {
                    tracing::info!("broker closed the channel: netstack stops");
                    return Err(RunError::Broker(ChannelError::Closed));
                }
                FrameReady::Yes => {}
            }
            let m = self.broker.recv().map_err(RunError::Broker)?;
            let mut fds = m.fds.into_iter();
            match m.msg {
                BrokerToNetstack::LeaseAdded { lease } => match fds.next() {
                    Some(fd) => self.add_lease(&lease, fd),
                    None => tracing::warn!(lease = lease.id.0, "LeaseAdded without a descriptor"),
                },
                BrokerToNetstack::LeaseRemoved { lease } => {
                    self.drop_lease(lease, "session ended", true);
                }
                BrokerToNetstack::PeerRevoked { lease } => {
                    self.drop_lease(lease, "peer revoked", true);
                }
                BrokerToNetstack::Egress(state) => self.set_egress(state),
                BrokerToNetstack::ReportCounters => {
                    let c = self.counters();
                    self.broker
                        .send(&NetstackToBroker::Counters(c), &[])
                        .map_err(RunError::Broker)?;
                }
                BrokerToNetstack::Shutdown { reason } => {
                    tracing::info!(?reason, "shutdown");
                    return Ok(BrokerOutcome::Shutdown);
                }
            }
        }
    }

    /// Peeks at the broker socket: is a whole frame queued? A frame whose header
    /// claims more than the channel's limit counts as ready, so that `recv` refuses it
    /// at once (bad-message rule).
    fn broker_frame_ready(&mut self) -> FrameReady {
        let fd = self.broker.as_fd().as_raw_fd();
        let n = loop {
            match recv(
                fd,
                &mut self.peek,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(n) => break n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return FrameReady::No,
                // Let `recv` report the error (and poison the channel).
                Err(_) => return FrameReady::Yes,
            }
        };
        if n == 0 {
            return FrameReady::Closed;
        }
        let Some(&[a, b, c, d]) = self.peek.get(..4) else {
            return FrameReady::No;
        };
        if n < 4 {
            return FrameReady::No;
        }
        let len = u32::from_le_bytes([a, b, c, d]) as usize;
        if len > MAX_FRAME_BROKER_NETSTACK || n >= 4 + len {
            FrameReady::Yes
        } else {
            FrameReady::No
        }
    }

    fn send_broker(&mut self, msg: &NetstackToBroker) {
        if let Err(e) = self.broker.send(msg, &[]) {
            // The loop notices the dead channel at its next read and exits.
            tracing::warn!(error = %e, "cannot report to the broker");
        }
    }

    fn set_egress(&mut self, state: EgressState) {
        tracing::info!(?state, "egress");
        match state {
            EgressState::Any => {
                self.ns.set_egress(Egress::Any);
                self.ns.set_egress_available(true);
            }
            EgressState::VpnUp { ifindex } => {
                self.ns.set_egress(Egress::InterfaceIndex(ifindex));
                self.ns.set_egress_available(true);
            }
            EgressState::VpnDown => self.ns.set_egress_available(false),
        }
    }

    fn counters(&self) -> NetstackCounters {
        let c = self.ns.counters();
        let bad = [
            DropReason::Malformed,
            DropReason::Fragment,
            DropReason::Unsupported,
            DropReason::WrongSource,
            DropReason::TooBig,
            DropReason::DnsMalformed,
        ]
        .iter()
        .map(|r| c.drops(*r))
        .sum();
        NetstackCounters {
            tcp_flows: c.tcp_flows,
            udp_flows: c.udp_flows,
            packets_in: c.packets_in,
            packets_out: c.packets_out,
            bytes_in: self.stats.bytes_in,
            bytes_out: self.stats.bytes_out,
            dns_queries: c.dns_queries,
            dropped_no_egress: c.drops(DropReason::EgressUnavailable),
            dropped_bad_packet: bad,
            dropped_wrong_lease: c
                .drops(DropReason::UnknownLease)
                .saturating_add(self.stats.wrong_lease),
            dropped_no_credit: c.drops(DropReason::QueueFull),
        }
    }

    // ----- leases and their data channels -----

    fn add_lease(&mut self, lease: &Lease, fd: OwnedFd) {
        let id = lease.id;
        let same = self.ns.leases().any(|l| l == id);
        if same {
            // A new data channel for a lease the netstack already serves (a resumed
            // session): keep its flows, replace the channel.
            self.close_channel(id);
        } else if let Err(e) = self.ns.add_lease(lease) {
            tracing::warn!(lease = id.0, error = %e, "lease refused");
            return;
        }
        let token = Token(self.next_token);
        self.next_token = self.next_token.wrapping_add(1).max(FIRST_DATA_TOKEN);
        match DataPath::open(fd, token, &self.poll) {
            Ok(dp) => {
                tracing::info!(lease = id.0, addr = %lease.ipv4.addr, "lease added");
                self.tokens.insert(token, id);
                self.leases.insert(id, dp);
                // The worker's hello and credit may already be queued.
                self.on_data_readable(id);
            }
            Err(e) => {
                tracing::warn!(lease = id.0, error = %e, "data channel unusable: lease dropped");
                self.ns.remove_lease(id);
            }
        }
    }

    /// Closes a lease's data channel (deregistered, socket closed), keeping its flows.
    fn close_channel(&mut self, id: LeaseId) {
        if let Some(dp) = self.leases.remove(&id) {
            self.tokens.remove(&dp.token);
            let fd = dp.sock.as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
            let _ = dp.sock.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Drops a lease: its flows (TCP peers get RST) and its data channel.
    fn drop_lease(&mut self, id: LeaseId, why: &str, answer: bool) {
        let flows = self
            .ns
            .lease_stats(id)
            .map(|s| s.tcp_flows + s.udp_flows + s.ping_flows)
            .unwrap_or(0);
        self.close_channel(id);
        self.ns.remove_lease(id);
        tracing::info!(lease = id.0, flows, why, "lease dropped");
        if answer {
            self.send_broker(&NetstackToBroker::LeaseDropped {
                lease: id,
                flows_dropped: u32::try_from(flows).unwrap_or(u32::MAX),
            });
        }
    }

    /// Reads every frame a data channel has queued and acts on it.
    fn on_data_readable(&mut self, id: LeaseId) {
        let Some(dp) = self.leases.get_mut(&id) else {
            return;
        };
        let result = dp.receive(&mut self.rx_batch, |dp, batch| {
            if batch.lease() != id {
                // Defence in depth: the batch names another lease.
                self.stats.wrong_lease += batch.len() as u64;
                return Ok(());
            }
            let bytes = batch.total_bytes();
            self.stats.bytes_in += bytes as u64;
            self.ns.push_packets(id, batch.iter());
            dp.owed.packets = dp
                .owed
                .packets
                .saturating_add(u32::try_from(batch.len()).unwrap_or(u32::MAX));
            dp.owed.bytes = dp
                .owed
                .bytes
                .saturating_add(u32::try_from(bytes).unwrap_or(u32::MAX));
            Ok(())
        });
        match result {
            Ok(()) => {
                // Re-grant what was handed to the netstack, in one frame per burst.
                let dp = match self.leases.get_mut(&id) {
                    Some(dp) => dp,
                    None => return,
                };
                // Only once a quarter of the initial grant is owed: the worker then
                // still holds three quarters (more than the full batch it needs), and
                // a request/response exchange does not cost the worker a wake-up for
                // a credit frame each time.
                if dp.owed.packets >= INITIAL_CREDIT.packets / 4
                    || dp.owed.bytes >= INITIAL_CREDIT.bytes / 4
                {
                    let owed = std::mem::replace(
                        &mut dp.owed,
                        Credit {
                            packets: 0,
                            bytes: 0,
                        },
                    );
                    dp.granted.packets = dp.granted.packets.saturating_add(owed.packets);
                    dp.granted.bytes = dp.granted.bytes.saturating_add(owed.bytes);
                    if let Err(e) = dp.queue(&DataMsgRef::Credit(owed)) {
                        tracing::warn!(lease = id.0, error = %e, "cannot encode credit");
                    }
                }
                self.flush(id);
            }
            Err(DataError::Closed) => {
                // The worker ended; the broker decides about the lease (LeaseRemoved,
                // or a new channel when the session resumes).
                tracing::info!(lease = id.0, "worker closed its data channel");
                self.close_channel(id);
            }
            Err(e) => {
                if e.is_bad_message() {
                    self.stats.bad_messages += 1;
                    tracing::warn!(kind = %ChannelKind::WorkerNetstack, local = %ipc_schema::Role::Netstack,
                        peer = %ipc_schema::Role::Worker, lease = id.0, error = %e,
                        "bad IPC message: channel closed, lease dropped");
                } else {
                    tracing::warn!(lease = id.0, error = %e, "data channel failed: lease dropped");
                }
                self.drop_lease(id, "data channel failed", true);
            }
        }
    }

    /// Writes what a lease's send buffer holds; on a dead socket drops the lease.
    /// Asks for writability while bytes are left, and stops asking once they are sent.
    fn flush(&mut self, id: LeaseId) {
        let Some(dp) = self.leases.get_mut(&id) else {
            return;
        };
        if let Err(e) = dp.flush() {
            tracing::info!(lease = id.0, error = %e, "worker gone (send failed)");
            self.close_channel(id);
            return;
        }
        let want = dp.pending_send() > 0;
        if want == dp.write_armed {
            return;
        }
        let interest = if want {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        let raw = dp.sock.as_raw_fd();
        match self
            .poll
            .registry()
            .reregister(&mut SourceFd(&raw), dp.token, interest)
        {
            Ok(()) => dp.write_armed = want,
            Err(e) => {
                tracing::warn!(lease = id.0, error = %e, "data channel: epoll failed");
                self.close_channel(id);
            }
        }
    }

    /// Moves the netstack's output to the workers, within their credit. Draining makes
    /// room for flows that waited for it (`Netstack::has_work` then says so).
    fn pump_all(&mut self) {
        let mut ids = std::mem::take(&mut self.scratch_ids);
        ids.clear();
        ids.extend(self.ns.leases_with_output());
        ids.extend(
            self.leases
                .iter()
                .filter(|(_, d)| d.staged_left() > 0)
                .map(|(id, _)| *id),
        );
        ids.sort_unstable();
        ids.dedup();
        for &id in &ids {
            self.pump(id);
        }
        self.scratch_ids = ids;
    }

    fn pump(&mut self, id: LeaseId) {
        let Some(dp) = self.leases.get_mut(&id) else {
            return;
        };
        if !dp.hello_done {
            return;
        }
        loop {
            // Enough queued: write it, and go on only if the socket took it all. A
            // stop with the socket still accepting would leave the rest waiting for
            // an event that may never come (writability is asked for only while
            // bytes are left; `Process::flush`).
            if dp.pending_send() > SEND_HIGH_WATER && (dp.flush().is_err() || dp.pending_send() > 0)
            {
                break;
            }
            if dp.staged_left() == 0 {
                dp.staged.clear();
                dp.staged_pos = 0;
                if self.ns.drain_outbound(id, &mut dp.staged, DRAIN_BYTES) == 0 {
                    break;
                }
            }
            self.tx_batch.clear();
            self.tx_batch.set_lease(id);
            let mut bytes: u32 = 0;
            let mut taken = 0;
            for pkt in dp.staged.iter().skip(dp.staged_pos) {
                let len = u32::try_from(pkt.len()).unwrap_or(u32::MAX);
                let packets = u32::try_from(taken + 1).unwrap_or(u32::MAX);
                if packets > dp.credit.packets || bytes.saturating_add(len) > dp.credit.bytes {
                    break;
                }
                if self.tx_batch.push(pkt).is_err() {
                    break; // the batch is full: the rest goes in the next one
                }
                bytes = bytes.saturating_add(len);
                taken += 1;
            }
            if taken == 0 {
                break; // waiting for credit
            }
            if let Err(e) = dp.queue(&DataMsgRef::Packets(&self.tx_batch)) {
                tracing::warn!(lease = id.0, error = %e, "cannot encode a batch");
                break;
            }
            dp.staged_pos += taken;
            dp.credit.packets -= u32::try_from(taken).unwrap_or(u32::MAX);
            dp.credit.bytes -= bytes;
            self.stats.bytes_out += u64::from(bytes);
        }
        self.flush(id);
    }
}

enum FrameReady {
    Yes,
    No,
    Closed,
}

/// What went wrong on a data channel.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("the worker closed the channel")]
    Closed,
    #[error("socket error: {0}")]
    Io(#[source] Errno),
    #[error("bad frame: {0}")]
    Frame(#[from] frame::FrameError),
    #[error(transparent)]
    Hello(#[from] HelloError),
    #[error("malformed message: {0}")]
    Malformed(#[from] ipc_schema::DecodeError),
    #[error("descriptors arrived on the data path, which carries none")]
    UnexpectedFds,
    #[error("a batch of {packets} packets / {bytes} bytes exceeds the credit the worker holds")]
    OverCredit { packets: usize, bytes: usize },
    #[error("encoding failed: {0}")]
    Encode(String),
}

impl DataError {
    /// True when the worker broke the protocol (the bad-message rule counts these).
    pub fn is_bad_message(&self) -> bool {
        matches!(
            self,
            Self::Frame(_)
                | Self::Hello(_)
                | Self::Malformed(_)
                | Self::UnexpectedFds
                | Self::OverCredit { .. }
        )
    }
}

/// One lease's data channel, driven without blocking.
struct DataPath {
    sock: UnixStream,
    token: Token,
    hello_done: bool,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    wbuf: Vec<u8>,
    wpos: usize,
    /// What the worker granted and the netstack has not used yet.
    credit: Credit,
    /// What the netstack granted and the worker has not used yet.
    granted: Credit,
    /// Consumed since the last grant (re-granted after the read burst).
    owed: Credit,
    /// Drained from the netstack, not yet all sent.
    staged: DrainBatch,
    staged_pos: usize,
    /// Whether EPOLLOUT is in the socket's interest set (only while `wbuf` holds
    /// unsent bytes).
    write_armed: bool,
}

impl DataPath {
    /// Takes the netstack's end of a data channel: non-blocking, registered, our hello
    /// and the initial credit queued at once (the worker opens its end at the same
    /// time and waits for our hello).
    fn open(fd: OwnedFd, token: Token, poll: &mio::Poll) -> io::Result<Self> {
        let sock = UnixStream::from(fd);
        sock.set_nonblocking(true)?;
        let raw = sock.as_raw_fd();
        // Readable only: with EPOLLOUT in the interest set every batch the worker
        // reads would wake this loop (the unix socket reports write space on each
        // dequeue). Writability is asked for only while a send is pending (`Process::flush`).
        poll.registry()
            .register(&mut SourceFd(&raw), token, Interest::READABLE)?;
        let mut dp = Self {
            sock,
            token,
            hello_done: false,
            rbuf: vec![0; RECV_BUF],
            rstart: 0,
            rend: 0,
            wbuf: Vec::with_capacity(16 * 1024),
            wpos: 0,
            credit: Credit {
                packets: 0,
                bytes: 0,
            },
            granted: INITIAL_CREDIT,
            owed: Credit {
                packets: 0,
                bytes: 0,
            },
            staged: DrainBatch::new(),
            staged_pos: 0,
            write_armed: false,
        };
        let hello = Hello::new(ChannelKind::WorkerNetstack, ipc_schema::Role::Netstack);
        dp.queue_frame(&hello, SMALL_BODY)
            .map_err(io::Error::other)?;
        dp.queue(&DataMsgRef::Credit(INITIAL_CREDIT))
            .map_err(io::Error::other)?;
        dp.flush().map_err(io::Error::from)?;
        if dp.pending_send() > 0 {
            poll.registry().reregister(
                &mut SourceFd(&raw),
                token,
                Interest::READABLE | Interest::WRITABLE,
            )?;
            dp.write_armed = true;
        }
        Ok(dp)
    }

    fn staged_left(&self) -> usize {
        self.staged.len().saturating_sub(self.staged_pos)
    }

    fn pending_send(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// Appends one data-path frame to the send buffer.
    fn queue(&mut self, msg: &DataMsgRef<'_>) -> Result<(), DataError> {
        // postcard's largest encoding: tag, lease id, count, one length per packet and
        // the byte count as varints, then the bytes; a credit is two varints.
        let bound = match msg {
            DataMsgRef::Packets(b) => 5 + 10 + 10 + 3 * b.len() + 10 + b.total_bytes(),
            DataMsgRef::Credit(_) => SMALL_BODY,
        };
        let max_body = <data::NetstackEnd as Protocol>::MAX_SEND.saturating_sub(1);
        self.queue_frame(msg, bound.min(max_body))
    }

    /// Appends one frame (header, postcard body of at most `bound` bytes) to the send
    /// buffer, exactly as `Channel::send` would write it.
    fn queue_frame<T: serde::Serialize + ?Sized>(
        &mut self,
        msg: &T,
        bound: usize,
    ) -> Result<(), DataError> {
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        }
        let start = self.wbuf.len();
        self.wbuf.resize(start + HEADER_LEN + bound, 0);
        let body = self.wbuf.get_mut(start + HEADER_LEN..).unwrap_or_default();
        let n = match codec::encode_body(msg, body) {
            Ok(b) => b.len(),
            Err(e) => {
                self.wbuf.truncate(start);
                return Err(DataError::Encode(e.to_string()));
            }
        };
        let header = match frame::encode_header(n, SCHEMA_VERSION) {
            Ok(h) => h,
            Err(e) => {
                self.wbuf.truncate(start);
                return Err(e.into());
            }
        };
        if let Some(h) = self.wbuf.get_mut(start..start + HEADER_LEN) {
            h.copy_from_slice(&header);
        }
        self.wbuf.truncate(start + HEADER_LEN + n);
        Ok(())
    }

    /// Sends what the buffer holds until the socket would block.
    fn flush(&mut self) -> Result<(), Errno> {
        let fd = self.sock.as_raw_fd();
        while self.wpos < self.wbuf.len() {
            let rest = self.wbuf.get(self.wpos..).unwrap_or_default();
            match send(fd, rest, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL) {
                Ok(n) => self.wpos += n,
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        Ok(())
    }

    /// Reads everything queued and hands each complete packet batch to `on_batch`.
    fn receive(
        &mut self,
        batch: &mut ipc_schema::PacketBatch,
        mut on_batch: impl FnMut(&mut Self, &ipc_schema::PacketBatch) -> Result<(), DataError>,
    ) -> Result<(), DataError> {
        loop {
            // Every complete frame in the buffer first.
            while let Some((body_start, body_len)) = self.next_frame()? {
                let body_end = body_start + body_len;
                let body = self.rbuf.get(body_start..body_end).unwrap_or_default();
                if !self.hello_done {
                    check_hello(body)?;
                    self.hello_done = true;
                } else {
                    match data::decode_data_into(body, batch)? {
                        DataEvent::Packets => {
                            let packets = batch.len();
                            let bytes = batch.total_bytes();
                            let p = u32::try_from(packets).unwrap_or(u32::MAX);
                            let b = u32::try_from(bytes).unwrap_or(u32::MAX);
                            if p > self.granted.packets || b > self.granted.bytes {
                                return Err(DataError::OverCredit { packets, bytes });
                            }
                            self.granted.packets -= p;
                            self.granted.bytes -= b;
                            self.rstart = body_end;
                            on_batch(self, batch)?;
                            continue;
                        }
                        DataEvent::Credit(c) => {
                            self.credit.packets = self.credit.packets.saturating_add(c.packets);
                            self.credit.bytes = self.credit.bytes.saturating_add(c.bytes);
                        }
                    }
                }
                self.rstart = body_end;
            }
            // Make room: move a partial frame to the front.
            if self.rstart == self.rend {
                self.rstart = 0;
                self.rend = 0;
            } else if self.rstart > 0 {
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
            }
            let fd = self.sock.as_raw_fd();
            let spare = self.rbuf.get_mut(self.rend..).unwrap_or_default();
            if spare.is_empty() {
                // Cannot happen: the buffer holds a largest frame and more.
                return Ok(());
            }
            let mut iov = [io::IoSliceMut::new(spare)];
            let r = recvmsg::<()>(
                fd,
                &mut iov,
                None,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            );
            match r {
                Ok(msg) => {
                    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                        // Descriptors came along: the kernel did not install them
                        // (no control buffer), and the worker broke the contract.
                        return Err(DataError::UnexpectedFds);
                    }
                    let n = msg.bytes;
                    if n == 0 {
                        return Err(DataError::Closed);
                    }
                    self.rend += n;
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return Ok(()),
                Err(Errno::ECONNRESET) => return Err(DataError::Closed),
                Err(e) => return Err(DataError::Io(e)),
            }
        }
    }

    /// The next complete frame in the buffer: (body start, body length), headers
    /// checked against the channel's limits before anything else.
    fn next_frame(&self) -> Result<Option<(usize, usize)>, DataError> {
        let avail = self.rbuf.get(self.rstart..self.rend).unwrap_or_default();
        let Some(&[a, b, c, d, v]) = avail.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let body_len = if self.hello_done {
            frame::parse_header(
                [a, b, c, d, v],
                <data::NetstackEnd as Protocol>::MAX_RECV,
                SCHEMA_VERSION,
            )?
        } else {
            // The hello's version travels in its body (read whatever the peer speaks).
            frame::check_len(u32::from_le_bytes([a, b, c, d]), MAX_FRAME_HELLO)?
        };
        if avail.len() < HEADER_LEN + body_len {
            return Ok(None);
        }
        Ok(Some((self.rstart + HEADER_LEN, body_len)))
    }
}

/// Checks the worker's hello body (7 raw bytes: magic, schema, kind, role).
fn check_hello(body: &[u8]) -> Result<(), DataError> {
    let &[m0, m1, m2, m3, schema_version, kind, role] = body else {
        return Err(HelloError::NotAHello("wrong length").into());
    };
    let theirs = Hello {
        magic: [m0, m1, m2, m3],
        schema_version,
        kind,
        role,
    };
    hello::check(
        &theirs,
        ChannelKind::WorkerNetstack,
        ipc_schema::Role::Netstack,
        ipc_schema::Role::Worker,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn args(v: &[&str]) -> Result<Args, StartError> {
        Args::parse(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn flow_caps_come_from_the_command_line_within_the_descriptor_limit() {
        let a = args(&["--max-flows-per-peer", "20000", "--max-flows", "30000"]).unwrap();
        assert_eq!(
            (a.max_flows_per_peer, a.max_flows),
            (Some(20_000), Some(30_000))
        );
        let caps = caps_for(&a, 65_536);
        assert_eq!((caps.max_tcp_flows, caps.max_total_flows), (20_000, 30_000));
        // A lower RLIMIT_NOFILE lowers the total, and the per-peer cap with it.
        let caps = caps_for(&a, 8192);
        assert_eq!(caps.max_total_flows, 8192 - RESERVED_FDS);
        assert_eq!(caps.max_tcp_flows, 8192 - RESERVED_FDS);
        // A small hard limit keeps three quarters for flows.
        let caps = caps_for(&args(&[]).unwrap(), 1024);
        assert_eq!(caps.max_total_flows, 768);
        // Defaults.
        let caps = caps_for(&args(&[]).unwrap(), 65_536);
        assert_eq!(
            (caps.max_tcp_flows, caps.max_total_flows),
            (
                crate::config::DEFAULT_TCP_FLOWS_PER_LEASE,
                crate::config::DEFAULT_TOTAL_FLOWS
            )
        );
        for bad in [
            &["--max-flows"][..],
            &["--max-flows", "0"],
            &["--max-flows-per-peer", "many"],
            &["--bogus"],
        ] {
            assert!(matches!(args(bad), Err(StartError::Usage(_))), "{bad:?}");
        }
    }
}
