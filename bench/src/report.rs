//! The figures of one run: what each metric means, the ratios of VPN Share to the
//! baselines of the same run, the terminal table and the JSON file.

use serde::Serialize;
use std::collections::BTreeMap;

/// Which direction is good for a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Higher,
    Lower,
}

/// One metric the harness reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricDef {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub better: Better,
}

const fn m(
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    better: Better,
) -> MetricDef {
    MetricDef {
        key,
        label,
        unit,
        better,
    }
}

/// Every per-scenario metric, in table order.
pub const METRICS: &[MetricDef] = &[
    m("tcp_up_1", "TCP upload, 1 stream", "Gbit/s", Better::Higher),
    m(
        "tcp_down_1",
        "TCP download, 1 stream",
        "Gbit/s",
        Better::Higher,
    ),
    m(
        "tcp_up_4",
        "TCP upload, 4 streams",
        "Gbit/s",
        Better::Higher,
    ),
    m(
        "tcp_down_4",
        "TCP download, 4 streams",
        "Gbit/s",
        Better::Higher,
    ),
    m(
        "udp_100_mbps",
        "UDP 100 Mbit/s offered: got",
        "Mbit/s",
        Better::Higher,
    ),
    m(
        "udp_100_loss",
        "UDP 100 Mbit/s offered: loss",
        "%",
        Better::Lower,
    ),
    m(
        "udp_300_mbps",
        "UDP 300 Mbit/s offered: got",
        "Mbit/s",
        Better::Higher,
    ),
    m(
        "udp_300_loss",
        "UDP 300 Mbit/s offered: loss",
        "%",
        Better::Lower,
    ),
    m(
        "udp_300_down_mbps",
        "UDP 300 Mbit/s down: got",
        "Mbit/s",
        Better::Higher,
    ),
    m(
        "udp_300_down_loss",
        "UDP 300 Mbit/s down: loss",
        "%",
        Better::Lower,
    ),
    m("rr_p50_us", "request/response p50", "µs", Better::Lower),
    m("rr_p99_us", "request/response p99", "µs", Better::Lower),
    m(
        "cps",
        "new TCP connections, 16 clients",
        "conn/s",
        Better::Higher,
    ),
    m(
        "ttfb_p50_us",
        "time to first byte p50, 1 client",
        "µs",
        Better::Lower,
    ),
    m(
        "ttfb_p99_us",
        "time to first byte p99, 1 client",
        "µs",
        Better::Lower,
    ),
    m(
        "cpu_gw_s_per_gb",
        "CPU, gateway side (TCP bulk)",
        "s/GB",
        Better::Lower,
    ),
    m(
        "cpu_client_s_per_gb",
        "CPU, laptop side (TCP bulk)",
        "s/GB",
        Better::Lower,
    ),
    m(
        "rss_gw_mib",
        "RSS, all gateway processes (bulk)",
        "MiB",
        Better::Lower,
    ),
    m(
        "flows_held",
        "concurrent TCP flows held",
        "flows",
        Better::Higher,
    ),
    m(
        "flows_netstack_rss_mib",
        "netstack RSS with those flows",
        "MiB",
        Better::Lower,
    ),
    m(
        "flows_extra_gbps",
        "1 more flow beside them, upload",
        "Gbit/s",
        Better::Higher,
    ),
    m(
        "flows_extra_vs_alone",
        "that flow / 1 stream alone",
        "×",
        Better::Higher,
    ),
];

/// The scenarios, in column order: key and column title.
pub const SCENARIOS: &[(&str, &str)] = &[
    ("plain", "plain"),
    ("wg", "boringtun"),
    ("udp", "VS udp"),
    ("tcp", "VS tcp"),
];

/// The baselines every VPN Share figure is compared with.
pub const BASELINES: &[&str] = &["plain", "wg"];

/// The VPN Share scenarios.
pub const VPNSHARE: &[&str] = &["udp", "tcp"];

/// One figure: a value, or why there is none, and a remark.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Figure {
    pub value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Every round's value (the figure is their median).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rounds: Vec<f64>,
}

impl Figure {
    pub fn of(v: f64) -> Self {
        Self {
            value: Some(v),
            ..Self::default()
        }
    }
    pub fn none(why: impl Into<String>) -> Self {
        Self {
            value: None,
            note: Some(why.into()),
            rounds: Vec::new(),
        }
    }
    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }
    pub fn median_of(rounds: Vec<f64>) -> Self {
        Self {
            value: crate::stats::median(&rounds),
            note: None,
            rounds,
        }
    }
}

