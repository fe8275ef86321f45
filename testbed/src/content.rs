//! The bytes the HTTP server serves: one deterministic pseudo-random stream
//! (xorshift64*, fixed seed). `/file` is its first `file_len` bytes, `/bytes/N` its
//! first N bytes, so any client can recompute what it should have received.

use sha2::{Digest as _, Sha256};

const SEED: u64 = 0x5650_4e53_6861_7265; // "VPNShare"

/// Generates the stream in order, any number of bytes at a time.
#[derive(Debug, Clone)]
pub struct ContentStream {
    state: u64,
    pending: [u8; 8],
    pending_len: usize,
}

impl Default for ContentStream {
    fn default() -> Self {
        Self::new()
    }
}

impl ContentStream {
    /// A stream positioned at byte 0.
    pub fn new() -> Self {
        Self {
            state: SEED,
            pending: [0; 8],
            pending_len: 0,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes()
    }

    /// Fills `buf` with the next `buf.len()` bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() && self.pending_len > 0 {
            buf[i] = self.pending[8 - self.pending_len];
            self.pending_len -= 1;
            i += 1;
        }
        let mut chunks = buf[i..].chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_word());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let word = self.next_word();
            let n = rest.len();
            rest.copy_from_slice(&word[..n]);
            self.pending = word;
            self.pending_len = 8 - n;
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
            let mut b = vec![0u8; n];
            s.fill(&mut b);
            pieces.extend_from_slice(&b);
        }
        assert_eq!(whole, pieces);
        let digest: [u8; 32] = Sha256::digest(&whole).into();
        assert_eq!(content_sha256(1000), digest);
    }
}
