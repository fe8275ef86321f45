//! Inner messages: the plaintext of DATA records and of Noise handshake payloads.
//!
//! A payload is a sequence of messages, each `type: u8, length: u16 BE, body`. Readers
//! borrow from the payload (IP packets are never copied out); writers fill a
//! caller-owned buffer. Types 0x80 and above are optional extensions that a reader
//! skips when it does not know them; an unknown type below 0x80 is a protocol error.

use crate::lease::{
    Ipv4Prefix, Ipv6Prefix, Lease, LeaseError, LeaseId, MAX_LEASE_DNS, MAX_LEASE_ROUTES, Route,
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Length of a message header (type and length).
pub const MESSAGE_HEADER_LEN: usize = 3;
/// Longest device name in AUTH, in bytes of UTF-8.
pub const MAX_DEVICE_NAME: usize = 64;
/// Longest detail text in ERROR, in bytes of UTF-8.
pub const MAX_ERROR_DETAIL: usize = 128;
/// Longest resume ticket in RESUME.
pub const MAX_TICKET_LEN: usize = 512;
/// Length of the per-packet length prefix inside IP_PACKET.
pub const PACKET_PREFIX_LEN: usize = 2;

/// Message type codes.
pub mod kind {
    pub const HELLO: u8 = 0x01;
    pub const AUTH: u8 = 0x02;
    pub const CONFIG: u8 = 0x03;
    pub const CONFIG_DELTA: u8 = 0x04;
    pub const IP_PACKET: u8 = 0x05;
    pub const PING: u8 = 0x06;
    pub const PONG: u8 = 0x07;
    pub const RESUME: u8 = 0x08;
    pub const CLOSE: u8 = 0x09;
    pub const ERROR: u8 = 0x0A;
    pub const TICKET: u8 = 0x0B;
    /// Types from here on are optional: unknown ones are skipped.
    pub const FIRST_OPTIONAL: u8 = 0x80;
}

/// Why the gateway refuses or ends a session. Carried in ERROR messages and in
/// plaintext ERROR records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ErrorReason {
    NotApproved = 1,
    PendingApproval = 2,
    Revoked = 3,
    VpnUnavailable = 4,
    UnsupportedVersion = 5,
    Overloaded = 6,
    BadTicket = 7,
    ProtocolViolation = 8,
}

impl ErrorReason {
    /// The reason for a wire code, if it is one.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::NotApproved,
            2 => Self::PendingApproval,
            3 => Self::Revoked,
            4 => Self::VpnUnavailable,
            5 => Self::UnsupportedVersion,
            6 => Self::Overloaded,
            7 => Self::BadTicket,
            8 => Self::ProtocolViolation,
            _ => return None,
        })
    }

    /// A short text for users.
    pub fn describe(self) -> &'static str {
        match self {
            Self::NotApproved => "not approved on the gateway",
            Self::PendingApproval => "waiting for approval on the gateway",
            Self::Revoked => "this device was revoked on the gateway",
            Self::VpnUnavailable => "the gateway's VPN is not available",
            Self::UnsupportedVersion => "unsupported protocol version",
            Self::Overloaded => "the gateway is overloaded",
            Self::BadTicket => "the resume ticket was refused",
            Self::ProtocolViolation => "protocol violation",
        }
    }
}

/// Why a side closes a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CloseReason {
    /// The user ended the session.
    Normal = 0,
    /// The sender is shutting down.
    Shutdown = 1,
    /// The session was idle for too long.
    IdleTimeout = 2,
    /// A newer session of the same peer replaced this one.
    Replaced = 3,
}

impl CloseReason {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Normal,
            1 => Self::Shutdown,
            2 => Self::IdleTimeout,
            3 => Self::Replaced,
            _ => return None,
        })
    }
}

/// The client's platform, shown to the user who approves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Platform {
    Linux,
    Android,
    MacOs,
    Windows,
    Ios,
    /// Any other code: shown as "other", never an error.
    Other(u8),
}

impl Platform {
    fn to_u8(self) -> u8 {
        match self {
            Self::Linux => 0,
            Self::Android => 1,
            Self::MacOs => 2,
            Self::Windows => 3,
            Self::Ios => 4,
            Self::Other(b) => b,
        }
    }

