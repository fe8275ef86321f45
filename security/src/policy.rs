//! The seccomp policy of every role, kept as data.
//!
//! Each entry names a syscall, says why the role needs it and, where it matters, which
//! arguments are allowed. The filters are compiled from these tables
//! (`seccomp.rs`) and the tables in `docs/security.md` are rendered from them
//! ([`render_markdown`]); a test fails when the document and the data disagree, so the
//! document cannot drift from what the code installs.
//!
//! The numbers are the ones of the architecture the crate is compiled for. A few legacy
//! syscalls (`poll`, `epoll_wait`, `rename`, `unlink`, `iopl`, `ioperm`, `uselib`) are
//! listed on x86_64 only; aarch64 and riscv64 glibc uses their `*at`/`p*` forms, which the
//! tables list as well. The rendered document is the x86_64 view.

use crate::Role;

/// How an argument is compared. Mirrors the two comparisons the policy needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    /// `arg == value`
    Eq,
    /// `arg & mask == value`
    MaskedEq(u64),
}

/// How many bits of the argument are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    /// The low 32 bits (ints, flags, ioctl requests — the kernel reads those as 32 bits).
    Dword,
    /// All 64 bits (pointers).
    Qword,
}

/// One comparison on one syscall argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cond {
    /// Argument index, 0-based.
    pub arg: u8,
    /// How many bits are compared.
    pub width: Width,
    /// The comparison.
    pub cmp: Cmp,
    /// The value compared against.
    pub value: u64,
    /// The value as written in the source (`AF_INET`, `FIONBIO`, ...), for the document.
    pub text: &'static str,
    /// The mask as written in the source, for [`Cmp::MaskedEq`].
    pub mask_text: &'static str,
}

/// Which calls of a syscall are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Args {
    /// Every call.
    Any,
    /// A call matching at least one of the alternatives; an alternative matches when all
    /// of its conditions hold.
    OneOf(&'static [&'static [Cond]]),
    /// Not run: the call returns this errno (`clone3` answers `ENOSYS` so that glibc
    /// falls back to `clone`, whose flags, unlike those of `clone3`, seccomp can read).
    Errno(i32),
}

/// One allowed (or, for the broker's denylist, forbidden) syscall with its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Syscall {
    /// The syscall's name, as in `libc::SYS_<name>`.
    pub name: &'static str,
    /// Its number on this architecture.
    pub nr: i64,
    /// Which calls are allowed.
    pub args: Args,
    /// Why the role needs it (or, in a denylist, why it is forbidden).
    pub reason: &'static str,
}

/// Whether a role's filter lists what is allowed or what is forbidden.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterKind {
    /// Everything not listed kills the process.
    Allowlist,
    /// Everything listed kills the process; the rest is allowed.
    Denylist,
}

macro_rules! sys {
    ($nr:ident, $reason:expr) => {
        sys!($nr, Args::Any, $reason)
    };
    ($nr:ident, $args:expr, $reason:expr) => {
        Syscall {
            name: strip_sys(stringify!($nr)),
            nr: libc::$nr as i64,
            args: $args,
            reason: $reason,
        }
    };
}

