//! `vpnshare-demo`: what `vpnshare demo` executes as root. Builds the testbed, runs the
//! real gateway in `phone` and the real client in `laptop`, pairs them by code, uses
//! the tunnel, prints what happened, and removes everything (also on failure and
//! Ctrl-C: the testbed's drop kills the processes and deletes the namespaces).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use demo::{Capture, Confinement, INTERRUPTED, Stack};
use testbed::client::{self, DnsType};

const FILE_MB: usize = 50;
const T: Duration = Duration::from_secs(60);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn main() -> ExitCode {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let _ = unsafe { sigaction(sig, &action) };
    }
    let Some(bins) = demo::bin_dir() else {
        eprintln!("vpnshare-demo: cannot locate the binaries' directory");
        return ExitCode::FAILURE;
    };
    let missing = demo::missing(&bins);
    if !missing.is_empty() {
        eprintln!("vpnshare-demo: the demo needs {}", missing.join(", "));
        return ExitCode::FAILURE;
    }
    testbed::cleanup_stale();
    let r = run(&bins);
    match r {
        Ok(()) => {
            println!("\nEverything removed: namespaces, processes, state directories.");
            ExitCode::SUCCESS
        }
        Err(_) if INTERRUPTED.load(Ordering::SeqCst) => {
            eprintln!("vpnshare-demo: interrupted");
            eprintln!("(everything the demo created has been removed)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("vpnshare-demo: {e}");
            eprintln!("(everything the demo created has been removed)");
            ExitCode::FAILURE
        }
    }
}

fn step(what: &str) -> Result<(), String> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err("interrupted".into());
    }
    println!("\n== {what}");
    Ok(())
}

fn run(bins: &std::path::Path) -> Result<(), String> {
    println!(
        "VPN Share demo — the real gateway and client in network namespaces, a real WireGuard VPN."
    );
    step("Building the network: laptop ── LAN ── phone ══ WireGuard VPN ══ vpn ── internet")?;
    let mut s = Stack::start(bins, "demo", FILE_MB)?;
    let result = use_stack(&mut s);
    let dirs = [s.gw_dir.clone(), s.laptop_dir.clone()];
    drop(s);
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
    result
}

