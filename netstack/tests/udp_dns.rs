#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code
//! UDP mappings, the DNS forwarder and ICMP echo, against real servers on loopback.

mod common;

use common::{GATEWAY_V4, Harness, loopback_config};
use netstack::DropReason;
use simple_dns::rdata::{A, RData};
use simple_dns::{CLASS, Name, Packet, PacketFlag, QCLASS, QTYPE, Question, ResourceRecord, TYPE};
use smoltcp::socket::udp;
use smoltcp::wire::{Icmpv4Message, Icmpv4Packet, IpAddress, IpEndpoint, IpProtocol, Ipv4Packet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

fn udp_socket() -> udp::Socket<'static> {
    udp::Socket::new(
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 16], vec![0; 65536]),
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 16], vec![0; 65536]),
    )
}

/// A UDP echo server that also answers with the address it saw the sender at.
fn echo_server(ip: IpAddr, stop: Arc<AtomicBool>) -> (SocketAddr, thread::JoinHandle<()>) {
    let s = UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let addr = s.local_addr().unwrap();
    let join = thread::spawn(move || {
        let mut buf = [0; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                let mut reply = buf[..n].to_vec();
                reply.extend_from_slice(format!("|{}", from.port()).as_bytes());
                s.send_to(&reply, from).unwrap();
            }
        }
    });
    (addr, join)
}

fn recv_all(
    h: &mut Harness,
    handle: smoltcp::iface::SocketHandle,
    n: usize,
) -> Vec<(Vec<u8>, IpEndpoint)> {
    let mut got = Vec::new();
    h.run_until(5, "datagrams", |h| {
        let s = h.sockets.get_mut::<udp::Socket>(handle);
        while let Ok((data, meta)) = s.recv() {
            got.push((data.to_vec(), meta.endpoint));
        }
        got.len() >= n
    });
    got
}

fn udp_echo(server_ip: IpAddr, client_ip: IpAddr) {
    let stop = Arc::new(AtomicBool::new(false));
    let (a, ja) = echo_server(server_ip, stop.clone());
    let (b, jb) = echo_server(server_ip, stop.clone());
    let mut h = Harness::new(loopback_config());
    let mut sock = udp_socket();
    sock.bind((IpAddress::from(client_ip), 5353)).unwrap();
    let handle = h.sockets.add(sock);
    {
        let s = h.sockets.get_mut::<udp::Socket>(handle);
        s.send_slice(b"to-a", (IpAddress::from(a.ip()), a.port()))
            .unwrap();
        s.send_slice(b"to-b", (IpAddress::from(b.ip()), b.port()))
            .unwrap();
    }
    let mut got = recv_all(&mut h, handle, 2);
    got.sort_by_key(|(d, _)| d.clone());
    // Replies come from the servers' addresses...
    assert_eq!(got[0].1, IpEndpoint::new(IpAddress::from(a.ip()), a.port()));
    assert_eq!(got[1].1, IpEndpoint::new(IpAddress::from(b.ip()), b.port()));
    // ...and both servers saw the same source port (endpoint-independent mapping).
    let port_a = String::from_utf8(got[0].0.clone()).unwrap();
    let port_b = String::from_utf8(got[1].0.clone()).unwrap();
    assert!(port_a.starts_with("to-a|") && port_b.starts_with("to-b|"));
    assert_eq!(port_a[5..], port_b[5..]);
    let c = h.ns.counters();
    assert_eq!(c.udp_flows, 1);
    assert_eq!(c.total_drops(), 0, "{c:?}");
    stop.store(true, Ordering::Relaxed);
    ja.join().unwrap();
    jb.join().unwrap();
}

#[test]
fn udp_echo_ipv4_endpoint_independent() {
    udp_echo(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V4(common::CLIENT_V4),
    );
}

