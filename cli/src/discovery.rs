//! mDNS discovery (issue #6): the gateway advertises `_vshp._udp.local.`, `vpnshare
//! connect --discover` finds it. See `docs/discovery.md`.
//!
//! TXT record: `v=1`, `fp=<first 16 hex digits of the key>`, `key=<64 hex digits>`.
//! The full key is what the client uses (it makes the handshake IK, as an invite does);
//! `fp` is the short form a user compares by eye and `--discover` accepts as a name.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};

/// The DNS-SD service type of a VSHP gateway.
pub const SERVICE_TYPE: &str = "_vshp._udp.local.";
/// File in the client's state dir: gateway instance name → pinned key.
pub const PINNED_FILE: &str = "gateways.json";

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("mDNS: {0}")]
    Mdns(String),
    #[error("no interface to advertise on (only loopback or VPN interfaces)")]
    NoInterface,
    #[error("no VSHP gateway answered on the LAN within {0} s")]
    NoneFound(u64),
    #[error("no gateway named {0:?} answered on the LAN (found: {1})")]
    NotFound(String, String),
    #[error(
        "gateway {name:?} now advertises key {new}…, but this device pinned {pinned}… after pairing with it: refusing (remove it from {file} if the gateway's key really changed)"
    )]
    KeyChanged {
        name: String,
        pinned: String,
        new: String,
        file: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn mdns_err(e: impl std::fmt::Display) -> DiscoveryError {
    DiscoveryError::Mdns(e.to_string())
}

/// The first 16 hex digits of a key.
pub fn fingerprint(key: &[u8; 32]) -> String {
    let mut s = hex::encode(key);
    s.truncate(16);
    s
}

/// The interfaces to advertise on and their addresses: not loopback, not a VPN (the
/// VPN's far side is not the LAN), not IPv6 link-local; with a specific listen address
/// only that address; with `0.0.0.0` only IPv4 addresses.
pub fn advertised_interfaces(
    addrs: &[broker::lan::IfAddr],
    vpn_ifaces: &[String],
    listen: IpAddr,
) -> BTreeMap<String, Vec<IpAddr>> {
    let holder = (!listen.is_unspecified())
        .then(|| {
            addrs
                .iter()
                .find(|a| a.addr == listen)
                .map(|a| a.iface.clone())
        })
        .flatten();
    let mut out: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for a in addrs {
        if a.loopback || vpn_ifaces.contains(&a.iface) {
            continue;
        }
        if let IpAddr::V6(v6) = a.addr {
            if v6.segments()[0] & 0xffc0 == 0xfe80 {
                continue;
            }
        }
        if let Some(h) = &holder {
            // A specific listen address: that one only (the gateway listens nowhere else).
            if &a.iface != h || a.addr != listen {
                continue;
            }
        }
        // An IPv4 wildcard listens on IPv4 only; an IPv6 one on both.
        if listen.is_ipv4() && a.addr.is_ipv6() {
            continue;
        }
        out.entry(a.iface.clone()).or_default().push(a.addr);
    }
    out
}

/// A running advertisement; dropping it withdraws it (goodbye packets) and stops the
/// mDNS thread.
pub struct Advertiser {
    daemon: ServiceDaemon,
    fullname: String,
}

impl std::fmt::Debug for Advertiser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Advertiser")
            .field("fullname", &self.fullname)
            .finish_non_exhaustive()
    }
}

impl Drop for Advertiser {
    fn drop(&mut self) {
        if let Ok(rx) = self.daemon.unregister(&self.fullname) {
            let _ = rx.recv_timeout(Duration::from_secs(1));
        }
        if let Ok(rx) = self.daemon.shutdown() {
            let _ = rx.recv_timeout(Duration::from_secs(1));
        }
    }
}

/// Advertises the gateway `instance` on `port` with `key`, on the interfaces of
/// [`advertised_interfaces`]. Starts mdns-sd's own thread.
pub fn advertise(
    instance: &str,
    listen: SocketAddr,
    key: &[u8; 32],
) -> Result<Advertiser, DiscoveryError> {
    let vpn: Vec<String> = broker::egress::read_snapshot()
        .map(|s| {
            s.links
                .iter()
                .filter(|l| broker::egress::is_vpn_link(l))
                .map(|l| l.name.clone())
                .collect()
        })
        .unwrap_or_default();
    let ifaces = advertised_interfaces(&broker::lan::read_ifaddrs(), &vpn, listen.ip());
    if ifaces.is_empty() {
        return Err(DiscoveryError::NoInterface);
    }
    let daemon = ServiceDaemon::new().map_err(mdns_err)?;
    daemon.disable_interface(IfKind::All).map_err(mdns_err)?;
    daemon
        .enable_interface(
            ifaces
                .keys()
                .map(|n| IfKind::Name(n.clone()))
                .collect::<Vec<_>>(),
        )
        .map_err(mdns_err)?;
    let ips: Vec<IpAddr> = ifaces.values().flatten().copied().collect();
    let host = format!("vshp-{}.local.", fingerprint(key));
    let props = [
        ("v", "1".to_owned()),
        ("fp", fingerprint(key)),
        ("key", hex::encode(key)),
    ];
    let info = ServiceInfo::new(
        SERVICE_TYPE,
        instance,
        &host,
        &ips[..],
        listen.port(),
        &props[..],
    )
    .map_err(mdns_err)?;
    let fullname = info.get_fullname().to_owned();
    daemon.register(info).map_err(mdns_err)?;
    tracing::info!(%fullname, interfaces = ?ifaces.keys().collect::<Vec<_>>(), "advertising over mDNS");
    Ok(Advertiser { daemon, fullname })
}

