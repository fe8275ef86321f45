//! One typed message set per boundary and direction, and the channel ends that use them.
//!
//! A channel end is a type implementing [`Protocol`]: it names the channel kind, its own
//! role and the peer's, what it sends and receives, and the frame limit of each
//! direction. `Channel<broker_worker::WorkerEnd>` can only send what a worker may send
//! and only accepts what a broker may send.

pub mod broker_netstack;
pub mod broker_worker;
pub mod common;
pub mod control;
pub mod data;
pub mod session_helper;

use crate::codec::Message;
use crate::hello::{ChannelKind, Role};

/// One end of one kind of channel.
pub trait Protocol {
    const KIND: ChannelKind;
    const LOCAL: Role;
    const REMOTE: Role;
    /// Frame limit (version byte + body) of what this end sends.
    const MAX_SEND: usize;
    /// Frame limit (version byte + body) of what this end accepts.
    const MAX_RECV: usize;
    type Send: Message;
    type Recv: Message;
}

/// Declares the two ends of a channel kind.
macro_rules! channel_ends {
    (
        $kind:ident,
        $a:ident ($a_role:ident) sends $a_msg:ty, max $a_max:expr;
        $b:ident ($b_role:ident) sends $b_msg:ty, max $b_max:expr;
    ) => {
        #[doc = concat!("The ", stringify!($a_role), " end of a ", stringify!($kind), " channel.")]
        #[derive(Debug, Clone, Copy)]
        pub enum $a {}
        #[doc = concat!("The ", stringify!($b_role), " end of a ", stringify!($kind), " channel.")]
        #[derive(Debug, Clone, Copy)]
        pub enum $b {}
        impl $crate::messages::Protocol for $a {
            const KIND: $crate::hello::ChannelKind = $crate::hello::ChannelKind::$kind;
            const LOCAL: $crate::hello::Role = $crate::hello::Role::$a_role;
            const REMOTE: $crate::hello::Role = $crate::hello::Role::$b_role;
            const MAX_SEND: usize = $a_max;
            const MAX_RECV: usize = $b_max;
            type Send = $a_msg;
            type Recv = $b_msg;
        }
        impl $crate::messages::Protocol for $b {
            const KIND: $crate::hello::ChannelKind = $crate::hello::ChannelKind::$kind;
            const LOCAL: $crate::hello::Role = $crate::hello::Role::$b_role;
            const REMOTE: $crate::hello::Role = $crate::hello::Role::$a_role;
            const MAX_SEND: usize = $b_max;
            const MAX_RECV: usize = $a_max;
            type Send = $b_msg;
            type Recv = $a_msg;
        }
    };
}
pub(crate) use channel_ends;