#[test]
fn udp_echo_ipv6_endpoint_independent() {
    if UdpSocket::bind("[::1]:0").is_err() {
        return;
    }
    udp_echo("::1".parse().unwrap(), IpAddr::V6(common::CLIENT_V6));
}

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut p = Packet::new_query(id);
    p.set_flags(PacketFlag::RECURSION_DESIRED);
    p.questions.push(Question::new(
        Name::new_unchecked(name),
        QTYPE::TYPE(TYPE::A),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    p.build_bytes_vec().unwrap()
}

/// A DNS server on loopback that answers every A query with 192.0.2.7, TTL 300.
fn dns_server(
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
) -> (SocketAddr, thread::JoinHandle<()>) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let addr = s.local_addr().unwrap();
    let join = thread::spawn(move || {
        let mut buf = [0; 2048];
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, from)) = s.recv_from(&mut buf) else {
                continue;
            };
            count.fetch_add(1, Ordering::Relaxed);
            let q = Packet::parse(&buf[..n]).unwrap();
            let mut r = Packet::new_reply(q.id());
            r.set_flags(PacketFlag::RECURSION_AVAILABLE);
            r.questions = q.questions.clone();
            r.answers.push(ResourceRecord::new(
                q.questions[0].qname.clone(),
                CLASS::IN,
                300,
                RData::A(A {
                    address: u32::from(Ipv4Addr::new(192, 0, 2, 7)),
                }),
            ));
            s.send_to(&r.build_bytes_vec().unwrap(), from).unwrap();
        }
    });
    (addr, join)
}

#[test]
fn dns_forwarded_then_answered_from_cache() {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let (server, join) = dns_server(stop.clone(), count.clone());
    let mut config = loopback_config();
    config.dns_upstreams = vec![server];
    let mut h = Harness::new(config);
    let mut sock = udp_socket();
    sock.bind((IpAddress::Ipv4(common::CLIENT_V4), 40_053))
        .unwrap();
    let handle = h.sockets.add(sock);
    let dns = (IpAddress::Ipv4(GATEWAY_V4), 53);
    for (i, id) in [0x1111u16, 0x2222].into_iter().enumerate() {
        h.sockets
            .get_mut::<udp::Socket>(handle)
            .send_slice(&query(id, "Cache.Test"), dns)
            .unwrap();
        let got = recv_all(&mut h, handle, 1);
        let (data, from) = &got[0];
        assert_eq!(*from, IpEndpoint::new(IpAddress::Ipv4(GATEWAY_V4), 53));
        let p = Packet::parse(data).unwrap();
        assert_eq!(p.id(), id);
        assert_eq!(p.questions[0].qname.to_string(), "Cache.Test");
        match &p.answers[0].rdata {
            RData::A(a) => assert_eq!(Ipv4Addr::from(a.address), Ipv4Addr::new(192, 0, 2, 7)),
            other => panic!("{other:?}"),
        }
        assert!(p.answers[0].ttl <= 300 && p.answers[0].ttl >= 295);
        let c = h.ns.counters();
        assert_eq!(c.dns_queries, i as u64 + 1);
        assert_eq!(
            c.dns_cache_hits, i as u64,
            "second query comes from the cache"
        );
    }
    assert_eq!(count.load(Ordering::Relaxed), 1, "upstream asked once");
    assert_eq!(h.ns.counters().dns_upstream_queries, 1);
    stop.store(true, Ordering::Relaxed);
    join.join().unwrap();
}

#[test]
fn dns_without_upstream_gets_servfail() {
    let mut h = Harness::new(loopback_config());
    let mut sock = udp_socket();
    sock.bind((IpAddress::Ipv4(common::CLIENT_V4), 40_054))
        .unwrap();
    let handle = h.sockets.add(sock);
    h.sockets
        .get_mut::<udp::Socket>(handle)
        .send_slice(&query(5, "x.test"), (IpAddress::Ipv4(GATEWAY_V4), 53))
        .unwrap();
    let got = recv_all(&mut h, handle, 1);
    let p = Packet::parse(&got[0].0).unwrap();
    assert_eq!(p.rcode(), simple_dns::RCODE::ServerFailure);
    assert_eq!(h.ns.counters().drops(DropReason::DnsUnavailable), 1);
    // Garbage to the DNS address is counted, not answered.
    h.sockets
        .get_mut::<udp::Socket>(handle)
        .send_slice(b"\x00\x01garbage", (IpAddress::Ipv4(GATEWAY_V4), 53))
        .unwrap();
    h.run_until(5, "malformed DNS counted", |h| {
        h.ns.counters().drops(DropReason::DnsMalformed) == 1
    });
}

