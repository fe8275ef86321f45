//! The broker's I/O driver: one `poll(2)` loop on one thread.
//!
//! Why a poll loop and not tokio: the IPC channels of `ipc-schema` are blocking and
//! expose `as_fd` for `poll`; the broker's work per event is tiny (a policy decision, a
//! DH, a file write), and one thread owning all state needs no locks. Every socket the
//! loop reads from a process it does not trust has a read and a write timeout
//! ([`IPC_TIMEOUT`]), so a worker that stalls mid-frame costs at most that long and is
//! then dropped; opening a new worker's channel (its hello) happens on a short-lived
//! thread so a slow start never stalls the loop.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ipc_schema::Channel;
use ipc_schema::bounded::{BoundedString, BoundedVec};
use ipc_schema::messages::broker_netstack::{
    self as bn, BrokerToNetstack, EgressState, NetstackCounters, NetstackToBroker,
};
use ipc_schema::messages::broker_worker::{
    self as bw, BrokerToWorker, Decision, FirstRecord, HandshakeId, Refusal, TicketOutcome,
    TicketRefusal, TransportKind, WorkerCounters, WorkerToBroker,
};
use ipc_schema::messages::common::{PeerKey, ShutdownReason};
use ipc_schema::messages::control::{
    self as ctl, ControlErrorKind, ControlReply, ControlRequest, PairingInfo, PeerInfo, PeerRef,
    PeerState, SandboxState, StatusReport,
};
use ipc_schema::oracle::{DhOp, HandshakePattern, OracleRefusal};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde_json::Value;
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{error, info, info_span, warn};
use vshp::key_oracle::{LocalKeyOracle, StaticKeyOracle};
use vshp::lease::{Lease, LeaseId};
use vshp::message::ErrorReason;
use vshp::record::{self, ErrorRecord, Record, RecordKind, SessionIndex};
use vshp::ticket::{TicketError, TicketId, TicketLease, TicketSealer};

use crate::grace::{ParkedLeases, RESUME_GRACE};

use crate::audit::AuditLog;
use crate::egress::{self, VpnIface};
use crate::invite::Invite;
use crate::leases::LeasePool;
use crate::pairing::PairingRequests;
use crate::peers::{PeerDb, PeerStatus};
use crate::ratelimit::{Bucket, KeyedLimiter, Rate};
use crate::roaming::RoamState;
use crate::{CONTROL_SOCKET, LOCK_FILE, identity, now_unix};

/// Read/write timeout of every IPC socket the broker reads from another process.
pub const IPC_TIMEOUT: Duration = Duration::from_secs(2);
/// At most this many workers (peer sessions) run at once.
pub const MAX_WORKERS: usize = 64;
/// HANDSHAKE_INIT datagrams / TCP connections per source IP: burst 10, then 2 per second.
pub const PER_SOURCE_RATE: Rate = Rate {
    burst: 10.0,
    per_sec: 2.0,
};
/// Source addresses tracked by the per-source limiter.
pub const MAX_TRACKED_SOURCES: usize = 4096;
/// New sessions from all sources together: burst 32, then 16 per second.
pub const GLOBAL_RATE: Rate = Rate {
    burst: 32.0,
    per_sec: 16.0,
};
/// Handshakes one worker may show: burst 4, then one per 10 seconds (a client
/// re-handshakes every 55 minutes, or retries after a refusal).
pub const PER_WORKER_HANDSHAKE_RATE: Rate = Rate {
    burst: 4.0,
    per_sec: 0.1,
};
/// Lifetime of resume tickets.
pub const TICKET_LIFETIME_SECS: u64 = 12 * 3600;
/// A worker told to shut down (revocation) is killed if still alive after this.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);
/// How often the broker asks the netstack and admitted workers for their counters.
pub const COUNTERS_EVERY: Duration = Duration::from_secs(5);
/// How often the routing table is re-read for VPN detection.
pub const EGRESS_POLL: Duration = Duration::from_secs(1);

/// `--egress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressPolicy {
    /// Forward only through a VPN interface carrying the Internet routes (default).
    Vpn,
    /// Forward through whatever route the OS has.
    Any,
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub egress: EgressPolicy,
    /// The worker binary (`vpnshare-worker`).
    pub worker_exe: Option<PathBuf>,
    /// The netstack binary (`vpnshare-netstack`); absent: forwarding is unavailable.
    pub netstack_exe: Option<PathBuf>,
    /// How long a pairing request waits for the user's decision (`--pairing-timeout`).
    pub pairing_timeout_secs: u64,
    /// Flow caps handed to the netstack process (`--max-flows-per-peer`, `--max-flows`).
    pub netstack_limits: NetstackLimits,
}

/// The netstack's flow caps, passed on its command line (`docs/netstack.md`); `None`:
/// the netstack's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetstackLimits {
    /// TCP flows one peer may hold open.
    pub max_flows_per_peer: Option<u32>,
    /// Flows of all peers together.
    pub max_flows: Option<u32>,
}

