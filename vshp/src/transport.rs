//! The data plane: sealing and opening DATA records of an established session.
//!
//! After the handshake each direction has its own 32-byte key (Noise `Split()`, taken
//! raw from snow). Records are sealed with ChaCha20-Poly1305 (ring, in place, into the
//! caller's buffer): nonce = 4 zero bytes ‖ LE64(counter), associated data = the 16-byte
//! DATA header, so epoch, receiver index and counter are all authenticated. WireGuard
//! also leaves Noise's transport state and seals with the raw keys and an explicit
//! counter nonce; snow's own transport mode cannot serve here, since it neither takes
//! associated data nor exposes the counter.
//!
//! - **Counters** start at 0 in every key epoch and increase by one per record; a
//!   (key, counter) pair is never used twice because the send side only moves forward
//!   and each epoch has a different key.
//! - **Replay**: datagram sessions accept reordering within a [`ReplayWindow`] (RFC 6479,
//!   4032 counters) per epoch; streams require exactly the next counter.
//! - **Rekey**: the sender moves to the next epoch after `rekey_after_time` (2 min) or
//!   `rekey_after_messages`, with `key[n+1] = BLAKE2s-256("VSHP/1 rekey" ‖ key[n])`:
//!   one-way, so a key leaked later does not reveal earlier traffic. The receiver follows
//!   when a record of a later epoch (at most `MAX_EPOCH_SKIP` ahead) authenticates, and
//!   keeps the previous epoch's key for `previous_key_grace` so reordered records still
//!   open. Directions rotate independently; no message is needed.
//! - **Reject limits**: after `reject_after_time` (session age) or
//!   `reject_after_messages` the session neither sends nor receives; the caller must run
//!   a new handshake ([`Session::needs_handshake`] says so earlier).
//!
//! Time is the caller's monotonic clock as a `Duration` since any fixed origin.

use crate::handshake::{Established, TransportKeys};
use crate::key_oracle::KEY_LEN;
use crate::record::{
    self, AEAD_TAG_LEN, DataHeader, HEADER_LEN, MAX_DATA_PLAINTEXT, Record, RecordError,
    RecordKind, SessionIndex,
};
use crate::replay::{ReplayError, ReplayWindow};
use blake2::{Blake2s256, Digest};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use std::fmt;
use std::time::Duration;

/// Label of the one-way key ratchet.
pub const REKEY_LABEL: &[u8] = b"VSHP/1 rekey";
/// The sender moves to a new key epoch at least this often.
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
/// ... or after this many records in one epoch.
pub const REKEY_AFTER_MESSAGES: u64 = 1 << 24;
/// After this session age nothing is sent or accepted any more.
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(3600);
/// From this age on the session asks for a new handshake (before it is rejected).
pub const HANDSHAKE_AFTER_TIME: Duration = Duration::from_secs(3600 - 300);
/// Most records one session may send (all epochs together).
pub const REJECT_AFTER_MESSAGES: u64 = 1 << 60;
/// How long the previous epoch's receive key is kept after the peer moved on.
pub const PREVIOUS_KEY_GRACE: Duration = Duration::from_secs(10);
/// How many epochs ahead a received record may be (e.g. a whole epoch was lost).
pub const MAX_EPOCH_SKIP: u8 = 4;

/// The next epoch's key: `BLAKE2s-256(REKEY_LABEL ‖ key)`.
pub fn next_epoch_key(key: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    let mut out = [0u8; KEY_LEN];
    out.copy_from_slice(
        &Blake2s256::new()
            .chain_update(REKEY_LABEL)
            .chain_update(key)
            .finalize(),
    );
    out
}

/// The 96-bit AEAD nonce of a counter (as Noise's ChaChaPoly and WireGuard).
pub fn nonce_bytes(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n
}

/// Datagram (UDP: loss and reordering are normal) or stream (TCP, USB: in order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportMode {
    Datagram,
    Stream,
}

