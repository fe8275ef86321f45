//! The packet batch of the data path: one reusable byte buffer plus an end-offset table.
//!
//! Wire form: exactly postcard's encoding of
//! `struct PacketBatch { lease: LeaseId, lens: Vec<u16>, data: serde_bytes }`:
//!
//! ```text
//! varint u64   lease id
//! varint usize packet count n          (≤ MAX_BATCH_PACKETS)
//! n × varint u16  packet lengths       (each ≥ 1)
//! varint usize byte count m            (= sum of lengths, ≤ MAX_BATCH_BYTES)
//! m bytes      the packets, back to back
//! ```
//!
//! Encoding goes through serde (postcard writes `data` with one copy). Decoding has a
//! hand-written fast path, [`PacketBatch::decode_from`], because serde can only build a
//! new value: the fast path refills a batch the caller keeps, so the steady state
//! allocates nothing however many packets flow. The serde `Deserialize` impl stays as
//! the reference; the fuzz target `netstack_from_worker` checks both agree byte for byte.

use std::fmt;

use serde::ser::{SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vshp::lease::LeaseId;

use crate::bounded::{BoundedBytes, BoundedVec};
use crate::limits::{MAX_BATCH_BYTES, MAX_BATCH_PACKETS, MAX_PACKET_LEN};

/// Why a batch is refused, when building it or when decoding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum BatchError {
    #[error("batch already holds the maximum of {MAX_BATCH_PACKETS} packets")]
    TooManyPackets,
    #[error("batch would exceed {MAX_BATCH_BYTES} packet bytes")]
    TooManyBytes,
    #[error("empty packet")]
    EmptyPacket,
    #[error("packet of {0} bytes exceeds {MAX_PACKET_LEN}")]
    PacketTooLong(usize),
    #[error("batch encoding ends early")]
    Truncated,
    #[error("batch encoding has a malformed varint")]
    BadVarint,
    #[error("packet lengths add up to {sum} but the batch carries {carried} bytes")]
    LengthMismatch { sum: usize, carried: usize },
    #[error("{0} bytes left over after the batch")]
    TrailingBytes(usize),
}

/// Validated IP packets of one peer, tagged with the peer's lease.
#[derive(Clone, PartialEq, Eq)]
pub struct PacketBatch {
    lease: LeaseId,
    /// `ends[i]` is the offset just past packet `i` in `data`.
    ends: Vec<u32>,
    data: Vec<u8>,
}

impl fmt::Debug for PacketBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PacketBatch")
            .field("lease", &self.lease)
            .field("packets", &self.ends.len())
            .field("bytes", &self.data.len())
            .finish()
    }
}

impl PacketBatch {
    /// An empty batch with room for a full batch, so filling it never reallocates.
    pub fn new(lease: LeaseId) -> Self {
        Self {
            lease,
            ends: Vec::with_capacity(MAX_BATCH_PACKETS),
            data: Vec::with_capacity(MAX_BATCH_BYTES),
        }
    }

    /// An empty batch with room for `packets` packets of `bytes` bytes in total.
    pub fn with_capacity(lease: LeaseId, packets: usize, bytes: usize) -> Self {
        Self {
            lease,
            ends: Vec::with_capacity(packets.min(MAX_BATCH_PACKETS)),
            data: Vec::with_capacity(bytes.min(MAX_BATCH_BYTES)),
        }
    }

    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    pub fn set_lease(&mut self, lease: LeaseId) {
        self.lease = lease;
    }

    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.ends.clear();
        self.data.clear();
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Sum of the packet lengths.
    pub fn total_bytes(&self) -> usize {
        self.data.len()
    }

    /// Appends one packet, refusing what would break the batch's bounds.
    pub fn push(&mut self, packet: &[u8]) -> Result<(), BatchError> {
        if packet.is_empty() {
            return Err(BatchError::EmptyPacket);
        }
        if packet.len() > MAX_PACKET_LEN {
            return Err(BatchError::PacketTooLong(packet.len()));
        }
        if self.ends.len() >= MAX_BATCH_PACKETS {
            return Err(BatchError::TooManyPackets);
        }
        let end = self.data.len().saturating_add(packet.len());
        if end > MAX_BATCH_BYTES {
            return Err(BatchError::TooManyBytes);
        }
        let end32 = u32::try_from(end).map_err(|_| BatchError::TooManyBytes)?;
        self.data.extend_from_slice(packet);
        self.ends.push(end32);
        Ok(())
    }

