//! Small blocking clients for the testbed's servers, on std sockets only. Call them
//! through [`crate::Testbed::in_ns`] so their sockets are created in the namespace
//! whose routes they should use.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use simple_dns::rdata::RData;
use simple_dns::{CLASS, Name, Packet, PacketFlag, QCLASS, QTYPE, Question, RCODE, TYPE};

/// Errors of the test clients.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A socket call failed (connect refused, unreachable, timeout...).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The peer answered something this client does not understand.
    #[error("bad answer: {0}")]
    BadAnswer(String),
}

impl ClientError {
    /// The kind of the underlying OS error, if any.
    pub fn io_kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Io { source, .. } => Some(source.kind()),
            ClientError::BadAnswer(_) => None,
        }
    }

    /// The raw OS error number (e.g. `ENETUNREACH`), if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            ClientError::Io { source, .. } => source.raw_os_error(),
            ClientError::BadAnswer(_) => None,
        }
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> ClientError {
    move |source| ClientError::Io { what, source }
}

/// What an HTTP request got back. The body is summarised, not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Body length in bytes.
    pub len: u64,
    /// sha256 of the body.
    pub sha256: [u8; 32],
    /// The body's first bytes (up to 4 KiB), for small text answers.
    pub head: Vec<u8>,
}

impl HttpResponse {
    /// The kept start of the body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.head).into_owned()
    }
}

/// `GET path` on `addr` (one request, `Connection: close`), hashing the body as it
/// arrives.
pub fn http_get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<HttpResponse, ClientError> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    http_exchange(addr, req.as_bytes(), &[], timeout, &mut |_| {})
}

/// [`http_get`] on one connection that calls `progress(body bytes so far)` after each
/// read; `progress` may block (pause the reader) to place an event mid-transfer.
pub fn http_get_paced(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    progress: &mut dyn FnMut(u64),
) -> Result<HttpResponse, ClientError> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    http_exchange(addr, req.as_bytes(), &[], timeout, progress)
}

/// `POST /upload` of `body`; the server answers the sha256 it computed, in hex.
pub fn http_upload(
    addr: SocketAddr,
    body: &[u8],
    timeout: Duration,
) -> Result<HttpResponse, ClientError> {
    let req = format!(
        "POST /upload HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    http_exchange(addr, req.as_bytes(), body, timeout, &mut |_| {})
}

fn http_exchange(
    addr: SocketAddr,
    head: &[u8],
    body: &[u8],
    timeout: Duration,
    progress: &mut dyn FnMut(u64),
) -> Result<HttpResponse, ClientError> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(io("connect"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(io("set timeout"))?;
    s.set_write_timeout(Some(timeout))
        .map_err(io("set timeout"))?;
    s.write_all(head).map_err(io("send request"))?;
    s.write_all(body).map_err(io("send body"))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut have = 0usize;
    let head_end = loop {
        if let Some(i) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if have == buf.len() {
            return Err(ClientError::BadAnswer("response head too long".into()));
        }
        let n = s.read(&mut buf[have..]).map_err(io("read response"))?;
        if n == 0 {
            return Err(ClientError::BadAnswer(
                "connection closed before the head".into(),
            ));
        }
        have += n;
    };
    let head_text = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head_text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| ClientError::BadAnswer(format!("status line: {head_text:?}")))?;
    let content_length = head_text.split("\r\n").skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<u64>().ok())
            .flatten()
    });
    let mut hasher = Sha256::new();
    let mut kept = Vec::new();
    let mut len = 0u64;
    let mut take = |chunk: &[u8], len: &mut u64| {
        hasher.update(chunk);
        let room = 4096usize.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..room.min(chunk.len())]);
        *len += chunk.len() as u64;
    };
    take(&buf[head_end + 4..have], &mut len);
    loop {
        if content_length.is_some_and(|cl| len >= cl) {
            break;
        }
        let n = s.read(&mut buf).map_err(io("read body"))?;
        if n == 0 {
            break;
        }
        take(&buf[..n], &mut len);
        progress(len);
    }
    if let Some(cl) = content_length {
        if len != cl {
            return Err(ClientError::BadAnswer(format!(
                "body of {len} bytes, Content-Length {cl}"
            )));
        }
    }
    Ok(HttpResponse {
        status,
        len,
        sha256: hasher.finalize().into(),
        head: kept,
    })
}

/// The DNS record type to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsType {
    /// IPv4 address.
    A,
    /// IPv6 address.
    Aaaa,
}

