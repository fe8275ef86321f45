//! `ClientCore` against vshp's gateway side (`Responder`) in memory: no TUN, no sockets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use client::core::{ClientCore, DEAD_AFTER, Event, MAX_DATAGRAM_RECORD, PING_INTERVAL, Timer};
use vshp::key_oracle::{LocalKeyOracle, StaticKeyOracle, StaticKeypair};
use vshp::lease::{Ipv4Prefix, Lease, LeaseId, Route};
use vshp::message::{Message, MessageReader, MessageWriter};
use vshp::record::{Capabilities, MAX_RECORD_LEN, SessionIndex};
use vshp::transport::{Session, TransportMode};
use vshp::{ErrorReason, Responder};

fn lease() -> Lease {
    Lease {
        id: LeaseId(7),
        ipv4: Ipv4Prefix {
            addr: Ipv4Addr::new(100, 64, 0, 2),
            len: 24,
        },
        ipv6: None,
        dns: vec![IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1))],
        mtu: 1400,
        routes: vec![Route::V4(Ipv4Prefix {
            addr: Ipv4Addr::UNSPECIFIED,
            len: 0,
        })],
        expires_at_unix: 0,
    }
}

/// A core and the gateway's session after a completed IK handshake.
fn established(now: Duration) -> (ClientCore, Session, String) {
    let gw = StaticKeypair::generate().unwrap();
    let me = StaticKeypair::generate().unwrap();
    let oracle: Arc<dyn StaticKeyOracle> = Arc::new(LocalKeyOracle::new(gw.clone()));
    let mut core = ClientCore::new(me, gw.public_key(), "laptop", TransportMode::Datagram);
    let mut wire = vec![0u8; MAX_RECORD_LEN];
    let n = core.begin_handshake(now, &mut wire).unwrap();
    let mut r = Responder::new(oracle, Capabilities::ALL_V1, SessionIndex(99)).unwrap();
    let mut payload = vec![0u8; MAX_RECORD_LEN];
    let p = r.read_init(&wire[..n], &mut payload).unwrap();
    let names: Vec<_> = MessageReader::new(&payload[..p])
        .map(|m| format!("{:?}", m.unwrap()))
        .collect();
    assert!(names.iter().any(|m| m.contains("laptop")), "{names:?}");
    let mut hello = [0u8; 16];
    let mut w = MessageWriter::new(&mut hello);
    w.hello(Capabilities::ALL_V1.0).unwrap();
    let hl = w.len();
    let n = r.write_response(&hello[..hl], &mut wire).unwrap();
    let est = r.into_established().unwrap();
    let gw_code = est.pairing_code().to_string();
    let session = Session::new(&est, TransportMode::Datagram, now).unwrap();
    let mut codes = Vec::new();
    core.handle_record(&mut wire[..n], now, &mut |e| match e {
        Event::Established { code } => codes.push(code.to_string()),
        other => panic!("unexpected {other:?}"),
    })
    .unwrap();
    assert!(core.is_established());
    assert_eq!(codes, vec![gw_code.clone()]);
    (core, session, gw_code)
}