/// A gateway found on the LAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The instance name (the gateway's host name).
    pub name: String,
    pub addrs: Vec<IpAddr>,
    pub port: u16,
    pub key: [u8; 32],
}

impl Found {
    /// The invite of this gateway (its first IPv4 address, else its first address).
    pub fn invite(&self) -> Option<String> {
        let ip = self
            .addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| self.addrs.first())?;
        Some(broker::invite::Invite::new(SocketAddr::new(*ip, self.port), self.key).to_string())
    }

    pub fn matches(&self, wanted: &str) -> bool {
        self.name == wanted || (wanted.len() >= 4 && fingerprint(&self.key).starts_with(wanted))
    }
}

/// Checks a TXT record: `key` is 64 hex digits and `fp` its prefix.
pub fn parse_txt(key: Option<&str>, fp: Option<&str>) -> Option<[u8; 32]> {
    let key = broker::peers::parse_key(key?)?;
    (fingerprint(&key) == fp?.to_ascii_lowercase()).then_some(key)
}

/// The instance part of a full name `NAME._vshp._udp.local.`.
fn instance_of(fullname: &str) -> String {
    fullname
        .strip_suffix(SERVICE_TYPE)
        .and_then(|s| s.strip_suffix('.'))
        .unwrap_or(fullname)
        .replace("\\032", " ")
}

