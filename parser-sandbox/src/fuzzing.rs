//! Fuzz target bodies, shared by the cargo-fuzz crate in `parser-sandbox/fuzz/` and by
//! `tests/fuzz_corpus.rs`, which replays the saved corpus as ordinary tests.
//!
//! `worker_receive` admits a peer into a [`WorkerCore`] — when the first input byte's
//! low six bits are all set, after a real XX handshake with a vshp `Initiator` (key
//! oracle: the broker's guard over a local key), otherwise from fixed session keys —
//! then plays the rest of the input as operations `op u8, len u16 BE, bytes[len]`:
//!
//! | op % 6 | what |
//! |---|---|
//! | 0 | `bytes` as a raw record from the peer |
//! | 1 | `bytes` as the plaintext of a DATA record the client seals (authenticated garbage) |
//! | 2 | `bytes` as one IP packet in a sealed IP_PACKET message, source patched to the lease |
//! | 3 | `bytes` split into packets (first byte of each = its length) as a netstack batch |
//! | 4 | `bytes` as a postcard-encoded broker message |
//! | 5 | time moves on by `bytes[0]` seconds |
//!
//! Checked on every input: nothing panics; every packet the core hands to the netstack
//! passes [`check_outbound`](crate::packet_policy::check_outbound) under the lease;
//! every DATA record it sends opens with the client's session.

use std::sync::Arc;
use std::time::Duration;

use ipc_schema::PacketBatch;
use ipc_schema::messages::broker_worker::{BrokerToWorker, Decision, WorkerToBroker};
use vshp::handshake::{Initiator, TransportKeys};
use vshp::key_oracle::{LocalKeyOracle, StaticKeypair};
use vshp::lease::{Ipv4Prefix, Lease, LeaseId, Route};
use vshp::message::MessageWriter;
use vshp::record::{Capabilities, SessionIndex};
use vshp::transport::{Session, SessionConfig, TransportMode};

use crate::core::{CoreConfig, WorkerCore};
use crate::oracle::LocalHandshakeOracle;
use crate::packet_policy::{PacketPolicy, check_outbound};

/// The lease the fuzzed peer is admitted with.
pub fn fuzz_lease() -> Lease {
    Lease {
        id: LeaseId(9),
        ipv4: Ipv4Prefix {
            addr: std::net::Ipv4Addr::new(100, 64, 0, 2),
            len: 24,
        },
        ipv6: Some(vshp::lease::Ipv6Prefix {
            addr: std::net::Ipv6Addr::new(0xfd56, 0x5348, 0, 0, 0, 0, 0, 2),
            len: 64,
        }),
        dns: vec![std::net::IpAddr::V4(std::net::Ipv4Addr::new(100, 64, 0, 1))],
        mtu: 1400,
        routes: vec![Route::V4(Ipv4Prefix {
            addr: std::net::Ipv4Addr::UNSPECIFIED,
            len: 0,
        })],
        expires_at_unix: 2_000_000_000,
    }
}

fn policy() -> PacketPolicy {
    PacketPolicy {
        denied_prefixes: ["192.168.0.0/16", "fd00:1::/32"]
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect(),
        allow_lan: false,
    }
}

/// An admitted core and the client session that talks to it: after a real XX
/// handshake when `real`, else from fixed keys (fast, so the fuzzer spends its time in
/// the data path).
fn admitted(mode: TransportMode, real: bool) -> Option<(WorkerCore, Session)> {
    if !real {
        return installed(mode);
    }
    let gw = StaticKeypair::from_private([0x42; 32]).ok()?;
    let client = StaticKeypair::from_private([0x17; 32]).ok()?;
    let oracle = Arc::new(LocalHandshakeOracle::new(LocalKeyOracle::new(gw)));
    let mut config = CoreConfig::new(mode);
    config.policy = policy();
    let now = Duration::from_secs(1);
    let mut core = WorkerCore::new(config, oracle, now);
    let mut init = Initiator::new(client, None, Capabilities::ALL_V1, SessionIndex(7)).ok()?;
    let mut buf = vec![0u8; 4096];
    let mut pl = vec![0u8; 4096];
    let n = init.write_init(&[], &mut buf).ok()?;
    core.on_record(buf.get_mut(..n)?, now).ok()?;
    let resp = unframe(&mut core, mode).into_iter().next()?;
    init.read_response(&resp, &mut pl).ok()?;
    let n = init.write_final(&[], &mut buf).ok()?;
    core.on_record(buf.get_mut(..n)?, now).ok()?;
    let est = init.into_established().ok()?;
    let session = Session::new(&est, mode, now).ok()?;
    let id = core.drain_broker().find_map(|m| match m {
        WorkerToBroker::Finished { handshake, .. } => Some(handshake),
        _ => None,
    })?;
    core.on_broker(
        &BrokerToWorker::Decision {
            handshake: id,
            decision: Decision::Admit {
                lease: fuzz_lease(),
                resumed: false,
            },
        },
        now,
    );
    Some((core, session))
}

