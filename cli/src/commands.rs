//! The gateway-side commands: `gateway`, `id`, `peers`, `pairing`, `status`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use broker::audit::AuditLog;
use broker::gateway::{EgressPolicy, Gateway, GatewayConfig};
use broker::peers::{PeerDb, TrustState, parse_key};
use broker::{control, identity, now_unix, resolve_state_dir};
use ipc_schema::bounded::BoundedString;
use ipc_schema::messages::common::PeerKey;
use ipc_schema::messages::control::{
    ControlReply, ControlRequest, PeerRef, PeerState, SandboxState,
};
use serde_json::{Value, json};

type CmdResult = Result<(), String>;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_stop_handlers() -> CmdResult {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; it
        // replaces the default action of a signal nothing else in this process handles.
        unsafe { sigaction(sig, &action) }.map_err(|e| format!("cannot handle {sig}: {e}"))?;
    }
    Ok(())
}

fn init_logging() {
    // Read RUST_LOG now: confinement clears the environment.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The options of `vpnshare gateway`.
#[derive(Debug)]
pub struct GatewayArgs {
    pub listen: String,
    pub state_dir: Option<PathBuf>,
    pub egress: String,
    pub mdns: bool,
    pub mdns_name: Option<String>,
    pub pairing_timeout_secs: u64,
    pub netstack_limits: broker::gateway::NetstackLimits,
}

pub fn gateway(args: GatewayArgs) -> CmdResult {
    let GatewayArgs {
        listen,
        state_dir,
        egress,
        mdns,
        mdns_name,
        pairing_timeout_secs,
        netstack_limits,
    } = args;
    let (listen, egress) = (listen.as_str(), egress.as_str());
    let listen: SocketAddr = listen
        .parse()
        .map_err(|_| format!("--listen {listen:?} is not ADDR:PORT (e.g. 0.0.0.0:7400)"))?;
    let egress = match egress {
        "vpn" => EgressPolicy::Vpn,
        "any" => EgressPolicy::Any,
        other => return Err(format!("--egress {other:?}: expected vpn or any")),
    };
    let state_dir = resolve_state_dir(state_dir)?;
    init_logging();
    install_stop_handlers()?;
    let cfg = GatewayConfig {
        listen,
        state_dir,
        egress,
        worker_exe: broker::sibling_binary(broker::WORKER_ENV, broker::WORKER_BIN),
        netstack_exe: broker::sibling_binary(broker::NETSTACK_ENV, broker::NETSTACK_BIN),
        pairing_timeout_secs,
        netstack_limits,
    };
    let (mut gw, started) = Gateway::start(cfg).map_err(|e| e.to_string())?;
    if egress == EgressPolicy::Any {
        eprintln!(
            "vpnshare: warning: --egress any forwards peers' traffic through whatever route this device has, VPN or not"
        );
    }
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", started.invite);
        let _ = out.flush();
    }
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        // The invite as a QR code for a phone's camera; only on a terminal, so logs
        // and scripts get the URI line alone.
        if let Ok(code) = qrcode::QrCode::new(started.invite.to_string().as_bytes()) {
            let image = code
                .render::<qrcode::render::unicode::Dense1x2>()
                .dark_color(qrcode::render::unicode::Dense1x2::Light)
                .light_color(qrcode::render::unicode::Dense1x2::Dark)
                .build();
            eprintln!("{image}");
        }
    }
    eprintln!(
        "vpnshare: sharing on {} (UDP and TCP); invite above; control socket {}",
        started.local_addr,
        started.control_socket.display()
    );
    let instance = mdns_name.unwrap_or_else(host_name);
    gw.confine().map_err(|e| e.to_string())?;
    // After confinement: `confine` wants one thread and closes every descriptor it is
    // not told to keep, and mdns-sd runs its own thread with its own sockets. The
    // broker's seccomp filter is a denylist, so its multicast sockets work.
    let _mdns = if mdns && !started.local_addr.ip().is_loopback() {
        match crate::discovery::advertise(&instance, started.local_addr, &started.invite.key) {
            Ok(a) => {
                eprintln!(
                    "vpnshare: advertising {instance:?} over mDNS ({}), key fingerprint {}",
                    crate::discovery::SERVICE_TYPE,
                    crate::discovery::fingerprint(&started.invite.key)
                );
                Some(a)
            }
            Err(e) => {
                eprintln!("vpnshare: not advertising over mDNS: {e}");
                None
            }
        }
    } else {
        None
    };
    // On a terminal, ask about each pairing request here too (a thread that talks to
    // the broker through its control socket; the broker's loop never waits for it).
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        if let Err(e) = crate::approve::spawn(started.control_socket.parent().map_or_else(
            || std::path::PathBuf::from("."),
            std::path::Path::to_path_buf,
        )) {
            eprintln!("vpnshare: no interactive approval: {e}");
        }
    }
    gw.run(&|| STOP.load(Ordering::SeqCst))
        .map_err(|e| e.to_string())
}

