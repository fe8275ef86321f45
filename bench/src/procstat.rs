//! CPU time and memory of processes, from `/proc/<pid>/stat` and `/proc/<pid>/status`.

use std::collections::{BTreeMap, BTreeSet};

/// The fields of `/proc/<pid>/stat` the harness uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub pid: u32,
    /// The command name (up to 15 bytes, may hold spaces and parentheses).
    pub comm: String,
    pub ppid: u32,
    /// User and system CPU time of all the process's threads, in clock ticks.
    pub utime: u64,
    pub stime: u64,
}

/// Why a stat line could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StatError {
    #[error("no parenthesised command name")]
    NoComm,
    #[error("field {0} missing or not a number")]
    Field(&'static str),
}

/// Parses one `/proc/<pid>/stat` line. The command name is everything between the
/// first `(` and the LAST `)`, since it may itself contain `)` and spaces.
pub fn parse_stat(line: &str) -> Result<Stat, StatError> {
    let open = line.find('(').ok_or(StatError::NoComm)?;
    let close = line.rfind(')').ok_or(StatError::NoComm)?;
    if close < open {
        return Err(StatError::NoComm);
    }
    let pid = line
        .get(..open)
        .and_then(|p| p.trim().parse().ok())
        .ok_or(StatError::Field("pid"))?;
    let comm = line.get(open + 1..close).unwrap_or_default().to_owned();
    // After ") ": field 3 (state) is index 0, so field N is index N - 3.
    let rest: Vec<&str> = line
        .get(close + 1..)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let field = |n: usize, name: &'static str| -> Result<u64, StatError> {
        rest.get(n - 3)
            .and_then(|s| s.parse().ok())
            .ok_or(StatError::Field(name))
    };
    Ok(Stat {
        pid,
        comm,
        ppid: u32::try_from(field(4, "ppid")?).map_err(|_| StatError::Field("ppid"))?,
        utime: field(14, "utime")?,
        stime: field(15, "stime")?,
    })
}

/// `VmRSS` of a `/proc/<pid>/status` text, in KiB.
pub fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 on Linux when unknown).
pub fn clk_tck() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// The stat of `pid`, if it still lives.
pub fn stat_of(pid: u32) -> Option<Stat> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&s).ok()
}

/// Every process now running.
pub fn all() -> Vec<Stat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(stat_of)
        .collect()
}

/// `roots` and all their descendants, found in `procs` (a snapshot of [`all`]).
pub fn tree(procs: &[Stat], roots: &[u32]) -> Vec<Stat> {
    let mut children: BTreeMap<u32, Vec<&Stat>> = BTreeMap::new();
    for p in procs {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut stack: Vec<u32> = roots.to_vec();
    while let Some(pid) = stack.pop() {
        if !seen.insert(pid) {
            continue;
        }
        if let Some(p) = procs.iter().find(|p| p.pid == pid) {
            out.push(p.clone());
        }
        for c in children.get(&pid).into_iter().flatten() {
            stack.push(c.pid);
        }
    }
    out.sort_by_key(|p| p.pid);
    out
}

/// The CPU ticks of a set of processes at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuSnapshot {
    pub ticks: BTreeMap<u32, u64>,
}

impl CpuSnapshot {
    /// Current utime + stime of `pids` (the dead ones are left out).
    pub fn take(pids: &[u32]) -> Self {
        Self {
            ticks: pids
                .iter()
                .filter_map(|&p| stat_of(p).map(|s| (p, s.utime + s.stime)))
                .collect(),
        }
    }

    /// CPU seconds spent between `self` and `later`, over the processes in both.
    pub fn seconds_until(&self, later: &CpuSnapshot, tck: f64) -> f64 {
        self.by_pid_until(later).values().sum::<u64>() as f64 / tck
    }

    /// Ticks each process spent between `self` and `later` (processes in both).
    pub fn by_pid_until(&self, later: &CpuSnapshot) -> BTreeMap<u32, u64> {
        later
            .ticks
            .iter()
            .filter_map(|(pid, t)| self.ticks.get(pid).map(|t0| (*pid, t.saturating_sub(*t0))))
            .collect()
    }
}