/// Limits of one session; [`SessionConfig::default`] holds the protocol's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    pub rekey_after_time: Duration,
    pub rekey_after_messages: u64,
    pub handshake_after_time: Duration,
    pub reject_after_time: Duration,
    pub reject_after_messages: u64,
    pub previous_key_grace: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            rekey_after_time: REKEY_AFTER_TIME,
            rekey_after_messages: REKEY_AFTER_MESSAGES,
            handshake_after_time: HANDSHAKE_AFTER_TIME,
            reject_after_time: REJECT_AFTER_TIME,
            reject_after_messages: REJECT_AFTER_MESSAGES,
            previous_key_grace: PREVIOUS_KEY_GRACE,
        }
    }
}

/// The AEAD key could not be set up (cannot happen with 32-byte keys; kept typed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("ChaCha20-Poly1305 key setup failed")]
pub struct CryptoError;

/// Why a record was not sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The session is older than `reject_after_time`: run a new handshake.
    #[error("session expired: a new handshake is needed")]
    SessionExpired,
    /// The session sent `reject_after_messages` records: run a new handshake.
    #[error("session message limit reached: a new handshake is needed")]
    CounterExhausted,
    #[error("buffer of {have} bytes is too small, {need} needed")]
    BufferTooSmall { need: usize, have: usize },
    #[error("plaintext of {0} bytes exceeds {MAX_DATA_PLAINTEXT}")]
    PlaintextTooLarge(usize),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

impl SendError {
    /// Whether the session is finished and a new handshake must replace it.
    pub fn needs_handshake(&self) -> bool {
        matches!(self, Self::SessionExpired | Self::CounterExhausted)
    }
}

/// Why a received record was dropped. Each maps to a [`DropCounters`] field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReceiveError {
    #[error("malformed record: {0}")]
    Malformed(RecordError),
    #[error("not a DATA record ({0:?})")]
    NotData(RecordKind),
    #[error("record for index {got}, this session is {expected}")]
    WrongReceiver { expected: u32, got: u32 },
    #[error("record of unknown key epoch {0}")]
    BadEpoch(u8),
    #[error("counter {0} was already received")]
    Replayed(u64),
    #[error("counter {0} is behind the replay window")]
    TooOld(u64),
    #[error("stream record out of order: expected counter {expected}, got {got}")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("authentication tag did not verify")]
    BadTag,
    #[error("session expired: a new handshake is needed")]
    SessionExpired,
    #[error("buffer of {have} bytes is too small, {need} needed")]
    BufferTooSmall { need: usize, have: usize },
}

impl ReceiveError {
    /// Whether the session is finished and a new handshake must replace it.
    pub fn needs_handshake(&self) -> bool {
        matches!(self, Self::SessionExpired)
    }
}

/// Dropped records by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounters {
    pub malformed: u64,
    pub not_data: u64,
    pub wrong_receiver: u64,
    pub bad_epoch: u64,
    pub replayed: u64,
    pub too_old: u64,
    pub out_of_order: u64,
    pub bad_tag: u64,
    pub expired: u64,
    pub buffer_too_small: u64,
}

impl DropCounters {
    fn count(&mut self, e: &ReceiveError) {
        let c = match e {
            ReceiveError::Malformed(_) => &mut self.malformed,
            ReceiveError::NotData(_) => &mut self.not_data,
            ReceiveError::WrongReceiver { .. } => &mut self.wrong_receiver,
            ReceiveError::BadEpoch(_) => &mut self.bad_epoch,
            ReceiveError::Replayed(_) => &mut self.replayed,
            ReceiveError::TooOld(_) => &mut self.too_old,
            ReceiveError::OutOfOrder { .. } => &mut self.out_of_order,
            ReceiveError::BadTag => &mut self.bad_tag,
            ReceiveError::SessionExpired => &mut self.expired,
            ReceiveError::BufferTooSmall { .. } => &mut self.buffer_too_small,
        };
        *c += 1;
    }

    /// All drops together.
    pub fn total(&self) -> u64 {
        self.malformed
            + self.not_data
            + self.wrong_receiver
            + self.bad_epoch
            + self.replayed
            + self.too_old
            + self.out_of_order
            + self.bad_tag
            + self.expired
            + self.buffer_too_small
    }
}

/// Counters of one session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub sent: u64,
    pub received: u64,
    /// Epochs the send side moved forward.
    pub send_rekeys: u64,
    /// Epochs the receive side moved forward.
    pub recv_rekeys: u64,
    pub drops: DropCounters,
}