/// This host's name, or "vpnshare".
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "vpnshare".to_owned())
}

pub fn id(state_dir: Option<PathBuf>) -> CmdResult {
    let dir = resolve_state_dir(state_dir)?;
    let kp = identity::load_or_create(&dir).map_err(|e| e.to_string())?;
    println!("{}", hex::encode(kp.public_key()));
    Ok(())
}

fn online(dir: &Path, req: &ControlRequest) -> Result<Option<ControlReply>, String> {
    control::request(dir, req).map_err(|e| e.to_string())
}

fn expect_ok(reply: ControlReply) -> CmdResult {
    match reply {
        ControlReply::Ok => Ok(()),
        ControlReply::Error { kind, detail } => {
            Err(format!("gateway refused ({kind:?}): {detail}"))
        }
        other => Err(format!("unexpected reply from the gateway: {other:?}")),
    }
}

fn name_arg(n: &str) -> Result<BoundedString<{ ipc_schema::limits::MAX_NAME_LEN }>, String> {
    BoundedString::new(n.to_owned()).map_err(|_| {
        format!(
            "name is longer than {} bytes",
            ipc_schema::limits::MAX_NAME_LEN
        )
    })
}

pub fn peers(state_dir: Option<PathBuf>, args: &[String]) -> CmdResult {
    let dir = resolve_state_dir(state_dir)?;
    let usage =
        "usage: vpnshare peers [--state-dir DIR] list | add KEY [--name N] | revoke NAME_OR_KEY";
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["list"] => {
            if let Some(reply) = online(&dir, &ControlRequest::PeersList)? {
                let ControlReply::Peers(list) = reply else {
                    return expect_ok(reply);
                };
                for p in list.as_slice() {
                    let state = match p.state {
                        PeerState::Trusted => "trusted",
                        PeerState::Revoked => "revoked",
                    };
                    let name = p.name.as_ref().map(|n| n.as_str()).unwrap_or("-");
                    let live = p
                        .lease
                        .map(|l| format!(" connected(lease {})", l.0))
                        .unwrap_or_default();
                    println!("{} {name} {state}{live}", hex::encode(p.key.0));
                }
                return Ok(());
            }
            let db = PeerDb::load(&dir).map_err(|e| e.to_string())?;
            for p in db.peers() {
                let state = match p.state {
                    TrustState::Trusted => "trusted",
                    TrustState::Revoked => "revoked",
                };
                println!(
                    "{} {} {state}",
                    hex::encode(p.key),
                    p.name.as_deref().unwrap_or("-")
                );
            }
            Ok(())
        }
        ["add", key, rest @ ..] => {
            let name = match rest {
                [] => None,
                ["--name", n] => Some(*n),
                _ => return Err(usage.into()),
            };
            let key =
                parse_key(key).ok_or("KEY must be 64 hex digits (what `vpnshare id` prints)")?;
            let req = ControlRequest::PeersAdd {
                key: PeerKey(key),
                name: name.map(name_arg).transpose()?,
            };
            if let Some(reply) = online(&dir, &req)? {
                return expect_ok(reply);
            }
            let mut db = PeerDb::load(&dir).map_err(|e| e.to_string())?;
            db.add(key, name, now_unix()).map_err(|e| e.to_string())?;
            db.save(&dir).map_err(|e| e.to_string())?;
            let mut audit = AuditLog::open(&dir).map_err(|e| format!("audit log: {e}"))?;
            audit.record(
                "peer_added",
                &[
                    ("key", Value::from(hex::encode(key))),
                    ("name", name.map(Value::from).unwrap_or(Value::Null)),
                    ("via", Value::from("state_dir")),
                ],
            );
            Ok(())
        }
        ["revoke", who] => {
            let peer = match parse_key(who) {
                Some(k) => PeerRef::Key(PeerKey(k)),
                None => PeerRef::Name(name_arg(who)?),
            };
            if let Some(reply) = online(&dir, &ControlRequest::PeersRevoke { peer })? {
                return expect_ok(reply);
            }
            let mut db = PeerDb::load(&dir).map_err(|e| e.to_string())?;
            let key = db
                .resolve(who)
                .ok_or_else(|| format!("no peer named or keyed {who:?}"))?;
            db.revoke(&key, now_unix()).map_err(|e| e.to_string())?;
            db.save(&dir).map_err(|e| e.to_string())?;
            let mut audit = AuditLog::open(&dir).map_err(|e| format!("audit log: {e}"))?;
            audit.record(
                "peer_revoked",
                &[
                    ("key", Value::from(hex::encode(key))),
                    ("via", Value::from("state_dir")),
                ],
            );
            Ok(())
        }
        _ => Err(usage.into()),
    }
}

