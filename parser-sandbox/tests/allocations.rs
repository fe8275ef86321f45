#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code
//! The data path of `WorkerCore` allocates nothing per packet or per record in steady
//! state: opening DATA records, validating packets, filling netstack batches, answering
//! PINGs, and packing, sealing and queueing return packets.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ipc_schema::PacketBatch;
use ipc_schema::messages::broker_worker::{BrokerToWorker, Decision, WorkerToBroker};
use parser_sandbox::core::{CoreConfig, WorkerCore};
use parser_sandbox::oracle::LocalHandshakeOracle;
use parser_sandbox::packet_policy::build::ipv4;
use vshp::key_oracle::LocalKeyOracle;
use vshp::message::Keepalive;
use vshp::transport::TransportMode;

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = COUNTING.try_with(|c| {
            if c.get() {
                let _ = COUNT.try_with(|n| n.set(n.get() + 1));
            }
        });
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = COUNTING.try_with(|c| {
            if c.get() {
                let _ = COUNT.try_with(|n| n.set(n.get() + 1));
            }
        });
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn counted<T>(f: impl FnOnce() -> T) -> (T, u64) {
    COUNT.with(|n| n.set(0));
    COUNTING.with(|c| c.set(true));
    let t = f();
    COUNTING.with(|c| c.set(false));
    (t, COUNT.with(Cell::get))
}

fn admitted(mode: TransportMode) -> (WorkerCore, Client) {
    let oracle = Arc::new(LocalHandshakeOracle::new(
        LocalKeyOracle::new(gateway_key()),
    ));
    let t0 = Duration::from_secs(1);
    let mut core = WorkerCore::new(CoreConfig::new(mode), oracle, t0);
    let mut client = Client::new(false, mode);
    let mut init = client.init(None);
    let _ = core.on_record(&mut init, t0);
    let skip = if mode == TransportMode::Stream { 2 } else { 0 };
    let resp = core.records().iter().next().unwrap()[skip..].to_vec();
    core.records().clear();
    let mut fin = client.on_resp(&resp, None, t0).unwrap();
    let _ = core.on_record(&mut fin, t0);
    let id = match core.drain_broker().next().unwrap() {
        WorkerToBroker::Finished { handshake, .. } => handshake,
        other => panic!("{other:?}"),
    };
    core.on_broker(
        &BrokerToWorker::Decision {
            handshake: id,
            decision: Decision::Admit {
                lease: lease(),
                resumed: false,
            },
        },
        t0,
    );
    core.records().clear();
    (core, client)
}

#[test]
fn data_path_allocates_nothing_in_steady_state() {
    // The counter sees allocations at all.
    let (v, n) = counted(|| vec![1u8; 10]);
    assert_eq!((v.len(), n), (10, 1));
    for mode in [TransportMode::Datagram, TransportMode::Stream] {
        for packets_per_record in [1usize, 16, 40] {
            let (mut core, mut client) = admitted(mode);
            let now = Duration::from_secs(2);
            let packets: Vec<Vec<u8>> = (0..packets_per_record)
                .map(|i| ipv4(CLIENT_V4, WEB, 60 + i))
                .collect();
            let refs: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
            let mut records: Vec<Vec<u8>> = (0..150)
                .map(|i| {
                    client.data(now, |w| {
                        w.ip_packets(&refs).unwrap();
                        if i % 10 == 0 {
                            w.ping(Keepalive {
                                seq: i,
                                tx_packets: 0,
                                rx_packets: 0,
                            })
                            .unwrap();
                        }
                    })
                })
                .collect();
            let mut back = PacketBatch::new(lease().id);
            for i in 0..packets_per_record {
                back.push(&ipv4(WEB, CLIENT_V4, 100 + i)).unwrap();
            }
            let round = |core: &mut WorkerCore, rec: &mut Vec<u8>| {
                let _ = core.on_record(rec, now);
                core.flush_batch();
                let mut n = 0;
                while let Some(b) = core.ready_batch() {
                    n += b.len();
                    core.batch_sent();
                }
                core.on_return_batch(&back, now);
                core.records().clear();
                n
            };
            // Warm-up: buffers grow to their working size.
            let (warm, rest) = records.split_at_mut(50);
            for rec in warm {
                assert_eq!(round(&mut core, rec), packets_per_record);
            }
            let (forwarded, allocs) = counted(|| {
                rest.iter_mut()
                    .map(|rec| round(&mut core, rec))
                    .sum::<usize>()
            });
            assert_eq!(forwarded, 100 * packets_per_record);
            assert_eq!(
                allocs, 0,
                "{mode:?}, {packets_per_record} packets per record: {allocs} allocations"
            );
            assert_eq!(
                core.stats().packets_forwarded,
                150 * packets_per_record as u64
            );
            assert_eq!(core.stats().pings_answered, 15);
        }
    }
}
