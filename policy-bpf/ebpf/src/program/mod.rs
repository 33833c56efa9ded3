//! The TC programs themselves (built for the BPF target only): the entry
//! points, `process` (one packet judged at one hook), and the modules they
//! draw on.

use aya_ebpf::bindings::{BPF_F_MMAPABLE, BPF_NOEXIST, TC_ACT_SHOT};
use aya_ebpf::cty::c_void;
use aya_ebpf::helpers::{
    bpf_get_prandom_u32, bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_loop,
    bpf_redirect_peer, bpf_skb_load_bytes,
};
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf};
use aya_ebpf::programs::TcContext;
use policy_bpf_common::*;

/// TCX_NEXT: let the next program (or the stack) decide.
const PASS: i32 = -1;
const DROP: i32 = TC_ACT_SHOT;
/// `process`'s verdict on a packet policy allowed: it passes, or goes
/// straight to a local endpoint (see `palisade_from_pod`). Not a TC
/// return code.
const ALLOWED: i32 = -2;
/// `process`'s verdict on a new connection from a pod to a local
/// endpoint that the pod's egress policy allowed: its approval is in
/// the skb's control block (see [`stash`]) for the receiver's
/// judgement, to be tail-called next. Not a TC return code.
const DEFERRED: i32 = -3;
/// Marks `skb->cb` as holding a deferred approval ("PAL1").
const STASH_MAGIC: u32 = 0x5041_4c31;
const ETH_HLEN: usize = 14;

mod conntrack;
mod delivery;
mod maps;
mod packet;
mod report;
mod service;
mod sock;
mod sock_peer;
mod walk;
use conntrack::*;
use delivery::*;
use maps::*;
use packet::*;
use report::*;
use walk::*;

