//! Service load balancing, kube-proxy's job, as the TC program
//! `palisade_service`: it runs before the policy programs, so policy
//! judges the backend (Calico's order). A packet of a translated
//! connection (either way) is rewritten from the NAT table; a new
//! connection to a frontend is decided by the shared
//! [`service_decide`] over the service maps, gets a backend (ClientIP
//! affinity first), both directions recorded, and is rewritten (DNAT,
//! and SNAT to the node's address where kube-proxy masquerades). DROP
//! drops; REJECT answers with ICMP port unreachable, as kube-proxy's
//! `reject` does, sent back out of the interface the packet came in on.

// Keys and values in scratch go to the map helpers by reference: by value
// they would be copied onto the 512-byte stack.
#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "scratch keys stay off the stack"
)]

use aya_ebpf::bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST};
use aya_ebpf::helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};

use super::*;

mod floor;
mod hairpin;
mod lifetime;
mod reject;
mod related;
use hairpin::take_hairpin_picked_at_connect;
use lifetime::{
    forget_connection, forget_ended, forget_over_udp, is_opening, note_tcp_end, refresh_udp,
    tcp_flags, udp_idle, udp_seen,
};
use reject::reject;
use related::{related_after_policy, related_before_policy};

pub(super) use lifetime::now_seconds;

// Sizes are defaults; user space sizes them from its ServiceCapacity.
#[map]
pub(super) static PALISADE_SVC_FRONTENDS: HashMap<FrontendKey, FrontendValue> =
    HashMap::pinned(65_536, 0);
#[map]
pub(super) static PALISADE_SVC_BACKENDS: Array<BackendValue> = Array::pinned(262_144, 0);
#[map]
pub(super) static PALISADE_SVC_ADDRESSES: LpmTrie<SvcAddrKey, u32> = LpmTrie::pinned(65_536, 0);
#[map]
pub(super) static PALISADE_SVC_SOURCE_RANGES: LpmTrie<SvcRangeKey, u8> = LpmTrie::pinned(16_384, 0);
#[map]
pub(super) static PALISADE_SVC_CONFIG: Array<ServiceConfig> = Array::pinned(1, 0);
/// Both directions of every translated connection. An LRU: a connection
/// idle long enough to be evicted is decided again on its next packet.
#[map]
pub(super) static PALISADE_SVC_NAT: LruHashMap<NatTuple, NatValue> = LruHashMap::pinned(262_144, 0);
/// Which addresses may be a frontend or a backend (see
/// [`ADDR_FILTER_BITS_LOG2`]); words user space sets whole (mmap).
#[map]
pub(super) static PALISADE_SVC_FILTER: Array<u64> =
    Array::pinned(ADDR_FILTER_WORDS, BPF_F_MMAPABLE);
#[map]
pub(super) static PALISADE_SVC_AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(65_536, 0);
/// Working memory; not pinned.
#[map]
pub(super) static PALISADE_SVC_SCRATCH: PerCpuArray<ServiceScratch> =
    PerCpuArray::with_max_entries(1, 0);

/// The tries' lookup keys, kept off the stack (the decision's frame and
/// its caller's must fit 512 bytes together).
#[repr(C)]
pub(super) struct LookupKeys {
    addr: Key<SvcAddrKey>,
    range: Key<SvcRangeKey>,
}

/// Working memory for the tries' keys; not pinned.
#[map]
pub(super) static PALISADE_SVC_KEYS: PerCpuArray<LookupKeys> = PerCpuArray::with_max_entries(1, 0);

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
pub(super) const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;
/// Where the L3 header starts (the pod and host interfaces carry Ethernet).
const L3: usize = ETH_HLEN;

/// The service maps as [`service_decide`] reads them.
pub(super) struct Maps;

/// Whether `addr` may be in one half of the address filter (a frontend,
/// or a backend): false only where no entry can name it there.
#[inline(always)]
fn may_be(half: u32, family: u8, addr: &[u8; 16]) -> bool {
    let (word, bit) = addr_filter_bit(half, family, addr);
    match PALISADE_SVC_FILTER.get_ptr(word) {
        // SAFETY: an aligned word of an array map, set whole (an atomic
        // OR) by user space.
        Some(w) => (unsafe { core::ptr::read_volatile(w) }) & bit != 0,
        None => true,
    }
}

/// Whether a packet of tuple `t`, as it arrives before policy, may have
/// a NAT entry: a forward key is to a frontend, the others (a reply, a
/// masqueraded connection's way back) are from a backend.
#[inline(always)]
fn may_have_entry(t: &NatTuple) -> bool {
    may_be(FILTER_FRONTENDS, t.family, &t.dst) || may_be(FILTER_BACKENDS, t.family, &t.src)
}