impl NetstackLimits {
    /// The `vpnshare-netstack` arguments for these caps.
    pub fn args(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(n) = self.max_flows_per_peer {
            v.extend(["--max-flows-per-peer".to_owned(), n.to_string()]);
        }
        if let Some(n) = self.max_flows {
            v.extend(["--max-flows".to_owned(), n.to_string()]);
        }
        v
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(transparent)]
    Peers(#[from] crate::peers::PeerDbError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("a gateway is already running on the state dir {0}")]
    AlreadyRunning(PathBuf),
    #[error("confinement failed: {0}")]
    Confine(#[from] security::Error),
    #[error("resume-ticket key: {0}")]
    Ticket(#[from] TicketError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> GatewayError {
    let what = what.into();
    move |source| GatewayError::Io { what, source }
}

/// What the gateway bound, for the caller to print.
#[derive(Debug, Clone)]
pub struct Started {
    pub invite: Invite,
    pub local_addr: SocketAddr,
    pub control_socket: PathBuf,
}

/// One peer session's worker process.
struct Worker {
    child: Child,
    chan: Channel<bw::BrokerEnd>,
    source: SocketAddr,
    kind: TransportKind,
    oracle: crate::oracle::Bindings,
    show_limit: Bucket,
    peer: Option<[u8; 32]>,
    /// The handshake waiting for a pairing approval.
    pending: Option<HandshakeId>,
    /// The device name and platform of the last `Finished` (AUTH's claim).
    device: (Option<String>, Option<String>),
    lease: Option<Lease>,
    counters: WorkerCounters,
    kill_at: Option<Instant>,
    /// The broker told it to stop (revocation, replacement): its exit is expected.
    stopping: bool,
    channel_dead: bool,
    /// Roaming by NAT rebinding (UDP): its receiver index and the probe in flight.
    roam: RoamState,
}

/// A worker whose channel hello is being exchanged on a helper thread.
struct Spawning {
    session: u64,
    child: Child,
    source: SocketAddr,
    kind: TransportKind,
    transport: OwnedFd,
    first_record: Option<FirstRecord>,
}

type Opened = (
    u64,
    Result<Channel<bw::BrokerEnd>, ipc_schema::ChannelError>,
);

struct Netstack {
    child: Child,
    chan: Channel<bn::BrokerEnd>,
}

/// The running gateway: all state, all sockets, all children.
pub struct Gateway {
    cfg: GatewayConfig,
    oracle: LocalKeyOracle,
    gateway_key: [u8; 32],
    db: PeerDb,
    pool: LeasePool,
    pairing: PairingRequests,
    sealer: TicketSealer,
    audit: AuditLog,
    udp: UdpSocket,
    tcp: TcpListener,
    control: UnixListener,
    local: SocketAddr,
    lock: nix::fcntl::Flock<File>,
    workers: HashMap<u64, Worker>,
    spawning: HashMap<u64, Spawning>,
    opened_tx: mpsc::Sender<Opened>,
    opened_rx: mpsc::Receiver<Opened>,
    wake_rx: UnixStream,
    wake_tx: UnixStream,
    netstack: Option<Netstack>,
    netstack_counters: NetstackCounters,
    next_session: u64,
    source_limit: KeyedLimiter<std::net::IpAddr>,
    global_limit: Bucket,
    started: Instant,
    egress: EgressState,
    vpn: Option<VpnIface>,
    /// A NETLINK_ROUTE socket subscribed to link and route changes: a change wakes the
    /// loop, which re-reads the snapshot at once (the 1 s re-read stays as a fallback).
    route_watch: Option<OwnedFd>,
    last_egress_check: Option<Instant>,
    last_counters: Instant,
    workers_restarted: u64,
    /// Final counters of the workers that ended, for `status`.
    ended_workers: WorkerCounters,
    confined: bool,
    dropped_handshakes: u64,
    /// Leases of disconnected peers kept for a resume (`crate::grace`).
    parked: ParkedLeases,
    /// The MTU the pool chose for each active lease, before the egress cap
    /// (`crate::lease_config`); the cap follows the VPN's MTU, this never changes.
    base_mtu: HashMap<LeaseId, u16>,
    /// The id of the last roaming probe sent to a worker.
    last_probe: u64,
    /// The VPN interface's MTU at the last routing snapshot (`None`: no VPN, unknown,
    /// `--egress any`).
    egress_mtu: Option<u32>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("local", &self.local)
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

fn peer_hex(k: &[u8; 32]) -> String {
    hex::encode(k)
}

fn udp_listener(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_cloexec(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

fn random_u64() -> u64 {
    rand::random::<u64>()
}

impl Gateway {
    /// Opens the state, binds the listeners and the control socket, starts the netstack
    /// (if its binary exists). Nothing is read from the network yet.
    pub fn start(cfg: GatewayConfig) -> Result<(Self, Started), GatewayError> {
        crate::fsutil::ensure_dir(&cfg.state_dir).map_err(io_err("cannot create the state dir"))?;
        let lock = crate::fsutil::open_append_0600(&cfg.state_dir.join(LOCK_FILE))
            .map_err(io_err("cannot open the lock file"))?;
        // Held (and released by the kernel) for the life of the gateway.
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| GatewayError::AlreadyRunning(cfg.state_dir.clone()))?;

        let keypair = identity::load_or_create(&cfg.state_dir)?;
        let gateway_key = keypair.public_key();
        let db = PeerDb::load(&cfg.state_dir)?;
        let audit = AuditLog::open(&cfg.state_dir).map_err(io_err("cannot open the audit log"))?;

        let (udp, tcp, local) = bind_listeners(cfg.listen)?;
        udp.set_nonblocking(true)
            .map_err(io_err("UDP non-blocking"))?;
        tcp.set_nonblocking(true)
            .map_err(io_err("TCP non-blocking"))?;

        let control_path = cfg.state_dir.join(CONTROL_SOCKET);
        if control_path.exists() {
            // A socket nobody listens on is left over from a gateway that died.
            if UnixStream::connect(&control_path).is_ok() {
                return Err(GatewayError::AlreadyRunning(cfg.state_dir.clone()));
            }
            std::fs::remove_file(&control_path)
                .map_err(io_err("cannot remove the stale control socket"))?;
        }
        let control =
            UnixListener::bind(&control_path).map_err(io_err("cannot bind the control socket"))?;
        std::fs::set_permissions(&control_path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err("chmod control socket"))?;
        control
            .set_nonblocking(true)
            .map_err(io_err("control non-blocking"))?;

        let (wake_rx, wake_tx) = UnixStream::pair().map_err(io_err("socketpair"))?;
        wake_rx
            .set_nonblocking(true)
            .map_err(io_err("wake non-blocking"))?;
        let (opened_tx, opened_rx) = mpsc::channel();

        let mut ticket_key = [0u8; 32];
        ticket_key[..8].copy_from_slice(&random_u64().to_ne_bytes());
        ticket_key[8..16].copy_from_slice(&random_u64().to_ne_bytes());
        ticket_key[16..24].copy_from_slice(&random_u64().to_ne_bytes());
        ticket_key[24..].copy_from_slice(&random_u64().to_ne_bytes());
        // A fresh ticket key at every start (docs/protocol-crypto.md §5): the redeemed
        // set lives in memory only.
        let sealer = TicketSealer::new(ticket_key)?;
        ticket_key.fill(0);

        let now = Instant::now();
        let egress = match cfg.egress {
            EgressPolicy::Any => EgressState::Any,
            EgressPolicy::Vpn => EgressState::VpnDown,
        };
        let mut gw = Self {
            oracle: LocalKeyOracle::new(keypair),
            gateway_key,
            db,
            pool: LeasePool::new((random_u64() >> 16).max(1)),
            pairing: PairingRequests::with_ttl(cfg.pairing_timeout_secs),
            sealer,
            audit,
            udp,
            tcp,
            control,
            local,
            lock,
            workers: HashMap::new(),
            spawning: HashMap::new(),
            opened_tx,
            opened_rx,
            wake_rx,
            wake_tx,
            netstack: None,
            netstack_counters: NetstackCounters::default(),
            next_session: 1,
            source_limit: KeyedLimiter::new(PER_SOURCE_RATE, MAX_TRACKED_SOURCES),
            global_limit: Bucket::full(GLOBAL_RATE, Duration::ZERO),
            started: now,
            egress,
            vpn: None,
            route_watch: if cfg.egress == EgressPolicy::Vpn {
                route_watch_socket()
                    .map_err(|e| warn!(error = %e, "no netlink route notifications: polling only"))
                    .ok()
            } else {
                None
            },
            last_egress_check: None,
            last_counters: now,
            workers_restarted: 0,
            ended_workers: WorkerCounters::default(),
            confined: false,
            dropped_handshakes: 0,
            parked: ParkedLeases::new(RESUME_GRACE),
            base_mtu: HashMap::new(),
            last_probe: 0,
            egress_mtu: None,
            cfg,
        };
        gw.start_netstack();
        gw.check_egress(true);
        let started = Started {
            invite: Invite::new(local, gateway_key),
            local_addr: local,
            control_socket: control_path,
        };
        gw.audit.record(
            "gateway_started",
            &[
                ("listen", Value::from(local.to_string())),
                ("key", Value::from(peer_hex(&gateway_key))),
                (
                    "egress",
                    Value::from(match gw.cfg.egress {
                        EgressPolicy::Vpn => "vpn",
                        EgressPolicy::Any => "any",
                    }),
                ),
            ],
        );
        Ok((gw, started))
    }

    /// Every descriptor the gateway holds (for `confine`'s `keep_fds`).
    pub fn fds(&self) -> Vec<RawFd> {
        let mut v = vec![
            self.udp.as_raw_fd(),
            self.tcp.as_raw_fd(),
            self.control.as_raw_fd(),
            self.wake_rx.as_raw_fd(),
            self.wake_tx.as_raw_fd(),
            self.lock.as_raw_fd(),
        ];
        v.extend(self.audit.raw_fd());
        v.extend(self.route_watch.as_ref().map(AsRawFd::as_raw_fd));
        if let Some(n) = &self.netstack {
            v.push(n.chan.as_fd().as_raw_fd());
        }
        v
    }

    /// Confines the broker (`security::confine(Role::Broker)`): call after `start`,
    /// before `run`, while the process is single-threaded.
    pub fn confine(&mut self) -> Result<(), GatewayError> {
        let opts = security::ConfineOptions::keep(&self.fds());
        let c = security::confine(security::Role::Broker, &opts)?;
        info!(confinement = ?c, "broker confined");
        self.confined = true;
        Ok(())
    }

    fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn start_netstack(&mut self) {
        let Some(exe) = self.cfg.netstack_exe.clone().filter(|p| p.is_file()) else {
            warn!(
                "netstack binary {} not found: forwarding is unavailable (pairing and handshakes still work)",
                self.cfg
                    .netstack_exe
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| crate::NETSTACK_BIN.into())
            );
            return;
        };
        let result = (|| -> Result<Netstack, String> {
            let (ours, theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
            set_timeouts(&ours).map_err(|e| e.to_string())?;
            let args = self.cfg.netstack_limits.args();
            let child = spawn_with_fd3(&exe, &args, theirs.as_fd()).map_err(|e| e.to_string())?;
            drop(theirs);
            let chan = Channel::<bn::BrokerEnd>::open(ours).map_err(|e| e.to_string());
            match chan {
                Ok(chan) => Ok(Netstack { child, chan }),
                Err(e) => {
                    let mut child = child;
                    let _ = child.kill();
                    let _ = child.wait();
                    Err(e)
                }
            }
        })();
        match result {
            Ok(n) => {
                info!(pid = n.child.id(), exe = %exe.display(), "netstack started");
                self.netstack = Some(n);
            }
            Err(e) => {
                error!(exe = %exe.display(), error = %e, "netstack failed to start: forwarding is unavailable")
            }
        }
    }

    fn send_netstack(&mut self, msg: &BrokerToNetstack, fds: &[BorrowedFd<'_>]) {
        let Some(n) = &mut self.netstack else { return };
        if let Err(e) = n.chan.send(msg, fds) {
            error!(error = %e, "netstack channel failed: forwarding is unavailable");
            let mut n = self.netstack.take();
            if let Some(n) = &mut n {
                let _ = n.child.kill();
                let _ = n.child.wait();
            }
        }
    }

    fn sharing_available(&self) -> bool {
        !matches!(self.egress, EgressState::VpnDown)
    }

    /// Re-reads the routing table (at most once per [`EGRESS_POLL`]).
    /// `force`: the first check (announce the state whatever it is); `now`: skip the
    /// [`EGRESS_POLL`] gate (the kernel said routes or links changed).
    fn check_egress(&mut self, force: bool) {
        self.check_egress_at(force, force);
    }

    fn check_egress_at(&mut self, force: bool, now_required: bool) {
        if self.cfg.egress == EgressPolicy::Any {
            if force {
                warn!(
                    "--egress any: forwarded traffic leaves through whatever route the OS has, VPN or not"
                );
                self.send_netstack(&BrokerToNetstack::Egress(EgressState::Any), &[]);
            }
            return;
        }
        let now = Instant::now();
        if !now_required
            && self
                .last_egress_check
                .is_some_and(|t| now.duration_since(t) < EGRESS_POLL)
        {
            return;
        }
        self.last_egress_check = Some(now);
        let vpn = match egress::read_snapshot() {
            Ok(s) => egress::detect_vpn(&s),
            Err(e) => {
                warn!(error = %e, "cannot read the routing table: treating the VPN as down");
                None
            }
        };
        let mtu = vpn
            .as_ref()
            .and_then(|v| crate::lease_config::link_mtu(&v.name));
        if mtu != self.egress_mtu {
            self.set_egress_mtu(mtu);
        }
        if vpn == self.vpn && !force {
            return;
        }
        self.egress = match &vpn {
            Some(v) => EgressState::VpnUp { ifindex: v.ifindex },
            None => EgressState::VpnDown,
        };
        match &vpn {
            Some(v) => {
                info!(iface = %v.name, ifindex = v.ifindex, "VPN detected: sharing available")
            }
            None => warn!("no VPN carries the Internet routes: sharing unavailable until one does"),
        }
        self.audit.record(
            "egress_changed",
            &[
                ("vpn", Value::from(vpn.is_some())),
                (
                    "iface",
                    vpn.as_ref()
                        .map(|v| Value::from(v.name.clone()))
                        .unwrap_or(Value::Null),
                ),
            ],
        );
        self.vpn = vpn;
        let e = self.egress;
        self.send_netstack(&BrokerToNetstack::Egress(e), &[]);
    }

    /// The VPN's MTU changed: every live lease whose configuration follows it changes
    /// now, and its worker sends the peer a CONFIG_DELTA (`LeaseChanged`). Parked
    /// leases are reconfigured when they resume.
    fn set_egress_mtu(&mut self, mtu: Option<u32>) {
        info!(from = ?self.egress_mtu, to = ?mtu, "egress MTU changed");
        self.egress_mtu = mtu;
        let changed: Vec<(u64, Lease)> = self
            .workers
            .iter()
            .filter(|(_, w)| !w.channel_dead && !w.stopping)
            .filter_map(|(id, w)| {
                let l = w.lease.as_ref()?;
                let base = self.base_mtu.get(&l.id).copied().unwrap_or(l.mtu);
                crate::lease_config::reconfigured(l, base, mtu).map(|n| (*id, n))
            })
            .collect();
        for (session, lease) in changed {
            info!(
                session,
                lease = lease.id.0,
                mtu = lease.mtu,
                "lease changed: CONFIG_DELTA"
            );
            self.audit.record(
                "lease_changed",
                &[
                    ("lease", Value::from(lease.id.0)),
                    ("mtu", Value::from(lease.mtu)),
                ],
            );
            if let Some(w) = self.workers.get_mut(&session) {
                w.lease = Some(lease.clone());
            }
            self.send_worker(session, &BrokerToWorker::LeaseChanged { lease }, &[]);
        }
    }

    /// Runs until SIGINT/SIGTERM is not handled here: the loop runs until the process is
    /// killed or `stop` returns true (checked once per iteration).
    pub fn run(&mut self, stop: &dyn Fn() -> bool) -> Result<(), GatewayError> {
        info!(listen = %self.local, "gateway running");
        let mut buf = vec![0u8; 65_536];
        while !stop() {
            self.poll_once(&mut buf)?;
        }
        self.shutdown();
        Ok(())
    }

    fn poll_once(&mut self, buf: &mut [u8]) -> Result<(), GatewayError> {
        let worker_ids: Vec<u64> = self
            .workers
            .iter()
            .filter(|(_, w)| !w.channel_dead)
            .map(|(id, _)| *id)
            .collect();
        let readable = {
            let flags = PollFlags::POLLIN;
            let mut fds = vec![
                PollFd::new(self.udp.as_fd(), flags),
                PollFd::new(self.tcp.as_fd(), flags),
                PollFd::new(self.control.as_fd(), flags),
                PollFd::new(self.wake_rx.as_fd(), flags),
            ];
            fds.push(match &self.route_watch {
                Some(fd) => PollFd::new(fd.as_fd(), flags),
                None => PollFd::new(self.wake_rx.as_fd(), PollFlags::empty()),
            });
            let ns = self.netstack.as_ref().map(|n| n.chan.as_fd());
            if let Some(fd) = ns {
                fds.push(PollFd::new(fd, flags));
            }
            for id in &worker_ids {
                if let Some(w) = self.workers.get(id) {
                    fds.push(PollFd::new(w.chan.as_fd(), flags));
                }
            }
            match poll(&mut fds, PollTimeout::from(200u16)) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    return Err(GatewayError::Io {
                        what: "poll".into(),
                        source: e.into(),
                    });
                }
            }
            fds.iter()
                .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
                .collect::<Vec<bool>>()
        };
        let mut it = readable.into_iter();
        let (udp, tcp, control, wake) = (
            it.next().unwrap_or(false),
            it.next().unwrap_or(false),
            it.next().unwrap_or(false),
            it.next().unwrap_or(false),
        );
        let routes_changed = it.next().unwrap_or(false);
        let ns = if self.netstack.is_some() {
            it.next().unwrap_or(false)
        } else {
            false
        };
        let ready_workers: Vec<u64> = worker_ids
            .into_iter()
            .zip(it)
            .filter(|(_, r)| *r)
            .map(|(id, _)| id)
            .collect();

        if wake {
            let mut b = [0u8; 64];
            while matches!(io::Read::read(&mut &self.wake_rx, &mut b), Ok(n) if n > 0) {}
        }
        while let Ok((session, result)) = self.opened_rx.try_recv() {
            self.finish_spawn(session, result);
        }
        if udp {
            self.on_udp(buf);
        }
        if tcp {
            self.on_tcp();
        }
        if control {
            self.on_control();
        }
        if ns {
            self.on_netstack();
        }
        for id in ready_workers {
            self.on_worker(id);
        }
        self.reap();
        self.expire_parked();
        if routes_changed {
            if let Some(fd) = &self.route_watch {
                drain(fd.as_fd());
            }
        }
        self.check_egress_at(false, routes_changed);
        if self.last_counters.elapsed() >= COUNTERS_EVERY {
            self.last_counters = Instant::now();
            self.send_netstack(&BrokerToNetstack::ReportCounters, &[]);
            let admitted: Vec<u64> = self
                .workers
                .iter()
                .filter(|(_, w)| w.lease.is_some() && !w.channel_dead)
                .map(|(id, _)| *id)
                .collect();
            for id in admitted {
                self.send_worker(id, &BrokerToWorker::ReportCounters, &[]);
            }
        }
        for r in self.pairing.expire(now_unix()) {
            self.audit.record(
                "pairing_expired",
                &[
                    ("code", Value::from(r.code.clone())),
                    ("key", Value::from(peer_hex(&r.key))),
                ],
            );
            self.refuse_waiting(r.session, Refusal::PairingExpired);
        }
        Ok(())
    }

    fn admit_new_session(&mut self, source: SocketAddr) -> Result<(), ErrorReason> {
        let now = self.elapsed();
        if !self.source_limit.allow(&source.ip(), now) || !self.global_limit.take(GLOBAL_RATE, now)
        {
            self.dropped_handshakes += 1;
            warn!(%source, "handshake rate limit: dropped");
            return Err(ErrorReason::Overloaded);
        }
        if self.workers.len() + self.spawning.len() >= MAX_WORKERS {
            self.dropped_handshakes += 1;
            warn!(%source, max = MAX_WORKERS, "worker cap reached: refused");
            return Err(ErrorReason::Overloaded);
        }
        Ok(())
    }

    fn on_udp(&mut self, buf: &mut [u8]) {
        for _ in 0..64 {
            let (n, source) = match self.udp.recv_from(buf) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!(error = %e, "UDP receive");
                    return;
                }
            };
            let Some(dgram) = buf.get(..n) else { return };
            let sender = match record::decode(dgram) {
                Ok(Record::Handshake { header, .. })
                    if header.kind == RecordKind::HandshakeInit =>
                {
                    header.sender
                }
                Err(record::RecordError::UnsupportedVersion(_)) => {
                    if self.source_limit.allow(&source.ip(), self.elapsed()) {
                        let _ = self
                            .udp
                            .send_to(&ErrorRecord::unsupported_version().encode(), source);
                    }
                    continue;
                }
                // A DATA record from an address no session has: perhaps a live
                // session's client behind a NAT that rebound its port (roaming).
                Ok(Record::Data { header, .. }) => {
                    self.on_roam_candidate(header.receiver.0, dgram, source);
                    continue;
                }
                // Anything else on the listener (late data of a finished session,
                // garbage) is dropped: only a HANDSHAKE_INIT starts a session.
                _ => {
                    self.dropped_handshakes += 1;
                    continue;
                }
            };
            // A datagram queued on the listener before this peer's connected socket
            // existed: its worker gets the peer's retransmissions on that socket.
            let live = self.workers.values().any(|w| {
                w.kind == TransportKind::Datagram && w.source == source && !w.channel_dead
            }) || self
                .spawning
                .values()
                .any(|s| s.kind == TransportKind::Datagram && s.source == source);
            if live {
                continue;
            }
            let first = match FirstRecord::from_slice(dgram) {
                Ok(f) => f,
                Err(_) => {
                    self.dropped_handshakes += 1;
                    continue;
                }
            };
            if let Err(reason) = self.admit_new_session(source) {
                let _ = self
                    .udp
                    .send_to(&error_record(reason, sender).encode(), source);
                continue;
            }
            match connected_udp(self.local, source) {
                Ok(sock) => {
                    self.spawn_worker(source, TransportKind::Datagram, sock, Some(first), sender)
                }
                Err(e) => error!(%source, error = %e, "cannot open a connected UDP socket"),
            }
        }
    }

    /// A DATA record for receiver index `index` from `source`, which is no session's
    /// address: sent to the live datagram session with that index as a roaming probe
    /// (at most one in flight per session, rate-limited: `crate::roaming`). Nothing
    /// moves until the worker authenticates it.
    fn on_roam_candidate(&mut self, index: u32, dgram: &[u8], source: SocketAddr) {
        let known =
            self.workers.values().any(|w| {
                w.kind == TransportKind::Datagram && w.source == source && !w.channel_dead
            }) || self
                .spawning
                .values()
                .any(|s| s.kind == TransportKind::Datagram && s.source == source);
        // The one live session that claims this index. Indices are random 32-bit
        // values the workers choose; two claiming the same one (a collision, or a
        // compromised worker copying another's) get no probe at all.
        let mut claims = self.workers.iter().filter(|(_, w)| {
            w.kind == TransportKind::Datagram
                && !w.channel_dead
                && !w.stopping
                && w.lease.is_some()
                && w.roam.index() == Some(index)
        });
        let target = match (claims.next(), claims.next()) {
            (Some((id, _)), None) => Some(*id),
            _ => None,
        };
        let (Some(session), false) = (target, known) else {
            // Late data of a finished session, or of a session that has not moved:
            // dropped, as before.
            self.dropped_handshakes += 1;
            return;
        };
        let Ok(record) = bw::ProbeRecord::from_slice(dgram) else {
            self.dropped_handshakes += 1;
            return;
        };
        let now = self.elapsed();
        let id = self.last_probe.wrapping_add(1);
        let offered = self
            .workers
            .get_mut(&session)
            .map(|w| w.roam.offer(index, source, id, now));
        match offered {
            Some(Ok(())) => {
                self.last_probe = id;
                info!(session, %source, probe = id, "record from a new address: asking the worker to authenticate it");
                self.send_worker(
                    session,
                    &BrokerToWorker::RoamProbe { probe: id, record },
                    &[],
                );
            }
            Some(Err(e)) => {
                self.dropped_handshakes += 1;
                tracing::debug!(session, %source, error = %e, "roaming candidate dropped");
            }
            None => {}
        }
    }

    /// The worker's verdict on a roaming probe: only an authenticated one moves the
    /// session, to a new socket connected to the probe's address.
    fn on_roam_verdict(&mut self, session: u64, probe: u64, authenticated: bool) {
        let Some(w) = self.workers.get_mut(&session) else {
            return;
        };
        let from = w.source;
        let peer = w.peer;
        let Some(to) = w.roam.verdict(probe, authenticated) else {
            if !authenticated {
                info!(
                    session,
                    probe, "roaming probe not authenticated: the session stays"
                );
            }
            return;
        };
        let sock = match connected_udp(self.local, to) {
            Ok(s) => s,
            Err(e) => {
                error!(session, %to, error = %e, "cannot open a connected UDP socket: the session stays");
                return;
            }
        };
        self.send_worker(
            session,
            &BrokerToWorker::MoveTransport { probe },
            &[sock.as_fd()],
        );
        drop(sock);
        if let Some(w) = self.workers.get_mut(&session) {
            if w.channel_dead {
                return;
            }
            w.source = to;
        }
        info!(session, %from, %to, "roamed: the session moved to the client's new address");
        self.audit.record(
            "peer_roamed",
            &[
                ("session", Value::from(session)),
                (
                    "key",
                    Value::from(peer.map(|k| peer_hex(&k)).unwrap_or_default()),
                ),
                ("from", Value::from(from.to_string())),
                ("to", Value::from(to.to_string())),
            ],
        );
    }

    fn on_tcp(&mut self) {
        for _ in 0..64 {
            let (stream, source) = match self.tcp.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!(error = %e, "TCP accept");
                    return;
                }
            };
            if let Err(reason) = self.admit_new_session(source) {
                send_stream_error(stream, reason);
                continue;
            }
            let _ = stream.set_nonblocking(false);
            // Records go out as the worker writes them (the client does the same):
            // Nagle would hold a small answer back behind an unacknowledged one.
            let _ = stream.set_nodelay(true);
            self.spawn_worker(
                source,
                TransportKind::Stream,
                OwnedFd::from(stream),
                None,
                SessionIndex(0),
            );
        }
    }

