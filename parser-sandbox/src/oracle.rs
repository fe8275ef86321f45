//! The gateway's static key, seen from the worker: an oracle the worker asks, never a key
//! it holds (design §2, `docs/protocol-crypto.md` §2).
//!
//! [`HandshakeOracle`] adds one step to [`StaticKeyOracle`]: before a handshake may use
//! the key, its HANDSHAKE_INIT record is shown to the key holder, which binds the
//! handshake to it. [`BrokerOracle`] does this over the broker channel
//! (`ShowHandshake` → `HandshakeBound`/`HandshakeRefused`, then one `DhRequest` →
//! `DhResult`/`DhRefused` per static-key DH); [`LocalHandshakeOracle`] does the same in
//! memory, with the broker's own guard, for tests and fuzzing.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ipc_schema::messages::broker_worker::{
    BrokerToWorker, HandshakeId, HandshakeMessage, WorkerEnd, WorkerToBroker,
};
use ipc_schema::oracle::{HandshakePattern, OracleRefusal};
use ipc_schema::{Channel, ChannelError, Incoming};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use vshp::key_oracle::{
    GuardedOracle, HandshakeDhGuard, KEY_LEN, LocalKeyOracle, OracleError, StaticKeyOracle,
};
use vshp::record::Pattern;

/// How long the worker waits for the broker's answer to one oracle request.
pub const ORACLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A static-key oracle that must be shown each handshake's first record first.
pub trait HandshakeOracle: StaticKeyOracle {
    /// Binds the next DHs to handshake `id`, whose HANDSHAKE_INIT record is `init`.
    fn show(&self, id: HandshakeId, pattern: Pattern, init: &[u8]) -> Result<(), OracleError>;
}

/// The wire name of a pattern.
pub fn wire_pattern(p: Pattern) -> HandshakePattern {
    match p {
        Pattern::Xx => HandshakePattern::Xx,
        Pattern::Ik => HandshakePattern::Ik,
    }
}

/// A refusal as the `&'static str` that [`OracleError::Refused`] carries.
fn refusal_text(r: OracleRefusal) -> &'static str {
    match r {
        OracleRefusal::UnknownHandshake => "unknown handshake",
        OracleRefusal::FirstMessageTooShort => "first message too short",
        OracleRefusal::NotInPattern => "DH not in the pattern",
        OracleRefusal::AlreadyUsed => "DH already used",
        OracleRefusal::OutOfOrder => "DH out of order",
        OracleRefusal::RemoteMismatch => "remote key mismatch",
        OracleRefusal::RateLimited => "rate limited",
    }
}

/// The broker channel, shared by the driver and the oracle (one thread uses it at a
/// time; the mutex is never contended). Messages that arrive while the oracle waits
/// for its answer are kept, in order, for the driver.
#[derive(Debug)]
pub struct BrokerLink {
    fd: RawFd,
    inner: Mutex<LinkInner>,
}

#[derive(Debug)]
struct LinkInner {
    ch: Channel<WorkerEnd>,
    stash: VecDeque<Incoming<BrokerToWorker>>,
}

impl BrokerLink {
    pub fn new(ch: Channel<WorkerEnd>) -> Self {
        Self {
            fd: ch.as_fd().as_raw_fd(),
            inner: Mutex::new(LinkInner {
                ch,
                stash: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, LinkInner>, ChannelError> {
        self.inner
            .lock()
            .map_err(|_| ChannelError::Poisoned(ipc_schema::channel::PoisonCause::Io))
    }

    /// The socket, for `poll`.
    pub fn raw_fd(&self) -> RawFd {
        self.fd
    }

    pub fn send(&self, msg: &WorkerToBroker) -> Result<(), ChannelError> {
        self.lock()?.ch.send(msg, &[])
    }

    /// Whether messages wait in the stash (poll would not report them).
    pub fn has_stashed(&self) -> bool {
        self.lock().map(|g| !g.stash.is_empty()).unwrap_or(false)
    }

    /// The next message: a stashed one, else one read from the socket (blocking).
    pub fn recv(&self) -> Result<Incoming<BrokerToWorker>, ChannelError> {
        let mut g = self.lock()?;
        if let Some(m) = g.stash.pop_front() {
            return Ok(m);
        }
        g.ch.recv()
    }

    /// Reads until `want` picks a message (which is returned); stashes the others.
    fn wait_for<T>(
        &self,
        timeout: Duration,
        mut want: impl FnMut(&BrokerToWorker) -> Option<T>,
    ) -> Result<T, OracleError> {
        let deadline = Instant::now() + timeout;
        let mut g = self
            .lock()
            .map_err(|e| OracleError::Unavailable(e.to_string()))?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(OracleError::Unavailable("broker did not answer".into()));
            }
            wait_readable(self.fd, left)
                .map_err(|e| OracleError::Unavailable(format!("poll: {e}")))?;
            let m =
                g.ch.recv()
                    .map_err(|e| OracleError::Unavailable(e.to_string()))?;
            match want(&m.msg) {
                Some(t) => return Ok(t),
                None => g.stash.push_back(m),
            }
        }
    }
}

/// Waits until `fd` is readable or `timeout` passes (then returns Ok anyway: the
/// caller's deadline decides).
fn wait_readable(fd: RawFd, timeout: Duration) -> nix::Result<()> {
    // SAFETY: `fd` is the broker socket owned by the `BrokerLink` that calls this,
    // alive for the whole call.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let mut fds = [PollFd::new(borrowed, PollFlags::POLLIN)];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(_) | Err(nix::Error::EINTR) => Ok(()),
        Err(e) => Err(e),
    }
}

#[derive(Debug, Default)]
struct Binding {
    handshake: Option<HandshakeId>,
    pattern: Option<Pattern>,
    calls: u8,
}

/// The production oracle: the broker holds the key.
#[derive(Debug)]
pub struct BrokerOracle {
    link: Arc<BrokerLink>,
    public: [u8; KEY_LEN],
    binding: Mutex<Binding>,
    timeout: Duration,
}

impl BrokerOracle {
    /// `public` is the gateway's static public key (the worker's command line).
    pub fn new(link: Arc<BrokerLink>, public: [u8; KEY_LEN]) -> Self {
        Self {
            link,
            public,
            binding: Mutex::new(Binding::default()),
            timeout: ORACLE_TIMEOUT,
        }
    }
}

impl StaticKeyOracle for BrokerOracle {
    fn public_key(&self) -> [u8; KEY_LEN] {
        self.public
    }

