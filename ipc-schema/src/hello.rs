//! The version handshake every channel starts with.
//!
//! Both ends send a hello frame as soon as the socket is connected, then read the
//! peer's. The hello's layout is frozen across schema versions so that two different
//! versions can still tell each other apart:
//!
//! ```text
//! frame header   u32 LE length, version byte = the sender's SCHEMA_VERSION
//! body           4 bytes magic "VSIP", u8 schema version, u8 channel kind, u8 role
//! ```
//!
//! (postcard writes a `[u8; 4]` and `u8`s as raw bytes, so the body is exactly 7 bytes.)
//! Kinds and roles travel as raw codes, not enum tags, so an unknown code from a newer
//! peer is still named in the error instead of failing to decode.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::SCHEMA_VERSION;

/// The hello body's first bytes.
pub const HELLO_MAGIC: [u8; 4] = *b"VSIP";

macro_rules! coded_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $code:literal => $text:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $v,)* }
        impl $name {
            pub const fn code(self) -> u8 { match self { $(Self::$v => $code,)* } }
            pub const fn from_code(code: u8) -> Option<Self> {
                match code { $($code => Some(Self::$v),)* _ => None }
            }
            pub const fn name(self) -> &'static str { match self { $(Self::$v => $text,)* } }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.name()) }
        }
    };
}

coded_enum! {
    /// The five boundaries.
    ChannelKind {
        BrokerWorker = 1 => "broker-worker",
        WorkerNetstack = 2 => "worker-netstack",
        BrokerNetstack = 3 => "broker-netstack",
        SessionHelper = 4 => "session-helper",
        Control = 5 => "control",
    }
}

coded_enum! {
    /// Who is at an end of a channel.
    Role {
        Broker = 1 => "broker",
        Worker = 2 => "worker",
        Netstack = 3 => "netstack",
        Session = 4 => "session",
        Helper = 5 => "helper",
        Cli = 6 => "cli",
    }
}

/// The hello body as it travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 4],
    pub schema_version: u8,
    pub kind: u8,
    pub role: u8,
}

impl Hello {
    pub fn new(kind: ChannelKind, role: Role) -> Self {
        Self {
            magic: HELLO_MAGIC,
            schema_version: SCHEMA_VERSION,
            kind: kind.code(),
            role: role.code(),
        }
    }
}

/// A hello's fields, printable whatever their codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloView {
    pub schema_version: u8,
    pub kind: u8,
    pub role: u8,
}

impl fmt::Display for HelloView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "schema v{} on channel ", self.schema_version)?;
        match ChannelKind::from_code(self.kind) {
            Some(k) => write!(f, "{k}")?,
            None => write!(f, "#{} (unknown)", self.kind)?,
        }
        f.write_str(" as ")?;
        match Role::from_code(self.role) {
            Some(r) => write!(f, "{r}"),
            None => write!(f, "#{} (unknown)", self.role),
        }
    }
}

/// Why a channel's opening failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HelloError {
    #[error(
        "IPC handshake failed: this end speaks {ours}, expecting a {expected_role}; the peer speaks {theirs}"
    )]
    Mismatch {
        ours: HelloView,
        theirs: HelloView,
        expected_role: Role,
    },
    #[error("IPC handshake failed: the peer's first frame is not a hello ({0})")]
    NotAHello(&'static str),
}

/// Checks the peer's hello against what this end expects.
pub fn check(
    theirs: &Hello,
    kind: ChannelKind,
    local: Role,
    remote: Role,
) -> Result<(), HelloError> {
    if theirs.magic != HELLO_MAGIC {
        return Err(HelloError::NotAHello("bad magic"));
    }
    if theirs.schema_version == SCHEMA_VERSION
        && theirs.kind == kind.code()
        && theirs.role == remote.code()
    {
        return Ok(());
    }
    let ours = Hello::new(kind, local);
    Err(HelloError::Mismatch {
        ours: HelloView {
            schema_version: ours.schema_version,
            kind: ours.kind,
            role: ours.role,
        },
        theirs: HelloView {
            schema_version: theirs.schema_version,
            kind: theirs.kind,
            role: theirs.role,
        },
        expected_role: remote,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_is_seven_raw_bytes() {
        let h = postcard::to_stdvec(&Hello::new(ChannelKind::Control, Role::Cli)).unwrap();
        assert_eq!(h, [b'V', b'S', b'I', b'P', SCHEMA_VERSION, 5, 6]);
    }

    #[test]
    fn codes_round_trip() {
        for code in 0..=255u8 {
            if let Some(k) = ChannelKind::from_code(code) {
                assert_eq!(k.code(), code);
            }
            if let Some(r) = Role::from_code(code) {
                assert_eq!(r.code(), code);
            }
        }
    }

    #[test]
    fn mismatch_names_both_sides() {
        let theirs = Hello {
            magic: HELLO_MAGIC,
            schema_version: 9,
            kind: 42,
            role: Role::Worker.code(),
        };
        let e = check(
            &theirs,
            ChannelKind::BrokerWorker,
            Role::Broker,
            Role::Worker,
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains(&format!(
                "schema v{SCHEMA_VERSION} on channel broker-worker as broker"
            )),
            "{text}"
        );
        assert!(
            text.contains("schema v9 on channel #42 (unknown) as worker"),
            "{text}"
        );
    }
}
