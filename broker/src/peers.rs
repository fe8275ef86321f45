//! `PeerDb`: the trusted devices (`peers.json` in the state dir), sans-IO but for
//! [`PeerDb::load`] and [`PeerDb::save`].

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil;

/// File name of the peer database inside the state dir.
pub const PEERS_FILE: &str = "peers.json";
/// Longest device name (the IPC bound, `ipc_schema::limits::MAX_NAME_LEN`).
pub const MAX_NAME_LEN: usize = ipc_schema::limits::MAX_NAME_LEN;
/// Most peers a gateway keeps (the control reply lists them all).
pub const MAX_PEERS: usize = ipc_schema::limits::MAX_LISTED;
/// The `version` of `peers.json` this code writes. Version 1 (no `platform`, no
/// `first_seen_unix`) is read and migrated: `first_seen_unix` becomes the best earlier
/// evidence, `last_seen_unix`, and `platform` stays unknown.
pub const PEERS_FILE_VERSION: u32 = 2;
/// Longest platform string ("Linux", "Android 14", ...), the same bound as a name.
pub const MAX_PLATFORM_LEN: usize = MAX_NAME_LEN;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrustState {
    Trusted,
    Revoked,
}

/// A device the user decided about (domain model: `PeerDevice`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerDevice {
    /// Noise static public key, 64 lowercase hex digits in the file.
    #[serde(with = "hex_key")]
    pub key: [u8; 32],
    pub name: Option<String>,
    pub state: TrustState,
    pub added_at_unix: u64,
    #[serde(default)]
    pub revoked_at_unix: Option<u64>,
    #[serde(default)]
    pub last_seen_unix: Option<u64>,
    /// The platform the device reported when it paired ("Linux"), if known (version 2).
    #[serde(default)]
    pub platform: Option<String>,
    /// When the gateway first saw this device: its pairing request, else its first
    /// completed handshake after a `peers add` (version 2).
    #[serde(default)]
    pub first_seen_unix: Option<u64>,
}

/// What the policy knows about a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerStatus {
    Unknown,
    Trusted,
    Revoked,
}

#[derive(Debug, thiserror::Error)]
pub enum PeerDbError {
    #[error("cannot read or write {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a valid peer database: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("peer {0} is already trusted")]
    AlreadyTrusted(String),
    #[error("the name {0:?} is already used by another peer")]
    NameTaken(String),
    #[error("no peer named or keyed {0:?}")]
    NoSuchPeer(String),
    #[error("peer {0} is already revoked")]
    AlreadyRevoked(String),
    #[error("a device name must be 1..={MAX_NAME_LEN} bytes of printable text")]
    BadName,
    #[error("the gateway keeps at most {MAX_PEERS} peers")]
    Full,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct PeerFile {
    version: u32,
    peers: Vec<PeerDevice>,
}

/// The peer database. Changes are made in memory; the caller persists with
/// [`PeerDb::save`] (atomic write, mode 0600).
#[derive(Debug, Default, Clone)]
pub struct PeerDb {
    peers: Vec<PeerDevice>,
}

/// Parses a key as 64 hex digits.
pub fn parse_key(s: &str) -> Option<[u8; 32]> {
    let mut k = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut k).ok()?;
    Some(k)
}

/// Version 1 had neither `platform` nor `first_seen_unix`; the last handshake is the
/// earliest sighting it recorded.
fn migrate_v1(mut peers: Vec<PeerDevice>) -> Vec<PeerDevice> {
    for p in &mut peers {
        p.platform = None;
        p.first_seen_unix = p.last_seen_unix;
    }
    peers
}

/// A platform string as stored: printable, at most [`MAX_PLATFORM_LEN`] bytes (longer
/// is cut at a character boundary), `None` when empty.
pub fn clean_platform(platform: &str) -> Option<String> {
    let mut out = String::new();
    for c in platform.trim().chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > MAX_PLATFORM_LEN {
            break;
        }
        out.push(c);
    }
    (!out.is_empty()).then_some(out)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_LEN && !name.chars().any(char::is_control)
}

