#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code
//! The real `vpnshare-worker` binary as the broker starts it: the broker channel on
//! fd 3, the transport (a real UDP socket on 127.0.0.1, or a real TCP connection) and
//! the data path handed over with SCM_RIGHTS. The test plays the broker (key oracle
//! with the broker's own guard, decisions), the client (vshp's initiator) and the
//! netstack (the data-path channel).

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ipc_schema::messages::broker_worker::{
    BrokerEnd, BrokerToWorker, Decision, FirstRecord, HandshakeId, TransportKind, WorkerToBroker,
};
use ipc_schema::messages::data::{self, Credit, DataEvent};
use ipc_schema::{Channel, PacketBatch};
use parser_sandbox::packet_policy::build::ipv4;
use vshp::key_oracle::{GuardedOracle, HandshakeDhGuard, LocalKeyOracle, StaticKeyOracle};
use vshp::message::{CloseReason, ErrorReason};
use vshp::transport::TransportMode;

const WORKER: &str = env!("CARGO_BIN_EXE_vpnshare-worker");
const PROBE: &str = env!("CARGO_BIN_EXE_vpnshare-worker-probe");
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Kills the child if a test fails half-way.
struct Worker {
    child: Child,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Worker {
    fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "worker did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn status_field(&self, name: &str) -> String {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in status"))
            .trim()
            .to_owned()
    }
}

