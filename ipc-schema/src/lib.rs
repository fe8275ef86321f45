//! Every message that crosses a VPN Share process boundary, with its framing
//!
//! Not built yet: see the open issue that delivers this crate.
