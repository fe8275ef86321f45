//! The stream-transport interface and the USB accessory transport (issue #6, discovery).
//!
//! - [`StreamTransport`]: a reliable byte stream (`Read` + `Write`) that carries VSHP
//!   records with the u16 length prefix of `vshp::framing`. TCP implements it, and so
//!   does [`UsbAccessory`], the bulk endpoints of a phone in Android Open Accessory mode.
//! - [`RecordStream`]: records in and out of any `StreamTransport` (a `Box<dyn …>`).
//! - [`AoaHandshake`]: the desktop side of the AOA handshake as a sans-IO state machine:
//!   it says which control request to make next and is told the result, so the exact
//!   sequence (51 get protocol, 52 × 6 strings, 53 start, wait for the accessory's
//!   re-enumeration) is tested as data, without a phone.
//! - [`UsbAccessory::open`]: the thin nusb driver around it.
//!
//! The client's connect loop does not use this yet (see `docs/usb.md`): the USB path
//! needs a phone to be tried end to end.

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use vshp::framing::{LENGTH_PREFIX_LEN, length_prefix};
use vshp::{FramingError, StreamDecoder};

/// A reliable, ordered byte stream to the gateway.
pub trait StreamTransport: Read + Write + Send + fmt::Debug {
    /// A short name for logs and messages: "TCP", "USB accessory".
    fn kind(&self) -> &'static str;
}

impl StreamTransport for std::net::TcpStream {
    fn kind(&self) -> &'static str {
        "TCP"
    }
}

/// Errors of the stream and USB transports.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{kind}: {source}")]
    Io {
        kind: &'static str,
        source: io::Error,
    },
    #[error("stream framing: {0}")]
    Framing(#[from] FramingError),
    #[error("USB: {0}")]
    Usb(String),
    #[error("USB accessory handshake: {0}")]
    Aoa(#[from] AoaError),
}

/// VSHP records over a [`StreamTransport`]: each record behind its u16 length.
#[derive(Debug)]
pub struct RecordStream {
    transport: Box<dyn StreamTransport>,
    decoder: Box<StreamDecoder>,
    out: Vec<u8>,
}

impl RecordStream {
    pub fn new(transport: Box<dyn StreamTransport>) -> Self {
        Self {
            transport,
            decoder: Box::default(),
            out: Vec::new(),
        }
    }

    pub fn kind(&self) -> &'static str {
        self.transport.kind()
    }

    /// Sends one record (prefix and record in one write, then a flush: a USB bulk
    /// writer only submits on flush or when its buffer fills).
    pub fn send(&mut self, record: &[u8]) -> Result<(), TransportError> {
        let prefix = length_prefix(record.len())?;
        self.out.clear();
        self.out.extend_from_slice(&prefix);
        self.out.extend_from_slice(record);
        let kind = self.transport.kind();
        self.transport
            .write_all(&self.out)
            .and_then(|()| self.transport.flush())
            .map_err(|source| TransportError::Io { kind, source })
    }

    /// One read from the transport; every record it completes goes to `f`.
    /// `Ok(false)`: the stream ended. A `WouldBlock` or `TimedOut` read is `Ok(true)`
    /// with no record.
    pub fn receive(&mut self, f: &mut dyn FnMut(&[u8])) -> Result<bool, TransportError> {
        let kind = self.transport.kind();
        let spare = self.decoder.spare();
        match self.transport.read(spare) {
            Ok(0) => return Ok(false),
            Ok(n) => self.decoder.commit(n),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(source) => return Err(TransportError::Io { kind, source }),
        }
        while let Some(rec) = self.decoder.next_record()? {
            f(rec);
        }
        Ok(true)
    }
}

// ------------------------------------------------------------ AOA handshake