    fn spawn_worker(
        &mut self,
        source: SocketAddr,
        kind: TransportKind,
        transport: OwnedFd,
        first_record: Option<FirstRecord>,
        sender: SessionIndex,
    ) {
        let session = self.next_session;
        self.next_session += 1;
        let span = info_span!("session", session, %source);
        let _g = span.enter();
        let exe = self.cfg.worker_exe.clone().filter(|p| p.is_file());
        let args = self.worker_args();
        let spawned = exe
            .ok_or_else(|| "the worker binary vpnshare-worker was not found".to_string())
            .and_then(|exe| {
                let (ours, theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
                set_timeouts(&ours).map_err(|e| e.to_string())?;
                let child = spawn_with_fd3(&exe, &args, theirs.as_fd())
                    .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
                Ok((ours, child))
            });
        let (ours, child) = match spawned {
            Ok(x) => x,
            Err(e) => {
                error!(error = %e, "cannot serve the peer");
                match kind {
                    TransportKind::Datagram => {
                        let sock = UdpSocket::from(transport);
                        let _ = sock.send(&error_record(ErrorReason::Overloaded, sender).encode());
                    }
                    TransportKind::Stream => {
                        send_stream_error(TcpStream::from(transport), ErrorReason::Overloaded)
                    }
                }
                return;
            }
        };
        info!(pid = child.id(), ?kind, "worker spawned");
        self.spawning.insert(
            session,
            Spawning {
                session,
                child,
                source,
                kind,
                transport,
                first_record,
            },
        );
        let tx = self.opened_tx.clone();
        let wake = self.wake_tx.try_clone();
        let spawned = std::thread::Builder::new()
            .name(format!("open-{session}"))
            .spawn(move || {
                let r = Channel::<bw::BrokerEnd>::open(ours);
                let _ = tx.send((session, r));
                if let Ok(mut w) = wake {
                    let _ = w.write_all(&[1]);
                }
            });
        if let Err(e) = spawned {
            error!(error = %e, "cannot start a thread");
        }
    }

    /// `--gateway-key` and a `--deny` for each of the gateway's own networks (read
    /// now, so a network that appeared since start is covered).
    fn worker_args(&self) -> Vec<String> {
        let mut args = vec!["--gateway-key".to_owned(), peer_hex(&self.gateway_key)];
        let vpn_ifaces: Vec<String> = egress::read_snapshot()
            .map(|s| {
                s.links
                    .iter()
                    .filter(|l| egress::is_vpn_link(l))
                    .map(|l| l.name.clone())
                    .collect()
            })
            .unwrap_or_default();
        for p in crate::lan::deny_prefixes(&crate::lan::read_ifaddrs(), &vpn_ifaces) {
            args.push("--deny".to_owned());
            args.push(p);
        }
        args
    }

    fn finish_spawn(
        &mut self,
        session: u64,
        result: Result<Channel<bw::BrokerEnd>, ipc_schema::ChannelError>,
    ) {
        let Some(mut s) = self.spawning.remove(&session) else {
            return;
        };
        let span = info_span!("session", session = s.session, source = %s.source);
        let _g = span.enter();
        let mut chan = match result {
            Ok(c) => c,
            Err(e) => {
                error!(error = %e, "worker channel did not open");
                let _ = s.child.kill();
                log_exit("worker", s.child.wait().ok());
                self.workers_restarted += 1;
                return;
            }
        };
        let msg = BrokerToWorker::AdoptTransport {
            kind: s.kind,
            first_record: s.first_record.take(),
        };
        let sent = chan.send(&msg, &[s.transport.as_fd()]);
        // Our copy of the transport closes here: from now on only the worker reads it.
        drop(s.transport);
        let mut w = Worker {
            child: s.child,
            chan,
            source: s.source,
            kind: s.kind,
            oracle: crate::oracle::Bindings::default(),
            show_limit: Bucket::full(PER_WORKER_HANDSHAKE_RATE, self.elapsed()),
            peer: None,
            pending: None,
            device: (None, None),
            lease: None,
            counters: WorkerCounters::default(),
            kill_at: None,
            stopping: false,
            channel_dead: false,
            roam: RoamState::new(self.elapsed()),
        };
        if let Err(e) = sent {
            error!(error = %e, "cannot hand the transport to the worker");
            let _ = w.child.kill();
            w.channel_dead = true;
        }
        self.workers.insert(session, w);
    }

    fn send_worker(&mut self, session: u64, msg: &BrokerToWorker, fds: &[BorrowedFd<'_>]) {
        let Some(w) = self.workers.get_mut(&session) else {
            return;
        };
        if let Err(e) = w.chan.send(msg, fds) {
            warn!(session, error = %e, "worker channel failed: stopping the worker");
            w.channel_dead = true;
            let _ = w.child.kill();
        }
    }

    fn on_worker(&mut self, session: u64) {
        let Some(w) = self.workers.get_mut(&session) else {
            return;
        };
        let span = info_span!("session", session, source = %w.source, peer = w.peer.map(|k| peer_hex(&k)).unwrap_or_default());
        let _g = span.enter();
        let msg = match w.chan.recv() {
            Ok(m) => m.msg,
            Err(e) => {
                if e.is_bad_message() {
                    warn!(error = %e, "bad message from worker: stopping it");
                } else {
                    info!(error = %e, "worker channel closed");
                }
                w.channel_dead = true;
                if w.kill_at.is_none() {
                    w.kill_at = Some(Instant::now() + SHUTDOWN_GRACE);
                }
                return;
            }
        };
        match msg {
            WorkerToBroker::ShowHandshake {
                handshake,
                pattern,
                first_message,
            } => self.on_show(session, handshake, pattern, first_message.as_slice()),
            WorkerToBroker::DhRequest {
                handshake,
                op,
                remote,
            } => self.on_dh(session, handshake, op, remote),
            WorkerToBroker::Finished {
                handshake,
                peer,
                handshake_hash,
                ticket,
                device_name,
                platform,
            } => {
                if let Some(w) = self.workers.get_mut(&session) {
                    w.device = (
                        device_name.map(|n| n.as_str().to_owned()),
                        platform.map(|p| p.as_str().to_owned()),
                    );
                }
                self.on_finished(
                    session,
                    handshake,
                    peer.0,
                    handshake_hash,
                    ticket.as_ref().map(|t| t.as_slice()),
                )
            }
            WorkerToBroker::SealTicket { request } => {
                let ticket = self
                    .workers
                    .get(&session)
                    .and_then(|w| Some((w.peer?, w.lease.clone()?)));
                let msg = match ticket.and_then(|(peer, lease)| self.seal_ticket(&peer, &lease)) {
                    Some(t) => BrokerToWorker::TicketSealed { request, ticket: t },
                    None => BrokerToWorker::TicketOpened {
                        request,
                        outcome: TicketOutcome::Refused(TicketRefusal::Invalid),
                    },
                };
                self.send_worker(session, &msg, &[]);
            }
            WorkerToBroker::OpenTicket {
                request,
                peer,
                ticket,
            } => {
                let outcome = self.open_ticket_for(session, &peer.0, ticket.as_slice());
                self.send_worker(
                    session,
                    &BrokerToWorker::TicketOpened { request, outcome },
                    &[],
                );
            }
            WorkerToBroker::Counters(c) => {
                if let Some(w) = self.workers.get_mut(&session) {
                    w.counters = c;
                }
            }
            WorkerToBroker::SessionEnded { reason } => {
                info!(?reason, "worker reports the session ended")
            }
            WorkerToBroker::RoamIndex { index } => {
                if let Some(w) = self.workers.get_mut(&session) {
                    if w.kind == TransportKind::Datagram {
                        w.roam.set_index(index);
                    }
                }
            }
            WorkerToBroker::RoamVerdict {
                probe,
                authenticated,
            } => self.on_roam_verdict(session, probe, authenticated),
        }
    }

    fn on_show(
        &mut self,
        session: u64,
        handshake: HandshakeId,
        pattern: HandshakePattern,
        first: &[u8],
    ) {
        let now = self.elapsed();
        let Some(w) = self.workers.get_mut(&session) else {
            return;
        };
        let result = if w.show_limit.take(PER_WORKER_HANDSHAKE_RATE, now) {
            w.oracle.show(handshake, pattern, first)
        } else {
            Err(OracleRefusal::RateLimited)
        };
        let msg = match result {
            Ok(()) => BrokerToWorker::HandshakeBound { handshake },
            Err(reason) => {
                warn!(?reason, "handshake refused");
                BrokerToWorker::HandshakeRefused { handshake, reason }
            }
        };
        self.send_worker(session, &msg, &[]);
    }

    fn on_dh(&mut self, session: u64, handshake: HandshakeId, op: DhOp, remote: [u8; 32]) {
        let Some(w) = self.workers.get_mut(&session) else {
            return;
        };
        let result = w.oracle.check_dh(handshake, op, &remote);
        let msg = match result.and_then(|()| {
            self.oracle
                .dh(&remote)
                .map_err(|_| OracleRefusal::RemoteMismatch)
        }) {
            Ok(shared) => BrokerToWorker::DhResult {
                handshake,
                op,
                shared,
            },
            Err(reason) => {
                warn!(session, ?op, ?reason, "DH refused");
                BrokerToWorker::DhRefused {
                    handshake,
                    op,
                    reason,
                }
            }
        };
        self.send_worker(session, &msg, &[]);
    }

    fn on_finished(
        &mut self,
        session: u64,
        handshake: HandshakeId,
        peer: [u8; 32],
        hash: [u8; 32],
        ticket: Option<&[u8]>,
    ) {
        let checked = self
            .workers
            .get_mut(&session)
            .map(|w| w.oracle.finish(handshake, &peer));
        match checked {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                // The worker contradicts what the broker saw of the handshake: a bug
                // or a compromise. Refuse, and replace the worker.
                warn!(session, error = %e, "Finished refused: stopping the worker");
                self.decide(session, handshake, Decision::Refuse(Refusal::NotApproved));
                self.end_session(session, ShutdownReason::Misbehaved, false);
                return;
            }
            None => return,
        }
        if let Some(w) = self.workers.get_mut(&session) {
            w.peer = Some(peer);
        }
        let key_hex = peer_hex(&peer);
        match crate::policy::verdict(self.db.status(&peer), self.sharing_available()) {
            crate::policy::Verdict::Refuse(refusal) => {
                self.audit.record(
                    "peer_refused",
                    &[
                        ("key", Value::from(key_hex)),
                        ("reason", Value::from(refusal_name(refusal))),
                    ],
                );
                self.decide(session, handshake, Decision::Refuse(refusal));
            }
            crate::policy::Verdict::Pair => {
                let (device_name, platform) = self
                    .workers
                    .get(&session)
                    .map(|w| w.device.clone())
                    .unwrap_or_default();
                match self.pairing.request_labelled(
                    peer,
                    &hash,
                    session,
                    now_unix(),
                    device_name,
                    platform,
                ) {
                    Ok(req) => {
                        info!(session, code = %req.code, key = %key_hex, device = %req.describe(), "pairing request: approve with `vpnshare pairing approve {}`", req.code);
                        eprintln!(
                            "pairing request from {} ({key_hex}): code {} — compare with the device, then `vpnshare pairing approve {}`",
                            req.describe(),
                            req.code,
                            req.code
                        );
                        self.audit.record(
                            "pairing_requested",
                            &[
                                ("code", Value::from(req.code.clone())),
                                ("key", Value::from(key_hex)),
                                (
                                    "source",
                                    Value::from(
                                        self.workers
                                            .get(&session)
                                            .map(|w| w.source.to_string())
                                            .unwrap_or_default(),
                                    ),
                                ),
                            ],
                        );
                        if let Some(w) = self.workers.get_mut(&session) {
                            w.pending = Some(handshake);
                        }
                        self.decide(session, handshake, Decision::Pending);
                    }
                    Err(e) => {
                        warn!(error = %e, "pairing request refused");
                        self.decide(session, handshake, Decision::Refuse(Refusal::Overload));
                    }
                }
            }
            crate::policy::Verdict::Admit => self.admit(session, handshake, peer, ticket),
        }
    }

    fn decide(&mut self, session: u64, handshake: HandshakeId, decision: Decision) {
        self.send_worker(
            session,
            &BrokerToWorker::Decision {
                handshake,
                decision,
            },
            &[],
        );
    }

    fn admit(
        &mut self,
        session: u64,
        handshake: HandshakeId,
        peer: [u8; 32],
        ticket: Option<&[u8]>,
    ) {
        let key_hex = peer_hex(&peer);
        if !self.sharing_available() {
            self.audit.record(
                "peer_refused",
                &[
                    ("key", Value::from(key_hex)),
                    ("reason", Value::from("vpn_unavailable")),
                ],
            );
            self.decide(
                session,
                handshake,
                Decision::Refuse(Refusal::VpnUnavailable),
            );
            return;
        }
        // A newer session of the same peer replaces the older one.
        let older: Vec<u64> = self
            .workers
            .iter()
            .filter(|(id, w)| **id != session && w.peer == Some(peer) && w.lease.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in older {
            info!(session = id, "replaced by a newer session of the same peer");
            self.end_session(id, ShutdownReason::SessionEnded, false);
        }
        let now = now_unix();
        // The lease parked since the peer's last session ended (flows kept), or, if
        // none is, the ticket's addresses if free. A ticket that gets nothing back is
        // refused with BadTicket: the client drops it and connects again without one
        // (docs/resume.md), knowing its old connections are gone.
        let resumed = match ticket {
            None => None,
            Some(t) => match crate::grace::redeem(
                &mut self.sealer,
                &mut self.parked,
                &mut self.pool,
                peer,
                t,
                now,
            ) {
                Ok(l) => Some(l),
                Err(e) => {
                    info!(session, error = %e, "resume ticket refused: BadTicket");
                    self.audit.record(
                        "peer_refused",
                        &[
                            ("key", Value::from(key_hex)),
                            ("reason", Value::from(refusal_name(Refusal::BadTicket))),
                            ("detail", Value::from(e.to_string())),
                        ],
                    );
                    self.decide(session, handshake, Decision::Refuse(Refusal::BadTicket));
                    return;
                }
            },
        };
        if resumed.is_none() {
            // A full handshake: a lease kept for this peer is not coming back.
            if let Some(l) = self.parked.take(&peer) {
                self.release_lease(l.id, false);
            }
        }
        let is_resumed = resumed.is_some();
        // The MTU follows the transport: 64 KB segments over a stream, no LAN
        // fragmentation over UDP (crate::leases::lease_mtu, docs/performance.md).
        let mtu = self
            .workers
            .get(&session)
            .map_or(crate::leases::LEASE_MTU, |w| {
                crate::leases::lease_mtu(w.kind)
            });
        let lease = match resumed
            .map(|mut l| {
                // A resume over another transport than last time gets its MTU.
                l.mtu = mtu;
                Ok(l)
            })
            .unwrap_or_else(|| self.pool.allocate_with_mtu(peer, now, mtu))
        {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "no lease");
                self.decide(session, handshake, Decision::Refuse(Refusal::Overload));
                return;
            }
        };
        // As the gateway's state wants it now (a resumed lease may have been parked
        // under another VPN MTU: its CONFIG carries the new one, docs/resume.md). The
        // base is this admission's transport MTU (set just above, also on a resume).
        let base = lease.mtu;
        self.base_mtu.insert(lease.id, base);
        let lease =
            crate::lease_config::reconfigured(&lease, base, self.egress_mtu).unwrap_or(lease);
        // The data channel: one end to the worker, the other to the netstack. Without
        // a netstack there is none: the worker admits the peer and drops (and counts)
        // its packets, as with any peer while forwarding is unavailable.
        if self.netstack.is_some() {
            let (worker_end, netstack_end) = match UnixStream::pair() {
                Ok(p) => p,
                Err(e) => {
                    error!(error = %e, "socketpair");
                    self.pool.release(lease.id);
                    self.base_mtu.remove(&lease.id);
                    self.decide(session, handshake, Decision::Refuse(Refusal::Overload));
                    return;
                }
            };
            self.send_worker(
                session,
                &BrokerToWorker::AttachDataPath { lease: lease.id },
                &[worker_end.as_fd()],
            );
            drop(worker_end);
            self.send_netstack(
                &BrokerToNetstack::LeaseAdded {
                    lease: lease.clone(),
                },
                &[netstack_end.as_fd()],
            );
        } else {
            warn!(
                session,
                "no netstack: the peer is admitted but nothing is forwarded"
            );
        }
        self.db.touch(&peer, now);
        if let Some(w) = self.workers.get_mut(&session) {
            w.lease = Some(lease.clone());
            w.pending = None;
        }
        info!(session, key = %key_hex, lease = lease.id.0, addr = %lease.ipv4.addr, resumed = is_resumed, "peer admitted");
        self.audit.record(
            "peer_admitted",
            &[
                ("key", Value::from(key_hex)),
                ("lease", Value::from(lease.id.0)),
                ("ipv4", Value::from(lease.ipv4.addr.to_string())),
                ("resumed", Value::from(is_resumed)),
            ],
        );
        self.decide(
            session,
            handshake,
            Decision::Admit {
                lease,
                resumed: is_resumed,
            },
        );
    }