/// Whether `addr` is known to be outside every service range (false when
/// the configuration does not hold them all).
#[inline(always)]
fn outside_service_ranges(family: u8, addr: &[u8; 16]) -> bool {
    let Some(c) = PALISADE_SVC_CONFIG.get(0) else {
        return false;
    };
    if c.flags & CONFIG_RANGES_KNOWN == 0 {
        return false;
    }
    for r in &c.ranges {
        if r.contains(family, addr) {
            return false;
        }
    }
    true
}

impl ServiceMaps for Maps {
    #[inline(always)]
    fn frontend(&self, key: &FrontendKey) -> Option<FrontendValue> {
        if !may_be(FILTER_FRONTENDS, key.family, &key.addr) {
            return None;
        }
        // SAFETY: the value is copied out at once.
        unsafe { PALISADE_SVC_FRONTENDS.get(key) }.copied()
    }

    #[inline(always)]
    fn config_flags(&self) -> u32 {
        PALISADE_SVC_CONFIG.get(0).map_or(0, |c| c.flags)
    }

    #[inline(always)]
    fn primary(&self, family: u8) -> [u8; 16] {
        match PALISADE_SVC_CONFIG.get(0) {
            Some(c) if family == FAMILY_V4 => c.primary_v4,
            Some(c) => c.primary_v6,
            None => [0; 16],
        }
    }

    #[inline(always)]
    fn address_flags(&self, family: u8, addr: &[u8; 16]) -> u32 {
        let Some(keys) = PALISADE_SVC_KEYS.get_ptr_mut(0) else {
            return 0;
        };
        // SAFETY: this CPU's key memory, used by this run only.
        let key = unsafe { &mut (*keys).addr };
        key.prefix_len = ADDR_KEY_BITS + if family == FAMILY_V4 { 32 } else { 128 };
        key.data = SvcAddrKey {
            family,
            pad: [0; 3],
            addr: *addr,
        };
        PALISADE_SVC_ADDRESSES.get(&*key).copied().unwrap_or(0)
    }

    /// Most packets are to no frontend and outside the service ranges:
    /// the filter and the ranges in the configuration say so without the
    /// trie (a walk of cold nodes on every such packet).
    #[inline(always)]
    fn unserved_flags(&self, family: u8, addr: &[u8; 16]) -> u32 {
        if !may_be(FILTER_FRONTENDS, family, addr) && outside_service_ranges(family, addr) {
            return 0;
        }
        self.address_flags(family, addr)
    }

    #[inline(always)]
    fn source_range(&self, service: u32, family: u8, addr: &[u8; 16]) -> u8 {
        let Some(keys) = PALISADE_SVC_KEYS.get_ptr_mut(0) else {
            return 0;
        };
        // SAFETY: as above.
        let key = unsafe { &mut (*keys).range };
        key.prefix_len = RANGE_KEY_BITS + if family == FAMILY_V4 { 32 } else { 128 };
        key.data = SvcRangeKey {
            service: service.to_be_bytes(),
            family,
            pad: [0; 3],
            addr: *addr,
        };
        PALISADE_SVC_SOURCE_RANGES.get(&*key).copied().unwrap_or(0)
    }
}

/// Service load balancing on one packet; see the module comment.
#[classifier]
pub fn palisade_service(ctx: TcContext) -> i32 {
    service(&ctx).unwrap_or(PASS)
}

/// Where a packet's headers are.
struct Headers {
    family: u8,
    protocol: u8,
    /// Transport header offset.
    l4: usize,
}

#[inline(always)]
fn headers(p: &Skb) -> Option<Headers> {
    let ethertype = u16::from_be_bytes(p.fixed::<2>(12)?);
    let (family, protocol, l4) = match ethertype {
        ETH_P_IP => {
            let [version_ihl] = p.fixed::<1>(L3)?;
            let ihl = usize::from(version_ihl & 0x0f) * 4;
            let fragment = u16::from_be_bytes(p.fixed::<2>(L3 + 6)?);
            // Fragments are not translated (their ports are in the first
            // one only); neither are options-bearing headers (rare, and
            // kube-proxy's nftables rules see them the same as any).
            if ihl != 20 || fragment & 0x3fff != 0 {
                return None;
            }
            (FAMILY_V4, p.fixed::<1>(L3 + 9)?[0], L3 + 20)
        }
        // Extension headers are not followed: service traffic does not
        // carry them.
        ETH_P_IPV6 => (FAMILY_V6, p.fixed::<1>(L3 + 6)?[0], L3 + 40),
        _ => return None,
    };
    if !matches!(protocol, TCP | UDP | SCTP) {
        return None;
    }
    Some(Headers {
        family,
        protocol,
        l4,
    })
}

