#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code
//! Issue #4's proof: the real `vpnshare gateway --egress vpn` (broker, one
//! `vpnshare-worker` per peer, `vpnshare-netstack`) runs in the testbed's `phone`
//! namespace, whose only route to the internet is a real WireGuard VPN (boringtun).
//! A client in the `laptop` namespace speaks VSHP over UDP to it (IK with the key from
//! the invite URI the gateway printed) and carries a smoltcp userspace TCP/IP stack
//! with the leased address, so real TCP connections, UDP exchanges and DNS lookups
//! cross the gateway into the `internet` namespace and back.
//!
//! Needs root (network namespaces) and the workspace's binaries next to this test's
//! directory: `cargo nextest run --workspace` (or `cargo build --workspace`) builds
//! `vpnshare`, `vpnshare-worker` and `vpnshare-netstack` first. Without them, or
//! without root, the test prints `SKIPPED` and why, and passes.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker::invite::Invite;
use sha2::{Digest, Sha256};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};
use testbed::{Node, Testbed};
use vshp::handshake::{Initiator, Next};
use vshp::key_oracle::StaticKeypair;
use vshp::lease::Lease;
use vshp::message::{Message, MessageReader, MessageWriter, Platform};
use vshp::record::{self, Capabilities, MAX_RECORD_LEN, Record, SessionIndex};
use vshp::transport::{Session, TransportMode};

/// The download of issue #4: 50 MB (MiB), hashed on the fly.
const FILE_MB: usize = 50;
const LISTEN_PORT: u16 = 7400;

// ---------------------------------------------------------------- binaries

/// `target/debug` (or whichever profile): where cargo puts the workspace's binaries,
/// one level above this test executable (`target/debug/deps/gateway-…`).
fn bin_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.to_path_buf())
}

fn binaries() -> Result<PathBuf, String> {
    let dir = bin_dir().ok_or("cannot locate the target directory")?;
    for b in ["vpnshare", "vpnshare-worker", "vpnshare-netstack"] {
        if !dir.join(b).is_file() {
            return Err(format!(
                "{} is missing: build the workspace first (`cargo nextest run --workspace` or `cargo build --workspace`)",
                dir.join(b).display()
            ));
        }
    }
    Ok(dir)
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vpnshare-e2e-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

// ---------------------------------------------------------------- the gateway

/// `vpnshare gateway` running in the phone namespace; killed on drop (the testbed's
/// drop would SIGKILL it too, with its children).
struct Gateway {
    child: Child,
    dir: PathBuf,
    bin: PathBuf,
    invite: Invite,
    log: Arc<Mutex<String>>,
}

impl Gateway {
    fn start(tb: &Testbed, bins: &Path, dir: &Path, env: &[(&str, &Path)]) -> Self {
        let bin = bins.join("vpnshare");
        let listen = SocketAddr::new(tb.phone_lan_ip(), LISTEN_PORT);
        let mut cmd = Command::new(&bin);
        cmd.args([
            "gateway",
            "--listen",
            &listen.to_string(),
            "--egress",
            "vpn",
            "--no-mdns",
        ])
        .arg("--state-dir")
        .arg(dir)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = tb.run_in(Node::Phone, &mut cmd).unwrap();
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
        let invite = match Invite::parse(&line) {
            Ok(i) => i,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "no invite on stdout ({e}): {line:?}\n{}",
                    log.lock().unwrap()
                );
            }
        };
        Self {
            child,
            dir: dir.to_path_buf(),
            bin,
            invite,
            log,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn status(&self) -> serde_json::Value {
        let out = Command::new(&self.bin)
            .args(["status", "--json", "--state-dir"])
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Children of the gateway whose name starts with `comm_prefix` (comm: ≤ 15 bytes).
    fn children(&self, comm_prefix: &str) -> Vec<u32> {
        let me = self.child.id().to_string();
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| {
                let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let (comm, rest) = stat.split_once(") ")?;
                let ppid = rest.split_whitespace().nth(1)?;
                (ppid == me && comm.contains(&format!("({comm_prefix}"))).then_some(pid)
            })
            .collect()
    }

    fn wait_log(&self, what: &str, secs: u64) -> bool {
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            if self.log().contains(what) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- gateway log ---\n{}", self.log());
        }
    }
}

