//! A userspace WireGuard interface (boringtun's `device`) living in a namespace.
//!
//! `DeviceHandle::new` is called on a thread that entered the namespace, so the TUN
//! interface, the UDP sockets and the worker threads (which inherit the creator's
//! namespace) all live there. Configuration goes over boringtun's UAPI (the
//! `wg(8)` cross-platform text protocol) on a socket pair (`uapi_fd`) rather than the
//! default `/var/run/wireguard/NAME.sock`, which is one path for every namespace and
//! would collide between instances. Closing our end of the pair stops the device.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::fd::IntoRawFd as _;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use boringtun::device::{DeviceConfig, DeviceHandle};
use boringtun::x25519::{PublicKey, StaticSecret};

use crate::content::hex;
use crate::{Error, netns};

/// A WireGuard key pair.
#[derive(Clone)]
pub(crate) struct Keys {
    pub secret: [u8; 32],
    pub public: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("public", &hex(&self.public))
            .finish_non_exhaustive()
    }
}

impl Keys {
    pub fn generate() -> Result<Self, Error> {
        let mut secret = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut secret))
            .map_err(|source| Error::Io {
                what: "reading /dev/urandom".into(),
                source,
            })?;
        let public = PublicKey::from(&StaticSecret::from(secret)).to_bytes();
        Ok(Self { secret, public })
    }
}

/// Counters and state boringtun reports for the one peer of an interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WgPeerStats {
    /// Seconds since the last completed handshake, if there was one.
    pub last_handshake_secs: Option<u64>,
    /// Bytes received from the peer (encrypted, as boringtun counts them).
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
}

pub(crate) struct WgDevice {
    ns: String,
    ctl: Mutex<Option<UnixStream>>,
    handle: Option<DeviceHandle>,
}

impl std::fmt::Debug for WgDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgDevice")
            .field("ns", &self.ns)
            .finish_non_exhaustive()
    }
}

fn wg_err(ns: &str, msg: impl std::fmt::Display) -> Error {
    Error::WireGuard {
        ns: ns.to_owned(),
        msg: msg.to_string(),
    }
}

impl WgDevice {
    /// Creates the TUN interface `ifname` in `ns`, driven by `threads` boringtun
    /// worker threads.
    pub fn start(ns: &str, ifname: &str, threads: usize) -> Result<Self, Error> {
        let (ours, theirs) = UnixStream::pair().map_err(|e| wg_err(ns, e))?;
        ours.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| wg_err(ns, e))?;
        let uapi_fd = theirs.into_raw_fd();
        let config = DeviceConfig {
            n_threads: threads.max(1),
            use_connected_socket: true,
            use_multi_queue: true,
            uapi_fd,
        };
        let handle = netns::in_netns(ns, || DeviceHandle::new(ifname, config))?
            .map_err(|e| wg_err(ns, format!("creating {ifname}: {e}")))?;
        Ok(Self {
            ns: ns.to_owned(),
            ctl: Mutex::new(Some(ours)),
            handle: Some(handle),
        })
    }

    /// Sends one UAPI command (`set=1` or `get=1` and its lines) and returns the
    /// answer's lines without the final `errno=0`.
    fn uapi(&self, request: &str) -> Result<Vec<String>, Error> {
        let guard = self
            .ctl
            .lock()
            .map_err(|_| wg_err(&self.ns, "control lock poisoned"))?;
        let Some(ctl) = guard.as_ref() else {
            return Err(wg_err(&self.ns, "device stopped"));
        };
        (&*ctl)
            .write_all(request.as_bytes())
            .map_err(|e| wg_err(&self.ns, format!("uapi write: {e}")))?;
        let mut reader = BufReader::new(ctl);
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = reader
                .read_line(&mut line)
                .map_err(|e| wg_err(&self.ns, format!("uapi read: {e}")))?;
            if n == 0 {
                return Err(wg_err(&self.ns, "uapi closed"));
            }
            let line = line.trim_end().to_owned();
            if let Some(errno) = line.strip_prefix("errno=") {
                if errno != "0" {
                    return Err(wg_err(&self.ns, format!("uapi answered errno={errno}")));
                }
                // The blank line that ends the answer.
                let mut blank = String::new();
                let _ = reader.read_line(&mut blank);
                return Ok(lines);
            }
            lines.push(line);
        }
    }

    /// Sets the private key, optional listen port, and the single peer.
    pub fn configure(
        &self,
        keys: &Keys,
        listen_port: Option<u16>,
        peer_public: &[u8; 32],
        endpoint: Option<std::net::SocketAddr>,
        allowed_ips: &[String],
    ) -> Result<(), Error> {
        let mut req = String::from("set=1\n");
        req += &format!("private_key={}\n", hex(&keys.secret));
        if let Some(p) = listen_port {
            req += &format!("listen_port={p}\n");
        }
        req += &format!("public_key={}\n", hex(peer_public));
        if let Some(e) = endpoint {
            req += &format!("endpoint={e}\n");
        }
        for a in allowed_ips {
            req += &format!("allowed_ip={a}\n");
        }
        req += "\n";
        self.uapi(&req).map(|_| ())
    }

    pub fn peer_stats(&self) -> Result<WgPeerStats, Error> {
        let mut stats = WgPeerStats::default();
        for line in self.uapi("get=1\n\n")? {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            match k {
                "last_handshake_time_sec" => stats.last_handshake_secs = v.parse().ok(),
                "rx_bytes" => stats.rx_bytes = v.parse().unwrap_or(0),
                "tx_bytes" => stats.tx_bytes = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        Ok(stats)
    }
}

impl Drop for WgDevice {
    fn drop(&mut self) {
        // Closing the UAPI socket makes boringtun's event loop exit (EPOLLHUP on the
        // uapi fd); dropping the handle triggers the exit notifier as well.
        if let Ok(mut g) = self.ctl.lock() {
            g.take();
        }
        if let Some(mut handle) = self.handle.take() {
            // Join the workers on a helper thread so a stuck or panicked worker can
            // neither hang nor panic the caller's drop.
            let (tx, rx) = std::sync::mpsc::channel();
            let joined = std::thread::Builder::new()
                .name("tb-wg-reaper".into())
                .spawn(move || {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        handle.wait();
                        drop(handle);
                    }));
                    let _ = tx.send(r.is_ok());
                });
            if joined.is_ok() && rx.recv_timeout(Duration::from_secs(3)).is_err() {
                tracing::warn!(ns = %self.ns, "boringtun workers did not stop within 3 s");
            }
        }
    }
}