#[test]
fn oversized_datagram_gets_fragmentation_needed() {
    let mut h = Harness::new(loopback_config());
    h.record = true;
    let mut pkt = Vec::new();
    let big = vec![0u8; usize::from(common::MTU)];
    // Built by hand with smoltcp's wire types: 1400 bytes of payload + headers.
    let ip = smoltcp::wire::Ipv4Repr {
        src_addr: common::CLIENT_V4,
        dst_addr: Ipv4Addr::LOCALHOST,
        next_header: IpProtocol::Udp,
        payload_len: 8 + big.len(),
        hop_limit: 64,
    };
    pkt.resize(20 + 8 + big.len(), 0);
    let caps = smoltcp::phy::ChecksumCapabilities::default();
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut pkt[..20]), &caps);
    smoltcp::wire::UdpRepr {
        src_port: 1,
        dst_port: 9,
    }
    .emit(
        &mut smoltcp::wire::UdpPacket::new_unchecked(&mut pkt[20..]),
        &IpAddress::Ipv4(common::CLIENT_V4),
        &IpAddress::Ipv4(Ipv4Addr::LOCALHOST),
        big.len(),
        |b| b.copy_from_slice(&big),
        &caps,
    );
    h.push_raw(&[pkt]);
    h.service_netstack();
    assert_eq!(h.recorded.len(), 1);
    let ip = Ipv4Packet::new_checked(&h.recorded[0][..]).unwrap();
    let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
    assert_eq!(icmp.msg_type(), Icmpv4Message::DstUnreachable);
    assert_eq!(icmp.msg_code(), 4);
    assert_eq!(&ip.payload()[6..8], &common::MTU.to_be_bytes());
    assert_eq!(h.ns.counters().drops(DropReason::TooBig), 1);
    assert_eq!(h.ns.counters().udp_flows, 0);
}

#[test]
fn icmp_echo_uses_ping_sockets_where_allowed() {
    let mut h = Harness::new(loopback_config());
    h.record = true;
    let mut pkt = vec![0u8; 20 + 8 + 4];
    let caps = smoltcp::phy::ChecksumCapabilities::default();
    smoltcp::wire::Ipv4Repr {
        src_addr: common::CLIENT_V4,
        dst_addr: Ipv4Addr::LOCALHOST,
        next_header: IpProtocol::Icmp,
        payload_len: 12,
        hop_limit: 64,
    }
    .emit(&mut Ipv4Packet::new_unchecked(&mut pkt[..20]), &caps);
    smoltcp::wire::Icmpv4Repr::EchoRequest {
        ident: 0x4242,
        seq_no: 1,
        data: b"ping",
    }
    .emit(&mut Icmpv4Packet::new_unchecked(&mut pkt[20..]), &caps);
    h.push_raw(&[pkt]);
    let allowed = std::fs::read_to_string("/proc/sys/net/ipv4/ping_group_range")
        .map(|s| {
            let v: Vec<i64> = s
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            let gid = i64::from(std::os::unix::fs::MetadataExt::gid(
                &std::fs::metadata("/proc/self").unwrap(),
            ));
            v.len() == 2 && v[0] <= gid && gid <= v[1]
        })
        .unwrap_or(false);
    if allowed {
        h.run_until(5, "echo reply", |h| {
            h.service_netstack();
            h.recorded.iter().any(|p| {
                let ip = Ipv4Packet::new_checked(&p[..]).unwrap();
                let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
                icmp.msg_type() == Icmpv4Message::EchoReply
                    && icmp.echo_ident() == 0x4242
                    && icmp.data() == b"ping"
            })
        });
    } else {
        h.service_netstack();
        assert_eq!(h.ns.counters().drops(DropReason::PingUnavailable), 1);
    }
}

