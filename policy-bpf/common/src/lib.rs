//! Types shared by Palisade's TC program and user space, plus the two pieces
//! of logic both sides run: the packet parser and the decision walk. The
//! kernel program and the user-space `maps` engine call the very same
//! functions, so what the maps engine answers is what the kernel does.
//!
//! ```
//! use policy_bpf_common::*;
//! // A one-node program: "protocol < 7 ? allow rule 1 : deny rule 2".
//! let nodes = [
//!     Node::less(FEATURE_PROTOCOL, 7, 1, 2),
//!     Node::leaf(true, false, 1),
//!     Node::leaf(false, false, 2),
//! ];
//! let f = Features { protocol: 6, ..Features::default() };
//! let out = walk(0, &f, |i| nodes.get(i as usize).copied(), |_| false).unwrap();
//! assert_eq!((out.allow, out.rule), (true, 1));
//! ```
#![no_std]

/// Most nodes a decision walk may visit; deeper programs are refused when lowered.
pub const MAX_WALK: u32 = 1024;

/// Node operation: a leaf (verdict).
pub const OP_LEAF: u8 = 0;
/// Node operation: `feature < value`.
pub const OP_LESS: u8 = 1;
/// Node operation: membership bit `value` set.
pub const OP_BIT: u8 = 2;

/// Feature: IP protocol.
pub const FEATURE_PROTOCOL: u8 = 0;
/// Feature: the enforcing endpoint's port.
pub const FEATURE_LOCAL_PORT: u8 = 1;
/// Feature: the peer's port.
pub const FEATURE_PEER_PORT: u8 = 2;
/// Feature: ICMP type.
pub const FEATURE_ICMP_TYPE: u8 = 3;
/// Feature: ICMP code.
pub const FEATURE_ICMP_CODE: u8 = 4;

/// Leaf flag: the verdict is allow.
pub const LEAF_ALLOW: u8 = 1;
/// Leaf flag: a Log rule matched before the decision.
pub const LEAF_LOGGED: u8 = 2;

/// Direction: traffic leaving the pod (program on the host veth's TC ingress).
pub const DIR_EGRESS: u8 = 0;
/// Direction: traffic entering the pod (program on the host veth's TC egress).
pub const DIR_INGRESS: u8 = 1;

/// Address family: IPv4.
pub const FAMILY_V4: u8 = 4;
/// Address family: IPv6.
pub const FAMILY_V6: u8 = 6;

/// One node of a lowered decision program (16 bytes). Branches are absolute
/// indexes into the global node array.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Node {
    /// [`OP_LEAF`], [`OP_LESS`] or [`OP_BIT`].
    pub op: u8,
    /// Feature compared by [`OP_LESS`].
    pub feature: u8,
    /// Leaf flags ([`LEAF_ALLOW`], [`LEAF_LOGGED`]).
    pub flags: u8,
    /// Reserved.
    pub pad: u8,
    /// Constant for [`OP_LESS`], bit for [`OP_BIT`], rule index for [`OP_LEAF`].
    pub value: u32,
    /// Next node when the test holds.
    pub then: u32,
    /// Next node when it does not.
    pub otherwise: u32,
}

impl Node {
    /// A `feature < value` test.
    pub const fn less(feature: u8, value: u32, then: u32, otherwise: u32) -> Node {
        Node {
            op: OP_LESS,
            feature,
            flags: 0,
            pad: 0,
            value,
            then,
            otherwise,
        }
    }

    /// A membership-bit test.
    pub const fn bit(bit: u32, then: u32, otherwise: u32) -> Node {
        Node {
            op: OP_BIT,
            feature: 0,
            flags: 0,
            pad: 0,
            value: bit,
            then,
            otherwise,
        }
    }

    /// A verdict.
    pub const fn leaf(allow: bool, logged: bool, rule: u32) -> Node {
        Node {
            op: OP_LEAF,
            feature: 0,
            flags: (allow as u8) | ((logged as u8) << 1),
            pad: 0,
            value: rule,
            then: 0,
            otherwise: 0,
        }
    }
}

/// Membership rows: each identity and each address class has a row of
/// `stride` 64-bit words (bit `b` in word `b / 64`), stored densely in an
/// array map of words. The stride follows the number of peer-set bits in
/// use, so one test is still one array read however many peer sets there
/// are, and memory is rows × bits in use rather than a fixed width.
///
/// A layout word says where the rows are: bits 0-31 the index of row 0's
/// first word, bits 32-63 the stride (0: no rows, every bit clear). User
/// space writes it with one atomic store, so a program sees the old rows
/// or the new ones, never a mix of one's base and the other's stride.
#[inline(always)]
pub const fn member_layout(base: u32, stride: u32) -> u64 {
    (base as u64) | ((stride as u64) << 32)
}

