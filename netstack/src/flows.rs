//! Sans-IO flow table: flow keys and their index (no scan of every socket to find a
//! flow), per-lease accounting against the caps, and timeouts. It is fed keys and
//! `now`; the I/O side (`stack.rs`) keeps its sockets in the `T` of each entry.

use crate::config::{Caps, Timeouts};
use crate::counters::DropReason;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use vshp::lease::LeaseId;

/// Identifies a flow inside one netstack (also its mio token).
pub(crate) type FlowId = u64;

/// A hasher for keys this process chooses itself (flow ids from a counter, lease ids
/// from the broker): a multiply, instead of SipHash, which cost ~20 % of the
/// netstack's bulk instructions with five lookups per packet (callgrind). Keys a
/// client controls (the 5-tuple index) keep the standard DoS-resistant hasher.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IdHash;

impl std::hash::BuildHasher for IdHash {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

#[derive(Debug, Default)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: good high bits (hashbrown's tag) and, for an odd factor,
        // distinct low bits for consecutive ids (the bucket index).
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A map keyed by ids this process chooses (see [`IdHash`]).
pub(crate) type IdMap<K, V> = HashMap<K, V, IdHash>;

/// What a flow is, by protocol. UDP and ICMP echo keys carry only the client side:
/// the mappings are endpoint-independent (RFC 4787), one OS socket per client
/// address:port (or echo identifier) whatever the destinations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum FlowKey {
    Tcp {
        lease: LeaseId,
        client: SocketAddr,
        remote: SocketAddr,
    },
    Udp {
        lease: LeaseId,
        client: SocketAddr,
    },
    Ping {
        lease: LeaseId,
        client: IpAddr,
        ident: u16,
    },
}

impl FlowKey {
    pub fn lease(&self) -> LeaseId {
        match *self {
            FlowKey::Tcp { lease, .. }
            | FlowKey::Udp { lease, .. }
            | FlowKey::Ping { lease, .. } => lease,
        }
    }

    fn is_tcp(&self) -> bool {
        matches!(self, FlowKey::Tcp { .. })
    }
}

/// What one lease holds now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub tcp: usize,
    pub pending_connects: usize,
    pub udp: usize,
    pub ping: usize,
    pub buffer_bytes: usize,
}

#[derive(Debug, Default)]
struct LeaseFlows {
    tcp: HashSet<FlowId>,
    dgram: HashSet<FlowId>,
    usage: Usage,
    /// Flows that stopped because the lease's outbound queue was full; they run
    /// again when the caller drains it ([`FlowTable::unblock_lease`]).
    blocked: Vec<FlowId>,
}

/// Why a flow's time is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    /// The OS connect did not finish in time.
    ConnectTimeout,
    /// No traffic for the idle timeout of its protocol.
    Idle,
}

#[derive(Debug)]
struct Entry<T> {
    key: FlowKey,
    /// `Some(deadline)` while a TCP connect is pending.
    connect_deadline: Option<Instant>,
    last_active: Instant,
    buffer_bytes: usize,
    /// In the run queue now.
    queued: bool,
    /// In its lease's blocked list now.
    blocked: bool,
    /// The earliest time the flow asked to run again (its entry in the timer heap;
    /// later heap entries of the flow are stale and skipped).
    timer: Option<Instant>,
    io: T,
}

/// The flows of every lease, indexed by key and by lease, and their schedule: a run
/// queue of flows that have work (a packet arrived, an OS socket became ready, a
/// drain made room) and a timer heap of flows that asked to run at a given time
/// (smoltcp's `poll_at`). Only those flows are serviced, so thousands of idle flows
/// cost nothing per packet of a busy one.
#[derive(Debug)]
pub(crate) struct FlowTable<T> {
    entries: IdMap<FlowId, Entry<T>>,
    index: HashMap<FlowKey, FlowId>,
    leases: IdMap<LeaseId, LeaseFlows>,
    next: FlowId,
    run: Vec<FlowId>,
    timers: BinaryHeap<Reverse<(Instant, FlowId)>>,
}

impl<T> Default for FlowTable<T> {
    fn default() -> Self {
        Self {
            entries: IdMap::default(),
            index: HashMap::new(),
            leases: IdMap::default(),
            next: 1,
            run: Vec::new(),
            timers: BinaryHeap::new(),
        }
    }
}

