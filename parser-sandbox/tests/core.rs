#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code
//! `WorkerCore` driven by a real VSHP client (`vshp::handshake::Initiator`) and the
//! broker's real key-oracle rule (`GuardedOracle` over a `LocalKeyOracle`).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ipc_schema::PacketBatch;
use ipc_schema::messages::broker_worker::{
    BrokerToWorker, Decision, HandshakeId, Refusal, SessionEnd, WorkerToBroker,
};
use ipc_schema::messages::common::{PeerKey, ShutdownReason};
use parser_sandbox::core::{CoreConfig, Exit, Phase, RecordDrop, WorkerCore};
use parser_sandbox::oracle::LocalHandshakeOracle;
use parser_sandbox::packet_policy::PacketPolicy;
use parser_sandbox::packet_policy::build::{ipv4, ipv6};
use std::net::Ipv4Addr;
use vshp::key_oracle::LocalKeyOracle;
use vshp::message::{CloseReason, ErrorReason, Keepalive};
use vshp::record::RecordError;
use vshp::transport::ReceiveError;
use vshp::transport::TransportMode;

const T0: Duration = Duration::from_secs(1);

fn new_core(mode: TransportMode) -> (WorkerCore, Arc<LocalHandshakeOracle>) {
    let oracle = Arc::new(LocalHandshakeOracle::new(
        LocalKeyOracle::new(gateway_key()),
    ));
    let mut config = CoreConfig::new(mode);
    config.policy = PacketPolicy {
        denied_prefixes: vec!["192.168.1.0/24".parse().unwrap()],
        allow_lan: false,
    };
    (WorkerCore::new(config, oracle.clone(), T0), oracle)
}

/// The records the core queued, unframed, and the queue cleared.
fn take_records(core: &mut WorkerCore) -> Vec<Vec<u8>> {
    let stream = core.config().mode == TransportMode::Stream;
    let recs = core
        .records()
        .iter()
        .map(|r| if stream { r[2..].to_vec() } else { r.to_vec() })
        .collect();
    core.records().clear();
    recs
}

fn take_broker(core: &mut WorkerCore) -> Vec<WorkerToBroker> {
    core.drain_broker().collect()
}

/// Runs the handshake; returns the client and the `Finished` message.
fn handshake(core: &mut WorkerCore, ik: bool, ticket: Option<&[u8]>) -> (Client, WorkerToBroker) {
    let mut client = Client::new(ik, core.config().mode);
    let mut init = client.init(ticket);
    let _ = core.on_record(&mut init, T0);
    let recs = take_records(core);
    assert_eq!(recs.len(), 1, "one RESP");
    if let Some(mut fin) = client.on_resp(&recs[0], ticket, T0) {
        let _ = core.on_record(&mut fin, T0);
    }
    assert_eq!(core.phase(), Phase::AwaitDecision);
    let msgs = take_broker(core);
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    (client, msgs.into_iter().next().unwrap())
}

fn finished_id(m: &WorkerToBroker) -> HandshakeId {
    match m {
        WorkerToBroker::Finished { handshake, .. } => *handshake,
        other => panic!("expected Finished, got {other:?}"),
    }
}

fn admit(core: &mut WorkerCore, client: &mut Client, id: HandshakeId) {
    core.on_broker(
        &BrokerToWorker::Decision {
            handshake: id,
            decision: Decision::Admit {
                lease: lease(),
                resumed: false,
            },
        },
        T0,
    );
    assert_eq!(core.phase(), Phase::Admitted);
    let recs = take_records(core);
    assert_eq!(recs.len(), 1);
    let msgs = client.open(&recs[0], T0);
    assert_eq!(msgs[0], Owned::Config(lease()));
    assert!(matches!(msgs[1], Owned::Hello(_)));
    // Admission asks the broker for a resume ticket; a datagram session also tells
    // its receiver index (roaming).
    let msgs = take_broker(core);
    match core.config().mode {
        TransportMode::Datagram => assert!(
            matches!(
                msgs.as_slice(),
                [
                    WorkerToBroker::RoamIndex { .. },
                    WorkerToBroker::SealTicket { .. }
                ]
            ),
            "{msgs:?}"
        ),
        TransportMode::Stream => assert!(
            matches!(msgs.as_slice(), [WorkerToBroker::SealTicket { .. }]),
            "{msgs:?}"
        ),
    }
}

