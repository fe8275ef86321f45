//! The harness's own namespaces, laptop — phone — internet, joined by veth pairs, and
//! the processes it runs in them. Everything is named `vsb-<pid>-…` so that runs do
//! not clash with the testbed's `vstb-` namespaces, and stale ones (their pid is gone)
//! are removed at the start. Nothing has a route to the host's network.

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::Error;

/// Prefix of every namespace (and boringtun socket) the harness creates.
pub const PREFIX: &str = "vsb-";

pub const LAPTOP_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 2);
pub const PHONE_LAN_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 1);
pub const PHONE_WAN_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 2, 1);
pub const INET_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 2, 2);
/// The servers' address in the internet namespace (on its loopback; RFC 2544's
/// benchmarking range). Not on any subnet of the phone: the gateway refuses to forward
/// to its own networks (design §5.6), so a server on the phone's WAN subnet would be
/// unreachable through VPN Share.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The boringtun tunnel's subnet (laptop .2, phone .1).
pub const WG_NET: &str = "10.202.0.0/24";
pub const WG_LAPTOP: &str = "10.202.0.2/24";
pub const WG_PHONE: &str = "10.202.0.1/24";

/// Ports of the servers in the internet namespace.
pub const IPERF_PORT: u16 = 5201;
pub const ECHO_PORT: u16 = 7000;
pub const GREET_PORT: u16 = 7001;

pub fn inet(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(SERVER_IP, port))
}

/// Set when SIGINT/SIGTERM arrived: every wait gives up.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn interrupted() -> Result<(), Error> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}

