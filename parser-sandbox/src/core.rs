//! The worker's logic, sans-IO: fed with records, broker messages, netstack batches and
//! the current time; it produces records to send, packet batches for the netstack and
//! messages for the broker. No sockets, no clock, no threads — the driver
//! ([`crate::driver`]) moves the bytes. The one exception is the key oracle, which the
//! handshake calls synchronously ([`crate::oracle`]).
//!
//! Life of a session:
//!
//! 1. HANDSHAKE_INIT: shown to the key holder, read by a [`Responder`], answered with
//!    HANDSHAKE_RESP (payload: HELLO with our capabilities). IK is then established; XX
//!    waits for HANDSHAKE_FINAL. A retransmitted INIT gets the same RESP again.
//! 2. Established: the broker gets `Finished` (peer key, handshake hash, a RESUME
//!    ticket if the payload carried one) and decides.
//! 3. `Admit(lease)`: CONFIG and HELLO go to the peer in one DATA record; packets flow.
//!    `Pending`: an authenticated ERROR `PendingApproval`; the session waits for a
//!    later decision (PINGs are answered, packets are dropped and counted).
//!    `Refuse`: ERROR with the mapped reason, CLOSE, exit.
//! 4. DATA: IP_PACKET batches are validated packet by packet ([`packet_policy`]) and
//!    the valid ones appended to reused [`PacketBatch`]es; PING gets PONG; CLOSE ends.
//!    Return packets are packed into as few DATA records as the transport's record
//!    size allows.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use ipc_schema::PacketBatch;
use ipc_schema::messages::broker_worker::{
    BrokerToWorker, Decision, DeviceLabel, HandshakeId, Refusal, SealedTicket, SessionEnd,
    WorkerToBroker,
};
use ipc_schema::messages::common::{PeerKey, RequestId, ShutdownReason};
use vshp::OracleError;
use vshp::handshake::{HandshakeError, Next, Responder};
use vshp::lease::{Lease, LeaseId};
use vshp::message::{CloseReason, ErrorReason, Keepalive, Message, MessageError, MessageWriter};
use vshp::record::{
    self, AEAD_TAG_LEN, Capabilities, ErrorRecord, HEADER_LEN, MAX_RECORD_LEN, Pattern, Record,
    RecordError, RecordKind, SessionIndex,
};
use vshp::transport::{ReceiveError, Session, TransportMode};

use crate::counters::Stats;
use crate::oracle::HandshakeOracle;
use crate::packet_policy::{self, PacketPolicy};

/// Default largest datagram the worker sends on UDP when it can choose (one packet
/// that needs more still gets a record of its own).
pub const DEFAULT_DATAGRAM_RECORD: usize = 1400;
/// Bytes a DATA record adds around its plaintext.
pub const DATA_OVERHEAD: usize = HEADER_LEN + AEAD_TAG_LEN;
/// The stream length prefix.
const STREAM_PREFIX: usize = 2;
/// Most packets in one netstack batch (`ipc_schema::limits::MAX_BATCH_PACKETS`).
const MAX_BATCH_PACKETS: usize = ipc_schema::limits::MAX_BATCH_PACKETS;

/// How the core behaves; [`CoreConfig::new`] has the defaults.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub mode: TransportMode,
    pub policy: PacketPolicy,
    /// Largest record the worker builds when packing return packets. Datagram default
    /// [`DEFAULT_DATAGRAM_RECORD`], stream default [`MAX_RECORD_LEN`].
    pub max_record: usize,
    /// Capability bits announced in HANDSHAKE_RESP and in HELLO.
    pub capabilities: Capabilities,
    /// The session ends when nothing arrived from the peer for this long.
    pub idle_timeout: Duration,
    /// Most handshakes one worker starts within `handshake_window` (retransmitted
    /// INITs do not count); more are dropped and counted. A session re-handshakes
    /// every 55 minutes, so the bound is a rate, not a lifetime total.
    pub max_handshakes: u64,
    pub handshake_window: Duration,
}

impl CoreConfig {
    pub fn new(mode: TransportMode) -> Self {
        Self {
            mode,
            policy: PacketPolicy::default(),
            max_record: match mode {
                TransportMode::Datagram => DEFAULT_DATAGRAM_RECORD,
                TransportMode::Stream => MAX_RECORD_LEN,
            },
            capabilities: Capabilities::ALL_V1,
            idle_timeout: Duration::from_secs(180),
            max_handshakes: 8,
            handshake_window: Duration::from_secs(60),
        }
    }
}

/// Where the session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No session yet: waiting for (the rest of) a handshake.
    Handshake,
    /// Handshake done, `Finished` sent, no decision yet.
    AwaitDecision,
    /// The broker said `Pending`: the user has not approved the peer yet.
    Pending,
    /// Packets flow under the lease.
    Admitted,
    /// The worker is done; see [`WorkerCore::exit`].
    Closed,
}

