//! The VSHP handshake: Noise XX (first contact) or IK (the client holds the gateway's
//! key from an invite), run by snow, wrapped in VSHP handshake records.
//!
//! The client is always the Noise initiator ([`Initiator`]), the gateway the responder
//! ([`Responder`]). The responder's static-key DHs go through a [`StaticKeyOracle`], so
//! the gateway's private key can stay in the broker. Payloads are opaque bytes here
//! (inner messages encoded by [`crate::message`]).
//!
//! Message flow (record kinds):
//! ```text
//! XX:  INIT  (-> e)            RESP (<- e, ee, s, es)   FINAL (-> s, se)
//! IK:  INIT  (-> e, es, s, ss) RESP (<- e, ee, se)
//! ```
//! The Noise prologue is `"VSHP/1"` followed by the 16 header bytes of HANDSHAKE_INIT,
//! so version, pattern, capabilities and the client's index are authenticated.
//!
//! Any error ends the handshake: the state machine refuses further input, so a peer
//! cannot make the responder ask the oracle twice for the same handshake.

use crate::key_oracle::{
    DUMMY_PRIVATE_KEY, KEY_LEN, OracleError, OracleHandle, OracleResolver, StaticKeyOracle,
    StaticKeypair,
};
use crate::record::{
    self, Capabilities, HEADER_LEN, HandshakeHeader, MAX_RECORD_LEN, Pattern, Record, RecordError,
    RecordKind, SessionIndex,
};
use snow::HandshakeState;
use std::fmt;
use std::sync::Arc;

/// The prologue starts with this label, then the HANDSHAKE_INIT header.
pub const PROLOGUE_LABEL: &[u8] = b"VSHP/1";
/// Length of the prologue.
pub const PROLOGUE_LEN: usize = PROLOGUE_LABEL.len() + HEADER_LEN;
/// Largest number of bytes a Noise handshake message adds to its payload
/// (XX message 2: ephemeral 32 + encrypted static 48 + payload tag 16).
pub const MAX_HANDSHAKE_OVERHEAD: usize = 96;
/// Largest handshake payload, so that every handshake record fits `MAX_RECORD_LEN`.
pub const MAX_HANDSHAKE_PAYLOAD: usize = MAX_RECORD_LEN - HEADER_LEN - MAX_HANDSHAKE_OVERHEAD;
/// Length of the handshake hash (BLAKE2s).
pub const HANDSHAKE_HASH_LEN: usize = 32;

/// Which end of the handshake this side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The client.
    Initiator,
    /// The gateway.
    Responder,
}

/// What the state machine expects next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Write the next handshake record.
    Send,
    /// Feed the next received handshake record.
    Receive,
    /// Done: call `into_established`.
    Established,
    /// An error ended the handshake.
    Failed,
}

/// The two raw ChaCha20-Poly1305 keys a finished handshake yields.
#[derive(Clone, PartialEq, Eq)]
pub struct TransportKeys {
    /// Seals what this side sends.
    pub send: [u8; KEY_LEN],
    /// Opens what this side receives.
    pub recv: [u8; KEY_LEN],
}

impl Drop for TransportKeys {
    fn drop(&mut self) {
        // Best effort wipe; `black_box` keeps the stores from being optimised away.
        self.send.fill(0);
        self.recv.fill(0);
        std::hint::black_box((&self.send, &self.recv));
    }
}

impl fmt::Debug for TransportKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TransportKeys { .. }")
    }
}

/// The result of a completed handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Established {
    pub role: Role,
    pub pattern: Pattern,
    /// The peer's authenticated static public key.
    pub remote_static: [u8; KEY_LEN],
    /// The Noise handshake hash: input of the pairing code, unique per handshake.
    pub handshake_hash: [u8; HANDSHAKE_HASH_LEN],
    /// The index the peer puts in DATA records it sends to us.
    pub local_index: SessionIndex,
    /// The index we put in DATA records we send.
    pub remote_index: SessionIndex,
    /// The capability bits in the peer's handshake header. The gateway sees the
    /// client's INIT header, which the prologue authenticates; the client sees the RESP
    /// header, which Noise does not cover: it must use the HELLO inside the encrypted
    /// RESP payload for decisions (docs/protocol-crypto.md §1).
    pub remote_capabilities: Capabilities,
    pub keys: TransportKeys,
}

