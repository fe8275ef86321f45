//! CLI ↔ broker control socket (`vpnshare status`, `peers …`, `pairing …`).
//!
//! Requests are tiny and limited to 1 KiB; replies may list up to `MAX_LISTED` peers or
//! pairing requests. The broker authenticates the caller by `SO_PEERCRED` before it
//! reads a request.

use serde::{Deserialize, Serialize};
use vshp::lease::LeaseId;

use crate::bounded::{BoundedString, BoundedVec};
use crate::codec::Message;
use crate::limits::{
    MAX_CODE_LEN, MAX_DETAIL_LEN, MAX_FRAME_CONTROL_REPLY, MAX_FRAME_CONTROL_REQUEST, MAX_LISTED,
    MAX_NAME_LEN,
};
use crate::messages::broker_netstack::NetstackCounters;
use crate::messages::broker_worker::WorkerCounters;
use crate::messages::channel_ends;
use crate::messages::common::PeerKey;

pub type PeerName = BoundedString<MAX_NAME_LEN>;
pub type PairingCode = BoundedString<MAX_CODE_LEN>;

/// Names a peer on the command line: its key or its name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRef {
    Key(PeerKey),
    Name(PeerName),
}

/// CLI → broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    Status,
    PeersList,
    PeersAdd {
        key: PeerKey,
        name: Option<PeerName>,
    },
    PeersRevoke {
        peer: PeerRef,
    },
    PairingList,
    PairingApprove {
        code: PairingCode,
    },
    PairingDeny {
        code: PairingCode,
    },
}

/// Broker → CLI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlReply {
    /// Boxed: the report is far larger than the other replies.
    Status(Box<StatusReport>),
    Peers(BoundedVec<PeerInfo, MAX_LISTED>),
    Pairings(BoundedVec<PairingInfo, MAX_LISTED>),
    Ok,
    Error {
        kind: ControlErrorKind,
        detail: BoundedString<MAX_DETAIL_LEN>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlErrorKind {
    NoSuchPeer,
    NoSuchPairing,
    AlreadyExists,
    NotAllowed,
    Internal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerState {
    Trusted,
    Revoked,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub key: PeerKey,
    pub name: Option<PeerName>,
    pub state: PeerState,
    /// The lease of its live session, if it is connected.
    pub lease: Option<LeaseId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairingInfo {
    pub code: PairingCode,
    pub key: PeerKey,
    pub requested_at_unix: u64,
    /// The device name and platform the peer's AUTH claimed, if any.
    pub device_name: Option<BoundedString<MAX_NAME_LEN>>,
    pub platform: Option<BoundedString<MAX_NAME_LEN>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SandboxState {
    /// Workers and netstack run confined (seccomp, no capabilities).
    Confined,
    /// Confinement is not available on this system; the status says so loudly.
    Unconfined,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub gateway_key: PeerKey,
    /// False with VPN-only egress and no VPN: sharing is unavailable (design §5.7).
    pub sharing_available: bool,
    pub sandbox: SandboxState,
    pub connected_peers: u32,
    pub pending_pairings: u32,
    pub workers_restarted: u64,
    pub ipc_bad_messages: u64,
    pub netstack: NetstackCounters,
    /// Every worker's counters added up: live sessions' latest reports and the final
    /// reports of ended ones (drops by reason: spoofed, forbidden, bad records, ...).
    pub workers: WorkerCounters,
}

impl Message for ControlRequest {}
impl Message for ControlReply {}

channel_ends! {
    Control,
    CliEnd(Cli) sends ControlRequest, max MAX_FRAME_CONTROL_REQUEST;
    BrokerEnd(Broker) sends ControlReply, max MAX_FRAME_CONTROL_REPLY;
}
