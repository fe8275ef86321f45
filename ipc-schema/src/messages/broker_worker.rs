//! Broker ↔ parser-sandbox worker (one worker per peer session).
//!
//! The broker hands the worker its peer's transport and its data channel to the
//! netstack (descriptors), serves as the key oracle for the Noise static key, decides
//! every policy question, and seals and opens resume tickets. The worker never holds
//! the static private key: it shows the broker the handshake's first message, then may
//! ask only for the static-key DH operations that pattern needs, once each (see
//! [`crate::oracle`]).

use serde::{Deserialize, Serialize};
use vshp::lease::{Lease, LeaseId};

use crate::bounded::{BoundedBytes, BoundedString};
use crate::codec::{InvalidMessage, Message};
use crate::limits::{MAX_FRAME_BROKER_WORKER, MAX_HANDSHAKE_MSG, MAX_NAME_LEN, MAX_TICKET_LEN};

/// A device name or platform as the peer's AUTH gave it (at most `MAX_NAME_LEN` bytes).
pub type DeviceLabel = BoundedString<MAX_NAME_LEN>;
use crate::messages::channel_ends;
use crate::messages::common::{PeerKey, RequestId, ShutdownReason};
use crate::oracle::{DhOp, HandshakePattern, OracleRefusal};

/// One handshake attempt inside one worker; chosen by the worker, unique per worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HandshakeId(pub u64);

/// How the transport descriptor carries VSHP records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransportKind {
    /// A connected UDP socket (records are datagrams).
    Datagram,
    /// A TCP connection or USB accessory stream (records are length-prefixed).
    Stream,
}

/// A Noise handshake message, opaque to this crate.
pub type HandshakeMessage = BoundedBytes<MAX_HANDSHAKE_MSG>;
/// A whole VSHP record (header and body) the broker read before handing the
/// transport over; at most [`MAX_HANDSHAKE_MSG`] bytes (the broker drops longer
/// first datagrams: no valid HANDSHAKE_INIT is that long).
pub type FirstRecord = BoundedBytes<MAX_HANDSHAKE_MSG>;
/// A DATA record from a new client address, forwarded for authentication (at most
/// [`MAX_HANDSHAKE_MSG`] bytes: the broker drops longer ones, a roaming probe needs one
/// small record).
pub type ProbeRecord = BoundedBytes<MAX_HANDSHAKE_MSG>;
/// A sealed resume ticket, opaque to everyone but the broker.
pub type SealedTicket = BoundedBytes<MAX_TICKET_LEN>;

/// Broker → worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BrokerToWorker {
    /// The peer's transport: **carries 1 descriptor** (the accepted TCP socket, or a
    /// UDP socket `connect()`ed to the peer).
    ///
    /// `first_record` is a record the broker already read from that transport before
    /// the hand-off, which the worker must process as if it had just received it: for
    /// UDP, the peer's first datagram (its HANDSHAKE_INIT record, header included),
    /// which arrived on the listening socket; `None` for streams, whose bytes all
    /// arrive on the handed-over socket.
    AdoptTransport {
        kind: TransportKind,
        first_record: Option<FirstRecord>,
    },
    /// The worker's end of its data channel to the netstack, for this lease:
    /// **carries 1 descriptor** (a connected unix stream socket).
    AttachDataPath { lease: LeaseId },
    /// The shown first message is bound; DH requests for it may follow.
    HandshakeBound { handshake: HandshakeId },
    /// The broker will not serve this handshake (the worker sends a VSHP ERROR).
    HandshakeRefused {
        handshake: HandshakeId,
        reason: OracleRefusal,
    },
    /// The result of an allowed static-key DH.
    DhResult {
        handshake: HandshakeId,
        op: DhOp,
        shared: [u8; 32],
    },
    /// A DH request outside the handshake's binding.
    DhRefused {
        handshake: HandshakeId,
        op: DhOp,
        reason: OracleRefusal,
    },
    /// The broker's decision about a finished handshake.
    Decision {
        handshake: HandshakeId,
        decision: Decision,
    },
    /// A ticket sealed for this session's lease.
    TicketSealed {
        request: RequestId,
        ticket: SealedTicket,
    },
    /// The outcome of opening a presented ticket.
    TicketOpened {
        request: RequestId,
        outcome: TicketOutcome,
    },
    /// The admitted lease's configuration changed on the gateway (DNS, MTU, routes,
    /// expiry; never its id or addresses): the worker sends the peer a CONFIG_DELTA
    /// with what differs from the lease it has, and keeps this one.
    LeaseChanged { lease: Lease },
    /// Roaming (UDP): a DATA record that reached the broker's listener from an address
    /// other than the peer's, carrying this session's receiver index. The worker opens
    /// it as if it had read it (AEAD, replay window) and answers `RoamVerdict`; nothing
    /// moves unless it authenticates.
    RoamProbe { probe: u64, record: ProbeRecord },
    /// Roaming (UDP): probe `probe` authenticated, so the session moves: **carries 1
    /// descriptor**, a UDP socket bound like the first and `connect()`ed to the
    /// probe's source address. The worker reads and writes it from now on and closes
    /// the old one.
    MoveTransport { probe: u64 },
    /// Send your counters.
    ReportCounters,
    /// Close the session (send VSHP CLOSE) and exit.
    Shutdown { reason: ShutdownReason },
}

