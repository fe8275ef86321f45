//! Process confinement for each VPN Share role: seccomp, capabilities, rlimits, filesystem view
//!
//! Not built yet: see the open issue that delivers this crate.
