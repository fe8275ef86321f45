//! One served session: the closed list of operations, checked against the policy,
//! journaled before each change, undone at teardown.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::path::PathBuf;

use ipc_schema::bounded::BoundedString;
use ipc_schema::messages::session_helper::{HelperRefusal, HelperToSession, SessionToHelper};
use nix::errno::Errno;
use vshp::lease::Route;

use crate::dns;
use crate::journal::{Journal, JournalError};
use crate::netlink::{Netlink, RT_TABLE_MAIN, RouteSpec};
use crate::policy::{Policy, Prefix};

/// Fixed settings of this helper instance.
#[derive(Debug, Clone)]
pub struct Settings {
    pub policy: Policy,
    pub journal: PathBuf,
    pub resolv_conf: PathBuf,
}

#[derive(Debug)]
struct Tun {
    ifindex: u32,
    prefixes: Vec<Prefix>,
    /// Routes through the TUN (they vanish with it; removed on `SetRoutes`).
    routes: Vec<RouteSpec>,
}

/// The state of one session.
#[derive(Debug)]
pub struct Session<'a> {
    settings: &'a Settings,
    nl: Netlink,
    journal: Journal,
    tun: Option<Tun>,
}

type Reply = (HelperToSession, Option<OwnedFd>);

fn refused(r: HelperRefusal) -> Reply {
    (HelperToSession::Refused(r), None)
}

fn system(e: Errno) -> HelperRefusal {
    HelperRefusal::System { errno: e as i32 }
}

fn journal_errno(e: &JournalError) -> Errno {
    match e {
        JournalError::Io { source, .. } => {
            Errno::from_raw(source.raw_os_error().unwrap_or(nix::libc::EIO))
        }
        JournalError::Restore { errno, .. } => *errno,
        JournalError::Syntax(_) => Errno::EINVAL,
    }
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(nix::libc::EIO))
}

/// A /0 becomes two /1s, so the original default route stays as it is.
fn split_default(p: Prefix) -> Vec<Prefix> {
    match (p.len, p.addr) {
        (0, IpAddr::V4(_)) => vec![
            Prefix {
                addr: Ipv4Addr::new(0, 0, 0, 0).into(),
                len: 1,
            },
            Prefix {
                addr: Ipv4Addr::new(128, 0, 0, 0).into(),
                len: 1,
            },
        ],
        (0, IpAddr::V6(_)) => vec![
            Prefix {
                addr: Ipv6Addr::UNSPECIFIED.into(),
                len: 1,
            },
            Prefix {
                addr: Ipv6Addr::new(0x8000, 0, 0, 0, 0, 0, 0, 0).into(),
                len: 1,
            },
        ],
        _ => vec![p],
    }
}

fn route_prefix(r: &Route) -> Prefix {
    match r {
        Route::V4(p) => Prefix {
            addr: p.addr.into(),
            len: p.len,
        },
        Route::V6(p) => Prefix {
            addr: p.addr.into(),
            len: p.len,
        },
    }
}

/// The name to create: `%d` replaced by the first unused number.
fn pick_name(template: &str) -> Result<String, Errno> {
    if !template.contains("%d") {
        return Ok(template.to_owned());
    }
    (0..64)
        .map(|n| template.replace("%d", &n.to_string()))
        .find(|name| nix::net::if_::if_nametoindex(name.as_str()).is_err())
        .ok_or(Errno::ENFILE)
}

/// Creates the TUN, with offload if the kernel allows it: `IFF_VNET_HDR` and
/// `TUNSETOFFLOAD` (checksum, TSO4/6, USO where the kernel has it), so the kernel hands
/// the session TCP super-packets of up to 64 KiB and takes coalesced ones back: one
/// `read`/`write` per ~45 packets at MTU 1400 (docs/client-helper.md). If the kernel
/// refuses offload, a plain TUN (`IFF_NO_PI`, `TUNSETOFFLOAD 0`) as before. Returns the
/// descriptor and whether it carries virtio-net headers.
fn create_tun(name: &str) -> std::io::Result<(OwnedFd, bool)> {
    let (dev, vnet_hdr) = match tun_rs::DeviceBuilder::new()
        .name(name)
        .offload(true)
        .build_sync()
    {
        // tun-rs reports whether offload took (`tcp_gso` is its IFF_VNET_HDR flag).
        Ok(dev) => {
            let on = dev.tcp_gso();
            (dev, on)
        }
        Err(e) => {
            // A failed attempt closed its descriptor, and with it the (non-persistent)
            // interface, so the name is free again.
            tracing::warn!(ifname = name, "TUN offload refused ({e}): a plain TUN");
            let dev = tun_rs::DeviceBuilder::new().name(name).build_sync()?;
            (dev, false)
        }
    };
    tracing::info!(
        ifname = name,
        vnet_hdr,
        udp_gso = dev.udp_gso(),
        "TUN offload"
    );
    // SAFETY: `into_raw_fd` hands over sole ownership of the open TUN descriptor.
    Ok((unsafe { OwnedFd::from_raw_fd(dev.into_raw_fd()) }, vnet_hdr))
}

