//! The real processes of VPN Share in the testbed: `vpnshare gateway` in `phone`,
//! `vpnshare connect` in `laptop` (which starts `vpnshare-helper`), and what the demo
//! and the end-to-end tests look at: confinement, routes, the resolver file, counters,
//! and a capture of every frame on the laptop's LAN link.

use std::io::{BufRead, BufReader, Read};
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testbed::{Node, Testbed};

/// Port the gateway listens on (UDP and TCP) at the phone's LAN address.
pub const LISTEN_PORT: u16 = 7400;

/// The binaries the stack runs.
pub const BINARIES: [&str; 4] = [
    "vpnshare",
    "vpnshare-helper",
    "vpnshare-worker",
    "vpnshare-netstack",
];

/// Set by the demo's SIGINT/SIGTERM handler: every wait gives up.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The directory of the workspace's binaries: next to this executable, or one level up
/// for test executables in `target/*/deps`.
pub fn bin_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    if dir.join("vpnshare").is_file() {
        return Some(dir.to_path_buf());
    }
    Some(dir.parent()?.to_path_buf())
}

/// What the full stack needs and this machine lacks.
pub fn missing(bins: &Path) -> Vec<String> {
    let mut m = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        m.push("root (network namespaces and a TUN device)".to_owned());
    }
    if !Path::new("/dev/net/tun").exists() {
        m.push("/dev/net/tun".to_owned());
    }
    for b in BINARIES {
        if !bins.join(b).is_file() {
            m.push(format!(
                "{} (build it with cargo build --release)",
                bins.join(b).display()
            ));
        }
    }
    m
}

/// A child process whose stdout and stderr are collected line by line.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub out: Arc<Mutex<String>>,
}

