//! Fuzz target bodies, shared by the cargo-fuzz crate in `vshp/fuzz/` and by
//! `tests/fuzz_corpus.rs`, which replays the saved corpus as ordinary tests.
//!
//! Each function must accept any input without panicking; that is the property the
//! fuzzer checks.

use crate::framing::StreamDecoder;
use crate::message::MessageReader;
use crate::record::{self, Record};

/// Decodes `data` as a datagram record, as the inner messages of a payload, and as a
/// byte stream split at the position named by its first byte; re-encodes what decoded
/// and checks that it reproduces the input.
pub fn record_decode(data: &[u8]) {
    match record::decode(data) {
        Ok(Record::Handshake {
            header,
            raw_header,
            noise,
        }) => {
            assert_eq!(&header.encode(), raw_header);
            assert_eq!(record::HEADER_LEN + noise.len(), data.len());
        }
        Ok(Record::Data {
            header,
            raw_header,
            sealed,
        }) => {
            assert_eq!(&header.encode(), raw_header);
            assert!(sealed.len() >= record::AEAD_TAG_LEN);
        }
        Ok(Record::Error(e)) => assert_eq!(&e.encode()[..], data),
        Err(_) => {}
    }
    for message in MessageReader::new(data) {
        if let Ok(crate::message::Message::IpPacket(batch)) = message {
            assert!(batch.iter().all(|p| !p.is_empty()));
        }
    }
    let cut = usize::from(data.first().copied().unwrap_or(0)).min(data.len());
    let mut stream = StreamDecoder::new();
    let mut consumed = 0;
    for part in [&data[..cut], &data[cut..]] {
        let mut rest = part;
        while !rest.is_empty() {
            let n = stream.push(rest);
            rest = &rest[n..];
            while let Ok(Some(r)) = stream.next_record() {
                consumed += 2 + r.len();
            }
            if n == 0 {
                break;
            }
        }
    }
    assert!(consumed <= data.len());
}

// ---- Handshake and data-plane targets ------------------------------------------------

use crate::handshake::{Initiator, Next, Responder, TransportKeys};
use crate::key_oracle::{LocalKeyOracle, StaticKeyOracle, StaticKeypair};
use crate::record::{Capabilities, SessionIndex};
use crate::transport::{Session, SessionConfig, TransportMode};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The fuzzed gateway's fixed static key, ephemeral key and index.
const FUZZ_GATEWAY_STATIC: [u8; 32] = [0x22; 32];
const FUZZ_GATEWAY_EPHEMERAL: [u8; 32] = [0x44; 32];
const FUZZ_GATEWAY_INDEX: SessionIndex = SessionIndex(0x5566_7788);
/// The seed client's fixed keys and index.
const FUZZ_CLIENT_STATIC: [u8; 32] = [0x11; 32];
const FUZZ_CLIENT_EPHEMERAL: [u8; 32] = [0x33; 32];
const FUZZ_CLIENT_INDEX: SessionIndex = SessionIndex(0x1122_3344);

fn gateway_oracle() -> Option<Arc<dyn StaticKeyOracle>> {
    static ORACLE: OnceLock<Option<Arc<LocalKeyOracle>>> = OnceLock::new();
    let o = ORACLE.get_or_init(|| {
        StaticKeypair::from_private(FUZZ_GATEWAY_STATIC)
            .ok()
            .map(|k| Arc::new(LocalKeyOracle::new(k)))
    });
    o.clone().map(|o| o as Arc<dyn StaticKeyOracle>)
}

/// Splits `data` into records, each prefixed by a big-endian u16 length.
fn framed(mut data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let (len, rest) = data.split_first_chunk::<2>()?;
        let len = usize::from(u16::from_be_bytes(*len)).min(rest.len());
        let (rec, rest) = rest.split_at(len);
        data = rest;
        Some(rec)
    })
}

fn gateway_responder() -> Option<Responder> {
    Some(
        Responder::new(gateway_oracle()?, Capabilities::ALL_V1, FUZZ_GATEWAY_INDEX)
            .ok()?
            .with_fixed_ephemeral_for_test_vectors(FUZZ_GATEWAY_EPHEMERAL),
    )
}

