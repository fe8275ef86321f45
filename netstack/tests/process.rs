#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code
//! The real `vpnshare-netstack` process, with the test playing the broker (fd 3) and a
//! worker (the data channel of a lease) in front of a smoltcp "laptop". Loopback only:
//! the broker sends `Egress(Any)` and every server listens on 127.0.0.1.

mod common;

use common::{CLIENT_V4, LaptopDevice, MTU};
use ipc_schema::messages::broker_netstack::{
    self as bn, BrokerToNetstack, EgressState, NetstackToBroker,
};
use ipc_schema::messages::common::ShutdownReason;
use ipc_schema::messages::data::{self, Credit, DataEvent};
use ipc_schema::{Channel, ChannelError, PacketBatch};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};
use vshp::lease::{Lease, LeaseId};

const BIN: &str = env!("CARGO_BIN_EXE_vpnshare-netstack");

/// The netstack child; killed and reaped if a test fails.
struct Proc {
    child: Child,
    broker: Channel<bn::BrokerEnd>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn() -> Proc {
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let dir = std::env::temp_dir().join(format!("vshp-ns-proc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let resolv = dir.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.1\n").unwrap();
    let raw = theirs.as_raw_fd();
    let mut cmd = Command::new(BIN);
    cmd.arg("--resolv-conf")
        .arg(&resolv)
        .env_clear()
        .env("RUST_LOG", "netstack=debug,info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // SAFETY: runs in the child between fork and exec; dup2 and fcntl are
    // async-signal-safe and touch only descriptor numbers.
    unsafe {
        cmd.pre_exec(move || {
            if raw == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(theirs);
    let broker = Channel::<bn::BrokerEnd>::open(ours).unwrap();
    Proc { child, broker }
}

fn lease(id: u64) -> Lease {
    let mut l = common::lease();
    l.id = LeaseId(id);
    l
}

/// Sends `LeaseAdded` with a fresh data channel; returns the worker's end, opened.
fn add_lease(p: &mut Proc, lease: &Lease) -> Worker {
    add_lease_with_sndbuf(p, lease, None)
}

/// [`add_lease`], with the netstack's end of the channel given this send buffer.
fn add_lease_with_sndbuf(p: &mut Proc, lease: &Lease, sndbuf: Option<usize>) -> Worker {
    let (worker_end, netstack_end) = UnixStream::pair().unwrap();
    if let Some(size) = sndbuf {
        nix::sys::socket::setsockopt(&netstack_end, nix::sys::socket::sockopt::SndBuf, &size)
            .unwrap();
    }
    p.broker
        .send(
            &BrokerToNetstack::LeaseAdded {
                lease: lease.clone(),
            },
            &[netstack_end.as_fd()],
        )
        .unwrap();
    drop(netstack_end);
    worker_end
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut ch = Channel::<data::WorkerEnd>::open(worker_end).unwrap();
    ch.send_credit(Credit {
        packets: 1024,
        bytes: 1024 * 1024,
    })
    .unwrap();
    Worker {
        ch,
        lease: lease.id,
        credit: Credit {
            packets: 0,
            bytes: 0,
        },
        rx: PacketBatch::new(lease.id),
        tx: PacketBatch::new(lease.id),
        received: 0,
    }
}

/// The test's worker end of a data channel.
struct Worker {
    ch: Channel<data::WorkerEnd>,
    lease: LeaseId,
    credit: Credit,
    rx: PacketBatch,
    tx: PacketBatch,
    received: usize,
}

impl Worker {
    /// Lets the netstack send without waiting for credit again.
    fn grant_unlimited(&mut self) {
        self.ch
            .send_credit(Credit {
                packets: u32::MAX / 2,
                bytes: u32::MAX / 2,
            })
            .unwrap();
    }

    /// Reads, sending nothing back (no credit, no packets), until the netstack has
    /// been silent for 300 ms, for 2 s at most: (packets, bytes) received.
    fn read_until_quiet(&mut self) -> (usize, usize) {
        let (mut packets, mut bytes) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let ms = u16::try_from(left.as_millis().min(300)).unwrap_or(300);
            let mut fds = [PollFd::new(self.ch.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::from(ms)).unwrap() == 0 {
                break;
            }
            if let DataEvent::Packets = self.ch.recv_data(&mut self.rx).unwrap() {
                packets += self.rx.len();
                bytes += self.rx.total_bytes();
            }
        }
        (packets, bytes)
    }

    /// Sends the laptop's packets (within the netstack's credit), then takes in what
    /// the netstack sent within `wait`.
    fn exchange(&mut self, dev: &mut LaptopDevice, wait: Duration) -> Result<(), ChannelError> {
        while !dev.tx.is_empty() {
            self.tx.clear();
            self.tx.set_lease(self.lease);
            let mut bytes = 0u32;
            while let Some(p) = dev.tx.front() {
                let n = self.tx.len() as u32 + 1;
                if n > self.credit.packets
                    || bytes + p.len() as u32 > self.credit.bytes
                    || self.tx.push(p).is_err()
                {
                    break;
                }
                bytes += p.len() as u32;
                dev.tx.pop_front();
            }
            if self.tx.is_empty() {
                break;
            }
            self.credit.packets -= self.tx.len() as u32;
            self.credit.bytes -= bytes;
            self.ch.send_batch(&self.tx)?;
        }
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(self.ch.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::from(ms)).unwrap() == 0 {
                return Ok(());
            }
            match self.ch.recv_data(&mut self.rx)? {
                DataEvent::Packets => {
                    for p in self.rx.iter() {
                        dev.rx.push_back(p.to_vec());
                    }
                    self.received += self.rx.len();
                    self.ch.send_credit(Credit {
                        packets: self.rx.len() as u32,
                        bytes: self.rx.total_bytes() as u32,
                    })?;
                }
                DataEvent::Credit(c) => {
                    self.credit.packets += c.packets;
                    self.credit.bytes += c.bytes;
                }
            }
            // Hand what arrived to the laptop before waiting again.
            if Instant::now() >= deadline || !dev.rx.is_empty() {
                return Ok(());
            }
        }
    }
}

struct Laptop {
    addr: Ipv4Addr,
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: LaptopDevice,
    epoch: Instant,
}

impl Laptop {
    fn new() -> Self {
        Self::with_addr(CLIENT_V4)
    }

    fn with_addr(addr: Ipv4Addr) -> Self {
        let mut dev = LaptopDevice::default();
        let mut iface = Interface::new(
            IfaceConfig::new(HardwareAddress::Ip),
            &mut dev,
            SmolInstant::from_micros(0),
        );
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::Ipv4(addr), 24)).unwrap();
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(common::GATEWAY_V4)
            .unwrap();
        Self {
            addr,
            iface,
            sockets: SocketSet::new(Vec::new()),
            dev,
            epoch: Instant::now(),
        }
    }

    fn step(&mut self, w: &mut Worker) -> Result<(), ChannelError> {
        let now = SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64);
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        let wait = if self.dev.tx.is_empty() {
            Duration::from_millis(5)
        } else {
            Duration::ZERO
        };
        w.exchange(&mut self.dev, wait)?;
        let now = SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64);
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        Ok(())
    }
}

fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

fn recv_broker(p: &mut Proc) -> NetstackToBroker {
    p.broker.recv().unwrap().msg
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[test]
fn the_process_relays_tcp_is_confined_and_drops_revoked_leases() {
    let mut p = spawn();
    let pid = p.child.id();
    p.broker
        .send(&BrokerToNetstack::Egress(EgressState::Any), &[])
        .unwrap();
    let lease = lease(41);
    let mut w = add_lease(&mut p, &lease);
    let mut laptop = Laptop::new();

    // An echo server on loopback, reached through the netstack process.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let server: SocketAddr = listener.local_addr().unwrap();
    let (reset_tx, reset_rx) = std::sync::mpsc::channel::<bool>();
    let join = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = vec![0; 65536];
        let mut total = 0usize;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    s.write_all(&buf[..n]).unwrap();
                    total += n;
                }
                Err(_) => break,
            }
        }
        // After the data round trip the lease is revoked: the server sees the end.
        let _ = reset_tx.send(true);
        total
    });

    let mut sock = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 256 * 1024]),
        tcp::SocketBuffer::new(vec![0; 256 * 1024]),
    );
    sock.connect(
        laptop.iface.context(),
        (IpAddress::from(server.ip()), server.port()),
        (IpAddress::Ipv4(CLIENT_V4), 40_100),
    )
    .unwrap();
    let handle = laptop.sockets.add(sock);

    const LEN: usize = 1024 * 1024;
    let data: Vec<u8> = (0..LEN).map(|i| (i * 13 + i / 253) as u8).collect();
    let (mut sent, mut received) = (0, Vec::with_capacity(LEN));
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.len() < LEN {
        assert!(
            Instant::now() < deadline,
            "echo timed out at {} bytes",
            received.len()
        );
        let s = laptop.sockets.get_mut::<tcp::Socket>(handle);
        if s.can_send() && sent < LEN {
            sent += s.send_slice(&data[sent..]).unwrap();
        }
        if s.can_recv() {
            s.recv(|b| {
                received.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        laptop.step(&mut w).unwrap();
    }
    assert_eq!(fnv(&received), fnv(&data), "echoed bytes differ");
    assert!(w.received > 0);

    // Confined: seccomp filter mode, no_new_privs, no capabilities.
    assert_eq!(status_field(pid, "Seccomp"), "2");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");

    // Counters on request.
    p.broker
        .send(&BrokerToNetstack::ReportCounters, &[])
        .unwrap();
    match recv_broker(&mut p) {
        NetstackToBroker::Counters(c) => {
            assert_eq!(c.tcp_flows, 1, "{c:?}");
            assert!(c.packets_in > 0 && c.packets_out > 0, "{c:?}");
            assert!(
                c.bytes_in >= LEN as u64 && c.bytes_out >= LEN as u64,
                "{c:?}"
            );
        }
        other => panic!("expected counters, got {other:?}"),
    }

    // Revocation: the flow is dropped (the server sees a reset), the channel closes,
    // the broker gets LeaseDropped.
    p.broker
        .send(&BrokerToNetstack::PeerRevoked { lease: lease.id }, &[])
        .unwrap();
    match recv_broker(&mut p) {
        NetstackToBroker::LeaseDropped {
            lease: l,
            flows_dropped,
        } => {
            assert_eq!(l, lease.id);
            assert_eq!(flows_dropped, 1);
        }
        other => panic!("expected LeaseDropped, got {other:?}"),
    }
    assert!(reset_rx.recv_timeout(Duration::from_secs(10)).unwrap());
    assert_eq!(join.join().unwrap(), LEN);
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            Instant::now() < end,
            "data channel still open after revocation"
        );
        if w.exchange(&mut laptop.dev, Duration::from_millis(50))
            .is_err()
        {
            break;
        }
    }

    // Shutdown: exit status 0.
    p.broker
        .send(
            &BrokerToNetstack::Shutdown {
                reason: ShutdownReason::GatewayStopping,
            },
            &[],
        )
        .unwrap();
    let status = wait_exit(&mut p.child);
    assert_eq!(status.code(), Some(0), "{status:?}");
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < end, "the netstack did not exit");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_bad_worker_message_drops_that_lease_only() {
    let mut p = spawn();
    p.broker
        .send(&BrokerToNetstack::Egress(EgressState::Any), &[])
        .unwrap();
    let good = lease(1);
    let mut bad_lease = lease(2);
    bad_lease.ipv4.addr = Ipv4Addr::new(100, 64, 0, 3);
    bad_lease.ipv6 = None;
    let mut w_good = add_lease(&mut p, &good);

    // The bad worker: a valid hello, then a frame whose header claims 16 MiB.
    let (worker_end, netstack_end) = UnixStream::pair().unwrap();
    p.broker
        .send(
            &BrokerToNetstack::LeaseAdded {
                lease: bad_lease.clone(),
            },
            &[netstack_end.as_fd()],
        )
        .unwrap();
    drop(netstack_end);
    worker_end
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut raw = worker_end.try_clone().unwrap();
    let _ch = Channel::<data::WorkerEnd>::open(worker_end).unwrap();
    raw.write_all(&(16u32 << 20).to_le_bytes()).unwrap();
    raw.write_all(&[ipc_schema::SCHEMA_VERSION; 8]).unwrap();
    match recv_broker(&mut p) {
        NetstackToBroker::LeaseDropped { lease, .. } => assert_eq!(lease, bad_lease.id),
        other => panic!("expected LeaseDropped, got {other:?}"),
    }
    // The bad worker's socket was shut down: it reads the end of the stream (after
    // the netstack's hello and credit, which are already consumed or pending).
    let mut buf = [0u8; 256];
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < end);
        match raw.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }

    // The process and the other lease are fine: a UDP echo goes through.
    let server = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let server_addr = server.local_addr().unwrap();
    let echo = thread::spawn(move || {
        let mut b = [0u8; 1500];
        let (n, from) = server.recv_from(&mut b).unwrap();
        server.send_to(&b[..n], from).unwrap();
        b[..n].to_vec()
    });
    let mut laptop = Laptop::new();
    let mut udp = smoltcp::socket::udp::Socket::new(
        smoltcp::socket::udp::PacketBuffer::new(
            vec![smoltcp::socket::udp::PacketMetadata::EMPTY; 8],
            vec![0; 8192],
        ),
        smoltcp::socket::udp::PacketBuffer::new(
            vec![smoltcp::socket::udp::PacketMetadata::EMPTY; 8],
            vec![0; 8192],
        ),
    );
    udp.bind((IpAddress::Ipv4(CLIENT_V4), 5353)).unwrap();
    let h = laptop.sockets.add(udp);
    laptop
        .sockets
        .get_mut::<smoltcp::socket::udp::Socket>(h)
        .send_slice(
            b"still alive",
            (IpAddress::from(server_addr.ip()), server_addr.port()),
        )
        .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    let got = loop {
        assert!(Instant::now() < end, "no UDP echo");
        laptop.step(&mut w_good).unwrap();
        let s = laptop.sockets.get_mut::<smoltcp::socket::udp::Socket>(h);
        if s.can_recv() {
            let (d, _) = s.recv().unwrap();
            break d.to_vec();
        }
    };
    assert_eq!(got, b"still alive");
    assert_eq!(echo.join().unwrap(), b"still alive");
    assert!(p.child.try_wait().unwrap().is_none(), "the netstack died");
    let _ = MTU;
}