/// `"SYS_read"` → `"read"`, at compile time.
const fn strip_sys(name: &'static str) -> &'static str {
    match name.as_bytes() {
        [b'S', b'Y', b'S', b'_', rest @ ..] => match std::str::from_utf8(rest) {
            Ok(rest) => rest,
            Err(_) => name,
        },
        _ => name,
    }
}

/// A 32-bit `arg == CONST` condition.
macro_rules! eq {
    ($arg:literal, $($v:ident)::+) => {
        Cond {
            arg: $arg,
            width: Width::Dword,
            cmp: Cmp::Eq,
            value: $($v)::+ as u64,
            text: last_ident!($($v)::+),
            mask_text: "",
        }
    };
}

/// A 32-bit `arg & MASK == CONST` condition.
macro_rules! masked {
    ($arg:literal, $($m:ident)::+, $v:literal) => {
        Cond {
            arg: $arg,
            width: Width::Dword,
            cmp: Cmp::MaskedEq($($m)::+ as u64),
            value: $v,
            text: stringify!($v),
            mask_text: last_ident!($($m)::+),
        }
    };
    ($arg:literal, $($m:ident)::+, $($v:ident)::+) => {
        Cond {
            arg: $arg,
            width: Width::Dword,
            cmp: Cmp::MaskedEq($($m)::+ as u64),
            value: $($v)::+ as u64,
            text: last_ident!($($v)::+),
            mask_text: last_ident!($($m)::+),
        }
    };
}

/// A 64-bit `arg == NULL` condition (pointer arguments).
macro_rules! null {
    ($arg:literal) => {
        Cond {
            arg: $arg,
            width: Width::Qword,
            cmp: Cmp::Eq,
            value: 0,
            text: "NULL",
            mask_text: "",
        }
    };
}

macro_rules! last_ident {
    ($first:ident) => { stringify!($first) };
    ($first:ident :: $($rest:ident)::+) => { last_ident!($($rest)::+) };
}

/// `clone` flags checked for thread creation: the thread flag must be set and no
/// namespace flag may be.
pub const CLONE_CHECKED: u64 = (libc::CLONE_THREAD
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP) as u64;

/// The `type` argument of `socket()` without `SOCK_NONBLOCK`/`SOCK_CLOEXEC`.
pub const SOCK_TYPE_MASK: u64 = 0xf;

/// `PROT_EXEC`: no role maps new executable memory after start-up.
const PROT_EXEC: u64 = libc::PROT_EXEC as u64;

/// What every allowlisted role needs to run Rust, glibc, threads, tokio and the panic path
/// (stderr message, unwinding or abort).
pub static RUNTIME: &[Syscall] = &[
    sys!(
        SYS_read,
        "read inherited descriptors (IPC, transport, TUN, stdin)"
    ),
    sys!(
        SYS_write,
        "write inherited descriptors; log and panic messages to stderr"
    ),
    sys!(SYS_readv, "vectored reads of inherited descriptors"),
    sys!(SYS_writev, "vectored writes of inherited descriptors"),
    sys!(SYS_close, "close descriptors the process owns"),
    sys!(SYS_brk, "heap growth (malloc)"),
    sys!(
        SYS_mmap,
        Args::OneOf(&[&[masked!(2, PROT_EXEC, 0)]]),
        "allocation, thread stacks; never executable memory"
    ),
    sys!(
        SYS_mprotect,
        Args::OneOf(&[&[masked!(2, PROT_EXEC, 0)]]),
        "guard pages of thread and signal stacks; never executable memory"
    ),
    sys!(SYS_munmap, "free memory, thread stacks"),
    sys!(SYS_mremap, "grow large allocations (realloc)"),
    sys!(SYS_madvise, "return freed memory; glibc at thread exit"),
    sys!(SYS_futex, "locks, condition variables, thread join"),
    sys!(SYS_set_robust_list, "glibc registers each new thread"),
    sys!(
        SYS_rseq,
        "glibc registers each new thread (restartable sequences)"
    ),
    sys!(SYS_sched_yield, "spin loops of locks and tokio"),
    sys!(SYS_sched_getaffinity, "std::thread::available_parallelism"),
    sys!(
        SYS_clone,
        Args::OneOf(&[&[masked!(0, CLONE_CHECKED, libc::CLONE_THREAD)]]),
        "threads only: CLONE_THREAD set, no namespace flag (a new process is killed)"
    ),
    sys!(
        SYS_clone3,
        Args::Errno(libc::ENOSYS),
        "answers ENOSYS: its flags are out of seccomp's reach, glibc falls back to clone"
    ),
    sys!(SYS_exit, "thread exit"),
    sys!(SYS_exit_group, "process exit, also after a panic"),
    sys!(
        SYS_restart_syscall,
        "resume a syscall interrupted by a signal"
    ),
    sys!(SYS_rt_sigaction, "signal handlers (tokio, abort)"),
    sys!(SYS_rt_sigprocmask, "signal masks of threads; abort"),
    sys!(SYS_rt_sigreturn, "return from a signal handler"),
    sys!(
        SYS_sigaltstack,
        "std's stack-overflow handler stack, per thread"
    ),
    sys!(SYS_getpid, "abort raises SIGABRT on itself"),
    sys!(SYS_gettid, "abort raises SIGABRT on itself; thread ids"),
    sys!(SYS_tgkill, "abort raises SIGABRT on itself"),
    sys!(SYS_clock_gettime, "time (when the vDSO cannot answer)"),
    sys!(SYS_clock_nanosleep, "sleeps"),
    sys!(SYS_nanosleep, "sleeps"),
    sys!(SYS_getrandom, "ephemeral keys (ring, snow), hash seeds"),
    sys!(
        SYS_epoll_create1,
        "event loop (tokio, mio or a plain epoll loop)"
    ),
    sys!(SYS_epoll_ctl, "event loop registrations"),
    #[cfg(target_arch = "x86_64")]
    sys!(SYS_epoll_wait, "event loop wait"),
    sys!(SYS_epoll_pwait, "event loop wait"),
    sys!(SYS_epoll_pwait2, "event loop wait"),
    sys!(SYS_eventfd2, "event loop wake-up (mio waker)"),
    #[cfg(target_arch = "x86_64")]
    sys!(SYS_poll, "plain poll loops"),
    sys!(SYS_ppoll, "plain poll loops"),
    sys!(
        SYS_fcntl,
        Args::OneOf(&[
            &[eq!(1, libc::F_GETFD)],
            &[eq!(1, libc::F_SETFD)],
            &[eq!(1, libc::F_GETFL)],
            &[eq!(1, libc::F_SETFL)],
            &[eq!(1, libc::F_DUPFD_CLOEXEC)],
        ]),
        "descriptor flags (non-blocking, close-on-exec); tokio duplicates its signal pipe"
    ),
    sys!(
        SYS_ioctl,
        Args::OneOf(&[
            &[eq!(1, libc::FIONBIO)],
            &[eq!(1, libc::FIOCLEX)],
            &[eq!(1, libc::FIONREAD)],
        ]),
        "non-blocking mode, close-on-exec, bytes pending; no other request"
    ),
    sys!(
        SYS_prctl,
        Args::OneOf(&[&[eq!(0, libc::PR_SET_NAME)], &[eq!(0, libc::PR_GET_NAME)]]),
        "thread names only"
    ),
    sys!(
        SYS_socketpair,
        Args::OneOf(&[&[eq!(0, libc::AF_UNIX)]]),
        "AF_UNIX only: tokio's signal driver wake-up pair (reaches nothing outside)"
    ),
];

/// Parser-sandbox worker: I/O on the transport socket and the IPC socket it inherited.
pub static PARSER_WORKER: &[Syscall] = &[
    sys!(
        SYS_recvfrom,
        "recv() on the inherited transport and IPC sockets"
    ),
    sys!(
        SYS_sendto,
        Args::OneOf(&[&[null!(4)]]),
        "send() on inherited sockets; no destination address"
    ),
    sys!(SYS_recvmsg, "IPC messages; datagram transport"),
    sys!(SYS_sendmsg, "IPC messages; datagram transport"),
    sys!(SYS_recvmmsg, "batched datagram receive"),
    sys!(SYS_sendmmsg, "batched datagram send"),
    sys!(SYS_shutdown, "end a stream transport"),
    sys!(SYS_getsockopt, "SO_ERROR of the inherited sockets (mio)"),
];

/// `socket()` arguments of the roles that talk to the network: AF_INET or AF_INET6,
/// stream or datagram (flags such as SOCK_NONBLOCK masked off); nothing raw, packet,
/// netlink or unix.
const INET_STREAM_OR_DGRAM: Args = Args::OneOf(&[
    &[
        eq!(0, libc::AF_INET),
        masked!(1, SOCK_TYPE_MASK, libc::SOCK_STREAM),
    ],
    &[
        eq!(0, libc::AF_INET),
        masked!(1, SOCK_TYPE_MASK, libc::SOCK_DGRAM),
    ],
    &[
        eq!(0, libc::AF_INET6),
        masked!(1, SOCK_TYPE_MASK, libc::SOCK_STREAM),
    ],
    &[
        eq!(0, libc::AF_INET6),
        masked!(1, SOCK_TYPE_MASK, libc::SOCK_DGRAM),
    ],
]);

/// Netstack: opens and uses the OS sockets that re-originate the peers' flows.
pub static NETSTACK: &[Syscall] = &[
    sys!(
        SYS_socket,
        INET_STREAM_OR_DGRAM,
        "AF_INET/AF_INET6 stream or datagram (TCP, UDP, unprivileged ICMP ping) only"
    ),
    sys!(SYS_connect, "originate TCP flows; connect UDP flows"),
    sys!(SYS_bind, "pick the source port or the VPN address"),
    sys!(
        SYS_setsockopt,
        "non-blocking options, buffer sizes, TCP_NODELAY, IP_TTL"
    ),
    sys!(SYS_getsockopt, "SO_ERROR after a non-blocking connect"),
    sys!(SYS_getsockname, "local address of a flow"),
    sys!(SYS_getpeername, "remote address of a flow"),
    sys!(SYS_recvfrom, "UDP and ICMP replies"),
    sys!(SYS_sendto, "UDP datagrams and ICMP echo requests"),
    sys!(SYS_recvmsg, "IPC messages; datagrams with ancillary data"),
    sys!(SYS_sendmsg, "IPC messages; datagrams"),
    sys!(SYS_recvmmsg, "batched datagram receive"),
    sys!(SYS_sendmmsg, "batched datagram send"),
    sys!(SYS_shutdown, "half-close TCP flows"),
];

/// Client session: the TUN fd it received and the sockets to the gateway.
pub static CLIENT_SESSION: &[Syscall] = &[
    sys!(
        SYS_socket,
        INET_STREAM_OR_DGRAM,
        "AF_INET/AF_INET6 stream or datagram only: reconnect to the gateway"
    ),
    sys!(SYS_connect, "reach the gateway (TCP, connected UDP)"),
    sys!(SYS_bind, "bind the UDP socket"),
    sys!(SYS_setsockopt, "buffer sizes, TCP_NODELAY, UDP_GRO"),
    sys!(SYS_getsockopt, "SO_ERROR after a non-blocking connect"),
    sys!(SYS_getsockname, "local address"),
    sys!(SYS_getpeername, "gateway address"),
    sys!(
        SYS_recvfrom,
        "datagrams from the gateway; IPC with the helper"
    ),
    sys!(SYS_sendto, "datagrams to the gateway"),
    sys!(SYS_recvmsg, "IPC with the helper"),
    sys!(SYS_sendmsg, "IPC with the helper"),
    sys!(SYS_recvmmsg, "batched datagram receive"),
    sys!(SYS_sendmmsg, "batched datagram send"),
    sys!(SYS_shutdown, "end a stream transport"),
    sys!(
        SYS_pwrite64,
        "the resume ticket into its pre-opened state-dir file"
    ),
    sys!(SYS_fdatasync, "the resume ticket's durability"),
];

/// Client helper: TUN, routes, DNS, its journal; CAP_NET_ADMIN, never exec.
pub static CLIENT_HELPER: &[Syscall] = &[
    sys!(
        SYS_socket,
        Args::OneOf(&[
            &[eq!(0, libc::AF_NETLINK), eq!(2, libc::NETLINK_ROUTE)],
            &[eq!(0, libc::AF_UNIX)],
            &[
                eq!(0, libc::AF_INET),
                masked!(1, SOCK_TYPE_MASK, libc::SOCK_DGRAM)
            ],
        ]),
        "AF_NETLINK route family (links, addresses, routes), AF_UNIX, AF_INET datagram (interface ioctls) only"
    ),
    sys!(SYS_bind, "bind netlink sockets"),
    sys!(
        SYS_accept4,
        "accept the client session on the helper socket"
    ),
    sys!(SYS_getsockopt, "SO_PEERCRED: authenticate the caller"),
    sys!(
        SYS_setsockopt,
        "netlink options (extended ack, strict checking)"
    ),
    sys!(SYS_getsockname, "netlink port id"),
    sys!(SYS_recvfrom, "netlink replies; requests"),
    sys!(SYS_sendto, "netlink requests"),
    sys!(SYS_recvmsg, "netlink replies; requests"),
    sys!(SYS_sendmsg, "netlink requests; the TUN fd with SCM_RIGHTS"),
    sys!(SYS_shutdown, "end a client connection"),
    sys!(
        SYS_ioctl,
        Args::OneOf(&[
            &[eq!(1, libc::FIONBIO)],
            &[eq!(1, libc::FIOCLEX)],
            &[eq!(1, libc::FIONREAD)],
            &[eq!(1, libc::TUNSETIFF)],
            &[eq!(1, libc::TUNGETIFF)],
            &[eq!(1, libc::TUNSETOFFLOAD)],
            &[eq!(1, libc::TUNSETVNETHDRSZ)],
            &[eq!(1, libc::SIOCGIFINDEX)],
            &[eq!(1, libc::SIOCGIFFLAGS)],
            &[eq!(1, libc::SIOCSIFFLAGS)],
            &[eq!(1, libc::SIOCGIFMTU)],
            &[eq!(1, libc::SIOCSIFMTU)],
        ]),
        "TUN creation and offloads, interface index, flags and MTU; no other request"
    ),
    sys!(
        SYS_openat,
        "/dev/net/tun, the journal, /etc/resolv.conf and its temporary"
    ),
    sys!(SYS_newfstatat, "metadata of the journal and resolv.conf"),
    sys!(SYS_fstat, "metadata of open files"),
    sys!(SYS_statx, "metadata (std::fs)"),
    sys!(SYS_lseek, "journal rewrite"),
    sys!(SYS_ftruncate, "journal rewrite"),
    sys!(SYS_fsync, "journal and resolv.conf durability"),
    sys!(SYS_fdatasync, "journal durability"),
    sys!(SYS_flock, "one helper per journal"),
    sys!(SYS_fchmod, "resolv.conf keeps mode 0644"),
    #[cfg(target_arch = "x86_64")]
    sys!(
        SYS_rename,
        "atomic replacement of resolv.conf and the journal"
    ),
    sys!(
        SYS_renameat,
        "atomic replacement of resolv.conf and the journal"
    ),
    sys!(
        SYS_renameat2,
        "atomic replacement of resolv.conf and the journal"
    ),
    #[cfg(target_arch = "x86_64")]
    sys!(SYS_unlink, "remove the journal after a clean restore"),
    sys!(SYS_unlinkat, "remove the journal after a clean restore"),
    #[cfg(target_arch = "x86_64")]
    sys!(SYS_readlink, "save /etc/resolv.conf when it is a symlink"),
    sys!(SYS_readlinkat, "save /etc/resolv.conf when it is a symlink"),
    #[cfg(target_arch = "x86_64")]
    sys!(
        SYS_symlink,
        "restore /etc/resolv.conf as the symlink it was"
    ),
    sys!(
        SYS_symlinkat,
        "restore /etc/resolv.conf as the symlink it was"
    ),
    sys!(SYS_getuid, "compare the caller's SO_PEERCRED uid"),
    sys!(SYS_geteuid, "compare the caller's SO_PEERCRED uid"),
];

/// Broker denylist: syscalls the broker never needs and that would widen a compromise.
///
/// `mount`, `umount2`, `pivot_root`, `chroot`, `unshare` and `seccomp` are deliberately
/// absent: a seccomp filter is inherited across `execve`, and the parser-sandbox workers
/// the broker execs need exactly those to build their empty root and install their own,
/// stricter filter. The broker holds no capability, so it cannot use them on the host's
/// mounts itself.
pub static BROKER_DENY: &[Syscall] = &[
    sys!(
        SYS_ptrace,
        "reading another process's memory (a worker's, a netstack's)"
    ),
    sys!(SYS_process_vm_readv, "reading another process's memory"),
    sys!(SYS_process_vm_writev, "writing another process's memory"),
    sys!(SYS_pidfd_getfd, "stealing another process's descriptors"),
    sys!(SYS_kcmp, "probing another process's kernel objects"),
    sys!(SYS_bpf, "kernel attack surface; no use"),
    sys!(SYS_perf_event_open, "side channels, kernel attack surface"),
    sys!(SYS_userfaultfd, "a classic kernel-exploit primitive"),
    sys!(
        SYS_io_uring_setup,
        "I/O whose operations seccomp does not see"
    ),
    sys!(
        SYS_io_uring_enter,
        "I/O whose operations seccomp does not see"
    ),
    sys!(
        SYS_io_uring_register,
        "I/O whose operations seccomp does not see"
    ),
    sys!(SYS_kexec_load, "replacing the kernel"),
    #[cfg(not(target_arch = "riscv64"))]
    sys!(SYS_kexec_file_load, "replacing the kernel"),
    sys!(SYS_init_module, "loading kernel code"),
    sys!(SYS_finit_module, "loading kernel code"),
    sys!(SYS_delete_module, "unloading kernel code"),
    sys!(SYS_reboot, "no use"),
    sys!(SYS_swapon, "no use"),
    sys!(SYS_swapoff, "no use"),
    sys!(SYS_acct, "no use"),
    sys!(SYS_quotactl, "no use"),
    sys!(
        SYS_settimeofday,
        "the clock is not the broker's (tickets and leases use it)"
    ),
    sys!(SYS_clock_settime, "the clock is not the broker's"),
    sys!(SYS_clock_adjtime, "the clock is not the broker's"),
    sys!(SYS_adjtimex, "the clock is not the broker's"),
    sys!(SYS_syslog, "kernel log (addresses) and its control"),
    sys!(SYS_keyctl, "kernel keyrings: no use, frequent CVEs"),
    sys!(SYS_add_key, "kernel keyrings: no use, frequent CVEs"),
    sys!(SYS_request_key, "kernel keyrings: no use, frequent CVEs"),
    #[cfg(target_arch = "x86_64")]
    sys!(SYS_iopl, "port I/O"),
    #[cfg(target_arch = "x86_64")]
    sys!(SYS_ioperm, "port I/O"),
    sys!(SYS_open_by_handle_at, "escapes a chroot by file handle"),
    sys!(
        SYS_name_to_handle_at,
        "file handles (pairs with open_by_handle_at)"
    ),
    sys!(SYS_sethostname, "no use"),
    sys!(SYS_setdomainname, "no use"),
    sys!(SYS_vhangup, "no use"),
    #[cfg(target_arch = "x86_64")]
    sys!(SYS_uselib, "legacy loader"),
    sys!(
        SYS_personality,
        "READ_IMPLIES_EXEC and other legacy personalities"
    ),
    sys!(SYS_fanotify_init, "watching other processes' file access"),
    sys!(SYS_setns, "joining another process's namespaces"),
    sys!(
        SYS_fsopen,
        "new mount API: not used by the broker or its workers"
    ),
    sys!(
        SYS_fsconfig,
        "new mount API: not used by the broker or its workers"
    ),
    sys!(
        SYS_fsmount,
        "new mount API: not used by the broker or its workers"
    ),
    sys!(
        SYS_fspick,
        "new mount API: not used by the broker or its workers"
    ),
    sys!(
        SYS_open_tree,
        "new mount API: not used by the broker or its workers"
    ),
    sys!(
        SYS_move_mount,
        "new mount API: not used by the broker or its workers"
    ),
    sys!(
        SYS_mount_setattr,
        "new mount API: not used by the broker or its workers"
    ),
];

/// The syscall tables of a role, in the order the document lists them: the shared runtime
/// set first (for allowlists), then the role's own.
pub fn tables(role: Role) -> (FilterKind, &'static [&'static [Syscall]]) {
    static WORKER: [&[Syscall]; 2] = [RUNTIME, PARSER_WORKER];
    static NET: [&[Syscall]; 2] = [RUNTIME, NETSTACK];
    static SESSION: [&[Syscall]; 2] = [RUNTIME, CLIENT_SESSION];
    static HELPER: [&[Syscall]; 2] = [RUNTIME, CLIENT_HELPER];
    static BROKER: [&[Syscall]; 1] = [BROKER_DENY];
    match role {
        Role::ParserWorker => (FilterKind::Allowlist, &WORKER),
        Role::Netstack => (FilterKind::Allowlist, &NET),
        Role::ClientSession => (FilterKind::Allowlist, &SESSION),
        Role::ClientHelper => (FilterKind::Allowlist, &HELPER),
        Role::Broker => (FilterKind::Denylist, &BROKER),
    }
}

