//! Compiles the policy tables of [`crate::policy`] into seccomp BPF with seccompiler and
//! installs them on every thread of the process (TSYNC).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::policy::{self, Args, Cmp, Cond, FilterKind, Width};
use crate::{Error, Role, Threads, Violation};

/// The filters of a role, in the order they must be installed.
#[derive(Debug)]
pub(crate) struct Compiled {
    /// Filters to install, in order. The errno filters come first: once the allowlist is
    /// installed, `seccomp()` itself is no longer allowed.
    pub programs: Vec<BpfProgram>,
    /// How many syscalls the main filter lists.
    pub listed: usize,
    /// Allowlist or denylist.
    pub kind: FilterKind,
}

fn target_arch() -> Result<TargetArch, Error> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| Error::UnsupportedArch(std::env::consts::ARCH))
}

fn condition(c: &Cond) -> Result<SeccompCondition, Error> {
    let len = match c.width {
        Width::Dword => SeccompCmpArgLen::Dword,
        Width::Qword => SeccompCmpArgLen::Qword,
    };
    let op = match c.cmp {
        Cmp::Eq => SeccompCmpOp::Eq,
        Cmp::MaskedEq(mask) => SeccompCmpOp::MaskedEq(mask),
    };
    Ok(SeccompCondition::new(c.arg, len, op, c.value)?)
}

fn rules(args: &Args) -> Result<Vec<SeccompRule>, Error> {
    match args {
        Args::Any | Args::Errno(_) => Ok(Vec::new()),
        Args::OneOf(alts) => alts
            .iter()
            .map(|alt| {
                let conds = alt.iter().map(condition).collect::<Result<Vec<_>, _>>()?;
                Ok(SeccompRule::new(conds)?)
            })
            .collect(),
    }
}

/// Builds the BPF programs of a role.
pub(crate) fn compile(
    role: Role,
    threads: Threads,
    violation: Violation,
) -> Result<Compiled, Error> {
    let arch = target_arch()?;
    let (kind, _) = policy::tables(role);
    let list = policy::syscalls(role);
    let violation_action = match violation {
        Violation::KillProcess => SeccompAction::KillProcess,
        Violation::Log => SeccompAction::Log,
    };

    let mut main: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut errno: BTreeMap<i32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
    for sc in &list {
        if threads == Threads::Forbidden && sc.nr == libc::SYS_clone {
            continue;
        }
        if let Args::Errno(e) = sc.args {
            errno.entry(e).or_default().insert(sc.nr, Vec::new());
        }
        main.insert(sc.nr, rules(&sc.args)?);
    }
    let listed = main.len();

    let mut programs = Vec::new();
    for (e, map) in errno {
        let errno_u32 = u32::try_from(e).map_err(|_| Error::Policy("negative errno"))?;
        let filter = SeccompFilter::new(
            map,
            SeccompAction::Allow,
            SeccompAction::Errno(errno_u32),
            arch,
        )?;
        programs.push(BpfProgram::try_from(filter)?);
    }
    let filter = match kind {
        FilterKind::Allowlist => {
            SeccompFilter::new(main, violation_action, SeccompAction::Allow, arch)?
        }
        FilterKind::Denylist => {
            SeccompFilter::new(main, SeccompAction::Allow, violation_action, arch)?
        }
    };
    programs.push(BpfProgram::try_from(filter)?);
    Ok(Compiled {
        programs,
        listed,
        kind,
    })
}

/// Installs the compiled filters on every thread of the process.
pub(crate) fn install(compiled: &Compiled) -> Result<(), Error> {
    for program in &compiled.programs {
        seccompiler::apply_filter_all_threads(program)?;
    }
    Ok(())
}
