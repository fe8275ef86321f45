//! Channels over real socket pairs: round trips, limits, truncation, the bad-message
//! rule, the version handshake and descriptor passing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::thread;

use common::{frame, pair_with_hello};
use ipc_schema::channel::{ChannelError, FramePart, PoisonCause};
use ipc_schema::fuzzing::samples;
use ipc_schema::messages::broker_worker::{self, BrokerToWorker, WorkerToBroker};
use ipc_schema::messages::common::ShutdownReason;
use ipc_schema::messages::data::{self, Credit, DataEvent};
use ipc_schema::messages::{broker_netstack, control, session_helper};
use ipc_schema::{
    Channel, ChannelKind, HelloError, Message, PacketBatch, Protocol, Role, SCHEMA_VERSION,
};
use vshp::lease::LeaseId;

/// Opens both ends of a channel (the hello needs both sides running).
fn open_pair<A: Protocol + 'static, B: Protocol + 'static>() -> (Channel<A>, Channel<B>) {
    let (a, b) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || Channel::<B>::open(b).unwrap());
    let a = Channel::<A>::open(a).unwrap();
    (a, t.join().unwrap())
}

/// Sends every sample of `A::Send` to `B` and checks it arrives unchanged, with a pipe
/// as the descriptor of messages that carry one.
fn round_trip_all<A, B>(msgs: Vec<A::Send>)
where
    A: Protocol + 'static,
    B: Protocol<Recv = A::Send> + 'static,
    A::Send: PartialEq,
{
    let (mut a, mut b) = open_pair::<A, B>();
    for msg in msgs {
        let (r, w) = nix::unistd::pipe().unwrap();
        let fds = if msg.fd_count() == 1 {
            vec![w.as_fd()]
        } else {
            vec![]
        };
        a.send(&msg, &fds).unwrap();
        let got = b.recv().unwrap();
        assert_eq!(got.msg, msg);
        assert_eq!(got.fds.len(), msg.fd_count());
        if let Some(fd) = got.fds.into_iter().next() {
            // The received descriptor is the pipe's write end: prove it by using it.
            let mut file = std::fs::File::from(fd);
            file.write_all(b"through").unwrap();
            drop(file);
            drop(w);
            let mut buf = String::new();
            std::fs::File::from(r).read_to_string(&mut buf).unwrap();
            assert_eq!(buf, "through");
        }
    }
}

#[test]
fn every_message_round_trips_over_a_socket() {
    round_trip_all::<broker_worker::BrokerEnd, broker_worker::WorkerEnd>(
        samples::broker_to_worker(),
    );
    round_trip_all::<broker_worker::WorkerEnd, broker_worker::BrokerEnd>(
        samples::worker_to_broker(),
    );
    round_trip_all::<broker_netstack::BrokerEnd, broker_netstack::NetstackEnd>(
        samples::broker_to_netstack(),
    );
    round_trip_all::<broker_netstack::NetstackEnd, broker_netstack::BrokerEnd>(
        samples::netstack_to_broker(),
    );
    round_trip_all::<session_helper::SessionEnd, session_helper::HelperEnd>(
        samples::session_to_helper(),
    );
    round_trip_all::<session_helper::HelperEnd, session_helper::SessionEnd>(
        samples::helper_to_session(),
    );
    round_trip_all::<control::CliEnd, control::BrokerEnd>(samples::control_request());
    round_trip_all::<control::BrokerEnd, control::CliEnd>(samples::control_reply());
    round_trip_all::<data::WorkerEnd, data::NetstackEnd>(samples::data());
    round_trip_all::<data::NetstackEnd, data::WorkerEnd>(samples::data());
}

#[test]
fn batches_flow_into_a_reused_batch() {
    let (mut w, mut n) = open_pair::<data::WorkerEnd, data::NetstackEnd>();
    let mut rx = PacketBatch::new(LeaseId(0));
    let tx = samples::batch();
    w.send_batch(&tx).unwrap();
    assert_eq!(n.recv_data(&mut rx).unwrap(), DataEvent::Packets);
    assert_eq!(rx, tx);
    n.send_credit(Credit {
        packets: 1,
        bytes: 2,
    })
    .unwrap();
    let mut rx2 = PacketBatch::new(LeaseId(0));
    assert_eq!(
        w.recv_data(&mut rx2).unwrap(),
        DataEvent::Credit(Credit {
            packets: 1,
            bytes: 2
        })
    );
}