/// Every syscall of a role's filter, the shared set first. A syscall listed by the role
/// replaces the shared entry of the same name (none does today; a test checks it).
pub fn syscalls(role: Role) -> Vec<Syscall> {
    let (_, parts) = tables(role);
    let mut out: Vec<Syscall> = Vec::new();
    for part in parts {
        for sc in *part {
            match out.iter_mut().find(|s| s.nr == sc.nr) {
                Some(existing) => *existing = *sc,
                None => out.push(*sc),
            }
        }
    }
    out
}

fn render_cond(c: &Cond) -> String {
    match c.cmp {
        Cmp::Eq => format!("arg{} == {}", c.arg, c.text),
        Cmp::MaskedEq(_) => format!("arg{} & {} == {}", c.arg, c.mask_text, c.text),
    }
}

/// The argument rule of one syscall, as the document prints it.
pub fn render_args(args: &Args) -> String {
    match args {
        Args::Any => "any".to_owned(),
        Args::Errno(e) => format!("returns {}", errno_name(*e)),
        Args::OneOf(alts) => alts
            .iter()
            .map(|alt| alt.iter().map(render_cond).collect::<Vec<_>>().join(" && "))
            .collect::<Vec<_>>()
            .join(" \\|\\| "),
    }
}

fn errno_name(e: i32) -> String {
    match e {
        libc::ENOSYS => "ENOSYS".to_owned(),
        libc::EPERM => "EPERM".to_owned(),
        other => format!("errno {other}"),
    }
}