#[test]
fn broker_eof_ends_the_process_and_missing_fd3_fails_start() {
    let mut p = spawn();
    // Closing the broker's end: the netstack exits on its own.
    let (dummy, _other) = UnixStream::pair().unwrap();
    let ch = std::mem::replace(&mut p.broker, {
        // A throwaway channel so `Proc` stays whole; its peer end is never read.
        let (a, b) = (dummy, _other);
        let t = thread::spawn(move || Channel::<bn::NetstackEnd>::open(b));
        let c = Channel::<bn::BrokerEnd>::open(a).unwrap();
        let _ = t.join();
        c
    });
    drop(ch);
    let status = wait_exit(&mut p.child);
    assert_eq!(status.code(), Some(2), "{status:?}");
    assert!(status.signal().is_none());

    let out = Command::new(BIN)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    // Exit 1 with a one-line reason: fd 3 missing (or, if the test runner leaked an
    // fd 3, a failed hello on it).
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vpnshare-netstack: "), "{err}");
}

/// Sends one datagram from the laptop and steps until an answer or `secs` pass.
fn udp_request(
    laptop: &mut Laptop,
    w: &mut Worker,
    port: u16,
    to: SocketAddr,
    payload: &[u8],
    secs: u64,
) -> Option<Vec<u8>> {
    use smoltcp::socket::udp;
    let mut s = udp::Socket::new(
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]),
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]),
    );
    s.bind((IpAddress::Ipv4(laptop.addr), port)).unwrap();
    let h = laptop.sockets.add(s);
    laptop
        .sockets
        .get_mut::<udp::Socket>(h)
        .send_slice(payload, (IpAddress::from(to.ip()), to.port()))
        .unwrap();
    let end = Instant::now() + Duration::from_secs(secs);
    let mut got = None;
    while got.is_none() && Instant::now() < end {
        laptop.step(w).unwrap();
        let s = laptop.sockets.get_mut::<udp::Socket>(h);
        if s.can_recv() {
            got = Some(s.recv().unwrap().0.to_vec());
        }
    }
    laptop.sockets.remove(h);
    got
}

