//! VPN Share userspace NAT/DNS netstack: smoltcp flows re-originated as OS sockets.
//!
//! The gateway's parser-sandbox workers hand this crate validated IP packets tagged
//! with their peer's [`LeaseId`](vshp::lease::LeaseId). TCP is terminated in smoltcp
//! (any-IP mode) and re-originated with non-blocking OS sockets; UDP gets
//! endpoint-independent mappings; DNS to the lease's DNS address is answered by a
//! caching forwarder; ICMP echo goes through unprivileged ping sockets. See
//! `docs/netstack.md` for the design and the numbers.

pub mod config;
pub mod counters;
mod device;
pub mod dns;
pub mod egress;
mod flows;
pub mod fuzzing;
pub mod packet;
pub mod process;
mod stack;

pub use config::{Caps, Config, Egress, Timeouts, read_resolv_conf};
pub use counters::{Counters, DropReason, LeaseStats};
pub use egress::{Kind as SocketKind, SocketHook};
pub use stack::{Netstack, NetstackError, PacketBatch};