    fn from_u8(b: u8) -> Self {
        match b {
            0 => Self::Linux,
            1 => Self::Android,
            2 => Self::MacOs,
            3 => Self::Windows,
            4 => Self::Ios,
            other => Self::Other(other),
        }
    }
}

/// Keepalive with the sender's counters (PING), echoed with the answerer's (PONG).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Keepalive {
    pub seq: u64,
    pub tx_packets: u64,
    pub rx_packets: u64,
}

/// What changed in a lease. Addresses never change within a session.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigDelta {
    pub dns: Option<Vec<IpAddr>>,
    pub mtu: Option<u16>,
    pub routes: Option<Vec<Route>>,
    pub expires_at_unix: Option<u64>,
}

impl ConfigDelta {
    /// What changed from `old` to `new` (addresses and id are not compared: they never
    /// change within a session). Empty ([`ConfigDelta::is_empty`]) when nothing did.
    pub fn between(old: &Lease, new: &Lease) -> Self {
        Self {
            dns: (old.dns != new.dns).then(|| new.dns.clone()),
            mtu: (old.mtu != new.mtu).then_some(new.mtu),
            routes: (old.routes != new.routes).then(|| new.routes.clone()),
            expires_at_unix: (old.expires_at_unix != new.expires_at_unix)
                .then_some(new.expires_at_unix),
        }
    }

    /// Whether the delta changes nothing.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// Applies the delta to `lease`; on error the lease is unchanged.
    pub fn apply(&self, lease: &mut Lease) -> Result<(), LeaseError> {
        let mut next = lease.clone();
        if let Some(dns) = &self.dns {
            next.dns.clone_from(dns);
        }
        if let Some(mtu) = self.mtu {
            next.mtu = mtu;
        }
        if let Some(routes) = &self.routes {
            next.routes.clone_from(routes);
        }
        if let Some(expiry) = self.expires_at_unix {
            next.expires_at_unix = expiry;
        }
        next.validate()?;
        *lease = next;
        Ok(())
    }
}

/// A batch of IP packets, borrowed from the payload. Iterating yields each packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketBatch<'a> {
    body: &'a [u8],
}

impl<'a> PacketBatch<'a> {
    /// The packets, in order. The body was checked when it was decoded.
    pub fn iter(&self) -> PacketIter<'a> {
        PacketIter { rest: self.body }
    }

    /// How many packets the batch holds.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Whether the batch holds no packets (never true for a decoded batch).
    pub fn is_empty(&self) -> bool {
        self.body.is_empty()
    }
}

impl<'a> IntoIterator for PacketBatch<'a> {
    type Item = &'a [u8];
    type IntoIter = PacketIter<'a>;
    fn into_iter(self) -> PacketIter<'a> {
        self.iter()
    }
}

/// Iterator over the packets of a [`PacketBatch`].
#[derive(Debug, Clone)]
pub struct PacketIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for PacketIter<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        // The batch was validated on decode, so a malformed tail cannot occur; ending
        // the iteration is still the safe answer if it did.
        let (len, rest) = self.rest.split_first_chunk::<PACKET_PREFIX_LEN>()?;
        let len = usize::from(u16::from_be_bytes(*len));
        let (packet, rest) = rest.split_at_checked(len)?;
        self.rest = rest;
        Some(packet)
    }
}

/// One decoded message, borrowing from the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Hello {
        capabilities: u32,
    },
    Auth {
        device_name: &'a str,
        platform: Platform,
    },
    Config(Lease),
    ConfigDelta(ConfigDelta),
    IpPacket(PacketBatch<'a>),
    Ping(Keepalive),
    Pong(Keepalive),
    Resume {
        ticket: &'a [u8],
    },
    /// A fresh resume ticket from the gateway, for the next RESUME.
    Ticket {
        ticket: &'a [u8],
    },
    Close(CloseReason),
    Error {
        reason: ErrorReason,
        detail: &'a str,
    },
}