#[test]
fn egress_follows_the_broker() {
    let mut p = spawn();
    let lease = lease(5);
    let mut w = add_lease(&mut p, &lease);
    let mut laptop = Laptop::new();
    let server = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    server.set_nonblocking(true).unwrap();
    let to = server.local_addr().unwrap();
    let serve = |server: &std::net::UdpSocket| -> usize {
        let mut n = 0;
        let mut b = [0u8; 1500];
        while let Ok((len, from)) = server.recv_from(&mut b) {
            server.send_to(&b[..len], from).unwrap();
            n += 1;
        }
        n
    };

    // Before any Egress message, and with VpnDown: nothing leaves.
    assert!(udp_request(&mut laptop, &mut w, 6000, to, b"no egress yet", 1).is_none());
    p.broker
        .send(&BrokerToNetstack::Egress(EgressState::VpnDown), &[])
        .unwrap();
    assert!(udp_request(&mut laptop, &mut w, 6001, to, b"vpn down", 1).is_none());
    assert_eq!(serve(&server), 0, "a datagram left without egress");

    // VpnUp on `lo`'s index: sockets are bound to it and the echo comes back.
    let lo = nix::net::if_::if_nametoindex("lo").unwrap();
    p.broker
        .send(
            &BrokerToNetstack::Egress(EgressState::VpnUp { ifindex: lo }),
            &[],
        )
        .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let echo = thread::scope(|s| {
        let t = s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                serve(&server);
                thread::sleep(Duration::from_millis(2));
            }
        });
        let r = udp_request(&mut laptop, &mut w, 6002, to, b"vpn up", 10);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        t.join().unwrap();
        r
    });
    assert_eq!(echo.as_deref(), Some(&b"vpn up"[..]));

    // VpnUp on an interface that does not exist: the binding fails, nothing leaves.
    p.broker
        .send(
            &BrokerToNetstack::Egress(EgressState::VpnUp { ifindex: 999_999 }),
            &[],
        )
        .unwrap();
    assert!(udp_request(&mut laptop, &mut w, 6003, to, b"no such vpn", 1).is_none());
    assert_eq!(serve(&server), 0);
    p.broker
        .send(&BrokerToNetstack::ReportCounters, &[])
        .unwrap();
    match recv_broker(&mut p) {
        NetstackToBroker::Counters(c) => assert!(c.dropped_no_egress >= 2, "{c:?}"),
        other => panic!("expected counters, got {other:?}"),
    }
}

