//! Bytes plus descriptors over a unix stream socket (`SCM_RIGHTS`), with nix.
//!
//! Received descriptors become `OwnedFd`s the moment the kernel hands them over, so
//! every error path closes them by dropping. They arrive with `MSG_CMSG_CLOEXEC`, so a
//! process that later execs cannot leak them to its child. The control buffer is sized
//! for the kernel's `SCM_MAX_FD`: the kernel never has to truncate a set, which would
//! install part of it where nix cannot hand it back to us.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr, recvmsg, send, sendmsg,
};

use crate::limits::SCM_MAX_FD;

/// What a receive got besides bytes, when it is wrong.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("socket receive failed: {0}")]
    Io(#[from] io::Error),
    #[error("the kernel truncated the control message (descriptors lost)")]
    ControlTruncated,
}

/// A control buffer large enough for any `SCM_RIGHTS` message.
pub fn control_buffer() -> Vec<u8> {
    nix::cmsg_space!([RawFd; SCM_MAX_FD])
}

/// Sends some of `bytes`, with `fds` attached to the first byte. Returns how many
/// bytes went out; the caller sends the rest without descriptors.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    loop {
        // MSG_NOSIGNAL: a closed peer is an error to report, not a SIGPIPE to die of.
        let r = if fds.is_empty() {
            send(sock.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL)
        } else {
            let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
            let iov = [io::IoSlice::new(bytes)];
            let cmsg = [ControlMessage::ScmRights(&raw)];
            sendmsg::<UnixAddr>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)
        };
        match r {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
            Ok(n) => return Ok(n),
        }
    }
}

/// Receives into `buf`; descriptors that come along are appended to `fds` as
/// `OwnedFd`s. Returns the byte count (0 at end of stream).
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    cmsg: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<usize, RecvError> {
    loop {
        let mut iov = [io::IoSliceMut::new(buf)];
        let msg = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut *cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(RecvError::Io(io::Error::from(e))),
            Ok(m) => m,
        };
        let bytes = msg.bytes;
        // `cmsgs` fails only on MSG_CTRUNC, which the buffer size rules out.
        let cmsgs = msg.cmsgs().map_err(|_| RecvError::ControlTruncated)?;
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel just installed `fd` in this process's table for
                    // this message; nothing else knows it, so this is its only owner.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        return Ok(bytes);
    }
}