/// Why a payload could not be read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("message header truncated")]
    TruncatedHeader,
    #[error("message type {kind:#04x} claims {len} bytes, {available} remain")]
    TruncatedBody {
        kind: u8,
        len: usize,
        available: usize,
    },
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    #[error("message type {kind:#04x} is malformed: {what}")]
    Malformed { kind: u8, what: &'static str },
    #[error("empty IP packet in a batch")]
    EmptyPacket,
    #[error("text field is not UTF-8")]
    NotUtf8,
    #[error("text or ticket longer than allowed")]
    TooLong,
    #[error("invalid lease: {0}")]
    Lease(#[from] LeaseError),
    #[error("the output buffer has no room for this message")]
    NoSpace,
}

/// Reads the messages of one payload in order. Stops at the first error.
#[derive(Debug, Clone)]
pub struct MessageReader<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> MessageReader<'a> {
    pub fn new(payload: &'a [u8]) -> Self {
        Self {
            rest: payload,
            failed: false,
        }
    }
}

impl<'a> Iterator for MessageReader<'a> {
    type Item = Result<Message<'a>, MessageError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.failed || self.rest.is_empty() {
                return None;
            }
            match split_message(self.rest) {
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
                Ok((kind, body, rest)) => {
                    self.rest = rest;
                    if kind >= kind::FIRST_OPTIONAL {
                        continue;
                    }
                    let decoded = decode_body(kind, body);
                    self.failed = decoded.is_err();
                    return Some(decoded);
                }
            }
        }
    }
}

fn split_message(buf: &[u8]) -> Result<(u8, &[u8], &[u8]), MessageError> {
    let (header, rest) = buf
        .split_first_chunk::<MESSAGE_HEADER_LEN>()
        .ok_or(MessageError::TruncatedHeader)?;
    let kind = header[0];
    let len = usize::from(u16::from_be_bytes([header[1], header[2]]));
    let (body, rest) = rest
        .split_at_checked(len)
        .ok_or(MessageError::TruncatedBody {
            kind,
            len,
            available: rest.len(),
        })?;
    Ok((kind, body, rest))
}

/// A cursor over a message body whose every read is checked.
struct Body<'a> {
    kind: u8,
    rest: &'a [u8],
}

impl<'a> Body<'a> {
    fn malformed(&self, what: &'static str) -> MessageError {
        MessageError::Malformed {
            kind: self.kind,
            what,
        }
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], MessageError> {
        let (head, rest) = self.rest.split_at_checked(n).ok_or(self.malformed(what))?;
        self.rest = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], MessageError> {
        let (head, rest) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or(self.malformed(what))?;
        self.rest = rest;
        Ok(*head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, MessageError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, MessageError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, MessageError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, MessageError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    fn text(&mut self, max: usize, what: &'static str) -> Result<&'a str, MessageError> {
        let len = usize::from(self.u8(what)?);
        if len > max {
            return Err(MessageError::TooLong);
        }
        std::str::from_utf8(self.bytes(len, what)?).map_err(|_| MessageError::NotUtf8)
    }

    fn ip(&mut self) -> Result<IpAddr, MessageError> {
        match self.u8("address family")? {
            4 => Ok(IpAddr::V4(Ipv4Addr::from(self.array::<4>("IPv4 address")?))),
            6 => Ok(IpAddr::V6(Ipv6Addr::from(
                self.array::<16>("IPv6 address")?,
            ))),
            _ => Err(self.malformed("address family is neither 4 nor 6")),
        }
    }

    fn dns_list(&mut self) -> Result<Vec<IpAddr>, MessageError> {
        let n = usize::from(self.u8("DNS count")?);
        if n > MAX_LEASE_DNS {
            return Err(LeaseError::TooManyDns(n).into());
        }
        let mut dns = Vec::with_capacity(n);
        for _ in 0..n {
            dns.push(self.ip()?);
        }
        Ok(dns)
    }

    fn route_list(&mut self) -> Result<Vec<Route>, MessageError> {
        let n = usize::from(self.u8("route count")?);
        if n > MAX_LEASE_ROUTES {
            return Err(LeaseError::TooManyRoutes(n).into());
        }
        let mut routes = Vec::with_capacity(n);
        for _ in 0..n {
            let route = match self.ip()? {
                IpAddr::V4(addr) => Route::V4(Ipv4Prefix {
                    addr,
                    len: self.u8("prefix length")?,
                }),
                IpAddr::V6(addr) => Route::V6(Ipv6Prefix {
                    addr,
                    len: self.u8("prefix length")?,
                }),
            };
            routes.push(route);
        }
        Ok(routes)
    }

    fn end(self) -> Result<(), MessageError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.malformed("trailing bytes"))
        }
    }
}

