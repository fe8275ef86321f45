#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Data-plane and handshake cost.
//!
//! - `data_record/vshp/N`: seal + open of one DATA record carrying an IP_PACKET batch of
//!   N 1400-byte packets, in place in one buffer (the steady-state path: no allocation).
//! - `data_record/raw_ring/N`: ring ChaCha20-Poly1305 seal + open of the same bytes in
//!   the same buffer, measured in the same run: the ratio is VSHP's framing overhead.
//! - `handshake/xx`, `handshake/ik`: a full handshake, both sides, per iteration.
//!
//! Throughput is in plaintext bytes; criterion reports it per second (one core).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;
use vshp::handshake::{Established, Initiator, Responder};
use vshp::key_oracle::{LocalKeyOracle, StaticKeypair};
use vshp::message::MessageWriter;
use vshp::record::{Capabilities, HEADER_LEN, SessionIndex};
use vshp::transport::{Session, TransportMode, nonce_bytes};

const PACKET: usize = 1400;

fn handshake(
    ik: bool,
    client: &StaticKeypair,
    oracle: &Arc<LocalKeyOracle>,
) -> (Established, Established) {
    let gw = ik.then(|| vshp::key_oracle::StaticKeyOracle::public_key(oracle.as_ref()));
    let mut i = Initiator::new(client.clone(), gw, Capabilities::ALL_V1, SessionIndex(1)).unwrap();
    let mut r = Responder::new(oracle.clone(), Capabilities::ALL_V1, SessionIndex(2)).unwrap();
    let mut w = [0u8; 512];
    let mut p = [0u8; 512];
    let n = i
        .write_init(b"\x01\x00\x04\x00\x00\x00\x07", &mut w)
        .unwrap();
    r.read_init(&w[..n], &mut p).unwrap();
    let n = r
        .write_response(b"\x01\x00\x04\x00\x00\x00\x07", &mut w)
        .unwrap();
    i.read_response(&w[..n], &mut p).unwrap();
    if !ik {
        let n = i.write_final(b"\x02\x00\x02\x00\x00", &mut w).unwrap();
        r.read_final(&w[..n], &mut p).unwrap();
    }
    (i.into_established().unwrap(), r.into_established().unwrap())
}

/// A record buffer whose plaintext area holds an IP_PACKET batch of `n` packets.
fn batch_buffer(n: usize) -> (Vec<u8>, usize) {
    let packet = vec![0x45u8; PACKET];
    let packets: Vec<&[u8]> = (0..n).map(|_| &packet[..]).collect();
    let mut buf = vec![0u8; HEADER_LEN + 3 + n * (2 + PACKET) + 16];
    let mut w = MessageWriter::new(&mut buf[HEADER_LEN..]);
    assert_eq!(w.ip_packets(&packets).unwrap(), n);
    let len = w.len();
    (buf, len)
}

fn data_records(c: &mut Criterion) {
    let client = StaticKeypair::from_private([1; 32]).unwrap();
    let oracle = Arc::new(LocalKeyOracle::new(
        StaticKeypair::from_private([2; 32]).unwrap(),
    ));
    let (ce, ge) = handshake(false, &client, &oracle);
    let mut group = c.benchmark_group("data_record");
    for n in [1usize, 16] {
        let (mut buf, plain_len) = batch_buffer(n);
        group.throughput(Throughput::Bytes(plain_len as u64));

        let now = Duration::from_secs(1);
        let mut tx = Session::new(&ce, TransportMode::Datagram, now).unwrap();
        let mut rx = Session::new(&ge, TransportMode::Datagram, now).unwrap();
        group.bench_with_input(BenchmarkId::new("vshp", n), &n, |b, _| {
            b.iter(|| {
                let total = tx.seal_in_place(&mut buf, plain_len, now).unwrap();
                let p = rx.open_in_place(&mut buf[..total], now).unwrap();
                black_box(p.len())
            })
        });

        let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &ce.keys.send).unwrap());
        let mut counter = 0u64;
        group.bench_with_input(BenchmarkId::new("raw_ring", n), &n, |b, _| {
            b.iter(|| {
                let header: [u8; HEADER_LEN] = buf[..HEADER_LEN].try_into().unwrap();
                let (_, rest) = buf.split_at_mut(HEADER_LEN);
                let (body, tag_out) = rest.split_at_mut(plain_len);
                let tag = key
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce_bytes(counter)),
                        Aad::from(header),
                        body,
                    )
                    .unwrap();
                tag_out[..16].copy_from_slice(tag.as_ref());
                let p = key
                    .open_in_place(
                        Nonce::assume_unique_for_key(nonce_bytes(counter)),
                        Aad::from(header),
                        &mut buf[HEADER_LEN..HEADER_LEN + plain_len + 16],
                    )
                    .unwrap();
                counter += 1;
                black_box(p.len())
            })
        });
    }
    group.finish();
}

fn handshakes(c: &mut Criterion) {
    let client = StaticKeypair::from_private([1; 32]).unwrap();
    let oracle = Arc::new(LocalKeyOracle::new(
        StaticKeypair::from_private([2; 32]).unwrap(),
    ));
    let mut group = c.benchmark_group("handshake");
    group.throughput(Throughput::Elements(1));
    group.bench_function("xx", |b| {
        b.iter(|| black_box(handshake(false, &client, &oracle)))
    });
    group.bench_function("ik", |b| {
        b.iter(|| black_box(handshake(true, &client, &oracle)))
    });
    group.finish();
}

criterion_group!(benches, data_records, handshakes);
criterion_main!(benches);
