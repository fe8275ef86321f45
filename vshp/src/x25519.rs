//! X25519 for snow, computed by aws-lc-rs instead of snow's default (curve25519-dalek).
//!
//! About 80 % of a handshake's instructions are X25519 (docs/performance.md,
//! Handshakes): an IK responder does four DHs and one base-point multiplication. On the
//! project's x86_64 machine aws-lc's X25519 (formally verified s2n-bignum and
//! fiat-crypto code) takes 32 µs per DH and 7 µs per public key, against 59 µs and
//! 16 µs for curve25519-dalek's portable code, measured in one run. ring, which the
//! data plane already uses, cannot serve here: its X25519 keys are single-use
//! ephemerals, and a Noise key takes part in several DHs.
//!
//! The results are the same bytes (X25519 is a function; `vshp/test-vectors/handshake.txt`
//! and the tests below check it against curve25519-dalek). aws-lc refuses an all-zero
//! shared secret (a low-order peer point), which snow then reports as `Error::Dh`, as
//! [`crate::key_oracle`]'s own all-zero check would.

use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey, X25519 as ALGORITHM};
use snow::types::{Dh, Random};

const LEN: usize = 32;

/// A snow [`Dh`] ("25519") backed by aws-lc-rs.
#[derive(Default)]
pub struct X25519 {
    private: [u8; LEN],
    public: [u8; LEN],
    key: Option<PrivateKey>,
}

impl std::fmt::Debug for X25519 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X25519")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl X25519 {
    fn set_private(&mut self, private: [u8; LEN]) {
        self.private = private;
        self.key = PrivateKey::from_private_key(&ALGORITHM, &private).ok();
        self.public = self
            .key
            .as_ref()
            .and_then(|k| k.compute_public_key().ok())
            .and_then(|p| p.as_ref().try_into().ok())
            .unwrap_or([0; LEN]);
    }
}

impl Dh for X25519 {
    fn name(&self) -> &'static str {
        "25519"
    }

    fn pub_len(&self) -> usize {
        LEN
    }

    fn priv_len(&self) -> usize {
        LEN
    }

    fn set(&mut self, privkey: &[u8]) {
        let mut private = [0u8; LEN];
        let n = privkey.len().min(LEN);
        private[..n].copy_from_slice(&privkey[..n]);
        self.set_private(private);
    }

    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        let mut private = [0u8; LEN];
        rng.try_fill_bytes(&mut private)
            .map_err(|_| snow::Error::Rng)?;
        self.set_private(private);
        Ok(())
    }

    fn pubkey(&self) -> &[u8] {
        &self.public
    }

    fn privkey(&self) -> &[u8] {
        &self.private
    }

    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let key = self.key.as_ref().ok_or(snow::Error::Dh)?;
        let peer = pubkey.get(..LEN).ok_or(snow::Error::Dh)?;
        let out = out.get_mut(..LEN).ok_or(snow::Error::Dh)?;
        agreement::agree(
            key,
            UnparsedPublicKey::new(&ALGORITHM, peer),
            snow::Error::Dh,
            |secret| {
                out.copy_from_slice(secret.get(..LEN).ok_or(snow::Error::Dh)?);
                Ok(())
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snow::params::DHChoice;
    use snow::resolvers::{CryptoResolver, DefaultResolver};

    fn dalek() -> Box<dyn Dh> {
        DefaultResolver.resolve_dh(&DHChoice::Curve25519).unwrap()
    }

    #[test]
    fn same_public_keys_and_shared_secrets_as_curve25519_dalek() {
        for seed in 0u8..32 {
            let a: [u8; LEN] = std::array::from_fn(|i| seed.wrapping_mul(31) ^ i as u8);
            let b: [u8; LEN] = std::array::from_fn(|i| seed.wrapping_add(7) ^ (i as u8 * 3));
            let (mut ours, mut theirs) = (X25519::default(), dalek());
            ours.set(&a);
            theirs.set(&a);
            assert_eq!(ours.pubkey(), theirs.pubkey());
            let mut other = dalek();
            other.set(&b);
            let (mut x, mut y) = ([0u8; LEN], [0u8; LEN]);
            ours.dh(other.pubkey(), &mut x).unwrap();
            theirs.dh(other.pubkey(), &mut y).unwrap();
            assert_eq!(x, y);
        }
    }

    #[test]
    fn low_order_points_and_short_inputs_are_errors_not_panics() {
        let mut k = X25519::default();
        k.set(&[5; LEN]);
        let mut out = [0u8; LEN];
        // The all-zero point and the point of order 1 give an all-zero secret.
        assert!(k.dh(&[0; LEN], &mut out).is_err());
        let mut one = [0u8; LEN];
        one[0] = 1;
        assert!(k.dh(&one, &mut out).is_err());
        assert!(k.dh(&[9; 5], &mut out).is_err());
        assert!(k.dh(&[9; LEN], &mut [0u8; 4]).is_err());
        // Without a key set, no DH.
        assert!(X25519::default().dh(&[9; LEN], &mut out).is_err());
    }
}