    fn seal_ticket(&self, peer: &[u8; 32], lease: &Lease) -> Option<bw::SealedTicket> {
        let id = TicketId::random().ok()?;
        let t = self
            .sealer
            .seal(
                id,
                peer,
                &TicketLease::from(lease),
                now_unix(),
                TICKET_LIFETIME_SECS,
            )
            .ok()?;
        bw::SealedTicket::from_slice(&t).ok()
    }

    fn open_ticket_for(&mut self, session: u64, peer: &[u8; 32], ticket: &[u8]) -> TicketOutcome {
        let authenticated = self.workers.get(&session).and_then(|w| w.peer);
        if authenticated != Some(*peer) {
            return TicketOutcome::Refused(TicketRefusal::WrongPeer);
        }
        if self.db.status(peer) != PeerStatus::Trusted {
            return TicketOutcome::Refused(TicketRefusal::Revoked);
        }
        match self.sealer.open(ticket, peer, now_unix()) {
            Ok(opened) => match self.workers.get(&session).and_then(|w| w.lease.clone()) {
                Some(l) if l.id == opened.lease.id => TicketOutcome::Valid { lease: l },
                _ => TicketOutcome::Refused(TicketRefusal::Invalid),
            },
            Err(TicketError::Expired { .. }) => TicketOutcome::Refused(TicketRefusal::Expired),
            Err(TicketError::WrongPeer) => TicketOutcome::Refused(TicketRefusal::WrongPeer),
            Err(_) => TicketOutcome::Refused(TicketRefusal::Invalid),
        }
    }

