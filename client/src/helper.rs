//! The session's side of the helper: find or start `vpnshare-helper`, drop privileges,
//! and the closed list of requests (OpenTun, SetRoutes, SetDns, TearDown).

use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipc_schema::bounded::BoundedVec;
use ipc_schema::messages::session_helper::{
    HelperRefusal, HelperToSession, SessionEnd, SessionToHelper,
};
use ipc_schema::{Channel, Incoming};
use vshp::lease::Lease;

use crate::ConnectError;

/// The socket of an installed (systemd-activated) helper.
pub const DEFAULT_HELPER_SOCKET: &str = "/run/vpnshare-helper.sock";
/// The helper's binary name, looked up next to the running executable.
pub const HELPER_BIN: &str = "vpnshare-helper";
/// Overrides where the helper binary is.
pub const HELPER_ENV: &str = "VPNSHARE_HELPER";

/// How long the helper may take to answer one request.
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);

/// The helper we started ourselves (as root), and its private directory.
#[derive(Debug)]
pub struct SpawnedHelper {
    pub child: Child,
    pub dir: PathBuf,
    pub socket: PathBuf,
}

/// Where `vpnshare-helper` is: `$VPNSHARE_HELPER`, else next to this executable (or one
/// level up, for test binaries in `target/*/deps`).
pub fn helper_binary() -> Option<PathBuf> {
    broker::sibling_binary(HELPER_ENV, HELPER_BIN).filter(|p| p.is_file())
}