impl PeerDb {
    /// Loads `state_dir/peers.json`; an absent file is an empty database.
    pub fn load(state_dir: &Path) -> Result<Self, PeerDbError> {
        let path = state_dir.join(PEERS_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let file: PeerFile =
                    serde_json::from_slice(&bytes).map_err(|e| PeerDbError::Corrupt {
                        path: path.clone(),
                        detail: e.to_string(),
                    })?;
                match file.version {
                    1 => Ok(Self {
                        peers: migrate_v1(file.peers),
                    }),
                    PEERS_FILE_VERSION => Ok(Self { peers: file.peers }),
                    v => Err(PeerDbError::Corrupt {
                        path,
                        detail: format!("unknown version {v}"),
                    }),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(PeerDbError::Io { path, source }),
        }
    }

    /// Writes the database to `state_dir/peers.json` atomically (mode 0600).
    pub fn save(&self, state_dir: &Path) -> Result<(), PeerDbError> {
        let path = state_dir.join(PEERS_FILE);
        let file = PeerFile {
            version: PEERS_FILE_VERSION,
            peers: self.peers.clone(),
        };
        let mut bytes = serde_json::to_vec_pretty(&file).map_err(|e| PeerDbError::Corrupt {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        bytes.push(b'\n');
        fsutil::ensure_dir(state_dir)
            .and_then(|()| fsutil::atomic_write(&path, &bytes))
            .map_err(|source| PeerDbError::Io { path, source })
    }

    pub fn peers(&self) -> &[PeerDevice] {
        &self.peers
    }

    pub fn get(&self, key: &[u8; 32]) -> Option<&PeerDevice> {
        self.peers.iter().find(|p| &p.key == key)
    }

    pub fn status(&self, key: &[u8; 32]) -> PeerStatus {
        match self.get(key).map(|p| p.state) {
            None => PeerStatus::Unknown,
            Some(TrustState::Trusted) => PeerStatus::Trusted,
            Some(TrustState::Revoked) => PeerStatus::Revoked,
        }
    }

    /// Trusts `key` (a new peer, or a revoked one the user trusts again).
    pub fn add(
        &mut self,
        key: [u8; 32],
        name: Option<&str>,
        now_unix: u64,
    ) -> Result<(), PeerDbError> {
        if let Some(n) = name {
            if !valid_name(n) {
                return Err(PeerDbError::BadName);
            }
            if self
                .peers
                .iter()
                .any(|p| p.key != key && p.name.as_deref() == Some(n))
            {
                return Err(PeerDbError::NameTaken(n.to_owned()));
            }
        }
        if let Some(p) = self.peers.iter_mut().find(|p| p.key == key) {
            if p.state == TrustState::Trusted {
                return Err(PeerDbError::AlreadyTrusted(hex::encode(key)));
            }
            p.state = TrustState::Trusted;
            p.revoked_at_unix = None;
            if let Some(n) = name {
                p.name = Some(n.to_owned());
            }
            return Ok(());
        }
        if self.peers.len() >= MAX_PEERS {
            return Err(PeerDbError::Full);
        }
        self.peers.push(PeerDevice {
            key,
            name: name.map(str::to_owned),
            state: TrustState::Trusted,
            added_at_unix: now_unix,
            revoked_at_unix: None,
            last_seen_unix: None,
            platform: None,
            first_seen_unix: None,
        });
        Ok(())
    }

    /// Trusts a device the user approved from a pairing request: like [`PeerDb::add`],
    /// and records the platform it reported and when it first asked.
    pub fn add_paired(
        &mut self,
        key: [u8; 32],
        name: Option<&str>,
        platform: Option<&str>,
        requested_at_unix: u64,
        now_unix: u64,
    ) -> Result<(), PeerDbError> {
        // The name is the device's own claim: used when it is valid and free, else the
        // peer is trusted unnamed (the user can name it with `peers add` later).
        let name = name.filter(|n| {
            valid_name(n)
                && !self
                    .peers
                    .iter()
                    .any(|p| p.key != key && p.name.as_deref() == Some(*n))
        });
        self.add(key, name, now_unix)?;
        if let Some(p) = self.peers.iter_mut().find(|p| p.key == key) {
            if let Some(pl) = platform.and_then(clean_platform) {
                p.platform = Some(pl);
            }
            if p.first_seen_unix.is_none() {
                p.first_seen_unix = Some(requested_at_unix);
            }
            p.last_seen_unix = Some(now_unix);
        }
        Ok(())
    }

    /// Finds a peer by name, or by key (64 hex digits).
    pub fn resolve(&self, name_or_key: &str) -> Option<[u8; 32]> {
        if let Some(p) = self
            .peers
            .iter()
            .find(|p| p.name.as_deref() == Some(name_or_key))
        {
            return Some(p.key);
        }
        let key = parse_key(name_or_key)?;
        self.get(&key).map(|p| p.key)
    }

    /// Revokes the peer; returns its key. The entry stays (marked revoked) so that its
    /// next handshake is refused as revoked, not treated as a new pairing request.
    pub fn revoke(&mut self, key: &[u8; 32], now_unix: u64) -> Result<(), PeerDbError> {
        let p = self
            .peers
            .iter_mut()
            .find(|p| &p.key == key)
            .ok_or_else(|| PeerDbError::NoSuchPeer(hex::encode(key)))?;
        if p.state == TrustState::Revoked {
            return Err(PeerDbError::AlreadyRevoked(hex::encode(key)));
        }
        p.state = TrustState::Revoked;
        p.revoked_at_unix = Some(now_unix);
        Ok(())
    }

    /// Records that the peer completed a handshake (not persisted on every call).
    pub fn touch(&mut self, key: &[u8; 32], now_unix: u64) {
        if let Some(p) = self.peers.iter_mut().find(|p| &p.key == key) {
            p.last_seen_unix = Some(now_unix);
            p.first_seen_unix.get_or_insert(now_unix);
        }
    }
}

mod hex_key {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(k: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(k))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        super::parse_key(&s).ok_or_else(|| serde::de::Error::custom("key is not 64 hex digits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn add_revoke_persist_reload() {
        let dir = crate::testutil::temp_dir("peerdb");
        let mut db = PeerDb::load(&dir).unwrap();
        assert!(db.peers().is_empty());
        db.add([1; 32], Some("laptop"), 100).unwrap();
        db.add([2; 32], None, 101).unwrap();
        assert!(matches!(
            db.add([1; 32], None, 102),
            Err(PeerDbError::AlreadyTrusted(_))
        ));
        assert!(matches!(
            db.add([3; 32], Some("laptop"), 102),
            Err(PeerDbError::NameTaken(_))
        ));
        assert!(matches!(
            db.add([3; 32], Some(""), 102),
            Err(PeerDbError::BadName)
        ));
        db.save(&dir).unwrap();
        let mode = std::fs::metadata(dir.join(PEERS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let mut db = PeerDb::load(&dir).unwrap();
        assert_eq!(db.status(&[1; 32]), PeerStatus::Trusted);
        assert_eq!(db.status(&[9; 32]), PeerStatus::Unknown);
        assert_eq!(db.resolve("laptop"), Some([1; 32]));
        assert_eq!(db.resolve(&hex::encode([2u8; 32])), Some([2; 32]));
        assert_eq!(db.resolve("nope"), None);
        db.revoke(&[1; 32], 200).unwrap();
        assert!(matches!(
            db.revoke(&[1; 32], 201),
            Err(PeerDbError::AlreadyRevoked(_))
        ));
        db.save(&dir).unwrap();

        let mut db = PeerDb::load(&dir).unwrap();
        assert_eq!(db.status(&[1; 32]), PeerStatus::Revoked);
        assert_eq!(db.get(&[1; 32]).unwrap().revoked_at_unix, Some(200));
        // Trusting a revoked key again is an explicit add.
        db.add([1; 32], None, 300).unwrap();
        assert_eq!(db.status(&[1; 32]), PeerStatus::Trusted);
        assert_eq!(db.get(&[1; 32]).unwrap().name.as_deref(), Some("laptop"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn corrupt_file_is_an_error_not_an_empty_db() {
        let dir = crate::testutil::temp_dir("peerdb-corrupt");
        std::fs::write(dir.join(PEERS_FILE), b"{not json").unwrap();
        assert!(matches!(
            PeerDb::load(&dir),
            Err(PeerDbError::Corrupt { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn version_1_is_migrated_and_saved_as_version_2() {
        let dir = crate::testutil::temp_dir("peerdb-v1");
        let k = hex::encode([4u8; 32]);
        let v1 = format!(
            r#"{{"version":1,"peers":[{{"key":"{k}","name":"laptop","state":"trusted","added_at_unix":10,"revoked_at_unix":null,"last_seen_unix":50}}]}}"#
        );
        std::fs::write(dir.join(PEERS_FILE), v1).unwrap();
        let mut db = PeerDb::load(&dir).unwrap();
        let p = db.get(&[4; 32]).unwrap();
        assert_eq!(p.platform, None);
        assert_eq!(p.first_seen_unix, Some(50));
        assert_eq!(p.added_at_unix, 10);
        db.add_paired([5; 32], Some("phone"), Some(" Android\n14 "), 90, 100)
            .unwrap();
        db.save(&dir).unwrap();
        let text = std::fs::read_to_string(dir.join(PEERS_FILE)).unwrap();
        assert!(text.contains("\"version\": 2"), "{text}");
        let db = PeerDb::load(&dir).unwrap();
        let p = db.get(&[5; 32]).unwrap();
        assert_eq!(p.platform.as_deref(), Some("Android14"));
        assert_eq!(p.first_seen_unix, Some(90));
        assert_eq!(p.last_seen_unix, Some(100));
        // A file from the future is refused, not misread.
        std::fs::write(dir.join(PEERS_FILE), r#"{"version":3,"peers":[]}"#).unwrap();
        assert!(matches!(
            PeerDb::load(&dir),
            Err(PeerDbError::Corrupt { .. })
        ));
        assert_eq!(
            clean_platform(&"x".repeat(500)).unwrap().len(),
            MAX_PLATFORM_LEN
        );
        assert_eq!(clean_platform(" \t"), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Set by [`killed_while_writing_leaves_the_old_or_the_new_file`] in the child it
    /// starts: the directory the child rewrites `peers.json` in, in a tight loop.
    const WRITER_ENV: &str = "VPNSHARE_TEST_PEERS_WRITER_DIR";

    /// The database of generation `n`: peers `0..n % 64 + 1`, each named after its index.
    fn generation(n: u32) -> PeerDb {
        let mut db = PeerDb::default();
        for i in 0..=(n % 64) {
            let b = u8::try_from(i).unwrap();
            db.add(
                [b; 32],
                Some(&format!("device-{i}-{}", "x".repeat(40))),
                u64::from(n),
            )
            .unwrap();
        }
        db
    }

    /// Not a test on its own: without [`WRITER_ENV`] it returns at once. In the child
    /// process of the kill test it saves generation after generation until killed.
    #[test]
    fn peers_writer_child() {
        let Some(dir) = std::env::var_os(WRITER_ENV) else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        let mut n = 0u32;
        loop {
            generation(n).save(&dir).unwrap();
            n = n.wrapping_add(1);
        }
    }

    /// The issue's crash test: a process that rewrites `peers.json` with the broker's own
    /// save routine is SIGKILLed at arbitrary points, many times; after each kill the
    /// file must load and be one whole generation (old or new), never a mix or a torso.
    #[test]
    fn killed_while_writing_leaves_the_old_or_the_new_file() {
        use rand::Rng;
        let dir = crate::testutil::temp_dir("peerdb-kill");
        let exe = std::env::current_exe().unwrap();
        let mut rng = rand::thread_rng();
        let mut checked = 0;
        for _ in 0..40 {
            let mut child = std::process::Command::new(&exe)
                .args(["--exact", "peers::tests::peers_writer_child", "--nocapture"])
                .env(WRITER_ENV, &dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            // Let it start and run for a random while (0..30 ms of writes), then kill.
            while !dir.join(PEERS_FILE).exists() {
                std::thread::sleep(std::time::Duration::from_millis(1));
                if let Some(st) = child.try_wait().unwrap() {
                    panic!("writer child exited early: {st}");
                }
            }
            std::thread::sleep(std::time::Duration::from_micros(rng.gen_range(0..30_000)));
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
            let status = child.wait().unwrap();
            assert!(!status.success(), "the writer must have been killed");
            let db = PeerDb::load(&dir).unwrap();
            let n = db.peers().len();
            assert!((1..=64).contains(&n), "{n} peers");
            for (i, p) in db.peers().iter().enumerate() {
                let b = u8::try_from(i).unwrap();
                assert_eq!(p.key, [b; 32]);
                assert!(
                    p.name
                        .as_deref()
                        .unwrap()
                        .starts_with(&format!("device-{i}-"))
                );
                // Every peer of one generation was added at the same time.
                assert_eq!(p.added_at_unix, db.peers()[0].added_at_unix);
            }
            checked += 1;
        }
        assert_eq!(checked, 40);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