impl Established {
    /// The six-digit code both devices show for this handshake.
    pub fn pairing_code(&self) -> crate::pairing::PairingCode {
        crate::pairing::PairingCode::from_handshake_hash(&self.handshake_hash)
    }
}

/// A failure inside Noise, without snow's internal detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoiseFailure {
    /// A tag did not verify: wrong key, forged or corrupted message.
    #[error("authentication failed")]
    Decrypt,
    /// The message is too short or too long for its pattern step.
    #[error("malformed handshake message")]
    Malformed,
    /// A DH failed (low-order point, or the oracle refused).
    #[error("Diffie-Hellman failed")]
    Dh,
    /// Anything else snow reports (state, RNG, setup).
    #[error("internal Noise error")]
    Internal,
}

impl From<snow::Error> for NoiseFailure {
    fn from(e: snow::Error) -> Self {
        match e {
            snow::Error::Decrypt => Self::Decrypt,
            snow::Error::Input => Self::Malformed,
            snow::Error::Dh => Self::Dh,
            _ => Self::Internal,
        }
    }
}

/// Why a handshake step failed. Every error ends the handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("bad record: {0}")]
    Record(#[from] RecordError),
    #[error("expected a {expected:?} record, got {got:?}")]
    UnexpectedKind {
        expected: RecordKind,
        got: RecordKind,
    },
    #[error("record pattern {got:?} differs from the handshake's {expected:?}")]
    PatternMismatch { expected: Pattern, got: Pattern },
    #[error("HANDSHAKE_INIT must carry receiver index 0")]
    NonZeroReceiverIndex,
    #[error("record is addressed to index {got}, ours is {expected}")]
    WrongReceiverIndex { expected: u32, got: u32 },
    #[error("record comes from index {got}, the peer's is {expected}")]
    WrongSenderIndex { expected: u32, got: u32 },
    #[error("the local session index must be non-zero")]
    ZeroLocalIndex,
    #[error("buffer of {have} bytes is too small, {need} needed")]
    BufferTooSmall { need: usize, have: usize },
    #[error("handshake payload of {0} bytes exceeds {MAX_HANDSHAKE_PAYLOAD}")]
    PayloadTooLarge(usize),
    #[error("Noise: {0}")]
    Noise(#[from] NoiseFailure),
    #[error("static-key oracle: {0}")]
    Oracle(OracleError),
    #[error("snow did not install the oracle as the static key (resolver order changed)")]
    ResolverOrder,
    #[error("{0} is not the next step of this handshake")]
    WrongStep(&'static str),
    #[error("an earlier error ended this handshake")]
    Failed,
}

/// The snow state plus what we need to check the oracle's errors.
struct Noise {
    hs: HandshakeState,
    oracle: OracleHandle,
}

impl Noise {
    fn build(
        pattern: Pattern,
        role: Role,
        init_header: &[u8; HEADER_LEN],
        local_private: &[u8; KEY_LEN],
        remote_static: Option<&[u8; KEY_LEN]>,
        oracle: Option<Arc<dyn StaticKeyOracle>>,
        fixed_ephemeral: Option<&[u8; KEY_LEN]>,
    ) -> Result<Self, HandshakeError> {
        let params = pattern
            .noise_name()
            .parse()
            .map_err(|_| NoiseFailure::Internal)?;
        let (resolver, handle) = match oracle {
            Some(o) => OracleResolver::new(o),
            None => OracleResolver::local(),
        };
        let mut prologue = [0u8; PROLOGUE_LEN];
        prologue[..PROLOGUE_LABEL.len()].copy_from_slice(PROLOGUE_LABEL);
        prologue[PROLOGUE_LABEL.len()..].copy_from_slice(init_header);
        let mut b = snow::Builder::with_resolver(params, Box::new(resolver))
            .local_private_key(local_private)
            .map_err(NoiseFailure::from)?
            .prologue(&prologue)
            .map_err(NoiseFailure::from)?;
        if let Some(rs) = remote_static {
            b = b.remote_public_key(rs).map_err(NoiseFailure::from)?;
        }
        if let Some(e) = fixed_ephemeral {
            b = b.fixed_ephemeral_key_for_testing_only(e);
        }
        let hs = match role {
            Role::Initiator => b.build_initiator(),
            Role::Responder => b.build_responder(),
        }
        .map_err(NoiseFailure::from)?;
        if !handle.verify_installed() {
            return Err(HandshakeError::ResolverOrder);
        }
        Ok(Self { hs, oracle: handle })
    }

    /// Maps a snow error, preferring the oracle's typed reason when it caused it.
    fn fail(&self, e: snow::Error) -> HandshakeError {
        match self.oracle.take_error() {
            Some(o) => HandshakeError::Oracle(o),
            None => HandshakeError::Noise(e.into()),
        }
    }

    fn write(
        &mut self,
        header: &HandshakeHeader,
        payload: &[u8],
        out: &mut [u8],
    ) -> Result<usize, HandshakeError> {
        if payload.len() > MAX_HANDSHAKE_PAYLOAD {
            return Err(HandshakeError::PayloadTooLarge(payload.len()));
        }
        let need = HEADER_LEN + payload.len() + MAX_HANDSHAKE_OVERHEAD;
        let have = out.len();
        let (head, body) = out
            .split_first_chunk_mut::<HEADER_LEN>()
            .ok_or(HandshakeError::BufferTooSmall { need, have })?;
        if have < need {
            return Err(HandshakeError::BufferTooSmall { need, have });
        }
        *head = header.encode();
        let n = self
            .hs
            .write_message(payload, body)
            .map_err(|e| self.fail(e))?;
        Ok(HEADER_LEN + n)
    }

    fn read(&mut self, noise: &[u8], payload_out: &mut [u8]) -> Result<usize, HandshakeError> {
        if payload_out.len() < noise.len() {
            return Err(HandshakeError::BufferTooSmall {
                need: noise.len(),
                have: payload_out.len(),
            });
        }
        self.hs
            .read_message(noise, payload_out)
            .map_err(|e| self.fail(e))
    }

    fn remote_static(&self) -> Option<[u8; KEY_LEN]> {
        self.hs.get_remote_static()?.try_into().ok()
    }

    fn finish(
        mut self,
        role: Role,
        pattern: Pattern,
        local_index: SessionIndex,
        remote_index: SessionIndex,
        remote_capabilities: Capabilities,
    ) -> Result<Established, HandshakeError> {
        if !self.hs.is_handshake_finished() {
            return Err(HandshakeError::WrongStep("finish"));
        }
        let remote_static = self.remote_static().ok_or(NoiseFailure::Internal)?;
        let handshake_hash: [u8; HANDSHAKE_HASH_LEN] = self
            .hs
            .get_handshake_hash()
            .try_into()
            .map_err(|_| NoiseFailure::Internal)?;
        // k1 seals initiator → responder, k2 responder → initiator (Noise Split()).
        let (k1, k2) = self.hs.dangerously_get_raw_split();
        let keys = match role {
            Role::Initiator => TransportKeys { send: k1, recv: k2 },
            Role::Responder => TransportKeys { send: k2, recv: k1 },
        };
        Ok(Established {
            role,
            pattern,
            remote_static,
            handshake_hash,
            local_index,
            remote_index,
            remote_capabilities,
            keys,
        })
    }
}

/// Decodes a handshake record of the expected kind and pattern.
fn decode_handshake(
    rec: &[u8],
    expected: RecordKind,
) -> Result<(HandshakeHeader, &[u8; HEADER_LEN], &[u8]), HandshakeError> {
    match record::decode(rec)? {
        Record::Handshake {
            header,
            raw_header,
            noise,
        } => {
            if header.kind != expected {
                return Err(HandshakeError::UnexpectedKind {
                    expected,
                    got: header.kind,
                });
            }
            Ok((header, raw_header, noise))
        }
        Record::Data { .. } => Err(HandshakeError::UnexpectedKind {
            expected,
            got: RecordKind::Data,
        }),
        Record::Error(_) => Err(HandshakeError::UnexpectedKind {
            expected,
            got: RecordKind::Error,
        }),
    }
}

fn check_pattern(expected: Pattern, got: Pattern) -> Result<(), HandshakeError> {
    if expected == got {
        Ok(())
    } else {
        Err(HandshakeError::PatternMismatch { expected, got })
    }
}

fn check_index(expected: SessionIndex, got: SessionIndex) -> Result<(), HandshakeError> {
    if expected == got {
        Ok(())
    } else {
        Err(HandshakeError::WrongReceiverIndex {
            expected: expected.0,
            got: got.0,
        })
    }
}

enum IState {
    /// Before HANDSHAKE_INIT was written.
    Start,
    /// INIT written, waiting for RESP.
    AwaitResp(Box<Noise>),
    /// XX: RESP read, FINAL to write.
    SendFinal(Box<Noise>),
    Done(Box<Established>),
    Failed,
}

/// The client's side of the handshake.
pub struct Initiator {
    local: StaticKeypair,
    gateway_public: Option<[u8; KEY_LEN]>,
    capabilities: Capabilities,
    local_index: SessionIndex,
    fixed_ephemeral: Option<[u8; KEY_LEN]>,
    remote_index: SessionIndex,
    remote_capabilities: Capabilities,
    state: IState,
}

impl fmt::Debug for Initiator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Initiator")
            .field("pattern", &self.pattern())
            .field("local_index", &self.local_index)
            .field("next", &self.next())
            .finish_non_exhaustive()
    }
}

