//! `vpnshare demo`.
//!
//! As root, with the workspace's binaries built, `vpnshare demo` executes
//! `vpnshare-demo` (the `demo` crate, next to this executable): the testbed's network
//! namespaces, a real WireGuard VPN, the real `vpnshare gateway` in `phone` and the real
//! `vpnshare connect` in `laptop`. The testbed (boringtun) is never linked into
//! `vpnshare` itself.
//!
//! `vpnshare demo --protocol-only` (and the fallback when root or a binary is missing)
//! runs the VSHP protocol core in one process: a first-contact XX handshake
//! with the pairing code both sides show, a lease in CONFIG, IP packets in batches over
//! an in-memory datagram link that drops, duplicates and reorders, a resume with a
//! ticket over IK, and the typed refusals of a replayed ticket and a future version.
//! Time is a virtual clock: the core is sans-IO, so the demo decides what "now" is.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;
use vshp::handshake::{Established, Initiator, Next, Responder};
use vshp::key_oracle::{LocalKeyOracle, StaticKeyOracle, StaticKeypair};
use vshp::lease::{Ipv4Prefix, Ipv6Prefix, Lease, LeaseId, Route};
use vshp::message::{Message, MessageReader, MessageWriter, Platform};
use vshp::pairing::PairingCode;
use vshp::record::{self, Capabilities, ErrorRecord, MAX_RECORD_LEN, SessionIndex};
use vshp::ticket::{TicketId, TicketLease, TicketSealer};
use vshp::transport::{Session, TransportMode};

type DemoResult<T> = Result<T, String>;

fn err(what: &str) -> impl Fn(&dyn std::fmt::Display) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// The binaries the full demo runs, all next to `vpnshare`.
const DEMO_BINARIES: [&str; 4] = [
    "vpnshare-demo",
    "vpnshare-helper",
    "vpnshare-worker",
    "vpnshare-netstack",
];

/// `vpnshare demo`: the full demo when it can run, else what is missing and the
/// protocol-only walk.
pub fn run(protocol_only: bool) -> DemoResult<()> {
    if protocol_only {
        return protocol_walk();
    }
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root (network namespaces, a TUN device; run it with sudo)".to_owned());
    }
    let dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(std::path::Path::to_path_buf))
        .unwrap_or_default();
    let absent: Vec<&str> = DEMO_BINARIES
        .into_iter()
        .filter(|b| !dir.join(b).is_file())
        .collect();
    if !absent.is_empty() {
        missing.push(format!(
            "{} next to {} (build them with cargo build --release)",
            absent.join(", "),
            dir.display()
        ));
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun".to_owned());
    }
    if missing.is_empty() {
        use std::os::unix::process::CommandExt;
        let e = std::process::Command::new(dir.join("vpnshare-demo")).exec();
        return Err(format!(
            "cannot run {}: {e}",
            dir.join("vpnshare-demo").display()
        ));
    }
    eprintln!(
        "vpnshare: the full demo needs {}; running the protocol-only demo instead",
        missing.join(", ")
    );
    protocol_walk()
}