    /// Tells a worker to stop and releases its lease; `revoked` also drops its flows now.
    fn end_session(&mut self, session: u64, reason: ShutdownReason, revoked: bool) {
        self.send_worker(session, &BrokerToWorker::Shutdown { reason }, &[]);
        let ended = self.workers.get_mut(&session).and_then(|w| {
            w.kill_at.get_or_insert(Instant::now() + SHUTDOWN_GRACE);
            w.stopping = true;
            w.lease.take().map(|l| (w.peer, l))
        });
        if revoked {
            if let Some((_, l)) = ended {
                self.release_lease(l.id, true);
            }
        } else if let Some((peer, l)) = ended {
            self.park_lease(peer, l);
        }
    }

    /// Releases a lease now: the netstack drops its flows (`revoked`: `PeerRevoked`).
    fn release_lease(&mut self, id: LeaseId, revoked: bool) {
        self.pool.release(id);
        self.base_mtu.remove(&id);
        let msg = if revoked {
            BrokerToNetstack::PeerRevoked { lease: id }
        } else {
            BrokerToNetstack::LeaseRemoved { lease: id }
        };
        self.send_netstack(&msg, &[]);
    }

    /// A peer's worker ended: its lease (and the netstack's flows) wait [`RESUME_GRACE`]
    /// for a resume. A lease without a known peer is released at once.
    fn park_lease(&mut self, peer: Option<[u8; 32]>, lease: Lease) {
        let Some(peer) = peer else {
            self.release_lease(lease.id, false);
            return;
        };
        info!(
            lease = lease.id.0,
            grace_s = RESUME_GRACE.as_secs(),
            "lease kept for a resume"
        );
        if let Some(old) = self.parked.park(peer, lease, Instant::now()) {
            self.release_lease(old.id, false);
        }
    }