#[test]
fn a_new_channel_for_a_served_lease_keeps_its_flows() {
    let mut p = spawn();
    p.broker
        .send(&BrokerToNetstack::Egress(EgressState::Any), &[])
        .unwrap();
    let lease = lease(9);
    let mut w1 = add_lease(&mut p, &lease);
    let mut laptop = Laptop::new();
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let server = listener.local_addr().unwrap();
    let join = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 4096];
        let mut total = 0;
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).unwrap();
            total += n;
        }
        total
    });
    let mut sock = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 65536]),
        tcp::SocketBuffer::new(vec![0; 65536]),
    );
    sock.connect(
        laptop.iface.context(),
        (IpAddress::from(server.ip()), server.port()),
        (IpAddress::Ipv4(CLIENT_V4), 40_200),
    )
    .unwrap();
    let handle = laptop.sockets.add(sock);
    let echo = |laptop: &mut Laptop, w: &mut Worker, msg: &[u8]| {
        let mut sent = false;
        let mut got = Vec::new();
        let end = Instant::now() + Duration::from_secs(20);
        while got.len() < msg.len() {
            assert!(Instant::now() < end, "no echo");
            let s = laptop.sockets.get_mut::<tcp::Socket>(handle);
            if !sent && s.can_send() {
                s.send_slice(msg).unwrap();
                sent = true;
            }
            if s.can_recv() {
                s.recv(|b| {
                    got.extend_from_slice(b);
                    (b.len(), ())
                })
                .unwrap();
            }
            laptop.step(w).unwrap();
        }
        assert_eq!(got, msg);
    };
    echo(&mut laptop, &mut w1, b"through the first channel");

    // The session resumes on a new worker: same lease, new data channel.
    let mut w2 = add_lease(&mut p, &lease);
    let end = Instant::now() + Duration::from_secs(10);
    while w1
        .exchange(&mut laptop.dev, Duration::from_millis(20))
        .is_ok()
    {
        assert!(Instant::now() < end, "the old channel stays open");
    }
    echo(
        &mut laptop,
        &mut w2,
        b"and the same TCP flow through the second",
    );
    laptop.sockets.get_mut::<tcp::Socket>(handle).close();
    let end = Instant::now() + Duration::from_secs(10);
    while !join.is_finished() {
        assert!(Instant::now() < end, "the server did not see the FIN");
        laptop.step(&mut w2).unwrap();
    }
    let total =
        "through the first channel".len() + "and the same TCP flow through the second".len();
    assert_eq!(join.join().unwrap(), total);
}

