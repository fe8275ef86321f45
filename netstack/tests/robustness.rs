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
