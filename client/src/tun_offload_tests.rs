//! Hand-built packets through [`Splitter`] and [`Coalescer`]. Checksums are verified
//! with a one's-complement sum written here, independent of tun-rs's.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use super::*;

const MTU: u16 = 1400;
const MSS: usize = 1348;
const SRC4: [u8; 4] = [100, 64, 0, 2];
const DST4: [u8; 4] = [203, 0, 113, 10];
const SRC6: [u8; 16] = [
    0xfd, 0x56, 0x53, 0x48, 0x50, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2,
];
const DST6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn pseudo(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
    let acc = sum16(dst, sum16(src, 0));
    acc + u32::from(proto) + (len as u32 & 0xffff) + ((len as u32) >> 16)
}

/// The IPv4 header's checksum verifies (sum over the header is 0xffff).
fn ipv4_header_ok(p: &[u8]) -> bool {
    let ihl = usize::from(p[0] & 0x0f) * 4;
    fold(sum16(&p[..ihl], 0)) == 0xffff
}

/// The TCP/UDP checksum of an IPv4 or IPv6 packet verifies.
fn l4_ok(p: &[u8]) -> bool {
    let (start, proto, src, dst) = if p[0] >> 4 == 4 {
        let ihl = usize::from(p[0] & 0x0f) * 4;
        (ihl, p[9], &p[12..16], &p[16..20])
    } else {
        (40, p[6], &p[8..24], &p[24..40])
    };
    let l4 = &p[start..];
    fold(sum16(l4, pseudo(src, dst, proto, l4.len()))) == 0xffff
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A TCP header (20 bytes, or 32 with a timestamp option) with the checksum zero.
fn tcp_header(seq: u32, flags: u8, options: bool) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&443u16.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&7777u32.to_be_bytes());
    t[14..16].copy_from_slice(&501u16.to_be_bytes());
    t[13] = flags;
    if options {
        // NOP NOP TIMESTAMP(10): the kind a Linux sender puts in every segment.
        t.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
    }
    t[12] = ((t.len() / 4) as u8) << 4;
    t
}

fn ipv4(proto: u8, id: u16, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&SRC4);
    p[16..20].copy_from_slice(&DST4);
    let c = !fold(sum16(&p, 0));
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(l4);
    p
}

fn ipv6(proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
    p[6] = proto;
    p[7] = 64;
    p[8..24].copy_from_slice(&SRC6);
    p[24..40].copy_from_slice(&DST6);
    p.extend_from_slice(l4);
    p
}