/// The index of row 0's first word in a layout word.
#[inline(always)]
pub const fn member_base(layout: u64) -> u32 {
    layout as u32
}

/// Words per row in a layout word.
#[inline(always)]
pub const fn member_stride(layout: u64) -> u32 {
    (layout >> 32) as u32
}

/// Where one row is under a layout: its first word and its length.
/// Resolved once per walk, so a membership test is one bounds check and
/// one array read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemberRow {
    /// Index of the row's first word.
    pub start: u32,
    /// Words in the row (0: no row, every bit clear).
    pub stride: u32,
}

impl MemberRow {
    /// Row `row` under `layout`. Wrapping arithmetic: an index past the
    /// map is refused by the map lookup, never read.
    #[inline(always)]
    pub fn of(layout: u64, row: u32) -> MemberRow {
        let stride = member_stride(layout);
        MemberRow {
            start: member_base(layout).wrapping_add(row.wrapping_mul(stride)),
            stride,
        }
    }

    /// Which word holds bit `bit`, or `None` when the bit is past the row
    /// (clear: the row was written before the bit existed).
    #[inline(always)]
    pub fn word(&self, bit: u32) -> Option<u32> {
        let w = bit / 64;
        (w < self.stride).then_some(self.start.wrapping_add(w))
    }
}

/// Whether membership bit `bit` is set in `row`: the test the walk makes,
/// with `word` reading the rows' array map (kernel) or its mirror (user
/// space).
#[inline(always)]
pub fn member_bit(row: MemberRow, bit: u32, word: impl Fn(u32) -> Option<u64>) -> bool {
    match row.word(bit) {
        Some(i) => word(i).is_some_and(|x| x & (1u64 << (bit % 64)) != 0),
        None => false,
    }
}

/// Most words a membership row may have (the kernel's walk keeps a row's
/// length in 16 bits): 4,194,240 peer sets.
pub const MAX_MEMBER_STRIDE: u32 = 0xffff;

/// Index of the identity rows' layout word in the layout map.
pub const LAYOUT_IDENTITIES: u32 = 0;
/// Index of the address-class rows' layout word in the layout map.
pub const LAYOUT_CLASSES: u32 = 1;

/// What the address LPM maps a prefix to.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerClass {
    /// Identity slot + 1 (0: the address belongs to no endpoint).
    pub identity: u32,
    /// Address-class slot (0: no CIDR memberships).
    pub class: u32,
}

/// A managed interface in the direct table (indexed by ifindex).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Interface {
    /// Zone of the endpoint behind it (keeps fragment tracking apart).
    pub zone: u32,
    /// 1 when Palisade manages the interface (0: an empty entry).
    pub managed: u32,
}

/// Where an endpoint's program is attached: interface, direction, local address.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct SlotKey {
    /// Host-side interface index.
    pub ifindex: u32,
    /// [`DIR_EGRESS`] or [`DIR_INGRESS`].
    pub direction: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Reserved.
    pub pad: [u8; 2],
    /// The endpoint's address (IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
}

/// The program of a slot and the endpoint's conntrack zone.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotValue {
    /// Root node index.
    pub root: u32,
    /// Conntrack zone of the endpoint (its connections are tracked apart).
    pub zone: u32,
}

/// Where the programs find an endpoint's IPv4 slot without a hash lookup:
/// entry `2 * ifindex + direction` of an array of words (for interfaces in
/// the direct table) holds one IPv4 address of the endpoint behind the
/// interface, in its low half as it sits in the packet, and the root of
/// that slot + 1 in its high half (0: no entry). The slots hash stays
/// complete; this is a copy of one of its IPv4 slots per interface and
/// direction, so a packet from another address (a second one, or a spoofed
/// one) is looked up there as before. One word per slot: user space writes
/// it with one atomic store into the mapped array, so a program reads the
/// old slot or the new one, never half of each.
///
/// Interfaces whose index does not fit get `u32::MAX`, past any array (a
/// wrapped index would name another interface's slot).
#[inline(always)]
pub fn local4_index(ifindex: u32, direction: u8) -> u32 {
    if ifindex >= 1 << 31 {
        return u32::MAX;
    }
    (ifindex << 1) | u32::from(direction & 1)
}

