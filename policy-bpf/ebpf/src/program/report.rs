//! What the programs report: statistics, per-rule counters and events on
//! the ring buffer.

use super::*;

#[inline(always)]
pub(super) fn stat(s: Statistic) {
    if let Some(p) = PALISADE_STATS.get_ptr_mut(s.code()) {
        // SAFETY: per-CPU slot; no other program touches it concurrently.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub(super) fn count(rule: u32, bytes: u32) {
    if let Some(c) = PALISADE_COUNTERS.get_ptr_mut(rule) {
        // SAFETY: per-CPU slot owned by this CPU while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(bytes);
        }
    }
}

/// A drop before any policy decided (no rule, not logged).
#[inline(always)]
pub(super) fn drop_event(p: &Parsed, ifindex: u32, direction: u8, reason: EventReason) {
    event(p, ifindex, direction, false, 0, reason, false);
}

#[inline(always)]
pub(super) fn event(
    p: &Parsed,
    ifindex: u32,
    direction: u8,
    allow: bool,
    rule: u32,
    reason: EventReason,
    logged: bool,
) {
    match PALISADE_EVENTS.reserve::<Event>(0) {
        Some(mut e) => {
            let (sp, dp) = if p.protocol == 1 || p.protocol == 58 {
                ((u16::from(p.icmp_type) << 8) | u16::from(p.icmp_code), 0)
            } else {
                (p.src_port, p.dst_port)
            };
            let ev = e.as_mut_ptr();
            // SAFETY: `ev` points at a reserved, writable ring-buffer
            // record of size_of::<Event>(); every field is written before
            // submit, so the record is fully initialised.
            unsafe {
                (*ev).ts_ns = bpf_ktime_get_ns();
                (*ev).rule = rule;
                (*ev).ifindex = ifindex;
                (*ev).allow = allow as u8;
                (*ev).direction = direction;
                (*ev).family = p.family;
                (*ev).protocol = p.protocol;
                (*ev).reason = reason.code();
                (*ev).flags = if logged { EVENT_LOGGED } else { 0 };
                (*ev).src_port = sp;
                (*ev).dst_port = dp;
                // Three halfword stores (pad2 is 2-aligned, checked
                // above); an array store compiles to a memset call.
                let pad = (*ev).pad2.as_mut_ptr().cast::<u16>();
                pad.write_volatile(0);
                pad.add(1).write_volatile(0);
                pad.add(2).write_volatile(0);
                copy_addr(&mut (*ev).src, &p.src);
                copy_addr(&mut (*ev).dst, &p.dst);
            }
            e.submit(0);
        }
        None => stat(Statistic::EventsLost),
    }
}
