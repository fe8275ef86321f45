//! Measurement bench of the netstack alone (no IPC, no encryption): packets go in
//! through `push_packets` and out through `drain_outbound`, the "laptop" is a
//! smoltcp client in the same thread, the servers are on loopback in a child
//! process (so the file descriptors of 10,000 flows and of their 10,000 server
//! ends do not share one process's limit).
//!
//! ```text
//! cargo bench -p netstack --bench flows -- [--mtu N] [--mib N] [--flows N] [--only bulk|flows]
//!     [--buf MAX] [--init INITIAL] [--loss N]
//! ```
//!
//! `--buf`/`--init` set the TCP buffers' largest and initial sizes, `--loss N` drops
//! every Nth packet towards the laptop (a lossy client path, as on the UDP transport).
//!
//! Prints, each as a figure and a ratio to a baseline measured in the same run:
//! - bulk download and upload of one TCP flow through the netstack, against the same
//!   bytes over a plain loopback TCP connection;
//! - the netstack's memory with N (default 10,000) open TCP flows (each has echoed 64
//!   bytes, so its buffers were used), as RSS of this process minus the RSS before;
//! - the download of one more flow beside those N flows, against the same download
//!   alone.
//!
//! Never asserted on: a measuring tool (the machine is shared, wall-clock is noisy).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a bench tool

use netstack::{Caps, Config, Egress, Netstack, PacketBatch};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    HardwareAddress, IpAddress, IpCidr, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket,
    TcpRepr, TcpSeqNumber,
};
use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vshp::lease::{Ipv4Prefix, Lease, LeaseId};

const CLIENT: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const SERVER_ENV: &str = "VPNSHARE_NETSTACK_BENCH_SERVER";
/// The laptop's port for the measured bulk flow (the idle flows use 10000..).
const BULK_PORT: u16 = 60_000;

fn main() {
    raise_nofile();
    if std::env::var_os(SERVER_ENV).is_some() {
        return serve();
    }
    let mut mtu: u16 = 1400;
    let mut mib: usize = 64;
    let mut flows: usize = 10_000;
    let mut only: Option<String> = None;
    let mut buf: Option<usize> = None;
    let mut loss: usize = 0;
    let mut init: Option<usize> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mtu" => mtu = args.next().and_then(|v| v.parse().ok()).expect("--mtu N"),
            "--mib" => mib = args.next().and_then(|v| v.parse().ok()).expect("--mib N"),
            "--flows" => flows = args.next().and_then(|v| v.parse().ok()).expect("--flows N"),
            "--only" => only = args.next(),
            "--buf" => buf = args.next().and_then(|v| v.parse().ok()),
            "--init" => init = args.next().and_then(|v| v.parse().ok()),
            // Drop every Nth packet towards the laptop (a lossy client path).
            "--loss" => loss = args.next().and_then(|v| v.parse().ok()).expect("--loss N"),
            _ => {} // cargo bench passes --bench
        }
    }
    let server = Server::spawn();
    let bytes = mib * 1024 * 1024;
    println!("netstack bench: MTU {mtu}, {mib} MiB per transfer, {flows} flows");
    if only.as_deref() != Some("flows") {
        let base_down = plain_loopback(server.addr, bytes, true);
        let base_up = plain_loopback(server.addr, bytes, false);
        let mut ns = Bench::new(mtu, flows, buf, init);
        ns.loss = loss;
        let down = ns.bulk(server.addr, bytes, true);
        let up = ns.bulk(server.addr, bytes, false);
        report("bulk download", down, base_down, "plain loopback TCP");
        report("bulk upload", up, base_up, "plain loopback TCP");
    }
    if only.as_deref() != Some("bulk") {
        let mut ns = Bench::new(mtu, flows, buf, init);
        let alone = ns.bulk(server.addr, bytes, true);
        let before = rss_kib();
        let t = Instant::now();
        ns.open_idle_flows(server.addr, flows);
        let opened = t.elapsed();
        let after = rss_kib();
        let c = ns.ns.counters();
        println!(
            "{flows} flows opened in {:.2} s ({:.0}/s), netstack counts {} TCP flows",
            opened.as_secs_f64(),
            flows as f64 / opened.as_secs_f64(),
            c.tcp_flows
        );
        let grown = after.saturating_sub(before);
        println!(
            "RSS {} KiB before, {} KiB after: {} KiB for {flows} flows = {:.1} KiB per flow",
            before,
            after,
            grown,
            grown as f64 / flows.max(1) as f64
        );
        let beside = ns.bulk(server.addr, bytes, true);
        report(
            "download beside the flows",
            beside,
            alone,
            "the same download alone",
        );
    }
}

