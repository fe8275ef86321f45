//! The client session of `vpnshare connect` (issue #5).
//!
//! - [`core::ClientCore`]: the VSHP client as a sans-IO state machine (records, packets
//!   and the current time in; records, packets and events out);
//! - [`driver`]: the thin poll loop around it: the transport socket, the TUN descriptor
//!   the helper passes, signals, reconnection with backoff;
//! - [`helper`]: the helper's socket, or the helper started by a root `connect`, and the
//!   privilege drop before confinement;
//! - [`tun_offload`]: the TUN's virtio-net super-packets split into MTU-sized packets,
//!   and the gateway's packets coalesced into super-packets (when the helper opened
//!   the TUN with offload);
//! - [`usb`]: the stream-transport interface and the USB accessory transport (AOA).

pub mod admission_marker;
pub mod core;
pub mod driver;
pub mod helper;
pub mod ticket_store;
pub mod tun_offload;
pub mod usb;

use std::path::PathBuf;

pub use crate::core::{ClientCore, CoreError, Event, Timer};
pub use crate::driver::{ConnectOptions, TransportKind, connect};

/// Why `vpnshare connect` stopped. Each is shown as one line.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invite: {0}")]
    Invite(String),
    #[error("identity: {0}")]
    Identity(String),
    #[error("cannot resolve the gateway {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("gateway unreachable: {0}")]
    Unreachable(String),
    #[error("the gateway did not approve this device ({0})")]
    NotApproved(String),
    #[error("the gateway revoked this device")]
    Revoked,
    #[error("the gateway's VPN is unavailable: it shares only through its VPN, and none is up")]
    VpnUnavailable,
    #[error("the gateway refused the session: {0}")]
    Refused(String),
    #[error(
        "vpnshare-helper is missing ({0}): build it with cargo build --release, or set VPNSHARE_HELPER"
    )]
    HelperMissing(PathBuf),
    #[error(
        "cannot reach vpnshare-helper at {path}: {reason} (start the helper, or run vpnshare connect as root)"
    )]
    HelperUnreachable { path: PathBuf, reason: String },
    #[error("vpnshare-helper refused {what}: {reason}")]
    HelperRefused { what: &'static str, reason: String },
    #[error("vpnshare-helper failed: {0}")]
    HelperFailed(String),
    #[error("cannot drop privileges: {0}")]
    Privileges(String),
    #[error("cannot confine the session: {0}")]
    Confine(#[from] security::Error),
    #[error("protocol: {0}")]
    Protocol(#[from] CoreError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}