/// The headers of a TCP, UDP or SCTP packet, its tuple into `sc.tuple`.
/// Headers are read straight from the packet's linear data (a helper
/// call per field would cost more than the rest of a non-service
/// packet's lookup); a function of its own, so that its buffers are not
/// on the stack while the decision runs.
#[inline(never)]
fn parse(ctx: &TcContext) -> Option<Headers> {
    let bytes = Skb {
        ctx,
        data: ctx.data(),
        data_end: ctx.data_end(),
    };
    let h = headers(&bytes)?;
    let sc = scratch()?;
    read_tuple(&bytes, &h, &mut sc.tuple)?;
    Some(h)
}

/// A packet of a translated connection (`sc.tuple`), either way: 1
/// when rewritten (or left to policy), 0 when not one, -1 when the
/// rewrite failed. A reply on an interface the policy programs manage
/// is theirs to translate: they judge it as the connection they
/// recorded (to the backend), then hand it to `palisade_reply_nat`.
#[inline(never)]
fn translated(ctx: &TcContext, h: &Headers) -> i32 {
    let Some(sc) = scratch() else {
        return 0;
    };
    let found = if may_have_entry(&sc.tuple) {
        PALISADE_SVC_NAT.get_ptr_mut(&sc.tuple)
    } else {
        None
    };
    let Some(v) = found else {
        forget_stale_reply(ctx, h);
        return 0;
    };
    let tcp = packet_tcp_flags(ctx, h);
    if h.protocol == UDP {
        // SAFETY: as below; concurrent runs write the same values.
        if !udp_flow_lives(sc, unsafe { &mut *v }) {
            return 0;
        }
    } else if h.protocol == TCP {
        // SAFETY: as below; see `note_tcp_end` on concurrent runs.
        let entry = unsafe { &mut *v };
        // A SYN meeting its tuple's forward entry is rare (a client
        // port reused): only then is the reply side read.
        if is_opening(tcp) && entry.flags & (NAT_REPLY | NAT_AFTER_POLICY) == 0 {
            let old = *entry;
            if forget_ended(sc, &old) {
                return 0;
            }
        }
        note_tcp_end(entry, tcp);
    }
    // SAFETY: a map value stays valid for the rest of this run (RCU).
    let v = unsafe { &*v };
    if v.flags & NAT_AFTER_POLICY != 0 && captured(ctx, h, v) {
        // Before policy, an after-policy key is only ever met as a new
        // connection's tuple: a closed translated connection's entries
        // (the LRU keeps them) would capture it.
        let v = *v;
        forget_captured(sc, &v);
        return 0;
    }
    let managed = interface_zone(arrival(ctx)).is_some();
    if v.flags & NAT_AFTER_POLICY != 0 {
        // The policy programs apply it once they allowed the packet.
        if managed {
            return 1;
        }
        if rewrite(ctx, h, &sc.tuple, v) != 0 {
            return -1;
        }
        stat(Statistic::ServiceTranslated);
        return 1;
    }
    if rewrite(ctx, h, &sc.tuple, v) != 0 {
        return -1;
    }
    stat(Statistic::ServiceTranslated);
    // Without a policy program after this one, the after-policy half
    // (SNAT, or the frontend restored) is now. Only a masqueraded
    // connection has one after a before-policy entry: the others skip a
    // lookup that would miss (a cold bucket in a busy table).
    if !managed && v.flags & NAT_MASQUERADE != 0 {
        sc.next = sc.tuple.rewritten(v);
        if let Some(after) = PALISADE_SVC_NAT.get_ptr_mut(&sc.next) {
            // SAFETY: as above.
            let after = unsafe { &mut *after };
            note_tcp_end(after, tcp);
            if after.flags & NAT_AFTER_POLICY != 0 && rewrite(ctx, h, &sc.next, after) != 0 {
                return -1;
            }
        }
    }
    1
}

/// A UDP datagram met its flow's `entry`: false when the flow was over
/// (its entries are gone: the datagram opens a new flow), else the
/// flow's clock moves on.
#[inline(always)]
fn udp_flow_lives(sc: &mut ServiceScratch, entry: &mut NatValue) -> bool {
    let now = now_seconds();
    if udp_idle(entry, now) {
        let old = *entry;
        if forget_over_udp(sc, &old) {
            return false;
        }
    }
    refresh_udp(entry, now);
    true
}

