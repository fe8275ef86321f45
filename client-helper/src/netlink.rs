//! A tiny synchronous rtnetlink client: exactly the seven requests the helper makes,
//! built and parsed by hand (`rtnetlink(7)`). Only the kernel's replies are parsed.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    socket,
};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_FLAGS: u16 = 8;
const IFA_F_NODAD: u32 = 0x02;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_TABLE: u16 = 15;

const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RT_SCOPE_NOWHERE: u8 = 255;
const RTN_UNICAST: u8 = 1;
const IFF_UP: u32 = 1;

/// The main routing table.
pub const RT_TABLE_MAIN: u32 = 254;

/// One route the helper adds or removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteSpec {
    pub dst: IpAddr,
    pub len: u8,
    pub oif: u32,
    pub via: Option<IpAddr>,
    pub table: u32,
}

/// Where the kernel sends packets for one address today.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lookup {
    pub oif: u32,
    pub via: Option<IpAddr>,
    pub table: u32,
}

/// A `NETLINK_ROUTE` socket.
#[derive(Debug)]
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

fn family(a: &IpAddr) -> u8 {
    match a {
        IpAddr::V4(_) => nix::libc::AF_INET as u8,
        IpAddr::V6(_) => nix::libc::AF_INET6 as u8,
    }
}

fn octets(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

fn attr(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at + 2)?;
    Some(u16::from_ne_bytes([s[0], s[1]]))
}

fn ip_from(data: &[u8]) -> Option<IpAddr> {
    match data.len() {
        4 => <[u8; 4]>::try_from(data).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(data).ok().map(IpAddr::from),
        _ => None,
    }
}

fn bad_reply() -> Errno {
    Errno::EBADMSG
}

