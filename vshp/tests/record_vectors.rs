//! Checks `test-vectors/records.txt`: every record header and inner message a VSHP v1
//! implementation must produce byte for byte, and decode back to the same fields.
//!
//! The file is plain text so a Kotlin or Swift implementation can check itself against
//! it. `VSHP_BLESS=1 cargo test -p vshp --test record_vectors` rewrites it from this
//! code (review the diff: a changed vector is a wire-format change). The same vectors
//! seed the `record_decode` fuzz corpus.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use vshp::lease::{Ipv4Prefix, Ipv6Prefix, Lease, LeaseId, Route};
use vshp::message::{CloseReason, ConfigDelta, ErrorReason, Keepalive, Message, Platform};
use vshp::record::{
    Capabilities, DataHeader, ErrorRecord, HandshakeHeader, Pattern, Record, RecordKind,
    SessionIndex,
};
use vshp::{MessageReader, MessageWriter};

fn lease() -> Lease {
    Lease {
        id: LeaseId(0x0000_0000_0000_002a),
        ipv4: Ipv4Prefix {
            addr: Ipv4Addr::new(100, 64, 0, 2),
            len: 24,
        },
        ipv6: Some(Ipv6Prefix {
            addr: "fd56:5348:5000::2".parse().unwrap(),
            len: 64,
        }),
        dns: vec![IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1))],
        mtu: 1400,
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
        expires_at_unix: 1_893_456_000,
    }
}

/// (name, description of the fields, bytes).
fn vectors() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut v = Vec::new();
    let init = HandshakeHeader {
        kind: RecordKind::HandshakeInit,
        pattern: Pattern::Xx,
        capabilities: Capabilities::ALL_V1,
        sender: SessionIndex(0x1122_3344),
        receiver: SessionIndex(0),
    };
    v.push((
        "handshake_init_header",
        format!("{init:?}"),
        init.encode().to_vec(),
    ));
    let resp = HandshakeHeader {
        kind: RecordKind::HandshakeResp,
        pattern: Pattern::Ik,
        capabilities: Capabilities(Capabilities::IPV6),
        sender: SessionIndex(0x5566_7788),
        receiver: SessionIndex(0x1122_3344),
    };
    v.push((
        "handshake_resp_header",
        format!("{resp:?}"),
        resp.encode().to_vec(),
    ));
    let data = DataHeader {
        key_epoch: 2,
        receiver: SessionIndex(0x5566_7788),
        counter: 0x0102,
    };
    v.push(("data_header", format!("{data:?}"), data.encode().to_vec()));
    let err = ErrorRecord {
        receiver: SessionIndex(0x1122_3344),
        ..ErrorRecord::unsupported_version()
    };
    v.push(("error_record", format!("{err:?}"), err.encode().to_vec()));

    let mut msg = |name: &'static str, what: String, f: &dyn Fn(&mut MessageWriter<'_>)| {
        let mut buf = [0u8; 512];
        let mut w = MessageWriter::new(&mut buf);
        f(&mut w);
        v.push((name, what, w.finish().to_vec()));
    };
    msg("msg_hello", "Hello { capabilities: 7 }".into(), &|w| {
        w.hello(7).unwrap()
    });
    msg(
        "msg_auth",
        "Auth { device_name: \"laptop\", platform: Linux }".into(),
        &|w| w.auth("laptop", Platform::Linux).unwrap(),
    );
    msg("msg_config", format!("Config({:?})", lease()), &|w| {
        w.config(&lease()).unwrap()
    });
    let delta = ConfigDelta {
        mtu: Some(1280),
        expires_at_unix: Some(1_893_459_600),
        ..Default::default()
    };
    msg("msg_config_delta", format!("{delta:?}"), &|w| {
        w.config_delta(&delta).unwrap()
    });
    msg(
        "msg_ip_packet",
        "IpPacket [45 00 00 14 .., 60 00 ..] (two packets)".into(),
        &|w| {
            let v4 = [
                0x45, 0, 0, 0x14, 0, 0, 0, 0, 64, 17, 0, 0, 100, 64, 0, 2, 192, 0, 2, 1,
            ];
            let v6 = [0x60, 0, 0, 0];
            assert_eq!(w.ip_packets(&[&v4, &v6]).unwrap(), 2);
        },
    );
    let k = Keepalive {
        seq: 5,
        tx_packets: 1000,
        rx_packets: 998,
    };
    msg("msg_ping", format!("Ping({k:?})"), &|w| w.ping(k).unwrap());
    msg("msg_pong", format!("Pong({k:?})"), &|w| w.pong(k).unwrap());
    msg("msg_resume", "Resume { ticket: [0xAB; 8] }".into(), &|w| {
        w.resume(&[0xAB; 8]).unwrap()
    });
    msg("msg_ticket", "Ticket { ticket: [0xCD; 8] }".into(), &|w| {
        w.ticket(&[0xCD; 8]).unwrap()
    });
    msg("msg_close", "Close(Shutdown)".into(), &|w| {
        w.close(CloseReason::Shutdown).unwrap()
    });
    msg(
        "msg_error",
        "Error { reason: PendingApproval, detail: \"ask the owner\" }".into(),
        &|w| {
            w.error(ErrorReason::PendingApproval, "ask the owner")
                .unwrap()
        },
    );
    v
}