impl<'a> Session<'a> {
    pub fn new(settings: &'a Settings) -> Result<Self, Errno> {
        Ok(Self {
            settings,
            nl: Netlink::open()?,
            journal: Journal::default(),
            tun: None,
        })
    }

    fn save(&self) -> Result<(), HelperRefusal> {
        self.journal.save(&self.settings.journal).map_err(|e| {
            tracing::error!("{e}");
            system(journal_errno(&e))
        })
    }

    pub fn handle(&mut self, msg: SessionToHelper) -> Reply {
        let result = match msg {
            SessionToHelper::OpenTun { ipv4, ipv6, mtu } => {
                let mut prefixes = vec![Prefix {
                    addr: ipv4.addr.into(),
                    len: ipv4.len,
                }];
                prefixes.extend(ipv6.map(|p| Prefix {
                    addr: p.addr.into(),
                    len: p.len,
                }));
                return self.open_tun(prefixes, mtu);
            }
            SessionToHelper::SetRoutes { routes, gateway } => {
                self.set_routes(routes.as_slice(), gateway)
            }
            SessionToHelper::SetDns { servers } => self.set_dns(servers.as_slice()),
            SessionToHelper::SetMtu { mtu } => self.set_mtu(mtu),
            SessionToHelper::TearDown => self.teardown().map_err(|e| system(journal_errno(&e))),
        };
        match result {
            Ok(()) => (HelperToSession::Done, None),
            Err(r) => {
                tracing::warn!(refusal = ?r, "request refused");
                refused(r)
            }
        }
    }

    fn open_tun(&mut self, prefixes: Vec<Prefix>, mtu: u16) -> Reply {
        if self.tun.is_some() {
            tracing::warn!("refused a second TUN");
            return refused(HelperRefusal::SecondTun);
        }
        if !prefixes.iter().all(|p| self.settings.policy.tun_allowed(p)) {
            tracing::warn!(?prefixes, "refused TUN addresses outside the policy");
            return refused(HelperRefusal::OutsidePolicy);
        }
        let name = match pick_name(&self.settings.policy.tun_name) {
            Ok(n) => n,
            Err(e) => return refused(system(e)),
        };
        self.journal.tun = Some(name.clone());
        if let Err(r) = self.save() {
            return refused(r);
        }
        let made = create_tun(&name)
            .map_err(|e| io_errno(&e))
            .and_then(|(fd, vnet_hdr)| {
                let ifindex = nix::net::if_::if_nametoindex(name.as_str())?;
                self.tun = Some(Tun {
                    ifindex,
                    prefixes: prefixes.clone(),
                    routes: Vec::new(),
                });
                self.nl.link_up(ifindex, u32::from(mtu))?;
                for p in &prefixes {
                    self.nl.addr_add(ifindex, p.addr, p.len)?;
                }
                Ok((fd, ifindex, vnet_hdr))
            });
        match made {
            Ok((fd, ifindex, vnet_hdr)) => {
                tracing::info!(ifname = %name, ifindex, mtu, vnet_hdr, "TUN opened");
                let ifname = BoundedString::new(&name).unwrap_or_default();
                let opened = HelperToSession::TunOpened {
                    ifname,
                    ifindex,
                    vnet_hdr,
                };
                (opened, Some(fd))
            }
            Err(e) => {
                tracing::error!(ifname = %name, "opening the TUN failed: {e}");
                let _ = self.teardown();
                refused(system(e))
            }
        }
    }

