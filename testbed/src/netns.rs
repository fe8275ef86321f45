//! Network namespace plumbing: create and delete named namespaces (`ip netns`), run
//! closures on a thread that entered a namespace (`setns`), run `ip` batches, find and
//! kill the processes living in a namespace.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::Error;

/// Where `ip netns` keeps its bind mounts.
pub(crate) const NETNS_DIR: &str = "/run/netns";

pub(crate) fn netns_path(ns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(ns)
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Runs `ip ARGS...` and fails with its stderr when it exits non-zero.
pub(crate) fn ip(args: &[&str]) -> Result<String, Error> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io_err("running ip (iproute2)"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            cmd: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Runs a batch of `ip` commands (one a line, without the leading `ip`) inside `ns`
/// with one `ip -n NS -batch -`; the first failing line fails the batch.
pub(crate) fn ip_batch(ns: &str, lines: &[String]) -> Result<(), Error> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err("running ip (iproute2)"))?;
    let script = lines.join("\n") + "\n";
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(io_err("writing an ip batch"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(io_err("waiting for ip -batch"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            cmd: format!("ip -n {ns} -batch - <<< {script:?}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

pub(crate) fn add(ns: &str) -> Result<(), Error> {
    // Concurrent first uses of /run/netns (it is made a shared mount point by the
    // first `ip netns add`) can race between processes: retry once.
    match ip(&["netns", "add", ns]) {
        Ok(_) => Ok(()),
        Err(first) => {
            std::thread::sleep(Duration::from_millis(50));
            if netns_path(ns).exists() {
                return Err(first);
            }
            ip(&["netns", "add", ns]).map(|_| ())
        }
    }
}

/// Kills every process in `ns`, then deletes it. Missing namespaces are not an error.
pub(crate) fn delete(ns: &str) -> Result<(), Error> {
    if !netns_path(ns).exists() {
        return Ok(());
    }
    kill_processes_in(ns);
    let mut last = None;
    for _ in 0..5 {
        match ip(&["netns", "delete", ns]) {
            Ok(_) => return Ok(()),
            Err(e) => {
                if !netns_path(ns).exists() {
                    return Ok(());
                }
                last = Some(e);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    match last {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The names in `/run/netns` that start with `prefix`.
pub(crate) fn list_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

fn ns_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Processes (other than this one) whose network namespace is `ns`, like
/// `ip netns pids`.
pub(crate) fn pids_in(ns: &str) -> Vec<i32> {
    let Some(target) = ns_id(&netns_path(ns)) else {
        return Vec::new();
    };
    let me = std::process::id();
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc_dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|&pid| pid != me)
        .filter(|pid| {
            ns_id(&Path::new("/proc").join(pid.to_string()).join("ns/net")) == Some(target)
        })
        .filter_map(|pid| i32::try_from(pid).ok())
        .collect()
}

/// SIGKILLs every process living in `ns` and waits (up to a second) until none is left.
pub(crate) fn kill_processes_in(ns: &str) {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let pids = pids_in(ns);
        if pids.is_empty() || Instant::now() > deadline {
            if !pids.is_empty() {
                tracing::warn!(ns, ?pids, "processes still alive in namespace");
            }
            return;
        }
        for pid in pids {
            tracing::debug!(ns, pid, "killing process left in namespace");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Gives the calling thread (which must be one of `in_netns`'s) a private mount
/// namespace with `/sys` remounted for the network namespace it is in, and, when
/// `resolv_conf` is given, that file bind-mounted over `/etc/resolv.conf`, as
/// `ip netns exec` does with `/etc/netns/NAME/`. Children it spawns inherit both.
pub(crate) fn private_mounts(ns: &str, resolv_conf: Option<&Path>) -> Result<(), Error> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    let sys_err = |what: &str| {
        let what = format!("{what} (for {ns})");
        move |e: nix::Error| Error::Io {
            what,
            source: e.into(),
        }
    };
    nix::sched::unshare(CloneFlags::CLONE_NEWNS).map_err(sys_err("unshare(CLONE_NEWNS)"))?;
    // Keep our mounts from propagating back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys_err("making / a slave mount"))?;
    // As `ip netns exec`: without a fresh sysfs, children see the host's
    // /sys/class/net, which is worth a warning, not a failure.
    let remounted = umount2("/sys", MntFlags::MNT_DETACH).and_then(|()| {
        mount(
            Some(ns),
            "/sys",
            Some("sysfs"),
            MsFlags::empty(),
            None::<&str>,
        )
    });
    if let Err(e) = remounted {
        tracing::warn!(ns, error = %e, "could not remount /sys for the namespace");
    }
    if let Some(file) = resolv_conf {
        if Path::new("/etc/resolv.conf").exists() {
            mount(
                Some(file),
                "/etc/resolv.conf",
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(sys_err("bind-mounting /etc/resolv.conf"))?;
        }
    }
    Ok(())
}

/// Runs `f` on a new thread that has entered the network namespace `ns`, and returns
/// its result. Sockets created by `f` belong to `ns` for their whole life, whichever
/// thread uses them later; threads spawned by `f` start inside `ns` too.
pub(crate) fn in_netns<T, F>(ns: &str, f: F) -> Result<T, Error>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let file = File::open(netns_path(ns)).map_err(io_err(format!("opening namespace {ns}")))?;
    std::thread::scope(|s| {
        let handle = s.spawn(move || -> Result<T, Error> {
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| Error::Setns {
                ns: ns.to_owned(),
                source,
            })?;
            Ok(f())
        });
        handle
            .join()
            .map_err(|_| Error::ThreadPanicked(ns.to_owned()))?
    })
}
