//! Process confinement for each VPN Share role: seccomp, capabilities, rlimits, filesystem
//! view, descriptor table and environment.
//!
//! Every process calls [`confine`] once, after its start-up (descriptors received, runtime
//! not yet started or started with the fds kept) and before it reads the first untrusted
//! byte. What each role is allowed, and why, is data ([`policy`]); `docs/security.md`
//! holds the same tables, rendered from that data and checked by a test.
//!
//! ```no_run
//! use security::{ConfineOptions, Role, confine};
//! # fn main() -> Result<(), security::Error> {
//! let transport_fd = 3;
//! let ipc_fd = 4;
//! let report = confine(Role::ParserWorker, &ConfineOptions::keep(&[transport_fd, ipc_fd]))?;
//! tracing::info!(?report, "confined");
//! # Ok(())
//! # }
//! ```

mod fsview;
pub mod logging;
pub mod policy;
mod seccomp;

use std::os::fd::RawFd;
use std::path::PathBuf;

use capctl::{Cap, CapSet, CapState};
use nix::sys::resource::{Resource, getrlimit, setrlimit};

pub use fsview::FsView;
pub use policy::FilterKind;

/// The process roles of VPN Share (design §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Gateway: one per peer; decrypts and validates untrusted input.
    ParserWorker,
    /// Gateway: userspace TCP/UDP NAT and DNS, re-originates flows with OS sockets.
    Netstack,
    /// Gateway: state, policy, the static key; execs workers.
    Broker,
    /// Client: moves packets between the TUN fd and the gateway.
    ClientSession,
    /// Client: the privileged helper (CAP_NET_ADMIN only).
    ClientHelper,
}

impl Role {
    /// Every role, in the order the document lists them.
    pub const ALL: [Role; 5] = [
        Role::ParserWorker,
        Role::Netstack,
        Role::Broker,
        Role::ClientSession,
        Role::ClientHelper,
    ];
}

impl std::str::FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "parser-worker" | "ParserWorker" => Ok(Role::ParserWorker),
            "netstack" | "Netstack" => Ok(Role::Netstack),
            "broker" | "Broker" => Ok(Role::Broker),
            "client-session" | "ClientSession" => Ok(Role::ClientSession),
            "client-helper" | "ClientHelper" => Ok(Role::ClientHelper),
            _ => Err(Error::UnknownRole(s.to_owned())),
        }
    }
}

/// Whether the confined process may create threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Threads {
    /// `clone` with `CLONE_THREAD` (and no namespace flag) is allowed; new processes are
    /// killed by seccomp.
    #[default]
    Allowed,
    /// `clone` is not allowed at all and RLIMIT_NPROC is 0. For single-threaded loops.
    Forbidden,
}

/// What a seccomp violation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Violation {
    /// Kill the whole process with SIGSYS (production).
    #[default]
    KillProcess,
    /// Allow and log to the kernel audit log: only for developing a policy.
    Log,
}

/// What [`confine`] keeps and how strict it is beyond the role's defaults.
#[derive(Debug, Clone, Default)]
pub struct ConfineOptions {
    /// Descriptors that stay open (besides 0, 1, 2). Every other descriptor is closed.
    pub keep_fds: Vec<RawFd>,
    /// Keep stdin/stdout/stderr as they are. When false, the standard descriptors not in
    /// `keep_fds` are pointed at `/dev/null` (so that their numbers stay taken).
    pub keep_stdio: bool,
    /// Thread policy (default: threads allowed).
    pub threads: Threads,
    /// Clear the environment (default on; requires a single-threaded process — clear it
    /// in the caller before any thread starts and set this to false otherwise).
    pub keep_env: bool,
    /// Do not try the user-namespace filesystem view (tests of the fallback).
    pub no_user_namespace: bool,
    /// What a seccomp violation does.
    pub violation: Violation,
}

