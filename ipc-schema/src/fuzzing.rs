//! Fuzz target bodies and their seed messages (used by `fuzz/`, the corpus replay test
//! and the round-trip tests). Each target decodes what one end receives from its peer;
//! whatever decodes must re-encode to a message that decodes to the same value.
//! A broken invariant must crash the fuzzer, so this module may panic; nothing else
//! in the crate may.
#![allow(clippy::panic)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::net::UnixStream;

use serde::Serialize;
use vshp::lease::{Ipv4Prefix, Ipv6Prefix, Lease, LeaseId, Route};

use crate::batch::PacketBatch;
use crate::bounded::{BoundedBytes, BoundedString, BoundedVec};
use crate::codec::{Message, decode_body, to_vec};
use crate::messages::broker_netstack::{
    BrokerToNetstack, EgressState, NetstackCounters, NetstackToBroker,
};
use crate::messages::broker_worker::{
    BrokerToWorker, Decision, HandshakeId, Refusal, SessionEnd, TicketOutcome, TicketRefusal,
    TransportKind, WorkerCounters, WorkerToBroker,
};
use crate::messages::common::{PeerKey, RequestId, ShutdownReason};
use crate::messages::control::{
    ControlErrorKind, ControlReply, ControlRequest, PairingInfo, PeerInfo, PeerRef, PeerState,
    SandboxState, StatusReport,
};
use crate::messages::data::{Credit, DataMsg, decode_data_into};
use crate::messages::session_helper::{HelperRefusal, HelperToSession, SessionToHelper};
use crate::messages::{broker_worker, data};
use crate::oracle::{DhOp, HandshakePattern, OracleRefusal};
use crate::{Channel, SCHEMA_VERSION};

fn round_trip<M: Message + PartialEq>(data: &[u8]) {
    if let Ok(msg) = decode_body::<M>(data) {
        let again = to_vec(&msg).unwrap_or_default();
        assert_eq!(
            decode_body::<M>(&again).ok().as_ref(),
            Some(&msg),
            "re-encoding changed the message"
        );
    }
}

pub fn worker_from_broker(data: &[u8]) {
    round_trip::<BrokerToWorker>(data);
}

pub fn broker_from_worker(data: &[u8]) {
    round_trip::<WorkerToBroker>(data);
}

/// Also covers `worker_from_netstack`: both directions carry `DataMsg`. Checks that the
/// hand-written batch decoder accepts exactly what the serde reference accepts.
pub fn netstack_from_worker(data: &[u8]) {
    round_trip::<DataMsg>(data);
    // Empty, so a run does not pay for a full batch's buffers on every input.
    let mut batch = PacketBatch::with_capacity(LeaseId(0), 0, 0);
    let fast = decode_data_into(data, &mut batch);
    let reference = decode_body::<DataMsg>(data);
    match (fast, reference) {
        (Ok(data::DataEvent::Packets), Ok(DataMsg::Packets(b))) => assert_eq!(batch, b),
        (Ok(data::DataEvent::Credit(a)), Ok(DataMsg::Credit(b))) => assert_eq!(a, b),
        (Err(_), Err(_)) => {}
        (fast, reference) => {
            panic!("fast and reference decoders disagree: {fast:?} vs {reference:?}")
        }
    }
}

pub fn netstack_from_broker(data: &[u8]) {
    round_trip::<BrokerToNetstack>(data);
}

pub fn broker_from_netstack(data: &[u8]) {
    round_trip::<NetstackToBroker>(data);
}

pub fn helper_from_session(data: &[u8]) {
    round_trip::<SessionToHelper>(data);
}

pub fn session_from_helper(data: &[u8]) {
    round_trip::<HelperToSession>(data);
}

pub fn broker_from_control(data: &[u8]) {
    round_trip::<ControlRequest>(data);
}

pub fn cli_from_broker(data: &[u8]) {
    round_trip::<ControlReply>(data);
}

