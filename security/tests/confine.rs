//! Real confined child processes (the `confine-probe` binary): each test fails if the
//! property it names breaks. Children are killed and reaped when a test fails.

// Test helpers outside #[test] functions: failing loudly is their job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const PROBE: &str = env!("CARGO_BIN_EXE_confine-probe");
const NET_ADMIN_ONLY: &str = "0000000000001000";
const NO_CAPS: &str = "0000000000000000";

fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn user_namespaces_available() -> bool {
    std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0)
}

/// A running probe; killed and reaped on drop (a failing test leaks no process).
struct Probe {
    child: Child,
    stdout: BufReader<ChildStdout>,
    report: String,
}

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Probe {
    fn spawn(role: &str, action: &str, extra: &[&str]) -> Probe {
        Probe::spawn_with(role, action, extra, None, &[])
    }

    /// `fds`: descriptors the child inherits as 3, 4, ... (in that order).
    fn spawn_with(
        role: &str,
        action: &str,
        extra: &[&str],
        fds: Option<Vec<i32>>,
        env: &[(&str, &str)],
    ) -> Probe {
        Probe::spawn_setup(role, action, extra, fds, env, false)
    }

    /// `nobody`: when root, the child drops to uid/gid 65534 before exec (the
    /// unprivileged case of production: the broker, and so its workers, run unprivileged).
    fn spawn_setup(
        role: &str,
        action: &str,
        extra: &[&str],
        fds: Option<Vec<i32>>,
        env: &[(&str, &str)],
        nobody: bool,
    ) -> Probe {
        let mut cmd = Command::new(PROBE);
        cmd.arg(role)
            .arg(action)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        if nobody && is_root() {
            cmd.uid(65534).gid(65534);
        }
        if let Some(fds) = fds {
            // SAFETY: the closure only calls dup2, which is async-signal-safe, on
            // descriptors that stay open in the parent until spawn returns.
            unsafe {
                cmd.pre_exec(move || {
                    for (i, fd) in fds.iter().enumerate() {
                        if libc::dup2(*fd, 3 + i as i32) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn confine-probe");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut probe = Probe {
            child,
            stdout,
            report: String::new(),
        };
        probe.wait_ready();
        probe
    }

    fn wait_ready(&mut self) {
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).expect("read probe stdout");
            if n == 0 {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!(
                    "probe exited before ready: {:?}\nstdout: {}\nstderr: {err}",
                    self.child.wait(),
                    self.report
                );
            }
            if line.trim() == "ready" {
                return;
            }
            self.report.push_str(&line);
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn proc_file(&self, name: &str) -> String {
        std::fs::read_to_string(format!("/proc/{}/{name}", self.pid())).expect("read /proc")
    }

    fn status_field(&self, field: &str) -> String {
        let status = self.proc_file("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .unwrap_or_else(|| panic!("no {field} in status:\n{status}"))
            .trim()
            .to_owned()
    }

    /// Lets the probe do its action and waits (at most 60 s) for it to end.
    fn go(mut self) -> Finished {
        if let Some(mut stdin) = self.child.stdin.take() {
            stdin.write_all(b"go\n").expect("write go");
        }
        self.finish()
    }

    fn finish(mut self) -> Finished {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            assert!(Instant::now() < deadline, "probe did not finish in time");
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut stdout = std::mem::take(&mut self.report);
        let _ = self.stdout.read_to_string(&mut stdout);
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        Finished {
            status,
            stdout,
            stderr,
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Finished {
    fn assert_success(&self, what: &str) {
        assert!(
            self.status.success(),
            "{what}: {:?} (signal {:?})\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.status.signal(),
            self.stdout,
            self.stderr
        );
    }

    fn assert_sigsys(&self, what: &str) {
        assert_eq!(
            self.status.signal(),
            Some(libc::SIGSYS),
            "{what} must die by SIGSYS, got {:?}\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        assert!(!self.stdout.contains("survived"), "{what}: survived");
    }
}

fn expect_sigsys(role: &str, action: &str) {
    Probe::spawn(role, action, &[])
        .go()
        .assert_sigsys(&format!("{role} {action}"));
}

// --- what each role needs still works ---------------------------------------------------

#[test]
fn parser_worker_does_its_work_on_inherited_socketpair() {
    let (mut parent, child_end) = UnixStream::pair().unwrap();
    let (decoy, _decoy_peer) = UnixStream::pair().unwrap();
    let mut probe = Probe::spawn_with(
        "parser-worker",
        "work",
        &["--keep", "3", "--check-closed", "4"],
        Some(vec![child_end.as_raw_fd(), decoy.as_raw_fd()]),
        &[],
    );
    drop(child_end);
    assert!(
        probe.report.contains("open_fds: [0, 1, 2, 3]"),
        "{}",
        probe.report
    );
    parent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    probe
        .child
        .stdin
        .take()
        .unwrap()
        .write_all(b"go\n")
        .unwrap();
    for msg in [b"ping1", b"ping2"] {
        parent.write_all(msg).unwrap();
        let mut reply = [0u8; 10];
        parent.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[..5], b"echo:");
        assert_eq!(&reply[5..], msg);
    }
    let done = probe.finish();
    done.assert_success("parser worker work");
    for line in [
        "fd 4 closed",
        "getrandom ok",
        "threads ok",
        "tokio current_thread ok 42",
        "tokio multi_thread ok 42",
        "echo ok",
        "done",
    ] {
        assert!(
            done.stdout.contains(line),
            "missing {line:?}:\n{}",
            done.stdout
        );
    }
}

#[test]
fn netstack_does_its_work() {
    let done = Probe::spawn("netstack", "work", &[]).go();
    done.assert_success("netstack work");
    assert!(done.stdout.contains("udp ok") && done.stdout.contains("network ok"));
}

#[test]
fn client_session_does_its_work() {
    let done = Probe::spawn("client-session", "work", &[]).go();
    done.assert_success("client session work");
    assert!(done.stdout.contains("network ok"));
}

#[test]
fn broker_does_its_work_and_its_workers_still_confine() {
    let done = Probe::spawn("broker", "work", &[]).go();
    done.assert_success("broker work");
    assert!(done.stdout.contains("exec ok"), "{}", done.stdout);
    assert!(
        done.stdout.contains("worker under broker ok"),
        "{}",
        done.stdout
    );
}

#[test]
fn client_helper_does_its_work() {
    let dir = std::env::temp_dir().join(format!("confine-helper-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tun = is_root() && std::path::Path::new("/dev/net/tun").exists();
    if !tun {
        eprintln!("NOTE: TUN part skipped: needs root and /dev/net/tun");
    }
    let mut args = vec!["--dir", dir.to_str().unwrap()];
    if tun {
        args.push("--netns");
    }
    let done = Probe::spawn("client-helper", "work", &args).go();
    let _ = std::fs::remove_dir_all(&dir);
    done.assert_success("client helper work");
    assert!(done.stdout.contains("sockets ok") && done.stdout.contains("files ok"));
    if tun {
        assert!(done.stdout.contains("tun ok"), "{}", done.stdout);
    }
}

// --- what each role must not do kills it --------------------------------------------------

#[test]
fn parser_worker_dies_on_socket() {
    expect_sigsys("parser-worker", "socket");
}

#[test]
fn parser_worker_dies_on_openat() {
    expect_sigsys("parser-worker", "openat");
}

#[test]
fn parser_worker_dies_on_execve() {
    expect_sigsys("parser-worker", "execve");
}

#[test]
fn parser_worker_dies_on_ptrace() {
    expect_sigsys("parser-worker", "ptrace");
}

#[test]
fn parser_worker_dies_on_connect() {
    expect_sigsys("parser-worker", "connect");
}

#[test]
fn parser_worker_dies_on_fork() {
    expect_sigsys("parser-worker", "fork");
}

#[test]
fn parser_worker_dies_on_executable_mapping() {
    expect_sigsys("parser-worker", "mmap-exec");
}

#[test]
fn parser_worker_dies_on_unlisted_ioctl() {
    expect_sigsys("parser-worker", "ioctl-other");
}

#[test]
fn netstack_opens_inet_socket_but_dies_on_execve() {
    let done = Probe::spawn("netstack", "socket", &[]).go();
    done.assert_success("netstack socket");
    let fd: i32 = done
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("socket returned "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(fd >= 0, "AF_INET socket failed: {}", done.stdout);
    expect_sigsys("netstack", "execve");
}

#[test]
fn netstack_dies_on_unix_raw_and_packet_sockets() {
    expect_sigsys("netstack", "socket-unix");
    expect_sigsys("netstack", "socket-raw");
    expect_sigsys("netstack", "socket-packet");
}

#[test]
fn netstack_dies_on_openat_and_ptrace() {
    expect_sigsys("netstack", "openat");
    expect_sigsys("netstack", "ptrace");
}

#[test]
fn client_session_dies_on_execve_openat_and_unix_socket() {
    expect_sigsys("client-session", "execve");
    expect_sigsys("client-session", "openat");
    expect_sigsys("client-session", "socket-unix");
}

#[test]
fn client_helper_dies_on_execve_fork_packet_and_audit_sockets() {
    expect_sigsys("client-helper", "execve");
    expect_sigsys("client-helper", "fork");
    expect_sigsys("client-helper", "socket-packet");
    expect_sigsys("client-helper", "socket-netlink-audit");
}

#[test]
fn broker_dies_on_ptrace() {
    expect_sigsys("broker", "ptrace");
}

#[test]
fn log_mode_logs_instead_of_killing() {
    // Violation::Log is for developing a policy: the call runs and the kernel logs it.
    let done = Probe::spawn("parser-worker", "socket", &["--log-violations"]).go();
    done.assert_success("socket under Violation::Log");
    assert!(done.stdout.contains("survived"), "{}", done.stdout);
}

#[test]
fn single_threaded_worker_dies_on_thread_spawn_and_has_nproc_zero() {
    let probe = Probe::spawn("parser-worker", "spawn-thread", &["--threads-forbidden"]);
    assert!(
        probe.report.contains("nproc_zero: true"),
        "{}",
        probe.report
    );
    let limits = probe.proc_file("limits");
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max processes") && l.split_whitespace().nth(2) == Some("0")),
        "{limits}"
    );
    probe
        .go()
        .assert_sigsys("thread spawn with Threads::Forbidden");
}

// --- /proc/<pid>/status of every confined role -----------------------------------------------

fn check_status(role: &str, cap_eff: &str, filters: &str) {
    let probe = Probe::spawn(role, "wait", &[]);
    assert_eq!(probe.status_field("Seccomp"), "2", "{role}");
    assert_eq!(probe.status_field("Seccomp_filters"), filters, "{role}");
    assert_eq!(probe.status_field("NoNewPrivs"), "1", "{role}");
    assert_eq!(probe.status_field("CapEff"), cap_eff, "{role}");
    assert_eq!(probe.status_field("CapPrm"), cap_eff, "{role}");
    assert_eq!(probe.status_field("CapInh"), NO_CAPS, "{role}");
    assert_eq!(probe.status_field("CapAmb"), NO_CAPS, "{role}");
    if is_root() {
        // Clearing the bounding set needs CAP_SETPCAP, which only root starts with.
        assert_eq!(probe.status_field("CapBnd"), cap_eff, "{role}");
    }
    let limits = probe.proc_file("limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "{core}");
    probe.go().assert_success(&format!("{role} wait"));
}

#[test]
fn status_parser_worker() {
    check_status("parser-worker", NO_CAPS, "2");
}

#[test]
fn status_netstack() {
    check_status("netstack", NO_CAPS, "2");
}

#[test]
fn status_broker() {
    check_status("broker", NO_CAPS, "1");
}

#[test]
fn status_client_session() {
    check_status("client-session", NO_CAPS, "2");
}

#[test]
fn status_client_helper() {
    if !is_root() {
        eprintln!("SKIPPED status_client_helper: needs root to hold CAP_NET_ADMIN");
        return;
    }
    check_status("client-helper", NET_ADMIN_ONLY, "2");
    let probe = Probe::spawn("client-helper", "wait", &[]);
    assert!(
        probe.report.contains("kept_capability: Some(NET_ADMIN)"),
        "{}",
        probe.report
    );
}

#[test]
fn parser_worker_limits_are_set() {
    let probe = Probe::spawn("parser-worker", "wait", &[]);
    let limits = probe.proc_file("limits");
    let field = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in {limits}"))
            .to_owned()
    };
    assert!(field("Max open files").contains(" 64 "), "{limits}");
    assert!(
        field("Max data size").contains(&format!(" {} ", 512 * 1024 * 1024)),
        "{limits}"
    );
    probe.go().assert_success("worker wait");
}

#[test]
fn unprivileged_parser_worker_is_fully_confined() {
    // As root, the child runs as nobody (65534): no capability to start with, so the
    // empty root must come from an unprivileged user namespace, and the bounding set
    // stays as it was (no CAP_SETPCAP) while no_new_privs keeps exec from using it.
    let (mut parent, child_end) = UnixStream::pair().unwrap();
    let mut probe = Probe::spawn_setup(
        "parser-worker",
        "work",
        &["--keep", "3"],
        Some(vec![child_end.as_raw_fd()]),
        &[],
        true,
    );
    drop(child_end);
    if is_root() {
        let uid_line = probe.status_field("Uid");
        assert!(uid_line.starts_with("65534"), "{uid_line}");
    }
    assert_eq!(probe.status_field("Seccomp"), "2");
    assert_eq!(probe.status_field("NoNewPrivs"), "1");
    assert_eq!(probe.status_field("CapEff"), NO_CAPS);
    assert_eq!(probe.status_field("CapPrm"), NO_CAPS);
    if user_namespaces_available() {
        assert!(
            probe.report.contains("fs_view: EmptyTmpfsInUserNamespace"),
            "{}",
            probe.report
        );
        assert_root_empty(&probe);
    } else {
        eprintln!("NOTE: user namespaces disabled: fs view part not checked");
    }
    parent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    probe
        .child
        .stdin
        .take()
        .unwrap()
        .write_all(b"go\n")
        .unwrap();
    for msg in [b"ping1", b"ping2"] {
        parent.write_all(msg).unwrap();
        let mut reply = [0u8; 10];
        parent.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[5..], msg);
    }
    probe.finish().assert_success("unprivileged worker work");
}

// --- environment, descriptors, filesystem view -------------------------------------------

#[test]
fn environment_is_cleared() {
    let probe = Probe::spawn_with(
        "parser-worker",
        "env",
        &[],
        None,
        &[("VPNSHARE_SECRET", "hunter2")],
    );
    let done = probe.go();
    done.assert_success("env");
    assert!(done.stdout.contains("env count 0"), "{}", done.stdout);
}

#[test]
fn unkept_stdin_is_pointed_at_dev_null() {
    let mut child = Command::new(PROBE)
        .args(["parser-worker", "stdin", "--null-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Without the redirect the probe blocks until it reads this line; with it, it reads
    // EOF — and may have dropped the pipe's read end already (EPIPE here is fine).
    let _ = child.stdin.take().unwrap().write_all(b"go\n");
    let probe = Probe {
        stdout: BufReader::new(child.stdout.take().unwrap()),
        child,
        report: String::new(),
    };
    let done = probe.finish();
    done.assert_success("null stdin");
    assert!(done.stdout.contains("stdin line: \"\""), "{}", done.stdout);
    assert!(
        done.stdout.contains("open_fds: [0, 1, 2]"),
        "{}",
        done.stdout
    );
}

#[test]
fn parser_worker_root_is_empty_tmpfs_in_user_namespace() {
    if !user_namespaces_available() {
        eprintln!("SKIPPED: user namespaces are disabled on this kernel (max_user_namespaces=0)");
        return;
    }
    let probe = Probe::spawn("parser-worker", "wait", &[]);
    assert!(
        probe.report.contains("fs_view: EmptyTmpfsInUserNamespace"),
        "{}",
        probe.report
    );
    let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let theirs = std::fs::read_link(format!("/proc/{}/ns/mnt", probe.pid())).unwrap();
    assert_ne!(ours, theirs, "worker must have its own mount namespace");
    let ours = std::fs::read_link("/proc/self/ns/user").unwrap();
    let theirs = std::fs::read_link(format!("/proc/{}/ns/user", probe.pid())).unwrap();
    assert_ne!(ours, theirs, "worker must have its own user namespace");
    assert_root_empty(&probe);
    probe.go().assert_success("worker wait");
}

#[test]
fn parser_worker_chroot_fallback_without_user_namespace() {
    if !is_root() {
        eprintln!("SKIPPED: the chroot fallback needs root (CAP_SYS_CHROOT)");
        return;
    }
    let probe = Probe::spawn("parser-worker", "wait", &["--no-userns"]);
    assert!(
        probe.report.contains("fs_view: ChrootToRemovedDir"),
        "{}",
        probe.report
    );
    assert_root_empty(&probe);
    probe.go().assert_success("worker wait");
}

fn assert_root_empty(probe: &Probe) {
    let root = format!("/proc/{}/root", probe.pid());
    let entries: Vec<_> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{root}: {e}"))
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(entries.is_empty(), "worker root is not empty: {entries:?}");
}

// --- panics inside confined processes ----------------------------------------------------------

#[test]
fn panic_unwinds_with_message_in_every_role() {
    for role in [
        "parser-worker",
        "netstack",
        "broker",
        "client-session",
        "client-helper",
    ] {
        let done = Probe::spawn(role, "panic", &[]).go();
        assert_eq!(
            done.status.code(),
            Some(101),
            "{role}: {:?}\n{}",
            done.status,
            done.stderr
        );
        assert!(
            done.stderr.contains("probe: deliberate panic"),
            "{role}: {}",
            done.stderr
        );
    }
}

#[test]
fn panic_with_rust_backtrace_set_at_launch_still_exits_cleanly() {
    // Symbolizing a backtrace opens the executable: an openat the worker may not make.
    // confine clears the environment, so RUST_BACKTRACE from the launcher has no effect.
    let done = Probe::spawn_with(
        "parser-worker",
        "panic",
        &[],
        None,
        &[("RUST_BACKTRACE", "1")],
    )
    .go();
    assert_eq!(
        done.status.code(),
        Some(101),
        "{:?}\n{}",
        done.status,
        done.stderr
    );
    assert!(
        done.stderr.contains("probe: deliberate panic"),
        "{}",
        done.stderr
    );
}

#[test]
fn panic_then_abort_prints_message_and_aborts() {
    for role in [
        "parser-worker",
        "netstack",
        "client-session",
        "client-helper",
    ] {
        let done = Probe::spawn(role, "panic-abort", &[]).go();
        assert_eq!(
            done.status.signal(),
            Some(libc::SIGABRT),
            "{role}: {:?}",
            done.status
        );
        assert!(
            done.stderr.contains("probe: deliberate panic before abort"),
            "{role}: {}",
            done.stderr
        );
    }
}

#[test]
fn panic_in_a_thread_is_reported_and_joined() {
    let done = Probe::spawn("parser-worker", "panic-thread", &[]).go();
    done.assert_success("panic in thread");
    assert!(
        done.stderr.contains("deliberate panic in a thread"),
        "{}",
        done.stderr
    );
    assert!(done.stdout.contains("panicked=true"), "{}", done.stdout);
}

#[test]
fn parser_worker_memory_is_bounded() {
    let done = Probe::spawn("parser-worker", "alloc-huge", &[]).go();
    assert_eq!(
        done.status.signal(),
        Some(libc::SIGABRT),
        "{:?}",
        done.status
    );
    assert!(
        done.stderr.contains("memory allocation of"),
        "{}",
        done.stderr
    );
    assert!(!done.stdout.contains("survived"));
}

// --- threads that exist before confine -------------------------------------------------------

#[test]
fn confine_refuses_to_clear_env_while_threads_run() {
    let out = Command::new(PROBE)
        .args(["parser-worker", "wait", "--thread-before"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{:?}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("threads are running"), "{stderr}");
}

#[test]
fn tsync_confines_a_thread_started_before_confine() {
    let probe = Probe::spawn(
        "parser-worker",
        "early-thread-socket",
        &["--thread-before", "--keep-env"],
    );
    // unshare(CLONE_NEWUSER) refuses threaded processes: the fallback must be reported.
    assert!(
        !probe.report.contains("EmptyTmpfsInUserNamespace"),
        "{}",
        probe.report
    );
    if is_root() {
        assert!(
            probe.report.contains("ChrootToRemovedDir"),
            "{}",
            probe.report
        );
    }
    assert_eq!(probe.status_field("Threads"), "2");
    let tasks = std::fs::read_dir(format!("/proc/{}/task", probe.pid())).unwrap();
    for task in tasks {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        assert!(
            status.contains("Seccomp:\t2"),
            "a thread without seccomp:\n{status}"
        );
    }
    probe
        .go()
        .assert_sigsys("socket() from a thread started before confine");
}
