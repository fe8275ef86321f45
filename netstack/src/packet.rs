//! Sans-IO packet parsing and building (bounded: every length is checked by
//! smoltcp's `new_checked` wrappers before use).

use crate::counters::DropReason;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4DstUnreachable, Icmpv4Message, Icmpv4Packet, Icmpv4Repr, Icmpv6DstUnreachable,
    Icmpv6Message, Icmpv6Packet, Icmpv6Repr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr,
    Ipv6Packet, Ipv6Repr, TcpPacket, UdpPacket, UdpRepr,
};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;

pub(crate) const IPV4_HEADER_LEN: usize = 20;
pub(crate) const IPV6_HEADER_LEN: usize = 40;
pub(crate) const UDP_HEADER_LEN: usize = 8;
pub(crate) const ICMP_ECHO_HEADER_LEN: usize = 8;
/// Largest IPv6 packet an ICMPv6 error may make (the IPv6 minimum MTU).
const IPV6_MIN_MTU: usize = 1280;
/// Hop limit of packets the netstack originates towards the client.
const HOP_LIMIT: u8 = 64;

/// The transport part of a client packet the netstack cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Transport {
    Tcp {
        src_port: u16,
        dst_port: u16,
        syn: bool,
        ack: bool,
        rst: bool,
    },
    Udp {
        src_port: u16,
        dst_port: u16,
        /// Payload range inside the whole packet.
        payload: Range<usize>,
    },
    EchoRequest {
        ident: u16,
        seq: u16,
        /// Echo data range inside the whole packet.
        data: Range<usize>,
    },
    /// Other ICMP messages (ignored).
    OtherIcmp,
}

/// A parsed client packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Parsed {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub transport: Transport,
}

impl Parsed {
    pub fn src_port(&self) -> u16 {
        match self.transport {
            Transport::Tcp { src_port, .. } | Transport::Udp { src_port, .. } => src_port,
            _ => 0,
        }
    }
    pub fn dst_port(&self) -> u16 {
        match self.transport {
            Transport::Tcp { dst_port, .. } | Transport::Udp { dst_port, .. } => dst_port,
            _ => 0,
        }
    }
}

fn sub_range(outer_start: usize, inner: &[u8], whole: &[u8]) -> Range<usize> {
    // `inner` is a sub-slice of `whole[outer_start..]`; compute its range by length
    // arithmetic only (no pointer maths).
    let end = outer_start.saturating_add(inner.len()).min(whole.len());
    outer_start.min(end)..end
}

/// Parses a client packet. Never panics; every length is bounded by the buffer.
pub(crate) fn parse(pkt: &[u8]) -> Result<Parsed, DropReason> {
    match pkt.first().map(|b| b >> 4) {
        Some(4) => parse_v4(pkt),
        Some(6) => parse_v6(pkt),
        _ => Err(DropReason::Malformed),
    }
}

fn parse_v4(pkt: &[u8]) -> Result<Parsed, DropReason> {
    let ip = Ipv4Packet::new_checked(pkt).map_err(|_| DropReason::Malformed)?;
    if !ip.verify_checksum() {
        return Err(DropReason::Malformed);
    }
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Err(DropReason::Fragment);
    }
    let src = IpAddr::V4(ip.src_addr());
    let dst = IpAddr::V4(ip.dst_addr());
    let off = usize::from(ip.header_len());
    let payload = ip.payload();
    let transport = match ip.next_header() {
        IpProtocol::Tcp => parse_tcp(payload)?,
        IpProtocol::Udp => parse_udp(pkt, off, payload, src, dst)?,
        IpProtocol::Icmp => {
            let icmp = Icmpv4Packet::new_checked(payload).map_err(|_| DropReason::Malformed)?;
            if !icmp.verify_checksum() {
                return Err(DropReason::Malformed);
            }
            if icmp.msg_type() == Icmpv4Message::EchoRequest && icmp.msg_code() == 0 {
                let data = icmp.data();
                Transport::EchoRequest {
                    ident: icmp.echo_ident(),
                    seq: icmp.echo_seq_no(),
                    data: sub_range(off + ICMP_ECHO_HEADER_LEN, data, pkt),
                }
            } else {
                Transport::OtherIcmp
            }
        }
        _ => return Err(DropReason::Unsupported),
    };
    Ok(Parsed {
        src,
        dst,
        transport,
    })
}

