//! The driver of `vpnshare connect`: one thread, one `poll` loop around [`ClientCore`].
//!
//! Order of start-up (docs/security.md, caller obligations): identity and invite, name
//! resolution, signal handlers, the helper (started here when running as root, then
//! privileges dropped to `nobody` or `--user`), the transport socket, then
//! `confine(ClientSession)`. The gateway's first byte is read only after that. The TUN
//! descriptor arrives later over the helper channel (`recvmsg` is allowed) and is used
//! with plain `read`/`write`: no TUN ioctl is needed in the session. When the helper
//! opened it with offload (`TunOpened { vnet_hdr: true }`), each read is one virtio-net
//! super-packet split into MTU-sized packets, and each receive burst from the gateway is
//! coalesced before it is written ([`crate::tun_offload`]).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use vshp::lease::Lease;
use vshp::message::ConfigDelta;
use vshp::record::MAX_RECORD_LEN;
use vshp::transport::TransportMode;
use vshp::{ErrorReason, PairingCode, StreamDecoder};

use crate::ConnectError;
use crate::core::{ClientCore, Event, Timer};
use crate::helper::{self, Helper};
use crate::ticket_store::TicketStore;
use crate::tun_offload::{Coalescer, Splitter};

/// The transport to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    Udp,
    Tcp,
}

/// What `vpnshare connect` was asked to do.
#[derive(Debug)]
pub struct ConnectOptions {
    pub uri: String,
    pub state_dir: PathBuf,
    pub transport: TransportKind,
    /// The user to run the session as when started as root (default `nobody`).
    pub user: Option<String>,
    /// The installed helper's socket (when not started as root).
    pub helper_socket: Option<PathBuf>,
    /// The device name sent in AUTH.
    pub device_name: String,
    /// As root: the resolver file the spawned helper manages (default its own,
    /// `/etc/resolv.conf`).
    pub resolv_conf: Option<PathBuf>,
    /// Marked once the gateway admits this device (`connect --discover` pins the
    /// gateway's key only then).
    pub admission_marker: Option<crate::admission_marker::AdmissionMarker>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signals() -> Result<(), ConnectError> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    // No SA_RESTART: a signal interrupts poll() at once.
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }.map_err(|e| ConnectError::Io {
            what: "cannot install the signal handlers",
            source: e.into(),
        })?;
    }
    Ok(())
}

/// Brings the tunnel up and keeps it up until SIGINT/SIGTERM or a fatal refusal.
pub fn connect(opts: ConnectOptions) -> Result<(), ConnectError> {
    let invite = broker::invite::Invite::parse(&opts.uri)
        .map_err(|e| ConnectError::Invite(e.to_string()))?;
    let keypair = broker::identity::load_or_create(&opts.state_dir)
        .map_err(|e| ConnectError::Identity(e.to_string()))?;
    let addr = (invite.host.as_str(), invite.port)
        .to_socket_addrs()
        .map_err(|e| ConnectError::Resolve {
            host: invite.host.clone(),
            reason: e.to_string(),
        })?
        .next()
        .ok_or_else(|| ConnectError::Resolve {
            host: invite.host.clone(),
            reason: "no address".into(),
        })?;
    // The resume ticket of an earlier run (same gateway), opened while the state dir is
    // still reachable (before dropping privileges): the first handshake presents it,
    // so a restarted `connect` gets the same lease and the flows survive.
    let (tickets, ticket) = match TicketStore::open(&opts.state_dir, invite.key) {
        Ok((st, t)) => (Some(st), t),
        Err(e) => {
            tracing::warn!(error = %e, "resume ticket file: sessions will not resume after a restart");
            (None, None)
        }
    };
    install_signals()?;

    let mut helper = if nix::unistd::geteuid().is_root() {
        let (uid, gid) = target_user(opts.user.as_deref())?;
        let spawned = helper::spawn_helper(
            uid,
            &opts.state_dir.join("helper.journal"),
            opts.resolv_conf.as_deref(),
        )?;
        // Connect with the session's uid as the effective one (SO_PEERCRED reports the
        // effective uid), remove the socket's directory as root, then drop for good.
        let h = helper::as_user(uid, gid, || Helper::connect(&spawned.socket))?;
        let _ = std::fs::remove_dir_all(&spawned.dir);
        helper::drop_privileges(uid, gid)?;
        tracing::info!(
            pid = spawned.child.id(),
            uid,
            "started vpnshare-helper; session runs as uid {uid}"
        );
        h
    } else {
        let path = opts
            .helper_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(helper::DEFAULT_HELPER_SOCKET));
        Helper::connect(&path)?
    };

    let mode = match opts.transport {
        TransportKind::Udp => TransportMode::Datagram,
        TransportKind::Tcp => TransportMode::Stream,
    };
    let transport = Transport::open(opts.transport, addr)
        .map_err(|e| ConnectError::Unreachable(format!("{addr}: {e}")))?;

    let mut keep = vec![helper.as_fd().as_raw_fd(), transport.fd().as_raw_fd()];
    if let Some(st) = &tickets {
        keep.push(st.file().as_raw_fd());
    }
    if let Some(m) = &opts.admission_marker {
        keep.push(m.file().as_raw_fd());
    }
    security::confine(
        security::Role::ClientSession,
        &security::ConfineOptions {
            keep_fds: keep,
            keep_stdio: true,
            threads: security::Threads::Forbidden,
            ..security::ConfineOptions::default()
        },
    )?;
    tracing::info!("session confined (seccomp, no capabilities, no_new_privs)");

    let mut core = ClientCore::new(keypair, invite.key, &opts.device_name, mode);
    if let Some(t) = ticket {
        tracing::info!("a resume ticket from the last run: resuming");
        core.set_ticket(t);
    }
    let mut run = Run::new(core, opts.transport, addr, transport);
    run.tickets = tickets;
    run.admission_marker = opts.admission_marker;
    let result = run.run(&mut helper);
    if result.is_err() {
        // Whatever went wrong, put the machine back the way it was.
        let _ = helper.tear_down();
    }
    result
}