/// Starts `bin` with `child_end` as its fd 3 and stdout piped.
fn spawn(bin: &str, args: &[&str], child_end: &UnixStream) -> Worker {
    let fd = child_end.as_raw_fd();
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: runs in the forked child before exec; it only calls dup2/fcntl, which are
    // async-signal-safe, on a descriptor that is open in the child (inherited from the
    // parent's socket pair, which outlives `spawn`).
    unsafe {
        cmd.pre_exec(move || {
            let rc = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Worker {
        child: cmd.spawn().unwrap(),
    }
}

/// Starts the worker and opens the broker's end of its channel.
fn start_worker() -> (Worker, Channel<BrokerEnd>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let key = hex::encode(gateway_key().public_key());
    let worker = spawn(
        WORKER,
        &["--gateway-key", &key, "--deny", "192.168.1.0/24"],
        &theirs,
    );
    drop(theirs);
    let ch = Channel::<BrokerEnd>::open(ours).unwrap();
    (worker, ch)
}

/// The broker's side of the key oracle: answers `n` oracle messages (the show and the
/// DHs) with the broker's own guard.
fn serve_oracle(
    ch: &mut Channel<BrokerEnd>,
    guarded: &mut Option<GuardedOracle<LocalKeyOracle>>,
    n: usize,
) -> HandshakeId {
    let mut id = None;
    for _ in 0..n {
        match ch.recv().unwrap().msg {
            WorkerToBroker::ShowHandshake {
                handshake,
                first_message,
                ..
            } => {
                let guard = HandshakeDhGuard::from_init_record(first_message.as_slice()).unwrap();
                *guarded = Some(GuardedOracle::new(
                    LocalKeyOracle::new(gateway_key()),
                    guard,
                ));
                ch.send(&BrokerToWorker::HandshakeBound { handshake }, &[])
                    .unwrap();
                id = Some(handshake);
            }
            WorkerToBroker::DhRequest {
                handshake,
                op,
                remote,
            } => {
                let shared = guarded.as_ref().unwrap().dh(&remote).unwrap();
                ch.send(
                    &BrokerToWorker::DhResult {
                        handshake,
                        op,
                        shared,
                    },
                    &[],
                )
                .unwrap();
                id = Some(handshake);
            }
            other => panic!("expected an oracle request, got {other:?}"),
        }
    }
    id.unwrap()
}

fn expect_finished(ch: &mut Channel<BrokerEnd>) -> HandshakeId {
    match ch.recv().unwrap().msg {
        WorkerToBroker::Finished {
            handshake, peer, ..
        } => {
            assert_eq!(peer.0, client_key().public_key());
            handshake
        }
        other => panic!("expected Finished, got {other:?}"),
    }
}

const PLENTY: Credit = Credit {
    packets: 4096,
    bytes: 4 << 20,
};

/// Admits the peer and attaches a data path whose netstack grants `grant`; returns the
/// netstack's end.
fn admit(ch: &mut Channel<BrokerEnd>, id: HandshakeId) -> Channel<data::NetstackEnd> {
    admit_with(ch, id, PLENTY)
}

fn admit_with(
    ch: &mut Channel<BrokerEnd>,
    id: HandshakeId,
    grant: Credit,
) -> Channel<data::NetstackEnd> {
    ch.send(
        &BrokerToWorker::Decision {
            handshake: id,
            decision: Decision::Admit {
                lease: lease(),
                resumed: false,
            },
        },
        &[],
    )
    .unwrap();
    let (netstack, worker_end) = UnixStream::pair().unwrap();
    netstack.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    ch.send(
        &BrokerToWorker::AttachDataPath { lease: lease().id },
        &[worker_end.as_fd()],
    )
    .unwrap();
    drop(worker_end);
    let mut ns = Channel::<data::NetstackEnd>::open(netstack).unwrap();
    let mut batch = PacketBatch::new(lease().id);
    match ns.recv_data(&mut batch).unwrap() {
        DataEvent::Credit(c) => assert!(c.packets >= 256 && c.bytes >= 256 * 1024),
        other => panic!("expected the worker's initial credit, got {other:?}"),
    }
    ns.send_credit(grant).unwrap();
    expect_seal_ticket(ch);
    ns
}

/// Admission asks the broker for a resume ticket (left unanswered here); a datagram
/// session first tells its receiver index (roaming).
fn expect_seal_ticket(ch: &mut Channel<BrokerEnd>) {
    let mut msg = ch.recv().unwrap().msg;
    if let WorkerToBroker::RoamIndex { .. } = msg {
        msg = ch.recv().unwrap().msg;
    }
    match msg {
        WorkerToBroker::SealTicket { .. } => {}
        other => panic!("expected SealTicket, got {other:?}"),
    }
}

/// The packets a client sends: two valid, one spoofed, two forbidden destinations.
fn client_packets() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let valid = vec![ipv4(CLIENT_V4, WEB, 120), ipv4(CLIENT_V4, GATEWAY_V4, 60)];
    let bad = vec![
        ipv4(Ipv4Addr::new(10, 0, 0, 9), WEB, 120),
        ipv4(CLIENT_V4, Ipv4Addr::LOCALHOST, 120),
        ipv4(CLIENT_V4, Ipv4Addr::new(192, 168, 1, 1), 120),
    ];
    (valid, bad)
}

fn check_confined(worker: &Worker) {
    assert_eq!(worker.status_field("Seccomp"), "2");
    assert_eq!(worker.status_field("NoNewPrivs"), "1");
    assert_eq!(worker.status_field("CapEff"), "0000000000000000");
}

fn check_counters(ch: &mut Channel<BrokerEnd>) {
    ch.send(&BrokerToWorker::ReportCounters, &[]).unwrap();
    match ch.recv().unwrap().msg {
        WorkerToBroker::Counters(c) => {
            assert_eq!(c.packets_forwarded, 2, "{c:?}");
            assert_eq!(c.spoofed_sources, 1, "{c:?}");
            assert_eq!(c.forbidden_destinations, 2, "{c:?}");
            assert_eq!(c.packets_delivered, 3, "{c:?}");
        }
        other => panic!("expected Counters, got {other:?}"),
    }
}

/// The netstack receives exactly the valid packets, then sends three back.
fn netstack_round_trip(ns: &mut Channel<data::NetstackEnd>, valid: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut batch = PacketBatch::new(lease().id);
    let mut got = Vec::new();
    while got.len() < valid.len() {
        match ns.recv_data(&mut batch).unwrap() {
            DataEvent::Packets => {
                assert_eq!(batch.lease(), lease().id);
                got.extend(batch.iter().map(<[u8]>::to_vec));
            }
            DataEvent::Credit(_) => {}
        }
    }
    assert_eq!(got, valid);
    let mut back = PacketBatch::new(lease().id);
    let returned: Vec<Vec<u8>> = (0..3).map(|i| ipv4(WEB, CLIENT_V4, 200 + i)).collect();
    for p in &returned {
        back.push(p).unwrap();
    }
    ns.send_batch(&back).unwrap();
    returned
}

/// A worker with an admitted UDP peer, the client's socket and session, and the
/// netstack's end of the data path (granting `grant`).
fn udp_admitted(
    grant: Credit,
) -> (
    Worker,
    Channel<BrokerEnd>,
    Channel<data::NetstackEnd>,
    Client,
    UdpSocket,
) {
    let (worker, mut ch) = start_worker();
    let client_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let worker_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    worker_sock
        .connect(client_sock.local_addr().unwrap())
        .unwrap();
    client_sock
        .connect(worker_sock.local_addr().unwrap())
        .unwrap();
    client_sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut client = Client::new(true, TransportMode::Datagram);
    ch.send(
        &BrokerToWorker::AdoptTransport {
            kind: TransportKind::Datagram,
            first_record: None,
        },
        &[worker_sock.as_fd()],
    )
    .unwrap();
    drop(worker_sock);
    client_sock.send(&client.init(None)).unwrap();
    let mut guarded = None;
    serve_oracle(&mut ch, &mut guarded, 3);
    let mut buf = vec![0u8; 65_536];
    let n = client_sock.recv(&mut buf).unwrap();
    assert!(client.on_resp(&buf[..n], None, Duration::ZERO).is_none());
    let id = expect_finished(&mut ch);
    let ns = admit_with(&mut ch, id, grant);
    let n = client_sock.recv(&mut buf).unwrap();
    assert_eq!(
        client.open(&buf[..n], Duration::ZERO)[0],
        Owned::Config(lease())
    );
    (worker, ch, ns, client, client_sock)
}

fn forwarded(ch: &mut Channel<BrokerEnd>) -> u64 {
    ch.send(&BrokerToWorker::ReportCounters, &[]).unwrap();
    match ch.recv().unwrap().msg {
        WorkerToBroker::Counters(c) => c.packets_forwarded,
        other => panic!("expected Counters, got {other:?}"),
    }
}

#[test]
fn batches_wait_for_netstack_credit() {
    // The netstack grants one packet: a batch of two must wait.
    let (_worker, mut ch, mut ns, mut client, client_sock) = udp_admitted(Credit {
        packets: 1,
        bytes: 65_536,
    });
    let (valid, _) = client_packets();
    let refs: Vec<&[u8]> = valid.iter().map(Vec::as_slice).collect();
    client_sock
        .send(&client.packets(Duration::ZERO, &refs))
        .unwrap();
    let deadline = Instant::now() + IO_TIMEOUT;
    while forwarded(&mut ch) < 2 {
        assert!(
            Instant::now() < deadline,
            "the packets were never validated"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Validated and queued, but not sent: nothing is readable on the data path.
    let mut pfd = [nix::poll::PollFd::new(
        ns.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    assert_eq!(
        nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(200u16)).unwrap(),
        0,
        "a batch went out without credit"
    );
    ns.send_credit(Credit {
        packets: 1,
        bytes: 0,
    })
    .unwrap();
    let mut batch = PacketBatch::new(lease().id);
    match ns.recv_data(&mut batch).unwrap() {
        DataEvent::Packets => {
            assert_eq!(batch.iter().map(<[u8]>::to_vec).collect::<Vec<_>>(), valid)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn without_a_netstack_packets_are_dropped_and_pings_still_answered() {
    let (_worker, mut ch) = start_worker();
    let client_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let worker_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    worker_sock
        .connect(client_sock.local_addr().unwrap())
        .unwrap();
    client_sock
        .connect(worker_sock.local_addr().unwrap())
        .unwrap();
    client_sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut client = Client::new(true, TransportMode::Datagram);
    ch.send(
        &BrokerToWorker::AdoptTransport {
            kind: TransportKind::Datagram,
            first_record: Some(FirstRecord::from_slice(&client.init(None)).unwrap()),
        },
        &[worker_sock.as_fd()],
    )
    .unwrap();
    drop(worker_sock);
    let mut guarded = None;
    serve_oracle(&mut ch, &mut guarded, 3);
    let mut buf = vec![0u8; 65_536];
    let n = client_sock.recv(&mut buf).unwrap();
    assert!(client.on_resp(&buf[..n], None, Duration::ZERO).is_none());
    let id = expect_finished(&mut ch);
    // Admitted, but no data path (the gateway runs without a netstack).
    ch.send(
        &BrokerToWorker::Decision {
            handshake: id,
            decision: Decision::Admit {
                lease: lease(),
                resumed: false,
            },
        },
        &[],
    )
    .unwrap();
    expect_seal_ticket(&mut ch);
    let n = client_sock.recv(&mut buf).unwrap();
    assert_eq!(
        client.open(&buf[..n], Duration::ZERO)[0],
        Owned::Config(lease())
    );
    // More packets than the batches a data path would buffer (4 bursts of up to 64
    // datagrams): the worker keeps reading, and answers a PING sent after them. The
    // packets go in chunks, each followed by a PING round trip, so the kernel's socket
    // buffer never overflows under a loaded machine (a drop there would look like a
    // worker that stopped reading).
    let good = ipv4(CLIENT_V4, WEB, 200);
    client_sock
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut seq = 0;
    let mut ponged = (0, 0);
    for _ in 0..6 {
        for _ in 0..100 {
            client_sock
                .send(&client.packets(Duration::ZERO, &[&good]))
                .unwrap();
        }
        let deadline = Instant::now() + IO_TIMEOUT;
        ponged = loop {
            assert!(Instant::now() < deadline, "no PONG");
            seq += 1;
            let ping = client.data(Duration::ZERO, |w| {
                w.ping(vshp::message::Keepalive {
                    seq,
                    tx_packets: 0,
                    rx_packets: 0,
                })
                .unwrap()
            });
            client_sock.send(&ping).unwrap();
            if let Ok(n) = client_sock.recv(&mut buf) {
                if let Some(Owned::Pong { seq, rx, .. }) =
                    client.open(&buf[..n], Duration::ZERO).first()
                {
                    break (*seq, *rx);
                }
            }
        };
    }
    assert!(
        ponged.1 > 256,
        "the worker read past the back-pressure point: {ponged:?}"
    );
    assert_eq!(forwarded(&mut ch), 0);
}

#[test]
fn udp_session_end_to_end_in_the_real_confined_worker() {
    let (mut worker, mut ch) = start_worker();
    let client_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let worker_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    worker_sock
        .connect(client_sock.local_addr().unwrap())
        .unwrap();
    client_sock
        .connect(worker_sock.local_addr().unwrap())
        .unwrap();
    client_sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();

    // The broker consumed the client's first datagram on its listening socket: it
    // hands it over with the connected socket.
    let mut client = Client::new(false, TransportMode::Datagram);
    let init = client.init(None);
    ch.send(
        &BrokerToWorker::AdoptTransport {
            kind: TransportKind::Datagram,
            first_record: Some(FirstRecord::from_slice(&init).unwrap()),
        },
        &[worker_sock.as_fd()],
    )
    .unwrap();
    drop(worker_sock);

    let mut guarded = None;
    serve_oracle(&mut ch, &mut guarded, 2); // show + es (XX)
    let mut buf = vec![0u8; 65_536];
    let n = client_sock.recv(&mut buf).unwrap();
    let fin = client.on_resp(&buf[..n], None, Duration::ZERO).unwrap();
    client_sock.send(&fin).unwrap();
    let id = expect_finished(&mut ch);
    let mut ns = admit(&mut ch, id);

    let n = client_sock.recv(&mut buf).unwrap();
    let msgs = client.open(&buf[..n], Duration::ZERO);
    assert_eq!(msgs[0], Owned::Config(lease()));

    check_confined(&worker);

    let (valid, bad) = client_packets();
    let all: Vec<&[u8]> = valid.iter().chain(&bad).map(Vec::as_slice).collect();
    let rec = client.packets(Duration::ZERO, &all);
    client_sock.send(&rec).unwrap();
    let returned = netstack_round_trip(&mut ns, &valid);

    let mut got = Vec::new();
    while got.len() < returned.len() {
        let n = client_sock.recv(&mut buf).unwrap();
        assert!(n <= 1400, "datagram of {n} bytes");
        for m in client.open(&buf[..n], Duration::ZERO) {
            match m {
                Owned::Packets(p) => got.extend(p),
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(got, returned);
    check_counters(&mut ch);

    let close = client.data(Duration::ZERO, |w| w.close(CloseReason::Normal).unwrap());
    client_sock.send(&close).unwrap();
    match ch.recv().unwrap().msg {
        WorkerToBroker::Counters(c) => assert_eq!(c.packets_forwarded, 2),
        other => panic!("expected the final counters, got {other:?}"),
    }
    match ch.recv().unwrap().msg {
        WorkerToBroker::SessionEnded { reason } => {
            assert_eq!(
                reason,
                ipc_schema::messages::broker_worker::SessionEnd::PeerClosed
            )
        }
        other => panic!("{other:?}"),
    }
    let status = worker.wait();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

fn send_framed(s: &mut TcpStream, rec: &[u8]) {
    s.write_all(&(rec.len() as u16).to_be_bytes()).unwrap();
    s.write_all(rec).unwrap();
}

fn recv_framed(s: &mut TcpStream) -> Vec<u8> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).unwrap();
    let mut rec = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut rec).unwrap();
    rec
}

#[test]
fn tcp_session_with_pending_then_admit_in_the_real_worker() {
    let (mut worker, mut ch) = start_worker();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client_sock = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    client_sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    ch.send(
        &BrokerToWorker::AdoptTransport {
            kind: TransportKind::Stream,
            first_record: None,
        },
        &[accepted.as_fd()],
    )
    .unwrap();
    drop(accepted);

    let mut client = Client::new(true, TransportMode::Stream);
    let init = client.init(None);
    send_framed(&mut client_sock, &init);
    let mut guarded = None;
    serve_oracle(&mut ch, &mut guarded, 3); // show + es + ss (IK)
    let resp = recv_framed(&mut client_sock);
    assert!(client.on_resp(&resp, None, Duration::ZERO).is_none());
    let id = expect_finished(&mut ch);

    // Pending first: an authenticated ERROR, the session stays.
    ch.send(
        &BrokerToWorker::Decision {
            handshake: id,
            decision: Decision::Pending,
        },
        &[],
    )
    .unwrap();
    let rec = recv_framed(&mut client_sock);
    assert_eq!(
        client.open(&rec, Duration::ZERO),
        vec![Owned::Error(ErrorReason::PendingApproval)]
    );
    // The user approves: a second decision admits.
    let mut ns = admit(&mut ch, id);
    let rec = recv_framed(&mut client_sock);
    assert_eq!(client.open(&rec, Duration::ZERO)[0], Owned::Config(lease()));
    check_confined(&worker);

    let (valid, bad) = client_packets();
    let all: Vec<&[u8]> = valid.iter().chain(&bad).map(Vec::as_slice).collect();
    let rec = client.packets(Duration::ZERO, &all);
    send_framed(&mut client_sock, &rec);
    let returned = netstack_round_trip(&mut ns, &valid);
    let rec = recv_framed(&mut client_sock);
    assert_eq!(
        client.open(&rec, Duration::ZERO),
        vec![Owned::Packets(returned)],
        "one stream record carries the whole return batch"
    );
    check_counters(&mut ch);

    // The client goes away: end of stream.
    drop(client_sock);
    match ch.recv().unwrap().msg {
        WorkerToBroker::Counters(c) => assert_eq!(c.packets_delivered, 3),
        other => panic!("expected the final counters, got {other:?}"),
    }
    match ch.recv().unwrap().msg {
        WorkerToBroker::SessionEnded { .. } => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(worker.wait().code(), Some(0));
}

#[test]
fn worker_exits_when_the_broker_channel_closes() {
    let (mut worker, ch) = start_worker();
    drop(ch);
    let status = worker.wait();
    assert_eq!(status.code(), Some(2), "{status:?}");
}

#[test]
fn worker_without_fd_3_or_arguments_fails_to_start() {
    let out = Command::new(WORKER)
        .args(["--gateway-key", &"00".repeat(32)])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let out = Command::new(WORKER).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--gateway-key"));
}

#[test]
fn socket_after_confine_dies_by_sigsys() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut probe = spawn(PROBE, &[], &theirs);
    drop(theirs);
    let ch = Channel::<BrokerEnd>::open(ours).unwrap();
    let status = probe.wait();
    let mut out = String::new();
    probe
        .child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(out.contains("confined"), "{out}");
    assert!(!out.contains("survived"), "{out}");
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}");
    drop(ch);
}
