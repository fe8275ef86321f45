#![allow(clippy::unwrap_used, clippy::expect_used)]
//! What one gateway core spends per handshake: the responder's side alone.
//!
//! `handshake/xx` and `handshake/ik` in `record.rs` time both sides on one core, which
//! is what a loopback test sees but not what a gateway pays: the initiator's half runs
//! on the client. Here the initiator's messages are made outside the timed region and
//! only the responder's steps are timed (XX: read INIT, write RESP, read FINAL; IK: read
//! INIT, write RESP), each with a fresh initiator (fresh ephemeral), as in real traffic.
//! The responder uses an in-process key oracle, so the figure excludes the broker IPC a
//! real gateway adds for the static-key DHs.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vshp::handshake::{Initiator, Responder};
use vshp::key_oracle::{LocalKeyOracle, StaticKeyOracle, StaticKeypair};
use vshp::record::{Capabilities, SessionIndex};

const HELLO: &[u8] = b"\x01\x00\x04\x00\x00\x00\x07";
const AUTH: &[u8] = b"\x02\x00\x02\x00\x00";

/// The responder's time for one handshake (the initiator's steps are not counted).
fn responder_time(ik: bool, client: &StaticKeypair, oracle: &Arc<LocalKeyOracle>) -> Duration {
    let gw = ik.then(|| oracle.public_key());
    let mut i = Initiator::new(client.clone(), gw, Capabilities::ALL_V1, SessionIndex(1)).unwrap();
    let (mut w, mut p) = ([0u8; 512], [0u8; 512]);
    let n = i.write_init(HELLO, &mut w).unwrap();
    let init = w[..n].to_vec();

    let t = Instant::now();
    let mut r = Responder::new(oracle.clone(), Capabilities::ALL_V1, SessionIndex(2)).unwrap();
    r.read_init(&init, &mut p).unwrap();
    let n = r.write_response(HELLO, &mut w).unwrap();
    let mut spent = t.elapsed();

    i.read_response(&w[..n], &mut p).unwrap();
    if !ik {
        let n = i.write_final(AUTH, &mut w).unwrap();
        let t = Instant::now();
        r.read_final(&w[..n], &mut p).unwrap();
        spent += t.elapsed();
    }
    let t = Instant::now();
    black_box(r.into_established().unwrap());
    spent + t.elapsed()
}

fn responder(c: &mut Criterion) {
    let client = StaticKeypair::from_private([1; 32]).unwrap();
    let oracle = Arc::new(LocalKeyOracle::new(
        StaticKeypair::from_private([2; 32]).unwrap(),
    ));
    let mut group = c.benchmark_group("handshake_responder");
    group.throughput(Throughput::Elements(1));
    for (name, ik) in [("xx", false), ("ik", true)] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| responder_time(ik, &client, &oracle))
                    .sum()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, responder);
criterion_main!(benches);