fn vpnshare(bins: &Path, args: &[&str]) -> String {
    let out = Command::new(bins.join("vpnshare"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "vpnshare {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// (g) The gateway's worker and netstack children run confined.
fn check_confinement(gw: &Gateway) -> Vec<String> {
    let mut seen = Vec::new();
    for comm in ["vpnshare-worke", "vpnshare-netst"] {
        let pids = gw.children(comm);
        assert!(
            !pids.is_empty(),
            "no {comm}* child of the gateway {}: {:?}",
            gw.child.id(),
            std::fs::read_dir("/proc")
                .unwrap()
                .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
                .filter(|s| s.contains("(vpnshare"))
                .collect::<Vec<_>>()
        );
        for pid in pids {
            let st = proc_status(pid);
            assert_eq!(field(&st, "Seccomp"), "2", "{comm} {pid}: {st}");
            assert_eq!(field(&st, "NoNewPrivs"), "1", "{comm} {pid}");
            assert_eq!(field(&st, "CapEff"), "0000000000000000", "{comm} {pid}");
            assert_eq!(field(&st, "CapPrm"), "0000000000000000", "{comm} {pid}");
            seen.push(format!(
                "{comm}* pid {pid}: Seccomp 2, NoNewPrivs 1, CapEff 0"
            ));
        }
    }
    seen
}

fn proc_status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
}

fn field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------- the laptop

#[derive(Default)]
struct Dev {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    mtu: usize,
}

struct RxT(Vec<u8>);
struct TxT<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for RxT {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxT<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl phy::Device for Dev {
    type RxToken<'a> = RxT;
    type TxToken<'a> = TxT<'a>;
    fn receive(&mut self, _: SmolInstant) -> Option<(RxT, TxT<'_>)> {
        let p = self.rx.pop_front()?;
        Some((RxT(p), TxT(&mut self.tx)))
    }
    fn transmit(&mut self, _: SmolInstant) -> Option<TxT<'_>> {
        Some(TxT(&mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = self.mtu;
        c
    }
}

/// The laptop's transport to the gateway: UDP datagrams, or a TCP stream of records
/// each prefixed with its length (u16, big endian).
enum Link {
    Udp(UdpSocket),
    Tcp {
        stream: std::net::TcpStream,
        buf: Vec<u8>,
        have: usize,
    },
}

impl Link {
    fn udp(gateway: SocketAddr) -> Self {
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        sock.connect(gateway).unwrap();
        set_rcvbuf(&sock);
        Link::Udp(sock)
    }

    fn tcp(gateway: SocketAddr) -> Self {
        let stream =
            std::net::TcpStream::connect_timeout(&gateway, Duration::from_secs(10)).unwrap();
        stream.set_nodelay(true).unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Link::Tcp {
            stream,
            buf: vec![0u8; 4 * MAX_RECORD_LEN],
            have: 0,
        }
    }

    fn mode(&self) -> TransportMode {
        match self {
            Link::Udp(_) => TransportMode::Datagram,
            Link::Tcp { .. } => TransportMode::Stream,
        }
    }

    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match self {
            Link::Udp(s) => s.as_fd(),
            Link::Tcp { stream, .. } => stream.as_fd(),
        }
    }

    fn send(&mut self, rec: &[u8]) {
        use std::io::Write;
        match self {
            // A full socket buffer drops the datagram, as a LAN would.
            Link::Udp(s) => {
                let _ = s.send(rec);
            }
            Link::Tcp { stream, .. } => {
                let mut framed = u16::try_from(rec.len()).unwrap().to_be_bytes().to_vec();
                framed.extend_from_slice(rec);
                stream.write_all(&framed).unwrap();
            }
        }
    }

    /// Waits up to `wait` for the first byte or datagram.
    fn wait_readable(&self, wait: Duration) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(ms));
    }

    /// Hands every record available now to `f` (at most `max`), without waiting.
    fn recv_records(&mut self, max: usize, mut f: impl FnMut(&mut [u8])) -> usize {
        use nix::sys::socket::{MsgFlags, recv};
        use std::os::fd::AsRawFd;
        let mut n_rec = 0;
        match self {
            Link::Udp(s) => {
                let mut buf = vec![0u8; MAX_RECORD_LEN];
                while n_rec < max {
                    match recv(s.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                        Ok(n) => {
                            f(&mut buf[..n]);
                            n_rec += 1;
                        }
                        Err(_) => break,
                    }
                }
            }
            Link::Tcp { stream, buf, have } => loop {
                // Whole records first.
                let mut start = 0;
                // At most `max` records: the rest stay for the next call (a TICKET
                // often arrives in the same read as the CONFIG before it).
                while n_rec < max && *have - start >= 2 {
                    let len = usize::from(u16::from_be_bytes([buf[start], buf[start + 1]]));
                    if *have - start < 2 + len {
                        break;
                    }
                    f(&mut buf[start + 2..start + 2 + len]);
                    n_rec += 1;
                    start += 2 + len;
                }
                buf.copy_within(start..*have, 0);
                *have -= start;
                if n_rec >= max {
                    break;
                }
                match recv(
                    stream.as_raw_fd(),
                    &mut buf[*have..],
                    MsgFlags::MSG_DONTWAIT,
                ) {
                    Ok(0) => panic!("the gateway closed the TCP transport"),
                    Ok(n) => *have += n,
                    Err(_) => break,
                }
            },
        }
        n_rec
    }

    /// The next record, waiting up to 10 s (handshake).
    fn recv_one(&mut self) -> Vec<u8> {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let mut got = None;
            self.recv_records(1, |r| got = Some(r.to_vec()));
            if let Some(r) = got {
                return r;
            }
            assert!(Instant::now() < end, "no record from the gateway");
            self.wait_readable(Duration::from_millis(100));
        }
    }
}

