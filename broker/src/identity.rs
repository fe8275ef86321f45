//! The device's static identity key, in the state dir (`identity.key`, mode 0600).

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use vshp::key_oracle::StaticKeypair;

use crate::fsutil;

/// File name of the identity inside the state dir.
pub const IDENTITY_FILE: &str = "identity.key";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read or write the identity {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the identity {0} is not 64 hex digits (a 32-byte X25519 private key)")]
    Malformed(PathBuf),
    #[error("the identity {0} is readable by other users (mode {1:o}); fix with chmod 600")]
    TooOpen(PathBuf, u32),
    #[error("cannot make a key: {0}")]
    Key(#[from] vshp::key_oracle::KeyError),
}

/// Loads the identity from `state_dir`, creating the directory (0700) and a fresh key
/// (0600) if absent.
pub fn load_or_create(state_dir: &Path) -> Result<StaticKeypair, IdentityError> {
    let path = state_dir.join(IDENTITY_FILE);
    let io_err = |source| IdentityError::Io {
        path: path.clone(),
        source,
    };
    match fs::read_to_string(&path) {
        Ok(text) => {
            let mode = fs::metadata(&path).map_err(io_err)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(IdentityError::TooOpen(path, mode));
            }
            let mut private = [0u8; 32];
            hex::decode_to_slice(text.trim(), &mut private)
                .map_err(|_| IdentityError::Malformed(path.clone()))?;
            Ok(StaticKeypair::from_private(private)?)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fsutil::ensure_dir(state_dir).map_err(io_err)?;
            let kp = StaticKeypair::generate()?;
            let text = format!("{}\n", hex::encode(kp.private_key()));
            fsutil::atomic_write(&path, text.as_bytes()).map_err(io_err)?;
            Ok(kp)
        }
        Err(e) => Err(io_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reloaded_with_mode_0600() {
        let dir = crate::testutil::temp_dir("identity");
        let a = load_or_create(&dir).unwrap();
        let b = load_or_create(&dir).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        let mode = fs::metadata(dir.join(IDENTITY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::set_permissions(dir.join(IDENTITY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create(&dir),
            Err(IdentityError::TooOpen(..))
        ));
        fs::remove_dir_all(dir).unwrap();
    }
}
