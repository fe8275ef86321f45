//! Logging for a process that will confine itself (worker, netstack, helper).
//!
//! Call it first thing in `main`: `RUST_LOG` is read now because `confine` clears the
//! environment, and timestamps are UTC because local time would open `/etc/localtime`,
//! which the sandbox forbids. Logs go to stderr without colour (the broker or systemd
//! collects them).

/// Installs the stderr subscriber (filter from `RUST_LOG`, default `info`).
pub fn init() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
}
