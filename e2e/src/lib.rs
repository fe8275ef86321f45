//! Intentionally empty: this package only holds the end-to-end tests in `tests/`, which
//! run the real `vpnshare gateway` (with its `vpnshare-netstack` and `vpnshare-worker`
//! children) inside the testbed's `phone` namespace and drive it from a userspace
//! client in the `laptop` namespace. See `tests/gateway.rs`.
