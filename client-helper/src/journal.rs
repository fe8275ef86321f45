//! The undo journal: everything the helper is about to change outside the TUN, written
//! (atomically, fsync'd) before the change, read back and undone at teardown or at the
//! next start. The format is plain text, one record per line (docs/client-helper.md).

use std::fmt::Write as _;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::dns::{self, Saved};
use crate::netlink::{Netlink, RouteSpec};

const MAGIC: &str = "vpnshare-helper journal 1";

/// What to undo.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Journal {
    /// The TUN the helper created (deleted by name at restore).
    pub tun: Option<String>,
    /// Host routes the helper added outside the TUN (the path to the gateway).
    pub routes: Vec<RouteSpec>,
    /// The resolver file and what it was.
    pub resolv: Option<(PathBuf, Saved)>,
}

/// A journal that cannot be read or undone.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("journal line {0}: not understood")]
    Syntax(usize),
    #[error("restoring {what}: {errno}")]
    Restore {
        what: String,
        errno: nix::errno::Errno,
    },
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Journal {
    pub fn is_empty(&self) -> bool {
        *self == Journal::default()
    }

    pub fn encode(&self) -> String {
        use std::os::unix::ffi::OsStrExt;
        let mut s = format!("{MAGIC}\n");
        if let Some(t) = &self.tun {
            let _ = writeln!(s, "tun {}", hex(t.as_bytes()));
        }
        for r in &self.routes {
            let via = r.via.map_or("-".to_owned(), |v| v.to_string());
            let _ = writeln!(s, "route {} {} {} {via} {}", r.dst, r.len, r.oif, r.table);
        }
        if let Some((path, saved)) = &self.resolv {
            let p = hex(path.as_os_str().as_bytes());
            let _ = match saved {
                Saved::Absent => writeln!(s, "resolv {p} absent"),
                Saved::Symlink(t) => writeln!(s, "resolv {p} symlink {}", hex(t)),
                Saved::File { mode, bytes } => {
                    writeln!(s, "resolv {p} file {mode:o} {}", hex(bytes))
                }
            };
        }
        s
    }

    pub fn decode(text: &str) -> Result<Self, JournalError> {
        use std::os::unix::ffi::OsStringExt;
        let mut lines = text.lines().enumerate();
        if lines.next().map(|(_, l)| l) != Some(MAGIC) {
            return Err(JournalError::Syntax(1));
        }
        let mut j = Journal::default();
        for (i, line) in lines {
            let bad = || JournalError::Syntax(i + 1);
            let f: Vec<&str> = line.split(' ').collect();
            match f.as_slice() {
                ["tun", name] => {
                    j.tun =
                        Some(String::from_utf8(unhex(name).ok_or_else(bad)?).map_err(|_| bad())?)
                }
                ["route", dst, len, oif, via, table] => j.routes.push(RouteSpec {
                    dst: dst.parse().map_err(|_| bad())?,
                    len: len.parse().map_err(|_| bad())?,
                    oif: oif.parse().map_err(|_| bad())?,
                    via: match *via {
                        "-" => None,
                        v => Some(v.parse::<IpAddr>().map_err(|_| bad())?),
                    },
                    table: table.parse().map_err(|_| bad())?,
                }),
                ["resolv", path, rest @ ..] => {
                    let path =
                        PathBuf::from(std::ffi::OsString::from_vec(unhex(path).ok_or_else(bad)?));
                    let saved = match rest {
                        ["absent"] => Saved::Absent,
                        ["symlink", t] => Saved::Symlink(unhex(t).ok_or_else(bad)?),
                        ["file", mode, b] => Saved::File {
                            mode: u32::from_str_radix(mode, 8).map_err(|_| bad())?,
                            bytes: unhex(b).ok_or_else(bad)?,
                        },
                        _ => return Err(bad()),
                    };
                    j.resolv = Some((path, saved));
                }
                _ => return Err(bad()),
            }
        }
        Ok(j)
    }

    /// Reads the journal at `path`; a missing file is an empty journal.
    pub fn load(path: &Path) -> Result<Self, JournalError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::decode(&text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Journal::default()),
            Err(source) => Err(JournalError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Writes the journal durably (temporary file, fsync, rename, fsync of the
    /// directory); an empty journal removes the file.
    pub fn save(&self, path: &Path) -> Result<(), JournalError> {
        let io_err = |source| JournalError::Io {
            path: path.to_owned(),
            source,
        };
        if self.is_empty() {
            return match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(e)),
                _ => Ok(()),
            };
        }
        dns::replace_file(path, self.encode().as_bytes(), 0o600).map_err(io_err)
    }

    /// Undoes everything recorded, saving the journal after each step so that a crash
    /// in the middle repeats only what is left.
    pub fn restore(&mut self, nl: &mut Netlink, path: &Path) -> Result<(), JournalError> {
        let fail = |what: String, errno| JournalError::Restore { what, errno };
        if let Some((file, saved)) = &self.resolv {
            dns::restore(file, saved).map_err(|e| JournalError::Io {
                path: file.clone(),
                source: e,
            })?;
            tracing::info!(file = %file.display(), "resolver file restored");
            self.resolv = None;
            self.save(path)?;
        }
        while let Some(r) = self.routes.last().copied() {
            match nl.route_delete(&r) {
                Ok(()) | Err(nix::errno::Errno::ESRCH | nix::errno::Errno::ENODEV) => {}
                Err(e) => return Err(fail(format!("route {}/{}", r.dst, r.len), e)),
            }
            tracing::info!(dst = %r.dst, len = r.len, "host route removed");
            self.routes.pop();
            self.save(path)?;
        }
        if let Some(name) = self.tun.clone() {
            if let Ok(index) = nix::net::if_::if_nametoindex(name.as_str()) {
                match nl.link_delete(index) {
                    Ok(()) | Err(nix::errno::Errno::ENODEV) => {}
                    Err(e) => return Err(fail(format!("link {name}"), e)),
                }
                tracing::info!(ifname = %name, "TUN removed");
            }
            self.tun = None;
            self.save(path)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn journal_round_trips_and_refuses_garbage() {
        let j = Journal {
            tun: Some("vshare0".into()),
            routes: vec![RouteSpec {
                dst: "192.0.2.9".parse().unwrap(),
                len: 32,
                oif: 3,
                via: Some("192.0.2.254".parse().unwrap()),
                table: 254,
            }],
            resolv: Some((
                PathBuf::from("/etc/resolv conf"),
                Saved::File {
                    mode: 0o644,
                    bytes: b"nameserver 1.1.1.1\n".to_vec(),
                },
            )),
        };
        assert_eq!(Journal::decode(&j.encode()).unwrap(), j);
        assert!(Journal::decode("vpnshare-helper journal 1\ntun zz\n").is_err());
        assert!(Journal::decode("something else\n").is_err());
        assert!(
            Journal::decode(&Journal::default().encode())
                .unwrap()
                .is_empty()
        );
    }
}