/// The [`local4_index`] word of an IPv4 slot with `root`.
#[inline(always)]
pub fn local4_word(addr: [u8; 4], root: u32) -> u64 {
    u64::from(u32::from_ne_bytes(addr)) | (u64::from(root.wrapping_add(1)) << 32)
}

/// The root in a [`local4_index`] word when it is for the address whose
/// bytes, loaded as a native word, are `addr`.
#[inline(always)]
pub fn local4_root(word: u64, addr: u32) -> Option<u32> {
    let root = (word >> 32) as u32;
    (root != 0 && word as u32 == addr).then(|| root - 1)
}

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

/// Per-CPU working memory of the kernel program (kept off its 512-byte stack).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scratch {
    /// The parsed packet.
    pub parsed: Parsed,
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

/// A local endpoint's address (key of the local delivery map). Aligned
/// so the programs write the address as words.
#[repr(C, align(4))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct LocalKey {
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Zero.
    pub pad: [u8; 3],
    /// The address (IPv4 in the first 4 bytes, the rest zero).
    pub addr: [u8; 16],
}

/// Where a pod on this node receives: packets from another local pod that
/// both pods' policies allow go straight into it (`bpf_redirect_peer`
/// from the sender's interface, as Cilium does), skipping the node's
/// forwarding and a second pass through the receive backlog. The
/// receiver's ingress policy is applied on the way, as on its own
/// interface, by the same program code.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct LocalEndpoint {
    /// Host-side interface of the pod's veth (its peer is the pod's end).
    pub ifindex: u32,
    /// MAC of the pod's end (the frame's new destination).
    pub pod_mac: [u8; 6],
    /// MAC of the host-side interface (the frame's new source).
    pub host_mac: [u8; 6],
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

/// Packet features a program reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// Protocol number.
    pub protocol: u32,
    /// The enforcing endpoint's port.
    pub local_port: u32,
    /// The peer's port.
    pub peer_port: u32,
    /// ICMP type.
    pub icmp_type: u32,
    /// ICMP code.
    pub icmp_code: u32,
}

impl Features {
    /// The value of one feature (`FEATURE_*`).
    #[inline(always)]
    pub fn get(&self, feature: u8) -> u32 {
        match feature {
            FEATURE_PROTOCOL => self.protocol,
            FEATURE_LOCAL_PORT => self.local_port,
            FEATURE_PEER_PORT => self.peer_port,
            FEATURE_ICMP_TYPE => self.icmp_type,
            _ => self.icmp_code,
        }
    }
}

/// The outcome of a walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Allow or deny.
    pub allow: bool,
    /// A Log rule matched before the decision.
    pub logged: bool,
    /// Rule index of the decision.
    pub rule: u32,
    /// Nodes visited.
    pub steps: u32,
}

/// Why a walk failed (the packet is then dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// A node index had no node.
    MissingNode(u32),
    /// More than [`MAX_WALK`] nodes.
    TooDeep,
}

/// Walks a decision program from `root`. `node` reads the node array; `bit`
/// answers membership tests for the peer.
#[inline(always)]
pub fn walk(
    root: u32,
    features: &Features,
    node: impl Fn(u32) -> Option<Node>,
    bit: impl Fn(u32) -> bool,
) -> Result<Verdict, WalkError> {
    let mut at = root;
    let mut steps = 0u32;
    while steps < MAX_WALK {
        let n = match node(at) {
            Some(n) => n,
            None => return Err(WalkError::MissingNode(at)),
        };
        match step(&n, features, &bit, steps) {
            Step::Leaf(v) => return Ok(v),
            Step::Next(next) => at = next,
        }
        steps += 1;
    }
    Err(WalkError::TooDeep)
}

/// One step of a walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The walk ended at a leaf.
    Leaf(Verdict),
    /// Continue at this node.
    Next(u32),
}

/// One node of a walk: the kernel runs this in a `bpf_loop` callback, user
/// space in [`walk`], so both follow the same edges.
#[inline(always)]
pub fn step(n: &Node, features: &Features, bit: impl Fn(u32) -> bool, steps: u32) -> Step {
    let holds = match n.op {
        OP_LEAF => {
            return Step::Leaf(Verdict {
                allow: n.flags & LEAF_ALLOW != 0,
                logged: n.flags & LEAF_LOGGED != 0,
                rule: n.value,
                steps,
            });
        }
        OP_LESS => features.get(n.feature) < n.value,
        _ => bit(n.value),
    };
    Step::Next(if holds { n.then } else { n.otherwise })
}

