//! The smoltcp devices of one lease: inbound queues (client → netstack; one per TCP
//! flow plus one for packets of no flow) and one outbound queue (netstack → client)
//! of pooled buffers, bounded in bytes per lease.

use smoltcp::phy::{self, Checksum, DeviceCapabilities, Medium};
use smoltcp::time::Instant as SmolInstant;
use std::collections::VecDeque;

/// Most spare buffers kept per pool.
const MAX_POOLED: usize = 256;
/// Most bytes of spare capacity kept per pool: with a large lease MTU (up to
/// 65,000) 256 spare buffers could pin 16 MiB; a pool never needs to hold more than
/// its queue's bound.
const MAX_POOLED_BYTES: usize = 2 * 1024 * 1024;

/// A pool of reusable packet buffers.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    free: Vec<Vec<u8>>,
    bytes: usize,
}

impl Pool {
    pub fn take(&mut self) -> Vec<u8> {
        match self.free.pop() {
            Some(b) => {
                self.bytes = self.bytes.saturating_sub(b.capacity());
                b
            }
            None => Vec::new(),
        }
    }
    pub fn give(&mut self, mut buf: Vec<u8>) {
        if self.free.len() < MAX_POOLED
            && self.bytes.saturating_add(buf.capacity()) <= MAX_POOLED_BYTES
        {
            buf.clear();
            self.bytes += buf.capacity();
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

/// One lease's packet plumbing: the outbound queue (towards the client, until the
/// caller drains it), the queue of packets that belong to no flow, the buffer pools,
/// and the bytes queued inbound over all of the lease's queues.
#[derive(Debug)]
pub(crate) struct LeaseQueues {
    pub stray_rx: Queue,
    pub tx: Queue,
    pub rx_pool: Pool,
    pub tx_pool: Pool,
    pub mtu: usize,
    /// Bytes waiting in `stray_rx` and in every flow's inbound queue.
    pub inbound_bytes: usize,
    pub max_inbound_bytes: usize,
}

impl LeaseQueues {
    pub fn new(mtu: usize, max_rx: usize, max_tx: usize) -> Self {
        Self {
            stray_rx: Queue::new(usize::MAX),
            tx: Queue::new(max_tx),
            rx_pool: Pool::default(),
            tx_pool: Pool::default(),
            mtu,
            inbound_bytes: 0,
            max_inbound_bytes: max_rx,
        }
    }

    /// Copies a client packet into `rx` (a flow's queue, or `None`: the stray queue),
    /// within the lease's inbound byte budget.
    pub fn push_inbound(&mut self, rx: Option<&mut Queue>, pkt: &[u8]) -> bool {
        if self.inbound_bytes.saturating_add(pkt.len()) > self.max_inbound_bytes {
            return false;
        }
        let mut buf = self.rx_pool.take();
        buf.extend_from_slice(pkt);
        let rx = match rx {
            Some(q) => q,
            None => &mut self.stray_rx,
        };
        match rx.push(buf) {
            Ok(()) => {
                self.inbound_bytes += pkt.len();
                true
            }
            Err(buf) => {
                self.rx_pool.give(buf);
                false
            }
        }
    }

    /// Gives back the buffers of a queue that is dropped (a forgotten flow).
    pub fn discard(&mut self, rx: &mut Queue) {
        while let Some(buf) = rx.pop() {
            self.inbound_bytes = self.inbound_bytes.saturating_sub(buf.len());
            self.rx_pool.give(buf);
        }
    }

    /// The smoltcp device over `rx` (a flow's inbound queue) and the lease's
    /// outbound queue.
    pub fn link<'a>(&'a mut self, rx: &'a mut Queue) -> Link<'a> {
        Link {
            rx,
            rx_pool: &mut self.rx_pool,
            tx: &mut self.tx,
            tx_pool: &mut self.tx_pool,
            inbound_bytes: &mut self.inbound_bytes,
            mtu: self.mtu,
        }
    }

    /// The smoltcp device over the stray queue (packets of no flow).
    pub fn stray_link(&mut self) -> Link<'_> {
        Link {
            rx: &mut self.stray_rx,
            rx_pool: &mut self.rx_pool,
            tx: &mut self.tx,
            tx_pool: &mut self.tx_pool,
            inbound_bytes: &mut self.inbound_bytes,
            mtu: self.mtu,
        }
    }
}

/// A smoltcp device: one inbound queue and the lease's outbound queue.
#[derive(Debug)]
pub(crate) struct Link<'a> {
    rx: &'a mut Queue,
    rx_pool: &'a mut Pool,
    tx: &'a mut Queue,
    tx_pool: &'a mut Pool,
    inbound_bytes: &'a mut usize,
    mtu: usize,
}

pub(crate) struct RxToken<'a> {
    buf: Vec<u8>,
    pool: &'a mut Pool,
}

