//! `ClientCore`: the client's side of one VSHP session, sans-IO.
//!
//! Fed with the records the transport delivers, the IP packets the TUN delivers and the
//! current time; it answers with records to send and [`Event`]s (packets for the TUN,
//! the lease, the pairing code, the gateway's refusals). No sockets, no clock, no TUN:
//! the driver (`driver.rs`) owns those.

use std::time::Duration;

use vshp::handshake::{HandshakeError, Initiator, Next};
use vshp::lease::Lease;
use vshp::message::{CloseReason, ConfigDelta, Keepalive, Platform};
use vshp::record::{self, Capabilities, HEADER_LEN, MAX_RECORD_LEN, Record, SessionIndex};
use vshp::transport::{Session, TransportMode};
use vshp::{ErrorReason, Message, MessageReader, MessageWriter, PairingCode, StaticKeypair};

/// A PING goes out after this much time without one (every PONG refreshes `last_rx`,
/// so an idle session hears from the gateway at least this often).
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
/// Nothing received for this long (four PINGs unanswered): the gateway is considered
/// gone; the client reconnects with RESUME (docs/resume.md).
pub const DEAD_AFTER: Duration = Duration::from_secs(20);
/// A handshake without an answer for this long is retried.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest record sent on a datagram transport: an Ethernet MTU minus IPv4 and UDP
/// headers, so that a record never fragments on the LAN. (A packet too large for it,
/// under a lease with a larger MTU, gets a record of its own.)
pub const MAX_DATAGRAM_RECORD: usize = 1472;
/// Largest record sent on a stream transport: the protocol's limit, so that a lease
/// MTU of up to 64 KB (the stream transport's, docs/performance.md) fits one record
/// and small packets share one.
pub const MAX_STREAM_RECORD: usize = MAX_RECORD_LEN;
/// Longest resume ticket kept (the gateway's are about 130 bytes).
pub const MAX_TICKET: usize = 512;
/// Bytes of an IP_PACKET message around its packets: type, length.
const MSG_OVERHEAD: usize = 3;

/// Why the core cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("cannot encode a message: {0}")]
    Message(#[from] vshp::MessageError),
    #[error("cannot seal a record: {0}")]
    Send(#[from] vshp::SendError),
    #[error("no session with the gateway yet")]
    NotEstablished,
    #[error("the session's keys cannot be set up")]
    Crypto,
}

/// What the core tells its driver.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// The handshake completed; both sides show this code.
    Established { code: PairingCode },
    /// The gateway's lease (CONFIG): bring the TUN up with it.
    Config(Lease),
    /// What changed in the lease of the live session (CONFIG_DELTA): apply it to the
    /// TUN, routes and DNS in place (docs/resume.md, Lease changes).
    ConfigDelta(ConfigDelta),
    /// A packet from the gateway for the TUN.
    Packet(&'a [u8]),
    /// An authenticated ERROR from the gateway.
    Refused {
        reason: ErrorReason,
        detail: &'a str,
    },
    /// A plaintext (advisory) ERROR record before a session exists.
    Advisory(ErrorReason),
    /// The gateway closed the session.
    Closed(CloseReason),
    /// A PONG answered one of our PINGs.
    Pong { seq: u64 },
}

/// What the timers ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// Nothing to do before the returned deadline.
    Idle,
    /// A record (the PING) was written to `out`: send it.
    Send(usize),
    /// The handshake got no answer in time: start a new one.
    HandshakeTimedOut,
    /// Nothing arrived for [`DEAD_AFTER`]: the gateway is gone.
    Dead,
}

#[derive(Debug)]
enum State {
    Idle,
    Handshaking {
        init: Box<Initiator>,
        since: Duration,
    },
    Established(Box<Session>),
}

/// Packets and records counted by the core.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub tx_packets: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub records_dropped: u64,
    pub handshakes: u64,
}