/// Byte access to a packet; the kernel program reads the skb, user space a
/// slice. The parser asks for values, not byte buffers: the kernel program
/// assembles them in registers straight from the packet, where a buffer
/// would cost a store and a slower, unforwardable reload per field.
pub trait PacketBytes {
    /// Fills `dst` from `offset`; false if the packet is too short.
    fn read(&self, offset: usize, dst: &mut [u8]) -> bool;

    /// The byte at `offset`.
    #[inline(always)]
    fn byte(&self, offset: usize) -> Option<u8> {
        let mut b = [0u8; 1];
        self.read(offset, &mut b).then_some(b[0])
    }

    /// The big-endian 16-bit value at `offset`.
    #[inline(always)]
    fn be16(&self, offset: usize) -> Option<u16> {
        let mut b = [0u8; 2];
        self.read(offset, &mut b).then(|| u16::from_be_bytes(b))
    }

    /// The big-endian 32-bit value at `offset`.
    #[inline(always)]
    fn be32(&self, offset: usize) -> Option<u32> {
        let mut b = [0u8; 4];
        self.read(offset, &mut b).then(|| u32::from_be_bytes(b))
    }

    /// Copies an address from `offset` into the start of `dst`: one 4-byte
    /// word (IPv4) when `words` is 1, else four (IPv6).
    #[inline(always)]
    fn addr(&self, offset: usize, dst: &mut [u8; 16], words: usize) -> bool {
        let n = if words == 1 { 4 } else { 16 };
        self.read(offset, &mut dst[..n])
    }
}

impl PacketBytes for &[u8] {
    fn read(&self, offset: usize, dst: &mut [u8]) -> bool {
        let Some(end) = offset.checked_add(dst.len()) else {
            return false;
        };
        match self.get(offset..end) {
            Some(s) => {
                dst.copy_from_slice(s);
                true
            }
            None => false,
        }
    }
}

/// What the parser found in a packet. Eight-byte aligned so clearing it is
/// six word stores in the kernel program rather than a byte-loop memset.
#[repr(C, align(8))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Parsed {
    /// Source address (IPv4 in the first 4 bytes).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Datagram identification (fragments).
    pub frag_id: u32,
    /// Source port (0 without ports; ICMP echo: identifier).
    pub src_port: u16,
    /// Destination port (0 without ports; ICMP echo: identifier).
    pub dst_port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// IP protocol (IPv6: after extension headers).
    pub protocol: u8,
    /// ICMP type.
    pub icmp_type: u8,
    /// ICMP code.
    pub icmp_code: u8,
    /// TCP flags byte.
    pub tcp_flags: u8,
    /// Part of a fragmented datagram.
    pub fragment: bool,
    /// A fragment other than the first (no transport header).
    pub later_fragment: bool,
    /// Reserved.
    pub pad: u8,
}

/// Why a packet could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Not IPv4 or IPv6 (ARP, ...): not subject to IP policy.
    NotIp,
    /// A header is cut short or inconsistent.
    Malformed,
}

/// TCP FIN.
pub const TCP_FIN: u8 = 0x01;
/// TCP SYN.
pub const TCP_SYN: u8 = 0x02;
/// TCP RST.
pub const TCP_RST: u8 = 0x04;
/// TCP ACK.
pub const TCP_ACK: u8 = 0x10;

fn has_ports(protocol: u8) -> bool {
    matches!(protocol, 6 | 17 | 132 | 136)
}

