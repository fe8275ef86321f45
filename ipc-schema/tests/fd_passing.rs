//! Descriptors that arrive where none (or other counts) are expected are closed and the
//! receive fails typed. One test in this binary on purpose: it counts the process's
//! open descriptors, which parallel tests would disturb.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::fd::{AsFd, OwnedFd};

use ipc_schema::channel::ChannelError;
use ipc_schema::fdpass::send_with_fds;
use ipc_schema::messages::broker_worker::{self, BrokerToWorker, TransportKind};
use ipc_schema::{Channel, ChannelKind, Role, SCHEMA_VERSION};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn pipes(n: usize) -> Vec<(OwnedFd, OwnedFd)> {
    (0..n).map(|_| nix::unistd::pipe().unwrap()).collect()
}

/// Sends `msg` to a worker channel with `n` descriptors attached; returns the error.
fn recv_with(msg: &BrokerToWorker, n: usize) -> ChannelError {
    let (a, mut b) = common::pair_with_hello(ChannelKind::BrokerWorker, Role::Broker);
    let mut ch = Channel::<broker_worker::WorkerEnd>::open(a).unwrap();
    common::read_hello(&mut b);
    let ps = pipes(n);
    let fds: Vec<_> = ps.iter().map(|(r, _)| r.as_fd()).collect();
    let frame = common::frame(&postcard::to_stdvec(msg).unwrap(), SCHEMA_VERSION);
    assert_eq!(send_with_fds(b.as_fd(), &frame, &fds).unwrap(), frame.len());
    drop(fds);
    drop(ps);
    let before = open_fds();
    let e = ch.recv().unwrap_err();
    assert_eq!(open_fds(), before, "received descriptors were not closed");
    e
}

#[test]
fn unexpected_descriptors_are_closed_and_fail_typed() {
    let start = open_fds();
    let no_fd = BrokerToWorker::ReportCounters;
    let one_fd = BrokerToWorker::AdoptTransport {
        kind: TransportKind::Stream,
        first_record: None,
    };
    assert!(matches!(
        recv_with(&no_fd, 1),
        ChannelError::UnexpectedFds {
            expected: 0,
            got: 1
        }
    ));
    assert!(matches!(
        recv_with(&one_fd, 0),
        ChannelError::UnexpectedFds {
            expected: 1,
            got: 0
        }
    ));
    // More than any message carries: refused as soon as they arrive.
    assert!(matches!(
        recv_with(&one_fd, 2),
        ChannelError::UnexpectedFds { got: 2, .. }
    ));
    assert!(matches!(
        recv_with(&no_fd, 40),
        ChannelError::UnexpectedFds { got: 40, .. }
    ));
    assert_eq!(open_fds(), start, "descriptors leaked");

    // And the right count arrives, as OwnedFd, close-on-exec.
    let (a, mut b) = common::pair_with_hello(ChannelKind::BrokerWorker, Role::Broker);
    let mut ch = Channel::<broker_worker::WorkerEnd>::open(a).unwrap();
    common::read_hello(&mut b);
    let (r, _w) = nix::unistd::pipe().unwrap();
    let frame = common::frame(&postcard::to_stdvec(&one_fd).unwrap(), SCHEMA_VERSION);
    send_with_fds(b.as_fd(), &frame, &[r.as_fd()]).unwrap();
    let got = ch.recv().unwrap();
    assert_eq!(got.fds.len(), 1);
    let flags = nix::fcntl::fcntl(&got.fds[0], nix::fcntl::FcntlArg::F_GETFD).unwrap();
    assert!(nix::fcntl::FdFlag::from_bits_truncate(flags).contains(nix::fcntl::FdFlag::FD_CLOEXEC));
}