fn decode_body(kind: u8, body: &[u8]) -> Result<Message<'_>, MessageError> {
    let mut b = Body { kind, rest: body };
    let msg = match kind {
        kind::HELLO => Message::Hello {
            capabilities: b.u32("capabilities")?,
        },
        kind::AUTH => {
            let device_name = b.text(MAX_DEVICE_NAME, "device name")?;
            Message::Auth {
                device_name,
                platform: Platform::from_u8(b.u8("platform")?),
            }
        }
        kind::CONFIG => Message::Config(decode_lease(&mut b)?),
        kind::CONFIG_DELTA => Message::ConfigDelta(decode_delta(&mut b)?),
        kind::IP_PACKET => {
            check_batch(body)?;
            b.rest = &[];
            Message::IpPacket(PacketBatch { body })
        }
        kind::PING | kind::PONG => {
            let k = Keepalive {
                seq: b.u64("seq")?,
                tx_packets: b.u64("tx")?,
                rx_packets: b.u64("rx")?,
            };
            if kind == kind::PING {
                Message::Ping(k)
            } else {
                Message::Pong(k)
            }
        }
        kind::RESUME | kind::TICKET => {
            let len = usize::from(b.u16("ticket length")?);
            if len > MAX_TICKET_LEN {
                return Err(MessageError::TooLong);
            }
            let ticket = b.bytes(len, "ticket")?;
            if kind == kind::RESUME {
                Message::Resume { ticket }
            } else {
                Message::Ticket { ticket }
            }
        }
        kind::CLOSE => {
            let code = b.u8("close reason")?;
            Message::Close(CloseReason::from_u8(code).ok_or(b.malformed("unknown close reason"))?)
        }
        kind::ERROR => {
            let code = b.u8("error reason")?;
            let reason = ErrorReason::from_u8(code).ok_or(b.malformed("unknown error reason"))?;
            Message::Error {
                reason,
                detail: b.text(MAX_ERROR_DETAIL, "error detail")?,
            }
        }
        other => return Err(MessageError::UnknownType(other)),
    };
    b.end()?;
    Ok(msg)
}

fn check_batch(mut body: &[u8]) -> Result<(), MessageError> {
    if body.is_empty() {
        return Err(MessageError::Malformed {
            kind: kind::IP_PACKET,
            what: "empty batch",
        });
    }
    while !body.is_empty() {
        let (len, rest) =
            body.split_first_chunk::<PACKET_PREFIX_LEN>()
                .ok_or(MessageError::Malformed {
                    kind: kind::IP_PACKET,
                    what: "truncated packet length",
                })?;
        let len = usize::from(u16::from_be_bytes(*len));
        if len == 0 {
            return Err(MessageError::EmptyPacket);
        }
        body = rest.get(len..).ok_or(MessageError::Malformed {
            kind: kind::IP_PACKET,
            what: "packet longer than the batch",
        })?;
    }
    Ok(())
}

fn decode_lease(b: &mut Body<'_>) -> Result<Lease, MessageError> {
    let id = LeaseId(b.u64("lease id")?);
    let ipv4 = Ipv4Prefix {
        addr: Ipv4Addr::from(b.array::<4>("IPv4 address")?),
        len: b.u8("IPv4 prefix")?,
    };
    let ipv6 = match b.u8("IPv6 flag")? {
        0 => None,
        1 => Some(Ipv6Prefix {
            addr: Ipv6Addr::from(b.array::<16>("IPv6 address")?),
            len: b.u8("IPv6 prefix")?,
        }),
        _ => return Err(b.malformed("IPv6 flag is neither 0 nor 1")),
    };
    let mtu = b.u16("MTU")?;
    let expires_at_unix = b.u64("expiry")?;
    let dns = b.dns_list()?;
    let routes = b.route_list()?;
    let lease = Lease {
        id,
        ipv4,
        ipv6,
        dns,
        mtu,
        routes,
        expires_at_unix,
    };
    lease.validate()?;
    Ok(lease)
}

/// CONFIG_DELTA flag bits: which fields follow, in this order.
mod delta_flag {
    pub const DNS: u8 = 1 << 0;
    pub const MTU: u8 = 1 << 1;
    pub const ROUTES: u8 = 1 << 2;
    pub const EXPIRY: u8 = 1 << 3;
    pub const ALL: u8 = DNS | MTU | ROUTES | EXPIRY;
}