impl Initiator {
    /// A client handshake: IK when `gateway_public` is known (from an invite), else XX.
    /// `local_index` is this session's random non-zero index.
    pub fn new(
        local: StaticKeypair,
        gateway_public: Option<[u8; KEY_LEN]>,
        capabilities: Capabilities,
        local_index: SessionIndex,
    ) -> Result<Self, HandshakeError> {
        if local_index.0 == 0 {
            return Err(HandshakeError::ZeroLocalIndex);
        }
        Ok(Self {
            local,
            gateway_public,
            capabilities,
            local_index,
            fixed_ephemeral: None,
            remote_index: SessionIndex(0),
            remote_capabilities: Capabilities(0),
            state: IState::Start,
        })
    }

    /// Test vectors only: use a fixed ephemeral key instead of a random one.
    #[doc(hidden)]
    pub fn with_fixed_ephemeral_for_test_vectors(mut self, key: [u8; KEY_LEN]) -> Self {
        self.fixed_ephemeral = Some(key);
        self
    }

    pub fn pattern(&self) -> Pattern {
        if self.gateway_public.is_some() {
            Pattern::Ik
        } else {
            Pattern::Xx
        }
    }

    pub fn next(&self) -> Next {
        match self.state {
            IState::Start | IState::SendFinal(_) => Next::Send,
            IState::AwaitResp(_) => Next::Receive,
            IState::Done(_) => Next::Established,
            IState::Failed => Next::Failed,
        }
    }