/// The laptop: a VSHP session over UDP and a smoltcp stack on the leased address.
struct Laptop {
    link: Link,
    session: Session,
    start: Instant,
    lease: Lease,
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: Dev,
    next_port: u16,
    records_in: u64,
}

/// Plaintext budget of one record the laptop sends (one LAN datagram).
const RECORD_PLAIN: usize = 1420;

impl Laptop {
    /// IK handshake with the invite's key over `link`, then waits for CONFIG (the lease).
    fn connect(mut link: Link, gateway_key: [u8; 32], me: &StaticKeypair) -> Self {
        let mut init = Initiator::new(
            me.clone(),
            Some(gateway_key),
            Capabilities::ALL_V1,
            SessionIndex(0x00e2_e000),
        )
        .unwrap();
        let mut payload = vec![0u8; 512];
        let mut w = MessageWriter::new(&mut payload);
        w.hello(Capabilities::ALL_V1.0).unwrap();
        w.auth("e2e-laptop", Platform::Linux).unwrap();
        let p = w.finish().to_vec();
        let mut wire = vec![0u8; MAX_RECORD_LEN];
        let n = init.write_init(&p, &mut wire).unwrap();
        link.send(&wire[..n]);
        let resp = link.recv_one();
        if let Ok(Record::Error(e)) = record::decode(&resp) {
            panic!("the gateway refused the handshake: {:?}", e.reason);
        }
        let mut out = vec![0u8; MAX_RECORD_LEN];
        init.read_response(&resp, &mut out).unwrap();
        assert_eq!(init.next(), Next::Established, "IK needs two messages");
        let est = init.into_established().unwrap();
        let start = Instant::now();
        let mut session = Session::new(&est, link.mode(), Duration::ZERO).unwrap();
        let lease = loop {
            let mut rec = link.recv_one();
            let Ok(plain) = session.open_in_place(&mut rec, start.elapsed()) else {
                continue;
            };
            let mut lease = None;
            for m in MessageReader::new(plain) {
                match m.unwrap() {
                    Message::Config(l) => lease = Some(l),
                    Message::Error { reason, .. } => panic!("gateway error: {reason:?}"),
                    _ => {}
                }
            }
            if let Some(l) = lease {
                break l;
            }
        };
        let mut dev = Dev {
            mtu: usize::from(lease.mtu),
            ..Dev::default()
        };
        let mut iface = Interface::new(
            IfaceConfig::new(HardwareAddress::Ip),
            &mut dev,
            SmolInstant::from_micros(0),
        );
        let gw_v4 = lease
            .dns
            .iter()
            .find_map(|a| match a {
                IpAddr::V4(v) => Some(*v),
                _ => None,
            })
            .unwrap();
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(
                IpAddress::Ipv4(lease.ipv4.addr),
                lease.ipv4.len,
            ))
            .unwrap();
        });
        iface.routes_mut().add_default_ipv4_route(gw_v4).unwrap();
        // IPv6 when the lease has it: its address and a default route via the
        // gateway's IPv6 (DNS) address.
        if let Some(v6) = lease.ipv6 {
            iface.update_ip_addrs(|a| {
                a.push(IpCidr::new(IpAddress::Ipv6(v6.addr), v6.len))
                    .unwrap();
            });
            let gw_v6 = lease.dns.iter().find_map(|a| match a {
                IpAddr::V6(v) => Some(*v),
                _ => None,
            });
            if let Some(gw) = gw_v6 {
                iface.routes_mut().add_default_ipv6_route(gw).unwrap();
            }
        }
        Self {
            link,
            session,
            start,
            lease,
            iface,
            sockets: SocketSet::new(Vec::new()),
            dev,
            next_port: 40_000,
            records_in: 0,
        }
    }

    fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.start.elapsed().as_micros() as i64)
    }

    fn port(&mut self) -> u16 {
        self.next_port += 1;
        self.next_port
    }

    /// One round: smoltcp → records → gateway; gateway → records → smoltcp. Waits at
    /// most `max_wait` for the gateway when there is nothing to send.
    fn step(&mut self, max_wait: Duration) {
        let now = self.now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        self.send_packets();
        let wait = self
            .iface
            .poll_delay(self.now(), &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
            .unwrap_or(max_wait)
            .min(max_wait);
        self.receive(wait);
        let now = self.now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        self.send_packets();
    }

    fn send_packets(&mut self) {
        let pkts: Vec<Vec<u8>> = self.dev.tx.drain(..).collect();
        let mut i = 0;
        let mut plain = vec![0u8; RECORD_PLAIN + 64];
        let mut rec = vec![0u8; MAX_RECORD_LEN];
        while i < pkts.len() {
            let refs: Vec<&[u8]> = pkts[i..].iter().map(|p| p.as_slice()).collect();
            let budget = RECORD_PLAIN.max(refs[0].len() + 16);
            if plain.len() < budget {
                plain.resize(budget, 0);
            }
            let mut w = MessageWriter::new(&mut plain[..budget]);
            let taken = w.ip_packets(&refs).unwrap();
            let n = w.len();
            let len = self
                .session
                .seal(&plain[..n], &mut rec, self.start.elapsed())
                .unwrap();
            self.link.send(&rec[..len]);
            i += taken;
        }
    }

    fn receive(&mut self, wait: Duration) {
        if self.dev.tx.is_empty() && !wait.is_zero() {
            self.link.wait_readable(wait.max(Duration::from_millis(1)));
        }
        let Self {
            link,
            session,
            start,
            dev,
            records_in,
            ..
        } = self;
        link.recv_records(256, |rec| {
            let Ok(plain) = session.open_in_place(rec, start.elapsed()) else {
                return;
            };
            *records_in += 1;
            for m in MessageReader::new(plain) {
                match m {
                    Ok(Message::IpPacket(batch)) => {
                        for p in batch.iter() {
                            dev.rx.push_back(p.to_vec());
                        }
                    }
                    Ok(Message::Error { reason, .. }) => eprintln!("gateway ERROR: {reason:?}"),
                    _ => {}
                }
            }
        });
    }

    /// Steps until `done` holds or `secs` pass; returns whether it held.
    fn run_until(&mut self, secs: u64, mut done: impl FnMut(&mut Self) -> bool) -> bool {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            if done(self) {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            self.step(Duration::from_millis(20));
        }
    }

    fn tcp_connect(&mut self, to: SocketAddr, buf: usize) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; buf]),
            tcp::SocketBuffer::new(vec![0; 64 * 1024]),
        );
        let local = match (to.ip(), self.lease.ipv6) {
            (IpAddr::V6(_), Some(v6)) => (IpAddress::Ipv6(v6.addr), self.port()),
            _ => (IpAddress::Ipv4(self.lease.ipv4.addr), self.port()),
        };
        s.connect(
            self.iface.context(),
            (IpAddress::from(to.ip()), to.port()),
            local,
        )
        .unwrap();
        self.sockets.add(s)
    }

    fn udp_socket(&mut self) -> SocketHandle {
        let mut s = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 16], vec![0; 16384]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 16], vec![0; 16384]),
        );
        s.bind((IpAddress::Ipv4(self.lease.ipv4.addr), self.port()))
            .unwrap();
        self.sockets.add(s)
    }

    /// Sends one datagram and waits up to `secs` for the first answer.
    fn udp_request(&mut self, to: SocketAddr, payload: &[u8], secs: u64) -> Option<Vec<u8>> {
        let h = self.udp_socket();
        self.sockets
            .get_mut::<udp::Socket>(h)
            .send_slice(payload, (IpAddress::from(to.ip()), to.port()))
            .unwrap();
        let mut answer = None;
        self.run_until(secs, |l| {
            let s = l.sockets.get_mut::<udp::Socket>(h);
            if s.can_recv() {
                answer = Some(s.recv().unwrap().0.to_vec());
            }
            answer.is_some()
        });
        self.sockets.remove(h);
        answer
    }

    /// HTTP GET over a TCP connection through the tunnel; returns (status line,
    /// body length, body sha256) once the server closes.
    fn http_get(&mut self, to: SocketAddr, path: &str, secs: u64) -> (String, u64, [u8; 32]) {
        let h = self.tcp_connect(to, 1 << 20);
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            to.ip()
        );
        let mut sent = false;
        let mut head = Vec::new();
        let mut head_done = false;
        let mut hasher = Sha256::new();
        let mut body_len = 0u64;
        let ok = self.run_until(secs, |l| {
            let s = l.sockets.get_mut::<tcp::Socket>(h);
            if !sent && s.may_send() {
                s.send_slice(req.as_bytes()).unwrap();
                sent = true;
            }
            while s.can_recv() {
                s.recv(|b| {
                    if head_done {
                        hasher.update(&b[..]);
                        body_len += b.len() as u64;
                    } else {
                        head.extend_from_slice(b);
                        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                            let rest = head.split_off(i + 4);
                            hasher.update(&rest);
                            body_len += rest.len() as u64;
                            head_done = true;
                        }
                    }
                    (b.len(), ())
                })
                .unwrap();
            }
            sent && !s.may_recv() && !s.can_recv()
        });
        let s = self.sockets.get_mut::<tcp::Socket>(h);
        assert!(
            ok,
            "HTTP GET {path} timed out after {body_len} body bytes ({:?})",
            s.state()
        );
        s.close();
        self.sockets.remove(h);
        let head = String::from_utf8_lossy(&head).to_string();
        let status = head.lines().next().unwrap_or_default().to_owned();
        (status, body_len, hasher.finalize().into())
    }
}