    fn dh(&self, remote_public: &[u8; KEY_LEN]) -> Result<[u8; KEY_LEN], OracleError> {
        let mut b = self
            .binding
            .lock()
            .map_err(|_| OracleError::Refused("binding poisoned"))?;
        let (Some(handshake), Some(pattern)) = (b.handshake, b.pattern) else {
            return Err(OracleError::Refused("no handshake shown"));
        };
        let op = *wire_pattern(pattern)
            .static_ops()
            .get(usize::from(b.calls))
            .ok_or(OracleError::Refused("DH budget of this handshake used up"))?;
        b.calls += 1;
        self.link
            .send(&WorkerToBroker::DhRequest {
                handshake,
                op,
                remote: *remote_public,
            })
            .map_err(|e| OracleError::Unavailable(e.to_string()))?;
        self.link
            .wait_for(self.timeout, |m| match m {
                BrokerToWorker::DhResult {
                    handshake: h,
                    op: o,
                    shared,
                } if *h == handshake && *o == op => Some(Ok(*shared)),
                BrokerToWorker::DhRefused {
                    handshake: h,
                    op: o,
                    reason,
                } if *h == handshake && *o == op => Some(Err(*reason)),
                _ => None,
            })?
            .map_err(|r| OracleError::Refused(refusal_text(r)))
            .and_then(|shared: [u8; KEY_LEN]| {
                if shared == [0u8; KEY_LEN] {
                    Err(OracleError::LowOrderPoint)
                } else {
                    Ok(shared)
                }
            })
    }
}

impl HandshakeOracle for BrokerOracle {
    fn show(&self, id: HandshakeId, pattern: Pattern, init: &[u8]) -> Result<(), OracleError> {
        let first_message = HandshakeMessage::from_slice(init)
            .map_err(|_| OracleError::Refused("first message too long to show"))?;
        {
            let mut b = self
                .binding
                .lock()
                .map_err(|_| OracleError::Refused("binding poisoned"))?;
            *b = Binding::default();
        }
        self.link
            .send(&WorkerToBroker::ShowHandshake {
                handshake: id,
                pattern: wire_pattern(pattern),
                first_message,
            })
            .map_err(|e| OracleError::Unavailable(e.to_string()))?;
        let answer = self.link.wait_for(self.timeout, |m| match m {
            BrokerToWorker::HandshakeBound { handshake } if *handshake == id => Some(Ok(())),
            BrokerToWorker::HandshakeRefused { handshake, reason } if *handshake == id => {
                Some(Err(*reason))
            }
            _ => None,
        })?;
        answer.map_err(|r| OracleError::Refused(refusal_text(r)))?;
        let mut b = self
            .binding
            .lock()
            .map_err(|_| OracleError::Refused("binding poisoned"))?;
        *b = Binding {
            handshake: Some(id),
            pattern: Some(pattern),
            calls: 0,
        };
        Ok(())
    }
}

/// The broker's rule in memory: a [`LocalKeyOracle`] behind a fresh [`GuardedOracle`]
/// per shown handshake. For tests and fuzzing; never in a worker process.
#[derive(Debug)]
pub struct LocalHandshakeOracle {
    key: LocalKeyOracle,
    guarded: Mutex<Option<GuardedOracle<LocalKeyOracle>>>,
    shown: Mutex<u64>,
}

impl LocalHandshakeOracle {
    pub fn new(key: LocalKeyOracle) -> Self {
        Self {
            key,
            guarded: Mutex::new(None),
            shown: Mutex::new(0),
        }
    }

    /// How many handshakes were shown.
    pub fn shown(&self) -> u64 {
        self.shown.lock().map(|g| *g).unwrap_or(0)
    }
}

impl StaticKeyOracle for LocalHandshakeOracle {
    fn public_key(&self) -> [u8; KEY_LEN] {
        self.key.public_key()
    }

    fn dh(&self, remote_public: &[u8; KEY_LEN]) -> Result<[u8; KEY_LEN], OracleError> {
        let g = self
            .guarded
            .lock()
            .map_err(|_| OracleError::Refused("poisoned"))?;
        g.as_ref()
            .ok_or(OracleError::Refused("no handshake shown"))?
            .dh(remote_public)
    }
}

impl HandshakeOracle for LocalHandshakeOracle {
    fn show(&self, _id: HandshakeId, _pattern: Pattern, init: &[u8]) -> Result<(), OracleError> {
        let guard = HandshakeDhGuard::from_init_record(init)?;
        let mut g = self
            .guarded
            .lock()
            .map_err(|_| OracleError::Refused("poisoned"))?;
        *g = Some(GuardedOracle::new(self.key.clone(), guard));
        if let Ok(mut n) = self.shown.lock() {
            *n += 1;
        }
        Ok(())
    }
}