    /// The HANDSHAKE_INIT header this initiator sends (the second half of the prologue).
    pub fn init_header(&self) -> HandshakeHeader {
        HandshakeHeader {
            kind: RecordKind::HandshakeInit,
            pattern: self.pattern(),
            capabilities: self.capabilities,
            sender: self.local_index,
            receiver: SessionIndex(0),
        }
    }

    /// Writes the HANDSHAKE_INIT record carrying `payload` into `out`; returns its length.
    /// In XX this payload is sent in clear: put nothing secret in it.
    pub fn write_init(&mut self, payload: &[u8], out: &mut [u8]) -> Result<usize, HandshakeError> {
        if !matches!(self.state, IState::Start) {
            return Err(self.wrong_step("write_init"));
        }
        let header = self.init_header();
        let r = Noise::build(
            header.pattern,
            Role::Initiator,
            &header.encode(),
            &self.local.private_key(),
            self.gateway_public.as_ref(),
            None,
            self.fixed_ephemeral.as_ref(),
        )
        .and_then(|mut noise| {
            let n = noise.write(&header, payload, out)?;
            Ok((noise, n))
        });
        match r {
            Ok((noise, n)) => {
                self.state = IState::AwaitResp(Box::new(noise));
                Ok(n)
            }
            Err(e) => self.fail(e),
        }
    }

