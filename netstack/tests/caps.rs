#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code
//! Per-peer caps: a peer opening thousands of flows is capped and counted.

mod common;

use common::{CLIENT_V4, Harness, loopback_config};
use netstack::{Caps, DropReason};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
    UdpPacket, UdpRepr,
};
use std::net::{Ipv4Addr, TcpListener};
use std::time::{Duration, Instant};

fn syn(src_port: u16, dst: Ipv4Addr, dst_port: u16) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port,
        dst_port,
        control: TcpControl::Syn,
        seq_number: TcpSeqNumber(1000),
        ack_number: None,
        window_len: 64_000,
        window_scale: None,
        max_seg_size: Some(1360),
        sack_permitted: false,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload: &[],
    };
    let ip = Ipv4Repr {
        src_addr: CLIENT_V4,
        dst_addr: dst,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let caps = ChecksumCapabilities::default();
    let mut buf = vec![0; 20 + tcp.buffer_len()];
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..20]), &caps);
    tcp.emit(
        &mut TcpPacket::new_unchecked(&mut buf[20..]),
        &IpAddress::Ipv4(CLIENT_V4),
        &IpAddress::Ipv4(dst),
        &caps,
    );
    buf
}

fn udp(src_port: u16, dst: Ipv4Addr, dst_port: u16) -> Vec<u8> {
    let caps = ChecksumCapabilities::default();
    let mut buf = vec![0; 20 + 8 + 1];
    Ipv4Repr {
        src_addr: CLIENT_V4,
        dst_addr: dst,
        next_header: IpProtocol::Udp,
        payload_len: 9,
        hop_limit: 64,
    }
    .emit(&mut Ipv4Packet::new_unchecked(&mut buf[..20]), &caps);
    UdpRepr { src_port, dst_port }.emit(
        &mut UdpPacket::new_unchecked(&mut buf[20..]),
        &IpAddress::Ipv4(CLIENT_V4),
        &IpAddress::Ipv4(dst),
        1,
        |b| b[0] = b'x',
        &caps,
    );
    buf
}

#[test]
fn thousands_of_tcp_flows_are_capped_and_counted() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut config = loopback_config();
    config.caps = Caps {
        max_tcp_flows: 100,
        max_pending_connects: 20,
        ..Caps::default()
    };
    let mut h = Harness::new(config);
    const SYNS: u16 = 3000;
    for chunk in (0..SYNS).collect::<Vec<_>>().chunks(100) {
        let pkts: Vec<Vec<u8>> = chunk
            .iter()
            .map(|i| syn(10_000 + i, Ipv4Addr::LOCALHOST, port))
            .collect();
        h.push_raw(&pkts);
        // Let the connects complete before the next burst.
        let until = Instant::now() + Duration::from_millis(50);
        while h.ns.counters().pending_connects > 0 && Instant::now() < until {
            h.service_netstack();
            h.ns.wait(Some(Duration::from_millis(2))).unwrap();
        }
        h.service_netstack();
    }
    let c = h.ns.counters();
    let stats = h.ns.lease_stats(h.lease.id).unwrap();
    assert_eq!(stats.tcp_flows, 100, "{c:?}");
    assert!(stats.buffer_bytes <= Caps::default().max_buffer_bytes);
    let capped = c.drops(DropReason::TcpFlowCap) + c.drops(DropReason::PendingConnectCap);
    assert_eq!(capped + c.tcp_flows, u64::from(SYNS), "{c:?}");
    assert!(c.drops(DropReason::TcpFlowCap) > 0);
    // Removing the lease releases everything.
    h.ns.remove_lease(h.lease.id);
    assert_eq!(h.ns.counters().tcp_flows, 0);
    drop(listener);
}

#[test]
fn udp_mappings_are_capped() {
    let mut config = loopback_config();
    config.caps.max_udp_mappings = 32;
    let mut h = Harness::new(config);
    // The discard port on loopback: nobody answers, nothing leaves the machine.
    let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sink.local_addr().unwrap().port();
    let pkts: Vec<Vec<u8>> = (0..1000)
        .map(|i| udp(20_000 + i, Ipv4Addr::LOCALHOST, port))
        .collect();
    h.push_raw(&pkts);
    h.service_netstack();
    let c = h.ns.counters();
    assert_eq!(c.udp_flows, 32);
    assert_eq!(c.drops(DropReason::UdpMappingCap), 1000 - 32);
}

#[test]
fn buffer_memory_cap_limits_established_flows() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut config = loopback_config();
    config.tcp_buffer_initial = 16 * 1024;
    // Room for exactly 5 flows' initial buffers (2 × 16 KiB each; none grows: the
    // flows stay idle).
    config.caps.max_buffer_bytes = 5 * 32 * 1024;
    let mut h = Harness::new(config);
    let pkts: Vec<Vec<u8>> = (0..10)
        .map(|i| syn(30_000 + i, Ipv4Addr::LOCALHOST, port))
        .collect();
    h.push_raw(&pkts);
    let until = Instant::now() + Duration::from_secs(5);
    while h.ns.counters().pending_connects > 0 && Instant::now() < until {
        h.service_netstack();
        h.ns.wait(Some(Duration::from_millis(2))).unwrap();
    }
    let c = h.ns.counters();
    assert_eq!(c.tcp_flows, 5, "{c:?}");
    assert_eq!(c.drops(DropReason::BufferCap), 5);
    drop(listener);
}
