//! Issue #5's proof: the real `vpnshare connect` (with the real `vpnshare-helper`) in the
//! testbed's `laptop`, the real `vpnshare gateway` in `phone` behind a real WireGuard
//! VPN. Traffic goes only to the testbed's namespaces.
//!
//! Needs root, /dev/net/tun and the workspace's binaries (`cargo nextest run
//! --workspace` builds them); otherwise each test says SKIPPED and passes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;
use common::{
    connect_for_pairing, one_error_line, ready, spawn_in_laptop, trusted_stack, wait_restored,
};

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use demo::{Capture, Confinement, Stack};
use nix::sys::signal::Signal;
use testbed::client::{self, DnsType};

const T: Duration = Duration::from_secs(60);

fn dns_server() -> SocketAddr {
    "100.64.0.1:53".parse().unwrap()
}

#[test]
fn download_upload_dns_udp_closed_port_through_the_tunnel_and_nothing_else_on_the_lan() {
    let Some(_) = ready() else { return };
    // 50 MiB: a few seconds in a debug build on this machine.
    let mut s = trusted_stack("data", 50);
    let (up, code) = s.connect("udp", false).unwrap();
    assert!(code.is_none());
    assert!(up.contains("tunnel up: 100.64.0."), "{up}");

    // The session is confined and unprivileged; the helper keeps CAP_NET_ADMIN only.
    let pid = s.client.as_ref().unwrap().pid();
    let c = Confinement::of(pid);
    assert!(c.is_confined(), "session {pid}: {c}");
    assert_eq!(c.uid, "65534", "{c}");
    let helpers = Stack::children_of(pid, "vpnshare-helpe");
    assert_eq!(helpers.len(), 1, "one helper child of the session");
    let h = Confinement::of(helpers[0]);
    assert_eq!(h.seccomp, "2", "helper: {h}");
    assert_eq!(h.cap_eff, "0000000000001000", "helper: {h}");

    let capture = Capture::start(&s.tb, s.tb.phone_lan_ip()).unwrap();
    let http = s.tb.http_addr();

    // (1) HTTP download with the server file's sha256, and an upload of the same size.
    let r = s
        .in_laptop(move || client::http_get(http, "/file", T))
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.len, s.tb.file_len());
    assert_eq!(r.sha256, s.tb.file_sha256(), "downloaded file differs");
    let body = testbed::content_bytes(50 << 20);
    let want = demo::hex(&testbed::content_sha256(body.len() as u64));
    let u = s
        .in_laptop(move || client::http_upload(http, &body, T))
        .unwrap()
        .unwrap();
    assert_eq!(u.status, 200);
    assert_eq!(u.text().trim(), want, "upload's sha256 at the server");

    // ICMP echo through the tunnel: the gateway's netstack answers it with a ping
    // socket (the testbed's phone allows them, as Android does for apps).
    let target = http.ip();
    s.in_laptop(move || client::icmp_echo(target, b"vpnshare", T))
        .unwrap()
        .unwrap();

    // (2) DNS through the tunnel: the lease's DNS server (the gateway's forwarder),
    // which the helper wrote into the resolver file.
    let resolv = s.laptop_net().unwrap().resolv_conf;
    assert!(resolv.contains("nameserver 100.64.0.1"), "{resolv}");
    let before_q = s.tb.dns_queries();
    let q = s
        .in_laptop(move || client::dns_query(dns_server(), "files.vpnshare.test", DnsType::A, T))
        .unwrap()
        .unwrap();
    assert_eq!(q.rcode, 0);
    assert_eq!(q.addrs, vec![http.ip()]);
    let nx = s
        .in_laptop(move || client::dns_query(dns_server(), "nothing.vpnshare.test", DnsType::A, T))
        .unwrap()
        .unwrap();
    assert_eq!(nx.rcode, 3, "NXDOMAIN");
    assert!(
        s.tb.dns_queries() > before_q,
        "the internet's DNS server saw the queries"
    );

    // IPv6 through the tunnel too (the lease has an IPv6 address; ::/1 and 8000::/1
    // route into the TUN).
    if s.tb.has_ipv6() {
        let h6 = s.tb.addrs().http_v6();
        let r6 = s
            .in_laptop(move || client::http_get(h6, "/bytes/300000", T))
            .unwrap()
            .unwrap();
        assert_eq!(r6.sha256, testbed::content_sha256(300_000));
        let dns6 = SocketAddr::new("fd56:5348:5000::1".parse().unwrap(), 53);
        let q6 = s
            .in_laptop(move || client::dns_query(dns6, "files.vpnshare.test", DnsType::Aaaa, T))
            .unwrap()
            .unwrap();
        assert_eq!(q6.addrs, vec![h6.ip()]);
    }

    // (3) UDP echo.
    let echo = s.tb.udp_echo_addr();
    let e = s
        .in_laptop(move || client::udp_echo(echo, b"vshp udp echo", Duration::from_secs(10)))
        .unwrap()
        .unwrap();
    assert_eq!(e, b"vshp udp echo");

    // (4) A closed port is refused (an RST through the tunnel), not left to time out.
    let closed = s.tb.closed_tcp_addr();
    let err = s
        .in_laptop(move || client::tcp_connect(closed, Duration::from_secs(20)))
        .unwrap()
        .unwrap_err();
    assert_eq!(err.io_kind(), Some(ErrorKind::ConnectionRefused), "{err}");

    // (5) No leak: everything on the laptop's LAN link was VSHP to the gateway's port
    // (plus ARP/neighbour discovery), DNS included.
    let rep = capture.finish();
    assert_eq!(rep.other, 0, "packets outside the tunnel: {:?}", rep.leaks);
    assert!(rep.vshp > 1000, "{rep:?}");

    // The gateway's counters show the peer and the traffic.
    let st = s.status().unwrap();
    assert_eq!(st["connected_peers"], 1, "{st}");

    // (6) TUN offload (docs/client.md): the kernel holds the laptop's TUN with
    // IFF_VNET_HDR, the 50 MiB upload reached the session as GSO super-packets (split
    // there to the lease MTU, which the gateway's policy enforced on every packet above),
    // and the download went back to the kernel partly coalesced.
    let tun = up
        .split(" on ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap();
    let ns = s.tb.ns(testbed::Node::Laptop);
    let link = Command::new("ip")
        .args(["-n", &ns, "-d", "link", "show", "dev", tun])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains("vnet_hdr on"), "{tun}: {link}");
    let mut c = s.client.take().unwrap();
    assert!(c.stop(Signal::SIGINT).unwrap().success(), "{}", c.output());
    let out = c.output();
    let counters = out
        .lines()
        .find(|l| l.contains("TUN offload counters"))
        .unwrap_or_else(|| panic!("no offload counters from the session:\n{out}"));
    eprintln!("{counters}");
    let field = |name: &str| -> u64 {
        let v = counters.split(&format!(" {name}=")).nth(1).unwrap();
        v.split_whitespace().next().unwrap().parse().unwrap()
    };
    assert!(field("super_packets") > 100, "{counters}");
    assert!(field("segments") > 2 * field("super_packets"), "{counters}");
    assert!(field("coalesced") > 0, "{counters}");
    assert_eq!(field("read_drops"), 0, "{counters}");
}