/// Why the worker ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The peer sent CLOSE or ended the stream.
    PeerClosed,
    /// Idle timeout or session expiry.
    Timeout,
    /// The transport failed.
    TransportError,
    /// The peer broke the protocol beyond recovery (stream corruption).
    ProtocolError,
    /// The broker refused the peer.
    Refused(Refusal),
    /// The broker told the worker to stop.
    Shutdown(ShutdownReason),
}

impl Exit {
    /// The process exit status for this ending.
    pub fn code(self) -> i32 {
        match self {
            Self::PeerClosed | Self::Timeout | Self::Refused(_) | Self::Shutdown(_) => 0,
            Self::TransportError => 3,
            Self::ProtocolError => 4,
        }
    }
}

/// Records waiting to be sent, back to back in one reused buffer; framed with the
/// length prefix in stream mode, so the driver writes them in one go.
#[derive(Debug)]
pub struct RecordQueue {
    stream: bool,
    buf: Vec<u8>,
    ends: Vec<usize>,
}

impl RecordQueue {
    fn new(stream: bool) -> Self {
        Self {
            stream,
            buf: Vec::with_capacity(4 * MAX_RECORD_LEN),
            ends: Vec::with_capacity(256),
        }
    }

    fn prefix_len(&self) -> usize {
        if self.stream { STREAM_PREFIX } else { 0 }
    }

    /// Appends a record already built.
    fn push(&mut self, rec: &[u8]) {
        if self.stream {
            let len = u16::try_from(rec.len()).unwrap_or(u16::MAX);
            self.buf.extend_from_slice(&len.to_be_bytes());
        }
        self.buf.extend_from_slice(rec);
        self.ends.push(self.buf.len());
    }

    /// Room for a record of up to `max_record` bytes; returns where it starts.
    fn reserve(&mut self, max_record: usize) -> usize {
        let start = self.buf.len();
        self.buf.resize(start + self.prefix_len() + max_record, 0);
        start
    }

    /// Keeps `len` record bytes at `start` (writes the prefix) or drops the reservation.
    fn commit(&mut self, start: usize, len: Option<usize>) {
        match len {
            Some(len) => {
                let p = self.prefix_len();
                if self.stream {
                    let l = u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes();
                    if let Some(dst) = self.buf.get_mut(start..start + STREAM_PREFIX) {
                        dst.copy_from_slice(&l);
                    }
                }
                self.buf.truncate(start + p + len);
                self.ends.push(self.buf.len());
            }
            None => self.buf.truncate(start),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Every queued record (with its prefix in stream mode), in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .filter_map(|(s, e)| self.buf.get(s..e))
    }

    /// All queued bytes (stream mode: write them as they are).
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.ends.clear();
    }
}

/// Why a record (or what was left of it) was dropped. Each maps to a
/// [`RecordDrops`](crate::counters::RecordDrops) counter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordDrop {
    #[error("malformed record: {0}")]
    Malformed(RecordError),
    #[error("record of unsupported version {0}")]
    UnsupportedVersion(u8),
    #[error("no place for a {0:?} record here")]
    Unexpected(RecordKind),
    #[error("handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("the key holder refused the handshake: {0}")]
    OracleRefused(OracleError),
    #[error("too many handshakes in this window")]
    TooManyHandshakes,
    #[error("DATA not opened: {0}")]
    Receive(ReceiveError),
    #[error("malformed payload: {0}")]
    BadPayload(#[from] MessageError),
    #[error("protocol violation: {0}")]
    ProtocolViolation(&'static str),
    #[error("the session has ended")]
    Closed,
}

/// One handshake in flight.
struct Pending {
    id: HandshakeId,
    responder: Responder,
}

/// The sans-IO worker.
pub struct WorkerCore {
    config: CoreConfig,
    oracle: Arc<dyn HandshakeOracle>,
    phase: Phase,
    exit: Option<Exit>,
    handshake: Option<Pending>,
    next_handshake: u64,
    /// The last INIT answered and our RESP to it (a retransmitted INIT gets it again).
    init_cache: Vec<u8>,
    resp_cache: Vec<u8>,
    /// The handshake whose session is current and the peer it authenticated.
    session_id: Option<HandshakeId>,
    peer: Option<[u8; 32]>,
    session: Option<Session>,
    lease: Option<Lease>,
    last_rx: Duration,
    stats: Stats,
    records: RecordQueue,
    to_broker: Vec<WorkerToBroker>,
    current: PacketBatch,
    ready: VecDeque<PacketBatch>,
    pool: Vec<PacketBatch>,
    payload: Vec<u8>,
    pending_pong: Option<Keepalive>,
    /// A RESUME ticket from an INIT payload (IK), until the handshake finishes.
    pending_ticket: Option<SealedTicket>,
    /// The device name and platform of the peer's AUTH, for `Finished`.
    peer_auth: (Option<DeviceLabel>, Option<DeviceLabel>),
    window_start: Duration,
    window_handshakes: u64,
    data_path: bool,
    /// Resume tickets: the last `SealTicket` request id and when the next is due.
    ticket_request: u64,
    ticket_due: Option<Duration>,
}

/// A fresh resume ticket is asked for this long after the last one (tickets live
/// 12 hours, docs/protocol-crypto.md §5; a resume also gets a new one).
pub const TICKET_REFRESH: Duration = Duration::from_secs(30 * 60);

impl std::fmt::Debug for WorkerCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerCore")
            .field("phase", &self.phase)
            .field("exit", &self.exit)
            .field("session_id", &self.session_id)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// A random non-zero session index.
fn random_index() -> SessionIndex {
    use ring::rand::{SecureRandom, SystemRandom};
    let rng = SystemRandom::new();
    let mut b = [0u8; 4];
    for _ in 0..8 {
        if rng.fill(&mut b).is_ok() {
            let v = u32::from_be_bytes(b);
            if v != 0 {
                return SessionIndex(v);
            }
        }
    }
    // getrandom failing eight times is not a state to run a handshake in; a fixed
    // index is still correct (indices route, they do not protect).
    SessionIndex(1)
}

/// The ERROR's text for a refusal: the wire reason is coarse (an expired and a denied
/// request are both "not approved"), the text tells the user which it was.
fn refusal_detail(r: Refusal) -> &'static str {
    match r {
        Refusal::PairingDenied => "the gateway's user denied this device",
        Refusal::PairingExpired => "nobody approved this device on the gateway in time",
        other => refusal_reason(other).describe(),
    }
}

