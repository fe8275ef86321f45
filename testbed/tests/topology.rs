//! The testbed's own end-to-end tests. They need root; without it each test prints
//! why it is skipped and passes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::io::Read as _;
use std::net::{IpAddr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use testbed::client::{self, DnsType};
use testbed::{Node, Testbed};

const T: Duration = Duration::from_secs(10);

fn testbed(file_mb: usize) -> Option<Testbed> {
    if !testbed::can_run() {
        eprintln!("skipping: the testbed needs root and /dev/net/tun");
        return None;
    }
    let tb = Testbed::builder().http_file_mb(file_mb).build().unwrap();
    eprintln!("{}", tb.describe());
    Some(tb)
}

#[test]
fn phone_fetches_the_file_through_the_vpn() {
    let Some(tb) = testbed(8) else { return };
    let wg_before = tb.vpn_counters().unwrap();
    let wan_before = tb.wan_counters().unwrap();

    let addr = tb.http_addr();
    let r = tb
        .in_ns(Node::Phone, || client::http_get(addr, "/file", T))
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.len, tb.file_len());
    assert_eq!(r.sha256, tb.file_sha256());

    // The bytes came in through the WireGuard interface, and the physical uplink
    // carried them (encrypted, so a little more).
    let wg_after = tb.vpn_counters().unwrap();
    let wan_after = tb.wan_counters().unwrap();
    assert!(wg_after.rx_bytes - wg_before.rx_bytes >= tb.file_len());
    assert!(wg_after.tx_packets > wg_before.tx_packets);
    assert!(wan_after.rx_bytes - wan_before.rx_bytes > wg_after.rx_bytes - wg_before.rx_bytes);
    let wg = tb.wg_phone_stats().unwrap();
    assert!(
        wg.last_handshake_secs.is_some(),
        "no WireGuard handshake: {wg:?}"
    );
    assert!(wg.rx_bytes >= tb.file_len());

    // Over IPv6 too, and the generated stream endpoint.
    if tb.has_ipv6() {
        let addr6 = tb.addrs().http_v6();
        let r = tb
            .in_ns(Node::Phone, || client::http_get(addr6, "/bytes/100000", T))
            .unwrap()
            .unwrap();
        assert_eq!((r.status, r.len), (200, 100_000));
        assert_eq!(r.sha256, testbed::content_sha256(100_000));
    }
}

#[test]
fn phone_uploads_and_the_server_hashes_it() {
    let Some(tb) = testbed(1) else { return };
    let body = testbed::content_bytes(3 << 20);
    let addr = tb.http_addr();
    let r = tb
        .in_ns(Node::Phone, || client::http_upload(addr, &body, T))
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.text().trim(),
        testbed::hex(&testbed::content_sha256(3 << 20))
    );
    assert!(tb.vpn_counters().unwrap().tx_bytes >= 3 << 20);
}

#[test]
fn dns_answers_the_test_names_and_counts_queries() {
    let Some(tb) = testbed(1) else { return };
    let dns = tb.dns_addr();
    let before = tb.dns_queries();
    let a = tb
        .in_ns(Node::Phone, || {
            client::dns_query(dns, "files.vpnshare.test", DnsType::A, T)
        })
        .unwrap()
        .unwrap();
    assert_eq!(a.rcode, 0);
    assert_eq!(a.addrs, vec![IpAddr::from(tb.addrs().server_v4)]);
    let aaaa = tb
        .in_ns(Node::Phone, || {
            client::dns_query(dns, "files.vpnshare.test", DnsType::Aaaa, T)
        })
        .unwrap()
        .unwrap();
    assert_eq!(aaaa.addrs, vec![IpAddr::from(tb.addrs().server_v6)]);
    let nx = tb
        .in_ns(Node::Phone, || {
            client::dns_query(dns, "missing.vpnshare.test", DnsType::A, T)
        })
        .unwrap()
        .unwrap();
    assert_eq!(nx.rcode, 3);
    assert!(nx.addrs.is_empty());
    assert_eq!(tb.dns_queries() - before, 3);
    if tb.has_ipv6() {
        let dns6 = tb.addrs().dns_v6();
        let a = tb
            .in_ns(Node::Phone, || {
                client::dns_query(dns6, "dns.vpnshare.test", DnsType::A, T)
            })
            .unwrap()
            .unwrap();
        assert_eq!(a.addrs, vec![IpAddr::from(tb.addrs().dns_v4)]);
    }
}

