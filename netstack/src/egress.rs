//! Outbound OS sockets, bound to the egress the configuration names.

use crate::config::Egress;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};

/// What kind of outbound socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Udp,
    /// Unprivileged ICMP "ping" socket (`SOCK_DGRAM`, `IPPROTO_ICMP`/`ICMPV6`).
    Ping,
}

/// A platform hook run on every outbound socket after the egress binding, before it
/// connects or sends. On Android the gateway service binds the socket to the VPN
/// `Network` here (`Network.bindSocket` through JNI), so that forwarded traffic
/// fails closed when the VPN goes away; an error refuses the flow.
pub type SocketHook = Box<dyn FnMut(BorrowedFd<'_>, Kind, bool) -> io::Result<()> + Send>;

/// Creates a non-blocking, close-on-exec socket of `kind` for the family of `remote`,
/// restricted to the configured egress.
pub(crate) fn socket(
    kind: Kind,
    v6: bool,
    egress: &Egress,
    hook: Option<&mut SocketHook>,
) -> io::Result<Socket> {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let (ty, proto) = match (kind, v6) {
        (Kind::Tcp, _) => (Type::STREAM, Protocol::TCP),
        (Kind::Udp, _) => (Type::DGRAM, Protocol::UDP),
        (Kind::Ping, false) => (Type::DGRAM, Protocol::ICMPV4),
        (Kind::Ping, true) => (Type::DGRAM, Protocol::ICMPV6),
    };
    let sock = Socket::new(domain, ty.nonblocking().cloexec(), Some(proto))?;
    if v6 {
        sock.set_only_v6(true)?;
    }
    if kind == Kind::Tcp {
        sock.set_tcp_nodelay(true)?;
    }
    bind_egress(&sock, v6, egress)?;
    if let Some(hook) = hook {
        hook(sock.as_fd(), kind, v6)?;
    }
    Ok(sock)
}

fn bind_egress(sock: &Socket, v6: bool, egress: &Egress) -> io::Result<()> {
    let (name, addrs) = match egress {
        Egress::Any => return Ok(()),
        Egress::InterfaceIndex(index) => {
            let index = std::num::NonZeroU32::new(*index)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))?;
            // SO_BINDTOIFINDEX for either family on Linux.
            return if v6 {
                sock.bind_device_by_index_v6(Some(index))
            } else {
                sock.bind_device_by_index_v4(Some(index))
            };
        }
        Egress::Interface { name, addrs } => (name, addrs),
    };
    match sock.bind_device(Some(name.as_bytes())) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
        Err(e) => return Err(e),
    }
    // SO_BINDTODEVICE refused: bind to the interface's own source address instead, so
    // the kernel can only route the socket out of the interface that owns it.
    let addr = addrs
        .iter()
        .copied()
        .find(|a| a.is_ipv6() == v6)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EADDRNOTAVAIL))?;
    sock.bind(&SockAddr::from(SocketAddr::new(addr, 0)))
}

/// The unspecified address of a family, port 0.
pub(crate) fn any_addr(v6: bool) -> SocketAddr {
    if v6 {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)
    } else {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
    }
}

/// A non-blocking TCP connect; `Ok` also while it is in progress.
pub(crate) fn tcp_connect(
    remote: SocketAddr,
    egress: &Egress,
    hook: Option<&mut SocketHook>,
) -> io::Result<mio::net::TcpStream> {
    let sock = socket(Kind::Tcp, remote.is_ipv6(), egress, hook)?;
    match sock.connect(&SockAddr::from(remote)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(mio::net::TcpStream::from_std(std::net::TcpStream::from(
        sock,
    )))
}

/// A UDP (or ping) socket bound to an ephemeral port of the egress.
pub(crate) fn udp_bind(
    kind: Kind,
    v6: bool,
    egress: &Egress,
    hook: Option<&mut SocketHook>,
) -> io::Result<mio::net::UdpSocket> {
    let sock = socket(kind, v6, egress, hook)?;
    // Unbound (egress any, or bound to a device only): take an ephemeral port now.
    let bound = sock
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .is_some_and(|a| a.port() != 0);
    if !bound {
        sock.bind(&SockAddr::from(any_addr(v6)))?;
    }
    Ok(mio::net::UdpSocket::from_std(std::net::UdpSocket::from(
        sock,
    )))
}

/// Asks the kernel to queue the ICMP errors that answer this UDP socket's datagrams
/// (`IP_RECVERR` / `IPV6_RECVERR`), so they can be relayed to the client.
pub(crate) fn enable_recv_err(sock: &mio::net::UdpSocket, v6: bool) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    let r = if v6 {
        setsockopt(sock, sockopt::Ipv6RecvErr, &true)
    } else {
        setsockopt(sock, sockopt::Ipv4RecvErr, &true)
    };
    r.map_err(io::Error::from)
}