fn protocol_walk() -> DemoResult<()> {
    println!("VPN Share demo — the VSHP protocol core, in one process.");
    println!(
        "(As root, with the workspace built, `vpnshare demo` runs the real gateway and client in network namespaces.)\n"
    );

    let gateway_id = StaticKeypair::generate().map_err(|e| err("gateway key")(&e))?;
    let laptop_id = StaticKeypair::generate().map_err(|e| err("laptop key")(&e))?;
    let oracle: Arc<dyn StaticKeyOracle> = Arc::new(LocalKeyOracle::new(gateway_id.clone()));
    println!("gateway key  {}", hex::encode(gateway_id.public_key()));
    println!("laptop key   {}\n", hex::encode(laptop_id.public_key()));

    // 1. First contact: XX, nothing known in advance; both sides show the same code.
    let mut hello = [0u8; 16];
    let mut w = MessageWriter::new(&mut hello);
    w.hello(Capabilities::ALL_V1.0)
        .map_err(|e| err("hello")(&e))?;
    let hello = w.finish().to_vec();
    let mut auth = [0u8; 96];
    let mut w = MessageWriter::new(&mut auth);
    w.auth("demo-laptop", Platform::Linux)
        .map_err(|e| err("auth")(&e))?;
    let auth = w.finish().to_vec();
    let (client, gateway, gw_payloads) =
        handshake(&laptop_id, None, oracle.clone(), &hello, &auth, (11, 22))?;
    let client_code = PairingCode::from_handshake_hash(&client.handshake_hash);
    let gateway_code = PairingCode::from_handshake_hash(&gateway.handshake_hash);
    println!("1. first contact (Noise XX)");
    for m in gw_payloads.iter().flat_map(|p| MessageReader::new(p)) {
        if let Ok(Message::Auth {
            device_name,
            platform,
        }) = m
        {
            println!("   gateway sees a pairing request from {device_name:?} ({platform:?})");
        }
    }
    println!("   pairing code on the laptop: {client_code}   on the gateway: {gateway_code}");
    if client_code != gateway_code || gateway.remote_static != laptop_id.public_key() {
        return Err("the two sides disagree after the handshake".into());
    }
    println!("   the codes match: the user approves on the gateway\n");

    // 2. The gateway grants a lease in CONFIG, inside the encrypted session.
    let mut now = Duration::from_secs(1);
    let mut gw =
        Session::new(&gateway, TransportMode::Datagram, now).map_err(|e| err("session")(&e))?;
    let mut cl =
        Session::new(&client, TransportMode::Datagram, now).map_err(|e| err("session")(&e))?;
    let lease = demo_lease();
    let mut plain = vec![0u8; MAX_RECORD_LEN];
    let mut rec = vec![0u8; MAX_RECORD_LEN];
    let mut w = MessageWriter::new(&mut plain);
    w.config(&lease).map_err(|e| err("config")(&e))?;
    let n = w.len();
    let len = gw
        .seal(&plain[..n], &mut rec, now)
        .map_err(|e| err("seal")(&e))?;
    let opened = cl
        .open_in_place(&mut rec[..len], now)
        .map_err(|e| err("open")(&e))?;
    let granted = MessageReader::new(opened)
        .find_map(|m| match m {
            Ok(Message::Config(l)) => Some(l),
            _ => None,
        })
        .ok_or("no CONFIG arrived")?;
    let v6 = granted
        .ipv6
        .map_or("none".to_string(), |p| format!("{}/{}", p.addr, p.len));
    println!(
        "2. lease {:?}: {} and {v6}, DNS {:?}, MTU {}",
        granted.id,
        fmt_v4(&granted),
        granted.dns,
        granted.mtu
    );

    // 3. IP packets in batches over a link that drops, duplicates and reorders.
    let stats = lossy_transfer(&mut cl, &mut gw, &mut now)?;
    println!(
        "3. {} IP_PACKET records ({} packets of 1400 bytes) over a lossy datagram link",
        stats.sent,
        stats.sent * 4
    );
    println!(
        "   link dropped {}, duplicated {}, reordered {}; gateway accepted {}, refused {} replays and {} too old",
        stats.lost,
        stats.duplicated,
        stats.reordered,
        stats.accepted,
        gw.stats().drops.replayed,
        gw.stats().drops.too_old
    );
    if stats.accepted + stats.lost != stats.sent {
        return Err(format!(
            "{} records were neither accepted nor lost",
            stats.sent - stats.accepted - stats.lost
        ));
    }

    // 4. The transport breaks; the client resumes with its ticket over IK.
    let ticket_key = StaticKeypair::generate()
        .map_err(|e| err("ticket key")(&e))?
        .private_key();
    let mut sealer = TicketSealer::new(ticket_key).map_err(|e| err("ticket key")(&e))?;
    let unix_now = 1_900_000_000;
    let id = TicketId::random().map_err(|e| err("ticket id")(&e))?;
    let ticket = sealer
        .seal(
            id,
            &laptop_id.public_key(),
            &TicketLease::from(&lease),
            unix_now,
            3600,
        )
        .map_err(|e| err("seal ticket")(&e))?;
    let mut resume = [0u8; 256];
    let mut w = MessageWriter::new(&mut resume);
    w.auth("demo-laptop", Platform::Linux)
        .map_err(|e| err("auth")(&e))?;
    w.resume(&ticket).map_err(|e| err("resume")(&e))?;
    let resume = w.finish().to_vec();
    let (_, gateway2, payloads) = handshake(
        &laptop_id,
        Some(gateway_id.public_key()),
        oracle,
        &resume,
        &[],
        (33, 44),
    )?;
    let presented = payloads
        .iter()
        .flat_map(|p| MessageReader::new(p))
        .find_map(|m| match m {
            Ok(Message::Resume { ticket }) => Some(ticket.to_vec()),
            _ => None,
        })
        .ok_or("no RESUME arrived")?;
    let back = sealer
        .open(&presented, &gateway2.remote_static, unix_now + 60)
        .map_err(|e| err("ticket")(&e))?;
    println!(
        "4. resume over Noise IK with a {}-byte ticket: same lease {:?}, address {}",
        ticket.len(),
        back.lease.id,
        back.lease.ipv4.addr
    );
    match sealer.open(&presented, &gateway2.remote_static, unix_now + 61) {
        Err(e) => println!("   the same ticket again is refused: {e}"),
        Ok(_) => return Err("a replayed ticket was accepted".into()),
    }

    // 5. A peer from the future gets a typed answer, not a crash.
    let future = [2u8, 1, 0, 0];
    match record::decode(&future) {
        Err(e) => println!(
            "5. a version-2 record: {e}; the gateway answers with ERROR record {}",
            hex::encode(ErrorRecord::unsupported_version().encode())
        ),
        Ok(_) => return Err("a version-2 record decoded".into()),
    }
    println!(
        "\nDemo complete: the protocol core works. Run the tests with `cargo nextest run --workspace`."
    );
    Ok(())
}