fn batches(core: &mut WorkerCore) -> Vec<Vec<Vec<u8>>> {
    core.flush_batch();
    let mut out = Vec::new();
    while let Some(b) = core.ready_batch() {
        assert_eq!(b.lease(), lease().id);
        out.push(b.iter().map(<[u8]>::to_vec).collect());
        core.batch_sent();
    }
    out
}

#[test]
fn xx_handshake_admit_sends_config_and_forwards_only_valid_packets() {
    let (mut core, oracle) = new_core(TransportMode::Datagram);
    let (mut client, fin) = handshake(&mut core, false, None);
    assert_eq!(oracle.shown(), 1);
    match &fin {
        WorkerToBroker::Finished { peer, ticket, .. } => {
            assert_eq!(*peer, PeerKey(client_key().public_key()));
            assert!(ticket.is_none());
        }
        other => panic!("{other:?}"),
    }
    admit(&mut core, &mut client, finished_id(&fin));

    let good = ipv4(CLIENT_V4, WEB, 100);
    let good6 = ipv6(client_v6(), "2001:db8::1".parse().unwrap(), 80);
    let dns = ipv4(CLIENT_V4, GATEWAY_V4, 60);
    let spoofed = ipv4(Ipv4Addr::new(100, 64, 0, 9), WEB, 100);
    let loopback = ipv4(CLIENT_V4, Ipv4Addr::LOCALHOST, 100);
    let link_local = ipv4(CLIENT_V4, Ipv4Addr::new(169, 254, 1, 1), 100);
    let multicast = ipv4(CLIENT_V4, Ipv4Addr::new(224, 0, 0, 1), 100);
    let lan = ipv4(CLIENT_V4, Ipv4Addr::new(192, 168, 1, 10), 100);
    let too_long = ipv4(CLIENT_V4, WEB, 1401);
    let garbage = vec![0x45u8; 30];
    let mut rec = client.packets(
        T0,
        &[
            &good,
            &spoofed,
            &loopback,
            &good6,
            &link_local,
            &multicast,
            &lan,
            &too_long,
            &garbage,
            &dns,
        ],
    );
    let _ = core.on_record(&mut rec, T0);
    let got = batches(&mut core);
    assert_eq!(got, vec![vec![good, good6, dns]]);
    let s = core.stats();
    assert_eq!(s.packets_received, 10);
    assert_eq!(s.packets_forwarded, 3);
    assert_eq!(s.packet_drops.spoofed_source, 1);
    assert_eq!(s.packet_drops.loopback, 1);
    assert_eq!(s.packet_drops.link_local, 1);
    assert_eq!(s.packet_drops.multicast, 1);
    assert_eq!(s.packet_drops.denied_prefix, 1);
    assert_eq!(s.packet_drops.too_long, 1);
    assert_eq!(s.packet_drops.length_mismatch, 1);
    let wire = s.to_wire();
    assert_eq!(wire.spoofed_sources, 1);
    assert_eq!(wire.forbidden_destinations, 4);
    assert_eq!(wire.bad_packets, 2);
    assert_eq!(wire.packets_forwarded, 3);
}

