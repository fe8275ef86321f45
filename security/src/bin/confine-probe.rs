//! Test support: confines itself as a role, then does one action, so that the integration
//! tests can watch a real confined process live or die.
//!
//! ```text
//! confine-probe ROLE ACTION [--keep FD]... [--check-closed FD] [--threads-forbidden]
//!                           [--no-userns] [--dir PATH]
//! ```
//!
//! After confinement it prints `confined <report>` and `ready`, then waits for one line
//! on stdin before the action (so the parent can read `/proc/<pid>/status` meanwhile).
//! Actions that must kill the process print `survived` if they return.

// Test support, not production code: failing loudly on a broken test set-up is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use security::{ConfineOptions, Role, Threads, confine};

struct Args {
    role: Role,
    action: String,
    options: ConfineOptions,
    check_closed: Vec<RawFd>,
    dir: Option<PathBuf>,
    thread_before: bool,
    netns: bool,
}

fn parse() -> Args {
    let mut it = std::env::args().skip(1);
    let role: Role = it.next().expect("ROLE").parse().expect("role");
    let action = it.next().expect("ACTION");
    let mut options = ConfineOptions::keep(&[]);
    let mut check_closed = Vec::new();
    let mut dir = None;
    let mut thread_before = false;
    let mut netns = false;
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--keep" => options.keep_fds.push(it.next().unwrap().parse().unwrap()),
            "--check-closed" => check_closed.push(it.next().unwrap().parse().unwrap()),
            "--threads-forbidden" => options.threads = Threads::Forbidden,
            "--no-userns" => options.no_user_namespace = true,
            "--dir" => dir = Some(PathBuf::from(it.next().unwrap())),
            "--thread-before" => thread_before = true,
            "--netns" => {
                // A private network namespace, so the helper's TUN test touches nothing
                // of the host. Needs root.
                // SAFETY: plain syscall with an integer argument, single-threaded here.
                let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
                assert_eq!(
                    rc,
                    0,
                    "unshare(CLONE_NEWNET): {}",
                    std::io::Error::last_os_error()
                );
                netns = true;
            }
            "--keep-env" => options.keep_env = true,
            "--log-violations" => options.violation = security::Violation::Log,
            "--null-stdin" => {
                options.keep_stdio = false;
                options.keep_fds.extend([1, 2]);
            }
            other => panic!("unknown argument {other}"),
        }
    }
    Args {
        role,
        action,
        options,
        check_closed,
        dir,
        thread_before,
        netns,
    }
}

fn main() {
    let args = parse();
    // A thread that exists before confine: TSYNC must confine it too. On "go" it tries
    // to open a socket.
    let (early_tx, early_rx) = std::sync::mpsc::channel::<()>();
    let early = args.thread_before.then(|| {
        std::thread::spawn(move || {
            if early_rx.recv().is_ok() {
                // SAFETY: plain syscall with integer arguments.
                let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                println!("early thread socket returned {fd}");
            }
        })
    });
    let report = match confine(args.role, &args.options) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("confine failed: {e}");
            std::process::exit(2);
        }
    };
    println!("confined {report:?}");
    println!("ready");
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).unwrap();
    if args.action == "stdin" {
        println!("stdin line: {line:?}");
    }

    match args.action.as_str() {
        "wait" | "stdin" => {}
        "early-thread-socket" => {
            early_tx.send(()).unwrap();
            if let Some(t) = early {
                t.join().unwrap();
            }
            survived();
        }
        "env" => println!("env count {}", std::env::vars_os().count()),
        "work" => work(&args),
        "socket" => {
            // SAFETY: plain syscall with integer arguments.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            println!("socket returned {fd}");
            survived();
        }
        "socket-unix" => {
            // SAFETY: plain syscall with integer arguments.
            let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            println!("socket returned {fd}");
            survived();
        }
        "socket-raw" => {
            // SAFETY: plain syscall with integer arguments.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
            println!("socket returned {fd}");
            survived();
        }
        "socket-netlink-audit" => {
            // SAFETY: plain syscall with integer arguments.
            let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_AUDIT) };
            println!("socket returned {fd}");
            survived();
        }
        "socket-packet" => {
            // SAFETY: plain syscall with integer arguments.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, 0) };
            println!("socket returned {fd}");
            survived();
        }
        "openat" => {
            // SAFETY: the path is a NUL-terminated literal.
            let fd =
                unsafe { libc::openat(libc::AT_FDCWD, c"/etc/passwd".as_ptr(), libc::O_RDONLY) };
            println!("openat returned {fd}");
            survived();
        }
        "execve" => {
            let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: argv and envp are NULL-terminated arrays of NUL-terminated strings
            // that outlive the call.
            let rc = unsafe { libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), envp.as_ptr()) };
            println!("execve returned {rc}");
            survived();
        }
        "ptrace" => {
            // SAFETY: PTRACE_TRACEME takes no pointers.
            let rc = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
            println!("ptrace returned {rc}");
            survived();
        }
        "connect" => {
            // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
            let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_port = 9u16.to_be();
            addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
            // SAFETY: the address pointer and length describe `addr`, alive for the call.
            let rc = unsafe {
                libc::connect(
                    1,
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            println!("connect returned {rc}");
            survived();
        }
        "fork" => {
            // SAFETY: the child (if any) exits at once without touching shared state.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(0) };
            }
            println!("fork returned {pid}");
            survived();
        }
        "spawn-thread" => {
            let r = std::thread::Builder::new().spawn(|| 1 + 1);
            println!("spawn returned ok={}", r.is_ok());
            survived();
        }
        "mmap-exec" => {
            // SAFETY: an anonymous mapping request; the result is not used.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            println!("mmap returned {p:?}");
            survived();
        }
        "ioctl-other" => {
            // SAFETY: TIOCGWINSZ writes a winsize into `ws`, which outlives the call.
            let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
            // SAFETY: see above.
            let rc = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &raw mut ws) };
            println!("ioctl returned {rc}");
            survived();
        }
        "panic" => panic!("probe: deliberate panic"),
        "panic-thread" => {
            let r = std::thread::spawn(|| panic!("probe: deliberate panic in a thread")).join();
            println!("thread joined, panicked={}", r.is_err());
        }
        "panic-abort" => {
            // What `panic = "abort"` does: print the message, then abort.
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                default(info);
                std::process::abort();
            }));
            panic!("probe: deliberate panic before abort");
        }
        "alloc-huge" => {
            let v = vec![1u8; 4096 * 1024 * 1024];
            println!("allocated {}", v.len());
            survived();
        }
        other => panic!("unknown action {other}"),
    }
    println!("done");
}