#[test]
fn a_worker_that_stops_reading_does_not_stall_the_others() {
    let mut p = spawn();
    p.broker
        .send(&BrokerToNetstack::Egress(EgressState::Any), &[])
        .unwrap();
    let slow_lease = lease(20);
    let mut fast_lease = lease(21);
    fast_lease.ipv4.addr = Ipv4Addr::new(100, 64, 0, 3);
    fast_lease.ipv6 = None;
    let mut slow = add_lease(&mut p, &slow_lease);
    let mut fast = add_lease(&mut p, &fast_lease);
    let mut slow_laptop = Laptop::new();
    let mut fast_laptop = Laptop::with_addr(fast_lease.ipv4.addr);

    // The slow lease opens a UDP mapping, then its worker grants a huge credit and never
    // reads again while a server floods the mapping with 16 MB.
    let flood = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    flood
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let flood_addr = flood.local_addr().unwrap();
    let echo = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    echo.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let echo_addr = echo.local_addr().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_flood = stop.clone();
    let flooder = thread::spawn(move || {
        let mut b = [0u8; 1500];
        let (_, mapping) = flood.recv_from(&mut b).unwrap();
        let payload = [0x5au8; 1000];
        while !stop_flood.load(std::sync::atomic::Ordering::Relaxed) {
            for _ in 0..64 {
                let _ = flood.send_to(&payload, mapping);
            }
            thread::sleep(Duration::from_millis(1));
        }
    });
    let echoer = thread::spawn(move || {
        let mut b = [0u8; 1500];
        let (n, from) = echo.recv_from(&mut b).unwrap();
        echo.send_to(&b[..n], from).unwrap();
    });
    // The first datagram only has to reach the flooder; no answer is expected.
    let _ = udp_request(&mut slow_laptop, &mut slow, 7000, flood_addr, b"open", 1);
    slow.grant_unlimited();

    // The flood goes on until the slow worker's socket is full: the netstack cannot
    // write more to it (and must not wait for it).
    let mut peek = vec![0u8; 4 << 20];
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let queued = nix::sys::socket::recv(
            slow.ch.as_fd().as_raw_fd(),
            &mut peek,
            nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        )
        .unwrap_or(0);
        if queued > 150_000 {
            break;
        }
        assert!(
            Instant::now() < end,
            "only {queued} bytes wait for the slow worker"
        );
        thread::sleep(Duration::from_millis(20));
    }

    // The netstack keeps serving the other lease.
    let got = udp_request(
        &mut fast_laptop,
        &mut fast,
        7001,
        echo_addr,
        b"not stalled",
        20,
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flooder.join().unwrap();
    assert_eq!(got.as_deref(), Some(&b"not stalled"[..]));
    echoer.join().unwrap();
    p.broker
        .send(&BrokerToNetstack::ReportCounters, &[])
        .unwrap();
    match recv_broker(&mut p) {
        NetstackToBroker::Counters(c) => assert!(c.packets_out > 0, "{c:?}"),
        other => panic!("expected counters, got {other:?}"),
    }
    assert!(p.child.try_wait().unwrap().is_none(), "the netstack died");
}