/// A bigger receive buffer for the laptop's tunnel socket (root may force it).
fn set_rcvbuf(sock: &UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(sock, sockopt::RcvBufForce, &(8 << 20));
}

/// A DNS query for `name`, type A, recursion desired.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The A records of a response to a one-question query (answers right after it).
fn dns_a_records(resp: &[u8], query_len: usize) -> (u16, u8, Vec<Ipv4Addr>) {
    let id = u16::from_be_bytes([resp[0], resp[1]]);
    let rcode = resp[3] & 0x0f;
    let ancount = u16::from_be_bytes([resp[6], resp[7]]);
    let mut i = query_len;
    let mut out = Vec::new();
    for _ in 0..ancount {
        // Name: a pointer (2 bytes) or labels.
        if resp[i] & 0xc0 == 0xc0 {
            i += 2;
        } else {
            while resp[i] != 0 {
                i += 1 + usize::from(resp[i]);
            }
            i += 1;
        }
        let ty = u16::from_be_bytes([resp[i], resp[i + 1]]);
        let rdlen = usize::from(u16::from_be_bytes([resp[i + 8], resp[i + 9]]));
        let rdata = &resp[i + 10..i + 10 + rdlen];
        if ty == 1 && rdlen == 4 {
            out.push(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]));
        }
        i += 10 + rdlen;
    }
    (id, rcode, out)
}