/// Runs a command to completion; its stderr becomes the error.
pub fn run(cmd: &mut Command) -> Result<String, Error> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Setup(format!("running {:?}: {e}", cmd.get_program())))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            cmd: format!("{cmd:?}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// `ip ARGS`.
pub fn ip(args: &[&str]) -> Result<String, Error> {
    run(Command::new("ip").args(args))
}

fn netns_path(ns: &str) -> PathBuf {
    Path::new("/run/netns").join(ns)
}

fn ns_inode(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Processes other than this one living in namespace `ns`.
pub fn pids_in(ns: &str) -> Vec<i32> {
    let Some(target) = ns_inode(&netns_path(ns)) else {
        return Vec::new();
    };
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| p != me)
        .filter(|p| ns_inode(&PathBuf::from(format!("/proc/{p}/ns/net"))) == Some(target))
        .filter_map(|p| i32::try_from(p).ok())
        .collect()
}

/// SIGKILLs everything in `ns` and deletes it (a missing namespace is fine).
pub fn delete_ns(ns: &str) {
    if !netns_path(ns).exists() {
        return;
    }
    let end = Instant::now() + Duration::from_secs(2);
    loop {
        let pids = pids_in(ns);
        if pids.is_empty() || Instant::now() > end {
            break;
        }
        for p in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..5 {
        if ip(&["netns", "delete", ns]).is_ok() || !netns_path(ns).exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pid in a harness namespace name `vsb-<pid>-<role>`.
pub fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// The pid in a boringtun control socket name `vsb<pid>l.sock` / `vsb<pid>p.sock`.
pub fn wg_sock_owner(name: &str) -> Option<u32> {
    let r = name.strip_prefix("vsb")?.strip_suffix(".sock")?;
    let pid = r.strip_suffix('l').or_else(|| r.strip_suffix('p'))?;
    pid.parse().ok()
}

/// Removes harness namespaces and boringtun sockets whose run is gone. Returns their
/// names.
pub fn cleanup_stale() -> Vec<String> {
    // A run is alive while its process is, and not a zombie (killed, not yet reaped).
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
            let (comm, rest) = st.split_once(") ").unwrap_or_default();
            comm.contains("(vpnshare-bench") && !rest.starts_with('Z')
        })
    };
    let mut removed = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        for name in dir.filter_map(|e| e.ok()?.file_name().into_string().ok()) {
            if name.starts_with(PREFIX) && !owner_pid(&name).is_some_and(alive) {
                delete_ns(&name);
                removed.push(name);
            }
        }
    }
    // Scratch directories of runs that were killed outright (SIGKILL).
    let tmp = std::env::temp_dir();
    if let Ok(dir) = std::fs::read_dir(&tmp) {
        for name in dir.filter_map(|e| e.ok()?.file_name().into_string().ok()) {
            let Some(pid) = name
                .strip_prefix("vsb-")
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !alive(pid) && std::fs::remove_dir_all(tmp.join(&name)).is_ok() {
                removed.push(tmp.join(&name).display().to_string());
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/var/run/wireguard") {
        for name in dir.filter_map(|e| e.ok()?.file_name().into_string().ok()) {
            let Some(pid) = wg_sock_owner(&name) else {
                continue;
            };
            if !alive(pid) {
                let _ = std::fs::remove_file(Path::new("/var/run/wireguard").join(&name));
                removed.push(name);
            }
        }
    }
    removed
}

/// The three namespaces of one run. Dropping it kills what runs inside and deletes them.
#[derive(Debug)]
pub struct Topo {
    pub laptop: String,
    pub phone: String,
    pub inet: String,
    /// Scratch directory (state dirs, keys, resolver file, logs), removed on drop.
    pub dir: PathBuf,
}

/// What the signal thread removes when the run is interrupted.
pub static CLEANUP: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Kills and deletes everything the run registered in [`CLEANUP`].
pub fn cleanup_registered() {
    let names: Vec<String> = CLEANUP.lock().map(|g| g.clone()).unwrap_or_default();
    for n in names {
        if n.starts_with('/') {
            let _ = std::fs::remove_dir_all(&n);
            let _ = std::fs::remove_file(&n);
        } else {
            delete_ns(&n);
        }
    }
}

fn register(what: String) {
    if let Ok(mut g) = CLEANUP.lock() {
        g.push(what);
    }
}

impl Topo {
    pub fn build() -> Result<Self, Error> {
        let pid = std::process::id();
        let name = |role: &str| format!("{PREFIX}{pid}-{role}");
        let dir = std::env::temp_dir().join(format!("vsb-{pid}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Setup(format!("{}: {e}", dir.display())))?;
        {
            use std::os::unix::fs::PermissionsExt;
            // The session of `vpnshare connect` runs as nobody and reads nothing here,
            // but the helper and the gateway write their state dirs below it.
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755));
        }
        register(dir.to_string_lossy().into_owned());
        let t = Self {
            laptop: name("laptop"),
            phone: name("phone"),
            inet: name("inet"),
            dir,
        };
        for ns in [&t.laptop, &t.phone, &t.inet] {
            register(ns.clone());
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let (l, p, i) = (t.laptop.as_str(), t.phone.as_str(), t.inet.as_str());
        // Veth pairs created inside the namespaces: no interface ever exists on the host.
        ip(&[
            "-n", l, "link", "add", "lan0", "type", "veth", "peer", "name", "lan0p", "netns", p,
        ])?;
        ip(&[
            "-n", p, "link", "add", "wan0", "type", "veth", "peer", "name", "wan0p", "netns", i,
        ])?;
        let cidr = |a: Ipv4Addr| format!("{a}/24");
        ip(&["-n", l, "addr", "add", &cidr(LAPTOP_IP), "dev", "lan0"])?;
        ip(&["-n", p, "addr", "add", &cidr(PHONE_LAN_IP), "dev", "lan0p"])?;
        ip(&["-n", p, "addr", "add", &cidr(PHONE_WAN_IP), "dev", "wan0"])?;
        ip(&["-n", i, "addr", "add", &cidr(INET_IP), "dev", "wan0p"])?;
        ip(&[
            "-n",
            i,
            "addr",
            "add",
            &format!("{SERVER_IP}/32"),
            "dev",
            "lo",
        ])?;
        for (ns, dev) in [(l, "lan0"), (p, "lan0p"), (p, "wan0"), (i, "wan0p")] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        // The phone's way out is the internet namespace; the internet knows the way
        // back to the laptop's LAN (plain routing) and to the WireGuard subnet.
        let wan = PHONE_WAN_IP.to_string();
        ip(&[
            "-n",
            p,
            "route",
            "add",
            "default",
            "via",
            &INET_IP.to_string(),
        ])?;
        ip(&["-n", i, "route", "add", "10.201.1.0/24", "via", &wan])?;
        ip(&["-n", i, "route", "add", WG_NET, "via", &wan])?;
        t.sysctl(p, "net.ipv4.ip_forward", "1")?;
        for ns in [l, p, i] {
            // Many short connections (connections per second, 10,000 flows).
            t.sysctl(ns, "net.ipv4.ip_local_port_range", "1024 65000")?;
            t.sysctl(ns, "net.ipv4.tcp_tw_reuse", "1")?;
            t.sysctl(ns, "net.core.somaxconn", "65535")?;
            t.sysctl(ns, "net.ipv4.tcp_max_syn_backlog", "65535")?;
        }
        Ok(t)
    }

    pub fn sysctl(&self, ns: &str, key: &str, value: &str) -> Result<(), Error> {
        run(Command::new("ip").args([
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ]))
        .map(|_| ())
    }

    /// The laptop's default route: via the phone (plain routing), or none.
    pub fn laptop_default_via_phone(&self, on: bool) -> Result<(), Error> {
        let _ = ip(&["-n", &self.laptop, "route", "del", "default"]);
        if on {
            ip(&[
                "-n",
                &self.laptop,
                "route",
                "add",
                "default",
                "via",
                &PHONE_LAN_IP.to_string(),
            ])?;
        }
        Ok(())
    }

    /// A command that runs `prog` inside `ns`.
    pub fn cmd(ns: &str, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(prog);
        c
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        for ns in [&self.laptop, &self.phone, &self.inet] {
            delete_ns(ns);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `f` on a new thread that entered namespace `ns`; sockets it creates live there.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
    let file = std::fs::File::open(netns_path(ns))
        .map_err(|e| Error::Setup(format!("opening namespace {ns}: {e}")))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| Error::Setup(format!("setns {ns}: {e}")))?;
            Ok(f())
        })
        .join()
        .map_err(|_| Error::Setup(format!("a thread in {ns} panicked")))?
    })
}