#[test]
fn tcp_transport_carries_a_download() {
    let Some(_) = ready() else { return };
    let mut s = trusted_stack("tcp", 8);
    let (up, _) = s.connect("tcp", false).unwrap();
    assert!(up.contains("over TCP"), "{up}");
    let http = s.tb.http_addr();
    let r = s
        .in_laptop(move || client::http_get(http, "/file", T))
        .unwrap()
        .unwrap();
    assert_eq!(r.sha256, s.tb.file_sha256());
}

#[test]
fn pairing_code_is_shown_and_approval_brings_the_tunnel_up() {
    let Some(_) = ready() else { return };
    let mut s = Stack::start(&demo::bin_dir().unwrap(), "pair", 1).unwrap();
    let (up, code) = s.connect("udp", true).unwrap();
    let code = code.unwrap();
    assert!(up.contains(&format!("pairing code {code}")), "{up}");
    let out = s.client.as_ref().unwrap().output();
    assert!(
        out.contains(&format!(
            "Compare this code with the gateway: {code} — waiting for approval"
        )),
        "{out}"
    );
}

#[test]
fn ctrl_c_restores_routes_rules_and_resolver_exactly() {
    let Some(_) = ready() else { return };
    let mut s = trusted_stack("sigint", 1);
    let before = s.laptop_net().unwrap();
    s.connect("udp", false).unwrap();
    let during = s.laptop_net().unwrap();
    assert_ne!(during.routes, before.routes, "the tunnel changed no route");
    assert_ne!(during.resolv_conf, before.resolv_conf);
    let mut c = s.client.take().unwrap();
    let st = c.stop(Signal::SIGINT).unwrap();
    assert!(st.success(), "{st}: {}", c.output());
    assert!(c.output().contains("tunnel down: routes and DNS restored"));
    let after = wait_restored(&s, &before);
    assert_eq!(after, before);
}

