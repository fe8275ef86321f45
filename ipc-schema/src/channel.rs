//! A connected, typed channel over a unix stream socket; a bad message kills it.
//!
//! Chromium's Mojo rule: a peer that sends a malformed, oversized or truncated message,
//! or the wrong descriptors, is not argued with. The receive returns a typed error,
//! logs it (tracing), counts it, shuts the socket down so the peer sees the end, and
//! poisons the channel: every later call fails with [`ChannelError::Poisoned`]. Any
//! other failure that leaves the stream in an unknown state (I/O error, end of stream,
//! a partial send) poisons it too; only refusals of the caller's own input before a
//! byte was written (too large, wrong descriptor count) leave it usable.
//!
//! Sockets are std `UnixStream`s (named ones from `UnixListener`, pairs from
//! `UnixStream::pair`). The `interprocess` crate would add portability this
//! Linux/Android-only code does not need, and it has no `SCM_RIGHTS` API: descriptors
//! need the raw socket for nix's `sendmsg`/`recvmsg` anyway.
//!
//! Blocking I/O on purpose: each process serves few channels and a thread per channel
//! is simpler to confine and audit. Receive buffers grow once to the channel's limit
//! and are reused, so a steady stream of frames allocates nothing.

use std::io;
use std::marker::PhantomData;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use thiserror::Error;

use crate::SCHEMA_VERSION;
use crate::batch::PacketBatch;
use crate::codec::{DecodeError, InvalidMessage, Message, decode_body};
use crate::fdpass::{self, RecvError};
use crate::frame::{self, FrameError, HEADER_LEN};
use crate::hello::{self, Hello, HelloError};
use crate::limits::{MAX_FDS_PER_FRAME, MAX_FRAME_HELLO};
use crate::messages::Protocol;
use crate::messages::data::{Credit, DataEvent, DataMsg, DataMsgRef, decode_data_into};

/// Bad messages seen by every channel of this process (for status and audit).
static BAD_MESSAGES: AtomicU64 = AtomicU64::new(0);

/// How many bad messages this process has received on any channel.
pub fn bad_messages_total() -> u64 {
    BAD_MESSAGES.load(Ordering::Relaxed)
}

/// Where a stream ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramePart {
    Header,
    Body,
}

/// What went wrong on a channel.
#[derive(Debug, Error)]
pub enum ChannelError {
    #[error("socket error: {0}")]
    Io(#[source] io::Error),
    #[error("the peer closed the channel")]
    Closed,
    #[error("stream ended inside a frame {part:?} after {got} of {wanted} bytes")]
    Truncated {
        part: FramePart,
        got: usize,
        wanted: usize,
    },
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("malformed message: {0}")]
    Malformed(#[from] DecodeError),
    #[error("message arrived with {got} descriptors, it carries {expected}")]
    UnexpectedFds { expected: usize, got: usize },
    #[error("descriptors were truncated by the kernel")]
    ControlTruncated,
    #[error(transparent)]
    Hello(#[from] HelloError),
    #[error("message does not fit this channel's limit of {max} bytes")]
    SendTooLarge { max: usize },
    #[error("message carries {expected} descriptors but {got} were given")]
    SendFdMismatch { expected: usize, got: usize },
    #[error("refusing to send an invalid message: {0}")]
    SendInvalid(InvalidMessage),
    #[error("encoding failed: {0}")]
    Encode(postcard::Error),
    #[error("channel is dead since an earlier error: {0}")]
    Poisoned(PoisonCause),
}

/// The kind of error that killed a channel (kept after the error itself is returned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PoisonCause {
    #[error("socket error")]
    Io,
    #[error("peer closed")]
    Closed,
    #[error("bad message from the peer")]
    BadMessage,
    #[error("version handshake failed")]
    Hello,
}

impl ChannelError {
    /// True when the peer broke the protocol (the Mojo rule counts these).
    pub fn is_bad_message(&self) -> bool {
        matches!(
            self,
            Self::Truncated { .. }
                | Self::Frame(_)
                | Self::Malformed(_)
                | Self::UnexpectedFds { .. }
                | Self::ControlTruncated
                | Self::Hello(_)
        )
    }