    /// Reads HANDSHAKE_RESP; its payload goes to `payload_out` (needs as many bytes as
    /// the record). IK is then established; XX must still `write_final`.
    pub fn read_response(
        &mut self,
        rec: &[u8],
        payload_out: &mut [u8],
    ) -> Result<usize, HandshakeError> {
        if !matches!(self.state, IState::AwaitResp(_)) {
            return Err(self.wrong_step("read_response"));
        }
        let IState::AwaitResp(mut noise) = std::mem::replace(&mut self.state, IState::Failed)
        else {
            return Err(HandshakeError::Failed);
        };
        let pattern = self.pattern();
        let local_index = self.local_index;
        let r = (|| {
            let (header, _, body) = decode_handshake(rec, RecordKind::HandshakeResp)?;
            check_pattern(pattern, header.pattern)?;
            check_index(local_index, header.receiver)?;
            let n = noise.read(body, payload_out)?;
            Ok((header, n))
        })();
        let (header, n) = match r {
            Ok(v) => v,
            Err(e) => return self.fail(e),
        };
        self.remote_index = header.sender;
        self.remote_capabilities = header.capabilities;
        match pattern {
            Pattern::Ik => match noise.finish(
                Role::Initiator,
                pattern,
                self.local_index,
                self.remote_index,
                self.remote_capabilities,
            ) {
                Ok(est) => self.state = IState::Done(Box::new(est)),
                Err(e) => return self.fail(e),
            },
            Pattern::Xx => self.state = IState::SendFinal(noise),
        }
        Ok(n)
    }

    /// The gateway's static key, once the handshake has authenticated it (after
    /// `read_response`). In XX the caller decides here whether to trust it.
    pub fn remote_static(&self) -> Option<[u8; KEY_LEN]> {
        match &self.state {
            IState::SendFinal(n) | IState::AwaitResp(n) => n.remote_static(),
            IState::Done(e) => Some(e.remote_static),
            _ => None,
        }
    }

    /// XX only: writes HANDSHAKE_FINAL carrying `payload` (encrypted, e.g. AUTH and a
    /// resume ticket); the handshake is then established.
    pub fn write_final(&mut self, payload: &[u8], out: &mut [u8]) -> Result<usize, HandshakeError> {
        if !matches!(self.state, IState::SendFinal(_)) {
            return Err(self.wrong_step("write_final"));
        }
        let IState::SendFinal(mut noise) = std::mem::replace(&mut self.state, IState::Failed)
        else {
            return Err(HandshakeError::Failed);
        };
        let header = HandshakeHeader {
            kind: RecordKind::HandshakeFinal,
            pattern: Pattern::Xx,
            capabilities: self.capabilities,
            sender: self.local_index,
            receiver: self.remote_index,
        };
        let r = noise.write(&header, payload, out).and_then(|n| {
            let est = noise.finish(
                Role::Initiator,
                Pattern::Xx,
                self.local_index,
                self.remote_index,
                self.remote_capabilities,
            )?;
            Ok((n, est))
        });
        match r {
            Ok((n, est)) => {
                self.state = IState::Done(Box::new(est));
                Ok(n)
            }
            Err(e) => self.fail(e),
        }
    }

    /// The session keys and peer identity, once `next()` is `Established`.
    pub fn into_established(self) -> Result<Established, HandshakeError> {
        match self.state {
            IState::Done(e) => Ok(*e),
            IState::Failed => Err(HandshakeError::Failed),
            _ => Err(HandshakeError::WrongStep("into_established")),
        }
    }

    fn fail<T>(&mut self, e: HandshakeError) -> Result<T, HandshakeError> {
        self.state = IState::Failed;
        Err(e)
    }

    fn wrong_step(&mut self, step: &'static str) -> HandshakeError {
        if matches!(self.state, IState::Failed) {
            HandshakeError::Failed
        } else {
            self.state = IState::Failed;
            HandshakeError::WrongStep(step)
        }
    }
}

enum RState {
    /// Waiting for HANDSHAKE_INIT.
    AwaitInit,
    /// INIT read, RESP to write.
    SendResp(Box<Noise>),
    /// XX: RESP written, waiting for FINAL.
    AwaitFinal(Box<Noise>),
    Done(Box<Established>),
    Failed,
}

/// The gateway's side of the handshake.
pub struct Responder {
    oracle: Arc<dyn StaticKeyOracle>,
    capabilities: Capabilities,
    local_index: SessionIndex,
    fixed_ephemeral: Option<[u8; KEY_LEN]>,
    pattern: Option<Pattern>,
    remote_index: SessionIndex,
    remote_capabilities: Capabilities,
    state: RState,
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field("pattern", &self.pattern)
            .field("local_index", &self.local_index)
            .field("next", &self.next())
            .finish_non_exhaustive()
    }
}

