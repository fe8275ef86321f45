//! Every limit is large enough for the largest valid message of its direction, so a
//! sender can only hit `SendTooLarge` through a bug, never through valid input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, Ipv6Addr};

use ipc_schema::bounded::{BoundedBytes, BoundedString, BoundedVec};
use ipc_schema::limits::*;
use ipc_schema::messages::broker_worker::{
    self as bw, BrokerToWorker, Decision, HandshakeId, WorkerToBroker,
};
use ipc_schema::messages::common::{PeerKey, RequestId};
use ipc_schema::messages::control::{
    self, ControlReply, ControlRequest, PairingInfo, PeerInfo, PeerRef, PeerState,
};
use ipc_schema::messages::session_helper::{self as sh, HelperToSession, SessionToHelper};
use ipc_schema::messages::{broker_netstack as bn, broker_netstack::BrokerToNetstack};
use ipc_schema::oracle::HandshakePattern;
use ipc_schema::{Message, Protocol};
use serde::Serialize;
use vshp::lease::{Ipv4Prefix, Ipv6Prefix, Lease, LeaseId, MAX_LEASE_DNS, MAX_LEASE_ROUTES, Route};

fn fits<P: Protocol>(msgs: &[P::Send])
where
    P::Send: Serialize,
{
    for m in msgs {
        m.validate().unwrap();
        let len = 1 + postcard::to_stdvec(m).unwrap().len();
        assert!(len <= P::MAX_SEND, "{len} > {} for {m:?}", P::MAX_SEND);
    }
}

fn v6() -> Ipv6Prefix {
    Ipv6Prefix {
        addr: Ipv6Addr::from(u128::MAX),
        len: 128,
    }
}

fn worst_lease() -> Lease {
    Lease {
        id: LeaseId(u64::MAX),
        ipv4: Ipv4Prefix {
            addr: [255; 4].into(),
            len: 32,
        },
        ipv6: Some(v6()),
        dns: vec![IpAddr::V6(Ipv6Addr::from(u128::MAX)); MAX_LEASE_DNS],
        mtu: u16::MAX - 535,
        routes: vec![Route::V6(v6()); MAX_LEASE_ROUTES],
        expires_at_unix: u64::MAX,
    }
}

fn s<const N: usize>() -> BoundedString<N> {
    BoundedString::new("x".repeat(N)).unwrap()
}

#[test]
fn largest_valid_messages_fit_their_limits() {
    let h = HandshakeId(u64::MAX);
    let r = RequestId(u64::MAX);
    let key = PeerKey([0xff; 32]);
    fits::<bw::BrokerEnd>(&[
        BrokerToWorker::Decision {
            handshake: h,
            decision: Decision::Admit {
                lease: worst_lease(),
                resumed: true,
            },
        },
        BrokerToWorker::AdoptTransport {
            kind: bw::TransportKind::Datagram,
            first_record: Some(BoundedBytes::new(vec![0xff; MAX_HANDSHAKE_MSG]).unwrap()),
        },
        BrokerToWorker::TicketSealed {
            request: r,
            ticket: BoundedBytes::new(vec![0; MAX_TICKET_LEN]).unwrap(),
        },
    ]);
    fits::<bw::WorkerEnd>(&[
        WorkerToBroker::ShowHandshake {
            handshake: h,
            pattern: HandshakePattern::Ik,
            first_message: BoundedBytes::new(vec![0; MAX_HANDSHAKE_MSG]).unwrap(),
        },
        WorkerToBroker::Finished {
            handshake: h,
            peer: key,
            handshake_hash: [0xff; 32],
            ticket: Some(BoundedBytes::new(vec![0; MAX_TICKET_LEN]).unwrap()),
            device_name: Some(s()),
            platform: Some(s()),
        },
    ]);
    fits::<bn::BrokerEnd>(&[BrokerToNetstack::LeaseAdded {
        lease: worst_lease(),
    }]);
    fits::<sh::SessionEnd>(&[
        SessionToHelper::SetRoutes {
            routes: BoundedVec::new(vec![Route::V6(v6()); MAX_LEASE_ROUTES]).unwrap(),
            gateway: IpAddr::V6(Ipv6Addr::from(u128::MAX)),
        },
        SessionToHelper::SetDns {
            servers: BoundedVec::new(vec![IpAddr::V6(Ipv6Addr::from(u128::MAX)); MAX_LEASE_DNS])
                .unwrap(),
        },
    ]);
    fits::<sh::HelperEnd>(&[HelperToSession::TunOpened {
        ifname: s(),
        ifindex: u32::MAX,
        vnet_hdr: true,
    }]);
    fits::<control::CliEnd>(&[
        ControlRequest::PeersAdd {
            key,
            name: Some(s()),
        },
        ControlRequest::PeersRevoke {
            peer: PeerRef::Name(s()),
        },
        ControlRequest::PairingApprove { code: s() },
    ]);
    let peer = PeerInfo {
        key,
        name: Some(s()),
        state: PeerState::Revoked,
        lease: Some(LeaseId(u64::MAX)),
    };
    let pairing = PairingInfo {
        code: s(),
        key,
        requested_at_unix: u64::MAX,
        device_name: Some(s()),
        platform: Some(s()),
    };
    fits::<control::BrokerEnd>(&[
        ControlReply::Peers(BoundedVec::new(vec![peer; MAX_LISTED]).unwrap()),
        ControlReply::Pairings(BoundedVec::new(vec![pairing; MAX_LISTED]).unwrap()),
        ControlReply::Error {
            kind: control::ControlErrorKind::Internal,
            detail: s(),
        },
    ]);
}
