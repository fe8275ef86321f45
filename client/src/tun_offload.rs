//! TUN offload: virtio-net super-packets from the laptop's kernel become MTU-sized
//! packets for the tunnel, and bursts of packets from the gateway become super-packets
//! for the kernel.
//!
//! The helper opens the TUN with `IFF_VNET_HDR` and `TUNSETOFFLOAD` (checksum, TSO4/6,
//! USO where the kernel has it) and says so in `TunOpened { vnet_hdr }` (the session may
//! not ioctl the descriptor). Then every read and every write starts with a 10-byte
//! `virtio_net_hdr`, and a read may be a TCP (or UDP) super-packet of up to 64 KiB.
//! Over the UDP transport (lease MTU 1,400) that is one `read` per ~45 packets instead
//! of one per packet (docs/client.md, "TUN offload").
//!
//! - [`Splitter`] (TUN → tunnel): one read, its header decoded, a super-packet split by
//!   `tun_rs::gso_split` into packets of at most the lease MTU with their IPv4 header
//!   and TCP/UDP checksums computed; a single packet whose checksum the kernel left to
//!   us (`NEEDS_CSUM`) gets it. The gateway checks every packet against the lease MTU,
//!   so nothing larger may leave.
//! - [`Coalescer`] (tunnel → TUN): the packets of one receive burst are copied behind
//!   room for a header, `tun_rs`'s GRO merges consecutive TCP segments of one flow into
//!   one super-packet with a GSO header, and each result is one `write`.
//!
//! Buffers are allocated once (and when the MTU changes, or a super-packet needs more
//! segments than any before): nothing per packet in steady state. Bad input (a header
//! that does not describe the packet, a packet `gso_split` refuses) is an
//! [`OffloadError`]: the driver counts it as a drop; nothing here panics on it.

use tun_rs::{
    GROTable, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP_L4,
    VIRTIO_NET_HDR_LEN, VirtioNetHdr,
};

/// Bytes of the virtio-net header in front of every packet on an offload TUN.
pub const VNET_HDR_LEN: usize = VIRTIO_NET_HDR_LEN;
/// The largest packet written to the TUN: an IP length field's worth (what GRO builds at
/// most; a packet from the gateway is never longer).
pub const MAX_SUPER_PACKET: usize = 65_535;
/// One read's buffer: header, the largest super-packet the kernel's default GSO limit
/// allows (65,536 bytes of skb: an IPv6 one may be one byte over 65,535), and one byte
/// more, so that a read that fills it is known to be truncated.
pub const READ_BUF_LEN: usize = VNET_HDR_LEN + (1 << 16) + 1;
/// Packets gathered before GRO runs over them and they are written.
pub const GRO_BATCH: usize = 64;

const GSO_NONE: u8 = 0;
const F_NEEDS_CSUM: u8 = 1;
const GSO_ECN: u8 = 0x80;
/// A super-packet split into more packets than this is refused (64 KiB of payload in
/// segments of TCP's smallest MSS the kernel sends, 48 bytes, is 1,366).
const MAX_SEGMENTS: usize = 2048;
/// Written over a GRO slot's header before GRO runs; GRO writes a real header (whose
/// flags are 0 or `NEEDS_CSUM`) into exactly the slots to be written, so those still
/// carrying the mark were merged into another. (tun-rs's `GROTable` keeps its list of
/// slots to write crate-private.)
const UNWRITTEN: u8 = 0xff;

/// Why a read from the TUN or a burst for it was dropped.
#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    #[error("read of {0} bytes: no room for the virtio-net header and a packet")]
    Short(usize),
    #[error("a packet larger than the read buffer (truncated)")]
    Truncated,
    #[error("not an IPv4 or IPv6 packet")]
    NotIp,
    #[error("unsupported GSO type {0:#x}")]
    GsoType(u8),
    #[error("checksum start {start} + offset {offset} outside a {len}-byte packet")]
    Checksum { start: u16, offset: u16, len: usize },
    #[error("{len}-byte packet over the lease MTU {mtu}")]
    OverMtu { len: usize, mtu: usize },
    #[error("transport header does not fit the packet")]
    Header,
    #[error("a super-packet of {0} segments")]
    TooManySegments(usize),
    #[error("GSO split refused: {0}")]
    Split(std::io::Error),
    #[error("GRO refused the burst: {0}")]
    Gro(std::io::Error),
}