impl Responder {
    /// A gateway handshake whose static-key DHs go to `oracle`. The pattern is taken
    /// from the HANDSHAKE_INIT record. `local_index` is random and non-zero.
    pub fn new(
        oracle: Arc<dyn StaticKeyOracle>,
        capabilities: Capabilities,
        local_index: SessionIndex,
    ) -> Result<Self, HandshakeError> {
        if local_index.0 == 0 {
            return Err(HandshakeError::ZeroLocalIndex);
        }
        Ok(Self {
            oracle,
            capabilities,
            local_index,
            fixed_ephemeral: None,
            pattern: None,
            remote_index: SessionIndex(0),
            remote_capabilities: Capabilities(0),
            state: RState::AwaitInit,
        })
    }

    /// Test vectors and fuzzing only: use a fixed ephemeral key.
    #[doc(hidden)]
    pub fn with_fixed_ephemeral_for_test_vectors(mut self, key: [u8; KEY_LEN]) -> Self {
        self.fixed_ephemeral = Some(key);
        self
    }

    pub fn next(&self) -> Next {
        match self.state {
            RState::AwaitInit | RState::AwaitFinal(_) => Next::Receive,
            RState::SendResp(_) => Next::Send,
            RState::Done(_) => Next::Established,
            RState::Failed => Next::Failed,
        }
    }

    /// The pattern the client chose, once HANDSHAKE_INIT was read.
    pub fn pattern(&self) -> Option<Pattern> {
        self.pattern
    }

    /// The client's index and capabilities, once HANDSHAKE_INIT was read.
    pub fn remote_index(&self) -> SessionIndex {
        self.remote_index
    }

    pub fn remote_capabilities(&self) -> Capabilities {
        self.remote_capabilities
    }

    /// The client's static key: in IK after `read_init`, in XX after `read_final`.
    /// The gateway checks it against its peer list before answering (IK) or before
    /// forwarding anything.
    pub fn remote_static(&self) -> Option<[u8; KEY_LEN]> {
        match &self.state {
            RState::SendResp(n) | RState::AwaitFinal(n) => n.remote_static(),
            RState::Done(e) => Some(e.remote_static),
            _ => None,
        }
    }

    /// Reads HANDSHAKE_INIT; its payload goes to `payload_out` (needs as many bytes as
    /// the record). In IK this asks the oracle for `es` and `ss`.
    pub fn read_init(
        &mut self,
        rec: &[u8],
        payload_out: &mut [u8],
    ) -> Result<usize, HandshakeError> {
        if !matches!(self.state, RState::AwaitInit) {
            return Err(self.wrong_step("read_init"));
        }
        let r = (|| {
            let (header, raw_header, body) = decode_handshake(rec, RecordKind::HandshakeInit)?;
            if header.receiver.0 != 0 {
                return Err(HandshakeError::NonZeroReceiverIndex);
            }
            let mut noise = Noise::build(
                header.pattern,
                Role::Responder,
                raw_header,
                &DUMMY_PRIVATE_KEY,
                None,
                Some(self.oracle.clone()),
                self.fixed_ephemeral.as_ref(),
            )?;
            let n = noise.read(body, payload_out)?;
            Ok((header, noise, n))
        })();
        match r {
            Ok((header, noise, n)) => {
                self.pattern = Some(header.pattern);
                self.remote_index = header.sender;
                self.remote_capabilities = header.capabilities;
                self.state = RState::SendResp(Box::new(noise));
                Ok(n)
            }
            Err(e) => self.fail(e),
        }
    }

    /// Writes HANDSHAKE_RESP carrying `payload` (encrypted). In XX this asks the oracle
    /// for `es`; IK is then established.
    pub fn write_response(
        &mut self,
        payload: &[u8],
        out: &mut [u8],
    ) -> Result<usize, HandshakeError> {
        if !matches!(self.state, RState::SendResp(_)) {
            return Err(self.wrong_step("write_response"));
        }
        let RState::SendResp(mut noise) = std::mem::replace(&mut self.state, RState::Failed) else {
            return Err(HandshakeError::Failed);
        };
        let Some(pattern) = self.pattern else {
            return self.fail(HandshakeError::WrongStep("write_response"));
        };
        let header = HandshakeHeader {
            kind: RecordKind::HandshakeResp,
            pattern,
            capabilities: self.capabilities,
            sender: self.local_index,
            receiver: self.remote_index,
        };
        let n = match noise.write(&header, payload, out) {
            Ok(n) => n,
            Err(e) => return self.fail(e),
        };
        match pattern {
            Pattern::Ik => match noise.finish(
                Role::Responder,
                pattern,
                self.local_index,
                self.remote_index,
                self.remote_capabilities,
            ) {
                Ok(est) => self.state = RState::Done(Box::new(est)),
                Err(e) => return self.fail(e),
            },
            Pattern::Xx => self.state = RState::AwaitFinal(noise),
        }
        Ok(n)
    }