impl ConfineOptions {
    /// Keep these descriptors and stdio; defaults otherwise.
    pub fn keep(fds: &[RawFd]) -> Self {
        ConfineOptions {
            keep_fds: fds.to_vec(),
            keep_stdio: true,
            ..ConfineOptions::default()
        }
    }
}

/// The fixed, non-seccomp part of a role's confinement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    /// The only capability kept (the helper's CAP_NET_ADMIN), else none.
    pub keep_cap: Option<Cap>,
    /// RLIMIT_NOFILE.
    pub max_open_files: u64,
    /// RLIMIT_DATA in bytes (writable private memory: heap, thread stacks, anonymous
    /// maps). Not RLIMIT_AS: glibc reserves 64 MiB of address space per malloc arena and
    /// tokio starts a thread (and an arena) per worker, so an address-space bound either
    /// kills healthy processes or bounds nothing. RLIMIT_DATA counts only what can be
    /// written. `None`: unchanged.
    pub max_data_bytes: Option<u64>,
    /// Build the empty filesystem view.
    pub empty_root: bool,
    /// May this role's RLIMIT_NPROC be 0 (with [`Threads::Forbidden`])? Not the broker,
    /// which spawns workers.
    pub nproc_zero_allowed: bool,
}

const MIB: u64 = 1024 * 1024;

/// The fixed profile of a role.
pub fn profile(role: Role) -> Profile {
    match role {
        Role::ParserWorker => Profile {
            keep_cap: None,
            max_open_files: 64,
            max_data_bytes: Some(512 * MIB),
            empty_root: true,
            nproc_zero_allowed: true,
        },
        Role::Netstack => Profile {
            keep_cap: None,
            // One descriptor per relayed flow: up to 64,000 flows of all peers
            // (netstack `DEFAULT_TOTAL_FLOWS`) plus the data channels and DNS sockets.
            max_open_files: 65_536,
            max_data_bytes: Some(2048 * MIB),
            empty_root: false,
            nproc_zero_allowed: true,
        },
        Role::Broker => Profile {
            keep_cap: None,
            max_open_files: 8192,
            max_data_bytes: Some(2048 * MIB),
            empty_root: false,
            nproc_zero_allowed: false,
        },
        Role::ClientSession => Profile {
            keep_cap: None,
            max_open_files: 256,
            max_data_bytes: Some(1024 * MIB),
            empty_root: false,
            nproc_zero_allowed: true,
        },
        Role::ClientHelper => Profile {
            keep_cap: Some(Cap::NET_ADMIN),
            max_open_files: 64,
            max_data_bytes: Some(256 * MIB),
            empty_root: false,
            nproc_zero_allowed: true,
        },
    }
}

impl Profile {
    /// One line for the document.
    pub fn describe(&self) -> String {
        let caps = match self.keep_cap {
            Some(cap) => format!("only `CAP_{cap:?}`"),
            None => "none".to_owned(),
        };
        let data = match self.max_data_bytes {
            Some(b) => format!("RLIMIT_DATA {} MiB", b / MIB),
            None => "RLIMIT_DATA unchanged".to_owned(),
        };
        let root = if self.empty_root {
            "empty filesystem view"
        } else {
            "host filesystem view"
        };
        let nproc = if self.nproc_zero_allowed {
            "RLIMIT_NPROC 0 when single-threaded"
        } else {
            "RLIMIT_NPROC unchanged (spawns workers)"
        };
        format!(
            "Capabilities: {caps}; no_new_privs; RLIMIT_CORE 0; RLIMIT_NOFILE {}; {data}; {nproc}; {root}.",
            self.max_open_files
        )
    }
}

