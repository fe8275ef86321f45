//! VPN Share's end-to-end topology in Linux network namespaces, with a real VPN.
//!
//! ```text
//!  laptop ──lan0/veth── phone ──wan0/veth── vpn ──inet0/veth── internet
//!  (client)           (gateway)            (VPN provider)     (HTTP, DNS, UDP echo)
//!                       wg0 ═══ WireGuard (boringtun) ═══ wg0
//! ```
//!
//! The phone's only route to `internet` is its default route through `wg0`, a TUN
//! interface driven by a userspace WireGuard (boringtun) whose peer runs in the `vpn`
//! namespace; `wan0` carries only the encrypted WireGuard UDP. The laptop has nothing
//! but its LAN. No namespace has a route to the host. See `docs/testbed.md`.
//!
//! Everything is torn down by [`Testbed`]'s `Drop`, also on panic; leftovers of killed
//! runs are removed by [`cleanup_stale`] (called by every build) or [`cleanup`].
//!
//! This crate is test support: it needs root and is never linked into a product.

mod content;
mod netns;
mod servers;
mod wg;

pub mod client;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use content::{ContentStream, content_bytes, content_sha256, hex};
pub use servers::DnsName;
pub use wg::WgPeerStats;

use servers::{ServerConfig, Servers};
use wg::{Keys, WgDevice};

/// Where each instance keeps its files (`STATE_DIR/<id>/`), e.g. the
/// `resolv.conf` its processes see.
pub const STATE_DIR: &str = "/run/vstb";

/// Prefix of every namespace a testbed creates: `vstb-<pid>-<n>-<node>`.
pub const NS_PREFIX: &str = "vstb-";
/// The VPN interface in `phone` (and its peer in `vpn`).
pub const VPN_IF: &str = "wg0";
/// The LAN interface, in `phone` and in `laptop`.
pub const LAN_IF: &str = "lan0";
/// The phone's physical uplink to the VPN provider (and its end in `vpn`).
pub const WAN_IF: &str = "wan0";
/// The link between `vpn` and `internet`.
pub const INET_IF: &str = "inet0";
/// MTU of the WireGuard interfaces (1500 minus WireGuard's 80-byte IPv6 overhead).
pub const VPN_MTU: u32 = 1420;

/// Errors building or driving a testbed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN).
    #[error("the testbed needs root (network namespaces, TUN, veth)")]
    NotRoot,
    /// An `ip` command failed.
    #[error("`{cmd}` failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A system call or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Entering a namespace failed.
    #[error("entering namespace {ns}: {source}")]
    Setns {
        /// The namespace.
        ns: String,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// A thread running inside a namespace panicked.
    #[error("a thread inside namespace {0} panicked")]
    ThreadPanicked(String),
    /// boringtun refused a configuration or could not create its interface.
    #[error("wireguard in {ns}: {msg}")]
    WireGuard {
        /// The namespace.
        ns: String,
        /// What went wrong.
        msg: String,
    },
    /// The topology was built but traffic did not flow through the VPN in time.
    #[error("topology not ready: {0}")]
    NotReady(String),
    /// Something read back from the system could not be understood.
    #[error("unexpected output: {0}")]
    Parse(String),
}

/// The four namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Node {
    /// Servers: HTTP, DNS, UDP echo; one closed TCP port.
    Internet,
    /// The VPN provider: the WireGuard peer, forwarding between tunnel and internet.
    Vpn,
    /// The gateway device: default route through the WireGuard interface only.
    Phone,
    /// The client device: only its LAN link to the phone.
    Laptop,
}

impl Node {
    /// All nodes, in build order.
    pub const ALL: [Node; 4] = [Node::Internet, Node::Vpn, Node::Phone, Node::Laptop];

    /// The suffix of the namespace name.
    pub fn suffix(self) -> &'static str {
        match self {
            Node::Internet => "internet",
            Node::Vpn => "vpn",
            Node::Phone => "phone",
            Node::Laptop => "laptop",
        }
    }
}

/// Every address of the topology. The same in every instance: namespaces isolate them.
/// All are private or test ranges (RFC 1918, RFC 2544 198.18.0.0/15, ULA fd00::/8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addrs {
    /// internet: HTTP and UDP echo server, on its loopback.
    pub server_v4: Ipv4Addr,
    /// internet: HTTP and UDP echo server (IPv6).
    pub server_v6: Ipv6Addr,
    /// internet: DNS server.
    pub dns_v4: Ipv4Addr,
    /// internet: DNS server (IPv6).
    pub dns_v6: Ipv6Addr,
    /// HTTP port.
    pub http_port: u16,
    /// UDP echo port.
    pub echo_port: u16,
    /// DNS port.
    pub dns_port: u16,
    /// A TCP port on the server address where nothing listens (answers RST).
    pub closed_tcp_port: u16,
    /// phone on the LAN.
    pub phone_lan_v4: Ipv4Addr,
    /// laptop on the LAN.
    pub laptop_lan_v4: Ipv4Addr,
    /// LAN prefix length (IPv4).
    pub lan_prefix_v4: u8,
    /// phone on the LAN (IPv6).
    pub phone_lan_v6: Ipv6Addr,
    /// laptop on the LAN (IPv6).
    pub laptop_lan_v6: Ipv6Addr,
    /// LAN prefix length (IPv6).
    pub lan_prefix_v6: u8,
    /// phone's address inside the VPN (source of what the phone sends to internet).
    pub phone_tunnel_v4: Ipv4Addr,
    /// phone's address inside the VPN (IPv6).
    pub phone_tunnel_v6: Ipv6Addr,
    /// vpn's address inside the VPN.
    pub vpn_tunnel_v4: Ipv4Addr,
    /// vpn's address inside the VPN (IPv6).
    pub vpn_tunnel_v6: Ipv6Addr,
    /// phone's physical uplink address (WireGuard UDP leaves from here).
    pub phone_wan_v4: Ipv4Addr,
    /// The VPN provider's public endpoint address.
    pub vpn_wan_v4: Ipv4Addr,
    /// The VPN provider's WireGuard port.
    pub wg_port: u16,
    /// vpn on the vpn↔internet link.
    pub vpn_inet_v4: Ipv4Addr,
    /// internet on the vpn↔internet link.
    pub internet_inet_v4: Ipv4Addr,
    /// vpn on the vpn↔internet link (IPv6).
    pub vpn_inet_v6: Ipv6Addr,
    /// internet on the vpn↔internet link (IPv6).
    pub internet_inet_v6: Ipv6Addr,
}

