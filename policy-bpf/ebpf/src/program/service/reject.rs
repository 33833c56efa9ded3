//! REJECT as kube-proxy's `reject` does it: the packet turned into ICMP
//! port unreachable (ICMPv6 1/4) to its sender, quoting its headers, and
//! sent back out of the interface it came in on.

use aya_ebpf::bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_NET;
use aya_ebpf::helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail};

use super::*;

/// Folds a 32-bit one's-complement sum to the checksum field's value.
#[inline(always)]
fn fold(sum: i64) -> u16 {
    let mut s = (sum as u64) & 0xffff_ffff;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// One's-complement sum of `n` bytes at `p` (a multiple of 4) on `seed`.
#[inline(always)]
fn sum(p: *mut u8, n: u32, seed: u32) -> i64 {
    // SAFETY: `p` points to `n` readable bytes of scratch memory.
    unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p.cast(), n, seed) }
}

/// Turns the packet into ICMP port unreachable to its sender (type 3
/// code 3; ICMPv6 type 1 code 4) quoting its IP header and the start of
/// its transport header, and sends it back
/// out of the interface it came in on. The packet is cut to the quoted
/// length, then room for the new headers is opened after its IP header.
#[inline(never)]
pub(super) fn reject(ctx: &TcContext, h: &Headers) -> i32 {
    match answer_unreachable(ctx, h) {
        Ok(r) => r,
        Err(_) => DROP,
    }
}

/// Fills `dst` (scratch memory) from `offset` of the packet; the length
/// is the slice's, a constant here (aya's `load_bytes` clamps it to the
/// packet, a length the verifier cannot bound away from zero).
#[inline(always)]
fn load_bytes(ctx: &TcContext, offset: usize, dst: &mut [u8]) -> Result<(), i64> {
    // SAFETY: the context's own skb; `dst` is writable for its length.
    let r = unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            offset as u32,
            dst.as_mut_ptr().cast(),
            dst.len() as u32,
        )
    };
    if r == 0 { Ok(()) } else { Err(r) }
}

/// Stores `bytes` (scratch memory) at `offset` of the packet.
#[inline(always)]
fn store_bytes(ctx: &TcContext, offset: usize, bytes: &[u8]) -> Result<(), i64> {
    // SAFETY: the context's own skb; `bytes` is readable for its length.
    let r = unsafe {
        aya_ebpf::helpers::bpf_skb_store_bytes(
            ctx.skb.skb,
            offset as u32,
            bytes.as_ptr().cast(),
            bytes.len() as u32,
            0,
        )
    };
    if r == 0 { Ok(()) } else { Err(r) }
}

#[inline(always)]
fn answer_unreachable(ctx: &TcContext, h: &Headers) -> Result<i32, i64> {
    // The transport header is quoted up to its checksum at least: the
    // kernel will not cut a packet whose checksum is left to the device
    // (CHECKSUM_PARTIAL, as a pod's are) short of that field.
    match h.protocol {
        TCP => unreachable::<20>(ctx, h),
        SCTP => unreachable::<12>(ctx, h),
        _ => unreachable::<8>(ctx, h),
    }
}

/// [`answer_unreachable`] quoting `Q` bytes of the transport header.
#[inline(always)]
fn unreachable<const Q: usize>(ctx: &TcContext, h: &Headers) -> Result<i32, i64> {
    let sc = scratch().ok_or(0i64)?;
    let (ip_len, inserted) = if h.family == FAMILY_V4 {
        (20usize, 28i32)
    } else {
        (40usize, 48i32)
    };
    // The quote: the original IP header and the transport header's start.
    let icmp = &mut sc.icmp;
    *icmp = IcmpScratch::ZERO;
    if h.family == FAMILY_V4 {
        load_bytes(ctx, L3, &mut icmp.message[8..28 + Q])?;
    } else {
        load_bytes(ctx, L3, &mut icmp.message[8..48 + Q])?;
    }
    load_bytes(ctx, 0, &mut sc.macs)?;
    let skb = ctx.skb.skb;
    // SAFETY: the context's own skb.
    if unsafe { bpf_skb_change_tail(skb, (L3 + ip_len + Q) as u32, 0) } != 0 {
        return Ok(DROP);
    }
    ctx.adjust_room(inserted, BPF_ADJ_ROOM_NET, 0)?;
    store_bytes(ctx, 0, &sc.macs[6..])?;
    store_bytes(ctx, 6, &sc.macs[..6])?;
    let t = &sc.tuple;
    let icmp = &mut sc.icmp;
    if h.family == FAMILY_V4 {
        icmp.message[0] = 3;
        icmp.message[1] = 3;
        let c = fold(sum(icmp.message.as_mut_ptr(), (28 + Q) as u32, 0));
        icmp.message[2..4].copy_from_slice(&c.to_ne_bytes());
        let ip = &mut icmp.header;
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + 28 + Q) as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = 1;
        ip[12..16].copy_from_slice(&t.dst[..4]);
        ip[16..20].copy_from_slice(&t.src[..4]);
        let c = fold(sum(ip.as_mut_ptr(), 20, 0));
        ip[10..12].copy_from_slice(&c.to_ne_bytes());
        store_bytes(ctx, L3, &icmp.header[..20])?;
        store_bytes(ctx, L3 + 20, &icmp.message[..28])?;
    } else {
        icmp.message[0] = 1;
        icmp.message[1] = 4;
        let length = (48 + Q) as u32;
        // The pseudo-header: source, destination, length, next header.
        let pseudo = &mut icmp.pseudo;
        pseudo[..16].copy_from_slice(&t.dst);
        pseudo[16..32].copy_from_slice(&t.src);
        pseudo[32..36].copy_from_slice(&length.to_be_bytes());
        pseudo[39] = 58;
        let seed = sum(pseudo.as_mut_ptr(), 40, 0) as u32;
        let c = fold(sum(icmp.message.as_mut_ptr(), length, seed));
        icmp.message[2..4].copy_from_slice(&c.to_ne_bytes());
        let ip = &mut icmp.header;
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(length as u16).to_be_bytes());
        ip[6] = 58;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&t.dst);
        ip[24..40].copy_from_slice(&t.src);
        store_bytes(ctx, L3, &icmp.header)?;
        store_bytes(ctx, L3 + 40, &icmp.message[..48])?;
    }
    // SAFETY: the context's own interface.
    Ok(unsafe { bpf_redirect((*skb).ifindex, 0) } as i32)
}
