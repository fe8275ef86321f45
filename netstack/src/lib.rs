//! VPN Share userspace NAT/DNS netstack: smoltcp flows re-originated as OS sockets
//!
//! Not built yet: see the open issue that delivers this crate.
