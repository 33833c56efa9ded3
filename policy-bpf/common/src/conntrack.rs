//! The conntrack table: keys, entries, the tag lines with their state words,
//! placement by hash, expiry and the sweep's cursor.

use crate::runtime::Config;

/// Connection key, normalised so both directions find it: `(addr_a, port_a)`
/// sorts before `(addr_b, port_b)` (addresses compared as bytes). One entry
/// per connection on the node: when both ends are local pods, the client's
/// egress and the server's ingress approval share it (see [`CtValue`]).
/// For ICMP echo both "ports" are the identifier, so the order is the
/// addresses'.
#[repr(C, align(4))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct CtKey {
    /// Address family.
    pub family: u8,
    /// IP protocol.
    pub protocol: u8,
    /// Port of side a (ICMP: identifier).
    pub port_a: u16,
    /// Port of side b.
    pub port_b: u16,
    /// Reserved.
    pub pad: u16,
    /// Address of side a.
    pub addr_a: [u8; 16],
    /// Address of side b.
    pub addr_b: [u8; 16],
}

/// [`CtKey`] of an IPv4 connection, in the IPv4 table: with 4-byte
/// addresses the key is 16 bytes, which hashes and compares in less than
/// half the time on every packet.
#[repr(C, align(4))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct CtKey4 {
    /// IP protocol.
    pub protocol: u8,
    /// Reserved.
    pub pad: u8,
    /// Port of side a (ICMP: identifier).
    pub port_a: u16,
    /// Port of side b.
    pub port_b: u16,
    /// Reserved.
    pub pad2: u16,
    /// Address of side a.
    pub addr_a: [u8; 4],
    /// Address of side b.
    pub addr_b: [u8; 4],
}

/// Side a opened the connection.
pub const CT_ORIGIN_A: u32 = 1;
/// A FIN was seen from side a.
pub const CT_FIN_A: u32 = 2;
/// A FIN was seen from side b.
pub const CT_FIN_B: u32 = 4;
/// A RST was seen.
pub const CT_RST: u32 = 8;
/// The endpoint at side a (on `ifindex_a`) approved the connection: by its
/// egress policy when side a opened it, else by its ingress policy.
pub const CT_APPROVED_A: u32 = 16;
/// The endpoint at side b approved the connection.
pub const CT_APPROVED_B: u32 = 32;

/// A tracked connection and, per side, whether the local endpoint there
/// approved it and by which rule. A packet passes on the entry only at the
/// interface of an approving side; the other side's local endpoint (if any)
/// still decides its first packet with its own policy, then records its
/// approval in the same entry (no second insert).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CtValue {
    /// Rule index that approved it at side a (with [`CT_APPROVED_A`]).
    pub rule_a: u32,
    /// Rule index that approved it at side b (with [`CT_APPROVED_B`]).
    pub rule_b: u32,
    /// Interface of side a's endpoint (with [`CT_APPROVED_A`]).
    pub ifindex_a: u32,
    /// Interface of side b's endpoint.
    pub ifindex_b: u32,
    /// `CT_*` flags.
    pub flags: u32,
    /// Reserved.
    pub pad: u32,
    /// When the first packet was seen (conntrack clock ticks: jiffies).
    pub created: u64,
    /// When the last packet was seen (ticks).
    pub last_seen: u64,
}

/// One entry of the conntrack table: an array map, not a kernel hash. A
/// connection belongs to one of the [`CT_WAYS`] consecutive ways of one
/// of its two sets (chosen by [`ct_place4`]/[`ct_place6`]). Each way has
/// a state word in a separate, eight times smaller array of [`CtTags`]
/// lines, holding a tag of the connection's hash and the index of the
/// entry holding it: a lookup reads its two sets' state words (one or two
/// cache lines, in an array small enough to stay cached when the entries
/// do not) and opens an entry only when its tag matches, and an insert
/// claims a way it read as free there, then writes an entry. No bucket
/// lock, no free list, no element to allocate.
///
/// The array holds an entry per way (its home, entry `i` for way `i`),
/// then a log of [`ct_log_entries`] more, which each CPU fills in order,
/// 64 entries at a time ([`CT_LOG_CHUNK`]): a new flow writes the next
/// entry of its CPU's run, a line the CPU's prefetcher has fetched, where
/// its home would be a random line of a large array, a memory latency on
/// every new flow. A log entry whose connection still lives is skipped
/// (the state word of the way that wrote it, its owner, still names it),
/// and that insert writes its
/// way's home instead, so a log full of long-lived connections costs what
/// the log saves and never fails an insert.
///
/// The value and the key are at the same offsets in both families.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CtEntry4 {
    /// The connection.
    pub value: CtValue,
    /// Its key.
    pub key: CtKey4,
}

/// [`CtEntry4`] of an IPv6 connection (two cache lines; the value is in
/// the first).
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CtEntry6 {
    /// The connection.
    pub value: CtValue,
    /// Its key.
    pub key: CtKey,
}