/// Starts `vpnshare-helper --socket DIR/helper.sock --uid UID --journal JOURNAL --once`
/// in its own process group (Ctrl-C on the terminal reaches the session only, which
/// then tears down through the helper) and waits for its socket.
pub fn spawn_helper(
    uid: u32,
    journal: &Path,
    resolv_conf: Option<&Path>,
) -> Result<SpawnedHelper, ConnectError> {
    let exe = helper_binary().ok_or_else(|| {
        ConnectError::HelperMissing(
            broker::sibling_binary(HELPER_ENV, HELPER_BIN)
                .unwrap_or_else(|| PathBuf::from(HELPER_BIN)),
        )
    })?;
    let dir = PathBuf::from(format!("/run/vpnshare/connect-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|source| ConnectError::Io {
        what: "cannot create the helper's socket directory",
        source,
    })?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755));
    }
    let socket = dir.join("helper.sock");
    let mut cmd = Command::new(&exe);
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--uid")
        .arg(uid.to_string())
        .arg("--journal")
        .arg(journal)
        .arg("--once");
    if let Some(r) = resolv_conf {
        cmd.arg("--resolv-conf").arg(r);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .process_group(0);
    let child = cmd
        .spawn()
        .map_err(|e| ConnectError::HelperFailed(format!("cannot start {}: {e}", exe.display())))?;
    let mut helper = SpawnedHelper { child, dir, socket };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !helper.socket.exists() {
        if let Ok(Some(status)) = helper.child.try_wait() {
            return Err(ConnectError::HelperFailed(format!(
                "{} exited at start ({status}); its log is above",
                exe.display()
            )));
        }
        if Instant::now() > deadline {
            let _ = helper.child.kill();
            return Err(ConnectError::HelperFailed(format!(
                "{} did not create its socket {} within 10 s",
                exe.display(),
                helper.socket.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(helper)
}

/// Runs `f` with `uid`/`gid` as the effective ids, then returns to root (the saved
/// set-user-ID keeps that possible until [`drop_privileges`]).
pub fn as_user<T>(
    uid: u32,
    gid: u32,
    f: impl FnOnce() -> Result<T, ConnectError>,
) -> Result<T, ConnectError> {
    use nix::unistd::{Gid, Uid, setegid, seteuid};
    let err = |what: &str, e: nix::Error| ConnectError::Privileges(format!("{what}: {e}"));
    setegid(Gid::from_raw(gid)).map_err(|e| err("setegid", e))?;
    seteuid(Uid::from_raw(uid)).map_err(|e| err("seteuid", e))?;
    let r = f();
    seteuid(Uid::from_raw(0)).map_err(|e| err("seteuid back to root", e))?;
    setegid(Gid::from_raw(0)).map_err(|e| err("setegid back to root", e))?;
    r
}

/// Drops from root to `uid`/`gid` for good: no supplementary groups, then gid, then uid.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), ConnectError> {
    use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};
    let err = |what: &str, e: nix::Error| ConnectError::Privileges(format!("{what}: {e}"));
    setgroups(&[]).map_err(|e| err("setgroups", e))?;
    setgid(Gid::from_raw(gid)).map_err(|e| err("setgid", e))?;
    setuid(Uid::from_raw(uid)).map_err(|e| err("setuid", e))?;
    if setuid(Uid::from_raw(0)).is_ok() {
        return Err(ConnectError::Privileges(
            "root could be regained after dropping privileges".into(),
        ));
    }
    Ok(())
}

/// The open channel to the helper.
#[derive(Debug)]
pub struct Helper {
    chan: Channel<SessionEnd>,
}

impl Helper {
    /// Connects to the helper's socket and opens the channel (version hello).
    pub fn connect(socket: &Path) -> Result<Self, ConnectError> {
        let stream = UnixStream::connect(socket).map_err(|e| ConnectError::HelperUnreachable {
            path: socket.to_path_buf(),
            reason: e.to_string(),
        })?;
        let _ = stream.set_read_timeout(Some(HELPER_TIMEOUT));
        let _ = stream.set_write_timeout(Some(HELPER_TIMEOUT));
        let chan = Channel::open(stream).map_err(|e| ConnectError::HelperUnreachable {
            path: socket.to_path_buf(),
            reason: format!("the helper did not accept this session ({e}); it serves one uid only"),
        })?;
        Ok(Self { chan })
    }

    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.chan.as_fd()
    }

    fn call(
        &mut self,
        what: &'static str,
        req: &SessionToHelper,
    ) -> Result<Incoming<HelperToSession>, ConnectError> {
        self.chan
            .send(req, &[])
            .map_err(|e| ConnectError::HelperFailed(format!("{what}: {e}")))?;
        let reply = self
            .chan
            .recv()
            .map_err(|e| ConnectError::HelperFailed(format!("{what}: no answer: {e}")))?;
        if let HelperToSession::Refused(r) = reply.msg {
            return Err(ConnectError::HelperRefused {
                what,
                reason: describe_refusal(r),
            });
        }
        Ok(reply)
    }

    /// OpenTun → the TUN's descriptor, its name, and whether it carries virtio-net
    /// headers (offload on: `crate::tun_offload`).
    pub fn open_tun(&mut self, lease: &Lease) -> Result<(OwnedFd, String, bool), ConnectError> {
        let mut reply = self.call(
            "opening the TUN",
            &SessionToHelper::OpenTun {
                ipv4: lease.ipv4,
                ipv6: lease.ipv6,
                mtu: lease.mtu,
            },
        )?;
        match (reply.msg, reply.fds.pop()) {
            (
                HelperToSession::TunOpened {
                    ifname, vnet_hdr, ..
                },
                Some(fd),
            ) => Ok((fd, ifname.as_str().to_owned(), vnet_hdr)),
            (other, _) => Err(ConnectError::HelperFailed(format!(
                "opening the TUN: unexpected answer {other:?}"
            ))),
        }
    }

    /// SetRoutes (the lease's routes; `gateway` stays on its original route) and SetDns.
    pub fn configure(&mut self, lease: &Lease, gateway: IpAddr) -> Result<(), ConnectError> {
        let routes = BoundedVec::new(lease.routes.clone())
            .map_err(|_| ConnectError::HelperFailed("too many routes in the lease".into()))?;
        self.expect_done(
            "setting routes",
            &SessionToHelper::SetRoutes { routes, gateway },
        )?;
        let servers = BoundedVec::new(lease.dns.clone())
            .map_err(|_| ConnectError::HelperFailed("too many DNS servers in the lease".into()))?;
        self.expect_done("setting DNS", &SessionToHelper::SetDns { servers })
    }

    /// Changes the live TUN from `old`'s configuration to `new`'s (same addresses): only
    /// what differs — SetMtu, SetRoutes, SetDns. Teardown restores routes and DNS as
    /// always (the helper's journal); the MTU goes with the TUN.
    pub fn apply_delta(
        &mut self,
        old: &Lease,
        new: &Lease,
        gateway: IpAddr,
    ) -> Result<(), ConnectError> {
        if old.mtu != new.mtu {
            self.expect_done("setting the MTU", &SessionToHelper::SetMtu { mtu: new.mtu })?;
        }
        if old.routes != new.routes {
            let routes = BoundedVec::new(new.routes.clone())
                .map_err(|_| ConnectError::HelperFailed("too many routes in the lease".into()))?;
            self.expect_done(
                "setting routes",
                &SessionToHelper::SetRoutes { routes, gateway },
            )?;
        }
        if old.dns != new.dns {
            let servers = BoundedVec::new(new.dns.clone()).map_err(|_| {
                ConnectError::HelperFailed("too many DNS servers in the lease".into())
            })?;
            self.expect_done("setting DNS", &SessionToHelper::SetDns { servers })?;
        }
        Ok(())
    }

    /// TearDown: routes, DNS and the TUN restored.
    pub fn tear_down(&mut self) -> Result<(), ConnectError> {
        self.expect_done("tearing down", &SessionToHelper::TearDown)
    }

    fn expect_done(
        &mut self,
        what: &'static str,
        req: &SessionToHelper,
    ) -> Result<(), ConnectError> {
        match self.call(what, req)?.msg {
            HelperToSession::Done => Ok(()),
            other => Err(ConnectError::HelperFailed(format!(
                "{what}: unexpected answer {other:?}"
            ))),
        }
    }
}

fn describe_refusal(r: HelperRefusal) -> String {
    match r {
        HelperRefusal::SecondTun => "this session already has a TUN".into(),
        HelperRefusal::NoTun => "no TUN open yet".into(),
        HelperRefusal::OutsidePolicy => {
            "outside the helper's policy (/etc/vpnshare/helper.policy)".into()
        }
        HelperRefusal::System { errno } => {
            format!(
                "system error: {}",
                nix::errno::Errno::from_raw(errno).desc()
            )
        }
    }
}