/// The client's side of one VSHP session at a time (a new handshake replaces the old).
#[derive(Debug)]
pub struct ClientCore {
    keypair: StaticKeypair,
    gateway_key: [u8; 32],
    device_name: String,
    mode: TransportMode,
    state: State,
    last_rx: Duration,
    last_ping: Duration,
    ping_seq: u64,
    counters: Counters,
    pending_pong: Option<u64>,
    scratch: Vec<u8>,
    /// The latest resume ticket from the gateway (TICKET), presented in RESUME inside
    /// the next handshake; `ticket_new` until the driver took a copy to persist.
    ticket: Option<Vec<u8>>,
    ticket_new: bool,
}

impl ClientCore {
    /// A core for the gateway whose static key is `gateway_key` (from the invite: IK).
    pub fn new(
        keypair: StaticKeypair,
        gateway_key: [u8; 32],
        device_name: &str,
        mode: TransportMode,
    ) -> Self {
        Self {
            keypair,
            gateway_key,
            device_name: device_name.chars().take(64).collect(),
            mode,
            state: State::Idle,
            last_rx: Duration::ZERO,
            last_ping: Duration::ZERO,
            ping_seq: 0,
            counters: Counters::default(),
            pending_pong: None,
            scratch: vec![0u8; MAX_RECORD_LEN],
            ticket: None,
            ticket_new: false,
        }
    }

    /// A resume ticket kept from an earlier run (the state dir): the next handshake
    /// presents it in RESUME. Longer than the protocol allows: ignored.
    pub fn set_ticket(&mut self, ticket: Vec<u8>) {
        if !ticket.is_empty() && ticket.len() <= MAX_TICKET {
            self.ticket = Some(ticket);
        }
    }

    /// The ticket the next handshake presents, if any.
    pub fn ticket(&self) -> Option<&[u8]> {
        self.ticket.as_deref()
    }