fn survived() {
    println!("survived");
    std::io::stdout().flush().unwrap();
    std::process::exit(0);
}

fn work(args: &Args) {
    // Memory.
    let mut v = vec![0u8; 16 * 1024 * 1024];
    for i in (0..v.len()).step_by(4096) {
        v[i] = 1;
    }
    let mut b = Box::new([0u64; 1024]);
    b[7] = 7;
    let s: usize = v.iter().map(|x| usize::from(*x)).sum();
    println!("allocated, touched {s} pages");
    let mut key = [0u8; 32];
    // SAFETY: the buffer pointer and length describe `key`, alive for the call.
    let n = unsafe { libc::getrandom(key.as_mut_ptr().cast(), key.len(), 0) };
    assert_eq!(n, 32);
    println!("getrandom ok");
    drop(v);

    // Inherited descriptors not kept must be closed.
    for fd in &args.check_closed {
        // SAFETY: F_GETFD takes no pointer.
        let rc = unsafe { libc::fcntl(*fd, libc::F_GETFD) };
        let err = std::io::Error::last_os_error().raw_os_error();
        assert!(
            rc == -1 && err == Some(libc::EBADF),
            "fd {fd} is still open"
        );
        println!("fd {fd} closed");
    }

    if args.options.threads == Threads::Allowed {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                std::thread::Builder::new()
                    .name(format!("probe-{i}"))
                    .spawn(move || (0..1000u64).map(|x| x * i).sum::<u64>())
                    .unwrap()
            })
            .collect();
        let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        println!("threads ok {total}");
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let n = rt.block_on(async {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        tokio::spawn(async { 41 + 1 }).await.unwrap()
    });
    println!("tokio current_thread ok {n}");
    if args.options.threads == Threads::Allowed {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let n = rt.block_on(async { tokio::spawn(async { 6 * 7 }).await.unwrap() });
        drop(rt);
        println!("tokio multi_thread ok {n}");
    }

    if args.options.keep_fds.contains(&3) {
        echo_on_fd3(&rt);
    }

    match args.role {
        Role::Netstack | Role::ClientSession => network_work(),
        Role::ClientHelper => helper_work(args.dir.as_ref().expect("--dir"), args.netns),
        Role::Broker => broker_work(),
        Role::ParserWorker => {}
    }
}

fn echo_on_fd3(rt: &tokio::runtime::Runtime) {
    // SAFETY: fd 3 was handed over by the parent and kept by confine; this is its only
    // owner in the process.
    let mut s = unsafe { UnixStream::from_raw_fd(3) };
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).unwrap();
    s.write_all(b"echo:").unwrap();
    s.write_all(&buf).unwrap();
    s.set_nonblocking(true).unwrap();
    rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut t = tokio::net::UnixStream::from_std(s).unwrap();
        let mut buf = [0u8; 5];
        t.read_exact(&mut buf).await.unwrap();
        t.write_all(b"echo:").await.unwrap();
        t.write_all(&buf).await.unwrap();
        t.flush().await.unwrap();
    });
    println!("echo ok");
}

fn network_work() {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let me = udp.local_addr().unwrap();
    udp.send_to(b"hi", me).unwrap();
    let mut buf = [0u8; 8];
    let (n, from) = udp.recv_from(&mut buf).unwrap();
    assert_eq!((n, from), (2, me));
    println!("udp ok");
    let tcp = std::net::TcpStream::connect("127.0.0.1:1");
    println!("tcp connect ran: {:?}", tcp.err().map(|e| e.kind()));
    let v6 = std::net::UdpSocket::bind("[::1]:0");
    println!("udp6 ran: ok={}", v6.is_ok());
    // SAFETY: plain syscall with integer arguments.
    let ping = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP) };
    println!("icmp ping socket ran: {ping}");
    println!("network ok");
}