#[test]
fn udp_echo_ping_and_closed_port_through_the_vpn() {
    let Some(tb) = testbed(1) else { return };
    let echo = tb.udp_echo_addr();
    let before = tb.udp_echoes();
    let payload: Vec<u8> = (0..1200u32).map(|i| (i % 251) as u8).collect();
    let back = tb
        .in_ns(Node::Phone, || client::udp_echo(echo, &payload, T))
        .unwrap()
        .unwrap();
    assert_eq!(back, payload);
    assert_eq!(tb.udp_echoes() - before, 1);

    // ICMP echo answered by the server's kernel, through the tunnel.
    let wg_before = tb.wg_phone_stats().unwrap();
    let server = IpAddr::from(tb.addrs().server_v4);
    tb.in_ns(Node::Phone, || client::icmp_echo(server, b"ping", T))
        .unwrap()
        .unwrap();
    if tb.has_ipv6() {
        let server6 = IpAddr::from(tb.addrs().server_v6);
        tb.in_ns(Node::Phone, || client::icmp_echo(server6, b"ping6", T))
            .unwrap()
            .unwrap();
    }
    assert!(tb.wg_phone_stats().unwrap().rx_bytes > wg_before.rx_bytes);

    // Nothing listens there: the server's kernel answers RST.
    let closed = tb.closed_tcp_addr();
    let err = tb
        .in_ns(Node::Phone, || client::tcp_connect(closed, T))
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err.io_kind(),
        Some(std::io::ErrorKind::ConnectionRefused),
        "{err}"
    );
}

#[test]
fn with_the_vpn_down_the_phone_cannot_reach_the_internet() {
    let Some(tb) = testbed(1) else { return };
    let (http, echo) = (tb.http_addr(), tb.udp_echo_addr());
    tb.set_vpn_up(false).unwrap();
    let routes = tb.routes(Node::Phone).unwrap();
    assert!(
        !routes.iter().any(|r| r.starts_with("default")),
        "{routes:?}"
    );
    let err = tb
        .in_ns(Node::Phone, || {
            client::http_get(http, "/health", Duration::from_secs(2))
        })
        .unwrap()
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(enetunreach()), "{err}");
    assert!(
        tb.in_ns(Node::Phone, || client::udp_echo(
            echo,
            b"x",
            Duration::from_millis(500)
        ))
        .unwrap()
        .is_err()
    );
    let server = IpAddr::from(tb.addrs().server_v4);
    let ping = tb
        .in_ns(Node::Phone, || {
            client::icmp_echo(server, b"x", Duration::from_millis(500))
        })
        .unwrap();
    assert!(ping.is_err());

    tb.set_vpn_up(true).unwrap();
    let r = tb
        .in_ns(Node::Phone, || client::http_get(http, "/health", T))
        .unwrap()
        .unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
}

fn enetunreach() -> i32 {
    nix::errno::Errno::ENETUNREACH as i32
}

#[test]
fn the_laptop_has_only_its_lan() {
    let Some(tb) = testbed(1) else { return };
    let routes = tb.routes(Node::Laptop).unwrap();
    assert!(!routes.is_empty());
    for r in &routes {
        assert!(!r.starts_with("default"), "laptop has a default route: {r}");
        assert!(
            r.contains(&format!("dev {}", testbed::LAN_IF)),
            "laptop route off the LAN: {r}"
        );
    }
    let mut ifs = tb.interfaces(Node::Laptop).unwrap();
    ifs.sort();
    assert_eq!(ifs, vec![testbed::LAN_IF.to_owned(), "lo".to_owned()]);

    // A packet for the internet dies at once on the laptop.
    let http = tb.http_addr();
    let err = tb
        .in_ns(Node::Laptop, || {
            client::http_get(http, "/health", Duration::from_secs(2))
        })
        .unwrap()
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(enetunreach()), "{err}");

    // The LAN works, and the veth counters see what crossed it.
    let before = tb.veth_counters().unwrap();
    let phone_lan = tb.phone_lan_ip();
    let listener = tb
        .in_ns(Node::Phone, || TcpListener::bind((phone_lan, 7000)))
        .unwrap()
        .unwrap();
    tb.in_ns(Node::Laptop, || {
        client::tcp_connect((phone_lan, 7000).into(), T)
    })
    .unwrap()
    .unwrap();
    drop(listener);
    let after = tb.veth_counters().unwrap();
    assert!(after.laptop.tx_packets > before.laptop.tx_packets);
    assert!(after.phone.rx_packets > before.phone.rx_packets);
    assert!(after.phone.tx_packets > before.phone.tx_packets);
}

