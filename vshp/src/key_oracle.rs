//! The gateway's static-key oracle: the only place its Noise static private key is used.
//!
//! On the gateway the private key lives in the broker, never in the parser-sandbox
//! worker that runs the handshake (design §2, the OpenSSH monitor pattern). The worker's
//! [`crate::handshake::Responder`] therefore does every DH that involves the static key
//! through a [`StaticKeyOracle`]; the broker's implementation is an IPC call. The
//! ephemeral key stays in the worker.
//!
//! snow has no "remote static key" hook, so we plug the oracle in through its
//! `CryptoResolver`: [`OracleResolver`] returns an oracle-backed [`snow::types::Dh`] for
//! the first `resolve_dh` call and ordinary local X25519 afterwards. That relies on
//! snow 0.10's `Builder::build` resolving the static DH first and the ephemeral second
//! (`builder.rs`, `s_dh` then `e_dh`). [`OracleHandle::verify_installed`] checks after
//! the build that the oracle really became the static key (its `set()` received the
//! dummy static key), so a snow release that swapped the order fails loudly instead of
//! running with a dummy static key; the handshake tests also count oracle calls.
//!
//! [`HandshakeDhGuard`] is the broker-side policy helper: it lets the oracle answer only
//! the DH operations one handshake needs, once each, the first one on the ephemeral key
//! the worker showed in the HANDSHAKE_INIT record.

use crate::record::{self, Pattern, Record, RecordKind};
use snow::params::DHChoice;
use snow::resolvers::{CryptoResolver, DefaultResolver, FallbackResolver, RingResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Length of X25519 public keys, private keys and DH outputs.
pub const KEY_LEN: usize = 32;

/// Why the oracle did not compute a DH.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OracleError {
    /// The key holder (the broker) could not be reached or did not answer.
    #[error("static-key oracle unavailable: {0}")]
    Unavailable(String),
    /// The key holder refused: not a DH this handshake needs, budget used up, rate limit.
    #[error("static-key oracle refused the request: {0}")]
    Refused(&'static str),
    /// The remote public key is a low-order point: the DH output would be all zeros and
    /// carry no secret, so the handshake must not go on.
    #[error("remote public key is a low-order point")]
    LowOrderPoint,
    /// The record shown to the guard is not a valid HANDSHAKE_INIT.
    #[error("not a valid HANDSHAKE_INIT record")]
    BadInitRecord,
}

/// Computes X25519 with the gateway's static private key, wherever that key lives.
///
/// Implementations must be cheap to call from one thread at a time; the handshake calls
/// [`StaticKeyOracle::dh`] synchronously from inside snow.
pub trait StaticKeyOracle: Send + Sync {
    /// The static public key the oracle's private key belongs to.
    fn public_key(&self) -> [u8; KEY_LEN];
    /// X25519(static private key, `remote_public`).
    fn dh(&self, remote_public: &[u8; KEY_LEN]) -> Result<[u8; KEY_LEN], OracleError>;
}

impl<T: StaticKeyOracle + ?Sized> StaticKeyOracle for Arc<T> {
    fn public_key(&self) -> [u8; KEY_LEN] {
        (**self).public_key()
    }
    fn dh(&self, remote_public: &[u8; KEY_LEN]) -> Result<[u8; KEY_LEN], OracleError> {
        (**self).dh(remote_public)
    }
}

/// A static X25519 key pair held in memory.
#[derive(Clone)]
pub struct StaticKeypair {
    private: [u8; KEY_LEN],
    public: [u8; KEY_LEN],
}

impl Drop for StaticKeypair {
    fn drop(&mut self) {
        // Best effort wipe; `black_box` keeps the store from being optimised away.
        self.private.fill(0);
        std::hint::black_box(&self.private);
    }
}

impl fmt::Debug for StaticKeypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        f.debug_struct("StaticKeypair")
            .field("public", &HexKey(&self.public))
            .finish_non_exhaustive()
    }
}

struct HexKey<'a>(&'a [u8]);
impl fmt::Debug for HexKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Why a key pair could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("X25519 is not available in this build of snow")]
    NoX25519,
    #[error("the system random number generator failed")]
    Rng,
}

