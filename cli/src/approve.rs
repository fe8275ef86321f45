//! Interactive pairing approval in the `vpnshare gateway` terminal (issue #6).
//!
//! When stdin is a terminal, a thread asks the running broker for its pairing requests
//! through the control socket once a second, the same way `vpnshare pairing list` does,
//! and asks the user about each new one: `Approve laptop (Linux), code 123456? [y/N]`.
//! The answer goes back as `PairingApprove` / `PairingDeny`. The broker's loop never
//! waits for the terminal: it only serves control requests, one connection each.

use std::collections::HashSet;
use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use broker::control;
use ipc_schema::bounded::BoundedString;
use ipc_schema::messages::control::{ControlReply, ControlRequest, PairingInfo};

/// The question for one request.
pub fn prompt(p: &PairingInfo) -> String {
    let name = p
        .device_name
        .as_ref()
        .map_or("an unnamed device", |n| n.as_str());
    let platform = p
        .platform
        .as_ref()
        .map_or(String::new(), |pl| format!(" ({})", pl.as_str()));
    format!("Approve {name}{platform}, code {}? [y/N] ", p.code.as_str())
}

/// `y` or `yes` (any case) approves; anything else, an empty line included, denies.
pub fn is_yes(line: &str) -> bool {
    matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

/// The requests of `list` not asked about yet; remembers them in `asked`.
pub fn new_requests(asked: &mut HashSet<String>, list: &[PairingInfo]) -> Vec<PairingInfo> {
    // Forget codes that are gone, so the set stays as small as the pending list.
    asked.retain(|c| list.iter().any(|p| p.code.as_str() == c));
    list.iter()
        .filter(|p| asked.insert(p.code.as_str().to_owned()))
        .cloned()
        .collect()
}

/// Starts the prompt thread (call only when stdin is a terminal).
pub fn spawn(state_dir: PathBuf) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("pairing-prompt".into())
        .spawn(move || run(&state_dir))
        .map(|_| ())
}

fn run(state_dir: &std::path::Path) {
    let mut asked = HashSet::new();
    let stdin = std::io::stdin();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let list = match control::request(state_dir, &ControlRequest::PairingList) {
            Ok(Some(ControlReply::Pairings(l))) => l,
            Ok(None) => return, // the gateway is gone
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "pairing prompt: control request failed");
                continue;
            }
        };
        for p in new_requests(&mut asked, list.as_slice()) {
            eprint!("{}", prompt(&p));
            let mut line = String::new();
            if stdin.lock().read_line(&mut line).unwrap_or(0) == 0 {
                eprintln!();
                return; // stdin closed: leave the requests to `vpnshare pairing`
            }
            let yes = is_yes(&line);
            let code: BoundedString<{ ipc_schema::limits::MAX_CODE_LEN }> = p.code.clone();
            let req = if yes {
                ControlRequest::PairingApprove { code }
            } else {
                ControlRequest::PairingDeny { code }
            };
            match control::request(state_dir, &req) {
                Ok(Some(ControlReply::Ok)) => eprintln!(
                    "vpnshare: {} {}",
                    if yes { "approved" } else { "denied" },
                    p.code.as_str()
                ),
                Ok(Some(ControlReply::Error { detail, .. })) => {
                    eprintln!("vpnshare: {}: {detail}", p.code.as_str());
                }
                Ok(_) => {}
                Err(e) => eprintln!("vpnshare: {}: {e}", p.code.as_str()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc_schema::messages::common::PeerKey;

    fn info(code: &str, name: Option<&str>, platform: Option<&str>) -> PairingInfo {
        PairingInfo {
            code: BoundedString::new(code).unwrap(),
            key: PeerKey([1; 32]),
            requested_at_unix: 0,
            device_name: name.map(|n| BoundedString::new(n).unwrap()),
            platform: platform.map(|p| BoundedString::new(p).unwrap()),
        }
    }

    #[test]
    fn prompt_names_the_device_platform_and_code() {
        assert_eq!(
            prompt(&info("123456", Some("laptop"), Some("Linux"))),
            "Approve laptop (Linux), code 123456? [y/N] "
        );
        assert_eq!(
            prompt(&info("000042", None, None)),
            "Approve an unnamed device, code 000042? [y/N] "
        );
    }

    #[test]
    fn only_yes_approves() {
        for y in ["y\n", "Y", " yes ", "YES\n"] {
            assert!(is_yes(y), "{y:?}");
        }
        for n in ["", "\n", "n", "no", "yess", "approve"] {
            assert!(!is_yes(n), "{n:?}");
        }
    }

    #[test]
    fn each_request_is_asked_once() {
        let mut asked = HashSet::new();
        let a = info("111111", Some("a"), None);
        let b = info("222222", Some("b"), None);
        assert_eq!(new_requests(&mut asked, std::slice::from_ref(&a)).len(), 1);
        assert!(new_requests(&mut asked, std::slice::from_ref(&a)).is_empty());
        let next = new_requests(&mut asked, &[a.clone(), b.clone()]);
        assert_eq!(next, vec![b.clone()]);
        // A code that went away (approved, denied, expired) is forgotten.
        assert!(new_requests(&mut asked, std::slice::from_ref(&b)).is_empty());
        assert_eq!(asked.len(), 1);
        assert_eq!(new_requests(&mut asked, &[a.clone(), b]), vec![a]);
    }
}