    /// XX only: reads HANDSHAKE_FINAL; the handshake is then established.
    pub fn read_final(
        &mut self,
        rec: &[u8],
        payload_out: &mut [u8],
    ) -> Result<usize, HandshakeError> {
        if !matches!(self.state, RState::AwaitFinal(_)) {
            return Err(self.wrong_step("read_final"));
        }
        let RState::AwaitFinal(mut noise) = std::mem::replace(&mut self.state, RState::Failed)
        else {
            return Err(HandshakeError::Failed);
        };
        let r = (|| {
            let (header, _, body) = decode_handshake(rec, RecordKind::HandshakeFinal)?;
            check_pattern(Pattern::Xx, header.pattern)?;
            check_index(self.local_index, header.receiver)?;
            if header.sender != self.remote_index {
                return Err(HandshakeError::WrongSenderIndex {
                    expected: self.remote_index.0,
                    got: header.sender.0,
                });
            }
            let n = noise.read(body, payload_out)?;
            let est = noise.finish(
                Role::Responder,
                Pattern::Xx,
                self.local_index,
                self.remote_index,
                self.remote_capabilities,
            )?;
            Ok((n, est))
        })();
        match r {
            Ok((n, est)) => {
                self.state = RState::Done(Box::new(est));
                Ok(n)
            }
            Err(e) => self.fail(e),
        }
    }

    /// The session keys and peer identity, once `next()` is `Established`.
    pub fn into_established(self) -> Result<Established, HandshakeError> {
        match self.state {
            RState::Done(e) => Ok(*e),
            RState::Failed => Err(HandshakeError::Failed),
            _ => Err(HandshakeError::WrongStep("into_established")),
        }
    }

    fn fail<T>(&mut self, e: HandshakeError) -> Result<T, HandshakeError> {
        self.state = RState::Failed;
        Err(e)
    }