    /// Releases the parked leases whose grace period ended.
    fn expire_parked(&mut self) {
        if self.parked.is_empty() {
            return;
        }
        for (peer, l) in self.parked.expire(Instant::now()) {
            info!(lease = l.id.0, key = %peer_hex(&peer), "no resume within the grace period: lease released");
            self.release_lease(l.id, false);
        }
    }

    fn refuse_waiting(&mut self, session: u64, refusal: Refusal) {
        let handshake = self
            .workers
            .get_mut(&session)
            .and_then(|w| w.pending.take());
        if let Some(h) = handshake {
            self.decide(session, h, Decision::Refuse(refusal));
        }
    }

    fn on_netstack(&mut self) {
        let Some(n) = &mut self.netstack else { return };
        match n.chan.recv() {
            Ok(m) => match m.msg {
                NetstackToBroker::Counters(c) => self.netstack_counters = c,
                NetstackToBroker::LeaseDropped {
                    lease,
                    flows_dropped,
                } => {
                    info!(lease = lease.0, flows_dropped, "netstack dropped a lease");
                }
            },
            Err(e) => {
                error!(error = %e, "netstack channel closed: forwarding is unavailable");
                if let Some(mut n) = self.netstack.take() {
                    let _ = n.child.kill();
                    log_exit("netstack", n.child.wait().ok());
                }
            }
        }
    }