fn parse_v6(pkt: &[u8]) -> Result<Parsed, DropReason> {
    let ip = Ipv6Packet::new_checked(pkt).map_err(|_| DropReason::Malformed)?;
    if ip.version() != 6 {
        return Err(DropReason::Malformed);
    }
    let src = IpAddr::V6(ip.src_addr());
    let dst = IpAddr::V6(ip.dst_addr());
    let off = IPV6_HEADER_LEN;
    let payload = ip.payload();
    let transport = match ip.next_header() {
        IpProtocol::Tcp => parse_tcp(payload)?,
        IpProtocol::Udp => parse_udp(pkt, off, payload, src, dst)?,
        IpProtocol::Icmpv6 => {
            let icmp = Icmpv6Packet::new_checked(payload).map_err(|_| DropReason::Malformed)?;
            let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) else {
                return Err(DropReason::Malformed);
            };
            if !icmp.verify_checksum(&s, &d) {
                return Err(DropReason::Malformed);
            }
            if icmp.msg_type() == Icmpv6Message::EchoRequest && icmp.msg_code() == 0 {
                if payload.len() < ICMP_ECHO_HEADER_LEN {
                    return Err(DropReason::Malformed);
                }
                Transport::EchoRequest {
                    ident: icmp.echo_ident(),
                    seq: icmp.echo_seq_no(),
                    data: sub_range(
                        off + ICMP_ECHO_HEADER_LEN,
                        payload.get(ICMP_ECHO_HEADER_LEN..).unwrap_or(&[]),
                        pkt,
                    ),
                }
            } else {
                Transport::OtherIcmp
            }
        }
        _ => return Err(DropReason::Unsupported),
    };
    Ok(Parsed {
        src,
        dst,
        transport,
    })
}

fn parse_tcp(payload: &[u8]) -> Result<Transport, DropReason> {
    let tcp = TcpPacket::new_checked(payload).map_err(|_| DropReason::Malformed)?;
    Ok(Transport::Tcp {
        src_port: tcp.src_port(),
        dst_port: tcp.dst_port(),
        syn: tcp.syn(),
        ack: tcp.ack(),
        rst: tcp.rst(),
    })
}

fn parse_udp(
    pkt: &[u8],
    off: usize,
    payload: &[u8],
    src: IpAddr,
    dst: IpAddr,
) -> Result<Transport, DropReason> {
    let udp = UdpPacket::new_checked(payload).map_err(|_| DropReason::Malformed)?;
    let (s, d) = (IpAddress::from(src), IpAddress::from(dst));
    let repr = UdpRepr::parse(&udp, &s, &d, &ChecksumCapabilities::default())
        .map_err(|_| DropReason::Malformed)?;
    Ok(Transport::Udp {
        src_port: repr.src_port,
        dst_port: repr.dst_port,
        payload: sub_range(off + UDP_HEADER_LEN, udp.payload(), pkt),
    })
}

/// Checks the TCP checksum of a whole IP packet (used before acting on a SYN).
pub(crate) fn tcp_checksum_ok(pkt: &[u8], src: IpAddr, dst: IpAddr) -> bool {
    let ok = |payload: &[u8]| match TcpPacket::new_checked(payload) {
        Ok(tcp) => tcp.verify_checksum(&IpAddress::from(src), &IpAddress::from(dst)),
        Err(_) => false,
    };
    match pkt.first().map(|b| b >> 4) {
        Some(4) => Ipv4Packet::new_checked(pkt).is_ok_and(|p| ok(p.payload())),
        Some(6) => Ipv6Packet::new_checked(pkt).is_ok_and(|p| ok(p.payload())),
        _ => false,
    }
}

/// Length of the IP + UDP headers for a family.
pub(crate) fn udp_overhead(v6: bool) -> usize {
    if v6 {
        IPV6_HEADER_LEN + UDP_HEADER_LEN
    } else {
        IPV4_HEADER_LEN + UDP_HEADER_LEN
    }
}

/// Why a packet could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("source and destination are of different address families")]
    MixedFamilies,
    #[error("the packet would exceed 65535 bytes")]
    TooLong,
    #[error("the original packet cannot be quoted")]
    BadOriginal,
}

