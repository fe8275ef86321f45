//! Issue #6, the rest of "keeping sessions alive", with the real binaries in the
//! testbed: a resume ticket the gateway refuses (typed ERROR BadTicket, the client comes
//! up again without it) and a lease whose configuration changes while the peer is
//! connected or away (CONFIG_DELTA, and a resume's CONFIG, applied to the laptop's TUN
//! in place). docs/resume.md.
//!
//! Needs root, /dev/net/tun and the workspace's binaries; otherwise each test says
//! SKIPPED and passes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;
use common::{ready, trusted_stack, wait_restored};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use demo::{Proc, Stack};
use nix::sys::signal::Signal;
use testbed::{Node, client};

const T: Duration = Duration::from_secs(60);

/// Runs `ip ARGS` in `node`; panics with its output when it fails.
fn ip(s: &Stack, node: Node, args: &[&str]) -> String {
    let out = Command::new("ip")
        .arg("-n")
        .arg(s.tb.ns(node))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ip {args:?}: {text}");
    text
}

/// The MTU of `ifname` in the laptop.
fn laptop_mtu(s: &Stack, ifname: &str) -> u32 {
    let text = ip(s, Node::Laptop, &["-o", "link", "show", "dev", ifname]);
    let mut words = text.split_whitespace();
    words
        .by_ref()
        .find(|w| *w == "mtu")
        .and_then(|_| words.next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no mtu in {text}"))
}

/// Waits until the laptop's TUN has `mtu` (the helper applied it); panics after `T`.
fn wait_mtu(s: &Stack, ifname: &str, mtu: u32) {
    let end = Instant::now() + T;
    while laptop_mtu(s, ifname) != mtu {
        assert!(
            Instant::now() < end,
            "the TUN's MTU stays {} (want {mtu})\n--- client ---\n{}",
            laptop_mtu(s, ifname),
            s.client.as_ref().map(Proc::output).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A small download through the tunnel: the path works.
fn fetch(s: &Stack) {
    let http = s.tb.http_addr();
    let r = s
        .in_laptop(move || client::http_get(http, "/file", T))
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.sha256, s.tb.file_sha256());
}

/// The TUN's name from the client's "tunnel up: ... on NAME, ..." line.
fn tun_name(up: &str) -> String {
    up.split(" on ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or_else(|| panic!("no interface in {up:?}"))
        .trim()
        .to_owned()
}

#[test]
fn a_ticket_from_before_a_gateway_restart_gets_bad_ticket_and_the_client_comes_up_again() {
    let Some(_) = ready() else { return };
    let mut s = trusted_stack("badticket", 1);
    let before = s.laptop_net().unwrap();
    s.connect("udp", false).unwrap();
    s.client
        .as_mut()
        .unwrap()
        .wait_line("resume ticket received", T)
        .unwrap();
    s.client.as_mut().unwrap().stop(Signal::SIGTERM).unwrap();
    assert_eq!(wait_restored(&s, &before), before);

    // A new gateway run on the same state dir: the same trusted peers, a fresh
    // resume-ticket key, so the laptop's saved ticket cannot open.
    s.restart_gateway().unwrap();

    // The restarted client presents the old ticket, is told BadTicket, drops it and
    // connects again without RESUME: the tunnel comes up and carries traffic.
    s.connect("udp", false).unwrap();
    let out = s.client.as_ref().unwrap().output();
    assert!(out.contains("a resume ticket from the last run"), "{out}");
    assert!(
        out.contains("the gateway refused the resume ticket")
            && out.contains("connections of the previous session are lost"),
        "{out}"
    );
    let gw = s.gateway.output();
    assert!(gw.contains("resume ticket refused: BadTicket"), "{gw}");
    assert!(gw.contains("resumed=false"), "{gw}");
    let audit = std::fs::read_to_string(s.gw_dir.join("audit.log")).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"peer_refused\"") && l.contains("\"bad_ticket\"")),
        "{audit}"
    );
    fetch(&s);
    // The new session's ticket replaced the refused one in the state dir.
    s.client
        .as_mut()
        .unwrap()
        .wait_line("resume ticket received", T)
        .unwrap();
    s.client.as_mut().unwrap().stop(Signal::SIGTERM).unwrap();
    assert_eq!(wait_restored(&s, &before), before);
}

#[test]
fn the_lease_mtu_follows_the_vpns_live_and_across_a_resume() {
    let Some(_) = ready() else { return };
    let mut s = trusted_stack("delta", 1);
    let before = s.laptop_net().unwrap();
    let (up, _) = s.connect("udp", false).unwrap();
    let tun = tun_name(&up);
    assert!(up.contains("MTU 1400"), "{up}");
    assert_eq!(laptop_mtu(&s, &tun), 1400);
    let routes_up = ip(&s, Node::Laptop, &["route"]);

    // The phone's VPN interface shrinks below the lease MTU: the live peer gets a
    // CONFIG_DELTA and its helper sets the TUN's MTU; routes stay as they were.
    ip(
        &s,
        Node::Phone,
        &["link", "set", "dev", "wg0", "mtu", "1300"],
    );
    wait_mtu(&s, &tun, 1300);
    let c = s.client.as_mut().unwrap();
    c.wait_line("lease updated: MTU 1300", T).unwrap();
    assert_eq!(ip(&s, Node::Laptop, &["route"]), routes_up);
    fetch(&s);
    // And grows again: the lease goes back to its own MTU (never above it).
    ip(
        &s,
        Node::Phone,
        &["link", "set", "dev", "wg0", "mtu", "1420"],
    );
    wait_mtu(&s, &tun, 1400);

    // While the session is away (its worker killed, the client not yet aware), the
    // VPN's MTU changes: the resume's CONFIG carries it and the TUN follows in place.
    let workers = Stack::children_of(s.gateway.pid(), "vpnshare-worke");
    assert_eq!(workers.len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(workers[0]).unwrap()),
        Signal::SIGKILL,
    )
    .unwrap();
    ip(
        &s,
        Node::Phone,
        &["link", "set", "dev", "wg0", "mtu", "1350"],
    );
    let c = s.client.as_mut().unwrap();
    c.wait_line("its configuration changed", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n{}", c.output()));
    wait_mtu(&s, &tun, 1350);
    assert!(s.gateway.output().contains("resumed=true"));
    fetch(&s);
    let gw = s.gateway.output();
    assert!(gw.contains("lease changed: CONFIG_DELTA"), "{gw}");

    s.client.as_mut().unwrap().stop(Signal::SIGTERM).unwrap();
    assert_eq!(wait_restored(&s, &before), before);
}
