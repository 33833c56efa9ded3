//! Types shared by Palisade's TC program and user space, plus the two pieces
//! of logic both sides run: the packet parser and the decision walk. The
//! kernel program and the user-space `maps` engine call the very same
//! functions, so what the maps engine answers is what the kernel does.
//!
//! ```
//! use policy_bpf_common::*;
//! // A one-node program: "protocol < 7 ? allow rule 1 : deny rule 2".
//! let nodes = [
//!     LoweredNode::less(NodeFeature::Protocol, 7, 1, 2),
//!     LoweredNode::leaf(true, false, 1),
//!     LoweredNode::leaf(false, false, 2),
//! ];
//! let f = PacketFeatures { protocol: 6, ..PacketFeatures::default() };
//! let out = walk(0, &f, |i| nodes.get(i as usize).copied(), |_| false).unwrap();
//! assert_eq!((out.allow, out.rule), (true, 1));
//! ```
#![no_std]

mod codes;
mod conntrack;
mod counters;
pub mod map_names;
mod membership;
mod packet;
mod program;
mod runtime;
mod scratch;
mod service;
mod slots;

pub use codes::*;
pub use conntrack::*;
pub use counters::*;
pub use membership::*;
pub use packet::*;
pub use program::*;
pub use runtime::*;
pub use scratch::*;
pub use service::*;
pub use slots::*;

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: each type is #[repr(C)], made only of integers and integer
    // arrays, with explicit padding fields, so every bit pattern is valid
    // and the kernel and user space agree on the layout.
    unsafe impl aya::Pod for LoweredNode {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PeerClass {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FrontendKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FrontendValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BackendValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceConfig {}
    // SAFETY: as above (eight u32, u8, 3 padding bytes: 36).
    unsafe impl aya::Pod for ServiceRange {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SvcAddrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SvcRangeKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NatTuple {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NatValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AffinityKey {}
    // SAFETY: as above (u64, two u32, then a 20-byte BackendValue: 36
    // bytes padded to 40 at the end, never read as data).
    unsafe impl aya::Pod for AffinityValue {}
    // SAFETY: as above (u64, 16 bytes, u16, u8, 5 padding bytes: 32).
    unsafe impl aya::Pod for SockReverseKey {}
    // SAFETY: as above (16 bytes, u16, 2 padding bytes, u32: 24).
    unsafe impl aya::Pod for SockReverseValue {}
    // SAFETY: as above (16 bytes, u16, two u8, u32: 24, no padding).
    unsafe impl aya::Pod for SockFlowValue {}
    // SAFETY: as above (16 bytes, u16, u8, a padding byte, 24 bytes: 44).
    unsafe impl aya::Pod for SockPeer {}
    // SAFETY: as above (two u8, 2 padding bytes, 32 bytes: 36).
    unsafe impl aya::Pod for SockNetns {}
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
        assert_eq!(local4_index(3, HookDirection::Egress.code()), 6);
        assert_eq!(local4_index(3, HookDirection::Ingress.code()), 7);
        assert_eq!(
            local4_index((1 << 31) + 3, HookDirection::Egress.code()),
            u32::MAX
        );
    }

    #[test]
    fn layouts_are_fixed() {
        assert_eq!(core::mem::size_of::<LoweredNode>(), 16);
        assert_eq!(core::mem::size_of::<SlotKey>(), 24);
        assert_eq!(core::mem::size_of::<CtKey>(), 40);
        assert_eq!(core::mem::size_of::<CtValue>(), 40);
        assert_eq!(core::mem::size_of::<CtKey4>(), 16);
        assert_eq!(core::mem::size_of::<Event>(), 64);
        assert_eq!(core::mem::size_of::<LocalKey>(), 20);
        assert_eq!(core::mem::size_of::<LocalEndpoint>(), 16);
        assert_eq!(core::mem::size_of::<SockReverseKey>(), 32);
        assert_eq!(core::mem::size_of::<SockReverseValue>(), 24);
        assert_eq!(core::mem::size_of::<SockNetns>(), 36);
        assert_eq!(core::mem::size_of::<SockPeer>(), 44);
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
            family: AddressFamily::V6.code(),
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
