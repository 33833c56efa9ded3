//! The floor of a stateful per-packet balancer, for the service
//! benchmarks (never attached by the agent): what any design that
//! translates packets and keeps conntrack's state in a table must do,
//! and nothing else.

use aya_ebpf::programs::TcContext;

use super::*;

/// On each TCP, UDP or SCTP packet: its headers parsed and its tuple
/// looked up in the NAT table (the entry's flags read, as a translation
/// would use them); on a connection's opening packet that no entry
/// covers, two entries recorded (its way there and its way back), as
/// [`super::translate`] records a new connection. No decision, no
/// rewrite: the packet passes as it came, so it measures what keeping
/// the state alone costs the traffic.
#[classifier]
pub fn palisade_nat_floor(ctx: TcContext) -> i32 {
    let Some(h) = parse(&ctx) else {
        return PASS;
    };
    let Some(sc) = scratch() else {
        return PASS;
    };
    if let Some(v) = PALISADE_SVC_NAT.get_ptr(&sc.tuple) {
        // SAFETY: a map value stays valid for the rest of this run (RCU);
        // a volatile read, so that the lookup's line is really read.
        let flags = unsafe { core::ptr::read_volatile(&raw const (*v).flags) };
        // Never true: keeps the read.
        return if flags == u32::MAX { DROP } else { PASS };
    }
    if h.protocol == TCP && !is_opening(packet_tcp_flags(&ctx, &h)) {
        return PASS;
    }
    let t = sc.tuple;
    sc.forward = NatValue {
        src: t.src,
        dst: t.dst,
        src_port: t.src_port,
        dst_port: t.dst_port,
        ..NatValue::default()
    };
    sc.reply_key = t.reversed();
    sc.reply = NatValue {
        src: t.dst,
        dst: t.src,
        src_port: t.dst_port,
        dst_port: t.src_port,
        flags: NAT_REPLY,
        ..NatValue::default()
    };
    let recorded = PALISADE_SVC_NAT.insert(&sc.reply_key, &sc.reply, 0).is_ok()
        && PALISADE_SVC_NAT
            .insert(&t, &sc.forward, u64::from(BPF_NOEXIST))
            .is_ok();
    stat(if recorded {
        Statistic::ServiceNat
    } else {
        Statistic::ServiceNatFull
    });
    PASS
}
