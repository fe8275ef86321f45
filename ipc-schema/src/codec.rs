//! Message bodies: postcard encoding, exact consumption, and the checks serde cannot say.
//!
//! postcard 1 is the encoding (design §8): its wire format is stable and documented
//! since 1.0, while bincode is marked unmaintained (RUSTSEC-2025-0141) and would be
//! flagged by every `cargo audit` an auditing customer runs.

use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;
use vshp::lease::LeaseError;

use crate::batch::BatchError;

/// One message type of one direction of one boundary.
pub trait Message: Serialize + DeserializeOwned + std::fmt::Debug {
    /// How many descriptors travel with this message (`SCM_RIGHTS`). A frame that
    /// arrives with any other number is refused and its descriptors are closed.
    fn fd_count(&self) -> usize {
        0
    }

    /// Checks the bounds and rules serde's shape cannot express.
    fn validate(&self) -> Result<(), InvalidMessage> {
        Ok(())
    }
}

/// A message that decoded but breaks a rule of the schema.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InvalidMessage {
    #[error("invalid lease: {0}")]
    Lease(#[from] LeaseError),
    #[error("invalid packet batch: {0}")]
    Batch(#[from] BatchError),
    #[error("{0}")]
    Rule(&'static str),
}

/// Why a body is not a message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("postcard: {0}")]
    Postcard(#[from] postcard::Error),
    #[error("{0} bytes left over after the message")]
    TrailingBytes(usize),
    #[error(transparent)]
    Invalid(#[from] InvalidMessage),
}

/// Decodes one message that must fill `body` exactly, then validates it.
pub fn decode_body<M: Message>(body: &[u8]) -> Result<M, DecodeError> {
    let (msg, rest) = postcard::take_from_bytes::<M>(body)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len()));
    }
    msg.validate()?;
    Ok(msg)
}

/// Encodes a message body into `buf`, returning the used prefix
/// (`SerializeBufferFull` if it does not fit).
pub fn encode_body<'a, T: Serialize + ?Sized>(
    msg: &T,
    buf: &'a mut [u8],
) -> Result<&'a mut [u8], postcard::Error> {
    postcard::to_slice(msg, buf)
}

/// Encodes a message body into a fresh vector (tests, fuzz seeds, tools).
pub fn to_vec<T: Serialize + ?Sized>(msg: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_stdvec(msg)
}