#[test]
fn gateway_address_answers_ping_itself() {
    let mut h = Harness::new(loopback_config());
    h.record = true;
    let mut pkt = vec![0u8; 20 + 8 + 3];
    let caps = smoltcp::phy::ChecksumCapabilities::default();
    smoltcp::wire::Ipv4Repr {
        src_addr: common::CLIENT_V4,
        dst_addr: GATEWAY_V4,
        next_header: IpProtocol::Icmp,
        payload_len: 11,
        hop_limit: 64,
    }
    .emit(&mut Ipv4Packet::new_unchecked(&mut pkt[..20]), &caps);
    smoltcp::wire::Icmpv4Repr::EchoRequest {
        ident: 9,
        seq_no: 3,
        data: b"gw?",
    }
    .emit(&mut Icmpv4Packet::new_unchecked(&mut pkt[20..]), &caps);
    h.push_raw(&[pkt]);
    h.service_netstack();
    assert_eq!(h.recorded.len(), 1);
    let ip = Ipv4Packet::new_checked(&h.recorded[0][..]).unwrap();
    assert_eq!(ip.src_addr(), GATEWAY_V4);
    let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
    assert_eq!(icmp.msg_type(), Icmpv4Message::EchoReply);
    assert_eq!(
        (icmp.echo_ident(), icmp.echo_seq_no(), icmp.data()),
        (9, 3, &b"gw?"[..])
    );
    assert_eq!(h.ns.counters().ping_flows, 0);
}

#[test]
fn gateway_address_serves_only_dns() {
    let mut h = Harness::new(loopback_config());
    h.record = true;
    let mut sock = udp_socket();
    sock.bind((IpAddress::Ipv4(common::CLIENT_V4), 40_055))
        .unwrap();
    let handle = h.sockets.add(sock);
    h.sockets
        .get_mut::<udp::Socket>(handle)
        .send_slice(b"not dns", (IpAddress::Ipv4(GATEWAY_V4), 123))
        .unwrap();
    h.run_until(5, "port unreachable", |h| {
        h.recorded.iter().any(|p| {
            let ip = Ipv4Packet::new_checked(&p[..]).unwrap();
            let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
            icmp.msg_type() == Icmpv4Message::DstUnreachable && icmp.msg_code() == 3
        })
    });
    let c = h.ns.counters();
    assert_eq!((c.udp_flows, c.dns_queries), (0, 0));
}

fn closed_udp_port_relays_port_unreachable(server_ip: IpAddr, client_ip: IpAddr) {
    let port = UdpSocket::bind(SocketAddr::new(server_ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut h = Harness::new(loopback_config());
    h.record = true;
    let mut sock = udp_socket();
    sock.bind((IpAddress::from(client_ip), 40_060)).unwrap();
    let handle = h.sockets.add(sock);
    h.sockets
        .get_mut::<udp::Socket>(handle)
        .send_slice(b"anyone?", (IpAddress::from(server_ip), port))
        .unwrap();
    h.run_until(5, "port unreachable relayed", |h| {
        h.recorded.iter().any(|p| match client_ip {
            IpAddr::V4(_) => {
                let ip = Ipv4Packet::new_checked(&p[..]).unwrap();
                let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
                // The quote is the client's own datagram: its source port.
                icmp.msg_type() == Icmpv4Message::DstUnreachable
                    && icmp.msg_code() == 3
                    && icmp.data()[20..22] == 40_060u16.to_be_bytes()
            }
            IpAddr::V6(_) => {
                let ip = smoltcp::wire::Ipv6Packet::new_checked(&p[..]).unwrap();
                let icmp = smoltcp::wire::Icmpv6Packet::new_checked(ip.payload()).unwrap();
                icmp.msg_type() == smoltcp::wire::Icmpv6Message::DstUnreachable
                    && icmp.msg_code() == 4
            }
        })
    });
    assert!(h.ns.counters().icmp_errors_sent >= 1);
}

#[test]
fn closed_udp_port_relays_port_unreachable_ipv4() {
    closed_udp_port_relays_port_unreachable(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V4(common::CLIENT_V4),
    );
}

#[test]
fn closed_udp_port_relays_port_unreachable_ipv6() {
    if UdpSocket::bind("[::1]:0").is_err() {
        return;
    }
    closed_udp_port_relays_port_unreachable("::1".parse().unwrap(), IpAddr::V6(common::CLIENT_V6));
}