fn refusal_reason(r: Refusal) -> ErrorReason {
    match r {
        Refusal::NotApproved | Refusal::PairingDenied | Refusal::PairingExpired => {
            ErrorReason::NotApproved
        }
        Refusal::Revoked => ErrorReason::Revoked,
        Refusal::VpnUnavailable => ErrorReason::VpnUnavailable,
        Refusal::Overload => ErrorReason::Overloaded,
        Refusal::BadTicket => ErrorReason::BadTicket,
    }
}

impl WorkerCore {
    pub fn new(config: CoreConfig, oracle: Arc<dyn HandshakeOracle>, now: Duration) -> Self {
        let stream = config.mode == TransportMode::Stream;
        Self {
            config,
            oracle,
            phase: Phase::Handshake,
            exit: None,
            handshake: None,
            next_handshake: 1,
            init_cache: Vec::new(),
            resp_cache: Vec::new(),
            session_id: None,
            peer: None,
            session: None,
            lease: None,
            last_rx: now,
            stats: Stats::default(),
            records: RecordQueue::new(stream),
            to_broker: Vec::with_capacity(8),
            current: PacketBatch::new(LeaseId(0)),
            ready: VecDeque::with_capacity(16),
            pool: Vec::with_capacity(16),
            payload: vec![0u8; MAX_RECORD_LEN],
            pending_pong: None,
            pending_ticket: None,
            peer_auth: (None, None),
            window_start: now,
            window_handshakes: 0,
            data_path: true,
            ticket_request: 0,
            ticket_due: None,
        }
    }

