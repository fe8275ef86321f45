//! Every size bound of the IPC layer, in one place.
//!
//! A frame's length (the bytes after its 4-byte length prefix: version byte + body) is
//! checked against the limit of the channel and direction it arrives on *before* any
//! buffer is sized for it. The data path needs room for a full packet batch; every
//! other channel carries small control messages and gets far less.

/// Largest IP packet a batch may carry (lengths travel as `u16`).
pub const MAX_PACKET_LEN: usize = u16::MAX as usize;
/// Most packets in one batch.
pub const MAX_BATCH_PACKETS: usize = 256;
/// Most packet bytes in one batch (the sum of its packet lengths).
pub const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Largest encoding of a batch message besides its packet bytes: data-message tag
/// (≤ 5), lease id (≤ 10), packet count (≤ 10), one length per packet (≤ 3 each),
/// byte count (≤ 10). Varint maxima of postcard for u32, u64, usize and u16.
const BATCH_OVERHEAD: usize = 5 + 10 + 10 + 3 * MAX_BATCH_PACKETS + 10;

/// Worker ↔ netstack frames, both directions: a full batch plus the version byte.
pub const MAX_FRAME_DATA: usize = 1 + BATCH_OVERHEAD + MAX_BATCH_BYTES;

/// Largest Noise handshake message a worker may show the broker.
pub const MAX_HANDSHAKE_MSG: usize = 2048;
/// Largest sealed resume ticket.
pub const MAX_TICKET_LEN: usize = 512;
/// Broker ↔ worker frames, both directions.
pub const MAX_FRAME_BROKER_WORKER: usize = 8 * 1024;

/// Broker ↔ netstack frames, both directions.
pub const MAX_FRAME_BROKER_NETSTACK: usize = 8 * 1024;

/// Client session ↔ client helper frames, both directions.
pub const MAX_FRAME_SESSION_HELPER: usize = 4 * 1024;
/// Longest interface name the helper reports (Linux `IFNAMSIZ` - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// CLI → broker requests on the control socket.
pub const MAX_FRAME_CONTROL_REQUEST: usize = 1024;
/// Broker → CLI replies (the peers list is the largest).
pub const MAX_FRAME_CONTROL_REPLY: usize = 128 * 1024;
/// Most peers or pairing requests one reply lists.
pub const MAX_LISTED: usize = 512;
/// Longest peer name.
pub const MAX_NAME_LEN: usize = 64;
/// Longest pairing code as the user types it.
pub const MAX_CODE_LEN: usize = 16;
/// Longest free-text detail in an error reply.
pub const MAX_DETAIL_LEN: usize = 256;

/// The hello frame, whatever the channel (see [`crate::hello`]).
pub const MAX_FRAME_HELLO: usize = 64;

/// Most descriptors one frame may carry; every message that carries any carries one.
pub const MAX_FDS_PER_FRAME: usize = 1;
/// The kernel's own limit of descriptors in one `SCM_RIGHTS` message (`SCM_MAX_FD`).
/// The receive control buffer is sized for it so the kernel never truncates (and
/// thereby half-delivers) a descriptor set: whatever arrives is ours to close.
pub const SCM_MAX_FD: usize = 253;
