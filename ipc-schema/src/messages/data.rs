//! Parser worker ↔ netstack: batches of validated IP packets and flow-control credit.
//!
//! The same message set flows both ways: the worker sends the packets its peer sent
//! (validated: source is the peer's lease, destination allowed), the netstack sends
//! packets for the peer. Each side grants the other credit as it drains what it got; a
//! side sends batches only while it holds credit, so neither can be flooded into
//! unbounded buffering. The netstack still checks that every batch carries the lease
//! this channel was opened for (defence in depth, design §2).

use serde::{Deserialize, Serialize};

use crate::batch::{PacketBatch, split_tag};
use crate::codec::{DecodeError, InvalidMessage, Message, decode_body};
use crate::limits::MAX_FRAME_DATA;
use crate::messages::channel_ends;

/// Permission to send more: added to what the receiver already granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credit {
    pub packets: u32,
    pub bytes: u32,
}

/// A data-path message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataMsg {
    /// Tag 0: a batch of packets (decode it with [`decode_data_into`] to reuse a batch).
    Packets(PacketBatch),
    /// Tag 1: more credit for the other side.
    Credit(Credit),
}

/// The same encoding as [`DataMsg`], borrowing the batch, so sending copies nothing.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename = "DataMsg")]
pub enum DataMsgRef<'a> {
    Packets(&'a PacketBatch),
    Credit(Credit),
}

/// No `validate`: `PacketBatch`'s `Deserialize` already enforces every batch bound.
impl Message for DataMsg {}

/// What [`decode_data_into`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataEvent {
    /// The caller's batch now holds the received packets.
    Packets,
    Credit(Credit),
}

const TAG_PACKETS: u32 = 0;

/// Decodes a data-path body, refilling `batch` in place for a packet batch: the
/// allocation-free path. Accepts exactly what `decode_body::<DataMsg>` accepts.
pub fn decode_data_into(body: &[u8], batch: &mut PacketBatch) -> Result<DataEvent, DecodeError> {
    let (tag, rest) = split_tag(body).map_err(|e| DecodeError::Invalid(e.into()))?;
    if tag == TAG_PACKETS {
        batch
            .decode_from(rest)
            .map_err(|e| DecodeError::Invalid(e.into()))?;
        return Ok(DataEvent::Packets);
    }
    match decode_body::<DataMsg>(body)? {
        DataMsg::Credit(c) => Ok(DataEvent::Credit(c)),
        // Unreachable: tag 0 was handled above; refuse rather than assume.
        DataMsg::Packets(_) => Err(DecodeError::Invalid(InvalidMessage::Rule(
            "unexpected packet tag",
        ))),
    }
}

channel_ends! {
    WorkerNetstack,
    WorkerEnd(Worker) sends DataMsg, max MAX_FRAME_DATA;
    NetstackEnd(Netstack) sends DataMsg, max MAX_FRAME_DATA;
}
