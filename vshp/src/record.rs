//! Records: the unit a transport carries (one per datagram, length-prefixed on streams).
//!
//! Every record of every version starts with the version byte, so a peer that speaks
//! another version is recognised from the first byte and answered with a typed error.
//! Decoding borrows from the input and never allocates; every length is checked before
//! it is used, so no accessor can panic (smoltcp's rule).

use crate::message::ErrorReason;

/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Largest record on any transport: the Noise message limit.
pub const MAX_RECORD_LEN: usize = 65_535;
/// Length of the handshake and data record headers.
pub const HEADER_LEN: usize = 16;
/// Length of a plaintext ERROR record.
pub const ERROR_RECORD_LEN: usize = 10;
/// Length of the ChaCha20-Poly1305 tag that ends every DATA record.
pub const AEAD_TAG_LEN: usize = 16;
/// Most plaintext bytes one DATA record can carry.
pub const MAX_DATA_PLAINTEXT: usize = MAX_RECORD_LEN - HEADER_LEN - AEAD_TAG_LEN;

/// What a record is, from its second byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// Client → gateway, Noise message 1.
    HandshakeInit = 1,
    /// Gateway → client, Noise message 2.
    HandshakeResp = 2,
    /// Client → gateway, Noise message 3 (XX only).
    HandshakeFinal = 3,
    /// An AEAD-sealed record of an established session.
    Data = 4,
    /// A plaintext, unauthenticated error sent before a session exists.
    Error = 5,
}

impl RecordKind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::HandshakeInit,
            2 => Self::HandshakeResp,
            3 => Self::HandshakeFinal,
            4 => Self::Data,
            5 => Self::Error,
            _ => return None,
        })
    }
}

/// The Noise handshake pattern a session uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Pattern {
    /// First contact: neither side knows the other's static key.
    Xx = 0,
    /// The client holds the gateway's static key from an invite.
    Ik = 1,
}

impl Pattern {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Xx),
            1 => Some(Self::Ik),
            _ => None,
        }
    }

    /// The Noise protocol name this pattern runs.
    pub fn noise_name(self) -> &'static str {
        match self {
            Self::Xx => "Noise_XX_25519_ChaChaPoly_BLAKE2s",
            Self::Ik => "Noise_IK_25519_ChaChaPoly_BLAKE2s",
        }
    }
}

/// Capability bits a peer announces in every handshake record. Unknown bits are ignored,
/// so later versions can add capabilities without breaking older peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Capabilities(pub u32);

impl Capabilities {
    /// The sender can carry IPv6 packets.
    pub const IPV6: u32 = 1 << 0;
    /// The sender understands RESUME (session resumption with a ticket).
    pub const RESUME: u32 = 1 << 1;
    /// The sender accepts CONFIG_DELTA messages.
    pub const CONFIG_DELTA: u32 = 1 << 2;
    /// Everything this implementation supports.
    pub const ALL_V1: Self = Self(Self::IPV6 | Self::RESUME | Self::CONFIG_DELTA);

    /// Whether every bit of `bits` is set.
    pub fn has(self, bits: u32) -> bool {
        self.0 & bits == bits
    }
}

/// A session index chosen by one side (random, non-zero) so the other side can find the
/// session a record belongs to without trusting the transport address (roaming).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionIndex(pub u32);

/// The header of HANDSHAKE_INIT, HANDSHAKE_RESP and HANDSHAKE_FINAL records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HandshakeHeader {
    /// One of the three handshake kinds.
    pub kind: RecordKind,
    pub pattern: Pattern,
    pub capabilities: Capabilities,
    /// The sender's own session index.
    pub sender: SessionIndex,
    /// The receiver's session index; zero in HANDSHAKE_INIT.
    pub receiver: SessionIndex,
}

impl HandshakeHeader {
    /// The 16 bytes that start the record.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0] = VERSION;
        h[1] = self.kind as u8;
        h[2] = self.pattern as u8;
        h[4..8].copy_from_slice(&self.capabilities.0.to_be_bytes());
        h[8..12].copy_from_slice(&self.sender.0.to_be_bytes());
        h[12..16].copy_from_slice(&self.receiver.0.to_be_bytes());
        h
    }
}

/// The header of a DATA record. It is also the AEAD's associated data, so every field
/// is authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DataHeader {
    /// Which rotated key sealed the record (wraps modulo 256).
    pub key_epoch: u8,
    /// The receiver's session index.
    pub receiver: SessionIndex,
    /// The AEAD nonce: never reused under one key.
    pub counter: u64,
}

impl DataHeader {
    /// The 16 bytes that start the record.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0] = VERSION;
        h[1] = RecordKind::Data as u8;
        h[2] = self.key_epoch;
        h[4..8].copy_from_slice(&self.receiver.0.to_be_bytes());
        h[8..16].copy_from_slice(&self.counter.to_be_bytes());
        h
    }
}

