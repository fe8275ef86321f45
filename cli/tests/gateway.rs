//! The gateway commands against real processes and real sockets on 127.0.0.1:
//! `vpnshare id`, offline `peers`, a running `vpnshare gateway` driven through its
//! control socket, and VSHP clients (vshp's `Initiator`) over UDP and TCP that complete
//! handshakes with spawned `vpnshare-worker` processes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker::invite::Invite;
use vshp::handshake::{Established, Initiator, Next};
use vshp::key_oracle::StaticKeypair;
use vshp::message::{ErrorReason, Message, MessageReader, MessageWriter, Platform};
use vshp::record::{self, Capabilities, MAX_RECORD_LEN, Record, SessionIndex};
use vshp::transport::{Session, TransportMode};

const BIN: &str = env!("CARGO_BIN_EXE_vpnshare");

fn temp_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "vpnshare-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn vpnshare(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn fails_with_one_line(out: &Output) -> String {
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr.clone()).unwrap();
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(err.starts_with("vpnshare: "), "{err:?}");
    err
}

/// The worker the gateway will find: `$VPNSHARE_WORKER` (inherited by the gateway), else
/// next to `vpnshare`.
fn worker_binary() -> Option<PathBuf> {
    let p = match std::env::var_os("VPNSHARE_WORKER") {
        Some(p) => PathBuf::from(p),
        None => Path::new(BIN).parent()?.join("vpnshare-worker"),
    };
    p.is_file().then_some(p)
}

