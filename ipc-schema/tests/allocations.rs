//! Allocation-counting tests: the data path allocates nothing per packet (or per batch)
//! in steady state, and an oversized length is refused before any buffer is sized.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::thread;

use ipc_schema::messages::broker_worker;
use ipc_schema::messages::data::{self, Credit, DataEvent};
use ipc_schema::{Channel, ChannelKind, PacketBatch, Role, SCHEMA_VERSION};
use vshp::lease::LeaseId;

/// Counts this thread's allocations (tests in this binary run on several threads).
struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    static BYTES: Cell<u64> = const { Cell::new(0) };
}

fn count(size: usize) {
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
    let _ = BYTES.try_with(|c| c.set(c.get() + size as u64));
}

fn snapshot() -> (u64, u64) {
    (ALLOCS.with(Cell::get), BYTES.with(Cell::get))
}

// SAFETY: every method forwards to the system allocator with the caller's arguments;
// the counters are const-initialised thread locals that never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: as above; `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn data_pair() -> (Channel<data::WorkerEnd>, Channel<data::NetstackEnd>) {
    let (a, b) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || Channel::<data::NetstackEnd>::open(b).unwrap());
    let w = Channel::<data::WorkerEnd>::open(a).unwrap();
    (w, t.join().unwrap())
}

/// Allocations made by `rounds` batch round trips of `packets` packets each, after a
/// warm-up that lets every buffer reach its working size.
fn allocations_per_run(packets: usize, rounds: usize) -> u64 {
    let (mut w, mut n) = data_pair();
    let mut tx = PacketBatch::new(LeaseId(7));
    let mut rx = PacketBatch::new(LeaseId(0));
    let packet = vec![0x45u8; 1400];
    let mut run = |rounds: usize| {
        for round in 0..rounds {
            tx.clear();
            for _ in 0..packets {
                tx.push(&packet).unwrap();
            }
            w.send_batch(&tx).unwrap();
            assert_eq!(n.recv_data(&mut rx).unwrap(), DataEvent::Packets);
            assert_eq!(rx.len(), packets);
            // Credit flows back the other way, as it will in the netstack.
            n.send_credit(Credit {
                packets: packets as u32,
                bytes: round as u32,
            })
            .unwrap();
            assert!(matches!(
                w.recv_data(&mut rx).unwrap(),
                DataEvent::Credit(_)
            ));
        }
    };
    run(3);
    let (before, _) = snapshot();
    run(rounds);
    let (after, _) = snapshot();
    after - before
}

#[test]
fn data_path_allocates_nothing_in_steady_state() {
    // The counter sees allocations at all (or a zero below would prove nothing).
    let (a0, _) = snapshot();
    drop(std::hint::black_box(vec![1u8; 10]));
    assert!(snapshot().0 > a0);
    // Packets per batch 1, 16 and 64 (64 × 1400 B fits the socket buffer, so one thread
    // can play both ends): zero allocations whatever the packet count.
    for packets in [1, 16, 64] {
        assert_eq!(
            allocations_per_run(packets, 100),
            0,
            "{packets} packets per batch"
        );
    }
}

#[test]
fn oversized_length_allocates_nothing() {
    let (a, mut b) = common::pair_with_hello(ChannelKind::BrokerWorker, Role::Worker);
    let mut ch = Channel::<broker_worker::BrokerEnd>::open(a).unwrap();
    b.write_all(&[0xff, 0xff, 0xff, 0xff, SCHEMA_VERSION])
        .unwrap();
    let (_, bytes_before) = snapshot();
    assert!(ch.recv().is_err());
    let (_, bytes_after) = snapshot();
    // Nothing sized by the claimed 4 GiB: at most small bookkeeping (logging).
    assert!(
        bytes_after - bytes_before < 4096,
        "{} bytes allocated",
        bytes_after - bytes_before
    );
}