    /// `None` for refusals of the caller's own input that left the stream untouched.
    fn poison_cause(&self) -> Option<PoisonCause> {
        match self {
            Self::SendTooLarge { .. }
            | Self::SendFdMismatch { .. }
            | Self::SendInvalid(_)
            | Self::Encode(_) => None,
            Self::Poisoned(c) => Some(*c),
            Self::Io(_) => Some(PoisonCause::Io),
            Self::Closed => Some(PoisonCause::Closed),
            Self::Hello(_) => Some(PoisonCause::Hello),
            _ => Some(PoisonCause::BadMessage),
        }
    }
}

impl From<RecvError> for ChannelError {
    fn from(e: RecvError) -> Self {
        match e {
            RecvError::Io(e) => Self::Io(e),
            RecvError::ControlTruncated => Self::ControlTruncated,
        }
    }
}

/// A received message and the descriptors that came with it (exactly `fd_count()`).
#[derive(Debug)]
pub struct Incoming<M> {
    pub msg: M,
    pub fds: Vec<OwnedFd>,
}

/// The first encode attempt uses this much; a larger message grows the buffer once.
const INITIAL_SEND_BUF: usize = 4096;

/// One end `P` of a connected channel.
#[derive(Debug)]
pub struct Channel<P: Protocol> {
    sock: UnixStream,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    cmsg: Vec<u8>,
    fds: Vec<OwnedFd>,
    poisoned: Option<PoisonCause>,
    bad_messages: u64,
    _end: PhantomData<fn() -> P>,
}

impl<P: Protocol> Channel<P> {
    /// Takes a connected, blocking socket and runs the version handshake on it.
    /// A caller facing a peer that may stall (the control socket) sets a read timeout
    /// on the socket first; a timeout then fails like any I/O error and kills the
    /// channel.
    pub fn open(sock: UnixStream) -> Result<Self, ChannelError> {
        let mut ch = Self {
            sock,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            cmsg: fdpass::control_buffer(),
            fds: Vec::with_capacity(MAX_FDS_PER_FRAME),
            poisoned: None,
            bad_messages: 0,
            _end: PhantomData,
        };
        match ch.exchange_hello() {
            Ok(()) => Ok(ch),
            Err(e) => Err(ch.fail(e)),
        }
    }

    fn exchange_hello(&mut self) -> Result<(), ChannelError> {
        let ours = Hello::new(P::KIND, P::LOCAL);
        self.send_frame(&ours, &[], MAX_FRAME_HELLO)?;
        // The hello's version byte is not checked here: a peer of another version must
        // still be read far enough to be named in the error.
        let n = self.read_frame(MAX_FRAME_HELLO, None)?;
        let body = self.rbuf.get(..n).unwrap_or_default();
        let theirs: Hello =
            postcard::from_bytes(body).map_err(|_| HelloError::NotAHello("undecodable"))?;
        if n != 7 {
            return Err(HelloError::NotAHello("wrong length").into());
        }
        self.expect_fds(0)?;
        hello::check(&theirs, P::KIND, P::LOCAL, P::REMOTE)?;
        Ok(())
    }

    /// The socket, for `poll`.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Bad messages this channel received (0 or 1: the first one kills it).
    pub fn bad_messages(&self) -> u64 {
        self.bad_messages
    }

    pub fn poisoned(&self) -> Option<PoisonCause> {
        self.poisoned
    }

    /// Sends one message with exactly the descriptors it carries.
    pub fn send(&mut self, msg: &P::Send, fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        self.alive()?;
        if fds.len() != msg.fd_count() {
            return Err(ChannelError::SendFdMismatch {
                expected: msg.fd_count(),
                got: fds.len(),
            });
        }
        // The receiver would kill the channel for it: fail here, where the bug is.
        msg.validate().map_err(ChannelError::SendInvalid)?;
        self.send_frame(msg, fds, P::MAX_SEND)
            .map_err(|e| self.fail(e))
    }

    /// Receives one message; any error kills the channel.
    pub fn recv(&mut self) -> Result<Incoming<P::Recv>, ChannelError> {
        self.alive()?;
        self.recv_inner().map_err(|e| self.fail(e))
    }

    fn recv_inner(&mut self) -> Result<Incoming<P::Recv>, ChannelError> {
        let n = self.read_frame(P::MAX_RECV, Some(SCHEMA_VERSION))?;
        let msg: P::Recv = decode_body(self.rbuf.get(..n).unwrap_or_default())?;
        self.expect_fds(msg.fd_count())?;
        Ok(Incoming {
            msg,
            fds: std::mem::take(&mut self.fds),
        })
    }

    fn alive(&self) -> Result<(), ChannelError> {
        match self.poisoned {
            Some(c) => Err(ChannelError::Poisoned(c)),
            None => Ok(()),
        }
    }

    /// Applies the bad-message rule to an error on its way out.
    fn fail(&mut self, e: ChannelError) -> ChannelError {
        let Some(cause) = e.poison_cause() else {
            return e;
        };
        if self.poisoned.is_some() {
            return e;
        }
        self.poisoned = Some(cause);
        self.fds.clear();
        // Best effort: the peer sees end of stream; the descriptor closes on drop.
        let _ = self.sock.shutdown(Shutdown::Both);
        if e.is_bad_message() {
            self.bad_messages += 1;
            BAD_MESSAGES.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(kind = %P::KIND, local = %P::LOCAL, peer = %P::REMOTE, error = %e,
                "bad IPC message: channel closed");
        } else {
            tracing::debug!(kind = %P::KIND, local = %P::LOCAL, peer = %P::REMOTE, error = %e, "IPC channel closed");
        }
        e
    }

    fn expect_fds(&mut self, expected: usize) -> Result<(), ChannelError> {
        if self.fds.len() != expected {
            let got = self.fds.len();
            self.fds.clear(); // closes them
            return Err(ChannelError::UnexpectedFds { expected, got });
        }
        Ok(())
    }

