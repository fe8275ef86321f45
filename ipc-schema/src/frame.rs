//! The frame: what one message looks like on a stream socket.
//!
//! ```text
//! offset 0..4   length  u32, little endian: number of bytes that follow (1 + body)
//! offset 4      version u8, the sender's SCHEMA_VERSION
//! offset 5..    body    the postcard encoding of one message (exactly `length - 1` bytes)
//! ```
//!
//! Little endian because postcard, x86-64 and aarch64 all are. The length is checked
//! against the channel's limit before anything is allocated for the body, and a body
//! must be consumed exactly by its message: trailing bytes are a malformed message.

use thiserror::Error;

/// Bytes before the body: length prefix and version byte.
pub const HEADER_LEN: usize = 5;

/// Why a frame header is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds this channel's limit of {max}")]
    TooLarge { len: u64, max: usize },
    #[error("empty frame: the length must cover at least the version byte")]
    Empty,
    #[error("frame carries schema version {got}, this channel speaks {expected}")]
    WrongVersion { expected: u8, got: u8 },
}

/// Writes a header for a body of `body_len` bytes.
pub fn encode_header(body_len: usize, version: u8) -> Result<[u8; HEADER_LEN], FrameError> {
    let len = body_len
        .checked_add(1)
        .and_then(|l| u32::try_from(l).ok())
        .ok_or(FrameError::TooLarge {
            len: body_len as u64,
            max: u32::MAX as usize,
        })?;
    let l = len.to_le_bytes();
    Ok([l[0], l[1], l[2], l[3], version])
}

/// Checks a received header against the channel's limit and version and returns the
/// body length. Nothing has been allocated for the body when this fails.
pub fn parse_header(
    header: [u8; HEADER_LEN],
    max: usize,
    version: u8,
) -> Result<usize, FrameError> {
    let [a, b, c, d, got] = header;
    let len = u32::from_le_bytes([a, b, c, d]);
    let body_len = check_len(len, max)?;
    if got != version {
        return Err(FrameError::WrongVersion {
            expected: version,
            got,
        });
    }
    Ok(body_len)
}

/// The length check alone (the hello frame reads its version from its body).
pub fn check_len(len: u32, max: usize) -> Result<usize, FrameError> {
    let len_usize = usize::try_from(len).map_err(|_| FrameError::TooLarge {
        len: u64::from(len),
        max,
    })?;
    if len_usize > max {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max,
        });
    }
    len_usize.checked_sub(1).ok_or(FrameError::Empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = encode_header(300, 1).unwrap();
        assert_eq!(h, [45, 1, 0, 0, 1]);
        assert_eq!(parse_header(h, 1000, 1), Ok(300));
    }

    #[test]
    fn header_limits() {
        let h = encode_header(300, 1).unwrap();
        assert_eq!(
            parse_header(h, 300, 1),
            Err(FrameError::TooLarge { len: 301, max: 300 })
        );
        assert_eq!(parse_header([0, 0, 0, 0, 1], 10, 1), Err(FrameError::Empty));
        assert_eq!(
            parse_header(h, 1000, 2),
            Err(FrameError::WrongVersion {
                expected: 2,
                got: 1
            })
        );
        assert_eq!(
            parse_header([0xff; 5], 1000, 1),
            Err(FrameError::TooLarge {
                len: u64::from(u32::MAX),
                max: 1000
            })
        );
    }
}
