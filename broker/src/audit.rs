//! The audit log: `audit.log` in the state dir, mode 0600, one JSON object per line:
//! `{"ts":<unix seconds>,"event":"<name>", ...fields}`.
//!
//! Events: `gateway_started`, `gateway_stopped`, `pairing_requested`,
//! `pairing_approved`, `pairing_denied`, `pairing_expired`, `peer_added`,
//! `peer_revoked`, `peer_admitted`, `peer_refused`, `sandbox_violation`,
//! `worker_exited`, `egress_changed`.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use serde_json::{Map, Value};

pub const AUDIT_FILE: &str = "audit.log";

#[derive(Debug)]
pub struct AuditLog {
    file: Option<File>,
}

impl AuditLog {
    pub fn open(state_dir: &Path) -> io::Result<Self> {
        Ok(Self {
            file: Some(crate::fsutil::open_append_0600(
                &state_dir.join(AUDIT_FILE),
            )?),
        })
    }

    /// A log that writes nothing (tests of the policy).
    pub fn disabled() -> Self {
        Self { file: None }
    }

    pub fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.file.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Appends one event. A write failure is logged, never fatal.
    pub fn record(&mut self, event: &str, fields: &[(&str, Value)]) {
        let mut obj = Map::new();
        obj.insert("ts".into(), Value::from(crate::now_unix()));
        obj.insert("event".into(), Value::from(event));
        for (k, v) in fields {
            obj.insert((*k).to_owned(), v.clone());
        }
        let mut line = Value::Object(obj).to_string();
        tracing::info!(target: "audit", "{line}");
        if let Some(f) = &mut self.file {
            line.push('\n');
            // One write(2) per line on an O_APPEND file: lines never interleave.
            if let Err(e) = f.write_all(line.as_bytes()) {
                tracing::error!(error = %e, "cannot write the audit log");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_json_lines_mode_0600() {
        let dir = crate::testutil::temp_dir("audit");
        let mut a = AuditLog::open(&dir).unwrap();
        a.record(
            "peer_added",
            &[("key", Value::from("ab")), ("name", Value::Null)],
        );
        a.record("egress_changed", &[("vpn", Value::from(false))]);
        let text = std::fs::read_to_string(dir.join(AUDIT_FILE)).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "peer_added");
        assert_eq!(lines[1]["vpn"], false);
        let mode = std::fs::metadata(dir.join(AUDIT_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
