//! The "fake laptop": a client-side smoltcp stack whose packets go through the
//! netstack, and helpers shared by the integration tests. Loopback only.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use netstack::{Config, Egress, Netstack, PacketBatch};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};
use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};
use vshp::lease::{Ipv4Prefix, Ipv6Prefix, Lease, LeaseId};

pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x5653, 0, 0, 0, 0, 0, 2);
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x5653, 0, 0, 0, 0, 0, 1);
pub const MTU: u16 = 1400;

pub fn lease() -> Lease {
    Lease {
        id: LeaseId(7),
        ipv4: Ipv4Prefix {
            addr: CLIENT_V4,
            len: 24,
        },
        ipv6: Some(Ipv6Prefix {
            addr: CLIENT_V6,
            len: 64,
        }),
        dns: vec![IpAddr::V4(GATEWAY_V4)],
        mtu: MTU,
        routes: Vec::new(),
        expires_at_unix: u64::MAX,
    }
}

/// Outbound sockets may only use the loopback interface: the tests can never send
/// anything anywhere else.
pub fn loopback_config() -> Config {
    Config {
        egress: Egress::Interface {
            name: "lo".into(),
            addrs: vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ],
        },
        ..Config::default()
    }
}

#[derive(Default)]
pub struct LaptopDevice {
    pub rx: VecDeque<Vec<u8>>,
    pub tx: VecDeque<Vec<u8>>,
    /// The laptop's MTU (`None`: [`MTU`]).
    pub mtu: Option<u16>,
}

pub struct Rx(Vec<u8>);
pub struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl phy::Device for LaptopDevice {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;
    fn receive(&mut self, _: SmolInstant) -> Option<(Rx, Tx<'_>)> {
        let p = self.rx.pop_front()?;
        Some((Rx(p), Tx(&mut self.tx)))
    }
    fn transmit(&mut self, _: SmolInstant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = usize::from(self.mtu.unwrap_or(MTU));
        c
    }
}

/// The netstack plus one fake laptop attached to its lease.
pub struct Harness {
    pub ns: Netstack,
    pub lease: Lease,
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    pub dev: LaptopDevice,
    pub batch: PacketBatch,
    /// Every packet the netstack sent to the laptop, when recording.
    pub recorded: Vec<Vec<u8>>,
    pub record: bool,
    epoch: Instant,
}

impl Harness {
    pub fn new(config: Config) -> Self {
        Self::with_mtu(config, MTU)
    }

    /// A harness whose lease (and laptop) use `mtu`.
    pub fn with_mtu(config: Config, mtu: u16) -> Self {
        let mut ns = Netstack::new(config).unwrap();
        let mut lease = lease();
        lease.mtu = mtu;
        ns.add_lease(&lease).unwrap();
        let mut dev = LaptopDevice {
            mtu: Some(mtu),
            ..LaptopDevice::default()
        };
        let epoch = Instant::now();
        let mut iface = Interface::new(
            IfaceConfig::new(HardwareAddress::Ip),
            &mut dev,
            SmolInstant::from_micros(0),
        );
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::Ipv4(CLIENT_V4), 24)).unwrap();
            a.push(IpCidr::new(IpAddress::Ipv6(CLIENT_V6), 64)).unwrap();
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(GATEWAY_V4)
            .unwrap();
        iface
            .routes_mut()
            .add_default_ipv6_route(GATEWAY_V6)
            .unwrap();
        Self {
            ns,
            lease,
            iface,
            sockets: SocketSet::new(Vec::new()),
            dev,
            batch: PacketBatch::new(),
            recorded: Vec::new(),
            record: false,
            epoch,
        }
    }

    pub fn smol_now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Pushes raw packets from the laptop side.
    pub fn push_raw(&mut self, packets: &[Vec<u8>]) {
        self.ns
            .push_packets(self.lease.id, packets.iter().map(|p| p.as_slice()));
    }

    /// Runs the netstack and hands its output to the laptop (recording it if asked).
    pub fn service_netstack(&mut self) -> usize {
        let _ = self.ns.poll(Instant::now());
        self.batch.clear();
        let n = self
            .ns
            .drain_outbound(self.lease.id, &mut self.batch, usize::MAX);
        for p in self.batch.iter() {
            if self.record {
                self.recorded.push(p.to_vec());
            }
            self.dev.rx.push_back(p.to_vec());
        }
        n
    }

    /// One round: laptop → netstack → laptop; then waits briefly for OS events.
    pub fn step(&mut self) {
        let now = self.smol_now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        let out: Vec<Vec<u8>> = self.dev.tx.drain(..).collect();
        let moved = !out.is_empty();
        self.push_raw(&out);
        let got = self.service_netstack();
        let now = self.smol_now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        if !moved && got == 0 && self.dev.tx.is_empty() {
            let wait = self
                .iface
                .poll_delay(now, &self.sockets)
                .map(|d| Duration::from_micros(d.total_micros()))
                .unwrap_or(Duration::from_millis(5))
                .min(Duration::from_millis(5));
            self.ns.wait(Some(wait)).unwrap();
        }
    }

    /// Steps until `cond` holds; panics after `secs` seconds.
    pub fn run_until(&mut self, secs: u64, what: &str, mut cond: impl FnMut(&mut Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !cond(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            self.step();
        }
    }
}
