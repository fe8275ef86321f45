//! iperf3 runs (`-J`) and the parsing of their JSON report.

use serde_json::Value;

/// What one iperf3 client run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct IperfResult {
    /// Bytes the receiving side got.
    pub bytes: u64,
    /// Seconds the receiving side counted.
    pub seconds: f64,
    /// Receiver-side throughput, bit/s.
    pub bits_per_second: f64,
    /// TCP retransmissions of the sender (TCP only, when reported).
    pub retransmits: Option<u64>,
    /// UDP only: datagrams lost and sent, loss in percent, jitter in ms.
    pub udp: Option<UdpLoss>,
}

/// UDP loss as the receiving iperf3 counted it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UdpLoss {
    pub lost_packets: u64,
    pub packets: u64,
    pub lost_percent: f64,
    pub jitter_ms: f64,
}

/// Why an iperf3 report gives no figure.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IperfError {
    #[error("iperf3 output is not JSON: {0}")]
    NotJson(String),
    #[error("iperf3 reported an error: {0}")]
    Reported(String),
    #[error("iperf3 report lacks {0}")]
    Missing(&'static str),
}

fn num(v: &Value, key: &'static str) -> Result<f64, IperfError> {
    v.get(key)
        .and_then(Value::as_f64)
        .ok_or(IperfError::Missing(key))
}

/// Parses the `-J` report of an iperf3 client (TCP or UDP, either direction).
///
/// The figures are the receiver's: `end.sum_received` (with `-R` that is the client
/// itself). For UDP, iperf3 ≥ 3.12 puts the server's loss count in `end.sum_received`;
/// older versions only have `end.sum`, used as a fallback.
pub fn parse(json: &str) -> Result<IperfResult, IperfError> {
    let v: Value = serde_json::from_str(json).map_err(|e| {
        let head: String = json.chars().take(200).collect();
        IperfError::NotJson(format!("{e}: {head}"))
    })?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        return Err(IperfError::Reported(e.to_owned()));
    }
    let end = v.get("end").ok_or(IperfError::Missing("end"))?;
    let is_udp = v
        .pointer("/start/test_start/protocol")
        .and_then(Value::as_str)
        .is_some_and(|p| p.eq_ignore_ascii_case("UDP"))
        || end
            .get("sum")
            .is_some_and(|s| s.get("lost_packets").is_some());
    let recv = end
        .get("sum_received")
        .or_else(|| end.get("sum"))
        .ok_or(IperfError::Missing("end.sum_received"))?;
    let bytes = recv
        .get("bytes")
        .and_then(Value::as_u64)
        .ok_or(IperfError::Missing("bytes"))?;
    let seconds = num(recv, "seconds")?;
    let bits_per_second = num(recv, "bits_per_second")?;
    let retransmits = end
        .get("sum_sent")
        .and_then(|s| s.get("retransmits"))
        .and_then(Value::as_u64);
    let udp = if is_udp {
        let s = if recv.get("lost_packets").is_some() {
            recv
        } else {
            end.get("sum").ok_or(IperfError::Missing("end.sum"))?
        };
        Some(UdpLoss {
            lost_packets: s
                .get("lost_packets")
                .and_then(Value::as_u64)
                .ok_or(IperfError::Missing("lost_packets"))?,
            packets: s
                .get("packets")
                .and_then(Value::as_u64)
                .ok_or(IperfError::Missing("packets"))?,
            lost_percent: num(s, "lost_percent")?,
            jitter_ms: num(s, "jitter_ms").unwrap_or(0.0),
        })
    } else {
        None
    };
    Ok(IperfResult {
        bytes,
        seconds,
        bits_per_second,
        retransmits,
        udp,
    })
}

/// What to run: protocol, direction, streams, rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IperfSpec {
    pub streams: u32,
    /// `-R`: the server sends (a download for the laptop).
    pub reverse: bool,
    /// UDP at this many Mbit/s offered; `None` = TCP.
    pub udp_mbps: Option<u32>,
    pub seconds: u32,
}

/// UDP payload per datagram: below every tunnel's MTU, so nothing fragments and the
/// four scenarios carry the same datagrams.
pub const UDP_LEN: u32 = 1200;