/// One key of one epoch: raw bytes (to ratchet) and ring's expanded key.
#[derive(Clone)]
struct EpochKey {
    epoch: u32,
    raw: [u8; KEY_LEN],
    aead: LessSafeKey,
}

impl Drop for EpochKey {
    fn drop(&mut self) {
        // Best effort: wipe our copy of a retired key (ring keeps its own copy inside
        // `LessSafeKey`, which we cannot wipe). `black_box` keeps the store alive.
        self.raw.fill(0);
        std::hint::black_box(&self.raw);
    }
}

impl EpochKey {
    fn new(epoch: u32, raw: [u8; KEY_LEN]) -> Result<Self, CryptoError> {
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &raw).map_err(|_| CryptoError)?;
        Ok(Self {
            epoch,
            raw,
            aead: LessSafeKey::new(unbound),
        })
    }

    /// The key `steps` epochs later.
    fn advance(&self, steps: u32) -> Result<Self, CryptoError> {
        let mut raw = self.raw;
        for _ in 0..steps {
            raw = next_epoch_key(&raw);
        }
        Self::new(self.epoch.checked_add(steps).ok_or(CryptoError)?, raw)
    }
}

/// Receive state of one epoch.
#[derive(Clone)]
struct RecvEpoch {
    key: EpochKey,
    window: ReplayWindow,
    /// Streams: the only acceptable next counter.
    next_in_order: u64,
}

impl RecvEpoch {
    fn new(key: EpochKey) -> Self {
        Self {
            key,
            window: ReplayWindow::new(),
            next_in_order: 0,
        }
    }
}

/// An established VSHP session's data plane.
pub struct Session {
    mode: TransportMode,
    config: SessionConfig,
    local_index: SessionIndex,
    remote_index: SessionIndex,
    started: Duration,
    // Send side.
    send: EpochKey,
    send_counter: u64,
    send_epoch_started: Duration,
    total_sent: u64,
    // Receive side.
    recv: RecvEpoch,
    /// The epoch before `recv`, and when the peer moved past it.
    prev: Option<(RecvEpoch, Duration)>,
    /// The key of `recv.epoch + 1`, precomputed so the common rekey costs no KDF.
    recv_next: EpochKey,
    stats: SessionStats,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("mode", &self.mode)
            .field("local_index", &self.local_index)
            .field("remote_index", &self.remote_index)
            .field("send_epoch", &self.send.epoch)
            .field("recv_epoch", &self.recv.key.epoch)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Where the key that opens a record comes from.
enum Slot {
    Current,
    Previous,
    Ahead(u8),
}

impl Session {
    /// The data plane of a finished handshake, with the protocol's default limits.
    pub fn new(est: &Established, mode: TransportMode, now: Duration) -> Result<Self, CryptoError> {
        Self::with_config(
            &est.keys,
            est.local_index,
            est.remote_index,
            mode,
            SessionConfig::default(),
            now,
        )
    }

    /// A session from raw keys and explicit limits (tests, fuzzing, resumption).
    pub fn with_config(
        keys: &TransportKeys,
        local_index: SessionIndex,
        remote_index: SessionIndex,
        mode: TransportMode,
        config: SessionConfig,
        now: Duration,
    ) -> Result<Self, CryptoError> {
        let recv = EpochKey::new(0, keys.recv)?;
        let recv_next = recv.advance(1)?;
        Ok(Self {
            mode,
            config,
            local_index,
            remote_index,
            started: now,
            send: EpochKey::new(0, keys.send)?,
            send_counter: 0,
            send_epoch_started: now,
            total_sent: 0,
            recv: RecvEpoch::new(recv),
            prev: None,
            recv_next,
            stats: SessionStats::default(),
        })
    }

    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    pub fn mode(&self) -> TransportMode {
        self.mode
    }

    pub fn local_index(&self) -> SessionIndex {
        self.local_index
    }

    pub fn remote_index(&self) -> SessionIndex {
        self.remote_index
    }

    /// The send side's current key epoch (full, not the wire byte).
    pub fn send_epoch(&self) -> u32 {
        self.send.epoch
    }

    /// The receive side's current key epoch.
    pub fn recv_epoch(&self) -> u32 {
        self.recv.key.epoch
    }

