//! The worker process around [`WorkerCore`]: start-up (broker channel, then `confine`)
//! and a single-threaded poll(2) loop over the transport, the broker channel and the
//! data path. See `docs/parser-sandbox.md` for the process contract.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc_schema::messages::broker_worker::{self, BrokerToWorker, TransportKind};
use ipc_schema::messages::data::{self, Credit, DataEvent};
use ipc_schema::{Channel, ChannelError, PacketBatch};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use security::{ConfineOptions, Confinement, Role, Threads};
use vshp::framing::StreamDecoder;
use vshp::lease::LeaseId;
use vshp::record::MAX_RECORD_LEN;
use vshp::transport::TransportMode;

use crate::core::{CoreConfig, Exit, WorkerCore};
use crate::oracle::{BrokerLink, BrokerOracle};
use crate::packet_policy::{PacketPolicy, Prefix};

/// The broker channel's descriptor number (process contract).
pub const BROKER_FD: RawFd = 3;
/// The credit window the worker grants the netstack when the data path attaches, and
/// re-grants as it drains batches.
pub const INITIAL_CREDIT: Credit = Credit {
    packets: 1024,
    bytes: 1024 * 1024,
};
/// Credit owed to the netstack is granted back once it reaches this (a quarter of
/// [`INITIAL_CREDIT`]; no batch is larger than 256 packets / 256 KiB, so the netstack
/// never waits for it while it still holds three quarters of its window).
pub const CREDIT_REGRANT: Credit = Credit {
    packets: INITIAL_CREDIT.packets / 4,
    bytes: INITIAL_CREDIT.bytes / 4,
};
const _: () = assert!(
    CREDIT_REGRANT.packets as usize + ipc_schema::limits::MAX_BATCH_PACKETS
        <= INITIAL_CREDIT.packets as usize
        && CREDIT_REGRANT.bytes as usize + ipc_schema::limits::MAX_BATCH_BYTES
            <= INITIAL_CREDIT.bytes as usize
);
/// Reads per readable burst before the other descriptors get a turn.
const BURST: usize = 64;
/// `recvmmsg` calls per readable burst on a datagram transport (32 datagrams each).
const DATAGRAM_CALLS: usize = 4;
/// One received datagram's room: any record fits.
const DATAGRAM_SLOT: usize = MAX_RECORD_LEN + 1;
/// The loop wakes at least this often (timeouts).
const TICK_MS: u16 = 1000;
/// Stop reading the transport while this many batches wait for netstack credit.
const BACKPRESSURE_BATCHES: usize = 4;
/// How long a blocked transport write may wait before the transport counts as dead.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Process exit codes.
pub mod exit_code {
    /// The session ended normally (peer, broker decision, timeout).
    pub const OK: i32 = 0;
    /// Start-up failed (arguments, broker channel, confinement).
    pub const STARTUP: i32 = 1;
    /// The broker channel closed or failed.
    pub const BROKER_GONE: i32 = 2;
    /// The transport failed.
    pub const TRANSPORT: i32 = 3;
    /// The peer corrupted a stream transport.
    pub const PROTOCOL: i32 = 4;
}

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("usage: {0}")]
    Usage(String),
    #[error("descriptor {BROKER_FD} (the broker channel) is not open")]
    NoBrokerFd,
    #[error("broker channel: {0}")]
    Channel(#[from] ChannelError),
    #[error("confinement failed: {0}")]
    Confine(#[from] security::Error),
}

/// Why the loop stopped before the session ended.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("broker channel: {0}")]
    Broker(ChannelError),
    #[error("the broker sent {0} before the transport")]
    NoTransport(&'static str),
    #[error("system call {what}: {source}")]
    Sys { what: &'static str, source: Errno },
}

impl RunError {
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Broker(_) | Self::NoTransport(_) => exit_code::BROKER_GONE,
            Self::Sys { .. } => exit_code::TRANSPORT,
        }
    }
}

fn sys(what: &'static str) -> impl FnOnce(Errno) -> RunError {
    move |source| RunError::Sys { what, source }
}