impl Default for Addrs {
    fn default() -> Self {
        Self {
            server_v4: Ipv4Addr::new(198, 18, 0, 10),
            server_v6: Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0x10),
            dns_v4: Ipv4Addr::new(198, 18, 0, 53),
            dns_v6: Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0x53),
            http_port: 80,
            echo_port: 7,
            dns_port: 53,
            closed_tcp_port: 81,
            phone_lan_v4: Ipv4Addr::new(192, 168, 50, 1),
            laptop_lan_v4: Ipv4Addr::new(192, 168, 50, 2),
            lan_prefix_v4: 24,
            phone_lan_v6: Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 1),
            laptop_lan_v6: Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 2),
            lan_prefix_v6: 64,
            phone_tunnel_v4: Ipv4Addr::new(10, 66, 0, 2),
            phone_tunnel_v6: Ipv6Addr::new(0xfd00, 0x66, 0, 0, 0, 0, 0, 2),
            vpn_tunnel_v4: Ipv4Addr::new(10, 66, 0, 1),
            vpn_tunnel_v6: Ipv6Addr::new(0xfd00, 0x66, 0, 0, 0, 0, 0, 1),
            phone_wan_v4: Ipv4Addr::new(10, 10, 0, 1),
            vpn_wan_v4: Ipv4Addr::new(10, 10, 0, 2),
            wg_port: 51820,
            vpn_inet_v4: Ipv4Addr::new(10, 20, 0, 1),
            internet_inet_v4: Ipv4Addr::new(10, 20, 0, 2),
            vpn_inet_v6: Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 1),
            internet_inet_v6: Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 2),
        }
    }
}

impl Addrs {
    /// The HTTP server.
    pub fn http(&self) -> SocketAddr {
        (self.server_v4, self.http_port).into()
    }
    /// The HTTP server over IPv6.
    pub fn http_v6(&self) -> SocketAddr {
        (self.server_v6, self.http_port).into()
    }
    /// The DNS server.
    pub fn dns(&self) -> SocketAddr {
        (self.dns_v4, self.dns_port).into()
    }
    /// The DNS server over IPv6.
    pub fn dns_v6(&self) -> SocketAddr {
        (self.dns_v6, self.dns_port).into()
    }
    /// The UDP echo server.
    pub fn udp_echo(&self) -> SocketAddr {
        (self.server_v4, self.echo_port).into()
    }
    /// The UDP echo server over IPv6.
    pub fn udp_echo_v6(&self) -> SocketAddr {
        (self.server_v6, self.echo_port).into()
    }
    /// A TCP address where nothing listens: connecting gets a RST.
    pub fn closed_tcp(&self) -> SocketAddr {
        (self.server_v4, self.closed_tcp_port).into()
    }
}

/// Byte and packet counters of one interface, from `/proc/net/dev` in its namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounters {
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Receive drops.
    pub rx_dropped: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Transmit drops.
    pub tx_dropped: u64,
}

/// The two ends of the laptop↔phone link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VethCounters {
    /// `lan0` in `laptop`.
    pub laptop: LinkCounters,
    /// `lan0` in `phone`.
    pub phone: LinkCounters,
}

/// A namespace's IP-layer counters (`/proc/net/snmp`, `/proc/net/snmp6`): where
/// packets that should not be there die. A laptop packet that leaks to the phone
/// unencapsulated is dropped by the phone (it does not forward) and counted in its
/// `in_addr_errors`; one the laptop cannot route counts in the laptop's `out_no_routes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IpStats {
    /// IPv4 packets received for an address that is not local and not forwarded.
    pub in_addr_errors: u64,
    /// IPv4 packets forwarded.
    pub forw_datagrams: u64,
    /// IPv4 packets dropped for lack of a route, locally generated.
    pub out_no_routes: u64,
    /// IPv6 packets received for an address that is not local and not forwarded.
    pub in6_addr_errors: u64,
    /// IPv6 packets forwarded.
    pub out6_forw_datagrams: u64,
    /// IPv6 packets dropped for lack of a route, locally generated.
    pub out6_no_routes: u64,
    /// IPv6 packets received with no route to forward them.
    pub in6_no_routes: u64,
}

/// Builds a [`Testbed`].
#[derive(Debug, Clone)]
pub struct Builder {
    file_len: usize,
    ipv6: Option<bool>,
    wg_threads: usize,
    ready_timeout: Duration,
    extra_names: Vec<DnsName>,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            file_len: 1 << 20,
            ipv6: None,
            wg_threads: 2,
            ready_timeout: Duration::from_secs(15),
            extra_names: Vec::new(),
        }
    }
}

impl Builder {
    /// Size of the file served at `/file`, in MiB (default 1).
    pub fn http_file_mb(mut self, mb: usize) -> Self {
        self.file_len = mb.saturating_mul(1 << 20);
        self
    }

    /// Size of the file served at `/file`, in bytes.
    pub fn http_file_bytes(mut self, len: usize) -> Self {
        self.file_len = len;
        self
    }

    /// Configure IPv6 too (default: when the kernel has IPv6).
    pub fn ipv6(mut self, on: bool) -> Self {
        self.ipv6 = Some(on);
        self
    }

    /// boringtun worker threads per WireGuard interface (default 2).
    pub fn wg_threads(mut self, n: usize) -> Self {
        self.wg_threads = n.max(1);
        self
    }

    /// How long `build` waits for the first echo through the VPN (default 15 s).
    pub fn ready_timeout(mut self, t: Duration) -> Self {
        self.ready_timeout = t;
        self
    }