/// A gateway with a fixed key receives handshake records: the whole input as one
/// HANDSHAKE_INIT, then the input as u16-length-framed records (INIT, FINAL for XX,
/// then DATA records into the established session). Must never panic.
pub fn handshake_responder(data: &[u8]) {
    handshake_responder_delivered(data);
}

/// [`handshake_responder`], returning how many DATA records the session delivered
/// (so tests can check that the seeds reach the data plane).
pub fn handshake_responder_delivered(data: &[u8]) -> usize {
    let mut delivered = 0;
    let mut payload = vec![0u8; data.len()];
    let mut out = vec![0u8; 2048];
    if let Some(mut r) = gateway_responder() {
        if r.read_init(data, &mut payload).is_ok() {
            let _ = r.write_response(b"", &mut out);
        }
    }
    let Some(mut r) = gateway_responder() else {
        return delivered;
    };
    let mut records = framed(data);
    let Some(init) = records.next() else {
        return delivered;
    };
    if r.read_init(init, &mut payload).is_err() {
        assert_eq!(r.next(), Next::Failed);
        return delivered;
    }
    if r.write_response(b"\x01\x00\x04\x00\x00\x00\x07", &mut out)
        .is_err()
    {
        return delivered;
    }
    if r.next() == Next::Receive {
        let Some(fin) = records.next() else {
            return delivered;
        };
        if r.read_final(fin, &mut payload).is_err() {
            assert_eq!(r.next(), Next::Failed);
            return delivered;
        }
    }
    let Ok(est) = r.into_established() else {
        return delivered;
    };
    let Ok(mut session) = Session::new(&est, TransportMode::Datagram, Duration::ZERO) else {
        return delivered;
    };
    let mut buf = vec![0u8; 2048];
    for rec in records {
        let Some(dst) = buf.get_mut(..rec.len()) else {
            continue;
        };
        dst.copy_from_slice(rec);
        if let Ok(p) = session.open_in_place(dst, Duration::ZERO) {
            assert_eq!(p.len() + 32, rec.len());
            delivered += 1;
        }
    }
    delivered
}

fn fuzz_keys(gateway_side: bool) -> TransportKeys {
    let (a, b) = ([0xA1; 32], [0xB2; 32]);
    if gateway_side {
        TransportKeys { send: b, recv: a }
    } else {
        TransportKeys { send: a, recv: b }
    }
}

/// A session with fixed keys receives arbitrary records. Input: one flag byte
/// (bit 0: stream mode, bit 1: rekey after 4 messages), then repeated
/// `(u8 seconds to advance, u16 length, record)`. Checks that every record is either
/// delivered or counted as a drop. Must never panic.
pub fn session_receive(data: &[u8]) {
    session_receive_delivered(data);
}

/// [`session_receive`], returning how many records were delivered.
pub fn session_receive_delivered(data: &[u8]) -> u64 {
    let Some((&flags, mut rest)) = data.split_first() else {
        return 0;
    };
    let mode = if flags & 1 == 0 {
        TransportMode::Datagram
    } else {
        TransportMode::Stream
    };
    let mut config = SessionConfig::default();
    if flags & 2 != 0 {
        config.rekey_after_messages = 4;
    }
    let Ok(mut s) = Session::with_config(
        &fuzz_keys(true),
        FUZZ_GATEWAY_INDEX,
        FUZZ_CLIENT_INDEX,
        mode,
        config,
        Duration::ZERO,
    ) else {
        return 0;
    };
    let mut now = Duration::ZERO;
    let mut buf = vec![0u8; 70_000];
    let mut attempts = 0u64;
    while let Some((&dt, r)) = rest.split_first() {
        let Some((len, r)) = r.split_first_chunk::<2>() else {
            break;
        };
        let len = usize::from(u16::from_be_bytes(*len)).min(r.len());
        let (rec, r) = r.split_at(len);
        rest = r;
        now += Duration::from_secs(u64::from(dt));
        let Some(dst) = buf.get_mut(..rec.len()) else {
            break;
        };
        dst.copy_from_slice(rec);
        attempts += 1;
        if let Ok(p) = s.open_in_place(dst, now) {
            assert_eq!(p.len() + 32, rec.len());
        }
    }
    let st = s.stats();
    assert_eq!(st.received + st.drops.total(), attempts);
    st.received
}

