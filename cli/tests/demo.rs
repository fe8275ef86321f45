//! `vpnshare demo` is the README's first command: it must run and succeed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::process::Command;

#[test]
fn demo_runs_and_both_sides_show_the_same_code() {
    let out = Command::new(env!("CARGO_BIN_EXE_vpnshare"))
        .arg("demo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.contains("pairing code on the laptop"))
        .unwrap();
    let codes: Vec<&str> = line
        .split_whitespace()
        .filter(|w| w.len() == 6 && w.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    assert_eq!(codes.len(), 2, "{line}");
    assert_eq!(codes[0], codes[1]);
    assert!(stdout.contains("already redeemed"), "{stdout}");
}

#[test]
fn failures_are_one_line_on_stderr() {
    let out = Command::new(env!("CARGO_BIN_EXE_vpnshare"))
        .args(["id", "--state-dir", "/proc/vpnshare-cannot-exist"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("vpnshare: "), "{stderr}");
}
