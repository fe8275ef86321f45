//! `vpnshare-bench`: measures VPN Share the way its users feel it, side by side with
//! plain kernel routing and boringtun in the same run, in network namespaces of its own
//! (laptop — phone — internet). See docs/performance.md.
//!
//! ```sh
//! cargo run --release -p vpnshare-bench -- [--quick] [--only udp,plain] [--out bench-out/e2e.json]
//! ```

mod handshake;
mod iperf;
mod probes;
mod procstat;
mod report;
mod scenarios;
mod stats;
mod topo;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;

use report::{Figure, Report};
use scenarios::{Running, Tools};
use topo::{IPERF_PORT, Proc, Topo, inet};

/// Everything that stops a run or a measurement.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Setup(String),
    #[error("{cmd} failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("interrupted")]
    Interrupted,
}

#[derive(Debug, Parser)]
#[command(
    name = "vpnshare-bench",
    about = "VPN Share against plain routing and boringtun, in namespaces of its own (as root)"
)]
struct Args {
    /// A smoke run of about a minute: one short round of everything, 1,000 flows.
    #[arg(long)]
    quick: bool,
    /// Only these scenarios (comma-separated): plain, wg, udp, tcp; `vpnshare` = udp,tcp.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Only these measurements (comma-separated): rr (request/response), cps
    /// (connections per second), bulk (TCP, with CPU and memory), udp, flows, handshakes.
    #[arg(long, value_delimiter = ',')]
    tests: Vec<String>,
    /// The JSON report.
    #[arg(long, default_value = "bench-out/e2e.json")]
    out: PathBuf,
    /// Rounds per figure (the figure is their median); default 3, 1 with --quick.
    #[arg(long)]
    rounds: Option<u32>,
    /// Seconds per bulk round; default 5, 1 with --quick.
    #[arg(long)]
    seconds: Option<u32>,
    /// Concurrent flows to hold open; default 10000, 1000 with --quick.
    #[arg(long)]
    flows: Option<usize>,
    /// Also print this run beside an earlier JSON report (e.g. before a change).
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Use the release binaries as they are (no cargo build).
    #[arg(long)]
    no_build: bool,
    /// Internal: be the echo and greeting servers (started inside the internet namespace).
    #[arg(long, hide = true)]
    serve: bool,
}

/// Settings of one run.
#[derive(Debug, Clone)]
struct Cfg {
    quick: bool,
    rounds: u32,
    secs: u32,
    flows: usize,
    rr_exchanges: usize,
    cps_secs: f64,
    /// The measurements to make (all when empty).
    tests: Vec<String>,
}

/// The measurements `--tests` can pick.
const TESTS: &[&str] = &["rr", "cps", "bulk", "udp", "flows", "handshakes"];

impl Cfg {
    fn wants(&self, test: &str) -> bool {
        self.tests.is_empty() || self.tests.iter().any(|t| t == test)
    }
}

fn main() {
    // Block the termination signals before any thread exists: a dedicated thread
    // takes them, asks every wait to give up, and cleans up if the run does not.
    let mut set = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        set.add(s);
    }
    let _ = set.thread_block();
    std::thread::spawn(move || {
        if set.wait().is_ok() {
            eprintln!("\ninterrupted: stopping and removing the namespaces");
            topo::INTERRUPTED.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_secs(8));
            topo::cleanup_registered();
            std::process::exit(130);
        }
    });
    let args = Args::parse();
    if args.serve {
        raise_nofile();
        if let Err(e) = probes::serve() {
            eprintln!("vpnshare-bench --serve: {e}");
        }
        std::process::exit(1);
    }
    let code = match real_main(args) {
        Ok(()) => 0,
        Err(Error::Interrupted) => 130,
        Err(e) => {
            eprintln!("vpnshare-bench: {e}");
            1
        }
    };
    topo::cleanup_registered();
    std::process::exit(code);
}

fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn have(prog: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {prog}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds the release binaries and finds or installs iperf3, wg and boringtun-cli.
fn prepare(args: &Args) -> Result<Tools, Error> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    if !args.no_build {
        eprintln!("building the release binaries…");
        let st = Command::new(&cargo)
            .current_dir(workspace_root())
            .args([
                "build",
                "--release",
                "-p",
                "vpnshare",
                "-p",
                "client-helper",
                "-p",
                "parser-sandbox",
                "-p",
                "netstack",
            ])
            .status()
            .map_err(|e| Error::Setup(format!("running cargo: {e}")))?;
        if !st.success() {
            return Err(Error::Setup("cargo build --release failed".into()));
        }
    }
    let bins = target_dir().join("release");
    for b in [
        "vpnshare",
        "vpnshare-helper",
        "vpnshare-worker",
        "vpnshare-netstack",
    ] {
        if !bins.join(b).is_file() {
            return Err(Error::Setup(format!(
                "{} missing (cargo build --release)",
                bins.join(b).display()
            )));
        }
    }
    if !have("iperf3") || !have("wg") {
        eprintln!("installing iperf3 and wireguard-tools with apt-get…");
        let st = Command::new("apt-get")
            .args([
                "install",
                "-y",
                "--no-install-recommends",
                "iperf3",
                "wireguard-tools",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map_err(|e| Error::Setup(format!("apt-get: {e}")))?;
        if !st.success() || !have("iperf3") || !have("wg") {
            return Err(Error::Setup(
                "iperf3 and wg (wireguard-tools) are needed; install them".into(),
            ));
        }
    }
    let home_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
        .join("boringtun-cli");
    let boringtun = if have("boringtun-cli") {
        PathBuf::from("boringtun-cli")
    } else {
        if !home_bin.is_file() {
            eprintln!("installing boringtun-cli with cargo install…");
            let st = Command::new(&cargo)
                .args(["install", "boringtun-cli", "--locked"])
                .status()
                .map_err(|e| Error::Setup(format!("cargo install: {e}")))?;
            if !st.success() {
                return Err(Error::Setup("cargo install boringtun-cli failed".into()));
            }
        }
        home_bin
    };
    Ok(Tools { bins, boringtun })
}

/// The commit of the tree being measured (binaries built from it), `+dirty` when
/// tracked files have local changes; empty outside a git checkout.
fn commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(workspace_root())
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]) else {
        return String::new();
    };
    match git(&["status", "--porcelain", "--untracked-files=no"]) {
        Some(s) if !s.is_empty() => format!("{head}+dirty"),
        _ => head,
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn machine() -> report::Machine {
    let cpu_model = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_default();
    let mem_kib: f64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    report::Machine {
        hostname: read("/proc/sys/kernel/hostname").trim().to_owned(),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        cpu_model,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        mem_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        loadavg_start: read("/proc/loadavg").trim().to_owned(),
        loadavg_end: String::new(),
    }
}

/// Takes /run/vsb.lock so that two runs never measure at the same time.
fn lock() -> Result<nix::fcntl::Flock<std::fs::File>, Error> {
    use nix::fcntl::{Flock, FlockArg};
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/run/vsb.lock")
            .map_err(|e| Error::Setup(format!("/run/vsb.lock: {e}")))
    };
    let mut said = false;
    loop {
        match Flock::lock(open()?, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(l),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                if !said {
                    eprintln!("another vpnshare-bench run is measuring; waiting for it…");
                    said = true;
                }
                topo::interrupted()?;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err((_, e)) => return Err(Error::Setup(format!("locking /run/vsb.lock: {e}"))),
        }
    }
}