/// One ICMP error the kernel queued for a datagram this socket sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueuedError {
    /// Where the datagram was going.
    pub dest: SocketAddr,
    /// How many bytes of its payload came back into the caller's buffer.
    pub len: usize,
    /// ICMP type, code and info (next-hop MTU for "too big").
    pub icmp_type: u8,
    pub code: u8,
    pub info: u32,
}

/// Reads the next ICMP error from the socket's error queue (`MSG_ERRQUEUE`); `None`
/// when the queue is empty. The returned datagram payload goes into `payload`.
pub(crate) fn read_error_queue(
    sock: &mio::net::UdpSocket,
    payload: &mut [u8],
) -> Option<QueuedError> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg};
    use std::os::fd::AsRawFd;
    const SO_EE_ORIGIN_ICMP: u8 = 2;
    const SO_EE_ORIGIN_ICMP6: u8 = 3;
    // Bounded: a queue never yields more entries than this per call.
    for _ in 0..64 {
        let mut cmsg = nix::cmsg_space!(libc::sock_extended_err, libc::sockaddr_in6);
        let mut iov = [std::io::IoSliceMut::new(payload)];
        let msg = recvmsg::<SockaddrStorage>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT,
        )
        .ok()?;
        let dest = msg.address.and_then(|a| {
            a.as_sockaddr_in()
                .map(|s| SocketAddr::from(std::net::SocketAddrV4::from(*s)))
                .or_else(|| {
                    a.as_sockaddr_in6()
                        .map(|s| SocketAddr::from(std::net::SocketAddrV6::from(*s)))
                })
        });
        let len = msg.bytes;
        let Ok(cmsgs) = msg.cmsgs() else { continue };
        for c in cmsgs {
            let ee = match c {
                ControlMessageOwned::Ipv4RecvErr(ee, _) if ee.ee_origin == SO_EE_ORIGIN_ICMP => ee,
                ControlMessageOwned::Ipv6RecvErr(ee, _) if ee.ee_origin == SO_EE_ORIGIN_ICMP6 => ee,
                _ => continue,
            };
            if let Some(dest) = dest {
                return Some(QueuedError {
                    dest,
                    len: len.min(payload.len()),
                    icmp_type: ee.ee_type,
                    code: ee.ee_code,
                    info: ee.ee_info,
                });
            }
        }
    }
    None
}

/// Sets `SO_LINGER` 0 so that dropping the stream sends RST instead of FIN.
pub(crate) fn set_abortive(stream: &mio::net::TcpStream) {
    let sock = socket2::SockRef::from(stream);
    let _ = sock.set_linger(Some(std::time::Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_sees_every_socket_and_can_refuse() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let mut hook: SocketHook = Box::new(move |_, kind, v6| {
            c.fetch_add(1, Ordering::Relaxed);
            match (kind, v6) {
                (Kind::Udp, true) => Err(io::Error::from_raw_os_error(libc::ENETUNREACH)),
                _ => Ok(()),
            }
        });
        assert!(udp_bind(Kind::Udp, false, &Egress::Any, Some(&mut hook)).is_ok());
        assert!(udp_bind(Kind::Udp, true, &Egress::Any, Some(&mut hook)).is_err());
        assert_eq!(calls.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn any_egress_makes_sockets() {
        let s = udp_bind(Kind::Udp, false, &Egress::Any, None).unwrap();
        assert!(s.local_addr().unwrap().port() != 0);
    }

    #[test]
    fn interface_index_binds_or_refuses() {
        // Index 1 is `lo` in every network namespace.
        let s = socket(Kind::Udp, false, &Egress::InterfaceIndex(1), None).unwrap();
        assert_eq!(s.device().unwrap().as_deref(), Some(&b"lo"[..]));
        assert!(socket(Kind::Udp, false, &Egress::InterfaceIndex(0), None).is_err());
        assert!(socket(Kind::Tcp, true, &Egress::InterfaceIndex(u32::MAX), None).is_err());
    }

    #[test]
    fn missing_interface_is_an_error_not_a_leak() {
        // A device that does not exist: either SO_BINDTODEVICE fails (ENODEV) or, if
        // refused for privilege, there is no source address to fall back to.
        let egress = Egress::Interface {
            name: "vshnope0".into(),
            addrs: vec![],
        };
        assert!(socket(Kind::Udp, false, &egress, None).is_err());
    }
}