#[test]
fn oversized_length_is_refused_from_the_header_alone() {
    let (a, mut b) = pair_with_hello(ChannelKind::BrokerWorker, Role::Worker);
    let mut ch = Channel::<broker_worker::BrokerEnd>::open(a).unwrap();
    // Claims 4 GiB - 1 and sends nothing after the header: reading the body would block
    // forever, so returning at all proves the limit was checked first.
    b.write_all(&[0xff, 0xff, 0xff, 0xff, SCHEMA_VERSION])
        .unwrap();
    let e = ch.recv().unwrap_err();
    assert!(
        matches!(
            e,
            ChannelError::Frame(ipc_schema::frame::FrameError::TooLarge { .. })
        ),
        "{e}"
    );
    assert!(e.is_bad_message());
    assert_eq!(ch.bad_messages(), 1);
    // The channel is dead and the peer sees the end of the stream.
    assert!(matches!(
        ch.recv(),
        Err(ChannelError::Poisoned(PoisonCause::BadMessage))
    ));
    let mut rest = Vec::new();
    b.read_to_end(&mut rest).unwrap();
}

#[test]
fn one_byte_over_the_limit_is_refused() {
    let (a, mut b) = pair_with_hello(ChannelKind::Control, Role::Cli);
    let mut ch = Channel::<control::BrokerEnd>::open(a).unwrap();
    let len = u32::try_from(control::BrokerEnd::MAX_RECV + 1).unwrap();
    let mut h = len.to_le_bytes().to_vec();
    h.push(SCHEMA_VERSION);
    b.write_all(&h).unwrap();
    assert!(matches!(ch.recv(), Err(ChannelError::Frame(_))));
}

#[test]
fn truncated_frames_fail_typed() {
    let body = postcard::to_stdvec(&WorkerToBroker::SealTicket {
        request: Default_id(),
    })
    .unwrap();
    let full = frame(&body, SCHEMA_VERSION);
    for cut in 1..full.len() {
        let (a, mut b) = pair_with_hello(ChannelKind::BrokerWorker, Role::Worker);
        let mut ch = Channel::<broker_worker::BrokerEnd>::open(a).unwrap();
        common::read_hello(&mut b);
        b.write_all(&full[..cut]).unwrap();
        drop(b);
        let e = ch.recv().unwrap_err();
        let part = if cut < 5 {
            FramePart::Header
        } else {
            FramePart::Body
        };
        assert!(
            matches!(e, ChannelError::Truncated { part: p, got, .. } if p == part && got > 0 || cut == 5),
            "{cut}: {e}"
        );
        assert!(ch.recv().is_err());
    }
    // A clean end between frames is not a bad message.
    let (a, mut b) = pair_with_hello(ChannelKind::BrokerWorker, Role::Worker);
    let mut ch = Channel::<broker_worker::BrokerEnd>::open(a).unwrap();
    common::read_hello(&mut b);
    drop(b);
    let e = ch.recv().unwrap_err();
    assert!(matches!(e, ChannelError::Closed) && !e.is_bad_message());
}

#[allow(non_snake_case)]
fn Default_id() -> ipc_schema::messages::common::RequestId {
    ipc_schema::messages::common::RequestId(1)
}

