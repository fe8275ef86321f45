//! `PairingRequests`: unknown peers waiting for the user's approval (domain model:
//! `PairingRequest`). At most [`MAX_PENDING`] at a time, each for [`PAIRING_TTL_SECS`]
//! unless the gateway was started with another `--pairing-timeout`.

use vshp::pairing::PairingCode;

/// A request expires after a minute: long enough to read a code on two screens.
pub const PAIRING_TTL_SECS: u64 = 60;
/// At most this many requests wait at once; more get `Refuse(Overload)`.
pub const MAX_PENDING: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairingRequest {
    /// Six digits, from the handshake hash (both devices show it).
    pub code: String,
    pub key: [u8; 32],
    /// The worker session waiting for the decision.
    pub session: u64,
    pub requested_at_unix: u64,
    /// What the device's AUTH claimed (labels for the user, never for a decision).
    pub device_name: Option<String>,
    pub platform: Option<String>,
}

impl PairingRequest {
    /// "laptop (Linux)", "laptop", "unnamed device (Linux)" or "unnamed device".
    pub fn describe(&self) -> String {
        let name = self.device_name.as_deref().unwrap_or("unnamed device");
        match &self.platform {
            Some(p) => format!("{name} ({p})"),
            None => name.to_owned(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PairingError {
    #[error("{MAX_PENDING} pairing requests are already waiting")]
    Full,
    #[error("no pairing request with that code (it may have expired)")]
    NoSuchCode,
}

#[derive(Debug)]
pub struct PairingRequests {
    pending: Vec<PairingRequest>,
    ttl_secs: u64,
}

impl Default for PairingRequests {
    fn default() -> Self {
        Self::with_ttl(PAIRING_TTL_SECS)
    }
}

impl PairingRequests {
    /// Requests expire `ttl_secs` (at least 1) after they were made.
    pub fn with_ttl(ttl_secs: u64) -> Self {
        Self {
            pending: Vec::new(),
            ttl_secs: ttl_secs.max(1),
        }
    }

    /// Records a request from `key` whose handshake produced `handshake_hash`. A newer
    /// request of the same key replaces the older one. Returns the code.
    pub fn request(
        &mut self,
        key: [u8; 32],
        handshake_hash: &[u8; 32],
        session: u64,
        now_unix: u64,
    ) -> Result<PairingRequest, PairingError> {
        self.request_labelled(key, handshake_hash, session, now_unix, None, None)
    }

    /// [`request`](Self::request) with the device name and platform of the AUTH.
    pub fn request_labelled(
        &mut self,
        key: [u8; 32],
        handshake_hash: &[u8; 32],
        session: u64,
        now_unix: u64,
        device_name: Option<String>,
        platform: Option<String>,
    ) -> Result<PairingRequest, PairingError> {
        self.expire(now_unix);
        self.pending.retain(|r| r.key != key);
        if self.pending.len() >= MAX_PENDING {
            return Err(PairingError::Full);
        }
        let req = PairingRequest {
            code: PairingCode::from_handshake_hash(handshake_hash).to_string(),
            key,
            session,
            requested_at_unix: now_unix,
            device_name,
            platform,
        };
        self.pending.push(req.clone());
        Ok(req)
    }

    /// Drops expired requests and returns them.
    pub fn expire(&mut self, now_unix: u64) -> Vec<PairingRequest> {
        let (gone, keep) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|r| now_unix >= r.requested_at_unix.saturating_add(self.ttl_secs));
        self.pending = keep;
        gone
    }

    /// Removes and returns the request with this code (approve or deny).
    pub fn take(&mut self, code: &str, now_unix: u64) -> Result<PairingRequest, PairingError> {
        self.expire(now_unix);
        let code = code.trim();
        let i = self
            .pending
            .iter()
            .position(|r| r.code == code)
            .ok_or(PairingError::NoSuchCode)?;
        Ok(self.pending.remove(i))
    }

    /// Forgets the request of a session that ended.
    pub fn drop_session(&mut self, session: u64) {
        self.pending.retain(|r| r.session != session);
    }

    pub fn list(&self) -> &[PairingRequest] {
        &self.pending
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_matches_vshp_and_approval_takes_it() {
        let mut p = PairingRequests::default();
        let r = p.request([1; 32], &[7; 32], 11, 100).unwrap();
        assert_eq!(
            r.code,
            PairingCode::from_handshake_hash(&[7; 32]).to_string()
        );
        assert_eq!(r.code.len(), 6);
        assert_eq!(p.take("000000x", 101), Err(PairingError::NoSuchCode));
        assert_eq!(p.take(&r.code, 101).unwrap().session, 11);
        assert!(p.is_empty());
    }

    #[test]
    fn requests_expire_after_sixty_seconds() {
        let mut p = PairingRequests::default();
        let r = p.request([1; 32], &[7; 32], 1, 100).unwrap();
        assert!(p.expire(100 + PAIRING_TTL_SECS - 1).is_empty());
        assert_eq!(p.expire(100 + PAIRING_TTL_SECS), vec![r.clone()]);
        p.request([1; 32], &[7; 32], 1, 100).unwrap();
        assert_eq!(
            p.take(&r.code, 100 + PAIRING_TTL_SECS),
            Err(PairingError::NoSuchCode)
        );
    }

    #[test]
    fn a_configured_timeout_replaces_the_default() {
        let mut p = PairingRequests::with_ttl(5);
        let r = p.request([1; 32], &[7; 32], 1, 100).unwrap();
        assert!(p.expire(104).is_empty());
        assert_eq!(p.expire(105), vec![r]);
        // Zero would expire a request before anyone could read its code.
        let mut p = PairingRequests::with_ttl(0);
        p.request([1; 32], &[7; 32], 1, 100).unwrap();
        assert!(p.expire(100).is_empty());
    }

    #[test]
    fn at_most_max_pending_and_same_key_replaces() {
        let mut p = PairingRequests::default();
        for i in 0..MAX_PENDING as u8 {
            p.request([i; 32], &[i; 32], u64::from(i), 0).unwrap();
        }
        assert_eq!(
            p.request([0xee; 32], &[0xee; 32], 99, 0),
            Err(PairingError::Full)
        );
        // The same key again replaces its own request rather than adding one.
        p.request([0; 32], &[0x55; 32], 100, 1).unwrap();
        assert_eq!(p.len(), MAX_PENDING);
        p.drop_session(100);
        assert_eq!(p.len(), MAX_PENDING - 1);
        // After expiry there is room again.
        p.request([0xee; 32], &[0xee; 32], 99, PAIRING_TTL_SECS + 1)
            .unwrap();
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn requests_carry_the_device_name_and_platform() {
        let mut p = PairingRequests::default();
        let r = p
            .request_labelled(
                [1; 32],
                &[7; 32],
                1,
                0,
                Some("laptop".into()),
                Some("Linux".into()),
            )
            .unwrap();
        assert_eq!(r.describe(), "laptop (Linux)");
        assert_eq!(p.list()[0].device_name.as_deref(), Some("laptop"));
        let r = p.request([2; 32], &[8; 32], 2, 0).unwrap();
        assert_eq!(r.describe(), "unnamed device");
    }
}