/// What the last [`Splitter::split`] produced.
#[derive(Debug, Clone, Copy)]
enum Parsed {
    None,
    /// One packet, in place in the read buffer after the header.
    Single(usize),
    /// This many packets in the segment buffers.
    Segments(usize),
}

/// Counters of the read side (logged when the session ends).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SplitStats {
    /// Reads that were GSO super-packets.
    pub super_packets: u64,
    /// Packets those were split into.
    pub segments: u64,
    /// Reads dropped as malformed.
    pub dropped: u64,
}

/// TUN → tunnel: reads with a virtio-net header, split into MTU-sized packets.
#[derive(Debug)]
pub struct Splitter {
    read_buf: Vec<u8>,
    /// Each `mtu` bytes long; grown in number when a super-packet needs more.
    segments: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    mtu: usize,
    parsed: Parsed,
    pub stats: SplitStats,
}

impl Splitter {
    pub fn new(mtu: u16) -> Self {
        let mtu = usize::from(mtu);
        Self {
            read_buf: vec![0u8; READ_BUF_LEN],
            segments: vec![vec![0u8; mtu]; segments_for(mtu)],
            sizes: vec![0; segments_for(mtu)],
            mtu,
            parsed: Parsed::None,
            stats: SplitStats::default(),
        }
    }

    /// The lease MTU changed (CONFIG_DELTA): segments follow it.
    pub fn set_mtu(&mut self, mtu: u16) {
        let mtu = usize::from(mtu);
        if mtu == self.mtu {
            return;
        }
        self.mtu = mtu;
        // As many as a full super-packet needs at the new MTU (more are added on
        // demand): a larger MTU must not multiply the memory of small-MTU buffers.
        let count = segments_for(mtu);
        self.segments.truncate(count);
        self.sizes.truncate(count);
        for s in &mut self.segments {
            s.resize(mtu, 0);
        }
        self.parsed = Parsed::None;
    }

    /// Where the next `read` of the TUN goes.
    pub fn read_buf(&mut self) -> &mut [u8] {
        &mut self.read_buf
    }

    /// Turns the `n` bytes just read into [`Splitter::packets`]. An error is a dropped
    /// read (counted in `stats.dropped`).
    pub fn split(&mut self, n: usize) -> Result<(), OffloadError> {
        self.parsed = Parsed::None;
        let r = self.split_inner(n);
        match r {
            Ok(p) => {
                if let Parsed::Segments(k) = p {
                    self.stats.super_packets += 1;
                    self.stats.segments += k as u64;
                }
                self.parsed = p;
                Ok(())
            }
            Err(e) => {
                self.stats.dropped += 1;
                Err(e)
            }
        }
    }

