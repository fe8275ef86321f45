#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code
//! TCP through the netstack against real servers on loopback.

mod common;

use common::{Harness, loopback_config};
use netstack::DropReason;
use smoltcp::socket::tcp;
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, TcpPacket, TcpRepr};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::thread;

/// The laptop's local endpoint: its leased address of the server's family (smoltcp
/// would pick `::1` as the source for `::1` otherwise).
fn local(server: IpAddr, port: u16) -> (IpAddress, u16) {
    match server {
        IpAddr::V4(_) => (IpAddress::Ipv4(common::CLIENT_V4), port),
        IpAddr::V6(_) => (IpAddress::Ipv6(common::CLIENT_V6), port),
    }
}

fn tcp_socket(size: usize) -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; size]),
        tcp::SocketBuffer::new(vec![0; size]),
    )
}

fn echo_server(listener: TcpListener) -> thread::JoinHandle<usize> {
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0; 65536];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).unwrap();
            total += n;
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        total
    })
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Sends `data` on the client socket, closes it once all is acknowledged, and reads
/// until the echo server's side closes too; returns what came back.
fn send_close_and_read_back(
    h: &mut Harness,
    handle: smoltcp::iface::SocketHandle,
    data: &[u8],
    what: &str,
) -> Vec<u8> {
    let (mut sent, mut received, mut closed) = (0, Vec::with_capacity(data.len()), false);
    h.run_until(9, what, |h| {
        let s = h.sockets.get_mut::<tcp::Socket>(handle);
        if s.can_send() && sent < data.len() {
            sent += s.send_slice(&data[sent..]).unwrap();
        }
        if sent == data.len() && !closed && s.send_queue() == 0 {
            s.close();
            closed = true;
        }
        while s.can_recv() {
            s.recv(|b| {
                received.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        received.len() == data.len() && !s.may_recv()
    });
    received
}

fn bulk_echo(server_ip: IpAddr) {
    let listener = TcpListener::bind(SocketAddr::new(server_ip, 0)).unwrap();
    let server = listener.local_addr().unwrap();
    let join = echo_server(listener);
    let mut h = Harness::new(loopback_config());
    let mut sock = tcp_socket(256 * 1024);
    sock.connect(
        h.iface.context(),
        (IpAddress::from(server.ip()), server.port()),
        local(server.ip(), 40_001),
    )
    .unwrap();
    let handle = h.sockets.add(sock);

    const LEN: usize = 3 * 1024 * 1024;
    let data: Vec<u8> = (0..LEN).map(|i| (i * 7 + i / 251) as u8).collect();
    let received = send_close_and_read_back(&mut h, handle, &data, "bulk echo");
    assert_eq!(fnv(&received), fnv(&data));
    assert_eq!(join.join().unwrap(), LEN);
    // Both sides closed: the flow goes away.
    h.run_until(5, "flow removal", |h| h.ns.counters().tcp_flows == 0);
    let c = h.ns.counters();
    assert_eq!(c.tcp_connected, 1);
    assert_eq!(c.total_drops(), 0, "{c:?}");
}

#[test]
fn tcp_bulk_echo_ipv4() {
    bulk_echo(IpAddr::V4(Ipv4Addr::LOCALHOST));
}

#[test]
fn tcp_bulk_echo_ipv6() {
    if TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no ::1 on this machine; skipped");
        return;
    }
    bulk_echo(IpAddr::V6(Ipv6Addr::LOCALHOST));
}

fn refused(server_ip: IpAddr) {
    // A port nobody listens on.
    let port = {
        let l = TcpListener::bind(SocketAddr::new(server_ip, 0)).unwrap();
        l.local_addr().unwrap().port()
    };
    let mut h = Harness::new(loopback_config());
    let mut sock = tcp_socket(4096);
    sock.connect(
        h.iface.context(),
        (IpAddress::from(server_ip), port),
        local(server_ip, 40_002),
    )
    .unwrap();
    let handle = h.sockets.add(sock);
    h.run_until(5, "RST", |h| {
        h.sockets.get::<tcp::Socket>(handle).state() == tcp::State::Closed
    });
    let c = h.ns.counters();
    assert_eq!(c.tcp_refused, 1, "{c:?}");
    assert_eq!(c.tcp_connected, 0);
    assert_eq!(c.tcp_flows, 0);
}

#[test]
fn tcp_connection_refused_gives_rst_ipv4() {
    refused(IpAddr::V4(Ipv4Addr::LOCALHOST));
}

#[test]
fn tcp_connection_refused_gives_rst_ipv6() {
    if TcpListener::bind("[::1]:0").is_err() {
        return;
    }
    refused(IpAddr::V6(Ipv6Addr::LOCALHOST));
}

#[test]
fn server_close_and_reset_reach_the_client() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap();
    let join = thread::spawn(move || {
        // First connection: greeting then orderly close.
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"hello").unwrap();
        drop(s);
        // Second: reset (SO_LINGER 0).
        let (s, _) = listener.accept().unwrap();
        socket2::SockRef::from(&s)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(s);
    });
    let mut h = Harness::new(loopback_config());
    let mut a = tcp_socket(4096);
    a.connect(
        h.iface.context(),
        (IpAddress::from(server.ip()), server.port()),
        local(server.ip(), 40_003),
    )
    .unwrap();
    let a = h.sockets.add(a);
    let mut got = Vec::new();
    h.run_until(5, "greeting and FIN", |h| {
        let s = h.sockets.get_mut::<tcp::Socket>(a);
        while s.can_recv() {
            s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        !s.may_recv() && s.state() == tcp::State::CloseWait
    });
    assert_eq!(got, b"hello");
    h.sockets.get_mut::<tcp::Socket>(a).close();

    let mut b = tcp_socket(4096);
    b.connect(
        h.iface.context(),
        (IpAddress::from(server.ip()), server.port()),
        local(server.ip(), 40_004),
    )
    .unwrap();
    let b = h.sockets.add(b);
    h.run_until(5, "RST relayed", |h| {
        h.sockets.get::<tcp::Socket>(b).state() == tcp::State::Closed
    });
    join.join().unwrap();
    h.run_until(5, "flows gone", |h| h.ns.counters().tcp_flows == 0);
}

#[test]
fn egress_off_refuses_new_flows_and_closes_old_ones() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap();
    let join = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0; 16];
        // Returns when the netstack closes the flow.
        while s.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
    });
    let mut h = Harness::new(loopback_config());
    let mut a = tcp_socket(4096);
    a.connect(
        h.iface.context(),
        (IpAddress::from(server.ip()), server.port()),
        local(server.ip(), 40_005),
    )
    .unwrap();
    let a = h.sockets.add(a);
    h.run_until(5, "established", |h| {
        h.sockets.get::<tcp::Socket>(a).state() == tcp::State::Established
    });
    h.ns.set_egress_available(false);
    h.run_until(5, "existing flow reset", |h| {
        h.sockets.get::<tcp::Socket>(a).state() == tcp::State::Closed
    });
    join.join().unwrap();

    // A new SYN is answered with ICMP unreachable.
    h.record = true;
    let mut b = tcp_socket(4096);
    b.connect(
        h.iface.context(),
        (IpAddress::from(server.ip()), server.port()),
        local(server.ip(), 40_006),
    )
    .unwrap();
    h.sockets.add(b);
    h.run_until(5, "ICMP unreachable", |h| {
        h.recorded.iter().any(|p| {
            let ip = Ipv4Packet::new_checked(&p[..]).unwrap();
            ip.next_header() == IpProtocol::Icmp && ip.payload()[0] == 3
        })
    });
    assert!(h.ns.counters().drops(DropReason::EgressUnavailable) >= 1);
}

