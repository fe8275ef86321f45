//! The admission decision, sans-IO: what the broker answers a worker's `Finished`.

use ipc_schema::messages::broker_worker::Refusal;

use crate::peers::PeerStatus;

/// What to do with a peer that completed a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Trusted and sharing is available: give it a lease.
    Admit,
    /// Unknown: create a pairing request and answer `Pending`. Pairing works with or
    /// without a VPN (design §5.7).
    Pair,
    Refuse(Refusal),
}

/// Revoked peers are refused first, whatever else holds; unknown peers may pair;
/// trusted peers are admitted only while sharing is available (a VPN carries the
/// routes, or `--egress any`).
pub fn verdict(status: PeerStatus, sharing_available: bool) -> Verdict {
    match status {
        PeerStatus::Revoked => Verdict::Refuse(Refusal::Revoked),
        PeerStatus::Unknown => Verdict::Pair,
        PeerStatus::Trusted if !sharing_available => Verdict::Refuse(Refusal::VpnUnavailable),
        PeerStatus::Trusted => Verdict::Admit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoked_first_pairing_without_vpn_trusted_only_with_egress() {
        for sharing in [true, false] {
            assert_eq!(
                verdict(PeerStatus::Revoked, sharing),
                Verdict::Refuse(Refusal::Revoked)
            );
            assert_eq!(verdict(PeerStatus::Unknown, sharing), Verdict::Pair);
        }
        assert_eq!(verdict(PeerStatus::Trusted, true), Verdict::Admit);
        assert_eq!(
            verdict(PeerStatus::Trusted, false),
            Verdict::Refuse(Refusal::VpnUnavailable)
        );
    }
}
