//! VPN Share gateway broker: identity, peers, leases, policy, supervision
//!
//! Not built yet: see the open issue that delivers this crate.