fn lan_admin_up(tb: &Testbed) -> bool {
    let out = Command::new("ip")
        .args([
            "-n",
            &tb.ns(Node::Phone),
            "-o",
            "link",
            "show",
            testbed::LAN_IF,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let flags = text
        .split('<')
        .nth(1)
        .and_then(|f| f.split('>').next())
        .unwrap();
    flags.split(',').any(|f| f == "UP")
}

#[test]
fn link_down_for_cuts_the_lan_then_restores_it() {
    let Some(tb) = testbed(1) else { return };
    let phone_lan = tb.phone_lan_ip();
    let listener = tb
        .in_ns(Node::Phone, || TcpListener::bind((phone_lan, 7001)))
        .unwrap()
        .unwrap();
    let connect = |t| {
        tb.in_ns(Node::Laptop, || {
            client::tcp_connect((phone_lan, 7001).into(), t)
        })
        .unwrap()
    };

    tb.set_lan_up(false).unwrap();
    assert!(!lan_admin_up(&tb));
    assert!(connect(Duration::from_millis(500)).is_err());
    tb.set_lan_up(true).unwrap();
    connect(T).unwrap();

    let flap = tb.link_down_for(Duration::from_secs(2)).unwrap();
    assert!(!lan_admin_up(&tb));
    flap.wait().unwrap();
    assert!(lan_admin_up(&tb));
    connect(T).unwrap();
    drop(listener);
}

#[test]
fn run_in_spawns_inside_the_namespace() {
    let Some(tb) = testbed(1) else { return };
    let mut child = tb
        .run_in(
            Node::Phone,
            Command::new("ls")
                .arg("/sys/class/net")
                .stdout(Stdio::piped()),
        )
        .unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(child.wait().unwrap().success());
    let mut names: Vec<&str> = out.split_whitespace().collect();
    names.sort();
    assert_eq!(names, vec!["lan0", "lo", "wan0", "wg0"]);

    // As an unprivileged user too (the gateway needs no root), and the VPN
    // interface is a TUN device in sysfs.
    let out = tb
        .run_in(
            Node::Phone,
            Command::new("cat")
                .arg("/sys/class/net/wg0/tun_flags")
                .uid(65534)
                .gid(65534)
                .stdout(Stdio::piped()),
        )
        .unwrap()
        .wait_with_output()
        .unwrap();
    assert!(out.status.success());
    let flags = u32::from_str_radix(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .trim_start_matches("0x"),
        16,
    )
    .unwrap();
    assert_eq!(flags & 0x0001, 0x0001, "IFF_TUN not set: {flags:#x}");

    // /etc/resolv.conf names the testbed DNS; a child overwriting it leaves the
    // host's file alone.
    let host_resolv = std::fs::read("/etc/resolv.conf").ok();
    let out = tb
        .run_in(
            Node::Laptop,
            Command::new("sh")
                .arg("-c")
                .arg("cat /etc/resolv.conf; echo nameserver 192.0.2.1 > /etc/resolv.conf")
                .stdout(Stdio::piped()),
        )
        .unwrap()
        .wait_with_output()
        .unwrap();
    assert!(out.status.success());
    let seen = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        seen.contains(&format!("nameserver {}", tb.addrs().dns_v4)),
        "{seen}"
    );
    assert_eq!(std::fs::read("/etc/resolv.conf").ok(), host_resolv);
    let written = std::fs::read_to_string(tb.resolv_conf(Node::Laptop)).unwrap();
    assert_eq!(written, "nameserver 192.0.2.1\n");
    let state = tb.resolv_conf(Node::Laptop).parent().unwrap().to_owned();

    // The drop kills what still runs inside.
    let sleeper = tb
        .run_in(Node::Laptop, Command::new("sleep").arg("600"))
        .unwrap();
    let pid = sleeper.id();
    drop(tb);
    let mut sleeper = sleeper;
    let status = sleeper.wait().unwrap();
    assert!(!status.success(), "sleep {pid} was not killed");
    assert!(!state.exists(), "{} left behind", state.display());
}

#[test]
fn drop_removes_every_namespace_even_on_panic() {
    if !testbed::can_run() {
        eprintln!("skipping: the testbed needs root and /dev/net/tun");
        return;
    }
    let tb = Testbed::builder().build().unwrap();
    let id = tb.id().to_owned();
    assert_eq!(
        testbed::list_namespaces()
            .iter()
            .filter(|n| n.starts_with(&format!("{id}-")))
            .count(),
        4
    );
    drop(tb);
    assert!(
        !testbed::list_namespaces()
            .iter()
            .any(|n| n.starts_with(&format!("{id}-")))
    );

    let ids = std::sync::Mutex::new(String::new());
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let tb = Testbed::builder().build().unwrap();
        *ids.lock().unwrap() = tb.id().to_owned();
        panic!("a failing test");
    }));
    assert!(r.is_err());
    let id = ids.lock().unwrap().clone();
    assert!(!id.is_empty());
    assert!(
        !testbed::list_namespaces()
            .iter()
            .any(|n| n.starts_with(&format!("{id}-")))
    );
}

