//! Batched datagram I/O on a connected UDP socket: `recvmmsg` and `sendmmsg`, so a
//! burst of records costs one system call instead of one per record
//! (docs/performance.md). Shared by the client session and the parser worker; both
//! seccomp policies allow `recvmmsg`, `sendmmsg` and the `UDP_GRO` `setsockopt`.

use std::os::fd::RawFd;

use nix::errno::Errno;

/// Most datagrams one call moves.
pub const MAX_BATCH: usize = 32;

/// Receives up to [`MAX_BATCH`] datagrams without blocking into the `slot`-byte slots
/// of `buf`; `lens[i]` gets the length of the i-th. A datagram longer than its slot
/// is reported with length 0 (the caller drops it). Returns how many arrived
/// (`EAGAIN` when none).
pub fn recv_batch(
    fd: RawFd,
    buf: &mut [u8],
    slot: usize,
    lens: &mut [usize; MAX_BATCH],
) -> Result<usize, Errno> {
    let mut segs = [0usize; MAX_BATCH];
    recv_batch_gro(fd, buf, slot, lens, &mut segs)
}

/// Turns on UDP GRO for `fd`: the kernel may then hand over several datagrams of one
/// size (the last may be shorter) in one slot; [`recv_batch_gro`] reports their size.
pub fn enable_gro(fd: std::os::fd::BorrowedFd<'_>) -> Result<(), Errno> {
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::UdpGroSegment, &true)
}

/// The datagrams of one slot of [`recv_batch_gro`]: the whole slot, or, when the kernel
/// coalesced several (`seg > 0`), each `seg` bytes (the last may be shorter).
pub fn datagrams(slot: &mut [u8], seg: usize) -> std::slice::ChunksMut<'_, u8> {
    let size = if seg == 0 { slot.len().max(1) } else { seg };
    slot.chunks_mut(size)
}

/// [`recv_batch`] on a socket with GRO ([`enable_gro`]): `segs[i]` gets the size of
/// the datagrams coalesced into slot i, or 0 when it holds one datagram.
pub fn recv_batch_gro(
    fd: RawFd,
    buf: &mut [u8],
    slot: usize,
    lens: &mut [usize; MAX_BATCH],
    segs: &mut [usize; MAX_BATCH],
) -> Result<usize, Errno> {
    // Control buffers, 8-byte aligned as `cmsghdr` needs (one u16/int option each).
    let mut cmsg = [[0u64; 4]; MAX_BATCH];
    let slots = (buf.len() / slot.max(1)).min(MAX_BATCH);
    if slots == 0 {
        return Err(Errno::EINVAL);
    }
    // SAFETY: all-zero is a valid bit pattern for these plain C structs.
    let mut iov: [libc::iovec; MAX_BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
    for (i, chunk) in buf.chunks_mut(slot).take(slots).enumerate() {
        if let (Some(v), Some(h)) = (iov.get_mut(i), hdrs.get_mut(i)) {
            v.iov_base = chunk.as_mut_ptr().cast();
            v.iov_len = chunk.len();
            h.msg_hdr.msg_iov = v;
            h.msg_hdr.msg_iovlen = 1;
        }
    }
    for (h, c) in hdrs.iter_mut().zip(cmsg.iter_mut()).take(slots) {
        h.msg_hdr.msg_control = c.as_mut_ptr().cast();
        h.msg_hdr.msg_controllen = std::mem::size_of_val(c);
    }
    let n = loop {
        // SAFETY: `hdrs[..slots]` point at `iov[..slots]`, which point into disjoint
        // chunks of `buf`; all of them outlive the call. The kernel writes at most
        // `iov_len` bytes into each and fills `msg_len`.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                slots as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r >= 0 {
            break usize::try_from(r).unwrap_or(0);
        }
        match Errno::last() {
            Errno::EINTR => continue,
            e => return Err(e),
        }
    };
    for ((h, l), g) in hdrs
        .iter()
        .zip(lens.iter_mut())
        .zip(segs.iter_mut())
        .take(n)
    {
        let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        *l = if truncated { 0 } else { h.msg_len as usize };
        *g = gro_segment(&h.msg_hdr);
    }
    Ok(n)
}

/// The `UDP_GRO` segment size in a received message's control data, or 0.
fn gro_segment(m: &libc::msghdr) -> usize {
    let mut seg = 0;
    // SAFETY: the kernel filled `msg_control` up to `msg_controllen` (no more than the
    // buffer handed in, and MSG_CTRUNC only shortens it); CMSG_FIRSTHDR/CMSG_NXTHDR
    // stay inside that range and return null at its end.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(m);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                seg = usize::try_from(v).unwrap_or(0);
            }
            c = libc::CMSG_NXTHDR(m, c);
        }
    }
    seg
}

