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

/// Membership bits per identity or address class (64-bit words).
pub const BITSET_WORDS: usize = 32;
/// Membership bits per identity or address class.
pub const MAX_BITS: u32 = (BITSET_WORDS * 64) as u32;
/// Most nodes a decision walk may visit; deeper programs are refused when lowered.
pub const MAX_WALK: u32 = 64;

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

/// Membership bits of an identity or an address class.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bitset {
    /// Word `i` holds bits `64*i ..`.
    pub words: [u64; BITSET_WORDS],
}

impl Default for Bitset {
    fn default() -> Self {
        Bitset {
            words: [0; BITSET_WORDS],
        }
    }
}

impl Bitset {
    /// Whether `bit` is set (false beyond capacity).
    #[inline(always)]
    pub fn get(&self, bit: u32) -> bool {
        let w = (bit / 64) as usize;
        if w >= BITSET_WORDS {
            return false;
        }
        self.words[w] & (1u64 << (bit % 64)) != 0
    }
}

/// What the address LPM maps a prefix to.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerClass {
    /// Identity slot + 1 (0: the address belongs to no endpoint).
    pub identity: u32,
    /// Address-class slot (0: no CIDR memberships).
    pub class: u32,
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

/// Connection key, normalised so both directions find it: `(addr_a, port_a)`
/// sorts before `(addr_b, port_b)`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct CtKey {
    /// Conntrack zone (the enforcing endpoint).
    pub zone: u32,
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

/// Side a opened the connection.
pub const CT_ORIGIN_A: u32 = 1;
/// A FIN was seen from side a.
pub const CT_FIN_A: u32 = 2;
/// A FIN was seen from side b.
pub const CT_FIN_B: u32 = 4;
/// A RST was seen.
pub const CT_RST: u32 = 8;
/// The connection was approved leaving the pod (egress) rather than entering.
pub const CT_EGRESS: u32 = 16;

/// A tracked connection: the verdict that approved it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CtValue {
    /// Rule index that allowed the first packet.
    pub rule: u32,
    /// `CT_*` flags.
    pub flags: u32,
    /// When the first packet was seen (ns, monotonic).
    pub created_ns: u64,
    /// When the last packet was seen.
    pub last_ns: u64,
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
/// Number of statistics.
pub const STAT_COUNT: u32 = 9;

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
    /// Reserved.
    pub pad: [u8; 1],
    /// Source port (or ICMP type << 8 | code).
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Reserved.
    pub pad2: u16,
    /// Source address.
    pub src: [u8; 16],
    /// Destination address.
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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            allow_sample: 0,
            tcp_established_s: 7200,
            tcp_closing_s: 10,
            other_s: 60,
        }
    }
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
    #[inline(always)]
    fn get(&self, feature: u8) -> u32 {
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
        let holds = match n.op {
            OP_LEAF => {
                return Ok(Verdict {
                    allow: n.flags & LEAF_ALLOW != 0,
                    logged: n.flags & LEAF_LOGGED != 0,
                    rule: n.value,
                    steps,
                });
            }
            OP_LESS => features.get(n.feature) < n.value,
            _ => bit(n.value),
        };
        at = if holds { n.then } else { n.otherwise };
        steps += 1;
    }
    Err(WalkError::TooDeep)
}

/// Byte access to a packet; the kernel program reads the skb, user space a slice.
pub trait PacketBytes {
    /// `N` bytes at `offset`, if the packet has them.
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
}

impl PacketBytes for &[u8] {
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let end = offset.checked_add(N)?;
        let s = self.get(offset..end)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Some(out)
    }
}

