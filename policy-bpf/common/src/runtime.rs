//! Program-wide state: the configuration user space sets and the key of the
//! fragment table.

/// Fragment tracking key: a first fragment that was allowed lets the rest of
/// its datagram through.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct FragKey {
    /// Conntrack zone.
    pub zone: u32,
    /// IP identification.
    pub id: u32,
    /// Address family.
    pub family: u8,
    /// Protocol.
    pub protocol: u8,
    /// Reserved.
    pub pad: [u8; 2],
    /// Source.
    pub src: [u8; 16],
    /// Destination.
    pub dst: [u8; 16],
}

/// Tunables read by the program (array map, index 0).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Emit one allow event per this many allowed new flows (0: none).
    pub allow_sample: u32,
    /// Idle timeout of established TCP connections (seconds).
    pub tcp_established_s: u32,
    /// Idle timeout after FIN or RST (seconds).
    pub tcp_closing_s: u32,
    /// Idle timeout of UDP and other protocols (seconds).
    pub other_s: u32,
    /// Ticks per second of the conntrack clock (the kernel's jiffies, which
    /// are far cheaper to read per packet than a nanosecond clock). Not a
    /// tunable: the user-space loader measures it and fills it in.
    pub ticks_per_s: u32,
    /// Conntrack sets minus one (a power of two minus one). Filled in by the
    /// loader from the tables' size.
    pub ct_sets_mask: u32,
    /// Seed of the conntrack set hash: random per node, kept across
    /// restarts (the pinned table's entries were placed with it). Filled
    /// in by the loader.
    pub ct_seed: u32,
    /// Reserved.
    pub pad: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            allow_sample: 0,
            tcp_established_s: 7200,
            tcp_closing_s: 10,
            other_s: 60,
            ticks_per_s: 0,
            ct_sets_mask: 0,
            ct_seed: 0,
            pad: 0,
        }
    }
}