/// Writes the full (valid) transport checksum.
fn finish_l4(p: &mut [u8]) {
    let (start, proto, src, dst) = if p[0] >> 4 == 4 {
        (20, p[9], p[12..16].to_vec(), p[16..20].to_vec())
    } else {
        (40, p[6], p[8..24].to_vec(), p[24..40].to_vec())
    };
    let at = start + if proto == 6 { 16 } else { 6 };
    p[at..at + 2].fill(0);
    let l4len = p.len() - start;
    let c = !fold(sum16(&p[start..], pseudo(&src, &dst, proto, l4len)));
    p[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// What the kernel leaves for `NEEDS_CSUM`: the pseudo-header sum, not complemented.
fn partial_l4(p: &mut [u8]) {
    let (start, proto, src, dst) = if p[0] >> 4 == 4 {
        (20, p[9], p[12..16].to_vec(), p[16..20].to_vec())
    } else {
        (40, p[6], p[8..24].to_vec(), p[24..40].to_vec())
    };
    let at = start + if proto == 6 { 16 } else { 6 };
    let l4len = p.len() - start;
    let c = fold(pseudo(&src, &dst, proto, l4len));
    p[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

fn vnet(flags: u8, gso_type: u8, hdr_len: u16, gso_size: u16, start: u16, off: u16) -> Vec<u8> {
    let mut h = vec![0u8; VNET_HDR_LEN];
    VirtioNetHdr {
        flags,
        gso_type,
        hdr_len,
        gso_size,
        csum_start: start,
        csum_offset: off,
    }
    .encode(&mut h)
    .unwrap();
    h
}

/// Puts `header + packet` where a TUN read would and splits it.
fn read_into(s: &mut Splitter, header: &[u8], packet: &[u8]) -> Result<Vec<Vec<u8>>, OffloadError> {
    let buf = s.read_buf();
    buf[..header.len()].copy_from_slice(header);
    buf[header.len()..header.len() + packet.len()].copy_from_slice(packet);
    s.split(header.len() + packet.len())?;
    Ok(s.packets().map(<[u8]>::to_vec).collect())
}

fn seq_of(p: &[u8], l3: usize) -> u32 {
    u32::from_be_bytes(p[l3 + 4..l3 + 8].try_into().unwrap())
}

#[test]
fn an_ipv4_tso_super_packet_splits_into_checksummed_mtu_packets() {
    let data = payload(3 * MSS + 500, 1);
    let seq0 = 0xffff_f000; // wraps inside the super-packet
    let mut l4 = tcp_header(seq0, ACK | PSH, false);
    l4.extend_from_slice(&data);
    let mut sp = ipv4(6, 1000, &l4);
    partial_l4(&mut sp);
    let h = vnet(
        F_NEEDS_CSUM,
        VIRTIO_NET_HDR_GSO_TCPV4,
        40,
        MSS as u16,
        20,
        16,
    );
    let mut s = Splitter::new(MTU);
    let out = read_into(&mut s, &h, &sp).unwrap();

    assert_eq!(out.len(), 4);
    let mut joined = Vec::new();
    for (i, p) in out.iter().enumerate() {
        assert!(
            p.len() <= usize::from(MTU),
            "segment {i}: {} bytes",
            p.len()
        );
        assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), p.len());
        assert_eq!(u16::from_be_bytes([p[4], p[5]]), 1000 + i as u16, "IP id");
        assert!(ipv4_header_ok(p), "segment {i}: IPv4 header checksum");
        assert!(l4_ok(p), "segment {i}: TCP checksum");
        assert_eq!(seq_of(p, 20), seq0.wrapping_add((i * MSS) as u32));
        let psh = p[33] & PSH != 0;
        assert_eq!(psh, i == 3, "PSH only on the last segment");
        joined.extend_from_slice(&p[40..]);
    }
    assert_eq!(out[0].len(), 40 + MSS);
    assert_eq!(joined, data, "payload in order, nothing lost");
    assert_eq!(
        s.stats,
        SplitStats {
            super_packets: 1,
            segments: 4,
            dropped: 0
        }
    );
}

#[test]
fn an_ipv6_tso_super_packet_with_options_splits_the_same_way() {
    // hdr_len from the kernel may be the whole linear part: it is recomputed.
    let data = payload(5 * 1296 + 7, 2);
    let mut l4 = tcp_header(42, ACK, true);
    l4.extend_from_slice(&data);
    let mut sp = ipv6(6, &l4);
    partial_l4(&mut sp);
    let h = vnet(F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6, 1500, 1296, 40, 16);
    let mut s = Splitter::new(MTU);
    let out = read_into(&mut s, &h, &sp).unwrap();

    assert_eq!(out.len(), 6);
    let mut joined = Vec::new();
    for (i, p) in out.iter().enumerate() {
        assert!(p.len() <= usize::from(MTU));
        assert_eq!(usize::from(u16::from_be_bytes([p[4], p[5]])), p.len() - 40);
        assert!(l4_ok(p), "segment {i}: TCP checksum");
        assert_eq!(seq_of(p, 40), 42 + (i * 1296) as u32);
        assert_eq!(&p[40 + 20..40 + 32], &l4[20..32], "options copied");
        joined.extend_from_slice(&p[40 + 32..]);
    }
    assert_eq!(joined, data);
}

#[test]
fn segments_larger_than_the_mtu_are_cut_to_it() {
    // The connection chose its MSS before the lease MTU shrank (CONFIG_DELTA).
    let data = payload(4 * 1460, 3);
    let mut l4 = tcp_header(1, ACK, false);
    l4.extend_from_slice(&data);
    let mut sp = ipv4(6, 1, &l4);
    partial_l4(&mut sp);
    let h = vnet(F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 40, 1460, 20, 16);
    let mut s = Splitter::new(1500);
    s.set_mtu(1280);
    let out = read_into(&mut s, &h, &sp).unwrap();
    assert!(
        out.iter()
            .all(|p| p.len() <= 1280 && l4_ok(p) && ipv4_header_ok(p))
    );
    assert_eq!(out.len(), (4 * 1460usize).div_ceil(1240));
    let joined: Vec<u8> = out.iter().flat_map(|p| p[40..].to_vec()).collect();
    assert_eq!(joined, data);
}

#[test]
fn the_largest_ipv6_super_packet_fits_the_read_buffer() {
    // 65,536 bytes of skb, the kernel's default GSO limit: 40 + 65,496.
    let mut l4 = tcp_header(3, ACK, false);
    l4.extend_from_slice(&payload(65_536 - 60, 10));
    let mut sp = ipv6(6, &l4);
    partial_l4(&mut sp);
    assert_eq!(sp.len(), 65_536);
    let h = vnet(F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6, 60, 1340, 40, 16);
    let mut s = Splitter::new(MTU);
    let out = read_into(&mut s, &h, &sp).unwrap();
    assert_eq!(out.len(), (65_536usize - 60).div_ceil(1340));
    assert!(out.iter().all(|p| l4_ok(p)));
}

#[test]
fn small_segments_grow_the_segment_buffers_once() {
    let data = payload(65_000, 4);
    let mut l4 = tcp_header(9, ACK, false);
    l4.extend_from_slice(&data);
    let mut sp = ipv4(6, 1, &l4);
    partial_l4(&mut sp);
    let h = vnet(F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 40, 536, 20, 16);
    let mut s = Splitter::new(MTU);
    let out = read_into(&mut s, &h, &sp).unwrap();
    assert_eq!(out.len(), 65_000usize.div_ceil(536));
    assert!(out.iter().all(|p| l4_ok(p)));
}

#[test]
fn a_needs_csum_packet_gets_its_checksum() {
    let mut l4 = tcp_header(5, ACK | PSH, true);
    l4.extend_from_slice(&payload(333, 5));
    let mut p = ipv4(6, 7, &l4);
    finish_l4(&mut p);
    let want = p.clone();
    partial_l4(&mut p);
    assert!(
        !l4_ok(&p),
        "the test packet starts without a valid checksum"
    );
    let h = vnet(F_NEEDS_CSUM, 0, 0, 0, 20, 16);
    let mut s = Splitter::new(MTU);
    let out = read_into(&mut s, &h, &p).unwrap();
    assert_eq!(out, vec![want.clone()]);

    // UDP over IPv6 (odd length), and a plain packet passes untouched.
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&5353u16.to_be_bytes());
    u[2..4].copy_from_slice(&53u16.to_be_bytes());
    u.extend_from_slice(&payload(101, 6));
    let ulen = u.len() as u16;
    u[4..6].copy_from_slice(&ulen.to_be_bytes());
    let mut p6 = ipv6(17, &u);
    partial_l4(&mut p6);
    let h6 = vnet(F_NEEDS_CSUM, 0, 0, 0, 40, 6);
    let out = read_into(&mut s, &h6, &p6).unwrap();
    assert!(l4_ok(&out[0]), "UDP checksum");
    let plain = vnet(0, 0, 0, 0, 0, 0);
    let out = read_into(&mut s, &plain, &want).unwrap();
    assert_eq!(out, vec![want]);
    assert_eq!(s.stats.super_packets, 0);
}

#[test]
fn a_udp_checksum_that_sums_to_zero_is_sent_as_ffff() {
    // UDP over IPv6 must not carry 0 ("no checksum" is forbidden there): a sum of 0
    // goes out as 0xffff, as the kernel's skb_checksum_help does.
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&5353u16.to_be_bytes());
    u[2..4].copy_from_slice(&53u16.to_be_bytes());
    u.extend_from_slice(&payload(64, 9));
    u[4..6].copy_from_slice(&72u16.to_be_bytes());
    // Choose one payload word so that the full sum folds to 0xffff (checksum 0).
    u[8..10].fill(0);
    let partial = fold(sum16(&u, pseudo(&SRC6, &DST6, 17, u.len())));
    u[8..10].copy_from_slice(&(0xffff - partial).to_be_bytes());
    let mut p = ipv6(17, &u);
    partial_l4(&mut p);
    let mut s = Splitter::new(MTU);
    let out = read_into(&mut s, &vnet(F_NEEDS_CSUM, 0, 0, 0, 40, 6), &p).unwrap();
    assert_eq!(&out[0][46..48], &[0xff, 0xff]);
    assert!(l4_ok(&out[0]));
}