    fn age(&self, now: Duration) -> Duration {
        now.saturating_sub(self.started)
    }

    /// Whether the session has passed its reject limits.
    pub fn is_expired(&self, now: Duration) -> bool {
        self.age(now) >= self.config.reject_after_time
            || self.total_sent >= self.config.reject_after_messages
    }

    /// Whether the caller should start a new handshake now (before the session expires).
    pub fn needs_handshake(&self, now: Duration) -> bool {
        self.age(now) >= self.config.handshake_after_time
            || self.total_sent >= self.config.reject_after_messages / 2
            || self.is_expired(now)
    }

    /// Seals the plaintext the caller put at `buf[HEADER_LEN..HEADER_LEN + plaintext_len]`:
    /// writes the header before it and the tag after it. Returns the record length.
    pub fn seal_in_place(
        &mut self,
        buf: &mut [u8],
        plaintext_len: usize,
        now: Duration,
    ) -> Result<usize, SendError> {
        if plaintext_len > MAX_DATA_PLAINTEXT {
            return Err(SendError::PlaintextTooLarge(plaintext_len));
        }
        let total = HEADER_LEN + plaintext_len + AEAD_TAG_LEN;
        if buf.len() < total {
            return Err(SendError::BufferTooSmall {
                need: total,
                have: buf.len(),
            });
        }
        if self.age(now) >= self.config.reject_after_time {
            return Err(SendError::SessionExpired);
        }
        if self.total_sent >= self.config.reject_after_messages {
            return Err(SendError::CounterExhausted);
        }
        if self.send_counter >= self.config.rekey_after_messages
            || now.saturating_sub(self.send_epoch_started) >= self.config.rekey_after_time
        {
            // Replacing the key drops the old one: records sealed from now on cannot
            // be opened with anything derivable from earlier keys, and vice versa.
            self.send = self
                .send
                .advance(1)
                .map_err(|_| SendError::CounterExhausted)?;
            self.send_counter = 0;
            self.send_epoch_started = now;
            self.stats.send_rekeys += 1;
        }
        let counter = self.send_counter;
        let header = DataHeader {
            // The wire carries the epoch modulo 256.
            key_epoch: self.send.epoch as u8,
            receiver: self.remote_index,
            counter,
        }
        .encode();
        let (head, rest) = buf.split_at_mut(HEADER_LEN);
        head.copy_from_slice(&header);
        let (body, tail) = rest.split_at_mut(plaintext_len);
        let tag = self
            .send
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce_bytes(counter)),
                Aad::from(header),
                body,
            )
            .map_err(|_| CryptoError)?;
        tail[..AEAD_TAG_LEN].copy_from_slice(tag.as_ref());
        // The counter moves on only after a successful seal, and never backwards.
        self.send_counter += 1;
        self.total_sent += 1;
        self.stats.sent += 1;
        Ok(total)
    }

    /// Copies `plaintext` into `out` and seals it there. Returns the record length.
    pub fn seal(
        &mut self,
        plaintext: &[u8],
        out: &mut [u8],
        now: Duration,
    ) -> Result<usize, SendError> {
        let need = HEADER_LEN + plaintext.len() + AEAD_TAG_LEN;
        let have = out.len();
        let dst = out
            .get_mut(HEADER_LEN..HEADER_LEN + plaintext.len())
            .ok_or(SendError::BufferTooSmall { need, have })?;
        dst.copy_from_slice(plaintext);
        self.seal_in_place(out, plaintext.len(), now)
    }

    /// Opens a DATA record in place; returns the plaintext (inside `record`). Every
    /// error is a counted drop; in stream mode the caller should close the connection.
    pub fn open_in_place<'a>(
        &mut self,
        record: &'a mut [u8],
        now: Duration,
    ) -> Result<&'a mut [u8], ReceiveError> {
        match self.open_inner(record, now) {
            Ok(range) => {
                self.stats.received += 1;
                // `open_inner` checked the range against the record's length.
                record.get_mut(range).ok_or(ReceiveError::BufferTooSmall {
                    need: HEADER_LEN + AEAD_TAG_LEN,
                    have: 0,
                })
            }
            Err(e) => {
                self.stats.drops.count(&e);
                Err(e)
            }
        }
    }

    /// Copies `record` into `out`, opens it there and moves the plaintext to the front
    /// of `out`. Returns the plaintext length.
    pub fn open(
        &mut self,
        record: &[u8],
        out: &mut [u8],
        now: Duration,
    ) -> Result<usize, ReceiveError> {
        let Some(dst) = out.get_mut(..record.len()) else {
            let e = ReceiveError::BufferTooSmall {
                need: record.len(),
                have: out.len(),
            };
            self.stats.drops.count(&e);
            return Err(e);
        };
        dst.copy_from_slice(record);
        let n = self.open_in_place(dst, now)?.len();
        out.copy_within(HEADER_LEN..HEADER_LEN + n, 0);
        Ok(n)
    }

    fn open_inner(
        &mut self,
        record: &mut [u8],
        now: Duration,
    ) -> Result<std::ops::Range<usize>, ReceiveError> {
        let (header, raw) = match record::decode(record) {
            Ok(Record::Data {
                header, raw_header, ..
            }) => (header, *raw_header),
            Ok(Record::Handshake { header, .. }) => {
                return Err(ReceiveError::NotData(header.kind));
            }
            Ok(Record::Error(_)) => return Err(ReceiveError::NotData(RecordKind::Error)),
            Err(e) => return Err(ReceiveError::Malformed(e)),
        };
        if self.is_expired(now) {
            return Err(ReceiveError::SessionExpired);
        }
        if header.receiver != self.local_index {
            return Err(ReceiveError::WrongReceiver {
                expected: self.local_index.0,
                got: header.receiver.0,
            });
        }
        // Forget the previous epoch once its grace period is over.
        if let Some((_, retired)) = &self.prev {
            if now.saturating_sub(*retired) >= self.config.previous_key_grace {
                self.prev = None;
            }
        }
        let slot = self.slot_for(header.key_epoch)?;
        let counter = header.counter;
        let stream = self.mode == TransportMode::Stream;
        // Order checks before the AEAD: cheap, and they leave no state behind.
        match &slot {
            Slot::Current => self.check_order(&self.recv, counter)?,
            Slot::Previous => {
                if let Some((p, _)) = &self.prev {
                    self.check_order(p, counter)?;
                }
            }
            Slot::Ahead(_) if stream && counter != 0 => {
                return Err(ReceiveError::OutOfOrder {
                    expected: 0,
                    got: counter,
                });
            }
            Slot::Ahead(_) => {}
        }
        let ahead_key;
        let key = match &slot {
            Slot::Current => &self.recv.key.aead,
            Slot::Previous => match &self.prev {
                Some((p, _)) => &p.key.aead,
                None => return Err(ReceiveError::BadEpoch(header.key_epoch)),
            },
            Slot::Ahead(1) => &self.recv_next.aead,
            Slot::Ahead(n) => {
                ahead_key = self
                    .recv
                    .key
                    .advance(u32::from(*n))
                    .map_err(|_| ReceiveError::BadEpoch(header.key_epoch))?;
                &ahead_key.aead
            }
        };
        let body = record
            .get_mut(HEADER_LEN..)
            .ok_or(ReceiveError::Malformed(RecordError::Empty))?;
        let plain_len = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce_bytes(counter)),
                Aad::from(raw),
                body,
            )
            .map_err(|_| ReceiveError::BadTag)?
            .len();
        // Authenticated: now the state may move.
        match slot {
            Slot::Current => Self::commit(&mut self.recv, stream, counter)?,
            Slot::Previous => {
                if let Some((p, _)) = &mut self.prev {
                    Self::commit(p, stream, counter)?;
                }
            }
            Slot::Ahead(n) => {
                let key = if n == 1 {
                    self.recv_next.clone()
                } else {
                    self.recv
                        .key
                        .advance(u32::from(n))
                        .map_err(|_| ReceiveError::BadEpoch(header.key_epoch))?
                };
                let next = key
                    .advance(1)
                    .map_err(|_| ReceiveError::BadEpoch(header.key_epoch))?;
                let mut fresh = RecvEpoch::new(key);
                Self::commit(&mut fresh, stream, counter)?;
                let old = std::mem::replace(&mut self.recv, fresh);
                // Streams are in order: nothing of the old epoch can still arrive.
                self.prev = (!stream).then_some((old, now));
                self.recv_next = next;
                self.stats.recv_rekeys += 1;
            }
        }
        Ok(HEADER_LEN..HEADER_LEN + plain_len)
    }

    fn slot_for(&self, epoch_byte: u8) -> Result<Slot, ReceiveError> {
        let cur = self.recv.key.epoch as u8;
        if epoch_byte == cur {
            return Ok(Slot::Current);
        }
        if let Some((p, _)) = &self.prev {
            if epoch_byte == p.key.epoch as u8 {
                return Ok(Slot::Previous);
            }
        }
        let ahead = epoch_byte.wrapping_sub(cur);
        let max = if self.mode == TransportMode::Stream {
            1
        } else {
            MAX_EPOCH_SKIP
        };
        if (1..=max).contains(&ahead) {
            Ok(Slot::Ahead(ahead))
        } else {
            Err(ReceiveError::BadEpoch(epoch_byte))
        }
    }

    fn check_order(&self, e: &RecvEpoch, counter: u64) -> Result<(), ReceiveError> {
        match self.mode {
            TransportMode::Datagram => e.window.check(counter).map_err(replay_error),
            TransportMode::Stream if counter == e.next_in_order => Ok(()),
            TransportMode::Stream => Err(ReceiveError::OutOfOrder {
                expected: e.next_in_order,
                got: counter,
            }),
        }
    }

    fn commit(e: &mut RecvEpoch, stream: bool, counter: u64) -> Result<(), ReceiveError> {
        if stream {
            e.next_in_order = counter
                .checked_add(1)
                .ok_or(ReceiveError::TooOld(counter))?;
            Ok(())
        } else {
            e.window.commit(counter).map_err(replay_error)
        }
    }
}

