//! VPN Share gateway broker: identity, peers, pairing, leases, policy, supervision.
//!
//! The state and policy are plain structs with unit tests ([`peers::PeerDb`],
//! [`leases::LeasePool`], [`pairing::PairingRequests`], [`egress::detect_vpn`],
//! [`invite::Invite`], [`ratelimit`]); [`gateway`] is the I/O driver that owns the
//! sockets and the child processes; [`control`] is the CLI's side of the control
//! socket and the offline (no gateway running) peer commands. See `docs/broker.md`.

pub mod audit;
pub mod control;
pub mod egress;
pub mod fsutil;
pub mod gateway;
pub mod grace;
pub mod identity;
pub mod invite;
pub mod lan;
pub mod lease_config;
pub mod leases;
pub mod oracle;
pub mod pairing;
pub mod peers;
pub mod policy;
pub mod ratelimit;
pub mod roaming;

use std::path::PathBuf;

/// File name of the control socket inside the state dir.
pub const CONTROL_SOCKET: &str = "control.sock";
/// Lock file held by the running gateway.
pub const LOCK_FILE: &str = "gateway.lock";
/// Environment variable that overrides where the worker binary is.
pub const WORKER_ENV: &str = "VPNSHARE_WORKER";
/// Environment variable that overrides where the netstack binary is.
pub const NETSTACK_ENV: &str = "VPNSHARE_NETSTACK";
/// Name of the worker binary, next to the current executable.
pub const WORKER_BIN: &str = "vpnshare-worker";
/// Name of the netstack binary, next to the current executable.
pub const NETSTACK_BIN: &str = "vpnshare-netstack";

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The default state dir: `$XDG_STATE_HOME/vpnshare`, else `~/.local/state/vpnshare`.
pub fn default_state_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("vpnshare"));
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(PathBuf::from(home).join(".local/state/vpnshare"))
}

/// `DIR` from `--state-dir`, or the default.
pub fn resolve_state_dir(arg: Option<PathBuf>) -> Result<PathBuf, String> {
    arg.or_else(default_state_dir)
        .ok_or_else(|| "no --state-dir given and neither XDG_STATE_HOME nor HOME is set".into())
}

/// A binary next to the current executable, or the path in `env_var`.
pub fn sibling_binary(env_var: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env_var).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    // Test binaries live in target/<profile>/deps; the binaries one level up.
    [dir.join(name), dir.parent()?.join(name)]
        .into_iter()
        .find(|p| p.is_file())
        .or_else(|| Some(dir.join(name)))
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    pub fn temp_dir(tag: &str) -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "broker-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