/// Parses Ethernet, IPv4/IPv6 (with extension headers and fragments) and the
/// transport header into `out`, which must start all zero (fields the packet
/// does not carry stay zero; the kernel program clears it with word stores,
/// cheaper than the byte loop a field-by-field clear compiles to). Every
/// read is bounds-checked; anything short or inconsistent is
/// [`ParseError::Malformed`]. Reads are small so the kernel program's stack
/// stays within the BPF limit.
#[inline(always)]
pub fn parse_into<P: PacketBytes>(p: &P, out: &mut Parsed) -> Result<(), ParseError> {
    use ParseError::Malformed;
    let ethertype = p.be16(12).ok_or(Malformed)?;
    let mut l4: usize;
    match ethertype {
        0x0800 => {
            // version/IHL, TOS, total length, id, flags/fragment offset.
            let version_ihl = p.byte(14).ok_or(Malformed)?;
            // The fixed header must be there (the first 8 bytes, then the rest).
            let total = p.be16(16).ok_or(Malformed)? as usize;
            let id = p.be16(18).ok_or(Malformed)?;
            let frag = p.be16(20).ok_or(Malformed)?;
            if version_ihl >> 4 != 4 {
                return Err(Malformed);
            }
            let ihl = (version_ihl & 0x0f) as usize * 4;
            if ihl < 20 || total < ihl {
                return Err(Malformed);
            }
            out.frag_id = u32::from(id);
            let more = frag & 0x2000 != 0;
            let offset = frag & 0x1fff;
            out.fragment = more || offset != 0;
            out.later_fragment = offset != 0;
            let proto = p.byte(14 + 9).ok_or(Malformed)?;
            if !p.addr(14 + 12, &mut out.src, 1) || !p.addr(14 + 16, &mut out.dst, 1) {
                return Err(Malformed);
            }
            out.family = FAMILY_V4;
            out.protocol = proto;
            // The whole header must be there.
            p.byte(14 + ihl - 1).ok_or(Malformed)?;
            l4 = 14 + ihl;
        }
        0x86DD => {
            let version = p.byte(14).ok_or(Malformed)?;
            let mut next = p.byte(20).ok_or(Malformed)?;
            // The first 8 bytes of the fixed header must be there.
            p.byte(21).ok_or(Malformed)?;
            if version >> 4 != 6 {
                return Err(Malformed);
            }
            if !p.addr(22, &mut out.src, 4) || !p.addr(38, &mut out.dst, 4) {
                return Err(Malformed);
            }
            out.family = FAMILY_V6;
            l4 = 54;
            // Skip up to four extension headers; a fragment header is recorded.
            let mut i = 0;
            while i < 4 {
                match next {
                    0 | 43 | 60 => {
                        let h = p.be16(l4).ok_or(Malformed)?;
                        next = (h >> 8) as u8;
                        l4 += ((h & 0xff) as usize + 1) * 8;
                    }
                    51 => {
                        let h = p.be16(l4).ok_or(Malformed)?;
                        next = (h >> 8) as u8;
                        l4 += ((h & 0xff) as usize + 2) * 4;
                    }
                    44 => {
                        next = p.byte(l4).ok_or(Malformed)?;
                        let off = p.be16(l4 + 2).ok_or(Malformed)?;
                        out.frag_id = p.be32(l4 + 4).ok_or(Malformed)?;
                        out.fragment = true;
                        out.later_fragment = off >> 3 != 0;
                        l4 += 8;
                    }
                    _ => break,
                }
                i += 1;
            }
            if matches!(next, 0 | 43 | 60 | 51 | 44) {
                // Too many extension headers to look past.
                return Err(Malformed);
            }
            out.protocol = next;
        }
        _ => return Err(ParseError::NotIp),
    }
    if out.later_fragment {
        return Ok(());
    }
    let proto = out.protocol;
    if has_ports(proto) {
        // TCP 20, UDP/UDP-Lite 8, SCTP 12 bytes of header at least.
        let min = match proto {
            6 => 20,
            132 => 12,
            _ => 8,
        };
        let src_port = p.be16(l4).ok_or(Malformed)?;
        let dst_port = p.be16(l4 + 2).ok_or(Malformed)?;
        p.byte(l4 + 7).ok_or(Malformed)?;
        p.byte(l4 + min - 1).ok_or(Malformed)?;
        out.src_port = src_port;
        out.dst_port = dst_port;
        if proto == 6 {
            let h = p.be16(l4 + 12).ok_or(Malformed)?;
            if (h >> 12) < 5 {
                return Err(Malformed);
            }
            out.tcp_flags = h as u8;
        }
    } else if proto == 1 || proto == 58 {
        let h = p.be16(l4).ok_or(Malformed)?;
        let id = p.be16(l4 + 4).ok_or(Malformed)?;
        p.byte(l4 + 7).ok_or(Malformed)?;
        let (icmp_type, icmp_code) = ((h >> 8) as u8, h as u8);
        out.icmp_type = icmp_type;
        out.icmp_code = icmp_code;
        // Echo request/reply: the identifier plays the port's part for conntrack.
        let echo = if proto == 1 {
            icmp_type == 8 || icmp_type == 0
        } else {
            icmp_type == 128 || icmp_type == 129
        };
        if echo {
            out.src_port = id;
            out.dst_port = id;
        }
    }
    Ok(())
}