/// A TCP connection opening (SYN without ACK), or a UDP datagram, that
/// no NAT entry covers (`sc.tuple`): an entry for the way back of its
/// tuple belongs to a closed translated connection (the LRU keeps
/// entries past their connection) that used the same client port and
/// backend, and would give this flow's replies a frontend's address.
/// That connection's entries go (see [`forget_connection`]), so a later
/// connection through the frontend from that port is decided afresh; a
/// live connection with that tuple could not share it with this one at
/// the backend anyway (conntrack would have remapped a TCP port, and
/// refuses a UDP flow whose replies clash with another's).
#[inline(never)]
fn forget_stale_reply(ctx: &TcContext, h: &Headers) {
    if !may_open(ctx, h) {
        return;
    }
    let Some(sc) = scratch() else {
        return;
    };
    let t = sc.tuple;
    // A reply entry's key is from a backend: to one, a connection may
    // have a stale one.
    if !may_be(FILTER_BACKENDS, t.family, &t.dst) {
        return;
    }
    sc.next = t.reversed();
    let Some(v) = PALISADE_SVC_NAT.get_ptr(&sc.next) else {
        return;
    };
    // SAFETY: a map value stays valid for the rest of this run (RCU).
    sc.reply = unsafe { *v };
    if !restores_frontend(&sc.reply) {
        return;
    }
    // Masqueraded, the connection's SNAT entry is keyed by this very
    // tuple (client to backend).
    let mut snat = false;
    if sc.reply.flags & NAT_MASQUERADE != 0
        && let Some(s) = PALISADE_SVC_NAT.get_ptr(&sc.tuple)
    {
        // SAFETY: as above.
        let s = unsafe { *s };
        if s.flags & (NAT_MASQUERADE | NAT_REPLY) == NAT_MASQUERADE {
            sc.snat = s;
            snat = true;
        }
    }
    forget_connection(sc, snat, true);
}

/// Whether a NAT entry is a reply entry, which gives a backend's packets
/// the frontend's address back.
#[inline(always)]
fn restores_frontend(v: &NatValue) -> bool {
    v.flags & (NAT_REPLY | NAT_AFTER_POLICY) == NAT_REPLY | NAT_AFTER_POLICY
}

/// Whether a packet that met after-policy entry `v` before policy is a
/// new flow the entry would capture: a TCP opening, or a UDP datagram
/// keyed like a masqueraded connection's SNAT entry (the client's port to
/// the backend, which that connection's own datagrams carry only after
/// the DNAT, never here). A UDP datagram keyed like a reply entry (the
/// backend to the client's port) is the reply conntrack would take it
/// for.
#[inline(always)]
fn captured(ctx: &TcContext, h: &Headers, v: &NatValue) -> bool {
    if h.protocol == UDP {
        return v.flags & NAT_REPLY == 0;
    }
    opening(ctx, h)
}

/// Whether the packet may start a flow: a TCP opening, or any UDP
/// datagram (UDP has none; conntrack takes a datagram no entry matches
/// for a new flow).
#[inline(always)]
fn may_open(ctx: &TcContext, h: &Headers) -> bool {
    h.protocol == UDP || opening(ctx, h)
}

/// Whether the packet opens a TCP connection (SYN without ACK).
#[inline(always)]
fn opening(ctx: &TcContext, h: &Headers) -> bool {
    is_opening(packet_tcp_flags(ctx, h))
}

/// The packet's TCP flags (0 when not TCP).
#[inline(always)]
fn packet_tcp_flags(ctx: &TcContext, h: &Headers) -> u8 {
    let bytes = Skb {
        ctx,
        data: ctx.data(),
        data_end: ctx.data_end(),
    };
    tcp_flags(&bytes, h)
}

/// A new TCP connection's tuple (`sc.tuple`) met an after-policy entry
/// `v` before policy, where only a closed translated connection's
/// entries (the LRU keeps them) can put one: a masqueraded connection's
/// SNAT entry (the client's port reused straight to the backend), or a
/// reply entry (the backend opening a connection to the client's port).
/// That connection's entries go (see [`forget_connection`]).
#[inline(never)]
fn forget_captured(sc: &mut ServiceScratch, v: &NatValue) {
    let snat = v.flags & (NAT_MASQUERADE | NAT_REPLY) == NAT_MASQUERADE;
    let mut reply = false;
    if snat {
        sc.snat = *v;
        sc.next = sc.tuple.reversed();
        if let Some(r) = PALISADE_SVC_NAT.get_ptr(&sc.next) {
            // SAFETY: a map value stays valid for the rest of this run (RCU).
            sc.reply = unsafe { *r };
            reply = restores_frontend(&sc.reply);
        }
    } else {
        sc.next = sc.tuple;
        sc.reply = *v;
        reply = restores_frontend(v);
    }
    forget_connection(sc, snat, reply);
}

