//! How long a translated flow's NAT entries live, as the kernel's
//! conntrack keeps a flow: the clock each entry keeps
//! ([`NatValue::seen`]), UDP's replied mark, and TCP's end states (a FIN
//! each way, a reset). The agent's sweep removes ended flows after
//! conntrack's timeouts; a SYN on an ended connection's tuple opens a new
//! one here, decided afresh.

use super::*;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// The second of the kernel's coarse monotonic clock, never 0 (which
/// means "not yet known").
#[inline(always)]
fn now_seconds() -> u32 {
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

/// A UDP entry met a packet: its clock set (a write at most once a
/// second), and a reply-side entry marks the flow replied. The sweep
/// ends flows whose entries all fell idle (conntrack's UDP timeouts).
#[inline(always)]
pub(super) fn refresh_udp(v: &mut NatValue) {
    let now = now_seconds();
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
    let forward = sc.tuple;
    let to_backend = forward.rewritten(v);
    sc.next = to_backend.reversed();
    let mut reply = false;
    let mut reply_flags = 0;
    if let Some(r) = PALISADE_SVC_NAT.get_ptr(&sc.next) {
        // SAFETY: a map value stays valid for the rest of this run (RCU).
        sc.reply = unsafe { *r };
        reply = restores_frontend(&sc.reply);
        if reply {
            reply_flags = sc.reply.flags;
        }
    }
    if !tcp_reopens(v.flags, reply_flags) {
        return false;
    }
    // Masqueraded, the SNAT entry is keyed by the client's tuple to the
    // backend.
    let mut snat = false;
    if v.flags & NAT_MASQUERADE != 0
        && let Some(s) = PALISADE_SVC_NAT.get_ptr(&to_backend)
    {
        // SAFETY: as above.
        let s = unsafe { *s };
        if s.flags & (NAT_MASQUERADE | NAT_REPLY | NAT_AFTER_POLICY)
            == NAT_MASQUERADE | NAT_AFTER_POLICY
        {
            sc.snat = s;
            snat = true;
        }
    }
    sc.tuple = to_backend;
    forget_connection(sc, snat, reply);
    sc.tuple = forward;
    // Without its reply entry nothing above named the forward entry.
    if !reply {
        let _ = PALISADE_SVC_NAT.remove(&sc.tuple);
    }
    true
}