    fn set_routes(&mut self, routes: &[Route], gateway: IpAddr) -> Result<(), HelperRefusal> {
        let tun = self.tun.as_ref().ok_or(HelperRefusal::NoTun)?;
        let prefixes: Vec<Prefix> = routes.iter().map(route_prefix).collect();
        let policy = &self.settings.policy;
        let gateway_ok = !(gateway.is_unspecified()
            || gateway.is_loopback()
            || gateway.is_multicast()
            || tun.prefixes.iter().any(|p| p.contains_addr(gateway)));
        if !gateway_ok || !prefixes.iter().all(|p| policy.route_allowed(p)) {
            tracing::warn!(?prefixes, %gateway, "refused routes outside the policy");
            return Err(HelperRefusal::OutsidePolicy);
        }
        let ifindex = tun.ifindex;
        self.clear_routes()?;
        // The path to the gateway as it is before any route goes through the TUN.
        let found = self.nl.route_get(gateway).map_err(system)?;
        if found.oif == ifindex {
            return Err(HelperRefusal::OutsidePolicy);
        }
        let host = RouteSpec {
            dst: gateway,
            len: if gateway.is_ipv4() { 32 } else { 128 },
            oif: found.oif,
            via: found.via,
            table: found.table,
        };
        self.journal.routes.push(host);
        self.save()?;
        match self.nl.route_add(&host) {
            Ok(()) => tracing::info!(%gateway, oif = found.oif, "host route to the gateway"),
            Err(Errno::EEXIST) => {
                // A host route to the gateway exists already: it is not ours to remove.
                self.journal.routes.pop();
                self.save()?;
            }
            Err(e) => return Err(system(e)),
        }
        for p in prefixes.into_iter().flat_map(split_default) {
            let r = RouteSpec {
                dst: p.addr,
                len: p.len,
                oif: ifindex,
                via: None,
                table: RT_TABLE_MAIN,
            };
            self.nl.route_add(&r).map_err(system)?;
            if let Some(t) = self.tun.as_mut() {
                t.routes.push(r);
            }
        }
        tracing::info!(routes = routes.len(), "routes set");
        Ok(())
    }

    /// Removes the routes through the TUN and the host routes of an earlier `SetRoutes`.
    fn clear_routes(&mut self) -> Result<(), HelperRefusal> {
        let routes = self
            .tun
            .as_mut()
            .map(|t| std::mem::take(&mut t.routes))
            .unwrap_or_default();
        for r in routes.iter().rev() {
            match self.nl.route_delete(r) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => return Err(system(e)),
            }
        }
        while let Some(r) = self.journal.routes.last().copied() {
            match self.nl.route_delete(&r) {
                Ok(()) | Err(Errno::ESRCH | Errno::ENODEV) => {}
                Err(e) => return Err(system(e)),
            }
            self.journal.routes.pop();
            self.save()?;
        }
        Ok(())
    }

    /// The gateway's CONFIG_DELTA changed the MTU: the live TUN takes it (its bounds
    /// are checked when the message is decoded; the TUN, and with it the MTU, goes at
    /// teardown, so there is nothing to journal).
    fn set_mtu(&mut self, mtu: u16) -> Result<(), HelperRefusal> {
        let tun = self.tun.as_ref().ok_or(HelperRefusal::NoTun)?;
        self.nl
            .link_up(tun.ifindex, u32::from(mtu))
            .map_err(system)?;
        tracing::info!(mtu, "TUN MTU set");
        Ok(())
    }

    fn set_dns(&mut self, servers: &[IpAddr]) -> Result<(), HelperRefusal> {
        let tun = self.tun.as_ref().ok_or(HelperRefusal::NoTun)?;
        let inside = |s: &IpAddr| tun.prefixes.iter().any(|p| p.contains_addr(*s));
        if !self.settings.policy.dns_outside_tunnel && !servers.iter().all(inside) {
            tracing::warn!(?servers, "refused DNS servers outside the tunnel");
            return Err(HelperRefusal::OutsidePolicy);
        }
        let path = &self.settings.resolv_conf;
        if servers.is_empty() {
            // No servers: the original resolver configuration comes back.
            if let Some((file, saved)) = self.journal.resolv.take() {
                dns::restore(&file, &saved).map_err(|e| system(io_errno(&e)))?;
                self.save()?;
            }
            return Ok(());
        }
        if self.journal.resolv.is_none() {
            let saved = dns::capture(path).map_err(|e| system(io_errno(&e)))?;
            self.journal.resolv = Some((path.clone(), saved));
            self.save()?;
        }
        dns::write_servers(path, servers).map_err(|e| system(io_errno(&e)))?;
        tracing::info!(?servers, file = %path.display(), "DNS set");
        Ok(())
    }

    /// Deletes the TUN, restores routes and DNS, removes the journal.
    pub fn teardown(&mut self) -> Result<(), JournalError> {
        if let Some(tun) = self.tun.take() {
            match self.nl.link_delete(tun.ifindex) {
                Ok(()) | Err(Errno::ENODEV) => {}
                Err(errno) => tracing::warn!("deleting the TUN: {errno}"),
            }
        }
        let r = self.journal.restore(&mut self.nl, &self.settings.journal);
        if let Err(e) = &r {
            tracing::error!("teardown incomplete, the journal stays: {e}");
        } else {
            tracing::info!("torn down: routes and DNS restored");
        }
        r
    }
}
