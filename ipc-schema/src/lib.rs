//! Every message that crosses a VPN Share process boundary, and its framing.
//!
//! Read this crate top-down as an auditor would:
//!
//! - [`limits`]: every size bound, in one table.
//! - [`frame`]: the bytes on the socket (`u32` LE length, version byte, postcard body).
//! - [`hello`]: the version handshake every channel starts with.
//! - [`codec`]: message bodies (postcard 1), exact consumption, validation.
//! - [`bounded`]: byte strings, vectors and strings bounded while decoding.
//! - [`messages`]: one typed message set per boundary and direction.
//! - [`batch`]: the packet batch of the data path, decoded into a reused buffer.
//! - [`channel`]: a connected, typed channel; a bad message poisons it for good.
//! - [`fdpass`]: descriptors over `SCM_RIGHTS`, always as `OwnedFd`.
//! - [`oracle`]: which static-key DH operations a worker may ask the broker for.
//!
//! `docs/ipc.md` describes the same contract in prose, byte by byte.

pub mod batch;
pub mod bounded;
pub mod channel;
pub mod codec;
pub mod fdpass;
pub mod frame;
pub mod hello;
pub mod limits;
pub mod messages;
pub mod oracle;

#[doc(hidden)]
pub mod fuzzing;

pub use batch::{BatchError, PacketBatch};
pub use channel::{Channel, ChannelError, Incoming};
pub use codec::{DecodeError, Message};
pub use hello::{ChannelKind, HelloError, Role};
pub use messages::Protocol;

/// The schema version. Every frame carries it in its version byte and every channel
/// starts by exchanging it in a [`hello::Hello`]. Bump it on any change to any message.
pub const SCHEMA_VERSION: u8 = 9;