#[test]
fn malformed_reads_are_counted_drops() {
    let mut l4 = tcp_header(5, ACK, false);
    l4.extend_from_slice(&payload(3000, 7));
    let sp = ipv4(6, 7, &l4);
    let mut s = Splitter::new(MTU);
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        ("header only", vnet(0, 0, 0, 0, 0, 0), vec![]),
        ("not IP", vnet(0, 0, 0, 0, 0, 0), vec![0x20; 60]),
        (
            "checksum offset outside",
            vnet(F_NEEDS_CSUM, 0, 0, 0, 20, 4000),
            sp[..100].to_vec(),
        ),
        (
            "unknown GSO type",
            vnet(F_NEEDS_CSUM, 3, 40, 1348, 20, 16),
            sp.clone(),
        ),
        (
            "TCPV6 on IPv4",
            vnet(F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6, 40, 1348, 20, 16),
            sp.clone(),
        ),
        (
            "gso_size 0",
            vnet(F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 40, 0, 20, 16),
            sp.clone(),
        ),
        (
            "csum_start past the end",
            vnet(F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 40, 1348, 9000, 16),
            sp.clone(),
        ),
        (
            "csum_start inside the IP header",
            vnet(F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 40, 1348, 4, 16),
            sp.clone(),
        ),
        (
            "wrong checksum offset",
            vnet(F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 40, 1348, 20, 6),
            sp.clone(),
        ),
        (
            "a single packet over the MTU",
            vnet(0, 0, 0, 0, 0, 0),
            sp.clone(),
        ),
        (
            "UDP segments over the MTU",
            vnet(F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_UDP_L4, 28, 1460, 20, 6),
            ipv4(17, 1, &[0u8; 3000]),
        ),
    ];
    for (i, (what, h, p)) in cases.iter().enumerate() {
        let r = read_into(&mut s, h, p);
        assert!(r.is_err(), "{what}: accepted");
        assert_eq!(s.stats.dropped, i as u64 + 1, "{what}");
        assert_eq!(
            s.packets().count(),
            0,
            "{what}: packets left from a dropped read"
        );
    }
    // A read shorter than the header, and one that filled the buffer (truncated).
    assert!(matches!(s.split(4), Err(OffloadError::Short(4))));
    assert!(matches!(
        s.split(READ_BUF_LEN),
        Err(OffloadError::Truncated)
    ));
}