/// Judges a packet as the `direction` hook of interface `ifindex`
/// would (the interface it arrived on, or the local endpoint's it is
/// being delivered to). `sender` is the other side's deferred
/// approval, recorded with this side's when the connection is new
/// (none: interface 0). `related`: an ICMP error is first looked up as
/// the connection it quotes. The phases: the interface's zone, parsing,
/// fragments, the connection table, and for a new flow the slot, the
/// peer's class, the walk and the approval.
// Keys in this CPU's scratch go to the map helpers by reference: by value
// they would be copied onto the 512-byte stack.
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "scratch keys stay off the stack"
)]
#[inline(always)]
fn process(ctx: &TcContext, direction: u8, ifindex: u32, sender: Approval, related: bool) -> i32 {
    let Some(zone) = interface_zone(ifindex) else {
        stat(Statistic::Unmanaged);
        return PASS;
    };
    let Some(scratch) = PALISADE_SCRATCH.get_ptr_mut(0) else {
        return DROP;
    };
    // SAFETY: the per-CPU scratch slot is owned by this program run (TC
    // programs do not nest on a CPU).
    let sc = unsafe { &mut *scratch };
    let bytes = Skb {
        ctx,
        data: ctx.data(),
        data_end: ctx.data_end(),
    };
    clear(&mut sc.parsed);
    match parse_into(&bytes, &mut sc.parsed) {
        Ok(()) => {}
        Err(ParseError::NotIp) => {
            stat(Statistic::NonIp);
            return PASS;
        }
        Err(ParseError::Malformed) => {
            stat(Statistic::Malformed);
            // Whatever was parsed before the failure is reported as is.
            drop_event(&sc.parsed, ifindex, direction, EventReason::Malformed);
            return DROP;
        }
    }
    let p = &sc.parsed;
    // Neighbour discovery and multicast listener reports keep IPv6
    // working on the link; policy is for traffic.
    if is_link_control(p) {
        return PASS;
    }
    let cfg = config();
    // Jiffies are enough for idle timeouts, and the cheapest clock: a
    // nanosecond one (even the coarse one) costs about 10 ns a packet.
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_jiffies64() };

    // The fragment key, only for fragments (later ones are looked up
    // here; an allowed first one is recorded at the end).
    if p.fragment {
        fragment_key(p, zone, &mut sc.frag);
    }
    if p.later_fragment {
        if PALISADE_FRAGS.get_ptr(&sc.frag).is_some() {
            return ALLOWED;
        }
        stat(Statistic::Fragment);
        drop_event(p, ifindex, direction, EventReason::Fragment);
        return DROP;
    }

    // An ICMP error is judged first by the connection it quotes: one
    // this endpoint approved takes it along (conntrack's RELATED, which
    // Calico accepts with ESTABLISHED), so a path MTU or a port
    // unreachable reaches the socket under any policy. Otherwise policy
    // judges the error itself.
    let quoted = related && is_icmp_error(&sc.parsed) && quote(ctx, sc);
    let p = if quoted { &sc.quote } else { &sc.parsed };
    let a_is_src = ct_key(p, &mut sc.ct, &mut sc.ct4);
    let conn = Conn {
        // The quote's family is the error's: one pointer on both paths,
        // which the verifier's states then share.
        family: &sc.parsed.family,
        key: &sc.ct,
        key4: &sc.ct4,
        probe: &raw mut sc.probe,
        ways: (cfg.ct_sets_mask + 1) * CT_WAYS,
        log4: &raw mut sc.log4,
        log6: &raw mut sc.log6,
    };
    conn.lookup(&cfg, now);
    // The side of the connection this interface's endpoint is on: a
    // quoted packet's sender at its ingress (the error comes back to
    // it), its receiver at its egress.
    let local_src = (direction == HookDirection::Egress.code()) != quoted;
    let side = Side {
        local_is_a: a_is_src == local_src,
        a_is_src,
    };
    if established(ctx, p, &conn, side, ifindex, &cfg, now) {
        stat(Statistic::Established);
        return ALLOWED;
    }
    let p = &sc.parsed;

    // New flow: find the endpoint's slot (its address on this
    // interface: anything else is spoofed), classify the peer and walk
    // the slot's program.
    let Some(root) = slot_root(p, direction, ifindex, &mut sc.slot) else {
        stat(Statistic::Spoofed);
        drop_event(p, ifindex, direction, EventReason::Spoofed);
        return DROP;
    };
    stat(Statistic::NewFlows);
    let Some(v) = judge(p, direction, root) else {
        stat(Statistic::Walk);
        drop_event(p, ifindex, direction, EventReason::Walk);
        return DROP;
    };
    count(v.rule, ctx.len());
    if !v.allow {
        event(
            p,
            ifindex,
            direction,
            false,
            v.rule,
            EventReason::Policy,
            v.logged,
        );
        return DROP;
    }
    // A new connection from this pod to a local endpoint: the approval
    // rides with the packet to the receiver's judgement, tail-called
    // next, which records both sides in one insert. Recorded here, the
    // receiver would join the entry with locked instructions that wait
    // for this insert's write (a cache miss in a large table) to land.
    // An ICMP error the policy allowed opens nothing: not recorded.
    let opens = !is_icmp_error(p);
    let deferred = opens
        && direction == HookDirection::Egress.code()
        && !p.fragment
        && conn.hit().is_none()
        && local_receiver(ctx, ifindex, &mut sc.local).is_some();
    if deferred {
        stash(ctx, v.rule, ifindex);
    } else if opens {
        match approve(
            &conn,
            side.local_is_a,
            a_is_src,
            v.rule,
            ifindex,
            now,
            sender,
        ) {
            Record::Done => {}
            // The policy allowed this packet, so it passes; later
            // packets are judged by policy again.
            Record::Full => stat(Statistic::CtFull),
            Record::Contended => stat(Statistic::CtContended),
        }
    }
    if p.fragment {
        let _ = PALISADE_FRAGS.insert(&sc.frag, now, u64::from(BPF_NOEXIST));
    }
    if cfg.allow_sample > 0 {
        // SAFETY: helper without preconditions.
        let r = unsafe { bpf_get_prandom_u32() };
        if r % cfg.allow_sample == 0 {
            event(
                p,
                ifindex,
                direction,
                true,
                v.rule,
                EventReason::Policy,
                v.logged,
            );
        }
    }
    if deferred { DEFERRED } else { ALLOWED }
}

/// Parses the packet the ICMP error in `sc.parsed` quotes into
/// `sc.quote` (see [`parse_quote`]); false when it quotes none. A
/// function of its own: its frame is gone before the lookup runs.
#[inline(never)]
fn quote(ctx: &TcContext, sc: &mut Scratch) -> bool {
    let bytes = Skb {
        ctx,
        data: ctx.data(),
        data_end: ctx.data_end(),
    };
    clear(&mut sc.quote);
    parse_quote(&bytes, &sc.parsed, &mut sc.quote)
}

