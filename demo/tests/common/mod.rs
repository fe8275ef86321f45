//! Set-up shared by the demo crate's end-to-end tests.
#![allow(clippy::unwrap_used, dead_code)] // test code; not every test file uses every helper

use demo::{NetState, Stack};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// The directory of the workspace's binaries, or `None` (after printing SKIPPED) when
/// this machine cannot run the tests: not root, no /dev/net/tun, a binary missing.
pub fn ready() -> Option<PathBuf> {
    let bins = demo::bin_dir()?;
    let missing = demo::missing(&bins);
    if missing.is_empty() {
        Some(bins)
    } else {
        eprintln!("SKIPPED: needs {}", missing.join(", "));
        None
    }
}

/// A stack whose laptop key is already trusted (no pairing step).
pub fn trusted_stack(tag: &str, file_mb: usize) -> Stack {
    let bins = demo::bin_dir().unwrap();
    let s = Stack::start(&bins, tag, file_mb).unwrap();
    let key = s.laptop_key().unwrap();
    let dir = s.gw_dir.to_string_lossy().into_owned();
    s.vpnshare(&[
        "peers",
        "--state-dir",
        &dir,
        "add",
        &key,
        "--name",
        "laptop",
    ])
    .unwrap();
    s
}

/// Waits (up to 10 s) until the laptop's network state is `before` again; returns the
/// last state seen.
pub fn wait_restored(s: &Stack, before: &NetState) -> NetState {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let now = s.laptop_net().unwrap();
        if &now == before || Instant::now() > end {
            return now;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The client's single `vpnshare: ` line on stderr (it must exit by itself).
pub fn one_error_line(s: &mut Stack) -> String {
    let c = s.client.as_mut().unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    while c.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < end,
            "the client did not exit:\n{}",
            c.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(200));
    let out = c.output();
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("vpnshare: "))
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    lines[0].to_owned()
}

/// Spawns `cmd` in the testbed's laptop namespace.
pub fn spawn_in_laptop(s: &Stack, cmd: &mut Command) -> demo::Proc {
    demo::Proc::spawn(&s.tb, testbed::Node::Laptop, cmd).unwrap()
}

/// The six-digit pairing code in a line the client printed.
pub fn pairing_code(line: &str) -> String {
    line.split_whitespace()
        .find(|w| w.len() == 6 && w.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or_else(|| panic!("no pairing code in {line:?}"))
        .to_owned()
}

/// Starts `vpnshare connect` with the stack's invite in the laptop (an unknown device)
/// and returns the pairing code it shows.
pub fn connect_for_pairing(s: &mut Stack) -> String {
    let mut cmd = Command::new(s.bins.join("vpnshare"));
    cmd.args(["connect", &s.invite, "--state-dir"])
        .arg(&s.laptop_dir)
        .arg("--resolv-conf")
        .arg(s.tb.resolv_conf(testbed::Node::Laptop));
    s.client = Some(spawn_in_laptop(s, &mut cmd));
    let c = s.client.as_mut().unwrap();
    let line = c
        .wait_line("Compare this code", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", c.output()));
    pairing_code(&line)
}

/// The testbed's `/file`, downloaded in the laptop with a pause once `pause_at` bytes
/// arrived, during which `during` runs (what the download must survive); then the
/// download finishes. Returns whether the pause was reached and the download's result.
/// A panic in `during` is raised again once the download was let go.
pub fn download_with_pause(
    tb: &testbed::Testbed,
    pause_at: u64,
    timeout: Duration,
    during: impl FnOnce(),
) -> (
    bool,
    Result<Result<testbed::client::HttpResponse, testbed::client::ClientError>, testbed::Error>,
) {
    let http = tb.http_addr();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|sc| {
        let dl = sc.spawn(move || {
            tb.in_ns(testbed::Node::Laptop, move || {
                let mut paused = false;
                testbed::client::http_get_paced(http, "/file", timeout, &mut |n| {
                    if !paused && n >= pause_at {
                        paused = true;
                        let _ = started_tx.send(());
                        let _ = go_rx.recv_timeout(timeout);
                    }
                })
            })
        });
        let started = started_rx.recv_timeout(timeout).is_ok();
        let event = if started {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(during))
        } else {
            Ok(())
        };
        let _ = go_tx.send(());
        let result = dl.join().unwrap();
        if let Err(p) = event {
            std::panic::resume_unwind(p);
        }
        (started, result)
    })
}