#[test]
fn ik_handshake_passes_the_resume_ticket_to_the_broker() {
    let (mut core, _) = new_core(TransportMode::Datagram);
    let ticket = [7u8; 100];
    let (_client, fin) = handshake(&mut core, true, Some(&ticket));
    match fin {
        WorkerToBroker::Finished {
            ticket: Some(t),
            peer,
            ..
        } => {
            assert_eq!(t.as_slice(), &ticket);
            assert_eq!(peer, PeerKey(client_key().public_key()));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn xx_resume_ticket_travels_in_final() {
    let (mut core, _) = new_core(TransportMode::Datagram);
    let ticket = [9u8; 100];
    let (_client, fin) = handshake(&mut core, false, Some(&ticket));
    assert!(
        matches!(fin, WorkerToBroker::Finished { ticket: Some(t), .. } if t.as_slice() == ticket)
    );
}

#[test]
fn pending_then_a_later_admit() {
    let (mut core, _) = new_core(TransportMode::Datagram);
    let (mut client, fin) = handshake(&mut core, false, None);
    let id = finished_id(&fin);
    core.on_broker(
        &BrokerToWorker::Decision {
            handshake: id,
            decision: Decision::Pending,
        },
        T0,
    );
    assert_eq!(core.phase(), Phase::Pending);
    let recs = take_records(&mut core);
    assert_eq!(
        client.open(&recs[0], T0),
        vec![Owned::Error(ErrorReason::PendingApproval)]
    );
    // Packets while pending are dropped and counted; PINGs are answered.
    let good = ipv4(CLIENT_V4, WEB, 100);
    let mut rec = client.data(T0, |w| {
        w.ip_packets(&[&good]).unwrap();
        w.ping(Keepalive {
            seq: 5,
            tx_packets: 1,
            rx_packets: 0,
        })
        .unwrap();
    });
    let _ = core.on_record(&mut rec, T0);
    assert!(batches(&mut core).is_empty());
    assert_eq!(core.stats().packet_drops.not_admitted, 1);
    let recs = take_records(&mut core);
    assert!(matches!(
        client.open(&recs[0], T0)[0],
        Owned::Pong { seq: 5, .. }
    ));
    // The user approves.
    admit(&mut core, &mut client, id);
    let mut rec = client.packets(T0, &[&good]);
    let _ = core.on_record(&mut rec, T0);
    assert_eq!(batches(&mut core), vec![vec![good]]);
}

#[test]
fn refusal_sends_error_and_close_then_ends() {
    for (refusal, reason) in [
        (Refusal::Revoked, ErrorReason::Revoked),
        (Refusal::NotApproved, ErrorReason::NotApproved),
        (Refusal::PairingDenied, ErrorReason::NotApproved),
        (Refusal::VpnUnavailable, ErrorReason::VpnUnavailable),
        (Refusal::Overload, ErrorReason::Overloaded),
        (Refusal::BadTicket, ErrorReason::BadTicket),
    ] {
        let (mut core, _) = new_core(TransportMode::Datagram);
        let (mut client, fin) = handshake(&mut core, true, None);
        core.on_broker(
            &BrokerToWorker::Decision {
                handshake: finished_id(&fin),
                decision: Decision::Refuse(refusal),
            },
            T0,
        );
        assert_eq!(core.exit(), Some(Exit::Refused(refusal)));
        let recs = take_records(&mut core);
        assert_eq!(
            client.open(&recs[0], T0),
            vec![Owned::Error(reason), Owned::Close(CloseReason::Normal)]
        );
    }
}

#[test]
fn a_changed_lease_reaches_the_peer_as_a_config_delta_of_what_differs() {
    let (mut core, _) = new_core(TransportMode::Datagram);
    let (mut client, fin) = handshake(&mut core, true, None);
    admit(&mut core, &mut client, finished_id(&fin));
    let mut changed = lease();
    changed.mtu = 1300;
    core.on_broker(
        &BrokerToWorker::LeaseChanged {
            lease: changed.clone(),
        },
        T0,
    );
    let recs = take_records(&mut core);
    assert_eq!(recs.len(), 1);
    let msgs = client.open(&recs[0], T0);
    assert_eq!(msgs.len(), 1);
    let Owned::Other(text) = &msgs[0] else {
        panic!("{msgs:?}")
    };
    assert!(
        text.starts_with("ConfigDelta") && text.contains("mtu: Some(1300)"),
        "{text}"
    );
    assert!(
        text.contains("dns: None") && text.contains("routes: None"),
        "{text}"
    );
    assert_eq!(core.lease(), Some(&changed));
    // The same lease again: nothing to send. Another lease (id): ignored.
    core.on_broker(
        &BrokerToWorker::LeaseChanged {
            lease: changed.clone(),
        },
        T0,
    );
    let mut other = changed.clone();
    other.id = vshp::lease::LeaseId(changed.id.0 + 1);
    other.mtu = 1280;
    core.on_broker(&BrokerToWorker::LeaseChanged { lease: other }, T0);
    assert!(take_records(&mut core).is_empty());
    assert_eq!(core.lease(), Some(&changed));
}

/// The verdict the core gives a roaming probe carrying `rec`.
fn probe(core: &mut WorkerCore, id: u64, rec: &[u8]) -> bool {
    core.on_broker(
        &BrokerToWorker::RoamProbe {
            probe: id,
            record: ipc_schema::bounded::BoundedBytes::from_slice(rec).unwrap(),
        },
        T0,
    );
    let msgs = take_broker(core);
    match msgs.as_slice() {
        [
            WorkerToBroker::RoamVerdict {
                probe,
                authenticated,
            },
        ] if *probe == id => *authenticated,
        other => panic!("{other:?}"),
    }
}

#[test]
fn only_an_authentic_fresh_record_passes_a_roaming_probe() {
    let (mut core, _) = new_core(TransportMode::Datagram);
    let (mut client, fin) = handshake(&mut core, true, None);
    // Not admitted yet: nothing roams.
    let early = client.packets(T0, &[&ipv4(CLIENT_V4, WEB, 100)]);
    assert!(!probe(&mut core, 1, &early));
    admit(&mut core, &mut client, finished_id(&fin));
    let good = ipv4(CLIENT_V4, WEB, 100);
    let rec = client.packets(T0, &[&good]);
    // Forged: one bit of the ciphertext flipped.
    let mut forged = rec.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    assert!(!probe(&mut core, 2, &forged));
    // Garbage with the right header shape, and a handshake record.
    let mut garbage = rec.clone();
    for b in garbage.iter_mut().skip(16) {
        *b = 0x55;
    }
    assert!(!probe(&mut core, 3, &garbage));
    let hs = Client::new(true, TransportMode::Datagram).init(None);
    assert!(!probe(&mut core, 4, &hs));
    assert!(batches(&mut core).is_empty(), "nothing forwarded so far");
    // The genuine record authenticates, and its packet is forwarded like any other.
    assert!(probe(&mut core, 5, &rec));
    assert_eq!(batches(&mut core), vec![vec![good]]);
    // The same record again is a replay: refused.
    assert!(!probe(&mut core, 6, &rec));
    assert_eq!(core.phase(), Phase::Admitted);
}

#[test]
fn a_stream_session_never_roams() {
    let (mut core, _) = new_core(TransportMode::Stream);
    let (mut client, fin) = handshake(&mut core, true, None);
    admit(&mut core, &mut client, finished_id(&fin));
    let rec = client.packets(T0, &[&ipv4(CLIENT_V4, WEB, 100)]);
    assert!(!probe(&mut core, 1, &rec));
}

#[test]
fn decision_for_another_handshake_is_ignored() {
    let (mut core, _) = new_core(TransportMode::Datagram);
    let (_client, fin) = handshake(&mut core, false, None);
    let other = HandshakeId(finished_id(&fin).0 + 100);
    core.on_broker(
        &BrokerToWorker::Decision {
            handshake: other,
            decision: Decision::Admit {
                lease: lease(),
                resumed: false,
            },
        },
        T0,
    );
    assert_eq!(core.phase(), Phase::AwaitDecision);
}

#[test]
fn ping_gets_pong_with_counters() {
    let (mut core, _) = new_core(TransportMode::Datagram);
    let (mut client, fin) = handshake(&mut core, false, None);
    admit(&mut core, &mut client, finished_id(&fin));
    let good = ipv4(CLIENT_V4, WEB, 100);
    let mut rec = client.packets(T0, &[&good, &good]);
    let _ = core.on_record(&mut rec, T0);
    let mut rec = client.data(T0, |w| {
        w.ping(Keepalive {
            seq: 42,
            tx_packets: 2,
            rx_packets: 0,
        })
        .unwrap()
    });
    let _ = core.on_record(&mut rec, T0);
    let recs = take_records(&mut core);
    assert_eq!(
        client.open(&recs[0], T0),
        vec![Owned::Pong {
            seq: 42,
            tx: 0,
            rx: 2
        }]
    );
    assert_eq!(core.stats().pings_answered, 1);
}

#[test]
fn return_packets_are_packed_under_the_datagram_limit() {
    let (mut core, _) = new_core(TransportMode::Datagram);
    let (mut client, fin) = handshake(&mut core, false, None);
    admit(&mut core, &mut client, finished_id(&fin));
    let mut batch = PacketBatch::new(lease().id);
    let mut sent = Vec::new();
    for i in 0..20 {
        let p = ipv4(WEB, CLIENT_V4, 300 + i);
        batch.push(&p).unwrap();
        sent.push(p);
    }
    // Not for this peer: refused on the way back.
    batch
        .push(&ipv4(WEB, Ipv4Addr::new(100, 64, 0, 3), 300))
        .unwrap();
    // A full-MTU packet still goes (in a record of its own if it must).
    let big = ipv4(WEB, CLIENT_V4, 1400);
    batch.push(&big).unwrap();
    sent.push(big);
    core.on_return_batch(&batch, T0);
    let recs = take_records(&mut core);
    let mut got = Vec::new();
    for r in &recs {
        for m in client.open(r, T0) {
            match m {
                Owned::Packets(ps) => {
                    if ps.len() > 1 {
                        assert!(r.len() <= 1400, "record of {} bytes", r.len());
                    }
                    got.extend(ps)
                }
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(got, sent);
    // 20 × ~310 bytes: four per 1400-byte datagram, plus the big one.
    assert!(recs.len() <= 7, "{} records", recs.len());
    assert_eq!(core.stats().packets_delivered, 21);
    assert_eq!(core.stats().packet_drops.return_rejected, 1);
}

#[test]
fn stream_mode_frames_records_and_packs_large_records() {
    let (mut core, _) = new_core(TransportMode::Stream);
    let (mut client, fin) = handshake(&mut core, true, None);
    admit(&mut core, &mut client, finished_id(&fin));
    let mut batch = PacketBatch::new(lease().id);
    for _ in 0..40 {
        batch.push(&ipv4(WEB, CLIENT_V4, 1400)).unwrap();
    }
    core.on_return_batch(&batch, T0);
    let bytes = core.records().bytes().to_vec();
    let recs = take_records(&mut core);
    assert_eq!(recs.len(), 1, "40 × 1400 bytes fit one stream record");
    let framed: usize = recs.iter().map(|r| r.len() + 2).sum();
    assert_eq!(framed, bytes.len());
    let mut dec = vshp::StreamDecoder::new();
    dec.push(&bytes);
    let r = dec.next_record().unwrap().unwrap().to_vec();
    assert!(matches!(&client.open(&r, T0)[0], Owned::Packets(p) if p.len() == 40));
}

#[test]
fn retransmitted_init_gets_the_same_response_without_a_new_handshake() {
    let (mut core, oracle) = new_core(TransportMode::Datagram);
    let mut client = Client::new(false, TransportMode::Datagram);
    let init = client.init(None);
    let _ = core.on_record(&mut init.clone(), T0);
    let first = take_records(&mut core);
    let _ = core.on_record(&mut init.clone(), T0);
    let second = take_records(&mut core);
    assert_eq!(first, second);
    assert_eq!(oracle.shown(), 1);
    assert_eq!(core.stats().handshakes, 1);
    let mut fin = client.on_resp(&second[0], None, T0).unwrap();
    let _ = core.on_record(&mut fin, T0);
    assert_eq!(core.phase(), Phase::AwaitDecision);
}

#[test]
fn replayed_forged_and_garbage_records_are_counted() {
    let (mut core, _) = new_core(TransportMode::Datagram);
    let (mut client, fin) = handshake(&mut core, false, None);
    admit(&mut core, &mut client, finished_id(&fin));
    let good = ipv4(CLIENT_V4, WEB, 100);
    let rec = client.packets(T0, &[&good]);
    assert_eq!(core.on_record(&mut rec.clone(), T0), Ok(()));
    assert_eq!(
        core.on_record(&mut rec.clone(), T0),
        Err(RecordDrop::Receive(ReceiveError::Replayed(0)))
    );
    let mut forged = client.packets(T0, &[&good]);
    let last = forged.len() - 1;
    forged[last] ^= 1;
    assert_eq!(
        core.on_record(&mut forged, T0),
        Err(RecordDrop::Receive(ReceiveError::BadTag))
    );
    assert_eq!(
        core.on_record(&mut [], T0),
        Err(RecordDrop::Malformed(RecordError::Empty))
    );
    assert_eq!(
        core.on_record(&mut [9, 9, 9], T0),
        Err(RecordDrop::UnsupportedVersion(9))
    );
    assert_eq!(
        core.on_record(&mut [1, 77, 0, 0], T0),
        Err(RecordDrop::Malformed(RecordError::UnknownKind(77)))
    );
    let s = core.stats();
    assert_eq!(s.packets_forwarded, 1);
    assert_eq!(s.record_drops.replayed, 1);
    assert_eq!(s.record_drops.unopenable, 1);
    assert_eq!(s.record_drops.unsupported_version, 1);
    assert_eq!(s.record_drops.malformed, 2);
    let w = s.to_wire();
    assert_eq!(w.replayed_records, 1);
    assert_eq!(w.bad_records, 4);
    assert_eq!(core.exit(), None, "a datagram session survives bad records");
}

#[test]
fn a_corrupt_stream_record_ends_the_session() {
    let (mut core, _) = new_core(TransportMode::Stream);
    let (mut client, fin) = handshake(&mut core, false, None);
    admit(&mut core, &mut client, finished_id(&fin));
    let mut forged = client.packets(T0, &[&ipv4(CLIENT_V4, WEB, 100)]);
    forged[20] ^= 1;
    let _ = core.on_record(&mut forged, T0);
    assert_eq!(core.exit(), Some(Exit::ProtocolError));
    assert!(matches!(
        take_broker(&mut core).as_slice(),
        [
            WorkerToBroker::Counters(_),
            WorkerToBroker::SessionEnded {
                reason: SessionEnd::ProtocolError
            }
        ]
    ));
}

#[test]
fn client_close_and_idle_timeout_end_the_session() {
    let (mut core, _) = new_core(TransportMode::Datagram);
    let (mut client, fin) = handshake(&mut core, false, None);
    admit(&mut core, &mut client, finished_id(&fin));
    let mut rec = client.data(T0, |w| w.close(CloseReason::Normal).unwrap());
    let _ = core.on_record(&mut rec, T0);
    assert_eq!(core.exit(), Some(Exit::PeerClosed));
    match take_broker(&mut core).as_slice() {
        [
            WorkerToBroker::Counters(c),
            WorkerToBroker::SessionEnded {
                reason: SessionEnd::PeerClosed,
            },
        ] => assert_eq!(c.records_in, 3),
        other => panic!("{other:?}"),
    }

    let (mut core, _) = new_core(TransportMode::Datagram);
    let (_client, _) = handshake(&mut core, false, None);
    core.on_tick(T0 + Duration::from_secs(60));
    assert_eq!(core.exit(), None);
    core.on_tick(T0 + Duration::from_secs(181));
    assert_eq!(core.exit(), Some(Exit::Timeout));
}

#[test]
fn shutdown_for_revocation_tells_the_peer() {
    let (mut core, _) = new_core(TransportMode::Datagram);
    let (mut client, fin) = handshake(&mut core, false, None);
    admit(&mut core, &mut client, finished_id(&fin));
    core.on_broker(
        &BrokerToWorker::Shutdown {
            reason: ShutdownReason::PeerRevoked,
        },
        T0,
    );
    assert_eq!(
        core.exit(),
        Some(Exit::Shutdown(ShutdownReason::PeerRevoked))
    );
    let recs = take_records(&mut core);
    assert_eq!(
        client.open(&recs[0], T0),
        vec![
            Owned::Error(ErrorReason::Revoked),
            Owned::Close(CloseReason::Shutdown)
        ]
    );
}

#[test]
fn counters_are_reported_on_request() {
    let (mut core, _) = new_core(TransportMode::Datagram);
    let (mut client, fin) = handshake(&mut core, false, None);
    admit(&mut core, &mut client, finished_id(&fin));
    core.on_broker(&BrokerToWorker::ReportCounters, T0);
    match take_broker(&mut core).as_slice() {
        [WorkerToBroker::Counters(c)] => {
            assert_eq!(c.records_in, 2);
            assert_eq!(c.records_out, 2);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn messages_a_client_may_not_send_are_counted() {
    let (mut core, _) = new_core(TransportMode::Datagram);
    let (mut client, fin) = handshake(&mut core, false, None);
    admit(&mut core, &mut client, finished_id(&fin));
    let mut rec = client.data(T0, |w| w.config(&lease()).unwrap());
    assert!(matches!(
        core.on_record(&mut rec, T0),
        Err(RecordDrop::ProtocolViolation(_))
    ));
    assert_eq!(core.stats().record_drops.protocol_violation, 1);
    // DATA before any handshake, and a RESP from a client: unexpected.
    let (mut fresh, _) = new_core(TransportMode::Datagram);
    let _ = fresh.on_record(&mut rec.clone(), T0);
    assert_eq!(fresh.stats().record_drops.unexpected, 1);
}

#[test]
fn handshakes_are_rate_limited_per_window() {
    let (mut core, oracle) = new_core(TransportMode::Datagram);
    for i in 0..10u64 {
        let mut client = Client::new(false, TransportMode::Datagram);
        let mut init = client.init(None);
        let _ = core.on_record(&mut init, T0 + Duration::from_millis(i));
        take_records(&mut core);
    }
    assert_eq!(oracle.shown(), 8);
    assert_eq!(core.stats().record_drops.too_many_handshakes, 2);
    // A minute later the window has room again.
    let mut client = Client::new(false, TransportMode::Datagram);
    let mut init = client.init(None);
    let _ = core.on_record(&mut init, T0 + Duration::from_secs(61));
    assert_eq!(oracle.shown(), 9);
    let resp = take_records(&mut core);
    let mut fin = client.on_resp(&resp[0], None, T0).unwrap();
    let _ = core.on_record(&mut fin, T0 + Duration::from_secs(61));
    assert_eq!(core.phase(), Phase::AwaitDecision);
}

#[test]
fn a_new_handshake_replaces_the_session_after_a_new_decision() {
    let (mut core, _) = new_core(TransportMode::Datagram);
    let (mut old, fin) = handshake(&mut core, false, None);
    admit(&mut core, &mut old, finished_id(&fin));
    // The client re-handshakes (55 minutes in, or after losing state), with a ticket.
    let (mut new, fin2) = handshake(&mut core, true, Some(&[3u8; 100]));
    let id2 = finished_id(&fin2);
    assert_ne!(id2, finished_id(&fin));
    let good = ipv4(CLIENT_V4, WEB, 100);
    let mut rec = new.packets(T0, &[&good]);
    let _ = core.on_record(&mut rec, T0);
    assert!(
        batches(&mut core).is_empty(),
        "nothing flows before the new decision"
    );
    core.on_broker(
        &BrokerToWorker::Decision {
            handshake: id2,
            decision: Decision::Admit {
                lease: lease(),
                resumed: true,
            },
        },
        T0,
    );
    let recs = take_records(&mut core);
    assert_eq!(new.open(&recs[0], T0)[0], Owned::Config(lease()));
    let mut rec = new.packets(T0, &[&good]);
    let _ = core.on_record(&mut rec, T0);
    assert_eq!(batches(&mut core), vec![vec![good.clone()]]);
    // The old session's keys are gone.
    let mut stale = old.packets(T0, &[&good]);
    let _ = core.on_record(&mut stale, T0);
    assert!(batches(&mut core).is_empty());
}

/// A key holder that refuses every handshake (the broker's rate limit).
struct Refusing;

impl vshp::StaticKeyOracle for Refusing {
    fn public_key(&self) -> [u8; 32] {
        gateway_key().public_key()
    }
    fn dh(&self, _: &[u8; 32]) -> Result<[u8; 32], vshp::OracleError> {
        Err(vshp::OracleError::Refused("not bound"))
    }
}

impl parser_sandbox::HandshakeOracle for Refusing {
    fn show(
        &self,
        _: HandshakeId,
        _: vshp::record::Pattern,
        _: &[u8],
    ) -> Result<(), vshp::OracleError> {
        Err(vshp::OracleError::Refused("rate limited"))
    }
}

#[test]
fn a_refused_handshake_gets_a_plaintext_overloaded_error() {
    let mut core = WorkerCore::new(
        CoreConfig::new(TransportMode::Datagram),
        Arc::new(Refusing),
        T0,
    );
    let mut client = Client::new(false, TransportMode::Datagram);
    let mut init = client.init(None);
    assert!(matches!(
        core.on_record(&mut init, T0),
        Err(RecordDrop::OracleRefused(_))
    ));
    let recs = take_records(&mut core);
    match vshp::record::decode(&recs[0]) {
        Ok(vshp::record::Record::Error(e)) => {
            assert_eq!(e.reason, ErrorReason::Overloaded);
            assert_eq!(e.receiver, vshp::record::SessionIndex(0x1111));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(core.stats().record_drops.oracle_refused, 1);
    assert_eq!(core.phase(), Phase::Handshake);
}

#[test]
fn without_a_data_path_valid_packets_are_dropped_and_counted() {
    let (mut core, _) = new_core(TransportMode::Datagram);
    let (mut client, fin) = handshake(&mut core, false, None);
    admit(&mut core, &mut client, finished_id(&fin));
    let good = ipv4(CLIENT_V4, WEB, 100);
    let spoofed = ipv4(Ipv4Addr::new(100, 64, 0, 9), WEB, 100);
    // A batch is waiting when the data path goes away: it is discarded, counted.
    let mut rec = client.packets(T0, &[&good]);
    let _ = core.on_record(&mut rec, T0);
    core.set_data_path(false);
    assert_eq!(core.ready_batches(), 0);
    let mut rec = client.packets(T0, &[&good, &spoofed]);
    let _ = core.on_record(&mut rec, T0);
    assert!(batches(&mut core).is_empty());
    let d = core.stats().packet_drops;
    assert_eq!((d.no_data_path, d.spoofed_source), (2, 1));
    core.set_data_path(true);
    let mut rec = client.packets(T0, &[&good]);
    let _ = core.on_record(&mut rec, T0);
    assert_eq!(batches(&mut core), vec![vec![good]]);
}

#[test]
fn an_admitted_peer_gets_a_resume_ticket_and_a_fresh_one_later() {
    use ipc_schema::messages::broker_worker::SealedTicket;
    use ipc_schema::messages::common::RequestId;
    use parser_sandbox::core::TICKET_REFRESH;
    let (mut core, _) = new_core(TransportMode::Datagram);
    let (mut client, fin) = handshake(&mut core, true, None);
    admit(&mut core, &mut client, finished_id(&fin));
    let sealed = |request: u64, byte: u8| BrokerToWorker::TicketSealed {
        request: RequestId(request),
        ticket: SealedTicket::from_slice(&[byte; 120]).unwrap(),
    };
    // The answer to the first request (admission asked with id 1) goes to the peer.
    core.on_broker(&sealed(1, 7), T0);
    let recs = take_records(&mut core);
    assert_eq!(recs.len(), 1);
    let msgs = client.open(&recs[0], T0);
    assert_eq!(msgs.len(), 1);
    assert!(
        matches!(&msgs[0], Owned::Other(s) if s.starts_with("Ticket")),
        "{msgs:?}"
    );
    assert_eq!(core.stats().tickets_sent, 1);
    // Before the refresh time nothing is asked; at it, a new request (id 2).
    let keep = |core: &mut WorkerCore, client: &mut Client, t: Duration| {
        let mut rec = client.data(t, |w| {
            w.ping(Keepalive {
                seq: 1,
                tx_packets: 0,
                rx_packets: 0,
            })
            .unwrap()
        });
        let _ = core.on_record(&mut rec, t);
        let _ = take_records(core);
    };
    let half = T0 + TICKET_REFRESH / 2;
    keep(&mut core, &mut client, half);
    core.on_tick(half);
    let msgs = take_broker(&mut core);
    assert!(msgs.is_empty(), "{msgs:?} {:?}", core.exit());
    let due = T0 + TICKET_REFRESH;
    keep(&mut core, &mut client, due);
    core.on_tick(due);
    assert!(matches!(
        take_broker(&mut core).as_slice(),
        [WorkerToBroker::SealTicket {
            request: RequestId(2)
        }]
    ));
    // A late answer to the superseded request is not sent; the current one is.
    core.on_broker(&sealed(1, 8), due);
    assert!(take_records(&mut core).is_empty());
    core.on_broker(&sealed(2, 9), due);
    assert_eq!(take_records(&mut core).len(), 1);
    assert_eq!(core.stats().tickets_sent, 2);
}