/// Writes an IP/UDP packet from `src` to `dst` into `out` (replacing its content).
pub(crate) fn build_udp(
    out: &mut Vec<u8>,
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
) -> Result<(), BuildError> {
    let udp_len = UDP_HEADER_LEN + payload.len();
    if udp_len > usize::from(u16::MAX) - IPV6_HEADER_LEN {
        return Err(BuildError::TooLong);
    }
    let repr = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    };
    let caps = ChecksumCapabilities::default();
    out.clear();
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let ip = Ipv4Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Udp,
                payload_len: udp_len,
                hop_limit: HOP_LIMIT,
            };
            out.resize(ip.buffer_len() + udp_len, 0);
            let (head, rest) = out.split_at_mut(ip.buffer_len());
            ip.emit(&mut Ipv4Packet::new_unchecked(head), &caps);
            repr.emit(
                &mut UdpPacket::new_unchecked(rest),
                &IpAddress::Ipv4(s),
                &IpAddress::Ipv4(d),
                payload.len(),
                |b| b.copy_from_slice(payload),
                &caps,
            );
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let ip = Ipv6Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Udp,
                payload_len: udp_len,
                hop_limit: HOP_LIMIT,
            };
            out.resize(ip.buffer_len() + udp_len, 0);
            let (head, rest) = out.split_at_mut(ip.buffer_len());
            ip.emit(&mut Ipv6Packet::new_unchecked(head));
            repr.emit(
                &mut UdpPacket::new_unchecked(rest),
                &IpAddress::Ipv6(s),
                &IpAddress::Ipv6(d),
                payload.len(),
                |b| b.copy_from_slice(payload),
                &caps,
            );
        }
        _ => return Err(BuildError::MixedFamilies),
    }
    Ok(())
}

/// Writes an ICMP/ICMPv6 echo reply into `out`.
pub(crate) fn build_echo_reply(
    out: &mut Vec<u8>,
    src: IpAddr,
    dst: IpAddr,
    ident: u16,
    seq: u16,
    data: &[u8],
) -> Result<(), BuildError> {
    let icmp_len = ICMP_ECHO_HEADER_LEN + data.len();
    if icmp_len > usize::from(u16::MAX) - IPV6_HEADER_LEN {
        return Err(BuildError::TooLong);
    }
    let caps = ChecksumCapabilities::default();
    out.clear();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let ip = Ipv4Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Icmp,
                payload_len: icmp_len,
                hop_limit: HOP_LIMIT,
            };
            out.resize(ip.buffer_len() + icmp_len, 0);
            let (head, rest) = out.split_at_mut(ip.buffer_len());
            ip.emit(&mut Ipv4Packet::new_unchecked(head), &caps);
            Icmpv4Repr::EchoReply {
                ident,
                seq_no: seq,
                data,
            }
            .emit(&mut Icmpv4Packet::new_unchecked(rest), &caps);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let ip = Ipv6Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Icmpv6,
                payload_len: icmp_len,
                hop_limit: HOP_LIMIT,
            };
            out.resize(ip.buffer_len() + icmp_len, 0);
            let (head, rest) = out.split_at_mut(ip.buffer_len());
            ip.emit(&mut Ipv6Packet::new_unchecked(head));
            Icmpv6Repr::EchoReply {
                ident,
                seq_no: seq,
                data,
            }
            .emit(&s, &d, &mut Icmpv6Packet::new_unchecked(rest), &caps);
        }
        _ => return Err(BuildError::MixedFamilies),
    }
    Ok(())
}

/// The ICMP error to send back for a client packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcmpError {
    NetUnreachable,
    HostUnreachable,
    PortUnreachable,
    AdminProhibited,
    /// IPv4 "fragmentation needed" / ICMPv6 "packet too big", with the MTU to use.
    TooBig(u16),
}

/// What to tell the client for an ICMP error the OS received for one of its datagrams
/// (`IP_RECVERR`: the ICMP type, code and info of `sock_extended_err`). `None`: not
/// an error the client needs (time exceeded and the like).
pub(crate) fn icmp_error_from_os(
    v6: bool,
    icmp_type: u8,
    code: u8,
    info: u32,
) -> Option<IcmpError> {
    let mtu = u16::try_from(info).unwrap_or(u16::MAX);
    if v6 {
        match (icmp_type, code) {
            (1, 0) => Some(IcmpError::NetUnreachable),
            (1, 1) | (1, 5) | (1, 6) => Some(IcmpError::AdminProhibited),
            (1, 4) => Some(IcmpError::PortUnreachable),
            (1, _) => Some(IcmpError::HostUnreachable),
            (2, _) => Some(IcmpError::TooBig(mtu)),
            _ => None,
        }
    } else {
        match (icmp_type, code) {
            (3, 0) | (3, 6) | (3, 11) => Some(IcmpError::NetUnreachable),
            (3, 3) => Some(IcmpError::PortUnreachable),
            (3, 4) => Some(IcmpError::TooBig(mtu)),
            (3, 9) | (3, 10) | (3, 13) => Some(IcmpError::AdminProhibited),
            (3, _) => Some(IcmpError::HostUnreachable),
            _ => None,
        }
    }
}

