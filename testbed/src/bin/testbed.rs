//! `testbed up [--file-mb N] [--no-ipv6]`: build the topology, print it, wait for
//! Ctrl-C (or SIGTERM), tear it down.
//! `testbed cleanup [--all | --prefix vstb-PID-N]`: remove the namespaces of dead
//! testbeds (or of all, or those whose name starts with the prefix).
//! `testbed list`: print the testbed namespaces present.

use std::process::ExitCode;

use nix::sys::signal::{SigSet, Signal};

const USAGE: &str = "usage: testbed up [--file-mb N] [--no-ipv6] | testbed cleanup [--all | --prefix vstb-PID-N] | testbed list";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("testbed: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("up") => up(&args[1..]),
        Some("cleanup") => {
            let removed = match args.get(1).map(String::as_str) {
                Some("--all") => testbed::cleanup(testbed::NS_PREFIX),
                Some("--prefix") => match args.get(2) {
                    Some(p) if p.starts_with(testbed::NS_PREFIX) => testbed::cleanup(p),
                    _ => {
                        return Err(format!(
                            "--prefix needs a prefix starting with {}",
                            testbed::NS_PREFIX
                        ));
                    }
                },
                None => testbed::cleanup_stale(),
                Some(other) => return Err(format!("unknown option {other}\n{USAGE}")),
            };
            for name in &removed {
                println!("removed {name}");
            }
            println!("{} namespace(s) removed", removed.len());
            Ok(())
        }
        Some("list") => {
            for name in testbed::list_namespaces() {
                println!("{name}");
            }
            Ok(())
        }
        Some("-h" | "--help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(USAGE.to_owned()),
    }
}

fn up(args: &[String]) -> Result<(), String> {
    let mut builder = testbed::Testbed::builder();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--file-mb" => {
                let n = it
                    .next()
                    .and_then(|v| v.parse::<usize>().ok())
                    .ok_or("--file-mb needs a number")?;
                builder = builder.http_file_mb(n);
            }
            "--no-ipv6" => builder = builder.ipv6(false),
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    // Block the signals before any thread exists so that every thread inherits the
    // mask and only `wait` below receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals
        .thread_block()
        .map_err(|e| format!("blocking signals: {e}"))?;

    let tb = builder.build().map_err(|e| e.to_string())?;
    print!("{}", tb.describe());
    println!(
        "try: ip netns exec {} curl -o /dev/null http://{}/file",
        tb.ns(testbed::Node::Phone),
        tb.http_addr()
    );
    println!("Ctrl-C to tear down");
    let sig = signals
        .wait()
        .map_err(|e| format!("waiting for a signal: {e}"))?;
    println!("{sig:?}: tearing down");
    drop(tb);
    Ok(())
}
