//! Issue #6's pairing proofs that the other files do not already carry: a request nobody
//! answers expires, and the device is told so in one line with everything restored.
//! (Approval from a second terminal, denial and revocation are in `tunnel.rs`.)
//!
//! Needs root, /dev/net/tun and the workspace's binaries; otherwise SKIPPED.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;
use common::{connect_for_pairing, one_error_line, ready, wait_restored};

use demo::Stack;

/// The gateway's `--pairing-timeout` in this test: short, so the test does not wait the
/// default minute, and long enough to see the request listed first.
const TIMEOUT_SECS: &str = "4";

#[test]
fn an_unanswered_pairing_request_expires_and_the_device_is_told_in_one_line() {
    let Some(bins) = ready() else { return };
    let mut s =
        Stack::start_with(&bins, "expire", 1, &["--pairing-timeout", TIMEOUT_SECS]).unwrap();
    let before = s.laptop_net().unwrap();
    let code = connect_for_pairing(&mut s);
    let dir = s.gw_dir.to_string_lossy().into_owned();
    // Waiting: the gateway lists it (nobody answers it).
    let listed = s
        .vpnshare(&["pairing", "--state-dir", &dir, "list"])
        .unwrap();
    assert!(listed.contains(&code), "{listed}");

    let err = one_error_line(&mut s);
    assert!(err.contains("did not approve this device"), "{err}");
    assert!(
        err.contains("nobody approved this device on the gateway in time"),
        "the expiry must be told apart from a denial: {err}"
    );
    assert_eq!(wait_restored(&s, &before), before);

    // Gone from the gateway's list, approving it now fails, and the audit log says why.
    let listed = s
        .vpnshare(&["pairing", "--state-dir", &dir, "list"])
        .unwrap();
    assert!(!listed.contains(&code), "{listed}");
    assert!(
        s.vpnshare(&["pairing", "--state-dir", &dir, "approve", &code])
            .is_err(),
        "an expired code must not be approvable"
    );
    let audit = std::fs::read_to_string(s.gw_dir.join("audit.log")).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("pairing_expired") && l.contains(&code)),
        "{audit}"
    );
    // Nothing was trusted.
    let peers = s.vpnshare(&["peers", "--state-dir", &dir, "list"]).unwrap();
    let key = s.laptop_key().unwrap();
    assert!(!peers.contains(&key), "{peers}");
}