/// Sends `records` as datagrams, up to [`MAX_BATCH`] per call, without blocking.
/// Returns how many were handed to the kernel (fewer when its buffer is full).
pub fn send_batch(fd: RawFd, records: &[&[u8]]) -> Result<usize, Errno> {
    let mut sent = 0;
    while sent < records.len() {
        let chunk = records.get(sent..).unwrap_or_default();
        let n = chunk.len().min(MAX_BATCH);
        // SAFETY: all-zero is a valid bit pattern for these plain C structs.
        let mut iov: [libc::iovec; MAX_BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
        for ((r, v), h) in chunk
            .iter()
            .zip(iov.iter_mut())
            .zip(hdrs.iter_mut())
            .take(n)
        {
            v.iov_base = r.as_ptr().cast_mut().cast();
            v.iov_len = r.len();
            h.msg_hdr.msg_iov = v;
            h.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `hdrs[..n]` point at `iov[..n]`, which point at the callers' slices;
        // the kernel only reads them, and all outlive the call.
        let r =
            unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT) };
        if r < 0 {
            match Errno::last() {
                Errno::EINTR => continue,
                e if sent == 0 => return Err(e),
                _ => return Ok(sent),
            }
        }
        let done = usize::try_from(r).unwrap_or(0);
        sent += done;
        if done < n {
            break;
        }
    }
    Ok(sent)
}