/// The state words of two sets of a conntrack table (ways `8n` to `8n+7`
/// in line `n`), one cache line.
///
/// A state word: bits 0-1 the status ([`CT_EMPTY`], [`CT_BUSY`] while its
/// inserter writes the way, [`CT_LIVE`]), bit 2 [`CT_LOCK`] (a side's
/// approval is being recorded), bits 3-15 a generation that every reuse
/// advances, so a compare-and-swap made from a stale read fails instead of
/// touching another connection's way, bits 16-31 the tag of the
/// connection in the way and bits 32-63 the index of its entry (the way's
/// home or a log entry; 64-bit words: BPF has no 32-bit atomics in Rust).
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CtTags {
    /// Way `8n + i`'s state word.
    pub state: [u64; CT_TAG_LINE as usize],
}

/// Entries per conntrack set: consecutive ways a connection may occupy.
pub const CT_WAYS: u32 = 4;
/// Ways whose state words share a [`CtTags`] line: two sets.
pub const CT_TAG_LINE: u32 = 2 * CT_WAYS;
/// Status of a free way.
pub const CT_EMPTY: u64 = 0;
/// Status of a way whose inserter is writing it (readers skip it).
pub const CT_BUSY: u64 = 1;
/// Status of a tracked connection.
pub const CT_LIVE: u64 = 2;
/// The status bits of a state word.
pub const CT_STATUS: u64 = 3;
/// A side's approval is being written (one writer at a time).
pub const CT_LOCK: u64 = 4;
/// The lowest generation bit.
pub const CT_GENERATION: u64 = 8;
/// The generation bits.
pub const CT_GENERATIONS: u64 = 0xfff8;
/// Where the tag starts in a state word.
pub const CT_TAG_SHIFT: u32 = 16;
/// The tag bits, in place.
pub const CT_TAGS: u64 = 0xffff << CT_TAG_SHIFT;
/// Where the entry index starts in a state word.
pub const CT_ENTRY_SHIFT: u32 = 32;
/// Log entries a CPU takes at a time: one 4 KiB page of IPv4 entries.
pub const CT_LOG_CHUNK: u32 = 64;

/// The state word of a way claimed for a new connection with `tag`, to be
/// written to entry `entry`: the next generation, busy.
#[inline(always)]
pub fn ct_claimed(state: u64, tag: u32, entry: u32) -> u64 {
    ((state | (CT_GENERATION - 1)).wrapping_add(1) & CT_GENERATIONS)
        | ((u64::from(tag) << CT_TAG_SHIFT) & CT_TAGS)
        | (u64::from(entry) << CT_ENTRY_SHIFT)
        | CT_BUSY
}

/// `state` with its entry index replaced by `entry`.
#[inline(always)]
pub fn ct_moved(state: u64, entry: u32) -> u64 {
    (state & 0xffff_ffff) | (u64::from(entry) << CT_ENTRY_SHIFT)
}

/// The state word of a freed way: empty in the same generation (the next
/// claim advances it), no tag, no entry.
#[inline(always)]
pub fn ct_freed(state: u64) -> u64 {
    state & CT_GENERATIONS
}

/// The tag in a state word (16 bits: see [`CtPlace::tag`]).
#[inline(always)]
pub fn ct_tag(state: u64) -> u32 {
    ((state & CT_TAGS) >> CT_TAG_SHIFT) as u32
}

/// The index of the entry a busy or live way's connection is in.
#[inline(always)]
pub fn ct_entry(state: u64) -> u32 {
    (state >> CT_ENTRY_SHIFT) as u32
}

/// Log entries of a table of `ways` ways: one per set, so a table holds
/// a quarter more entries than ways (the log holds the last half
/// capacity's worth of new connections).
#[inline(always)]
pub const fn ct_log_entries(ways: u32) -> u32 {
    ways / CT_WAYS
}

/// The owner word of a log entry written by way `way` in the generation
/// of `state` (a state word of that claim): the way plus one, and the
/// generation above it, so that clearing the owner of a connection that
/// is gone (a compare-and-swap on this value) cannot clear the owner of a
/// later connection of the same way in the same entry. 0: no owner.
#[inline(always)]
pub fn ct_owner(way: u32, state: u64) -> u64 {
    ((state & CT_GENERATIONS) << 32) | (u64::from(way) + 1)
}

/// The way of an owner word ([`ct_owner`]), if any.
#[inline(always)]
pub fn ct_owner_way(owner: u64) -> Option<u32> {
    (owner as u32).checked_sub(1)
}

/// Whether entry `entry`, of the log, holds a connection: its owner's
/// state word (`owner_state`) is busy or live and names it.
#[inline(always)]
pub fn ct_log_entry_taken(owner_state: u64, entry: u32) -> bool {
    owner_state & CT_STATUS != CT_EMPTY && ct_entry(owner_state) == entry
}

/// Where a connection may live: the first ways of its two sets and the
/// tag its state word carries there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtPlace {
    /// First way of the first set.
    pub a: u32,
    /// First way of the second set.
    pub b: u32,
    /// 16 bits of the hash, distinct from those that chose the sets
    /// (keys that share a set differ in it as they would in a whole hash;
    /// one lookup in 65536 opens an entry for nothing).
    pub tag: u32,
}