#[test]
fn sigterm_restores_routes_rules_and_resolver_exactly() {
    let Some(_) = ready() else { return };
    let mut s = trusted_stack("sigterm", 1);
    let before = s.laptop_net().unwrap();
    s.connect("tcp", false).unwrap();
    assert_ne!(s.laptop_net().unwrap(), before);
    let mut c = s.client.take().unwrap();
    let st = c.stop(Signal::SIGTERM).unwrap();
    assert!(st.success(), "{st}: {}", c.output());
    assert_eq!(wait_restored(&s, &before), before);
}

#[test]
fn kill_9_of_the_client_restores_routes_rules_and_resolver_exactly() {
    let Some(_) = ready() else { return };
    let mut s = trusted_stack("sigkill", 1);
    let before = s.laptop_net().unwrap();
    s.connect("udp", false).unwrap();
    assert_ne!(s.laptop_net().unwrap(), before);
    let mut c = s.client.take().unwrap();
    let helper = Stack::children_of(c.pid(), "vpnshare-helpe");
    c.stop(Signal::SIGKILL).unwrap();
    // The helper sees its channel end and restores everything, then exits (--once).
    let after = wait_restored(&s, &before);
    assert_eq!(after, before);
    for pid in helper {
        let end = Instant::now() + Duration::from_secs(10);
        while std::path::Path::new(&format!("/proc/{pid}/status")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .contains("State:\tZ")
            && Instant::now() < end
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The gateway's worker for this peer dies: the client notices the silence (dead-peer
/// detection, 30 s), handshakes again and gets the same lease back; the tunnel works
/// again without touching the TUN, routes or DNS.
#[test]
fn after_the_gateway_loses_the_session_the_client_reconnects_with_the_same_lease() {
    let Some(_) = ready() else { return };
    let mut s = trusted_stack("reconnect", 1);
    let (up, _) = s.connect("udp", false).unwrap();
    let during = s.laptop_net().unwrap();
    let workers = Stack::children_of(s.gateway.pid(), "vpnshare-worke");
    assert_eq!(workers.len(), 1);
    // While the session is gone the routes stay on the TUN: traffic waits or is
    // dropped, it never leaves outside the tunnel.
    let capture = Capture::start(&s.tb, s.tb.phone_lan_ip()).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(workers[0]).unwrap()),
        Signal::SIGKILL,
    )
    .unwrap();
    let c = s.client.as_mut().unwrap();
    c.wait_line("connection interrupted", Duration::from_secs(60))
        .unwrap();
    let echo = s.tb.udp_echo_addr();
    let dns = dns_server();
    let _ = s.in_laptop(move || {
        let _ = client::udp_echo(echo, b"during the outage", Duration::from_millis(300));
        let _ = client::dns_query(
            dns,
            "files.vpnshare.test",
            DnsType::A,
            Duration::from_millis(300),
        );
    });
    let c = s.client.as_mut().unwrap();
    let again = c.wait_line("reconnected: same lease", Duration::from_secs(60));
    let out = c.output();
    let again = again.unwrap_or_else(|e| panic!("{e}\n{out}"));
    let addr = up.split_whitespace().nth(2).unwrap().trim_end_matches(',');
    assert!(again.contains(addr), "{again} vs {up}");
    assert_eq!(s.laptop_net().unwrap(), during, "routes or DNS changed");
    let rep = capture.finish();
    assert_eq!(rep.other, 0, "leaks during the outage: {:?}", rep.leaks);
    let http = s.tb.http_addr();
    let r = s
        .in_laptop(move || client::http_get(http, "/file", T))
        .unwrap()
        .unwrap();
    assert_eq!(r.sha256, s.tb.file_sha256());
}

#[test]
fn a_denied_pairing_ends_the_client_in_one_line_and_leaves_nothing_behind() {
    let Some(_) = ready() else { return };
    let mut s = Stack::start(&demo::bin_dir().unwrap(), "deny", 1).unwrap();
    let before = s.laptop_net().unwrap();
    let code = connect_for_pairing(&mut s);
    let dir = s.gw_dir.to_string_lossy().into_owned();
    s.vpnshare(&["pairing", "--state-dir", &dir, "deny", &code])
        .unwrap();
    let err = one_error_line(&mut s);
    assert!(err.contains("did not approve this device"), "{err}");
    assert_eq!(wait_restored(&s, &before), before);
}

#[test]
fn without_the_vpn_on_the_gateway_the_client_says_so_in_one_line() {
    let Some(_) = ready() else { return };
    let mut s = trusted_stack("novpn", 1);
    s.tb.set_vpn_up(false).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while s.status().unwrap()["sharing_available"] != false {
        assert!(Instant::now() < end, "the gateway still sees a VPN");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = s.connect("udp", false).unwrap_err();
    let err = one_error_line(&mut s);
    assert!(err.contains("VPN is unavailable"), "{err}");
}

/// Revocation cuts the live session; the client's next handshake is refused as revoked
/// (after dead-peer detection, about 30 s) and it exits with everything restored.
#[test]
fn a_revoked_client_exits_in_one_line_with_everything_restored() {
    let Some(_) = ready() else { return };
    let mut s = trusted_stack("revoke", 1);
    let before = s.laptop_net().unwrap();
    s.connect("udp", false).unwrap();
    let key = s.laptop_key().unwrap();
    let dir = s.gw_dir.to_string_lossy().into_owned();
    s.vpnshare(&["peers", "--state-dir", &dir, "revoke", &key])
        .unwrap();
    let err = one_error_line(&mut s);
    assert!(err.contains("revoked this device"), "{err}");
    assert_eq!(wait_restored(&s, &before), before);
}

/// Not root: `vpnshare connect` as an ordinary user (65534) uses an installed helper's
/// socket (here started by hand, as systemd would) and never holds a privilege.
#[test]
fn an_unprivileged_connect_uses_the_installed_helper() {
    use std::os::unix::fs::PermissionsExt;
    let Some(bins) = ready() else { return };
    let mut s = Stack::start(&bins, "unpriv", 1).unwrap();
    let before = s.laptop_net().unwrap();
    let sock_dir = demo::temp_dir("unpriv-sock").unwrap();
    std::fs::set_permissions(&sock_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let user_dir = demo::temp_dir("unpriv-user").unwrap();
    std::os::unix::fs::chown(&user_dir, Some(65534), Some(65534)).unwrap();
    let socket = sock_dir.join("helper.sock");
    let mut hcmd = Command::new(bins.join("vpnshare-helper"));
    hcmd.arg("--socket")
        .arg(&socket)
        .args(["--uid", "65534", "--once", "--journal"])
        .arg(sock_dir.join("journal"))
        .arg("--resolv-conf")
        .arg(s.tb.resolv_conf(testbed::Node::Laptop));
    let mut helper = spawn_in_laptop(&s, &mut hcmd);
    let end = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < end, "helper: {}", helper.output());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The user's own identity, created as that user.
    let id = Command::new(bins.join("vpnshare"))
        .args(["id", "--state-dir"])
        .arg(&user_dir)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(id.status.success(), "{id:?}");
    let key = String::from_utf8_lossy(&id.stdout).trim().to_owned();
    let dir = s.gw_dir.to_string_lossy().into_owned();
    s.vpnshare(&["peers", "--state-dir", &dir, "add", &key])
        .unwrap();
    let mut cmd = Command::new(bins.join("vpnshare"));
    cmd.args(["connect", &s.invite, "--helper-socket"])
        .arg(&socket)
        .arg("--state-dir")
        .arg(&user_dir)
        .uid(65534)
        .gid(65534);
    s.client = Some(spawn_in_laptop(&s, &mut cmd));
    let c = s.client.as_mut().unwrap();
    let up = c.wait_line("tunnel up:", Duration::from_secs(30));
    let out = c.output();
    up.unwrap_or_else(|e| panic!("{e}\n{out}\nhelper: {}", helper.output()));
    let conf = Confinement::of(c.pid());
    assert!(conf.is_confined(), "{conf}");
    assert_eq!(conf.uid, "65534");
    let http = s.tb.http_addr();
    let r = s
        .in_laptop(move || client::http_get(http, "/bytes/1000000", T))
        .unwrap()
        .unwrap();
    assert_eq!(r.len, 1_000_000);
    assert_eq!(r.sha256, testbed::content_sha256(1_000_000));
    let st = s.client.as_mut().unwrap().stop(Signal::SIGINT).unwrap();
    assert!(st.success());
    assert_eq!(wait_restored(&s, &before), before);
    let end = Instant::now() + Duration::from_secs(10);
    while helper.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < end, "the helper did not exit after --once");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(&sock_dir);
    let _ = std::fs::remove_dir_all(&user_dir);
}

#[test]
fn an_unreachable_gateway_is_one_line() {
    let Some(_) = ready() else { return };
    let mut s = trusted_stack("unreach", 1);
    // Nothing listens on this port of the phone: ICMP port unreachable.
    s.invite = s.invite.replace(":7400/", ":7411/");
    let err = s.connect("udp", false).unwrap_err();
    let out = s.client.as_ref().unwrap().output();
    let last = out
        .lines()
        .filter(|l| l.starts_with("vpnshare: "))
        .collect::<Vec<_>>();
    assert_eq!(last.len(), 1, "{err}\n{out}");
    assert!(last[0].contains("gateway unreachable"), "{}", last[0]);
    // The helper restored what little it had (nothing) and the laptop is untouched.
    assert!(!s.laptop_net().unwrap().links.contains("vshare"));
}

#[test]
fn without_root_and_without_a_helper_connect_says_so_in_one_line() {
    let Some(bins) = ready() else { return };
    let dir = demo::temp_dir("nohelper").unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let out = Command::new(bins.join("vpnshare"))
        .args([
            "connect",
            "vshp://127.0.0.1:9/?key=0000000000000000000000000000000000000000000000000000000000000001",
            "--helper-socket",
            "/nonexistent/vpnshare-helper.sock",
            "--state-dir",
        ])
        .arg(&dir)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("vpnshare: cannot reach vpnshare-helper"),
        "{stderr}"
    );
}

/// As root without a helper binary: one line naming it and how to build it. Nothing
/// is sent anywhere (the helper is looked for before the transport opens).
#[test]
fn as_root_without_the_helper_binary_connect_says_so_in_one_line() {
    let Some(bins) = ready() else { return };
    let dir = demo::temp_dir("nohelperbin").unwrap();
    let out = Command::new(bins.join("vpnshare"))
        .args([
            "connect",
            "vshp://127.0.0.1:9/?key=0000000000000000000000000000000000000000000000000000000000000001",
            "--state-dir",
        ])
        .arg(&dir)
        .env("VPNSHARE_HELPER", "/nonexistent/vpnshare-helper")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("vpnshare: vpnshare-helper is missing (/nonexistent/vpnshare-helper)")
            && lines[0].contains("cargo build --release"),
        "{stderr}"
    );
}

use std::os::unix::process::CommandExt;
