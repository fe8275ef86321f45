//! `vpnshare-worker`: the gateway's per-peer worker process. The broker starts one per
//! peer session with the broker channel on fd 3; see `docs/parser-sandbox.md`.

use parser_sandbox::driver::{self, Args, exit_code};

fn main() {
    security::logging::init();
    let span = tracing::info_span!("worker", pid = std::process::id());
    let _enter = span.enter();
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vpnshare-worker: {e}");
            std::process::exit(exit_code::STARTUP);
        }
    };
    let started = match driver::start() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "start-up failed");
            eprintln!("vpnshare-worker: {e}");
            std::process::exit(exit_code::STARTUP);
        }
    };
    tracing::info!(confinement = ?started.confinement, "confined");
    let code = match driver::run(started, &args) {
        Ok(code) => code,
        Err(e) => {
            match &e {
                driver::RunError::Broker(ipc_schema::ChannelError::Closed) => {
                    tracing::info!("broker closed the channel: worker stops");
                }
                _ => tracing::warn!(error = %e, "worker stops"),
            }
            e.exit_code()
        }
    };
    std::process::exit(code);
}