/// A child process (in its own process group, so a Ctrl-C on the terminal reaches only
/// the harness) whose stdout and stderr are collected.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub child: Child,
    out: Arc<Mutex<String>>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self, Error> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::Setup(format!("starting {name}: {e}")))?;
        let out = Arc::new(Mutex::new(String::new()));
        let pipes: [Option<Box<dyn Read + Send>>; 2] = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ];
        for pipe in pipes.into_iter().flatten() {
            let o = out.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Ok(mut g) = o.lock() {
                        // Keep the last 256 KiB: enough to explain a failure.
                        if g.len() > 256 * 1024 {
                            let cut = g.len() - 128 * 1024;
                            let cut = (cut..g.len()).find(|&i| g.is_char_boundary(i)).unwrap_or(0);
                            g.drain(..cut);
                        }
                        g.push_str(&line);
                        g.push('\n');
                    }
                }
            });
        }
        Ok(Self {
            name: name.to_owned(),
            child,
            out,
        })
    }

    pub fn output(&self) -> String {
        self.out.lock().map(|g| g.clone()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a line containing `what` and returns it.
    pub fn wait_line(&mut self, what: &str, timeout: Duration) -> Result<String, Error> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(l) = self.output().lines().find(|l| l.contains(what)) {
                return Ok(l.to_owned());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                if let Some(l) = self.output().lines().find(|l| l.contains(what)) {
                    return Ok(l.to_owned());
                }
                return Err(Error::Setup(format!(
                    "{} exited ({st}) before printing {what:?}:\n{}",
                    self.name,
                    self.output()
                )));
            }
            if Instant::now() > end {
                return Err(Error::Setup(format!(
                    "{} printed no {what:?} within {} s:\n{}",
                    self.name,
                    timeout.as_secs(),
                    self.output()
                )));
            }
            interrupted()?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if let Ok(p) = i32::try_from(self.pid()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_of_names() {
        assert_eq!(owner_pid("vsb-1234-laptop"), Some(1234));
        assert_eq!(owner_pid("vsb-x-laptop"), None);
        assert_eq!(owner_pid("vstb-1-laptop"), None);
    }

    #[test]
    fn owner_pid_of_wg_sockets() {
        assert_eq!(wg_sock_owner("vsb1234l.sock"), Some(1234));
        assert_eq!(wg_sock_owner("vsb99p.sock"), Some(99));
        assert_eq!(wg_sock_owner("wg0.sock"), None);
        assert_eq!(wg_sock_owner("vsb12x.sock"), None);
        assert_eq!(wg_sock_owner("vsbl.sock"), None);
    }
}