#[test]
fn syn_ack_mss_follows_the_lease_mtu() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap();
    let mut h = Harness::new(loopback_config());
    h.record = true;
    let mut a = tcp_socket(4096);
    a.connect(
        h.iface.context(),
        (IpAddress::from(server.ip()), server.port()),
        local(server.ip(), 40_007),
    )
    .unwrap();
    h.sockets.add(a);
    let mut mss = None;
    h.run_until(5, "SYN-ACK", |h| {
        for p in &h.recorded {
            let ip = Ipv4Packet::new_checked(&p[..]).unwrap();
            if ip.next_header() != IpProtocol::Tcp {
                continue;
            }
            let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
            let repr = TcpRepr::parse(
                &tcp,
                &IpAddress::Ipv4(ip.src_addr()),
                &IpAddress::Ipv4(ip.dst_addr()),
                &Default::default(),
            )
            .unwrap();
            if tcp.syn() && tcp.ack() {
                mss = repr.max_seg_size;
            }
        }
        mss.is_some()
    });
    assert_eq!(mss, Some(common::MTU - 40));
    drop(listener);
}

#[test]
fn client_reset_and_fin_reach_the_server() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap();
    let join = thread::spawn(move || {
        let mut results = Vec::new();
        for _ in 0..2 {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0; 64];
            let mut got = Vec::new();
            let end = loop {
                match s.read(&mut buf) {
                    Ok(0) => break "eof",
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "reset",
                    Err(e) => panic!("{e}"),
                }
            };
            results.push((got, end));
        }
        results
    });
    let mut h = Harness::new(loopback_config());
    for (port, abort) in [(40_010, false), (40_011, true)] {
        let mut s = tcp_socket(4096);
        s.connect(
            h.iface.context(),
            (IpAddress::from(server.ip()), server.port()),
            local(server.ip(), port),
        )
        .unwrap();
        let handle = h.sockets.add(s);
        h.run_until(5, "established", |h| {
            h.sockets.get::<tcp::Socket>(handle).state() == tcp::State::Established
        });
        h.sockets
            .get_mut::<tcp::Socket>(handle)
            .send_slice(b"bye")
            .unwrap();
        h.run_until(5, "data acknowledged", |h| {
            h.sockets.get::<tcp::Socket>(handle).send_queue() == 0
        });
        let s = h.sockets.get_mut::<tcp::Socket>(handle);
        if abort {
            s.abort();
        } else {
            s.close();
        }
        h.run_until(5, "flow gone", |h| h.ns.counters().tcp_flows == 0);
    }
    let results = join.join().unwrap();
    assert_eq!(results[0], (b"bye".to_vec(), "eof"));
    assert_eq!(results[1], (b"bye".to_vec(), "reset"));
}

