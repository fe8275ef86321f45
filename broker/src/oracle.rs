//! The key-oracle policy for one worker, sans-IO: which handshakes it has shown
//! (`ShowHandshake`) and which static-key DHs it may still ask for (design §2; the
//! rule itself is `vshp::key_oracle::HandshakeDhGuard`).

use std::collections::HashMap;

use ipc_schema::messages::broker_worker::HandshakeId;
use ipc_schema::oracle::{DhOp, HandshakePattern, OracleRefusal};
use vshp::key_oracle::{HandshakeDhGuard, OracleError};
use vshp::record::{self, Pattern, Record};

/// At most this many handshakes are bound per worker at once (a session plus its
/// re-handshake); showing another forgets the oldest.
pub const MAX_BOUND_PER_WORKER: usize = 2;

#[derive(Debug)]
struct Bound {
    pattern: HandshakePattern,
    guard: HandshakeDhGuard,
    /// IK: the remote of `ss`, i.e. the initiator's static key.
    ss_remote: Option<[u8; 32]>,
}

#[derive(Debug, Default)]
pub struct Bindings {
    bound: HashMap<HandshakeId, Bound>,
}

/// Why a `Finished` does not match what the broker saw of the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FinishError {
    #[error("the handshake was never shown")]
    NotBound,
    #[error("the handshake did not use all static-key DHs its pattern needs")]
    Incomplete,
    #[error("the claimed peer key is not the static key the IK handshake used")]
    PeerMismatch,
}

impl Bindings {
    /// Binds a shown HANDSHAKE_INIT record (header included) to `handshake`.
    pub fn show(
        &mut self,
        handshake: HandshakeId,
        pattern: HandshakePattern,
        init_record: &[u8],
    ) -> Result<(), OracleRefusal> {
        let guard = HandshakeDhGuard::from_init_record(init_record)
            .map_err(|_| OracleRefusal::FirstMessageTooShort)?;
        let shown = match record::decode(init_record) {
            Ok(Record::Handshake { header, .. }) => header.pattern,
            _ => return Err(OracleRefusal::FirstMessageTooShort),
        };
        let claimed = match pattern {
            HandshakePattern::Xx => Pattern::Xx,
            HandshakePattern::Ik => Pattern::Ik,
        };
        if shown != claimed {
            return Err(OracleRefusal::NotInPattern);
        }
        if !self.bound.contains_key(&handshake) && self.bound.len() >= MAX_BOUND_PER_WORKER {
            if let Some(oldest) = self.bound.keys().min_by_key(|h| h.0).copied() {
                self.bound.remove(&oldest);
            }
        }
        self.bound.insert(
            handshake,
            Bound {
                pattern,
                guard,
                ss_remote: None,
            },
        );
        Ok(())
    }

    /// Allows (and uses up) one DH of a bound handshake, or says why not.
    pub fn check_dh(
        &mut self,
        handshake: HandshakeId,
        op: DhOp,
        remote: &[u8; 32],
    ) -> Result<(), OracleRefusal> {
        let b = self
            .bound
            .get_mut(&handshake)
            .ok_or(OracleRefusal::UnknownHandshake)?;
        let ops = b.pattern.static_ops();
        let used = usize::from(b.guard.used());
        if !ops.contains(&op) {
            return Err(OracleRefusal::NotInPattern);
        }
        if ops.get(..used).is_some_and(|done| done.contains(&op)) {
            return Err(OracleRefusal::AlreadyUsed);
        }
        if ops.get(used) != Some(&op) {
            return Err(OracleRefusal::OutOfOrder);
        }
        b.guard.check(remote).map_err(|e| match e {
            OracleError::Refused(m) if m.contains("first DH") => OracleRefusal::RemoteMismatch,
            _ => OracleRefusal::AlreadyUsed,
        })?;
        if op == DhOp::Ss {
            b.ss_remote = Some(*remote);
        }
        Ok(())
    }

