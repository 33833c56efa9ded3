//! How long a translated flow's NAT entries live, as the kernel's
//! conntrack keeps a flow: the clock each entry keeps
//! ([`NatValue::seen`]), UDP's replied mark, and TCP's end states (a FIN
//! each way, a reset). The agent's sweep removes ended flows after
//! conntrack's timeouts; a SYN on an ended connection's tuple, or a
//! datagram on a UDP flow past its timeout, opens a new one here,
//! decided afresh.

use super::*;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// The second of the kernel's coarse monotonic clock, never 0 (which
/// means "not yet known").
#[inline(always)]
pub(in crate::program) fn now_seconds() -> u32 {
    // SAFETY: helper without preconditions.
    let s = (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32;
    // The first second after boot reads as 1.
    s.max(1)
}

/// The clock a new entry keeps: a UDP flow's from its first packet, a
/// TCP connection's only once it closes (0).
#[inline(always)]
pub(super) fn udp_seen(protocol: u8) -> u32 {
    if protocol == UDP { now_seconds() } else { 0 }
}

/// A UDP entry met a packet at second `now`: its clock set (a write at
/// most once a second), and a reply-side entry marks the flow replied.
/// The sweep ends flows whose entries all fell idle (conntrack's UDP
/// timeouts).
#[inline(always)]
pub(super) fn refresh_udp(v: &mut NatValue, now: u32) {
    if v.seen != now {
        v.seen = now;
    }
    if v.flags & NAT_REPLY != 0 && v.flags & NAT_REPLIED == 0 {
        v.flags |= NAT_REPLIED;
    }
}

/// The TCP header's flags byte (0 for other protocols, or when the
/// header is cut short).
#[inline(always)]
pub(super) fn tcp_flags(bytes: &Skb, h: &Headers) -> u8 {
    if h.protocol != TCP {
        return 0;
    }
    bytes.fixed::<1>(h.l4 + 13).map_or(0, |[f]| f)
}

/// Whether TCP flags open a connection (SYN without ACK).
#[inline(always)]
pub(super) fn is_opening(flags: u8) -> bool {
    flags & (SYN | ACK) == SYN
}

/// A TCP packet with `flags` met entry `v`: a FIN or RST marks the
/// entry (its direction closed, or the connection reset), and from then
/// on each packet keeps its clock, from which the sweep times the end.
/// Open connections' entries are not written (no per-packet store).
/// Concurrent runs on two CPUs may each mark one bit and one of them be
/// lost; the other bits never change after the entry is recorded.
#[inline(always)]
pub(super) fn note_tcp_end(v: &mut NatValue, flags: u8) {
    let end =
        if flags & FIN != 0 { NAT_FIN } else { 0 } | if flags & RST != 0 { NAT_RST } else { 0 };
    if end == 0 && v.flags & (NAT_FIN | NAT_RST) == 0 {
        return;
    }
    if v.flags & end != end {
        v.flags |= end;
    }
    let now = now_seconds();
    if v.seen != now {
        v.seen = now;
    }
}

/// A TCP opening met forward entry `v` (key `sc.tuple`, client to
/// frontend): if it reopens an ended connection ([`tcp_reopens`]; the
/// reply entry holds the backend's side), that connection's entries go,
/// as conntrack kills an entry in `CLOSE` or `TIME_WAIT` for such a SYN,
/// so the SYN is decided afresh like any new connection. True when they
/// went; otherwise the SYN stays the connection's (conntrack passes it on
/// the old entry).
#[inline(never)]
pub(super) fn forget_ended(sc: &mut ServiceScratch, v: &NatValue) -> bool {
    let flow = read_flow(sc, v);
    if !tcp_reopens(flow.original, flow.reply_flags) {
        return false;
    }
    forget_flow(sc, &flow);
    true
}

/// Whether UDP entry `v` is idle at second `now` past the shortest
/// timeout a UDP flow has: only then may its flow be over
/// ([`forget_over_udp`]). One comparison on the way of every datagram.
#[inline(always)]
pub(super) fn udp_idle(v: &NatValue, now: u32) -> bool {
    v.seen != 0 && now.saturating_sub(v.seen) > udp_flow_timeout(false)
}

/// A UDP datagram met entry `v` (key `sc.tuple`) idle past the shortest
/// timeout ([`udp_idle`]): if its flow is over ([`flow_over`]: every
/// entry a packet refreshes idle past the flow's timeout), the agent's
/// sweep has not come by yet, and the kernel's conntrack would have
/// forgotten the flow already. Its entries go and the datagram is what
/// conntrack would make of it, a new flow: through the frontend balanced
/// afresh, from the backend no longer answered for the frontend. True
/// when they went; `sc.tuple` is kept.
#[inline(never)]
pub(super) fn forget_over_udp(sc: &mut ServiceScratch, v: &NatValue) -> bool {
    let met = sc.tuple;
    let mut over = false;
    if find_forward(sc, v) {
        let forward = sc.forward;
        let flow = read_flow(sc, &forward);
        over = flow_over(
            UDP,
            flow.original,
            flow.reply_flags,
            flow.last,
            now_seconds(),
        );
        if over {
            forget_flow(sc, &flow);
        }
    }
    sc.tuple = met;
    over
}

/// Puts the forward entry (client to frontend) of the flow that entry
/// `v` (key `sc.tuple`) belongs to in `sc.forward` and its key in
/// `sc.tuple`: `v` itself, or the one its reply entry names (reached
/// through the way back to the node's port when masqueraded). False
/// for an SNAT entry (its packets met the forward entry first) or a
/// flow with an entry gone.
#[inline(always)]
fn find_forward(sc: &mut ServiceScratch, v: &NatValue) -> bool {
    let kind = v.flags & (NAT_REPLY | NAT_AFTER_POLICY);
    if kind == 0 {
        sc.forward = *v;
        return true;
    }
    if kind == NAT_REPLY | NAT_AFTER_POLICY {
        sc.next = sc.tuple;
    } else if kind == NAT_REPLY {
        // Backend to the node's port, rewritten to backend to client:
        // the reply entry's key.
        sc.next = sc.tuple.rewritten(v);
    } else {
        return false;
    }
    let Some(r) = PALISADE_SVC_NAT.get_ptr(&sc.next) else {
        return false;
    };
    // SAFETY: a map value stays valid for the rest of this run (RCU).
    let r = unsafe { *r };
    if !restores_frontend(&r) {
        return false;
    }
    sc.tuple = sc.next.rewritten(&r).reversed();
    let Some(f) = PALISADE_SVC_NAT.get_ptr(&sc.tuple) else {
        return false;
    };
    // SAFETY: as above.
    sc.forward = unsafe { *f };
    sc.forward.flags & (NAT_REPLY | NAT_AFTER_POLICY) == 0
}

/// A flow as [`read_flow`] found it besides its forward entry.
struct FlowSides {
    /// Its reply entry is in `sc.reply` (key `sc.next`).
    reply: bool,
    /// Masqueraded: its SNAT entry is in `sc.snat` (key `sc.snat_key`).
    snat: bool,
    /// The original direction's flags (forward and SNAT entries).
    original: u32,
    /// The reply direction's flags (the reply entry and, masqueraded,
    /// the way back to the node's port).
    reply_flags: u32,
    /// The latest clock among the entries.
    last: u32,
}

/// Reads the rest of the flow of forward entry `v` (key `sc.tuple`,
/// client to frontend), as the sweep groups a flow's entries.
#[inline(always)]
fn read_flow(sc: &mut ServiceScratch, v: &NatValue) -> FlowSides {
    let to_backend = sc.tuple.rewritten(v);
    sc.snat_key = to_backend;
    sc.next = to_backend.reversed();
    let mut flow = FlowSides {
        reply: false,
        snat: false,
        original: v.flags,
        reply_flags: 0,
        last: v.seen,
    };
    if let Some(r) = PALISADE_SVC_NAT.get_ptr(&sc.next) {
        // SAFETY: a map value stays valid for the rest of this run (RCU).
        sc.reply = unsafe { *r };
        if restores_frontend(&sc.reply) {
            flow.reply = true;
            flow.reply_flags = sc.reply.flags;
            flow.last = flow.last.max(sc.reply.seen);
        }
    }
    // Masqueraded, the SNAT entry is keyed by the client's tuple to the
    // backend.
    if v.flags & NAT_MASQUERADE != 0
        && let Some(s) = PALISADE_SVC_NAT.get_ptr(&to_backend)
    {
        // SAFETY: as above.
        let s = unsafe { *s };
        if s.flags & (NAT_MASQUERADE | NAT_REPLY | NAT_AFTER_POLICY)
            == NAT_MASQUERADE | NAT_AFTER_POLICY
        {
            sc.snat = s;
            flow.snat = true;
            flow.original |= s.flags;
            flow.last = flow.last.max(s.seen);
            sc.unsnat_key = to_backend.rewritten(&s).reversed();
            if let Some(u) = PALISADE_SVC_NAT.get_ptr(&sc.unsnat_key) {
                // SAFETY: as above.
                let u = unsafe { *u };
                if u.flags & NAT_REPLY != 0 {
                    flow.reply_flags |= u.flags;
                    flow.last = flow.last.max(u.seen);
                }
            }
        }
    }
    flow
}

/// Removes the entries of a flow [`read_flow`] read (forward key in
/// `sc.tuple`, kept).
#[inline(always)]
fn forget_flow(sc: &mut ServiceScratch, flow: &FlowSides) {
    let forward = sc.tuple;
    sc.tuple = sc.snat_key;
    forget_connection(sc, flow.snat, flow.reply);
    sc.tuple = forward;
    // Without its reply entry nothing above named the forward entry.
    if !flow.reply {
        let _ = PALISADE_SVC_NAT.remove(&sc.tuple);
    }
}

/// Removes a closed connection's entries: when `reply`, its reply entry
/// (key `sc.next`, backend to client; value `sc.reply`) and the forward
/// entry it names; when `snat`, its SNAT entry (key `sc.tuple`, value
/// `sc.snat`) and the way back to the node's port it names.
#[inline(always)]
pub(super) fn forget_connection(sc: &mut ServiceScratch, snat: bool, reply: bool) {
    let t = sc.tuple;
    if snat {
        let s = sc.snat;
        let _ = PALISADE_SVC_NAT.remove(&sc.tuple);
        sc.tuple = t.rewritten(&s).reversed();
        let _ = PALISADE_SVC_NAT.remove(&sc.tuple);
    }
    if reply {
        // The reply entry restores the frontend: its forward entry is the
        // client to that frontend.
        let r = sc.reply;
        sc.tuple = sc.next.rewritten(&r).reversed();
        let _ = PALISADE_SVC_NAT.remove(&sc.tuple);
        let _ = PALISADE_SVC_NAT.remove(&sc.next);
    }
    sc.tuple = t;
}
