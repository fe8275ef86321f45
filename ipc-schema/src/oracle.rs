//! The key oracle's rule: which static-key DH operations a worker may ask for.
//!
//! The gateway's static private key stays in the broker (the OpenSSH monitor pattern).
//! A worker first shows the broker the handshake's first message; the broker binds the
//! handshake to it and then computes only the DH operations in which the *responder's
//! static key* takes part, once each, in pattern order:
//!
//! - XX (`-> e; <- e, ee, s, es; -> s, se`): `es` = DH(s, initiator's e), message 2.
//! - IK (`<- s; -> e, es, s, ss; <- e, ee, se`): `es` = DH(s, initiator's e), then
//!   `ss` = DH(s, initiator's s), both while reading message 1.
//!
//! Every other DH of the responder (`ee`, `se`) uses its ephemeral key, which stays in
//! the worker. For `es` the remote key must be the ephemeral in clear at the start of
//! the shown first message; `ss`'s remote key is encrypted in that message, so the
//! broker can only hold it to "once, after es". The rule itself is protocol knowledge
//! and lives in `vshp::key_oracle::HandshakeDhGuard` (tested against real handshakes);
//! this module only names the operations and refusals that cross the boundary. The
//! broker adds rate limits of its own.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The Noise patterns a gateway answers as responder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HandshakePattern {
    /// First contact: nothing known in advance.
    Xx,
    /// From an invite that carried the gateway's public key.
    Ik,
}

/// A DH token that involves the responder's static key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DhOp {
    Es,
    Ss,
}

impl HandshakePattern {
    /// The static-key operations the responder performs, in order.
    pub const fn static_ops(self) -> &'static [DhOp] {
        match self {
            Self::Xx => &[DhOp::Es],
            Self::Ik => &[DhOp::Es, DhOp::Ss],
        }
    }
}

/// Why the oracle refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum OracleRefusal {
    #[error("no handshake with this id was shown")]
    UnknownHandshake,
    #[error("the first message is too short to hold the initiator's ephemeral key")]
    FirstMessageTooShort,
    #[error("this pattern's responder never needs that DH")]
    NotInPattern,
    #[error("that DH was already computed for this handshake")]
    AlreadyUsed,
    #[error("that DH is requested before the one the pattern does first")]
    OutOfOrder,
    #[error("the remote key is not the ephemeral key of the shown first message")]
    RemoteMismatch,
    #[error("too many handshakes from this worker")]
    RateLimited,
}
