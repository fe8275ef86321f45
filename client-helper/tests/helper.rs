#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code
//! The helper binary against a real TUN, real routes and a real resolver file, inside a
//! private network namespace each test creates and deletes. Needs root; skipped with a
//! message otherwise. Never touches the host's routes or /etc/resolv.conf.

use std::fs;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipc_schema::Channel;
use ipc_schema::bounded::BoundedVec;
use ipc_schema::messages::session_helper::{
    HelperRefusal, HelperToSession, SessionEnd, SessionToHelper,
};
use vshp::lease::{Ipv4Prefix, Ipv6Prefix, Route};

const CHILD_ENV: &str = "VPNSHARE_HELPER_TEST_CHILD";

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("SKIPPED: needs root (a network namespace, a TUN, CAP_NET_ADMIN)");
            return;
        }
    };
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A private network namespace with an "original" uplink `o0` (a veth pair) and
/// default routes through it; deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("vshtest-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        for args in [
            "link add o0 type veth peer name o1",
            "link set o0 up",
            "link set o1 up",
            "addr add 192.0.2.1/24 dev o0",
            "-6 addr add 2001:db8::1/64 dev o0 nodad",
            "route add default via 192.0.2.254",
            "-6 route add default via 2001:db8::fe dev o0",
        ] {
            ns.ip(&args.split(' ').collect::<Vec<_>>());
        }
        ns
    }

    fn ip(&self, args: &[&str]) -> String {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Everything the helper may change in routing.
    fn snapshot(&self) -> String {
        [&["route"][..], &["-6", "route"], &["rule"], &["-6", "rule"]]
            .iter()
            .map(|a| self.ip(a))
            .collect::<Vec<_>>()
            .join("---\n")
    }

    fn file(&self) -> fs::File {
        fs::File::open(format!("/run/netns/{}", self.name)).unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A directory for the socket, journal, policy and resolver file, traversable by
/// every uid (the stranger test connects as nobody).
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("vsh-helper-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(
            p.join("resolv.conf"),
            b"# original\nnameserver 192.0.2.53\n",
        )
        .unwrap();
        Dir(p)
    }
    fn sock(&self) -> PathBuf {
        self.0.join("helper.sock")
    }
    fn journal(&self) -> PathBuf {
        self.0.join("state/journal")
    }
    fn resolv(&self) -> PathBuf {
        self.0.join("resolv.conf")
    }
    fn policy(&self) -> PathBuf {
        self.0.join("helper.policy")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

struct Helper(Child);

impl Helper {
    fn start(ns: &Netns, dir: &Dir) -> Self {
        Self::start_with(ns, dir, &[])
    }

    fn start_with(ns: &Netns, dir: &Dir, extra: &[&str]) -> Self {
        let _ = fs::remove_file(dir.sock());
        let nsfd = ns.file();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vpnshare-helper"));
        cmd.arg("--uid").arg("0").arg("--socket").arg(dir.sock());
        cmd.arg("--journal")
            .arg(dir.journal())
            .arg("--policy")
            .arg(dir.policy());
        cmd.arg("--resolv-conf").arg(dir.resolv()).args(extra);
        cmd.env("RUST_LOG", "debug").stdin(Stdio::null());
        // SAFETY: setns is a single system call, safe between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(&nsfd, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
        let h = Helper(cmd.spawn().unwrap());
        wait_for(|| dir.sock().exists(), "the helper's socket");
        h
    }

    /// Through `systemd-socket-activate`: the listening socket arrives as fd 3 with
    /// `LISTEN_PID` and `LISTEN_FDS=1`, as from `vpnshare-helper.socket`.
    fn start_activated(ns: &Netns, dir: &Dir) -> Option<Self> {
        let tool = [
            "/usr/bin/systemd-socket-activate",
            "/bin/systemd-socket-activate",
        ]
        .into_iter()
        .find(|p| Path::new(p).exists())?;
        let nsfd = ns.file();
        let mut cmd = Command::new(tool);
        cmd.arg("-l").arg(dir.sock());
        cmd.arg(env!("CARGO_BIN_EXE_vpnshare-helper"));
        cmd.arg("--uid")
            .arg("0")
            .arg("--journal")
            .arg(dir.journal());
        cmd.arg("--policy")
            .arg(dir.policy())
            .arg("--resolv-conf")
            .arg(dir.resolv());
        cmd.stdin(Stdio::null());
        // SAFETY: setns is a single system call, safe between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(&nsfd, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
        let h = Helper(cmd.spawn().unwrap());
        wait_for(|| dir.sock().exists(), "the activated socket");
        Some(h)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_for(mut ok: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn connect(sock: &Path) -> Channel<SessionEnd> {
    Channel::open(UnixStream::connect(sock).unwrap()).unwrap()
}

fn call(ch: &mut Channel<SessionEnd>, msg: &SessionToHelper) -> (HelperToSession, Vec<OwnedFd>) {
    ch.send(msg, &[]).unwrap();
    let got = ch.recv().unwrap();
    (got.msg, got.fds)
}

fn open_tun_msg(v4: &str, len: u8) -> SessionToHelper {
    SessionToHelper::OpenTun {
        ipv4: Ipv4Prefix {
            addr: v4.parse().unwrap(),
            len,
        },
        ipv6: Some(Ipv6Prefix {
            addr: "fd00:5653::2".parse().unwrap(),
            len: 64,
        }),
        mtu: 1400,
    }
}

fn full_tunnel(gateway: &str) -> SessionToHelper {
    SessionToHelper::SetRoutes {
        routes: BoundedVec::new(vec![
            Route::V4(Ipv4Prefix {
                addr: "0.0.0.0".parse().unwrap(),
                len: 0,
            }),
            Route::V6(Ipv6Prefix {
                addr: "::".parse().unwrap(),
                len: 0,
            }),
        ])
        .unwrap(),
        gateway: gateway.parse().unwrap(),
    }
}

fn dns(servers: &[&str]) -> SessionToHelper {
    let s: Vec<IpAddr> = servers.iter().map(|s| s.parse().unwrap()).collect();
    SessionToHelper::SetDns {
        servers: BoundedVec::new(s).unwrap(),
    }
}

/// Opens a TUN, routes everything through it and points DNS at the tunnel.
fn bring_up(ch: &mut Channel<SessionEnd>) -> OwnedFd {
    let (reply, mut fds) = call(ch, &open_tun_msg("100.64.0.2", 24));
    assert!(
        matches!(reply, HelperToSession::TunOpened { .. }),
        "{reply:?}"
    );
    assert_eq!(fds.len(), 1);
    assert_eq!(
        call(ch, &full_tunnel("192.0.2.10")).0,
        HelperToSession::Done
    );
    assert_eq!(call(ch, &dns(&["100.64.0.1"])).0, HelperToSession::Done);
    fds.remove(0)
}

/// What must come back exactly: routes, rules, the resolver file (link or bytes).
fn state(ns: &Netns, dir: &Dir) -> (String, Option<PathBuf>, Vec<u8>) {
    (
        ns.snapshot(),
        fs::read_link(dir.resolv()).ok(),
        fs::read(dir.resolv()).unwrap(),
    )
}

fn wait_restored(dir: &Dir) {
    wait_for(|| !dir.journal().exists(), "the journal to be removed");
}

fn ipv4_udp_packet() -> Vec<u8> {
    let mut p = vec![
        0x45, 0, 0, 28, 0, 1, 0, 0, 64, 17, 0, 0, 100, 64, 0, 1, 100, 64, 0, 2, 0x30, 0x39, 0x30,
        0x39, 0, 8, 0, 0,
    ];
    let sum: u32 = p[..20]
        .chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(c[1]))
        .sum();
    let folded = !(((sum & 0xffff) + (sum >> 16)) as u16);
    p[10..12].copy_from_slice(&folded.to_be_bytes());
    p
}

fn rx_packets(ns: &Netns, ifname: &str) -> u64 {
    let out = ns.ip(&["-s", "link", "show", "dev", ifname]);
    let mut lines = out.lines();
    while let Some(l) = lines.next() {
        if l.trim_start().starts_with("RX:") {
            let n = lines.next().unwrap().split_whitespace().nth(1).unwrap();
            return n.parse().unwrap();
        }
    }
    panic!("no RX counters in {out}");
}

#[test]
fn opens_a_working_tun_with_addresses_mtu_routes_dns_and_tears_down() {
    require_root!();
    let ns = Netns::new("up");
    let dir = Dir::new("up");
    let before = state(&ns, &dir);
    let helper = Helper::start(&ns, &dir);
    let mut ch = connect(&dir.sock());

    let status = fs::read_to_string(format!("/proc/{}/status", helper.0.id())).unwrap();
    for want in ["CapEff:\t0000000000001000", "Seccomp:\t2", "NoNewPrivs:\t1"] {
        assert!(status.contains(want), "{want} missing in\n{status}");
    }

    let (reply, fds) = call(&mut ch, &open_tun_msg("100.64.0.2", 24));
    let HelperToSession::TunOpened {
        ifname,
        ifindex,
        vnet_hdr,
    } = reply
    else {
        panic!("{reply:?}")
    };
    let ifname = ifname.as_str().to_owned();
    assert!(ifindex > 0);
    // Offload is on (every kernel this runs on has IFF_VNET_HDR and TSO for TUN), and
    // the kernel agrees with what the helper told the session.
    assert!(vnet_hdr, "the helper fell back to a plain TUN");
    let details = ns.ip(&["-d", "link", "show", "dev", &ifname]);
    assert!(details.contains("vnet_hdr on"), "{details}");
    let link = ns.ip(&["addr", "show", "dev", &ifname]);
    for want in [
        "mtu 1400",
        "UP",
        "inet 100.64.0.2/24",
        "inet6 fd00:5653::2/64",
    ] {
        assert!(link.contains(want), "{want} missing in\n{link}");
    }
    // The descriptor works: a packet written into it arrives on the interface.
    let rx = rx_packets(&ns, &ifname);
    let mut tun = fs::File::from(fds.into_iter().next().unwrap());
    // With IFF_VNET_HDR every write starts with a virtio-net header (all zero: one
    // plain packet, GSO_NONE, checksum complete).
    let mut framed = vec![0u8; 10];
    framed.extend_from_slice(&ipv4_udp_packet());
    tun.write_all(&framed).unwrap();
    assert_eq!(rx_packets(&ns, &ifname), rx + 1);

    // An off-link gateway: the host route keeps its next hop.
    let done = HelperToSession::Done;
    assert_eq!(call(&mut ch, &full_tunnel("198.51.100.10")).0, done);
    let v4 = ns.ip(&["route"]);
    for want in [
        format!("0.0.0.0/1 dev {ifname}"),
        format!("128.0.0.0/1 dev {ifname}"),
        "198.51.100.10 via 192.0.2.254 dev o0".to_owned(),
        "default via 192.0.2.254 dev o0".to_owned(),
    ] {
        assert!(v4.contains(&want), "{want} missing in\n{v4}");
    }
    let v6 = ns.ip(&["-6", "route"]);
    for want in [
        format!("::/1 dev {ifname}"),
        format!("8000::/1 dev {ifname}"),
    ] {
        assert!(v6.contains(&want), "{want} missing in\n{v6}");
    }
    let via_tun = format!("dev {ifname}");
    assert!(ns.ip(&["route", "get", "198.51.100.10"]).contains("dev o0"));
    assert!(ns.ip(&["route", "get", "198.51.100.7"]).contains(&via_tun));
    assert!(
        ns.ip(&["-6", "route", "get", "2001:db8:1::7"])
            .contains(&via_tun)
    );
    // Replacing the routes keeps one host route, now to an IPv6 gateway.
    assert_eq!(call(&mut ch, &full_tunnel("2001:db8:99::10")).0, done);
    assert!(!ns.ip(&["route"]).contains("198.51.100.10"));
    let v6 = ns.ip(&["-6", "route"]);
    assert!(
        v6.contains("2001:db8:99::10 via 2001:db8::fe dev o0"),
        "{v6}"
    );
    assert!(v6.contains(&format!("8000::/1 dev {ifname}")), "{v6}");
    // An on-link gateway gets a host route without a next hop.
    assert_eq!(call(&mut ch, &full_tunnel("192.0.2.10")).0, done);
    assert!(ns.ip(&["route"]).contains("192.0.2.10 dev o0 proto static"));
    assert!(!ns.ip(&["-6", "route"]).contains("2001:db8:99::10"));

    assert_eq!(
        call(&mut ch, &dns(&["100.64.0.1", "fd00:5653::1"])).0,
        HelperToSession::Done
    );
    let text = fs::read_to_string(dir.resolv()).unwrap();
    assert!(
        text.contains("nameserver 100.64.0.1\nnameserver fd00:5653::1\n"),
        "{text}"
    );
    assert!(dir.journal().exists());

    assert_eq!(
        call(&mut ch, &SessionToHelper::TearDown).0,
        HelperToSession::Done
    );
    assert_eq!(state(&ns, &dir), before);
    assert!(!dir.journal().exists());
    assert!(!ns.ip(&["link"]).contains(&ifname));
}

#[test]
fn a_config_delta_changes_the_live_tuns_mtu_routes_and_dns_and_teardown_restores() {
    require_root!();
    let ns = Netns::new("delta");
    let dir = Dir::new("delta");
    let before = state(&ns, &dir);
    let _helper = Helper::start(&ns, &dir);
    let mut ch = connect(&dir.sock());
    let done = HelperToSession::Done;
    // No TUN yet: nothing to change.
    assert_eq!(
        call(&mut ch, &SessionToHelper::SetMtu { mtu: 1300 }).0,
        HelperToSession::Refused(HelperRefusal::NoTun)
    );
    let tun = bring_up(&mut ch);
    let ifname = ns
        .ip(&["-o", "link"])
        .lines()
        .find(|l| l.contains("mtu 1400"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .trim_end_matches(':')
        .to_owned();
    assert_eq!(
        call(&mut ch, &SessionToHelper::SetMtu { mtu: 1300 }).0,
        done
    );
    let link = ns.ip(&["link", "show", "dev", &ifname]);
    assert!(link.contains("mtu 1300") && link.contains("UP"), "{link}");
    // The delta's routes (IPv4 only now) and DNS replace the old ones.
    let v4_only = SessionToHelper::SetRoutes {
        routes: BoundedVec::new(vec![Route::V4(Ipv4Prefix {
            addr: "0.0.0.0".parse().unwrap(),
            len: 0,
        })])
        .unwrap(),
        gateway: "192.0.2.10".parse().unwrap(),
    };
    assert_eq!(call(&mut ch, &v4_only).0, done);
    assert!(
        !ns.ip(&["-6", "route"])
            .contains(&format!("::/1 dev {ifname}"))
    );
    assert!(
        ns.ip(&["route"])
            .contains(&format!("0.0.0.0/1 dev {ifname}"))
    );
    assert_eq!(call(&mut ch, &dns(&["100.64.0.1", "fd00:5653::1"])).0, done);
    let text = fs::read_to_string(dir.resolv()).unwrap();
    assert!(text.contains("nameserver fd00:5653::1"), "{text}");
    assert_eq!(call(&mut ch, &SessionToHelper::TearDown).0, done);
    drop(tun);
    assert_eq!(state(&ns, &dir), before);
    assert!(!dir.journal().exists());
}

#[test]
fn refuses_a_second_tun_and_everything_outside_its_policy() {
    require_root!();
    let ns = Netns::new("policy");
    let dir = Dir::new("policy");
    fs::write(
        dir.policy(),
        "tun_range = 100.64.0.0/10\ntun_range = fd00::/8\nroute_range = 10.0.0.0/8\n",
    )
    .unwrap();
    let before = state(&ns, &dir);
    let _helper = Helper::start(&ns, &dir);
    let mut ch = connect(&dir.sock());
    let refused = |r| HelperToSession::Refused(r);

    assert_eq!(
        call(&mut ch, &full_tunnel("192.0.2.10")).0,
        refused(HelperRefusal::NoTun)
    );
    assert_eq!(
        call(&mut ch, &dns(&["100.64.0.1"])).0,
        refused(HelperRefusal::NoTun)
    );
    let (reply, fds) = call(&mut ch, &open_tun_msg("10.0.0.2", 24));
    assert_eq!(reply, refused(HelperRefusal::OutsidePolicy));
    assert!(fds.is_empty());
    // A prefix wider than the allowed range is outside it too.
    let reply = call(&mut ch, &open_tun_msg("100.64.0.2", 8)).0;
    assert_eq!(reply, refused(HelperRefusal::OutsidePolicy));

    let (reply, _fd) = call(&mut ch, &open_tun_msg("100.64.0.2", 24));
    assert!(matches!(reply, HelperToSession::TunOpened { .. }));
    let (reply, fds) = call(&mut ch, &open_tun_msg("100.64.1.2", 24));
    assert_eq!(reply, refused(HelperRefusal::SecondTun));
    assert!(fds.is_empty());

    // Routes: the policy allows 10.0.0.0/8 only.
    let reply = call(&mut ch, &full_tunnel("192.0.2.10")).0;
    assert_eq!(reply, refused(HelperRefusal::OutsidePolicy));
    let ten = |gateway: &str| SessionToHelper::SetRoutes {
        routes: BoundedVec::new(vec![Route::V4(Ipv4Prefix {
            addr: "10.0.0.0".parse().unwrap(),
            len: 8,
        })])
        .unwrap(),
        gateway: gateway.parse().unwrap(),
    };
    // The gateway inside the tunnel would loop the transport into the TUN.
    assert_eq!(
        call(&mut ch, &ten("100.64.0.1")).0,
        refused(HelperRefusal::OutsidePolicy)
    );
    assert_eq!(call(&mut ch, &ten("192.0.2.10")).0, HelperToSession::Done);
    assert!(ns.ip(&["route"]).contains("10.0.0.0/8 dev vshare"));

    // DNS outside the tunnel is refused by default; the file is untouched.
    let reply = call(&mut ch, &dns(&["8.8.8.8"])).0;
    assert_eq!(reply, refused(HelperRefusal::OutsidePolicy));
    assert_eq!(fs::read(dir.resolv()).unwrap(), before.2);

    drop(ch);
    wait_restored(&dir);
    assert_eq!(state(&ns, &dir), before);
}

#[test]
fn refuses_a_caller_of_another_uid() {
    require_root!();
    let ns = Netns::new("uid");
    let dir = Dir::new("uid");
    let _helper = Helper::start(&ns, &dir);
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "stranger")
        .env("VPNSHARE_HELPER_TEST_SOCKET", dir.sock())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("stranger: closed without a word"), "{text}");
    // The helper still serves its own uid.
    let mut ch = connect(&dir.sock());
    assert_eq!(
        call(&mut ch, &SessionToHelper::TearDown).0,
        HelperToSession::Done
    );
}

#[test]
fn restores_everything_when_the_client_closes_its_socket() {
    require_root!();
    let ns = Netns::new("close");
    let dir = Dir::new("close");
    let before = state(&ns, &dir);
    // As `vpnshare connect` spawns it: one session, then exit 0.
    let mut helper = Helper::start_with(&ns, &dir, &["--once"]);
    let mut ch = connect(&dir.sock());
    let _tun = bring_up(&mut ch);
    assert_ne!(state(&ns, &dir), before);
    drop(ch);
    wait_restored(&dir);
    assert_eq!(state(&ns, &dir), before);
    assert!(helper.0.wait().unwrap().success());
}

#[test]
fn restores_everything_when_the_client_is_killed() {
    require_root!();
    let ns = Netns::new("cdie");
    let dir = Dir::new("cdie");
    let before = state(&ns, &dir);
    let _helper = Helper::start(&ns, &dir);
    let mut client = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "client")
        .env("VPNSHARE_HELPER_TEST_SOCKET", dir.sock())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = client.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&seen).contains("client: up") {
        assert_eq!(
            out.read(&mut byte).unwrap(),
            1,
            "{}",
            String::from_utf8_lossy(&seen)
        );
        seen.push(byte[0]);
    }
    assert_ne!(state(&ns, &dir), before);
    client.kill().unwrap();
    client.wait().unwrap();
    wait_restored(&dir);
    assert_eq!(state(&ns, &dir), before);
}

#[test]
fn restores_everything_after_the_helper_is_killed_and_restarted() {
    require_root!();
    let ns = Netns::new("hdie");
    let dir = Dir::new("hdie");
    // This time the resolver file is a symlink, as with systemd-resolved.
    fs::rename(dir.resolv(), dir.0.join("stub-resolv.conf")).unwrap();
    symlink("stub-resolv.conf", dir.resolv()).unwrap();
    let before = state(&ns, &dir);
    let mut helper = Helper::start(&ns, &dir);
    let mut ch = connect(&dir.sock());
    let tun = bring_up(&mut ch);
    assert!(
        fs::read_link(dir.resolv()).is_err(),
        "the link is replaced while up"
    );
    helper.kill();
    drop(ch);
    assert!(dir.journal().exists());
    assert_ne!(state(&ns, &dir), before);
    let _again = Helper::start(&ns, &dir);
    wait_restored(&dir);
    assert_eq!(state(&ns, &dir), before);
    assert!(fs::read_link(dir.resolv()).is_ok());
    // The TUN is gone even though this process still holds its descriptor.
    assert!(!ns.ip(&["link"]).contains("vshare"));
    drop(tun);
}

#[test]
fn serves_a_socket_activated_listener_on_fd_3() {
    require_root!();
    let ns = Netns::new("act");
    let dir = Dir::new("act");
    let before = state(&ns, &dir);
    let Some(_helper) = Helper::start_activated(&ns, &dir) else {
        eprintln!("SKIPPED: systemd-socket-activate is not installed");
        return;
    };
    let mut ch = connect(&dir.sock());
    let _tun = bring_up(&mut ch);
    assert_eq!(
        call(&mut ch, &SessionToHelper::TearDown).0,
        HelperToSession::Done
    );
    assert_eq!(state(&ns, &dir), before);
}

#[test]
fn a_tun_without_ipv6_still_takes_the_ipv6_routes() {
    require_root!();
    let ns = Netns::new("v4only");
    let dir = Dir::new("v4only");
    let before = state(&ns, &dir);
    let _helper = Helper::start(&ns, &dir);
    let mut ch = connect(&dir.sock());
    let open = SessionToHelper::OpenTun {
        ipv4: Ipv4Prefix {
            addr: "100.64.0.2".parse().unwrap(),
            len: 24,
        },
        ipv6: None,
        mtu: 1280,
    };
    let (reply, _fd) = call(&mut ch, &open);
    assert!(
        matches!(reply, HelperToSession::TunOpened { .. }),
        "{reply:?}"
    );
    let done = HelperToSession::Done;
    assert_eq!(call(&mut ch, &full_tunnel("198.51.100.10")).0, done);
    let v6 = ns.ip(&["-6", "route"]);
    assert!(
        v6.contains("::/1 dev vshare0") && v6.contains("8000::/1 dev vshare0"),
        "{v6}"
    );
    assert_eq!(call(&mut ch, &SessionToHelper::TearDown).0, done);
    assert_eq!(state(&ns, &dir), before);
}

/// Not a test on its own: the body of the child processes above (a caller of another
/// uid; a client that is killed). Does nothing unless the parent test set its variable.
#[test]
fn child_process() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    let sock = PathBuf::from(std::env::var("VPNSHARE_HELPER_TEST_SOCKET").unwrap());
    match mode.as_str() {
        "stranger" => {
            let mut s = UnixStream::connect(&sock).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = [0u8; 64];
            assert_eq!(
                s.read(&mut buf).unwrap(),
                0,
                "the helper spoke to a stranger"
            );
            assert!(Channel::<SessionEnd>::open(UnixStream::connect(&sock).unwrap()).is_err());
            println!("stranger: closed without a word");
        }
        "client" => {
            let mut ch = connect(&sock);
            let tun = bring_up(&mut ch);
            println!("client: up (tun fd {})", tun.as_raw_fd());
            std::io::stdout().flush().unwrap();
            std::thread::sleep(Duration::from_secs(120));
        }
        _ => panic!("unknown child mode {mode}"),
    }
}