fn real_main(args: Args) -> Result<(), Error> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::Setup(
            "needs root (network namespaces, TUN devices); run it with sudo".into(),
        ));
    }
    let cfg = Cfg {
        quick: args.quick,
        rounds: args.rounds.unwrap_or(if args.quick { 1 } else { 3 }).max(1),
        secs: args
            .seconds
            .unwrap_or(if args.quick { 1 } else { 5 })
            .max(1),
        flows: args.flows.unwrap_or(if args.quick { 1000 } else { 10_000 }),
        rr_exchanges: if args.quick { 2000 } else { 20_000 },
        cps_secs: if args.quick { 1.0 } else { 3.0 },
        tests: args.tests.clone(),
    };
    if let Some(bad) = cfg.tests.iter().find(|t| !TESTS.contains(&t.as_str())) {
        return Err(Error::Setup(format!(
            "--tests {bad}: the measurements are {}",
            TESTS.join(", ")
        )));
    }
    let only: Vec<String> = args
        .only
        .iter()
        .flat_map(|o| {
            if o == "vpnshare" {
                vec!["udp".to_owned(), "tcp".to_owned()]
            } else {
                vec![o.clone()]
            }
        })
        .collect();
    let wanted: Vec<&str> = report::SCENARIOS
        .iter()
        .map(|(k, _)| *k)
        .filter(|k| only.is_empty() || only.iter().any(|o| o == k))
        .collect();
    if let Some(bad) = only
        .iter()
        .find(|o| !report::SCENARIOS.iter().any(|(k, _)| k == o))
    {
        return Err(Error::Setup(format!(
            "--only {bad}: the scenarios are plain, wg, udp, tcp (vpnshare = udp,tcp)"
        )));
    }
    // Only handshakes asked for: no scenario to set up.
    let wanted = if ["rr", "cps", "bulk", "udp", "flows"]
        .iter()
        .any(|t| cfg.wants(t))
    {
        wanted
    } else {
        Vec::new()
    };
    // The lock first: a build beside another run's measurement would disturb it.
    let _lock = lock()?;
    let tools = prepare(&args)?;
    let removed = topo::cleanup_stale();
    if !removed.is_empty() {
        eprintln!("removed stale: {}", removed.join(", "));
    }
    let nofile = raise_nofile();
    if (nofile as usize) < cfg.flows + 100 {
        eprintln!(
            "WARNING: RLIMIT_NOFILE is {nofile}: fewer than {} flows can be held",
            cfg.flows
        );
    }

    let mut rep = Report {
        date: report::utc(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        ),
        machine: machine(),
        commit: commit(),
        quick: cfg.quick,
        rounds: cfg.rounds,
        seconds_per_round: cfg.secs,
        ..Report::default()
    };
    let load1: f64 = rep
        .machine
        .loadavg_start
        .split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0.0);
    if load1 > (0.25 * rep.machine.cpus as f64).max(0.5) {
        let w = format!(
            "the machine is busy (load average {}): figures are noisy, compare ratios from one run only",
            rep.machine.loadavg_start
        );
        eprintln!("WARNING: {w}");
        rep.notes.push(w);
    }
    eprintln!(
        "{} on {} ({} CPUs, {}), load {}: scenarios {}, {} round(s) of {} s",
        rep.date,
        rep.machine.hostname,
        rep.machine.cpus,
        rep.machine.cpu_model,
        rep.machine.loadavg_start,
        wanted.join(","),
        cfg.rounds,
        cfg.secs
    );

    let started = Instant::now();
    let topo = Topo::build()?;
    let exe = std::env::current_exe()
        .map_err(|e| Error::Setup(format!("finding this executable: {e}")))?;
    let mut servers = Proc::spawn(
        "vpnshare-bench --serve",
        Topo::cmd(&topo.inet, &exe).arg("--serve"),
    )?;
    servers.wait_line("serving", Duration::from_secs(5))?;
    let mut iperf = IperfServer::start(&topo)?;

    for key in &wanted {
        topo::interrupted()?;
        eprintln!("== {key}: setting up");
        let load1 = read("/proc/loadavg")
            .split_whitespace()
            .next()
            .and_then(|l| l.parse::<f64>().ok());
        let up = match *key {
            "plain" => scenarios::plain(&topo),
            "wg" => scenarios::boringtun(&topo, &tools),
            "udp" => scenarios::vpnshare(&topo, &tools, "udp"),
            _ => scenarios::vpnshare(&topo, &tools, "tcp"),
        };
        let figs = match up {
            Ok(run) => {
                let figs = measure(&cfg, &topo, &run, &mut iperf)?;
                drop(run);
                figs
            }
            Err(Error::Interrupted) => return Err(Error::Interrupted),
            Err(e) => {
                eprintln!("== {key}: set-up failed: {e}");
                rep.notes
                    .push(format!("{key}: set-up failed: {}", first_line(&e)));
                BTreeMap::new()
            }
        };
        let mut figs = figs;
        if let Some(l) = load1 {
            // The machine's load when the scenario began: how far to trust its figures.
            figs.insert("loadavg_1m_at_start".into(), Figure::of(l));
        }
        rep.scenarios.insert((*key).to_owned(), figs);
    }
    drop(iperf);
    drop(servers);
    drop(topo);

    topo::interrupted()?;
    if cfg.wants("handshakes") {
        handshakes(&cfg, &mut rep);
    }
    rep.machine.loadavg_end = read("/proc/loadavg").trim().to_owned();
    rep.elapsed_s = started.elapsed().as_secs_f64().round();
    rep.compute_ratios();
    println!(
        "\nVPN Share end-to-end, {} at {} on {} ({} CPUs, {}), load at start {}{}",
        rep.date,
        if rep.commit.is_empty() {
            "?"
        } else {
            &rep.commit
        },
        rep.machine.hostname,
        rep.machine.cpus,
        rep.machine.cpu_model,
        rep.machine.loadavg_start,
        if cfg.quick { ", --quick" } else { "" }
    );
    println!("{}", rep.table());
    if let Some(path) = &args.compare {
        match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).map_err(|e| e.to_string()))
        {
            Ok(before) => println!("{}", rep.compare_table(&before)),
            Err(e) => eprintln!("--compare {}: {e}", path.display()),
        }
    }
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Setup(format!("{}: {e}", dir.display())))?;
    }
    let json = serde_json::to_string_pretty(&rep)
        .map_err(|e| Error::Setup(format!("serialising the report: {e}")))?;
    std::fs::write(&args.out, json + "\n")
        .map_err(|e| Error::Setup(format!("{}: {e}", args.out.display())))?;
    println!(
        "written: {} (measured in {:.0} s)",
        args.out.display(),
        rep.elapsed_s
    );
    Ok(())
}

