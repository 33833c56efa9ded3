//! Interfaces and slots: the program root for each (interface, direction,
//! address), the per-interface IPv4 fast path, and local delivery.

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
    /// A [`HookDirection`](crate::HookDirection) code.
    pub direction: u8,
    /// An [`AddressFamily`](crate::AddressFamily) code.
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

/// A local endpoint's address (key of the local delivery map). Aligned
/// so the programs write the address as words.
#[repr(C, align(4))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct LocalKey {
    /// An [`AddressFamily`](crate::AddressFamily) code.
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
