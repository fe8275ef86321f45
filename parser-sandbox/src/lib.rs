//! VPN Share sandboxed per-peer worker: Noise, VSHP decode, packet validation
//!
//! Not built yet: see the open issue that delivers this crate.