fn decode_delta(b: &mut Body<'_>) -> Result<ConfigDelta, MessageError> {
    let flags = b.u8("delta flags")?;
    if flags & !delta_flag::ALL != 0 {
        return Err(b.malformed("unknown delta flag"));
    }
    let mut d = ConfigDelta::default();
    if flags & delta_flag::DNS != 0 {
        d.dns = Some(b.dns_list()?);
    }
    if flags & delta_flag::MTU != 0 {
        d.mtu = Some(b.u16("MTU")?);
    }
    if flags & delta_flag::ROUTES != 0 {
        d.routes = Some(b.route_list()?);
    }
    if flags & delta_flag::EXPIRY != 0 {
        d.expires_at_unix = Some(b.u64("expiry")?);
    }
    Ok(d)
}

/// Writes messages into a caller-owned buffer. A message that does not fit is refused
/// whole and the buffer keeps what was written before it.
#[derive(Debug)]
pub struct MessageWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> MessageWriter<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, len: 0 }
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes left for further messages, headers included.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.len
    }

    /// The payload written so far.
    pub fn finish(self) -> &'a [u8] {
        let Self { buf, len } = self;
        &buf[..len]
    }

    /// Writes one message whose body `fill` writes through a [`BodyWriter`].
    fn message(
        &mut self,
        kind: u8,
        fill: impl FnOnce(&mut BodyWriter<'_>),
    ) -> Result<(), MessageError> {
        let start = self.len;
        let room = self.buf.get_mut(start..).ok_or(MessageError::NoSpace)?;
        let (header, body) = room
            .split_at_mut_checked(MESSAGE_HEADER_LEN)
            .ok_or(MessageError::NoSpace)?;
        let body_room = body.len().min(usize::from(u16::MAX));
        let mut w = BodyWriter {
            buf: &mut body[..body_room],
            len: 0,
            overflow: false,
        };
        fill(&mut w);
        if w.overflow {
            return Err(MessageError::NoSpace);
        }
        let body_len = w.len;
        header[0] = kind;
        header[1..3].copy_from_slice(&(body_len as u16).to_be_bytes());
        self.len = start + MESSAGE_HEADER_LEN + body_len;
        Ok(())
    }

    pub fn hello(&mut self, capabilities: u32) -> Result<(), MessageError> {
        self.message(kind::HELLO, |w| w.put(&capabilities.to_be_bytes()))
    }

    pub fn auth(&mut self, device_name: &str, platform: Platform) -> Result<(), MessageError> {
        if device_name.len() > MAX_DEVICE_NAME {
            return Err(MessageError::TooLong);
        }
        self.message(kind::AUTH, |w| {
            w.text(device_name);
            w.put(&[platform.to_u8()]);
        })
    }

    pub fn config(&mut self, lease: &Lease) -> Result<(), MessageError> {
        lease.validate()?;
        self.message(kind::CONFIG, |w| {
            w.put(&lease.id.0.to_be_bytes());
            w.put(&lease.ipv4.addr.octets());
            w.put(&[lease.ipv4.len]);
            match lease.ipv6 {
                None => w.put(&[0]),
                Some(p) => {
                    w.put(&[1]);
                    w.put(&p.addr.octets());
                    w.put(&[p.len]);
                }
            }
            w.put(&lease.mtu.to_be_bytes());
            w.put(&lease.expires_at_unix.to_be_bytes());
            w.dns_list(&lease.dns);
            w.route_list(&lease.routes);
        })
    }

    pub fn config_delta(&mut self, delta: &ConfigDelta) -> Result<(), MessageError> {
        if delta.dns.as_ref().is_some_and(|d| d.len() > MAX_LEASE_DNS) {
            return Err(LeaseError::TooManyDns(delta.dns.as_ref().map_or(0, Vec::len)).into());
        }
        if delta
            .routes
            .as_ref()
            .is_some_and(|r| r.len() > MAX_LEASE_ROUTES)
        {
            return Err(
                LeaseError::TooManyRoutes(delta.routes.as_ref().map_or(0, Vec::len)).into(),
            );
        }
        let mut flags = 0;
        flags |= if delta.dns.is_some() {
            delta_flag::DNS
        } else {
            0
        };
        flags |= if delta.mtu.is_some() {
            delta_flag::MTU
        } else {
            0
        };
        flags |= if delta.routes.is_some() {
            delta_flag::ROUTES
        } else {
            0
        };
        flags |= if delta.expires_at_unix.is_some() {
            delta_flag::EXPIRY
        } else {
            0
        };
        self.message(kind::CONFIG_DELTA, |w| {
            w.put(&[flags]);
            if let Some(dns) = &delta.dns {
                w.dns_list(dns);
            }
            if let Some(mtu) = delta.mtu {
                w.put(&mtu.to_be_bytes());
            }
            if let Some(routes) = &delta.routes {
                w.route_list(routes);
            }
            if let Some(expiry) = delta.expires_at_unix {
                w.put(&expiry.to_be_bytes());
            }
        })
    }

    /// Writes as many of `packets` as fit into one IP_PACKET message and returns how
    /// many it took (at least one, or `NoSpace`). Empty packets are refused.
    pub fn ip_packets(&mut self, packets: &[&[u8]]) -> Result<usize, MessageError> {
        if packets.iter().any(|p| p.is_empty()) {
            return Err(MessageError::EmptyPacket);
        }
        let mut taken = 0;
        self.message(kind::IP_PACKET, |w| {
            for p in packets {
                if w.room() < PACKET_PREFIX_LEN + p.len() || p.len() > usize::from(u16::MAX) {
                    break;
                }
                w.put(&(p.len() as u16).to_be_bytes());
                w.put(p);
                taken += 1;
            }
        })?;
        if taken == 0 {
            // Undo the empty message: a batch always carries a packet.
            self.len -= MESSAGE_HEADER_LEN;
            return Err(MessageError::NoSpace);
        }
        Ok(taken)
    }

    pub fn ping(&mut self, k: Keepalive) -> Result<(), MessageError> {
        self.keepalive(kind::PING, k)
    }

    pub fn pong(&mut self, k: Keepalive) -> Result<(), MessageError> {
        self.keepalive(kind::PONG, k)
    }

    fn keepalive(&mut self, kind: u8, k: Keepalive) -> Result<(), MessageError> {
        self.message(kind, |w| {
            w.put(&k.seq.to_be_bytes());
            w.put(&k.tx_packets.to_be_bytes());
            w.put(&k.rx_packets.to_be_bytes());
        })
    }

    pub fn resume(&mut self, ticket: &[u8]) -> Result<(), MessageError> {
        self.ticket_message(kind::RESUME, ticket)
    }

    /// A fresh resume ticket for the client (gateway → client, in DATA).
    pub fn ticket(&mut self, ticket: &[u8]) -> Result<(), MessageError> {
        self.ticket_message(kind::TICKET, ticket)
    }

    fn ticket_message(&mut self, kind: u8, ticket: &[u8]) -> Result<(), MessageError> {
        if ticket.len() > MAX_TICKET_LEN {
            return Err(MessageError::TooLong);
        }
        self.message(kind, |w| {
            w.put(&(ticket.len() as u16).to_be_bytes());
            w.put(ticket);
        })
    }

    pub fn close(&mut self, reason: CloseReason) -> Result<(), MessageError> {
        self.message(kind::CLOSE, |w| w.put(&[reason as u8]))
    }

    pub fn error(&mut self, reason: ErrorReason, detail: &str) -> Result<(), MessageError> {
        if detail.len() > MAX_ERROR_DETAIL {
            return Err(MessageError::TooLong);
        }
        self.message(kind::ERROR, |w| {
            w.put(&[reason as u8]);
            w.text(detail);
        })
    }
}