    /// Reaps workers that exited; kills those past their shutdown deadline.
    fn reap(&mut self) {
        let now = Instant::now();
        let mut gone = Vec::new();
        for (id, w) in &mut self.workers {
            if w.kill_at.is_some_and(|t| now >= t) {
                let _ = w.child.kill();
            }
            match w.child.try_wait() {
                Ok(Some(status)) => gone.push((*id, status)),
                Ok(None) => {}
                Err(e) => warn!(session = id, error = %e, "wait"),
            }
        }
        for (id, status) in gone {
            let Some(mut w) = self.workers.remove(&id) else {
                continue;
            };
            let span = info_span!("session", session = id, source = %w.source, peer = w.peer.map(|k| peer_hex(&k)).unwrap_or_default());
            let _g = span.enter();
            let key = w
                .peer
                .map(|k| Value::from(peer_hex(&k)))
                .unwrap_or(Value::Null);
            let expected = w.stopping;
            match (status.signal(), status.code()) {
                (Some(sig), _) if sig == libc::SIGSYS => {
                    error!(
                        pid = w.child.id(),
                        "worker killed by SIGSYS: sandbox violation"
                    );
                    self.audit.record(
                        "sandbox_violation",
                        &[
                            ("session", Value::from(id)),
                            ("key", key),
                            ("pid", Value::from(w.child.id())),
                            ("signal", Value::from("SIGSYS")),
                        ],
                    );
                    self.workers_restarted += 1;
                }
                (sig, code) => {
                    let reason = match (sig, code) {
                        (Some(s), _) => format!("killed by signal {}", signal_name(s)),
                        (None, Some(c)) => format!("exited with status {c}"),
                        (None, None) => "ended".to_string(),
                    };
                    if expected || code == Some(0) {
                        info!(pid = w.child.id(), %reason, "worker ended");
                    } else {
                        warn!(pid = w.child.id(), %reason, "worker ended abnormally");
                        self.workers_restarted += 1;
                    }
                    self.audit.record(
                        "worker_exited",
                        &[
                            ("session", Value::from(id)),
                            ("key", key),
                            ("pid", Value::from(w.child.id())),
                            ("transport", Value::from(format!("{:?}", w.kind))),
                            ("reason", Value::from(reason)),
                            (
                                "counters",
                                serde_json::json!({
                                    "records_in": w.counters.records_in,
                                    "records_out": w.counters.records_out,
                                    "packets_forwarded": w.counters.packets_forwarded,
                                    "bad_records": w.counters.bad_records,
                                    "bad_packets": w.counters.bad_packets,
                                    "spoofed_sources": w.counters.spoofed_sources,
                                    "forbidden_destinations": w.counters.forbidden_destinations,
                                }),
                            ),
                        ],
                    );
                }
            }
            self.ended_workers.add(&w.counters);
            if let Some(l) = w.lease.take() {
                self.park_lease(w.peer, l);
            }
            self.pairing.drop_session(id);
        }
    }

