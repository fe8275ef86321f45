//! `vpnshare-netstack`: the gateway's userspace NAT and DNS forwarder process. The
//! broker starts one, with the broker channel on fd 3; see `docs/netstack.md`.

use netstack::process::{self, Args, exit_code};

fn main() {
    security::logging::init();
    let span = tracing::info_span!("netstack", pid = std::process::id());
    let _enter = span.enter();
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vpnshare-netstack: {e}");
            std::process::exit(exit_code::STARTUP);
        }
    };
    let started = match process::start(&args) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "start-up failed");
            eprintln!("vpnshare-netstack: {e}");
            std::process::exit(exit_code::STARTUP);
        }
    };
    tracing::info!(confinement = ?started.confinement, "confined");
    let code = match process::run(started) {
        Ok(code) => code,
        Err(e) => {
            match &e {
                process::RunError::Broker(ipc_schema::ChannelError::Closed) => {
                    tracing::info!("broker closed the channel: netstack stops");
                }
                _ => tracing::warn!(error = %e, "netstack stops"),
            }
            e.exit_code()
        }
    };
    std::process::exit(code);
}
