//! JNI adapter that runs the VPN Share gateway inside an Android app
//!
//! Not built yet: see the open issue that delivers this crate.