/// A whole byte stream from a worker, hello included, through a real broker channel:
/// framing, limits and the bad-message rule. Must end in an error, never a panic.
pub fn broker_channel_stream(data: &[u8]) {
    let Ok((ours, mut theirs)) = UnixStream::pair() else {
        return;
    };
    // Inputs are small (libFuzzer's default max_len), so they fit the socket buffer.
    if std::io::Write::write_all(&mut theirs, data).is_err() {
        return;
    }
    let _ = theirs.shutdown(std::net::Shutdown::Write);
    let Ok(mut ch) = Channel::<broker_worker::BrokerEnd>::open(ours) else {
        return;
    };
    for _ in 0..64 {
        if ch.recv().is_err() {
            assert!(ch.recv().is_err(), "a failed channel must stay failed");
            return;
        }
    }
}

/// Every target, by the name its fuzz binary and corpus directory use.
/// A fuzz target body.
pub type Target = fn(&[u8]);

pub const TARGETS: &[(&str, Target)] = &[
    ("worker_from_broker", worker_from_broker),
    ("broker_from_worker", broker_from_worker),
    ("netstack_from_worker", netstack_from_worker),
    ("netstack_from_broker", netstack_from_broker),
    ("broker_from_netstack", broker_from_netstack),
    ("helper_from_session", helper_from_session),
    ("session_from_helper", session_from_helper),
    ("broker_from_control", broker_from_control),
    ("cli_from_broker", cli_from_broker),
    ("broker_channel_stream", broker_channel_stream),
];

fn enc<T: Serialize>(items: &[T]) -> Vec<Vec<u8>> {
    items.iter().filter_map(|m| to_vec(m).ok()).collect()
}

/// A few valid encodings per target: the seed corpus.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "worker_from_broker" => enc(&samples::broker_to_worker()),
        "broker_from_worker" => enc(&samples::worker_to_broker()),
        "netstack_from_worker" => enc(&samples::data()),
        "netstack_from_broker" => enc(&samples::broker_to_netstack()),
        "broker_from_netstack" => enc(&samples::netstack_to_broker()),
        "helper_from_session" => enc(&samples::session_to_helper()),
        "session_from_helper" => enc(&samples::helper_to_session()),
        "broker_from_control" => enc(&samples::control_request()),
        "cli_from_broker" => enc(&samples::control_reply()),
        "broker_channel_stream" => {
            // A worker's hello, then one message per frame.
            let hello =
                crate::hello::Hello::new(crate::ChannelKind::BrokerWorker, crate::Role::Worker);
            let mut stream = frame(&to_vec(&hello).unwrap_or_default());
            for body in enc(&samples::worker_to_broker()) {
                stream.extend(frame(&body));
            }
            vec![stream]
        }
        _ => Vec::new(),
    }
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = crate::frame::encode_header(body.len(), SCHEMA_VERSION)
        .map(Vec::from)
        .unwrap_or_default();
    out.extend_from_slice(body);
    out
}

/// One value of every message variant (tests and seeds).
pub mod samples {
    use super::*;