/// The packet's connection tuple.
#[inline(always)]
fn read_tuple(bytes: &Skb, h: &Headers, t: &mut NatTuple) -> Option<()> {
    let (src_at, dst_at) = addr_offsets(h.family);
    *t = NatTuple::default();
    if h.family == FAMILY_V4 {
        t.src[..4].copy_from_slice(&bytes.fixed::<4>(src_at)?);
        t.dst[..4].copy_from_slice(&bytes.fixed::<4>(dst_at)?);
    } else {
        t.src = bytes.fixed::<16>(src_at)?;
        t.dst = bytes.fixed::<16>(dst_at)?;
    }
    let ports = bytes.fixed::<4>(h.l4)?;
    t.src_port = u16::from_be_bytes([ports[0], ports[1]]);
    t.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
    t.protocol = h.protocol;
    t.family = h.family;
    Some(())
}

/// Whether any Service is programmed: only then do the policy programs
/// hand the packets they allow to the reply translation.
#[inline(always)]
pub(super) fn services_enabled() -> bool {
    PALISADE_SVC_CONFIG
        .get(0)
        .is_some_and(|c| c.flags & CONFIG_ENABLED != 0)
}

/// Applies a translated connection's after-policy entry, if the packet
/// has one: the SNAT on the way out, the frontend restored on the way
/// back. -1 when the rewrite failed.
#[inline(always)]
fn after_policy_nat(ctx: &TcContext) -> i32 {
    let bytes = Skb {
        ctx,
        data: ctx.data(),
        data_end: ctx.data_end(),
    };
    let Some(h) = headers(&bytes) else {
        return related_after_policy(ctx);
    };
    let Some(sc) = scratch() else {
        return 0;
    };
    if read_tuple(&bytes, &h, &mut sc.tuple).is_none() {
        return 0;
    }
    // After policy: a reply is from a backend, a masqueraded connection's
    // SNAT key to one.
    let t = &sc.tuple;
    if !may_be(FILTER_BACKENDS, t.family, &t.src) && !may_be(FILTER_BACKENDS, t.family, &t.dst) {
        return 0;
    }
    let Some(v) = PALISADE_SVC_NAT.get_ptr_mut(&sc.tuple) else {
        return 0;
    };
    // SAFETY: a map value stays valid for the rest of this run (RCU).
    let v = unsafe { &mut *v };
    if v.flags & NAT_AFTER_POLICY == 0 {
        return 0;
    }
    // A reply from a backend on another node meets its entries only here.
    if h.protocol == UDP && !udp_flow_lives(sc, v) {
        return 0;
    }
    note_tcp_end(v, tcp_flags(&bytes, &h));
    if rewrite(ctx, &h, &sc.tuple, v) != 0 {
        return -1;
    }
    stat(Statistic::ServiceTranslated);
    1
}

/// A packet the policy programs allowed (tail-called from them when
/// Services are programmed, `DELIVER_REPLY_NAT`): a translated
/// connection's after-policy entry is applied (a reply gets its frontend
/// back; a masqueraded connection its SNAT), then the packet passes.
/// Policy judges the connection between client and backend, so these
/// come after it; a tail call, so that neither its stack nor its paths
/// add to the policy programs'.
#[classifier]
pub fn palisade_reply_nat(ctx: TcContext) -> i32 {
    if after_policy_nat(&ctx) < 0 {
        DROP
    } else {
        PASS
    }
}

/// As [`palisade_reply_nat`] for a packet allowed to a local endpoint
/// (`DELIVER_REPLY_NAT_LOCAL`, from `palisade_to_pod_local`): translated,
/// then handed over to the pod.
#[classifier]
pub fn palisade_reply_nat_local(ctx: TcContext) -> i32 {
    if after_policy_nat(&ctx) < 0 {
        return DROP;
    }
    let Some(sc) = PALISADE_SCRATCH.get_ptr_mut(0) else {
        return PASS;
    };
    // SAFETY: this CPU's policy scratch (TC programs do not nest on a CPU).
    match local_receiver(&ctx, arrival(&ctx), unsafe { &mut (*sc).local }) {
        Some((ep, family)) => hand_over(&ctx, &ep, family),
        None => PASS,
    }
}

