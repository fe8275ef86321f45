//! The four ways from the laptop to the internet namespace: plain kernel routing,
//! boringtun (userspace WireGuard) with kernel forwarding on the phone, and VPN Share
//! over its UDP and TCP transports (the real `vpnshare gateway` and `vpnshare connect`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::Error;
use crate::probes;
use crate::topo::{self, ECHO_PORT, PHONE_LAN_IP, Proc, Topo, inet, ip, run};

/// The gateway's VSHP port (UDP and TCP) on the phone's LAN address.
pub const VSHP_PORT: u16 = 7400;
const WG_PORT: &str = "51820";

/// Where the tools and binaries are.
#[derive(Debug, Clone)]
pub struct Tools {
    /// Directory of `vpnshare`, `vpnshare-helper`, `vpnshare-worker`, `vpnshare-netstack`.
    pub bins: PathBuf,
    pub boringtun: PathBuf,
}

/// A scenario that is up: its processes and which of them are on which side.
#[derive(Debug)]
pub struct Running {
    pub key: &'static str,
    /// Roots of the process trees on the phone (gateway side) and on the laptop.
    pub gw_roots: Vec<u32>,
    pub client_roots: Vec<u32>,
    /// Laptop-side processes first: they are stopped first.
    procs: Vec<Proc>,
    wg_ifaces: Vec<(String, String)>,
    laptop_ns: String,
}

impl Drop for Running {
    /// Stops the scenario's processes (laptop first) and undoes its routes and
    /// interfaces, also when the set-up failed half-way.
    fn drop(&mut self) {
        // After a Ctrl-C, hurry: the namespaces go anyway.
        let grace = if topo::INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(5)
        };
        for p in &mut self.procs {
            p.stop(grace);
        }
        self.procs.clear();
        for (ns, dev) in &self.wg_ifaces {
            let _ = ip(&["-n", ns, "link", "del", dev]);
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{dev}.sock"));
        }
        let _ = ip(&["-n", &self.laptop_ns, "route", "del", "default"]);
    }
}

impl Running {
    fn new(key: &'static str, topo: &Topo) -> Self {
        Self {
            key,
            gw_roots: Vec::new(),
            client_roots: Vec::new(),
            procs: Vec::new(),
            wg_ifaces: Vec::new(),
            laptop_ns: topo.laptop.clone(),
        }
    }

    /// The pid of the netstack process (VPN Share only).
    pub fn netstack_pid(&self) -> Option<u32> {
        let all = crate::procstat::all();
        crate::procstat::tree(&all, &self.gw_roots)
            .into_iter()
            .find(|p| p.comm.starts_with("vpnshare-netsta"))
            .map(|p| p.pid)
    }

    pub fn proc_outputs(&self) -> String {
        self.procs
            .iter()
            .map(|p| format!("--- {} ---\n{}", p.name, p.output()))
            .collect()
    }
}

