//! vpnshare-helper: the only privileged code on the client (TUN, routes, DNS).
//!
//! Read in this order: `policy` (what is allowed), `session` (the closed list of
//! operations), `journal` (what is undone, and when), `netlink` and `dns` (how), then
//! `run` below (socket, caller check, confinement). docs/client-helper.md is the prose.

pub mod dns;
pub mod journal;
pub mod netlink;
pub mod policy;
pub mod session;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use ipc_schema::Channel;
use ipc_schema::messages::session_helper::HelperEnd;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use crate::journal::Journal;
use crate::policy::Policy;
use crate::session::{Session, Settings};

/// Why the helper could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("usage: {0}\n{USAGE}")]
    Usage(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("policy file: {0}")]
    Policy(#[from] policy::PolicyError),
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error("confinement: {0}")]
    Confine(#[from] security::Error),
    #[error("{what}: {errno}")]
    Sys {
        what: &'static str,
        errno: nix::errno::Errno,
    },
}

pub const USAGE: &str = "vpnshare-helper --uid UID [--socket PATH] [--journal PATH] \
[--policy PATH] [--resolv-conf PATH] [--once]\nvpnshare-helper --restore [--journal PATH]";

/// The command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub uid: Option<u32>,
    pub socket: Option<PathBuf>,
    pub journal: PathBuf,
    pub policy: PathBuf,
    pub resolv_conf: PathBuf,
    pub once: bool,
    pub restore: bool,
}

impl Args {
    pub fn parse(mut it: impl Iterator<Item = String>) -> Result<Self, Error> {
        let mut a = Args {
            uid: None,
            socket: None,
            journal: PathBuf::from("/var/lib/vpnshare-helper/journal"),
            policy: PathBuf::from("/etc/vpnshare/helper.policy"),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            once: false,
            restore: false,
        };
        while let Some(flag) = it.next() {
            let mut value = || {
                it.next()
                    .ok_or_else(|| Error::Usage(format!("{flag} needs a value")))
            };
            match flag.as_str() {
                "--uid" => {
                    let v = value()?;
                    a.uid = Some(
                        v.parse()
                            .map_err(|_| Error::Usage(format!("bad uid {v}")))?,
                    );
                }
                "--socket" => a.socket = Some(value()?.into()),
                "--journal" => a.journal = value()?.into(),
                "--policy" => a.policy = value()?.into(),
                "--resolv-conf" => a.resolv_conf = value()?.into(),
                "--once" => a.once = true,
                "--restore" => a.restore = true,
                _ => return Err(Error::Usage(format!("unknown argument {flag}"))),
            }
        }
        if a.uid.is_none() && !a.restore {
            return Err(Error::Usage("--uid is required".into()));
        }
        Ok(a)
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// The listening socket: `--socket PATH`, or fd 3 from systemd socket activation.
/// Reads `LISTEN_PID`/`LISTEN_FDS`, so it runs before `confine` clears the environment.
fn listener(args: &Args) -> Result<UnixListener, Error> {
    if let Some(path) = &args.socket {
        // Replace a stale socket, never anything else.
        let stale = |p: &std::path::Path| -> Result<(), Error> {
            match std::fs::symlink_metadata(p) {
                Ok(m) if !m.file_type().is_socket() => Err(Error::Usage(format!(
                    "{} exists and is not a socket",
                    p.display()
                ))),
                Ok(_) => std::fs::remove_file(p).map_err(io(format!("removing {}", p.display()))),
                Err(_) => Ok(()),
            }
        };
        // Bound and opened to everyone under a temporary name, then renamed: PATH
        // appears only once it accepts connections. SO_PEERCRED decides who is served.
        let mut tmp = path.clone().into_os_string();
        tmp.push(".new");
        let tmp = PathBuf::from(tmp);
        stale(&tmp)?;
        stale(path)?;
        let l = UnixListener::bind(&tmp).map_err(io(format!("binding {}", tmp.display())))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666))
            .map_err(io("socket mode"))?;
        std::fs::rename(&tmp, path).map_err(io(format!("renaming to {}", path.display())))?;
        return Ok(l);
    }
    let pid_ok = std::env::var("LISTEN_PID").ok() == Some(std::process::id().to_string());
    if !pid_ok || std::env::var("LISTEN_FDS").ok().as_deref() != Some("1") {
        return Err(Error::Usage(
            "no --socket and no socket activation (LISTEN_PID, LISTEN_FDS=1)".into(),
        ));
    }
    // SAFETY: systemd passed exactly one descriptor, fd 3, which nothing else in this
    // process owns; it is the listening socket of vpnshare-helper.socket.
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    let l = UnixListener::from(fd);
    l.set_nonblocking(false).map_err(io("listening socket"))?;
    Ok(l)
}