#[test]
fn cleanup_removes_namespaces_of_dead_testbeds() {
    if !testbed::can_run() {
        eprintln!("skipping: the testbed needs root and /dev/net/tun");
        return;
    }
    // pid 0 never names a live process: this namespace looks left over by a dead run.
    let name = format!("{}0-{}-phone", testbed::NS_PREFIX, std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let removed = testbed::cleanup_stale();
    assert!(
        removed.contains(&name) || !testbed::list_namespaces().contains(&name),
        "{removed:?}"
    );
    assert!(!testbed::list_namespaces().contains(&name));
}

#[test]
fn no_namespace_has_a_link_or_route_out_of_the_testbed() {
    let Some(tb) = testbed(1) else { return };
    let expect: [(Node, &[&str]); 4] = [
        (Node::Laptop, &["lan0", "lo"]),
        (Node::Phone, &["lan0", "lo", "wan0", "wg0"]),
        (Node::Vpn, &["inet0", "lo", "wan0", "wg0"]),
        (Node::Internet, &["inet0", "lo"]),
    ];
    for (node, names) in expect {
        let mut ifs = tb.interfaces(node).unwrap();
        ifs.sort();
        assert_eq!(ifs, names, "{node:?}");
        let routes = tb.routes(node).unwrap();
        let defaults: Vec<&String> = routes.iter().filter(|r| r.starts_with("default")).collect();
        if node == Node::Phone {
            // Only through the VPN interface.
            assert!(!defaults.is_empty());
            assert!(
                defaults.iter().all(|r| r.contains("dev wg0")),
                "{defaults:?}"
            );
        } else {
            assert!(defaults.is_empty(), "{node:?}: {defaults:?}");
        }
    }
}

#[test]
fn testbed_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Testbed>();
}

#[test]
fn a_leak_from_the_laptop_dies_in_the_topology_and_is_counted() {
    let Some(tb) = testbed(1) else { return };
    let echo = tb.udp_echo_addr();
    // No route at all: the laptop's kernel refuses, and counts it.
    let before = tb.ip_stats(Node::Laptop).unwrap();
    let err = tb
        .in_ns(Node::Laptop, || {
            client::udp_echo(echo, b"leak", Duration::from_millis(300))
        })
        .unwrap()
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(enetunreach()), "{err}");
    assert!(tb.ip_stats(Node::Laptop).unwrap().out_no_routes > before.out_no_routes);

    // A laptop that (wrongly) routes through the phone: the phone does not forward, the
    // packet dies there, is counted, and never reaches the internet.
    let ok = Command::new("ip")
        .args(["-n", &tb.ns(Node::Laptop), "route", "add", "default", "via"])
        .arg(tb.phone_lan_ip().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let phone_before = tb.ip_stats(Node::Phone).unwrap();
    let echoes_before = tb.udp_echoes();
    let wg_before = tb.vpn_counters().unwrap();
    let r = tb
        .in_ns(Node::Laptop, || {
            client::udp_echo(echo, b"leak", Duration::from_millis(500))
        })
        .unwrap();
    assert!(r.is_err());
    let phone_after = tb.ip_stats(Node::Phone).unwrap();
    assert!(phone_after.in_addr_errors > phone_before.in_addr_errors);
    assert_eq!(phone_after.forw_datagrams, phone_before.forw_datagrams);
    assert_eq!(tb.udp_echoes(), echoes_before);
    assert_eq!(tb.vpn_counters().unwrap().tx_packets, wg_before.tx_packets);
}

#[test]
fn kernel_routing_baseline_carries_the_laptop_through_the_vpn() {
    let Some(tb) = testbed(4) else { return };
    let http = tb.http_addr();
    tb.set_kernel_routing(true).unwrap();
    let wg_before = tb.vpn_counters().unwrap();
    let fwd_before = tb.ip_stats(Node::Phone).unwrap().forw_datagrams;
    let r = tb
        .in_ns(Node::Laptop, || client::http_get(http, "/file", T))
        .unwrap()
        .unwrap();
    assert_eq!((r.status, r.sha256), (200, tb.file_sha256()));
    assert!(tb.vpn_counters().unwrap().rx_bytes - wg_before.rx_bytes >= tb.file_len());
    assert!(tb.ip_stats(Node::Phone).unwrap().forw_datagrams > fwd_before);
    if tb.has_ipv6() {
        let echo6 = tb.addrs().udp_echo_v6();
        let back = tb
            .in_ns(Node::Laptop, || client::udp_echo(echo6, b"v6", T))
            .unwrap()
            .unwrap();
        assert_eq!(back, b"v6");
    }

    tb.set_kernel_routing(false).unwrap();
    let err = tb
        .in_ns(Node::Laptop, || client::http_get(http, "/health", T))
        .unwrap()
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(enetunreach()), "{err}");
    assert!(
        !tb.routes(Node::Laptop)
            .unwrap()
            .iter()
            .any(|r| r.starts_with("default"))
    );
}