fn no_gateway(dir: &Path) -> String {
    format!("no gateway is running on the state dir {}", dir.display())
}

pub fn pairing(state_dir: Option<PathBuf>, args: &[String]) -> CmdResult {
    let dir = resolve_state_dir(state_dir)?;
    let code = |c: &str| {
        BoundedString::new(c.to_owned()).map_err(|_| format!("{c:?} is not a pairing code"))
    };
    let req = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["list"] => ControlRequest::PairingList,
        ["approve", c] => ControlRequest::PairingApprove { code: code(c)? },
        ["deny", c] => ControlRequest::PairingDeny { code: code(c)? },
        _ => {
            return Err(
                "usage: vpnshare pairing [--state-dir DIR] list | approve CODE | deny CODE".into(),
            );
        }
    };
    let reply = online(&dir, &req)?.ok_or_else(|| no_gateway(&dir))?;
    match reply {
        ControlReply::Pairings(list) => {
            let now = now_unix();
            for p in list.as_slice() {
                // CODE KEY NAME (PLATFORM), AGE: the code first, to copy into `approve`.
                let name = p
                    .device_name
                    .as_ref()
                    .map_or("unnamed device", |n| n.as_str());
                let platform = p
                    .platform
                    .as_ref()
                    .map_or(String::new(), |pl| format!(" ({})", pl.as_str()));
                println!(
                    "{} {} {name}{platform}, requested {} s ago",
                    p.code,
                    hex::encode(p.key.0),
                    now.saturating_sub(p.requested_at_unix)
                );
            }
            Ok(())
        }
        other => expect_ok(other),
    }
}

pub fn status(state_dir: Option<PathBuf>, as_json: bool) -> CmdResult {
    let dir = resolve_state_dir(state_dir)?;
    let reply = online(&dir, &ControlRequest::Status)?.ok_or_else(|| no_gateway(&dir))?;
    let ControlReply::Status(s) = reply else {
        return expect_ok(reply);
    };
    let peers = match online(&dir, &ControlRequest::PeersList)? {
        Some(ControlReply::Peers(p)) => p.into_inner(),
        _ => Vec::new(),
    };
    let peer_json: Vec<Value> = peers
        .iter()
        .map(|p| {
            json!({
                "key": hex::encode(p.key.0),
                "name": p.name.as_ref().map(|n| n.as_str().to_owned()),
                "state": match p.state { PeerState::Trusted => "trusted", PeerState::Revoked => "revoked" },
                "lease": p.lease.map(|l| l.0),
            })
        })
        .collect();
    let n = &s.netstack;
    let v = json!({
        "gateway_key": hex::encode(s.gateway_key.0),
        "sharing_available": s.sharing_available,
        "sandbox": match s.sandbox { SandboxState::Confined => "confined", SandboxState::Unconfined => "unconfined" },
        "connected_peers": s.connected_peers,
        "pending_pairings": s.pending_pairings,
        "workers_restarted": s.workers_restarted,
        "ipc_bad_messages": s.ipc_bad_messages,
        "netstack": {
            "tcp_flows": n.tcp_flows, "udp_flows": n.udp_flows,
            "packets_in": n.packets_in, "packets_out": n.packets_out,
            "bytes_in": n.bytes_in, "bytes_out": n.bytes_out,
            "dns_queries": n.dns_queries, "dropped_no_egress": n.dropped_no_egress,
        },
        "workers": {
            "records_in": s.workers.records_in, "records_out": s.workers.records_out,
            "packets_forwarded": s.workers.packets_forwarded,
            "packets_delivered": s.workers.packets_delivered,
            "bad_records": s.workers.bad_records, "replayed_records": s.workers.replayed_records,
            "bad_packets": s.workers.bad_packets, "spoofed_sources": s.workers.spoofed_sources,
            "forbidden_destinations": s.workers.forbidden_destinations,
        },
        "peers": peer_json,
    });
    if as_json {
        println!("{v}");
        return Ok(());
    }
    println!("gateway key:       {}", hex::encode(s.gateway_key.0));
    println!(
        "sharing:           {}",
        if s.sharing_available {
            "available"
        } else {
            "unavailable (no VPN)"
        }
    );
    println!("sandbox:           {:?}", s.sandbox);
    println!("connected peers:   {}", s.connected_peers);
    println!("pending pairings:  {}", s.pending_pairings);
    println!("workers restarted: {}", s.workers_restarted);
    println!("ipc bad messages:  {}", s.ipc_bad_messages);
    let w = &s.workers;
    println!(
        "worker drops:      {} bad records, {} replayed, {} bad packets, {} spoofed sources, {} forbidden destinations",
        w.bad_records,
        w.replayed_records,
        w.bad_packets,
        w.spoofed_sources,
        w.forbidden_destinations
    );
    for p in &peers {
        let state = match p.state {
            PeerState::Trusted => "trusted",
            PeerState::Revoked => "revoked",
        };
        let live = p
            .lease
            .map(|l| format!(" connected(lease {})", l.0))
            .unwrap_or_default();
        println!(
            "peer {} {} {state}{live}",
            hex::encode(p.key.0),
            p.name.as_ref().map(|n| n.as_str()).unwrap_or("-")
        );
    }
    Ok(())
}