fn local_x25519() -> Result<Box<dyn Dh>, KeyError> {
    Ok(Box::new(crate::x25519::X25519::default()))
}

impl StaticKeypair {
    /// Derives the public key of `private` (X25519 clamps it as RFC 7748 says).
    pub fn from_private(private: [u8; KEY_LEN]) -> Result<Self, KeyError> {
        let mut dh = local_x25519()?;
        dh.set(&private);
        let public = to_key(dh.pubkey()).ok_or(KeyError::NoX25519)?;
        Ok(Self { private, public })
    }

    /// A fresh random key pair (ring's system RNG).
    pub fn generate() -> Result<Self, KeyError> {
        let mut rng = RingResolver.resolve_rng().ok_or(KeyError::Rng)?;
        let mut private = [0u8; KEY_LEN];
        rng.try_fill_bytes(&mut private)
            .map_err(|_| KeyError::Rng)?;
        Self::from_private(private)
    }

    pub fn public_key(&self) -> [u8; KEY_LEN] {
        self.public
    }

    /// The private key bytes, for storing the identity. Handle with care.
    pub fn private_key(&self) -> [u8; KEY_LEN] {
        self.private
    }
}

fn to_key(bytes: &[u8]) -> Option<[u8; KEY_LEN]> {
    bytes.get(..KEY_LEN)?.try_into().ok()
}

/// The oracle for a key held in this process: clients, tests, and the broker's own side
/// of the IPC oracle.
#[derive(Debug, Clone)]
pub struct LocalKeyOracle {
    keypair: StaticKeypair,
}

impl LocalKeyOracle {
    pub fn new(keypair: StaticKeypair) -> Self {
        Self { keypair }
    }
}

impl StaticKeyOracle for LocalKeyOracle {
    fn public_key(&self) -> [u8; KEY_LEN] {
        self.keypair.public
    }

    fn dh(&self, remote_public: &[u8; KEY_LEN]) -> Result<[u8; KEY_LEN], OracleError> {
        let mut dh = local_x25519().map_err(|e| OracleError::Unavailable(e.to_string()))?;
        dh.set(&self.keypair.private);
        let mut out = [0u8; KEY_LEN];
        dh.dh(remote_public, &mut out)
            .map_err(|_| OracleError::LowOrderPoint)?;
        if is_zero(&out) {
            return Err(OracleError::LowOrderPoint);
        }
        Ok(out)
    }
}

/// Constant-time all-zero test (the DH output is secret).
fn is_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |acc, x| acc | x) == 0
}

/// Shared between the resolver and the `Dh` it hands to snow.
#[derive(Debug, Default)]
struct OracleSlot {
    /// Set when snow installed the oracle `Dh` as the static key (`set(dummy)` was called).
    installed_as_static: AtomicBool,
    /// The last typed oracle failure; snow itself only reports `Error::Dh`.
    last_error: Mutex<Option<OracleError>>,
}

impl OracleSlot {
    fn record(&self, e: OracleError) {
        if let Ok(mut slot) = self.last_error.lock() {
            *slot = Some(e);
        }
    }
}

/// A snow `CryptoResolver` that makes the static key an oracle-backed `Dh`.
///
/// Use one resolver per handshake (it hands out the oracle `Dh` once). Every local DH
/// (the ephemeral) rejects all-zero outputs, like WireGuard, so a low-order remote key
/// cannot make a handshake contribute no secret.
pub struct OracleResolver {
    oracle: Option<Arc<dyn StaticKeyOracle>>,
    handed_out: AtomicBool,
    slot: Arc<OracleSlot>,
    fallback: FallbackResolver,
}

impl fmt::Debug for OracleResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OracleResolver")
            .field("has_oracle", &self.oracle.is_some())
            .finish_non_exhaustive()
    }
}

/// Checks an [`OracleResolver`] after `Builder::build`; see its docs.
#[derive(Debug, Clone)]
pub struct OracleHandle {
    slot: Arc<OracleSlot>,
    expect_oracle: bool,
}

impl OracleHandle {
    /// Whether snow installed the oracle as the static key, as the design requires.
    pub fn verify_installed(&self) -> bool {
        !self.expect_oracle || self.slot.installed_as_static.load(Ordering::SeqCst)
    }

