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
/// (none: interface 0).
// Keys in this CPU's scratch go to the map helpers by reference: by value
// they would be copied onto the 512-byte stack.
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "scratch keys stay off the stack"
)]
#[inline(always)]
fn process(ctx: &TcContext, direction: u8, ifindex: u32, sender: Approval) -> i32 {
    // The interface's zone (one endpoint per interface; keeps
    // fragment tracking apart).
    let zone = match PALISADE_IFACES.get(ifindex) {
        Some(i) if i.managed != 0 => i.zone,
        Some(_) => {
            stat(STAT_UNMANAGED);
            return PASS;
        }
        None => match PALISADE_MANAGED.get_ptr(ifindex) {
            // SAFETY: a u32 written whole by user space.
            Some(z) => unsafe { *z },
            None => {
                stat(STAT_UNMANAGED);
                return PASS;
            }
        },
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
            stat(STAT_NON_IP);
            return PASS;
        }
        Err(ParseError::Malformed) => {
            stat(STAT_MALFORMED);
            // Whatever was parsed before the failure is reported as is.
            event(
                &sc.parsed,
                ifindex,
                direction,
                false,
                0,
                REASON_MALFORMED,
                false,
            );
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
        sc.frag.zone = zone;
        sc.frag.id = p.frag_id;
        sc.frag.family = p.family;
        sc.frag.protocol = p.protocol;
        sc.frag.pad = [0; 2];
        copy_addr(&mut sc.frag.src, &p.src);
        copy_addr(&mut sc.frag.dst, &p.dst);
    }
    if p.later_fragment {
        if PALISADE_FRAGS.get_ptr(&sc.frag).is_some() {
            return ALLOWED;
        }
        stat(STAT_FRAGMENT);
        event(p, ifindex, direction, false, 0, REASON_FRAGMENT, false);
        return DROP;
    }

    let a_is_src = ct_key(p, &mut sc.ct, &mut sc.ct4);
    let conn = Conn {
        family: &sc.parsed.family,
        key: &sc.ct,
        key4: &sc.ct4,
        probe: &raw mut sc.probe,
        ways: (cfg.ct_sets_mask + 1) * CT_WAYS,
        log4: &raw mut sc.log4,
        log6: &raw mut sc.log6,
    };
    conn.lookup(&cfg, now);
    // The side of the connection this interface's endpoint is on.
    let local_is_a = a_is_src == (direction == DIR_EGRESS);
    let approved_bit = if local_is_a {
        CT_APPROVED_A
    } else {
        CT_APPROVED_B
    };
    if let Some((v, word, state)) = conn.hit() {
        // SAFETY: `v` is a way of a conntrack array (valid for the
        // run); fields are read one by one, and the state word is read
        // again afterwards: if the way was reused meanwhile (a new
        // generation), what was read belongs to another connection and
        // is not used. Flags only gain bits here, atomically; approval
        // bits are only set after a policy allow.
        let (flags, last_seen) = unsafe {
            (
                core::ptr::read_volatile(&(*v).flags),
                core::ptr::read_volatile(&(*v).last_seen),
            )
        };
        let closed = flags & CT_RST != 0 || flags & (CT_FIN_A | CT_FIN_B) == (CT_FIN_A | CT_FIN_B);
        let reopened = p.protocol == 6 && closed && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        let expired = ct_expired(&cfg, p.protocol, flags, last_seen, now);
        if !reopened && !expired {
            // SAFETY: `v` is the same live conntrack way read above;
            // volatile reads of its fields (a reuse is caught by the state
            // word's generation check below).
            let (rule, approved_on) = unsafe {
                if local_is_a {
                    (
                        core::ptr::read_volatile(&(*v).rule_a),
                        core::ptr::read_volatile(&(*v).ifindex_a),
                    )
                } else {
                    (
                        core::ptr::read_volatile(&(*v).rule_b),
                        core::ptr::read_volatile(&(*v).ifindex_b),
                    )
                }
            };
            let same_way = atomic::load(word) & !CT_LOCK == state & !CT_LOCK;
            // Approved by this endpoint, on this interface (a packet
            // with the same addresses from elsewhere is not).
            if same_way && flags & approved_bit != 0 && approved_on == ifindex {
                let mut gained = 0;
                if p.protocol == 6 {
                    if p.tcp_flags & TCP_RST != 0 {
                        gained |= CT_RST;
                    }
                    if p.tcp_flags & TCP_FIN != 0 {
                        gained |= if a_is_src { CT_FIN_A } else { CT_FIN_B };
                    }
                }
                // SAFETY: `v` is the live way above; its flags word is
                // naturally aligned (see `flags_word`) and only changed
                // atomically, here and by other CPUs.
                unsafe {
                    if gained & !flags != 0 {
                        atomic::or(flags_word(v), u64::from(gained));
                    }
                    // Once per tick at most: a write per packet would
                    // bounce the line between the CPUs of both sides.
                    if last_seen != now {
                        core::ptr::write_volatile(&raw mut (*v).last_seen, now);
                    }
                }
                count(rule, ctx.len());
                stat(STAT_ESTABLISHED);
                return ALLOWED;
            }
            if !same_way {
                // Reused under us: neither join nor claim it.
                sc.probe.hit = 0;
                sc.probe.free = 0;
            }
        } else {
            conn.retire_hit();
        }
    }

    // New flow: find the endpoint's slot (its address on this
    // interface: anything else is spoofed), classify the peer and walk
    // the slot's program.
    let local = if direction == DIR_EGRESS {
        &p.src
    } else {
        &p.dst
    };
    let fast = match PALISADE_LOCAL4.get_ptr(local4_index(ifindex, direction)) {
        Some(w) if p.family == FAMILY_V4 => {
            // SAFETY: an aligned word of an array map, written whole (one
            // atomic store) by user space.
            local4_root(unsafe { core::ptr::read_volatile(w) }, word(local, 0))
        }
        _ => None,
    };
    let root = match fast {
        Some(root) => root,
        None => {
            sc.slot.ifindex = ifindex;
            sc.slot.direction = direction;
            sc.slot.family = p.family;
            sc.slot.pad = [0; 2];
            copy_addr(&mut sc.slot.addr, local);
            match PALISADE_SLOTS.get_ptr(&sc.slot) {
                // SAFETY: slot values are written whole by user space
                // (a hash element is replaced, not rewritten).
                Some(s) => unsafe { (*s).root },
                None => {
                    stat(STAT_SPOOFED);
                    event(p, ifindex, direction, false, 0, REASON_SPOOFED, false);
                    return DROP;
                }
            }
        }
    };
    stat(STAT_NEW_FLOWS);
    let peer = if direction == DIR_EGRESS {
        &p.dst
    } else {
        &p.src
    };
    let class = if p.family == FAMILY_V4 {
        PALISADE_LPM4
            .get(Key::new(32, [peer[0], peer[1], peer[2], peer[3]]))
            .copied()
    } else {
        PALISADE_LPM6.get(Key::new(128, *peer)).copied()
    }
    .unwrap_or_default();
    // The peer's rows, resolved once: a test is then one bounds check
    // and one array read.
    let id_row = if class.identity > 0 {
        MemberRow::of(layout(LAYOUT_IDENTITIES), class.identity - 1)
    } else {
        MemberRow::default()
    };
    let class_row = MemberRow::of(layout(LAYOUT_CLASSES), class.class);
    let mut w = WalkState {
        at: root,
        steps: 0,
        id_start: id_row.start,
        state: WALK_RUNNING,
        class_start: class_row.start,
        // The lowering keeps strides within 16 bits (MAX_MEMBER_STRIDE).
        strides: (id_row.stride & 0xffff) | (class_row.stride << 16),
        features: features(p, direction),
        rule: 0,
    };
    // Most programs are shallow: the first steps run inline (cheapest);
    // deeper walks continue in a bpf_loop callback, which the verifier
    // checks once however deep programs are.
    let mut i = 0;
    while i < INLINE_WALK && w.state & WALK_STATUS == WALK_RUNNING {
        walk_step(0, (&mut w as *mut WalkState).cast());
        i += 1;
    }
    if w.state & WALK_STATUS == WALK_RUNNING {
        // SAFETY: `walk_step` has the callback signature bpf_loop expects
        // and `w` is a stack object that outlives the call.
        unsafe {
            bpf_loop(
                MAX_WALK - INLINE_WALK,
                walk_step as *mut c_void,
                (&mut w as *mut WalkState).cast(),
                0,
            )
        };
    }
    if w.state & WALK_STATUS != WALK_LEAF {
        stat(STAT_WALK);
        event(p, ifindex, direction, false, 0, REASON_WALK, false);
        return DROP;
    }
    let v = WalkOutcome {
        allow: (w.state >> WALK_FLAGS) & LEAF_ALLOW as u32 != 0,
        logged: (w.state >> WALK_FLAGS) & LEAF_LOGGED as u32 != 0,
        rule: w.rule,
        steps: w.steps,
    };
    count(v.rule, ctx.len());
    if !v.allow {
        event(
            p,
            ifindex,
            direction,
            false,
            v.rule,
            REASON_POLICY,
            v.logged,
        );
        return DROP;
    }
    // A new connection from this pod to a local endpoint: the approval
    // rides with the packet to the receiver's judgement, tail-called
    // next, which records both sides in one insert. Recorded here, the
    // receiver would join the entry with locked instructions that wait
    // for this insert's write (a cache miss in a large table) to land.
    let deferred = direction == DIR_EGRESS
        && !p.fragment
        && conn.hit().is_none()
        && local_receiver(ctx, ifindex, &mut sc.local).is_some();
    if deferred {
        stash(ctx, v.rule, ifindex);
    } else {
        match approve(&conn, local_is_a, a_is_src, v.rule, ifindex, now, sender) {
            Record::Done => {}
            // The policy allowed this packet, so it passes; later
            // packets are judged by policy again.
            Record::Full => stat(STAT_CT_FULL),
            Record::Contended => stat(STAT_CT_CONTENDED),
        }
    }
    if p.fragment {
        let _ = PALISADE_FRAGS.insert(&sc.frag, now, u64::from(BPF_NOEXIST));
    }
    if cfg.allow_sample > 0 {
        // SAFETY: helper without preconditions.
        let r = unsafe { bpf_get_prandom_u32() };
        if r % cfg.allow_sample == 0 {
            event(p, ifindex, direction, true, v.rule, REASON_POLICY, v.logged);
        }
    }
    if deferred { DEFERRED } else { ALLOWED }
}

