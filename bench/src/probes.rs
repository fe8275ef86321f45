//! The harness's own servers (in the internet namespace) and clients (in the laptop
//! namespace): request/response latency on a held connection, new connections per
//! second with time to first byte, and many concurrent flows held open.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::Error;
use crate::topo::{self, ECHO_PORT, GREET_PORT};

/// Size of one request and of its response.
pub const RR_LEN: usize = 64;
/// Concurrent clients of the connections-per-second test: enough that the rate is the
/// path's capacity, not one client's round trip (one client measures time to first
/// byte).
pub const CPS_CLIENTS: usize = 16;

/// Serves the echo (port 7000) and greeting (port 7001: one byte at once, then waits
/// for the close) servers on this thread until the process is killed. Run as
/// `vpnshare-bench --serve` inside the internet namespace: a process of its own, so that
/// the 10,000 flows' server ends do not count against the harness's descriptor limit.
/// Prints `serving` once both listen.
pub fn serve() -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async move {
        let listen = |port: u16| -> std::io::Result<tokio::net::TcpListener> {
            let s = tokio::net::TcpSocket::new_v4()?;
            s.set_reuseaddr(true)?;
            s.bind(SocketAddr::from(([0, 0, 0, 0], port)))?;
            s.listen(65535)
        };
        let echo = listen(ECHO_PORT).map_err(|e| format!("listening on {ECHO_PORT}: {e}"))?;
        let greet = listen(GREET_PORT).map_err(|e| format!("listening on {GREET_PORT}: {e}"))?;
        println!("serving");
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                let Ok((mut s, _)) = greet.accept().await else {
                    // Out of descriptors, most likely: let some close.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                tokio::spawn(async move {
                    let _ = s.set_nodelay(true);
                    if s.write_all(b"x").await.is_ok() {
                        let mut b = [0u8; 256];
                        while matches!(s.read(&mut b).await, Ok(n) if n > 0) {}
                    }
                });
            }
        });
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut s, _)) = echo.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut b = vec![0u8; 16 * 1024];
                loop {
                    match s.read(&mut b).await {
                        Ok(n) if n > 0 => {
                            if s.write_all(b.get(..n).unwrap_or_default()).await.is_err() {
                                break;
                            }
                        }
                        _ => break,
                    }
                }
            });
        }
    })
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::Setup(format!("{what}: {e}"))
}

/// Whether a TCP exchange with the echo server works from `ns` (the tunnel is up).
pub fn echo_works(ns: &str, server: SocketAddr) -> bool {
    topo::in_ns(ns, || -> Result<(), Error> {
        let mut s =
            TcpStream::connect_timeout(&server, Duration::from_secs(1)).map_err(io("connect"))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))
            .map_err(io("timeout"))?;
        s.write_all(b"ping").map_err(io("write"))?;
        let mut b = [0u8; 4];
        s.read_exact(&mut b).map_err(io("read"))?;
        Ok(())
    })
    .is_ok_and(|r| r.is_ok())
}

/// Round-trip times in µs of `n` request/response exchanges of [`RR_LEN`] bytes on one
/// held connection (after `warmup` unmeasured ones).
pub fn request_response(
    ns: &str,
    server: SocketAddr,
    n: usize,
    warmup: usize,
) -> Result<Vec<f64>, Error> {
    topo::in_ns(ns, move || -> Result<Vec<f64>, Error> {
        let mut s =
            TcpStream::connect_timeout(&server, Duration::from_secs(3)).map_err(io("connect"))?;
        s.set_nodelay(true).map_err(io("nodelay"))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(io("timeout"))?;
        let req = [0x5au8; RR_LEN];
        let mut resp = [0u8; RR_LEN];
        let mut out = Vec::with_capacity(n);
        for i in 0..n + warmup {
            let t = Instant::now();
            s.write_all(&req).map_err(io("write"))?;
            s.read_exact(&mut resp).map_err(io("read"))?;
            if i >= warmup {
                out.push(t.elapsed().as_secs_f64() * 1e6);
            }
            if i % 1024 == 0 {
                topo::interrupted()?;
            }
        }
        Ok(out)
    })?
}

