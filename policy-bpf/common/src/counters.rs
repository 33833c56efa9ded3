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
    /// A [`HookDirection`] code.
    pub direction: u8,
    /// Address family.
    pub family: u8,
    /// Protocol.
    pub protocol: u8,
    /// An [`EventReason`] code.
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
