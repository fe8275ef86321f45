//! Set-up shared by the demo crate's end-to-end tests.
#![allow(clippy::unwrap_used, dead_code)] // test code; not every test file uses every helper

use demo::Stack;
use std::path::PathBuf;

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