    /// Takes the typed error of the last failed oracle call, if any.
    pub fn take_error(&self) -> Option<OracleError> {
        self.slot.last_error.lock().ok().and_then(|mut e| e.take())
    }
}

impl OracleResolver {
    /// A resolver whose first `resolve_dh` is backed by `oracle`.
    pub fn new(oracle: Arc<dyn StaticKeyOracle>) -> (Self, OracleHandle) {
        Self::build(Some(oracle))
    }

    /// A resolver with only local primitives (the initiator's side), still rejecting
    /// all-zero DH outputs.
    pub fn local() -> (Self, OracleHandle) {
        Self::build(None)
    }

    fn build(oracle: Option<Arc<dyn StaticKeyOracle>>) -> (Self, OracleHandle) {
        let slot = Arc::new(OracleSlot::default());
        let handle = OracleHandle {
            slot: slot.clone(),
            expect_oracle: oracle.is_some(),
        };
        let fallback = FallbackResolver::new(Box::new(RingResolver), Box::new(DefaultResolver));
        (
            Self {
                oracle,
                handed_out: AtomicBool::new(false),
                slot,
                fallback,
            },
            handle,
        )
    }
}

impl CryptoResolver for OracleResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        self.fallback.resolve_rng()
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        if !matches!(choice, DHChoice::Curve25519) {
            return None;
        }
        if let Some(oracle) = &self.oracle {
            // snow 0.10 resolves the static DH first; see the module docs.
            if !self.handed_out.swap(true, Ordering::SeqCst) {
                return Some(Box::new(OracleDh {
                    oracle: oracle.clone(),
                    public: oracle.public_key(),
                    slot: self.slot.clone(),
                }));
            }
        }
        // aws-lc's X25519, not the fallback's (curve25519-dalek): crate::x25519 says why.
        Some(Box::new(CheckedDh {
            inner: Box::new(crate::x25519::X25519::default()),
        }))
    }

    fn resolve_hash(&self, choice: &snow::params::HashChoice) -> Option<Box<dyn Hash>> {
        self.fallback.resolve_hash(choice)
    }

    fn resolve_cipher(&self, choice: &snow::params::CipherChoice) -> Option<Box<dyn Cipher>> {
        self.fallback.resolve_cipher(choice)
    }
}

/// The static key as snow sees it: the public key is real, the private key a dummy that
/// is never used, `dh()` asks the oracle.
struct OracleDh {
    oracle: Arc<dyn StaticKeyOracle>,
    public: [u8; KEY_LEN],
    slot: Arc<OracleSlot>,
}

/// What the responder passes to snow as its "private key"; [`OracleDh`] ignores it.
pub(crate) const DUMMY_PRIVATE_KEY: [u8; KEY_LEN] = [0u8; KEY_LEN];

impl Dh for OracleDh {
    fn name(&self) -> &'static str {
        "25519"
    }
    fn pub_len(&self) -> usize {
        KEY_LEN
    }
    fn priv_len(&self) -> usize {
        KEY_LEN
    }
    fn set(&mut self, privkey: &[u8]) {
        // The builder installs the static key here (the responder passes the dummy);
        // the oracle holds the real one. A fixed test ephemeral key is never the
        // dummy, so this also tells a swapped resolve order apart.
        if privkey == DUMMY_PRIVATE_KEY {
            self.slot.installed_as_static.store(true, Ordering::SeqCst);
        }
    }
    fn generate(&mut self, _rng: &mut dyn Random) -> Result<(), snow::Error> {
        // Only an ephemeral key is generated; the oracle must never become one.
        self.slot
            .record(OracleError::Refused("oracle key used as an ephemeral"));
        Err(snow::Error::Dh)
    }
    fn pubkey(&self) -> &[u8] {
        &self.public
    }
    fn privkey(&self) -> &[u8] {
        &DUMMY_PRIVATE_KEY
    }
    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let remote = to_key(pubkey).ok_or(snow::Error::Dh)?;
        let shared = self.oracle.dh(&remote).map_err(|e| {
            self.slot.record(e);
            snow::Error::Dh
        })?;
        if is_zero(&shared) {
            self.slot.record(OracleError::LowOrderPoint);
            return Err(snow::Error::Dh);
        }
        out.get_mut(..KEY_LEN)
            .ok_or(snow::Error::Dh)?
            .copy_from_slice(&shared);
        Ok(())
    }
}

