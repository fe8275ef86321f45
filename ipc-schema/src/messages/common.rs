//! Small types more than one boundary uses.

use serde::{Deserialize, Serialize};

/// A peer's Noise static public key (X25519).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerKey(pub [u8; 32]);

/// Pairs a request with its reply on channels where several may be in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RequestId(pub u64);

/// Why a process is told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShutdownReason {
    /// The gateway is stopping.
    GatewayStopping,
    /// The peer was revoked: cut it off now (design §5.5).
    PeerRevoked,
    /// The peer's session ended or timed out.
    SessionEnded,
    /// The broker saw this process misbehave (a bad message, a DH request outside its
    /// binding); it is being replaced.
    Misbehaved,
}