    /// A ticket the gateway sent since the last call (to persist), once.
    pub fn take_new_ticket(&mut self) -> Option<&[u8]> {
        if std::mem::take(&mut self.ticket_new) {
            self.ticket.as_deref()
        } else {
            None
        }
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established(_))
    }

    /// Largest record this core writes on its transport.
    pub fn max_record(&self) -> usize {
        match self.mode {
            TransportMode::Datagram => MAX_DATAGRAM_RECORD,
            TransportMode::Stream => MAX_STREAM_RECORD,
        }
    }

    /// Switches the transport kind (before a new handshake).
    pub fn set_mode(&mut self, mode: TransportMode) {
        self.mode = mode;
    }

    /// Starts a new handshake (forgetting any session): writes HANDSHAKE_INIT to `out`.
    pub fn begin_handshake(&mut self, now: Duration, out: &mut [u8]) -> Result<usize, CoreError> {
        let index = loop {
            let i: u32 = rand::random();
            if i != 0 {
                break i;
            }
        };
        let mut init = Initiator::new(
            self.keypair.clone(),
            Some(self.gateway_key),
            Capabilities::ALL_V1,
            SessionIndex(index),
        )?;
        let mut payload = [0u8; 256 + MAX_TICKET];
        let mut w = MessageWriter::new(&mut payload);
        w.hello(Capabilities::ALL_V1.0)?;
        w.auth(&self.device_name, Platform::Linux)?;
        if let Some(t) = &self.ticket {
            // IK: the INIT payload is encrypted, so RESUME rides in it (one round trip).
            w.resume(t)?;
        }
        let n = w.len();
        let p = payload.get(..n).ok_or(CoreError::Crypto)?;
        let len = init.write_init(p, out)?;
        self.state = State::Handshaking {
            init: Box::new(init),
            since: now,
        };
        self.counters.handshakes += 1;
        Ok(len)
    }

    /// Handles one record from the transport (opened in place); events go to `on_event`.
    /// A PING from the gateway leaves a PONG to collect with [`ClientCore::take_pong`].
    pub fn handle_record(
        &mut self,
        rec: &mut [u8],
        now: Duration,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<(), CoreError> {
        match record::decode(rec) {
            Ok(Record::Error(e)) => {
                // Advisory: only meaningful while no session exists.
                if !self.is_established() {
                    on_event(Event::Advisory(e.reason));
                }
                return Ok(());
            }
            Ok(Record::Handshake { .. }) => return self.handle_response(rec, now, on_event),
            Ok(Record::Data { .. }) => {}
            Err(_) => {
                self.counters.records_dropped += 1;
                return Ok(());
            }
        }
        let State::Established(session) = &mut self.state else {
            self.counters.records_dropped += 1;
            return Ok(());
        };
        let Ok(plain) = session.open_in_place(rec, now) else {
            self.counters.records_dropped += 1;
            return Ok(());
        };
        self.last_rx = now;
        let mut pong: Option<Keepalive> = None;
        for m in MessageReader::new(plain) {
            let Ok(m) = m else {
                self.counters.records_dropped += 1;
                break;
            };
            match m {
                Message::Config(lease) => on_event(Event::Config(lease)),
                Message::IpPacket(batch) => {
                    for p in batch.iter() {
                        self.counters.rx_packets += 1;
                        self.counters.rx_bytes += p.len() as u64;
                        on_event(Event::Packet(p));
                    }
                }
                Message::Ping(k) => pong = Some(k),
                Message::Pong(k) => on_event(Event::Pong { seq: k.seq }),
                Message::Ticket { ticket } if !ticket.is_empty() && ticket.len() <= MAX_TICKET => {
                    self.ticket = Some(ticket.to_vec());
                    self.ticket_new = true;
                }
                Message::ConfigDelta(d) => on_event(Event::ConfigDelta(d)),
                Message::Close(r) => on_event(Event::Closed(r)),
                Message::Error { reason, detail } => {
                    if reason == ErrorReason::BadTicket {
                        // The gateway will not resume with it: the next handshake goes
                        // without RESUME (and gets a new ticket once admitted).
                        self.ticket = None;
                        self.ticket_new = false;
                    }
                    on_event(Event::Refused { reason, detail })
                }
                _ => {}
            }
        }
        if let Some(k) = pong {
            self.pending_pong = Some(k.seq);
        }
        Ok(())
    }

    fn handle_response(
        &mut self,
        rec: &[u8],
        now: Duration,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<(), CoreError> {
        let State::Handshaking { init, .. } = &mut self.state else {
            self.counters.records_dropped += 1;
            return Ok(());
        };
        let mut payload = vec![0u8; rec.len()];
        if init.read_response(rec, &mut payload).is_err() {
            // A forged or stale response: wait for the real one (or the timeout).
            self.counters.records_dropped += 1;
            return Ok(());
        }
        if init.next() != Next::Established {
            return Err(CoreError::NotEstablished);
        }
        let State::Handshaking { init, .. } = std::mem::replace(&mut self.state, State::Idle)
        else {
            return Err(CoreError::NotEstablished);
        };
        let est = init.into_established()?;
        let session = Session::new(&est, self.mode, now).map_err(|_| CoreError::Crypto)?;
        self.state = State::Established(Box::new(session));
        self.last_rx = now;
        self.last_ping = now;
        on_event(Event::Established {
            code: est.pairing_code(),
        });
        Ok(())
    }

    /// A PONG owed to the gateway's PING, sealed into `out`.
    pub fn take_pong(&mut self, now: Duration, out: &mut [u8]) -> Result<Option<usize>, CoreError> {
        let Some(seq) = self.pending_pong.take() else {
            return Ok(None);
        };
        let k = self.keepalive(seq);
        self.seal_with(now, out, |w| w.pong(k)).map(Some)
    }

    fn keepalive(&self, seq: u64) -> Keepalive {
        Keepalive {
            seq,
            tx_packets: self.counters.tx_packets,
            rx_packets: self.counters.rx_packets,
        }
    }

    fn seal_with(
        &mut self,
        now: Duration,
        out: &mut [u8],
        f: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), vshp::MessageError>,
    ) -> Result<usize, CoreError> {
        let State::Established(session) = &mut self.state else {
            return Err(CoreError::NotEstablished);
        };
        let mut w = MessageWriter::new(&mut self.scratch);
        f(&mut w)?;
        let n = w.len();
        let plain = self.scratch.get(..n).ok_or(CoreError::Crypto)?;
        Ok(session.seal(plain, out, now)?)
    }

    /// Seals as many of `packets` (in order) as fit one record into `out`. Returns the
    /// record length and how many packets it carries. A first packet larger than
    /// [`ClientCore::max_record`] allows gets a record of its own (up to the protocol's
    /// limit, as the gateway does); one too large even for that is dropped (counted as
    /// carried).
    pub fn seal_packets(
        &mut self,
        packets: &[&[u8]],
        now: Duration,
        out: &mut [u8],
    ) -> Result<(usize, usize), CoreError> {
        let first = packets.first().map_or(0, |p| p.len());
        let max_plain = self
            .max_record_plain()
            .max(MSG_OVERHEAD + 2 + first)
            .min(MAX_RECORD_LEN - HEADER_LEN - record::AEAD_TAG_LEN)
            .min(out.len().saturating_sub(HEADER_LEN + record::AEAD_TAG_LEN));
        let State::Established(session) = &mut self.state else {
            return Err(CoreError::NotEstablished);
        };
        let mut take = 0;
        let mut bytes = MSG_OVERHEAD;
        for p in packets {
            let add = 2 + p.len();
            if bytes + add > max_plain {
                break;
            }
            bytes += add;
            take += 1;
        }
        if take == 0 {
            // The first packet alone is larger than a record: drop it.
            return Ok((0, packets.len().min(1)));
        }
        let chosen = packets.get(..take).ok_or(CoreError::Crypto)?;
        // The message is written where the record's plaintext goes and sealed there:
        // one copy of each packet (TUN buffer -> record), none through a scratch buffer.
        let body = out
            .get_mut(HEADER_LEN..HEADER_LEN + max_plain)
            .ok_or(CoreError::Crypto)?;
        let mut w = MessageWriter::new(body);
        w.ip_packets(chosen)?;
        let n = w.len();
        let len = session.seal_in_place(out, n, now)?;
        self.counters.tx_packets += take as u64;
        self.counters.tx_bytes += chosen.iter().map(|p| p.len() as u64).sum::<u64>();
        Ok((len, take))
    }

    fn max_record_plain(&self) -> usize {
        self.max_record() - HEADER_LEN - record::AEAD_TAG_LEN
    }

    /// A CLOSE record for the gateway, sealed into `out`.
    pub fn close(&mut self, now: Duration, out: &mut [u8]) -> Result<usize, CoreError> {
        self.seal_with(now, out, |w| w.close(CloseReason::Normal))
    }

    /// Treats the gateway as alive at `now` (e.g. while it waits for the user's approval
    /// and may not answer PINGs).
    pub fn mark_alive(&mut self, now: Duration) {
        self.last_rx = now;
    }

    /// Forgets the session (the transport is gone).
    pub fn reset(&mut self) {
        self.state = State::Idle;
    }

    /// Keepalive, dead-peer detection and handshake timeout. Call at least every second.
    pub fn poll(&mut self, now: Duration, out: &mut [u8]) -> Result<Timer, CoreError> {
        match &self.state {
            State::Idle => Ok(Timer::Idle),
            State::Handshaking { since, .. } => {
                if now.saturating_sub(*since) >= HANDSHAKE_TIMEOUT {
                    Ok(Timer::HandshakeTimedOut)
                } else {
                    Ok(Timer::Idle)
                }
            }
            State::Established(_) => {
                if now.saturating_sub(self.last_rx) >= DEAD_AFTER {
                    return Ok(Timer::Dead);
                }
                if now.saturating_sub(self.last_ping) >= PING_INTERVAL {
                    self.last_ping = now;
                    self.ping_seq += 1;
                    let k = self.keepalive(self.ping_seq);
                    let n = self.seal_with(now, out, |w| w.ping(k))?;
                    return Ok(Timer::Send(n));
                }
                Ok(Timer::Idle)
            }
        }
    }
}
