//! A real VSHP client (vshp's `Initiator` and `Session`) for driving a worker.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use vshp::handshake::{Initiator, Next};
use vshp::key_oracle::StaticKeypair;
use vshp::lease::{Ipv4Prefix, Ipv6Prefix, Lease, LeaseId, Route};
use vshp::message::{Message, MessageReader, MessageWriter, Platform};
use vshp::record::{Capabilities, SessionIndex};
use vshp::transport::{Session, TransportMode};

pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
pub const WEB: Ipv4Addr = Ipv4Addr::new(93, 184, 216, 34);

pub fn client_v6() -> Ipv6Addr {
    "fd56:5348::2".parse().unwrap()
}

pub fn gateway_key() -> StaticKeypair {
    StaticKeypair::from_private([0x42; 32]).unwrap()
}

pub fn client_key() -> StaticKeypair {
    StaticKeypair::from_private([0x17; 32]).unwrap()
}

pub fn lease() -> Lease {
    Lease {
        id: LeaseId(77),
        ipv4: Ipv4Prefix {
            addr: CLIENT_V4,
            len: 24,
        },
        ipv6: Some(Ipv6Prefix {
            addr: client_v6(),
            len: 64,
        }),
        dns: vec![IpAddr::V4(GATEWAY_V4)],
        mtu: 1400,
        routes: vec![Route::V4(Ipv4Prefix {
            addr: Ipv4Addr::UNSPECIFIED,
            len: 0,
        })],
        expires_at_unix: 2_000_000_000,
    }
}

/// The client's half: a handshake, then a session.
pub struct Client {
    pub initiator: Option<Initiator>,
    pub session: Option<Session>,
    pub mode: TransportMode,
}

impl Client {
    /// IK when `ik` (the client knows the gateway's key), else XX.
    pub fn new(ik: bool, mode: TransportMode) -> Self {
        let gw = ik.then(|| gateway_key().public_key());
        Self {
            initiator: Some(
                Initiator::new(client_key(), gw, Capabilities::ALL_V1, SessionIndex(0x1111))
                    .unwrap(),
            ),
            session: None,
            mode,
        }
    }

    /// HANDSHAKE_INIT: HELLO (XX), or HELLO, AUTH and an optional RESUME (IK).
    pub fn init(&mut self, ticket: Option<&[u8]>) -> Vec<u8> {
        let i = self.initiator.as_mut().unwrap();
        let ik = i.pattern() == vshp::record::Pattern::Ik;
        let mut pl = [0u8; 1024];
        let mut w = MessageWriter::new(&mut pl);
        w.hello(Capabilities::ALL_V1.0).unwrap();
        if ik {
            w.auth("laptop", Platform::Linux).unwrap();
            if let Some(t) = ticket {
                w.resume(t).unwrap();
            }
        }
        let n = w.len();
        let mut out = vec![0u8; 2048];
        let len = i.write_init(&pl[..n], &mut out).unwrap();
        out.truncate(len);
        out
    }

    /// Reads HANDSHAKE_RESP; for XX returns the FINAL record to send.
    pub fn on_resp(
        &mut self,
        resp: &[u8],
        ticket: Option<&[u8]>,
        now: Duration,
    ) -> Option<Vec<u8>> {
        let i = self.initiator.as_mut().unwrap();
        let mut pl = vec![0u8; resp.len()];
        let n = i.read_response(resp, &mut pl).unwrap();
        let msgs: Vec<_> = MessageReader::new(&pl[..n]).collect();
        assert!(
            matches!(msgs.as_slice(), [Ok(Message::Hello { .. })]),
            "RESP payload is HELLO: {msgs:?}"
        );
        let mut fin = None;
        if i.next() == Next::Send {
            let mut p = [0u8; 1024];
            let mut w = MessageWriter::new(&mut p);
            w.auth("laptop", Platform::Linux).unwrap();
            if let Some(t) = ticket {
                w.resume(t).unwrap();
            }
            let m = w.len();
            let mut out = vec![0u8; 2048];
            let len = i.write_final(&p[..m], &mut out).unwrap();
            out.truncate(len);
            fin = Some(out);
        }
        let est = self.initiator.take().unwrap().into_established().unwrap();
        self.session = Some(Session::new(&est, self.mode, now).unwrap());
        fin
    }

    /// Seals one DATA record whose messages `fill` writes.
    pub fn data(&mut self, now: Duration, fill: impl FnOnce(&mut MessageWriter<'_>)) -> Vec<u8> {
        let mut plain = vec![0u8; 65_000];
        let mut w = MessageWriter::new(&mut plain);
        fill(&mut w);
        let n = w.len();
        let mut out = vec![0u8; n + 64];
        let len = self
            .session
            .as_mut()
            .unwrap()
            .seal(&plain[..n], &mut out, now)
            .unwrap();
        out.truncate(len);
        out
    }

    /// One DATA record with one IP_PACKET message carrying `packets`.
    pub fn packets(&mut self, now: Duration, packets: &[&[u8]]) -> Vec<u8> {
        self.data(now, |w| {
            assert_eq!(w.ip_packets(packets).unwrap(), packets.len());
        })
    }

    /// Opens a DATA record from the gateway and returns its messages as owned values.
    pub fn open(&mut self, rec: &[u8], now: Duration) -> Vec<Owned> {
        let mut out = vec![0u8; rec.len()];
        let n = self
            .session
            .as_mut()
            .unwrap()
            .open(rec, &mut out, now)
            .unwrap();
        MessageReader::new(&out[..n])
            .map(|m| Owned::from(m.unwrap()))
            .collect()
    }
}

/// A message with its borrowed parts copied, for assertions.
#[derive(Debug, Clone, PartialEq)]
pub enum Owned {
    Hello(u32),
    Config(Lease),
    Packets(Vec<Vec<u8>>),
    Pong { seq: u64, tx: u64, rx: u64 },
    Close(vshp::message::CloseReason),
    Error(vshp::message::ErrorReason),
    Other(String),
}

impl From<Message<'_>> for Owned {
    fn from(m: Message<'_>) -> Self {
        match m {
            Message::Hello { capabilities } => Self::Hello(capabilities),
            Message::Config(l) => Self::Config(l),
            Message::IpPacket(b) => Self::Packets(b.iter().map(<[u8]>::to_vec).collect()),
            Message::Pong(k) => Self::Pong {
                seq: k.seq,
                tx: k.tx_packets,
                rx: k.rx_packets,
            },
            Message::Close(r) => Self::Close(r),
            Message::Error { reason, .. } => Self::Error(reason),
            other => Self::Other(format!("{other:?}")),
        }
    }
}