/// What [`confine`] applied. Log it; tests assert on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    /// The role.
    pub role: Role,
    /// Allowlist or denylist.
    pub filter: FilterKind,
    /// How many syscalls the main filter lists.
    pub syscalls_listed: usize,
    /// How many filters were installed (the errno filter for `clone3` plus the main one).
    pub filters_installed: usize,
    /// The filesystem view.
    pub fs_view: FsView,
    /// The descriptors left open.
    pub open_fds: Vec<RawFd>,
    /// Whether the environment was cleared.
    pub env_cleared: bool,
    /// The capability still held (the helper's CAP_NET_ADMIN, if it had it to begin
    /// with); `None` for every other role.
    pub kept_capability: Option<Cap>,
    /// Whether the bounding set could be cleared (needs CAP_SETPCAP; without it the
    /// process holds no capability anyway, and no_new_privs keeps execve from adding any).
    pub bounding_cleared: bool,
    /// Whether the securebits were locked (needs CAP_SETPCAP).
    pub securebits_locked: bool,
    /// The thread policy applied.
    pub threads: Threads,
    /// RLIMIT_NPROC was set to 0.
    pub nproc_zero: bool,
}

/// Why confinement failed. The caller must not go on: exit non-zero.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The name of a role is unknown.
    #[error("unknown role {0:?}")]
    UnknownRole(String),
    /// seccompiler supports x86_64, aarch64 and riscv64 only.
    #[error("seccomp filters are not available on {0} (x86_64, aarch64, riscv64 only)")]
    UnsupportedArch(&'static str),
    /// The environment cannot be cleared safely once threads run.
    #[error(
        "{0} threads are running: clear the environment before starting threads (or set keep_env)"
    )]
    NotSingleThreaded(usize),
    /// A policy table is inconsistent.
    #[error("policy: {0}")]
    Policy(&'static str),
    /// A filter could not be compiled.
    #[error("seccomp filter: {0}")]
    SeccompBuild(#[from] seccompiler::BackendError),
    /// A filter could not be installed.
    #[error("seccomp install: {0}")]
    SeccompInstall(#[from] seccompiler::Error),
    /// A capability operation failed.
    #[error("capabilities ({what}): {source}")]
    Caps {
        /// The step.
        what: &'static str,
        /// The error.
        source: capctl::Error,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// The step.
        what: &'static str,
        /// The error.
        source: nix::Error,
    },
    /// An I/O error.
    #[error("{what}: {source}")]
    Io {
        /// The step.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> Error {
    move |source| Error::Sys { what, source }
}

fn caps_err(what: &'static str) -> impl FnOnce(capctl::Error) -> Error {
    move |source| Error::Caps { what, source }
}

/// Confines the calling process as `role`. Call once, after start-up, before the first
/// untrusted byte is read; the process cannot undo any of it (a second call from an
/// allowlisted role is itself a violation and kills the process).
///
/// On error, earlier steps may be applied but the seccomp filter is not: the caller must
/// exit non-zero, never go on unconfined.
///
/// In order: refuse if threads run and the environment is to be cleared; clear the
/// environment; close every descriptor but stdio and `keep_fds`; build the empty
/// filesystem view (parser worker); set rlimits; make the process non-dumpable; lock the
/// securebits, clear the capability sets (but the helper's CAP_NET_ADMIN); set
/// no_new_privs; install the seccomp filters on all threads (TSYNC).
pub fn confine(role: Role, options: &ConfineOptions) -> Result<Confinement, Error> {
    let profile = profile(role);
    // Compile first: a policy error must leave the process untouched.
    let compiled = seccomp::compile(role, options.threads, options.violation)?;

    // Before the environment is cleared ($TMPDIR); used by the chroot fallback only.
    let scratch = scratch_dir();
    let env_cleared = if options.keep_env {
        false
    } else {
        let threads = thread_count()?;
        if threads > 1 {
            return Err(Error::NotSingleThreaded(threads));
        }
        clear_environment();
        true
    };

    if !options.keep_stdio {
        redirect_stdio_to_null(&options.keep_fds)?;
    }
    let open_fds = close_other_fds(&options.keep_fds)?;

    let fs_view = if profile.empty_root {
        let skip_userns = if options.no_user_namespace {
            Some("disabled by the caller (ConfineOptions::no_user_namespace)".to_owned())
        } else {
            match thread_count() {
                Ok(1) => None,
                Ok(n) => Some(format!("{n} threads run: unshare(CLONE_NEWUSER) needs one")),
                Err(e) => Some(e.to_string()),
            }
        };
        fsview::empty_root(skip_userns, &scratch)
    } else {
        FsView::Host
    };

    let nproc_zero = profile.nproc_zero_allowed && options.threads == Threads::Forbidden;
    set_rlimits(&profile, nproc_zero)?;
    capctl::prctl::set_dumpable(false).map_err(caps_err("PR_SET_DUMPABLE"))?;
    let (kept_capability, bounding_cleared, securebits_locked) =
        drop_capabilities(profile.keep_cap)?;
    capctl::prctl::set_no_new_privs().map_err(caps_err("PR_SET_NO_NEW_PRIVS"))?;
    seccomp::install(&compiled)?;

    Ok(Confinement {
        role,
        filter: compiled.kind,
        syscalls_listed: compiled.listed,
        filters_installed: compiled.programs.len(),
        fs_view,
        open_fds,
        env_cleared,
        kept_capability,
        bounding_cleared,
        securebits_locked,
        threads: options.threads,
        nproc_zero,
    })
}

fn thread_count() -> Result<usize, Error> {
    let dir = std::fs::read_dir("/proc/self/task").map_err(|source| Error::Io {
        what: "list /proc/self/task",
        source,
    })?;
    Ok(dir.count())
}

fn scratch_dir() -> PathBuf {
    // The chroot fallback only needs a directory root can create a subdirectory in.
    let tmp = std::env::temp_dir();
    if tmp.is_dir() {
        tmp
    } else {
        PathBuf::from("/")
    }
}

fn clear_environment() {
    let keys: Vec<_> = std::env::vars_os().map(|(k, _)| k).collect();
    for key in keys {
        // SAFETY: `confine` checked just before (thread_count() == 1) that this process
        // runs a single thread, so no other thread can read or write the environment
        // concurrently; confine is documented to run before any thread is started.
        unsafe { std::env::remove_var(&key) };
    }
}

fn redirect_stdio_to_null(keep: &[RawFd]) -> Result<(), Error> {
    use std::os::fd::AsRawFd;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|source| Error::Io {
            what: "open /dev/null",
            source,
        })?;
    for fd in 0..=2 {
        if !keep.contains(&fd) {
            // SAFETY: dup2 takes two plain integers; `null` is a valid open descriptor for
            // the duration of the call and `fd` is a standard descriptor number.
            let rc = unsafe { libc::dup2(null.as_raw_fd(), fd) };
            if rc < 0 {
                return Err(Error::Io {
                    what: "dup2 /dev/null onto stdio",
                    source: std::io::Error::last_os_error(),
                });
            }
        }
    }
    Ok(())
}

/// Closes every descriptor except 0, 1, 2 and `keep`; returns the ones left open.
fn close_other_fds(keep: &[RawFd]) -> Result<Vec<RawFd>, Error> {
    let mut kept: Vec<RawFd> = keep.iter().copied().filter(|fd| *fd > 2).collect();
    kept.extend([0, 1, 2]);
    kept.sort_unstable();
    kept.dedup();
    // Gaps between kept descriptors, then everything above the last one.
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for pair in kept.windows(2) {
        if let [a, b] = pair {
            if b - a > 1 {
                ranges.push((to_u32(a + 1)?, to_u32(b - 1)?));
            }
        }
    }
    let last = kept.last().copied().unwrap_or(2);
    ranges.push((to_u32(last + 1)?, u32::MAX));
    for (first, end) in ranges {
        // SAFETY: close_range takes plain integers and only closes descriptors; the
        // descriptors it closes are owned by no live Rust object the caller still uses
        // (the caller listed every descriptor it keeps).
        let rc = unsafe { libc::syscall(libc::SYS_close_range, first, end, 0u32) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENOSYS) {
                close_by_listing(&kept)?;
                break;
            }
            return Err(Error::Io {
                what: "close_range",
                source: err,
            });
        }
    }
    Ok(kept)
}

/// Kernels before 5.9 have no close_range: list /proc/self/fd instead.
fn close_by_listing(kept: &[RawFd]) -> Result<(), Error> {
    let entries = std::fs::read_dir("/proc/self/fd").map_err(|source| Error::Io {
        what: "list /proc/self/fd",
        source,
    })?;
    let fds: Vec<RawFd> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    for fd in fds {
        if !kept.contains(&fd) {
            // SAFETY: closing a plain descriptor number; the listing's own descriptor is
            // already closed (the iterator was consumed) and EBADF is harmless.
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

fn to_u32(fd: RawFd) -> Result<u32, Error> {
    u32::try_from(fd).map_err(|_| Error::Policy("negative descriptor in keep_fds"))
}

fn set_rlimits(profile: &Profile, nproc_zero: bool) -> Result<(), Error> {
    lower(Resource::RLIMIT_CORE, 0)?;
    lower(Resource::RLIMIT_NOFILE, profile.max_open_files)?;
    if let Some(bytes) = profile.max_data_bytes {
        lower(Resource::RLIMIT_DATA, bytes)?;
    }
    if nproc_zero {
        lower(Resource::RLIMIT_NPROC, 0)?;
    }
    Ok(())
}

/// Sets soft and hard limit to `value`, or to the current hard limit if that is lower
/// (raising a hard limit needs a capability the roles do not keep).
fn lower(resource: Resource, value: u64) -> Result<(), Error> {
    let (_, hard) = getrlimit(resource).map_err(sys("getrlimit"))?;
    let v = value.min(hard);
    setrlimit(resource, v, v).map_err(sys("setrlimit"))
}

/// Clears ambient, inheritable, bounding, permitted and effective sets except `keep`.
/// Returns (capability kept, bounding cleared, securebits locked).
fn drop_capabilities(keep: Option<Cap>) -> Result<(Option<Cap>, bool, bool), Error> {
    let current = CapState::get_current().map_err(caps_err("capget"))?;
    let can_setpcap = current.effective.has(Cap::SETPCAP);

    let mut securebits_locked = false;
    if can_setpcap {
        use capctl::prctl::Secbits;
        // Root gets no capabilities back through execve or a uid change, and nothing can
        // raise ambient capabilities; locked so it cannot be undone.
        let bits = Secbits::NOROOT
            | Secbits::NOROOT_LOCKED
            | Secbits::NO_SETUID_FIXUP
            | Secbits::NO_SETUID_FIXUP_LOCKED
            | Secbits::KEEP_CAPS_LOCKED
            | Secbits::NO_CAP_AMBIENT_RAISE
            | Secbits::NO_CAP_AMBIENT_RAISE_LOCKED;
        capctl::prctl::set_securebits(bits).map_err(caps_err("securebits"))?;
        securebits_locked = true;
    }

    capctl::ambient::clear().map_err(caps_err("clear ambient"))?;

    let mut bounding_cleared = false;
    if can_setpcap {
        for cap in Cap::iter() {
            if Some(cap) != keep && capctl::bounding::read(cap) == Some(true) {
                capctl::bounding::drop(cap).map_err(caps_err("drop bounding"))?;
            }
        }
        capctl::bounding::clear_unknown().map_err(caps_err("drop unknown bounding"))?;
        bounding_cleared = true;
    }

    let mut set = CapSet::empty();
    let kept = keep.filter(|cap| current.permitted.has(*cap));
    if let Some(cap) = kept {
        set.add(cap);
    }
    let state = CapState {
        effective: set,
        permitted: set,
        inheritable: CapSet::empty(),
    };
    state.set_current().map_err(caps_err("capset"))?;
    Ok((kept, bounding_cleared, securebits_locked))
}