/// The machine a run was made on.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    pub hostname: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub mem_gib: f64,
    pub loadavg_start: String,
    pub loadavg_end: String,
}

/// A VPN Share figure relative to a baseline of the same run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Ratio {
    pub vs_plain: Option<f64>,
    pub vs_wg: Option<f64>,
}

/// Everything one run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub date: String,
    /// `git rev-parse --short HEAD` of the tree measured, `+dirty` with local changes.
    pub commit: String,
    pub machine: Machine,
    pub quick: bool,
    pub rounds: u32,
    pub seconds_per_round: u32,
    /// How long the measurement took (after the build).
    pub elapsed_s: f64,
    /// scenario key → metric key → figure.
    pub scenarios: BTreeMap<String, BTreeMap<String, Figure>>,
    /// scenario key → metric key → ratios (VPN Share scenarios only).
    pub ratios: BTreeMap<String, BTreeMap<String, Ratio>>,
    /// Figures that belong to no scenario (handshakes).
    pub global: BTreeMap<String, Figure>,
    pub notes: Vec<String>,
}

/// `a / b` when both exist and b is not zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
    }
}

impl Report {
    fn value(&self, scenario: &str, metric: &str) -> Option<f64> {
        self.scenarios.get(scenario)?.get(metric)?.value
    }

    /// Fills [`Report::ratios`] from the figures.
    pub fn compute_ratios(&mut self) {
        let mut out = BTreeMap::new();
        for &s in VPNSHARE {
            if !self.scenarios.contains_key(s) {
                continue;
            }
            let mut per = BTreeMap::new();
            for md in METRICS {
                let v = self.value(s, md.key);
                per.insert(
                    md.key.to_owned(),
                    Ratio {
                        vs_plain: ratio(v, self.value("plain", md.key)),
                        vs_wg: ratio(v, self.value("wg", md.key)),
                    },
                );
            }
            out.insert(s.to_owned(), per);
        }
        self.ratios = out;
    }

    /// The table for the terminal (and, between ``` fences, for docs/performance.md).
    pub fn table(&self) -> String {
        let cols: Vec<(&str, &str)> = SCENARIOS
            .iter()
            .copied()
            .filter(|(k, _)| self.scenarios.contains_key(*k))
            .collect();
        let mut ratio_cols: Vec<(String, &str, &str)> = Vec::new();
        for &(s, title) in &cols {
            if !VPNSHARE.contains(&s) {
                continue;
            }
            for &(b, btitle) in &cols {
                if BASELINES.contains(&b) {
                    ratio_cols.push((format!("{title}/{btitle}"), s, b));
                }
            }
        }
        let mut head = vec!["metric".to_owned(), "unit".to_owned(), "".to_owned()];
        head.extend(cols.iter().map(|(_, t)| (*t).to_owned()));
        head.extend(ratio_cols.iter().map(|(t, _, _)| t.clone()));
        let mut rows = vec![head];
        for md in METRICS {
            if cols
                .iter()
                .all(|(s, _)| self.scenarios.get(*s).and_then(|f| f.get(md.key)).is_none())
            {
                continue;
            }
            let mut row = vec![
                md.label.to_owned(),
                md.unit.to_owned(),
                match md.better {
                    Better::Higher => "↑".to_owned(),
                    Better::Lower => "↓".to_owned(),
                },
            ];
            for (s, _) in &cols {
                let f = self.scenarios.get(*s).and_then(|f| f.get(md.key));
                row.push(match f {
                    Some(Figure { value: Some(v), .. }) => format_value(*v),
                    Some(Figure { note: Some(_), .. }) => "n/a".to_owned(),
                    _ => "—".to_owned(),
                });
            }
            for (_, s, b) in &ratio_cols {
                row.push(format_ratio(ratio(
                    self.value(s, md.key),
                    self.value(b, md.key),
                )));
            }
            rows.push(row);
        }
        let mut out = render(&rows);
        for (k, f) in &self.global {
            out.push_str(&format!(
                "{k}: {}{}\n",
                f.value.map(format_value).unwrap_or_else(|| "n/a".into()),
                f.note
                    .as_ref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            ));
        }
        for (s, figs) in &self.scenarios {
            out.push_str(&breakdown(s, figs));
        }
        for (s, figs) in &self.scenarios {
            for (k, f) in figs {
                if let Some(n) = &f.note {
                    out.push_str(&format!("note {s}/{k}: {n}\n"));
                }
            }
        }
        for n in &self.notes {
            out.push_str(&format!("note: {n}\n"));
        }
        out
    }
}