/// Writes a message body; remembers an overflow instead of failing each call.
struct BodyWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
    overflow: bool,
}

impl BodyWriter<'_> {
    fn room(&self) -> usize {
        self.buf.len() - self.len
    }

    fn put(&mut self, bytes: &[u8]) {
        match self.buf.get_mut(self.len..self.len + bytes.len()) {
            Some(dst) if !self.overflow => {
                dst.copy_from_slice(bytes);
                self.len += bytes.len();
            }
            _ => self.overflow = true,
        }
    }

    /// Callers check the length bound (≤ 255) before writing.
    fn text(&mut self, s: &str) {
        self.put(&[s.len() as u8]);
        self.put(s.as_bytes());
    }

    fn ip(&mut self, ip: &IpAddr) {
        match ip {
            IpAddr::V4(a) => {
                self.put(&[4]);
                self.put(&a.octets());
            }
            IpAddr::V6(a) => {
                self.put(&[6]);
                self.put(&a.octets());
            }
        }
    }

    /// Callers check the count bound (≤ `MAX_LEASE_DNS`).
    fn dns_list(&mut self, dns: &[IpAddr]) {
        self.put(&[dns.len() as u8]);
        dns.iter().for_each(|ip| self.ip(ip));
    }

    /// Callers check the count bound (≤ `MAX_LEASE_ROUTES`).
    fn route_list(&mut self, routes: &[Route]) {
        self.put(&[routes.len() as u8]);
        for r in routes {
            match r {
                Route::V4(p) => {
                    self.ip(&IpAddr::V4(p.addr));
                    self.put(&[p.len]);
                }
                Route::V6(p) => {
                    self.ip(&IpAddr::V6(p.addr));
                    self.put(&[p.len]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn lease() -> Lease {
        Lease {
            id: LeaseId(0x0102_0304_0506_0708),
            ipv4: Ipv4Prefix {
                addr: Ipv4Addr::new(100, 64, 0, 2),
                len: 24,
            },
            ipv6: Some(Ipv6Prefix {
                addr: "fd56:5348:5000::2".parse().unwrap(),
                len: 64,
            }),
            dns: vec![
                IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1)),
                "fd56:5348:5000::1".parse().unwrap(),
            ],
            mtu: 1400,
            routes: vec![
                Route::V4(Ipv4Prefix {
                    addr: Ipv4Addr::UNSPECIFIED,
                    len: 0,
                }),
                Route::V6(Ipv6Prefix {
                    addr: Ipv6Addr::UNSPECIFIED,
                    len: 0,
                }),
            ],
            expires_at_unix: 1_900_000_000,
        }
    }

    fn all_messages(w: &mut MessageWriter<'_>) {
        w.hello(7).unwrap();
        w.auth("laptop", Platform::Linux).unwrap();
        w.config(&lease()).unwrap();
        w.config_delta(&ConfigDelta {
            mtu: Some(1300),
            expires_at_unix: Some(5),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(w.ip_packets(&[b"abc", b"defg"]).unwrap(), 2);
        w.ping(Keepalive {
            seq: 1,
            tx_packets: 2,
            rx_packets: 3,
        })
        .unwrap();
        w.pong(Keepalive {
            seq: 1,
            tx_packets: 4,
            rx_packets: 5,
        })
        .unwrap();
        w.resume(&[9; 40]).unwrap();
        w.close(CloseReason::Shutdown).unwrap();
        w.ticket(&[8; 100]).unwrap();
        w.error(ErrorReason::Revoked, "bye").unwrap();
    }

    #[test]
    fn every_message_round_trips() {
        let mut buf = [0u8; 1024];
        let mut w = MessageWriter::new(&mut buf);
        all_messages(&mut w);
        let payload = w.finish();
        let msgs: Vec<_> = MessageReader::new(payload)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(msgs.len(), 11);
        assert_eq!(msgs[0], Message::Hello { capabilities: 7 });
        assert_eq!(
            msgs[1],
            Message::Auth {
                device_name: "laptop",
                platform: Platform::Linux
            }
        );
        assert_eq!(msgs[2], Message::Config(lease()));
        match &msgs[4] {
            Message::IpPacket(b) => {
                assert_eq!(b.iter().collect::<Vec<_>>(), vec![&b"abc"[..], b"defg"])
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(msgs[7], Message::Resume { ticket: &[9; 40] });
        assert_eq!(msgs[9], Message::Ticket { ticket: &[8; 100] });
        assert_eq!(
            msgs[10],
            Message::Error {
                reason: ErrorReason::Revoked,
                detail: "bye"
            }
        );
    }

    #[test]
    fn delta_applies_and_keeps_lease_on_error() {
        let mut l = lease();
        ConfigDelta {
            mtu: Some(1300),
            ..Default::default()
        }
        .apply(&mut l)
        .unwrap();
        assert_eq!(l.mtu, 1300);
        let bad = ConfigDelta {
            mtu: Some(10),
            dns: Some(vec![]),
            ..Default::default()
        };
        assert!(bad.apply(&mut l).is_err());
        assert_eq!(l.mtu, 1300);
        assert_eq!(l.dns, lease().dns);
    }

    #[test]
    fn delta_between_two_leases_names_only_what_changed_and_reproduces_the_new_one() {
        let old = lease();
        assert!(ConfigDelta::between(&old, &old).is_empty());
        let mut new = old.clone();
        new.mtu = 1300;
        new.routes.truncate(1);
        let d = ConfigDelta::between(&old, &new);
        assert_eq!(d.mtu, Some(1300));
        assert_eq!(d.routes.as_ref(), Some(&new.routes));
        assert_eq!((d.dns.as_ref(), d.expires_at_unix), (None, None));
        let mut applied = old.clone();
        d.apply(&mut applied).unwrap();
        assert_eq!(applied, new);
    }

    #[test]
    fn batch_takes_what_fits_and_refuses_empty_packets() {
        let mut buf = [0u8; 3 + 2 + 100 + 2 + 50];
        let mut w = MessageWriter::new(&mut buf);
        let big = [1u8; 100];
        let small = [2u8; 50];
        assert_eq!(w.ip_packets(&[&big, &small, &small]).unwrap(), 2);
        assert_eq!(w.ip_packets(&[&small]), Err(MessageError::NoSpace));
        assert_eq!(w.len(), 157);
        let mut buf = [0u8; 64];
        assert_eq!(
            MessageWriter::new(&mut buf).ip_packets(&[b""]),
            Err(MessageError::EmptyPacket)
        );
    }

    #[test]
    fn message_that_does_not_fit_leaves_buffer_intact() {
        let mut buf = [0u8; 10];
        let mut w = MessageWriter::new(&mut buf);
        w.hello(1).unwrap();
        assert_eq!(
            w.error(ErrorReason::Overloaded, "x"),
            Err(MessageError::NoSpace)
        );
        assert_eq!(w.finish().len(), 7);
    }

    #[test]
    fn optional_unknown_types_are_skipped_required_ones_fail() {
        let payload = [0x80, 0, 2, 0xAA, 0xBB, kind::CLOSE, 0, 1, 0];
        let msgs: Vec<_> = MessageReader::new(&payload).collect();
        assert_eq!(msgs, vec![Ok(Message::Close(CloseReason::Normal))]);
        let payload = [0x7F, 0, 0, kind::CLOSE, 0, 1, 0];
        let msgs: Vec<_> = MessageReader::new(&payload).collect();
        assert_eq!(msgs, vec![Err(MessageError::UnknownType(0x7F))]);
    }

    #[test]
    fn malformed_bodies_fail_typed() {
        let cases: &[&[u8]] = &[
            &[kind::HELLO, 0, 3, 0, 0, 0],
            &[kind::HELLO, 0, 5, 0, 0, 0, 0, 0],
            &[kind::IP_PACKET, 0, 0],
            &[kind::IP_PACKET, 0, 2, 0, 0],
            &[kind::IP_PACKET, 0, 3, 0, 5, 1],
            &[kind::AUTH, 0, 3, 2, 0xFF, 0xFE],
            &[kind::CLOSE, 0, 1, 99],
            &[kind::ERROR, 0, 2, 0, 0],
            &[kind::RESUME, 0, 2, 0xFF, 0xFF],
            &[kind::CONFIG_DELTA, 0, 1, 0x80],
            &[kind::CONFIG, 0, 1, 0],
            &[kind::PING, 0, 200],
            &[kind::PING],
        ];
        for case in cases {
            let results: Vec<_> = MessageReader::new(case).collect();
            assert_eq!(results.len(), 1, "{case:?}");
            assert!(results[0].is_err(), "{case:?} decoded as {:?}", results[0]);
        }
    }

    #[test]
    fn every_prefix_of_a_valid_payload_is_safe() {
        let mut buf = [0u8; 1024];
        let mut w = MessageWriter::new(&mut buf);
        all_messages(&mut w);
        let payload = w.finish();
        for n in 0..payload.len() {
            for m in MessageReader::new(&payload[..n]) {
                let _ = m;
            }
        }
    }
}