/// The markdown tables of every role, as `docs/security.md` holds them between the
/// markers `<!-- BEGIN GENERATED ... -->` and `<!-- END GENERATED ... -->`.
pub fn render_markdown() -> String {
    let mut out = String::new();
    for role in Role::ALL {
        let (kind, _) = tables(role);
        let list = syscalls(role);
        let profile = crate::profile(role);
        out.push_str(&format!("### `{role:?}`\n\n"));
        match kind {
            FilterKind::Allowlist => out.push_str(&format!(
                "Allowlist of {} syscalls; any other syscall kills the process (SIGSYS).\n\n",
                list.len()
            )),
            FilterKind::Denylist => out.push_str(&format!(
                "Denylist of {} syscalls, each of which kills the process (SIGSYS); \
                 everything else is allowed (see above why the broker's filter is a denylist).\n\n",
                list.len()
            )),
        }
        out.push_str(&format!("{}\n\n", profile.describe()));
        let header = match kind {
            FilterKind::Allowlist => "| syscall | arguments allowed | why |\n|---|---|---|\n",
            FilterKind::Denylist => {
                "| syscall (killed) | arguments | why forbidden |\n|---|---|---|\n"
            }
        };
        out.push_str(header);
        for sc in &list {
            out.push_str(&format!(
                "| `{}` | {} | {} |\n",
                sc.name,
                render_args(&sc.args),
                sc.reason
            ));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Threads, Violation};

    fn names(role: Role) -> Vec<&'static str> {
        syscalls(role).iter().map(|s| s.name).collect()
    }

    #[test]
    fn every_role_compiles_to_bpf_in_both_thread_modes() {
        for role in Role::ALL {
            for threads in [Threads::Allowed, Threads::Forbidden] {
                let c = crate::seccomp::compile(role, threads, Violation::KillProcess).unwrap();
                assert!(!c.programs.is_empty(), "{role:?}");
            }
        }
    }

    #[test]
    fn no_table_lists_a_syscall_twice() {
        let all: [&[Syscall]; 6] = [
            RUNTIME,
            PARSER_WORKER,
            NETSTACK,
            CLIENT_SESSION,
            CLIENT_HELPER,
            BROKER_DENY,
        ];
        for table in all {
            for (i, a) in table.iter().enumerate() {
                assert!(
                    table[i + 1..].iter().all(|b| b.nr != a.nr),
                    "{} listed twice",
                    a.name
                );
            }
        }
        // Role tables add to the runtime set; none silently replaces a runtime entry.
        for table in [PARSER_WORKER, NETSTACK, CLIENT_SESSION, CLIENT_HELPER] {
            for sc in table {
                assert!(
                    RUNTIME.iter().all(|r| r.nr != sc.nr) || sc.name == "ioctl",
                    "{} overrides the runtime entry",
                    sc.name
                );
            }
        }
    }

    #[test]
    fn no_allowlist_allows_exec_ptrace_or_mounts() {
        let forbidden = [
            "execve",
            "execveat",
            "ptrace",
            "mount",
            "umount2",
            "pivot_root",
            "chroot",
            "unshare",
            "setns",
            "bpf",
            "seccomp",
            "process_vm_readv",
            "process_vm_writev",
            "vfork",
            "fork",
            "io_uring_setup",
            "userfaultfd",
            "open",
            "creat",
        ];
        for role in Role::ALL {
            if role == Role::Broker {
                continue;
            }
            let allowed = names(role);
            for f in forbidden {
                assert!(!allowed.contains(&f), "{role:?} allows {f}");
            }
        }
    }

    #[test]
    fn only_the_helper_opens_files_and_the_worker_opens_no_socket() {
        for role in [Role::ParserWorker, Role::Netstack, Role::ClientSession] {
            assert!(!names(role).contains(&"openat"), "{role:?}");
        }
        for f in ["socket", "connect", "bind", "accept4", "listen"] {
            assert!(!names(Role::ParserWorker).contains(&f), "worker allows {f}");
        }
    }

    #[test]
    fn broker_denylist_leaves_what_its_workers_need_to_confine() {
        let denied = names(Role::Broker);
        for needed in [
            "execve",
            "unshare",
            "mount",
            "umount2",
            "pivot_root",
            "chroot",
            "seccomp",
            "prctl",
            "capset",
            "setrlimit",
            "prlimit64",
            "close_range",
        ] {
            assert!(!denied.contains(&needed), "broker denies {needed}");
        }
        for killed in [
            "ptrace",
            "process_vm_readv",
            "bpf",
            "kexec_load",
            "init_module",
        ] {
            assert!(denied.contains(&killed), "broker allows {killed}");
        }
    }

    #[test]
    fn socket_rules_admit_only_the_documented_families() {
        let socket = |role| {
            syscalls(role)
                .into_iter()
                .find(|s| s.name == "socket")
                .unwrap()
                .args
        };
        let families = |args: Args| -> Vec<u64> {
            match args {
                Args::OneOf(alts) => alts
                    .iter()
                    .map(|alt| alt.iter().find(|c| c.arg == 0).unwrap().value)
                    .collect(),
                _ => panic!("socket must be argument-filtered"),
            }
        };
        let inet = [libc::AF_INET as u64, libc::AF_INET6 as u64];
        for role in [Role::Netstack, Role::ClientSession] {
            assert!(families(socket(role)).iter().all(|f| inet.contains(f)));
        }
        let helper = [
            libc::AF_NETLINK as u64,
            libc::AF_UNIX as u64,
            libc::AF_INET as u64,
        ];
        assert!(
            families(socket(Role::ClientHelper))
                .iter()
                .all(|f| helper.contains(f))
        );
    }
}