fn audit_events(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running `vpnshare gateway`, killed and its state dir removed on drop.
struct Gateway {
    child: Child,
    dir: PathBuf,
    invite: Invite,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Gateway {
    fn start(tag: &str) -> Self {
        Self::start_with(tag, "any")
    }

    fn start_with(tag: &str, egress: &str) -> Self {
        Self::start_full(tag, egress, None)
    }

    /// `stdin`: the gateway's standard input (a terminal for the interactive prompt);
    /// inherited when `None`.
    fn start_full(tag: &str, egress: &str, stdin: Option<Stdio>) -> Self {
        let dir = temp_dir(tag);
        let mut cmd = Command::new(BIN);
        cmd.args([
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--egress",
            egress,
            "--state-dir",
        ])
        .arg(&dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        if let Some(i) = stdin {
            cmd.stdin(i);
        }
        let mut child = cmd.spawn().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                l.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let invite = Invite::parse(&line).unwrap_or_else(|e| {
            panic!(
                "no invite on stdout ({e}): {line:?} {}",
                log.lock().unwrap()
            )
        });
        let addr = SocketAddr::new(invite.host.parse().unwrap(), invite.port);
        Self {
            child,
            dir,
            invite,
            addr,
            log,
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        let (cmd, rest) = args.split_first().unwrap();
        Command::new(BIN)
            .arg(cmd)
            .arg("--state-dir")
            .arg(&self.dir)
            .args(rest)
            .output()
            .unwrap()
    }

    fn status(&self) -> serde_json::Value {
        serde_json::from_str(&ok(&self.cli(&["status", "--json"]))).unwrap()
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Pids of the gateway's children named `vpnshare-worker` (comm: at most 15 bytes).
    fn worker_pids(&self) -> Vec<i32> {
        let me = self.child.id().to_string();
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| {
                let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let (comm, rest) = stat.split_once(") ")?;
                let ppid = rest.split_whitespace().nth(1)?;
                (ppid == me && comm.contains("(vpnshare-worke")).then_some(pid)
            })
            .collect()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("VPNSHARE_TEST_LOG").is_some() {
            eprintln!("--- gateway log ---\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The client side of one session over UDP or TCP.
enum Link {
    Udp(UdpSocket),
    Tcp(TcpStream),
}

impl Link {
    fn udp(addr: SocketAddr) -> Self {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Link::Udp(s)
    }

    fn tcp(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Link::Tcp(s)
    }

    fn mode(&self) -> TransportMode {
        match self {
            Link::Udp(_) => TransportMode::Datagram,
            Link::Tcp(_) => TransportMode::Stream,
        }
    }

    fn send(&mut self, rec: &[u8]) {
        match self {
            Link::Udp(s) => {
                s.send(rec).unwrap();
            }
            Link::Tcp(s) => {
                let mut framed = u16::try_from(rec.len()).unwrap().to_be_bytes().to_vec();
                framed.extend_from_slice(rec);
                s.write_all(&framed).unwrap();
            }
        }
    }

    fn recv(&mut self) -> Vec<u8> {
        match self {
            Link::Udp(s) => {
                let mut buf = vec![0u8; MAX_RECORD_LEN];
                let n = s.recv(&mut buf).unwrap();
                buf.truncate(n);
                buf
            }
            Link::Tcp(s) => {
                let mut len = [0u8; 2];
                s.read_exact(&mut len).unwrap();
                let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
                s.read_exact(&mut buf).unwrap();
                buf
            }
        }
    }
}

/// What the gateway said after the handshake.
#[derive(Debug)]
enum Outcome {
    Config(vshp::lease::Lease),
    Error(ErrorReason),
}

struct Client {
    link: Link,
    session: Session,
    est: Established,
    start: Instant,
}

impl Client {
    /// A full handshake: IK when `gateway_key` is given, else XX. Returns `Err(reason)`
    /// when the gateway answered with a plaintext ERROR record instead.
    fn handshake(
        mut link: Link,
        me: &StaticKeypair,
        gateway_key: Option<[u8; 32]>,
    ) -> Result<Self, ErrorReason> {
        let mut init = Initiator::new(
            me.clone(),
            gateway_key,
            Capabilities::ALL_V1,
            SessionIndex(0x1234_5678),
        )
        .unwrap();
        let mut payload = vec![0u8; 512];
        let mut w = MessageWriter::new(&mut payload);
        w.hello(Capabilities::ALL_V1.0).unwrap();
        if gateway_key.is_some() {
            w.auth("test-laptop", Platform::Linux).unwrap();
        }
        let p = w.finish().to_vec();
        let mut wire = vec![0u8; MAX_RECORD_LEN];
        let n = init.write_init(&p, &mut wire).unwrap();
        link.send(&wire[..n]);
        let resp = link.recv();
        if let Ok(Record::Error(e)) = record::decode(&resp) {
            return Err(e.reason);
        }
        let mut out = vec![0u8; MAX_RECORD_LEN];
        init.read_response(&resp, &mut out).unwrap();
        if init.next() == Next::Send {
            let mut payload = vec![0u8; 512];
            let mut w = MessageWriter::new(&mut payload);
            w.auth("test-laptop", Platform::Linux).unwrap();
            let p = w.finish().to_vec();
            let n = init.write_final(&p, &mut wire).unwrap();
            link.send(&wire[..n]);
        }
        let est = init.into_established().unwrap();
        let start = Instant::now();
        let session = Session::new(&est, link.mode(), Duration::ZERO).unwrap();
        Ok(Self {
            link,
            session,
            est,
            start,
        })
    }

    /// Sends PING `seq` and waits for its PONG.
    fn ping(&mut self, seq: u64) {
        let mut plain = vec![0u8; 64];
        let mut w = MessageWriter::new(&mut plain);
        w.ping(vshp::message::Keepalive {
            seq,
            tx_packets: 0,
            rx_packets: 0,
        })
        .unwrap();
        let n = w.len();
        let mut rec = vec![0u8; 128];
        let len = self
            .session
            .seal(&plain[..n], &mut rec, self.start.elapsed())
            .unwrap();
        self.link.send(&rec[..len]);
        loop {
            let mut rec = self.link.recv();
            let Ok(plain) = self.session.open_in_place(&mut rec, self.start.elapsed()) else {
                continue;
            };
            for m in MessageReader::new(plain) {
                if let Message::Pong(k) = m.unwrap() {
                    if k.seq == seq {
                        return;
                    }
                }
            }
        }
    }

    /// Reads DATA records until CONFIG or ERROR arrives.
    fn outcome(&mut self) -> Outcome {
        loop {
            let mut rec = self.link.recv();
            let now = self.start.elapsed();
            let Ok(plain) = self.session.open_in_place(&mut rec, now) else {
                continue;
            };
            for m in MessageReader::new(plain) {
                match m.unwrap() {
                    Message::Config(lease) => return Outcome::Config(lease),
                    Message::Error { reason, .. } => return Outcome::Error(reason),
                    _ => {}
                }
            }
        }
    }
}

#[test]
fn id_twice_prints_the_same_key_and_the_identity_is_0600() {
    let dir = temp_dir("id");
    let sd = dir.join("state");
    let a = ok(&vpnshare(&["id", "--state-dir", sd.to_str().unwrap()]));
    let b = ok(&vpnshare(&["id", "--state-dir", sd.to_str().unwrap()]));
    let key = a.lines().last().unwrap();
    assert_eq!(key, b.lines().last().unwrap());
    assert_eq!(key.len(), 64);
    assert!(key.bytes().all(|c| c.is_ascii_hexdigit()));
    let mode = std::fs::metadata(sd.join("identity.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let dmode = std::fs::metadata(&sd).unwrap().permissions().mode();
    assert_eq!(dmode & 0o777, 0o700);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn peers_add_list_revoke_offline_on_the_state_dir() {
    let dir = temp_dir("peers");
    let d = dir.to_str().unwrap();
    let key = hex::encode(StaticKeypair::generate().unwrap().public_key());
    ok(&vpnshare(&[
        "peers",
        "--state-dir",
        d,
        "add",
        &key,
        "--name",
        "laptop",
    ]));
    let list = ok(&vpnshare(&["peers", "--state-dir", d, "list"]));
    assert_eq!(list.trim(), format!("{key} laptop trusted"));
    fails_with_one_line(&vpnshare(&["peers", "--state-dir", d, "add", &key]));
    fails_with_one_line(&vpnshare(&["peers", "--state-dir", d, "add", "not-a-key"]));
    ok(&vpnshare(&["peers", "--state-dir", d, "revoke", "laptop"]));
    let list = ok(&vpnshare(&["peers", "--state-dir", d, "list"]));
    assert_eq!(list.trim(), format!("{key} laptop revoked"));
    fails_with_one_line(&vpnshare(&["peers", "--state-dir", d, "revoke", "nobody"]));
    let mode = std::fs::metadata(dir.join("peers.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let events: Vec<String> = audit_events(&dir)
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(events, ["peer_added", "peer_revoked"]);
    // Commands that need a running gateway say so in one line.
    fails_with_one_line(&vpnshare(&["pairing", "--state-dir", d, "list"]));
    fails_with_one_line(&vpnshare(&["status", "--state-dir", d]));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn running_gateway_prints_an_invite_and_control_changes_take_effect_at_once() {
    let gw = Gateway::start("control");
    let id = ok(&gw.cli(&["id"]));
    assert_eq!(id.trim(), hex::encode(gw.invite.key));
    let s = gw.status();
    assert_eq!(s["gateway_key"], hex::encode(gw.invite.key));
    assert_eq!(s["sandbox"], "confined");
    assert_eq!(s["sharing_available"], true);
    let mode = std::fs::metadata(gw.dir.join("control.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let key = hex::encode(StaticKeypair::generate().unwrap().public_key());
    ok(&gw.cli(&["peers", "add", &key, "--name", "tablet"]));
    let s = gw.status();
    assert_eq!(s["peers"][0]["key"], key.as_str());
    assert_eq!(s["peers"][0]["state"], "trusted");
    ok(&gw.cli(&["peers", "revoke", "tablet"]));
    assert_eq!(gw.status()["peers"][0]["state"], "revoked");
    // Persisted by the gateway, so an offline listing sees it too.
    let file = std::fs::read_to_string(gw.dir.join("peers.json")).unwrap();
    assert!(file.contains("revoked"), "{file}");
    fails_with_one_line(&gw.cli(&["pairing", "approve", "000000"]));
    assert_eq!(ok(&gw.cli(&["pairing", "list"])), "");

    // A second gateway on the same state dir refuses to start.
    let second = Command::new(BIN)
        .args([
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--egress",
            "any",
            "--state-dir",
        ])
        .arg(&gw.dir)
        .output()
        .unwrap();
    let err = fails_with_one_line(&second);
    assert!(err.contains("already running"), "{err}");

    let events: Vec<_> = audit_events(&gw.dir);
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(names.starts_with(&["gateway_started"]), "{names:?}");
    assert!(
        names.contains(&"peer_added") && names.contains(&"peer_revoked"),
        "{names:?}"
    );
    let added = events.iter().find(|e| e["event"] == "peer_added").unwrap();
    assert_eq!(added["via"], "control");
}

/// Without the worker binary the gateway cannot serve a peer: it says so with an
/// advisory ERROR record (overloaded) and logs why.
fn expect_no_worker(gw: &Gateway, r: Result<Client, ErrorReason>) {
    match r {
        Err(ErrorReason::Overloaded) => {}
        Err(e) => panic!("unexpected ERROR {e:?}"),
        Ok(_) => panic!("a handshake completed without a worker binary"),
    }
    wait_for("the log line", || {
        gw.log()
            .contains("vpnshare-worker was not found")
            .then_some(())
    });
    eprintln!("SKIPPED the worker part: vpnshare-worker is not built next to {BIN}");
}

#[test]
fn udp_client_of_a_pre_added_peer_gets_config_from_a_real_worker() {
    let gw = Gateway::start("udp");
    let me = StaticKeypair::generate().unwrap();
    ok(&gw.cli(&[
        "peers",
        "add",
        &hex::encode(me.public_key()),
        "--name",
        "laptop",
    ]));
    let r = Client::handshake(Link::udp(gw.addr), &me, Some(gw.invite.key));
    if worker_binary().is_none() {
        return expect_no_worker(&gw, r);
    }
    let mut c = r.unwrap_or_else(|e| panic!("ERROR {e:?}\n{}", gw.log()));
    let Outcome::Config(lease) = c.outcome() else {
        panic!("no CONFIG\n{}", gw.log())
    };
    assert_eq!(lease.ipv4.addr.octets()[..3], [100, 64, 0]);
    assert_eq!(lease.ipv4.len, 24);
    assert_eq!(
        lease.ipv6.unwrap().addr.segments()[..4],
        [0xfd56, 0x5348, 0x5000, 0]
    );
    let s = wait_for("the peer to show as connected", || {
        let s = gw.status();
        (s["connected_peers"] == 1).then_some(s)
    });
    assert_eq!(s["peers"][0]["lease"], lease.id.0);
    // The peer's datagrams now reach its worker directly: the broker's listener would
    // drop a DATA record (it only starts sessions), so a PONG proves the hand-off.
    for seq in 1..=3 {
        c.ping(seq);
    }
    // The worker was started with the gateway's public key, the gateway's own networks
    // denied, and an empty environment.
    let pids = gw.worker_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pids[0])).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let key_at = args.iter().position(|a| a == "--gateway-key").unwrap();
    assert_eq!(args[key_at + 1], hex::encode(gw.invite.key));
    let vpn_ifaces: Vec<String> = broker::egress::read_snapshot()
        .unwrap()
        .links
        .iter()
        .filter(|l| broker::egress::is_vpn_link(l))
        .map(|l| l.name.clone())
        .collect();
    let expected_deny = broker::lan::deny_prefixes(&broker::lan::read_ifaddrs(), &vpn_ifaces);
    for p in &expected_deny {
        assert!(args.contains(p), "{p} not denied: {args:?}");
    }
    let environ = std::fs::read(format!("/proc/{}/environ", pids[0])).unwrap();
    assert!(environ.is_empty(), "{}", String::from_utf8_lossy(&environ));
    assert!(
        audit_events(&gw.dir)
            .iter()
            .any(|e| e["event"] == "peer_admitted")
    );

    // Revoking the live peer cuts it off at once: its worker is told to stop.
    ok(&gw.cli(&["peers", "revoke", "laptop"]));
    wait_for("the worker to exit", || {
        gw.worker_pids().is_empty().then_some(())
    });
    assert_eq!(gw.status()["connected_peers"], 0);
    let events = audit_events(&gw.dir);
    let revoked = events
        .iter()
        .find(|e| e["event"] == "peer_revoked")
        .unwrap();
    assert_eq!(revoked["live_sessions_cut"], 1);
    // And it cannot come back.
    let mut again = Client::handshake(Link::udp(gw.addr), &me, Some(gw.invite.key)).unwrap();
    assert!(
        matches!(again.outcome(), Outcome::Error(ErrorReason::Revoked)),
        "{}",
        gw.log()
    );
}

#[test]
fn tcp_client_of_an_unknown_peer_waits_for_approval_then_gets_config() {
    let gw = Gateway::start("tcp");
    let me = StaticKeypair::generate().unwrap();
    let r = Client::handshake(Link::tcp(gw.addr), &me, None);
    if worker_binary().is_none() {
        return expect_no_worker(&gw, r);
    }
    let mut c = r.unwrap_or_else(|e| panic!("ERROR {e:?}\n{}", gw.log()));
    assert_eq!(
        c.est.remote_static, gw.invite.key,
        "XX showed another gateway key"
    );
    assert!(
        matches!(c.outcome(), Outcome::Error(ErrorReason::PendingApproval)),
        "{}",
        gw.log()
    );
    let code = c.est.pairing_code().to_string();
    let list = wait_for("the pairing request", || {
        let l = ok(&gw.cli(&["pairing", "list"]));
        (!l.is_empty()).then_some(l)
    });
    assert!(
        list.starts_with(&format!("{code} {}", hex::encode(me.public_key()))),
        "{list}"
    );
    assert!(list.contains("test-laptop (Linux), requested "), "{list}");
    assert_eq!(gw.status()["pending_pairings"], 1);
    ok(&gw.cli(&["pairing", "approve", &code]));
    let Outcome::Config(lease) = c.outcome() else {
        panic!("no CONFIG after approval\n{}", gw.log())
    };
    assert_eq!(lease.ipv4.len, 24);
    let peers = ok(&gw.cli(&["peers", "list"]));
    assert!(
        peers.contains(&format!(
            "{} test-laptop trusted connected",
            hex::encode(me.public_key())
        )),
        "{peers}"
    );
    let names: Vec<String> = audit_events(&gw.dir)
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect();
    for want in ["pairing_requested", "pairing_approved", "peer_admitted"] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}

/// A pseudo-terminal: (master, slave).
fn pty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    // SAFETY: posix_openpt has no memory arguments; the result is checked.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
    assert!(master >= 0, "posix_openpt failed");
    // SAFETY: `master` is a descriptor we own and nothing else wraps yet.
    let master_file = unsafe { std::fs::File::from_raw_fd(master) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `master` is an open pty master; `name` is a writable buffer of the length
    // passed, which ptsname_r NUL-terminates on success.
    let ok = unsafe {
        libc::grantpt(master) == 0
            && libc::unlockpt(master) == 0
            && libc::ptsname_r(master, name.as_mut_ptr(), name.len()) == 0
    };
    assert!(ok, "grantpt/unlockpt/ptsname_r failed");
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_str()
        .unwrap()
        .to_owned();
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    (master_file, slave)
}

#[test]
fn a_pairing_request_is_approved_at_the_gateway_terminal() {
    let (mut master, slave) = pty();
    let gw = Gateway::start_full("tty", "any", Some(Stdio::from(slave)));
    let me = StaticKeypair::generate().unwrap();
    let r = Client::handshake(Link::tcp(gw.addr), &me, None);
    if worker_binary().is_none() {
        return expect_no_worker(&gw, r);
    }
    let mut c = r.unwrap_or_else(|e| panic!("ERROR {e:?}\n{}", gw.log()));
    assert!(
        matches!(c.outcome(), Outcome::Error(ErrorReason::PendingApproval)),
        "{}",
        gw.log()
    );
    let code = c.est.pairing_code().to_string();
    // The broker announces the request; the answer typed now waits in the terminal
    // until the prompt thread asks (within a second) and reads it.
    wait_for("the request line", || {
        gw.log()
            .contains("pairing request from test-laptop (Linux)")
            .then_some(())
    });
    master.write_all(b"y\n").unwrap();
    let Outcome::Config(_) = c.outcome() else {
        panic!("no CONFIG after approval at the terminal\n{}", gw.log())
    };
    // The prompt has no newline of its own (log lines may follow it on its line).
    let prompt = format!("Approve test-laptop (Linux), code {code}? [y/N] ");
    let approved = format!("vpnshare: approved {code}");
    wait_for("the prompt and the approval", || {
        let log = gw.log();
        (log.contains(&prompt) && log.contains(&approved)).then_some(())
    });
    let peers = ok(&gw.cli(&["peers", "list"]));
    assert!(peers.contains("test-laptop trusted"), "{peers}");
}

#[test]
fn killed_workers_are_reaped_and_logged_and_the_peer_comes_back() {
    let gw = Gateway::start("reap");
    if worker_binary().is_none() {
        eprintln!("SKIPPED: vpnshare-worker is not built next to {BIN}");
        return;
    }
    let me = StaticKeypair::generate().unwrap();
    ok(&gw.cli(&["peers", "add", &hex::encode(me.public_key())]));
    for (signal, reason) in [
        (libc::SIGKILL, "killed by signal SIGKILL"),
        (libc::SIGSYS, "sandbox_violation"),
    ] {
        let mut c = Client::handshake(Link::udp(gw.addr), &me, Some(gw.invite.key)).unwrap();
        assert!(matches!(c.outcome(), Outcome::Config(_)), "{}", gw.log());
        let pids = gw.worker_pids();
        assert_eq!(pids.len(), 1, "{pids:?}");
        // SAFETY: sends a signal to our own test's grandchild by pid.
        assert_eq!(unsafe { libc::kill(pids[0], signal) }, 0);
        wait_for(reason, || {
            audit_events(&gw.dir)
                .iter()
                .any(|e| e["pid"] == pids[0] && (e["event"] == reason || e["reason"] == reason))
                .then_some(())
        });
        wait_for("the lease to be released", || {
            (gw.status()["connected_peers"] == 0).then_some(())
        });
    }
    assert!(gw.log().contains("sandbox violation"), "{}", gw.log());
    assert_eq!(gw.status()["workers_restarted"], 2);
    // The peer comes back with a fresh session.
    let mut c = Client::handshake(Link::udp(gw.addr), &me, Some(gw.invite.key)).unwrap();
    assert!(matches!(c.outcome(), Outcome::Config(_)), "{}", gw.log());
}

#[test]
fn without_a_vpn_pairing_works_but_known_peers_get_vpn_unavailable() {
    let snapshot = broker::egress::read_snapshot().unwrap();
    if broker::egress::detect_vpn(&snapshot).is_some() {
        eprintln!("SKIPPED: this machine's Internet routes go through a VPN");
        return;
    }
    let gw = Gateway::start_with("novpn", "vpn");
    let s = gw.status();
    assert_eq!(s["sharing_available"], false);
    let events = audit_events(&gw.dir);
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "egress_changed" && e["vpn"] == false),
        "{events:?}"
    );
    if worker_binary().is_none() {
        eprintln!("SKIPPED the worker part: vpnshare-worker is not built next to {BIN}");
        return;
    }
    // An unknown peer can still pair ...
    let stranger = StaticKeypair::generate().unwrap();
    let mut c = Client::handshake(Link::udp(gw.addr), &stranger, None).unwrap();
    assert!(
        matches!(c.outcome(), Outcome::Error(ErrorReason::PendingApproval)),
        "{}",
        gw.log()
    );
    // ... and a known peer is told the VPN is unavailable; nothing is admitted.
    let me = StaticKeypair::generate().unwrap();
    ok(&gw.cli(&["peers", "add", &hex::encode(me.public_key())]));
    let mut c = Client::handshake(Link::tcp(gw.addr), &me, Some(gw.invite.key)).unwrap();
    assert!(
        matches!(c.outcome(), Outcome::Error(ErrorReason::VpnUnavailable)),
        "{}",
        gw.log()
    );
    assert_eq!(gw.status()["connected_peers"], 0);
    assert!(
        audit_events(&gw.dir)
            .iter()
            .any(|e| e["event"] == "peer_refused" && e["reason"] == "vpn_unavailable")
    );
}

#[test]
fn a_denied_pairing_request_ends_the_session() {
    let gw = Gateway::start("deny");
    if worker_binary().is_none() {
        eprintln!("SKIPPED: vpnshare-worker is not built next to {BIN}");
        return;
    }
    let me = StaticKeypair::generate().unwrap();
    let mut c = Client::handshake(Link::udp(gw.addr), &me, None).unwrap();
    assert!(
        matches!(c.outcome(), Outcome::Error(ErrorReason::PendingApproval)),
        "{}",
        gw.log()
    );
    let code = c.est.pairing_code().to_string();
    ok(&gw.cli(&["pairing", "deny", &code]));
    assert!(
        matches!(c.outcome(), Outcome::Error(ErrorReason::NotApproved)),
        "{}",
        gw.log()
    );
    wait_for("the worker to exit", || {
        gw.worker_pids().is_empty().then_some(())
    });
    assert_eq!(ok(&gw.cli(&["peers", "list"])), "");
    assert!(
        audit_events(&gw.dir)
            .iter()
            .any(|e| e["event"] == "pairing_denied")
    );
}

#[test]
fn handshake_floods_from_one_address_are_rate_limited() {
    let gw = Gateway::start("flood");
    if worker_binary().is_none() {
        eprintln!("SKIPPED: vpnshare-worker is not built next to {BIN}");
        return;
    }
    // Each INIT comes from a new port of 127.0.0.1: the per-address bucket allows a
    // burst of 10, the rest are answered with an advisory ERROR "overloaded".
    let me = StaticKeypair::generate().unwrap();
    // All INITs are sent before any answer is read, so the bucket has no time to
    // refill much (it gains 2 tokens per second); the count does not depend on timing
    // beyond that.
    const N: u32 = 20;
    let mut links = Vec::new();
    for i in 0..N {
        let mut link = Link::udp(gw.addr);
        let mut init = Initiator::new(
            me.clone(),
            Some(gw.invite.key),
            Capabilities::ALL_V1,
            SessionIndex(i + 1),
        )
        .unwrap();
        let mut wire = vec![0u8; 1024];
        let n = init.write_init(&[], &mut wire).unwrap();
        link.send(&wire[..n]);
        links.push(link);
    }
    let mut overloaded = 0;
    let mut answered = 0;
    for link in &mut links {
        match record::decode(&link.recv()) {
            Ok(Record::Error(e)) if e.reason == ErrorReason::Overloaded => overloaded += 1,
            Ok(_) => answered += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(answered + overloaded, N);
    assert!(answered >= 10, "the burst is 10: {answered}\n{}", gw.log());
    assert!(overloaded >= 1, "no INIT was refused\n{}", gw.log());
    assert!(gw.log().contains("handshake rate limit"), "{}", gw.log());
}