fn report(what: &str, got: Duration, base: Duration, base_name: &str) {
    println!(
        "{what}: {:.2} s, ratio {:.2} of {base_name} ({:.2} s)",
        got.as_secs_f64(),
        base.as_secs_f64() / got.as_secs_f64(),
        base.as_secs_f64()
    );
}

fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

// ------------------------------------------------------------------ the server

/// The loopback server, in a child process. A connection's first byte says what to
/// do: `e` echo, `d` + 8-byte length: send that many bytes and close, `u`: read to
/// EOF, then answer the count (8 bytes) and close.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn spawn() -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(SERVER_ENV, "1")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line.trim().parse().unwrap();
        Self { child, addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    println!("{}", l.local_addr().unwrap());
    std::io::stdout().flush().unwrap();
    // One thread per connection is fine for bulk; idle echo connections park in
    // a small thread with a tiny stack.
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        let _ = s.set_nodelay(true);
        std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                let mut what = [0u8; 1];
                if s.read_exact(&mut what).is_err() {
                    return;
                }
                match what[0] {
                    b'e' => {
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 || s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                    b'd' => {
                        let mut len = [0u8; 8];
                        if s.read_exact(&mut len).is_err() {
                            return;
                        }
                        let mut left = u64::from_le_bytes(len) as usize;
                        let buf = vec![0x5a; 256 * 1024];
                        while left > 0 {
                            let n = left.min(buf.len());
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                            left -= n;
                        }
                    }
                    b'u' => {
                        let mut buf = vec![0; 256 * 1024];
                        let mut total = 0u64;
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            total += n as u64;
                        }
                        let _ = s.write_all(&total.to_le_bytes());
                    }
                    _ => {}
                }
            })
            .ok();
    }
}

/// The same transfer over a plain loopback connection.
fn plain_loopback(server: SocketAddr, bytes: usize, download: bool) -> Duration {
    let t = Instant::now();
    let mut s = TcpStream::connect(server).unwrap();
    if download {
        s.write_all(b"d").unwrap();
        s.write_all(&(bytes as u64).to_le_bytes()).unwrap();
        let mut buf = vec![0; 256 * 1024];
        let mut got = 0;
        while got < bytes {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            got += n;
        }
    } else {
        s.write_all(b"u").unwrap();
        let buf = vec![0x5a; 256 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len());
            s.write_all(&buf[..n]).unwrap();
            left -= n;
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut count = [0u8; 8];
        s.read_exact(&mut count).unwrap();
        assert_eq!(u64::from_le_bytes(count) as usize, bytes);
    }
    t.elapsed()
}

// ------------------------------------------------------------------ the laptop

#[derive(Default)]
struct Dev {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    pool: Vec<Vec<u8>>,
    mtu: usize,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>, &'a mut Vec<Vec<u8>>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = self.1.pop().unwrap_or_default();
        buf.clear();
        buf.resize(len, 0);
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl phy::Device for Dev {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;
    fn receive(&mut self, _: SmolInstant) -> Option<(Rx, Tx<'_>)> {
        let p = self.rx.pop_front()?;
        Some((Rx(p), Tx(&mut self.tx, &mut self.pool)))
    }
    fn transmit(&mut self, _: SmolInstant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx, &mut self.pool))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = self.mtu;
        c
    }
}

/// A raw client flow (no smoltcp): SYN, then 64 bytes, then only ACKs.
struct RawFlow {
    snd_nxt: u32,
    rcv_nxt: u32,
    established: bool,
    echoed: usize,
}

struct Bench {
    ns: Netstack,
    lease: Lease,
    epoch: Instant,
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: Dev,
    batch: PacketBatch,
    raw: HashMap<u16, RawFlow>,
    raw_done: usize,
    loss: usize,
    seen: usize,
}