    pub fn lease() -> Lease {
        Lease {
            id: LeaseId(7),
            ipv4: Ipv4Prefix {
                addr: Ipv4Addr::new(100, 64, 0, 2),
                len: 24,
            },
            ipv6: Some(Ipv6Prefix {
                addr: Ipv6Addr::new(0xfd00, 0x5653, 0, 0, 0, 0, 0, 2),
                len: 64,
            }),
            dns: vec![IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1))],
            mtu: 1400,
            routes: vec![
                Route::V4(Ipv4Prefix {
                    addr: Ipv4Addr::UNSPECIFIED,
                    len: 0,
                }),
                Route::V6(Ipv6Prefix {
                    addr: Ipv6Addr::UNSPECIFIED,
                    len: 0,
                }),
            ],
            expires_at_unix: 1_800_000_000,
        }
    }

    fn ticket() -> BoundedBytes<{ crate::limits::MAX_TICKET_LEN }> {
        BoundedBytes::new(vec![0xa5; 96]).unwrap_or_default()
    }

    fn name(s: &str) -> BoundedString<{ crate::limits::MAX_NAME_LEN }> {
        BoundedString::new(s).unwrap_or_default()
    }

    pub fn broker_to_worker() -> Vec<BrokerToWorker> {
        let h = HandshakeId(3);
        vec![
            BrokerToWorker::AdoptTransport {
                kind: TransportKind::Datagram,
                first_record: BoundedBytes::new(vec![1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 9]).ok(),
            },
            BrokerToWorker::AdoptTransport {
                kind: TransportKind::Stream,
                first_record: None,
            },
            BrokerToWorker::AttachDataPath { lease: LeaseId(7) },
            BrokerToWorker::HandshakeBound { handshake: h },
            BrokerToWorker::HandshakeRefused {
                handshake: h,
                reason: OracleRefusal::RateLimited,
            },
            BrokerToWorker::DhResult {
                handshake: h,
                op: DhOp::Es,
                shared: [9; 32],
            },
            BrokerToWorker::DhRefused {
                handshake: h,
                op: DhOp::Ss,
                reason: OracleRefusal::AlreadyUsed,
            },
            BrokerToWorker::Decision {
                handshake: h,
                decision: Decision::Admit {
                    lease: lease(),
                    resumed: false,
                },
            },
            BrokerToWorker::Decision {
                handshake: h,
                decision: Decision::Pending,
            },
            BrokerToWorker::Decision {
                handshake: h,
                decision: Decision::Refuse(Refusal::Revoked),
            },
            BrokerToWorker::Decision {
                handshake: h,
                decision: Decision::Refuse(Refusal::BadTicket),
            },
            BrokerToWorker::LeaseChanged { lease: lease() },
            BrokerToWorker::RoamProbe {
                probe: 4,
                record: BoundedBytes::new(vec![1, 4, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 1])
                    .unwrap_or_default(),
            },
            BrokerToWorker::MoveTransport { probe: 4 },
            BrokerToWorker::TicketSealed {
                request: RequestId(1),
                ticket: ticket(),
            },
            BrokerToWorker::TicketOpened {
                request: RequestId(2),
                outcome: TicketOutcome::Valid { lease: lease() },
            },
            BrokerToWorker::TicketOpened {
                request: RequestId(3),
                outcome: TicketOutcome::Refused(TicketRefusal::Expired),
            },
            BrokerToWorker::ReportCounters,
            BrokerToWorker::Shutdown {
                reason: ShutdownReason::PeerRevoked,
            },
        ]
    }

    pub fn worker_to_broker() -> Vec<WorkerToBroker> {
        let h = HandshakeId(3);
        vec![
            WorkerToBroker::ShowHandshake {
                handshake: h,
                pattern: HandshakePattern::Ik,
                first_message: BoundedBytes::new(vec![7; 96]).unwrap_or_default(),
            },
            WorkerToBroker::DhRequest {
                handshake: h,
                op: DhOp::Es,
                remote: [7; 32],
            },
            WorkerToBroker::Finished {
                handshake: h,
                peer: PeerKey([1; 32]),
                handshake_hash: [2; 32],
                ticket: None,
                device_name: None,
                platform: None,
            },
            WorkerToBroker::Finished {
                handshake: h,
                peer: PeerKey([1; 32]),
                handshake_hash: [2; 32],
                ticket: Some(ticket()),
                device_name: Some(BoundedString::new("laptop").unwrap_or_default()),
                platform: Some(BoundedString::new("Linux").unwrap_or_default()),
            },
            WorkerToBroker::SealTicket {
                request: RequestId(4),
            },
            WorkerToBroker::OpenTicket {
                request: RequestId(5),
                peer: PeerKey([1; 32]),
                ticket: ticket(),
            },
            WorkerToBroker::Counters(WorkerCounters {
                records_in: 10,
                bad_records: 1,
                ..Default::default()
            }),
            WorkerToBroker::RoamIndex { index: 0x0102_0304 },
            WorkerToBroker::RoamVerdict {
                probe: 4,
                authenticated: true,
            },
            WorkerToBroker::SessionEnded {
                reason: SessionEnd::Timeout,
            },
        ]
    }

    pub fn batch() -> PacketBatch {
        let mut b = PacketBatch::new(LeaseId(7));
        for n in [20usize, 1400, 576] {
            let _ = b.push(&vec![0x45; n]);
        }
        b
    }

    pub fn data() -> Vec<DataMsg> {
        vec![
            DataMsg::Packets(batch()),
            DataMsg::Credit(Credit {
                packets: 64,
                bytes: 128 * 1024,
            }),
        ]
    }

    pub fn broker_to_netstack() -> Vec<BrokerToNetstack> {
        vec![
            BrokerToNetstack::LeaseAdded { lease: lease() },
            BrokerToNetstack::LeaseRemoved { lease: LeaseId(7) },
            BrokerToNetstack::PeerRevoked { lease: LeaseId(7) },
            BrokerToNetstack::Egress(EgressState::VpnUp { ifindex: 12 }),
            BrokerToNetstack::Egress(EgressState::VpnDown),
            BrokerToNetstack::Egress(EgressState::Any),
            BrokerToNetstack::ReportCounters,
            BrokerToNetstack::Shutdown {
                reason: ShutdownReason::GatewayStopping,
            },
        ]
    }

    pub fn netstack_to_broker() -> Vec<NetstackToBroker> {
        vec![
            NetstackToBroker::LeaseDropped {
                lease: LeaseId(7),
                flows_dropped: 3,
            },
            NetstackToBroker::Counters(NetstackCounters {
                tcp_flows: 2,
                dns_queries: 5,
                ..Default::default()
            }),
        ]
    }

    pub fn session_to_helper() -> Vec<SessionToHelper> {
        let l = lease();
        vec![
            SessionToHelper::OpenTun {
                ipv4: l.ipv4,
                ipv6: l.ipv6,
                mtu: l.mtu,
            },
            SessionToHelper::SetRoutes {
                routes: BoundedVec::new(l.routes).unwrap_or_default(),
                gateway: IpAddr::V4(Ipv4Addr::new(192, 168, 42, 129)),
            },
            SessionToHelper::SetDns {
                servers: BoundedVec::new(l.dns).unwrap_or_default(),
            },
            SessionToHelper::SetMtu { mtu: 1300 },
            SessionToHelper::TearDown,
        ]
    }

    pub fn helper_to_session() -> Vec<HelperToSession> {
        vec![
            HelperToSession::TunOpened {
                ifname: BoundedString::new("vshare0").unwrap_or_default(),
                ifindex: 5,
                vnet_hdr: true,
            },
            HelperToSession::Done,
            HelperToSession::Refused(HelperRefusal::SecondTun),
            HelperToSession::Refused(HelperRefusal::System { errno: 1 }),
        ]
    }

    pub fn control_request() -> Vec<ControlRequest> {
        let code = BoundedString::new("ABC-123").unwrap_or_default();
        vec![
            ControlRequest::Status,
            ControlRequest::PeersList,
            ControlRequest::PeersAdd {
                key: PeerKey([4; 32]),
                name: Some(name("laptop")),
            },
            ControlRequest::PeersRevoke {
                peer: PeerRef::Name(name("laptop")),
            },
            ControlRequest::PeersRevoke {
                peer: PeerRef::Key(PeerKey([4; 32])),
            },
            ControlRequest::PairingList,
            ControlRequest::PairingApprove { code: code.clone() },
            ControlRequest::PairingDeny { code },
        ]
    }

    pub fn control_reply() -> Vec<ControlReply> {
        vec![
            ControlReply::Status(Box::new(StatusReport {
                gateway_key: PeerKey([8; 32]),
                sharing_available: true,
                sandbox: SandboxState::Confined,
                connected_peers: 1,
                pending_pairings: 0,
                workers_restarted: 0,
                ipc_bad_messages: 0,
                netstack: NetstackCounters::default(),
                workers: WorkerCounters::default(),
            })),
            ControlReply::Peers(
                BoundedVec::new(vec![PeerInfo {
                    key: PeerKey([4; 32]),
                    name: Some(name("laptop")),
                    state: PeerState::Trusted,
                    lease: Some(LeaseId(7)),
                }])
                .unwrap_or_default(),
            ),
            ControlReply::Pairings(
                BoundedVec::new(vec![PairingInfo {
                    code: BoundedString::new("ABC-123").unwrap_or_default(),
                    key: PeerKey([5; 32]),
                    requested_at_unix: 1_800_000_000,
                    device_name: Some(BoundedString::new("laptop").unwrap_or_default()),
                    platform: Some(BoundedString::new("Linux").unwrap_or_default()),
                }])
                .unwrap_or_default(),
            ),
            ControlReply::Ok,
            ControlReply::Error {
                kind: ControlErrorKind::NoSuchPeer,
                detail: BoundedString::new("no peer named laptop").unwrap_or_default(),
            },
        ]
    }
}