/// Offsets of the source and destination addresses.
#[inline(always)]
fn addr_offsets(family: u8) -> (usize, usize) {
    if family == FAMILY_V4 {
        (L3 + 12, L3 + 16)
    } else {
        (L3 + 8, L3 + 24)
    }
}

/// This CPU's scratch.
#[inline(always)]
fn scratch() -> Option<&'static mut ServiceScratch> {
    let sc = PALISADE_SVC_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch; TC programs do not nest on a CPU and
    // each function below takes it only after its caller is done with it.
    Some(unsafe { &mut *sc })
}

#[inline(always)]
fn service(ctx: &TcContext) -> Result<i32, i64> {
    let Some(h) = parse(ctx) else {
        return Ok(related_before_policy(ctx));
    };
    let sc = scratch().ok_or(0i64)?;
    match translated(ctx, &h) {
        0 => {}
        r if r < 0 => return Ok(DROP),
        _ => return Ok(PASS),
    }

    let p = &mut sc.packet;
    p.family = h.family;
    p.source = sc.tuple.src;
    p.destination = sc.tuple.dst;
    p.protocol = h.protocol;
    p.port = sc.tuple.dst_port;
    decide();
    let Some(sc) = scratch() else {
        return Ok(DROP);
    };
    let d = sc.decision;
    Ok(match d.verdict {
        DECISION_DROP => {
            stat(Statistic::ServiceDrop);
            DROP
        }
        DECISION_REJECT => {
            stat(Statistic::ServiceReject);
            reject(ctx, &h)
        }
        DECISION_FORWARD if d.count == 0 => {
            stat(Statistic::ServiceReject);
            reject(ctx, &h)
        }
        DECISION_FORWARD => translate(ctx, &h),
        _ => PASS,
    })
}

/// The decision on a new connection (`sc.packet`) into `sc.decision`; a
/// function of its own, so its lookup keys take their own stack frame.
#[inline(never)]
fn decide() {
    if let Some(sc) = scratch() {
        sc.decision = ServiceDecision::of(service_decide(&sc.packet, &Maps));
    }
}

/// A new connection the decision forwards (`sc.decision`): the backend,
/// both directions recorded, the packet rewritten.
#[inline(never)]
fn translate(ctx: &TcContext, h: &Headers) -> i32 {
    let Some(sc) = scratch() else {
        return DROP;
    };
    let ServiceDecision {
        service,
        first,
        affinity_seconds,
        count,
        masquerade,
        ..
    } = sc.decision;
    let masquerade = masquerade != 0;
    choose(sc, service, first, count, affinity_seconds);
    if h.protocol == TCP {
        take_hairpin_picked_at_connect(ctx, sc, first, count);
    }
    // Hairpin: a backend reaching itself through the Service is
    // masqueraded, or it would answer itself directly.
    let hairpin = sc.chosen.value.addr == sc.tuple.src;
    sc.node = [0; 16];
    if let Some(c) = PALISADE_SVC_CONFIG.get(0) {
        sc.node = if h.family == FAMILY_V4 {
            c.primary_v4
        } else {
            c.primary_v6
        };
    }
    let masquerade = (masquerade || hairpin) && sc.node != [0; 16];
    let masq_flag = if masquerade { NAT_MASQUERADE } else { 0 };
    let t = sc.tuple;
    let seen = udp_seen(t.protocol);
    let b = sc.chosen.value;
    // Before policy: DNAT only.
    sc.forward = NatValue {
        src: t.src,
        dst: b.addr,
        src_port: t.src_port,
        dst_port: b.port,
        flags: masq_flag,
        backend: sc.chosen.backend,
        seen,
    };
    // After policy, on the way back: the frontend restored.
    sc.reply_key = NatTuple {
        src: b.addr,
        dst: t.src,
        src_port: b.port,
        dst_port: t.src_port,
        protocol: t.protocol,
        family: t.family,
        pad: 0,
    };
    sc.reply = NatValue {
        src: t.dst,
        dst: t.src,
        src_port: t.dst_port,
        dst_port: t.src_port,
        flags: NAT_REPLY | NAT_AFTER_POLICY | masq_flag,
        backend: sc.chosen.backend,
        seen,
    };
    // Over any entry of that key: one a closed connection left (the same
    // client port and backend, reached through another frontend of the
    // Service); a live one could not share the tuple at the backend.
    let mut recorded = PALISADE_SVC_NAT.insert(&sc.reply_key, &sc.reply, 0).is_ok();
    if recorded && masquerade {
        recorded = record_masquerade(sc);
        if !recorded {
            let _ = PALISADE_SVC_NAT.remove(&sc.reply_key);
        }
    }
    if recorded
        && PALISADE_SVC_NAT
            .insert(&sc.tuple, &sc.forward, u64::from(BPF_NOEXIST))
            .is_err()
    {
        let _ = PALISADE_SVC_NAT.remove(&sc.reply_key);
        if masquerade {
            let _ = PALISADE_SVC_NAT.remove(&sc.snat_key);
            let _ = PALISADE_SVC_NAT.remove(&sc.unsnat_key);
        }
        recorded = false;
    }
    if !recorded {
        stat(Statistic::ServiceNatFull);
    }
    if rewrite(ctx, h, &sc.tuple, &sc.forward) != 0 {
        return DROP;
    }
    // Without a policy program after this one, the SNAT is now.
    if masquerade && interface_zone(arrival(ctx)).is_none() {
        sc.next = sc.snat_key;
        if rewrite(ctx, h, &sc.next, &sc.snat) != 0 {
            return DROP;
        }
    }
    stat(Statistic::ServiceNat);
    PASS
}

