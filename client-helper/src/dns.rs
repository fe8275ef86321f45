//! The resolver file: saved byte for byte (or as the symlink it is), replaced
//! atomically, restored atomically.

use std::fs::{self, File, Permissions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

/// What the resolver file was before the helper touched it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Saved {
    Absent,
    Symlink(Vec<u8>),
    File { mode: u32, bytes: Vec<u8> },
}

/// Where systemd-resolved's stub file lives; `/etc/resolv.conf` links to it when
/// resolved manages DNS.
const RESOLVED_STUB: &str = "/run/systemd/resolve/stub-resolv.conf";

pub fn capture(path: &Path) -> io::Result<Saved> {
    use std::os::unix::ffi::OsStrExt;
    let meta = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Saved::Absent),
        other => other?,
    };
    if meta.file_type().is_symlink() {
        let target = fs::read_link(path)?;
        if target.ends_with(RESOLVED_STUB.trim_start_matches('/')) {
            tracing::info!(
                "systemd-resolved manages {}: replacing the link with a file until teardown",
                path.display()
            );
        }
        return Ok(Saved::Symlink(target.as_os_str().as_bytes().to_vec()));
    }
    Ok(Saved::File {
        mode: meta.permissions().mode() & 0o7777,
        bytes: fs::read(path)?,
    })
}

fn temp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.vpnshare-helper.tmp"))
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename.
pub fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temp_beside(path);
    remove_if_there(&tmp)?;
    // O_EXCL: a link planted at the temporary name is not followed.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    f.set_permissions(Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    sync_dir(path)
}

fn remove_if_there(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

/// Points the resolver at `servers` (the file itself replaces a symlink).
pub fn write_servers(path: &Path, servers: &[IpAddr]) -> io::Result<()> {
    let mut text = String::from("# written by vpnshare-helper while the tunnel is up\n");
    for s in servers {
        text.push_str(&format!("nameserver {s}\n"));
    }
    replace_file(path, text.as_bytes(), 0o644)
}

/// Puts back what [`capture`] saw.
pub fn restore(path: &Path, saved: &Saved) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    match saved {
        Saved::Absent => remove_if_there(path).and_then(|()| sync_dir(path)),
        Saved::Symlink(target) => {
            let tmp = temp_beside(path);
            remove_if_there(&tmp)?;
            symlink(std::ffi::OsStr::from_bytes(target), &tmp)?;
            fs::rename(&tmp, path)?;
            sync_dir(path)
        }
        Saved::File { mode, bytes } => replace_file(path, bytes, *mode),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn file_and_symlink_come_back_exactly() {
        let dir = std::env::temp_dir().join(format!("vsh-dns-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("resolv.conf");
        fs::write(&path, b"nameserver 192.0.2.53\noptions edns0\n").unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o640)).unwrap();
        let saved = capture(&path).unwrap();
        write_servers(&path, &["100.64.0.1".parse().unwrap()]).unwrap();
        assert!(fs::read_to_string(&path).unwrap().contains("100.64.0.1"));
        restore(&path, &saved).unwrap();
        assert_eq!(capture(&path).unwrap(), saved);

        fs::remove_file(&path).unwrap();
        symlink("../run/systemd/resolve/stub-resolv.conf", &path).unwrap();
        let saved = capture(&path).unwrap();
        write_servers(&path, &["100.64.0.1".parse().unwrap()]).unwrap();
        assert!(
            !fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        restore(&path, &saved).unwrap();
        assert_eq!(
            fs::read_link(&path).unwrap(),
            Path::new("../run/systemd/resolve/stub-resolv.conf")
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
