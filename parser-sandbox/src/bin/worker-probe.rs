//! Test support: starts exactly as `vpnshare-worker` does (broker channel on fd 3, then
//! `confine(ParserWorker)`), prints `confined`, then calls `socket(AF_INET, SOCK_DGRAM)`,
//! which the ParserWorker filter answers with SIGSYS. Prints `survived` if it returns.

fn main() {
    let started = match parser_sandbox::driver::start() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("worker-probe: {e}");
            std::process::exit(1);
        }
    };
    println!("confined {:?}", started.confinement.fs_view);
    // SAFETY: plain syscall with integer arguments; the seccomp filter is expected to
    // kill the process before it returns.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    println!("survived {fd}");
    drop(started);
}