/// A plaintext ERROR record: sent before any session keys exist (unsupported version,
/// overload), so it is advisory only — anyone on the path could forge it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorRecord {
    pub reason: ErrorReason,
    /// The sender index of the record being answered (zero when it could not be read).
    pub receiver: SessionIndex,
    /// The oldest version the sender speaks.
    pub min_version: u8,
    /// The newest version the sender speaks.
    pub max_version: u8,
}

impl ErrorRecord {
    /// The answer to a record of a version this implementation does not speak.
    pub fn unsupported_version() -> Self {
        Self {
            reason: ErrorReason::UnsupportedVersion,
            receiver: SessionIndex(0),
            min_version: VERSION,
            max_version: VERSION,
        }
    }

    /// The record's bytes.
    pub fn encode(&self) -> [u8; ERROR_RECORD_LEN] {
        let mut r = [0u8; ERROR_RECORD_LEN];
        r[0] = VERSION;
        r[1] = RecordKind::Error as u8;
        r[2] = self.reason as u8;
        r[4..8].copy_from_slice(&self.receiver.0.to_be_bytes());
        r[8] = self.min_version;
        r[9] = self.max_version;
        r
    }
}

/// A decoded record, borrowing its body from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    /// A handshake record; `noise` is the Noise handshake message after the header.
    Handshake {
        header: HandshakeHeader,
        /// The raw 16 header bytes (HANDSHAKE_INIT's are part of the Noise prologue).
        raw_header: &'a [u8; HEADER_LEN],
        noise: &'a [u8],
    },
    /// A sealed data record; `sealed` is ciphertext and tag.
    Data {
        header: DataHeader,
        /// The raw 16 header bytes: the AEAD's associated data.
        raw_header: &'a [u8; HEADER_LEN],
        sealed: &'a [u8],
    },
    /// A plaintext error record.
    Error(ErrorRecord),
}

/// Why a record was refused. Each variant is a counted drop for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("empty record")]
    Empty,
    #[error("record of {0} bytes exceeds the maximum of {MAX_RECORD_LEN}")]
    TooLong(usize),
    #[error("unsupported protocol version {0} (this side speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("truncated {kind:?} record: {got} bytes, at least {need} needed")]
    Truncated {
        kind: RecordKind,
        need: usize,
        got: usize,
    },
    #[error("{0:?} record has trailing bytes")]
    TrailingBytes(RecordKind),
    #[error("reserved header byte is not zero")]
    ReservedNotZero,
    #[error("unknown handshake pattern {0}")]
    UnknownPattern(u8),
    #[error("handshake record has a zero sender index")]
    ZeroSenderIndex,
    #[error("unknown error reason {0}")]
    UnknownErrorReason(u8),
}

fn be_u32(b: &[u8; HEADER_LEN], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(w)
}

/// Decodes one record. Never allocates, never panics.
pub fn decode(buf: &[u8]) -> Result<Record<'_>, RecordError> {
    if buf.len() > MAX_RECORD_LEN {
        return Err(RecordError::TooLong(buf.len()));
    }
    let (&version, rest) = buf.split_first().ok_or(RecordError::Empty)?;
    if version != VERSION {
        return Err(RecordError::UnsupportedVersion(version));
    }
    let &kind_byte = rest.first().ok_or(RecordError::UnknownKind(0))?;
    let kind = RecordKind::from_u8(kind_byte).ok_or(RecordError::UnknownKind(kind_byte))?;
    if kind == RecordKind::Error {
        return decode_error(buf);
    }
    let (raw_header, body) =
        buf.split_first_chunk::<HEADER_LEN>()
            .ok_or(RecordError::Truncated {
                kind,
                need: HEADER_LEN,
                got: buf.len(),
            })?;
    if raw_header[3] != 0 {
        return Err(RecordError::ReservedNotZero);
    }
    if kind == RecordKind::Data {
        if body.len() < AEAD_TAG_LEN {
            return Err(RecordError::Truncated {
                kind,
                need: HEADER_LEN + AEAD_TAG_LEN,
                got: buf.len(),
            });
        }
        let mut counter = [0u8; 8];
        counter.copy_from_slice(&raw_header[8..16]);
        let header = DataHeader {
            key_epoch: raw_header[2],
            receiver: SessionIndex(be_u32(raw_header, 4)),
            counter: u64::from_be_bytes(counter),
        };
        return Ok(Record::Data {
            header,
            raw_header,
            sealed: body,
        });
    }
    let pattern =
        Pattern::from_u8(raw_header[2]).ok_or(RecordError::UnknownPattern(raw_header[2]))?;
    let header = HandshakeHeader {
        kind,
        pattern,
        capabilities: Capabilities(be_u32(raw_header, 4)),
        sender: SessionIndex(be_u32(raw_header, 8)),
        receiver: SessionIndex(be_u32(raw_header, 12)),
    };
    if header.sender.0 == 0 {
        return Err(RecordError::ZeroSenderIndex);
    }
    Ok(Record::Handshake {
        header,
        raw_header,
        noise: body,
    })
}

