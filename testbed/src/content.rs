//! The bytes the HTTP server serves: one deterministic stream, a block of
//! `BLOCK_LEN` pseudo-random bytes (xorshift64*, fixed seed) repeated. The block length
//! is prime, so the period lines up with no buffer or segment size. `/file` is the
//! stream's first `file_len` bytes, `/bytes/N` its first N bytes, so any client can
//! recompute what it should have received. Repeating a block keeps generating a
//! large file cheap in debug builds.

use std::sync::OnceLock;

use sha2::{Digest as _, Sha256};

const SEED: u64 = 0x5650_4e53_6861_7265; // "VPNShare"
/// The stream's period: the largest prime below 2^20.
pub const BLOCK_LEN: usize = 1_048_573;

fn block() -> &'static [u8] {
    static BLOCK: OnceLock<Vec<u8>> = OnceLock::new();
    BLOCK.get_or_init(|| {
        let mut state = SEED;
        let mut v = Vec::with_capacity(BLOCK_LEN + 8);
        while v.len() < BLOCK_LEN {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            v.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        v.truncate(BLOCK_LEN);
        v
    })
}

/// Generates the stream in order, any number of bytes at a time.
#[derive(Debug, Clone, Default)]
pub struct ContentStream {
    pos: usize,
}

impl ContentStream {
    /// A stream positioned at byte 0.
    pub fn new() -> Self {
        Self { pos: 0 }
    }

    /// Fills `buf` with the next `buf.len()` bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let block = block();
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(BLOCK_LEN - self.pos);
            buf[done..done + n].copy_from_slice(&block[self.pos..self.pos + n]);
            done += n;
            self.pos = (self.pos + n) % BLOCK_LEN;
        }
    }
}

/// The first `len` bytes of the stream.
pub fn content_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    ContentStream::new().fill(&mut v);
    v
}

/// sha256 of the first `len` bytes of the stream, without holding them in memory.
pub fn content_sha256(len: u64) -> [u8; 32] {
    let mut stream = ContentStream::new();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        let chunk = &mut buf[..n];
        stream.fill(chunk);
        hasher.update(&*chunk);
        left -= n as u64;
    }
    hasher.finalize().into()
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_is_the_same_whatever_the_chunking() {
        let whole = content_bytes(1000);
        let mut s = ContentStream::new();
        let mut pieces = Vec::new();
        for n in [1usize, 3, 8, 13, 0, 200, 775] {
            // (sums to 1000)
            let mut b = vec![0u8; n];
            s.fill(&mut b);
            pieces.extend_from_slice(&b);
        }
        assert_eq!(whole, pieces);
        let digest: [u8; 32] = Sha256::digest(&whole).into();
        assert_eq!(content_sha256(1000), digest);
    }

    #[test]
    fn stream_wraps_around_its_block() {
        let two = content_bytes(2 * BLOCK_LEN + 10);
        assert_eq!(two[..BLOCK_LEN], two[BLOCK_LEN..2 * BLOCK_LEN]);
        assert_eq!(two[..10], two[2 * BLOCK_LEN..]);
        assert_ne!(two[..4096], two[4096..8192]);
        let mut s = ContentStream::new();
        let mut a = vec![0u8; BLOCK_LEN - 3];
        let mut b = vec![0u8; 13];
        s.fill(&mut a);
        s.fill(&mut b);
        assert_eq!(b[..], two[BLOCK_LEN - 3..BLOCK_LEN + 10]);
    }
}