fn handshakes(cfg: &Cfg, rep: &mut Report) {
    eprintln!("== handshakes");
    let hs_secs = if cfg.quick { 0.5 } else { 3.0 };
    match handshake::measure(hs_secs) {
        Ok(r) => {
            let note = "in process, one thread, the vshp IK handshake (not through the gateway)";
            rep.global.insert(
                "handshakes_per_s_per_core_gateway_side".into(),
                Figure::of(r.gateway_side).with_note(note),
            );
            rep.global.insert(
                "handshakes_per_s_per_core_both_sides".into(),
                Figure::of(r.both_sides).with_note(note),
            );
        }
        Err(e) => {
            rep.global
                .insert("handshakes_per_s_per_core".into(), Figure::none(e));
        }
    }
}

fn first_line(e: &Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

/// The soft descriptor limit up to the hard one (raising the hard one too when
/// allowed): 10,000 flows need 10,000 descriptors in the client and in the server.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let want = 262_144;
    if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err() {
        if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
    getrlimit(Resource::RLIMIT_NOFILE).map_or(0, |(soft, _)| soft)
}

/// The iperf3 server in the internet namespace, restarted when a run fails (a killed
/// client can leave it busy).
struct IperfServer {
    ns: String,
    proc: Option<Proc>,
    dir: PathBuf,
}

impl IperfServer {
    fn start(topo: &Topo) -> Result<Self, Error> {
        let mut s = Self {
            ns: topo.inet.clone(),
            proc: None,
            dir: topo.dir.clone(),
        };
        s.restart()?;
        Ok(s)
    }

    fn restart(&mut self) -> Result<(), Error> {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(1));
        }
        let mut cmd = Topo::cmd(&self.ns, "iperf3");
        // Bound to the server address: a UDP test's replies must come from it (the
        // namespace's routes would otherwise pick the WAN address as the source).
        let bind = topo::SERVER_IP.to_string();
        cmd.args([
            "-s",
            "--forceflush",
            "-B",
            &bind,
            "-p",
            &IPERF_PORT.to_string(),
        ]);
        let mut p = Proc::spawn("iperf3 -s", &mut cmd)?;
        p.wait_line("Server listening", Duration::from_secs(5))?;
        self.proc = Some(p);
        Ok(())
    }

    /// Runs one client in the laptop namespace.
    fn client(
        &mut self,
        laptop: &str,
        spec: &iperf::IperfSpec,
    ) -> Result<iperf::IperfResult, String> {
        let out = self.dir.join("iperf3.json");
        let file = std::fs::File::create(&out).map_err(|e| e.to_string())?;
        let mut cmd = Topo::cmd(laptop, "iperf3");
        cmd.args(spec.args(inet(IPERF_PORT)))
            .stdin(std::process::Stdio::null())
            .stdout(file)
            .stderr(std::process::Stdio::null())
            .process_group_0();
        let mut child = cmd.spawn().map_err(|e| format!("iperf3: {e}"))?;
        let end = Instant::now() + Duration::from_secs(u64::from(spec.seconds) + 12);
        let done = loop {
            if let Ok(Some(_)) = child.try_wait() {
                break true;
            }
            if Instant::now() > end || topo::INTERRUPTED.load(Ordering::SeqCst) {
                let _ = child.kill();
                let _ = child.wait();
                break false;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let json = std::fs::read_to_string(&out).unwrap_or_default();
        let r = if done {
            iperf::parse(&json).map_err(|e| e.to_string())
        } else {
            Err("iperf3 did not finish in time".to_owned())
        };
        if r.is_err() {
            // Leave a clean server for the next run.
            let _ = self.restart();
        }
        r
    }
}

trait ProcessGroup {
    fn process_group_0(&mut self) -> &mut Self;
}

impl ProcessGroup for Command {
    fn process_group_0(&mut self) -> &mut Self {
        use std::os::unix::process::CommandExt;
        self.process_group(0)
    }
}

/// The largest total RSS seen, in KiB, and each process's share of it.
type RssPeak = (u64, BTreeMap<u32, u64>);

/// Samples the total RSS of `pids` until stopped.
struct RssSampler {
    stop: Arc<AtomicBool>,
    max: Arc<Mutex<RssPeak>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(Mutex::new((0u64, BTreeMap::new())));
        let (s, m) = (stop.clone(), max.clone());
        let thread = (!pids.is_empty()).then(|| {
            std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let by_pid = procstat::rss_kib_by_pid(&pids);
                    let total: u64 = by_pid.values().sum();
                    if let Ok(mut g) = m.lock() {
                        if total > g.0 {
                            *g = (total, by_pid);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        });
        Self { stop, max, thread }
    }

    fn finish(mut self) -> RssPeak {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.max.lock().map(|g| g.clone()).unwrap_or_default()
    }
}

/// The pids of the trees under `roots`, and every pid's command name.
fn pids_of(roots: &[u32], names: &mut BTreeMap<u32, String>) -> Vec<u32> {
    let all = procstat::all();
    procstat::tree(&all, roots)
        .into_iter()
        .map(|p| {
            names.insert(p.pid, p.comm);
            p.pid
        })
        .collect()
}

const MIB: f64 = 1024.0;

/// Every measurement of one scenario.
fn measure(
    cfg: &Cfg,
    topo: &Topo,
    run: &Running,
    iperf: &mut IperfServer,
) -> Result<BTreeMap<String, Figure>, Error> {
    let mut f: BTreeMap<String, Figure> = BTreeMap::new();
    let key = run.key;
    let server_rr = inet(topo::ECHO_PORT);

    let mut alone_up_1 = None;
    if cfg.wants("rr") {
        // Request/response latency first, while nothing else has run through the path.
        eprintln!("== {key}: request/response");
        let (mut p50s, mut p99s, mut err) = (Vec::new(), Vec::new(), None);
        for _ in 0..cfg.rounds {
            match probes::request_response(&topo.laptop, server_rr, cfg.rr_exchanges, 200) {
                Ok(mut v) => {
                    if let Some((a, b)) = stats::p50_p99(&mut v) {
                        p50s.push(a);
                        p99s.push(b);
                    }
                }
                Err(Error::Interrupted) => return Err(Error::Interrupted),
                Err(e) => err = Some(e.to_string()),
            }
        }
        put_rounds(&mut f, "rr_p50_us", p50s, &err);
        put_rounds(&mut f, "rr_p99_us", p99s, &err);
    }

    if cfg.wants("cps") {
        eprintln!("== {key}: connections per second");
        let (mut rates, mut t50, mut t99, mut notes) = (Vec::new(), Vec::new(), Vec::new(), None);
        for _ in 0..cfg.rounds {
            // One client: the time to first byte of an unloaded path. Then many: the
            // rate the path sustains.
            for clients in [1, probes::CPS_CLIENTS] {
                topo::interrupted()?;
                let mut r = probes::connections_per_second(
                    &topo.laptop,
                    inet(topo::GREET_PORT),
                    cfg.cps_secs,
                    clients,
                )?;
                if clients == 1 {
                    if let Some((a, b)) = stats::p50_p99(&mut r.ttfb_us) {
                        t50.push(a);
                        t99.push(b);
                    }
                } else if r.connections > 0 {
                    rates.push(r.connections as f64 / r.seconds);
                }
                if r.errors > 0 {
                    notes = Some(format!(
                        "{} failed connections with {clients} client(s), first: {}",
                        r.errors,
                        r.first_error.unwrap_or_default()
                    ));
                }
            }
        }
        put_rounds(&mut f, "cps", rates, &notes);
        put_rounds(&mut f, "ttfb_p50_us", t50, &None);
        put_rounds(&mut f, "ttfb_p99_us", t99, &None);
    }

    if cfg.wants("bulk") {
        // Bulk TCP, with the CPU time and memory of every process of the scenario.
        let tck = procstat::clk_tck();
        let (mut gw_cpu, mut cl_cpu, mut bytes) = (0.0, 0.0, 0u64);
        let mut rss_max: RssPeak = (0, BTreeMap::new());
        let mut names = BTreeMap::new();
        let (mut gw_ticks, mut cl_ticks) = (BTreeMap::new(), BTreeMap::new());
        for (name, streams, reverse) in [
            ("tcp_up_1", 1, false),
            ("tcp_down_1", 1, true),
            ("tcp_up_4", 4, false),
            ("tcp_down_4", 4, true),
        ] {
            eprintln!("== {key}: {name}");
            let spec = iperf::IperfSpec {
                streams,
                reverse,
                udp_mbps: None,
                seconds: cfg.secs,
            };
            let (mut gbps, mut err) = (Vec::new(), None);
            for _ in 0..cfg.rounds {
                topo::interrupted()?;
                let (gw, cl) = (
                    pids_of(&run.gw_roots, &mut names),
                    pids_of(&run.client_roots, &mut names),
                );
                let (g0, c0) = (
                    procstat::CpuSnapshot::take(&gw),
                    procstat::CpuSnapshot::take(&cl),
                );
                let sampler = RssSampler::start(gw.clone());
                let r = iperf.client(&topo.laptop, &spec);
                let (g1, c1) = (
                    procstat::CpuSnapshot::take(&gw),
                    procstat::CpuSnapshot::take(&cl),
                );
                let peak = sampler.finish();
                if peak.0 > rss_max.0 {
                    rss_max = peak;
                }
                match r {
                    Ok(r) => {
                        gbps.push(r.bits_per_second / 1e9);
                        bytes += r.bytes;
                        gw_cpu += g0.seconds_until(&g1, tck);
                        cl_cpu += c0.seconds_until(&c1, tck);
                        for (pid, t) in g0.by_pid_until(&g1) {
                            *gw_ticks.entry(pid).or_insert(0u64) += t;
                        }
                        for (pid, t) in c0.by_pid_until(&c1) {
                            *cl_ticks.entry(pid).or_insert(0u64) += t;
                        }
                    }
                    Err(e) => err = Some(e),
                }
            }
            if name == "tcp_up_1" {
                alone_up_1 = stats::median(&gbps);
            }
            put_rounds(&mut f, name, gbps, &err);
        }
        if bytes > 0 && !run.gw_roots.is_empty() {
            let gb = bytes as f64 / 1e9;
            f.insert("cpu_gw_s_per_gb".into(), Figure::of(gw_cpu / gb));
            f.insert("cpu_client_s_per_gb".into(), Figure::of(cl_cpu / gb));
            f.insert("rss_gw_mib".into(), Figure::of(rss_max.0 as f64 / MIB));
            // Per process (command name): where the time and the memory go.
            for (prefix, ticks) in [
                ("cpu_gw_s_per_gb", &gw_ticks),
                ("cpu_client_s_per_gb", &cl_ticks),
            ] {
                for (name, t) in procstat::by_name(ticks, &names) {
                    f.insert(format!("{prefix}/{name}"), Figure::of(t as f64 / tck / gb));
                }
            }
            for (name, kib) in procstat::by_name(&rss_max.1, &names) {
                f.insert(format!("rss_gw_mib/{name}"), Figure::of(kib as f64 / MIB));
            }
        } else if run.gw_roots.is_empty() {
            for k in ["cpu_gw_s_per_gb", "cpu_client_s_per_gb", "rss_gw_mib"] {
                f.insert(k.into(), Figure::none("kernel only: no process to measure"));
            }
        }
    }
    if cfg.wants("udp") {
        for (name, rate, reverse) in [
            ("udp_100", 100u32, false),
            ("udp_300", 300, false),
            ("udp_300_down", 300, true),
        ] {
            eprintln!("== {key}: {name}");
            let spec = iperf::IperfSpec {
                streams: 1,
                reverse,
                udp_mbps: Some(rate),
                seconds: cfg.secs,
            };
            let (mut got, mut loss, mut err) = (Vec::new(), Vec::new(), None);
            for _ in 0..cfg.rounds {
                topo::interrupted()?;
                match iperf.client(&topo.laptop, &spec) {
                    Ok(r) => {
                        got.push(r.bits_per_second / 1e6);
                        if let Some(u) = r.udp {
                            loss.push(u.lost_percent);
                        }
                    }
                    Err(e) => err = Some(e),
                }
            }
            put_rounds(&mut f, &format!("{name}_mbps"), got, &err);
            put_rounds(&mut f, &format!("{name}_loss"), loss, &err);
        }
    }
    if cfg.wants("flows") {
        flows(cfg, topo, run, iperf, alone_up_1, &mut f)?;
    }
    Ok(f)
}

fn put_rounds(f: &mut BTreeMap<String, Figure>, key: &str, rounds: Vec<f64>, err: &Option<String>) {
    let mut fig = if rounds.is_empty() {
        Figure::none(err.clone().unwrap_or_else(|| "no sample".into()))
    } else {
        Figure::median_of(rounds)
    };
    if fig.value.is_some() {
        if let Some(e) = err {
            fig.note = Some(format!("some rounds failed: {e}"));
        }
    }
    f.insert(key.to_owned(), fig);
}

/// Many concurrent flows held open through the path, the netstack's memory with them,
/// and the bulk throughput of one more flow beside them.
fn flows(
    cfg: &Cfg,
    topo: &Topo,
    run: &Running,
    iperf: &mut IperfServer,
    alone: Option<f64>,
    f: &mut BTreeMap<String, Figure>,
) -> Result<(), Error> {
    eprintln!("== {}: {} concurrent flows", run.key, cfg.flows);
    let t = Instant::now();
    let mut held = probes::hold_flows(&topo.laptop, inet(topo::ECHO_PORT), cfg.flows)?;
    topo::interrupted()?;
    let opened = held.streams.len();
    let mut note = None;
    if let Some((n, why)) = &held.stopped {
        note = Some(format!(
            "stopped at {n} of {}: {why} (a cap on flows per lease in the netstack, or a descriptor limit)",
            cfg.flows
        ));
        // Room for iperf3's control and data connections.
        let keep = opened.saturating_sub(4);
        held.streams.truncate(keep);
        std::thread::sleep(Duration::from_secs(1));
    }
    let live = probes::live_flows(&mut held.streams);
    eprintln!(
        "   {opened} opened, {live} answering, in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mut fig = Figure::of(live as f64);
    fig.note = note;
    f.insert("flows_held".into(), fig);
    if let Some(ns) = run.netstack_pid() {
        f.insert(
            "flows_netstack_rss_mib".into(),
            Figure::of(procstat::rss_kib(&[ns]) as f64 / MIB),
        );
    }
    let spec = iperf::IperfSpec {
        streams: 1,
        reverse: false,
        udp_mbps: None,
        seconds: cfg.secs,
    };
    let (mut gbps, mut err) = (Vec::new(), None);
    for _ in 0..cfg.rounds {
        topo::interrupted()?;
        match iperf.client(&topo.laptop, &spec) {
            Ok(r) => gbps.push(r.bits_per_second / 1e9),
            Err(e) => err = Some(e),
        }
    }
    let extra = stats::median(&gbps);
    put_rounds(f, "flows_extra_gbps", gbps, &err);
    if let Some(r) = report::ratio(extra, alone) {
        f.insert("flows_extra_vs_alone".into(), Figure::of(r));
    }
    drop(held);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_split_on_commas() {
        let a = Args::try_parse_from([
            "vpnshare-bench",
            "--quick",
            "--only",
            "udp,plain",
            "--tests",
            "bulk,rr",
        ])
        .unwrap();
        assert!(a.quick && !a.serve);
        assert_eq!(a.only, vec!["udp", "plain"]);
        assert_eq!(a.tests, vec!["bulk", "rr"]);
        assert_eq!(a.out, PathBuf::from("bench-out/e2e.json"));
    }

    #[test]
    fn wants_everything_by_default() {
        let mut c = Cfg {
            quick: true,
            rounds: 1,
            secs: 1,
            flows: 1,
            rr_exchanges: 1,
            cps_secs: 1.0,
            tests: Vec::new(),
        };
        assert!(TESTS.iter().all(|t| c.wants(t)));
        c.tests = vec!["rr".into()];
        assert!(c.wants("rr") && !c.wants("bulk"));
    }
}
