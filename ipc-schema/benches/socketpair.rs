//! Packet batches between two processes over a unix socket pair: the IPC channel
//! (framing + postcard + batch fast path) against a raw `write`/`read` of the same
//! bytes, measured in the same run. Reports packets/s, Gbit/s and the ratio.
//!
//! `cargo bench -p ipc-schema --bench socketpair` measures; without `--bench` (as under
//! `cargo test --all-targets`) it runs a few batches only, to prove it works.
//!
//! A plain binary, not criterion: the child is this same binary re-executed with an
//! environment variable, and a plain `main` decides that before anything else runs;
//! criterion would also report one throughput unit per group where this reports both
//! packets/s and Gbit/s plus the ratio against raw, which is the number that matters.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Instant;

use ipc_schema::messages::data::{self, Credit, DataEvent};
use ipc_schema::{Channel, PacketBatch};
use vshp::lease::LeaseId;

const CHILD_ENV: &str = "IPC_SCHEMA_BENCH_CHILD";
const BATCHES_ENV: &str = "IPC_SCHEMA_BENCH_BATCHES";
const PACKET_LEN: usize = 1400;
const PACKETS_PER_BATCH: usize = 128;

fn main() {
    if let Ok(mode) = std::env::var(CHILD_ENV) {
        let batches: usize = std::env::var(BATCHES_ENV).unwrap().parse().unwrap();
        // The parent handed us our socket as standard input.
        let sock = UnixStream::from(std::io::stdin().as_fd().try_clone_to_owned().unwrap());
        match mode.as_str() {
            "ipc" => child_ipc(sock, batches),
            _ => child_raw(sock, batches),
        }
        return;
    }
    let measure = std::env::args().any(|a| a == "--bench");
    let batches = if measure { 16_000 } else { 8 };
    // Single runs varied by 2x (CPU frequency, scheduler placement of the two
    // processes), so a measurement alternates the two modes for several rounds and
    // reports the medians, after one unreported warm-up round of each.
    let rounds = if measure { 7 } else { 1 };
    if measure {
        run_parent("ipc", batches, parent_ipc);
        run_parent("raw", batches, parent_raw);
    }
    let mut ipc = Vec::with_capacity(rounds);
    let mut raw = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        ipc.push(run_parent("ipc", batches, parent_ipc));
        raw.push(run_parent("raw", batches, parent_raw));
    }
    let (ipc, raw) = (median(&mut ipc), median(&mut raw));
    if measure {
        report("ipc", ipc);
        report("raw", raw);
        println!(
            "ipc/raw throughput ratio: {:.3} (medians of {rounds} rounds)",
            ipc / raw
        );
    } else {
        println!("socketpair bench: test mode ran {batches} batches per mode (no timings taken)");
    }
}

/// Spawns the child for `mode`, runs `parent` against it and returns packets/s.
/// `parent` returns the seconds from the end of its set-up to the child's ack.
fn run_parent(mode: &str, batches: usize, parent: fn(UnixStream, usize) -> f64) -> f64 {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(CHILD_ENV, mode)
        .env(BATCHES_ENV, batches.to_string())
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .spawn()
        .unwrap();
    let secs = parent(ours, batches);
    assert!(child.wait().unwrap().success());
    let packets = (batches * PACKETS_PER_BATCH) as f64;
    packets / secs
}

fn report(mode: &str, pps: f64) {
    let gbps = pps * (PACKET_LEN * 8) as f64 / 1e9;
    println!(
        "{mode:>4}: {pps:>12.0} packets/s  {gbps:>7.2} Gbit/s  ({PACKETS_PER_BATCH} × {PACKET_LEN} B per batch)"
    );
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn batch() -> PacketBatch {
    let mut b = PacketBatch::new(LeaseId(1));
    let packet = [0x45u8; PACKET_LEN];
    for _ in 0..PACKETS_PER_BATCH {
        b.push(&packet).unwrap();
    }
    b
}

fn parent_ipc(sock: UnixStream, batches: usize) -> f64 {
    // The hello exchange is the set-up: the child is running once it completes.
    let mut ch = Channel::<data::WorkerEnd>::open(sock).unwrap();
    let b = batch();
    let start = Instant::now();
    for _ in 0..batches {
        ch.send_batch(&b).unwrap();
    }
    let mut scratch = PacketBatch::new(LeaseId(0));
    assert!(matches!(
        ch.recv_data(&mut scratch).unwrap(),
        DataEvent::Credit(_)
    ));
    start.elapsed().as_secs_f64()
}

fn child_ipc(sock: UnixStream, batches: usize) {
    let mut ch = Channel::<data::NetstackEnd>::open(sock).unwrap();
    let mut b = PacketBatch::new(LeaseId(0));
    let mut packets = 0u32;
    for _ in 0..batches {
        assert_eq!(ch.recv_data(&mut b).unwrap(), DataEvent::Packets);
        packets = packets.wrapping_add(b.len() as u32);
    }
    ch.send_credit(Credit { packets, bytes: 0 }).unwrap();
}

fn parent_raw(mut sock: UnixStream, batches: usize) -> f64 {
    let bytes = vec![0x45u8; PACKET_LEN * PACKETS_PER_BATCH];
    let mut ack = [0u8; 1];
    sock.read_exact(&mut ack).unwrap(); // the child is running
    let start = Instant::now();
    for _ in 0..batches {
        sock.write_all(&bytes).unwrap();
    }
    sock.read_exact(&mut ack).unwrap();
    start.elapsed().as_secs_f64()
}

fn child_raw(mut sock: UnixStream, batches: usize) {
    let mut bytes = vec![0u8; PACKET_LEN * PACKETS_PER_BATCH];
    sock.write_all(&[1]).unwrap();
    for _ in 0..batches {
        sock.read_exact(&mut bytes).unwrap();
    }
    sock.write_all(&[1]).unwrap();
}