fn decode_error(buf: &[u8]) -> Result<Record<'_>, RecordError> {
    let kind = RecordKind::Error;
    let r: &[u8; ERROR_RECORD_LEN] = match buf.len() {
        n if n < ERROR_RECORD_LEN => {
            return Err(RecordError::Truncated {
                kind,
                need: ERROR_RECORD_LEN,
                got: n,
            });
        }
        ERROR_RECORD_LEN => buf.first_chunk().ok_or(RecordError::Empty)?,
        _ => return Err(RecordError::TrailingBytes(kind)),
    };
    if r[3] != 0 {
        return Err(RecordError::ReservedNotZero);
    }
    let reason = ErrorReason::from_u8(r[2]).ok_or(RecordError::UnknownErrorReason(r[2]))?;
    let mut idx = [0u8; 4];
    idx.copy_from_slice(&r[4..8]);
    Ok(Record::Error(ErrorRecord {
        reason,
        receiver: SessionIndex(u32::from_be_bytes(idx)),
        min_version: r[8],
        max_version: r[9],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init() -> HandshakeHeader {
        HandshakeHeader {
            kind: RecordKind::HandshakeInit,
            pattern: Pattern::Ik,
            capabilities: Capabilities::ALL_V1,
            sender: SessionIndex(0x0102_0304),
            receiver: SessionIndex(0),
        }
    }

    #[test]
    fn handshake_header_round_trips() {
        let mut rec = init().encode().to_vec();
        rec.extend_from_slice(b"noise");
        match decode(&rec) {
            Ok(Record::Handshake { header, noise, .. }) => {
                assert_eq!(header, init());
                assert_eq!(noise, b"noise");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn data_header_round_trips() {
        let h = DataHeader {
            key_epoch: 3,
            receiver: SessionIndex(9),
            counter: u64::MAX - 1,
        };
        let mut rec = h.encode().to_vec();
        rec.extend_from_slice(&[0u8; AEAD_TAG_LEN]);
        match decode(&rec) {
            Ok(Record::Data {
                header,
                sealed,
                raw_header,
            }) => {
                assert_eq!(header, h);
                assert_eq!(sealed.len(), AEAD_TAG_LEN);
                assert_eq!(raw_header, &h.encode());
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn error_record_round_trips() {
        let e = ErrorRecord {
            receiver: SessionIndex(77),
            ..ErrorRecord::unsupported_version()
        };
        assert_eq!(decode(&e.encode()), Ok(Record::Error(e)));
        let mut long = e.encode().to_vec();
        long.push(0);
        assert_eq!(
            decode(&long),
            Err(RecordError::TrailingBytes(RecordKind::Error))
        );
    }

    #[test]
    fn unknown_version_is_a_typed_error_from_the_first_byte() {
        assert_eq!(decode(&[2]), Err(RecordError::UnsupportedVersion(2)));
        assert_eq!(
            decode(&[0, 1, 2, 3]),
            Err(RecordError::UnsupportedVersion(0))
        );
    }

    #[test]
    fn malformed_headers_are_refused() {
        assert_eq!(decode(&[]), Err(RecordError::Empty));
        assert_eq!(decode(&[VERSION]), Err(RecordError::UnknownKind(0)));
        assert_eq!(decode(&[VERSION, 9]), Err(RecordError::UnknownKind(9)));
        let mut h = init().encode();
        h[3] = 1;
        assert_eq!(decode(&h), Err(RecordError::ReservedNotZero));
        let mut h = init().encode();
        h[2] = 7;
        assert_eq!(decode(&h), Err(RecordError::UnknownPattern(7)));
        let mut h = init().encode();
        h[8..12].fill(0);
        assert_eq!(decode(&h), Err(RecordError::ZeroSenderIndex));
        let d = DataHeader {
            key_epoch: 0,
            receiver: SessionIndex(1),
            counter: 0,
        }
        .encode();
        assert!(matches!(
            decode(&d),
            Err(RecordError::Truncated {
                kind: RecordKind::Data,
                ..
            })
        ));
        assert_eq!(
            decode(&vec![VERSION; MAX_RECORD_LEN + 1]),
            Err(RecordError::TooLong(MAX_RECORD_LEN + 1))
        );
    }

    #[test]
    fn every_prefix_of_a_valid_record_decodes_or_fails_typed() {
        let mut rec = init().encode().to_vec();
        rec.extend_from_slice(&[0xAA; 48]);
        for n in 0..=rec.len() {
            let _ = decode(&rec[..n]);
        }
    }
}
