//! Issue #6's discovery proof: a real `vpnshare gateway` in the testbed's `phone`
//! advertises itself over mDNS on the LAN veth; the real `vpnshare connect --discover`
//! in `laptop` finds it, pairs with it by code and pins its key. The multicast stays on
//! the laptop–phone veth (a link-local group, TTL 255, never routed).
//!
//! Needs root, /dev/net/tun and the workspace's binaries; otherwise SKIPPED.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;
use common::ready;

use std::process::Command;
use std::time::Duration;

use demo::{Proc, Stack};
use nix::sys::signal::Signal;
use testbed::Node;

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_gateway_in_phone_is_discovered_from_laptop_and_pinned_only_after_pairing() {
    let Some(bins) = ready() else { return };
    // The stack's own gateway runs with --no-mdns; a second one advertises.
    let s = Stack::start(&bins, "mdns", 1).unwrap();
    for node in [Node::Laptop, Node::Phone] {
        let link = ip(&["-n", &s.tb.ns(node), "-o", "link", "show", "lan0"]);
        assert!(link.contains("MULTICAST"), "{link}");
    }
    let gw_dir = demo::temp_dir("mdns-gw2").unwrap();
    let listen = format!("{}:7401", s.tb.phone_lan_ip());
    let mut gw = Proc::spawn(
        &s.tb,
        Node::Phone,
        Command::new(bins.join("vpnshare"))
            .args([
                "gateway",
                "--listen",
                &listen,
                "--egress",
                "vpn",
                "--mdns-name",
                "test-phone",
                "--state-dir",
            ])
            .arg(&gw_dir)
            .env("RUST_LOG", "info"),
    )
    .unwrap();
    let invite = gw
        .wait_line("vshp://", Duration::from_secs(20))
        .unwrap()
        .trim()
        .to_owned();
    let key = invite.rsplit("key=").next().unwrap().to_owned();
    let fp = &key[..16];
    let adv = gw
        .wait_line("vpnshare: advertising", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", gw.output()));
    assert!(adv.contains("advertising \"test-phone\""), "{adv}");
    assert!(adv.contains(fp), "{adv}");

    // 1. List only.
    let laptop_dir = s.laptop_dir.clone();
    let mut list = Proc::spawn(
        &s.tb,
        Node::Laptop,
        Command::new(bins.join("vpnshare"))
            .args(["connect", "--discover", "test-phone", "--list-only"])
            .arg("--state-dir")
            .arg(&laptop_dir),
    )
    .unwrap();
    let line = list
        .wait_line("found gateway \"test-phone\"", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}\n--- gateway ---\n{}", list.output(), gw.output()));
    assert!(line.contains("192.168.50.1"), "{line}");
    assert!(line.contains("port 7401"), "{line}");
    assert!(line.contains(fp), "{line}");
    let st = list.child.wait().unwrap();
    assert!(st.success(), "{st}: {}", list.output());
    assert!(
        !laptop_dir.join("gateways.json").exists(),
        "--list-only pins nothing"
    );

    let dir = gw_dir.to_string_lossy().into_owned();
    let connect = || {
        let mut client = Proc::spawn(
            &s.tb,
            Node::Laptop,
            Command::new(bins.join("vpnshare"))
                .args(["connect", "--discover", "test-phone", "--name", "laptop"])
                .arg("--state-dir")
                .arg(&laptop_dir)
                .arg("--resolv-conf")
                .arg(s.tb.resolv_conf(Node::Laptop))
                .env("RUST_LOG", "info"),
        )
        .unwrap();
        let connecting = client
            .wait_line("connecting to", Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{e}\n{}", client.output()));
        assert!(connecting.contains(&invite), "{connecting} vs {invite}");
        let line = client
            .wait_line("Compare this code", Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{e}\n{}", client.output()));
        (client, common::pairing_code(&line))
    };
    let pairing = |verb: &str, code: &str| {
        let out = Command::new(bins.join("vpnshare"))
            .args(["pairing", "--state-dir", &dir, verb, code])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };

    // 2. Connect to it by name; the gateway's user denies it: nothing may be pinned
    //    (an impostor advertising the name must not win a pin by being refused).
    let (mut client, code) = connect();
    pairing("deny", &code);
    let st = client.child.wait().unwrap();
    assert!(!st.success(), "a denied connect fails: {}", client.output());
    drop(client);
    assert!(
        !laptop_dir.join("gateways.json").exists(),
        "a denied pairing pins nothing"
    );

    // 3. Again, approved this time: the tunnel comes up.
    let (mut client, code) = connect();
    assert!(
        client
            .output()
            .contains("did not admit this device last time: its key was not pinned"),
        "{}",
        client.output()
    );
    pairing("approve", &code);
    let up = client
        .wait_line("tunnel up:", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}\n--- gateway ---\n{}", client.output(), gw.output()));
    assert!(up.contains("192.168.50.1:7401"), "{up}");
    let st = client.stop(Signal::SIGTERM).unwrap();
    assert!(st.success(), "{st}: {}", client.output());

    // 4. The next --discover pins the key under the name it was found by.
    let out = Command::new("ip")
        .args(["netns", "exec", &s.tb.ns(Node::Laptop)])
        .arg(bins.join("vpnshare"))
        .args([
            "connect",
            "--discover",
            "test-phone",
            "--list-only",
            "--state-dir",
        ])
        .arg(&laptop_dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("pinned the key of gateway \"test-phone\""),
        "{text}"
    );
    let pins: serde_json::Value =
        serde_json::from_slice(&std::fs::read(laptop_dir.join("gateways.json")).unwrap()).unwrap();
    assert_eq!(pins["test-phone"], key.as_str());

    let _ = gw.stop(Signal::SIGTERM);
    drop(gw);
    let _ = std::fs::remove_dir_all(&gw_dir);
}
