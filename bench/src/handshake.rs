//! Handshakes per second: the real VSHP IK handshake (vshp crate, the code the worker
//! and the client run), in this process on one thread. Not through the gateway: the
//! broker's key-oracle IPC and the worker's record handling are not counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vshp::handshake::{Initiator, Responder};
use vshp::key_oracle::{LocalKeyOracle, StaticKeyOracle, StaticKeypair};
use vshp::record::{Capabilities, SessionIndex};

/// The CONFIG-like payloads the bench in vshp/benches/record.rs uses too.
const INIT_PAYLOAD: &[u8] = b"\x01\x00\x04\x00\x00\x00\x07";

/// Handshakes per second on one core.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    /// Both sides of a full IK handshake per iteration.
    pub both_sides: f64,
    /// The gateway's side only: read the INIT, write the RESPONSE (a recorded INIT
    /// replayed to a fresh responder each time).
    pub gateway_side: f64,
}

fn err(e: impl std::fmt::Debug) -> String {
    format!("{e:?}")
}

fn one_ik(
    client: &StaticKeypair,
    gw_pub: [u8; 32],
    oracle: &Arc<LocalKeyOracle>,
    w: &mut [u8; 512],
    p: &mut [u8; 512],
) -> Result<(), String> {
    let mut i = Initiator::new(
        client.clone(),
        Some(gw_pub),
        Capabilities::ALL_V1,
        SessionIndex(1),
    )
    .map_err(err)?;
    let mut r =
        Responder::new(oracle.clone(), Capabilities::ALL_V1, SessionIndex(2)).map_err(err)?;
    let n = i.write_init(INIT_PAYLOAD, w).map_err(err)?;
    r.read_init(w.get(..n).unwrap_or_default(), p)
        .map_err(err)?;
    let n = r.write_response(INIT_PAYLOAD, w).map_err(err)?;
    i.read_response(w.get(..n).unwrap_or_default(), p)
        .map_err(err)?;
    i.into_established().map_err(err)?;
    r.into_established().map_err(err)?;
    Ok(())
}

/// Runs each measurement for `secs` seconds.
pub fn measure(secs: f64) -> Result<Rates, String> {
    let client = StaticKeypair::generate().map_err(err)?;
    let oracle = Arc::new(LocalKeyOracle::new(StaticKeypair::generate().map_err(err)?));
    let gw_pub = StaticKeyOracle::public_key(oracle.as_ref());
    let (mut w, mut p) = ([0u8; 512], [0u8; 512]);
    let d = Duration::from_secs_f64(secs);

    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < d {
        one_ik(&client, gw_pub, &oracle, &mut w, &mut p)?;
        n += 1;
    }
    let both_sides = n as f64 / t.elapsed().as_secs_f64();

    let mut i =
        Initiator::new(client, Some(gw_pub), Capabilities::ALL_V1, SessionIndex(1)).map_err(err)?;
    let len = i.write_init(INIT_PAYLOAD, &mut w).map_err(err)?;
    let init = w.get(..len).unwrap_or_default().to_vec();
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < d {
        let mut r =
            Responder::new(oracle.clone(), Capabilities::ALL_V1, SessionIndex(2)).map_err(err)?;
        r.read_init(&init, &mut p).map_err(err)?;
        r.write_response(INIT_PAYLOAD, &mut w).map_err(err)?;
        n += 1;
    }
    let gateway_side = n as f64 / t.elapsed().as_secs_f64();
    Ok(Rates {
        both_sides,
        gateway_side,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_short_measurement_completes_handshakes() {
        let r = super::measure(0.02).unwrap();
        // At least one handshake each way happened (no figure is asserted).
        assert!(r.both_sides > 0.0 && r.gateway_side > 0.0);
    }
}
