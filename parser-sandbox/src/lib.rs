//! VPN Share's per-peer worker: the gateway process that decrypts and validates one
//! peer's traffic inside a seccomp sandbox (design §2, §5.1, §5.6).
//!
//! - [`packet_policy`]: which IP packets a peer may send — a pure function.
//! - [`core`]: the sans-IO worker ([`WorkerCore`]): handshake, broker decisions, DATA,
//!   packet batches, return path, counters.
//! - [`oracle`]: the gateway's static key as an oracle over the broker channel.
//! - [`driver`]: the poll(2) loop over the transport, the broker channel and the data
//!   path, and the process start-up (`vpnshare-worker`).
//! - [`counters`]: every drop by reason, mapped onto the broker's `WorkerCounters`.
//!
//! `docs/parser-sandbox.md` is the process contract.

pub mod core;
pub mod counters;
pub mod driver;
#[doc(hidden)]
pub mod fuzzing;
pub mod oracle;
pub mod packet_policy;

pub use crate::core::{CoreConfig, Exit, Phase, RecordDrop, WorkerCore};
pub use counters::Stats;
pub use oracle::{BrokerLink, BrokerOracle, HandshakeOracle, LocalHandshakeOracle};
pub use packet_policy::{PacketDrop, PacketPolicy, Prefix};