/// Google's vendor id, which a phone takes in accessory mode.
pub const AOA_VENDOR_ID: u16 = 0x18D1;
/// Accessory mode.
pub const AOA_PID_ACCESSORY: u16 = 0x2D00;
/// Accessory mode with ADB.
pub const AOA_PID_ACCESSORY_ADB: u16 = 0x2D01;
/// Vendor request: read the AOA protocol version (2 bytes, little-endian).
pub const ACCESSORY_GET_PROTOCOL: u8 = 51;
/// Vendor request: send one identifying string (`wIndex` = which).
pub const ACCESSORY_SEND_STRING: u8 = 52;
/// Vendor request: switch to accessory mode (the device re-enumerates).
pub const ACCESSORY_START: u8 = 53;
/// Longest string the handshake sends (the phone's buffers; NUL included).
pub const MAX_AOA_STRING: usize = 255;

/// Is this vendor/product pair a phone already in accessory mode?
pub fn is_accessory(vendor_id: u16, product_id: u16) -> bool {
    vendor_id == AOA_VENDOR_ID && matches!(product_id, AOA_PID_ACCESSORY | AOA_PID_ACCESSORY_ADB)
}

/// The six strings of `ACCESSORY_SEND_STRING`, in `wIndex` order. The phone's app
/// declares the manufacturer, model and version it accepts in its
/// `accessory_filter.xml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessoryStrings {
    pub manufacturer: String,
    pub model: String,
    pub description: String,
    pub version: String,
    pub uri: String,
    pub serial: String,
}

impl Default for AccessoryStrings {
    fn default() -> Self {
        Self {
            manufacturer: "VPN Share".into(),
            model: "vpnshare".into(),
            description: "VPN Share desktop client (VSHP over USB)".into(),
            version: "1".into(),
            uri: "https://github.com/vpnshare/vpnshare".into(),
            serial: "0".into(),
        }
    }
}

impl AccessoryStrings {
    fn get(&self, index: u16) -> &str {
        match index {
            0 => &self.manufacturer,
            1 => &self.model,
            2 => &self.description,
            3 => &self.version,
            4 => &self.uri,
            _ => &self.serial,
        }
    }
}