impl Report {
    /// This run beside an earlier one (its JSON report, e.g. before a data-path
    /// change): per scenario of this run, the earlier figure, this one, and their ratio.
    pub fn compare_table(&self, before: &serde_json::Value) -> String {
        let old = |s: &str, k: &str| {
            before
                .get("scenarios")?
                .get(s)?
                .get(k)?
                .get("value")?
                .as_f64()
        };
        let cols: Vec<(&str, &str)> = SCENARIOS
            .iter()
            .copied()
            .filter(|(k, _)| self.scenarios.contains_key(*k))
            .collect();
        let mut head = vec!["metric".to_owned(), "unit".to_owned(), "".to_owned()];
        for (_, t) in &cols {
            head.extend([
                format!("{t} before"),
                format!("{t} now"),
                "now/before".to_owned(),
            ]);
        }
        let mut rows = vec![head];
        for md in METRICS {
            let cells: Vec<(Option<f64>, Option<f64>)> = cols
                .iter()
                .map(|(s, _)| (old(s, md.key), self.value(s, md.key)))
                .collect();
            // Only what this run measured (it may have run a part: --tests).
            if cells.iter().all(|(_, b)| b.is_none()) {
                continue;
            }
            let mut row = vec![
                md.label.to_owned(),
                md.unit.to_owned(),
                match md.better {
                    Better::Higher => "↑".to_owned(),
                    Better::Lower => "↓".to_owned(),
                },
            ];
            for (a, b) in cells {
                let f = |v: Option<f64>| v.map_or("—".to_owned(), format_value);
                row.extend([f(a), f(b), format_ratio(ratio(b, a))]);
            }
            rows.push(row);
        }
        let date = before.get("date").and_then(|d| d.as_str()).unwrap_or("?");
        format!("compared with the run of {date}:\n{}", render(&rows))
    }
}

/// The per-process lines of one scenario: figures keyed `METRIC/PROCESS`, e.g.
/// `cpu_gw_s_per_gb/vpnshare-netsta`, one line per metric.
pub fn breakdown(scenario: &str, figs: &BTreeMap<String, Figure>) -> String {
    let mut by_metric: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (k, f) in figs {
        if let (Some((metric, process)), Some(v)) = (k.split_once('/'), f.value) {
            by_metric
                .entry(metric)
                .or_default()
                .push(format!("{process} {}", format_value(v)));
        }
    }
    let title = SCENARIOS
        .iter()
        .find(|(k, _)| *k == scenario)
        .map_or(scenario, |(_, t)| t);
    by_metric
        .into_iter()
        .map(|(metric, parts)| {
            let label = METRICS
                .iter()
                .find(|m| m.key == metric)
                .map_or(metric.to_owned(), |m| format!("{} ({})", m.label, m.unit));
            format!("{title}, {label}: {}\n", parts.join(", "))
        })
        .collect()
}

