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
//! broker can only hold it to "once, after es". The broker applies this rule with
//! [`OracleBinding`]; it adds rate limits of its own.

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

/// One shown handshake and what it has used of the oracle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OracleBinding {
    pattern: HandshakePattern,
    initiator_ephemeral: [u8; 32],
    /// How many of `pattern.static_ops()` were served, in order.
    served: usize,
}

impl OracleBinding {
    /// Binds a handshake to its first message, which starts with the initiator's
    /// ephemeral public key in clear (true for XX and IK).
    pub fn bind(pattern: HandshakePattern, first_message: &[u8]) -> Result<Self, OracleRefusal> {
        let e = first_message
            .get(..32)
            .ok_or(OracleRefusal::FirstMessageTooShort)?;
        let mut initiator_ephemeral = [0u8; 32];
        initiator_ephemeral.copy_from_slice(e);
        Ok(Self {
            pattern,
            initiator_ephemeral,
            served: 0,
        })
    }

    pub fn pattern(&self) -> HandshakePattern {
        self.pattern
    }

    /// Allows `op` against `remote` at most once, in pattern order; the caller computes
    /// the DH only after `Ok`.
    pub fn authorize(&mut self, op: DhOp, remote: &[u8; 32]) -> Result<(), OracleRefusal> {
        let ops = self.pattern.static_ops();
        let pos = ops
            .iter()
            .position(|&o| o == op)
            .ok_or(OracleRefusal::NotInPattern)?;
        if pos < self.served {
            return Err(OracleRefusal::AlreadyUsed);
        }
        if pos > self.served {
            return Err(OracleRefusal::OutOfOrder);
        }
        if op == DhOp::Es && remote != &self.initiator_ephemeral {
            return Err(OracleRefusal::RemoteMismatch);
        }
        self.served = pos + 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_message() -> Vec<u8> {
        let mut m = vec![7u8; 32];
        m.extend_from_slice(&[1, 2, 3]);
        m
    }

    #[test]
    fn xx_allows_es_once() {
        let mut b = OracleBinding::bind(HandshakePattern::Xx, &first_message()).unwrap();
        assert_eq!(
            b.authorize(DhOp::Ss, &[7; 32]),
            Err(OracleRefusal::NotInPattern)
        );
        assert_eq!(
            b.authorize(DhOp::Es, &[8; 32]),
            Err(OracleRefusal::RemoteMismatch)
        );
        assert_eq!(b.authorize(DhOp::Es, &[7; 32]), Ok(()));
        assert_eq!(
            b.authorize(DhOp::Es, &[7; 32]),
            Err(OracleRefusal::AlreadyUsed)
        );
    }

    #[test]
    fn ik_allows_es_then_ss_once_each() {
        let mut b = OracleBinding::bind(HandshakePattern::Ik, &first_message()).unwrap();
        assert_eq!(
            b.authorize(DhOp::Ss, &[9; 32]),
            Err(OracleRefusal::OutOfOrder)
        );
        assert_eq!(b.authorize(DhOp::Es, &[7; 32]), Ok(()));
        assert_eq!(b.authorize(DhOp::Ss, &[9; 32]), Ok(()));
        assert_eq!(
            b.authorize(DhOp::Ss, &[9; 32]),
            Err(OracleRefusal::AlreadyUsed)
        );
        assert_eq!(
            b.authorize(DhOp::Es, &[7; 32]),
            Err(OracleRefusal::AlreadyUsed)
        );
    }

    #[test]
    fn short_first_message_is_refused() {
        assert_eq!(
            OracleBinding::bind(HandshakePattern::Xx, &[0; 31]),
            Err(OracleRefusal::FirstMessageTooShort)
        );
    }
}