/// A control request on endpoint 0, type vendor, recipient device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlRequest {
    /// bmRequestType 0xC0.
    In {
        request: u8,
        value: u16,
        index: u16,
        length: u16,
    },
    /// bmRequestType 0x40.
    Out {
        request: u8,
        value: u16,
        index: u16,
        data: Vec<u8>,
    },
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AoaStep {
    /// Make this control request and report it with [`AoaHandshake::control_done`].
    Control(ControlRequest),
    /// The phone is switching: wait for a device with [`is_accessory`] ids to appear
    /// and report it with [`AoaHandshake::accessory_appeared`].
    WaitForAccessory,
    /// In accessory mode: open interface 0's bulk endpoints.
    Ready,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AoaError {
    #[error("the device does not support Android Open Accessory (protocol version {0})")]
    NotSupported(u16),
    #[error("the device answered the protocol request with {0} bytes, not 2")]
    BadProtocolReply(usize),
    #[error("the accessory string {index} is longer than {MAX_AOA_STRING} bytes or has a NUL")]
    BadString { index: u16 },
    #[error("control request {request} failed: {reason}")]
    ControlFailed { request: u8, reason: String },
    #[error("the result does not match the step the handshake is in")]
    OutOfOrder,
    #[error("no bulk IN and OUT endpoint pair on the accessory interface")]
    NoBulkEndpoints,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    GetProtocol,
    SendString(u16),
    Start,
    Wait,
    Ready,
    Failed,
}

/// The desktop side of the AOA handshake, sans-IO.
#[derive(Debug)]
pub struct AoaHandshake {
    strings: AccessoryStrings,
    state: State,
    protocol: u16,
}

impl AoaHandshake {
    /// For a device with these ids: one already in accessory mode is [`AoaStep::Ready`]
    /// at once; any other is asked for its protocol version first.
    pub fn new(
        vendor_id: u16,
        product_id: u16,
        strings: AccessoryStrings,
    ) -> Result<Self, AoaError> {
        for i in 0..6u16 {
            let s = strings.get(i);
            if s.len() >= MAX_AOA_STRING || s.contains('\0') {
                return Err(AoaError::BadString { index: i });
            }
        }
        let state = if is_accessory(vendor_id, product_id) {
            State::Ready
        } else {
            State::GetProtocol
        };
        Ok(Self {
            strings,
            state,
            protocol: 0,
        })
    }

    /// The AOA version the phone reported (0 until it did, or if it was already in
    /// accessory mode).
    pub fn protocol(&self) -> u16 {
        self.protocol
    }

    /// What to do now.
    pub fn step(&self) -> AoaStep {
        match self.state {
            State::GetProtocol => AoaStep::Control(ControlRequest::In {
                request: ACCESSORY_GET_PROTOCOL,
                value: 0,
                index: 0,
                length: 2,
            }),
            State::SendString(i) => {
                let mut data = self.strings.get(i).as_bytes().to_vec();
                data.push(0);
                AoaStep::Control(ControlRequest::Out {
                    request: ACCESSORY_SEND_STRING,
                    value: 0,
                    index: i,
                    data,
                })
            }
            State::Start => AoaStep::Control(ControlRequest::Out {
                request: ACCESSORY_START,
                value: 0,
                index: 0,
                data: Vec::new(),
            }),
            State::Wait => AoaStep::WaitForAccessory,
            // A failed handshake stays failed; the driver stopped at the error.
            State::Ready | State::Failed => AoaStep::Ready,
        }
    }

    /// The outcome of the control request of [`step`](Self::step): the bytes read for
    /// an IN request (empty for OUT), or the failure.
    pub fn control_done(&mut self, result: Result<&[u8], String>) -> Result<(), AoaError> {
        let AoaStep::Control(req) = self.step() else {
            return Err(AoaError::OutOfOrder);
        };
        if self.state == State::Failed {
            return Err(AoaError::OutOfOrder);
        }
        let request = match req {
            ControlRequest::In { request, .. } | ControlRequest::Out { request, .. } => request,
        };
        let data = match result {
            Ok(d) => d,
            Err(reason) => {
                self.state = State::Failed;
                return Err(AoaError::ControlFailed { request, reason });
            }
        };
        self.state = match self.state {
            State::GetProtocol => {
                let Some(v) = data.first_chunk::<2>().filter(|_| data.len() == 2) else {
                    self.state = State::Failed;
                    return Err(AoaError::BadProtocolReply(data.len()));
                };
                let v = u16::from_le_bytes(*v);
                if v == 0 {
                    self.state = State::Failed;
                    return Err(AoaError::NotSupported(v));
                }
                self.protocol = v;
                State::SendString(0)
            }
            State::SendString(i) if i < 5 => State::SendString(i + 1),
            State::SendString(_) => State::Start,
            State::Start => State::Wait,
            State::Wait | State::Ready | State::Failed => return Err(AoaError::OutOfOrder),
        };
        Ok(())
    }

    /// A device appeared while waiting; `true` when it is the accessory.
    pub fn accessory_appeared(&mut self, vendor_id: u16, product_id: u16) -> bool {
        if self.state == State::Wait && is_accessory(vendor_id, product_id) {
            self.state = State::Ready;
            true
        } else {
            false
        }
    }
}

/// One endpoint of the accessory interface, as the descriptor says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointInfo {
    /// bEndpointAddress: bit 7 set for IN.
    pub address: u8,
    pub bulk: bool,
}

/// The first bulk IN and the first bulk OUT endpoint: `(in, out)` addresses.
pub fn pick_bulk_endpoints(endpoints: &[EndpointInfo]) -> Result<(u8, u8), AoaError> {
    let bulk = |want_in: bool| {
        endpoints
            .iter()
            .find(|e| e.bulk && (e.address & 0x80 != 0) == want_in)
            .map(|e| e.address)
    };
    match (bulk(true), bulk(false)) {
        (Some(i), Some(o)) => Ok((i, o)),
        _ => Err(AoaError::NoBulkEndpoints),
    }
}