/// Columns padded to their widest cell (counted in chars, for `µ`, `↑`, `×`).
pub fn render(rows: &[Vec<String>]) -> String {
    let ncols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> = (0..ncols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, r) in rows.iter().enumerate() {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            let w = width.get(c).copied().unwrap_or(0);
            let pad = w.saturating_sub(cell.chars().count());
            if c < 2 {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            } else {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            }
            line.push_str("  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
        if i == 0 {
            let total: usize = width.iter().map(|w| w + 2).sum();
            out.push_str(&"-".repeat(total.saturating_sub(2)));
            out.push('\n');
        }
    }
    out
}

/// A figure with three significant digits or so.
pub fn format_value(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        "n/a".to_owned()
    } else if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A ratio as `0.42×`, or `—` when there is none.
pub fn format_ratio(r: Option<f64>) -> String {
    match r {
        Some(r) if r.is_finite() => {
            if r >= 100.0 {
                format!("{r:.0}×")
            } else if r >= 10.0 {
                format!("{r:.1}×")
            } else {
                format!("{r:.2}×")
            }
        }
        _ => "—".to_owned(),
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` of a Unix time in seconds.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!(
        "{y:04}-{mo:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let mut r = Report::default();
        let mut put = |s: &str, k: &str, f: Figure| {
            r.scenarios
                .entry(s.to_owned())
                .or_default()
                .insert(k.to_owned(), f);
        };
        put("plain", "tcp_up_1", Figure::of(16.0));
        put("wg", "tcp_up_1", Figure::of(0.4));
        put("udp", "tcp_up_1", Figure::of(1.0));
        put("plain", "rr_p50_us", Figure::of(0.0));
        put("udp", "rr_p50_us", Figure::of(80.0));
        put(
            "udp",
            "flows_held",
            Figure::none("cap 512").with_note("cap 512"),
        );
        put("udp", "cpu_gw_s_per_gb/vpnshare-netsta", Figure::of(3.25));
        put("udp", "cpu_gw_s_per_gb/vpnshare-worker", Figure::of(2.0));
        r
    }

    #[test]
    fn ratios_against_both_baselines() {
        let mut r = report();
        r.compute_ratios();
        let t = r.ratios["udp"]["tcp_up_1"];
        assert_eq!(t.vs_plain, Some(1.0 / 16.0));
        assert_eq!(t.vs_wg, Some(2.5));
        // A zero baseline and a missing one give no ratio.
        assert_eq!(r.ratios["udp"]["rr_p50_us"].vs_plain, None);
        assert_eq!(r.ratios["udp"]["rr_p50_us"].vs_wg, None);
        assert!(!r.ratios.contains_key("plain"));
    }

    #[test]
    fn table_has_columns_ratios_and_notes() {
        let mut r = report();
        r.compute_ratios();
        let t = r.table();
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("metric"));
        assert!(lines[0].contains("boringtun") && lines[0].contains("VS udp/boringtun"));
        assert!(!lines[0].contains("VS tcp"));
        let up = lines
            .iter()
            .find(|l| l.starts_with("TCP upload, 1 stream"))
            .unwrap();
        assert!(up.contains("16.0") && up.contains("0.400") && up.contains("2.50×"));
        assert!(up.contains("0.06×"));
        assert!(t.contains("note udp/flows_held: cap 512"));
        assert!(t.contains(
            "VS udp, CPU, gateway side (TCP bulk) (s/GB): vpnshare-netsta 3.25, vpnshare-worker 2.00\n"
        ));
        // Rows no scenario measured are left out.
        assert!(!t.contains("TCP download, 4 streams"));
        // Every row has the same width before trimming: the cells line up.
        let cols = lines[0].find("plain").unwrap();
        assert_eq!(up.chars().nth(cols - 1), Some(' '));
    }

    #[test]
    fn comparison_with_an_earlier_run() {
        let mut r = report();
        r.compute_ratios();
        let before = serde_json::json!({
            "date": "2026-11-24 20:00:00 UTC",
            "scenarios": {"udp": {"tcp_up_1": {"value": 0.5}, "rr_p50_us": {"value": null}}}
        });
        let t = r.compare_table(&before);
        assert!(t.starts_with("compared with the run of 2026-11-24 20:00:00 UTC:\n"));
        let up = t
            .lines()
            .find(|l| l.starts_with("TCP upload, 1 stream"))
            .unwrap();
        // plain and boringtun have no earlier figure; VS udp went 0.5 -> 1.0.
        let cells: Vec<&str> = up.split_whitespace().skip(4).collect();
        assert_eq!(
            cells,
            [
                "Gbit/s", "↑", "—", "16.0", "—", "—", "0.400", "—", "0.500", "1.00", "2.00×"
            ],
            "{up}"
        );
    }

    #[test]
    fn value_and_ratio_formatting() {
        assert_eq!(format_value(15_794.1), "15794");
        assert_eq!(format_value(15.79), "15.8");
        assert_eq!(format_value(1.579), "1.58");
        assert_eq!(format_value(0.3951), "0.395");
        assert_eq!(format_value(0.0), "0");
        assert_eq!(format_value(f64::NAN), "n/a");
        assert_eq!(format_ratio(Some(2.5)), "2.50×");
        assert_eq!(format_ratio(Some(39.49)), "39.5×");
        assert_eq!(format_ratio(None), "—");
        assert_eq!(format_ratio(Some(f64::INFINITY)), "—");
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
    }

    #[test]
    fn render_pads_by_chars() {
        let rows = vec![
            vec!["a".into(), "µs".into(), "↑".into(), "1".into()],
            vec!["long".into(), "x".into(), "↓".into(), "100".into()],
        ];
        let t = render(&rows);
        let l: Vec<&str> = t.lines().collect();
        assert_eq!(l[0], "a     µs  ↑    1");
        assert_eq!(l[2], "long  x   ↓  100");
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_795_566_758), "2026-11-25 00:32:38 UTC");
    }

    #[test]
    fn json_has_figures_and_ratios() {
        let mut r = report();
        r.compute_ratios();
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["scenarios"]["wg"]["tcp_up_1"]["value"], 0.4);
        assert_eq!(v["ratios"]["udp"]["tcp_up_1"]["vs_wg"], 2.5);
        assert_eq!(
            v["scenarios"]["udp"]["flows_held"]["value"],
            serde_json::Value::Null
        );
    }
}