    /// Fuzzing only: installs a session from raw keys, as if handshake `id` had just
    /// finished, without running the (slow) handshake. Nothing in the worker calls it.
    #[doc(hidden)]
    pub fn install_session_for_fuzzing(
        &mut self,
        keys: &vshp::handshake::TransportKeys,
        local: SessionIndex,
        remote: SessionIndex,
        id: HandshakeId,
        now: Duration,
    ) -> bool {
        match Session::with_config(
            keys,
            local,
            remote,
            self.config.mode,
            vshp::transport::SessionConfig::default(),
            now,
        ) {
            Ok(s) => {
                self.session = Some(s);
                self.session_id = Some(id);
                self.peer = Some([0u8; 32]);
                self.phase = Phase::AwaitDecision;
                self.last_rx = now;
                true
            }
            Err(_) => false,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Why the worker ended, once it has.
    pub fn exit(&self) -> Option<Exit> {
        self.exit
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    /// The authenticated peer's static key, once a handshake finished.
    pub fn peer(&self) -> Option<[u8; 32]> {
        self.peer
    }

    /// Records to send, in order. Call [`RecordQueue::clear`] once sent.
    pub fn records(&mut self) -> &mut RecordQueue {
        &mut self.records
    }

    /// Whether a data path to the netstack exists (default: yes). Without one, valid
    /// packets are dropped and counted instead of piling up in batches; turning it off
    /// discards the batches waiting for it.
    pub fn set_data_path(&mut self, attached: bool) {
        self.data_path = attached;
        if !attached {
            self.flush_batch();
            while let Some(b) = self.ready.front() {
                self.stats.packet_drops.no_data_path += b.len() as u64;
                self.batch_sent();
            }
        }
    }

    /// The driver could not send one queued record (counted).
    pub fn record_unsent(&mut self) {
        self.stats.records_unsent += 1;
    }

    /// Messages for the broker, in order.
    pub fn drain_broker(&mut self) -> std::vec::Drain<'_, WorkerToBroker> {
        self.to_broker.drain(..)
    }

    /// Closes the batch being filled so it can be sent (end of a readable burst).
    pub fn flush_batch(&mut self) {
        if !self.current.is_empty() {
            let lease = self.current.lease();
            let next = self.take_batch(lease);
            let full = std::mem::replace(&mut self.current, next);
            self.ready.push_back(full);
        }
    }

    /// The oldest batch ready for the netstack.
    pub fn ready_batch(&self) -> Option<&PacketBatch> {
        self.ready.front()
    }

    /// Marks the oldest ready batch as sent; its buffers are reused.
    pub fn batch_sent(&mut self) {
        if let Some(mut b) = self.ready.pop_front() {
            b.clear();
            self.pool.push(b);
        }
    }

    pub fn ready_batches(&self) -> usize {
        self.ready.len()
    }

    fn take_batch(&mut self, lease: LeaseId) -> PacketBatch {
        match self.pool.pop() {
            Some(mut b) => {
                b.set_lease(lease);
                b
            }
            None => PacketBatch::new(lease),
        }
    }

    fn end(&mut self, exit: Exit) {
        if self.exit.is_none() {
            self.exit = Some(exit);
            self.phase = Phase::Closed;
            let reason = match exit {
                Exit::PeerClosed => Some(SessionEnd::PeerClosed),
                Exit::Timeout => Some(SessionEnd::Timeout),
                Exit::TransportError => Some(SessionEnd::TransportError),
                Exit::ProtocolError => Some(SessionEnd::ProtocolError),
                Exit::Refused(_) | Exit::Shutdown(_) => None,
            };
            // The final counters: the broker cannot ask once the worker is gone.
            self.to_broker
                .push(WorkerToBroker::Counters(self.stats.to_wire()));
            if let Some(reason) = reason {
                self.to_broker.push(WorkerToBroker::SessionEnded { reason });
            }
            tracing::info!(?exit, stats = ?self.stats, "session ends");
        }
    }

    /// The transport reached its end (stream EOF) or failed.
    pub fn on_transport_closed(&mut self, error: bool) {
        self.end(if error {
            Exit::TransportError
        } else {
            Exit::PeerClosed
        });
    }

    /// Periodic housekeeping: idle timeout and session expiry.
    pub fn on_tick(&mut self, now: Duration) {
        if self.exit.is_some() {
            return;
        }
        if self.phase == Phase::Admitted && self.ticket_due.is_some_and(|t| now >= t) {
            self.request_ticket(now);
        }
        let idle = now.saturating_sub(self.last_rx) >= self.config.idle_timeout;
        let expired = self.session.as_ref().is_some_and(|s| s.is_expired(now));
        if idle || expired {
            let reason = if idle {
                CloseReason::IdleTimeout
            } else {
                CloseReason::Normal
            };
            self.send_close(None, reason, now);
            self.end(Exit::Timeout);
        }
    }

    /// One record from the peer. `rec` is opened in place. A dropped record (or the
    /// dropped rest of one) is counted and returned as a typed [`RecordDrop`].
    pub fn on_record(&mut self, rec: &mut [u8], now: Duration) -> Result<(), RecordDrop> {
        if self.exit.is_some() {
            return Err(RecordDrop::Closed);
        }
        self.stats.records_in += 1;
        let r = self.handle_record(rec, now);
        if let Err(e) = &r {
            self.stats.record_drops.count(e);
            tracing::debug!(error = %e, "record dropped");
        }
        r
    }

    fn handle_record(&mut self, rec: &mut [u8], now: Duration) -> Result<(), RecordDrop> {
        let kind = match record::decode(rec) {
            Ok(Record::Handshake { header, .. }) => header.kind,
            Ok(Record::Data { .. }) => RecordKind::Data,
            Ok(Record::Error(_)) => RecordKind::Error,
            Err(RecordError::UnsupportedVersion(v)) => {
                if self.session.is_none() {
                    let mut e = ErrorRecord::unsupported_version();
                    e.receiver = SessionIndex(0);
                    self.queue_plain(&e.encode());
                }
                return Err(RecordDrop::UnsupportedVersion(v));
            }
            Err(e) => return Err(RecordDrop::Malformed(e)),
        };
        match kind {
            RecordKind::HandshakeInit => self.on_init(rec, now),
            RecordKind::HandshakeFinal => self.on_final(rec, now),
            RecordKind::Data => self.on_data(rec, now),
            RecordKind::HandshakeResp | RecordKind::Error => Err(RecordDrop::Unexpected(kind)),
        }
    }

    fn queue_plain(&mut self, rec: &[u8]) {
        self.records.push(rec);
        self.stats.records_out += 1;
    }

    fn on_init(&mut self, rec: &[u8], now: Duration) -> Result<(), RecordDrop> {
        if !self.resp_cache.is_empty() && self.init_cache == rec {
            // A retransmission: the peer lost our answer. Same answer, no new DH.
            self.last_rx = now;
            let resp = std::mem::take(&mut self.resp_cache);
            self.queue_plain(&resp);
            self.resp_cache = resp;
            return Ok(());
        }
        if now.saturating_sub(self.window_start) >= self.config.handshake_window {
            self.window_start = now;
            self.window_handshakes = 0;
        }
        if self.window_handshakes >= self.config.max_handshakes {
            return Err(RecordDrop::TooManyHandshakes);
        }
        let (pattern, sender) = match record::decode(rec) {
            Ok(Record::Handshake { header, .. }) => (header.pattern, header.sender),
            _ => return Err(RecordDrop::Unexpected(RecordKind::HandshakeInit)),
        };
        self.stats.handshakes += 1;
        self.window_handshakes += 1;
        let id = HandshakeId(self.next_handshake);
        self.next_handshake += 1;
        let span = tracing::info_span!("handshake", id = id.0, ?pattern);
        let _enter = span.enter();
        if let Err(e) = self.oracle.show(id, pattern, rec) {
            tracing::warn!(error = %e, "key holder refused the handshake");
            let reason = match e {
                OracleError::Refused("rate limited") | OracleError::Unavailable(_) => {
                    ErrorReason::Overloaded
                }
                _ => ErrorReason::ProtocolViolation,
            };
            let answer = ErrorRecord {
                reason,
                receiver: sender,
                min_version: record::VERSION,
                max_version: record::VERSION,
            };
            self.queue_plain(&answer.encode());
            return Err(RecordDrop::OracleRefused(e));
        }
        let mut responder = Responder::new(
            self.oracle.clone(),
            self.config.capabilities,
            random_index(),
        )?;
        let n = responder.read_init(rec, &mut self.payload)?;
        let ticket = self.read_handshake_payload(n, pattern == Pattern::Ik, true)?;
        // Answer: HELLO with our capabilities, encrypted in RESP.
        let mut hello = [0u8; 16];
        let mut w = MessageWriter::new(&mut hello);
        w.hello(self.config.capabilities.0)?;
        let hello_len = w.len();
        let mut out = vec![0u8; HEADER_LEN + hello_len + 128];
        let n = responder.write_response(hello.get(..hello_len).unwrap_or(&[]), &mut out)?;
        out.truncate(n);
        self.last_rx = now;
        self.init_cache.clear();
        self.init_cache.extend_from_slice(rec);
        self.queue_plain(&out);
        self.resp_cache = out;
        let done = responder.next() == Next::Established;
        self.handshake = Some(Pending { id, responder });
        if done {
            self.established(ticket, now)
        } else {
            self.pending_ticket = ticket;
            Ok(())
        }
    }

    /// Reads a handshake payload in `self.payload[..n]`: HELLO first, AUTH and RESUME
    /// where the protocol puts them (`encrypted`). Returns the ticket, if any.
    fn read_handshake_payload(
        &mut self,
        n: usize,
        encrypted: bool,
        first: bool,
    ) -> Result<Option<SealedTicket>, RecordDrop> {
        let mut ticket = None;
        for m in vshp::MessageReader::new(self.payload.get(..n).unwrap_or(&[])) {
            match m? {
                Message::Hello { capabilities } if first => {
                    tracing::debug!(capabilities, "peer HELLO");
                }
                Message::Auth {
                    device_name,
                    platform,
                } if encrypted => {
                    tracing::info!(device = device_name, ?platform, "peer AUTH");
                    // Labels for the pairing prompt; a name that is too long or has
                    // control characters is cut or dropped, never an error.
                    let name: String = device_name
                        .chars()
                        .filter(|c| !c.is_control())
                        .scan(0usize, |len, c| {
                            *len += c.len_utf8();
                            (*len <= ipc_schema::limits::MAX_NAME_LEN).then_some(c)
                        })
                        .collect();
                    self.peer_auth = (
                        DeviceLabel::new(name)
                            .ok()
                            .filter(|n| !n.as_str().is_empty()),
                        DeviceLabel::new(platform_label(platform)).ok(),
                    );
                }
                Message::Resume { ticket: t } if encrypted => {
                    ticket =
                        Some(SealedTicket::from_slice(t).map_err(|_| {
                            RecordDrop::ProtocolViolation("RESUME ticket too long")
                        })?);
                }
                _ => {
                    return Err(RecordDrop::ProtocolViolation(
                        "message not allowed in this handshake payload",
                    ));
                }
            }
        }
        Ok(ticket)
    }

    fn on_final(&mut self, rec: &[u8], now: Duration) -> Result<(), RecordDrop> {
        let Some(hs) = self.handshake.as_mut() else {
            return Err(RecordDrop::Unexpected(RecordKind::HandshakeFinal));
        };
        if hs.responder.next() != Next::Receive {
            // A FINAL in IK, or before the RESP was written.
            return Err(RecordDrop::Unexpected(RecordKind::HandshakeFinal));
        }
        let result = hs
            .responder
            .read_final(rec, &mut self.payload)
            .map_err(RecordDrop::from)
            .and_then(|n| self.read_handshake_payload(n, true, false));
        match result {
            Ok(t) => {
                let ticket = t.or_else(|| self.pending_ticket.take());
                self.established(ticket, now)
            }
            Err(e) => {
                // The responder failed for good: forget it and its cached answer.
                self.handshake = None;
                self.pending_ticket = None;
                self.resp_cache.clear();
                self.init_cache.clear();
                Err(e)
            }
        }
    }

    fn established(
        &mut self,
        ticket: Option<SealedTicket>,
        now: Duration,
    ) -> Result<(), RecordDrop> {
        let Some(hs) = self.handshake.take() else {
            return Ok(());
        };
        let id = hs.id;
        let est = hs.responder.into_established()?;
        let session = Session::new(&est, self.config.mode, now)
            .map_err(|_| RecordDrop::ProtocolViolation("session keys unusable"))?;
        tracing::info!(
            handshake = id.0,
            pairing_code = %est.pairing_code(),
            resume = ticket.is_some(),
            "handshake established; asking the broker"
        );
        self.session = Some(session);
        self.session_id = Some(id);
        self.peer = Some(est.remote_static);
        self.last_rx = now;
        // Until the broker decides again, nothing is forwarded.
        self.phase = Phase::AwaitDecision;
        let (device_name, platform) = std::mem::take(&mut self.peer_auth);
        self.to_broker.push(WorkerToBroker::Finished {
            handshake: id,
            peer: PeerKey(est.remote_static),
            handshake_hash: est.handshake_hash,
            ticket,
            device_name,
            platform,
        });
        Ok(())
    }

    fn on_data(&mut self, rec: &mut [u8], now: Duration) -> Result<(), RecordDrop> {
        let Some(session) = self.session.as_mut() else {
            return Err(RecordDrop::Unexpected(RecordKind::Data));
        };
        let stream = self.config.mode == TransportMode::Stream;
        let plaintext = match session.open_in_place(rec, now) {
            Ok(p) => p,
            Err(e) => {
                if stream {
                    // A stream is in order and lossless: any failure is corruption.
                    tracing::warn!(error = %e, "stream record failed: closing");
                    self.end(Exit::ProtocolError);
                }
                return Err(RecordDrop::Receive(e));
            }
        };
        self.last_rx = now;
        let mut close = None;
        let mut result = Ok(());
        for m in vshp::MessageReader::new(plaintext) {
            match m {
                Ok(Message::IpPacket(batch)) => {
                    for p in batch {
                        self.forward_packet(p);
                    }
                }
                Ok(Message::Ping(k)) => self.pending_pong = Some(k),
                Ok(Message::Pong(_)) => {}
                Ok(Message::Close(reason)) => close = Some(reason),
                // Well-formed but not a client's to send: ignored (and counted).
                Ok(_) => {
                    result = Err(RecordDrop::ProtocolViolation(
                        "message a client may not send",
                    ))
                }
                Err(e) => {
                    if stream {
                        self.end(Exit::ProtocolError);
                        return Err(e.into());
                    }
                    result = Err(e.into());
                    break;
                }
            }
        }
        if let Some(k) = self.pending_pong.take() {
            let pong = Keepalive {
                seq: k.seq,
                tx_packets: self.stats.packets_delivered,
                rx_packets: self.stats.packets_received,
            };
            self.stats.pings_answered += 1;
            self.send_data(now, |w| w.pong(pong));
        }
        if let Some(reason) = close {
            tracing::info!(?reason, "peer closed the session");
            self.end(Exit::PeerClosed);
        }
        result
    }

    fn forward_packet(&mut self, p: &[u8]) {
        self.stats.packets_received += 1;
        let lease = match (&self.lease, self.phase) {
            (Some(l), Phase::Admitted) => l,
            _ => {
                self.stats.packet_drops.not_admitted += 1;
                return;
            }
        };
        if let Err(d) = packet_policy::check_outbound(p, lease, &self.config.policy) {
            self.stats.packet_drops.count(d);
            tracing::trace!(reason = %d, "packet dropped");
            return;
        }
        if !self.data_path {
            self.stats.packet_drops.no_data_path += 1;
            return;
        }
        if self.current.push(p).is_err() {
            self.flush_batch();
            if let Err(e) = self.current.push(p) {
                // Cannot happen for a packet within a lease MTU; counted, not trusted.
                tracing::warn!(error = %e, "packet does not fit an empty batch");
                self.stats.packet_drops.too_long += 1;
                return;
            }
        }
        self.stats.packets_forwarded += 1;
        self.stats.bytes_forwarded += p.len() as u64;
    }

    /// Builds and seals one DATA record whose messages `fill` writes. Returns false when
    /// there is no session or the record could not be built (counted in the log).
    fn send_data(
        &mut self,
        now: Duration,
        fill: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), MessageError>,
    ) -> bool {
        let max_record = self
            .config
            .max_record
            .clamp(DATA_OVERHEAD + 64, MAX_RECORD_LEN);
        self.seal_record(max_record, now, |w| fill(w).map(|()| 0))
            .is_some()
    }

    /// Reserves a record of `max_record` bytes, lets `fill` write the plaintext, seals.
    fn seal_record<T>(
        &mut self,
        max_record: usize,
        now: Duration,
        fill: impl FnOnce(&mut MessageWriter<'_>) -> Result<T, MessageError>,
    ) -> Option<T> {
        let session = self.session.as_mut()?;
        let start = self.records.reserve(max_record);
        let body_at = start + self.records.prefix_len();
        let result = (|| {
            let rec = self.records.buf.get_mut(body_at..body_at + max_record)?;
            let plain = rec.get_mut(HEADER_LEN..max_record - AEAD_TAG_LEN)?;
            let mut w = MessageWriter::new(plain);
            let t = fill(&mut w).ok()?;
            let n = w.len();
            let len = session.seal_in_place(rec, n, now).ok()?;
            Some((t, len))
        })();
        match result {
            Some((t, len)) => {
                self.records.commit(start, Some(len));
                self.stats.records_out += 1;
                Some(t)
            }
            None => {
                self.records.commit(start, None);
                None
            }
        }
    }

    fn send_close(&mut self, error: Option<ErrorReason>, reason: CloseReason, now: Duration) {
        self.send_close_with(error.map(|e| (e, e.describe())), reason, now);
    }

    fn send_close_with(
        &mut self,
        error: Option<(ErrorReason, &str)>,
        reason: CloseReason,
        now: Duration,
    ) {
        if self.session.is_none() {
            return;
        }
        self.send_data(now, |w| {
            if let Some((e, detail)) = error {
                w.error(e, detail)?;
            }
            w.close(reason)
        });
    }

    /// A message from the broker (descriptor-carrying ones are the driver's).
    pub fn on_broker(&mut self, msg: &BrokerToWorker, now: Duration) {
        match msg {
            BrokerToWorker::Decision {
                handshake,
                decision,
            } => {
                if Some(*handshake) != self.session_id || self.exit.is_some() {
                    tracing::debug!(handshake = handshake.0, "decision for another handshake");
                    return;
                }
                self.on_decision(decision, now);
            }
            BrokerToWorker::Shutdown { reason } => {
                let error =
                    (*reason == ShutdownReason::PeerRevoked).then_some(ErrorReason::Revoked);
                self.send_close(error, CloseReason::Shutdown, now);
                self.end(Exit::Shutdown(*reason));
            }
            BrokerToWorker::ReportCounters => {
                self.to_broker
                    .push(WorkerToBroker::Counters(self.stats.to_wire()));
            }
            BrokerToWorker::TicketSealed { request, ticket } => {
                if request.0 != self.ticket_request || self.phase != Phase::Admitted {
                    tracing::debug!(request = request.0, "ticket for another request");
                    return;
                }
                if self.send_data(now, |w| w.ticket(ticket.as_slice())) {
                    self.stats.tickets_sent += 1;
                    tracing::debug!("resume ticket sent");
                }
            }
            BrokerToWorker::LeaseChanged { lease } => self.on_lease_changed(lease, now),
            BrokerToWorker::RoamProbe { probe, record } => {
                let mut rec = record.as_slice().to_vec();
                let authenticated = self.on_roam_probe(&mut rec, now);
                self.to_broker.push(WorkerToBroker::RoamVerdict {
                    probe: *probe,
                    authenticated,
                });
            }
            BrokerToWorker::AdoptTransport { .. } | BrokerToWorker::AttachDataPath { .. } => {}
            other => tracing::debug!(message = ?other, "broker message ignored"),
        }
    }

    fn on_decision(&mut self, decision: &Decision, now: Duration) {
        match decision {
            Decision::Admit { lease, resumed } => {
                tracing::info!(lease = lease.id.0, resumed, "peer admitted");
                let caps = self.config.capabilities.0;
                let lease = lease.clone();
                let sent = self.send_data(now, |w| {
                    w.config(&lease)?;
                    w.hello(caps)
                });
                if !sent {
                    tracing::warn!("CONFIG could not be sent");
                }
                self.current.set_lease(lease.id);
                for b in &mut self.ready {
                    b.set_lease(lease.id);
                }
                self.lease = Some(lease);
                self.phase = Phase::Admitted;
                if self.config.mode == TransportMode::Datagram {
                    if let Some(s) = &self.session {
                        // Records from a new address reach the broker: it routes them
                        // here by this index (roaming, docs/resume.md).
                        let index = s.local_index().0;
                        self.to_broker.push(WorkerToBroker::RoamIndex { index });
                    }
                }
                self.request_ticket(now);
            }
            Decision::Pending => {
                if self.phase == Phase::Admitted {
                    return;
                }
                tracing::info!("peer pending approval");
                self.phase = Phase::Pending;
                self.send_data(now, |w| {
                    w.error(
                        ErrorReason::PendingApproval,
                        ErrorReason::PendingApproval.describe(),
                    )
                });
            }
            Decision::Refuse(r) => {
                tracing::info!(refusal = ?r, "peer refused");
                let error = (refusal_reason(*r), refusal_detail(*r));
                self.send_close_with(Some(error), CloseReason::Normal, now);
                self.end(Exit::Refused(*r));
            }
        }
    }

    /// The broker changed the admitted lease's configuration: the peer gets a
    /// CONFIG_DELTA with what differs (nothing is sent when nothing does). A lease with
    /// another id or other addresses is not this session's: ignored.
    fn on_lease_changed(&mut self, new: &Lease, now: Duration) {
        let Some(old) = self.lease.as_ref() else {
            return;
        };
        if self.phase != Phase::Admitted
            || (old.id, old.ipv4, old.ipv6) != (new.id, new.ipv4, new.ipv6)
        {
            tracing::debug!(lease = new.id.0, "lease change for another lease ignored");
            return;
        }
        let delta = vshp::message::ConfigDelta::between(old, new);
        self.lease = Some(new.clone());
        if delta.is_empty() {
            return;
        }
        if self.send_data(now, |w| w.config_delta(&delta)) {
            tracing::info!(?delta, "CONFIG_DELTA sent");
        } else {
            tracing::warn!("CONFIG_DELTA could not be sent");
        }
    }

    /// Roaming: a record that arrived from a new client address, through the broker.
    /// It is handled exactly like one read from the transport — opened with the session
    /// keys, checked against the replay window, its messages acted on — and is
    /// authenticated when it opened. Only an admitted datagram session roams; anything
    /// that is not a DATA record, does not open, or is a replay is not authenticated
    /// (and counted like any dropped record).
    pub fn on_roam_probe(&mut self, rec: &mut [u8], now: Duration) -> bool {
        if self.config.mode != TransportMode::Datagram || self.phase != Phase::Admitted {
            return false;
        }
        if !matches!(record::decode(rec), Ok(Record::Data { .. })) {
            self.stats.records_in += 1;
            self.stats
                .record_drops
                .count(&RecordDrop::ProtocolViolation("roaming probe is not DATA"));
            return false;
        }
        let authenticated = match self.on_record(rec, now) {
            Ok(()) => true,
            // Opened, but a message inside was refused: the sender holds the keys.
            Err(RecordDrop::BadPayload(_) | RecordDrop::ProtocolViolation(_)) => true,
            Err(_) => false,
        };
        tracing::info!(authenticated, "roaming probe");
        authenticated
    }

    /// Asks the broker to seal a resume ticket for the peer (sent as TICKET when it
    /// comes) and schedules the next one.
    fn request_ticket(&mut self, now: Duration) {
        self.ticket_request += 1;
        self.to_broker.push(WorkerToBroker::SealTicket {
            request: RequestId(self.ticket_request),
        });
        self.ticket_due = Some(now + TICKET_REFRESH);
    }

    /// Packets from the netstack for the peer: checked, packed into as few DATA records
    /// as `max_record` allows, sealed and queued.
    pub fn on_return_batch(&mut self, batch: &PacketBatch, now: Duration) {
        if self.exit.is_some() || self.session.is_none() || self.phase != Phase::Admitted {
            self.stats.packet_drops.return_rejected += batch.len() as u64;
            return;
        }
        let Some(lease) = self.lease.as_ref() else {
            return;
        };
        let mut refs: [&[u8]; MAX_BATCH_PACKETS] = [&[]; MAX_BATCH_PACKETS];
        let mut n = 0;
        for p in batch.iter() {
            match packet_policy::check_return(p, lease) {
                Ok(_) => {
                    if let Some(slot) = refs.get_mut(n) {
                        *slot = p;
                        n += 1;
                    }
                }
                Err(d) => self.stats.packet_drops.count(d),
            }
        }
        let budget = self
            .config
            .max_record
            .clamp(DATA_OVERHEAD + 64, MAX_RECORD_LEN);
        let mut i = 0;
        while i < n {
            let rest = refs.get(i..n).unwrap_or(&[]);
            let first = rest.first().map_or(0, |p| p.len());
            // One packet that needs more than the budget gets a record of its own.
            let need = DATA_OVERHEAD + 3 + 2 + first;
            let max_record = budget.max(need).min(MAX_RECORD_LEN);
            match self.seal_record(max_record, now, |w| w.ip_packets(rest)) {
                Some(taken) if taken > 0 => {
                    for p in rest.iter().take(taken) {
                        self.stats.packets_delivered += 1;
                        self.stats.bytes_delivered += p.len() as u64;
                    }
                    i += taken;
                }
                _ => {
                    self.stats.packet_drops.return_rejected += 1;
                    i += 1;
                }
            }
        }
    }
}

/// The platform of an AUTH as shown to the user.
fn platform_label(p: vshp::message::Platform) -> String {
    use vshp::message::Platform;
    match p {
        Platform::Linux => "Linux".into(),
        Platform::Android => "Android".into(),
        Platform::MacOs => "macOS".into(),
        Platform::Windows => "Windows".into(),
        Platform::Ios => "iOS".into(),
        Platform::Other(n) => format!("other ({n})"),
    }
}
