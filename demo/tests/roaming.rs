//! Issue #6, roaming on UDP: "an authenticated packet from a new client address moves
//! the session there" — the gateway side, for the change the client cannot see: a NAT
//! between laptop and gateway rebinds the client's port mid-download. The session must
//! move without a new handshake (no RESUME, long before the 20 s dead-peer timer) and
//! the download completes with the right sha256 on its one TCP connection. Forged and
//! replayed records from another address must not move it. docs/resume.md, Roaming.
//!
//! The NAT is nftables in the laptop namespace: a stateless rewrite of the client
//! socket's source port (and back on the replies), switched on mid-transfer, which is
//! exactly what the gateway sees when a NAT forgets a mapping and makes a new one. Needs
//! root, /dev/net/tun, `nft` and the workspace's binaries; otherwise SKIPPED.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;
use common::{download_with_pause, ready, trusted_stack};

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use demo::{LISTEN_PORT, Proc, Stack};
use testbed::Node;

const T: Duration = Duration::from_secs(240);
const PAUSE_AT: u64 = 5 * 1024 * 1024;
/// The length of a DATA record that carries one PING (or PONG): header 16, message
/// 3 + 24, tag 16.
const PING_RECORD: usize = 16 + 3 + 24 + 16;
/// The port the "NAT" gives the client after rebinding.
const NEW_PORT: u16 = 40_123;

fn nft_available() -> bool {
    Command::new("nft")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `cmd` in the laptop namespace; panics with its output when it fails.
fn run_in_laptop(s: &Stack, cmd: &mut Command) -> String {
    let out =
        s.tb.run_in(
            Node::Laptop,
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped()),
        )
        .unwrap()
        .wait_with_output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?}: {text}");
    text
}

/// The local port of `vpnshare connect`'s UDP socket to the gateway (`ss`).
fn client_port(s: &Stack, gw: SocketAddr) -> u16 {
    let text = run_in_laptop(s, Command::new("ss").args(["-Hun"]));
    text.lines()
        .find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let peer = cols.last()?.parse::<SocketAddr>().ok()?;
            let local = cols.get(cols.len().checked_sub(2)?)?;
            (peer == gw)
                .then(|| local.rsplit(':').next()?.parse().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no UDP socket to {gw} in:\n{text}"))
}

/// One small VSHP DATA record (a PING) the client sent to the gateway, once the
/// gateway's answer of the same size (its PONG) came back: the worker has processed
/// it, so sending it again is a replay. Read off the laptop's lan0 with an `AF_PACKET`
/// socket.
fn capture_answered_record(s: &Stack, gw: SocketAddr) -> Vec<u8> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
    let fd =
        s.tb.in_ns(Node::Laptop, || {
            socket(
                AddressFamily::Packet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::EthAll,
            )
            .unwrap()
        })
        .unwrap();
    let timeout = nix::sys::time::TimeVal::new(0, 200_000);
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &timeout).unwrap();
    let IpAddr::V4(gw_ip) = gw.ip() else {
        panic!("IPv4 gateway expected")
    };
    let mut buf = vec![0u8; 65_536];
    let mut sent: Option<Vec<u8>> = None;
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        let Ok(n) = nix::sys::socket::recv(
            fd.as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::empty(),
        ) else {
            continue;
        };
        let f = &buf[..n];
        if f.len() < 14 + 20 + 8 + 32 || f[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &f[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let Some(udp) = ip.get(ihl..) else { continue };
        if ip[9] != 17 || udp.len() < 8 + 32 {
            continue;
        }
        let (sport, dport) = (
            u16::from_be_bytes([udp[0], udp[1]]),
            u16::from_be_bytes([udp[2], udp[3]]),
        );
        let payload = &udp[8..];
        let to_gw = ip[16..20] == gw_ip.octets() && dport == gw.port();
        let from_gw = ip[12..16] == gw_ip.octets() && sport == gw.port();
        // Version 1, kind DATA (4), the size of a record carrying one PING or PONG.
        if payload[0] != 1 || payload[1] != 4 || payload.len() != PING_RECORD {
            continue;
        }
        if to_gw {
            sent = Some(payload.to_vec());
        } else if let (true, Some(rec)) = (from_gw, &sent) {
            return rec.clone();
        }
    }
    panic!("no answered PING from the client seen on lan0");
}

/// Sends `rec` to the gateway from a fresh UDP socket (a new source port) in the laptop.
fn send_from_new_port(s: &Stack, gw: SocketAddr, rec: Vec<u8>) {
    s.tb.in_ns(Node::Laptop, move || {
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        u.send_to(&rec, gw).unwrap();
    })
    .unwrap();
}