/// A masqueraded connection's SNAT (after policy) and its reverse
/// (before policy), from `sc.forward`: clients share the node's
/// address, so a second one with the same source port to the same
/// backend takes another port. False when the table took neither.
#[inline(always)]
fn record_masquerade(sc: &mut ServiceScratch) -> bool {
    let f = sc.forward;
    sc.snat_key = sc.tuple.rewritten(&f);
    sc.snat = NatValue {
        src: sc.node,
        dst: f.dst,
        src_port: f.src_port,
        dst_port: f.dst_port,
        flags: NAT_AFTER_POLICY | NAT_MASQUERADE,
        backend: f.backend,
        seen: f.seen,
    };
    sc.unsnat_key = NatTuple {
        src: f.dst,
        dst: sc.node,
        src_port: f.dst_port,
        dst_port: f.src_port,
        protocol: sc.tuple.protocol,
        family: sc.tuple.family,
        pad: 0,
    };
    sc.unsnat = NatValue {
        src: f.dst,
        dst: f.src,
        src_port: f.dst_port,
        dst_port: f.src_port,
        flags: NAT_REPLY | NAT_MASQUERADE,
        backend: f.backend,
        seen: f.seen,
    };
    let mut taken = PALISADE_SVC_NAT
        .insert(&sc.unsnat_key, &sc.unsnat, u64::from(BPF_NOEXIST))
        .is_ok();
    let mut tries = 0;
    while !taken && tries < 4 {
        tries += 1;
        // SAFETY: helper without preconditions.
        let port = 32_768 + (unsafe { bpf_get_prandom_u32() } % 28_232) as u16; // constant divisor
        sc.snat.src_port = port;
        sc.unsnat_key.dst_port = port;
        taken = PALISADE_SVC_NAT
            .insert(&sc.unsnat_key, &sc.unsnat, u64::from(BPF_NOEXIST))
            .is_ok();
    }
    if !taken {
        return false;
    }
    if PALISADE_SVC_NAT.insert(&sc.snat_key, &sc.snat, 0).is_err() {
        let _ = PALISADE_SVC_NAT.remove(&sc.unsnat_key);
        return false;
    }
    true
}

/// Picks the backend of a new connection into `sc.chosen`: the client's
/// affinity entry while it is fresh and names a backend still in the
/// range, else a random one; with affinity, the entry is (re)written.
#[inline(always)]
fn choose(sc: &mut ServiceScratch, service: u32, first: u32, count: u16, affinity_seconds: u32) {
    let ServiceScratch {
        affinity,
        chosen,
        tuple,
        ..
    } = sc;
    let client = Client {
        family: tuple.family,
        addr: tuple.src,
    };
    pick(
        affinity,
        chosen,
        service,
        &client,
        first,
        count,
        affinity_seconds,
    );
}

/// Who asks for a backend (the ClientIP affinity key's address).
pub(super) struct Client {
    pub(super) family: u8,
    pub(super) addr: [u8; 16],
}

