//! The `internet` namespace's servers, as plain threads of the process that built the
//! testbed. Their sockets are created by a thread that entered the namespace, so they
//! live there; the serving threads themselves need no namespace.
//!
//! - HTTP/1.1 (keep-alive, Content-Length only): `GET /file`, `GET /bytes/N`,
//!   `GET /health`, `POST|PUT /upload` (answers the body's sha256 in hex).
//! - DNS over UDP: A/AAAA for a fixed table of names, NXDOMAIN otherwise; counts queries.
//! - UDP echo.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use sha2::{Digest as _, Sha256};
use simple_dns::rdata::{A, AAAA, RData};
use simple_dns::{CLASS, Packet, PacketFlag, QTYPE, RCODE, ResourceRecord, TYPE};

use crate::content::{ContentStream, hex};
use crate::{Error, netns};

/// How often blocked server loops look at the stop flag.
const TICK: Duration = Duration::from_millis(100);
/// More simultaneous HTTP connections than this are closed at once.
const MAX_HTTP_CONNECTIONS: usize = 256;
/// Largest `/bytes/N`.
const MAX_BYTES_ENDPOINT: u64 = 4 << 30;

/// One DNS name the server answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsName {
    /// Lower case, without the trailing dot.
    pub name: String,
    /// The A answer.
    pub v4: std::net::Ipv4Addr,
    /// The AAAA answer.
    pub v6: std::net::Ipv6Addr,
}

/// Counters the servers keep.
#[derive(Debug, Default)]
pub(crate) struct ServerStats {
    pub dns_queries: AtomicU64,
    pub udp_echoes: AtomicU64,
    pub http_requests: AtomicU64,
}

pub(crate) struct ServerConfig {
    pub http: Vec<SocketAddr>,
    pub dns: Vec<SocketAddr>,
    pub echo: Vec<SocketAddr>,
    pub names: Vec<DnsName>,
    pub file: Arc<Vec<u8>>,
}

pub(crate) struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub stats: Arc<ServerStats>,
}

impl std::fmt::Debug for Servers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Servers")
            .field("threads", &self.threads.len())
            .field("stats", &self.stats)
            .finish()
    }
}

fn bind_err(what: &'static str, addr: SocketAddr) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io {
        what: format!("binding the {what} server on {addr}"),
        source,
    }
}

impl Servers {
    pub fn start(ns: &str, cfg: ServerConfig) -> Result<Self, Error> {
        let (tcp, dns, echo) = netns::in_netns(ns, || -> Result<_, Error> {
            let mut tcp = Vec::new();
            for a in &cfg.http {
                let l = TcpListener::bind(a).map_err(bind_err("HTTP", *a))?;
                l.set_nonblocking(true).map_err(bind_err("HTTP", *a))?;
                tcp.push(l);
            }
            let mut dns = Vec::new();
            for a in &cfg.dns {
                let s = UdpSocket::bind(a).map_err(bind_err("DNS", *a))?;
                s.set_read_timeout(Some(TICK))
                    .map_err(bind_err("DNS", *a))?;
                dns.push(s);
            }
            let mut echo = Vec::new();
            for a in &cfg.echo {
                let s = UdpSocket::bind(a).map_err(bind_err("UDP echo", *a))?;
                s.set_read_timeout(Some(TICK))
                    .map_err(bind_err("UDP echo", *a))?;
                echo.push(s);
            }
            Ok((tcp, dns, echo))
        })??;

        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ServerStats::default());
        let names = Arc::new(cfg.names);
        let mut servers = Servers {
            stop: Arc::clone(&stop),
            threads: Vec::new(),
            stats: Arc::clone(&stats),
        };
        for l in tcp {
            let (stop, stats, file) =
                (Arc::clone(&stop), Arc::clone(&stats), Arc::clone(&cfg.file));
            servers.spawn("tb-http", move || {
                http_accept_loop(&l, &stop, &stats, &file)
            })?;
        }
        for s in dns {
            let (stop, stats, names) = (Arc::clone(&stop), Arc::clone(&stats), Arc::clone(&names));
            servers.spawn("tb-dns", move || dns_loop(&s, &stop, &stats, &names))?;
        }
        for s in echo {
            let (stop, stats) = (Arc::clone(&stop), Arc::clone(&stats));
            servers.spawn("tb-echo", move || echo_loop(&s, &stop, &stats))?;
        }
        Ok(servers)
    }

    fn spawn(&mut self, name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), Error> {
        let h = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(f)
            .map_err(|source| Error::Io {
                what: "spawning a server thread".into(),
                source,
            })?;
        self.threads.push(h);
        Ok(())
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------- UDP echo

fn echo_loop(s: &UdpSocket, stop: &AtomicBool, stats: &ServerStats) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        match s.recv_from(&mut buf) {
            Ok((n, from)) => {
                stats.udp_echoes.fetch_add(1, Ordering::Relaxed);
                let _ = s.send_to(&buf[..n], from);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => {
                tracing::debug!(error = %e, "udp echo recv");
                std::thread::sleep(TICK);
            }
        }
    }
}

