//! Helpers shared by the integration tests (included with `mod common;`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::net::UnixStream;

use ipc_schema::SCHEMA_VERSION;
use ipc_schema::hello::Hello;
use ipc_schema::{ChannelKind, Role};

/// A frame around `body` with the given version byte.
pub fn frame(body: &[u8], version: u8) -> Vec<u8> {
    let mut out = ipc_schema::frame::encode_header(body.len(), version)
        .unwrap()
        .to_vec();
    out.extend_from_slice(body);
    out
}

/// The hello a well-behaved peer of this kind and role sends.
pub fn hello_frame(kind: ChannelKind, role: Role) -> Vec<u8> {
    frame(
        &postcard::to_stdvec(&Hello::new(kind, role)).unwrap(),
        SCHEMA_VERSION,
    )
}

/// A socket pair whose second end already sent the hello of `role` on `kind`.
pub fn pair_with_hello(kind: ChannelKind, role: Role) -> (UnixStream, UnixStream) {
    let (a, mut b) = UnixStream::pair().unwrap();
    b.write_all(&hello_frame(kind, role)).unwrap();
    (a, b)
}

/// Reads the hello the channel under test sent, so closing `peer` later is a clean end
/// of stream (closing a unix socket with unread data resets the connection instead).
pub fn read_hello(peer: &mut UnixStream) {
    let mut buf = [0u8; 12];
    std::io::Read::read_exact(peer, &mut buf).unwrap();
}