/// The command line (`vpnshare-worker --gateway-key HEX [--deny PREFIX]... ...`).
#[derive(Debug, Clone)]
pub struct Args {
    /// The gateway's static public key (public: the private key stays in the broker).
    pub gateway_key: [u8; 32],
    pub policy: PacketPolicy,
    /// Largest datagram record the worker builds on UDP.
    pub datagram_record: usize,
    pub idle_timeout: Duration,
}

pub const USAGE: &str = "vpnshare-worker --gateway-key HEX64 [--deny PREFIX]... [--allow-lan] \
[--datagram-record BYTES] [--idle-timeout SECS]   (fd 3: the broker channel)";

impl Args {
    pub fn parse(mut it: impl Iterator<Item = String>) -> Result<Self, StartError> {
        let usage = |what: &str| StartError::Usage(format!("{what}\n{USAGE}"));
        let mut key = None;
        let mut policy = PacketPolicy::default();
        let mut datagram_record = crate::core::DEFAULT_DATAGRAM_RECORD;
        let mut idle_timeout = Duration::from_secs(180);
        while let Some(arg) = it.next() {
            let mut value = || {
                it.next()
                    .ok_or_else(|| usage(&format!("{arg} needs a value")))
            };
            match arg.as_str() {
                "--gateway-key" => {
                    let v = value()?;
                    let bytes = hex::decode(&v).map_err(|_| usage("--gateway-key: not hex"))?;
                    key = Some(
                        <[u8; 32]>::try_from(bytes.as_slice())
                            .map_err(|_| usage("--gateway-key: not 32 bytes"))?,
                    );
                }
                "--deny" => {
                    let v = value()?;
                    let p: Prefix = v.parse().map_err(|e| usage(&format!("--deny: {e}")))?;
                    policy.denied_prefixes.push(p);
                }
                "--allow-lan" => policy.allow_lan = true,
                "--datagram-record" => {
                    let v = value()?;
                    datagram_record = v
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (576..=MAX_RECORD_LEN).contains(n))
                        .ok_or_else(|| usage("--datagram-record: 576..=65535"))?;
                }
                "--idle-timeout" => {
                    let v = value()?;
                    let secs: u64 = v.parse().map_err(|_| usage("--idle-timeout: seconds"))?;
                    idle_timeout = Duration::from_secs(secs.max(1));
                }
                other => return Err(usage(&format!("unknown argument {other:?}"))),
            }
        }
        Ok(Self {
            gateway_key: key.ok_or_else(|| usage("--gateway-key is required"))?,
            policy,
            datagram_record,
            idle_timeout,
        })
    }
}

/// A worker that has opened its broker channel and confined itself.
#[derive(Debug)]
pub struct Started {
    pub link: Arc<BrokerLink>,
    pub confinement: Confinement,
}

/// Opens the broker channel on fd 3 (version hello), then confines the process as
/// `ParserWorker`, keeping only fd 3 and stdio. No peer byte has been read yet, and no
/// other descriptor is open: the transport and the data path arrive later over fd 3.
pub fn start() -> Result<Started, StartError> {
    // fcntl(F_GETFD) tells whether fd 3 is open before anything takes ownership of it.
    // SAFETY: F_GETFD on a plain descriptor number reads flags only.
    if unsafe { libc::fcntl(BROKER_FD, libc::F_GETFD) } < 0 {
        return Err(StartError::NoBrokerFd);
    }
    // SAFETY: the process contract gives fd 3 to this process as the broker channel; it
    // is open (checked above) and nothing else in this process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(BROKER_FD) };
    let sock = UnixStream::from(owned);
    let ch = Channel::<broker_worker::WorkerEnd>::open(sock)?;
    let options = ConfineOptions {
        keep_fds: vec![BROKER_FD],
        keep_stdio: true,
        threads: Threads::Forbidden,
        ..ConfineOptions::default()
    };
    let confinement = security::confine(Role::ParserWorker, &options)?;
    Ok(Started {
        link: Arc::new(BrokerLink::new(ch)),
        confinement,
    })
}

/// The peer's transport.
struct Transport {
    fd: OwnedFd,
    mode: TransportMode,
    decoder: Option<StreamDecoder>,
}

/// The data path to the netstack and the credit it granted.
struct DataPath {
    ch: Channel<data::WorkerEnd>,
    credit: Credit,
    /// Credit for batches already taken from the netstack, not yet granted back.
    owed: Credit,
}