/// The netstack asks for the data channel's writability only while it holds unsent
/// bytes (a standing EPOLLOUT interest would wake it on every batch the worker reads).
/// Here nothing but that writability can make it send again: the flood has stopped and
/// the worker reads without sending a byte, so what the netstack held back must still
/// arrive.
#[test]
fn what_waited_for_channel_space_is_sent_once_the_worker_reads() {
    let mut p = spawn();
    p.broker
        .send(&BrokerToNetstack::Egress(EgressState::Any), &[])
        .unwrap();
    let l = lease(22);
    // A small channel buffer, so that the netstack holds several buffers' worth.
    let mut w = add_lease_with_sndbuf(&mut p, &l, Some(16 * 1024));
    let mut laptop = Laptop::new();
    let flood = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    flood
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let flood_addr = flood.local_addr().unwrap();
    let flooder = thread::spawn(move || {
        let mut b = [0u8; 1500];
        let (_, mapping) = flood.recv_from(&mut b).unwrap();
        let payload = [0x5au8; 1000];
        // 4 MB, far more than the channel's socket buffer holds.
        for _ in 0..64 {
            for _ in 0..64 {
                let _ = flood.send_to(&payload, mapping);
            }
            thread::sleep(Duration::from_millis(2));
        }
    });
    let _ = udp_request(&mut laptop, &mut w, 7002, flood_addr, b"open", 1);
    w.grant_unlimited();
    flooder.join().unwrap();
    // Quiet: the flood is over and the netstack has written what the socket takes.
    thread::sleep(Duration::from_millis(500));
    let mut peek = vec![0u8; 8 << 20];
    let queued = nix::sys::socket::recv(
        w.ch.as_fd().as_raw_fd(),
        &mut peek,
        nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
    )
    .unwrap_or(0);
    assert!(queued > 8 * 1024, "only {queued} bytes wait in the channel");

    // Read, sending nothing back, until the netstack has been silent for 300 ms or for
    // two seconds at most. With writability it sends all it holds (several times the
    // channel's buffer) at once; without, only other wake-ups (timers, the sweep) would
    // flush it, a buffer's worth at a time.
    let (_, got) = w.read_until_quiet();
    assert!(
        got > 12 * queued,
        "the worker got {got} bytes, not much more than the {queued} the channel held: \
         the netstack did not resume writing when the channel had room"
    );
    assert!(p.child.try_wait().unwrap().is_none(), "the netstack died");
}

