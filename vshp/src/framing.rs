//! Stream framing: on TCP and the USB accessory, each record is preceded by its length
//! as a u16 (big-endian). A u16 cannot exceed [`MAX_RECORD_LEN`], so the bound holds by
//! construction; the decoder owns one fixed buffer of a few framed records
//! ([`DECODER_BUFFER`]) and never allocates after creation, however the byte stream is
//! split. The buffer holds several records so one `read` can fetch many of them, and it
//! moves an incomplete record to the front only when the room behind it could not
//! hold a whole one (bulk transfers: few reads, almost no copying).

use crate::record::MAX_RECORD_LEN;

/// Length of the stream length prefix.
pub const LENGTH_PREFIX_LEN: usize = 2;
/// One whole framed record: the most a record needs buffered.
pub const DECODER_CAPACITY: usize = LENGTH_PREFIX_LEN + MAX_RECORD_LEN;
/// The decoder's buffer: four whole framed records (256 KiB).
pub const DECODER_BUFFER: usize = 4 * DECODER_CAPACITY;

/// Why a stream can no longer be read. Every variant is fatal for the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("zero-length record on the stream")]
    ZeroLength,
    #[error("record of {0} bytes cannot be framed (at most {MAX_RECORD_LEN})")]
    TooLong(usize),
    #[error("the stream already failed")]
    Failed,
}

/// The two prefix bytes for a record of `len` bytes.
pub fn length_prefix(len: usize) -> Result<[u8; LENGTH_PREFIX_LEN], FramingError> {
    match u16::try_from(len) {
        Ok(0) => Err(FramingError::ZeroLength),
        Ok(n) => Ok(n.to_be_bytes()),
        Err(_) => Err(FramingError::TooLong(len)),
    }
}

/// Splits a byte stream into records.
///
/// Feed it with [`push`](Self::push), or read straight into [`spare`](Self::spare) and
/// [`commit`](Self::commit); take records with [`next_record`](Self::next_record).
#[derive(Debug)]
pub struct StreamDecoder {
    buf: Box<[u8]>,
    /// Start of unread bytes.
    start: usize,
    /// End of buffered bytes.
    end: usize,
    failed: bool,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self {
            buf: vec![0u8; DECODER_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            failed: false,
        }
    }

