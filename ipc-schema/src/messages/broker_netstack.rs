//! Broker ↔ netstack.
//!
//! The broker tells the netstack which leases exist (each with the netstack's end of
//! that peer's data channel), which peers to cut off now, and whether egress is
//! allowed; the netstack reports counters. The netstack decides nothing.

use serde::{Deserialize, Serialize};
use vshp::lease::{Lease, LeaseId};

use crate::codec::{InvalidMessage, Message};
use crate::limits::MAX_FRAME_BROKER_NETSTACK;
use crate::messages::channel_ends;
use crate::messages::common::ShutdownReason;

/// Broker → netstack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BrokerToNetstack {
    /// A peer was admitted under this lease: **carries 1 descriptor**, the netstack's
    /// end of the peer's data channel.
    LeaseAdded {
        lease: Lease,
    },
    /// The session ended normally: close the lease's flows gracefully.
    LeaseRemoved {
        lease: LeaseId,
    },
    /// The peer was revoked: drop its flows and data channel now (design §5.5).
    PeerRevoked {
        lease: LeaseId,
    },
    /// Whether traffic may leave, and through what.
    Egress(EgressState),
    ReportCounters,
    Shutdown {
        reason: ShutdownReason,
    },
}

/// Netstack → broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetstackToBroker {
    /// A lease's flows are gone (after `LeaseRemoved` or `PeerRevoked`).
    LeaseDropped {
        lease: LeaseId,
        flows_dropped: u32,
    },
    Counters(NetstackCounters),
}

/// The egress policy and what the broker currently knows about the VPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EgressState {
    /// VPN-only (the default) and a VPN carries the route: forward, bound to it.
    VpnUp { ifindex: u32 },
    /// VPN-only and no VPN: forward nothing (design §5.7); pairing still works.
    VpnDown,
    /// `--egress any`: forward through whatever route the OS has.
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetstackCounters {
    pub tcp_flows: u64,
    pub udp_flows: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub dns_queries: u64,
    pub dropped_no_egress: u64,
    pub dropped_bad_packet: u64,
    pub dropped_wrong_lease: u64,
    pub dropped_no_credit: u64,
}

impl Message for BrokerToNetstack {
    fn fd_count(&self) -> usize {
        match self {
            Self::LeaseAdded { .. } => 1,
            _ => 0,
        }
    }

    fn validate(&self) -> Result<(), InvalidMessage> {
        match self {
            Self::LeaseAdded { lease } => Ok(lease.validate()?),
            _ => Ok(()),
        }
    }
}

impl Message for NetstackToBroker {}

channel_ends! {
    BrokerNetstack,
    BrokerEnd(Broker) sends BrokerToNetstack, max MAX_FRAME_BROKER_NETSTACK;
    NetstackEnd(Netstack) sends NetstackToBroker, max MAX_FRAME_BROKER_NETSTACK;
}