/// The pod's egress policy: packets the pod sends.
// The macro's entry point calls this function: inlined, the program
// is one function (a BPF-to-BPF call costs a frame on every packet).
#[classifier]
#[inline(always)]
pub fn palisade_from_pod(ctx: TcContext) -> i32 {
    let from = arrival(&ctx);
    let deliver = match process(&ctx, DIR_EGRESS, from, Approval::NONE) {
        DEFERRED => true,
        ALLOWED => match PALISADE_SCRATCH.get_ptr_mut(0) {
            Some(sc) => {
                // SAFETY: this CPU's scratch (TC programs do not nest), so
                // no other reference to it is live.
                local_receiver(&ctx, from, unsafe { &mut (*sc).local }).is_some() && {
                    clear_stash(&ctx);
                    true
                }
            }
            None => false,
        },
        r => return r,
    };
    if deliver {
        // SAFETY: the target is a TC program taking the same context;
        // this returns only when the slot is empty (then a deferred
        // approval is lost: the connection's next packet is judged
        // again).
        unsafe { PALISADE_DELIVER.tail_call(&ctx, 0) };
    }
    PASS
}

/// The pod's ingress policy: packets sent to the pod.
#[classifier]
#[inline(always)]
pub fn palisade_to_pod(ctx: TcContext) -> i32 {
    match process(&ctx, DIR_INGRESS, arrival(&ctx), Approval::NONE) {
        ALLOWED => PASS,
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
    match process(&ctx, DIR_INGRESS, ep.ifindex, unstash(&ctx)) {
        ALLOWED | DEFERRED => hand_over(&ctx, &ep, family),
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