    /// Packet `i`, if there is one.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let end = *self.ends.get(i)? as usize;
        let start = match i.checked_sub(1) {
            Some(prev) => *self.ends.get(prev)? as usize,
            None => 0,
        };
        self.data.get(start..end)
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        (0..self.ends.len()).filter_map(move |i| self.get(i))
    }

    fn lens(&self) -> impl Iterator<Item = u16> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        // Every length was checked to fit in u16 by `push` or `decode_from`.
        starts
            .zip(self.ends.iter().copied())
            .map(|(s, e)| u16::try_from(e.saturating_sub(s)).unwrap_or(u16::MAX))
    }

    /// Refills this batch from its wire form (see the module docs), which must fill
    /// `bytes` exactly. Reuses the batch's buffers; on error the batch is left empty.
    pub fn decode_from(&mut self, bytes: &[u8]) -> Result<(), BatchError> {
        self.clear();
        let r = self.decode_inner(bytes);
        if r.is_err() {
            self.clear();
        }
        r
    }

    fn decode_inner(&mut self, bytes: &[u8]) -> Result<(), BatchError> {
        let mut cur = Cursor { bytes };
        self.lease = LeaseId(cur.varint_u64()?);
        let count = cur.varint_usize()?;
        if count > MAX_BATCH_PACKETS {
            return Err(BatchError::TooManyPackets);
        }
        let mut end: usize = 0;
        for _ in 0..count {
            let len = cur.varint_u16()?;
            if len == 0 {
                return Err(BatchError::EmptyPacket);
            }
            end = end.saturating_add(usize::from(len));
            // Bounded by MAX_BATCH_PACKETS × u16::MAX, far below u32::MAX.
            self.ends
                .push(u32::try_from(end).map_err(|_| BatchError::TooManyBytes)?);
        }
        let carried = cur.varint_usize()?;
        if carried > MAX_BATCH_BYTES {
            return Err(BatchError::TooManyBytes);
        }
        let data = cur.take(carried)?;
        if end != carried {
            return Err(BatchError::LengthMismatch { sum: end, carried });
        }
        if !cur.bytes.is_empty() {
            return Err(BatchError::TrailingBytes(cur.bytes.len()));
        }
        self.data.extend_from_slice(data);
        Ok(())
    }
}

/// postcard's varint rules, mirrored exactly: little-endian base-128, at most
/// ⌈bits/7⌉ bytes, and the last allowed byte may only use the bits that remain.
struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> Result<u8, BatchError> {
        let (&b, rest) = self.bytes.split_first().ok_or(BatchError::Truncated)?;
        self.bytes = rest;
        Ok(b)
    }

    fn varint(&mut self, bits: u32) -> Result<u64, BatchError> {
        let max_bytes = bits.div_ceil(7);
        let last_max: u8 = (1u8 << (bits % 7)).wrapping_sub(1);
        let mut out: u64 = 0;
        for i in 0..max_bytes {
            let b = self.byte()?;
            out |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if i == max_bytes - 1 && b > last_max {
                    return Err(BatchError::BadVarint);
                }
                return Ok(out);
            }
        }
        Err(BatchError::BadVarint)
    }

    fn varint_u16(&mut self) -> Result<u16, BatchError> {
        u16::try_from(self.varint(16)?).map_err(|_| BatchError::BadVarint)
    }

    fn varint_u64(&mut self) -> Result<u64, BatchError> {
        self.varint(64)
    }

    fn varint_usize(&mut self) -> Result<usize, BatchError> {
        usize::try_from(self.varint(usize::BITS)?).map_err(|_| BatchError::BadVarint)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], BatchError> {
        if n > self.bytes.len() {
            return Err(BatchError::Truncated);
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
}

/// Reads a postcard `u32` varint at the start of `bytes` (an enum tag), returning it and
/// the rest.
pub(crate) fn split_tag(bytes: &[u8]) -> Result<(u32, &[u8]), BatchError> {
    let mut cur = Cursor { bytes };
    let tag = u32::try_from(cur.varint(32)?).map_err(|_| BatchError::BadVarint)?;
    Ok((tag, cur.bytes))
}

struct Lens<'a>(&'a PacketBatch);

impl Serialize for Lens<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.lens())
    }
}

struct Data<'a>(&'a [u8]);

impl Serialize for Data<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

impl Serialize for PacketBatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("PacketBatch", 3)?;
        st.serialize_field("lease", &self.lease)?;
        st.serialize_field("lens", &Lens(self))?;
        st.serialize_field("data", &Data(&self.data))?;
        st.end()
    }
}

/// The reference decoder's shape: the same fields, bounded while decoding.
#[derive(Deserialize)]
#[serde(rename = "PacketBatch")]
struct Wire {
    lease: LeaseId,
    lens: BoundedVec<u16, MAX_BATCH_PACKETS>,
    data: BoundedBytes<MAX_BATCH_BYTES>,
}

