//! VSHP, the VPN Share protocol: a sans-IO library.
//!
//! State machines fed with bytes and the current time; no sockets, clocks or threads
//! inside. The gateway, the desktop client and the Android/iOS clients all drive the
//! same code. The wire format is specified byte by byte in `docs/protocol.md`.

pub mod framing;
#[doc(hidden)]
pub mod fuzzing;
pub mod lease;
pub mod message;
pub mod record;

pub use framing::{FramingError, StreamDecoder};
pub use lease::{Lease, LeaseError, LeaseId};
pub use message::{ErrorReason, Message, MessageError, MessageReader, MessageWriter};
pub use record::{Record, RecordError, RecordKind};