    fn split_inner(&mut self, n: usize) -> Result<Parsed, OffloadError> {
        let mtu = self.mtu;
        if n >= READ_BUF_LEN {
            return Err(OffloadError::Truncated);
        }
        let read = self
            .read_buf
            .get_mut(..n)
            .filter(|r| r.len() > VNET_HDR_LEN)
            .ok_or(OffloadError::Short(n))?;
        let (head, packet) = read.split_at_mut(VNET_HDR_LEN);
        let mut hdr = VirtioNetHdr::decode(head).map_err(|_| OffloadError::Short(n))?;
        let is_v6 = match packet.first().map(|b| b >> 4) {
            Some(4) => false,
            Some(6) => true,
            _ => return Err(OffloadError::NotIp),
        };
        if hdr.gso_type == GSO_NONE {
            if hdr.flags & F_NEEDS_CSUM != 0 {
                complete_checksum(packet, hdr.csum_start, hdr.csum_offset)?;
            }
            if packet.len() > mtu {
                return Err(OffloadError::OverMtu {
                    len: packet.len(),
                    mtu,
                });
            }
            return Ok(Parsed::Single(packet.len()));
        }
        // The kernel's hdr_len may be the whole linear part of the skb rather than the
        // headers (on its forward path): the headers' length comes from the packet
        // (as wireguard-go and tun-rs do).
        let start = usize::from(hdr.csum_start);
        let tcp = match hdr.gso_type & !GSO_ECN {
            VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_TCPV6 => true,
            VIRTIO_NET_HDR_GSO_UDP_L4 => false,
            _ => return Err(OffloadError::GsoType(hdr.gso_type)),
        };
        let l4_len = if tcp {
            let off = packet.get(start + 12).ok_or(OffloadError::Header)?;
            usize::from(off >> 4) * 4
        } else {
            8
        };
        if tcp && !(20..=60).contains(&l4_len) {
            return Err(OffloadError::Header);
        }
        let hdr_len = start + l4_len;
        if hdr_len >= packet.len() || hdr_len >= mtu {
            return Err(OffloadError::Header);
        }
        hdr.hdr_len = u16::try_from(hdr_len).map_err(|_| OffloadError::Header)?;
        let room = mtu - hdr_len;
        if usize::from(hdr.gso_size) > room {
            if !tcp {
                // UDP segments are the application's datagrams: not ours to re-cut.
                return Err(OffloadError::OverMtu {
                    len: hdr_len + usize::from(hdr.gso_size),
                    mtu,
                });
            }
            // A TCP stream may be cut anywhere: segments the lease MTU (which may have
            // shrunk since the connection chose its MSS) still carries.
            hdr.gso_size = u16::try_from(room).map_err(|_| OffloadError::Header)?;
        }
        let gso = usize::from(hdr.gso_size);
        if gso == 0 {
            return Err(OffloadError::Header);
        }
        let need = (packet.len() - hdr_len).div_ceil(gso);
        if need > MAX_SEGMENTS {
            return Err(OffloadError::TooManySegments(need));
        }
        if need > self.segments.len() {
            // A new largest split (small segments): grown once, kept.
            self.segments.resize(need, vec![0u8; mtu]);
            self.sizes.resize(need, 0);
        }
        let outs = self.segments.get_mut(..need).ok_or(OffloadError::Header)?;
        let sizes = self.sizes.get_mut(..need).ok_or(OffloadError::Header)?;
        let k =
            tun_rs::gso_split(packet, hdr, outs, sizes, 0, is_v6).map_err(OffloadError::Split)?;
        Ok(Parsed::Segments(k))
    }

    /// The packets of the last successful [`Splitter::split`], each at most the MTU.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        let (single, count) = match self.parsed {
            Parsed::None => (None, 0),
            Parsed::Single(len) => (self.read_buf.get(VNET_HDR_LEN..VNET_HDR_LEN + len), 0),
            Parsed::Segments(k) => (None, k),
        };
        let segments = self
            .segments
            .iter()
            .zip(&self.sizes)
            .take(count)
            .filter_map(|(s, &len)| s.get(..len));
        single.into_iter().chain(segments)
    }
}

/// Segment buffers a full super-packet needs at `mtu` (~48 at 1,400): more are added if
/// the kernel sends smaller segments.
fn segments_for(mtu: usize) -> usize {
    MAX_SUPER_PACKET / mtu.max(1) + 1
}