/// Buffers start small, grow while a bulk transfer is limited by them (never past
/// the configured size), go back to their initial size once the flow idles, and the
/// flow still carries data correctly afterwards.
#[test]
fn buffers_grow_under_load_and_shrink_when_idle() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap();
    let join = echo_server(listener);
    let mut config = loopback_config();
    config.tcp_buffer_initial = 4096;
    config.tcp_buffer_size = 128 * 1024;
    config.tcp_buffer_shrink_after = std::time::Duration::ZERO;
    let mut h = Harness::new(config);
    let mut sock = tcp_socket(256 * 1024);
    sock.connect(
        h.iface.context(),
        (IpAddress::from(server.ip()), server.port()),
        local(server.ip(), 40_011),
    )
    .unwrap();
    let handle = h.sockets.add(sock);
    h.run_until(5, "established", |h| {
        h.sockets.get::<tcp::Socket>(handle).state() == tcp::State::Established
    });
    let lease = h.lease.id;
    assert_eq!(h.ns.lease_stats(lease).unwrap().buffer_bytes, 2 * 4096);

    let echo = |h: &mut Harness, len: usize, seed: usize| {
        let data: Vec<u8> = (0..len).map(|i| (i * 13 + seed) as u8).collect();
        let (mut sent, mut received, mut most) = (0, Vec::with_capacity(len), 0);
        h.run_until(9, "echo", |h| {
            let s = h.sockets.get_mut::<tcp::Socket>(handle);
            if s.can_send() && sent < len {
                sent += s.send_slice(&data[sent..]).unwrap();
            }
            while s.can_recv() {
                s.recv(|b| {
                    received.extend_from_slice(b);
                    (b.len(), ())
                })
                .unwrap();
            }
            most = most.max(h.ns.lease_stats(lease).unwrap().buffer_bytes);
            received.len() == len
        });
        assert_eq!(fnv(&received), fnv(&data));
        most
    };
    let most = echo(&mut h, 2 * 1024 * 1024, 1);
    let c = h.ns.counters();
    assert!(c.tcp_buffer_grows > 0, "{c:?}");
    assert!(most > 2 * 4096, "buffers grew: {most}");
    assert!(
        most <= 2 * 128 * 1024,
        "never past the configured size: {most}"
    );
    // Idle: the once-a-second sweep gives the initial buffers back.
    h.run_until(5, "shrink", |h| {
        h.ns.lease_stats(lease).unwrap().buffer_bytes == 2 * 4096
    });
    assert!(h.ns.counters().tcp_buffer_shrinks >= 1);
    // The shrunk flow still works, and grows again.
    echo(&mut h, 512 * 1024, 2);
    h.sockets.get_mut::<tcp::Socket>(handle).close();
    h.run_until(5, "flow removal", |h| h.ns.counters().tcp_flows == 0);
    assert_eq!(join.join().unwrap(), 2 * 1024 * 1024 + 512 * 1024);
    let c = h.ns.counters();
    assert_eq!(c.total_drops(), 0, "{c:?}");
}