/// The pod's egress policy: packets the pod sends.
// The macro's entry point calls this function: inlined, the program
// is one function (a BPF-to-BPF call costs a frame on every packet).
#[classifier]
#[inline(always)]
pub fn palisade_from_pod(ctx: TcContext) -> i32 {
    let from = arrival(&ctx);
    let deliver = match process(
        &ctx,
        HookDirection::Egress.code(),
        from,
        Approval::NONE,
        true,
    ) {
        DEFERRED => true,
        ALLOWED => match PALISADE_SCRATCH.get_ptr_mut(0) {
            // An ICMP error takes the node's forwarding to the receiver's
            // `palisade_to_pod`, which looks for the connection it is
            // about (`palisade_to_pod_local` does not: the verifier's
            // limits).
            // SAFETY: this CPU's scratch (TC programs do not nest), so
            // no other reference to it is live.
            Some(sc) if !is_icmp_error(unsafe { &(*sc).parsed }) => {
                // SAFETY: as above.
                local_receiver(&ctx, from, unsafe { &mut (*sc).local }).is_some() && {
                    clear_stash(&ctx);
                    true
                }
            }
            _ => false,
        },
        r => return r,
    };
    if deliver {
        // SAFETY: the target is a TC program taking the same context;
        // this returns only when the slot is empty (then a deferred
        // approval is lost: the connection's next packet is judged
        // again).
        unsafe { PALISADE_DELIVER.tail_call(&ctx, DELIVER_LOCAL) };
    }
    reply_nat(&ctx, DELIVER_REPLY_NAT)
}

/// Hands a packet policy allowed to the reply translation when Services
/// are programmed (`slot`: then passes, or hands over); else, or if the
/// slot is empty, it passes.
#[inline(always)]
fn reply_nat(ctx: &TcContext, slot: u32) -> i32 {
    if service::services_enabled() {
        // SAFETY: the targets are TC programs taking the same context;
        // this returns only when the slot is empty.
        unsafe { PALISADE_DELIVER.tail_call(ctx, slot) };
    }
    PASS
}

/// The pod's ingress policy: packets sent to the pod.
#[classifier]
#[inline(always)]
pub fn palisade_to_pod(ctx: TcContext) -> i32 {
    match process(
        &ctx,
        HookDirection::Ingress.code(),
        arrival(&ctx),
        Approval::NONE,
        true,
    ) {
        ALLOWED => reply_nat(&ctx, DELIVER_REPLY_NAT),
        r => r,
    }
}

/// The receiver's ingress policy for a packet `palisade_from_pod`
/// allowed to a local endpoint (only ever tail-called from there): the
/// judgement `palisade_to_pod` makes on the receiver's interface, then
/// the hand-over. It finds the receiver again rather than taking it
/// from the caller: a caller of another build (during a restart) shares
/// only the pinned maps with it. A packet it does not judge (say, an
/// interface no longer managed) passes, takes the node's forwarding,
/// and meets `palisade_to_pod` there.
#[classifier]
pub fn palisade_to_pod_local(ctx: TcContext) -> i32 {
    let Some(sc) = PALISADE_SCRATCH.get_ptr_mut(0) else {
        return PASS;
    };
    // SAFETY: this CPU's scratch (TC programs do not nest on a CPU).
    let Some((ep, family)) = local_receiver(&ctx, arrival(&ctx), unsafe { &mut (*sc).local })
    else {
        return PASS;
    };
    match process(
        &ctx,
        HookDirection::Ingress.code(),
        ep.ifindex,
        unstash(&ctx),
        false,
    ) {
        ALLOWED | DEFERRED => {
            if service::services_enabled() {
                // SAFETY: as in `reply_nat`; an empty slot returns here.
                unsafe { PALISADE_DELIVER.tail_call(&ctx, DELIVER_REPLY_NAT_LOCAL) };
            }
            hand_over(&ctx, &ep, family)
        }
        r => r,
    }
}

/// Reports the conntrack clock to user space, which runs it with
/// BPF_PROG_TEST_RUN (never attached): writes jiffies, then coarse
/// monotonic nanoseconds, over the start of the packet.
#[classifier]
pub fn palisade_clock(ctx: TcContext) -> i32 {
    // SAFETY: helpers without preconditions.
    let now = unsafe { [bpf_jiffies64(), bpf_ktime_get_coarse_ns()] };
    match ctx.store(0, &now, 0) {
        Ok(()) => PASS,
        Err(_) => DROP,
    }
}

/// Does nothing but pass: the baseline benchmarks subtract, measured in
/// the same run, so reported costs are what policy adds.
#[classifier]
pub fn palisade_pass(_ctx: TcContext) -> i32 {
    PASS
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