#[test]
fn random_headers_and_bytes_never_panic() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut l4 = tcp_header(5, ACK, true);
    l4.extend_from_slice(&payload(5000, 8));
    let templates = [ipv4(6, 1, &l4), ipv6(6, &l4), ipv4(17, 1, &l4)];
    let mut s = Splitter::new(1280);
    for round in 0..20_000 {
        let t = &templates[round % templates.len()];
        let len = (next() as usize) % (t.len() + 1);
        let mut p = t[..len].to_vec();
        // Mutate a few bytes of the headers.
        for _ in 0..(next() % 4) {
            if !p.is_empty() {
                let at = (next() as usize) % p.len().min(80);
                p[at] = next() as u8;
            }
        }
        let r = next();
        let h = vnet(
            (r & 1) as u8,
            [0, 1, 4, 5, 0x81, 3][(r >> 1) as usize % 6],
            (r >> 8) as u16 % 128,
            [0u16, 1, 536, 1240, 1448, u16::MAX][(r >> 16) as usize % 6],
            (r >> 24) as u16 % 80,
            [16u16, 6, 0, 60000][(r >> 40) as usize % 4],
        );
        if read_into(&mut s, &h, &p).is_ok() {
            assert!(s.packets().all(|q| q.len() <= 1280));
        }
    }
}

/// Consecutive segments of one flow (valid checksums, as the netstack sends them).
fn flow_segments(n: usize, seg: usize, seq0: u32, id0: u16) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut l4 = tcp_header(seq0 + (i * seg) as u32, ACK, false);
            l4.extend_from_slice(&payload(seg, i as u8));
            let mut p = ipv4(6, id0 + i as u16, &l4);
            finish_l4(&mut p);
            p
        })
        .collect()
}