pub(crate) struct TxToken<'a> {
    tx: &'a mut Queue,
    pool: &'a mut Pool,
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
        if let Err(buf) = self.tx.push(buf) {
            // `transmit` checked for room; a full queue here only loses this packet,
            // which TCP retransmits.
            self.pool.give(buf);
        }
        r
    }
}

impl phy::Device for Link<'_> {
    type RxToken<'b>
        = RxToken<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = TxToken<'b>
    where
        Self: 'b;

    fn receive(&mut self, _: SmolInstant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        if !self.tx.has_room(self.mtu) {
            return None;
        }
        let buf = self.rx.pop()?;
        *self.inbound_bytes = self.inbound_bytes.saturating_sub(buf.len());
        Some((
            RxToken {
                buf,
                pool: &mut *self.rx_pool,
            },
            TxToken {
                tx: &mut *self.tx,
                pool: &mut *self.tx_pool,
            },
        ))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<TxToken<'_>> {
        if !self.tx.has_room(self.mtu) {
            return None;
        }
        Some(TxToken {
            tx: &mut *self.tx,
            pool: &mut *self.tx_pool,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps.max_burst_size = None;
        // Compute checksums on what we send, do not verify what arrives: the IPv4
        // header checksum was verified by `packet::parse`, and a TCP segment crossed
        // the client's authenticated tunnel from its own kernel, so a bad checksum can
        // only be the client's doing and only hurts its own flow. Verifying every
        // payload byte cost ~8 % of the netstack's bulk instructions (callgrind).
        caps.checksum.ipv4 = Checksum::Tx;
        caps.checksum.tcp = Checksum::Tx;
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
    fn inbound_budget_is_per_lease() {
        let mut q = LeaseQueues::new(1500, 1000, 10_000);
        let mut flow = Queue::new(usize::MAX);
        assert!(q.push_inbound(Some(&mut flow), &[0; 600]));
        assert!(!q.push_inbound(None, &[0; 600]), "over the lease's budget");
        assert!(q.push_inbound(None, &[0; 400]));
        assert_eq!(q.inbound_bytes, 1000);
        q.discard(&mut flow);
        assert_eq!(q.inbound_bytes, 400);
        {
            use smoltcp::phy::{Device, RxToken};
            let mut link = q.stray_link();
            let (rx, _) = link.receive(SmolInstant::from_millis(0)).unwrap();
            assert_eq!(rx.consume(|b| b.len()), 400);
        }
        assert_eq!(q.inbound_bytes, 0);
    }

    #[test]
    fn pool_is_bounded_in_bytes() {
        let mut p = Pool::default();
        for _ in 0..100 {
            p.give(Vec::with_capacity(65_000));
        }
        assert!(p.free.len() * 65_000 <= MAX_POOLED_BYTES);
        assert!(p.bytes <= MAX_POOLED_BYTES);
        let n = p.free.len();
        assert!(n > 0);
        for _ in 0..n {
            assert!(p.take().capacity() >= 65_000);
        }
        assert_eq!(p.bytes, 0);
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