fn testbed_or_skip(file_mb: usize) -> Option<(Testbed, PathBuf)> {
    let bins = match binaries() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            return None;
        }
    };
    match Testbed::builder().http_file_mb(file_mb).build() {
        Ok(tb) => Some((tb, bins)),
        Err(e) => {
            eprintln!("SKIPPED: the testbed needs root and /dev/net/tun: {e}");
            None
        }
    }
}

fn wait_status(gw: &Gateway, what: &str, secs: u64, f: impl Fn(&serde_json::Value) -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        let s = gw.status();
        if f(&s) {
            return;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn laptop_reaches_the_internet_through_the_gateway_and_its_vpn() {
    let Some((tb, bins)) = testbed_or_skip(FILE_MB) else {
        return;
    };
    let dir = temp_dir("gw");
    let me = StaticKeypair::generate().unwrap();
    let d = dir.to_str().unwrap();
    vpnshare(
        &bins,
        &[
            "peers",
            "--state-dir",
            d,
            "add",
            &hex::encode(me.public_key()),
            "--name",
            "e2e-laptop",
        ],
    );
    let gw = Gateway::start(&tb, &bins, &dir, &[]);
    assert_eq!(gw.invite.port, LISTEN_PORT);
    let gateway_addr = SocketAddr::new(gw.invite.host.parse().unwrap(), gw.invite.port);
    assert_eq!(gateway_addr.ip(), tb.phone_lan_ip());
    wait_status(&gw, "the VPN to be detected", 20, |s| {
        s["sharing_available"] == true
    });

    let http = tb.http_addr();
    let dns_server_queries = || tb.dns_queries();
    let report = tb
        .in_ns(Node::Laptop, || {
            let mut report = Vec::<String>::new();
            let mut laptop = Laptop::connect(Link::udp(gateway_addr), gw.invite.key, &me);
            report.push(format!(
                "lease {} mtu {}",
                laptop.lease.ipv4.addr, laptop.lease.mtu
            ));

            // (a) The download, hashed on the fly; it came in through the VPN.
            let wg_before = tb.vpn_counters().unwrap();
            let t0 = Instant::now();
            let (status, len, sha) = laptop.http_get(http, "/file", 600);
            let took = t0.elapsed();
            assert!(status.contains("200"), "{status}");
            assert_eq!(len, tb.file_len());
            assert_eq!(sha, tb.file_sha256(), "sha256 of the download differs");
            let wg_after = tb.vpn_counters().unwrap();
            assert!(
                wg_after.rx_bytes - wg_before.rx_bytes >= len,
                "the download did not come through wg0: {wg_before:?} → {wg_after:?}"
            );
            report.push(format!(
                "download {} bytes in {:.1} s (debug build)",
                len,
                took.as_secs_f64()
            ));

            // (b) DNS through the gateway's forwarder, then from its cache.
            let dns = SocketAddr::new(laptop.lease.dns[0], 53);
            let before = dns_server_queries();
            let q = dns_query(0x4242, "files.vpnshare.test");
            let r = laptop.udp_request(dns, &q, 10).expect("no DNS answer");
            let (id, rcode, addrs) = dns_a_records(&r, q.len());
            assert_eq!((id, rcode), (0x4242, 0));
            assert_eq!(addrs, vec![Ipv4Addr::new(198, 18, 0, 10)]);
            let after_first = dns_server_queries();
            assert!(after_first > before, "the upstream saw no query");
            let q2 = dns_query(0x5151, "files.vpnshare.test");
            let r2 = laptop
                .udp_request(dns, &q2, 10)
                .expect("no cached DNS answer");
            let (id2, rcode2, addrs2) = dns_a_records(&r2, q2.len());
            assert_eq!((id2, rcode2), (0x5151, 0));
            assert_eq!(addrs2, addrs);
            assert_eq!(
                dns_server_queries(),
                after_first,
                "the second answer was not cached"
            );
            report.push("DNS answered, second answer from the cache".into());

            // (c) UDP echo.
            let echoes = tb.udp_echoes();
            let e = laptop
                .udp_request(tb.udp_echo_addr(), b"e2e udp echo", 10)
                .expect("no UDP echo");
            assert_eq!(e, b"e2e udp echo");
            assert!(tb.udp_echoes() > echoes);

            // (d) A closed port: the client sees RST (connection refused), quickly.
            let h = laptop.tcp_connect(tb.closed_tcp_addr(), 4096);
            let mut was_syn_sent = false;
            let refused = laptop.run_until(5, |l| {
                let st = l.sockets.get::<tcp::Socket>(h).state();
                was_syn_sent |= st == tcp::State::SynSent;
                was_syn_sent && st == tcp::State::Closed
            });
            assert!(refused, "no RST from the closed port");
            laptop.sockets.remove(h);

            // (e) Forbidden destinations are dropped by the worker: loopback and the
            // phone's own LAN address never answer, while the echo server still does.
            for dst in [
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7),
                SocketAddr::new(tb.phone_lan_ip(), 7),
            ] {
                assert!(
                    laptop.udp_request(dst, b"forbidden", 2).is_none(),
                    "{dst} answered"
                );
            }
            let h = laptop.tcp_connect(SocketAddr::new(tb.phone_lan_ip(), LISTEN_PORT), 4096);
            laptop.run_until(2, |_| false);
            assert_eq!(
                laptop.sockets.get::<tcp::Socket>(h).state(),
                tcp::State::SynSent
            );
            laptop.sockets.remove(h);
            assert!(
                laptop
                    .udp_request(tb.udp_echo_addr(), b"still", 10)
                    .is_some()
            );
            // ... and counted: the workers' reports reach `vpnshare status` (every 5 s).
            wait_status(&gw, "forbidden destinations counted", 20, |s| {
                s["workers"]["forbidden_destinations"].as_u64() >= Some(3)
            });

            // (f) The VPN goes down: nothing leaves; it comes back: traffic flows.
            tb.set_vpn_up(false).unwrap();
            wait_status(&gw, "sharing unavailable", 20, |s| {
                s["sharing_available"] == false
            });
            let echoes = tb.udp_echoes();
            assert!(
                laptop
                    .udp_request(tb.udp_echo_addr(), b"vpn down", 3)
                    .is_none(),
                "an echo came back with the VPN down"
            );
            assert_eq!(tb.udp_echoes(), echoes, "a datagram left without the VPN");
            tb.set_vpn_up(true).unwrap();
            wait_status(&gw, "sharing available again", 20, |s| {
                s["sharing_available"] == true
            });
            let mut back = None;
            for _ in 0..5 {
                back = laptop.udp_request(tb.udp_echo_addr(), b"vpn up", 3);
                if back.is_some() {
                    break;
                }
            }
            assert_eq!(back.as_deref(), Some(&b"vpn up"[..]));
            let (status, len, sha) = laptop.http_get(http, "/bytes/100000", 60);
            assert!(status.contains("200"), "{status}");
            assert_eq!(len, 100_000);
            assert_eq!(sha, testbed::content_sha256(100_000));

            // IPv6 inside the tunnel, out through the VPN's IPv6.
            if tb.has_ipv6() && laptop.lease.ipv6.is_some() {
                let (status, len, sha) =
                    laptop.http_get(tb.addrs().http_v6(), "/bytes/2000000", 60);
                assert!(status.contains("200"), "{status}");
                assert_eq!(len, 2_000_000);
                assert_eq!(sha, testbed::content_sha256(2_000_000));
                report.push("IPv6: 2 MB over [fd00:18::10]:80".into());
            }
            report.push(format!("records from the gateway: {}", laptop.records_in));
            report
        })
        .unwrap();

    let confined = check_confinement(&gw);
    // The netstack counted the traffic.
    let s = gw.status();
    let n = &s["netstack"];
    assert!(n["bytes_out"].as_u64().unwrap() >= tb.file_len(), "{s}");
    assert!(n["dns_queries"].as_u64().unwrap() >= 2, "{s}");
    assert_eq!(s["connected_peers"], 1, "{s}");
    for line in report.iter().chain(&confined) {
        eprintln!("e2e: {line}");
    }
    eprintln!("e2e: status {s}");
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_worker_that_breaks_its_sandbox_dies_by_sigsys_and_the_broker_logs_it() {
    let Some((tb, bins)) = testbed_or_skip(1) else {
        return;
    };
    let probe = bins.join("vpnshare-worker-probe");
    if !probe.is_file() {
        eprintln!(
            "SKIPPED: {} is missing (built with the workspace)",
            probe.display()
        );
        return;
    }
    let dir = temp_dir("sigsys");
    let me = StaticKeypair::generate().unwrap();
    let d = dir.to_str().unwrap();
    vpnshare(
        &bins,
        &[
            "peers",
            "--state-dir",
            d,
            "add",
            &hex::encode(me.public_key()),
        ],
    );
    // The probe starts exactly like the worker, then calls socket(): SIGSYS.
    let gw = Gateway::start(&tb, &bins, &dir, &[("VPNSHARE_WORKER", probe.as_path())]);
    let gateway_addr = SocketAddr::new(gw.invite.host.parse().unwrap(), gw.invite.port);
    let key = gw.invite.key;
    tb.in_ns(Node::Laptop, || {
        // One HANDSHAKE_INIT makes the broker start a "worker" for it.
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        sock.connect(gateway_addr).unwrap();
        let mut init =
            Initiator::new(me.clone(), Some(key), Capabilities::ALL_V1, SessionIndex(7)).unwrap();
        let mut payload = vec![0u8; 256];
        let mut w = MessageWriter::new(&mut payload);
        w.hello(Capabilities::ALL_V1.0).unwrap();
        let p = w.finish().to_vec();
        let mut wire = vec![0u8; MAX_RECORD_LEN];
        let n = init.write_init(&p, &mut wire).unwrap();
        sock.send(&wire[..n]).unwrap();
    })
    .unwrap();
    assert!(
        gw.wait_log("killed by SIGSYS", 20),
        "no SIGSYS in the gateway log:\n{}",
        gw.log()
    );
    let audit = std::fs::read_to_string(dir.join("audit.log")).unwrap();
    assert!(audit.contains("\"sandbox_violation\""), "{audit}");
    assert!(audit.contains("SIGSYS"), "{audit}");
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn laptop_over_the_tcp_transport_downloads_and_resolves() {
    const MB: usize = 10;
    let Some((tb, bins)) = testbed_or_skip(MB) else {
        return;
    };
    let dir = temp_dir("tcp");
    let me = StaticKeypair::generate().unwrap();
    let d = dir.to_str().unwrap();
    vpnshare(
        &bins,
        &[
            "peers",
            "--state-dir",
            d,
            "add",
            &hex::encode(me.public_key()),
        ],
    );
    let gw = Gateway::start(&tb, &bins, &dir, &[]);
    let gateway_addr = SocketAddr::new(gw.invite.host.parse().unwrap(), gw.invite.port);
    wait_status(&gw, "the VPN to be detected", 20, |s| {
        s["sharing_available"] == true
    });
    let took = tb
        .in_ns(Node::Laptop, || {
            let mut laptop = Laptop::connect(Link::tcp(gateway_addr), gw.invite.key, &me);
            let t0 = Instant::now();
            let (status, len, sha) = laptop.http_get(tb.http_addr(), "/file", 300);
            let took = t0.elapsed();
            assert!(status.contains("200"), "{status}");
            assert_eq!(len, tb.file_len());
            assert_eq!(sha, tb.file_sha256());
            let q = dns_query(0x7777, "echo.vpnshare.test");
            let dns = SocketAddr::new(laptop.lease.dns[0], 53);
            let r = laptop.udp_request(dns, &q, 10).expect("no DNS answer");
            let (id, rcode, addrs) = dns_a_records(&r, q.len());
            assert_eq!((id, rcode), (0x7777, 0));
            assert_eq!(addrs, vec![Ipv4Addr::new(198, 18, 0, 10)]);
            let e = laptop
                .udp_request(tb.udp_echo_addr(), b"over tcp", 10)
                .expect("no UDP echo");
            assert_eq!(e, b"over tcp");
            took
        })
        .unwrap();
    eprintln!(
        "e2e: TCP transport: download {} bytes in {:.1} s (debug build)",
        tb.file_len(),
        took.as_secs_f64()
    );
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}