fn to_mode(k: TransportKind) -> TransportMode {
    match k {
        TransportKind::Datagram => TransportMode::Datagram,
        TransportKind::Stream => TransportMode::Stream,
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> Result<(), RunError> {
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(sys("fcntl(F_GETFL)"))?;
    let mut flags = OFlag::from_bits_truncate(flags);
    flags.set(OFlag::O_NONBLOCK, on);
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(sys("fcntl(F_SETFL)"))?;
    Ok(())
}

fn attach_data_path(fd: OwnedFd, lease: LeaseId) -> Option<DataPath> {
    if let Err(e) = set_nonblocking(fd.as_fd(), false) {
        tracing::warn!(error = %e, "data path descriptor unusable");
        return None;
    }
    let mut ch = match Channel::<data::WorkerEnd>::open(UnixStream::from(fd)) {
        Ok(ch) => ch,
        Err(e) => {
            tracing::warn!(error = %e, "data path hello failed");
            return None;
        }
    };
    if let Err(e) = ch.send_credit(INITIAL_CREDIT) {
        tracing::warn!(error = %e, "data path: initial credit failed");
        return None;
    }
    tracing::info!(lease = lease.0, "data path attached");
    Some(DataPath {
        ch,
        credit: Credit {
            packets: 0,
            bytes: 0,
        },
        owed: Credit {
            packets: 0,
            bytes: 0,
        },
    })
}

/// Runs one session to its end; returns the process exit code.
pub fn run(started: Started, args: &Args) -> Result<i32, RunError> {
    let Started { link, .. } = started;
    let origin = Instant::now();
    let mut data: Option<DataPath> = None;
    // The transport first; a data path or other message may precede it.
    let (transport, first_record) = loop {
        let m = link.recv().map_err(RunError::Broker)?;
        let mut fds = m.fds.into_iter();
        match (m.msg, fds.next()) {
            (BrokerToWorker::AdoptTransport { kind, first_record }, Some(fd)) => {
                break (
                    Transport {
                        fd,
                        mode: to_mode(kind),
                        decoder: (kind == TransportKind::Stream).then(StreamDecoder::new),
                    },
                    first_record.map(|r| r.into_inner()),
                );
            }
            (BrokerToWorker::AttachDataPath { lease }, Some(fd)) => {
                data = attach_data_path(fd, lease);
            }
            (BrokerToWorker::Shutdown { reason }, _) => {
                tracing::info!(?reason, "shut down before a transport arrived");
                return Ok(exit_code::OK);
            }
            (BrokerToWorker::ReportCounters, _) => {
                let zero = crate::counters::Stats::default().to_wire();
                link.send(&broker_worker::WorkerToBroker::Counters(zero))
                    .map_err(RunError::Broker)?;
            }
            (other, _) => {
                tracing::warn!(message = ?other, "unexpected before AdoptTransport");
                return Err(RunError::NoTransport("another message"));
            }
        }
    };
    set_nonblocking(transport.fd.as_fd(), true)?;
    let mode = transport.mode;
    let span = tracing::info_span!(
        "session",
        transport = ?mode,
        peer = tracing::field::Empty,
        lease = tracing::field::Empty
    );
    let _enter = span.enter();
    tracing::info!("transport adopted");

    let mut config = CoreConfig::new(mode);
    config.policy = args.policy.clone();
    config.idle_timeout = args.idle_timeout;
    if mode == TransportMode::Datagram {
        config.max_record = args.datagram_record;
    }
    let oracle = Arc::new(BrokerOracle::new(link.clone(), args.gateway_key));
    let mut core = WorkerCore::new(config, oracle, origin.elapsed());
    core.set_data_path(data.is_some());
    let mut lp = Loop {
        link,
        transport,
        data,
        rbuf: vec![0u8; udp_batch::MAX_BATCH * DATAGRAM_SLOT],
        lens: [0; udp_batch::MAX_BATCH],
        segs: [0; udp_batch::MAX_BATCH],
        rbatch: PacketBatch::new(LeaseId(0)),
        origin,
        peer_logged: false,
        lease_logged: false,
    };
    if let Some(mut rec) = first_record {
        let _ = core.on_record(&mut rec, origin.elapsed());
    }
    lp.run(&mut core, &span)
}

struct Loop {
    link: Arc<BrokerLink>,
    transport: Transport,
    data: Option<DataPath>,
    /// Received datagrams, [`DATAGRAM_SLOT`] bytes each (`recvmmsg`).
    rbuf: Vec<u8>,
    lens: [usize; udp_batch::MAX_BATCH],
    /// GRO segment size per slot (0: one datagram).
    segs: [usize; udp_batch::MAX_BATCH],
    rbatch: PacketBatch,
    origin: Instant,
    peer_logged: bool,
    lease_logged: bool,
}

impl Loop {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn run(&mut self, core: &mut WorkerCore, span: &tracing::Span) -> Result<i32, RunError> {
        loop {
            self.flush(core)?;
            self.annotate(core, span);
            if let Some(exit) = core.exit() {
                return Ok(match exit {
                    Exit::TransportError => exit_code::TRANSPORT,
                    Exit::ProtocolError => exit_code::PROTOCOL,
                    _ => exit_code::OK,
                });
            }
            let read_transport = core.ready_batches() < BACKPRESSURE_BATCHES;
            let stashed = self.link.has_stashed();
            let (broker_ready, transport_ready, data_ready) = {
                // SAFETY: the broker socket lives in `self.link` for the whole loop.
                let broker = unsafe { BorrowedFd::borrow_raw(self.link.raw_fd()) };
                let mut fds = [
                    PollFd::new(broker, PollFlags::POLLIN),
                    PollFd::new(
                        self.transport.fd.as_fd(),
                        if read_transport {
                            PollFlags::POLLIN
                        } else {
                            PollFlags::empty()
                        },
                    ),
                    match &self.data {
                        Some(d) => PollFd::new(d.ch.as_fd(), PollFlags::POLLIN),
                        None => PollFd::new(broker, PollFlags::empty()),
                    },
                ];
                let timeout = if stashed {
                    PollTimeout::ZERO
                } else {
                    PollTimeout::from(TICK_MS)
                };
                match poll(&mut fds, timeout) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => {
                        return Err(RunError::Sys {
                            what: "poll",
                            source: e,
                        });
                    }
                }
                let hit = |f: &PollFd<'_>| {
                    f.revents().is_some_and(|r| {
                        r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
                    })
                };
                (
                    stashed || hit(&fds[0]),
                    read_transport && hit(&fds[1]),
                    self.data.is_some() && hit(&fds[2]),
                )
            };
            if broker_ready {
                self.on_broker(core)?;
            }
            if transport_ready {
                self.read_transport(core);
            }
            if data_ready {
                self.read_data(core);
            }
            core.on_tick(self.now());
        }
    }

    fn annotate(&mut self, core: &WorkerCore, span: &tracing::Span) {
        if !self.peer_logged {
            if let Some(peer) = core.peer() {
                span.record("peer", hex::encode(&peer[..8]));
                self.peer_logged = true;
            }
        }
        if !self.lease_logged {
            if let Some(l) = core.lease() {
                span.record("lease", l.id.0);
                self.lease_logged = true;
            }
        }
    }

    fn on_broker(&mut self, core: &mut WorkerCore) -> Result<(), RunError> {
        let m = match self.link.recv() {
            Ok(m) => m,
            Err(e) => {
                tracing::info!(error = %e, "broker channel closed: exiting");
                return Err(RunError::Broker(e));
            }
        };
        let mut fds = m.fds.into_iter();
        match (&m.msg, fds.next()) {
            (BrokerToWorker::AttachDataPath { lease }, Some(fd)) => {
                self.data = attach_data_path(fd, *lease);
                core.set_data_path(self.data.is_some());
            }
            (BrokerToWorker::AdoptTransport { .. }, Some(_)) => {
                tracing::warn!("a second transport was offered: closed");
            }
            // Roaming: an authenticated probe from a new client address; the broker's
            // new socket is connected there. The old one closes (docs/resume.md).
            (BrokerToWorker::MoveTransport { probe }, Some(fd))
                if self.transport.mode == TransportMode::Datagram =>
            {
                match set_nonblocking(fd.as_fd(), true) {
                    Ok(()) => {
                        self.transport.fd = fd;
                        tracing::info!(probe, "session moved to the new client address");
                    }
                    Err(e) => tracing::warn!(error = %e, "roaming socket unusable: kept the old"),
                }
            }
            (msg, _) => core.on_broker(msg, self.now()),
        }
        Ok(())
    }

    fn read_transport(&mut self, core: &mut WorkerCore) {
        let fd = self.transport.fd.as_raw_fd();
        for call in 0..BURST {
            let now = self.now();
            match &mut self.transport.decoder {
                // recvmmsg: up to 32 datagrams per call, DATAGRAM_CALLS calls per burst.
                // The broker turned GRO on: a run of records may share a slot.
                None => match udp_batch::recv_batch_gro(
                    fd,
                    &mut self.rbuf,
                    DATAGRAM_SLOT,
                    &mut self.lens,
                    &mut self.segs,
                ) {
                    Ok(n) => {
                        let slots = self.rbuf.chunks_mut(DATAGRAM_SLOT);
                        for ((slot, &len), &seg) in slots.zip(&self.lens).zip(&self.segs).take(n) {
                            if let Some(r) = slot.get_mut(..len) {
                                for rec in udp_batch::datagrams(r, seg) {
                                    let _ = core.on_record(rec, now);
                                }
                            }
                        }
                        if n < udp_batch::MAX_BATCH || call + 1 >= DATAGRAM_CALLS {
                            break;
                        }
                    }
                    Err(Errno::EAGAIN) => break,
                    // ICMP errors on a connected UDP socket: the peer may come back.
                    Err(Errno::ECONNREFUSED | Errno::EINTR) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "transport receive failed");
                        core.on_transport_closed(true);
                        break;
                    }
                },
                Some(dec) => {
                    let spare = dec.spare();
                    let n = match nix::unistd::read(self.transport.fd.as_fd(), spare) {
                        Ok(0) => {
                            core.on_transport_closed(false);
                            break;
                        }
                        Ok(n) => n,
                        Err(Errno::EAGAIN) => break,
                        Err(Errno::EINTR) => continue,
                        Err(e) => {
                            tracing::warn!(error = %e, "transport read failed");
                            core.on_transport_closed(true);
                            break;
                        }
                    };
                    dec.commit(n);
                    loop {
                        // Opened in place inside the decoder's buffer: no copy.
                        match dec.next_record_mut() {
                            Ok(Some(rec)) => {
                                let _ = core.on_record(rec, now);
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!(error = %e, "stream framing failed");
                                core.on_transport_closed(true);
                                break;
                            }
                        }
                    }
                }
            }
            if core.exit().is_some() {
                break;
            }
        }
        core.flush_batch();
    }

    fn read_data(&mut self, core: &mut WorkerCore) {
        let Some(d) = self.data.as_mut() else {
            return;
        };
        match d.ch.recv_data(&mut self.rbatch) {
            Ok(DataEvent::Packets) => {
                d.owed.packets = d
                    .owed
                    .packets
                    .saturating_add(u32::try_from(self.rbatch.len()).unwrap_or(u32::MAX));
                d.owed.bytes = d
                    .owed
                    .bytes
                    .saturating_add(u32::try_from(self.rbatch.total_bytes()).unwrap_or(u32::MAX));
                core.on_return_batch(&self.rbatch, self.origin.elapsed());
                // Granted back once a quarter of the window is owed, not per batch: a
                // request/response exchange then costs the netstack no wake-up for a
                // credit frame, and it always keeps three quarters of its window.
                if d.owed.packets >= CREDIT_REGRANT.packets || d.owed.bytes >= CREDIT_REGRANT.bytes
                {
                    let grant = std::mem::replace(
                        &mut d.owed,
                        Credit {
                            packets: 0,
                            bytes: 0,
                        },
                    );
                    if let Err(e) = d.ch.send_credit(grant) {
                        tracing::warn!(error = %e, "data path: credit failed");
                        self.data = None;
                        core.set_data_path(false);
                    }
                }
            }
            Ok(DataEvent::Credit(c)) => {
                d.credit.packets = d.credit.packets.saturating_add(c.packets);
                d.credit.bytes = d.credit.bytes.saturating_add(c.bytes);
            }
            Err(e) => {
                tracing::warn!(error = %e, "data path closed");
                self.data = None;
                core.set_data_path(false);
            }
        }
    }

    /// Sends what the core produced: records, broker messages, batches with credit.
    fn flush(&mut self, core: &mut WorkerCore) -> Result<(), RunError> {
        if !core.records().is_empty() {
            let result = match self.transport.mode {
                TransportMode::Datagram => {
                    let unsent = send_datagrams(self.transport.fd.as_fd(), core.records());
                    for _ in 0..unsent {
                        core.record_unsent();
                    }
                    Ok(())
                }
                TransportMode::Stream => {
                    write_all(self.transport.fd.as_fd(), core.records().bytes())
                }
            };
            core.records().clear();
            if let Err(e) = result {
                tracing::warn!(error = %e, "transport write failed");
                core.on_transport_closed(true);
            }
        }
        for msg in core.drain_broker() {
            self.link.send(&msg).map_err(RunError::Broker)?;
        }
        while let (Some(batch), Some(d)) = (core.ready_batch(), self.data.as_mut()) {
            let packets = u32::try_from(batch.len()).unwrap_or(u32::MAX);
            let bytes = u32::try_from(batch.total_bytes()).unwrap_or(u32::MAX);
            if d.credit.packets < packets || d.credit.bytes < bytes {
                break;
            }
            if let Err(e) = d.ch.send_batch(batch) {
                tracing::warn!(error = %e, "data path send failed");
                self.data = None;
                core.set_data_path(false);
                break;
            }
            d.credit.packets -= packets;
            d.credit.bytes -= bytes;
            core.batch_sent();
        }
        Ok(())
    }
}