impl<T> FlowTable<T> {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The id the next [`insert`](Self::insert) will return (to register its socket
    /// under that token first).
    pub fn next_id(&self) -> FlowId {
        self.next
    }

    /// The flow with this key, if any (a hash lookup).
    pub fn lookup(&self, key: &FlowKey) -> Option<FlowId> {
        self.index.get(key).copied()
    }

    /// Whether a new flow with this key fits the caps (checked before any socket is
    /// created). The order of the checks decides which reason is counted.
    pub fn admit(&self, key: &FlowKey, caps: &Caps) -> Result<(), DropReason> {
        if self.entries.len() >= caps.max_total_flows {
            return Err(DropReason::TotalFlowCap);
        }
        let usage = self.usage(key.lease());
        match key {
            FlowKey::Tcp { .. } => {
                if usage.tcp >= caps.max_tcp_flows {
                    Err(DropReason::TcpFlowCap)
                } else if usage.pending_connects >= caps.max_pending_connects {
                    Err(DropReason::PendingConnectCap)
                } else {
                    Ok(())
                }
            }
            FlowKey::Udp { .. } if usage.udp >= caps.max_udp_mappings => {
                Err(DropReason::UdpMappingCap)
            }
            FlowKey::Ping { .. } if usage.ping >= caps.max_ping_mappings => {
                Err(DropReason::PingMappingCap)
            }
            _ => Ok(()),
        }
    }

    /// Adds a flow (after [`admit`](Self::admit)). A TCP flow starts with its connect
    /// pending until `connect_deadline`.
    pub fn insert(
        &mut self,
        key: FlowKey,
        io: T,
        now: Instant,
        connect_deadline: Option<Instant>,
    ) -> FlowId {
        let id = self.next;
        self.next = self.next.wrapping_add(1).max(1);
        let lf = self.leases.entry(key.lease()).or_default();
        match key {
            FlowKey::Tcp { .. } => {
                lf.tcp.insert(id);
                lf.usage.tcp += 1;
                if connect_deadline.is_some() {
                    lf.usage.pending_connects += 1;
                }
            }
            FlowKey::Udp { .. } => {
                lf.dgram.insert(id);
                lf.usage.udp += 1;
            }
            FlowKey::Ping { .. } => {
                lf.dgram.insert(id);
                lf.usage.ping += 1;
            }
        }
        self.index.insert(key, id);
        self.entries.insert(
            id,
            Entry {
                key,
                connect_deadline: connect_deadline.filter(|_| key.is_tcp()),
                last_active: now,
                buffer_bytes: 0,
                queued: false,
                blocked: false,
                timer: None,
                io,
            },
        );
        id
    }

    // ------------------------------------------------------------ the schedule

    /// Puts a flow in the run queue (once; unknown ids are ignored).
    pub fn wake(&mut self, id: FlowId) {
        if let Some(e) = self.entries.get_mut(&id)
            && !e.queued
        {
            e.queued = true;
            self.run.push(id);
        }
    }

    /// Asks for the flow to run at `at` (or earlier, if it already asked for that).
    pub fn set_timer(&mut self, id: FlowId, at: Instant) {
        if let Some(e) = self.entries.get_mut(&id)
            && e.timer.is_none_or(|t| at < t)
        {
            e.timer = Some(at);
            self.timers.push(Reverse((at, id)));
        }
    }

    /// The flow waits for room in its lease's outbound queue.
    pub fn block(&mut self, id: FlowId) {
        if let Some(e) = self.entries.get_mut(&id)
            && !e.blocked
        {
            e.blocked = true;
            self.leases
                .entry(e.key.lease())
                .or_default()
                .blocked
                .push(id);
        }
    }

    /// The lease's outbound queue has room again: its blocked flows run.
    pub fn unblock_lease(&mut self, lease: LeaseId) {
        let Some(lf) = self.leases.get_mut(&lease) else {
            return;
        };
        let blocked = std::mem::take(&mut lf.blocked);
        for &id in &blocked {
            if let Some(e) = self.entries.get_mut(&id) {
                e.blocked = false;
            }
            self.wake(id);
        }
        // Keep the list's capacity (no allocation per drain in steady state).
        if let Some(lf) = self.leases.get_mut(&lease) {
            let mut blocked = blocked;
            blocked.clear();
            if lf.blocked.is_empty() {
                lf.blocked = blocked;
            }
        }
    }

    /// Moves the flows that have work at `now` (woken ones and due timers) into
    /// `out` (cleared first). Flows woken while `out` is serviced go to the next
    /// round.
    pub fn take_runnable(&mut self, now: Instant, out: &mut Vec<FlowId>) {
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            if let Some(e) = self.entries.get_mut(&id)
                && e.timer == Some(at)
            {
                e.timer = None;
                self.wake(id);
            }
        }
        out.clear();
        std::mem::swap(&mut self.run, out);
        for id in out.iter() {
            if let Some(e) = self.entries.get_mut(id) {
                e.queued = false;
            }
        }
    }