impl Proc {
    /// Starts `cmd` in `node` with its output collected.
    pub fn spawn(tb: &Testbed, node: Node, cmd: &mut Command) -> Result<Self, String> {
        // Own process group: Ctrl-C on the terminal reaches the demo only, which then
        // stops everything in order (its drops kill the processes, the testbed's drop
        // removes the namespaces).
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = tb
            .run_in(node, cmd)
            .map_err(|e| format!("starting {:?}: {e}", cmd.get_program()))?;
        let out = Arc::new(Mutex::new(String::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let o = out.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Ok(mut g) = o.lock() {
                        g.push_str(&line);
                        g.push('\n');
                    }
                }
            });
        }
        Ok(Self { child, out })
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.out.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// Waits for a line containing `what`; returns that line.
    pub fn wait_line(&mut self, what: &str, timeout: Duration) -> Result<String, String> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(l) = self.output().lines().find(|l| l.contains(what)) {
                return Ok(l.to_owned());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                // Give the reader threads a moment to collect the last lines.
                std::thread::sleep(Duration::from_millis(100));
                if let Some(l) = self.output().lines().find(|l| l.contains(what)) {
                    return Ok(l.to_owned());
                }
                return Err(format!("exited ({st}) before printing {what:?}"));
            }
            if Instant::now() > end {
                return Err(format!("no {what:?} within {} s", timeout.as_secs()));
            }
            if INTERRUPTED.load(Ordering::SeqCst) {
                return Err("interrupted".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` and waits up to 10 s for the exit.
    pub fn stop(
        &mut self,
        sig: nix::sys::signal::Signal,
    ) -> Result<std::process::ExitStatus, String> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid()).unwrap_or(0));
        nix::sys::signal::kill(pid, sig).map_err(|e| format!("kill {sig}: {e}"))?;
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Ok(st);
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                return Err(format!("did not exit within 10 s of {sig}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The testbed with the real gateway running in `phone`.
#[derive(Debug)]
pub struct Stack {
    pub gateway: Proc,
    pub client: Option<Proc>,
    pub invite: String,
    pub gw_dir: PathBuf,
    pub laptop_dir: PathBuf,
    pub bins: PathBuf,
    // Last: dropped after the processes (its drop kills what still runs inside).
    pub tb: Testbed,
}

impl Drop for Stack {
    fn drop(&mut self) {
        // The processes first (the client's helper restores the laptop), then their
        // state directories; the testbed's own drop follows.
        self.client = None;
        let _ = self.gateway.child.kill();
        let _ = self.gateway.child.wait();
        // The killed client's helper may still be removing its journal: retry briefly.
        for _ in 0..40 {
            let _ = std::fs::remove_dir_all(&self.gw_dir);
            let _ = std::fs::remove_dir_all(&self.laptop_dir);
            if !self.gw_dir.exists() && !self.laptop_dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The laptop's network state that must come back exactly after the client ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetState {
    pub routes: String,
    pub routes6: String,
    pub rules: String,
    pub rules6: String,
    pub links: String,
    pub resolv_conf: String,
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A fresh directory for one run (mode 0700).
pub fn temp_dir(tag: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let d = std::env::temp_dir().join(format!("vpnshare-demo-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
    let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700));
    Ok(d)
}

/// `vpnshare gateway` in the phone on the testbed's LAN address; returns it and its
/// invite.
fn spawn_gateway(
    bins: &Path,
    tb: &Testbed,
    gw_dir: &Path,
    extra: &[&str],
) -> Result<(Proc, String), String> {
    let listen = format!("{}:{LISTEN_PORT}", tb.phone_lan_ip());
    let mut cmd = Command::new(bins.join("vpnshare"));
    cmd.args([
        "gateway",
        "--listen",
        &listen,
        "--egress",
        "vpn",
        // The capture counts every other packet on the LAN as a leak.
        "--no-mdns",
        "--state-dir",
    ])
    .arg(gw_dir)
    .args(extra)
    .env("RUST_LOG", "info");
    let mut gateway = Proc::spawn(tb, Node::Phone, &mut cmd)?;
    let invite = gateway
        .wait_line("vshp://", Duration::from_secs(20))
        .map_err(|e| format!("gateway: {e}\n{}", gateway.output()))?
        .trim()
        .to_owned();
    Ok((gateway, invite))
}

impl Stack {
    /// Builds the testbed (an HTTP file of `file_mb` MiB) and starts the gateway.
    pub fn start(bins: &Path, tag: &str, file_mb: usize) -> Result<Self, String> {
        Self::start_with(bins, tag, file_mb, &[])
    }

    /// [`start`](Self::start) with more `vpnshare gateway` options.
    pub fn start_with(
        bins: &Path,
        tag: &str,
        file_mb: usize,
        gateway_args: &[&str],
    ) -> Result<Self, String> {
        let tb = Testbed::builder()
            .http_file_mb(file_mb)
            .build()
            .map_err(|e| format!("building the testbed: {e}"))?;
        let gw_dir = temp_dir(&format!("{tag}-phone"))?;
        let laptop_dir = temp_dir(&format!("{tag}-laptop"))?;
        let (gateway, invite) = spawn_gateway(bins, &tb, &gw_dir, gateway_args)?;
        let s = Self {
            gateway,
            client: None,
            invite,
            gw_dir,
            laptop_dir,
            bins: bins.to_path_buf(),
            tb,
        };
        s.wait_sharing()?;
        Ok(s)
    }

    /// Stops the gateway (SIGTERM) and starts a new run on the same state dir: the same
    /// identity and trusted peers, a fresh resume-ticket key.
    pub fn restart_gateway(&mut self) -> Result<(), String> {
        self.gateway.stop(nix::sys::signal::Signal::SIGTERM)?;
        let (gateway, invite) = spawn_gateway(&self.bins, &self.tb, &self.gw_dir, &[])?;
        self.gateway = gateway;
        if invite != self.invite {
            return Err(format!("the invite changed: {invite} vs {}", self.invite));
        }
        self.wait_sharing()
    }

    /// Waits until the gateway sees the VPN (sharing available).
    fn wait_sharing(&self) -> Result<(), String> {
        let end = Instant::now() + Duration::from_secs(10);
        while self
            .status()
            .map(|v| v["sharing_available"] != true)
            .unwrap_or(true)
        {
            if Instant::now() > end {
                return Err(format!(
                    "the gateway does not see the VPN: {:?}",
                    self.status()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// `vpnshare ARGS` on the host (state-dir commands work from anywhere).
    pub fn vpnshare(&self, args: &[&str]) -> Result<String, String> {
        run(Command::new(self.bins.join("vpnshare")).args(args))
    }

    /// `vpnshare status --json` of the gateway.
    pub fn status(&self) -> Result<serde_json::Value, String> {
        let dir = self.gw_dir.to_string_lossy().into_owned();
        let out = self.vpnshare(&["status", "--json", "--state-dir", &dir])?;
        serde_json::from_str(&out).map_err(|e| format!("status: {e}: {out}"))
    }

    /// The laptop's device key (`vpnshare id`).
    pub fn laptop_key(&self) -> Result<String, String> {
        let dir = self.laptop_dir.to_string_lossy().into_owned();
        let out = self.vpnshare(&["id", "--state-dir", &dir])?;
        Ok(out.lines().last().unwrap_or_default().trim().to_owned())
    }

    /// Starts `vpnshare connect` in `laptop` (as root: it starts the helper and runs
    /// the session as nobody). `approve_code`: answer the pairing code with
    /// `vpnshare pairing approve`; else the laptop's key must already be trusted.
    /// Returns the client's "tunnel up" line and the pairing code it showed, if any.
    pub fn connect(
        &mut self,
        transport: &str,
        approve_code: bool,
    ) -> Result<(String, Option<String>), String> {
        let mut cmd = Command::new(self.bins.join("vpnshare"));
        cmd.args([
            "connect",
            &self.invite,
            "--transport",
            transport,
            "--name",
            "laptop",
        ])
        .arg("--state-dir")
        .arg(&self.laptop_dir)
        .arg("--resolv-conf")
        .arg(self.tb.resolv_conf(Node::Laptop))
        .env("RUST_LOG", "info");
        let mut client = Proc::spawn(&self.tb, Node::Laptop, &mut cmd)?;
        let mut code = None;
        if approve_code {
            let line = client
                .wait_line("Compare this code", Duration::from_secs(20))
                .map_err(|e| format!("client: {e}\n{}", client.output()))?;
            let c = line
                .split_whitespace()
                .find(|w| w.len() == 6 && w.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| format!("no code in {line:?}"))?
                .to_owned();
            let dir = self.gw_dir.to_string_lossy().into_owned();
            self.vpnshare(&["pairing", "--state-dir", &dir, "approve", &c])?;
            code = Some(c);
        }
        let up = client.wait_line("tunnel up:", Duration::from_secs(30));
        let up = match up {
            Ok(l) => l,
            Err(e) => {
                let out = client.output();
                self.client = Some(client);
                return Err(format!(
                    "client: {e}\n--- client ---\n{out}--- gateway ---\n{}",
                    self.gateway.output()
                ));
            }
        };
        self.client = Some(client);
        Ok((up, code))
    }

    /// The laptop's routes, rules, links and resolver file.
    pub fn laptop_net(&self) -> Result<NetState, String> {
        let ns = self.tb.ns(Node::Laptop);
        let ip = |args: &[&str]| run(Command::new("ip").arg("-n").arg(&ns).args(args));
        Ok(NetState {
            routes: ip(&["-4", "route", "show", "table", "all"])?,
            routes6: ip(&["-6", "route", "show", "table", "all"])?,
            rules: ip(&["-4", "rule", "show"])?,
            rules6: ip(&["-6", "rule", "show"])?,
            links: ip(&["-o", "link", "show"])?
                .lines()
                .map(|l| l.split_whitespace().nth(1).unwrap_or_default().to_owned())
                .collect::<Vec<_>>()
                .join(" "),
            resolv_conf: std::fs::read_to_string(self.tb.resolv_conf(Node::Laptop))
                .unwrap_or_default(),
        })
    }

    /// `getent ahostsv4 NAME` in a new laptop process: the system resolver, reading the
    /// resolver file as it is now (the helper's while the tunnel is up).
    pub fn resolve_in_laptop(&self, name: &str) -> Result<String, String> {
        let mut cmd = Command::new("getent");
        cmd.args(["ahostsv4", name]);
        let mut p = Proc::spawn(&self.tb, Node::Laptop, &mut cmd)?;
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(st)) = p.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                let out = p.output();
                if !st.success() {
                    return Err(format!("getent {name}: {st} {out}"));
                }
                return Ok(out
                    .lines()
                    .next()
                    .and_then(|l| l.split_whitespace().next())
                    .unwrap_or_default()
                    .to_owned());
            }
            if Instant::now() > end {
                return Err(format!("getent {name}: no answer in 20 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `f` on a thread in the laptop namespace.
    pub fn in_laptop<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, String> {
        self.tb
            .in_ns(Node::Laptop, f)
            .map_err(|e| format!("in laptop: {e}"))
    }

    /// Pids of processes named `comm` (prefix, ≤ 15 bytes) whose parent is `ppid`.
    pub fn children_of(ppid: u32, comm: &str) -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|e| {
            let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (c, rest) = stat.split_once(") ")?;
            let pp: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (pp == ppid && c.contains(&format!("({comm}"))).then_some(pid)
        })
        .collect()
    }
}

/// `Seccomp`, `NoNewPrivs`, `CapEff` and the uid of a process, from /proc/PID/status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Confinement {
    pub seccomp: String,
    pub no_new_privs: String,
    pub cap_eff: String,
    pub uid: String,
}

impl Confinement {
    pub fn of(pid: u32) -> Self {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let f = |name: &str| {
            st.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}:")))
                .map(|v| v.split_whitespace().next().unwrap_or_default().to_owned())
                .unwrap_or_default()
        };
        Self {
            seccomp: f("Seccomp"),
            no_new_privs: f("NoNewPrivs"),
            cap_eff: f("CapEff"),
            uid: f("Uid"),
        }
    }

    pub fn is_confined(&self) -> bool {
        self.seccomp == "2" && self.no_new_privs == "1" && self.cap_eff == "0000000000000000"
    }
}

impl std::fmt::Display for Confinement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Seccomp {}, NoNewPrivs {}, CapEff {}, uid {}",
            self.seccomp, self.no_new_privs, self.cap_eff, self.uid
        )
    }
}

/// What crossed the laptop's LAN link while a [`Capture`] ran.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureReport {
    /// IP packets between the laptop and the gateway's VSHP port (UDP or TCP).
    pub vshp: u64,
    /// Link housekeeping: ARP, IPv6 neighbour discovery, MLD.
    pub link_local: u64,
    /// Every other IP packet: a leak.
    pub other: u64,
    /// The first few leaks, described.
    pub leaks: Vec<String>,
}

/// Every frame on the laptop's `lan0`, classified (an `AF_PACKET` socket in the laptop
/// namespace, read by a thread until [`Capture::finish`]).
#[derive(Debug)]
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<CaptureReport>>,
    pub frames: Arc<AtomicU64>,
}

impl Capture {
    pub fn start(tb: &Testbed, gateway: IpAddr) -> Result<Self, String> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
        let (fd, ifindex) = tb
            .in_ns(Node::Laptop, || -> Result<_, String> {
                let fd = socket(
                    AddressFamily::Packet,
                    SockType::Raw,
                    SockFlag::SOCK_CLOEXEC,
                    SockProtocol::EthAll,
                )
                .map_err(|e| format!("AF_PACKET socket: {e}"))?;
                let idx = nix::net::if_::if_nametoindex(testbed::LAN_IF)
                    .map_err(|e| format!("lan0 index: {e}"))?;
                Ok((fd, idx))
            })
            .map_err(|e| e.to_string())??;
        let timeout = nix::sys::time::TimeVal::new(0, 100_000);
        nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
            .map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(AtomicU64::new(0));
        let (s, fr) = (stop.clone(), frames.clone());
        let thread = std::thread::spawn(move || {
            let mut rep = CaptureReport::default();
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::SeqCst) {
                use std::os::fd::AsRawFd;
                let r = nix::sys::socket::recvfrom::<nix::sys::socket::LinkAddr>(
                    fd.as_raw_fd(),
                    &mut buf,
                );
                let Ok((n, Some(addr))) = r else { continue };
                if addr.ifindex() != ifindex as usize {
                    continue;
                }
                fr.fetch_add(1, Ordering::Relaxed);
                classify(buf.get(..n).unwrap_or_default(), gateway, &mut rep);
            }
            rep
        });
        Ok(Self {
            stop,
            thread: Some(thread),
            frames,
        })
    }

    pub fn finish(mut self) -> CaptureReport {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

fn classify(frame: &[u8], gateway: IpAddr, rep: &mut CaptureReport) {
    let ethertype = frame.get(12..14).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let ip = frame.get(14..).unwrap_or_default();
    let leak = |rep: &mut CaptureReport, what: String| {
        rep.other += 1;
        if rep.leaks.len() < 8 {
            rep.leaks.push(what);
        }
    };
    match ethertype {
        Some(0x0806) => rep.link_local += 1,
        Some(0x0800) => {
            let ihl = usize::from(ip.first().copied().unwrap_or(0) & 0x0f) * 4;
            let proto = ip.get(9).copied().unwrap_or(0);
            let src = ip
                .get(12..16)
                .map(|b| IpAddr::from([b[0], b[1], b[2], b[3]]));
            let dst = ip
                .get(16..20)
                .map(|b| IpAddr::from([b[0], b[1], b[2], b[3]]));
            let ports = ip.get(ihl..ihl + 4).map(|p| {
                (
                    u16::from_be_bytes([p[0], p[1]]),
                    u16::from_be_bytes([p[2], p[3]]),
                )
            });
            let to_gw = dst == Some(gateway) && ports.is_some_and(|p| p.1 == LISTEN_PORT);
            let from_gw = src == Some(gateway) && ports.is_some_and(|p| p.0 == LISTEN_PORT);
            if (proto == 17 || proto == 6) && (to_gw || from_gw) {
                rep.vshp += 1;
            } else {
                leak(
                    rep,
                    format!("IPv4 proto {proto} {src:?} → {dst:?} ports {ports:?}"),
                );
            }
        }
        Some(0x86dd) => {
            let next = ip.get(6).copied().unwrap_or(0);
            let icmp_type = ip.get(40).copied().unwrap_or(0);
            let src = ip.get(8..24).and_then(|b| <[u8; 16]>::try_from(b).ok());
            let dst = ip.get(24..40).and_then(|b| <[u8; 16]>::try_from(b).ok());
            // Neighbour discovery (133–137) and MLD (130–132, 143): the link's own care.
            if next == 58 && matches!(icmp_type, 130..=137 | 143) {
                rep.link_local += 1;
            } else if next == 0 {
                // Hop-by-hop options: MLD reports carry them.
                rep.link_local += 1;
            } else {
                leak(
                    rep,
                    format!(
                        "IPv6 next header {next} {:?} → {:?}",
                        src.map(std::net::Ipv6Addr::from),
                        dst.map(std::net::Ipv6Addr::from)
                    ),
                );
            }
        }
        other => leak(rep, format!("ethertype {other:?}")),
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