fn use_stack(s: &mut Stack) -> Result<(), String> {
    let tb = &s.tb;
    println!(
        "laptop {} (no route beyond the LAN) | phone {} (default route only through wg0, boringtun) | internet: HTTP {}, DNS {}, UDP echo {}",
        tb.laptop_lan_ip(),
        tb.phone_lan_ip(),
        tb.http_addr(),
        tb.dns_addr(),
        tb.udp_echo_addr()
    );
    println!(
        "gateway running in phone: vpnshare gateway --listen {}:{}",
        tb.phone_lan_ip(),
        demo::LISTEN_PORT
    );
    println!("invite: {}", s.invite);
    let before = s.laptop_net()?;

    step(
        "Connecting the laptop: vpnshare connect (as root: starts vpnshare-helper, the session runs as nobody)",
    )?;
    let (up, code) = s.connect("udp", true)?;
    if let Some(c) = &code {
        println!(
            "laptop showed: Compare this code with the gateway: {c} — approved with `vpnshare pairing approve {c}`"
        );
    }
    println!("laptop: {up}");

    step("Confinement (/proc/<pid>/status)")?;
    let client_pid = s.client.as_ref().map(demo::Proc::pid).unwrap_or_default();
    println!(
        "  client session  pid {client_pid}: {}",
        Confinement::of(client_pid)
    );
    for pid in Stack::children_of(client_pid, "vpnshare-helpe") {
        println!("  vpnshare-helper pid {pid}: {}", Confinement::of(pid));
    }
    let gw_pid = s.gateway.pid();
    println!(
        "  gateway broker  pid {gw_pid}: {}",
        Confinement::of(gw_pid)
    );
    for comm in ["vpnshare-netst", "vpnshare-worke"] {
        for pid in Stack::children_of(gw_pid, comm) {
            println!("  {comm:<15} pid {pid}: {}", Confinement::of(pid));
        }
    }

    let during = s.laptop_net()?;
    let main_routes: String = during
        .routes
        .lines()
        .chain(during.routes6.lines())
        .filter(|l| {
            !l.contains("table local") && !l.starts_with("multicast ") && !l.contains("fe80::")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    println!(
        "\nlaptop routes with the tunnel up (main table, IPv4 and IPv6):\n{}",
        indent(&main_routes)
    );
    println!("laptop resolver file:\n{}", indent(&during.resolv_conf));

    let capture = Capture::start(&s.tb, s.tb.phone_lan_ip())?;
    let http = s.tb.http_addr();
    let dns = SocketAddr::new("100.64.0.1".parse().map_err(|_| "address")?, 53);
    step(&format!(
        "HTTP through the tunnel: GET http://{http}/file ({FILE_MB} MiB)"
    ))?;
    let t0 = Instant::now();
    let r = s
        .in_laptop(move || client::http_get(http, "/file", T))?
        .map_err(|e| format!("download: {e}"))?;
    let secs = t0.elapsed().as_secs_f64();
    let ok = r.sha256 == s.tb.file_sha256();
    println!(
        "  status {}, {} bytes, sha256 {} ({}), {:.1} s, {:.1} Mbit/s",
        r.status,
        r.len,
        demo::hex(&r.sha256),
        if ok {
            "matches the server's file"
        } else {
            "MISMATCH"
        },
        secs,
        r.len as f64 * 8.0 / secs.max(1e-3) / 1e6
    );
    if !ok {
        return Err("the downloaded file's sha256 does not match".into());
    }
    let body = testbed::content_bytes(4 << 20);
    let want = demo::hex(&testbed::content_sha256(body.len() as u64));
    let up_r = s
        .in_laptop(move || client::http_upload(http, &body, T))?
        .map_err(|e| format!("upload: {e}"))?;
    println!(
        "  upload of 4 MiB: server's sha256 {} ({})",
        up_r.text().trim(),
        if up_r.text().trim() == want {
            "matches"
        } else {
            "MISMATCH"
        }
    );

    step(&format!(
        "DNS through the tunnel: files.vpnshare.test via the lease's DNS {dns}"
    ))?;
    let q = s
        .in_laptop(move || client::dns_query(dns, "files.vpnshare.test", DnsType::A, T))?
        .map_err(|e| format!("DNS: {e}"))?;
    println!(
        "  rcode {}, addresses {:?} (the internet's DNS server has answered {} DNS queries in all)",
        q.rcode,
        q.addrs,
        s.tb.dns_queries()
    );
    let resolved = s.resolve_in_laptop("echo.vpnshare.test")?;
    println!(
        "  system resolver (getent ahostsv4 echo.vpnshare.test in the laptop, via the helper's resolver file): {resolved}"
    );

    if s.tb.has_ipv6() {
        let h6 = s.tb.addrs().http_v6();
        match s.in_laptop(move || client::http_get(h6, "/health", T))? {
            Ok(r) => println!(
                "  IPv6: GET http://{h6}/health → {} {:?}",
                r.status,
                r.text().trim()
            ),
            Err(e) => println!("  IPv6: GET http://{h6}/health failed: {e}"),
        }
    }

    step("UDP echo and a closed port")?;
    let echo = s.tb.udp_echo_addr();
    let e = s
        .in_laptop(move || {
            client::udp_echo(echo, b"hello through the tunnel", Duration::from_secs(5))
        })?
        .map_err(|e| format!("UDP echo: {e}"))?;
    println!("  UDP echo {echo}: {:?}", String::from_utf8_lossy(&e));
    let closed = s.tb.closed_tcp_addr();
    let t0 = Instant::now();
    let c = s.in_laptop(move || client::tcp_connect(closed, Duration::from_secs(10)))?;
    println!(
        "  TCP to closed port {closed}: {} after {} ms",
        match c {
            Ok(()) => "connected (unexpected)".to_owned(),
            Err(e) => e.to_string(),
        },
        t0.elapsed().as_millis()
    );
    let http_ip = http.ip();
    let p = s.in_laptop(move || client::icmp_echo(http_ip, b"ping", Duration::from_secs(3)))?;
    match p {
        Ok(()) => println!("  ping {http_ip}: answered"),
        Err(e) => println!(
            "  ping {http_ip}: no answer ({e}) — the gateway's netstack forwards ICMP only when ping sockets are allowed to it"
        ),
    }

    let rep = capture.finish();
    step("What crossed the laptop's LAN link while the tunnel was used")?;
    println!(
        "  {} VSHP packets to/from {}:{}, {} link housekeeping (ARP/ND), {} other packets (leaks)",
        rep.vshp,
        s.tb.phone_lan_ip(),
        demo::LISTEN_PORT,
        rep.link_local,
        rep.other
    );
    for l in &rep.leaks {
        println!("    leak: {l}");
    }

    step("Gateway counters (vpnshare status --json; the netstack reports every 5 s)")?;
    let end = Instant::now() + Duration::from_secs(8);
    let mut st = s.status()?;
    while st["netstack"]["bytes_out"].as_u64().unwrap_or(0) < s.tb.file_len()
        && Instant::now() < end
    {
        std::thread::sleep(Duration::from_millis(250));
        st = s.status()?;
    }
    println!(
        "{}",
        indent(&serde_json::to_string_pretty(&st).unwrap_or_default())
    );

    step("Ctrl-C on the client: CLOSE to the gateway, the helper restores everything")?;
    if let Some(mut c) = s.client.take() {
        let status = c.stop(nix::sys::signal::Signal::SIGINT)?;
        if let Some(l) = c.output().lines().find(|l| l.contains("tunnel down")) {
            println!("  laptop: {l}");
        }
        println!("  client exited: {status}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = s.laptop_net()?;
    println!(
        "  laptop routes, rules, links and resolver file as before: {}",
        if after == before { "yes" } else { "NO" }
    );
    if after != before {
        return Err(format!(
            "the laptop was not restored:\nbefore {before:#?}\nafter {after:#?}"
        ));
    }
    if rep.other != 0 {
        return Err(format!("{} packets leaked outside the tunnel", rep.other));
    }
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}