/// Polls until a TCP exchange with the echo server works from the laptop.
fn wait_path(topo: &Topo, what: &str, timeout: Duration) -> Result<(), Error> {
    let end = Instant::now() + timeout;
    while !probes::echo_works(&topo.laptop, inet(ECHO_PORT)) {
        topo::interrupted()?;
        if Instant::now() > end {
            return Err(Error::Setup(format!(
                "{what}: no TCP exchange with the internet namespace within {} s",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

pub fn plain(topo: &Topo) -> Result<Running, Error> {
    topo.laptop_default_via_phone(true)?;
    let r = Running::new("plain", topo);
    wait_path(topo, "plain routing", Duration::from_secs(5))?;
    Ok(r)
}

fn wg_key(dir: &Path, name: &str) -> Result<(PathBuf, String), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let private = run(Command::new("wg").arg("genkey"))?;
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Error::Setup(format!("wg pubkey: {e}")))?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(private.as_bytes())
            .map_err(|e| Error::Setup(format!("wg pubkey: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::Setup(format!("wg pubkey: {e}")))?;
    let public = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let path = dir.join(format!("{name}.key"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::Setup(format!("{}: {e}", path.display())))?;
    f.write_all(private.as_bytes())
        .map_err(|e| Error::Setup(format!("{}: {e}", path.display())))?;
    Ok((path, public))
}

/// boringtun-cli on the laptop and on the phone, configured with `wg`; the laptop's
/// default route goes into the tunnel, the phone forwards in the kernel.
pub fn boringtun(topo: &Topo, tools: &Tools) -> Result<Running, Error> {
    let pid = std::process::id();
    let (li, pi) = (format!("vsb{pid}l"), format!("vsb{pid}p"));
    let mut r = Running::new("wg", topo);
    r.wg_ifaces = vec![
        (topo.laptop.clone(), li.clone()),
        (topo.phone.clone(), pi.clone()),
    ];
    for (ns, dev) in [(&topo.laptop, &li), (&topo.phone, &pi)] {
        let log = topo.dir.join(format!("{dev}.log"));
        let mut cmd = Topo::cmd(ns, &tools.boringtun);
        cmd.arg(dev)
            .args(["--foreground", "--disable-drop-privileges", "--log"])
            .arg(&log);
        let p = Proc::spawn(&format!("boringtun {dev}"), &mut cmd)?;
        if ns == &topo.laptop {
            r.client_roots.push(p.pid());
        } else {
            r.gw_roots.push(p.pid());
        }
        r.procs.push(p);
    }
    // The interfaces and the control sockets appear once boringtun is running.
    let end = Instant::now() + Duration::from_secs(10);
    for (ns, dev) in [(&topo.laptop, &li), (&topo.phone, &pi)] {
        while ip(&["-n", ns, "link", "show", dev]).is_err()
            || !Path::new(&format!("/var/run/wireguard/{dev}.sock")).exists()
        {
            topo::interrupted()?;
            if Instant::now() > end {
                return Err(Error::Setup(format!(
                    "boringtun did not create {dev}:\n{}",
                    r.proc_outputs()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let (lkey, lpub) = wg_key(&topo.dir, "wg-laptop")?;
    let (pkey, ppub) = wg_key(&topo.dir, "wg-phone")?;
    let endpoint = format!("{PHONE_LAN_IP}:{WG_PORT}");
    run(Topo::cmd(&topo.laptop, "wg")
        .args(["set", &li, "private-key"])
        .arg(&lkey)
        .args([
            "peer",
            &ppub,
            "endpoint",
            &endpoint,
            "allowed-ips",
            "0.0.0.0/0",
        ]))?;
    run(Topo::cmd(&topo.phone, "wg")
        .args(["set", &pi, "listen-port", WG_PORT, "private-key"])
        .arg(&pkey)
        .args(["peer", &lpub, "allowed-ips", "10.202.0.2/32"]))?;
    for (ns, dev, addr) in [
        (&topo.laptop, &li, topo::WG_LAPTOP),
        (&topo.phone, &pi, topo::WG_PHONE),
    ] {
        ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
        ip(&["-n", ns, "link", "set", dev, "mtu", "1420", "up"])?;
    }
    let _ = topo.laptop_default_via_phone(false);
    ip(&["-n", &topo.laptop, "route", "add", "default", "dev", &li])?;
    if let Err(e) = wait_path(topo, "boringtun", Duration::from_secs(10)) {
        return Err(Error::Setup(format!("{e}\n{}", r.proc_outputs())));
    }
    Ok(r)
}

/// The real gateway in the phone (`--egress any`: its way out is the internet
/// namespace) and the real `vpnshare connect` in the laptop, the laptop's key trusted
/// beforehand with `vpnshare peers add`.
pub fn vpnshare(topo: &Topo, tools: &Tools, transport: &'static str) -> Result<Running, Error> {
    let gw_dir = topo.dir.join(format!("gateway-{transport}"));
    let laptop_dir = topo.dir.join(format!("laptop-{transport}"));
    let resolv = topo.dir.join(format!("resolv-{transport}.conf"));
    std::fs::write(&resolv, format!("nameserver {}\n", topo::SERVER_IP))
        .map_err(|e| Error::Setup(format!("{}: {e}", resolv.display())))?;
    let vpnshare = tools.bins.join("vpnshare");
    let listen = format!("{PHONE_LAN_IP}:{VSHP_PORT}");
    let mut cmd = Topo::cmd(&topo.phone, &vpnshare);
    cmd.args([
        "gateway",
        "--listen",
        &listen,
        "--egress",
        "any",
        "--no-mdns",
        "--state-dir",
    ])
    .arg(&gw_dir)
    .env("RUST_LOG", "warn");
    let mut gateway = Proc::spawn("vpnshare gateway", &mut cmd)?;
    let invite = gateway
        .wait_line("vshp://", Duration::from_secs(20))?
        .split_whitespace()
        .find(|w| w.starts_with("vshp://"))
        .unwrap_or_default()
        .to_owned();
    let mut r = Running::new(if transport == "udp" { "udp" } else { "tcp" }, topo);
    r.gw_roots.push(gateway.pid());
    let id = run(Command::new(&vpnshare)
        .args(["id", "--state-dir"])
        .arg(&laptop_dir))?;
    let key = id.lines().last().unwrap_or_default().trim().to_owned();
    run(Command::new(&vpnshare)
        .args(["peers", "--state-dir"])
        .arg(&gw_dir)
        .args(["add", &key, "--name", "laptop"]))?;
    let _ = topo.laptop_default_via_phone(false);
    let mut cmd = Topo::cmd(&topo.laptop, &vpnshare);
    cmd.args([
        "connect",
        &invite,
        "--transport",
        transport,
        "--name",
        "laptop",
    ])
    .arg("--state-dir")
    .arg(&laptop_dir)
    .arg("--resolv-conf")
    .arg(&resolv)
    .env("RUST_LOG", "warn");
    let mut client = Proc::spawn(&format!("vpnshare connect ({transport})"), &mut cmd)?;
    r.client_roots.push(client.pid());
    let up = client.wait_line("tunnel up:", Duration::from_secs(30));
    r.procs.push(client);
    r.procs.push(gateway);
    if let Err(e) = up.and_then(|_| wait_path(topo, "vpnshare", Duration::from_secs(15))) {
        return Err(Error::Setup(format!("{e}\n{}", r.proc_outputs())));
    }
    Ok(r)
}
