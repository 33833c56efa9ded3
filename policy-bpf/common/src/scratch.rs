//! The kernel program's per-CPU working memory: one of every key and value
//! it builds while handling a packet.

use crate::conntrack::{CtCursor, CtKey, CtKey4, CtProbe};
use crate::packet::Parsed;
use crate::runtime::FragKey;
use crate::slots::{LocalKey, SlotKey};

/// Per-CPU working memory of the kernel program (kept off its 512-byte stack).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scratch {
    /// The parsed packet.
    pub parsed: Parsed,
    /// The packet an ICMP error quotes (see [`crate::parse_quote`]).
    pub quote: Parsed,
    /// Slot lookup key.
    pub slot: SlotKey,
    /// Conntrack key (IPv6).
    pub ct: CtKey,
    /// Conntrack key (IPv4).
    pub ct4: CtKey4,
    /// Fragment key.
    pub frag: FragKey,
    /// What the conntrack lookup found.
    pub probe: CtProbe,
    /// Local delivery's endpoint lookup key.
    pub local: LocalKey,
    /// This CPU's run of IPv4 log entries.
    pub log4: CtCursor,
    /// This CPU's run of IPv6 log entries.
    pub log6: CtCursor,
}
