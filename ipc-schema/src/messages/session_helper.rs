//! Client session ↔ client helper (`vpnshare-helper`, the only privileged code).
//!
//! The closed list of operations of design §2: open one TUN with its address and MTU,
//! set routes through it, set DNS, tear down. The helper refuses anything outside its
//! policy with a typed reason; the TUN descriptor comes back over `SCM_RIGHTS`.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use vshp::lease::{
    Ipv4Prefix, Ipv6Prefix, MAX_LEASE_DNS, MAX_LEASE_MTU, MAX_LEASE_ROUTES, MIN_LEASE_MTU, Route,
};

use crate::bounded::{BoundedString, BoundedVec};
use crate::codec::{InvalidMessage, Message};
use crate::limits::{MAX_FRAME_SESSION_HELPER, MAX_IFNAME_LEN};
use crate::messages::channel_ends;

/// Session → helper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionToHelper {
    /// Create the one TUN of this session, with these addresses and MTU.
    OpenTun {
        ipv4: Ipv4Prefix,
        ipv6: Option<Ipv6Prefix>,
        mtu: u16,
    },
    /// Replace the routes through the TUN. `gateway` is the address the session's own
    /// transport reaches the gateway at: the helper keeps it on the original route (a
    /// host route), so no packet of the transport loops into the TUN.
    SetRoutes {
        routes: BoundedVec<Route, MAX_LEASE_ROUTES>,
        gateway: IpAddr,
    },
    /// Replace the DNS servers used while the tunnel is up.
    SetDns {
        servers: BoundedVec<IpAddr, MAX_LEASE_DNS>,
    },
    /// Change the live TUN's MTU (a CONFIG_DELTA of the gateway). The TUN goes at
    /// teardown, so nothing needs restoring.
    SetMtu { mtu: u16 },
    /// Remove the TUN, restore routes and DNS.
    TearDown,
}

/// Helper → session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelperToSession {
    /// The TUN is up: **carries 1 descriptor**, the TUN's.
    TunOpened {
        ifname: BoundedString<MAX_IFNAME_LEN>,
        ifindex: u32,
        /// The TUN was opened with `IFF_VNET_HDR` and TCP offload (`TUNSETOFFLOAD`):
        /// every read and write carries a virtio-net header and reads may be GSO
        /// super-packets. The session may not ioctl the descriptor to find out, so the
        /// helper says so; `false` when the kernel refused offload (a plain TUN).
        vnet_hdr: bool,
    },
    /// The last request was carried out.
    Done,
    Refused(HelperRefusal),
}

/// Why the helper said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelperRefusal {
    /// This session already has its TUN.
    SecondTun,
    /// Routes or DNS before a TUN exists.
    NoTun,
    /// An address, route, MTU or server the helper's policy does not allow.
    OutsidePolicy,
    /// The system call failed with this errno.
    System { errno: i32 },
}

fn prefix_ok(len: u8, max: u8) -> Result<(), InvalidMessage> {
    if len > max {
        Err(InvalidMessage::Rule(
            "prefix length too long for its family",
        ))
    } else {
        Ok(())
    }
}

impl Message for SessionToHelper {
    fn validate(&self) -> Result<(), InvalidMessage> {
        match self {
            Self::OpenTun { ipv4, ipv6, mtu } => {
                if !(MIN_LEASE_MTU..=MAX_LEASE_MTU).contains(mtu) {
                    return Err(InvalidMessage::Rule("TUN MTU outside the lease's bounds"));
                }
                prefix_ok(ipv4.len, 32)?;
                ipv6.map_or(Ok(()), |p| prefix_ok(p.len, 128))
            }
            Self::SetRoutes { routes, .. } => routes.as_slice().iter().try_for_each(|r| match r {
                Route::V4(p) => prefix_ok(p.len, 32),
                Route::V6(p) => prefix_ok(p.len, 128),
            }),
            Self::SetMtu { mtu } => {
                if (MIN_LEASE_MTU..=MAX_LEASE_MTU).contains(mtu) {
                    Ok(())
                } else {
                    Err(InvalidMessage::Rule("TUN MTU outside the lease's bounds"))
                }
            }
            Self::SetDns { .. } | Self::TearDown => Ok(()),
        }
    }
}

impl Message for HelperToSession {
    fn fd_count(&self) -> usize {
        match self {
            Self::TunOpened { .. } => 1,
            _ => 0,
        }
    }
}

channel_ends! {
    SessionHelper,
    SessionEnd(Session) sends SessionToHelper, max MAX_FRAME_SESSION_HELPER;
    HelperEnd(Helper) sends HelperToSession, max MAX_FRAME_SESSION_HELPER;
}