/// Worker → broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerToBroker {
    /// The first handshake message as received from the peer, to bind DH requests to.
    ShowHandshake {
        handshake: HandshakeId,
        pattern: HandshakePattern,
        first_message: HandshakeMessage,
    },
    /// DH(gateway static, `remote`) for one token of a bound handshake.
    DhRequest {
        handshake: HandshakeId,
        op: DhOp,
        remote: [u8; 32],
    },
    /// "Peer X finished a handshake: decide." `handshake_hash` derives the pairing code;
    /// `ticket` is a resume ticket the client presented inside the handshake, if any.
    /// `device_name` and `platform` are what the peer's AUTH claimed (shown with a
    /// pairing request; unauthenticated labels, never used for a decision), `None` when
    /// it sent no AUTH.
    Finished {
        handshake: HandshakeId,
        peer: PeerKey,
        handshake_hash: [u8; 32],
        ticket: Option<SealedTicket>,
        device_name: Option<DeviceLabel>,
        platform: Option<DeviceLabel>,
    },
    /// Seal a resume ticket for the current session's lease.
    SealTicket {
        request: RequestId,
    },
    /// Open a ticket presented outside a handshake (RESUME record).
    OpenTicket {
        request: RequestId,
        peer: PeerKey,
        ticket: SealedTicket,
    },
    Counters(WorkerCounters),
    /// Roaming (UDP): the receiver index the peer's DATA records carry in the admitted
    /// session (sent at each admission; a new handshake brings a new index).
    RoamIndex {
        index: u32,
    },
    /// Roaming (UDP): whether probe `probe`'s record opened (authentic, not a replay).
    RoamVerdict {
        probe: u64,
        authenticated: bool,
    },
    /// The session is over (peer CLOSE, timeout, transport error).
    SessionEnded {
        reason: SessionEnd,
    },
}

/// The broker's answer to [`WorkerToBroker::Finished`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    /// Trusted: forward packets under this lease (`resumed` when a ticket restored it).
    Admit { lease: Lease, resumed: bool },
    /// Unknown peer, pairing requested: the user must approve; no packet is forwarded.
    Pending,
    /// No: the worker sends a VSHP ERROR with this reason and closes.
    Refuse(Refusal),
}

/// Why the broker refuses a peer (mirrors VSHP's typed ERROR reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    NotApproved,
    Revoked,
    VpnUnavailable,
    Overload,
    PairingDenied,
    /// The pairing request was neither approved nor denied in time.
    PairingExpired,
    /// The RESUME ticket presented inside the handshake gets nothing back: not sealed
    /// by this gateway run (forged, or from before a restart: the ticket key is fresh
    /// at every start), expired, another peer's, already redeemed, or its lease is gone.
    /// The client drops the ticket and connects again without RESUME (`resume.md`).
    BadTicket,
}

/// What opening a ticket gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TicketOutcome {
    Valid { lease: Lease },
    Refused(TicketRefusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TicketRefusal {
    /// Not sealed by this gateway, or tampered with.
    Invalid,
    Expired,
    /// Sealed for another peer's static key.
    WrongPeer,
    /// The peer was revoked since: its tickets died with it.
    Revoked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionEnd {
    PeerClosed,
    Timeout,
    TransportError,
    ProtocolError,
}

/// What a worker counts (design §5.8: bad input of any kind gets a counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WorkerCounters {
    pub records_in: u64,
    pub records_out: u64,
    pub packets_forwarded: u64,
    pub packets_delivered: u64,
    pub bytes_forwarded: u64,
    pub bytes_delivered: u64,
    pub bad_records: u64,
    pub replayed_records: u64,
    pub bad_packets: u64,
    pub spoofed_sources: u64,
    pub forbidden_destinations: u64,
}

impl WorkerCounters {
    /// Adds `other` field by field (saturating), for totals over many workers.
    pub fn add(&mut self, other: &Self) {
        let Self {
            records_in,
            records_out,
            packets_forwarded,
            packets_delivered,
            bytes_forwarded,
            bytes_delivered,
            bad_records,
            replayed_records,
            bad_packets,
            spoofed_sources,
            forbidden_destinations,
        } = other;
        self.records_in = self.records_in.saturating_add(*records_in);
        self.records_out = self.records_out.saturating_add(*records_out);
        self.packets_forwarded = self.packets_forwarded.saturating_add(*packets_forwarded);
        self.packets_delivered = self.packets_delivered.saturating_add(*packets_delivered);
        self.bytes_forwarded = self.bytes_forwarded.saturating_add(*bytes_forwarded);
        self.bytes_delivered = self.bytes_delivered.saturating_add(*bytes_delivered);
        self.bad_records = self.bad_records.saturating_add(*bad_records);
        self.replayed_records = self.replayed_records.saturating_add(*replayed_records);
        self.bad_packets = self.bad_packets.saturating_add(*bad_packets);
        self.spoofed_sources = self.spoofed_sources.saturating_add(*spoofed_sources);
        self.forbidden_destinations = self
            .forbidden_destinations
            .saturating_add(*forbidden_destinations);
    }
}

impl Message for BrokerToWorker {
    fn fd_count(&self) -> usize {
        match self {
            Self::AdoptTransport { .. }
            | Self::AttachDataPath { .. }
            | Self::MoveTransport { .. } => 1,
            _ => 0,
        }
    }

    fn validate(&self) -> Result<(), InvalidMessage> {
        match self {
            Self::Decision {
                decision: Decision::Admit { lease, .. },
                ..
            }
            | Self::TicketOpened {
                outcome: TicketOutcome::Valid { lease },
                ..
            }
            | Self::LeaseChanged { lease } => Ok(lease.validate()?),
            _ => Ok(()),
        }
    }
}

impl Message for WorkerToBroker {}

channel_ends! {
    BrokerWorker,
    BrokerEnd(Broker) sends BrokerToWorker, max MAX_FRAME_BROKER_WORKER;
    WorkerEnd(Worker) sends WorkerToBroker, max MAX_FRAME_BROKER_WORKER;
}