#[test]
fn malformed_message_poisons_the_channel() {
    for bad in [
        frame(&[0xee], SCHEMA_VERSION),     // unknown variant
        frame(&[4, 1, 2], SCHEMA_VERSION),  // SealTicket + a trailing byte
        frame(&[4, 1], SCHEMA_VERSION + 1), // wrong version byte
        frame(&[], SCHEMA_VERSION),         // body missing
    ] {
        let (a, mut b) = pair_with_hello(ChannelKind::BrokerWorker, Role::Worker);
        let mut ch = Channel::<broker_worker::BrokerEnd>::open(a).unwrap();
        // A bad frame followed by a good one: the good one must never be read.
        b.write_all(&bad).unwrap();
        let good = postcard::to_stdvec(&WorkerToBroker::SealTicket {
            request: Default_id(),
        })
        .unwrap();
        b.write_all(&frame(&good, SCHEMA_VERSION)).unwrap();
        let e = ch.recv().unwrap_err();
        assert!(e.is_bad_message(), "{e}");
        for _ in 0..3 {
            assert!(matches!(
                ch.recv(),
                Err(ChannelError::Poisoned(PoisonCause::BadMessage))
            ));
            let msg = BrokerToWorker::Shutdown {
                reason: ShutdownReason::Misbehaved,
            };
            assert!(matches!(ch.send(&msg, &[]), Err(ChannelError::Poisoned(_))));
        }
    }
    assert!(ipc_schema::channel::bad_messages_total() >= 4);
}

#[test]
fn invalid_lease_is_a_bad_message() {
    let mut lease = samples::lease();
    lease.mtu = 10;
    let msg = BrokerToWorker::TicketOpened {
        request: Default_id(),
        outcome: broker_worker::TicketOutcome::Valid { lease },
    };
    let (a, mut b) = pair_with_hello(ChannelKind::BrokerWorker, Role::Broker);
    let mut ch = Channel::<broker_worker::WorkerEnd>::open(a).unwrap();
    b.write_all(&frame(&postcard::to_stdvec(&msg).unwrap(), SCHEMA_VERSION))
        .unwrap();
    assert!(matches!(ch.recv(), Err(ChannelError::Malformed(_))));
    // And the sender refuses to send it in the first place, without dying.
    let (mut broker, _worker) = open_pair::<broker_worker::BrokerEnd, broker_worker::WorkerEnd>();
    assert!(matches!(
        broker.send(&msg, &[]),
        Err(ChannelError::SendInvalid(_))
    ));
    assert!(broker.poisoned().is_none());
}

#[test]
fn version_mismatch_names_both_versions_and_kinds() {
    let (a, mut b) = UnixStream::pair().unwrap();
    let theirs = ipc_schema::hello::Hello {
        magic: ipc_schema::hello::HELLO_MAGIC,
        schema_version: SCHEMA_VERSION + 1,
        kind: ChannelKind::WorkerNetstack.code(),
        role: Role::Netstack.code(),
    };
    b.write_all(&frame(
        &postcard::to_stdvec(&theirs).unwrap(),
        SCHEMA_VERSION + 1,
    ))
    .unwrap();
    let e = Channel::<broker_worker::BrokerEnd>::open(a).unwrap_err();
    let text = e.to_string();
    assert!(
        matches!(e, ChannelError::Hello(HelloError::Mismatch { .. })),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "schema v{SCHEMA_VERSION} on channel broker-worker as broker"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "schema v{} on channel worker-netstack as netstack",
            SCHEMA_VERSION + 1
        )),
        "{text}"
    );
}

#[test]
fn wrong_channel_kind_fails_on_both_sides() {
    let (a, b) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || Channel::<data::NetstackEnd>::open(b).map(|_| ()));
    let ours = Channel::<broker_worker::BrokerEnd>::open(a).map(|_| ());
    let theirs = t.join().unwrap();
    for r in [ours, theirs] {
        let text = r.unwrap_err().to_string();
        assert!(
            text.contains("broker-worker") && text.contains("worker-netstack"),
            "{text}"
        );
    }
}

#[test]
fn garbage_instead_of_hello_is_refused() {
    let (a, mut b) = UnixStream::pair().unwrap();
    b.write_all(&frame(b"GET / HTTP", SCHEMA_VERSION)).unwrap();
    let e = Channel::<control::BrokerEnd>::open(a).unwrap_err();
    assert!(
        matches!(
            e,
            ChannelError::Hello(HelloError::NotAHello(_)) | ChannelError::Frame(_)
        ),
        "{e}"
    );
}

