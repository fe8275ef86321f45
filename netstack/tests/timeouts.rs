#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code
//! Unreachable destinations, connect and idle timeouts, and backpressure.

mod common;

use common::{CLIENT_V4, CLIENT_V6, Harness, loopback_config};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::tcp;
use smoltcp::wire::{
    Icmpv4Message, Icmpv4Packet, Icmpv6Message, Icmpv6Packet, IpAddress, IpProtocol, Ipv4Packet,
    Ipv4Repr, Ipv6Address, Ipv6Packet, Ipv6Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
    UdpPacket, UdpRepr,
};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

fn tcp_syn(src: IpAddr, dst: IpAddr, src_port: u16, dst_port: u16) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port,
        dst_port,
        control: TcpControl::Syn,
        seq_number: TcpSeqNumber(77),
        ack_number: None,
        window_len: 64_000,
        window_scale: None,
        max_seg_size: Some(1360),
        sack_permitted: false,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload: &[],
    };
    wrap(src, dst, IpProtocol::Tcp, tcp.buffer_len(), |b| {
        tcp.emit(
            &mut TcpPacket::new_unchecked(b),
            &IpAddress::from(src),
            &IpAddress::from(dst),
            &ChecksumCapabilities::default(),
        )
    })
}

fn udp(src: IpAddr, dst: IpAddr, src_port: u16, dst_port: u16, data: &[u8]) -> Vec<u8> {
    wrap(src, dst, IpProtocol::Udp, 8 + data.len(), |b| {
        UdpRepr { src_port, dst_port }.emit(
            &mut UdpPacket::new_unchecked(b),
            &IpAddress::from(src),
            &IpAddress::from(dst),
            data.len(),
            |p| p.copy_from_slice(data),
            &ChecksumCapabilities::default(),
        )
    })
}

fn wrap(
    src: IpAddr,
    dst: IpAddr,
    proto: IpProtocol,
    len: usize,
    f: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut buf = vec![0; 20 + len];
            Ipv4Repr {
                src_addr: s,
                dst_addr: d,
                next_header: proto,
                payload_len: len,
                hop_limit: 64,
            }
            .emit(
                &mut Ipv4Packet::new_unchecked(&mut buf[..20]),
                &ChecksumCapabilities::default(),
            );
            f(&mut buf[20..]);
            buf
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut buf = vec![0; 40 + len];
            Ipv6Repr {
                src_addr: s,
                dst_addr: d,
                next_header: proto,
                payload_len: len,
                hop_limit: 64,
            }
            .emit(&mut Ipv6Packet::new_unchecked(&mut buf[..40]));
            f(&mut buf[40..]);
            buf
        }
        _ => panic!("mixed families"),
    }
}

#[test]
fn ipv6_without_route_is_answered_at_once() {
    // Egress is bound to `lo`, which has no route to 2001:db8::/32: the OS refuses at
    // once (nothing is sent), and the client hears ICMPv6 "no route" in the same poll.
    let mut h = Harness::new(loopback_config());
    h.record = true;
    let dst: IpAddr = "2001:db8::1".parse().unwrap();
    h.push_raw(&[
        tcp_syn(IpAddr::V6(CLIENT_V6), dst, 40_100, 443),
        udp(IpAddr::V6(CLIENT_V6), dst, 40_101, 443, b"quic?"),
    ]);
    h.service_netstack();
    assert_eq!(h.recorded.len(), 2, "{:?}", h.ns.counters());
    for p in &h.recorded {
        let ip = Ipv6Packet::new_checked(&p[..]).unwrap();
        assert_eq!(ip.dst_addr(), CLIENT_V6);
        assert_eq!(ip.src_addr(), "2001:db8::1".parse::<Ipv6Address>().unwrap());
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum(&ip.src_addr(), &ip.dst_addr()));
        assert_eq!(icmp.msg_type(), Icmpv6Message::DstUnreachable);
        assert_eq!(icmp.msg_code(), 0, "no route to destination");
    }
    assert_eq!(h.ns.counters().tcp_unreachable, 1);
    assert_eq!(h.ns.counters().tcp_flows, 0);
}

