#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code
//! Malformed, truncated and random packets are counted, never a panic.

mod common;

use common::{CLIENT_V4, Harness, loopback_config};
use netstack::DropReason;
use rand::{Rng, SeedableRng};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr};
use std::net::Ipv4Addr;

fn valid_udp() -> Vec<u8> {
    udp_from(CLIENT_V4)
}

fn udp_from(src: Ipv4Addr) -> Vec<u8> {
    let caps = ChecksumCapabilities::default();
    let mut buf = vec![0; 20 + 8 + 4];
    Ipv4Repr {
        src_addr: src,
        dst_addr: common::GATEWAY_V4,
        next_header: IpProtocol::Udp,
        payload_len: 12,
        hop_limit: 64,
    }
    .emit(&mut Ipv4Packet::new_unchecked(&mut buf[..20]), &caps);
    UdpRepr {
        src_port: 1000,
        dst_port: 53,
    }
    .emit(
        &mut UdpPacket::new_unchecked(&mut buf[20..]),
        &IpAddress::Ipv4(src),
        &IpAddress::Ipv4(common::GATEWAY_V4),
        4,
        |b| b.copy_from_slice(b"\0\0\0\0"),
        &caps,
    );
    buf
}

#[test]
fn malformed_packets_are_counted() {
    let mut h = Harness::new(loopback_config());
    let good = valid_udp();
    let mut bad: Vec<Vec<u8>> = (0..good.len()).map(|n| good[..n].to_vec()).collect();
    let mut wrong_version = good.clone();
    wrong_version[0] = 0x55;
    bad.push(wrong_version);
    let mut bad_checksum = good.clone();
    bad_checksum[10] ^= 0xff;
    bad.push(bad_checksum);
    let mut huge_len = good.clone();
    huge_len[2] = 0xff;
    bad.push(huge_len);
    h.push_raw(&bad);
    h.service_netstack();
    let c = h.ns.counters();
    assert_eq!(c.drops(DropReason::Malformed), bad.len() as u64, "{c:?}");

    // Spoofed source and unknown lease are counted too.
    h.push_raw(&[udp_from(Ipv4Addr::new(100, 64, 0, 99))]);
    h.ns.push_packets(vshp::lease::LeaseId(12345), std::iter::once(&good[..]));
    let c = h.ns.counters();
    assert_eq!(c.drops(DropReason::WrongSource), 1);
    assert_eq!(c.drops(DropReason::UnknownLease), 1);
}

#[test]
fn random_and_mutated_packets_never_panic() {
    // Egress off: a random packet that happens to parse can never leave the
    // netstack; everything up to the socket (parsing, caps, ICMP, DNS) still runs.
    let mut h = Harness::new(loopback_config());
    h.ns.set_egress_available(false);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5653);
    let good = valid_udp();
    for round in 0..200 {
        let mut batch = Vec::new();
        for _ in 0..50 {
            let p = match rng.gen_range(0..3) {
                0 => {
                    let len = rng.gen_range(0..200);
                    let mut v: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
                    if let Some(b) = v.first_mut() {
                        *b = if rng.gen_bool(0.5) { 0x45 } else { 0x60 };
                    }
                    v
                }
                1 => {
                    let mut v = good.clone();
                    for _ in 0..rng.gen_range(1..4) {
                        let i = rng.gen_range(0..v.len());
                        v[i] = rng.r#gen();
                    }
                    v
                }
                _ => {
                    let n = rng.gen_range(0..good.len());
                    good[..n].to_vec()
                }
            };
            batch.push(p);
        }
        h.push_raw(&batch);
        h.service_netstack();
        if round % 50 == 0 {
            netstack::fuzzing::push_packets(&batch.concat());
        }
    }
    assert!(h.ns.counters().total_drops() > 0);
}

/// Random segments (any flags, sequence numbers, windows, payloads; valid checksums)
/// on the 5-tuple of an open flow to a real loopback server: smoltcp and the relay
/// take them without panicking, and the flow is still torn down cleanly.
#[test]
fn random_segments_on_an_open_flow_never_panic() {
    use smoltcp::socket::tcp;
    use smoltcp::wire::{TcpControl, TcpPacket, TcpRepr, TcpSeqNumber};
    use std::io::Read;

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap();
    let join = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    let mut h = Harness::new(loopback_config());
    let mut sock = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 8192]),
        tcp::SocketBuffer::new(vec![0; 8192]),
    );
    sock.connect(
        h.iface.context(),
        (IpAddress::Ipv4(Ipv4Addr::LOCALHOST), server.port()),
        (IpAddress::Ipv4(CLIENT_V4), 40_500),
    )
    .unwrap();
    let handle = h.sockets.add(sock);
    h.run_until(5, "established", |h| {
        h.sockets.get::<tcp::Socket>(handle).state() == tcp::State::Established
    });

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7cb);
    let caps = ChecksumCapabilities::default();
    let controls = [
        TcpControl::None,
        TcpControl::Psh,
        TcpControl::Syn,
        TcpControl::Fin,
        TcpControl::Rst,
    ];
    for _ in 0..40 {
        let mut batch = Vec::new();
        for _ in 0..50 {
            let payload: Vec<u8> = (0..rng.gen_range(0..200)).map(|_| rng.r#gen()).collect();
            let repr = TcpRepr {
                src_port: 40_500,
                dst_port: server.port(),
                control: controls[rng.gen_range(0..controls.len())],
                seq_number: TcpSeqNumber(rng.r#gen()),
                ack_number: rng.gen_bool(0.8).then(|| TcpSeqNumber(rng.r#gen())),
                window_len: rng.r#gen(),
                window_scale: rng.gen_bool(0.1).then(|| rng.gen_range(0..20)),
                max_seg_size: rng.gen_bool(0.1).then(|| rng.r#gen()),
                sack_permitted: rng.gen_bool(0.1),
                sack_ranges: [None, None, None],
                timestamp: None,
                payload: &payload,
            };
            let mut buf = vec![0; 20 + repr.buffer_len()];
            Ipv4Repr {
                src_addr: CLIENT_V4,
                dst_addr: Ipv4Addr::LOCALHOST,
                next_header: IpProtocol::Tcp,
                payload_len: repr.buffer_len(),
                hop_limit: 64,
            }
            .emit(&mut Ipv4Packet::new_unchecked(&mut buf[..20]), &caps);
            repr.emit(
                &mut TcpPacket::new_unchecked(&mut buf[20..]),
                &IpAddress::Ipv4(CLIENT_V4),
                &IpAddress::Ipv4(Ipv4Addr::LOCALHOST),
                &caps,
            );
            batch.push(buf);
        }
        h.push_raw(&batch);
        h.service_netstack();
    }
    // Whatever became of that flow, it is torn down and forgotten cleanly.
    h.sockets.get_mut::<tcp::Socket>(handle).abort();
    h.run_until(5, "old flow gone", |h| h.ns.counters().tcp_flows == 0);
    join.join().unwrap();
    let c = h.ns.counters();
    assert_eq!(c.tcp_connected, 1, "{c:?}");
}