impl Bench {
    fn new(mtu: u16, flows: usize, buf: Option<usize>, init: Option<usize>) -> Self {
        let mut config = Config {
            egress: Egress::Any,
            caps: Caps {
                max_tcp_flows: flows + 16,
                max_pending_connects: 256,
                max_total_flows: flows + 16,
                max_buffer_bytes: usize::MAX,
                ..Caps::default()
            },
            ..Config::default()
        };
        if let Some(b) = buf {
            config.tcp_buffer_size = b;
        }
        if let Some(b) = init {
            config.tcp_buffer_initial = b;
        }
        let mut ns = Netstack::new(config).unwrap();
        let lease = Lease {
            id: LeaseId(1),
            ipv4: Ipv4Prefix {
                addr: CLIENT,
                len: 24,
            },
            ipv6: None,
            dns: vec![IpAddr::V4(GATEWAY)],
            mtu,
            routes: Vec::new(),
            expires_at_unix: u64::MAX,
        };
        ns.add_lease(&lease).unwrap();
        let mut dev = Dev {
            mtu: usize::from(mtu),
            ..Dev::default()
        };
        let mut iface = Interface::new(
            IfaceConfig::new(HardwareAddress::Ip),
            &mut dev,
            SmolInstant::from_micros(0),
        );
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::Ipv4(CLIENT), 24)).unwrap();
        });
        iface.routes_mut().add_default_ipv4_route(GATEWAY).unwrap();
        Self {
            ns,
            lease,
            epoch: Instant::now(),
            iface,
            sockets: SocketSet::new(Vec::new()),
            dev,
            batch: PacketBatch::new(),
            raw: HashMap::new(),
            raw_done: 0,
            loss: 0,
            seen: 0,
        }
    }

    fn smol_now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// One round: laptop → netstack, netstack poll, netstack → laptop. Returns
    /// whether any packet moved, and the netstack's next deadline.
    fn step(&mut self) -> (bool, Option<Instant>) {
        let now = self.smol_now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        let mut moved = !self.dev.tx.is_empty();
        let out: Vec<Vec<u8>> = self.dev.tx.drain(..).collect();
        self.ns
            .push_packets(self.lease.id, out.iter().map(Vec::as_slice));
        self.dev.pool.extend(out);
        let next = self.ns.poll(Instant::now());
        self.batch.clear();
        while self
            .ns
            .drain_outbound(self.lease.id, &mut self.batch, 256 * 1024)
            > 0
        {
            moved = true;
            let mut replies = Vec::new();
            for p in self.batch.iter() {
                let to_port = TcpPacket::new_checked(Ipv4Packet::new_unchecked(p).payload())
                    .map(|t| t.dst_port())
                    .unwrap_or(0);
                if self.raw.contains_key(&to_port) {
                    if let Some(r) = raw_answer(&mut self.raw, p, &mut self.raw_done) {
                        replies.push(r);
                    }
                } else {
                    self.seen += 1;
                    if self.loss > 0 && self.seen % self.loss == 0 {
                        continue;
                    }
                    let mut b = self.dev.pool.pop().unwrap_or_default();
                    b.clear();
                    b.extend_from_slice(p);
                    self.dev.rx.push_back(b);
                }
            }
            self.batch.clear();
            self.ns
                .push_packets(self.lease.id, replies.iter().map(Vec::as_slice));
            let _ = self.ns.poll(Instant::now());
        }
        let now = self.smol_now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        (moved, next)
    }

    /// Waits for the netstack's OS sockets or its next timer when nothing moved.
    fn idle(&mut self, next: Option<Instant>) {
        let laptop = self
            .iface
            .poll_delay(self.smol_now(), &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()));
        let ns = next.map(|t| t.saturating_duration_since(Instant::now()));
        let wait = match (laptop, ns) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(Duration::from_millis(50)),
        };
        self.ns
            .wait(Some(wait.min(Duration::from_millis(50))))
            .unwrap();
    }

    fn bulk(&mut self, server: SocketAddr, bytes: usize, download: bool) -> Duration {
        let buf = 4 * 1024 * 1024;
        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; buf]),
            tcp::SocketBuffer::new(vec![0; buf]),
        );
        sock.set_nagle_enabled(false);
        let cx = self.iface.context();
        sock.connect(
            cx,
            (IpAddress::Ipv4(*server_v4(server)), server.port()),
            BULK_PORT,
        )
        .unwrap();
        let h: SocketHandle = self.sockets.add(sock);
        let c0 = self.ns.counters();
        let t = Instant::now();
        let mut header = Vec::new();
        header.push(if download { b'd' } else { b'u' });
        if download {
            header.extend_from_slice(&(bytes as u64).to_le_bytes());
        }
        let mut header_sent = 0;
        let mut sent = 0usize;
        let mut got = 0usize;
        let mut count = Vec::new();
        loop {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            if s.may_send() && header_sent < header.len() {
                header_sent += s.send_slice(&header[header_sent..]).unwrap();
            }
            if !download && header_sent == header.len() && s.may_send() {
                while sent < bytes && s.can_send() {
                    let n = s
                        .send(|b| {
                            let n = b.len().min(bytes - sent);
                            b[..n].fill(0x5a);
                            (n, n)
                        })
                        .unwrap();
                    sent += n;
                    if n == 0 {
                        break;
                    }
                }
                if sent == bytes {
                    s.close();
                }
            }
            while s.can_recv() {
                let n = s
                    .recv(|b| {
                        if !download {
                            count.extend_from_slice(b);
                        }
                        (b.len(), b.len())
                    })
                    .unwrap();
                got += n;
            }
            if download && got >= bytes {
                break;
            }
            if !download && count.len() >= 8 {
                assert_eq!(
                    u64::from_le_bytes(count[..8].try_into().unwrap()) as usize,
                    bytes
                );
                break;
            }
            if !s.is_open() && !s.can_recv() {
                panic!("bulk flow closed early: {got} of {bytes}");
            }
            let (moved, next) = self.step();
            if !moved {
                self.idle(next);
            }
        }
        let took = t.elapsed();
        let c = self.ns.counters();
        println!(
            "  ({} {} bytes: {} packets in, {} out, {} buffer grows)",
            if download { "download" } else { "upload" },
            bytes,
            c.packets_in - c0.packets_in,
            c.packets_out - c0.packets_out,
            c.tcp_buffer_grows - c0.tcp_buffer_grows,
        );
        self.sockets.get_mut::<tcp::Socket>(h).abort();
        for _ in 0..4 {
            self.step();
        }
        self.sockets.remove(h);
        took
    }

    /// Opens `n` flows with raw packets (at most 64 unfinished at a time), each
    /// echoing 64 bytes through the server, and leaves them open.
    fn open_idle_flows(&mut self, server: SocketAddr, n: usize) {
        let dst = *server_v4(server);
        let mut next_port: u16 = 10_000;
        let mut opened = 0;
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.raw_done < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} flows echoed",
                self.raw_done
            );
            while opened < n && opened - self.raw_done < 64 {
                let port = next_port;
                next_port += 1;
                let iss = 1000u32.wrapping_mul(u32::from(port));
                self.raw.insert(
                    port,
                    RawFlow {
                        snd_nxt: iss.wrapping_add(1),
                        rcv_nxt: 0,
                        established: false,
                        echoed: 0,
                    },
                );
                let syn = build_tcp(
                    CLIENT,
                    port,
                    dst,
                    server.port(),
                    iss,
                    None,
                    TcpControl::Syn,
                    &[],
                );
                self.ns
                    .push_packets(self.lease.id, std::iter::once(syn.as_slice()));
                opened += 1;
            }
            let (moved, next) = self.step();
            if !moved {
                self.idle(next);
            }
        }
    }
}

