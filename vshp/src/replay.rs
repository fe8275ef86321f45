//! RFC 6479 anti-replay window for datagram sessions.
//!
//! A ring of `BLOCKS` u64 bitmaps. Sliding the window forward clears whole blocks instead
//! of shifting bits, so an update costs O(1) amortised however far the counter jumps.
//! One block is always the "current" partially filled one, so the usable window is
//! `(BLOCKS - 1) * 64` counters behind the highest seen — the same construction as
//! WireGuard's (which uses 2048 bits, a 1984-counter window).
//!
//! The check is split in two: [`ReplayWindow::check`] runs before the AEAD (cheap
//! rejection, no state change) and [`ReplayWindow::commit`] after the tag verified, so a
//! forged record can never move the window.

/// Blocks in the ring (a power of two, so indices are masks).
pub const BLOCKS: usize = 64;
const BLOCK_BITS: u64 = 64;
/// Total bits in the bitmap.
pub const BITMAP_BITS: u64 = BLOCKS as u64 * BLOCK_BITS;
/// How far behind the highest accepted counter a record may be and still be accepted.
pub const WINDOW_SIZE: u64 = BITMAP_BITS - BLOCK_BITS;
// The protocol promises at least 2048 counters of reordering tolerance.
const _: () = assert!(WINDOW_SIZE >= 2048);

/// Why a counter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// Seen before.
    #[error("counter {0} was already received")]
    Replayed(u64),
    /// Behind the window: cannot tell whether it was seen.
    #[error("counter {0} is behind the replay window")]
    TooOld(u64),
}

/// The sliding window of one receive key.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// Highest accepted counter + 1; 0 = nothing accepted yet.
    next: u64,
    bitmap: [u64; BLOCKS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    pub fn new() -> Self {
        Self {
            next: 0,
            bitmap: [0; BLOCKS],
        }
    }

    /// One past the highest counter accepted so far.
    pub fn next_expected(&self) -> u64 {
        self.next
    }

    fn position(c1: u64) -> (usize, u64) {
        // c1 = counter + 1, as the window stores it (0 means "empty").
        let block = ((c1 / BLOCK_BITS) as usize) & (BLOCKS - 1);
        (block, 1u64 << (c1 % BLOCK_BITS))
    }

    /// Would `counter` be accepted? Does not change the window.
    pub fn check(&self, counter: u64) -> Result<(), ReplayError> {
        let Some(c1) = counter.checked_add(1) else {
            return Err(ReplayError::TooOld(counter));
        };
        if c1 > self.next {
            return Ok(());
        }
        if self.next - c1 >= WINDOW_SIZE {
            return Err(ReplayError::TooOld(counter));
        }
        let (block, bit) = Self::position(c1);
        if self.bitmap[block] & bit != 0 {
            Err(ReplayError::Replayed(counter))
        } else {
            Ok(())
        }
    }

    /// Marks `counter` as received; call only after the record authenticated.
    pub fn commit(&mut self, counter: u64) -> Result<(), ReplayError> {
        self.check(counter)?;
        let c1 = counter.saturating_add(1);
        if c1 > self.next {
            let cur_block = self.next / BLOCK_BITS;
            let new_block = c1 / BLOCK_BITS;
            // Clear every block the window slides over, at most the whole ring.
            let steps = (new_block - cur_block).min(BLOCKS as u64);
            for i in 1..=steps {
                let idx = ((cur_block + i) as usize) & (BLOCKS - 1);
                self.bitmap[idx] = 0;
            }
            self.next = c1;
        }
        let (block, bit) = Self::position(c1);
        self.bitmap[block] |= bit;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_and_duplicates() {
        let mut w = ReplayWindow::new();
        for c in 0..10_000 {
            assert_eq!(w.commit(c), Ok(()));
            assert_eq!(w.commit(c), Err(ReplayError::Replayed(c)));
        }
    }

    #[test]
    fn reordering_inside_the_window_is_accepted_once() {
        let mut w = ReplayWindow::new();
        w.commit(5000).unwrap();
        for c in (5000 - WINDOW_SIZE + 1..5000).rev() {
            assert_eq!(w.check(c), Ok(()), "{c}");
            w.commit(c).unwrap();
            assert_eq!(w.check(c), Err(ReplayError::Replayed(c)));
        }
        assert_eq!(
            w.check(5000 - WINDOW_SIZE),
            Err(ReplayError::TooOld(5000 - WINDOW_SIZE))
        );
        assert_eq!(w.check(0), Err(ReplayError::TooOld(0)));
    }

    #[test]
    fn big_jumps_clear_old_bits() {
        let mut w = ReplayWindow::new();
        for c in 0..100 {
            w.commit(c).unwrap();
        }
        w.commit(1_000_000).unwrap();
        // Everything older than the window is too old, everything inside but unseen is fine.
        assert_eq!(w.check(99), Err(ReplayError::TooOld(99)));
        assert_eq!(w.check(1_000_000 - 100), Ok(()));
        w.commit(1_000_000 + 64 * 3 + 5).unwrap();
        assert_eq!(w.check(1_000_000), Err(ReplayError::Replayed(1_000_000)));
        assert_eq!(w.check(1_000_001), Ok(()));
    }

    #[test]
    fn check_does_not_mutate_and_max_is_refused() {
        let w = ReplayWindow::new();
        assert_eq!(w.check(7), Ok(()));
        assert_eq!(w.next_expected(), 0);
        let mut w = ReplayWindow::new();
        assert_eq!(w.commit(u64::MAX), Err(ReplayError::TooOld(u64::MAX)));
        w.commit(u64::MAX - 1).unwrap();
        assert_eq!(
            w.check(u64::MAX - 1),
            Err(ReplayError::Replayed(u64::MAX - 1))
        );
    }

    /// Compare against a plain set model on a pseudo-random sequence.
    #[test]
    fn matches_a_reference_model() {
        let mut w = ReplayWindow::new();
        let mut seen = std::collections::HashSet::new();
        let mut highest: Option<u64> = None;
        let mut x: u64 = 0x1234_5678;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let base = highest.unwrap_or(0);
            let c = (base + 100).saturating_sub(x % (WINDOW_SIZE + 300));
            let expected = match highest {
                Some(h) if h >= c && h - c >= WINDOW_SIZE => Err(ReplayError::TooOld(c)),
                _ if seen.contains(&c) => Err(ReplayError::Replayed(c)),
                _ => Ok(()),
            };
            assert_eq!(w.commit(c), expected, "counter {c}, highest {highest:?}");
            if expected.is_ok() {
                seen.insert(c);
                highest = Some(highest.map_or(c, |h| h.max(c)));
            }
        }
    }
}