fn replay_error(e: ReplayError) -> ReceiveError {
    match e {
        ReplayError::Replayed(c) => ReceiveError::Replayed(c),
        ReplayError::TooOld(c) => ReceiveError::TooOld(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Duration = Duration::from_secs(1000);

    fn pair(mode: TransportMode, config: SessionConfig) -> (Session, Session) {
        let a = TransportKeys {
            send: [1; 32],
            recv: [2; 32],
        };
        let b = TransportKeys {
            send: [2; 32],
            recv: [1; 32],
        };
        (
            Session::with_config(&a, SessionIndex(1), SessionIndex(2), mode, config, T0).unwrap(),
            Session::with_config(&b, SessionIndex(2), SessionIndex(1), mode, config, T0).unwrap(),
        )
    }

    fn seal(s: &mut Session, msg: &[u8], now: Duration) -> Vec<u8> {
        let mut buf = vec![0u8; msg.len() + 32];
        let n = s.seal(msg, &mut buf, now).unwrap();
        buf.truncate(n);
        buf
    }

    fn open(s: &mut Session, rec: &[u8], now: Duration) -> Result<Vec<u8>, ReceiveError> {
        let mut buf = rec.to_vec();
        s.open_in_place(&mut buf, now).map(|p| p.to_vec())
    }

    #[test]
    fn round_trip_both_ways() {
        let (mut a, mut b) = pair(TransportMode::Datagram, SessionConfig::default());
        let r = seal(&mut a, b"ping", T0);
        assert_eq!(r.len(), 16 + 4 + 16);
        assert_eq!(open(&mut b, &r, T0).unwrap(), b"ping");
        let r = seal(&mut b, b"pong", T0);
        let mut out = [0u8; 64];
        let n = a.open(&r, &mut out, T0).unwrap();
        assert_eq!(&out[..n], b"pong");
        assert_eq!(b.stats().received, 1);
    }

    #[test]
    fn header_is_authenticated() {
        let (mut a, mut b) = pair(TransportMode::Datagram, SessionConfig::default());
        let r = seal(&mut a, b"data", T0);
        for i in [3usize, 8, 15, 16, r.len() - 1] {
            let mut bad = r.clone();
            bad[i] ^= 1;
            assert!(open(&mut b, &bad, T0).is_err(), "byte {i}");
        }
        // Epoch byte flipped: a future epoch whose key does not match.
        let mut bad = r.clone();
        bad[2] = 1;
        assert_eq!(open(&mut b, &bad, T0), Err(ReceiveError::BadTag));
        bad[2] = 200;
        assert_eq!(open(&mut b, &bad, T0), Err(ReceiveError::BadEpoch(200)));
        assert_eq!(open(&mut b, &r, T0).unwrap(), b"data");
        assert_eq!(b.stats().drops.bad_epoch, 1);
        assert!(b.stats().drops.bad_tag >= 5);
    }

    #[test]
    fn replays_and_too_old_are_dropped_and_counted() {
        let (mut a, mut b) = pair(TransportMode::Datagram, SessionConfig::default());
        let first = seal(&mut a, b"0", T0);
        let recs: Vec<_> = (0..5000).map(|_| seal(&mut a, b"x", T0)).collect();
        assert!(open(&mut b, &recs[4999], T0).is_ok());
        assert!(open(&mut b, &recs[1000], T0).is_ok());
        assert_eq!(
            open(&mut b, &recs[1000], T0),
            Err(ReceiveError::Replayed(1001))
        );
        assert_eq!(open(&mut b, &recs[10], T0), Err(ReceiveError::TooOld(11)));
        assert_eq!(open(&mut b, &first, T0), Err(ReceiveError::TooOld(0)));
        let d = b.stats().drops;
        assert_eq!((d.replayed, d.too_old), (1, 2));
    }

    #[test]
    fn stream_requires_order() {
        let (mut a, mut b) = pair(TransportMode::Stream, SessionConfig::default());
        let r0 = seal(&mut a, b"0", T0);
        let r1 = seal(&mut a, b"1", T0);
        assert_eq!(
            open(&mut b, &r1, T0),
            Err(ReceiveError::OutOfOrder {
                expected: 0,
                got: 1
            })
        );
        assert!(open(&mut b, &r0, T0).is_ok());
        assert!(open(&mut b, &r1, T0).is_ok());
        assert!(open(&mut b, &r1, T0).is_err());
    }

    #[test]
    fn time_rekey_keeps_previous_key_briefly() {
        let (mut a, mut b) = pair(TransportMode::Datagram, SessionConfig::default());
        let old = seal(&mut a, b"old", T0);
        let t1 = T0 + REKEY_AFTER_TIME;
        let new = seal(&mut a, b"new", t1);
        assert_eq!(a.send_epoch(), 1);
        assert_eq!(new[2], 1);
        assert_eq!(
            &new[8..16],
            &0u64.to_be_bytes(),
            "counter restarts per epoch"
        );
        assert_eq!(open(&mut b, &new, t1).unwrap(), b"new");
        assert_eq!(b.recv_epoch(), 1);
        // The reordered record of epoch 0 still opens within the grace period...
        assert_eq!(
            open(&mut b, &old, t1 + Duration::from_secs(1)).unwrap(),
            b"old"
        );
        // ...but not twice, and not after it.
        assert_eq!(
            open(&mut b, &old, t1 + Duration::from_secs(2)),
            Err(ReceiveError::Replayed(0))
        );
        let old2 = {
            let (mut a2, _) = pair(TransportMode::Datagram, SessionConfig::default());
            seal(&mut a2, b"x", T0);
            seal(&mut a2, b"late", T0)
        };
        assert_eq!(
            open(&mut b, &old2, t1 + PREVIOUS_KEY_GRACE),
            Err(ReceiveError::BadEpoch(0))
        );
    }

    #[test]
    fn message_count_rekey_and_epoch_wrap() {
        let config = SessionConfig {
            rekey_after_messages: 3,
            ..SessionConfig::default()
        };
        let (mut a, mut b) = pair(TransportMode::Datagram, config);
        for i in 0..(3 * 300) {
            let r = seal(&mut a, &[i as u8], T0);
            assert_eq!(open(&mut b, &r, T0).unwrap(), [i as u8]);
        }
        assert_eq!(a.send_epoch(), 299);
        assert_eq!(b.recv_epoch(), 299);
        assert_eq!(a.stats().send_rekeys, 299);
    }

    #[test]
    fn receiver_catches_up_over_lost_epochs() {
        let config = SessionConfig {
            rekey_after_messages: 1,
            ..SessionConfig::default()
        };
        let (mut a, mut b) = pair(TransportMode::Datagram, config);
        let recs: Vec<_> = (0..10).map(|i| seal(&mut a, &[i], T0)).collect();
        assert!(open(&mut b, &recs[0], T0).is_ok());
        // Epochs 1..=3 lost: 4 is MAX_EPOCH_SKIP ahead and still opens.
        assert!(open(&mut b, &recs[4], T0).is_ok());
        assert_eq!(b.recv_epoch(), 4);
        // 9 is 5 ahead: refused.
        assert_eq!(open(&mut b, &recs[9], T0), Err(ReceiveError::BadEpoch(9)));
    }

    #[test]
    fn ratchet_is_one_way_and_distinct() {
        let k0 = [7u8; 32];
        let k1 = next_epoch_key(&k0);
        assert_ne!(k0, k1);
        assert_ne!(next_epoch_key(&k1), k1);
    }

    #[test]
    fn nonces_are_never_reused() {
        let config = SessionConfig {
            rekey_after_messages: 50,
            ..SessionConfig::default()
        };
        let (mut a, _) = pair(TransportMode::Datagram, config);
        let mut seen = std::collections::HashSet::new();
        let mut now = T0;
        for i in 0..2000u32 {
            if i % 300 == 0 {
                now += REKEY_AFTER_TIME;
            }
            let r = seal(&mut a, b"n", now);
            // (key, nonce) is identified by (full epoch, counter); the key differs per epoch.
            let counter = u64::from_be_bytes(r[8..16].try_into().unwrap());
            assert!(seen.insert((a.send_epoch(), counter)), "reused at {i}");
        }
        let keys: std::collections::HashSet<_> = {
            let mut k = [1u8; 32];
            (0..a.send_epoch() + 1)
                .map(|_| {
                    let cur = k;
                    k = next_epoch_key(&k);
                    cur
                })
                .collect()
        };
        assert_eq!(keys.len() as u32, a.send_epoch() + 1);
    }

    #[test]
    fn reject_limits_refuse_and_ask_for_handshake() {
        let config = SessionConfig {
            reject_after_messages: 3,
            ..SessionConfig::default()
        };
        let (mut a, _) = pair(TransportMode::Datagram, config);
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            a.seal(b"x", &mut buf, T0).unwrap();
        }
        let e = a.seal(b"x", &mut buf, T0).unwrap_err();
        assert_eq!(e, SendError::CounterExhausted);
        assert!(e.needs_handshake());
        assert!(a.needs_handshake(T0));

        let (mut a2, mut b2) = pair(TransportMode::Datagram, SessionConfig::default());
        let late = T0 + REJECT_AFTER_TIME;
        assert!(!b2.needs_handshake(T0));
        assert!(b2.needs_handshake(T0 + HANDSHAKE_AFTER_TIME));
        let r2 = seal(&mut a2, b"z", T0);
        assert_eq!(
            b2.seal(b"y", &mut buf, late),
            Err(SendError::SessionExpired)
        );
        assert_eq!(open(&mut b2, &r2, late), Err(ReceiveError::SessionExpired));
        assert_eq!(b2.stats().drops.expired, 1);
    }

    #[test]
    fn malformed_and_misaddressed_records_are_typed() {
        let (mut a, mut b) = pair(TransportMode::Datagram, SessionConfig::default());
        assert!(matches!(
            open(&mut b, &[], T0),
            Err(ReceiveError::Malformed(_))
        ));
        assert!(matches!(
            open(&mut b, &[1, 4, 0], T0),
            Err(ReceiveError::Malformed(_))
        ));
        let r = seal(&mut a, b"q", T0);
        let mut c = Session::with_config(
            &TransportKeys {
                send: [2; 32],
                recv: [1; 32],
            },
            SessionIndex(3),
            SessionIndex(1),
            TransportMode::Datagram,
            SessionConfig::default(),
            T0,
        )
        .unwrap();
        assert_eq!(
            open(&mut c, &r, T0),
            Err(ReceiveError::WrongReceiver {
                expected: 3,
                got: 2
            })
        );
        let mut small = [0u8; 4];
        assert!(matches!(
            a.seal(b"too big", &mut small, T0),
            Err(SendError::BufferTooSmall { .. })
        ));
        assert_eq!(b.stats().drops.malformed, 2);
    }
}