fn target_user(name: Option<&str>) -> Result<(u32, u32), ConnectError> {
    match name {
        None => Ok((65534, 65534)),
        Some(n) => {
            let user = nix::unistd::User::from_name(n)
                .map_err(|e| ConnectError::Privileges(format!("looking up user {n}: {e}")))?
                .ok_or_else(|| ConnectError::Privileges(format!("no user named {n}")))?;
            if user.uid.is_root() {
                return Err(ConnectError::Privileges(
                    "--user must not be root: the session runs unprivileged".into(),
                ));
            }
            Ok((user.uid.as_raw(), user.gid.as_raw()))
        }
    }
}

// ---------------------------------------------------------------- transport

#[derive(Debug)]
enum Transport {
    Udp(UdpSocket),
    Tcp {
        stream: TcpStream,
        decoder: Box<StreamDecoder>,
    },
}

impl Transport {
    fn open(kind: TransportKind, addr: SocketAddr) -> std::io::Result<Self> {
        match kind {
            TransportKind::Udp => {
                let local: SocketAddr = if addr.is_ipv4() {
                    (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let s = UdpSocket::bind(local)?;
                // Room for a burst of full records from the gateway (the default
                // 208 KiB holds ~90): best effort, capped by the kernel's rmem_max.
                let _ = nix::sys::socket::setsockopt(
                    &s,
                    nix::sys::socket::sockopt::RcvBuf,
                    &UDP_SOCKET_BUFFER,
                );
                let _ = nix::sys::socket::setsockopt(
                    &s,
                    nix::sys::socket::sockopt::SndBuf,
                    &UDP_SOCKET_BUFFER,
                );
                // GRO: a run of the gateway's records can arrive in one slot
                // (split again in `receive`); without it, one record per slot.
                let _ = udp_batch::enable_gro(s.as_fd());
                s.connect(addr)?;
                s.set_nonblocking(true)?;
                Ok(Transport::Udp(s))
            }
            TransportKind::Tcp => {
                let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                s.set_nodelay(true)?;
                s.set_nonblocking(true)?;
                Ok(Transport::Tcp {
                    stream: s,
                    decoder: Box::default(),
                })
            }
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Transport::Udp(s) => s.as_fd(),
            Transport::Tcp { stream, .. } => stream.as_fd(),
        }
    }

    /// Sends one record. A datagram that does not fit the socket buffer is dropped (as
    /// the network would); a stream waits for room (bounded).
    fn send(&mut self, rec: &[u8]) -> std::io::Result<()> {
        match self {
            Transport::Udp(s) => match s.send(rec) {
                Ok(_) => Ok(()),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::ConnectionRefused
                    ) =>
                {
                    Ok(())
                }
                Err(e) => Err(e),
            },
            Transport::Tcp { stream, .. } => {
                let len = u16::try_from(rec.len())
                    .map_err(|_| std::io::Error::other("record too long"))?;
                write_all_nb(stream, &len.to_be_bytes())?;
                write_all_nb(stream, rec)
            }
        }
    }

    /// Sends every record of `q` (one write on a stream). Failures are logged: a
    /// datagram may be lost anyway, a broken stream shows up on the next read.
    fn send_queue(&mut self, q: &SendQueue) {
        let result = match self {
            Transport::Udp(s) => {
                // sendmmsg: the burst in one call. A full socket buffer drops the rest,
                // as the network would.
                let mut recs: [&[u8]; TUN_BATCH] = [&[]; TUN_BATCH];
                let mut n = 0;
                for (slot, &(at, len)) in recs.iter_mut().zip(&q.records) {
                    if let Some(r) = q.buf.get(at..at + len) {
                        *slot = r;
                        n += 1;
                    }
                }
                match udp_batch::send_batch_gso(s.as_raw_fd(), recs.get(..n).unwrap_or_default()) {
                    Ok(_)
                    | Err(nix::errno::Errno::EAGAIN)
                    | Err(nix::errno::Errno::ECONNREFUSED) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
            Transport::Tcp { stream, .. } => match q.buf.get(..q.len) {
                Some(bytes) if !bytes.is_empty() => write_all_nb(stream, bytes),
                _ => Ok(()),
            },
        };
        if let Err(e) = result {
            tracing::debug!("send to the gateway failed: {e}");
        }
    }

    /// Reads what is there: each complete record goes to `f`. `Ok(false)`: the
    /// connection ended.
    fn receive(&mut self, buf: &mut [u8], f: &mut dyn FnMut(&mut [u8])) -> std::io::Result<bool> {
        match self {
            Transport::Udp(s) => {
                // recvmmsg: up to 32 datagrams per call, a few calls per wakeup.
                let mut lens = [0usize; udp_batch::MAX_BATCH];
                let mut segs = [0usize; udp_batch::MAX_BATCH];
                for _ in 0..4 {
                    match udp_batch::recv_batch_gro(
                        s.as_raw_fd(),
                        buf,
                        UDP_SLOT,
                        &mut lens,
                        &mut segs,
                    ) {
                        Ok(n) => {
                            for ((slot, &len), &seg) in
                                buf.chunks_mut(UDP_SLOT).zip(&lens).zip(&segs).take(n)
                            {
                                // 0: empty, or longer than a record can be: dropped.
                                if let Some(r) = slot.get_mut(..len).filter(|r| !r.is_empty()) {
                                    for rec in udp_batch::datagrams(r, seg) {
                                        f(rec);
                                    }
                                }
                            }
                            if n < udp_batch::MAX_BATCH {
                                break;
                            }
                        }
                        Err(nix::errno::Errno::EAGAIN) => break,
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(true)
            }
            Transport::Tcp { stream, decoder } => {
                for _ in 0..64 {
                    let spare = decoder.spare();
                    match stream.read(spare) {
                        Ok(0) => return Ok(false),
                        Ok(n) => decoder.commit(n),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                    loop {
                        // Opened in place inside the decoder's buffer: no copy.
                        match decoder.next_record_mut() {
                            Ok(Some(r)) => f(r),
                            Ok(None) => break,
                            Err(e) => return Err(std::io::Error::other(e.to_string())),
                        }
                    }
                }
                Ok(true)
            }
        }
    }
}

/// Records sealed back to back for one burst of TUN packets, each behind its length
/// prefix on a stream, so a burst goes out in one `write` (docs/performance.md).
#[derive(Debug)]
struct SendQueue {
    stream: bool,
    buf: Vec<u8>,
    len: usize,
    /// Where each record (after its prefix) starts, and its length.
    records: Vec<(usize, usize)>,
}

/// Bytes of sealed records one burst gathers before it is written.
const SEND_QUEUE_BYTES: usize = 1024 * 1024;

impl SendQueue {
    fn new(stream: bool) -> Self {
        Self {
            stream,
            buf: vec![0u8; SEND_QUEUE_BYTES],
            len: 0,
            records: Vec::with_capacity(TUN_BATCH),
        }
    }

    fn prefix(&self) -> usize {
        if self.stream { 2 } else { 0 }
    }

    fn clear(&mut self) {
        self.len = 0;
        self.records.clear();
    }

    /// Room for the next record (after its prefix).
    fn room(&self) -> usize {
        self.buf.len().saturating_sub(self.len + self.prefix())
    }

    /// The next record might not fit, or a datagram burst is as long as one send takes
    /// (`Transport::send_queue` sends at most `TUN_BATCH` records; with offload one burst
    /// can seal more).
    fn is_full(&self) -> bool {
        self.room() < MAX_RECORD_LEN || self.records.len() >= TUN_BATCH
    }

    /// Where the next record is to be sealed.
    fn spare(&mut self) -> &mut [u8] {
        let at = self.len + self.prefix();
        self.buf.get_mut(at..).unwrap_or_default()
    }

    /// Keeps the `len` bytes just sealed into [`SendQueue::spare`] (0: nothing).
    fn commit(&mut self, len: usize) {
        let Ok(l) = u16::try_from(len) else {
            return;
        };
        if len == 0 || self.room() < len {
            return;
        }
        if self.stream {
            if let Some(p) = self.buf.get_mut(self.len..self.len + 2) {
                p.copy_from_slice(&l.to_be_bytes());
            }
        }
        let start = self.len + self.prefix();
        self.records.push((start, len));
        self.len = start + len;
    }
}

fn write_all_nb(stream: &mut TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !data.is_empty() {
        match stream.write(data) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => data = data.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(ErrorKind::TimedOut.into());
                }
                let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLOUT)];
                let _ = poll(&mut fds, PollTimeout::from(100u16));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- the loop

/// The TUN the helper opened, and the buffer packets are read into.
#[derive(Debug)]
struct Tun {
    fd: OwnedFd,
    name: String,
    /// Without offload: `TUN_BATCH` slots of `slot` bytes, one packet per read.
    buf: Vec<u8>,
    slot: usize,
    /// With offload (the helper set `IFF_VNET_HDR`): every read and write carries a
    /// virtio-net header.
    offload: Option<Offload>,
}

/// The two directions of an offload TUN.
#[derive(Debug)]
struct Offload {
    split: Splitter,
    gro: Coalescer,
}

impl Tun {
    fn new(fd: OwnedFd, name: String, mtu: u16, vnet_hdr: bool) -> Self {
        let slot = usize::from(mtu) + 64;
        let offload = vnet_hdr.then(|| Offload {
            split: Splitter::new(mtu),
            gro: Coalescer::new(),
        });
        Self {
            fd,
            name,
            buf: if vnet_hdr {
                Vec::new()
            } else {
                vec![0u8; slot * TUN_BATCH]
            },
            slot,
            offload,
        }
    }

    /// The lease MTU changed: the read buffers follow it.
    fn set_mtu(&mut self, mtu: u16) {
        let slot = usize::from(mtu) + 64;
        if slot == self.slot {
            return;
        }
        self.slot = slot;
        match &mut self.offload {
            Some(o) => o.split.set_mtu(mtu),
            None => self.buf = vec![0u8; slot * TUN_BATCH],
        }
    }

    /// One packet from the gateway for the TUN: written at once, or (offload) gathered
    /// into the burst that [`Tun::flush`] coalesces and writes.
    fn put(&mut self, packet: &[u8], write_errors: &mut u64) {
        let Some(o) = self.offload.as_mut() else {
            if nix::unistd::write(&self.fd, packet).is_err() {
                *write_errors += 1;
            }
            return;
        };
        if o.gro.is_full() {
            flush_gro(&self.fd, &mut o.gro, write_errors);
        }
        if !o.gro.push(packet) {
            *write_errors += 1;
        }
    }

    /// Writes what [`Tun::put`] gathered (offload; nothing to do otherwise).
    fn flush(&mut self, write_errors: &mut u64) {
        if let Some(o) = self.offload.as_mut() {
            flush_gro(&self.fd, &mut o.gro, write_errors);
        }
    }
}

fn flush_gro(fd: &OwnedFd, gro: &mut Coalescer, write_errors: &mut u64) {
    if gro.is_empty() {
        return;
    }
    let r = gro.flush(|buf| {
        if nix::unistd::write(fd, buf).is_err() {
            *write_errors += 1;
        }
    });
    if let Err(e) = r {
        tracing::debug!(error = %e, "packets from the gateway dropped");
    }
}

/// Seals `packets` into `q` back to back (framed on a stream), handing `q` to the
/// transport whenever it is full; the caller sends what is left.
fn seal_into(
    core: &mut ClientCore,
    q: &mut SendQueue,
    transport: &mut Option<Transport>,
    packets: &[&[u8]],
    now: Duration,
) -> Result<(), ConnectError> {
    let mut at = 0;
    while at < packets.len() {
        if q.is_full() {
            if let Some(t) = transport.as_mut() {
                t.send_queue(q);
            }
            q.clear();
        }
        let rest = packets.get(at..).unwrap_or_default();
        let (len, took) = core.seal_packets(rest, now, q.spare())?;
        q.commit(len);
        if took == 0 {
            break;
        }
        at += took;
    }
    Ok(())
}

/// Packets read from the TUN per batch.
const TUN_BATCH: usize = 64;
/// With offload: packets (after splitting) sealed per wake-up before the loop looks at
/// the transport again. One super-packet is up to ~48 packets at MTU 1,400.
const OFFLOAD_READ_BUDGET: usize = 4 * TUN_BATCH;
/// One received datagram's room: any record fits.
const UDP_SLOT: usize = MAX_RECORD_LEN + 1;
/// Receive and send buffer asked for on the UDP transport socket.
const UDP_SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// Attempts without any answer before a first connection is given up.
const FIRST_ATTEMPTS: u32 = 3;
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the records of one read told the loop.
#[derive(Debug, Default)]
struct Seen {
    established: Option<PairingCode>,
    config: Option<Lease>,
    deltas: Vec<ConfigDelta>,
    refused: Option<(ErrorReason, String)>,
    advisory: Option<ErrorReason>,
    closed: bool,
}

#[derive(Debug)]
struct Run {
    core: ClientCore,
    kind: TransportKind,
    addr: SocketAddr,
    transport: Option<Transport>,
    tun: Option<Tun>,
    lease: Option<Lease>,
    start: Instant,
    rx: Vec<u8>,
    tx: Vec<u8>,
    /// The records of one burst of TUN packets (`read_tun`).
    txq: SendQueue,
    code: Option<PairingCode>,
    ever_configured: bool,
    waiting_approval: bool,
    failed_attempts: u32,
    backoff: Duration,
    next_attempt: Option<Duration>,
    tun_write_errors: u64,
    tickets: Option<TicketStore>,
    admission_marker: Option<crate::admission_marker::AdmissionMarker>,
    /// The UDP socket's local address went away (the laptop roamed): a new socket.
    roam: bool,
    last_addr_check: Duration,
}

impl Run {
    fn new(core: ClientCore, kind: TransportKind, addr: SocketAddr, t: Transport) -> Self {
        Self {
            core,
            kind,
            addr,
            transport: Some(t),
            tun: None,
            lease: None,
            start: Instant::now(),
            rx: vec![0u8; udp_batch::MAX_BATCH * UDP_SLOT],
            tx: vec![0u8; MAX_RECORD_LEN],
            txq: SendQueue::new(kind == TransportKind::Tcp),
            code: None,
            ever_configured: false,
            waiting_approval: false,
            failed_attempts: 0,
            backoff: Duration::from_secs(1),
            next_attempt: None,
            tun_write_errors: 0,
            tickets: None,
            admission_marker: None,
            roam: false,
            last_addr_check: Duration::ZERO,
        }
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn transport_name(&self) -> &'static str {
        match self.kind {
            TransportKind::Udp => "UDP",
            TransportKind::Tcp => "TCP",
        }
    }

    fn run(&mut self, helper: &mut Helper) -> Result<(), ConnectError> {
        self.start_handshake()?;
        loop {
            if STOP.load(Ordering::SeqCst) {
                return self.shutdown(helper);
            }
            let now = self.now();
            if self.next_attempt.is_some_and(|t| now >= t) {
                self.next_attempt = None;
                self.start_handshake()?;
            }
            let (t_ready, tun_ready, helper_ready) = self.wait(helper)?;
            if helper_ready {
                return Err(ConnectError::HelperFailed(
                    "the helper closed its channel (it restores routes and DNS when it does)"
                        .into(),
                ));
            }
            if t_ready {
                self.read_transport(helper)?;
            }
            if tun_ready {
                self.read_tun()?;
            }
            self.timers()?;
        }
    }

    /// Polls the transport, the TUN and the helper channel for up to 200 ms.
    fn wait(&self, helper: &Helper) -> Result<(bool, bool, bool), ConnectError> {
        let mut fds = Vec::with_capacity(3);
        fds.push(PollFd::new(helper.as_fd(), PollFlags::POLLIN));
        let t_idx = self.transport.as_ref().map(|t| {
            fds.push(PollFd::new(t.fd(), PollFlags::POLLIN));
            fds.len() - 1
        });
        let tun_idx = match &self.tun {
            Some(tun) if self.core.is_established() => {
                fds.push(PollFd::new(tun.fd.as_fd(), PollFlags::POLLIN));
                Some(fds.len() - 1)
            }
            _ => None,
        };
        match poll(&mut fds, PollTimeout::from(200u16)) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok((false, false, false)),
            Err(e) => {
                return Err(ConnectError::Io {
                    what: "poll",
                    source: e.into(),
                });
            }
        }
        let ready = |i: Option<usize>| {
            i.and_then(|i| fds.get(i))
                .and_then(|f| f.revents())
                .is_some_and(|r| !r.is_empty())
        };
        Ok((ready(t_idx), ready(tun_idx), ready(Some(0))))
    }

    fn send(&mut self, len: usize) {
        let Some(t) = self.transport.as_mut() else {
            return;
        };
        if let Some(rec) = self.tx.get(..len) {
            if let Err(e) = t.send(rec) {
                tracing::debug!("send to the gateway failed: {e}");
                if self.kind == TransportKind::Udp && local_address_gone(&e) {
                    self.roam = true;
                }
            }
        }
    }

    fn start_handshake(&mut self) -> Result<(), ConnectError> {
        if self.transport.is_none() {
            match Transport::open(self.kind, self.addr) {
                Ok(t) => self.transport = Some(t),
                Err(e) => return self.attempt_failed(&e.to_string()),
            }
        }
        let now = self.now();
        let n = self.core.begin_handshake(now, &mut self.tx)?;
        self.send(n);
        Ok(())
    }

    /// A handshake got no answer (or the transport failed before one).
    fn attempt_failed(&mut self, why: &str) -> Result<(), ConnectError> {
        self.failed_attempts += 1;
        if !self.ever_configured && self.failed_attempts >= FIRST_ATTEMPTS {
            return Err(ConnectError::Unreachable(format!(
                "no answer from {} over {} after {} attempts ({why})",
                self.addr,
                self.transport_name(),
                self.failed_attempts
            )));
        }
        self.schedule_reconnect(why);
        Ok(())
    }

    fn schedule_reconnect(&mut self, why: &str) {
        self.core.reset();
        if self.kind == TransportKind::Tcp {
            self.transport = None;
        }
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.next_attempt = Some(self.now() + delay);
        println!(
            "connection interrupted ({why}); retrying in {} s",
            delay.as_secs()
        );
        tracing::info!("reconnecting in {delay:?}: {why}");
    }

    fn read_transport(&mut self, helper: &mut Helper) -> Result<(), ConnectError> {
        let now = self.now();
        let mut seen = Seen::default();
        let Some(transport) = self.transport.as_mut() else {
            return Ok(());
        };
        let core = &mut self.core;
        let tun = &mut self.tun;
        let tun_write_errors = &mut self.tun_write_errors;
        let mut core_err = None;
        let r = transport.receive(&mut self.rx, &mut |rec| {
            let res = core.handle_record(rec, now, &mut |ev| match ev {
                Event::Established { code } => seen.established = Some(code),
                Event::Config(lease) => seen.config = Some(lease),
                Event::ConfigDelta(d) => seen.deltas.push(d),
                Event::Packet(p) => {
                    if let Some(tun) = tun.as_mut() {
                        tun.put(p, tun_write_errors);
                    }
                }
                Event::Refused { reason, detail } => {
                    seen.refused = Some((reason, detail.to_owned()));
                }
                Event::Advisory(r) => seen.advisory = Some(r),
                Event::Closed(_) => seen.closed = true,
                Event::Pong { .. } => {}
            });
            if let Err(e) = res {
                core_err = Some(e);
            }
        });
        // The burst's packets, coalesced (offload), before anything may replace the TUN.
        if let Some(tun) = self.tun.as_mut() {
            tun.flush(&mut self.tun_write_errors);
        }
        if let Some(e) = core_err {
            return Err(e.into());
        }
        let transport_gone = match r {
            Ok(true) => None,
            Ok(false) => Some("the gateway closed the connection".to_owned()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(n) = self.core.take_pong(now, &mut self.tx)? {
            self.send(n);
        }
        if let Some(t) = self.core.take_new_ticket() {
            tracing::info!(len = t.len(), "resume ticket received");
            if let Some(st) = &mut self.tickets {
                if let Err(e) = st.save(t) {
                    tracing::warn!(error = %e, "resume ticket not saved");
                }
            }
        }
        let bad_ticket = seen
            .refused
            .as_ref()
            .is_some_and(|(r, _)| *r == ErrorReason::BadTicket);
        self.after_records(seen, helper)?;
        if let Some(why) = transport_gone {
            if bad_ticket {
                // The gateway closes the connection after BadTicket; the new handshake
                // (already scheduled) opens a new one.
                self.transport = None;
            } else if self.ever_configured || self.core.is_established() {
                self.schedule_reconnect(&why);
            } else {
                self.attempt_failed(&why)?;
            }
        }
        Ok(())
    }

    fn after_records(&mut self, seen: Seen, helper: &mut Helper) -> Result<(), ConnectError> {
        if let Some(code) = seen.established {
            self.code = Some(code);
            self.failed_attempts = 0;
            self.backoff = Duration::from_secs(1);
            tracing::info!(%code, "handshake complete");
        }
        if let Some(reason) = seen.advisory {
            match reason {
                ErrorReason::UnsupportedVersion => {
                    return Err(ConnectError::Refused(reason.describe().into()));
                }
                _ => self.attempt_failed(reason.describe())?,
            }
        }
        if let Some((reason, detail)) = seen.refused {
            let detail = if detail.is_empty() {
                reason.describe().to_owned()
            } else {
                detail
            };
            match reason {
                ErrorReason::PendingApproval => {
                    if !self.waiting_approval {
                        self.waiting_approval = true;
                        let code = self
                            .code
                            .map(|c| c.to_string())
                            .unwrap_or_else(|| "?".into());
                        println!(
                            "Compare this code with the gateway: {code} — waiting for approval"
                        );
                        let _ = std::io::stdout().flush();
                    }
                }
                ErrorReason::NotApproved => return Err(ConnectError::NotApproved(detail)),
                ErrorReason::Revoked => return Err(ConnectError::Revoked),
                ErrorReason::VpnUnavailable => return Err(ConnectError::VpnUnavailable),
                ErrorReason::Overloaded => self.schedule_reconnect("the gateway is overloaded"),
                ErrorReason::BadTicket => {
                    self.ticket_refused(&detail);
                    return Ok(());
                }
                _ => return Err(ConnectError::Refused(detail)),
            }
        }
        if let Some(lease) = seen.config {
            self.apply_lease(lease, helper)?;
        }
        for d in seen.deltas {
            self.apply_delta(&d, helper)?;
        }
        if seen.closed {
            self.schedule_reconnect("the gateway closed the session");
        }
        Ok(())
    }

    /// The gateway refused the resume ticket (BadTicket: expired, already used, sealed
    /// before the gateway restarted, ...). The device is still trusted: drop the ticket
    /// (the core already forgot it; the state dir's copy too) and connect again at once
    /// without RESUME. That gets a lease, usually the same address, but the gateway's
    /// side of the old session's connections is gone: they will be reset.
    fn ticket_refused(&mut self, detail: &str) {
        println!(
            "the gateway refused the resume ticket ({detail}): connecting again without it; \
             connections of the previous session are lost"
        );
        let _ = std::io::stdout().flush();
        tracing::warn!(detail, "resume ticket refused (BadTicket): full handshake");
        if let Some(st) = &mut self.tickets {
            if let Err(e) = st.forget() {
                tracing::warn!(error = %e, "the refused ticket stays in the state dir");
            }
        }
        self.core.reset();
        // A new socket: over UDP the refused session's worker still holds the socket
        // connected to our old port until it exits; a new port reaches the gateway's
        // listener at once. Over TCP the gateway closes the connection.
        self.transport = None;
        self.next_attempt = Some(self.now());
    }

    /// CONFIG_DELTA: the live lease changed on the gateway (docs/resume.md). Applied to
    /// the TUN in place through the helper; the TUN's read buffer follows the MTU.
    fn apply_delta(&mut self, d: &ConfigDelta, helper: &mut Helper) -> Result<(), ConnectError> {
        let Some(old) = self.lease.clone() else {
            tracing::debug!("CONFIG_DELTA before CONFIG: ignored");
            return Ok(());
        };
        let mut new = old.clone();
        if let Err(e) = d.apply(&mut new) {
            tracing::warn!(error = %e, "CONFIG_DELTA not applicable: ignored");
            return Ok(());
        }
        self.update_in_place(&old, new, helper)
    }

    /// Moves the live TUN from `old`'s configuration to `new`'s (same addresses).
    fn update_in_place(
        &mut self,
        old: &Lease,
        new: Lease,
        helper: &mut Helper,
    ) -> Result<(), ConnectError> {
        if self.tun.is_some() {
            helper.apply_delta(old, &new, self.addr.ip())?;
        }
        if let Some(tun) = self.tun.as_mut() {
            tun.set_mtu(new.mtu);
        }
        let dns: Vec<String> = new.dns.iter().map(IpAddr::to_string).collect();
        println!(
            "lease updated: MTU {}, DNS {}, {} routes",
            new.mtu,
            dns.join(" "),
            new.routes.len()
        );
        let _ = std::io::stdout().flush();
        tracing::info!(mtu = new.mtu, ?new.routes, ?new.dns, "lease changed in place");
        self.lease = Some(new);
        Ok(())
    }

    fn apply_lease(&mut self, lease: Lease, helper: &mut Helper) -> Result<(), ConnectError> {
        self.waiting_approval = false;
        if self.tun.is_some() && self.lease.as_ref().is_some_and(|l| same_config(l, &lease)) {
            println!(
                "reconnected: same lease {}/{} (lease {})",
                lease.ipv4.addr, lease.ipv4.len, lease.id.0
            );
            let _ = std::io::stdout().flush();
            self.lease = Some(lease);
            return Ok(());
        }
        if let Some(old) = self
            .lease
            .clone()
            .filter(|l| self.tun.is_some() && (l.ipv4, l.ipv6) == (lease.ipv4, lease.ipv6))
        {
            // A resume whose lease changed while the session was away (MTU, routes,
            // DNS): the same addresses, so the TUN stays and only the difference is
            // applied; the connections carry on.
            println!(
                "reconnected: same lease {}/{} (lease {}), its configuration changed",
                lease.ipv4.addr, lease.ipv4.len, lease.id.0
            );
            return self.update_in_place(&old, lease, helper);
        }
        if self.tun.take().is_some() {
            tracing::info!("the lease changed: a new TUN");
            helper.tear_down()?;
        }
        let (fd, name, vnet_hdr) = helper.open_tun(&lease)?;
        set_nonblocking(&fd)?;
        helper.configure(&lease, self.addr.ip())?;
        if vnet_hdr {
            tracing::info!(ifname = %name, "TUN offload on: GSO super-packets split, bursts coalesced");
        } else {
            tracing::info!(ifname = %name, "TUN offload off: one packet per read and write");
        }
        let v6 = lease
            .ipv6
            .map(|p| format!(", {}/{}", p.addr, p.len))
            .unwrap_or_default();
        let dns: Vec<String> = lease.dns.iter().map(IpAddr::to_string).collect();
        println!(
            "tunnel up: {}/{}{v6} on {name}, MTU {}, DNS {}, lease {}, via gateway {} over {} (pairing code {})",
            lease.ipv4.addr,
            lease.ipv4.len,
            lease.mtu,
            dns.join(" "),
            lease.id.0,
            self.addr,
            self.transport_name(),
            self.code.map(|c| c.to_string()).unwrap_or_default(),
        );
        let _ = std::io::stdout().flush();
        self.tun = Some(Tun::new(fd, name, lease.mtu, vnet_hdr));
        self.lease = Some(lease);
        self.ever_configured = true;
        if let Some(m) = self.admission_marker.take()
            && let Err(e) = m.mark()
        {
            tracing::warn!(error = %e, "cannot record the admission: the gateway's key is not pinned");
        }
        Ok(())
    }

    fn read_tun(&mut self) -> Result<(), ConnectError> {
        if self.tun.as_ref().is_some_and(|t| t.offload.is_some()) {
            return self.read_tun_offload();
        }
        let now = self.now();
        let Some(tun) = self.tun.as_mut() else {
            return Ok(());
        };
        let mut lens = [0usize; TUN_BATCH];
        let mut count = 0;
        for (i, chunk) in tun.buf.chunks_mut(tun.slot).enumerate().take(TUN_BATCH) {
            match nix::unistd::read(&tun.fd, chunk) {
                Ok(0) => break,
                Ok(n) => {
                    if let Some(l) = lens.get_mut(i) {
                        *l = n;
                    }
                    count += 1;
                }
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => break,
                Err(e) => {
                    return Err(ConnectError::Io {
                        what: "reading the TUN",
                        source: e.into(),
                    });
                }
            }
        }
        if count == 0 || !self.core.is_established() {
            return Ok(());
        }
        let mut packets: [&[u8]; TUN_BATCH] = [&[]; TUN_BATCH];
        for ((slot, c), &n) in packets.iter_mut().zip(tun.buf.chunks(tun.slot)).zip(&lens) {
            *slot = c.get(..n).unwrap_or_default();
        }
        let packets = packets.get(..count).unwrap_or_default();
        // Seal every record of this burst back to back (framed on a stream), then hand
        // them to the transport at once: one write on TCP, one send per datagram on UDP.
        self.txq.clear();
        seal_into(
            &mut self.core,
            &mut self.txq,
            &mut self.transport,
            packets,
            now,
        )?;
        if let Some(t) = self.transport.as_mut() {
            t.send_queue(&self.txq);
        }
        self.txq.clear();
        Ok(())
    }

    /// [`Run::read_tun`] on an offload TUN: each read is one packet or one GSO
    /// super-packet (split here into packets of at most the lease MTU, checksums
    /// computed); the packets are sealed exactly as without offload.
    fn read_tun_offload(&mut self) -> Result<(), ConnectError> {
        let now = self.now();
        let established = self.core.is_established();
        let Some(tun) = self.tun.as_mut() else {
            return Ok(());
        };
        let Some(off) = tun.offload.as_mut() else {
            return Ok(());
        };
        self.txq.clear();
        let mut sealed = 0;
        for _ in 0..TUN_BATCH {
            if sealed >= OFFLOAD_READ_BUDGET {
                break;
            }
            let n = match nix::unistd::read(&tun.fd, off.split.read_buf()) {
                Ok(0) => break,
                Ok(n) => n,
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => break,
                Err(e) => {
                    return Err(ConnectError::Io {
                        what: "reading the TUN",
                        source: e.into(),
                    });
                }
            };
            if !established {
                continue;
            }
            if let Err(e) = off.split.split(n) {
                tracing::debug!(error = %e, len = n, "TUN read dropped");
                continue;
            }
            let mut batch: [&[u8]; TUN_BATCH] = [&[]; TUN_BATCH];
            let mut packets = off.split.packets();
            loop {
                let mut k = 0;
                for (slot, p) in batch.iter_mut().zip(&mut packets) {
                    *slot = p;
                    k += 1;
                }
                if k == 0 {
                    break;
                }
                sealed += k;
                let chunk = batch.get(..k).unwrap_or_default();
                seal_into(
                    &mut self.core,
                    &mut self.txq,
                    &mut self.transport,
                    chunk,
                    now,
                )?;
            }
        }
        if let Some(t) = self.transport.as_mut() {
            t.send_queue(&self.txq);
        }
        self.txq.clear();
        Ok(())
    }

    fn timers(&mut self) -> Result<(), ConnectError> {
        let now = self.now();
        if self.kind == TransportKind::Udp
            && now.saturating_sub(self.last_addr_check) >= Duration::from_secs(1)
        {
            self.last_addr_check = now;
            if let Some(Transport::Udp(s)) = &self.transport {
                if s.local_addr().is_ok_and(|a| !address_is_local(a.ip())) {
                    self.roam = true;
                }
            }
        }
        if std::mem::take(&mut self.roam) && (self.ever_configured || self.core.is_established()) {
            // Roaming: the socket's source address is no longer the laptop's. A new
            // socket (the kernel picks the current address) and at once a fresh
            // handshake with RESUME: the gateway moves the session to the new address
            // with the same lease, the flows survive (docs/client.md, Roaming).
            println!("the local address changed: resuming from the new one");
            let _ = std::io::stdout().flush();
            tracing::info!("local address gone: new socket, resuming");
            self.transport = None;
            self.core.reset();
            self.next_attempt = None;
            self.start_handshake()?;
        }
        let now = self.now();
        match self.core.poll(now, &mut self.tx)? {
            Timer::Idle => {}
            Timer::Send(n) => self.send(n),
            Timer::HandshakeTimedOut => self.attempt_failed("no answer to the handshake")?,
            Timer::Dead => {
                if self.waiting_approval {
                    self.core.mark_alive(now);
                } else {
                    let why = format!(
                        "no answer from the gateway for {} s",
                        crate::core::DEAD_AFTER.as_secs()
                    );
                    self.schedule_reconnect(&why);
                }
            }
        }
        Ok(())
    }

    fn shutdown(&mut self, helper: &mut Helper) -> Result<(), ConnectError> {
        let now = self.now();
        if self.core.is_established() {
            if let Ok(n) = self.core.close(now, &mut self.tx) {
                self.send(n);
            }
        }
        if let Some(tun) = self.tun.take() {
            tracing::info!(ifname = %tun.name, "closing the TUN");
            if let Some(o) = &tun.offload {
                let (r, w) = (o.split.stats, o.gro.stats);
                tracing::info!(
                    super_packets = r.super_packets,
                    segments = r.segments,
                    read_drops = r.dropped,
                    packets_in = w.packets,
                    writes = w.writes,
                    coalesced = w.coalesced,
                    write_drops = w.dropped,
                    "TUN offload counters"
                );
            }
        }
        helper.tear_down()?;
        let c = self.core.counters();
        println!(
            "tunnel down: routes and DNS restored ({} packets sent, {} received)",
            c.tx_packets, c.rx_packets
        );
        let _ = std::io::stdout().flush();
        Ok(())
    }
}

/// Do two leases configure the TUN the same way (addresses, MTU, routes, DNS)? The
/// lease id and expiry may differ after a fresh handshake.
/// Whether `ip` is still one of this host's addresses: binding a new socket to it
/// fails with EADDRNOTAVAIL once it left (the unspecified address always is).
fn address_is_local(ip: IpAddr) -> bool {
    if ip.is_unspecified() {
        return true;
    }
    match UdpSocket::bind((ip, 0)) {
        Ok(_) => true,
        Err(e) => e.raw_os_error() != Some(libc::EADDRNOTAVAIL),
    }
}

/// A send error that means the socket's bound source address left the host.
fn local_address_gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EADDRNOTAVAIL)
    )
}

fn same_config(a: &Lease, b: &Lease) -> bool {
    a.ipv4 == b.ipv4 && a.ipv6 == b.ipv6 && a.mtu == b.mtu && a.routes == b.routes && a.dns == b.dns
}

fn set_nonblocking(fd: &OwnedFd) -> Result<(), ConnectError> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let io = |e: nix::Error| ConnectError::Io {
        what: "cannot make the TUN non-blocking",
        source: e.into(),
    };
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(io)?;
    fcntl(
        fd,
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )
    .map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roaming_is_seen_when_the_source_address_is_no_longer_local() {
        // Loopback and the unspecified address are this host's; a TEST-NET-1 address
        // (RFC 5737) is on no interface of a test machine.
        assert!(address_is_local(IpAddr::from([127, 0, 0, 1])));
        assert!(address_is_local(IpAddr::from([0, 0, 0, 0])));
        assert!(!address_is_local(IpAddr::from([192, 0, 2, 123])));
        let gone = std::io::Error::from_raw_os_error(libc::EADDRNOTAVAIL);
        assert!(local_address_gone(&gone));
        let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert!(!local_address_gone(&refused));
    }
}