/// Runs a whole handshake in memory; returns both ends and the payloads the gateway read.
fn handshake(
    laptop: &StaticKeypair,
    gateway_public: Option<[u8; 32]>,
    oracle: Arc<dyn StaticKeyOracle>,
    first_payload: &[u8],
    final_payload: &[u8],
    indexes: (u32, u32),
) -> DemoResult<(Established, Established, Vec<Vec<u8>>)> {
    let e = err("handshake");
    let mut i = Initiator::new(
        laptop.clone(),
        gateway_public,
        Capabilities::ALL_V1,
        SessionIndex(indexes.0),
    )
    .map_err(|x| e(&x))?;
    let mut r =
        Responder::new(oracle, Capabilities::ALL_V1, SessionIndex(indexes.1)).map_err(|x| e(&x))?;
    let mut wire = vec![0u8; MAX_RECORD_LEN];
    let mut payload = vec![0u8; MAX_RECORD_LEN];
    let mut seen = Vec::new();
    let n = i.write_init(first_payload, &mut wire).map_err(|x| e(&x))?;
    let p = r.read_init(&wire[..n], &mut payload).map_err(|x| e(&x))?;
    seen.push(payload[..p].to_vec());
    let n = r.write_response(&[], &mut wire).map_err(|x| e(&x))?;
    i.read_response(&wire[..n], &mut payload)
        .map_err(|x| e(&x))?;
    if i.next() == Next::Send {
        let n = i.write_final(final_payload, &mut wire).map_err(|x| e(&x))?;
        let p = r.read_final(&wire[..n], &mut payload).map_err(|x| e(&x))?;
        seen.push(payload[..p].to_vec());
    }
    Ok((
        i.into_established().map_err(|x| e(&x))?,
        r.into_established().map_err(|x| e(&x))?,
        seen,
    ))
}

fn demo_lease() -> Lease {
    Lease {
        id: LeaseId(1),
        ipv4: Ipv4Prefix {
            addr: Ipv4Addr::new(100, 64, 0, 2),
            len: 24,
        },
        ipv6: Some(Ipv6Prefix {
            addr: Ipv6Addr::new(0xfd56, 0x5348, 0x5000, 0, 0, 0, 0, 2),
            len: 64,
        }),
        dns: vec![IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1))],
        mtu: 1420,
        routes: vec![
            Route::V4(Ipv4Prefix {
                addr: Ipv4Addr::UNSPECIFIED,
                len: 0,
            }),
            Route::V6(Ipv6Prefix {
                addr: Ipv6Addr::UNSPECIFIED,
                len: 0,
            }),
        ],
        expires_at_unix: 1_900_086_400,
    }
}

fn fmt_v4(l: &Lease) -> String {
    format!("{}/{}", l.ipv4.addr, l.ipv4.len)
}

#[derive(Debug, Default)]
struct LinkStats {
    sent: u64,
    lost: u64,
    duplicated: u64,
    reordered: u64,
    accepted: u64,
}

/// Sends 500 records of four 1400-byte packets through a link that loses 5 %,
/// duplicates 5 % and holds back 10 % for a few records. A small xorshift keeps the
/// demo free of extra dependencies and repeatable.
fn lossy_transfer(cl: &mut Session, gw: &mut Session, now: &mut Duration) -> DemoResult<LinkStats> {
    let mut rng = 0x9E37_79B9_7F4A_7C15_u64;
    let mut roll = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % 100
    };
    let packet = [0x45u8; 1400];
    let mut plain = vec![0u8; MAX_RECORD_LEN];
    let mut stats = LinkStats::default();
    let mut held: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut in_flight: Vec<Vec<u8>> = Vec::new();
    for seq in 0..500u64 {
        *now += Duration::from_millis(1);
        let mut w = MessageWriter::new(&mut plain);
        w.ip_packets(&[&packet, &packet, &packet, &packet])
            .map_err(|e| err("batch")(&e))?;
        let n = w.len();
        let mut rec = vec![0u8; MAX_RECORD_LEN];
        let len = cl
            .seal(&plain[..n], &mut rec, *now)
            .map_err(|e| err("seal")(&e))?;
        rec.truncate(len);
        stats.sent += 1;
        match roll() {
            0..5 => stats.lost += 1,
            5..10 => {
                stats.duplicated += 1;
                in_flight.push(rec.clone());
                in_flight.push(rec);
            }
            10..20 => {
                stats.reordered += 1;
                held.push((seq + 3, rec));
            }
            _ => in_flight.push(rec),
        }
        let (due, later): (Vec<_>, Vec<_>) = held.drain(..).partition(|(at, _)| *at <= seq);
        held = later;
        in_flight.extend(due.into_iter().map(|(_, r)| r));
        for mut rec in in_flight.drain(..) {
            if let Ok(p) = gw.open_in_place(&mut rec, *now) {
                let packets: usize = MessageReader::new(p)
                    .map(|m| match m {
                        Ok(Message::IpPacket(b)) => b.len(),
                        _ => 0,
                    })
                    .sum();
                stats.accepted += u64::from(packets == 4);
            }
        }
    }
    for (_, mut rec) in held {
        if gw.open_in_place(&mut rec, *now).is_ok() {
            stats.accepted += 1;
        }
    }
    Ok(stats)
}