/// Writes the ICMP error answering `original` (a client packet) into `out`.
pub(crate) fn build_icmp_error(
    out: &mut Vec<u8>,
    original: &[u8],
    kind: IcmpError,
) -> Result<(), BuildError> {
    let caps = ChecksumCapabilities::default();
    out.clear();
    match original.first().map(|b| b >> 4) {
        Some(4) => {
            let ip = Ipv4Packet::new_checked(original).map_err(|_| BuildError::BadOriginal)?;
            let orig = Ipv4Repr::parse(&ip, &caps).map_err(|_| BuildError::BadOriginal)?;
            let payload = ip.payload();
            let quoted = payload.get(..payload.len().min(8)).unwrap_or(&[]);
            // Quote the original header as it was (payload length of the quote).
            let header = Ipv4Repr {
                payload_len: quoted.len(),
                ..orig
            };
            let reason = match kind {
                IcmpError::NetUnreachable => Icmpv4DstUnreachable::NetUnreachable,
                IcmpError::HostUnreachable => Icmpv4DstUnreachable::HostUnreachable,
                IcmpError::PortUnreachable => Icmpv4DstUnreachable::PortUnreachable,
                IcmpError::AdminProhibited => Icmpv4DstUnreachable::HostProhibited,
                IcmpError::TooBig(_) => Icmpv4DstUnreachable::FragRequired,
            };
            let icmp = Icmpv4Repr::DstUnreachable {
                reason,
                header,
                data: quoted,
            };
            let reply = Ipv4Repr {
                src_addr: orig.dst_addr,
                dst_addr: orig.src_addr,
                next_header: IpProtocol::Icmp,
                payload_len: icmp.buffer_len(),
                hop_limit: HOP_LIMIT,
            };
            out.resize(reply.buffer_len() + icmp.buffer_len(), 0);
            let (head, rest) = out.split_at_mut(reply.buffer_len());
            reply.emit(&mut Ipv4Packet::new_unchecked(head), &caps);
            let mut pkt = Icmpv4Packet::new_unchecked(rest);
            icmp.emit(&mut pkt, &caps);
            if let IcmpError::TooBig(mtu) = kind {
                // RFC 1191: next-hop MTU in the low 16 bits of the "unused" word.
                let b = pkt.into_inner();
                if let Some(field) = b.get_mut(6..8) {
                    field.copy_from_slice(&mtu.to_be_bytes());
                }
                Icmpv4Packet::new_unchecked(b).fill_checksum();
            }
        }
        Some(6) => {
            let ip = Ipv6Packet::new_checked(original).map_err(|_| BuildError::BadOriginal)?;
            let orig = Ipv6Repr::parse(&ip).map_err(|_| BuildError::BadOriginal)?;
            let payload = ip.payload();
            let room = IPV6_MIN_MTU - 2 * IPV6_HEADER_LEN - ICMP_ECHO_HEADER_LEN;
            let quoted = payload.get(..payload.len().min(room)).unwrap_or(&[]);
            let header = Ipv6Repr {
                payload_len: quoted.len(),
                ..orig
            };
            let icmp = match kind {
                IcmpError::TooBig(mtu) => Icmpv6Repr::PktTooBig {
                    mtu: u32::from(mtu),
                    header,
                    data: quoted,
                },
                other => Icmpv6Repr::DstUnreachable {
                    reason: match other {
                        IcmpError::NetUnreachable => Icmpv6DstUnreachable::NoRoute,
                        IcmpError::PortUnreachable => Icmpv6DstUnreachable::PortUnreachable,
                        IcmpError::AdminProhibited => Icmpv6DstUnreachable::AdminProhibit,
                        _ => Icmpv6DstUnreachable::AddrUnreachable,
                    },
                    header,
                    data: quoted,
                },
            };
            let reply = Ipv6Repr {
                src_addr: orig.dst_addr,
                dst_addr: orig.src_addr,
                next_header: IpProtocol::Icmpv6,
                payload_len: icmp.buffer_len(),
                hop_limit: HOP_LIMIT,
            };
            out.resize(reply.buffer_len() + icmp.buffer_len(), 0);
            let (head, rest) = out.split_at_mut(reply.buffer_len());
            reply.emit(&mut Ipv6Packet::new_unchecked(head));
            icmp.emit(
                &orig.dst_addr,
                &orig.src_addr,
                &mut Icmpv6Packet::new_unchecked(rest),
                &caps,
            );
        }
        _ => return Err(BuildError::BadOriginal),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: &str) -> IpAddr {
        a.parse().unwrap()
    }

    #[test]
    fn udp_round_trip_v4_and_v6() {
        for (s, d) in [
            ("100.64.0.2:5000", "127.0.0.1:53"),
            ("[fd00::2]:5000", "[::1]:53"),
        ] {
            let (s, d): (SocketAddr, SocketAddr) = (s.parse().unwrap(), d.parse().unwrap());
            let mut buf = Vec::new();
            build_udp(&mut buf, s, d, b"hello").unwrap();
            let p = parse(&buf).unwrap();
            assert_eq!((p.src, p.dst), (s.ip(), d.ip()));
            match p.transport {
                Transport::Udp {
                    src_port,
                    dst_port,
                    payload,
                } => {
                    assert_eq!((src_port, dst_port), (5000, 53));
                    assert_eq!(&buf[payload], b"hello");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn mixed_families_refused() {
        let mut buf = Vec::new();
        let r = build_udp(
            &mut buf,
            "1.2.3.4:1".parse().unwrap(),
            "[::1]:2".parse().unwrap(),
            b"",
        );
        assert_eq!(r, Err(BuildError::MixedFamilies));
    }

    #[test]
    fn icmp_errors_quote_the_original() {
        let mut orig = Vec::new();
        build_udp(
            &mut orig,
            "100.64.0.2:5000".parse().unwrap(),
            "127.0.0.1:9".parse().unwrap(),
            &[0u8; 100],
        )
        .unwrap();
        let mut out = Vec::new();
        build_icmp_error(&mut out, &orig, IcmpError::TooBig(1280)).unwrap();
        let ip = Ipv4Packet::new_checked(&out[..]).unwrap();
        assert_eq!(
            ip.dst_addr(),
            "100.64.0.2".parse::<std::net::Ipv4Addr>().unwrap()
        );
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!(icmp.msg_type(), Icmpv4Message::DstUnreachable);
        assert_eq!(&ip.payload()[6..8], &1280u16.to_be_bytes());

        let mut orig6 = Vec::new();
        build_udp(
            &mut orig6,
            "[fd00::2]:5000".parse().unwrap(),
            "[2001:db8::1]:9".parse().unwrap(),
            &[0u8; 2000],
        )
        .unwrap();
        build_icmp_error(&mut out, &orig6, IcmpError::NetUnreachable).unwrap();
        assert!(out.len() <= IPV6_MIN_MTU);
        let ip = Ipv6Packet::new_checked(&out[..]).unwrap();
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum(&ip.src_addr(), &ip.dst_addr()));
        assert_eq!(icmp.msg_type(), Icmpv6Message::DstUnreachable);
    }

    #[test]
    fn os_icmp_errors_map_to_client_errors() {
        assert_eq!(
            icmp_error_from_os(false, 3, 3, 0),
            Some(IcmpError::PortUnreachable)
        );
        assert_eq!(
            icmp_error_from_os(false, 3, 4, 1400),
            Some(IcmpError::TooBig(1400))
        );
        assert_eq!(icmp_error_from_os(false, 11, 0, 0), None);
        assert_eq!(
            icmp_error_from_os(true, 1, 4, 0),
            Some(IcmpError::PortUnreachable)
        );
        assert_eq!(
            icmp_error_from_os(true, 2, 0, 1280),
            Some(IcmpError::TooBig(1280))
        );
        assert_eq!(
            icmp_error_from_os(true, 1, 0, 0),
            Some(IcmpError::NetUnreachable)
        );
    }

    #[test]
    fn echo_reply_parses_back() {
        let mut out = Vec::new();
        build_echo_reply(&mut out, v4("127.0.0.1"), v4("100.64.0.2"), 7, 9, b"ping").unwrap();
        let ip = Ipv4Packet::new_checked(&out[..]).unwrap();
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!(icmp.msg_type(), Icmpv4Message::EchoReply);
        assert_eq!((icmp.echo_ident(), icmp.echo_seq_no()), (7, 9));
    }

    #[test]
    fn truncated_packets_are_rejected() {
        let mut buf = Vec::new();
        build_udp(
            &mut buf,
            "100.64.0.2:5000".parse().unwrap(),
            "127.0.0.1:9".parse().unwrap(),
            b"payload",
        )
        .unwrap();
        for n in 0..buf.len() {
            assert!(parse(&buf[..n]).is_err(), "prefix {n} accepted");
        }
    }
}