/// One round of the conntrack set hash (multiply, then fold the high bits
/// down so the next round and the final shift see all of them).
#[inline(always)]
fn ct_round(h: u64, word: u64) -> u64 {
    let h = (h ^ word).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^ (h >> 29)
}

/// The two sets an IPv4 connection may live in, and its tag. Two
/// choices, each insert taking the emptier set, keep sets from
/// overflowing until the table is nearly full (one choice of four ways
/// leaves 4% of connections untracked at half load). `seed` is random per
/// node (an attacker who cannot see it cannot aim flows at one set);
/// `sets_mask` is the number of sets minus one (a power of two).
#[inline(always)]
pub fn ct_place4(key: &CtKey4, seed: u32, sets_mask: u32) -> CtPlace {
    let ports =
        u64::from(key.protocol) | (u64::from(key.port_a) << 16) | (u64::from(key.port_b) << 32);
    let addrs = u64::from(u32::from_ne_bytes(key.addr_a))
        | (u64::from(u32::from_ne_bytes(key.addr_b)) << 32);
    ct_place(ct_round(ct_round(u64::from(seed), ports), addrs), sets_mask)
}

/// Two different sets (when there are two) and a tag from one hash. The
/// second set is one of the 15 next to the first, whose state words are
/// on the same 4 KiB page (the second choice costs a cache line, not a
/// page walk): choices that close still balance the sets as well as
/// independent ones. The tag is bits 16-31 of the hash, which the first
/// set's index (bits 32 and up) does not use.
#[inline(always)]
fn ct_place(h: u64, sets_mask: u32) -> CtPlace {
    let a = (h >> 32) as u32 & sets_mask;
    let near = 1 + (h >> 8) as u32 % 15;
    let mut b = (a ^ near) & sets_mask;
    if b == a {
        b = (a ^ 1) & sets_mask;
    }
    CtPlace {
        a: a * CT_WAYS,
        b: b * CT_WAYS,
        tag: (h >> 16) as u32 & 0xffff,
    }
}

/// The two sets of an IPv6 connection and its tag (see [`ct_place4`]).
#[inline(always)]
pub fn ct_place6(key: &CtKey, seed: u32, sets_mask: u32) -> CtPlace {
    let word = |a: &[u8; 16], i: usize| {
        u64::from(u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]))
            | (u64::from(u32::from_ne_bytes([a[i + 4], a[i + 5], a[i + 6], a[i + 7]])) << 32)
    };
    let ports = u64::from(key.protocol)
        | (u64::from(key.family) << 8)
        | (u64::from(key.port_a) << 16)
        | (u64::from(key.port_b) << 32);
    let mut h = ct_round(u64::from(seed), ports);
    h = ct_round(h, word(&key.addr_a, 0));
    h = ct_round(h, word(&key.addr_a, 8));
    h = ct_round(h, word(&key.addr_b, 0));
    h = ct_round(h, word(&key.addr_b, 8));
    ct_place(h, sets_mask)
}

/// Whether a tracked connection has been idle past its timeout at `now`
/// (shared by the kernel, which reuses such ways, and the user-space sweep).
#[inline(always)]
pub fn ct_expired(cfg: &Config, protocol: u8, flags: u32, last_seen: u64, now: u64) -> bool {
    now.saturating_sub(last_seen) > ct_timeout_ticks(cfg, protocol, flags)
}

/// Idle timeout of a tracked connection in conntrack clock ticks (see
/// [`Config::ticks_per_s`]): TCP after FIN from both sides or a RST gets the
/// closing timeout. Shared by the kernel's lazy expiry and the user-space
/// sweep so both agree on what is dead.
#[inline(always)]
pub fn ct_timeout_ticks(cfg: &Config, protocol: u8, flags: u32) -> u64 {
    let s = if protocol == 6 {
        let both_fin = flags & (CT_FIN_A | CT_FIN_B) == (CT_FIN_A | CT_FIN_B);
        if flags & CT_RST != 0 || both_fin {
            cfg.tcp_closing_s
        } else {
            cfg.tcp_established_s
        }
    } else {
        cfg.other_s
    };
    u64::from(s) * u64::from(cfg.ticks_per_s)
}

/// A CPU's run of conntrack log entries (see [`CtEntry4`]): the next one
/// to write and how many are left, taken [`CT_LOG_CHUNK`] at a time from
/// the table's shared head.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CtCursor {
    /// The next entry, counted from the start of the log.
    pub next: u32,
    /// Entries left in the run.
    pub left: u32,
}

/// The result of a conntrack lookup, kept in the per-CPU scratch: way
/// numbers read back from memory are unknown to the verifier, so the
/// outcomes of the ways do not multiply its states.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CtProbe {
    /// The connection's way + 1 (0: not found).
    pub hit: u32,
    /// A way an insert may claim (empty, or holding an expired connection)
    /// + 1 (0: both sets are full).
    pub free: u32,
    /// The connection's tag.
    pub tag: u32,
    /// Reserved.
    pub pad: u32,
    /// The hit's state word when it was read.
    pub hit_state: u64,
    /// The free way's state word when it was read.
    pub free_state: u64,
}