impl Netlink {
    pub fn open() -> Result<Self, Errno> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        Ok(Self { fd, seq: 0 })
    }

    /// Sends one request; returns the body of the first reply that is not an ack.
    fn request(&mut self, ty: u16, flags: u16, body: &[u8]) -> Result<Vec<u8>, Errno> {
        self.seq = self.seq.wrapping_add(1);
        let mut msg = Vec::with_capacity(16 + body.len());
        msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&ty.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        send(self.fd.as_raw_fd(), &msg, MsgFlags::empty())?;
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            let mut at = 0;
            while at + 16 <= n {
                let len = u32_at(&buf, at).ok_or_else(bad_reply)? as usize;
                let rty = u16_at(&buf, at + 4).ok_or_else(bad_reply)?;
                let seq = u32_at(&buf, at + 8).ok_or_else(bad_reply)?;
                if len < 16 || at + len > n {
                    return Err(bad_reply());
                }
                let payload = &buf[at + 16..at + len];
                at += len.next_multiple_of(4);
                if seq != self.seq {
                    continue;
                }
                match rty {
                    NLMSG_ERROR => {
                        let code = u32_at(payload, 0).ok_or_else(bad_reply)? as i32;
                        return if code == 0 {
                            Ok(Vec::new())
                        } else {
                            Err(Errno::from_raw(-code))
                        };
                    }
                    NLMSG_DONE => return Ok(Vec::new()),
                    _ => return Ok(payload.to_vec()),
                }
            }
        }
    }

    /// Sets the MTU and brings the link up.
    pub fn link_up(&mut self, ifindex: u32, mtu: u32) -> Result<(), Errno> {
        let mut b = ifinfomsg(ifindex, IFF_UP, IFF_UP);
        attr(&mut b, IFLA_MTU, &mtu.to_ne_bytes());
        self.request(RTM_NEWLINK, NLM_F_ACK, &b).map(drop)
    }

    /// Deletes a link (its addresses and routes go with it).
    pub fn link_delete(&mut self, ifindex: u32) -> Result<(), Errno> {
        self.request(RTM_DELLINK, NLM_F_ACK, &ifinfomsg(ifindex, 0, 0))
            .map(drop)
    }

    /// Adds an address (IPv6 without duplicate address detection).
    pub fn addr_add(&mut self, ifindex: u32, addr: IpAddr, len: u8) -> Result<(), Errno> {
        let mut b = vec![family(&addr), len, 0, RT_SCOPE_UNIVERSE];
        b.extend_from_slice(&ifindex.to_ne_bytes());
        let o = octets(&addr);
        attr(&mut b, IFA_ADDRESS, &o);
        match addr {
            IpAddr::V4(_) => attr(&mut b, IFA_LOCAL, &o),
            IpAddr::V6(_) => attr(&mut b, IFA_FLAGS, &IFA_F_NODAD.to_ne_bytes()),
        }
        let flags = NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
        self.request(RTM_NEWADDR, flags, &b).map(drop)
    }

    fn route_msg(&mut self, r: &RouteSpec, add: bool) -> Result<(), Errno> {
        let scope = match (add, r.via) {
            (false, _) => RT_SCOPE_NOWHERE,
            (true, None) if r.dst.is_ipv4() => RT_SCOPE_LINK,
            (true, _) => RT_SCOPE_UNIVERSE,
        };
        let mut b = rtmsg(family(&r.dst), r.len, r.table, scope);
        attr(&mut b, RTA_TABLE, &r.table.to_ne_bytes());
        attr(&mut b, RTA_DST, &octets(&r.dst));
        attr(&mut b, RTA_OIF, &r.oif.to_ne_bytes());
        if let Some(via) = r.via {
            attr(&mut b, RTA_GATEWAY, &octets(&via));
        }
        if add {
            let flags = NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
            self.request(RTM_NEWROUTE, flags, &b).map(drop)
        } else {
            self.request(RTM_DELROUTE, NLM_F_ACK, &b).map(drop)
        }
    }

    pub fn route_add(&mut self, r: &RouteSpec) -> Result<(), Errno> {
        self.route_msg(r, true)
    }

    pub fn route_delete(&mut self, r: &RouteSpec) -> Result<(), Errno> {
        self.route_msg(r, false)
    }

    /// Asks the kernel which route it takes to `dst` now (`ip route get`).
    pub fn route_get(&mut self, dst: IpAddr) -> Result<Lookup, Errno> {
        let full = if dst.is_ipv4() { 32 } else { 128 };
        let mut b = rtmsg(family(&dst), full, 0, 0);
        attr(&mut b, RTA_DST, &octets(&dst));
        let reply = self.request(RTM_GETROUTE, 0, &b)?;
        let mut found = Lookup {
            oif: 0,
            via: None,
            table: u32::from(*reply.get(4).ok_or_else(bad_reply)?),
        };
        let mut at = 12;
        while let (Some(len), Some(ty)) = (u16_at(&reply, at), u16_at(&reply, at + 2)) {
            let len = usize::from(len);
            let data = reply.get(at + 4..at + len).ok_or_else(bad_reply)?;
            match ty {
                RTA_OIF => found.oif = u32_at(data, 0).ok_or_else(bad_reply)?,
                RTA_GATEWAY => found.via = ip_from(data),
                RTA_TABLE => found.table = u32_at(data, 0).ok_or_else(bad_reply)?,
                _ => {}
            }
            if len < 4 {
                return Err(bad_reply());
            }
            at += len.next_multiple_of(4);
        }
        if found.oif == 0 || reply.get(7) != Some(&RTN_UNICAST) {
            return Err(Errno::ENETUNREACH);
        }
        Ok(found)
    }
}

fn ifinfomsg(ifindex: u32, flags: u32, change: u32) -> Vec<u8> {
    let mut b = vec![nix::libc::AF_UNSPEC as u8, 0, 0, 0];
    b.extend_from_slice(&ifindex.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&change.to_ne_bytes());
    b
}

fn rtmsg(family: u8, dst_len: u8, table: u32, scope: u8) -> Vec<u8> {
    let table = u8::try_from(table).unwrap_or(0);
    let mut b = vec![
        family,
        dst_len,
        0,
        0,
        table,
        RTPROT_STATIC,
        scope,
        RTN_UNICAST,
    ];
    b.extend_from_slice(&0u32.to_ne_bytes());
    b
}