impl<'de> Deserialize<'de> for PacketBatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = Wire::deserialize(d)?;
        let mut batch =
            PacketBatch::with_capacity(w.lease, w.lens.as_slice().len(), w.data.as_slice().len());
        let mut at = 0usize;
        for &len in w.lens.as_slice() {
            let next = at.saturating_add(usize::from(len));
            let packet = w.data.as_slice().get(at..next).ok_or_else(|| {
                serde::de::Error::custom(BatchError::LengthMismatch {
                    sum: next,
                    carried: w.data.as_slice().len(),
                })
            })?;
            batch.push(packet).map_err(serde::de::Error::custom)?;
            at = next;
        }
        if at != w.data.as_slice().len() {
            return Err(serde::de::Error::custom(BatchError::LengthMismatch {
                sum: at,
                carried: w.data.as_slice().len(),
            }));
        }
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(sizes: &[usize]) -> PacketBatch {
        let mut b = PacketBatch::new(LeaseId(9));
        for (i, &n) in sizes.iter().enumerate() {
            b.push(&vec![i as u8; n]).unwrap();
        }
        b
    }

    #[test]
    fn fast_path_matches_serde() {
        let b = batch(&[1, 1400, 127, 128, 65535, 20]);
        let wire = postcard::to_stdvec(&b).unwrap();
        let mut fast = PacketBatch::new(LeaseId(0));
        fast.decode_from(&wire).unwrap();
        assert_eq!(fast, b);
        let reference: PacketBatch = postcard::from_bytes(&wire).unwrap();
        assert_eq!(reference, b);
        assert_eq!(fast.get(1).unwrap(), &[1u8; 1400][..]);
        assert_eq!(fast.iter().count(), 6);
        assert_eq!(fast.get(6), None);
    }

    #[test]
    fn push_bounds() {
        let mut b = PacketBatch::new(LeaseId(1));
        assert_eq!(b.push(&[]), Err(BatchError::EmptyPacket));
        assert_eq!(
            b.push(&vec![0; MAX_PACKET_LEN + 1]),
            Err(BatchError::PacketTooLong(MAX_PACKET_LEN + 1))
        );
        for _ in 0..MAX_BATCH_PACKETS {
            b.push(&[0]).unwrap();
        }
        assert_eq!(b.push(&[0]), Err(BatchError::TooManyPackets));
        let mut b = PacketBatch::new(LeaseId(1));
        for _ in 0..4 {
            b.push(&vec![0; MAX_PACKET_LEN]).unwrap();
        }
        b.push(&[0; MAX_BATCH_BYTES - 4 * MAX_PACKET_LEN]).unwrap();
        assert_eq!(b.total_bytes(), MAX_BATCH_BYTES);
        assert_eq!(b.push(&[0]), Err(BatchError::TooManyBytes));
    }

    #[test]
    fn decode_refuses_bad_batches() {
        let mut b = PacketBatch::new(LeaseId(0));
        // lease 1, 1 packet of 2 bytes, but 3 bytes carried
        assert_eq!(
            b.decode_from(&[1, 1, 2, 3, 0, 0, 0]),
            Err(BatchError::LengthMismatch { sum: 2, carried: 3 })
        );
        assert!(b.is_empty());
        assert_eq!(b.decode_from(&[1, 1, 0, 0]), Err(BatchError::EmptyPacket));
        assert_eq!(b.decode_from(&[1, 1, 2, 2, 0]), Err(BatchError::Truncated));
        assert_eq!(
            b.decode_from(&[1, 1, 2, 2, 0, 0, 9]),
            Err(BatchError::TrailingBytes(1))
        );
        // A u16 varint whose third byte carries more than two bits.
        assert_eq!(
            b.decode_from(&[1, 1, 0xff, 0xff, 0x04]),
            Err(BatchError::BadVarint)
        );
        // 2^32 packets claimed: refused before reading them.
        assert_eq!(
            b.decode_from(&[1, 0xff, 0xff, 0xff, 0xff, 0x0f]),
            Err(BatchError::TooManyPackets)
        );
        b.decode_from(&[1, 1, 2, 2, 0xaa, 0xbb]).unwrap();
        assert_eq!(b.get(0), Some(&[0xaa, 0xbb][..]));
    }

    #[test]
    fn full_batch_fits_the_data_frame() {
        let mut b = PacketBatch::new(LeaseId(u64::MAX));
        let per = MAX_BATCH_BYTES / MAX_BATCH_PACKETS;
        for _ in 0..MAX_BATCH_PACKETS {
            b.push(&vec![0; per]).unwrap();
        }
        let msg = crate::messages::data::DataMsgRef::Packets(&b);
        let wire = postcard::to_stdvec(&msg).unwrap();
        assert!(wire.len() < crate::limits::MAX_FRAME_DATA);
    }
}