fn helper_work(dir: &std::path::Path, netns: bool) {
    // SAFETY: plain syscalls with integer arguments.
    let nl = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    assert!(
        nl >= 0,
        "netlink socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: sockaddr_nl is plain data; all-zero is valid.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: pointer and length describe `sa`, alive for the call.
    let rc = unsafe {
        libc::bind(
            nl,
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "netlink bind: {}", std::io::Error::last_os_error());
    // SAFETY: plain syscalls with integer arguments.
    let unix = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    // SAFETY: plain syscalls with integer arguments.
    let inet = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(unix >= 0 && inet >= 0);
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    ifr.ifr_name[0] = b'l' as libc::c_char;
    ifr.ifr_name[1] = b'o' as libc::c_char;
    // SAFETY: SIOCGIFINDEX reads and writes the ifreq `ifr`, alive for the call.
    let rc = unsafe { libc::ioctl(inet, libc::SIOCGIFINDEX, &raw mut ifr) };
    assert_eq!(rc, 0, "SIOCGIFINDEX: {}", std::io::Error::last_os_error());
    // A netlink dump of the links: sendto + recvfrom on the netlink socket.
    let mut req = [0u8; 32];
    req[0..4].copy_from_slice(&32u32.to_ne_bytes());
    req[4..6].copy_from_slice(&libc::RTM_GETLINK.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // SAFETY: the buffer pointer and length describe `req`, alive for the call.
    let sent = unsafe { libc::send(nl, req.as_ptr().cast(), req.len(), 0) };
    assert_eq!(
        sent,
        32,
        "netlink send: {}",
        std::io::Error::last_os_error()
    );
    let mut buf = vec![0u8; 32 * 1024];
    // SAFETY: the buffer pointer and length describe `buf`, alive for the call.
    let got = unsafe { libc::recv(nl, buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert!(
        got > 16,
        "netlink recv: {}",
        std::io::Error::last_os_error()
    );
    println!("sockets ok");
    if netns {
        tun_work(inet);
    }
    let tmp = dir.join("journal.tmp");
    let fin = dir.join("journal");
    let mut f = std::fs::File::create(&tmp).unwrap();
    f.write_all(b"route 10.0.0.0/8\n").unwrap();
    f.sync_all().unwrap();
    drop(f);
    std::fs::rename(&tmp, &fin).unwrap();
    assert_eq!(std::fs::read(&fin).unwrap(), b"route 10.0.0.0/8\n");
    std::fs::remove_file(&fin).unwrap();
    println!("files ok");
}

fn broker_work() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    assert!(status.contains("Seccomp:\t2"));
    let st = std::process::Command::new("/bin/true").status().unwrap();
    assert!(st.success());
    println!("exec ok");
    // A worker exec'd by the confined broker inherits the broker's filter and must still
    // be able to confine itself (empty root, its own allowlist).
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["parser-worker", "work"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "worker under broker: {text}");
    println!("worker under broker: {}", text.lines().next().unwrap_or(""));
    println!("worker under broker ok");
}

/// Creates a TUN device (in the probe's private network namespace), brings it up and sets
/// its MTU: the helper's own job.
fn tun_work(inet: libc::c_int) {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    let name = b"vsprobe0";
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    use std::os::fd::AsRawFd;
    // SAFETY: TUNSETIFF reads and writes the ifreq `ifr`, alive for the call.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &raw mut ifr) };
    assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    // SAFETY: SIOCGIFFLAGS writes the flags into `ifr`, alive for the call.
    let rc = unsafe { libc::ioctl(inet, libc::SIOCGIFFLAGS, &raw mut ifr) };
    assert_eq!(rc, 0, "SIOCGIFFLAGS: {}", std::io::Error::last_os_error());
    // SAFETY: reading the flags member the kernel just wrote.
    let up = unsafe { ifr.ifr_ifru.ifru_flags } | libc::IFF_UP as libc::c_short;
    ifr.ifr_ifru.ifru_flags = up;
    // SAFETY: SIOCSIFFLAGS reads `ifr`, alive for the call.
    let rc = unsafe { libc::ioctl(inet, libc::SIOCSIFFLAGS, &raw mut ifr) };
    assert_eq!(rc, 0, "SIOCSIFFLAGS: {}", std::io::Error::last_os_error());
    ifr.ifr_ifru.ifru_mtu = 1380;
    // SAFETY: SIOCSIFMTU reads `ifr`, alive for the call.
    let rc = unsafe { libc::ioctl(inet, libc::SIOCSIFMTU, &raw mut ifr) };
    assert_eq!(rc, 0, "SIOCSIFMTU: {}", std::io::Error::last_os_error());
    println!("tun ok");
}
