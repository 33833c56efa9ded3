//! What the programs count and report: per-rule counters, drop reasons,
//! global statistics and the events sent to user space.

/// Per-rule packet and byte counters (per CPU).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counter {
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// Why a verdict event was emitted.
pub const REASON_POLICY: u8 = 0;
/// The packet belongs to an approved connection.
pub const REASON_ESTABLISHED: u8 = 1;
/// The packet could not be parsed (truncated or malformed header).
pub const REASON_MALFORMED: u8 = 2;
/// A non-first fragment whose first fragment was not allowed.
pub const REASON_FRAGMENT: u8 = 3;
/// The endpoint sent from an address that is not its own.
pub const REASON_SPOOFED: u8 = 4;
/// The decision walk exceeded its bound or hit a missing node.
pub const REASON_WALK: u8 = 5;

/// Index of the datapath statistics (per-CPU array).
pub const STAT_NEW_FLOWS: u32 = 0;
/// Packets of approved connections.
pub const STAT_ESTABLISHED: u32 = 1;
/// Drops of malformed packets.
pub const STAT_MALFORMED: u32 = 2;
/// Drops of fragments without an allowed head.
pub const STAT_FRAGMENT: u32 = 3;
/// Drops of spoofed sources.
pub const STAT_SPOOFED: u32 = 4;
/// Drops from a failed walk.
pub const STAT_WALK: u32 = 5;
/// Packets on interfaces with no programs (passed: not a Palisade endpoint).
pub const STAT_UNMANAGED: u32 = 6;
/// Verdict events lost because the ring buffer was full.
pub const STAT_EVENTS_LOST: u32 = 7;
/// Non-IP frames (ARP, ...), passed.
pub const STAT_NON_IP: u32 = 8;
/// Allowed new connections that could not be tracked because the conntrack
/// table was full (passed as the policy said; their replies meet policy
/// again). Nonzero means the table needs sweeping more often or a larger size.
pub const STAT_CT_FULL: u32 = 9;
/// Allowed packets whose approval could not be recorded because another
/// CPU was writing the same conntrack entry at that instant (passed as the
/// policy said; the connection's next packet records it).
pub const STAT_CT_CONTENDED: u32 = 10;
/// Allowed packets from a pod handed straight to a local pod (see
/// [`LocalEndpoint`]).
pub const STAT_DELIVERED: u32 = 11;
/// New connections written to their way's home entry because the next
/// log entries still held live connections (see [`CtEntry4`]): the cost
/// of a new flow without the log. A steady share means connections
/// outliving half the table's capacity in new flows fill the log.
pub const STAT_CT_HOME: u32 = 12;
/// Number of statistics.
pub const STAT_COUNT: u32 = 13;

/// A verdict event (drops always, allows sampled).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Event {
    /// Monotonic time (ns).
    pub ts_ns: u64,
    /// Rule index (for policy verdicts).
    pub rule: u32,
    /// Interface.
    pub ifindex: u32,
    /// 1 allow, 0 deny.
    pub allow: u8,
    /// [`DIR_EGRESS`] / [`DIR_INGRESS`].
    pub direction: u8,
    /// Address family.
    pub family: u8,
    /// Protocol.
    pub protocol: u8,
    /// `REASON_*`.
    pub reason: u8,
    /// [`EVENT_LOGGED`] when a Log rule matched.
    pub flags: u8,
    /// Source port (or ICMP type << 8 | code).
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Reserved.
    pub pad2: [u8; 6],
    /// Source address.
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
}

impl Event {
    /// Size in bytes of an event record.
    pub const SIZE: usize = 64;

    /// Decodes a record from the ring buffer (little-endian, as the kernel wrote it).
    pub fn from_bytes(b: &[u8]) -> Option<Event> {
        if b.len() < Self::SIZE {
            return None;
        }
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&b[0..8]);
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src.copy_from_slice(&b[32..48]);
        dst.copy_from_slice(&b[48..64]);
        Some(Event {
            ts_ns: u64::from_le_bytes(ts),
            rule: u32_at(8),
            ifindex: u32_at(12),
            allow: b[16],
            direction: b[17],
            family: b[18],
            protocol: b[19],
            reason: b[20],
            flags: b[21],
            src_port: u16_at(22),
            dst_port: u16_at(24),
            pad2: [0; 6],
            src,
            dst,
        })
    }
}

/// Event flag: a Log rule matched before the decision.
pub const EVENT_LOGGED: u8 = 1;