// ---------------------------------------------------------------- DNS

fn dns_loop(s: &UdpSocket, stop: &AtomicBool, stats: &ServerStats, names: &[DnsName]) {
    let mut buf = vec![0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match s.recv_from(&mut buf) {
            Ok((n, from)) => {
                stats.dns_queries.fetch_add(1, Ordering::Relaxed);
                if let Some(reply) = dns_answer(&buf[..n], names) {
                    let _ = s.send_to(&reply, from);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => {
                tracing::debug!(error = %e, "dns recv");
                std::thread::sleep(TICK);
            }
        }
    }
}

/// The reply to one DNS query, or `None` for input that is not a query.
pub(crate) fn dns_answer(query: &[u8], names: &[DnsName]) -> Option<Vec<u8>> {
    let q = Packet::parse(query).ok()?;
    if q.has_flags(PacketFlag::RESPONSE) {
        return None;
    }
    let mut reply = Packet::new_reply(q.id());
    reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER);
    if q.has_flags(PacketFlag::RECURSION_DESIRED) {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    let mut known_all = true;
    for question in &q.questions {
        reply.questions.push(question.clone());
        let asked = question
            .qname
            .to_string()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let Some(entry) = names.iter().find(|n| n.name == asked) else {
            known_all = false;
            continue;
        };
        let rdata = match question.qtype {
            QTYPE::TYPE(TYPE::A) => Some(RData::A(A {
                address: u32::from(entry.v4),
            })),
            QTYPE::TYPE(TYPE::AAAA) => Some(RData::AAAA(AAAA {
                address: u128::from(entry.v6),
            })),
            _ => None,
        };
        if let Some(rdata) = rdata {
            reply.answers.push(ResourceRecord::new(
                question.qname.clone(),
                CLASS::IN,
                60,
                rdata,
            ));
        }
    }
    if !known_all {
        *reply.rcode_mut() = RCODE::NameError;
    }
    reply.build_bytes_vec().ok()
}

// ---------------------------------------------------------------- HTTP

fn http_accept_loop(
    l: &TcpListener,
    stop: &Arc<AtomicBool>,
    stats: &Arc<ServerStats>,
    file: &Arc<Vec<u8>>,
) {
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(l.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(100u16)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(_) => {
                std::thread::sleep(TICK);
                continue;
            }
        }
        let stream = match l.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::debug!(error = %e, "http accept");
                continue;
            }
        };
        if active.load(Ordering::Relaxed) >= MAX_HTTP_CONNECTIONS {
            let _ = stream.shutdown(Shutdown::Both);
            continue;
        }
        active.fetch_add(1, Ordering::Relaxed);
        let (stop, stats, file, active2) = (
            Arc::clone(stop),
            Arc::clone(stats),
            Arc::clone(file),
            Arc::clone(&active),
        );
        let spawned = std::thread::Builder::new()
            .name("tb-http-conn".into())
            .spawn(move || {
                if let Err(e) = http_connection(stream, &stop, &stats, &file) {
                    tracing::debug!(error = %e, "http connection ended");
                }
                active2.fetch_sub(1, Ordering::Relaxed);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Reads into `buf`, retrying timeouts until the stop flag is set.
fn read_some(s: &mut TcpStream, buf: &mut [u8], stop: &AtomicBool) -> std::io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stop.load(Ordering::Relaxed) {
                    return Err(ErrorKind::Interrupted.into());
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

struct Request {
    method: String,
    path: String,
    content_length: Option<u64>,
    close: bool,
    expect_continue: bool,
}

fn parse_head(head: &str) -> Option<Request> {
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_owned();
    let path = first.next()?.to_owned();
    let version = first.next()?;
    let mut req = Request {
        method,
        path,
        content_length: None,
        close: version != "HTTP/1.1",
        expect_continue: false,
    };
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        match k.as_str() {
            "content-length" => req.content_length = v.parse().ok(),
            "connection" => {
                let v = v.to_ascii_lowercase();
                if v.contains("close") {
                    req.close = true;
                } else if v.contains("keep-alive") {
                    req.close = false;
                }
            }
            "expect" => req.expect_continue = v.eq_ignore_ascii_case("100-continue"),
            "transfer-encoding" => req.content_length = None,
            _ => {}
        }
    }
    Some(req)
}

fn respond(s: &mut TcpStream, status: &str, body: &[u8], close: bool) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: {}\r\n\r\n",
        body.len(),
        if close { "close" } else { "keep-alive" }
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)
}

fn http_connection(
    mut s: TcpStream,
    stop: &AtomicBool,
    stats: &ServerStats,
    file: &[u8],
) -> std::io::Result<()> {
    s.set_read_timeout(Some(TICK))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 64 * 1024];
    let mut have = 0usize;
    loop {
        // Read one request head.
        let head_end = loop {
            if let Some(i) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if have >= 16 * 1024 {
                return respond(&mut s, "431 Request Header Fields Too Large", b"", true);
            }
            let n = read_some(&mut s, &mut buf[have..], stop)?;
            if n == 0 {
                return Ok(());
            }
            have += n;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let leftover = buf[head_end + 4..have].to_vec();
        stats.http_requests.fetch_add(1, Ordering::Relaxed);
        let Some(req) = parse_head(&head) else {
            return respond(&mut s, "400 Bad Request", b"", true);
        };
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/health") => respond(&mut s, "200 OK", b"ok\n", req.close)?,
            ("GET", "/file") => respond(&mut s, "200 OK", file, req.close)?,
            ("GET", p) if p.starts_with("/bytes/") => match p["/bytes/".len()..].parse::<u64>() {
                Ok(n) if n <= MAX_BYTES_ENDPOINT => send_stream(&mut s, n, req.close)?,
                _ => respond(&mut s, "400 Bad Request", b"", req.close)?,
            },
            ("POST" | "PUT", "/upload") => {
                let Some(len) = req.content_length else {
                    return respond(&mut s, "411 Length Required", b"", true);
                };
                if req.expect_continue {
                    s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
                }
                let mut hasher = Sha256::new();
                let mut left = len;
                let take = usize::try_from(left.min(leftover.len() as u64)).unwrap_or(0);
                hasher.update(&leftover[..take]);
                left -= take as u64;
                // Bytes past the body in `leftover` start the next request.
                let rest = leftover[take..].to_vec();
                while left > 0 {
                    let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
                    let n = read_some(&mut s, &mut buf[..want], stop)?;
                    if n == 0 {
                        return Ok(());
                    }
                    hasher.update(&buf[..n]);
                    left -= n as u64;
                }
                let body = hex(&hasher.finalize()) + "\n";
                respond(&mut s, "200 OK", body.as_bytes(), req.close)?;
                buf[..rest.len()].copy_from_slice(&rest);
                have = rest.len();
                if req.close {
                    return Ok(());
                }
                continue;
            }
            _ => respond(&mut s, "404 Not Found", b"", req.close)?,
        }
        if req.close {
            let _ = s.shutdown(Shutdown::Write);
            return Ok(());
        }
        if leftover.len() > buf.len() {
            return Ok(());
        }
        buf[..leftover.len()].copy_from_slice(&leftover);
        have = leftover.len();
    }
}