#[test]
fn send_checks_descriptor_count_and_size_without_dying() {
    let (mut broker, _worker) = open_pair::<broker_worker::BrokerEnd, broker_worker::WorkerEnd>();
    let msg = BrokerToWorker::AdoptTransport {
        kind: broker_worker::TransportKind::Stream,
        first_record: None,
    };
    assert!(matches!(
        broker.send(&msg, &[]),
        Err(ChannelError::SendFdMismatch {
            expected: 1,
            got: 0
        })
    ));
    assert!(broker.poisoned().is_none());

    let (mut cli, _b) = open_pair::<control::CliEnd, control::BrokerEnd>();
    let long = control::ControlRequest::PairingApprove {
        code: ipc_schema::bounded::BoundedString::new("x".repeat(16)).unwrap(),
    };
    cli.send(&long, &[]).unwrap();
    // A reply larger than the control reply limit cannot be sent.
    let (mut broker, _c) = open_pair::<control::BrokerEnd, control::CliEnd>();
    let many: Vec<_> = (0..512)
        .map(|i| control::PeerInfo {
            key: ipc_schema::messages::common::PeerKey([i as u8; 32]),
            name: Some(ipc_schema::bounded::BoundedString::new("n".repeat(64)).unwrap()),
            state: control::PeerState::Trusted,
            lease: Some(LeaseId(u64::MAX)),
        })
        .collect();
    let reply = control::ControlReply::Peers(ipc_schema::bounded::BoundedVec::new(many).unwrap());
    // 512 × ~108 bytes fits in 128 KiB: the limit is sized for the largest listing.
    broker.send(&reply, &[]).unwrap();
}

/// Fails to compile when a variant is added without a sample (the match is exhaustive),
/// and fails at run time when a listed variant has no sample.
macro_rules! assert_samples_cover {
    ($samples:expr, $ty:ident { $($v:ident),* $(,)? }) => {{
        let names: &[&str] = &[$(stringify!($v)),*];
        let mut seen = vec![false; names.len()];
        for m in &$samples {
            let name = match m { $($ty::$v { .. } => stringify!($v)),* };
            let i = names.iter().position(|n| *n == name).unwrap();
            seen[i] = true;
        }
        for (n, s) in names.iter().zip(seen) {
            assert!(s, "no sample of {}::{n}", stringify!($ty));
        }
    }};
}

#[test]
fn samples_cover_every_variant() {
    use broker_netstack::{BrokerToNetstack, NetstackToBroker};
    use control::{ControlReply, ControlRequest};
    use data::DataMsg;
    use session_helper::{HelperToSession, SessionToHelper};
    assert_samples_cover!(
        samples::broker_to_worker(),
        BrokerToWorker {
            AdoptTransport,
            AttachDataPath,
            HandshakeBound,
            HandshakeRefused,
            DhResult,
            DhRefused,
            Decision,
            TicketSealed,
            TicketOpened,
            LeaseChanged,
            RoamProbe,
            MoveTransport,
            ReportCounters,
            Shutdown,
        }
    );
    assert_samples_cover!(
        samples::worker_to_broker(),
        WorkerToBroker {
            ShowHandshake,
            DhRequest,
            Finished,
            SealTicket,
            OpenTicket,
            Counters,
            RoamIndex,
            RoamVerdict,
            SessionEnded,
        }
    );
    assert_samples_cover!(samples::data(), DataMsg { Packets, Credit });
    assert_samples_cover!(
        samples::broker_to_netstack(),
        BrokerToNetstack {
            LeaseAdded,
            LeaseRemoved,
            PeerRevoked,
            Egress,
            ReportCounters,
            Shutdown,
        }
    );
    assert_samples_cover!(
        samples::netstack_to_broker(),
        NetstackToBroker {
            LeaseDropped,
            Counters
        }
    );
    assert_samples_cover!(
        samples::session_to_helper(),
        SessionToHelper {
            OpenTun,
            SetRoutes,
            SetDns,
            SetMtu,
            TearDown
        }
    );
    assert_samples_cover!(
        samples::helper_to_session(),
        HelperToSession {
            TunOpened,
            Done,
            Refused
        }
    );
    assert_samples_cover!(
        samples::control_request(),
        ControlRequest {
            Status,
            PeersList,
            PeersAdd,
            PeersRevoke,
            PairingList,
            PairingApprove,
            PairingDeny,
        }
    );
    assert_samples_cover!(
        samples::control_reply(),
        ControlReply {
            Status,
            Peers,
            Pairings,
            Ok,
            Error
        }
    );
}
