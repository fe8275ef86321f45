//! The pairing code: six digits both devices show after a first-contact handshake.
//!
//! The code is derived from the Noise handshake hash, which covers both ephemeral and
//! both static keys. A man in the middle runs two separate handshakes (client↔MITM,
//! MITM↔gateway) whose hashes differ, so the two screens show different codes unless the
//! attacker wins a 1-in-10⁶ chance per attempt — and attempts are visible to the user,
//! who approves one code at a time (the broker also rate-limits pending pairings).
//!
//! `code = u64_be(BLAKE2s-256(PAIRING_LABEL || handshake_hash)[0..8]) mod 1_000_000`,
//! shown zero-padded to six digits. The modulo bias (2⁶⁴ mod 10⁶ / 2⁶⁴ ≈ 3·10⁻¹⁴) is
//! negligible.

use blake2::{Blake2s256, Digest};
use std::fmt;

/// Domain separation, so the code cannot collide with any other use of the hash.
pub const PAIRING_LABEL: &[u8] = b"VSHP/1 pairing code";

/// Number of distinct codes.
pub const PAIRING_CODE_SPACE: u32 = 1_000_000;

/// A six-digit pairing code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PairingCode(u32);

/// Why a typed code was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairingCodeError {
    #[error("a pairing code is exactly six digits")]
    Malformed,
}

impl PairingCode {
    /// Derives the code from a handshake hash (both sides compute the same).
    pub fn from_handshake_hash(handshake_hash: &[u8]) -> Self {
        let digest = Blake2s256::new()
            .chain_update(PAIRING_LABEL)
            .chain_update(handshake_hash)
            .finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        let v = u64::from_be_bytes(first) % u64::from(PAIRING_CODE_SPACE);
        // v < 10^6 always fits u32.
        Self(u32::try_from(v).unwrap_or(0))
    }

    /// Parses what a user typed: six ASCII digits, spaces ignored ("123 456").
    pub fn parse(s: &str) -> Result<Self, PairingCodeError> {
        let mut v: u32 = 0;
        let mut digits = 0;
        for c in s.chars().filter(|c| !c.is_whitespace()) {
            let d = c.to_digit(10).ok_or(PairingCodeError::Malformed)?;
            digits += 1;
            if digits > 6 {
                return Err(PairingCodeError::Malformed);
            }
            v = v * 10 + d;
        }
        if digits != 6 {
            return Err(PairingCodeError::Malformed);
        }
        Ok(Self(v))
    }

    pub fn value(self) -> u32 {
        self.0
    }
}

impl fmt::Display for PairingCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:06}", self.0)
    }
}

impl std::str::FromStr for PairingCode {
    type Err = PairingCodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_six_digits_and_parses_back() {
        let c = PairingCode(42);
        assert_eq!(c.to_string(), "000042");
        assert_eq!(PairingCode::parse("000042"), Ok(c));
        assert_eq!(PairingCode::parse("000 042"), Ok(c));
        assert!(PairingCode::parse("42").is_err());
        assert!(PairingCode::parse("1234567").is_err());
        assert!(PairingCode::parse("12345a").is_err());
    }

    #[test]
    fn derivation_is_deterministic_and_spreads() {
        let a = PairingCode::from_handshake_hash(&[1u8; 32]);
        assert_eq!(a, PairingCode::from_handshake_hash(&[1u8; 32]));
        assert!(a.value() < PAIRING_CODE_SPACE);
        let distinct: std::collections::HashSet<_> = (0u8..=255)
            .map(|i| PairingCode::from_handshake_hash(&[i; 32]))
            .collect();
        // 256 draws from 10^6: a collision or two is possible, many would be a bug.
        assert!(distinct.len() >= 250);
    }
}
