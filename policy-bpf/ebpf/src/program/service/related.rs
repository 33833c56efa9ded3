//! ICMP errors about translated flows, NATed as conntrack NATs a flow's
//! RELATED packets: a port unreachable from a backend, a "fragmentation
//! needed" or "packet too big" from a router on the way, quote the packet
//! as it was translated (client to backend); the client's socket is
//! connected to the frontend and would never see them. The quoted
//! packet is turned back into what its sender sent (client to frontend,
//! and to the client's own port when masqueraded) and the error is
//! readdressed as a reply of that flow would be; its source moves only
//! when it was the translated address itself (a backend's own error, now
//! from the frontend; a router's keeps its address).
//!
//! The error is translated as the reply the quoted packet would have
//! had: `R`, the quote reversed, meets the NAT entry a reply would, and
//! the quote becomes `R'` reversed, `R'` the reply as rewritten. Entries
//! applied after policy are applied at the same places as for the flow's
//! own packets.

use super::*;

const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

/// Where an ICMP error's parts are: the outer addresses at the usual
/// offsets, the ICMP checksum, and the quoted packet's headers.
pub(super) struct IcmpError {
    family: u8,
    /// The ICMP checksum's offset.
    checksum: usize,
    inner_l3: usize,
    inner_l4: usize,
}

/// An ICMP error quoting a TCP, UDP or SCTP packet: its parts, the quote
/// reversed (the reply's tuple, `R`) in `sc.tuple`, and the outer
/// addresses in `sc.next` (ports 0). None for anything else.
#[inline(never)]
pub(super) fn icmp_error(ctx: &TcContext) -> Option<IcmpError> {
    let bytes = Skb {
        ctx,
        data: ctx.data(),
        data_end: ctx.data_end(),
    };
    let ethertype = u16::from_be_bytes(bytes.fixed::<2>(12)?);
    let (family, l4) = match ethertype {
        ETH_P_IP => {
            let [version_ihl] = bytes.fixed::<1>(L3)?;
            let fragment = u16::from_be_bytes(bytes.fixed::<2>(L3 + 6)?);
            if version_ihl & 0x0f != 5
                || fragment & 0x3fff != 0
                || bytes.fixed::<1>(L3 + 9)? != [ICMP]
            {
                return None;
            }
            (FAMILY_V4, L3 + 20)
        }
        ETH_P_IPV6 if bytes.fixed::<1>(L3 + 6)? == [ICMPV6] => (FAMILY_V6, L3 + 40),
        _ => return None,
    };
    let [kind] = bytes.fixed::<1>(l4)?;
    // Destination unreachable, time exceeded, parameter problem (ICMPv6:
    // and packet too big): the errors that quote a packet.
    let error = if family == FAMILY_V4 {
        matches!(kind, 3 | 11 | 12)
    } else {
        matches!(kind, 1..=4)
    };
    if !error {
        return None;
    }
    let inner_l3 = l4 + 8;
    let (inner_l4, protocol) = if family == FAMILY_V4 {
        let [version_ihl] = bytes.fixed::<1>(inner_l3)?;
        if version_ihl != 0x45 {
            return None;
        }
        (inner_l3 + 20, bytes.fixed::<1>(inner_l3 + 9)?[0])
    } else {
        (inner_l3 + 40, bytes.fixed::<1>(inner_l3 + 6)?[0])
    };
    if !matches!(protocol, TCP | UDP | SCTP) {
        return None;
    }
    // Written straight into scratch: the stack is the programs' scarcest
    // resource (512 bytes for the whole call chain).
    let sc = scratch()?;
    let (src_at, dst_at) = addr_offsets(family);
    // The quoted packet's addresses sit at the same offsets from its own
    // header as the outer ones from theirs.
    let (inner_src, inner_dst) = (inner_l3 + src_at - L3, inner_l3 + dst_at - L3);
    sc.tuple = NatTuple::default();
    sc.next = NatTuple::default();
    if family == FAMILY_V4 {
        sc.tuple.src[..4].copy_from_slice(&bytes.fixed::<4>(inner_dst)?);
        sc.tuple.dst[..4].copy_from_slice(&bytes.fixed::<4>(inner_src)?);
        sc.next.src[..4].copy_from_slice(&bytes.fixed::<4>(src_at)?);
        sc.next.dst[..4].copy_from_slice(&bytes.fixed::<4>(dst_at)?);
    } else {
        sc.tuple.src = bytes.fixed::<16>(inner_dst)?;
        sc.tuple.dst = bytes.fixed::<16>(inner_src)?;
        sc.next.src = bytes.fixed::<16>(src_at)?;
        sc.next.dst = bytes.fixed::<16>(dst_at)?;
    }
    let ports = bytes.fixed::<4>(inner_l4)?;
    sc.tuple.src_port = u16::from_be_bytes([ports[2], ports[3]]);
    sc.tuple.dst_port = u16::from_be_bytes([ports[0], ports[1]]);
    sc.tuple.protocol = protocol;
    sc.tuple.family = family;
    sc.next.family = family;
    Some(IcmpError {
        family,
        checksum: l4 + 2,
        inner_l3,
        inner_l4,
    })
}