/// Sums per-pid values by command name (`names`: pid → comm; unknown pids count as
/// "?"), e.g. to say how much of the gateway's CPU time the netstack took.
pub fn by_name<V: Copy + std::ops::Add<Output = V>>(
    values: &BTreeMap<u32, V>,
    names: &BTreeMap<u32, String>,
) -> BTreeMap<String, V> {
    let mut out: BTreeMap<String, V> = BTreeMap::new();
    for (pid, v) in values {
        let name = names.get(pid).cloned().unwrap_or_else(|| "?".to_owned());
        out.entry(name).and_modify(|x| *x = *x + *v).or_insert(*v);
    }
    out
}

/// RSS of each of `pids` in KiB (the dead ones are left out).
pub fn rss_kib_by_pid(pids: &[u32]) -> BTreeMap<u32, u64> {
    pids.iter()
        .filter_map(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/status"))
                .ok()
                .as_deref()
                .and_then(parse_vm_rss_kib)
                .map(|k| (p, k))
        })
        .collect()
}

/// Total RSS of `pids` in KiB (the dead ones count 0).
pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status"))
                .ok()
                .as_deref()
                .and_then(parse_vm_rss_kib)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_line_with_odd_command_name() {
        // A real line of this machine, with a command name holding ") (".
        let line = "4242 (we) (ird x) S 17 4242 4242 0 -1 4194560 1032 0 0 0 123 45 0 0 20 0 3 0 991 12345678 900 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.pid, 4242);
        assert_eq!(s.comm, "we) (ird x");
        assert_eq!(s.ppid, 17);
        assert_eq!((s.utime, s.stime), (123, 45));
    }

    #[test]
    fn stat_of_this_process() {
        let me = std::process::id();
        let s = stat_of(me).unwrap();
        assert_eq!(s.pid, me);
        assert!(s.ppid > 0);
    }

    #[test]
    fn bad_stat_lines_are_errors() {
        assert_eq!(parse_stat("12 no comm"), Err(StatError::NoComm));
        assert_eq!(parse_stat("x (a) S 1"), Err(StatError::Field("pid")));
        assert_eq!(parse_stat("12 (a) S 1 2"), Err(StatError::Field("utime")));
        assert_eq!(parse_stat("12 (a) S z"), Err(StatError::Field("ppid")));
        assert_eq!(parse_stat(")12 ("), Err(StatError::NoComm));
    }

    #[test]
    fn sums_by_command_name() {
        let values: BTreeMap<u32, u64> = [(1, 10), (2, 5), (3, 7), (4, 1)].into_iter().collect();
        let names: BTreeMap<u32, String> = [(1, "worker"), (2, "netstack"), (3, "worker")]
            .into_iter()
            .map(|(p, n)| (p, n.to_owned()))
            .collect();
        let by = by_name(&values, &names);
        assert_eq!(by.get("worker"), Some(&17));
        assert_eq!(by.get("netstack"), Some(&5));
        assert_eq!(by.get("?"), Some(&1));
        let d = CpuSnapshot {
            ticks: [(1, 3), (2, 9)].into_iter().collect(),
        }
        .by_pid_until(&CpuSnapshot {
            ticks: [(1, 5), (2, 9), (3, 4)].into_iter().collect(),
        });
        assert_eq!(d, [(1, 2), (2, 0)].into_iter().collect());
    }

    #[test]
    fn vm_rss() {
        let st = "Name:\tx\nVmPeak:\t  9999 kB\nVmRSS:\t    4321 kB\nThreads:\t1\n";
        assert_eq!(parse_vm_rss_kib(st), Some(4321));
        assert_eq!(parse_vm_rss_kib("Name:\tkthread\n"), None);
    }

    #[test]
    fn tree_follows_parents() {
        let p = |pid, ppid| Stat {
            pid,
            comm: String::new(),
            ppid,
            utime: 0,
            stime: 0,
        };
        let procs = vec![p(1, 0), p(10, 1), p(11, 10), p(12, 11), p(20, 1), p(13, 10)];
        let t: Vec<u32> = tree(&procs, &[10]).iter().map(|s| s.pid).collect();
        assert_eq!(t, vec![10, 11, 12, 13]);
        assert!(tree(&procs, &[99]).is_empty());
    }

    #[test]
    fn cpu_delta_counts_processes_in_both_snapshots() {
        let a = CpuSnapshot {
            ticks: [(1, 100), (2, 50)].into_iter().collect(),
        };
        let b = CpuSnapshot {
            ticks: [(1, 300), (3, 999)].into_iter().collect(),
        };
        assert!((a.seconds_until(&b, 100.0) - 2.0).abs() < 1e-9);
    }
}