/// Local X25519 that refuses all-zero outputs (low-order remote points).
struct CheckedDh {
    inner: Box<dyn Dh>,
}

impl Dh for CheckedDh {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn pub_len(&self) -> usize {
        self.inner.pub_len()
    }
    fn priv_len(&self) -> usize {
        self.inner.priv_len()
    }
    fn set(&mut self, privkey: &[u8]) {
        self.inner.set(privkey)
    }
    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        self.inner.generate(rng)
    }
    fn pubkey(&self) -> &[u8] {
        self.inner.pubkey()
    }
    fn privkey(&self) -> &[u8] {
        self.inner.privkey()
    }
    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        if pubkey.len() < KEY_LEN || out.len() < KEY_LEN {
            return Err(snow::Error::Dh);
        }
        self.inner.dh(pubkey, out)?;
        if out.get(..KEY_LEN).is_none_or(is_zero) {
            return Err(snow::Error::Dh);
        }
        Ok(())
    }
}

/// Broker-side policy for one handshake's oracle calls.
///
/// The worker first shows the broker the HANDSHAKE_INIT record; the guard then allows
/// exactly the static-key DHs that pattern needs on the responder side — XX: `es`
/// (1 call), IK: `es` and `ss` (2 calls) — and requires the first to be on the
/// ephemeral key inside that record. A compromised worker thus gets at most one
/// handshake's worth of DH results per record it shows, never a DH on a point of its
/// choosing first; the broker rate-limits records on top.
#[derive(Debug, Clone)]
pub struct HandshakeDhGuard {
    pattern: Pattern,
    init_ephemeral: [u8; KEY_LEN],
    used: u8,
}

impl HandshakeDhGuard {
    /// Reads the pattern and the initiator's ephemeral key from a HANDSHAKE_INIT record.
    pub fn from_init_record(init_record: &[u8]) -> Result<Self, OracleError> {
        match record::decode(init_record) {
            Ok(Record::Handshake { header, noise, .. })
                if header.kind == RecordKind::HandshakeInit =>
            {
                let init_ephemeral = to_key(noise).ok_or(OracleError::BadInitRecord)?;
                Ok(Self {
                    pattern: header.pattern,
                    init_ephemeral,
                    used: 0,
                })
            }
            _ => Err(OracleError::BadInitRecord),
        }
    }

    /// How many static-key DHs the responder needs for this pattern.
    pub fn budget(&self) -> u8 {
        match self.pattern {
            Pattern::Xx => 1,
            Pattern::Ik => 2,
        }
    }

    /// How many DHs were allowed so far.
    pub fn used(&self) -> u8 {
        self.used
    }

    /// Allows or refuses the next DH on `remote_public`.
    pub fn check(&mut self, remote_public: &[u8; KEY_LEN]) -> Result<(), OracleError> {
        if self.used >= self.budget() {
            return Err(OracleError::Refused("DH budget of this handshake used up"));
        }
        if self.used == 0 && remote_public != &self.init_ephemeral {
            return Err(OracleError::Refused(
                "first DH must use the initiator's ephemeral key",
            ));
        }
        self.used += 1;
        Ok(())
    }
}

/// An oracle that consults a [`HandshakeDhGuard`] before each call: what the broker runs
/// for one worker's handshake.
#[derive(Debug)]
pub struct GuardedOracle<O> {
    inner: O,
    guard: Mutex<HandshakeDhGuard>,
}

impl<O: StaticKeyOracle> GuardedOracle<O> {
    pub fn new(inner: O, guard: HandshakeDhGuard) -> Self {
        Self {
            inner,
            guard: Mutex::new(guard),
        }
    }
}