/// [`parse_into`] returning the result by value (user space).
pub fn parse<P: PacketBytes>(p: &P) -> Result<Parsed, ParseError> {
    let mut out = Parsed::default();
    parse_into(p, &mut out).map(|()| out)
}

/// ICMPv6 link-local control (MLD 130-132 and 143, NDP 133-137), which the
/// programs pass without policy as Calico does: without it IPv6 breaks on
/// the link.
#[inline(always)]
pub fn is_link_control(p: &Parsed) -> bool {
    p.protocol == 58
        && !p.later_fragment
        && ((130..=137).contains(&p.icmp_type) || p.icmp_type == 143)
}

/// Whether an ICMP type is an echo reply (allowed as the reply of a tracked echo).
pub fn is_echo_reply(protocol: u8, icmp_type: u8) -> bool {
    (protocol == 1 && icmp_type == 0) || (protocol == 58 && icmp_type == 129)
}

/// Policy features of a parsed packet for one direction.
#[inline(always)]
pub fn features(p: &Parsed, direction: u8) -> Features {
    let ports = has_ports(p.protocol);
    let (local, peer) = if direction == DIR_EGRESS {
        (p.src_port, p.dst_port)
    } else {
        (p.dst_port, p.src_port)
    };
    let icmp = p.protocol == 1 || p.protocol == 58;
    Features {
        protocol: u32::from(p.protocol),
        local_port: if ports { u32::from(local) } else { 0 },
        peer_port: if ports { u32::from(peer) } else { 0 },
        icmp_type: if icmp { u32::from(p.icmp_type) } else { 0 },
        icmp_code: if icmp { u32::from(p.icmp_code) } else { 0 },
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: each type is #[repr(C)], made only of integers and integer
    // arrays, with explicit padding fields, so every bit pattern is valid
    // and the kernel and user space agree on the layout.
    unsafe impl aya::Pod for Node {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PeerClass {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SlotKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SlotValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtKey4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtValue {}
    // SAFETY: repr(C) plain integers; the padding after the key (align
    // 64) is the only padding, which user space never reads as data.
    unsafe impl aya::Pod for CtEntry4 {}
    // SAFETY: as for CtEntry4.
    unsafe impl aya::Pod for CtEntry6 {}
    // SAFETY: repr(C) array of u64, no padding.
    unsafe impl aya::Pod for CtTags {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FragKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Counter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Interface {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LocalKey {}
    // SAFETY: as above (u32 then two 6-byte arrays: 16 bytes, no padding).
    unsafe impl aya::Pod for LocalEndpoint {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local4_words_name_their_address_and_root() {
        let addr = [10, 0, 0, 7];
        let word = local4_word(addr, 41);
        assert_eq!(local4_root(word, u32::from_ne_bytes(addr)), Some(41));
        assert_eq!(
            local4_root(local4_word(addr, 0), u32::from_ne_bytes(addr)),
            Some(0)
        );
        assert_eq!(local4_root(word, u32::from_ne_bytes([10, 0, 0, 8])), None);
        // An empty word is for no address, 0.0.0.0 included.
        assert_eq!(local4_root(0, 0), None);
        assert_eq!(local4_index(3, DIR_EGRESS), 6);
        assert_eq!(local4_index(3, DIR_INGRESS), 7);
        assert_eq!(local4_index((1 << 31) + 3, DIR_EGRESS), u32::MAX);
    }

    #[test]
    fn layouts_are_fixed() {
        assert_eq!(core::mem::size_of::<Node>(), 16);
        assert_eq!(core::mem::size_of::<SlotKey>(), 24);
        assert_eq!(core::mem::size_of::<CtKey>(), 40);
        assert_eq!(core::mem::size_of::<CtValue>(), 40);
        assert_eq!(core::mem::size_of::<CtKey4>(), 16);
        assert_eq!(core::mem::size_of::<Event>(), 64);
        assert_eq!(core::mem::size_of::<LocalKey>(), 20);
        assert_eq!(core::mem::size_of::<LocalEndpoint>(), 16);
        // One cache line per IPv4 way, two per IPv6 way; the kernel reads
        // the value and the key at the same offsets in both.
        assert_eq!(core::mem::size_of::<CtEntry4>(), 64);
        assert_eq!(core::mem::size_of::<CtEntry6>(), 128);
        assert_eq!(core::mem::offset_of!(CtEntry4, value), 0);
        assert_eq!(core::mem::offset_of!(CtEntry6, value), 0);
        assert_eq!(core::mem::offset_of!(CtEntry4, key), 40);
        assert_eq!(core::mem::offset_of!(CtEntry6, key), 40);
        assert_eq!(core::mem::size_of::<CtTags>(), 64);
    }

    #[test]
    fn a_claimed_way_is_busy_in_the_next_generation_with_its_tag_and_entry() {
        let tag = 0xbeef;
        let tagged = u64::from(tag) << CT_TAG_SHIFT;
        let at = |entry: u64| entry << CT_ENTRY_SHIFT;
        assert_eq!(
            ct_claimed(CT_EMPTY, tag, 7),
            at(7) | tagged | CT_GENERATION | CT_BUSY
        );
        let live = at(3) | (0x1234 << CT_TAG_SHIFT) | (5 * CT_GENERATION) | CT_LIVE;
        let claimed = ct_claimed(live, tag, 9);
        assert_eq!(claimed, at(9) | tagged | (6 * CT_GENERATION) | CT_BUSY);
        assert_eq!(ct_claimed(live | CT_LOCK, tag, 9), claimed);
        assert_eq!((ct_tag(claimed), ct_entry(claimed)), (tag, 9));
        // The generation wraps instead of overflowing into the tag, and a
        // tag wider than 16 bits does not reach the entry index.
        assert_eq!(
            ct_claimed(u64::MAX, 0x1_0001, u32::MAX),
            at(u64::from(u32::MAX)) | (1 << CT_TAG_SHIFT) | CT_BUSY
        );
        assert_eq!(
            ct_moved(claimed, 4),
            at(4) | tagged | (6 * CT_GENERATION) | CT_BUSY
        );
        // A freed way keeps its generation and loses its tag, entry and lock.
        assert_eq!(ct_freed(live | CT_LOCK), 5 * CT_GENERATION);
    }

    #[test]
    fn a_log_entry_is_taken_while_its_owner_names_it() {
        let live = ct_claimed(CT_EMPTY, 1, 40) - CT_BUSY + CT_LIVE;
        assert!(ct_log_entry_taken(live, 40));
        assert!(ct_log_entry_taken(ct_claimed(CT_EMPTY, 1, 40), 40));
        // The owner moved on to another entry, or was freed.
        assert!(!ct_log_entry_taken(live, 41));
        assert!(!ct_log_entry_taken(ct_freed(live), 40));
        assert_eq!(ct_log_entries(1 << 20), 1 << 18);
        // An owner names its way, and differs from the same way's owner
        // in the next generation.
        assert_eq!(ct_owner_way(ct_owner(41, live)), Some(41));
        assert_eq!(ct_owner_way(0), None);
        assert_ne!(ct_owner(41, live), ct_owner(41, ct_claimed(live, 1, 40)));
    }

    /// Flows that differ only in their source port (a UDP scan, a busy
    /// client) spread over the sets, and with two choices per connection
    /// a table takes nearly as many connections as it has ways.
    #[test]
    fn conntrack_sets_spread_sequential_ports() {
        const SETS: u32 = 4096;
        let key = |port: u16, b: u8| CtKey4 {
            protocol: 17,
            port_a: port,
            port_b: 53,
            addr_a: [10, 0, 0, 1],
            addr_b: [10, 0, 1, b],
            ..CtKey4::default()
        };
        // Inserts as the program makes them: the first free way of the
        // set with fewer ways taken, the first set on a tie.
        let mut taken = [0u32; SETS as usize];
        let mut untracked = 0;
        let flows = SETS * CT_WAYS / 2;
        for i in 0..flows {
            let CtPlace { a, b, .. } = ct_place4(&key(i as u16, (i >> 16) as u8), 7, SETS - 1);
            assert_eq!((a % CT_WAYS, b % CT_WAYS), (0, 0));
            assert_ne!(a, b);
            // Both sets' state words are on one 4 KiB page (64 lines).
            assert_eq!(a / CT_TAG_LINE / 64, b / CT_TAG_LINE / 64);
            let (a, b) = ((a / CT_WAYS) as usize, (b / CT_WAYS) as usize);
            let set = if taken[b] < taken[a] { b } else { a };
            if taken[set] == CT_WAYS {
                untracked += 1;
            } else {
                taken[set] += 1;
            }
        }
        // At half load (a table sized for its capacity, see the loader) a
        // single choice of four ways leaves about 3.5% of connections
        // untracked; two choices none (random placement: about 1 in 10^5).
        assert!(untracked <= 2, "{untracked} of {flows} untracked");
        let moved = (0..1000u16)
            .filter(|&p| {
                ct_place4(&key(p, 0), 7, SETS - 1).a != ct_place4(&key(p, 0), 8, SETS - 1).a
            })
            .count();
        assert!(moved > 990, "the seed moved only {moved} of 1000 flows");
        let one = ct_place4(&key(1, 0), 7, 0);
        assert_eq!((one.a, one.b), (0, 0), "one set: both choices are it");
        let k6 = CtKey {
            family: FAMILY_V6,
            protocol: 6,
            port_a: 1000,
            port_b: 80,
            addr_a: [0xfd; 16],
            addr_b: [0xfe; 16],
            ..CtKey::default()
        };
        let mut other = k6;
        other.addr_b[15] ^= 1;
        assert_ne!(ct_place6(&k6, 7, SETS - 1), ct_place6(&other, 7, SETS - 1));
    }

    #[test]
    fn member_bits_are_found_by_row_and_stride() {
        // Three rows of two words from word 10; row 1 has bits 3 and 64+5.
        let layout = member_layout(10, 2);
        let mut words = [0u64; 16];
        words[12] = 1 << 3;
        words[13] = 1 << 5;
        let read = |i: u32| words.get(i as usize).copied();
        let row = |r: u32| MemberRow::of(layout, r);
        assert_eq!(row(1).word(69), Some(13));
        assert!(member_bit(row(1), 3, read));
        assert!(member_bit(row(1), 69, read));
        assert!(!member_bit(row(0), 3, read));
        assert!(!member_bit(row(2), 69, read));
        // Past the stride: clear, without reading the next row's word.
        assert_eq!(row(0).word(128), None);
        assert!(!member_bit(row(0), 128 + 3, read));
        // No layout yet (or no identity): every bit is clear.
        assert_eq!(MemberRow::of(0, 5).word(0), None);
        assert_eq!(MemberRow::default().word(0), None);
        // Past the map: the read refuses it.
        assert!(!member_bit(
            MemberRow::of(member_layout(u32::MAX, 4), 7),
            3,
            read
        ));
        assert_eq!((member_base(layout), member_stride(layout)), (10, 2));
    }

    #[test]
    fn event_layout_matches_decoder() {
        assert_eq!(core::mem::offset_of!(Event, rule), 8);
        assert_eq!(core::mem::offset_of!(Event, reason), 20);
        assert_eq!(core::mem::offset_of!(Event, src_port), 22);
        assert_eq!(core::mem::offset_of!(Event, dst_port), 24);
        assert_eq!(core::mem::offset_of!(Event, src), 32);
        assert_eq!(core::mem::offset_of!(Event, dst), 48);
    }

    #[test]
    fn truncated_headers_are_malformed() {
        let mut pkt = [0u8; 54];
        pkt[12] = 0x08;
        pkt[13] = 0x00;
        pkt[14] = 0x45;
        pkt[16] = 0;
        pkt[17] = 40;
        pkt[23] = 6;
        // TCP header needs 20 bytes; only 20 bytes of IP + 20 of TCP exist: fine.
        pkt[14 + 20 + 12] = 0x50;
        assert!(parse(&&pkt[..]).is_ok());
        assert_eq!(parse(&&pkt[..40]), Err(ParseError::Malformed));
        // Bad IHL.
        let mut bad = pkt;
        bad[14] = 0x44;
        assert_eq!(parse(&&bad[..]), Err(ParseError::Malformed));
        // ARP is not IP.
        let mut arp = pkt;
        arp[12] = 0x08;
        arp[13] = 0x06;
        assert_eq!(parse(&&arp[..]), Err(ParseError::NotIp));
    }

    #[test]
    fn later_fragments_have_no_ports() {
        let mut pkt = [0u8; 34];
        pkt[12] = 0x08;
        pkt[14] = 0x45;
        pkt[17] = 20;
        pkt[20] = 0x00;
        pkt[21] = 0x10; // offset 16
        pkt[23] = 17;
        let p = parse(&&pkt[..]).unwrap();
        assert!(p.fragment && p.later_fragment);
        assert_eq!(p.src_port, 0);
    }
}