/// Browses for `wait`, or until a gateway matching `wanted` is resolved.
pub fn discover(wait: Duration, wanted: Option<&str>) -> Result<Vec<Found>, DiscoveryError> {
    let daemon = ServiceDaemon::new().map_err(mdns_err)?;
    let rx = daemon.browse(SERVICE_TYPE).map_err(mdns_err)?;
    let deadline = Instant::now() + wait;
    let mut found: Vec<Found> = Vec::new();
    while let Ok(ev) = rx.recv_deadline(deadline) {
        let ServiceEvent::ServiceResolved(s) = ev else {
            continue;
        };
        let Some(key) = parse_txt(s.get_property_val_str("key"), s.get_property_val_str("fp"))
        else {
            tracing::warn!(fullname = %s.fullname, "ignoring a _vshp._udp answer without a valid key/fp TXT record");
            continue;
        };
        let mut addrs: Vec<IpAddr> = s.addresses.iter().map(|a| a.to_ip_addr()).collect();
        addrs.sort();
        let f = Found {
            name: instance_of(&s.fullname),
            addrs,
            port: s.port,
            key,
        };
        found.retain(|g| g.name != f.name);
        let done = wanted.is_some_and(|w| f.matches(w));
        found.push(f);
        if done {
            break;
        }
    }
    if let Ok(rx) = daemon.shutdown() {
        let _ = rx.recv_timeout(Duration::from_secs(1));
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

/// Picks the gateway to connect to: the one named (or whose fingerprint starts with)
/// `wanted`, else the first.
pub fn choose(
    found: &[Found],
    wanted: Option<&str>,
    waited: Duration,
) -> Result<Found, DiscoveryError> {
    let names = || {
        found
            .iter()
            .map(|f| f.name.clone())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match wanted {
        Some(w) => found
            .iter()
            .find(|f| f.matches(w))
            .cloned()
            .ok_or_else(|| DiscoveryError::NotFound(w.to_owned(), names())),
        None => found
            .first()
            .cloned()
            .ok_or(DiscoveryError::NoneFound(waited.as_secs())),
    }
}

/// The pinned keys in `state_dir/gateways.json` (absent: none).
pub fn load_pins(state_dir: &Path) -> Result<BTreeMap<String, String>, DiscoveryError> {
    let path = state_dir.join(PINNED_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| DiscoveryError::Io {
            what: format!("{} is not valid", path.display()),
            source: std::io::Error::other(e),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(source) => Err(DiscoveryError::Io {
            what: format!("cannot read {}", path.display()),
            source,
        }),
    }
}

/// Refuses a gateway whose name is pinned to another key.
pub fn check_pin(state_dir: &Path, g: &Found) -> Result<(), DiscoveryError> {
    let pins = load_pins(state_dir)?;
    match pins.get(&g.name) {
        Some(k) if *k != hex::encode(g.key) => Err(DiscoveryError::KeyChanged {
            name: g.name.clone(),
            pinned: k.chars().take(16).collect(),
            new: fingerprint(&g.key),
            file: state_dir.join(PINNED_FILE).display().to_string(),
        }),
        _ => Ok(()),
    }
}

/// The candidate pin of the last `connect --discover`: the gateway's name and key,
/// then an admission line the confined session writes once the gateway admitted it.
pub const CANDIDATE_FILE: &str = "gateway-candidate";

/// Records `g` as the candidate pin and returns the marker the session writes when the
/// gateway admits it (docs/discovery.md, Pinning). `None` when `g` is already pinned.
pub fn write_candidate(
    state_dir: &Path,
    g: &Found,
) -> Result<Option<client::admission_marker::AdmissionMarker>, DiscoveryError> {
    if load_pins(state_dir)?.get(&g.name) == Some(&hex::encode(g.key)) {
        return Ok(None);
    }
    let path = state_dir.join(CANDIDATE_FILE);
    broker::fsutil::ensure_dir(state_dir)
        .and_then(|()| {
            client::admission_marker::AdmissionMarker::create(
                &path,
                &format!("{}\n{}\n", g.name, hex::encode(g.key)),
            )
        })
        .map(Some)
        .map_err(|source| DiscoveryError::Io {
            what: format!("cannot write {}", path.display()),
            source,
        })
}

/// What became of the last candidate pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Candidate {
    /// The gateway admitted this device: its key is now pinned under the name.
    Pinned(String),
    /// It never did (denied, expired, interrupted): nothing pinned.
    Dropped(String),
}

/// Promotes an admitted candidate to `gateways.json` and removes the candidate file.
pub fn settle_candidate(state_dir: &Path) -> Result<Option<Candidate>, DiscoveryError> {
    let path = state_dir.join(CANDIDATE_FILE);
    let (lines, admitted) = match client::admission_marker::read(&path) {
        Ok(x) => x,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(DiscoveryError::Io {
                what: format!("cannot read {}", path.display()),
                source,
            });
        }
    };
    let key = match lines.as_slice() {
        [name, key] => broker::peers::parse_key(key).map(|k| (name.clone(), k)),
        _ => None,
    };
    let outcome = match key {
        Some((name, key)) if admitted => {
            pin(state_dir, &name, &key)?;
            Some(Candidate::Pinned(name))
        }
        Some((name, _)) => Some(Candidate::Dropped(name)),
        None => None,
    };
    std::fs::remove_file(&path).map_err(|source| DiscoveryError::Io {
        what: format!("cannot remove {}", path.display()),
        source,
    })?;
    Ok(outcome)
}

/// Pins `key` under `name` (atomic write, 0600).
pub fn pin(state_dir: &Path, name: &str, key: &[u8; 32]) -> Result<(), DiscoveryError> {
    let mut pins = load_pins(state_dir)?;
    pins.insert(name.to_owned(), hex::encode(key));
    let path = state_dir.join(PINNED_FILE);
    let io = |source| DiscoveryError::Io {
        what: format!("cannot write {}", path.display()),
        source,
    };
    let mut bytes = serde_json::to_vec_pretty(&pins).map_err(|e| io(std::io::Error::other(e)))?;
    bytes.push(b'\n');
    broker::fsutil::ensure_dir(state_dir)
        .and_then(|()| broker::fsutil::atomic_write(&path, &bytes))
        .map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker::lan::IfAddr;

    fn a(iface: &str, addr: &str, loopback: bool) -> IfAddr {
        IfAddr {
            iface: iface.into(),
            addr: addr.parse().unwrap(),
            mask: "255.255.255.0".parse().unwrap(),
            loopback,
        }
    }

    #[test]
    fn advertises_on_the_lan_not_on_loopback_or_the_vpn() {
        let addrs = [
            a("lo", "127.0.0.1", true),
            a("lan0", "192.168.50.1", false),
            a("lan0", "fe80::1", false),
            a("lan0", "fd00:50::1", false),
            a("wlan0", "10.1.1.1", false),
            a("wg0", "10.66.0.2", false),
        ];
        let vpn = vec!["wg0".to_owned()];
        let all = advertised_interfaces(&addrs, &vpn, "::".parse().unwrap());
        assert_eq!(all.keys().collect::<Vec<_>>(), ["lan0", "wlan0"]);
        assert_eq!(
            all["lan0"],
            vec![
                "192.168.50.1".parse::<IpAddr>().unwrap(),
                "fd00:50::1".parse().unwrap()
            ]
        );
        let v4 = advertised_interfaces(&addrs, &vpn, "0.0.0.0".parse().unwrap());
        assert_eq!(v4["lan0"], vec!["192.168.50.1".parse::<IpAddr>().unwrap()]);
        let one = advertised_interfaces(&addrs, &vpn, "fd00:50::1".parse().unwrap());
        assert_eq!(one["lan0"], vec!["fd00:50::1".parse::<IpAddr>().unwrap()]);
        let one = advertised_interfaces(&addrs, &vpn, "10.1.1.1".parse().unwrap());
        assert_eq!(one.keys().collect::<Vec<_>>(), ["wlan0"]);
        assert!(advertised_interfaces(&addrs, &vpn, "127.0.0.1".parse().unwrap()).is_empty());
    }

    #[test]
    fn txt_record_key_must_match_its_fingerprint() {
        let key = [0xab; 32];
        let hex = hex::encode(key);
        assert_eq!(fingerprint(&key), "abababababababab");
        assert_eq!(parse_txt(Some(&hex), Some("abababababababab")), Some(key));
        assert_eq!(parse_txt(Some(&hex), Some("ABABABABABABABAB")), Some(key));
        assert_eq!(parse_txt(Some(&hex), Some("0000000000000000")), None);
        assert_eq!(parse_txt(Some("abab"), Some("abab")), None);
        assert_eq!(parse_txt(None, Some("abababababababab")), None);
        assert_eq!(parse_txt(Some(&hex), None), None);
    }

    #[test]
    fn choose_by_name_or_fingerprint_and_pins_refuse_a_changed_key() {
        let g = |name: &str, k: u8| Found {
            name: name.into(),
            addrs: vec![
                "192.168.50.1".parse().unwrap(),
                "fd00:50::1".parse().unwrap(),
            ],
            port: 7400,
            key: [k; 32],
        };
        let found = [g("desk", 1), g("phone", 2)];
        let w = Duration::from_secs(3);
        assert_eq!(choose(&found, None, w).unwrap().name, "desk");
        assert_eq!(choose(&found, Some("phone"), w).unwrap().key, [2; 32]);
        assert_eq!(choose(&found, Some("0202"), w).unwrap().name, "phone");
        assert!(matches!(
            choose(&found, Some("tv"), w),
            Err(DiscoveryError::NotFound(..))
        ));
        assert!(matches!(
            choose(&[], None, w),
            Err(DiscoveryError::NoneFound(3))
        ));
        assert_eq!(
            found[1].invite().unwrap(),
            format!("vshp://192.168.50.1:7400/?key={}", hex::encode([2u8; 32]))
        );
        assert_eq!(instance_of("phone._vshp._udp.local."), "phone");

        let dir = std::env::temp_dir().join(format!("vpnshare-pins-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        check_pin(&dir, &found[1]).unwrap();
        pin(&dir, &found[1].name, &found[1].key).unwrap();
        check_pin(&dir, &found[1]).unwrap();
        check_pin(&dir, &found[0]).unwrap();
        assert!(matches!(
            check_pin(&dir, &g("phone", 9)),
            Err(DiscoveryError::KeyChanged { .. })
        ));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(PINNED_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_candidate_is_pinned_only_once_admitted() {
        let dir = std::env::temp_dir().join(format!("vpnshare-cand-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let g = Found {
            name: "phone".into(),
            addrs: vec!["192.168.50.1".parse().unwrap()],
            port: 7400,
            key: [5; 32],
        };
        assert_eq!(settle_candidate(&dir).unwrap(), None);

        // Not admitted (denied, expired, interrupted): dropped, nothing pinned.
        let m = write_candidate(&dir, &g).unwrap().unwrap();
        drop(m);
        assert_eq!(
            settle_candidate(&dir).unwrap(),
            Some(Candidate::Dropped("phone".into()))
        );
        assert!(load_pins(&dir).unwrap().is_empty());
        assert!(!dir.join(CANDIDATE_FILE).exists());

        // Admitted: pinned at the next settle, and the file is gone.
        let m = write_candidate(&dir, &g).unwrap().unwrap();
        m.mark().unwrap();
        assert_eq!(
            settle_candidate(&dir).unwrap(),
            Some(Candidate::Pinned("phone".into()))
        );
        assert_eq!(load_pins(&dir).unwrap()["phone"], hex::encode([5u8; 32]));
        assert!(!dir.join(CANDIDATE_FILE).exists());
        // Already pinned: no candidate at all.
        assert!(write_candidate(&dir, &g).unwrap().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