    /// One more name for the DNS server to answer.
    pub fn dns_name(mut self, name: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> Self {
        self.extra_names.push(DnsName {
            name: name.trim_end_matches('.').to_ascii_lowercase(),
            v4,
            v6,
        });
        self
    }

    /// Builds the topology (needs root). On error everything created so far is removed.
    pub fn build(self) -> Result<Testbed, Error> {
        Testbed::build(self)
    }
}

static INSTANCE: AtomicU32 = AtomicU32::new(0);

/// A built topology. Dropping it kills every process left in its namespaces, stops
/// its servers and WireGuard devices and deletes the namespaces (and so every link).
#[derive(Debug)]
pub struct Testbed {
    id: String,
    created: Vec<Node>,
    addrs: Addrs,
    ipv6: bool,
    file: Arc<Vec<u8>>,
    file_sha256: std::sync::OnceLock<[u8; 32]>,
    sha_job: std::sync::Mutex<Option<std::thread::JoinHandle<[u8; 32]>>>,
    names: Vec<DnsName>,
    servers: Option<Servers>,
    wg_phone: Option<WgDevice>,
    wg_vpn: Option<WgDevice>,
    build_time: Duration,
    state_dir: Option<std::path::PathBuf>,
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether this process can build a testbed (runs as root). Tests use it to skip.
pub fn can_run() -> bool {
    is_root() && std::path::Path::new("/dev/net/tun").exists()
}

/// Removes the namespaces of testbeds whose process is gone (`vstb-<pid>-...` with no
/// such pid). Returns the names removed.
pub fn cleanup_stale() -> Vec<String> {
    cleanup_matching(|name| {
        let pid = name
            .strip_prefix(NS_PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        match pid {
            Some(pid) => !std::path::Path::new("/proc").join(pid.to_string()).exists(),
            None => false,
        }
    })
}

/// Removes every namespace whose name starts with `prefix` (use [`NS_PREFIX`] for all
/// testbeds, including those of running tests), killing the processes inside first.
/// Returns the names removed.
pub fn cleanup(prefix: &str) -> Vec<String> {
    cleanup_matching(|name| name.starts_with(prefix))
}

fn cleanup_matching(pred: impl Fn(&str) -> bool) -> Vec<String> {
    let mut removed = Vec::new();
    for name in netns::list_with_prefix(NS_PREFIX) {
        if !pred(&name) {
            continue;
        }
        match netns::delete(&name) {
            Ok(()) => {
                if let Some((id, _node)) = name.rsplit_once('-') {
                    let _ = std::fs::remove_dir_all(std::path::Path::new(STATE_DIR).join(id));
                }
                removed.push(name);
            }
            Err(e) => tracing::warn!(ns = %name, error = %e, "could not remove namespace"),
        }
    }
    removed
}

/// Namespace names currently present with the testbed prefix.
pub fn list_namespaces() -> Vec<String> {
    netns::list_with_prefix(NS_PREFIX)
}

impl Testbed {
    /// Starts a builder with the defaults (1 MiB file, IPv6 when available).
    pub fn builder() -> Builder {
        Builder::default()
    }

    fn build(b: Builder) -> Result<Testbed, Error> {
        if !is_root() {
            return Err(Error::NotRoot);
        }
        let started = Instant::now();
        let stale = cleanup_stale();
        if !stale.is_empty() {
            tracing::info!(?stale, "removed namespaces of dead testbeds");
        }
        let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
        let id = format!("{NS_PREFIX}{}-{n}", std::process::id());
        let ipv6 = b
            .ipv6
            .unwrap_or_else(|| std::path::Path::new("/proc/sys/net/ipv6").exists());
        let addrs = Addrs::default();
        let file = Arc::new(content_bytes(b.file_len));
        // Hashing a large file takes longer than building the topology in debug
        // builds: do it in the background; `file_sha256` waits for it.
        let sha_job = {
            let file = Arc::clone(&file);
            std::thread::Builder::new()
                .name("tb-file-sha256".into())
                .spawn(move || -> [u8; 32] {
                    use sha2::Digest as _;
                    sha2::Sha256::digest(file.as_slice()).into()
                })
                .ok()
        };
        let mut names = vec![
            DnsName {
                name: "files.vpnshare.test".into(),
                v4: addrs.server_v4,
                v6: addrs.server_v6,
            },
            DnsName {
                name: "echo.vpnshare.test".into(),
                v4: addrs.server_v4,
                v6: addrs.server_v6,
            },
            DnsName {
                name: "dns.vpnshare.test".into(),
                v4: addrs.dns_v4,
                v6: addrs.dns_v6,
            },
        ];
        names.extend(b.extra_names.iter().cloned());

        // From here on, `tb`'s Drop removes whatever was created if a step fails.
        let mut tb = Testbed {
            id,
            created: Vec::new(),
            addrs,
            ipv6,
            file,
            file_sha256: std::sync::OnceLock::new(),
            sha_job: std::sync::Mutex::new(sha_job),
            names,
            servers: None,
            wg_phone: None,
            wg_vpn: None,
            build_time: Duration::ZERO,
            state_dir: None,
        };
        for node in Node::ALL {
            let ns = tb.ns(node);
            // This process never reuses an id, so a namespace of this name was left by
            // a dead process that had our pid.
            netns::delete(&ns)?;
            netns::add(&ns)?;
            tb.created.push(node);
        }
        tb.write_state_files()?;
        tb.configure_sysctls()?;
        tb.configure_links()?;
        tb.start_vpn(b.wg_threads)?;
        tb.start_servers()?;
        tb.wait_ready(b.ready_timeout)?;
        tb.build_time = started.elapsed();
        tracing::info!(id = %tb.id, build_time = ?tb.build_time, "testbed up");
        Ok(tb)
    }

    /// `STATE_DIR/<id>/<node>.resolv.conf`: the testbed DNS server, for processes
    /// started with `run_in`.
    fn write_state_files(&mut self) -> Result<(), Error> {
        let dir = std::path::Path::new(STATE_DIR).join(&self.id);
        let io = |what: String| move |source| Error::Io { what, source };
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        self.state_dir = Some(dir.clone());
        for node in Node::ALL {
            let mut text = format!(
                "# vpnshare testbed {} ({}): the testbed's DNS server\nnameserver {}\n",
                self.id,
                node.suffix(),
                self.addrs.dns_v4
            );
            if self.ipv6 {
                text += &format!("nameserver {}\n", self.addrs.dns_v6);
            }
            let path = self.resolv_conf(node);
            std::fs::write(&path, text).map_err(io(format!("writing {}", path.display())))?;
        }
        Ok(())
    }

    fn configure_sysctls(&self) -> Result<(), Error> {
        for node in Node::ALL {
            let forward = if node == Node::Vpn { "1" } else { "0" };
            let ipv6 = self.ipv6;
            let mut settings = vec![
                ("/proc/sys/net/ipv4/ip_forward", forward),
                ("/proc/sys/net/ipv4/conf/all/rp_filter", "0"),
                ("/proc/sys/net/ipv4/conf/default/rp_filter", "0"),
                // Unprivileged ICMP echo ("ping") sockets for everyone, as on Android
                // and most desktops: the gateway needs no root to re-originate pings.
                ("/proc/sys/net/ipv4/ping_group_range", "0 2147483647"),
            ];
            if ipv6 {
                settings.extend([
                    ("/proc/sys/net/ipv6/conf/all/forwarding", forward),
                    ("/proc/sys/net/ipv6/conf/all/keep_addr_on_down", "1"),
                    ("/proc/sys/net/ipv6/conf/default/keep_addr_on_down", "1"),
                    ("/proc/sys/net/ipv6/conf/default/accept_ra", "0"),
                    ("/proc/sys/net/ipv6/conf/default/accept_dad", "0"),
                ]);
            }
            write_sysctls(&self.ns(node), &settings)?;
        }
        Ok(())
    }

    fn configure_links(&self) -> Result<(), Error> {
        let a = &self.addrs;
        let (laptop, phone, vpn, internet) = (
            self.ns(Node::Laptop),
            self.ns(Node::Phone),
            self.ns(Node::Vpn),
            self.ns(Node::Internet),
        );
        // Each veth is created inside its first namespace with its peer placed
        // directly in the second: nothing ever exists in the host's namespace.
        netns::ip_batch(
            &laptop,
            &[
                "link set lo up".into(),
                format!("link add {LAN_IF} type veth peer name {LAN_IF} netns {phone}"),
            ],
        )?;
        netns::ip_batch(
            &phone,
            &[
                "link set lo up".into(),
                format!("link add {WAN_IF} type veth peer name {WAN_IF} netns {vpn}"),
            ],
        )?;
        netns::ip_batch(
            &vpn,
            &[
                "link set lo up".into(),
                format!("link add {INET_IF} type veth peer name {INET_IF} netns {internet}"),
            ],
        )?;

        // Before any link is up. The phone's uplink carries WireGuard and nothing else: no IPv6 on it (no
        // link-local address, router or multicast listener traffic).
        if std::path::Path::new("/proc/sys/net/ipv6").exists() {
            let off = [("/proc/sys/net/ipv6/conf/wan0/disable_ipv6", "1")];
            write_sysctls(&phone, &off)?;
            write_sysctls(&vpn, &off)?;
        }

        let mut l = vec![
            format!(
                "addr add {}/{} dev {LAN_IF}",
                a.laptop_lan_v4, a.lan_prefix_v4
            ),
            format!("link set {LAN_IF} up"),
        ];
        let mut p = vec![
            format!(
                "addr add {}/{} dev {LAN_IF}",
                a.phone_lan_v4, a.lan_prefix_v4
            ),
            format!("link set {LAN_IF} up"),
            format!("addr add {}/30 dev {WAN_IF}", a.phone_wan_v4),
            format!("link set {WAN_IF} up"),
        ];
        let mut v = vec![
            format!("addr add {}/30 dev {WAN_IF}", a.vpn_wan_v4),
            format!("link set {WAN_IF} up"),
            format!("addr add {}/30 dev {INET_IF}", a.vpn_inet_v4),
            format!("link set {INET_IF} up"),
            format!("route add {}/32 via {}", a.server_v4, a.internet_inet_v4),
            format!("route add {}/32 via {}", a.dns_v4, a.internet_inet_v4),
        ];
        let mut i = vec![
            format!("addr add {}/32 dev lo", a.server_v4),
            format!("addr add {}/32 dev lo", a.dns_v4),
            format!("addr add {}/30 dev {INET_IF}", a.internet_inet_v4),
            format!("link set {INET_IF} up"),
            format!(
                "route add {} via {}",
                net_v4(a.phone_tunnel_v4, 24),
                a.vpn_inet_v4
            ),
        ];
        if self.ipv6 {
            l.push(format!(
                "addr add {}/{} dev {LAN_IF} nodad",
                a.laptop_lan_v6, a.lan_prefix_v6
            ));
            p.push(format!(
                "addr add {}/{} dev {LAN_IF} nodad",
                a.phone_lan_v6, a.lan_prefix_v6
            ));
            v.extend([
                format!("addr add {}/64 dev {INET_IF} nodad", a.vpn_inet_v6),
                format!("route add {}/128 via {}", a.server_v6, a.internet_inet_v6),
                format!("route add {}/128 via {}", a.dns_v6, a.internet_inet_v6),
            ]);
            i.extend([
                format!("addr add {}/128 dev lo nodad", a.server_v6),
                format!("addr add {}/128 dev lo nodad", a.dns_v6),
                format!("addr add {}/64 dev {INET_IF} nodad", a.internet_inet_v6),
                format!(
                    "route add {} via {}",
                    net_v6(a.phone_tunnel_v6, 64),
                    a.vpn_inet_v6
                ),
            ]);
        }
        netns::ip_batch(&laptop, &l)?;
        netns::ip_batch(&phone, &p)?;
        netns::ip_batch(&vpn, &v)?;
        netns::ip_batch(&internet, &i)?;
        Ok(())
    }

    fn start_vpn(&mut self, threads: usize) -> Result<(), Error> {
        let a = self.addrs.clone();
        let (phone, vpn) = (self.ns(Node::Phone), self.ns(Node::Vpn));
        let phone_keys = Keys::generate()?;
        let vpn_keys = Keys::generate()?;

        // The provider's end: listens on the WAN address, routes the phone's tunnel
        // addresses into the tunnel.
        let dev = WgDevice::start(&vpn, VPN_IF, threads)?;
        // The LAN is allowed too, for `set_kernel_routing`'s baseline only: without
        // it no packet can carry a LAN address through the tunnel (the phone does
        // not forward, and nothing routes the LAN back).
        let mut allowed = vec![
            format!("{}/32", a.phone_tunnel_v4),
            net_v4(a.laptop_lan_v4, a.lan_prefix_v4),
        ];
        if self.ipv6 {
            allowed.push(format!("{}/128", a.phone_tunnel_v6));
            allowed.push(net_v6(a.laptop_lan_v6, a.lan_prefix_v6));
        }
        dev.configure(
            &vpn_keys,
            Some(a.wg_port),
            &phone_keys.public,
            None,
            &allowed,
        )?;
        self.wg_vpn = Some(dev);
        let mut v = vec![
            format!("addr add {}/32 dev {VPN_IF}", a.vpn_tunnel_v4),
            // Like a kernel WireGuard link: no IPv6 link-local address, so the
            // kernel sends nothing of its own (MLD, router solicitations) into it.
            format!("link set {VPN_IF} addrgenmode none"),
            format!("link set {VPN_IF} mtu {VPN_MTU} up"),
            format!("route add {}/32 dev {VPN_IF}", a.phone_tunnel_v4),
        ];
        if self.ipv6 {
            v.extend([
                format!("addr add {}/128 dev {VPN_IF} nodad", a.vpn_tunnel_v6),
                format!("route add {}/128 dev {VPN_IF}", a.phone_tunnel_v6),
            ]);
        }
        netns::ip_batch(&vpn, &v)?;

        // The phone's end: everything goes to the provider.
        let dev = WgDevice::start(&phone, VPN_IF, threads)?;
        let mut allowed = vec!["0.0.0.0/0".to_owned()];
        if self.ipv6 {
            allowed.push("::/0".to_owned());
        }
        let endpoint = SocketAddr::from((a.vpn_wan_v4, a.wg_port));
        dev.configure(
            &phone_keys,
            None,
            &vpn_keys.public,
            Some(endpoint),
            &allowed,
        )?;
        self.wg_phone = Some(dev);
        let mut p = vec![
            format!("addr add {}/32 dev {VPN_IF}", a.phone_tunnel_v4),
            // Like a kernel WireGuard link: no IPv6 link-local address, so the
            // kernel sends nothing of its own (MLD, router solicitations) into it.
            format!("link set {VPN_IF} addrgenmode none"),
            format!("link set {VPN_IF} mtu {VPN_MTU} up"),
        ];
        if self.ipv6 {
            p.push(format!(
                "addr add {}/128 dev {VPN_IF} nodad",
                a.phone_tunnel_v6
            ));
        }
        netns::ip_batch(&phone, &p)?;
        self.vpn_routes(true)
    }

    /// Adds (or removes) the phone's default routes through the VPN interface.
    fn vpn_routes(&self, add: bool) -> Result<(), Error> {
        let verb = if add { "replace" } else { "del" };
        let a = &self.addrs;
        let mut p = vec![format!(
            "route {verb} default dev {VPN_IF} src {}",
            a.phone_tunnel_v4
        )];
        if self.ipv6 {
            p.push(format!(
                "route {verb} ::/0 dev {VPN_IF} src {}",
                a.phone_tunnel_v6
            ));
        }
        netns::ip_batch(&self.ns(Node::Phone), &p)
    }

    fn start_servers(&mut self) -> Result<(), Error> {
        let a = &self.addrs;
        let mut cfg = ServerConfig {
            http: vec![a.http()],
            dns: vec![a.dns()],
            echo: vec![a.udp_echo()],
            names: self.names.clone(),
            file: Arc::clone(&self.file),
        };
        if self.ipv6 {
            cfg.http.push(a.http_v6());
            cfg.dns.push(a.dns_v6());
            cfg.echo.push(a.udp_echo_v6());
        }
        self.servers = Some(Servers::start(&self.ns(Node::Internet), cfg)?);
        Ok(())
    }

    /// Waits until a UDP echo from `phone` comes back through the tunnel (this also
    /// completes the first WireGuard handshake).
    fn wait_ready(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let mut targets = vec![self.addrs.udp_echo()];
        if self.ipv6 {
            targets.push(self.addrs.udp_echo_v6());
        }
        for target in targets {
            loop {
                let r = self.in_ns(Node::Phone, || {
                    client::udp_echo(target, b"ready?", Duration::from_millis(250))
                })?;
                match r {
                    Ok(answer) if answer == b"ready?" => break,
                    Ok(_) => return Err(Error::NotReady(format!("echo from {target} garbled"))),
                    Err(e) if Instant::now() > deadline => {
                        return Err(Error::NotReady(format!(
                            "no UDP echo from {target} through the VPN: {e}"
                        )));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------ accessors

    /// This instance's id, the prefix of its namespace names (`vstb-<pid>-<n>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The namespace name of `node` (usable with `ip netns exec`).
    pub fn ns(&self, node: Node) -> String {
        format!("{}-{}", self.id, node.suffix())
    }

    /// Every address of the topology.
    pub fn addrs(&self) -> &Addrs {
        &self.addrs
    }

    /// Whether IPv6 is configured.
    pub fn has_ipv6(&self) -> bool {
        self.ipv6
    }

    /// The HTTP server (`/file`, `/bytes/N`, `/upload`, `/health`).
    pub fn http_addr(&self) -> SocketAddr {
        self.addrs.http()
    }

    /// The DNS server.
    pub fn dns_addr(&self) -> SocketAddr {
        self.addrs.dns()
    }

    /// The UDP echo server.
    pub fn udp_echo_addr(&self) -> SocketAddr {
        self.addrs.udp_echo()
    }

    /// A TCP address where nothing listens.
    pub fn closed_tcp_addr(&self) -> SocketAddr {
        self.addrs.closed_tcp()
    }

    /// The phone's LAN address (where the gateway listens for the laptop).
    pub fn phone_lan_ip(&self) -> IpAddr {
        self.addrs.phone_lan_v4.into()
    }

    /// The laptop's LAN address.
    pub fn laptop_lan_ip(&self) -> IpAddr {
        self.addrs.laptop_lan_v4.into()
    }

    /// The file processes started with [`Testbed::run_in`] in `node` see as
    /// `/etc/resolv.conf`.
    pub fn resolv_conf(&self, node: Node) -> std::path::PathBuf {
        std::path::Path::new(STATE_DIR)
            .join(&self.id)
            .join(format!("{}.resolv.conf", node.suffix()))
    }

    /// The names the DNS server answers, with their A and AAAA answers.
    pub fn dns_names(&self) -> &[DnsName] {
        &self.names
    }

    /// Length of `/file` in bytes.
    pub fn file_len(&self) -> u64 {
        self.file.len() as u64
    }

    /// sha256 of `/file` (computed in the background since `build`; waits for it).
    pub fn file_sha256(&self) -> [u8; 32] {
        *self.file_sha256.get_or_init(|| {
            let job = self.sha_job.lock().ok().and_then(|mut j| j.take());
            match job.map(|j| j.join()) {
                Some(Ok(sha)) => sha,
                _ => {
                    use sha2::Digest as _;
                    sha2::Sha256::digest(self.file.as_slice()).into()
                }
            }
        })
    }

    /// sha256 of `/file`, lower-case hex.
    pub fn file_sha256_hex(&self) -> String {
        hex(&self.file_sha256())
    }

    /// How long `build` took.
    pub fn build_time(&self) -> Duration {
        self.build_time
    }

    /// DNS queries the DNS server has received so far.
    pub fn dns_queries(&self) -> u64 {
        self.servers
            .as_ref()
            .map_or(0, |s| s.stats.dns_queries.load(Ordering::Relaxed))
    }

    /// Datagrams the UDP echo server has echoed so far (`build`'s readiness probes
    /// included: compare differences).
    pub fn udp_echoes(&self) -> u64 {
        self.servers
            .as_ref()
            .map_or(0, |s| s.stats.udp_echoes.load(Ordering::Relaxed))
    }

    /// HTTP requests the HTTP server has read so far.
    pub fn http_requests(&self) -> u64 {
        self.servers
            .as_ref()
            .map_or(0, |s| s.stats.http_requests.load(Ordering::Relaxed))
    }

    // ------------------------------------------------------------ running things

    /// Runs `f` on a thread inside `node`'s network namespace and returns its result:
    /// sockets `f` creates use that namespace's interfaces and routes.
    pub fn in_ns<T: Send>(&self, node: Node, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
        netns::in_netns(&self.ns(node), f)
    }

    /// Spawns `cmd` inside `node`, as `ip netns exec` does: the child starts in the
    /// network namespace, in a private mount namespace where `/sys` is that network
    /// namespace's sysfs (so `/sys/class/net` shows its interfaces) and
    /// `/etc/resolv.conf` is [`Testbed::resolv_conf`] (the testbed's DNS server; what a
    /// child writes there stays in the testbed, the host's file is untouched; a
    /// rename over it fails with `EBUSY`). The spawn happens
    /// on a thread that entered both namespaces, so nothing runs between fork and exec
    /// and `cmd`'s own settings all apply (stdio, environment, `uid`/`gid` to run an
    /// unprivileged gateway). The testbed's drop SIGKILLs whatever still runs in its
    /// namespaces; wait for your children before that.
    pub fn run_in(&self, node: Node, cmd: &mut Command) -> Result<Child, Error> {
        let ns = self.ns(node);
        netns::in_netns(&ns, || -> Result<Child, Error> {
            let resolv = self.resolv_conf(node);
            netns::private_mounts(&ns, resolv.exists().then_some(resolv.as_path()))?;
            cmd.spawn().map_err(|source| Error::Io {
                what: format!("spawning {:?} in {ns}", cmd.get_program()),
                source,
            })
        })?
    }

    // ------------------------------------------------------------ knobs

    /// Takes the phone's VPN interface down (its default routes vanish with it: the
    /// phone then has no route to `internet`) or brings it back up with its routes.
    pub fn set_vpn_up(&self, up: bool) -> Result<(), Error> {
        let phone = self.ns(Node::Phone);
        if up {
            netns::ip_batch(&phone, &[format!("link set {VPN_IF} up")])?;
            self.vpn_routes(true)
        } else {
            netns::ip_batch(&phone, &[format!("link set {VPN_IF} down")])
        }
    }

    /// Turns the phone into a plain kernel router for the laptop, through the VPN, or
    /// back: the baseline benchmarks compare VPN Share against. On: the phone
    /// forwards (IPv4 and IPv6), the laptop gets default routes via the phone's LAN
    /// address, and `vpn` and `internet` route the LAN back through the tunnel. Off
    /// (the default): all of that is removed again, and a laptop packet has no path.
    pub fn set_kernel_routing(&self, on: bool) -> Result<(), Error> {
        let a = &self.addrs;
        let verb = if on { "replace" } else { "del" };
        let lan4 = net_v4(a.laptop_lan_v4, a.lan_prefix_v4);
        let lan6 = net_v6(a.laptop_lan_v6, a.lan_prefix_v6);
        let mut laptop = vec![format!("route {verb} default via {}", a.phone_lan_v4)];
        let mut vpn = vec![format!("route {verb} {lan4} dev {VPN_IF}")];
        let mut internet = vec![format!("route {verb} {lan4} via {}", a.vpn_inet_v4)];
        let forward = if on { "1" } else { "0" };
        let mut sysctls = vec![("/proc/sys/net/ipv4/ip_forward", forward)];
        if self.ipv6 {
            laptop.push(format!("route {verb} ::/0 via {}", a.phone_lan_v6));
            vpn.push(format!("route {verb} {lan6} dev {VPN_IF}"));
            internet.push(format!("route {verb} {lan6} via {}", a.vpn_inet_v6));
            sysctls.push(("/proc/sys/net/ipv6/conf/all/forwarding", forward));
        }
        if on {
            write_sysctls(&self.ns(Node::Phone), &sysctls)?;
            netns::ip_batch(&self.ns(Node::Vpn), &vpn)?;
            netns::ip_batch(&self.ns(Node::Internet), &internet)?;
            netns::ip_batch(&self.ns(Node::Laptop), &laptop)
        } else {
            // Removing a route that is not there fails: ignore, the goal is "absent".
            let _ = netns::ip_batch(&self.ns(Node::Laptop), &laptop);
            let _ = netns::ip_batch(&self.ns(Node::Internet), &internet);
            let _ = netns::ip_batch(&self.ns(Node::Vpn), &vpn);
            write_sysctls(&self.ns(Node::Phone), &sysctls)
        }
    }

    /// Takes the phone's end of the laptop↔phone link down (the laptop sees its
    /// carrier drop) or back up.
    pub fn set_lan_up(&self, up: bool) -> Result<(), Error> {
        let state = if up { "up" } else { "down" };
        netns::ip_batch(
            &self.ns(Node::Phone),
            &[format!("link set {LAN_IF} {state}")],
        )
    }

    /// Takes the laptop↔phone link down now and brings it back up after `d`, on a
    /// background thread; returns at once. `LinkFlap::wait` waits for the link to be
    /// back.
    pub fn link_down_for(&self, d: Duration) -> Result<LinkFlap, Error> {
        self.set_lan_up(false)?;
        let phone = self.ns(Node::Phone);
        let handle = std::thread::Builder::new()
            .name("tb-link-flap".into())
            .spawn(move || {
                std::thread::sleep(d);
                netns::ip_batch(&phone, &[format!("link set {LAN_IF} up")])
            })
            .map_err(|source| Error::Io {
                what: "spawning the link flap thread".into(),
                source,
            })?;
        Ok(LinkFlap {
            handle: Some(handle),
        })
    }

    // ------------------------------------------------------------ observing

    /// Counters of interface `ifname` in `node`.
    pub fn link_counters(&self, node: Node, ifname: &str) -> Result<LinkCounters, Error> {
        let text = self
            .in_ns(node, || {
                std::fs::read_to_string("/proc/thread-self/net/dev")
            })?
            .map_err(|source| Error::Io {
                what: "reading /proc/thread-self/net/dev".into(),
                source,
            })?;
        parse_net_dev(&text, ifname)
    }

    /// IP-layer counters of `node` (see [`IpStats`]).
    pub fn ip_stats(&self, node: Node) -> Result<IpStats, Error> {
        let (snmp, snmp6) = self.in_ns(node, || {
            (
                std::fs::read_to_string("/proc/thread-self/net/snmp"),
                std::fs::read_to_string("/proc/thread-self/net/snmp6").unwrap_or_default(),
            )
        })?;
        let snmp = snmp.map_err(|source| Error::Io {
            what: "reading /proc/thread-self/net/snmp".into(),
            source,
        })?;
        parse_snmp(&snmp, &snmp6)
    }

    /// Both ends of the laptop↔phone link.
    pub fn veth_counters(&self) -> Result<VethCounters, Error> {
        Ok(VethCounters {
            laptop: self.link_counters(Node::Laptop, LAN_IF)?,
            phone: self.link_counters(Node::Phone, LAN_IF)?,
        })
    }

    /// The phone's VPN interface (`wg0`) counters.
    pub fn vpn_counters(&self) -> Result<LinkCounters, Error> {
        self.link_counters(Node::Phone, VPN_IF)
    }

    /// The phone's physical uplink (`wan0`) counters: WireGuard UDP only.
    pub fn wan_counters(&self) -> Result<LinkCounters, Error> {
        self.link_counters(Node::Phone, WAN_IF)
    }

    /// What boringtun on the phone reports about its peer (handshake, bytes).
    pub fn wg_phone_stats(&self) -> Result<WgPeerStats, Error> {
        match &self.wg_phone {
            Some(d) => d.peer_stats(),
            None => Err(Error::NotReady("no WireGuard device on the phone".into())),
        }
    }

    /// The routes of `node` (`ip route` and `ip -6 route`, main table), one a line.
    pub fn routes(&self, node: Node) -> Result<Vec<String>, Error> {
        let ns = self.ns(node);
        let mut lines: Vec<String> = netns::ip(&["-n", &ns, "-4", "route", "show"])?
            .lines()
            .map(str::to_owned)
            .collect();
        if self.ipv6 {
            lines.extend(
                netns::ip(&["-n", &ns, "-6", "route", "show"])?
                    .lines()
                    .map(str::to_owned),
            );
        }
        Ok(lines)
    }

    /// Interface names present in `node`.
    pub fn interfaces(&self, node: Node) -> Result<Vec<String>, Error> {
        let text = self
            .in_ns(node, || {
                std::fs::read_to_string("/proc/thread-self/net/dev")
            })?
            .map_err(|source| Error::Io {
                what: "reading /proc/thread-self/net/dev".into(),
                source,
            })?;
        Ok(text
            .lines()
            .skip(2)
            .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim().to_owned()))
            .collect())
    }

    /// A human-readable description of the topology.
    pub fn describe(&self) -> String {
        let a = &self.addrs;
        let mut s = String::new();
        s += &format!("testbed {} (built in {:?})\n", self.id, self.build_time);
        s += &format!(
            "  {:<28} {LAN_IF} {}/{}  (LAN to phone, no other route)\n",
            self.ns(Node::Laptop),
            a.laptop_lan_v4,
            a.lan_prefix_v4
        );
        s += &format!(
            "  {:<28} {LAN_IF} {}/{}, {WAN_IF} {}/30, {VPN_IF} {} (default route, boringtun WireGuard)\n",
            self.ns(Node::Phone),
            a.phone_lan_v4,
            a.lan_prefix_v4,
            a.phone_wan_v4,
            a.phone_tunnel_v4
        );
        s += &format!(
            "  {:<28} {WAN_IF} {}/30 (WireGuard :{}), {INET_IF} {}/30, {VPN_IF} {}\n",
            self.ns(Node::Vpn),
            a.vpn_wan_v4,
            a.wg_port,
            a.vpn_inet_v4,
            a.vpn_tunnel_v4
        );
        s += &format!(
            "  {:<28} {INET_IF} {}/30; HTTP http://{}/file ({} bytes, sha256 {}), DNS {}, UDP echo {}, closed TCP {}\n",
            self.ns(Node::Internet),
            a.internet_inet_v4,
            a.http(),
            self.file_len(),
            self.file_sha256_hex(),
            a.dns(),
            a.udp_echo(),
            a.closed_tcp()
        );
        if self.ipv6 {
            s += &format!(
                "  IPv6: LAN phone {} laptop {}, phone tunnel {}, HTTP {}, DNS {}\n",
                a.phone_lan_v6,
                a.laptop_lan_v6,
                a.phone_tunnel_v6,
                a.http_v6(),
                a.dns_v6()
            );
        }
        s += "  DNS names:";
        for n in &self.names {
            s += &format!(" {} ({}, {})", n.name, n.v4, n.v6);
        }
        s.push('\n');
        s
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // Servers and WireGuard devices first (their sockets pin the namespaces), then
        // every process left inside, then the namespaces with their links.
        self.servers.take();
        self.wg_phone.take();
        self.wg_vpn.take();
        for node in self.created.drain(..).rev() {
            let ns = format!("{}-{}", self.id, node.suffix());
            if let Err(e) = netns::delete(&ns) {
                tracing::warn!(ns, error = %e, "could not delete namespace");
            }
        }
        if let Some(dir) = self.state_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
        tracing::debug!(id = %self.id, "testbed down");
    }
}

/// A laptop↔phone link that is down for a while; see [`Testbed::link_down_for`].
#[derive(Debug)]
pub struct LinkFlap {
    handle: Option<std::thread::JoinHandle<Result<(), Error>>>,
}

impl LinkFlap {
    /// Waits until the link is back up.
    pub fn wait(mut self) -> Result<(), Error> {
        match self.handle.take() {
            Some(h) => h
                .join()
                .map_err(|_| Error::ThreadPanicked("link flap".into()))?,
            None => Ok(()),
        }
    }
}

impl Drop for LinkFlap {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Writes `(path, value)` pairs under `/proc/sys/net` as seen from inside `ns`.
fn write_sysctls(ns: &str, settings: &[(&str, &str)]) -> Result<(), Error> {
    netns::in_netns(ns, || -> Result<(), Error> {
        for (path, value) in settings {
            std::fs::write(path, value).map_err(|source| Error::Io {
                what: format!("writing {path} in {ns}"),
                source,
            })?;
        }
        Ok(())
    })?
}

/// `addr/len` with the host bits cleared.
fn net_v4(addr: Ipv4Addr, len: u8) -> String {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0);
    format!("{}/{len}", Ipv4Addr::from(u32::from(addr) & mask))
}

/// `addr/len` with the host bits cleared.
fn net_v6(addr: Ipv6Addr, len: u8) -> String {
    let mask = u128::MAX
        .checked_shl(128 - u32::from(len.min(128)))
        .unwrap_or(0);
    format!("{}/{len}", Ipv6Addr::from(u128::from(addr) & mask))
}

/// Picks the counters of [`IpStats`] out of `/proc/net/snmp` and `/proc/net/snmp6`.
fn parse_snmp(snmp: &str, snmp6: &str) -> Result<IpStats, Error> {
    let mut ip_lines = snmp.lines().filter(|l| l.starts_with("Ip: "));
    let (Some(names), Some(values)) = (ip_lines.next(), ip_lines.next()) else {
        return Err(Error::Parse("no Ip: lines in /proc/net/snmp".into()));
    };
    let v4 = |name: &str| -> Result<u64, Error> {
        let i = names
            .split_whitespace()
            .position(|n| n == name)
            .ok_or_else(|| Error::Parse(format!("no {name} in /proc/net/snmp")))?;
        values
            .split_whitespace()
            .nth(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::Parse(format!("bad {name} in /proc/net/snmp")))
    };
    let v6 = |name: &str| -> u64 {
        snmp6
            .lines()
            .find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some(name))
                    .then(|| it.next().and_then(|v| v.parse().ok()))
                    .flatten()
            })
            .unwrap_or(0)
    };
    Ok(IpStats {
        in_addr_errors: v4("InAddrErrors")?,
        forw_datagrams: v4("ForwDatagrams")?,
        out_no_routes: v4("OutNoRoutes")?,
        in6_addr_errors: v6("Ip6InAddrErrors"),
        out6_forw_datagrams: v6("Ip6OutForwDatagrams"),
        out6_no_routes: v6("Ip6OutNoRoutes"),
        in6_no_routes: v6("Ip6InNoRoutes"),
    })
}

/// Parses one interface's line of `/proc/net/dev`.
fn parse_net_dev(text: &str, ifname: &str) -> Result<LinkCounters, Error> {
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() != ifname {
            continue;
        }
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse::<u64>())
            .collect::<Result<_, _>>()
            .map_err(|e| Error::Parse(format!("/proc/net/dev line {line:?}: {e}")))?;
        if f.len() < 16 {
            return Err(Error::Parse(format!("/proc/net/dev line {line:?}")));
        }
        return Ok(LinkCounters {
            rx_bytes: f[0],
            rx_packets: f[1],
            rx_dropped: f[3],
            tx_bytes: f[8],
            tx_packets: f[9],
            tx_dropped: f[11],
        });
    }
    Err(Error::Parse(format!(
        "no interface {ifname} in /proc/net/dev"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_parsing() {
        let text = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n  lan0:    1234      10    0    2    0     0          0         0     5678      20    0    3    0     0       0          0\n";
        let c = parse_net_dev(text, "lan0").unwrap();
        assert_eq!(
            c,
            LinkCounters {
                rx_bytes: 1234,
                rx_packets: 10,
                rx_dropped: 2,
                tx_bytes: 5678,
                tx_packets: 20,
                tx_dropped: 3
            }
        );
        assert!(parse_net_dev(text, "wg0").is_err());
    }

    #[test]
    fn snmp_parsing() {
        let snmp = "Ip: Forwarding DefaultTTL InReceives InHdrErrors InAddrErrors ForwDatagrams OutNoRoutes\nIp: 2 64 10 0 3 4 5\nIcmp: InMsgs\nIcmp: 1\n";
        let snmp6 = "Ip6InReceives                   \t7\nIp6InNoRoutes 1\nIp6InAddrErrors 2\nIp6OutForwDatagrams 0\nIp6OutNoRoutes 9\n";
        let s = parse_snmp(snmp, snmp6).unwrap();
        assert_eq!(
            s,
            IpStats {
                in_addr_errors: 3,
                forw_datagrams: 4,
                out_no_routes: 5,
                in6_addr_errors: 2,
                out6_forw_datagrams: 0,
                out6_no_routes: 9,
                in6_no_routes: 1,
            }
        );
        assert!(parse_snmp("", "").is_err());
    }

    #[test]
    fn prefixes_clear_host_bits() {
        assert_eq!(net_v4(Ipv4Addr::new(10, 66, 0, 2), 24), "10.66.0.0/24");
        assert_eq!(net_v6("fd00:66::2".parse().unwrap(), 64), "fd00:66::/64");
        assert_eq!(net_v4(Ipv4Addr::new(10, 66, 0, 2), 0), "0.0.0.0/0");
    }

    #[test]
    fn namespace_names_are_unique_and_short_enough() {
        let n = INSTANCE.load(Ordering::Relaxed);
        let id = format!("{NS_PREFIX}{}-{n}", u32::MAX);
        assert!(format!("{id}-internet").len() < 64);
    }
}