fn restore_journal(settings: &Settings) -> Result<(), Error> {
    let mut j = Journal::load(&settings.journal)?;
    if j.is_empty() {
        return Ok(());
    }
    tracing::warn!(journal = %settings.journal.display(), "restoring what an earlier helper left");
    let mut nl = netlink::Netlink::open().map_err(|errno| Error::Sys {
        what: "netlink",
        errno,
    })?;
    j.restore(&mut nl, &settings.journal)?;
    Ok(())
}

fn serve(settings: &Settings, stream: UnixStream) -> Result<(), Error> {
    let mut session = Session::new(settings).map_err(|errno| Error::Sys {
        what: "netlink",
        errno,
    })?;
    match Channel::<HelperEnd>::open(stream) {
        Ok(mut ch) => loop {
            let msg = match ch.recv() {
                Ok(incoming) => incoming.msg,
                Err(e) => {
                    tracing::info!("session ended: {e}");
                    break;
                }
            };
            tracing::debug!(?msg, "request");
            let (reply, fd) = session.handle(msg);
            let fds: Vec<_> = fd.iter().map(std::os::fd::AsFd::as_fd).collect();
            if let Err(e) = ch.send(&reply, &fds) {
                tracing::info!("session ended while replying: {e}");
                break;
            }
        },
        Err(e) => tracing::warn!("channel did not open: {e}"),
    }
    session.teardown()?;
    Ok(())
}

/// Runs the helper: start-up, confinement, journal restore, then sessions.
pub fn run(args: Args) -> Result<(), Error> {
    let policy = match std::fs::read_to_string(&args.policy) {
        Ok(text) => Policy::parse(&text)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Policy::default(),
        Err(e) => return Err(io(format!("reading {}", args.policy.display()))(e)),
    };
    let settings = Settings {
        policy,
        journal: args.journal.clone(),
        resolv_conf: args.resolv_conf.clone(),
    };
    let dir = match args.journal.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_owned(),
        None => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    // One helper per journal: an exclusive lock on its directory, held until exit.
    let dir_file = std::fs::File::open(&dir).map_err(io(format!("opening {}", dir.display())))?;
    let lock = Flock::lock(dir_file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        Error::Sys {
            what: "another helper holds the journal's directory",
            errno,
        }
    })?;
    let listener = match args.restore {
        true => None,
        false => Some(listener(&args)?),
    };
    let mut keep: Vec<_> = listener.iter().map(|l| l.as_raw_fd()).collect();
    keep.push(lock.as_raw_fd());
    let confinement = security::confine(
        security::Role::ClientHelper,
        &security::ConfineOptions {
            threads: security::Threads::Forbidden,
            ..security::ConfineOptions::keep(&keep)
        },
    )?;
    tracing::info!(?confinement, "confined");
    restore_journal(&settings)?;
    let (Some(listener), Some(uid)) = (listener, args.uid) else {
        return Ok(());
    };
    tracing::info!(uid, "serving");
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("accept: {e}");
                continue;
            }
        };
        match getsockopt(&stream, PeerCredentials) {
            Ok(cred) if cred.uid() == uid => {}
            Ok(cred) => {
                tracing::warn!(
                    caller_uid = cred.uid(),
                    pid = cred.pid(),
                    "refused a caller"
                );
                continue;
            }
            Err(errno) => {
                tracing::warn!("SO_PEERCRED: {errno}");
                continue;
            }
        }
        serve(&settings, stream)?;
        if args.once {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(s: &str) -> Result<Args, Error> {
        Args::parse(s.split_whitespace().map(str::to_owned))
    }

    #[test]
    fn command_line_is_the_documented_one() {
        let a = parse("--socket /run/x.sock --uid 1000 --journal /tmp/j --once").unwrap();
        assert_eq!(a.uid, Some(1000));
        assert_eq!(a.socket, Some(PathBuf::from("/run/x.sock")));
        assert_eq!(a.journal, PathBuf::from("/tmp/j"));
        assert_eq!(a.resolv_conf, PathBuf::from("/etc/resolv.conf"));
        assert!(a.once && !a.restore);
        assert!(parse("--restore").unwrap().restore);
        assert!(matches!(parse("--socket /x"), Err(Error::Usage(_))));
        assert!(matches!(parse("--uid x"), Err(Error::Usage(_))));
        assert!(matches!(parse("--uid 1 --exec sh"), Err(Error::Usage(_))));
        assert!(matches!(parse("--uid"), Err(Error::Usage(_))));
    }
}