#[test]
fn connect_timeout_gives_icmp_unreachable() {
    // A listener whose accept queue is full drops further SYNs: the OS connect hangs.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
        .unwrap();
    sock.listen(0).unwrap();
    let server = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&server.into());
        fillers.push(s);
    }
    thread::sleep(Duration::from_millis(50));
    let mut config = loopback_config();
    config.timeouts.tcp_connect = Duration::from_millis(300);
    let mut h = Harness::new(config);
    h.record = true;
    h.push_raw(&[tcp_syn(
        IpAddr::V4(CLIENT_V4),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        40_200,
        server.port(),
    )]);
    let start = Instant::now();
    h.run_until(4, "ICMP host unreachable", |h| {
        h.recorded.iter().any(|p| {
            let ip = Ipv4Packet::new_checked(&p[..]).unwrap();
            let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
            icmp.msg_type() == Icmpv4Message::DstUnreachable && icmp.msg_code() == 1
        })
    });
    assert!(start.elapsed() >= Duration::from_millis(300));
    let c = h.ns.counters();
    assert_eq!(
        (c.tcp_unreachable, c.tcp_flows, c.pending_connects),
        (1, 0, 0)
    );
    drop(fillers);
}

#[test]
fn idle_udp_mapping_expires() {
    let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sink.local_addr().unwrap().port();
    let mut config = loopback_config();
    config.timeouts.udp_idle = Duration::from_millis(200);
    let mut h = Harness::new(config);
    h.push_raw(&[udp(
        IpAddr::V4(CLIENT_V4),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        40_300,
        port,
        b"x",
    )]);
    h.service_netstack();
    assert_eq!(h.ns.counters().udp_flows, 1);
    let mut buf = [0; 8];
    assert_eq!(sink.recv(&mut buf).unwrap(), 1);
    h.run_until(4, "idle expiry", |h| h.ns.counters().udp_flows == 0);
    assert_eq!(h.ns.counters().idle_timeouts, 1);
}

#[test]
fn slow_client_backpressures_the_server() {
    // The server writes 16 MiB; the laptop reads nothing for a while. The netstack
    // must stop reading the OS socket once its smoltcp send buffer is full, so the
    // server's writes block well before the end.
    const LEN: usize = 16 * 1024 * 1024;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap();
    let written = Arc::new(AtomicUsize::new(0));
    let w = written.clone();
    let join = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let chunk: Vec<u8> = (0..65536).map(|i| (i % 253) as u8).collect();
        let mut n = 0;
        // Ends when the netstack goes away (EPIPE / reset).
        while n < LEN && s.write_all(&chunk).is_ok() {
            n += chunk.len();
            w.store(n, Ordering::Relaxed);
        }
    });
    let mut h = Harness::new(loopback_config());
    let mut sock = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 64 * 1024]),
        tcp::SocketBuffer::new(vec![0; 1024]),
    );
    sock.connect(
        h.iface.context(),
        (IpAddress::from(server.ip()), server.port()),
        (IpAddress::Ipv4(CLIENT_V4), 40_400),
    )
    .unwrap();
    let handle = h.sockets.add(sock);
    let until = Instant::now() + Duration::from_millis(700);
    while Instant::now() < until {
        h.step();
    }
    let stalled_at = written.load(Ordering::Relaxed);
    assert!(
        stalled_at < LEN / 2,
        "server wrote {stalled_at} bytes unread"
    );
    let stats = h.ns.lease_stats(h.lease.id).unwrap();
    assert!(stats.buffer_bytes <= 2 * 64 * 1024);
    // Now read: the data flows again, intact.
    const READ: usize = 2 * 1024 * 1024;
    let mut got = 0usize;
    let mut ok = true;
    h.run_until(9, "slow transfer", |h| {
        let s = h.sockets.get_mut::<tcp::Socket>(handle);
        while s.can_recv() {
            s.recv(|b| {
                for (i, x) in b.iter().enumerate() {
                    ok &= *x == (((got + i) % 65536) % 253) as u8;
                }
                got += b.len();
                (b.len(), ())
            })
            .unwrap();
        }
        got >= READ
    });
    assert!(ok, "data corrupted");
    assert!(
        written.load(Ordering::Relaxed) > stalled_at,
        "server resumed"
    );
    drop(h);
    join.join().unwrap();
}