/// An ICMP error before policy: translated by the entry its reply tuple
/// meets, then (masqueraded, where no policy program follows) by the
/// after-policy entry the result meets. PASS, or DROP when a rewrite
/// failed.
#[inline(never)]
pub(super) fn related_before_policy(ctx: &TcContext) -> i32 {
    let Some(e) = icmp_error(ctx) else {
        return PASS;
    };
    let Some(sc) = scratch() else {
        return PASS;
    };
    if !may_have_entry(&sc.tuple) {
        return PASS;
    }
    let Some(v) = PALISADE_SVC_NAT.get_ptr(&sc.tuple) else {
        return PASS;
    };
    // SAFETY: a map value stays valid for the rest of this run (RCU);
    // only read.
    let v = unsafe { &*v };
    let managed = interface_zone(arrival(ctx)).is_some();
    if v.flags & NAT_AFTER_POLICY != 0 && managed {
        // The policy programs hand it to `palisade_reply_nat`.
        return PASS;
    }
    if rewrite_error(ctx, &e, sc, v).is_err() {
        return DROP;
    }
    stat(Statistic::ServiceTranslated);
    if !managed && v.flags & (NAT_AFTER_POLICY | NAT_MASQUERADE) == NAT_MASQUERADE {
        let Some(after) = PALISADE_SVC_NAT.get_ptr(&sc.tuple) else {
            return PASS;
        };
        // SAFETY: as above.
        let after = unsafe { &*after };
        if after.flags & NAT_AFTER_POLICY != 0 && rewrite_error(ctx, &e, sc, after).is_err() {
            return DROP;
        }
    }
    PASS
}

/// An ICMP error the policy programs allowed: translated by the
/// after-policy entry its reply tuple meets. 1 when translated, 0 when
/// not one, -1 when a rewrite failed.
#[inline(never)]
pub(super) fn related_after_policy(ctx: &TcContext) -> i32 {
    let Some(e) = icmp_error(ctx) else {
        return 0;
    };
    let Some(sc) = scratch() else {
        return 0;
    };
    let Some(v) = PALISADE_SVC_NAT.get_ptr(&sc.tuple) else {
        return 0;
    };
    // SAFETY: a map value stays valid for the rest of this run (RCU);
    // only read.
    let v = unsafe { &*v };
    if v.flags & NAT_AFTER_POLICY == 0 {
        return 0;
    }
    if rewrite_error(ctx, &e, sc, v).is_err() {
        return -1;
    }
    stat(Statistic::ServiceTranslated);
    1
}

/// Rewrites the error as entry `v` rewrites its reply tuple (`sc.tuple`,
/// `R`): the quote becomes `R'` reversed, the outer source and
/// destination move where they were `R`'s. `sc.tuple` becomes `R'` and
/// `sc.next` the new outer addresses.
#[inline(never)]
fn rewrite_error(
    ctx: &TcContext,
    e: &IcmpError,
    sc: &mut ServiceScratch,
    v: &NatValue,
) -> Result<(), i64> {
    // `R'` in scratch, next to `R` (`sc.tuple`): no copies on the stack.
    sc.snat_key = sc.tuple.rewritten(v);
    let (r, to) = (&sc.tuple, &sc.snat_key);
    let (src_at, dst_at) = addr_offsets(e.family);
    let (inner_src, inner_dst) = (e.inner_l3 + src_at - L3, e.inner_l3 + dst_at - L3);
    // The quote's source is the reply's destination, and so on.
    error_addr(ctx, e, inner_src, e.inner_l3, false, &r.dst, &to.dst)?;
    error_addr(ctx, e, inner_dst, e.inner_l3, false, &r.src, &to.src)?;
    inner_port(ctx, e, e.inner_l4, r.dst_port, to.dst_port)?;
    inner_port(ctx, e, e.inner_l4 + 2, r.src_port, to.src_port)?;
    if sc.next.src == r.src {
        error_addr(ctx, e, src_at, L3, true, &r.src, &to.src)?;
        sc.next.src = to.src;
    }
    if sc.next.dst == r.dst {
        error_addr(ctx, e, dst_at, L3, true, &r.dst, &to.dst)?;
        sc.next.dst = to.dst;
    }
    sc.tuple = sc.snat_key;
    Ok(())
}

/// An address of the error, in the IPv4 header at `header` (the quote's
/// or the outer one), whose checksum follows it (which keeps the ICMP
/// checksum over a quoted header unchanged); with IPv6, ICMPv6's
/// checksum covers it: directly when quoted, through its pseudo-header
/// when outer (`pseudo`).
#[inline(always)]
fn error_addr(
    ctx: &TcContext,
    e: &IcmpError,
    at: usize,
    header: usize,
    pseudo: bool,
    old: &[u8; 16],
    new: &[u8; 16],
) -> Result<(), i64> {
    let words = if e.family == FAMILY_V4 { 1 } else { 4 };
    for i in 0..4 {
        if i >= words {
            break;
        }
        let (from, to) = (word(old, i), word(new, i));
        if from == to {
            continue;
        }
        if e.family == FAMILY_V4 {
            ctx.l3_csum_replace(header + 10, u64::from(from), u64::from(to), 4)?;
        } else {
            let flags = if pseudo {
                u64::from(BPF_F_PSEUDO_HDR)
            } else {
                0
            } | 4;
            ctx.l4_csum_replace(e.checksum, u64::from(from), u64::from(to), flags)?;
        }
        ctx.store(at + 4 * i, &to, 0)?;
    }
    Ok(())
}

/// A quoted port: the ICMP checksum covers it. The quoted transport
/// checksum is left (it may be cut off; no receiver checks it).
#[inline(always)]
fn inner_port(ctx: &TcContext, e: &IcmpError, at: usize, old: u16, new: u16) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    let (from, to) = (old.to_be(), new.to_be());
    ctx.l4_csum_replace(e.checksum, u64::from(from), u64::from(to), 2)?;
    ctx.store(at, &to, 0)
}