/// What the parser found in a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Parsed {
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// IP protocol (IPv6: after extension headers).
    pub protocol: u8,
    /// Source address (IPv4 in the first 4 bytes).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Source port (0 without ports; ICMP echo: identifier).
    pub src_port: u16,
    /// Destination port (0 without ports; ICMP echo: identifier).
    pub dst_port: u16,
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
    /// Datagram identification (fragments).
    pub frag_id: u32,
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
/// transport header. Every read is bounds-checked; anything short or
/// inconsistent is [`ParseError::Malformed`].
#[inline(always)]
pub fn parse<P: PacketBytes>(p: &P) -> Result<Parsed, ParseError> {
    let eth: [u8; 14] = p.bytes(0).ok_or(ParseError::Malformed)?;
    let ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    let mut out = Parsed::default();
    let mut l4: usize;
    match ethertype {
        0x0800 => {
            let ip: [u8; 20] = p.bytes(14).ok_or(ParseError::Malformed)?;
            if ip[0] >> 4 != 4 {
                return Err(ParseError::Malformed);
            }
            let ihl = (ip[0] & 0x0f) as usize * 4;
            let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            if ihl < 20 || total < ihl {
                return Err(ParseError::Malformed);
            }
            out.family = FAMILY_V4;
            out.protocol = ip[9];
            out.src[..4].copy_from_slice(&ip[12..16]);
            out.dst[..4].copy_from_slice(&ip[16..20]);
            let frag = u16::from_be_bytes([ip[6], ip[7]]);
            let more = frag & 0x2000 != 0;
            let offset = frag & 0x1fff;
            out.fragment = more || offset != 0;
            out.later_fragment = offset != 0;
            out.frag_id = u32::from(u16::from_be_bytes([ip[4], ip[5]]));
            l4 = 14 + ihl;
        }
        0x86DD => {
            let ip: [u8; 40] = p.bytes(14).ok_or(ParseError::Malformed)?;
            if ip[0] >> 4 != 6 {
                return Err(ParseError::Malformed);
            }
            out.family = FAMILY_V6;
            out.src.copy_from_slice(&ip[8..24]);
            out.dst.copy_from_slice(&ip[24..40]);
            let mut next = ip[6];
            l4 = 54;
            // Skip up to four extension headers; a fragment header is recorded.
            let mut i = 0;
            while i < 4 {
                match next {
                    0 | 43 | 60 => {
                        let h: [u8; 2] = p.bytes(l4).ok_or(ParseError::Malformed)?;
                        next = h[0];
                        l4 += (h[1] as usize + 1) * 8;
                    }
                    51 => {
                        let h: [u8; 2] = p.bytes(l4).ok_or(ParseError::Malformed)?;
                        next = h[0];
                        l4 += (h[1] as usize + 2) * 4;
                    }
                    44 => {
                        let h: [u8; 8] = p.bytes(l4).ok_or(ParseError::Malformed)?;
                        next = h[0];
                        let off = u16::from_be_bytes([h[2], h[3]]);
                        out.fragment = true;
                        out.later_fragment = off >> 3 != 0;
                        out.frag_id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                        l4 += 8;
                    }
                    _ => break,
                }
                i += 1;
            }
            if matches!(next, 0 | 43 | 60 | 51 | 44) {
                // Too many extension headers to look past.
                return Err(ParseError::Malformed);
            }
            out.protocol = next;
        }
        _ => return Err(ParseError::NotIp),
    }
    if out.later_fragment {
        return Ok(out);
    }
    let proto = out.protocol;
    if has_ports(proto) {
        let h: [u8; 4] = p.bytes(l4).ok_or(ParseError::Malformed)?;
        out.src_port = u16::from_be_bytes([h[0], h[1]]);
        out.dst_port = u16::from_be_bytes([h[2], h[3]]);
        if proto == 6 {
            let t: [u8; 14] = p.bytes(l4).ok_or(ParseError::Malformed)?;
            if (t[12] >> 4) < 5 {
                return Err(ParseError::Malformed);
            }
            out.tcp_flags = t[13];
        } else if proto == 17 || proto == 136 {
            let _: [u8; 8] = p.bytes(l4).ok_or(ParseError::Malformed)?;
        } else {
            // SCTP common header: ports, verification tag, checksum.
            let _: [u8; 12] = p.bytes(l4).ok_or(ParseError::Malformed)?;
        }
    } else if proto == 1 || proto == 58 {
        let h: [u8; 8] = p.bytes(l4).ok_or(ParseError::Malformed)?;
        out.icmp_type = h[0];
        out.icmp_code = h[1];
        // Echo request/reply: the identifier plays the port's part for conntrack.
        let echo = if proto == 1 {
            h[0] == 8 || h[0] == 0
        } else {
            h[0] == 128 || h[0] == 129
        };
        if echo {
            let id = u16::from_be_bytes([h[4], h[5]]);
            out.src_port = id;
            out.dst_port = id;
        }
    }
    Ok(out)
}

/// Whether an ICMP type is an echo reply (allowed as the reply of a tracked echo).
pub fn is_echo_reply(protocol: u8, icmp_type: u8) -> bool {
    (protocol == 1 && icmp_type == 0) || (protocol == 58 && icmp_type == 129)
}

/// Builds the normalised conntrack key of a packet.
#[inline(always)]
pub fn ct_key(zone: u32, p: &Parsed) -> (CtKey, bool) {
    // For echo the request and reply carry the same identifier in both
    // "ports"; normalisation then orders by address alone.
    let a_is_src = (p.src, p.src_port) <= (p.dst, p.dst_port);
    let (addr_a, port_a, addr_b, port_b) = if a_is_src {
        (p.src, p.src_port, p.dst, p.dst_port)
    } else {
        (p.dst, p.dst_port, p.src, p.src_port)
    };
    (
        CtKey {
            zone,
            family: p.family,
            protocol: p.protocol,
            port_a,
            port_b,
            pad: 0,
            addr_a,
            addr_b,
        },
        a_is_src,
    )
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
    unsafe impl aya::Pod for Bitset {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PeerClass {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SlotKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SlotValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FragKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Counter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Config {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_fixed() {
        assert_eq!(core::mem::size_of::<Node>(), 16);
        assert_eq!(core::mem::size_of::<SlotKey>(), 24);
        assert_eq!(core::mem::size_of::<CtKey>(), 44);
        assert_eq!(core::mem::size_of::<Event>(), 64);
        assert_eq!(core::mem::size_of::<Bitset>(), BITSET_WORDS * 8);
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
