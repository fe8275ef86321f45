//! The invite URI: `vshp://HOST:PORT/?key=<64 lowercase hex digits>`.
//!
//! The key is hex, not base64url: it is the same text `vpnshare id` prints and
//! `vpnshare peers add` takes, so a user can compare keys by eye across commands; it
//! needs no escaping in a URI, a shell or a QR code; and it has one spelling (base64url
//! has padding and non-canonical trailing-bit variants). The 21 extra characters do not
//! matter for a QR code of this size. Parsing accepts upper-case hex too.
//! HOST is an IPv4 address, a bracketed IPv6 address (`[fd00::1]`) or a DNS name.

use std::fmt;
use std::net::SocketAddr;

pub const SCHEME: &str = "vshp://";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invite {
    /// Host as written in the URI, without brackets for IPv6.
    pub host: String,
    pub port: u16,
    pub key: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InviteError {
    #[error("an invite starts with vshp://")]
    Scheme,
    #[error("the invite has no HOST:PORT")]
    Authority,
    #[error("the invite's port is not a number 1..=65535")]
    Port,
    #[error("the invite has no key=<64 hex digits> parameter")]
    Key,
}

impl Invite {
    pub fn new(addr: SocketAddr, key: [u8; 32]) -> Self {
        Self {
            host: addr.ip().to_string(),
            port: addr.port(),
            key,
        }
    }

    pub fn parse(uri: &str) -> Result<Self, InviteError> {
        let rest = uri.trim().strip_prefix(SCHEME).ok_or(InviteError::Scheme)?;
        let (authority, tail) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, p) = v6.split_once(']').ok_or(InviteError::Authority)?;
            (h, p.strip_prefix(':').ok_or(InviteError::Authority)?)
        } else {
            authority.rsplit_once(':').ok_or(InviteError::Authority)?
        };
        if host.is_empty() || host.contains(['@', ' ']) {
            return Err(InviteError::Authority);
        }
        let port: u16 = port.parse().map_err(|_| InviteError::Port)?;
        if port == 0 {
            return Err(InviteError::Port);
        }
        let query = tail
            .strip_prefix('/')
            .unwrap_or(tail)
            .strip_prefix('?')
            .ok_or(InviteError::Key)?;
        let key_text = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("key="))
            .ok_or(InviteError::Key)?;
        let mut key = [0u8; 32];
        hex::decode_to_slice(key_text, &mut key).map_err(|_| InviteError::Key)?;
        Ok(Self {
            host: host.to_owned(),
            port,
            key,
        })
    }
}

impl fmt::Display for Invite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(
                f,
                "{SCHEME}[{}]:{}/?key={}",
                self.host,
                self.port,
                hex::encode(self.key)
            )
        } else {
            write!(
                f,
                "{SCHEME}{}:{}/?key={}",
                self.host,
                self.port,
                hex::encode(self.key)
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_parse_round_trip_v4_v6_name() {
        let key = [0xab; 32];
        let a = Invite::new("192.168.1.5:7400".parse().unwrap(), key);
        let s = a.to_string();
        assert_eq!(
            s,
            format!("vshp://192.168.1.5:7400/?key={}", "ab".repeat(32))
        );
        assert_eq!(Invite::parse(&s).unwrap(), a);
        let b = Invite::new("[fd00::1]:9".parse().unwrap(), key);
        assert_eq!(
            b.to_string(),
            format!("vshp://[fd00::1]:9/?key={}", "ab".repeat(32))
        );
        assert_eq!(Invite::parse(&b.to_string()).unwrap(), b);
        let c = Invite::parse(&format!(
            "vshp://phone.local:7400?x=1&key={}",
            "AB".repeat(32)
        ))
        .unwrap();
        assert_eq!((c.host.as_str(), c.port, c.key), ("phone.local", 7400, key));
    }

    #[test]
    fn malformed_invites_are_typed_errors() {
        let k = "00".repeat(32);
        assert_eq!(
            Invite::parse("http://x:1/?key=00"),
            Err(InviteError::Scheme)
        );
        assert_eq!(
            Invite::parse(&format!("vshp://x/?key={k}")),
            Err(InviteError::Authority)
        );
        assert_eq!(
            Invite::parse(&format!("vshp://x:0/?key={k}")),
            Err(InviteError::Port)
        );
        assert_eq!(
            Invite::parse(&format!("vshp://x:70000/?key={k}")),
            Err(InviteError::Port)
        );
        assert_eq!(Invite::parse("vshp://x:1/"), Err(InviteError::Key));
        assert_eq!(Invite::parse("vshp://x:1/?key=abcd"), Err(InviteError::Key));
        assert_eq!(
            Invite::parse(&format!("vshp://[::1:1/?key={k}")),
            Err(InviteError::Authority)
        );
    }
}
