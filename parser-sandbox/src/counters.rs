//! What a worker counts (design §5.8): every dropped record and packet by reason, and
//! the traffic it moved. [`Stats::to_wire`] maps it onto the broker's
//! [`WorkerCounters`].

use ipc_schema::messages::broker_worker::WorkerCounters;
use vshp::transport::ReceiveError;

use crate::core::RecordDrop;
use crate::packet_policy::PacketDrop;

/// Records dropped, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordDrops {
    /// Not a record (bad header, empty, too long).
    pub malformed: u64,
    /// A version this worker does not speak (answered with a plaintext ERROR).
    pub unsupported_version: u64,
    /// A record kind that has no place here (RESP or ERROR from a client, DATA before
    /// keys, FINAL without a handshake waiting for it).
    pub unexpected: u64,
    /// A handshake record the responder refused (bad Noise message, wrong index, ...).
    pub handshake_failed: u64,
    /// The key holder refused to bind or serve a handshake.
    pub oracle_refused: u64,
    /// More handshakes than one worker runs (`CoreConfig::max_handshakes`).
    pub too_many_handshakes: u64,
    /// DATA replayed or behind the replay window.
    pub replayed: u64,
    /// DATA that failed to open otherwise (tag, epoch, receiver, order, expiry).
    pub unopenable: u64,
    /// An authenticated payload whose inner messages are malformed.
    pub bad_payload: u64,
    /// A well-formed message a client may not send (CONFIG, HELLO in DATA, ...).
    pub protocol_violation: u64,
}

impl RecordDrops {
    pub fn total(&self) -> u64 {
        self.malformed
            + self.unsupported_version
            + self.unexpected
            + self.handshake_failed
            + self.oracle_refused
            + self.too_many_handshakes
            + self.replayed
            + self.unopenable
            + self.bad_payload
            + self.protocol_violation
    }

    pub(crate) fn count(&mut self, e: &RecordDrop) {
        let c = match e {
            RecordDrop::Malformed(_) => &mut self.malformed,
            RecordDrop::UnsupportedVersion(_) => &mut self.unsupported_version,
            RecordDrop::Unexpected(_) => &mut self.unexpected,
            RecordDrop::Handshake(_) => &mut self.handshake_failed,
            RecordDrop::OracleRefused(_) => &mut self.oracle_refused,
            RecordDrop::TooManyHandshakes => &mut self.too_many_handshakes,
            RecordDrop::Receive(ReceiveError::Replayed(_) | ReceiveError::TooOld(_)) => {
                &mut self.replayed
            }
            RecordDrop::Receive(ReceiveError::Malformed(_)) => &mut self.malformed,
            RecordDrop::Receive(_) => &mut self.unopenable,
            RecordDrop::BadPayload(_) => &mut self.bad_payload,
            RecordDrop::ProtocolViolation(_) => &mut self.protocol_violation,
            // Not a drop of the peer's doing: the worker is shutting down.
            RecordDrop::Closed => return,
        };
        *c += 1;
    }
}

/// Packets dropped, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketDrops {
    pub truncated: u64,
    pub bad_version: u64,
    pub bad_header_length: u64,
    pub length_mismatch: u64,
    pub bad_checksum: u64,
    pub too_long: u64,
    pub spoofed_source: u64,
    pub unspecified: u64,
    pub loopback: u64,
    pub link_local: u64,
    pub multicast: u64,
    pub broadcast: u64,
    pub ipv4_mapped: u64,
    pub denied_prefix: u64,
    /// The peer sent packets before the broker admitted it (or while pending).
    pub not_admitted: u64,
    /// Valid packets dropped because no data path to the netstack exists (the gateway
    /// runs without one, or it failed). Not the peer's fault: not in `bad()`.
    pub no_data_path: u64,
    /// Return packets (netstack → peer) that failed [`crate::packet_policy::check_return`].
    pub return_rejected: u64,
}

impl PacketDrops {
    pub(crate) fn count(&mut self, d: PacketDrop) {
        let c = match d {
            PacketDrop::Truncated => &mut self.truncated,
            PacketDrop::BadVersion(_) => &mut self.bad_version,
            PacketDrop::BadHeaderLength => &mut self.bad_header_length,
            PacketDrop::LengthMismatch => &mut self.length_mismatch,
            PacketDrop::BadChecksum => &mut self.bad_checksum,
            PacketDrop::TooLong { .. } => &mut self.too_long,
            PacketDrop::SpoofedSource => &mut self.spoofed_source,
            PacketDrop::Unspecified => &mut self.unspecified,
            PacketDrop::Loopback => &mut self.loopback,
            PacketDrop::LinkLocal => &mut self.link_local,
            PacketDrop::Multicast => &mut self.multicast,
            PacketDrop::Broadcast => &mut self.broadcast,
            PacketDrop::Ipv4Mapped => &mut self.ipv4_mapped,
            PacketDrop::DeniedPrefix => &mut self.denied_prefix,
            // Only the return path checks the destination against the lease.
            PacketDrop::WrongDestination => &mut self.return_rejected,
        };
        *c += 1;
    }

    /// Malformed or oversized, not admitted, or refused on the way back.
    pub fn bad(&self) -> u64 {
        self.truncated
            + self.bad_version
            + self.bad_header_length
            + self.length_mismatch
            + self.bad_checksum
            + self.too_long
            + self.not_admitted
            + self.return_rejected
    }

    /// Refused destinations of every kind.
    pub fn forbidden(&self) -> u64 {
        self.unspecified
            + self.loopback
            + self.link_local
            + self.multicast
            + self.broadcast
            + self.ipv4_mapped
            + self.denied_prefix
    }

    pub fn total(&self) -> u64 {
        self.bad() + self.spoofed_source + self.forbidden()
    }
}

/// Everything one worker counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub records_in: u64,
    pub records_out: u64,
    /// Sealed records the transport would not take (datagram socket buffer full).
    pub records_unsent: u64,
    /// Packets the peer sent (before validation).
    pub packets_received: u64,
    /// Packets that passed validation and went to the netstack.
    pub packets_forwarded: u64,
    pub bytes_forwarded: u64,
    /// Packets from the netstack sealed and sent to the peer.
    pub packets_delivered: u64,
    pub bytes_delivered: u64,
    pub handshakes: u64,
    pub pings_answered: u64,
    /// Resume tickets sent to the peer (TICKET messages).
    pub tickets_sent: u64,
    pub record_drops: RecordDrops,
    pub packet_drops: PacketDrops,
}

impl Stats {
    /// The broker's view: replays apart, every other record drop is a bad record.
    pub fn to_wire(&self) -> WorkerCounters {
        let r = &self.record_drops;
        WorkerCounters {
            records_in: self.records_in,
            records_out: self.records_out,
            packets_forwarded: self.packets_forwarded,
            packets_delivered: self.packets_delivered,
            bytes_forwarded: self.bytes_forwarded,
            bytes_delivered: self.bytes_delivered,
            bad_records: r.total() - r.replayed,
            replayed_records: r.replayed,
            bad_packets: self.packet_drops.bad(),
            spoofed_sources: self.packet_drops.spoofed_source,
            forbidden_destinations: self.packet_drops.forbidden(),
        }
    }
}