fn gateway_sends(
    gw: &mut Session,
    now: Duration,
    f: impl FnOnce(&mut MessageWriter<'_>),
) -> Vec<u8> {
    let mut plain = vec![0u8; 4096];
    let mut w = MessageWriter::new(&mut plain);
    f(&mut w);
    let n = w.len();
    let mut rec = vec![0u8; 8192];
    let len = gw.seal(&plain[..n], &mut rec, now).unwrap();
    rec.truncate(len);
    rec
}

#[test]
fn ik_handshake_shows_the_gateways_code_then_pending_then_config() {
    let now = Duration::from_secs(1);
    let (mut core, mut gw, _code) = established(now);
    let mut rec = gateway_sends(&mut gw, now, |w| {
        w.error(ErrorReason::PendingApproval, "").unwrap()
    });
    let mut got = Vec::new();
    core.handle_record(&mut rec, now, &mut |e| {
        if let Event::Refused { reason, .. } = e {
            got.push(reason);
        }
    })
    .unwrap();
    assert_eq!(got, vec![ErrorReason::PendingApproval]);
    let mut rec = gateway_sends(&mut gw, now, |w| w.config(&lease()).unwrap());
    let mut leases = Vec::new();
    core.handle_record(&mut rec, now, &mut |e| {
        if let Event::Config(l) = e {
            leases.push(l);
        }
    })
    .unwrap();
    assert_eq!(leases, vec![lease()]);
}

#[test]
fn packets_batch_into_records_that_fit_a_datagram_and_come_back_out() {
    let now = Duration::from_secs(1);
    let (mut core, mut gw, _) = established(now);
    let small: Vec<Vec<u8>> = (0..40).map(|i| vec![0x45; 60 + i]).collect();
    let big = vec![0x45u8; 1400];
    let mut all: Vec<&[u8]> = small.iter().map(Vec::as_slice).collect();
    all.push(&big);
    all.push(&big);
    let mut out = vec![0u8; MAX_RECORD_LEN];
    let mut at = 0;
    let mut records = 0;
    let mut received: Vec<Vec<u8>> = Vec::new();
    while at < all.len() {
        let (len, took) = core.seal_packets(&all[at..], now, &mut out).unwrap();
        assert!(took > 0);
        assert!(len <= MAX_DATAGRAM_RECORD, "{len}");
        records += 1;
        at += took;
        let mut rec = out[..len].to_vec();
        let plain = gw.open_in_place(&mut rec, now).unwrap();
        for m in MessageReader::new(plain) {
            if let Message::IpPacket(b) = m.unwrap() {
                received.extend(b.iter().map(<[u8]>::to_vec));
            }
        }
    }
    assert_eq!(received.len(), all.len());
    assert!(received.iter().zip(&all).all(|(a, b)| a == b));
    assert!(
        records < all.len() / 2,
        "{records} records for {} packets",
        all.len()
    );
    assert_eq!(core.counters().tx_packets, all.len() as u64);

    // Gateway → client: a batch of packets arrives as Packet events in order.
    let pkts: Vec<&[u8]> = small.iter().take(5).map(Vec::as_slice).collect();
    let mut rec = gateway_sends(&mut gw, now, |w| {
        w.ip_packets(&pkts).unwrap();
    });
    let mut got = Vec::new();
    core.handle_record(&mut rec, now, &mut |e| {
        if let Event::Packet(p) = e {
            got.push(p.to_vec());
        }
    })
    .unwrap();
    assert_eq!(got.len(), 5);
    assert_eq!(got[4], small[4]);
}

#[test]
fn a_packet_larger_than_a_datagram_record_gets_a_record_of_its_own() {
    // Under a large lease MTU (the stream transport's), a 64 KB packet still travels,
    // alone in its record; the small one after it starts the next record.
    let now = Duration::from_secs(1);
    let (mut core, mut gw, _) = established(now);
    let huge = vec![0x45u8; 65_000];
    let small = vec![0x45u8; 100];
    let all: Vec<&[u8]> = vec![&huge, &small];
    let mut out = vec![0u8; MAX_RECORD_LEN];
    let (len, took) = core.seal_packets(&all, now, &mut out).unwrap();
    assert_eq!(took, 1);
    assert!(len > MAX_DATAGRAM_RECORD && len <= MAX_RECORD_LEN, "{len}");
    let mut rec = out[..len].to_vec();
    let plain = gw.open_in_place(&mut rec, now).unwrap();
    let got: Vec<Vec<u8>> = MessageReader::new(plain)
        .filter_map(|m| match m.unwrap() {
            Message::IpPacket(b) => Some(b.iter().map(<[u8]>::to_vec).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(got, vec![huge.clone()]);
    let (len, took) = core.seal_packets(&all[1..], now, &mut out).unwrap();
    assert_eq!(took, 1);
    assert!(len <= MAX_DATAGRAM_RECORD);
    // Too large for any record (and an output buffer too small for it): dropped,
    // counted as carried, never a panic.
    let mut tiny = vec![0u8; 2000];
    let (len, took) = core.seal_packets(&all, now, &mut tiny).unwrap();
    assert_eq!((len, took), (0, 1));
    assert_eq!(core.counters().tx_packets, 2);
}

#[test]
fn pings_every_interval_answers_pings_and_detects_a_dead_gateway() {
    let t0 = Duration::from_secs(1);
    let (mut core, mut gw, _) = established(t0);
    let mut out = vec![0u8; MAX_RECORD_LEN];
    assert_eq!(
        core.poll(t0 + Duration::from_secs(1), &mut out).unwrap(),
        Timer::Idle
    );
    let Timer::Send(n) = core.poll(t0 + PING_INTERVAL, &mut out).unwrap() else {
        panic!("no PING after the interval")
    };
    let mut rec = out[..n].to_vec();
    let plain = gw.open_in_place(&mut rec, t0 + PING_INTERVAL).unwrap();
    assert!(matches!(
        MessageReader::new(plain).next().unwrap().unwrap(),
        Message::Ping(_)
    ));
    // The gateway's PING gets a PONG with the same seq.
    let now = t0 + PING_INTERVAL;
    let mut rec = gateway_sends(&mut gw, now, |w| {
        w.ping(vshp::message::Keepalive {
            seq: 42,
            tx_packets: 0,
            rx_packets: 0,
        })
        .unwrap()
    });
    core.handle_record(&mut rec, now, &mut |_| {}).unwrap();
    let n = core.take_pong(now, &mut out).unwrap().unwrap();
    let mut rec = out[..n].to_vec();
    let plain = gw.open_in_place(&mut rec, now).unwrap();
    assert!(matches!(
        MessageReader::new(plain).next().unwrap().unwrap(),
        Message::Pong(k) if k.seq == 42
    ));
    // Silence for DEAD_AFTER: dead.
    assert_eq!(core.poll(now + DEAD_AFTER, &mut out).unwrap(), Timer::Dead);
}

#[test]
fn garbage_and_forged_records_are_dropped_not_fatal() {
    let now = Duration::from_secs(1);
    let (mut core, _gw, _) = established(now);
    for mut junk in [
        vec![],
        vec![1u8],
        vec![1, 4, 0, 0, 0, 0, 0, 99],
        vec![0xff; 200],
    ] {
        core.handle_record(&mut junk, now, &mut |e| panic!("event from junk: {e:?}"))
            .unwrap();
    }
    let mut fake = vec![0u8; 64];
    fake[0] = 1;
    fake[1] = 4;
    core.handle_record(&mut fake, now, &mut |e| {
        panic!("event from a forged record: {e:?}")
    })
    .unwrap();
    assert!(core.counters().records_dropped >= 4);
    assert!(core.is_established());
}

#[test]
fn an_unanswered_handshake_times_out() {
    let gw = StaticKeypair::generate().unwrap();
    let mut core = ClientCore::new(
        StaticKeypair::generate().unwrap(),
        gw.public_key(),
        "laptop",
        TransportMode::Stream,
    );
    let mut out = vec![0u8; MAX_RECORD_LEN];
    core.begin_handshake(Duration::ZERO, &mut out).unwrap();
    assert_eq!(
        core.poll(Duration::from_secs(1), &mut out).unwrap(),
        Timer::Idle
    );
    assert_eq!(
        core.poll(Duration::from_secs(10), &mut out).unwrap(),
        Timer::HandshakeTimedOut
    );
}

#[test]
fn a_ticket_from_the_gateway_is_kept_and_presented_in_the_next_init() {
    let t0 = Duration::from_secs(1);
    let (mut core, mut gw, _) = established(t0);
    assert!(core.ticket().is_none());
    assert!(core.take_new_ticket().is_none());
    let mut rec = gateway_sends(&mut gw, t0, |w| w.ticket(&[5; 130]).unwrap());
    core.handle_record(&mut rec, t0, &mut |e| panic!("unexpected {e:?}"))
        .unwrap();
    assert_eq!(core.take_new_ticket(), Some(&[5u8; 130][..]));
    assert!(core.take_new_ticket().is_none(), "handed out once");
    assert_eq!(core.ticket(), Some(&[5u8; 130][..]));
    // The next handshake (a reconnection) carries RESUME(ticket) in its INIT payload.
    let gwk = StaticKeypair::generate().unwrap();
    let oracle: Arc<dyn StaticKeyOracle> = Arc::new(LocalKeyOracle::new(gwk.clone()));
    let mut c2 = ClientCore::new(
        StaticKeypair::generate().unwrap(),
        gwk.public_key(),
        "laptop",
        TransportMode::Datagram,
    );
    c2.set_ticket(vec![6; 140]);
    c2.set_ticket(vec![0; 4096]); // too long: ignored
    let mut wire = vec![0u8; MAX_RECORD_LEN];
    let n = c2.begin_handshake(t0, &mut wire).unwrap();
    let mut r = Responder::new(oracle, Capabilities::ALL_V1, SessionIndex(9)).unwrap();
    let mut payload = vec![0u8; MAX_RECORD_LEN];
    let p = r.read_init(&wire[..n], &mut payload).unwrap();
    let resumes: Vec<Vec<u8>> = MessageReader::new(&payload[..p])
        .filter_map(|m| match m.unwrap() {
            Message::Resume { ticket } => Some(ticket.to_vec()),
            _ => None,
        })
        .collect();
    assert_eq!(resumes, vec![vec![6u8; 140]]);
}

#[test]
fn a_bad_ticket_error_drops_the_ticket_so_the_next_init_has_no_resume() {
    let t0 = Duration::from_secs(1);
    let (mut core, mut gw, _) = established(t0);
    core.set_ticket(vec![6; 130]);
    let mut rec = gateway_sends(&mut gw, t0, |w| {
        w.error(ErrorReason::BadTicket, "the resume ticket was refused")
            .unwrap();
        w.close(vshp::message::CloseReason::Normal).unwrap();
    });
    let mut events = Vec::new();
    core.handle_record(&mut rec, t0, &mut |e| events.push(format!("{e:?}")))
        .unwrap();
    assert!(events[0].contains("BadTicket"), "{events:?}");
    assert_eq!(core.ticket(), None, "the refused ticket is dropped");
    assert!(core.take_new_ticket().is_none());
    // Another ERROR keeps the ticket.
    let (mut core, mut gw, _) = established(t0);
    core.set_ticket(vec![6; 130]);
    let mut rec = gateway_sends(&mut gw, t0, |w| {
        w.error(ErrorReason::Overloaded, "").unwrap();
    });
    core.handle_record(&mut rec, t0, &mut |_| {}).unwrap();
    assert_eq!(core.ticket(), Some(&[6u8; 130][..]));
}

#[test]
fn a_config_delta_from_the_gateway_reaches_the_driver() {
    let t0 = Duration::from_secs(1);
    let (mut core, mut gw, _) = established(t0);
    let delta = vshp::message::ConfigDelta {
        mtu: Some(1300),
        dns: Some(vec![IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1))]),
        ..Default::default()
    };
    let mut rec = gateway_sends(&mut gw, t0, |w| w.config_delta(&delta).unwrap());
    let mut got = None;
    core.handle_record(&mut rec, t0, &mut |e| {
        if let Event::ConfigDelta(d) = e {
            got = Some(d);
        }
    })
    .unwrap();
    assert_eq!(got, Some(delta));
}