    /// The worker says `handshake` finished with `peer`: forget the binding and check
    /// what the broker can — every static-key DH of the pattern was done, and for IK the
    /// claimed peer is the static key `ss` was computed with. (In XX the initiator's
    /// static key never meets the gateway's, so the claim cannot be checked here.)
    pub fn finish(&mut self, handshake: HandshakeId, peer: &[u8; 32]) -> Result<(), FinishError> {
        let b = self.bound.remove(&handshake).ok_or(FinishError::NotBound)?;
        if b.guard.used() < b.guard.budget() {
            return Err(FinishError::Incomplete);
        }
        match (b.pattern, b.ss_remote) {
            (HandshakePattern::Ik, Some(s)) if &s != peer => Err(FinishError::PeerMismatch),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vshp::handshake::Initiator;
    use vshp::key_oracle::StaticKeypair;
    use vshp::record::{Capabilities, SessionIndex};

    fn init(ik: bool) -> (Vec<u8>, [u8; 32]) {
        let gw = StaticKeypair::from_private([9; 32]).unwrap();
        let me = StaticKeypair::from_private([3; 32]).unwrap();
        let mut i = Initiator::new(
            me,
            ik.then(|| gw.public_key()),
            Capabilities::ALL_V1,
            SessionIndex(5),
        )
        .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = i.write_init(&[], &mut buf).unwrap();
        buf.truncate(n);
        let mut e = [0u8; 32];
        e.copy_from_slice(&buf[16..48]);
        (buf, e)
    }

    #[test]
    fn xx_allows_one_es_on_the_shown_ephemeral() {
        let (rec, e) = init(false);
        let mut b = Bindings::default();
        let h = HandshakeId(1);
        assert_eq!(
            b.check_dh(h, DhOp::Es, &e),
            Err(OracleRefusal::UnknownHandshake)
        );
        assert_eq!(
            b.show(h, HandshakePattern::Ik, &rec),
            Err(OracleRefusal::NotInPattern)
        );
        b.show(h, HandshakePattern::Xx, &rec).unwrap();
        assert_eq!(
            b.check_dh(h, DhOp::Ss, &e),
            Err(OracleRefusal::NotInPattern)
        );
        assert_eq!(
            b.check_dh(h, DhOp::Es, &[7; 32]),
            Err(OracleRefusal::RemoteMismatch)
        );
        b.check_dh(h, DhOp::Es, &e).unwrap();
        assert_eq!(b.check_dh(h, DhOp::Es, &e), Err(OracleRefusal::AlreadyUsed));
        assert_eq!(b.finish(h, &[4; 32]), Ok(()));
        assert_eq!(b.finish(h, &[4; 32]), Err(FinishError::NotBound));
        // Finished before the DH the pattern needs: not a real handshake.
        b.show(h, HandshakePattern::Xx, &rec).unwrap();
        assert_eq!(b.finish(h, &[4; 32]), Err(FinishError::Incomplete));
    }

    #[test]
    fn ik_allows_es_then_ss_once_each() {
        let (rec, e) = init(true);
        let mut b = Bindings::default();
        let h = HandshakeId(2);
        b.show(h, HandshakePattern::Ik, &rec).unwrap();
        assert_eq!(
            b.check_dh(h, DhOp::Ss, &[1; 32]),
            Err(OracleRefusal::OutOfOrder)
        );
        b.check_dh(h, DhOp::Es, &e).unwrap();
        b.check_dh(h, DhOp::Ss, &[1; 32]).unwrap();
        assert_eq!(
            b.check_dh(h, DhOp::Ss, &[1; 32]),
            Err(OracleRefusal::AlreadyUsed)
        );
    }

    #[test]
    fn garbage_and_too_many_bindings() {
        let mut b = Bindings::default();
        assert_eq!(
            b.show(HandshakeId(1), HandshakePattern::Xx, &[1, 1, 0]),
            Err(OracleRefusal::FirstMessageTooShort)
        );
        let (rec, e) = init(false);
        for i in 1..=3 {
            b.show(HandshakeId(i), HandshakePattern::Xx, &rec).unwrap();
        }
        // The oldest binding was forgotten.
        assert_eq!(
            b.check_dh(HandshakeId(1), DhOp::Es, &e),
            Err(OracleRefusal::UnknownHandshake)
        );
        b.check_dh(HandshakeId(3), DhOp::Es, &e).unwrap();
    }
}