/// What a DNS server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsAnswer {
    /// The response code (0 NOERROR, 3 NXDOMAIN, ...).
    pub rcode: u16,
    /// The addresses in the answer section.
    pub addrs: Vec<IpAddr>,
}

/// One UDP DNS query for `name`.
pub fn dns_query(
    server: SocketAddr,
    name: &str,
    t: DnsType,
    timeout: Duration,
) -> Result<DnsAnswer, ClientError> {
    let id = u16::try_from(std::process::id() & 0xffff).unwrap_or(1);
    let mut q = Packet::new_query(id);
    q.set_flags(PacketFlag::RECURSION_DESIRED);
    let qname =
        Name::new(name).map_err(|e| ClientError::BadAnswer(format!("name {name:?}: {e}")))?;
    let qtype = match t {
        DnsType::A => TYPE::A,
        DnsType::Aaaa => TYPE::AAAA,
    };
    q.questions.push(Question::new(
        qname,
        QTYPE::TYPE(qtype),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    let bytes = q
        .build_bytes_vec()
        .map_err(|e| ClientError::BadAnswer(format!("building query: {e}")))?;
    let reply = udp_exchange(server, &bytes, timeout)?;
    let p = Packet::parse(&reply).map_err(|e| ClientError::BadAnswer(format!("dns reply: {e}")))?;
    if p.id() != id {
        return Err(ClientError::BadAnswer("dns reply id mismatch".into()));
    }
    let rcode = match p.rcode() {
        RCODE::NoError => 0,
        RCODE::FormatError => 1,
        RCODE::ServerFailure => 2,
        RCODE::NameError => 3,
        RCODE::NotImplemented => 4,
        RCODE::Refused => 5,
        _ => 255,
    };
    let addrs = p
        .answers
        .iter()
        .filter_map(|rr| match &rr.rdata {
            RData::A(a) => Some(IpAddr::from(std::net::Ipv4Addr::from(a.address))),
            RData::AAAA(a) => Some(IpAddr::from(std::net::Ipv6Addr::from(a.address))),
            _ => None,
        })
        .collect();
    Ok(DnsAnswer { rcode, addrs })
}

/// Sends `payload` to a UDP echo server and returns what came back.
pub fn udp_echo(
    server: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, ClientError> {
    udp_exchange(server, payload, timeout)
}

fn udp_exchange(
    server: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, ClientError> {
    let bind: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(bind).map_err(io("bind udp"))?;
    s.connect(server).map_err(io("connect udp"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(io("set timeout"))?;
    s.send(payload).map_err(io("send udp"))?;
    let mut buf = vec![0u8; 65536];
    let n = s.recv(&mut buf).map_err(io("receive udp"))?;
    buf.truncate(n);
    Ok(buf)
}

/// Sends one ICMP echo request to `ip` from an unprivileged ICMP ("ping") socket and
/// waits for the matching reply (the testbed allows ping sockets for every group in
/// every namespace).
pub fn icmp_echo(ip: IpAddr, payload: &[u8], timeout: Duration) -> Result<(), ClientError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
    let (family, proto, request, reply) = match ip {
        IpAddr::V4(_) => (AddressFamily::Inet, SockProtocol::Icmp, 8u8, 0u8),
        IpAddr::V6(_) => (AddressFamily::Inet6, SockProtocol::IcmpV6, 128u8, 129u8),
    };
    let fd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, proto).map_err(|e| {
        ClientError::Io {
            what: "open ping socket",
            source: e.into(),
        }
    })?;
    // A ping socket is a datagram socket: std's UDP calls (sendto/recv) fit it.
    let s = UdpSocket::from(fd);
    s.set_read_timeout(Some(timeout))
        .map_err(io("set timeout"))?;
    // type, code, checksum (the kernel fills it in), identifier (the kernel sets it to
    // the socket's "port"), sequence.
    let mut msg = vec![request, 0, 0, 0, 0, 0, 0, 1];
    msg.extend_from_slice(payload);
    s.send_to(&msg, SocketAddr::new(ip, 0))
        .map_err(io("send icmp echo"))?;
    let mut buf = vec![0u8; 65536];
    loop {
        let n = s.recv(&mut buf).map_err(io("receive icmp echo reply"))?;
        if n >= 8 && buf[0] == reply && buf[6..8] == [0, 1] && buf[8..n] == *payload {
            return Ok(());
        }
    }
}

/// Opens a TCP connection and closes it: `Ok` when something listens.
pub fn tcp_connect(addr: SocketAddr, timeout: Duration) -> Result<(), ClientError> {
    TcpStream::connect_timeout(&addr, timeout)
        .map(drop)
        .map_err(io("connect"))
}
