//! VSHP, the VPN Share protocol: a sans-IO library.
//!
//! State machines fed with bytes and the current time; no sockets, clocks or threads
//! inside. The gateway, the desktop client and the Android/iOS clients all drive the
//! same code. The wire format is specified byte by byte in `docs/protocol.md`.

pub mod framing;
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod key_oracle;
pub mod lease;
pub mod message;
pub mod pairing;
pub mod record;
pub mod replay;
pub mod ticket;
pub mod transport;
pub mod x25519;

pub use framing::{FramingError, StreamDecoder};
pub use handshake::{Established, HandshakeError, Initiator, Responder};
pub use key_oracle::{LocalKeyOracle, OracleError, StaticKeyOracle, StaticKeypair};
pub use lease::{Lease, LeaseError, LeaseId};
pub use message::{ErrorReason, Message, MessageError, MessageReader, MessageWriter};
pub use pairing::PairingCode;
pub use record::{Record, RecordError, RecordKind};
pub use ticket::{TicketError, TicketSealer};
pub use transport::{ReceiveError, SendError, Session, TransportMode};