    fn on_control(&mut self) {
        for _ in 0..16 {
            let stream = match self.control.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!(error = %e, "control accept");
                    return;
                }
            };
            let me = nix::unistd::geteuid().as_raw();
            match nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
            {
                Ok(c) if c.uid() == me => {}
                Ok(c) => {
                    warn!(
                        uid = c.uid(),
                        "control connection from another user refused"
                    );
                    continue;
                }
                Err(e) => {
                    warn!(error = %e, "SO_PEERCRED");
                    continue;
                }
            }
            let _ = stream.set_nonblocking(false);
            if set_timeouts(&stream).is_err() {
                continue;
            }
            let mut ch = match Channel::<ctl::BrokerEnd>::open(stream) {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "control channel");
                    continue;
                }
            };
            let req = match ch.recv() {
                Ok(m) => m.msg,
                Err(e) => {
                    warn!(error = %e, "control request");
                    continue;
                }
            };
            let reply = self.on_request(req);
            if let Err(e) = ch.send(&reply, &[]) {
                warn!(error = %e, "control reply");
            }
        }
    }

    fn on_request(&mut self, req: ControlRequest) -> ControlReply {
        let now = now_unix();
        match req {
            ControlRequest::Status => ControlReply::Status(Box::new(self.status())),
            ControlRequest::PeersList => {
                ControlReply::Peers(BoundedVec::new(self.peer_infos()).unwrap_or_default())
            }
            ControlRequest::PeersAdd { key, name } => {
                let name = name.as_ref().map(|n| n.as_str().to_owned());
                match self.db.add(key.0, name.as_deref(), now) {
                    Ok(()) => {
                        if let Err(e) = self.db.save(&self.cfg.state_dir) {
                            return control_error(ControlErrorKind::Internal, &e.to_string());
                        }
                        self.audit.record(
                            "peer_added",
                            &[
                                ("key", Value::from(peer_hex(&key.0))),
                                ("name", name.map(Value::from).unwrap_or(Value::Null)),
                                ("via", Value::from("control")),
                            ],
                        );
                        ControlReply::Ok
                    }
                    Err(
                        e @ (crate::peers::PeerDbError::AlreadyTrusted(_)
                        | crate::peers::PeerDbError::NameTaken(_)),
                    ) => control_error(ControlErrorKind::AlreadyExists, &e.to_string()),
                    Err(e) => control_error(ControlErrorKind::NotAllowed, &e.to_string()),
                }
            }
            ControlRequest::PeersRevoke { peer } => {
                let key = match &peer {
                    PeerRef::Key(k) => self.db.get(&k.0).map(|p| p.key),
                    PeerRef::Name(n) => self.db.resolve(n.as_str()),
                };
                let Some(key) = key else {
                    return control_error(ControlErrorKind::NoSuchPeer, "no such peer");
                };
                if let Err(e) = self.db.revoke(&key, now) {
                    return control_error(ControlErrorKind::NotAllowed, &e.to_string());
                }
                if let Err(e) = self.db.save(&self.cfg.state_dir) {
                    return control_error(ControlErrorKind::Internal, &e.to_string());
                }
                self.revoke_live(key);
                ControlReply::Ok
            }
            ControlRequest::PairingList => ControlReply::Pairings(
                BoundedVec::new(
                    self.pairing
                        .list()
                        .iter()
                        .filter_map(|r| {
                            Some(PairingInfo {
                                code: BoundedString::new(r.code.clone()).ok()?,
                                key: PeerKey(r.key),
                                requested_at_unix: r.requested_at_unix,
                                device_name: r
                                    .device_name
                                    .clone()
                                    .and_then(|n| BoundedString::new(n).ok()),
                                platform: r
                                    .platform
                                    .clone()
                                    .and_then(|p| BoundedString::new(p).ok()),
                            })
                        })
                        .collect(),
                )
                .unwrap_or_default(),
            ),
            ControlRequest::PairingApprove { code } => {
                match self.pairing.take(code.as_str(), now) {
                    Ok(req) => {
                        if let Err(e) = self
                            .db
                            .add_paired(
                                req.key,
                                req.device_name.as_deref(),
                                req.platform.as_deref(),
                                req.requested_at_unix,
                                now,
                            )
                            .and_then(|()| self.db.save(&self.cfg.state_dir))
                        {
                            return control_error(ControlErrorKind::Internal, &e.to_string());
                        }
                        self.audit.record(
                            "pairing_approved",
                            &[
                                ("code", Value::from(req.code.clone())),
                                ("key", Value::from(peer_hex(&req.key))),
                            ],
                        );
                        let handshake = self
                            .workers
                            .get_mut(&req.session)
                            .and_then(|w| w.pending.take());
                        if let Some(h) = handshake {
                            self.admit(req.session, h, req.key, None);
                        }
                        ControlReply::Ok
                    }
                    Err(e) => control_error(ControlErrorKind::NoSuchPairing, &e.to_string()),
                }
            }
            ControlRequest::PairingDeny { code } => match self.pairing.take(code.as_str(), now) {
                Ok(req) => {
                    self.audit.record(
                        "pairing_denied",
                        &[
                            ("code", Value::from(req.code.clone())),
                            ("key", Value::from(peer_hex(&req.key))),
                        ],
                    );
                    self.refuse_waiting(req.session, Refusal::PairingDenied);
                    ControlReply::Ok
                }
                Err(e) => control_error(ControlErrorKind::NoSuchPairing, &e.to_string()),
            },
        }
    }

    /// Cuts a revoked peer off now: Shutdown to its workers, PeerRevoked to the netstack.
    fn revoke_live(&mut self, key: [u8; 32]) {
        let sessions: Vec<u64> = self
            .workers
            .iter()
            .filter(|(_, w)| w.peer == Some(key))
            .map(|(id, _)| *id)
            .collect();
        for s in &sessions {
            self.end_session(*s, ShutdownReason::PeerRevoked, true);
        }
        if let Some(l) = self.parked.take(&key) {
            self.release_lease(l.id, true);
        }
        self.audit.record(
            "peer_revoked",
            &[
                ("key", Value::from(peer_hex(&key))),
                ("live_sessions_cut", Value::from(sessions.len())),
            ],
        );
    }

    fn peer_infos(&self) -> Vec<PeerInfo> {
        self.db
            .peers()
            .iter()
            .map(|p| PeerInfo {
                key: PeerKey(p.key),
                name: p
                    .name
                    .as_ref()
                    .and_then(|n| BoundedString::new(n.clone()).ok()),
                state: match p.state {
                    crate::peers::TrustState::Trusted => PeerState::Trusted,
                    crate::peers::TrustState::Revoked => PeerState::Revoked,
                },
                lease: self
                    .workers
                    .values()
                    .find(|w| w.peer == Some(p.key))
                    .and_then(|w| w.lease.as_ref().map(|l| l.id)),
            })
            .collect()
    }

    fn status(&self) -> StatusReport {
        StatusReport {
            gateway_key: PeerKey(self.gateway_key),
            sharing_available: self.sharing_available(),
            sandbox: if self.confined {
                SandboxState::Confined
            } else {
                SandboxState::Unconfined
            },
            connected_peers: u32::try_from(
                self.workers.values().filter(|w| w.lease.is_some()).count(),
            )
            .unwrap_or(u32::MAX),
            pending_pairings: u32::try_from(self.pairing.len()).unwrap_or(u32::MAX),
            workers_restarted: self.workers_restarted,
            ipc_bad_messages: ipc_schema::channel::bad_messages_total(),
            netstack: self.netstack_counters,
            workers: self
                .workers
                .values()
                .fold(self.ended_workers, |mut sum, w| {
                    sum.add(&w.counters);
                    sum
                }),
        }
    }

    fn shutdown(&mut self) {
        let ids: Vec<u64> = self.workers.keys().copied().collect();
        for id in ids {
            self.send_worker(
                id,
                &BrokerToWorker::Shutdown {
                    reason: ShutdownReason::GatewayStopping,
                },
                &[],
            );
        }
        self.send_netstack(
            &BrokerToNetstack::Shutdown {
                reason: ShutdownReason::GatewayStopping,
            },
            &[],
        );
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        for w in self.workers.values_mut() {
            while Instant::now() < deadline && matches!(w.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
        for s in self.spawning.values_mut() {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
        if let Some(n) = &mut self.netstack {
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
        let _ = std::fs::remove_file(self.cfg.state_dir.join(CONTROL_SOCKET));
        self.audit.record("gateway_stopped", &[]);
    }
}

fn refusal_name(r: Refusal) -> &'static str {
    match r {
        Refusal::NotApproved => "not_approved",
        Refusal::Revoked => "revoked",
        Refusal::VpnUnavailable => "vpn_unavailable",
        Refusal::Overload => "overload",
        Refusal::PairingDenied => "pairing_denied",
        Refusal::PairingExpired => "pairing_expired",
        Refusal::BadTicket => "bad_ticket",
    }
}

fn control_error(kind: ControlErrorKind, detail: &str) -> ControlReply {
    let mut d = detail.to_owned();
    d.truncate(ipc_schema::limits::MAX_DETAIL_LEN);
    while BoundedString::<{ ipc_schema::limits::MAX_DETAIL_LEN }>::new(d.clone()).is_err() {
        d.pop();
    }
    ControlReply::Error {
        kind,
        detail: BoundedString::new(d).unwrap_or_default(),
    }
}

fn error_record(reason: ErrorReason, receiver: SessionIndex) -> ErrorRecord {
    ErrorRecord {
        reason,
        receiver,
        min_version: record::VERSION,
        max_version: record::VERSION,
    }
}

/// Writes a length-prefixed plaintext ERROR record on a stream and closes it.
fn send_stream_error(mut stream: TcpStream, reason: ErrorReason) {
    let rec = error_record(reason, SessionIndex(0)).encode();
    let mut out = Vec::with_capacity(2 + rec.len());
    out.extend_from_slice(&u16::try_from(rec.len()).unwrap_or(10).to_be_bytes());
    out.extend_from_slice(&rec);
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let _ = stream.write_all(&out);
}

/// UDP and TCP listeners on the same address and port. With port 0 the UDP socket
/// picks the port; if TCP cannot take the same one, a few other ports are tried.
fn bind_listeners(
    listen: SocketAddr,
) -> Result<(UdpSocket, TcpListener, SocketAddr), GatewayError> {
    let attempts = if listen.port() == 0 { 8 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = udp_listener(listen).map_err(io_err(format!("cannot listen on UDP {listen}")))?;
        let local: SocketAddr = udp
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .unwrap_or(listen);
        let tcp = (|| {
            let s = Socket::new(
                Domain::for_address(local),
                Type::STREAM,
                Some(Protocol::TCP),
            )?;
            s.set_reuse_address(true)?;
            s.set_cloexec(true)?;
            s.bind(&local.into())?;
            s.listen(64)?;
            Ok::<_, io::Error>(TcpListener::from(s))
        })();
        match tcp {
            Ok(tcp) => return Ok((udp.into(), tcp, local)),
            Err(e) => last = Some((local, e)),
        }
    }
    Err(match last {
        Some((local, source)) => GatewayError::Io {
            what: format!("cannot listen on TCP {local}"),
            source,
        },
        None => GatewayError::Io {
            what: format!("cannot listen on {listen}"),
            source: io::Error::other("no attempt"),
        },
    })
}

/// A non-blocking NETLINK_ROUTE socket in the link, IPv4 route and IPv6 route groups.
fn route_watch_socket() -> nix::Result<OwnedFd> {
    use nix::sys::socket::{
        AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket,
    };
    const GROUPS: u32 =
        (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_ROUTE | libc::RTMGRP_IPV6_ROUTE) as u32;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, GROUPS))?;
    Ok(fd)
}

/// Reads and discards everything queued on a non-blocking socket.
fn drain(fd: BorrowedFd<'_>) {
    let mut buf = [0u8; 8192];
    for _ in 0..64 {
        match nix::unistd::read(fd, &mut buf) {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}

fn set_timeouts(s: &UnixStream) -> io::Result<()> {
    s.set_read_timeout(Some(IPC_TIMEOUT))?;
    s.set_write_timeout(Some(IPC_TIMEOUT))
}

/// Receive and send buffer asked for on each peer's UDP socket.
pub const UDP_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// A UDP socket bound to the listener's address (SO_REUSEADDR + SO_REUSEPORT) and
/// connected to `peer`: the kernel delivers the peer's datagrams to it, not to the
/// listener, so they never pass through the broker.
pub fn connected_udp(local: SocketAddr, peer: SocketAddr) -> io::Result<OwnedFd> {
    let s = Socket::new(Domain::for_address(local), Type::DGRAM, Some(Protocol::UDP))?;
    // Room for the bursts of a bulk transfer (the kernel caps it at rmem_max/wmem_max;
    // the default 208 KiB holds ~90 full records): best effort (docs/performance.md).
    let _ = s.set_recv_buffer_size(UDP_SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(UDP_SOCKET_BUFFER);
    // UDP GRO: the worker gets a run of the peer's records in one slot and splits it
    // again (parser_sandbox::mmsg); the worker itself may not call setsockopt.
    let _ = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::UdpGroSegment, &true);
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_cloexec(true)?;
    s.bind(&local.into())?;
    s.connect(&peer.into())?;
    Ok(OwnedFd::from(s))
}

/// Starts `exe` with `fd` as its descriptor 3, an empty environment, stdin and stdout
/// on /dev/null and the broker's stderr.
pub fn spawn_with_fd3(exe: &Path, args: &[String], fd: BorrowedFd<'_>) -> io::Result<Child> {
    let raw = fd.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.args(args);
    cmd.env_clear().stdin(Stdio::null()).stdout(Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (dup2, fcntl) on descriptors it does not free.
    unsafe {
        cmd.pre_exec(move || {
            if raw == 3 {
                // dup2 onto itself keeps FD_CLOEXEC: clear it instead.
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(raw, 3) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|_| sig.to_string())
}

fn log_exit(what: &str, status: Option<std::process::ExitStatus>) {
    match status {
        Some(s) if s.signal() == Some(libc::SIGSYS) => {
            error!("{what} killed by SIGSYS: sandbox violation")
        }
        Some(s) => warn!("{what} ended: {s}"),
        None => warn!("{what} ended"),
    }
}
