//! Fuzz target bodies, shared by the cargo-fuzz crate in `vshp/fuzz/` and by
//! `tests/fuzz_corpus.rs`, which replays the saved corpus as ordinary tests.
//!
//! Each function must accept any input without panicking; that is the property the
//! fuzzer checks.

use crate::framing::StreamDecoder;
use crate::message::MessageReader;
use crate::record::{self, Record};

/// Decodes `data` as a datagram record, as the inner messages of a payload, and as a
/// byte stream split at the position named by its first byte; re-encodes what decoded
/// and checks that it reproduces the input.
pub fn record_decode(data: &[u8]) {
    match record::decode(data) {
        Ok(Record::Handshake {
            header,
            raw_header,
            noise,
        }) => {
            assert_eq!(&header.encode(), raw_header);
            assert_eq!(record::HEADER_LEN + noise.len(), data.len());
        }
        Ok(Record::Data {
            header,
            raw_header,
            sealed,
        }) => {
            assert_eq!(&header.encode(), raw_header);
            assert!(sealed.len() >= record::AEAD_TAG_LEN);
        }
        Ok(Record::Error(e)) => assert_eq!(&e.encode()[..], data),
        Err(_) => {}
    }
    for message in MessageReader::new(data) {
        if let Ok(crate::message::Message::IpPacket(batch)) = message {
            assert!(batch.iter().all(|p| !p.is_empty()));
        }
    }
    let cut = usize::from(data.first().copied().unwrap_or(0)).min(data.len());
    let mut stream = StreamDecoder::new();
    let mut consumed = 0;
    for part in [&data[..cut], &data[cut..]] {
        let mut rest = part;
        while !rest.is_empty() {
            let n = stream.push(rest);
            rest = &rest[n..];
            while let Ok(Some(r)) = stream.next_record() {
                consumed += 2 + r.len();
            }
            if n == 0 {
                break;
            }
        }
    }
    assert!(consumed <= data.len());
}
