//! The empty filesystem view of the parser-sandbox worker.
//!
//! Preferred: a new user namespace and mount namespace, an empty read-only tmpfs made the
//! root with `pivot_root`, and the old root detached — the process then has no path to
//! any file of the host at all. Needs a kernel that allows user namespaces to this user
//! (and a single-threaded process: `unshare(CLONE_NEWUSER)` refuses threaded callers).
//!
//! Fallback 1 (root without user namespaces): `chroot` into a fresh directory that has
//! been removed — nothing can be created in a deleted directory, so the view is empty and
//! stays empty.
//!
//! Fallback 2: no view change; the seccomp allowlist of the worker has no `open`,
//! `openat`, `execve`, `mount` or `chroot`, so the host's files stay out of reach anyway,
//! but a kernel bug in a path-taking syscall would see the real root.

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::unistd::{chdir, chroot, getgid, getuid, pivot_root};

/// Which filesystem view a confined process ended up with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsView {
    /// The role keeps the host's filesystem view (it needs files, or it is the broker).
    Host,
    /// New user + mount namespace; root is an empty read-only tmpfs; old root detached.
    EmptyTmpfsInUserNamespace,
    /// `chroot` into a removed, empty directory (needs CAP_SYS_CHROOT).
    ChrootToRemovedDir,
    /// No view change; only seccomp keeps files out of reach. The reasons the other
    /// mechanisms failed are kept for the log.
    SeccompOnly {
        /// Why the user-namespace view failed.
        userns_error: String,
        /// Why the chroot fallback failed.
        chroot_error: String,
    },
}

/// Builds the empty view with the best mechanism the kernel allows.
///
/// `skip_userns` names why the user-namespace mechanism is not tried (a threaded caller,
/// or tests of the fallback). `scratch` is where the chroot fallback creates its directory.
pub(crate) fn empty_root(skip_userns: Option<String>, scratch: &Path) -> FsView {
    let userns_error = match skip_userns {
        Some(reason) => reason,
        None => match userns_tmpfs_root() {
            Ok(()) => return FsView::EmptyTmpfsInUserNamespace,
            Err(e) => e,
        },
    };
    tracing::warn!(%userns_error, "user-namespace root unavailable, trying chroot fallback");
    match chroot_removed_dir(scratch) {
        Ok(()) => FsView::ChrootToRemovedDir,
        Err(chroot_error) => {
            tracing::warn!(%chroot_error, "no filesystem view change: seccomp only");
            FsView::SeccompOnly {
                userns_error,
                chroot_error,
            }
        }
    }
}

fn userns_tmpfs_root() -> Result<(), String> {
    let uid = getuid();
    let gid = getgid();
    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("unshare(CLONE_NEWUSER|CLONE_NEWNS): {e}"))?;
    // Map our own ids, so files we still hold open keep their owner. setgroups must be
    // denied before an unprivileged gid_map write.
    fs::write("/proc/self/setgroups", "deny").map_err(|e| format!("setgroups: {e}"))?;
    fs::write("/proc/self/uid_map", format!("{uid} {uid} 1"))
        .map_err(|e| format!("uid_map: {e}"))?;
    fs::write("/proc/self/gid_map", format!("{gid} {gid} 1"))
        .map_err(|e| format!("gid_map: {e}"))?;
    // Nothing we do below may propagate back to the host's mount namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("make / private: {e}"))?;
    // Any existing directory can carry the new root's mount point: the mount lives in our
    // private namespace only.
    let mut last = String::from("no mount point");
    for dir in ["/tmp", "/mnt", "/proc", "/"] {
        let flags =
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        match mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            flags,
            Some("size=4k,mode=0555"),
        ) {
            Ok(()) => {
                return pivot_into(dir);
            }
            Err(e) => last = format!("mount tmpfs on {dir}: {e}"),
        }
    }
    Err(last)
}

fn pivot_into(dir: &str) -> Result<(), String> {
    chdir(dir).map_err(|e| format!("chdir {dir}: {e}"))?;
    // pivot_root(".", "."): the old root is stacked on top of the new one, then detached
    // (pivot_root(2), "NOTES").
    pivot_root(".", ".").map_err(|e| format!("pivot_root: {e}"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("detach old root: {e}"))?;
    chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

fn chroot_removed_dir(scratch: &Path) -> Result<(), String> {
    let dir: PathBuf = scratch.join(format!(
        ".vpnshare-empty-root-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    fs::create_dir(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let result = (|| {
        chdir(&dir).map_err(|e| format!("chdir {}: {e}", dir.display()))?;
        // Remove it while we stand in it: a deleted directory cannot gain entries.
        fs::remove_dir(&dir).map_err(|e| format!("remove {}: {e}", dir.display()))?;
        chroot(".").map_err(|e| format!("chroot: {e}"))?;
        chdir("/").map_err(|e| format!("chdir /: {e}"))?;
        Ok(())
    })();
    if result.is_err() {
        // Best effort: do not leave the directory behind (it may already be gone).
        let _ = fs::remove_dir(&dir);
    }
    result
}