impl<O: StaticKeyOracle> StaticKeyOracle for GuardedOracle<O> {
    fn public_key(&self) -> [u8; KEY_LEN] {
        self.inner.public_key()
    }
    fn dh(&self, remote_public: &[u8; KEY_LEN]) -> Result<[u8; KEY_LEN], OracleError> {
        self.guard
            .lock()
            .map_err(|_| OracleError::Refused("guard poisoned"))?
            .check(remote_public)?;
        self.inner.dh(remote_public)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_oracle_agrees_with_plain_x25519() {
        let a = StaticKeypair::from_private([1u8; 32]).unwrap();
        let b = StaticKeypair::from_private([2u8; 32]).unwrap();
        let ab = LocalKeyOracle::new(a.clone()).dh(&b.public_key()).unwrap();
        let ba = LocalKeyOracle::new(b).dh(&a.public_key()).unwrap();
        assert_eq!(ab, ba);
        assert_ne!(ab, [0u8; 32]);
    }

    #[test]
    fn low_order_point_is_refused() {
        let a = LocalKeyOracle::new(StaticKeypair::from_private([1u8; 32]).unwrap());
        assert_eq!(a.dh(&[0u8; 32]), Err(OracleError::LowOrderPoint));
        let mut one = [0u8; 32];
        one[0] = 1;
        assert_eq!(a.dh(&one), Err(OracleError::LowOrderPoint));
    }

    #[test]
    fn generated_keys_differ_and_debug_hides_private() {
        let a = StaticKeypair::generate().unwrap();
        let b = StaticKeypair::generate().unwrap();
        assert_ne!(a.public_key(), b.public_key());
        let dbg = format!("{a:?}");
        let private_hex: String = a.private_key().iter().map(|b| format!("{b:02x}")).collect();
        assert!(!dbg.contains(&private_hex));
    }

    #[test]
    fn resolver_installs_the_oracle_as_static_key_and_detects_a_swap() {
        let kp = StaticKeypair::from_private([3u8; 32]).unwrap();
        let oracle: Arc<dyn StaticKeyOracle> = Arc::new(LocalKeyOracle::new(kp.clone()));
        // The real builder: the oracle becomes the static key.
        let (resolver, handle) = OracleResolver::new(oracle.clone());
        let params = "Noise_XX_25519_ChaChaPoly_BLAKE2s".parse().unwrap();
        snow::Builder::with_resolver(params, Box::new(resolver))
            .local_private_key(&DUMMY_PRIVATE_KEY)
            .unwrap()
            .fixed_ephemeral_key_for_testing_only(&[5u8; 32])
            .build_responder()
            .unwrap();
        assert!(handle.verify_installed());
        // A builder that resolved the ephemeral first would hand the oracle a
        // non-dummy key (or none): detected.
        let (resolver, handle) = OracleResolver::new(oracle);
        let mut first = resolver.resolve_dh(&DHChoice::Curve25519).unwrap();
        let mut second = resolver.resolve_dh(&DHChoice::Curve25519).unwrap();
        first.set(&[5u8; 32]);
        second.set(&DUMMY_PRIVATE_KEY);
        assert!(!handle.verify_installed());
        assert_eq!(first.pubkey(), &kp.public_key());
        let mut rng = RingResolver.resolve_rng().unwrap();
        assert!(first.generate(&mut *rng).is_err());
        assert!(matches!(handle.take_error(), Some(OracleError::Refused(_))));
    }

    #[test]
    fn guard_enforces_budget_and_first_key() {
        let mut rec = crate::record::HandshakeHeader {
            kind: RecordKind::HandshakeInit,
            pattern: Pattern::Xx,
            capabilities: crate::record::Capabilities(0),
            sender: crate::record::SessionIndex(7),
            receiver: crate::record::SessionIndex(0),
        }
        .encode()
        .to_vec();
        rec.extend_from_slice(&[9u8; 32]);
        let mut g = HandshakeDhGuard::from_init_record(&rec).unwrap();
        assert_eq!(g.budget(), 1);
        assert!(g.check(&[8u8; 32]).is_err());
        assert!(g.check(&[9u8; 32]).is_ok());
        assert!(g.check(&[9u8; 32]).is_err());
        assert_eq!(
            HandshakeDhGuard::from_init_record(&rec[..20]).unwrap_err(),
            OracleError::BadInitRecord
        );
    }
}