// ------------------------------------------------------------ nusb driver

/// A phone in accessory mode: interface 0's bulk endpoints as a byte stream.
pub struct UsbAccessory {
    reader: nusb::io::EndpointRead<nusb::transfer::Bulk>,
    writer: nusb::io::EndpointWrite<nusb::transfer::Bulk>,
}

impl fmt::Debug for UsbAccessory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsbAccessory").finish_non_exhaustive()
    }
}

impl Read for UsbAccessory {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

impl Write for UsbAccessory {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

impl StreamTransport for UsbAccessory {
    fn kind(&self) -> &'static str {
        "USB accessory"
    }
}

/// Timeout of each AOA control request.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a phone may take to come back in accessory mode.
const REENUMERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Bulk transfer size (one VSHP stream record is at most 2 + 65535 bytes).
const BULK_TRANSFER: usize = 16 * 1024;

fn usb_err(e: impl fmt::Display) -> TransportError {
    TransportError::Usb(e.to_string())
}

impl UsbAccessory {
    /// Finds an Android phone on the bus (one already in accessory mode, else the first
    /// device that answers `ACCESSORY_GET_PROTOCOL`), switches it to accessory mode and
    /// opens its bulk endpoints. `read_timeout` bounds each read, so a caller can poll.
    pub fn open(
        strings: &AccessoryStrings,
        read_timeout: Duration,
    ) -> Result<Self, TransportError> {
        use nusb::MaybeFuture;
        let devices: Vec<nusb::DeviceInfo> =
            nusb::list_devices().wait().map_err(usb_err)?.collect();
        if let Some(d) = devices
            .iter()
            .find(|d| is_accessory(d.vendor_id(), d.product_id()))
        {
            tracing::info!(bus = ?d.bus_id(), "a phone is already in accessory mode");
            return Self::open_accessory(d, read_timeout);
        }
        let mut last = TransportError::Usb("no USB device answered the accessory protocol".into());
        for d in &devices {
            let mut hs = AoaHandshake::new(d.vendor_id(), d.product_id(), strings.clone())?;
            let dev = match d.open().wait() {
                Ok(dev) => dev,
                Err(e) => {
                    tracing::debug!(
                        vid = d.vendor_id(),
                        pid = d.product_id(),
                        "cannot open: {e}"
                    );
                    continue;
                }
            };
            match Self::drive(&dev, &mut hs) {
                Ok(()) => {
                    tracing::info!(
                        protocol = hs.protocol(),
                        "accessory mode requested; waiting for the phone"
                    );
                    return Self::wait_for_accessory(&mut hs, read_timeout);
                }
                Err(e) => {
                    tracing::debug!(
                        vid = d.vendor_id(),
                        pid = d.product_id(),
                        "not an accessory-capable device: {e}"
                    );
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// Runs the control requests of the handshake until it waits for re-enumeration.
    fn drive(dev: &nusb::Device, hs: &mut AoaHandshake) -> Result<(), TransportError> {
        use nusb::MaybeFuture;
        use nusb::transfer::{ControlIn, ControlOut, ControlType, Recipient};
        while let AoaStep::Control(req) = hs.step() {
            match req {
                ControlRequest::In {
                    request,
                    value,
                    index,
                    length,
                } => {
                    let r = dev
                        .control_in(
                            ControlIn {
                                control_type: ControlType::Vendor,
                                recipient: Recipient::Device,
                                request,
                                value,
                                index,
                                length,
                            },
                            CONTROL_TIMEOUT,
                        )
                        .wait();
                    match r {
                        Ok(data) => hs.control_done(Ok(&data))?,
                        Err(e) => hs.control_done(Err(e.to_string()))?,
                    }
                }
                ControlRequest::Out {
                    request,
                    value,
                    index,
                    data,
                } => {
                    let r = dev
                        .control_out(
                            ControlOut {
                                control_type: ControlType::Vendor,
                                recipient: Recipient::Device,
                                request,
                                value,
                                index,
                                data: &data,
                            },
                            CONTROL_TIMEOUT,
                        )
                        .wait();
                    match r {
                        Ok(()) => hs.control_done(Ok(&[]))?,
                        Err(e) => hs.control_done(Err(e.to_string()))?,
                    }
                }
            }
        }
        Ok(())
    }

    fn wait_for_accessory(
        hs: &mut AoaHandshake,
        read_timeout: Duration,
    ) -> Result<Self, TransportError> {
        use nusb::MaybeFuture;
        let deadline = Instant::now() + REENUMERATION_TIMEOUT;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            let devices = nusb::list_devices().wait().map_err(usb_err)?;
            for d in devices {
                if hs.accessory_appeared(d.vendor_id(), d.product_id()) {
                    return Self::open_accessory(&d, read_timeout);
                }
            }
        }
        Err(TransportError::Usb(
            "the phone did not come back in accessory mode within 10 s (is VPN Share open on it?)"
                .into(),
        ))
    }

    fn open_accessory(
        d: &nusb::DeviceInfo,
        read_timeout: Duration,
    ) -> Result<Self, TransportError> {
        use nusb::MaybeFuture;
        use nusb::descriptors::TransferType;
        use nusb::transfer::{Bulk, In, Out};
        let dev = d.open().wait().map_err(usb_err)?;
        let intf = dev.claim_interface(0).wait().map_err(usb_err)?;
        let eps: Vec<EndpointInfo> = intf
            .descriptor()
            .map(|desc| {
                desc.endpoints()
                    .map(|e| EndpointInfo {
                        address: e.address(),
                        bulk: e.transfer_type() == TransferType::Bulk,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (ep_in, ep_out) = pick_bulk_endpoints(&eps)?;
        let reader = intf
            .endpoint::<Bulk, In>(ep_in)
            .map_err(usb_err)?
            .reader(BULK_TRANSFER)
            .with_num_transfers(4)
            .with_read_timeout(read_timeout);
        let writer = intf
            .endpoint::<Bulk, Out>(ep_out)
            .map_err(usb_err)?
            .writer(BULK_TRANSFER)
            .with_num_transfers(4)
            .with_write_timeout(Duration::from_secs(10));
        Ok(Self { reader, writer })
    }
}

/// Length of the stream prefix, re-exported for callers that size buffers.
pub const STREAM_PREFIX_LEN: usize = LENGTH_PREFIX_LEN;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    /// One direction of an in-memory pipe; reads return at most `chunk` bytes, so the
    /// records arrive split at odd places, as over USB.
    #[derive(Debug, Default)]
    struct Half {
        bytes: VecDeque<u8>,
        closed: bool,
    }

    #[derive(Debug)]
    struct MemoryPipe {
        rx: Arc<Mutex<Half>>,
        tx: Arc<Mutex<Half>>,
        chunk: usize,
    }

    fn pipe(chunk: usize) -> (MemoryPipe, MemoryPipe) {
        let a = Arc::new(Mutex::new(Half::default()));
        let b = Arc::new(Mutex::new(Half::default()));
        (
            MemoryPipe {
                rx: a.clone(),
                tx: b.clone(),
                chunk,
            },
            MemoryPipe {
                rx: b,
                tx: a,
                chunk,
            },
        )
    }

    impl Read for MemoryPipe {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let mut h = self.rx.lock().unwrap();
            if h.bytes.is_empty() {
                return if h.closed {
                    Ok(0)
                } else {
                    Err(ErrorKind::WouldBlock.into())
                };
            }
            let n = buf.len().min(self.chunk).min(h.bytes.len());
            for b in buf.iter_mut().take(n) {
                *b = h.bytes.pop_front().unwrap();
            }
            Ok(n)
        }
    }

    impl Write for MemoryPipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.tx.lock().unwrap().bytes.extend(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Drop for MemoryPipe {
        fn drop(&mut self) {
            if let Ok(mut h) = self.tx.lock() {
                h.closed = true;
            }
        }
    }

    impl StreamTransport for MemoryPipe {
        fn kind(&self) -> &'static str {
            "memory"
        }
    }

    #[test]
    fn records_cross_a_stream_transport_split_at_any_byte() {
        for chunk in [1, 3, 7, 1500, 70_000] {
            let (a, b) = pipe(chunk);
            let mut tx = RecordStream::new(Box::new(a));
            let mut rx = RecordStream::new(Box::new(b));
            let sent: Vec<Vec<u8>> = (1..40usize)
                .map(|i| (0..i * 37).map(|j| (i + j) as u8).collect())
                .chain([vec![0xAB; 65535]])
                .collect();
            for r in &sent {
                tx.send(r).unwrap();
            }
            assert!(matches!(
                tx.send(&[]),
                Err(TransportError::Framing(FramingError::ZeroLength))
            ));
            assert!(matches!(
                tx.send(&vec![0; 65536]),
                Err(TransportError::Framing(FramingError::TooLong(65536)))
            ));
            drop(tx);
            let mut got = Vec::new();
            loop {
                match rx.receive(&mut |r| got.push(r.to_vec())) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!(got, sent, "chunk {chunk}");
            assert_eq!(rx.kind(), "memory");
        }
    }

    #[test]
    fn tcp_is_a_stream_transport_too() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let mut tx = RecordStream::new(Box::new(a));
        let mut rx = RecordStream::new(Box::new(b));
        assert_eq!(tx.kind(), "TCP");
        tx.send(b"hello").unwrap();
        tx.send(&[7; 3000]).unwrap();
        drop(tx);
        let mut got = Vec::new();
        while rx.receive(&mut |r| got.push(r.to_vec())).unwrap() {}
        assert_eq!(got, vec![b"hello".to_vec(), vec![7; 3000]]);
    }

    #[test]
    fn a_zero_length_prefix_on_the_stream_is_a_typed_error() {
        let (mut a, b) = pipe(64);
        a.write_all(&[0, 0, 1, 2]).unwrap();
        let mut rx = RecordStream::new(Box::new(b));
        assert!(matches!(
            rx.receive(&mut |_| {}),
            Err(TransportError::Framing(FramingError::ZeroLength))
        ));
    }

    /// A fake phone: answers the control requests as a real one would, and records them.
    fn run(hs: &mut AoaHandshake, protocol_reply: &[u8]) -> Vec<ControlRequest> {
        let mut seen = Vec::new();
        while let AoaStep::Control(req) = hs.step() {
            seen.push(req.clone());
            let r = match req {
                ControlRequest::In { .. } => hs.control_done(Ok(protocol_reply)),
                ControlRequest::Out { .. } => hs.control_done(Ok(&[])),
            };
            if r.is_err() {
                break;
            }
        }
        seen
    }

    #[test]
    fn aoa_handshake_is_get_protocol_six_strings_start_then_reenumeration() {
        let strings = AccessoryStrings::default();
        let mut hs = AoaHandshake::new(0x04E8, 0x6860, strings.clone()).unwrap();
        let seen = run(&mut hs, &2u16.to_le_bytes());
        let mut want = vec![ControlRequest::In {
            request: 51,
            value: 0,
            index: 0,
            length: 2,
        }];
        for (i, s) in [
            &strings.manufacturer,
            &strings.model,
            &strings.description,
            &strings.version,
            &strings.uri,
            &strings.serial,
        ]
        .into_iter()
        .enumerate()
        {
            let mut data = s.as_bytes().to_vec();
            data.push(0);
            want.push(ControlRequest::Out {
                request: 52,
                value: 0,
                index: u16::try_from(i).unwrap(),
                data,
            });
        }
        want.push(ControlRequest::Out {
            request: 53,
            value: 0,
            index: 0,
            data: vec![],
        });
        assert_eq!(seen, want);
        assert_eq!(hs.protocol(), 2);
        assert_eq!(hs.step(), AoaStep::WaitForAccessory);
        // Other devices appearing meanwhile are not the accessory.
        assert!(!hs.accessory_appeared(0x04E8, 0x6860));
        assert!(!hs.accessory_appeared(AOA_VENDOR_ID, 0x4EE7));
        assert_eq!(hs.control_done(Ok(&[])), Err(AoaError::OutOfOrder));
        assert!(hs.accessory_appeared(AOA_VENDOR_ID, AOA_PID_ACCESSORY_ADB));
        assert_eq!(hs.step(), AoaStep::Ready);
    }

    #[test]
    fn aoa_handshake_failures_are_typed() {
        // Already in accessory mode: nothing to ask.
        let hs = AoaHandshake::new(
            AOA_VENDOR_ID,
            AOA_PID_ACCESSORY,
            AccessoryStrings::default(),
        )
        .unwrap();
        assert_eq!(hs.step(), AoaStep::Ready);
        // Version 0: no AOA support.
        let mut hs = AoaHandshake::new(1, 2, AccessoryStrings::default()).unwrap();
        assert_eq!(hs.control_done(Ok(&[0, 0])), Err(AoaError::NotSupported(0)));
        // A short or long reply.
        let mut hs = AoaHandshake::new(1, 2, AccessoryStrings::default()).unwrap();
        assert_eq!(
            hs.control_done(Ok(&[1])),
            Err(AoaError::BadProtocolReply(1))
        );
        // A stalled request (not an Android device) is reported with its number.
        let mut hs = AoaHandshake::new(1, 2, AccessoryStrings::default()).unwrap();
        assert_eq!(
            hs.control_done(Err("pipe stalled".into())),
            Err(AoaError::ControlFailed {
                request: 51,
                reason: "pipe stalled".into()
            })
        );
        assert_eq!(hs.control_done(Ok(&[1, 0])), Err(AoaError::OutOfOrder));
        // A failed string request stops the sequence there.
        let mut hs = AoaHandshake::new(1, 2, AccessoryStrings::default()).unwrap();
        hs.control_done(Ok(&[1, 0])).unwrap();
        hs.control_done(Ok(&[])).unwrap();
        assert!(matches!(
            hs.control_done(Err("timeout".into())),
            Err(AoaError::ControlFailed { request: 52, .. })
        ));
        // Strings the phone cannot take are refused before anything is sent.
        let bad = AccessoryStrings {
            model: "x".repeat(300),
            ..AccessoryStrings::default()
        };
        assert_eq!(
            AoaHandshake::new(1, 2, bad).unwrap_err(),
            AoaError::BadString { index: 1 }
        );
        let bad = AccessoryStrings {
            serial: "a\0b".into(),
            ..AccessoryStrings::default()
        };
        assert_eq!(
            AoaHandshake::new(1, 2, bad).unwrap_err(),
            AoaError::BadString { index: 5 }
        );
    }

    #[test]
    fn bulk_endpoints_are_picked_by_direction_and_type() {
        let eps = [
            EndpointInfo {
                address: 0x83,
                bulk: false,
            },
            EndpointInfo {
                address: 0x81,
                bulk: true,
            },
            EndpointInfo {
                address: 0x02,
                bulk: true,
            },
        ];
        assert_eq!(pick_bulk_endpoints(&eps), Ok((0x81, 0x02)));
        assert_eq!(
            pick_bulk_endpoints(&eps[..2]),
            Err(AoaError::NoBulkEndpoints)
        );
        assert!(is_accessory(0x18D1, 0x2D00));
        assert!(is_accessory(0x18D1, 0x2D01));
        assert!(!is_accessory(0x18D1, 0x4EE7));
    }
}
