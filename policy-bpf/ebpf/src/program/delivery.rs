//! Local delivery: a sender's approval stashed in the skb's control block,
//! the receiving endpoint looked up, and the hand-over by peer redirect.

use super::*;

/// One side's approval of a connection: its rule and interface.
#[derive(Clone, Copy)]
pub(super) struct Approval {
    pub(super) rule: u32,
    /// 0: no approval.
    pub(super) ifindex: u32,
}

impl Approval {
    pub(super) const NONE: Approval = Approval {
        rule: 0,
        ifindex: 0,
    };
}

/// Puts a deferred approval in the skb's control block, which the tail
/// call keeps: `[STASH_MAGIC, rule, ifindex]`. The caller writes the
/// block right before every tail call (see [`clear_stash`]), so the
/// receiver never reads another packet's or layer's bytes as one.
#[inline(always)]
pub(super) fn stash(ctx: &TcContext, rule: u32, ifindex: u32) {
    // SAFETY: `cb` is the context's scratch words, writable by TC
    // programs.
    unsafe {
        let skb = ctx.skb.skb;
        (*skb).cb[0] = STASH_MAGIC;
        (*skb).cb[1] = rule;
        (*skb).cb[2] = ifindex;
    }
}

/// Marks the control block as holding no deferred approval.
#[inline(always)]
pub(super) fn clear_stash(ctx: &TcContext) {
    // SAFETY: as in `stash`.
    unsafe { (*ctx.skb.skb).cb[0] = 0 };
}

/// Takes the deferred approval out of the control block, if any.
#[inline(always)]
pub(super) fn unstash(ctx: &TcContext) -> Approval {
    // SAFETY: as in `stash`.
    unsafe {
        let skb = ctx.skb.skb;
        if (*skb).cb[0] != STASH_MAGIC {
            return Approval::NONE;
        }
        (*skb).cb[0] = 0;
        Approval {
            rule: (*skb).cb[1],
            ifindex: (*skb).cb[2],
        }
    }
}

/// The interface a packet arrived on.
#[inline(always)]
pub(super) fn arrival(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's run.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// The local endpoint a frame is addressed to, and its IP family,
/// when it is one and the frame is for local delivery: Ethernet then
/// IP in the linear data (a pod's veth carries no VLAN tags), with a
/// hop left, not from the endpoint's own interface `from`. Read from
/// the frame, not from a parse another program made.
#[inline(always)]
pub(super) fn local_receiver(
    ctx: &TcContext,
    from: u32,
    key: &mut LocalKey,
) -> Option<(LocalEndpoint, u8)> {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + ETH_HLEN + 20 > end {
        return None;
    }
    key.pad = [0; 3];
    let b = data as *const u8;
    let words = key.addr.as_mut_ptr().cast::<u32>();
    // SAFETY: every read is of packet bytes inside the bounds checked
    // before it (`data + ETH_HLEN + 20/40 <= end`), unaligned reads where
    // unaligned; every write is to the key's address, which is 4-aligned
    // and four words long.
    let family = unsafe {
        match (*b.add(12), *b.add(13)) {
            (0x08, 0x00) => {
                if *b.add(ETH_HLEN + 8) <= 1 {
                    return None;
                }
                words.write(b.add(ETH_HLEN + 16).cast::<u32>().read_unaligned());
                words.add(1).write(0);
                words.add(2).write(0);
                words.add(3).write(0);
                AddressFamily::V4.code()
            }
            (0x86, 0xdd) => {
                if data + ETH_HLEN + 40 > end || *b.add(ETH_HLEN + 7) <= 1 {
                    return None;
                }
                let dst = b.add(ETH_HLEN + 24).cast::<u32>();
                words.write(dst.read_unaligned());
                words.add(1).write(dst.add(1).read_unaligned());
                words.add(2).write(dst.add(2).read_unaligned());
                words.add(3).write(dst.add(3).read_unaligned());
                AddressFamily::V6.code()
            }
            _ => return None,
        }
    };
    key.family = family;
    // SAFETY: a value of the map, written whole by user space.
    let ep = unsafe { *PALISADE_ENDPOINTS.get_ptr(key)? };
    (ep.ifindex != from && ep.ifindex != 0).then_some((ep, family))
}

/// Hands an allowed packet to a local endpoint: what
/// the node's forwarding would write (the pod's and the host side's
/// MACs, one hop less), then straight into the pod's end of the veth.
#[inline(always)]
pub(super) fn hand_over(ctx: &TcContext, ep: &LocalEndpoint, family: u8) -> i32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + ETH_HLEN + 20 > end {
        return PASS;
    }
    let b = data as *mut u8;
    // SAFETY: inside the bounds checked above (the IPv6 hop limit is
    // at ETH_HLEN + 7); `local_receiver` checked the EtherType and
    // that a hop is left.
    unsafe {
        let mut i = 0;
        while i < 6 {
            *b.add(i) = ep.pod_mac[i];
            *b.add(6 + i) = ep.host_mac[i];
            i += 1;
        }
        if family == AddressFamily::V4.code() {
            *b.add(ETH_HLEN + 8) -= 1;
            // RFC 1624's incremental update, as the kernel's
            // ip_decrease_ttl: the TTL is the high byte of its word.
            let at = b.add(ETH_HLEN + 10).cast::<u16>();
            let check = u32::from(at.read_unaligned()) + u32::from(0x0100u16.to_be());
            at.write_unaligned((check + u32::from(check >= 0xffff)) as u16);
        } else {
            *b.add(ETH_HLEN + 7) -= 1;
        }
    }
    stat(Statistic::Delivered);
    // SAFETY: helper without preconditions; TC_ACT_REDIRECT with no
    // flags, and this runs at TC ingress (tail-called from the
    // sender's hook), where a peer redirect is allowed.
    unsafe { bpf_redirect_peer(ep.ifindex, 0) as i32 }
}
