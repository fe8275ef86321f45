//! vpnshare-helper: the only privileged code on the client (TUN, routes, DNS)
//!
//! Not built yet: see the open issue that delivers this crate.