/// The options of `vpnshare connect`.
#[derive(Debug)]
pub struct ConnectArgs {
    pub uri: Option<String>,
    pub discover: Option<String>,
    pub list_only: bool,
    pub state_dir: Option<PathBuf>,
    pub transport: String,
    pub user: Option<String>,
    pub helper_socket: Option<PathBuf>,
    pub name: Option<String>,
    pub resolv_conf: Option<PathBuf>,
}

/// How long `connect --discover` listens for gateways.
const DISCOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// `connect --discover [NAME]`: lists the gateways that answer within
/// [`DISCOVER_WAIT`], picks one, checks its pinned key, and returns its invite with the
/// candidate pin the session marks once admitted (`None` with `--list-only`). First it
/// settles the previous run's candidate.
fn discover_gateway(
    state_dir: &std::path::Path,
    wanted: Option<&str>,
    list_only: bool,
) -> Result<Option<Discovered>, String> {
    use crate::discovery;
    // The last --discover's candidate: pinned if that session was admitted.
    match discovery::settle_candidate(state_dir).map_err(|e| e.to_string())? {
        Some(discovery::Candidate::Pinned(name)) => {
            println!("pinned the key of gateway {name:?} (it admitted this device last time)");
        }
        Some(discovery::Candidate::Dropped(name)) => {
            println!(
                "gateway {name:?} did not admit this device last time: its key was not pinned"
            );
        }
        None => {}
    }
    let found = discovery::discover(DISCOVER_WAIT, wanted).map_err(|e| e.to_string())?;
    {
        let mut out = std::io::stdout().lock();
        for g in &found {
            let addrs: Vec<String> = g.addrs.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                out,
                "found gateway {:?} at {} port {}, key fingerprint {}",
                g.name,
                addrs.join(" "),
                g.port,
                discovery::fingerprint(&g.key)
            );
        }
        let _ = out.flush();
    }
    if list_only {
        return Ok(None);
    }
    let g = discovery::choose(&found, wanted, DISCOVER_WAIT).map_err(|e| e.to_string())?;
    discovery::check_pin(state_dir, &g).map_err(|e| e.to_string())?;
    let uri = g
        .invite()
        .ok_or_else(|| format!("gateway {:?} advertised no address", g.name))?;
    // The key is pinned only once the gateway admits this device (after pairing): the
    // session, confined by then, marks this candidate, and the next --discover pins
    // it (docs/discovery.md, Pinning).
    let marker = discovery::write_candidate(state_dir, &g).map_err(|e| e.to_string())?;
    println!("connecting to {:?}: {uri}", g.name);
    Ok(Some(Discovered { uri, marker }))
}

/// The gateway `--discover` chose.
struct Discovered {
    uri: String,
    marker: Option<client::admission_marker::AdmissionMarker>,
}

pub fn connect(args: ConnectArgs) -> CmdResult {
    let ConnectArgs {
        uri,
        discover,
        list_only,
        state_dir,
        transport,
        user,
        helper_socket,
        name,
        resolv_conf,
    } = args;
    let transport = match transport.as_str() {
        "udp" => client::TransportKind::Udp,
        "tcp" => client::TransportKind::Tcp,
        other => return Err(format!("--transport {other:?}: expected udp or tcp")),
    };
    let state_dir = resolve_state_dir(state_dir)?;
    init_logging();
    let (uri, admission_marker) = match (uri, discover) {
        (Some(uri), None) => (uri, None),
        (_, Some(wanted)) => {
            let wanted = Some(wanted.trim()).filter(|w| !w.is_empty());
            match discover_gateway(&state_dir, wanted, list_only)? {
                Some(d) => (d.uri, d.marker),
                None => return Ok(()),
            }
        }
        (None, None) => return Err("give an invite URI or --discover".into()),
    };
    let device_name = name
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "linux".to_owned());
    client::connect(client::ConnectOptions {
        uri,
        state_dir,
        transport,
        user,
        helper_socket,
        device_name,
        resolv_conf,
        admission_marker,
    })
    .map_err(|e| e.to_string())
}