    /// Reads one frame's body into `rbuf` and returns its length. `version` is `None`
    /// only for the hello. The length is checked before `rbuf` grows.
    fn read_frame(&mut self, max: usize, version: Option<u8>) -> Result<usize, ChannelError> {
        self.fds.clear();
        let mut header = [0u8; HEADER_LEN];
        read_full(
            self.sock.as_fd(),
            &mut header,
            &mut self.cmsg,
            &mut self.fds,
            FramePart::Header,
        )?;
        let n = match version {
            Some(v) => frame::parse_header(header, max, v)?,
            None => {
                let [a, b, c, d, _] = header;
                frame::check_len(u32::from_le_bytes([a, b, c, d]), max)?
            }
        };
        if self.rbuf.len() < n {
            self.rbuf.resize(n, 0);
        }
        let body = self.rbuf.get_mut(..n).unwrap_or_default();
        read_full(
            self.sock.as_fd(),
            body,
            &mut self.cmsg,
            &mut self.fds,
            FramePart::Body,
        )?;
        Ok(n)
    }

    /// Encodes `msg` after a header and writes the frame, descriptors on its first byte.
    fn send_frame<T: Serialize + ?Sized>(
        &mut self,
        msg: &T,
        fds: &[BorrowedFd<'_>],
        max: usize,
    ) -> Result<(), ChannelError> {
        let max_body = max.saturating_sub(1);
        let full = HEADER_LEN + max_body;
        if self.wbuf.len() < full.min(INITIAL_SEND_BUF) {
            self.wbuf.resize(full.min(INITIAL_SEND_BUF), 0);
        }
        let n = loop {
            let room = self.wbuf.len().min(full);
            let out = self.wbuf.get_mut(HEADER_LEN..room).unwrap_or_default();
            match postcard::to_slice(msg, out) {
                Ok(used) => break used.len(),
                Err(postcard::Error::SerializeBufferFull) if room < full => {
                    self.wbuf.resize(full, 0)
                }
                Err(postcard::Error::SerializeBufferFull) => {
                    return Err(ChannelError::SendTooLarge { max });
                }
                Err(e) => return Err(ChannelError::Encode(e)),
            }
        };
        let header = frame::encode_header(n, SCHEMA_VERSION)?;
        let total = HEADER_LEN + n;
        let frame = self.wbuf.get_mut(..total).unwrap_or_default();
        if let Some(h) = frame.get_mut(..HEADER_LEN) {
            h.copy_from_slice(&header);
        }
        write_all(self.sock.as_fd(), frame, fds).map_err(ChannelError::Io)
    }
}

impl<P: Protocol<Recv = DataMsg>> Channel<P> {
    /// Receives a data-path message, refilling `batch` in place when it is a packet
    /// batch: no allocation per packet or per batch once the buffers have grown.
    pub fn recv_data(&mut self, batch: &mut PacketBatch) -> Result<DataEvent, ChannelError> {
        self.alive()?;
        self.recv_data_inner(batch).map_err(|e| self.fail(e))
    }

    fn recv_data_inner(&mut self, batch: &mut PacketBatch) -> Result<DataEvent, ChannelError> {
        let n = self.read_frame(P::MAX_RECV, Some(SCHEMA_VERSION))?;
        self.expect_fds(0)?;
        Ok(decode_data_into(
            self.rbuf.get(..n).unwrap_or_default(),
            batch,
        )?)
    }
}

impl<P: Protocol<Send = DataMsg>> Channel<P> {
    /// Sends a packet batch without copying it into a message first.
    pub fn send_batch(&mut self, batch: &PacketBatch) -> Result<(), ChannelError> {
        self.alive()?;
        self.send_frame(&DataMsgRef::Packets(batch), &[], P::MAX_SEND)
            .map_err(|e| self.fail(e))
    }

    pub fn send_credit(&mut self, credit: Credit) -> Result<(), ChannelError> {
        self.alive()?;
        self.send_frame(&DataMsgRef::Credit(credit), &[], P::MAX_SEND)
            .map_err(|e| self.fail(e))
    }
}

/// Fills `buf` completely; `Closed` if the stream ends before a header's first byte.
fn read_full(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    cmsg: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    part: FramePart,
) -> Result<(), ChannelError> {
    let wanted = buf.len();
    let mut got = 0;
    while got < wanted {
        let rest = buf.get_mut(got..).unwrap_or_default();
        let n = fdpass::recv_with_fds(sock, rest, cmsg, fds)?;
        if fds.len() > MAX_FDS_PER_FRAME {
            let n_fds = fds.len();
            fds.clear();
            return Err(ChannelError::UnexpectedFds {
                expected: MAX_FDS_PER_FRAME,
                got: n_fds,
            });
        }
        if n == 0 {
            if got == 0 && part == FramePart::Header {
                return Err(ChannelError::Closed);
            }
            return Err(ChannelError::Truncated { part, got, wanted });
        }
        got += n;
    }
    Ok(())
}

/// Writes all of `bytes`, descriptors with the first chunk.
fn write_all(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut sent = fdpass::send_with_fds(sock, bytes, fds)?;
    while sent < bytes.len() {
        if sent == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        sent += fdpass::send_with_fds(sock, bytes.get(sent..).unwrap_or_default(), &[])?;
    }
    Ok(())
}