/// What the connections-per-second test saw.
#[derive(Debug, Clone, Default)]
pub struct CpsResult {
    pub connections: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub seconds: f64,
    /// Time from the start of `connect` to the server's first byte, µs.
    pub ttfb_us: Vec<f64>,
}

fn one_connection(server: &SocketAddr) -> Result<f64, String> {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(server, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| format!("timeout: {e}"))?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
        .map_err(|e| format!("first byte: {e}"))?;
    let ttfb = t.elapsed().as_secs_f64() * 1e6;
    // Close with a RST: no TIME_WAIT piling up on the laptop over thousands of
    // connections (the same for every scenario).
    let _ = nix::sys::socket::setsockopt(
        &s,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
    Ok(ttfb)
}

/// `clients` clients open, read the first byte of, and reset connections to the
/// greeting server for `secs` seconds.
pub fn connections_per_second(
    ns: &str,
    server: SocketAddr,
    secs: f64,
    clients: usize,
) -> Result<CpsResult, Error> {
    topo::in_ns(ns, move || {
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(secs);
        let results: Vec<CpsResult> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..clients.max(1))
                .map(|_| {
                    sc.spawn(move || {
                        let mut r = CpsResult::default();
                        while Instant::now() < end
                            && !topo::INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed)
                        {
                            match one_connection(&server) {
                                Ok(t) => {
                                    r.connections += 1;
                                    r.ttfb_us.push(t);
                                }
                                Err(e) => {
                                    r.errors += 1;
                                    r.first_error.get_or_insert(e);
                                    // A refused or timed-out connection: do not spin.
                                    std::thread::sleep(Duration::from_millis(10));
                                }
                            }
                        }
                        r
                    })
                })
                .collect();
            hs.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        let mut total = CpsResult {
            seconds: start.elapsed().as_secs_f64(),
            ..CpsResult::default()
        };
        for r in results {
            total.connections += r.connections;
            total.errors += r.errors;
            total.ttfb_us.extend(r.ttfb_us);
            if total.first_error.is_none() {
                total.first_error = r.first_error;
            }
        }
        total
    })
}

/// Flows held open through the tunnel.
#[derive(Debug, Default)]
pub struct HeldFlows {
    pub streams: Vec<TcpStream>,
    /// The first connect that failed: how many were open then, and why.
    pub stopped: Option<(usize, String)>,
}

/// Opens up to `n` TCP connections to the echo server from `ns` and keeps them; stops
/// at the first that fails (a cap on flows).
pub fn hold_flows(ns: &str, server: SocketAddr, n: usize) -> Result<HeldFlows, Error> {
    topo::in_ns(ns, move || {
        let mut h = HeldFlows::default();
        for i in 0..n {
            if topo::INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
                h.stopped = Some((i, "interrupted".into()));
                break;
            }
            match TcpStream::connect_timeout(&server, Duration::from_secs(3)) {
                Ok(s) => h.streams.push(s),
                Err(e) => {
                    h.stopped = Some((i, e.to_string()));
                    break;
                }
            }
        }
        h
    })
}

/// Sends one byte on every held flow, then reads the echoes: how many flows are alive.
pub fn live_flows(flows: &mut [TcpStream]) -> usize {
    let mut sent = vec![false; flows.len()];
    for (s, ok) in flows.iter_mut().zip(sent.iter_mut()) {
        *ok = s.write_all(b"y").is_ok();
    }
    // Dead flows each cost their timeout: 2 s at first, then a shared 20 s budget.
    let end = Instant::now() + Duration::from_secs(20);
    let mut live = 0;
    for (s, ok) in flows.iter_mut().zip(sent) {
        if !ok {
            continue;
        }
        let left = end.saturating_duration_since(Instant::now());
        let wait = left.clamp(Duration::from_millis(1), Duration::from_secs(2));
        let _ = s.set_read_timeout(Some(wait));
        let mut b = [0u8; 1];
        if s.read_exact(&mut b).is_ok() {
            live += 1;
        }
    }
    live
}