/// A backend among `count` from `first`: the client's affine one while its
/// affinity is fresh and the backend still listed, else a random one;
/// `chosen` says which, `affinity` is the key it was recorded under.
#[inline(always)]
pub(super) fn pick(
    affinity: &mut AffinityKey,
    chosen: &mut AffinityValue,
    service: u32,
    client: &Client,
    first: u32,
    count: u16,
    affinity_seconds: u32,
) {
    // SAFETY: helpers without preconditions.
    let (random, now) = unsafe { (bpf_get_prandom_u32(), bpf_ktime_get_ns()) };
    // `count` is never 0 here (the caller rejects); `checked_rem` keeps
    // the division's panic path out of the program all the same.
    let mut index = first + random.checked_rem(u32::from(count)).unwrap_or(0);
    if affinity_seconds > 0 {
        *affinity = AffinityKey {
            service,
            family: client.family,
            pad: [0; 3],
            client: client.addr,
        };
        // SAFETY: the entry is copied out at once.
        if let Some(a) = unsafe { PALISADE_SVC_AFFINITY.get(&*affinity) }.copied() {
            let fresh =
                now.saturating_sub(a.used_ns) <= u64::from(affinity_seconds) * 1_000_000_000;
            let listed = a.backend >= first
                && a.backend < first + u32::from(count)
                && PALISADE_SVC_BACKENDS.get(a.backend).copied() == Some(a.value);
            if fresh && listed {
                index = a.backend;
            }
        }
    }
    *chosen = AffinityValue {
        used_ns: now,
        backend: index,
        pad: 0,
        value: PALISADE_SVC_BACKENDS
            .get(index)
            .copied()
            .unwrap_or_default(),
    };
    if affinity_seconds > 0 {
        let _ = PALISADE_SVC_AFFINITY.insert(&*affinity, &*chosen, 0);
    }
}

/// Rewrites the packet of tuple `old` to `new`'s addresses and ports,
/// keeping the IPv4 header and TCP/UDP checksums right (incrementally).
/// SCTP's CRC32c covers the ports and no helper updates it: an SCTP
/// port translation leaves it stale (kube-proxy relies on the kernel's
/// SCTP NAT helper for this; the kernel here has no SCTP).
#[inline(never)]
fn rewrite(ctx: &TcContext, h: &Headers, old: &NatTuple, new: &NatValue) -> i64 {
    match rewrite_all(ctx, h, old, new) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

#[inline(always)]
fn rewrite_all(ctx: &TcContext, h: &Headers, old: &NatTuple, new: &NatValue) -> Result<(), i64> {
    // (checksum offset, 0 for none; flags). Not an Option: its unset
    // payload would be an uninitialised register the verifier refuses.
    let checksum = match h.protocol {
        TCP => (h.l4 + 16, 0u64),
        // A zero UDP checksum (IPv4: none) stays zero.
        UDP => (h.l4 + 6, u64::from(BPF_F_MARK_MANGLED_0)),
        _ => (0, 0),
    };
    let (src_at, dst_at) = addr_offsets(h.family);
    rewrite_addr(ctx, h.family, src_at, &old.src, &new.src, checksum)?;
    rewrite_addr(ctx, h.family, dst_at, &old.dst, &new.dst, checksum)?;
    rewrite_port(ctx, h.l4, old.src_port, new.src_port, checksum)?;
    rewrite_port(ctx, h.l4 + 2, old.dst_port, new.dst_port, checksum)?;
    Ok(())
}

#[inline(always)]
fn rewrite_addr(
    ctx: &TcContext,
    family: u8,
    at: usize,
    old: &[u8; 16],
    new: &[u8; 16],
    checksum: (usize, u64),
) -> Result<(), i64> {
    let words = if family == FAMILY_V4 { 1 } else { 4 };
    for i in 0..4 {
        if i >= words {
            break;
        }
        let from = word(old, i);
        let to = word(new, i);
        if from == to {
            continue;
        }
        let (csum_at, flags) = checksum;
        if csum_at != 0 {
            ctx.l4_csum_replace(
                csum_at,
                u64::from(from),
                u64::from(to),
                u64::from(BPF_F_PSEUDO_HDR) | flags | 4,
            )?;
        }
        if family == FAMILY_V4 {
            ctx.l3_csum_replace(L3 + 10, u64::from(from), u64::from(to), 4)?;
        }
        ctx.store(at + 4 * i, &to, 0)?;
    }
    Ok(())
}

#[inline(always)]
fn rewrite_port(
    ctx: &TcContext,
    at: usize,
    old: u16,
    new: u16,
    checksum: (usize, u64),
) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    let (from, to) = (old.to_be(), new.to_be());
    let (csum_at, flags) = checksum;
    if csum_at != 0 {
        ctx.l4_csum_replace(csum_at, u64::from(from), u64::from(to), flags | 2)?;
    }
    ctx.store(at, &to, 0)
}