    fn wrong_step(&mut self, step: &'static str) -> HandshakeError {
        if matches!(self.state, RState::Failed) {
            HandshakeError::Failed
        } else {
            self.state = RState::Failed;
            HandshakeError::WrongStep(step)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key_oracle::LocalKeyOracle;

    fn keys() -> (StaticKeypair, StaticKeypair) {
        (
            StaticKeypair::from_private([0x11; 32]).unwrap(),
            StaticKeypair::from_private([0x22; 32]).unwrap(),
        )
    }

    fn run(ik: bool) -> (Established, Established) {
        let (c, g) = keys();
        let gw_pub = g.public_key();
        let mut i =
            Initiator::new(c, ik.then_some(gw_pub), Capabilities(1), SessionIndex(10)).unwrap();
        let mut r = Responder::new(
            Arc::new(LocalKeyOracle::new(g)),
            Capabilities(2),
            SessionIndex(20),
        )
        .unwrap();
        let mut buf = [0u8; 1024];
        let mut pl = [0u8; 1024];
        let n = i.write_init(b"hello", &mut buf).unwrap();
        let m = r.read_init(&buf[..n], &mut pl).unwrap();
        assert_eq!(&pl[..m], b"hello");
        let n = r.write_response(b"resp", &mut buf).unwrap();
        let m = i.read_response(&buf[..n], &mut pl).unwrap();
        assert_eq!(&pl[..m], b"resp");
        if !ik {
            assert_eq!(i.next(), Next::Send);
            let n = i.write_final(b"auth", &mut buf).unwrap();
            let m = r.read_final(&buf[..n], &mut pl).unwrap();
            assert_eq!(&pl[..m], b"auth");
        }
        assert_eq!(i.next(), Next::Established);
        assert_eq!(r.next(), Next::Established);
        (i.into_established().unwrap(), r.into_established().unwrap())
    }

    #[test]
    fn xx_and_ik_agree() {
        for ik in [false, true] {
            let (a, b) = run(ik);
            let (c, g) = keys();
            assert_eq!(a.remote_static, g.public_key());
            assert_eq!(b.remote_static, c.public_key());
            assert_eq!(a.handshake_hash, b.handshake_hash);
            assert_eq!(a.pairing_code(), b.pairing_code());
            assert_eq!(a.keys.send, b.keys.recv);
            assert_eq!(a.keys.recv, b.keys.send);
            assert_ne!(a.keys.send, a.keys.recv);
            assert_eq!(a.remote_index, SessionIndex(20));
            assert_eq!(b.remote_index, SessionIndex(10));
            assert_eq!(a.remote_capabilities, Capabilities(2));
            assert_eq!(b.remote_capabilities, Capabilities(1));
            assert_eq!(a.pattern, if ik { Pattern::Ik } else { Pattern::Xx });
        }
    }

    #[test]
    fn out_of_order_steps_fail_typed() {
        let (c, _) = keys();
        let mut i = Initiator::new(c, None, Capabilities(0), SessionIndex(1)).unwrap();
        let mut buf = [0u8; 256];
        assert_eq!(
            i.write_final(b"", &mut buf),
            Err(HandshakeError::WrongStep("write_final"))
        );
        assert_eq!(i.write_init(b"", &mut buf), Err(HandshakeError::Failed));
        assert_eq!(
            Initiator::new(keys().0, None, Capabilities(0), SessionIndex(0)).unwrap_err(),
            HandshakeError::ZeroLocalIndex
        );
    }

    #[test]
    fn misaddressed_response_and_final_are_refused() {
        let (c, g) = keys();
        let oracle: Arc<dyn StaticKeyOracle> = Arc::new(LocalKeyOracle::new(g));
        let mut buf = [0u8; 512];
        let mut pl = [0u8; 512];
        // RESP addressed to another client index.
        let mut i = Initiator::new(c.clone(), None, Capabilities(0), SessionIndex(10)).unwrap();
        let mut r = Responder::new(oracle.clone(), Capabilities(0), SessionIndex(20)).unwrap();
        let n = i.write_init(b"", &mut buf).unwrap();
        r.read_init(&buf[..n], &mut pl).unwrap();
        let n = r.write_response(b"", &mut buf).unwrap();
        let mut resp = buf[..n].to_vec();
        resp[15] ^= 1;
        assert_eq!(
            i.read_response(&resp, &mut pl),
            Err(HandshakeError::WrongReceiverIndex {
                expected: 10,
                got: 11
            })
        );
        // RESP claiming the other pattern.
        let mut i = Initiator::new(c.clone(), None, Capabilities(0), SessionIndex(10)).unwrap();
        let mut r = Responder::new(oracle.clone(), Capabilities(0), SessionIndex(20)).unwrap();
        let n = i.write_init(b"", &mut buf).unwrap();
        r.read_init(&buf[..n], &mut pl).unwrap();
        let n = r.write_response(b"", &mut buf).unwrap();
        let mut resp = buf[..n].to_vec();
        resp[2] = 1;
        assert_eq!(
            i.read_response(&resp, &mut pl),
            Err(HandshakeError::PatternMismatch {
                expected: Pattern::Xx,
                got: Pattern::Ik
            })
        );
        // FINAL from another sender index.
        let mut i = Initiator::new(c, None, Capabilities(0), SessionIndex(10)).unwrap();
        let mut r = Responder::new(oracle, Capabilities(0), SessionIndex(20)).unwrap();
        let n = i.write_init(b"", &mut buf).unwrap();
        r.read_init(&buf[..n], &mut pl).unwrap();
        let n = r.write_response(b"", &mut buf).unwrap();
        i.read_response(&buf[..n], &mut pl).unwrap();
        let n = i.write_final(b"", &mut buf).unwrap();
        let mut fin = buf[..n].to_vec();
        fin[11] ^= 2;
        assert_eq!(
            r.read_final(&fin, &mut pl),
            Err(HandshakeError::WrongSenderIndex {
                expected: 10,
                got: 8
            })
        );
        assert_eq!(r.next(), Next::Failed);
    }

    #[test]
    fn small_buffers_fail_typed() {
        let (c, _) = keys();
        let mut i = Initiator::new(c, None, Capabilities(0), SessionIndex(1)).unwrap();
        let mut buf = [0u8; 40];
        assert!(matches!(
            i.write_init(b"", &mut buf),
            Err(HandshakeError::BufferTooSmall { .. })
        ));
    }
}