fn installed(mode: TransportMode) -> Option<(WorkerCore, Session)> {
    let gw = StaticKeypair::from_private([0x42; 32]).ok()?;
    let oracle = Arc::new(LocalHandshakeOracle::new(LocalKeyOracle::new(gw)));
    let mut config = CoreConfig::new(mode);
    config.policy = policy();
    let now = Duration::from_secs(1);
    let mut core = WorkerCore::new(config, oracle, now);
    let (k1, k2) = ([0x51u8; 32], [0x52u8; 32]);
    let id = ipc_schema::messages::broker_worker::HandshakeId(1);
    let worker_keys = TransportKeys { send: k2, recv: k1 };
    if !core.install_session_for_fuzzing(&worker_keys, SessionIndex(0x99), SessionIndex(7), id, now)
    {
        return None;
    }
    let client_keys = TransportKeys { send: k1, recv: k2 };
    let client = Session::with_config(
        &client_keys,
        SessionIndex(7),
        SessionIndex(0x99),
        mode,
        SessionConfig::default(),
        now,
    )
    .ok()?;
    core.on_broker(
        &BrokerToWorker::Decision {
            handshake: id,
            decision: Decision::Admit {
                lease: fuzz_lease(),
                resumed: false,
            },
        },
        now,
    );
    Some((core, client))
}

/// The queued records without stream prefixes; clears the queue.
fn unframe(core: &mut WorkerCore, mode: TransportMode) -> Vec<Vec<u8>> {
    let skip = if mode == TransportMode::Stream { 2 } else { 0 };
    let out = core
        .records()
        .iter()
        .map(|r| r.get(skip..).unwrap_or(&[]).to_vec())
        .collect();
    core.records().clear();
    out
}

/// See the module docs.
pub fn worker_receive(data: &[u8]) {
    let mode = if data.first().is_some_and(|b| b & 0x80 != 0) {
        TransportMode::Stream
    } else {
        TransportMode::Datagram
    };
    // One input in 64 runs the real handshake first (slow); the others start admitted.
    let real = data.first().is_some_and(|b| b & 0x3f == 0x3f);
    let Some((mut core, mut client)) = admitted(mode, real) else {
        return;
    };
    // The CONFIG record.
    for rec in unframe(&mut core, mode) {
        let mut out = vec![0u8; rec.len()];
        assert!(client.open(&rec, &mut out, Duration::from_secs(1)).is_ok());
    }
    let lease = fuzz_lease();
    let policy = policy();
    let mut now = Duration::from_secs(1);
    let mut rest = data.get(1..).unwrap_or(&[]);
    let mut plain = vec![0u8; 70_000];
    let mut sealed = vec![0u8; 70_000];
    let mut batch = PacketBatch::new(lease.id);
    while let Some((&[op, a, b], tail)) = rest.split_first_chunk::<3>() {
        let len = usize::from(u16::from_be_bytes([a, b])).min(tail.len());
        let (bytes, next) = tail.split_at(len);
        rest = next;
        match op % 6 {
            0 => {
                let mut rec = bytes.to_vec();
                let _ = core.on_record(&mut rec, now);
            }
            1 | 2 => {
                let n = if op % 6 == 1 {
                    let Some(dst) = plain.get_mut(..bytes.len()) else {
                        continue;
                    };
                    dst.copy_from_slice(bytes);
                    bytes.len()
                } else {
                    let mut pkt = bytes.to_vec();
                    if let Some(src) = pkt.get_mut(12..16) {
                        src.copy_from_slice(&lease.ipv4.addr.octets());
                    }
                    let mut w = MessageWriter::new(&mut plain);
                    if pkt.is_empty() || w.ip_packets(&[&pkt]).is_err() {
                        continue;
                    }
                    w.len()
                };
                let Some(p) = plain.get(..n) else { continue };
                if let Ok(len) = client.seal(p, &mut sealed, now) {
                    if let Some(rec) = sealed.get_mut(..len) {
                        let _ = core.on_record(rec, now);
                    }
                }
            }
            3 => {
                batch.clear();
                let mut r = bytes;
                while let Some((&l, t)) = r.split_first() {
                    let l = usize::from(l).max(1).min(t.len());
                    let (p, t2) = t.split_at(l);
                    r = t2;
                    if batch.push(p).is_err() {
                        break;
                    }
                }
                core.on_return_batch(&batch, now);
            }
            4 => {
                if let Ok(msg) = ipc_schema::codec::decode_body::<BrokerToWorker>(bytes) {
                    core.on_broker(&msg, now);
                }
            }
            _ => {
                now += Duration::from_secs(u64::from(bytes.first().copied().unwrap_or(1)));
                core.on_tick(now);
            }
        }
        // Invariants.
        core.flush_batch();
        while let Some(b) = core.ready_batch() {
            let lease_now = core.lease().cloned().unwrap_or_else(fuzz_lease);
            for p in b.iter() {
                assert!(check_outbound(p, &lease_now, &policy).is_ok());
            }
            core.batch_sent();
        }
        for rec in unframe(&mut core, mode) {
            if rec.get(1) == Some(&4) {
                let mut out = vec![0u8; rec.len()];
                assert!(
                    client.open(&rec, &mut out, now).is_ok(),
                    "worker DATA opens"
                );
            }
        }
        let _ = core.drain_broker().count();
        if core.exit().is_some() {
            break;
        }
    }
}