/// Most records one GSO datagram carries (the kernel's `UDP_MAX_SEGMENTS` is 64 or more).
pub const MAX_SEGMENTS: usize = 64;
/// Most payload bytes one GSO datagram carries (below the 65,507 of one UDP datagram).
const MAX_GSO_BYTES: usize = 65_000;
/// Records one [`send_batch_gso`] call hands to the kernel at most.
pub const MAX_GSO_RECORDS: usize = 2 * MAX_SEGMENTS;
/// Cleared when the kernel refuses `UDP_SEGMENT` (an IPsec route, an old kernel):
/// from then on every record goes out as a datagram of its own.
static GSO_OK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Like [`send_batch`], but runs of equal-sized records (the last of a run may be
/// shorter) go out as one UDP GSO datagram (`UDP_SEGMENT`): the kernel builds the
/// datagrams at the bottom of its stack, so the run costs one trip through it instead
/// of one per record. On the wire nothing changes: one record per datagram.
pub fn send_batch_gso(fd: RawFd, records: &[&[u8]]) -> Result<usize, Errno> {
    let mut sent = 0;
    while sent < records.len() {
        if !GSO_OK.load(std::sync::atomic::Ordering::Relaxed) {
            let rest = records.get(sent..).unwrap_or_default();
            return match send_batch(fd, rest) {
                Ok(n) => Ok(sent + n),
                Err(e) if sent == 0 => Err(e),
                Err(_) => Ok(sent),
            };
        }
        let rest = records.get(sent..).unwrap_or_default();
        // SAFETY: all-zero is a valid bit pattern for these plain C structs.
        let mut iov: [libc::iovec; MAX_GSO_RECORDS] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
        // Control buffers, 8-byte aligned as `cmsghdr` needs.
        let mut cmsg = [[0u64; 4]; MAX_BATCH];
        let mut counts = [0usize; MAX_BATCH];
        let (mut nmsg, mut niov, mut i) = (0usize, 0usize, 0usize);
        while i < rest.len() && nmsg < MAX_BATCH && niov < MAX_GSO_RECORDS {
            let seg = rest.get(i).map_or(0, |r| r.len());
            let mut k = 1;
            let mut total = seg;
            while k < MAX_SEGMENTS && niov + k < MAX_GSO_RECORDS {
                let Some(next) = rest.get(i + k).map(|r| r.len()) else {
                    break;
                };
                if next > seg || next == 0 || total + next > MAX_GSO_BYTES {
                    break;
                }
                total += next;
                k += 1;
                if next < seg {
                    break; // a shorter record ends the run
                }
            }
            for (v, r) in iov.iter_mut().skip(niov).zip(rest.iter().skip(i)).take(k) {
                v.iov_base = r.as_ptr().cast_mut().cast();
                v.iov_len = r.len();
            }
            let (Some(h), Some(c), Some(count)) =
                (hdrs.get_mut(nmsg), cmsg.get_mut(nmsg), counts.get_mut(nmsg))
            else {
                break;
            };
            if let Some(v) = iov.get_mut(niov) {
                h.msg_hdr.msg_iov = v;
                h.msg_hdr.msg_iovlen = k;
            }
            if k > 1 {
                let size = u16::try_from(seg).unwrap_or(u16::MAX);
                let buf: *mut libc::cmsghdr = c.as_mut_ptr().cast();
                // SAFETY: `c` is 32 bytes, 8-byte aligned: room for one `cmsghdr` and
                // a u16 (CMSG_SPACE(2) = 24 on 64-bit Linux); CMSG_DATA points inside.
                unsafe {
                    (*buf).cmsg_level = libc::SOL_UDP;
                    (*buf).cmsg_type = libc::UDP_SEGMENT;
                    (*buf).cmsg_len = libc::CMSG_LEN(2) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(buf).cast::<u16>(), size);
                    h.msg_hdr.msg_controllen = libc::CMSG_SPACE(2) as _;
                }
                h.msg_hdr.msg_control = buf.cast();
            }
            *count = k;
            nmsg += 1;
            niov += k;
            i += k;
        }
        // SAFETY: `hdrs[..nmsg]` point at runs of `iov` and at their control buffers,
        // which point at the callers' slices; the kernel only reads them, and all
        // outlive the call.
        let r = unsafe {
            libc::sendmmsg(
                fd,
                hdrs.as_mut_ptr(),
                nmsg as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            match Errno::last() {
                Errno::EINTR => continue,
                Errno::EIO | Errno::EINVAL | Errno::EOPNOTSUPP => {
                    // No GSO on this path: plain datagrams from now on.
                    GSO_OK.store(false, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                e if sent == 0 => return Err(e),
                _ => return Ok(sent),
            }
        }
        let done = usize::try_from(r).unwrap_or(0);
        sent += counts.iter().take(done).sum::<usize>();
        if done < nmsg {
            break;
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn gso_runs_arrive_as_one_datagram_per_record_in_order() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.connect(b.local_addr().unwrap()).unwrap();
        b.connect(a.local_addr().unwrap()).unwrap();
        // Runs of equal sizes with shorter ends, singletons, a run longer than the
        // segment limit: 150 records of which every one must arrive alone and whole.
        let mut recs: Vec<Vec<u8>> = Vec::new();
        for i in 0..150usize {
            let len = match i % 50 {
                0..=40 => 1437,
                41 => 600,
                42..=45 => 80,
                _ => 200 + i,
            };
            recs.push(vec![(i % 251) as u8; len]);
        }
        let refs: Vec<&[u8]> = recs.iter().map(Vec::as_slice).collect();
        let _ = nix::sys::socket::setsockopt(&b, nix::sys::socket::sockopt::RcvBuf, &(8 << 20));
        // The receiver with GRO on: coalesced runs must split back into the records.
        enable_gro(std::os::fd::AsFd::as_fd(&b)).unwrap();
        let mut sent = 0;
        while sent < refs.len() {
            sent += send_batch_gso(a.as_raw_fd(), &refs[sent..]).unwrap();
        }
        assert!(
            GSO_OK.load(std::sync::atomic::Ordering::Relaxed),
            "the kernel took UDP_SEGMENT on loopback"
        );
        const SLOT: usize = 65_536;
        let mut buf = vec![0u8; MAX_BATCH * SLOT];
        let mut lens = [0usize; MAX_BATCH];
        let mut segs = [0usize; MAX_BATCH];
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut coalesced = 0;
        for _ in 0..400 {
            match recv_batch_gro(b.as_raw_fd(), &mut buf, SLOT, &mut lens, &mut segs) {
                Ok(n) => {
                    for ((slot, &l), &seg) in buf.chunks_mut(SLOT).zip(&lens).zip(&segs).take(n) {
                        coalesced += usize::from(seg > 0 && l > seg);
                        for d in datagrams(&mut slot[..l], seg) {
                            got.push(d.to_vec());
                        }
                    }
                }
                Err(Errno::EAGAIN) => {
                    if got.len() >= refs.len() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got.len(), recs.len());
        assert!(coalesced > 0, "no slot held a coalesced run: GRO untested");
        assert!(
            got.iter().zip(&recs).all(|(g, r)| g == r),
            "order or content"
        );
    }

    #[test]
    fn a_batch_goes_out_and_comes_back_in_order_and_oversized_ones_are_flagged() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.connect(b.local_addr().unwrap()).unwrap();
        b.connect(a.local_addr().unwrap()).unwrap();
        let recs: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 10 + usize::from(i)]).collect();
        let mut refs: Vec<&[u8]> = recs.iter().map(Vec::as_slice).collect();
        let big = vec![0xAB; 3000];
        refs.push(&big);
        assert_eq!(send_batch(a.as_raw_fd(), &refs).unwrap(), refs.len());
        let mut buf = vec![0u8; MAX_BATCH * 2048];
        let mut lens = [0usize; MAX_BATCH];
        let mut got: Vec<usize> = Vec::new();
        for _ in 0..100 {
            match recv_batch(b.as_raw_fd(), &mut buf, 2048, &mut lens) {
                Ok(n) => {
                    for (i, &l) in lens.iter().enumerate().take(n) {
                        if l > 0 {
                            let first = buf[i * 2048];
                            assert!(buf[i * 2048..i * 2048 + l].iter().all(|&x| x == first));
                        }
                        got.push(l);
                    }
                }
                Err(Errno::EAGAIN) => {
                    if got.len() == refs.len() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => panic!("{e}"),
            }
        }
        let want: Vec<usize> = (0..40usize).map(|i| 10 + i).chain([0]).collect();
        assert_eq!(got, want, "in order; the 3000-byte one did not fit a slot");
    }
}