/// A lease MTU at the protocol's maximum (the TCP transport's leases use 65,000): the
/// SYN-ACK's MSS follows it, a bulk echo is correct, and the netstack sends segments far
/// larger than an Ethernet frame, never larger than the MTU.
#[test]
fn the_largest_lease_mtu_carries_big_segments() {
    let mtu = vshp::lease::MAX_LEASE_MTU;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap();
    let join = echo_server(listener);
    let mut h = Harness::with_mtu(loopback_config(), mtu);
    h.record = true;
    let mut sock = tcp_socket(1024 * 1024);
    sock.connect(
        h.iface.context(),
        (IpAddress::from(server.ip()), server.port()),
        local(server.ip(), 40_021),
    )
    .unwrap();
    let handle = h.sockets.add(sock);
    const LEN: usize = 4 * 1024 * 1024;
    let data: Vec<u8> = (0..LEN).map(|i| (i * 31 + i / 509) as u8).collect();
    let received = send_close_and_read_back(&mut h, handle, &data, "bulk echo at the largest MTU");
    assert_eq!(fnv(&received), fnv(&data));
    assert_eq!(join.join().unwrap(), LEN);
    let syn_ack_mss = h.recorded.iter().find_map(|p| {
        let ip = Ipv4Packet::new_checked(&p[..]).ok()?;
        let t = TcpPacket::new_checked(ip.payload()).ok()?;
        (t.syn() && t.ack()).then(|| {
            TcpRepr::parse(
                &t,
                &ip.src_addr().into(),
                &ip.dst_addr().into(),
                &smoltcp::phy::ChecksumCapabilities::default(),
            )
            .unwrap()
            .max_seg_size
        })?
    });
    assert_eq!(syn_ack_mss, Some(mtu - 40));
    let largest = h.recorded.iter().map(Vec::len).max().unwrap();
    assert!(largest > 9_000, "big segments: largest {largest}");
    assert!(largest <= usize::from(mtu), "never over the MTU: {largest}");
    assert_eq!(h.ns.counters().total_drops(), 0);
}