impl IperfSpec {
    /// The client's arguments after `iperf3`.
    pub fn args(&self, server: std::net::SocketAddr) -> Vec<String> {
        let mut a = vec![
            "-c".to_owned(),
            server.ip().to_string(),
            "-p".to_owned(),
            server.port().to_string(),
            "-t".to_owned(),
            self.seconds.to_string(),
            "-J".to_owned(),
            "--connect-timeout".to_owned(),
            "3000".to_owned(),
        ];
        if self.streams > 1 {
            a.push("-P".to_owned());
            a.push(self.streams.to_string());
        }
        if self.reverse {
            a.push("-R".to_owned());
        }
        if let Some(r) = self.udp_mbps {
            a.extend([
                "-u".to_owned(),
                "-b".to_owned(),
                format!("{r}M"),
                "-l".to_owned(),
                UDP_LEN.to_string(),
            ]);
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Trimmed from real iperf 3.12 reports on this machine.
    const TCP: &str = r#"{"start":{"test_start":{"protocol":"TCP"}},"intervals":[],
      "end":{"streams":[],
        "sum_sent":{"start":0,"end":1.000045,"seconds":1.000045,"bytes":1983119360,"bits_per_second":15864240989.155487,"retransmits":8,"sender":true},
        "sum_received":{"start":0,"end":1.001163,"seconds":1.001163,"bytes":1976565760,"bits_per_second":15794157474.85674,"sender":true},
        "cpu_utilization_percent":{}}}"#;
    const UDP: &str = r#"{"start":{"test_start":{"protocol":"UDP"}},
      "end":{"streams":[],
        "sum":{"start":0,"end":1.000294,"seconds":1.000294,"bytes":12517376,"bits_per_second":100131097.64328618,"jitter_ms":0.0111,"lost_packets":22,"packets":382,"lost_percent":5.7591623036649215,"sender":true},
        "sum_sent":{"start":0,"end":1.000079,"seconds":1.000079,"bytes":12517376,"bits_per_second":100131097.64328618,"jitter_ms":0,"lost_packets":0,"packets":382,"lost_percent":0,"sender":true},
        "sum_received":{"start":0,"end":1.000294,"seconds":1.000294,"bytes":11796480,"bits_per_second":94344102.8337669,"jitter_ms":0.0111,"lost_packets":22,"packets":382,"lost_percent":5.7591623036649215,"sender":false}}}"#;
    // iperf3 before 3.12: UDP has only end.sum.
    const UDP_OLD: &str = r#"{"start":{"test_start":{"protocol":"UDP"}},
      "end":{"sum":{"seconds":2.0,"bytes":1000,"bits_per_second":4000.0,"jitter_ms":0.5,"lost_packets":1,"packets":10,"lost_percent":10.0}}}"#;

    #[test]
    fn tcp_report() {
        let r = parse(TCP).unwrap();
        assert_eq!(r.bytes, 1976565760);
        assert!((r.bits_per_second - 15794157474.85674).abs() < 1.0);
        assert_eq!(r.retransmits, Some(8));
        assert_eq!(r.udp, None);
    }

    #[test]
    fn udp_report_uses_the_receiver() {
        let r = parse(UDP).unwrap();
        assert_eq!(r.bytes, 11796480);
        let u = r.udp.unwrap();
        assert_eq!((u.lost_packets, u.packets), (22, 382));
        assert!((u.lost_percent - 5.759).abs() < 0.001);
        let o = parse(UDP_OLD).unwrap();
        assert_eq!(o.udp.unwrap().lost_packets, 1);
        assert_eq!(o.bytes, 1000);
    }

    #[test]
    fn errors_are_typed() {
        assert_eq!(
            parse(r#"{"start":{},"error":"unable to connect to server: Connection refused"}"#),
            Err(IperfError::Reported(
                "unable to connect to server: Connection refused".into()
            ))
        );
        assert!(matches!(parse("iperf3: oops"), Err(IperfError::NotJson(_))));
        assert_eq!(parse(r#"{"start":{}}"#), Err(IperfError::Missing("end")));
        assert_eq!(
            parse(r#"{"end":{"sum_received":{"seconds":1.0}}}"#),
            Err(IperfError::Missing("bytes"))
        );
    }

    #[test]
    fn client_arguments() {
        let s: std::net::SocketAddr = "10.0.0.1:5201".parse().unwrap();
        let tcp = IperfSpec {
            streams: 4,
            reverse: true,
            udp_mbps: None,
            seconds: 3,
        };
        let a = tcp.args(s).join(" ");
        assert!(a.starts_with("-c 10.0.0.1 -p 5201 -t 3 -J"));
        assert!(a.contains("-P 4") && a.contains("-R") && !a.contains("-u"));
        let udp = IperfSpec {
            streams: 1,
            reverse: false,
            udp_mbps: Some(300),
            seconds: 1,
        };
        let a = udp.args(s).join(" ");
        assert!(a.contains("-u -b 300M -l 1200") && !a.contains("-P") && !a.contains("-R"));
    }
}
