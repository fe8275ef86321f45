//! `AdmissionMarker`: a file opened before the session confines itself, into which the
//! confined session writes one line once the gateway admitted it (its first CONFIG).
//!
//! `connect --discover` pins a gateway's key only after pairing succeeded
//! (docs/discovery.md): the CLI writes the candidate pin into this file while it may
//! still open files, and the next `--discover` promotes it to `gateways.json` only if
//! the admission line is there. The confined session cannot open or rename files, but it
//! may `pwrite` and `fdatasync` descriptors it kept, as the ticket store does.

use std::fs::{File, OpenOptions};
use std::io::Read as _;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::Path;

/// What the session writes after the candidate's lines.
pub const ADMITTED_LINE: &str = "admitted\n";
/// A candidate file is a few short lines; anything longer is not one of ours.
const MAX_LEN: u64 = 4096;

/// The open candidate file and where the admission line goes.
#[derive(Debug)]
pub struct AdmissionMarker {
    file: File,
    offset: u64,
}

impl AdmissionMarker {
    /// Creates (or truncates) `path`, mode 0600, holding `header` (the candidate, one
    /// or more lines), synced. The session later marks it with [`mark`](Self::mark).
    pub fn create(path: &Path, header: &str) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        file.write_all_at(header.as_bytes(), 0)?;
        file.sync_data()?;
        Ok(Self {
            file,
            offset: header.len() as u64,
        })
    }

    /// The descriptor the session must keep across confinement.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Records the admission (idempotent).
    pub fn mark(&self) -> std::io::Result<()> {
        self.file
            .write_all_at(ADMITTED_LINE.as_bytes(), self.offset)?;
        self.file.sync_data()
    }
}

/// Reads a candidate file: its header lines and whether the session marked it. A
/// missing admission line (the session was denied, or died first) gives `false`; a
/// torn line also does, which is the safe answer (no pin).
pub fn read(path: &Path) -> std::io::Result<(Vec<String>, bool)> {
    let mut text = String::new();
    File::open(path)?
        .take(MAX_LEN)
        .read_to_string(&mut text)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let admitted = text.ends_with(ADMITTED_LINE) && lines.pop().is_some();
    Ok((lines, admitted))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vpnshare-marker-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn unmarked_then_marked_and_mode_0600() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = temp("mark");
        let p = d.join("candidate");
        let m = AdmissionMarker::create(&p, "phone\nabcd\n").unwrap();
        assert_eq!(
            read(&p).unwrap(),
            (vec!["phone".to_owned(), "abcd".to_owned()], false)
        );
        m.mark().unwrap();
        m.mark().unwrap();
        assert_eq!(
            read(&p).unwrap(),
            (vec!["phone".to_owned(), "abcd".to_owned()], true)
        );
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Created again (a new attempt): the old mark is gone.
        let _m = AdmissionMarker::create(&p, "phone\nabcd\n").unwrap();
        assert!(!read(&p).unwrap().1);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_torn_or_foreign_file_is_not_admitted() {
        let d = temp("torn");
        let p = d.join("candidate");
        std::fs::write(&p, "phone\nabcd\nadmit").unwrap();
        assert!(!read(&p).unwrap().1);
        std::fs::write(&p, "admitted\n").unwrap();
        // Only the line itself: no candidate, nothing to pin (the caller checks).
        assert_eq!(read(&p).unwrap(), (vec![], true));
        let _ = std::fs::remove_dir_all(&d);
    }
}