/// More output than the netstack queues on a data channel in one round (a burst from
/// the internet that piled up while it was stopped), with room in the channel: all of
/// it must go out at once. No later event prompts the rest: the server is silent after
/// its burst and the worker sends nothing.
#[test]
fn a_burst_larger_than_one_send_round_goes_out_whole() {
    use nix::sys::signal::{Signal, kill};
    let mut p = spawn();
    p.broker
        .send(&BrokerToNetstack::Egress(EgressState::Any), &[])
        .unwrap();
    let l = lease(23);
    let mut w = add_lease(&mut p, &l);
    let mut laptop = Laptop::new();
    w.grant_unlimited();
    // Two servers, two mappings: one socket buffer holds ~90 such datagrams, and the
    // burst must be several send rounds' worth (~200 KB).
    const DATAGRAMS: usize = 80;
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = std::sync::Arc::new(std::sync::Mutex::new(go_rx));
    let mut senders = Vec::new();
    for port in [7003u16, 7004] {
        let server = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let addr = server.local_addr().unwrap();
        let go = go_rx.clone();
        senders.push(thread::spawn(move || {
            let mut b = [0u8; 1500];
            let (_, mapping) = server.recv_from(&mut b).unwrap();
            go.lock().unwrap().recv().unwrap();
            let payload = [0x5au8; 1200];
            for _ in 0..DATAGRAMS {
                server.send_to(&payload, mapping).unwrap();
            }
        }));
        // Opens the mapping; nothing answers yet.
        assert!(udp_request(&mut laptop, &mut w, port, addr, b"open", 1).is_none());
    }
    // The bursts wait in the netstack's sockets until it runs again, so one round
    // sees all of them.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(p.child.id()).unwrap());
    kill(pid, Signal::SIGSTOP).unwrap();
    for _ in &senders {
        go_tx.send(()).unwrap();
    }
    for s in senders {
        s.join().unwrap();
    }
    kill(pid, Signal::SIGCONT).unwrap();
    let (got, _) = w.read_until_quiet();
    assert!(
        got >= 2 * DATAGRAMS,
        "{got} of {} datagrams reached the worker",
        2 * DATAGRAMS
    );
    assert!(p.child.try_wait().unwrap().is_none(), "the netstack died");
}