fn render() -> String {
    let mut out = String::from(
        "# VSHP v1 record and message test vectors (generated by vshp/tests/record_vectors.rs).\n\
         # Each block: name, the decoded fields (Rust debug notation), and the exact bytes in hex.\n\
         # All integers are big-endian. See docs/protocol.md for the layouts.\n",
    );
    for (name, fields, bytes) in vectors() {
        out.push_str(&format!(
            "\nname = {name}\nfields = {fields}\nhex = {}\n",
            hex::encode(bytes)
        ));
    }
    out
}

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("test-vectors/records.txt")
}

fn parse(text: &str) -> BTreeMap<String, Vec<u8>> {
    let mut map = BTreeMap::new();
    let mut name = None;
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("name = ") {
            name = Some(n.to_string());
        } else if let Some(h) = line.strip_prefix("hex = ") {
            map.insert(
                name.take().expect("hex without name"),
                hex::decode(h).expect("hex"),
            );
        }
    }
    map
}

#[test]
fn vectors_file_matches_the_encoder() {
    let rendered = render();
    if std::env::var_os("VSHP_BLESS").is_some() {
        std::fs::write(path(), &rendered).unwrap();
        let seeds = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/record_decode");
        std::fs::create_dir_all(&seeds).unwrap();
        for (name, _, bytes) in vectors() {
            std::fs::write(seeds.join(format!("vector-{name}")), bytes).unwrap();
        }
    }
    let file = std::fs::read_to_string(path()).expect("test-vectors/records.txt");
    let expected = parse(&file);
    let vectors = vectors();
    assert_eq!(expected.len(), vectors.len(), "vector count differs");
    for (name, _, bytes) in &vectors {
        assert_eq!(expected.get(*name), Some(bytes), "vector {name}");
    }
}

#[test]
fn vectors_decode_to_their_fields() {
    let file = std::fs::read_to_string(path()).expect("test-vectors/records.txt");
    let v = parse(&file);
    match vshp::record::decode(&v["handshake_init_header"]).unwrap() {
        Record::Handshake { header, noise, .. } => {
            assert_eq!(header.pattern, Pattern::Xx);
            assert_eq!(header.sender, SessionIndex(0x1122_3344));
            assert!(noise.is_empty());
        }
        other => panic!("{other:?}"),
    }
    let mut data = v["data_header"].clone();
    data.extend_from_slice(&[0; 16]);
    match vshp::record::decode(&data).unwrap() {
        Record::Data { header, .. } => assert_eq!(header.counter, 0x0102),
        other => panic!("{other:?}"),
    }
    let config: Vec<_> = MessageReader::new(&v["msg_config"]).collect();
    assert_eq!(config, vec![Ok(Message::Config(lease()))]);
    let auth: Vec<_> = MessageReader::new(&v["msg_auth"]).collect();
    assert_eq!(
        auth,
        vec![Ok(Message::Auth {
            device_name: "laptop",
            platform: Platform::Linux
        })]
    );
    for (name, bytes) in v.iter().filter(|(n, _)| n.starts_with("msg_")) {
        let msgs: Vec<_> = MessageReader::new(bytes).collect();
        assert!(msgs.len() == 1 && msgs[0].is_ok(), "{name}: {msgs:?}");
    }
}