fn wait_writable(fd: BorrowedFd<'_>, deadline: Instant) -> Result<(), Errno> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Errno::ETIMEDOUT);
    }
    let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(_) | Err(Errno::EINTR) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The queued records as datagrams (`sendmmsg`; runs of equal sizes as one UDP GSO
/// datagram each, [`udp_batch::send_batch_gso`]); a full socket buffer waits briefly, then the rest is dropped (UDP may lose it anyway). Returns
/// how many were not sent.
fn send_datagrams(fd: BorrowedFd<'_>, q: &crate::core::RecordQueue) -> usize {
    let deadline = Instant::now() + Duration::from_millis(200);
    let mut recs: [&[u8]; udp_batch::MAX_GSO_RECORDS] = [&[]; udp_batch::MAX_GSO_RECORDS];
    let mut it = q.iter().peekable();
    let mut unsent = 0;
    while it.peek().is_some() {
        let mut n = 0;
        for (slot, r) in recs.iter_mut().zip(it.by_ref()) {
            *slot = r;
            n += 1;
        }
        let mut batch = recs.get(..n).unwrap_or_default();
        while !batch.is_empty() {
            match udp_batch::send_batch_gso(fd.as_raw_fd(), batch) {
                Ok(k) if k > 0 => batch = batch.get(k..).unwrap_or_default(),
                Ok(_) | Err(Errno::EAGAIN | Errno::ENOBUFS) => {
                    if wait_writable(fd, deadline).is_err() {
                        tracing::debug!("datagrams dropped: socket buffer full");
                        unsent += batch.len();
                        batch = &[];
                    }
                }
                Err(e) => {
                    // ECONNREFUSED and friends: the peer is away; the idle timeout
                    // decides. The first record is lost, the rest is tried again.
                    tracing::debug!(error = %e, "datagram send failed");
                    unsent += 1;
                    batch = batch.get(1..).unwrap_or_default();
                }
            }
        }
    }
    unsent
}

fn write_all(fd: BorrowedFd<'_>, mut bytes: &[u8]) -> Result<(), Errno> {
    let deadline = Instant::now() + WRITE_TIMEOUT;
    while !bytes.is_empty() {
        match nix::unistd::write(fd, bytes) {
            Ok(0) => return Err(Errno::EPIPE),
            Ok(n) => bytes = bytes.get(n..).unwrap_or(&[]),
            Err(Errno::EAGAIN) => wait_writable(fd, deadline)?,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