    /// Whether some flow is in the run queue.
    pub fn has_runnable(&self) -> bool {
        !self.run.is_empty()
    }

    /// The earliest pending timer (stale heap entries are dropped on the way).
    pub fn next_timer(&mut self) -> Option<Instant> {
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if self.entries.get(&id).is_some_and(|e| e.timer == Some(at)) {
                return Some(at);
            }
            self.timers.pop();
        }
        None
    }

    /// A pending TCP connect succeeded: the flow now needs `buffer_bytes` of smoltcp
    /// buffers. Fails (flow unchanged) when that exceeds the lease's buffer cap.
    pub fn connected(
        &mut self,
        id: FlowId,
        buffer_bytes: usize,
        caps: &Caps,
        now: Instant,
    ) -> Result<(), DropReason> {
        let Some(e) = self.entries.get_mut(&id) else {
            return Err(DropReason::Malformed);
        };
        let lf = self.leases.entry(e.key.lease()).or_default();
        if lf.usage.buffer_bytes.saturating_add(buffer_bytes) > caps.max_buffer_bytes {
            return Err(DropReason::BufferCap);
        }
        if e.connect_deadline.take().is_some() {
            lf.usage.pending_connects = lf.usage.pending_connects.saturating_sub(1);
        }
        lf.usage.buffer_bytes += buffer_bytes;
        e.buffer_bytes = buffer_bytes;
        e.last_active = now;
        Ok(())
    }

    /// The flow's buffers now take `new_bytes` (growth is refused, flow unchanged,
    /// when the lease's buffer cap would be exceeded).
    pub fn resize_buffers(
        &mut self,
        id: FlowId,
        new_bytes: usize,
        caps: &Caps,
    ) -> Result<(), DropReason> {
        let Some(e) = self.entries.get_mut(&id) else {
            return Err(DropReason::Malformed);
        };
        let lf = self.leases.entry(e.key.lease()).or_default();
        let others = lf.usage.buffer_bytes.saturating_sub(e.buffer_bytes);
        if new_bytes > e.buffer_bytes && others.saturating_add(new_bytes) > caps.max_buffer_bytes {
            return Err(DropReason::BufferCap);
        }
        lf.usage.buffer_bytes = others.saturating_add(new_bytes);
        e.buffer_bytes = new_bytes;
        Ok(())
    }

    /// Flows holding more than `bytes` of buffers with no traffic since `idle`
    /// (candidates for shrinking).
    pub fn oversized_idle(&self, now: Instant, idle: Duration, bytes: usize) -> Vec<FlowId> {
        self.entries
            .iter()
            .filter(|(_, e)| {
                e.buffer_bytes > bytes && now.saturating_duration_since(e.last_active) >= idle
            })
            .map(|(&id, _)| id)
            .collect()
    }

    /// Whether the flow's TCP connect is still pending.
    #[cfg(test)]
    pub fn is_connecting(&self, id: FlowId) -> bool {
        self.entries
            .get(&id)
            .is_some_and(|e| e.connect_deadline.is_some())
    }

    /// Notes traffic on a flow.
    pub fn touch(&mut self, id: FlowId, now: Instant) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.last_active = now;
        }
    }

    pub fn key(&self, id: FlowId) -> Option<FlowKey> {
        self.entries.get(&id).map(|e| e.key)
    }

    pub fn get_mut(&mut self, id: FlowId) -> Option<&mut T> {
        self.entries.get_mut(&id).map(|e| &mut e.io)
    }

    /// Removes a flow and releases what it counted against its lease.
    pub fn remove(&mut self, id: FlowId) -> Option<(FlowKey, T)> {
        let e = self.entries.remove(&id)?;
        self.index.remove(&e.key);
        let lease = e.key.lease();
        if let Some(lf) = self.leases.get_mut(&lease) {
            let u = &mut lf.usage;
            match e.key {
                FlowKey::Tcp { .. } => {
                    lf.tcp.remove(&id);
                    u.tcp = u.tcp.saturating_sub(1);
                    if e.connect_deadline.is_some() {
                        u.pending_connects = u.pending_connects.saturating_sub(1);
                    }
                }
                FlowKey::Udp { .. } => {
                    lf.dgram.remove(&id);
                    u.udp = u.udp.saturating_sub(1);
                }
                FlowKey::Ping { .. } => {
                    lf.dgram.remove(&id);
                    u.ping = u.ping.saturating_sub(1);
                }
            }
            u.buffer_bytes = u.buffer_bytes.saturating_sub(e.buffer_bytes);
            if lf.tcp.is_empty() && lf.dgram.is_empty() {
                self.leases.remove(&lease);
            }
        }
        Some((e.key, e.io))
    }

    /// The flows of a lease: (TCP, datagram).
    pub fn lease_flows(&self, lease: LeaseId) -> (Vec<FlowId>, Vec<FlowId>) {
        let (mut tcp, mut dgram) = (Vec::new(), Vec::new());
        self.lease_flows_into(lease, &mut tcp, &mut dgram);
        (tcp, dgram)
    }

    /// The flows of a lease, into reused vectors (cleared first).
    pub fn lease_flows_into(&self, lease: LeaseId, tcp: &mut Vec<FlowId>, dgram: &mut Vec<FlowId>) {
        tcp.clear();
        dgram.clear();
        if let Some(lf) = self.leases.get(&lease) {
            tcp.extend(lf.tcp.iter().copied());
            dgram.extend(lf.dgram.iter().copied());
        }
    }

    pub fn usage(&self, lease: LeaseId) -> Usage {
        self.leases
            .get(&lease)
            .map(|lf| lf.usage.clone())
            .unwrap_or_default()
    }

    /// All flow ids (for closing everything).
    pub fn ids(&self) -> Vec<FlowId> {
        self.entries.keys().copied().collect()
    }

    /// Flows whose time is up at `now`.
    pub fn expired(&self, now: Instant, t: &Timeouts) -> Vec<(FlowId, Expiry)> {
        self.entries
            .iter()
            .filter_map(|(&id, e)| {
                if let Some(deadline) = e.connect_deadline {
                    return (deadline <= now).then_some((id, Expiry::ConnectTimeout));
                }
                let idle = match e.key {
                    FlowKey::Tcp { .. } => t.tcp_idle,
                    FlowKey::Udp { .. } => t.udp_idle,
                    FlowKey::Ping { .. } => t.ping_idle,
                };
                (now.saturating_duration_since(e.last_active) >= idle).then_some((id, Expiry::Idle))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(lease: u64, port: u16) -> FlowKey {
        FlowKey::Tcp {
            lease: LeaseId(lease),
            client: SocketAddr::from(([100, 64, 0, 2], port)),
            remote: SocketAddr::from(([127, 0, 0, 1], 80)),
        }
    }

    fn udp(lease: u64, port: u16) -> FlowKey {
        FlowKey::Udp {
            lease: LeaseId(lease),
            client: SocketAddr::from(([100, 64, 0, 2], port)),
        }
    }

    #[test]
    fn lookup_is_by_key() {
        let now = Instant::now();
        let mut t = FlowTable::default();
        let a = t.insert(tcp(1, 1000), "a", now, None);
        let b = t.insert(udp(1, 1000), "b", now, None);
        assert_ne!(a, b);
        assert_eq!(t.lookup(&tcp(1, 1000)), Some(a));
        assert_eq!(t.lookup(&udp(1, 1000)), Some(b));
        assert_eq!(t.lookup(&tcp(2, 1000)), None);
        assert_eq!(t.remove(a).map(|(_, v)| v), Some("a"));
        assert_eq!(t.lookup(&tcp(1, 1000)), None);
    }

    #[test]
    fn caps_are_per_lease() {
        let now = Instant::now();
        let caps = Caps {
            max_tcp_flows: 3,
            max_pending_connects: 2,
            max_udp_mappings: 1,
            max_buffer_bytes: 100,
            ..Caps::default()
        };
        let mut t = FlowTable::default();
        let later = Some(now + Duration::from_secs(1));
        let a = t.insert(tcp(1, 1), (), now, later);
        t.insert(tcp(1, 2), (), now, later);
        assert_eq!(
            t.admit(&tcp(1, 3), &caps),
            Err(DropReason::PendingConnectCap)
        );
        assert_eq!(
            t.admit(&tcp(2, 3), &caps),
            Ok(()),
            "another lease is not affected"
        );
        assert!(t.is_connecting(a));
        t.connected(a, 60, &caps, now).unwrap();
        assert!(!t.is_connecting(a));
        t.insert(tcp(1, 3), (), now, later);
        assert_eq!(t.admit(&tcp(1, 4), &caps), Err(DropReason::TcpFlowCap));
        assert_eq!(
            t.connected(t.lookup(&tcp(1, 2)).unwrap(), 60, &caps, now),
            Err(DropReason::BufferCap)
        );
        t.insert(udp(1, 9), (), now, None);
        assert_eq!(t.admit(&udp(1, 10), &caps), Err(DropReason::UdpMappingCap));
        let u = t.usage(LeaseId(1));
        assert_eq!(
            (u.tcp, u.pending_connects, u.udp, u.buffer_bytes),
            (3, 2, 1, 60)
        );
        for id in t.ids() {
            t.remove(id);
        }
        assert_eq!(t.usage(LeaseId(1)), Usage::default());
        assert!(t.is_empty());
    }

    #[test]
    fn total_cap_applies_across_leases() {
        let now = Instant::now();
        let caps = Caps {
            max_total_flows: 2,
            ..Caps::default()
        };
        let mut t = FlowTable::default();
        t.insert(udp(1, 1), (), now, None);
        t.insert(udp(2, 1), (), now, None);
        assert_eq!(t.admit(&udp(3, 1), &caps), Err(DropReason::TotalFlowCap));
    }

    #[test]
    fn expiry_by_connect_deadline_and_idleness() {
        let now = Instant::now();
        let timeouts = Timeouts::default();
        let mut t = FlowTable::default();
        let c = t.insert(tcp(1, 1), (), now, Some(now + timeouts.tcp_connect));
        let u = t.insert(udp(1, 1), (), now, None);
        assert!(t.expired(now, &timeouts).is_empty());
        let e = t.expired(now + timeouts.tcp_connect, &timeouts);
        assert_eq!(e, vec![(c, Expiry::ConnectTimeout)]);
        t.touch(u, now + Duration::from_secs(100));
        assert!(
            t.expired(now + timeouts.udp_idle, &timeouts)
                .iter()
                .all(|(id, _)| *id != u)
        );
        assert!(
            t.expired(
                now + Duration::from_secs(100) + timeouts.udp_idle,
                &timeouts
            )
            .contains(&(u, Expiry::Idle))
        );
    }

    #[test]
    fn only_woken_due_and_unblocked_flows_run() {
        let now = Instant::now();
        let mut t = FlowTable::default();
        let ids: Vec<FlowId> = (0..1000)
            .map(|p| t.insert(tcp(1, p), (), now, None))
            .collect();
        let mut run = Vec::new();
        t.take_runnable(now, &mut run);
        assert!(run.is_empty(), "idle flows do not run");
        t.wake(ids[3]);
        t.wake(ids[3]);
        t.set_timer(ids[5], now + Duration::from_millis(10));
        t.set_timer(ids[5], now + Duration::from_millis(5)); // earlier wins
        t.set_timer(ids[5], now + Duration::from_millis(50)); // later is ignored
        t.set_timer(ids[6], now + Duration::from_millis(20));
        assert!(t.has_runnable());
        assert_eq!(t.next_timer(), Some(now + Duration::from_millis(5)));
        t.take_runnable(now, &mut run);
        assert_eq!(run, vec![ids[3]], "woken once");
        t.take_runnable(now + Duration::from_millis(10), &mut run);
        assert_eq!(
            run,
            vec![ids[5]],
            "the stale 10 ms entry does not run it twice"
        );
        assert_eq!(t.next_timer(), Some(now + Duration::from_millis(20)));
        t.remove(ids[6]);
        assert_eq!(t.next_timer(), None, "a removed flow's timer is gone");
        t.block(ids[7]);
        t.block(ids[7]);
        t.block(ids[8]);
        t.take_runnable(now, &mut run);
        assert!(run.is_empty(), "blocked flows wait for a drain");
        t.unblock_lease(LeaseId(2));
        t.take_runnable(now, &mut run);
        assert!(run.is_empty(), "another lease's drain");
        t.unblock_lease(LeaseId(1));
        t.take_runnable(now, &mut run);
        assert_eq!(run, vec![ids[7], ids[8]]);
    }
}
