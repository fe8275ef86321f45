//! `vpnshare-helper`: see docs/client-helper.md.

use std::process::ExitCode;

fn main() -> ExitCode {
    security::logging::init();
    let result = client_helper::Args::parse(std::env::args().skip(1)).and_then(client_helper::run);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("vpnshare-helper: {e}");
            ExitCode::FAILURE
        }
    }
}