fn server_v4(a: SocketAddr) -> &'static Ipv4Addr {
    match a.ip() {
        IpAddr::V4(v) if v == Ipv4Addr::LOCALHOST => &Ipv4Addr::LOCALHOST,
        _ => panic!("loopback server"),
    }
}

/// A raw flow's answer to a netstack packet: ACK of the SYN-ACK plus `e` and 64
/// bytes; ACK of data. `echoed` counts the bytes received back (65 = done: the
/// mode byte is not echoed, 64 are).
fn raw_answer(raw: &mut HashMap<u16, RawFlow>, p: &[u8], done: &mut usize) -> Option<Vec<u8>> {
    let ip = Ipv4Packet::new_checked(p).ok()?;
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let t = TcpPacket::new_checked(ip.payload()).ok()?;
    let f = raw.get_mut(&t.dst_port())?;
    if t.rst() {
        panic!("flow {} reset by the netstack", t.dst_port());
    }
    if t.syn() && t.ack() && !f.established {
        f.established = true;
        f.rcv_nxt = t.seq_number().0.wrapping_add(1) as u32;
        let mut data = vec![b'e'];
        data.extend_from_slice(&[0x41; 64]);
        let seq = f.snd_nxt;
        f.snd_nxt = f.snd_nxt.wrapping_add(data.len() as u32);
        f.echoed = 1;
        return Some(build_tcp(
            dst,
            t.dst_port(),
            src,
            t.src_port(),
            seq,
            Some(f.rcv_nxt),
            TcpControl::Psh,
            &data,
        ));
    }
    let len = t.payload().len();
    if len > 0 && t.seq_number().0 as u32 == f.rcv_nxt {
        f.rcv_nxt = f.rcv_nxt.wrapping_add(len as u32);
        if f.echoed < 65 && f.echoed + len >= 65 {
            *done += 1;
        }
        f.echoed += len;
        return Some(build_tcp(
            dst,
            t.dst_port(),
            src,
            t.src_port(),
            f.snd_nxt,
            Some(f.rcv_nxt),
            TcpControl::None,
            &[],
        ));
    }
    None
}

#[allow(clippy::too_many_arguments)]
fn build_tcp(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    seq: u32,
    ack: Option<u32>,
    control: TcpControl,
    payload: &[u8],
) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: sport,
        dst_port: dport,
        control,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: 65_535,
        window_scale: None,
        max_seg_size: if control == TcpControl::Syn {
            Some(1360)
        } else {
            None
        },
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let mut buf = vec![0; ip.buffer_len() + tcp.buffer_len()];
    let caps = ChecksumCapabilities::default();
    let mut ipp = Ipv4Packet::new_unchecked(&mut buf[..]);
    ip.emit(&mut ipp, &caps);
    let mut tp = TcpPacket::new_unchecked(ipp.payload_mut());
    tcp.emit(&mut tp, &src.into(), &dst.into(), &caps);
    buf
}