    /// Bytes buffered but not yet returned as records.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Free space to read the stream into. When the room behind the buffered bytes
    /// could not hold a whole framed record, the unread bytes (less than one record,
    /// once every complete record was taken) move to the front first, so the space is
    /// never empty while a record is incomplete.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < DECODER_CAPACITY && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        self.buf.get_mut(self.end..).unwrap_or_default()
    }

    /// Marks `n` bytes of [`spare`](Self::spare) as filled. Larger `n` are clamped.
    pub fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Copies as much of `data` as fits and returns how many bytes it took; call
    /// [`next_record`](Self::next_record) until it yields `None`, then push the rest.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let spare = self.spare();
        let n = spare.len().min(data.len());
        spare[..n].copy_from_slice(&data[..n]);
        self.commit(n);
        n
    }

    /// The next complete record, or `None` until more bytes arrive.
    pub fn next_record(&mut self) -> Result<Option<&[u8]>, FramingError> {
        Ok(self.next_record_mut()?.map(|r| &*r))
    }

    /// [`next_record`](Self::next_record), mutable: the record can be opened in place
    /// inside the decoder's buffer (no copy). Its bytes are the caller's until the next
    /// call on the decoder.
    pub fn next_record_mut(&mut self) -> Result<Option<&mut [u8]>, FramingError> {
        if self.failed {
            return Err(FramingError::Failed);
        }
        let pending = &self.buf[self.start..self.end];
        let Some((prefix, rest)) = pending.split_first_chunk::<LENGTH_PREFIX_LEN>() else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes(*prefix));
        if len == 0 {
            self.failed = true;
            return Err(FramingError::ZeroLength);
        }
        if rest.len() < len {
            return Ok(None);
        }
        let from = self.start + LENGTH_PREFIX_LEN;
        self.start = from + len;
        Ok(self.buf.get_mut(from..from + len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(records: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            out.extend_from_slice(&length_prefix(r.len()).unwrap());
            out.extend_from_slice(r);
        }
        out
    }

    fn drain(d: &mut StreamDecoder, out: &mut Vec<Vec<u8>>) {
        while let Some(r) = d.next_record().unwrap() {
            out.push(r.to_vec());
        }
    }

    #[test]
    fn split_at_every_boundary_yields_the_same_records() {
        let big = vec![0x5A; MAX_RECORD_LEN];
        let records: Vec<&[u8]> = vec![b"a", b"hello world", &big, b"xy"];
        let stream = framed(&records);
        for cut in 0..=stream.len() {
            let mut d = StreamDecoder::new();
            let mut got = Vec::new();
            for part in [&stream[..cut], &stream[cut..]] {
                let mut rest = part;
                while !rest.is_empty() {
                    let n = d.push(rest);
                    rest = &rest[n..];
                    drain(&mut d, &mut got);
                }
            }
            assert_eq!(got.len(), records.len(), "cut at {cut}");
            assert!(
                got.iter().zip(&records).all(|(a, b)| a == b),
                "cut at {cut}"
            );
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn byte_by_byte_yields_the_same_records() {
        let records: Vec<&[u8]> = vec![b"one", b"two!", &[7u8; 300]];
        let stream = framed(&records);
        let mut d = StreamDecoder::new();
        let mut got = Vec::new();
        for b in &stream {
            assert_eq!(d.push(std::slice::from_ref(b)), 1);
            drain(&mut d, &mut got);
        }
        assert_eq!(got, records.iter().map(|r| r.to_vec()).collect::<Vec<_>>());
    }

    #[test]
    fn zero_length_poisons_the_stream() {
        let mut d = StreamDecoder::new();
        d.push(&[0, 0, 1, 2]);
        assert_eq!(d.next_record(), Err(FramingError::ZeroLength));
        assert_eq!(d.next_record(), Err(FramingError::Failed));
    }

    #[test]
    fn prefix_bounds() {
        assert_eq!(length_prefix(0), Err(FramingError::ZeroLength));
        assert_eq!(length_prefix(MAX_RECORD_LEN), Ok([0xFF, 0xFF]));
        assert_eq!(
            length_prefix(MAX_RECORD_LEN + 1),
            Err(FramingError::TooLong(MAX_RECORD_LEN + 1))
        );
    }

    #[test]
    fn many_records_per_read_and_in_place_access() {
        // Full-size records back to back, read in chunks that do not line up with
        // them: every record comes out whole, mutable, and the buffer never runs dry.
        let big: Vec<Vec<u8>> = (0u8..9).map(|i| vec![i; MAX_RECORD_LEN - 7]).collect();
        let refs: Vec<&[u8]> = big.iter().map(Vec::as_slice).collect();
        let stream = framed(&refs);
        let mut d = StreamDecoder::new();
        let mut at = 0;
        let mut got = 0u8;
        while at < stream.len() {
            let spare = d.spare();
            assert!(!spare.is_empty());
            let n = spare.len().min(100_003).min(stream.len() - at);
            spare[..n].copy_from_slice(&stream[at..at + n]);
            d.commit(n);
            at += n;
            while let Some(r) = d.next_record_mut().unwrap() {
                assert_eq!(r.len(), MAX_RECORD_LEN - 7);
                assert!(r.iter().all(|&b| b == got));
                r[0] = 0xEE; // opened in place
                got += 1;
            }
        }
        assert_eq!(got, 9);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn spare_and_commit_read_path() {
        let stream = framed(&[b"abc", b"defgh"]);
        let mut d = StreamDecoder::new();
        let spare = d.spare();
        spare[..stream.len()].copy_from_slice(&stream);
        d.commit(stream.len());
        assert_eq!(d.next_record().unwrap(), Some(&b"abc"[..]));
        assert_eq!(d.next_record().unwrap(), Some(&b"defgh"[..]));
        assert_eq!(d.next_record().unwrap(), None);
    }
}