/// Waits until the gateway's output has `n` lines containing `what`.
fn wait_count(p: &Proc, what: &str, n: usize) {
    let end = Instant::now() + Duration::from_secs(30);
    while p.output().lines().filter(|l| l.contains(what)).count() < n {
        assert!(
            Instant::now() < end,
            "fewer than {n} {what:?} in:\n{}",
            p.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn audit(s: &Stack) -> String {
    std::fs::read_to_string(s.gw_dir.join("audit.log")).unwrap_or_default()
}

#[test]
fn a_nat_rebinding_mid_download_moves_the_session_and_forged_records_do_not() {
    let Some(_) = ready() else { return };
    if !nft_available() {
        eprintln!("SKIPPED: needs nft (nftables)");
        return;
    }
    let mut s = trusted_stack("roam-nat", 50);
    s.connect("udp", false).unwrap();
    s.client
        .as_mut()
        .unwrap()
        .wait_line("resume ticket received", Duration::from_secs(20))
        .unwrap();
    let gw = SocketAddr::new(s.tb.phone_lan_ip(), LISTEN_PORT);
    let port = client_port(&s, gw);
    assert_ne!(port, NEW_PORT);

    let want_sha = s.tb.file_sha256();
    let want_len = s.tb.file_len();
    let (started, r) = download_with_pause(&s.tb, PAUSE_AT, T, || {
        // (1) Records from a new address that do not authenticate move nothing: a
        // replay of a record the gateway already received, and a forged copy.
        let genuine = capture_answered_record(&s, gw);
        send_from_new_port(&s, gw, genuine.clone());
        wait_count(&s.gateway, "roaming probe not authenticated", 1);
        let mut forged = genuine;
        let last = forged.len() - 1;
        forged[last] ^= 0x01;
        send_from_new_port(&s, gw, forged);
        wait_count(&s.gateway, "roaming probe not authenticated", 2);
        assert!(!audit(&s).contains("peer_roamed"), "{}", audit(&s));

        // (2) The NAT rebinds: from now on the client's datagrams come from
        // NEW_PORT, and replies to NEW_PORT are mapped back to the client's socket.
        let gw_ip = gw.ip();
        let rules = format!(
            "table ip vshp_rebind {{\n\
             chain out {{ type filter hook output priority raw; policy accept;\n\
               ip daddr {gw_ip} udp dport {LISTEN_PORT} udp sport {port} notrack udp sport set {NEW_PORT}\n\
             }}\n\
             chain in {{ type filter hook prerouting priority raw; policy accept;\n\
               ip saddr {gw_ip} udp sport {LISTEN_PORT} udp dport {NEW_PORT} notrack udp dport set {port}\n\
             }}\n\
             }}\n"
        );
        let file = s.laptop_dir.join("rebind.nft");
        std::fs::write(&file, rules).unwrap();
        run_in_laptop(&s, Command::new("nft").arg("-f").arg(&file));
        // The download resumes while the session moves.
    });
    let client_out = s.client.as_ref().map(Proc::output).unwrap_or_default();
    let gw_out = s.gateway.output();
    assert!(
        started,
        "the download never reached 5 MB\n{client_out}\n{gw_out}"
    );
    let r = r.unwrap().unwrap_or_else(|e| {
        panic!("download: {e}\n--- client ---\n{client_out}\n--- gateway ---\n{gw_out}")
    });
    assert_eq!(r.status, 200);
    assert_eq!(r.len, want_len);
    assert_eq!(r.sha256, want_sha, "sha256 of the body");

    // The session moved to the new port by the broker's roaming, not by a resume.
    let laptop_ip = s.tb.laptop_lan_ip();
    let roamed = audit(&s)
        .lines()
        .filter(|l| l.contains("\"peer_roamed\""))
        .map(str::to_owned)
        .collect::<Vec<_>>();
    assert_eq!(roamed.len(), 1, "{roamed:?}\n{gw_out}");
    assert!(
        roamed[0].contains(&format!("\"to\":\"{laptop_ip}:{NEW_PORT}\""))
            && roamed[0].contains(&format!("\"from\":\"{laptop_ip}:{port}\"")),
        "{roamed:?}"
    );
    assert_eq!(
        gw_out.matches("handshake established").count(),
        1,
        "one handshake only: no RESUME\n{gw_out}"
    );
    assert!(
        !client_out.contains("connection interrupted") && !client_out.contains("reconnected"),
        "the client never reconnected:\n{client_out}"
    );
    assert!(
        gw_out.contains("session moved to the new client address"),
        "{gw_out}"
    );
}