fn send_stream(s: &mut TcpStream, n: u64, close: bool) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nContent-Type: application/octet-stream\r\nConnection: {}\r\n\r\n",
        if close { "close" } else { "keep-alive" }
    );
    s.write_all(head.as_bytes())?;
    let mut stream = ContentStream::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let k = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
        stream.fill(&mut chunk[..k]);
        s.write_all(&chunk[..k])?;
        left -= k as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use simple_dns::{Name, Question};

    fn names() -> Vec<DnsName> {
        vec![DnsName {
            name: "files.vpnshare.test".into(),
            v4: "198.18.0.10".parse().unwrap(),
            v6: "fd00:18::10".parse().unwrap(),
        }]
    }

    fn query(name: &str, t: TYPE) -> Vec<u8> {
        let mut q = Packet::new_query(7);
        q.questions.push(Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(t),
            simple_dns::QCLASS::CLASS(CLASS::IN),
            false,
        ));
        q.build_bytes_vec().unwrap()
    }

    #[test]
    fn dns_answers_a_aaaa_and_nxdomain() {
        let r = dns_answer(&query("Files.VPNShare.test", TYPE::A), &names()).unwrap();
        let p = Packet::parse(&r).unwrap();
        assert_eq!(p.id(), 7);
        assert_eq!(p.answers.len(), 1);
        assert!(
            matches!(p.answers[0].rdata, RData::A(A { address }) if address == u32::from(std::net::Ipv4Addr::new(198, 18, 0, 10)))
        );
        let r = dns_answer(&query("files.vpnshare.test", TYPE::AAAA), &names()).unwrap();
        assert_eq!(Packet::parse(&r).unwrap().answers.len(), 1);
        let r = dns_answer(&query("nope.vpnshare.test", TYPE::A), &names()).unwrap();
        assert_eq!(Packet::parse(&r).unwrap().rcode(), RCODE::NameError);
        assert!(dns_answer(b"\x00\x01garbage", &names()).is_none());
    }

    #[test]
    fn http_head_parsing() {
        let r = parse_head("POST /upload HTTP/1.1\r\nContent-Length: 12\r\nExpect: 100-continue")
            .unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/upload"));
        assert_eq!(r.content_length, Some(12));
        assert!(r.expect_continue && !r.close);
        let r = parse_head("GET /file HTTP/1.0").unwrap();
        assert!(r.close);
    }
}
