//! The smoltcp device of one lease: an inbound queue (client → netstack) and an
//! outbound queue (netstack → client) of pooled buffers, both bounded in bytes.

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant as SmolInstant;
use std::collections::VecDeque;

/// Most spare buffers kept per pool.
const MAX_POOLED: usize = 256;

/// A pool of reusable packet buffers.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    free: Vec<Vec<u8>>,
}

impl Pool {
    pub fn take(&mut self) -> Vec<u8> {
        self.free.pop().unwrap_or_default()
    }
    pub fn give(&mut self, mut buf: Vec<u8>) {
        if self.free.len() < MAX_POOLED {
            buf.clear();
            self.free.push(buf);
        }
    }
}

/// A bounded FIFO of packets with byte accounting.
#[derive(Debug)]
pub(crate) struct Queue {
    packets: VecDeque<Vec<u8>>,
    bytes: usize,
    max_bytes: usize,
}

impl Queue {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            packets: VecDeque::new(),
            bytes: 0,
            max_bytes,
        }
    }
    pub fn has_room(&self, len: usize) -> bool {
        self.bytes.saturating_add(len) <= self.max_bytes
    }
    /// Queues `buf`; gives it back when the queue is full.
    pub fn push(&mut self, buf: Vec<u8>) -> Result<(), Vec<u8>> {
        if !self.has_room(buf.len()) {
            return Err(buf);
        }
        self.bytes += buf.len();
        self.packets.push_back(buf);
        Ok(())
    }
    pub fn pop(&mut self) -> Option<Vec<u8>> {
        let buf = self.packets.pop_front()?;
        self.bytes = self.bytes.saturating_sub(buf.len());
        Some(buf)
    }
    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }
    pub fn front_len(&self) -> Option<usize> {
        self.packets.front().map(Vec::len)
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.packets.len()
    }
}

/// One lease's packet plumbing.
#[derive(Debug)]
pub(crate) struct LeaseDevice {
    pub rx: Queue,
    pub tx: Queue,
    pub rx_pool: Pool,
    pub tx_pool: Pool,
    pub mtu: usize,
    /// Packets smoltcp produced (for counters).
    pub transmitted: u64,
}

impl LeaseDevice {
    pub fn new(mtu: usize, max_rx: usize, max_tx: usize) -> Self {
        Self {
            rx: Queue::new(max_rx),
            tx: Queue::new(max_tx),
            rx_pool: Pool::default(),
            tx_pool: Pool::default(),
            mtu,
            transmitted: 0,
        }
    }
}

pub(crate) struct RxToken<'a> {
    buf: Vec<u8>,
    pool: &'a mut Pool,
}

pub(crate) struct TxToken<'a> {
    tx: &'a mut Queue,
    pool: &'a mut Pool,
    transmitted: &'a mut u64,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let r = f(&self.buf);
        self.pool.give(self.buf);
        r
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut buf = self.pool.take();
        buf.resize(len, 0);
        let r = f(&mut buf);
        *self.transmitted += 1;
        if let Err(buf) = self.tx.push(buf) {
            // `transmit` checked for room; a full queue here only loses this packet,
            // which TCP retransmits.
            self.pool.give(buf);
        }
        r
    }
}

impl phy::Device for LeaseDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: SmolInstant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        if !self.tx.has_room(self.mtu) {
            return None;
        }
        let buf = self.rx.pop()?;
        Some((
            RxToken {
                buf,
                pool: &mut self.rx_pool,
            },
            TxToken {
                tx: &mut self.tx,
                pool: &mut self.tx_pool,
                transmitted: &mut self.transmitted,
            },
        ))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<TxToken<'_>> {
        if !self.tx.has_room(self.mtu) {
            return None;
        }
        Some(TxToken {
            tx: &mut self.tx,
            pool: &mut self.tx_pool,
            transmitted: &mut self.transmitted,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps.max_burst_size = None;
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_is_bounded_in_bytes() {
        let mut q = Queue::new(100);
        assert!(q.push(vec![0; 60]).is_ok());
        assert!(q.push(vec![0; 60]).is_err());
        assert!(q.push(vec![0; 40]).is_ok());
        assert_eq!((q.len(), q.bytes()), (2, 100));
        assert_eq!(q.pop().map(|b| b.len()), Some(60));
        assert_eq!(q.bytes(), 40);
    }

    #[test]
    fn pool_reuses_buffers() {
        let mut p = Pool::default();
        let mut b = p.take();
        b.extend_from_slice(&[1; 1500]);
        let cap = b.capacity();
        p.give(b);
        let b = p.take();
        assert!(b.is_empty());
        assert_eq!(b.capacity(), cap);
    }
}
