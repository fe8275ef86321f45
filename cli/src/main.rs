//! `vpnshare`: the command line of VPN Share (design §6).
//!
//! Every failure exits non-zero with one line on stderr naming the reason.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

mod approve;
mod commands;
mod demo;
mod discovery;

#[derive(Debug, Parser)]
#[command(
    name = "vpnshare",
    version,
    about = "Share the VPN that is up on this device with nearby devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start sharing this device's VPN (the gateway), in the foreground.
    Gateway {
        /// Address and port to listen on (UDP and TCP), e.g. 0.0.0.0:7400.
        #[arg(long)]
        listen: String,
        /// State dir (default: $XDG_STATE_HOME/vpnshare or ~/.local/state/vpnshare).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// `vpn` (default): forward only through a VPN interface; `any`: any route.
        #[arg(long, default_value = "vpn")]
        egress: String,
        /// Do not advertise the gateway over mDNS (`_vshp._udp`).
        #[arg(long)]
        no_mdns: bool,
        /// The mDNS instance name (default: this host's name).
        #[arg(long)]
        mdns_name: Option<String>,
        /// Seconds a pairing request waits for approval before the device is told no.
        #[arg(long, default_value_t = broker::pairing::PAIRING_TTL_SECS,
              value_parser = clap::value_parser!(u64).range(1..=3600))]
        pairing_timeout: u64,
        /// TCP connections one peer may hold open through the netstack (default 16384).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        max_flows_per_peer: Option<u32>,
        /// Connections and UDP mappings of all peers together (default 64000, lowered
        /// to what the netstack's descriptor limit allows).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        max_flows: Option<u32>,
    },
    /// Print this device's public key (created if absent) as the last line.
    Id {
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Manage trusted devices: `list`, `add KEY [--name N]`, `revoke NAME_OR_KEY`.
    Peers {
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Answer pairing requests of a running gateway: `list`, `approve CODE`, `deny CODE`.
    Pairing {
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Bring the tunnel up to a gateway given by its vshp:// invite URI.
    Connect {
        /// The invite; omit it with --discover.
        #[arg(required_unless_present = "discover")]
        uri: Option<String>,
        /// Find gateways on the LAN over mDNS for a few seconds, list them and connect
        /// to NAME (an instance name or a fingerprint prefix), or to the first one.
        #[arg(long, num_args = 0..=1, default_missing_value = "", conflicts_with = "uri")]
        discover: Option<String>,
        /// With --discover: only list what was found, do not connect.
        #[arg(long, requires = "discover")]
        list_only: bool,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// `udp` (default) or `tcp`.
        #[arg(long, default_value = "udp")]
        transport: String,
        /// As root: the user the session runs as (default nobody, uid 65534).
        #[arg(long)]
        user: Option<String>,
        /// Not root: the installed helper's socket (default /run/vpnshare-helper.sock).
        #[arg(long)]
        helper_socket: Option<PathBuf>,
        /// The device name shown to the gateway (default: this host's name).
        #[arg(long)]
        name: Option<String>,
        /// As root: the resolver file the helper it starts manages (default
        /// /etc/resolv.conf).
        #[arg(long)]
        resolv_conf: Option<PathBuf>,
    },
    /// Show the running gateway's peers, counters and sandbox state.
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Run the demonstration (as root: namespaces, the real gateway and client, a real
    /// VPN) and print what happened.
    Demo {
        /// Only walk through the protocol core in one process (no root needed).
        #[arg(long)]
        protocol_only: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo { protocol_only } => demo::run(protocol_only),
        Command::Gateway {
            listen,
            state_dir,
            egress,
            no_mdns,
            mdns_name,
            pairing_timeout,
            max_flows_per_peer,
            max_flows,
        } => commands::gateway(commands::GatewayArgs {
            listen,
            state_dir,
            egress,
            mdns: !no_mdns,
            mdns_name,
            pairing_timeout_secs: pairing_timeout,
            netstack_limits: broker::gateway::NetstackLimits {
                max_flows_per_peer,
                max_flows,
            },
        }),
        Command::Id { state_dir } => commands::id(state_dir),
        Command::Peers { state_dir, args } => commands::peers(state_dir, &args),
        Command::Pairing { state_dir, args } => commands::pairing(state_dir, &args),
        Command::Status { json, state_dir } => commands::status(state_dir, json),
        Command::Connect {
            uri,
            discover,
            list_only,
            state_dir,
            transport,
            user,
            helper_socket,
            name,
            resolv_conf,
        } => commands::connect(commands::ConnectArgs {
            uri,
            discover,
            list_only,
            state_dir,
            transport,
            user,
            helper_socket,
            name,
            resolv_conf,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            // One write: the helper a root `connect` started shares this stderr.
            let line = format!("vpnshare: {reason}\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
            ExitCode::FAILURE
        }
    }
}