#[test]
fn gro_coalesces_one_flow_and_leaves_other_packets_alone() {
    let segs = flow_segments(4, MSS, 1_000_000, 50);
    // Another flow (other source port), and a UDP packet.
    let mut other = segs[1].clone();
    other[20..22].copy_from_slice(&40001u16.to_be_bytes());
    other[30..32].copy_from_slice(&[0, 0]);
    finish_l4(&mut other);
    let mut udp = vec![0u8; 8];
    udp.extend_from_slice(b"a datagram");
    udp[4..6].copy_from_slice(&18u16.to_be_bytes());
    let mut udp = ipv4(17, 9, &udp);
    finish_l4(&mut udp);

    let mut c = Coalescer::new();
    for p in [&segs[0], &udp, &segs[1], &other, &segs[2], &segs[3]] {
        assert!(c.push(p));
    }
    let mut writes: Vec<Vec<u8>> = Vec::new();
    c.flush(|b| writes.push(b.to_vec())).unwrap();
    assert!(c.is_empty());

    assert_eq!(
        writes.len(),
        3,
        "one super-packet, the UDP packet, the other flow"
    );
    let big = &writes[0];
    let h = VirtioNetHdr::decode(big).unwrap();
    assert_eq!(h.gso_type, VIRTIO_NET_HDR_GSO_TCPV4);
    assert_eq!(usize::from(h.gso_size), MSS);
    assert_eq!(h.flags & F_NEEDS_CSUM, F_NEEDS_CSUM);
    let pkt = &big[VNET_HDR_LEN..];
    assert_eq!(pkt.len(), 40 + 4 * MSS);
    assert!(ipv4_header_ok(pkt));
    let want: Vec<u8> = segs.iter().flat_map(|s| s[40..].to_vec()).collect();
    assert_eq!(&pkt[40..], &want[..], "payloads in order");
    // Not coalesced: a GSO_NONE header and the packet as it was.
    assert_eq!(writes[1][..VNET_HDR_LEN], [0u8; VNET_HDR_LEN]);
    assert_eq!(&writes[1][VNET_HDR_LEN..], &udp[..]);
    assert_eq!(&writes[2][VNET_HDR_LEN..], &other[..]);
    assert_eq!(
        c.stats,
        GroStats {
            packets: 6,
            writes: 3,
            coalesced: 1,
            dropped: 0
        }
    );

    // What the kernel gets back splits into the same segments.
    let mut s = Splitter::new(MTU);
    let back = read_into(&mut s, &big[..VNET_HDR_LEN], pkt).unwrap();
    assert_eq!(back, segs);
}

#[test]
fn gro_does_not_merge_a_gap_and_the_buffers_are_reused() {
    let mut c = Coalescer::new();
    let segs = flow_segments(3, 1000, 7, 1);
    // Segment 1 missing: 0 and 2 are not consecutive.
    c.push(&segs[0]);
    c.push(&segs[2]);
    let mut writes = Vec::new();
    c.flush(|b| writes.push(b.to_vec())).unwrap();
    assert_eq!(writes.len(), 2);
    assert!(writes.iter().all(|w| w[1] == 0));
    // A second burst in the same buffers: stale data from the first must not leak in.
    for p in &segs {
        c.push(p);
    }
    writes.clear();
    c.flush(|b| writes.push(b.to_vec())).unwrap();
    assert_eq!(writes.len(), 1);
    assert_eq!(writes[0].len(), VNET_HDR_LEN + 40 + 3000);
    // A full burst refuses more until flushed.
    for _ in 0..GRO_BATCH {
        assert!(c.push(&segs[0]));
    }
    assert!(c.is_full());
    assert!(!c.push(&segs[0]));
}

#[test]
fn gro_over_random_packets_from_the_gateway_never_panics() {
    // The gateway is a peer, not the kernel: whatever IP packets it sends go through
    // tun-rs's GRO (header lengths, IHL, data offsets and lengths mutated).
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut segs = flow_segments(8, 700, 1, 1);
    let mut l4 = tcp_header(1, ACK, true);
    l4.extend_from_slice(&payload(700, 1));
    segs.push(ipv6(6, &l4));
    segs.push(ipv4(17, 3, &payload(60, 2)));
    let mut c = Coalescer::new();
    let mut writes = 0u64;
    for _ in 0..3_000 {
        let n = 1 + (next() as usize) % GRO_BATCH;
        for _ in 0..n {
            let t = &segs[(next() as usize) % segs.len()];
            let mut p = t[..(next() as usize) % (t.len() + 1)].to_vec();
            for _ in 0..(next() % 3) {
                if !p.is_empty() {
                    let at = (next() as usize) % p.len().min(72);
                    p[at] = next() as u8;
                }
            }
            assert_eq!(c.push(&p), !p.is_empty());
        }
        let _ = c.flush(|b| {
            assert!(b.len() > VNET_HDR_LEN - 1);
            writes += 1;
        });
        assert!(c.is_empty());
    }
    assert!(writes > 0);
    assert_eq!(c.stats.dropped, 0, "no burst refused as a whole");
}