/// Completes a checksum the kernel left partial (`NEEDS_CSUM`, `CHECKSUM_PARTIAL`): the
/// field holds the pseudo-header sum; the sum from `start` to the end goes on top.
/// A result of 0 is sent as 0xffff, as the kernel does (`skb_checksum_help`): the same
/// value for TCP, and "no checksum" is not what a UDP sender asked for.
fn complete_checksum(packet: &mut [u8], start: u16, offset: u16) -> Result<(), OffloadError> {
    let len = packet.len();
    let bad = || OffloadError::Checksum { start, offset, len };
    let at = usize::from(start) + usize::from(offset);
    let field = packet.get(at..at + 2).ok_or_else(bad)?;
    let initial = u16::from_be_bytes([field[0], field[1]]);
    if let Some(f) = packet.get_mut(at..at + 2) {
        f.fill(0);
    }
    let covered = packet.get(usize::from(start)..).ok_or_else(bad)?;
    let sum = !tun_rs::checksum(covered, u64::from(initial));
    let sum = if sum == 0 { 0xffff } else { sum };
    if let Some(f) = packet.get_mut(at..at + 2) {
        f.copy_from_slice(&sum.to_be_bytes());
    }
    Ok(())
}

/// Counters of the write side (logged when the session ends).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GroStats {
    /// Packets handed to [`Coalescer::push`].
    pub packets: u64,
    /// Writes to the TUN.
    pub writes: u64,
    /// Of those, super-packets (two or more packets merged).
    pub coalesced: u64,
    /// Packets dropped because GRO refused their burst.
    pub dropped: u64,
}

/// Tunnel → TUN: a burst of packets, coalesced, each result written with its header.
pub struct Coalescer {
    /// Each: `VNET_HDR_LEN` bytes of header room, then one packet; GRO appends the
    /// payload of merged segments to the first (capacity reserved up front).
    bufs: Vec<Vec<u8>>,
    len: usize,
    gro: GROTable,
    pub stats: GroStats,
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("len", &self.len)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Default for Coalescer {
    fn default() -> Self {
        Self::new()
    }
}

impl Coalescer {
    pub fn new() -> Self {
        Self {
            // GRO coalesces into a slot only while its capacity allows (2 headers'
            // room + the result): a full super-packet each. Pages are touched only
            // as far as bursts fill them.
            bufs: (0..GRO_BATCH)
                .map(|_| Vec::with_capacity(2 * VNET_HDR_LEN + MAX_SUPER_PACKET))
                .collect(),
            len: 0,
            gro: GROTable::new(),
            stats: GroStats::default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len >= self.bufs.len()
    }

    /// Copies one packet into the burst. `false` when the burst is full (flush first)
    /// or the packet is empty (GRO would refuse the whole burst for it) or longer than
    /// a TUN packet can be.
    pub fn push(&mut self, packet: &[u8]) -> bool {
        if packet.is_empty() || packet.len() > MAX_SUPER_PACKET {
            return false;
        }
        let Some(b) = self.bufs.get_mut(self.len) else {
            return false;
        };
        b.clear();
        b.resize(VNET_HDR_LEN, 0);
        b.extend_from_slice(packet);
        self.len += 1;
        self.stats.packets += 1;
        true
    }

    /// Runs GRO over the burst and hands each buffer to write (header included) to
    /// `write`, in order; the burst is empty afterwards. On an error nothing was handed
    /// on and the burst's packets are counted as dropped.
    pub fn flush(&mut self, mut write: impl FnMut(&[u8])) -> Result<(), OffloadError> {
        let n = std::mem::take(&mut self.len);
        if n == 0 {
            return Ok(());
        }
        let bufs = self.bufs.get_mut(..n).unwrap_or_default();
        for b in bufs.iter_mut() {
            if let Some(flags) = b.first_mut() {
                *flags = UNWRITTEN;
            }
        }
        // UDP GRO off: the write side needs to know the TUN took USO, which only the
        // helper knows; UDP packets go out one per write as before.
        if let Err(e) = self.gro.apply_gro(bufs, VNET_HDR_LEN, false) {
            self.stats.dropped += n as u64;
            return Err(OffloadError::Gro(e));
        }
        for b in bufs.iter() {
            match b.first() {
                Some(&UNWRITTEN) | None => continue,
                Some(_) => {}
            }
            self.stats.writes += 1;
            if b.get(1).is_some_and(|&t| t != GSO_NONE) {
                self.stats.coalesced += 1;
            }
            write(b);
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "tun_offload_tests.rs"]
mod tests;