/// Valid inputs for the handshake and session targets, so fuzzing starts deep:
/// `(target, file name, bytes)`. Written to `fuzz/corpus/` by `tests/fuzz_seeds.rs`.
pub fn seed_inputs() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut seeds = Vec::new();
    for ik in [false, true] {
        if let Some(s) = handshake_seed(ik) {
            let name = if ik { "seed-ik" } else { "seed-xx" };
            seeds.push(("handshake_responder", name.to_string(), s));
        }
    }
    for flags in [0u8, 1, 2, 3] {
        if let Some(s) = session_seed(flags) {
            seeds.push(("session_receive", format!("seed-flags{flags}"), s));
        }
    }
    seeds
}

fn push_framed(out: &mut Vec<u8>, rec: &[u8]) {
    out.extend_from_slice(&u16::try_from(rec.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(rec);
}

fn handshake_seed(ik: bool) -> Option<Vec<u8>> {
    let client = StaticKeypair::from_private(FUZZ_CLIENT_STATIC).ok()?;
    let gw_pub = gateway_oracle()?.public_key();
    let mut i = Initiator::new(
        client,
        ik.then_some(gw_pub),
        Capabilities::ALL_V1,
        FUZZ_CLIENT_INDEX,
    )
    .ok()?
    .with_fixed_ephemeral_for_test_vectors(FUZZ_CLIENT_EPHEMERAL);
    let mut r = gateway_responder()?;
    let (mut w, mut p, mut seed) = (vec![0u8; 2048], vec![0u8; 2048], Vec::new());
    let n = i.write_init(b"\x01\x00\x04\x00\x00\x00\x07", &mut w).ok()?;
    push_framed(&mut seed, w.get(..n)?);
    r.read_init(w.get(..n)?, &mut p).ok()?;
    let n = r
        .write_response(b"\x01\x00\x04\x00\x00\x00\x07", &mut w)
        .ok()?;
    i.read_response(w.get(..n)?, &mut p).ok()?;
    if !ik {
        let n = i.write_final(b"\x02\x00\x02\x00\x00", &mut w).ok()?;
        push_framed(&mut seed, w.get(..n)?);
    }
    let est = i.into_established().ok()?;
    let mut s = Session::new(&est, TransportMode::Datagram, Duration::ZERO).ok()?;
    for msg in [&b"\x06\x00\x18"[..], b"\x05\x00\x03\x00\x01\x45"] {
        let n = s.seal(msg, &mut w, Duration::ZERO).ok()?;
        push_framed(&mut seed, w.get(..n)?);
    }
    Some(seed)
}

fn session_seed(flags: u8) -> Option<Vec<u8>> {
    let mode = if flags & 1 == 0 {
        TransportMode::Datagram
    } else {
        TransportMode::Stream
    };
    let mut config = SessionConfig::default();
    if flags & 2 != 0 {
        config.rekey_after_messages = 4;
    }
    let mut s = Session::with_config(
        &fuzz_keys(false),
        FUZZ_CLIENT_INDEX,
        FUZZ_GATEWAY_INDEX,
        mode,
        config,
        Duration::ZERO,
    )
    .ok()?;
    let mut seed = vec![flags];
    let mut w = vec![0u8; 256];
    let mut now = Duration::ZERO;
    for i in 0u8..10 {
        // One jump of 130 s crosses a time-based rekey.
        let dt: u8 = if i == 5 { 130 } else { 1 };
        now += Duration::from_secs(u64::from(dt));
        let n = s.seal(&[0x06, 0x00, 0x01, i], &mut w, now).ok()?;
        seed.push(dt);
        push_framed(&mut seed, w.get(..n)?);
    }
    Some(seed)
}