#[test]
fn a_worker_that_sends_beyond_its_credit_loses_its_lease() {
    let mut p = spawn();
    p.broker
        .send(&BrokerToNetstack::Egress(EgressState::Any), &[])
        .unwrap();
    let lease = lease(30);
    let (worker_end, netstack_end) = UnixStream::pair().unwrap();
    p.broker
        .send(
            &BrokerToNetstack::LeaseAdded {
                lease: lease.clone(),
            },
            &[netstack_end.as_fd()],
        )
        .unwrap();
    drop(netstack_end);
    worker_end
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut raw = worker_end.try_clone().unwrap();
    let mut ch = Channel::<data::WorkerEnd>::open(worker_end).unwrap();
    // The netstack's initial grant.
    let mut rx = PacketBatch::new(lease.id);
    let granted = match ch.recv_data(&mut rx).unwrap() {
        DataEvent::Credit(c) => c,
        other => panic!("expected the initial credit, got {other:?}"),
    };
    // Full batches of tiny packets, all written at once: together they exceed the
    // packet credit before the netstack could grant anything back.
    let mut batch = PacketBatch::new(lease.id);
    for _ in 0..ipc_schema::limits::MAX_BATCH_PACKETS {
        batch.push(&[0x45; 20]).unwrap();
    }
    let body = ipc_schema::codec::to_vec(&data::DataMsg::Packets(batch)).unwrap();
    let header = ipc_schema::frame::encode_header(body.len(), ipc_schema::SCHEMA_VERSION).unwrap();
    let frames = granted.packets as usize / ipc_schema::limits::MAX_BATCH_PACKETS + 1;
    let mut wire = Vec::new();
    for _ in 0..frames {
        wire.extend_from_slice(&header);
        wire.extend_from_slice(&body);
    }
    raw.write_all(&wire).unwrap();
    match recv_broker(&mut p) {
        NetstackToBroker::LeaseDropped { lease: l, .. } => assert_eq!(l, lease.id),
        other => panic!("expected LeaseDropped, got {other:?}"),
    }
    assert!(p.child.try_wait().unwrap().is_none(), "the netstack died");
}
