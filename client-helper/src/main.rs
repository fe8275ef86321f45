//! `vpnshare-helper`: see docs/client-helper.md.

use std::process::ExitCode;

fn main() -> ExitCode {
    // Read RUST_LOG now: `confine` clears the environment. Logs go to stderr with UTC
    // timestamps (local time would open /etc/localtime).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = client_helper::Args::parse(std::env::args().skip(1)).and_then(client_helper::run);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("vpnshare-helper: {e}");
            ExitCode::FAILURE
        }
    }
}
