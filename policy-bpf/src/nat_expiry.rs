//! Which service flows the kernel's conntrack would have ended. A flow's
//! NAT entries (two, four when masqueraded) keep the second a packet
//! last met them ([`NatValue::seen`], written by the service program):
//!
//! | flow | over when idle for |
//! |---|---|
//! | UDP | [`udp_flow_timeout`]: 30 s, 120 s once it has seen a reply |
//! | TCP reset either way (`NAT_RST`) | [`tcp_closed_timeout`]: 10 s (conntrack's `CLOSE`) |
//! | TCP with FINs both ways (`NAT_FIN`) | 120 s (`TIME_WAIT`) |
//! | TCP open, or closed one way | never here (the LRU, as for an idle established connection) |
//!
//! An ended flow's next packet through the frontend is balanced afresh,
//! and the backend's packets to that port are no longer answered for the
//! frontend. Pure: entries and the clock in, the flows to remove out.
//!
//! ```
//! use policy_bpf::nat_expiry::expired_flows;
//! use policy_bpf_common::{NAT_AFTER_POLICY, NAT_REPLY, NAT_RST, NatTuple, NatValue};
//!
//! let client = NatTuple { src: [10, 0, 1, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
//!     dst: [172, 30, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
//!     src_port: 40_000, dst_port: 53, protocol: 17, family: 4, pad: 0 };
//! let backend = [10, 0, 2, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
//! let forward = NatValue { src: client.src, dst: backend, src_port: 40_000,
//!     dst_port: 5353, flags: 0, backend: 0, seen: 100 };
//! let reply_key = NatTuple { src: backend, dst: client.src, src_port: 5353,
//!     dst_port: 40_000, ..client };
//! let reply = NatValue { src: client.dst, dst: client.src, src_port: 53,
//!     dst_port: 40_000, flags: NAT_REPLY | NAT_AFTER_POLICY, backend: 0, seen: 100 };
//! let udp = [(client, forward), (reply_key, reply)];
//! assert!(expired_flows(&udp, 130).is_empty(), "30 s idle: still alive");
//! let gone = expired_flows(&udp, 131);
//! assert_eq!(gone.len(), 1);
//! assert_eq!(gone[0].len(), 2, "both directions go together");
//!
//! // The same as a TCP connection: open, it is never timed here; reset
//! // (the client's RST met its forward entry at 100), it is over 10 s on.
//! let tcp = |flags| {
//!     let (mut k, mut r) = (client, reply_key);
//!     (k.protocol, r.protocol) = (6, 6);
//!     [(k, NatValue { flags, seen: 100 * u32::from(flags != 0), ..forward }),
//!      (r, NatValue { seen: 0, ..reply })]
//! };
//! assert!(expired_flows(&tcp(0), 10_000).is_empty());
//! assert!(expired_flows(&tcp(NAT_RST), 110).is_empty());
//! assert_eq!(expired_flows(&tcp(NAT_RST), 111).len(), 1);
//! ```

use std::collections::{BTreeMap, HashSet};

use policy_bpf_common::{
    NAT_AFTER_POLICY, NAT_FIN, NAT_REPLY, NAT_RST, NatTuple, NatValue, flow_over,
    tcp_closed_timeout, udp_flow_timeout,
};

const TCP: u8 = 6;
const UDP: u8 = 17;

/// A flow: (protocol, family, client address and port, backend address
/// and port).
pub(crate) type FlowKey = (u8, u8, [u8; 16], u16, [u8; 16], u16);

/// The flow an entry belongs to, from its key and value by its kind.
pub(crate) fn flow_of(k: &NatTuple, v: &NatValue) -> FlowKey {
    let reply = v.flags & NAT_REPLY != 0;
    let after_policy = v.flags & NAT_AFTER_POLICY != 0;
    let p = k.protocol;
    match (reply, after_policy) {
        // Client → frontend, rewritten to client → backend.
        (false, false) => (p, k.family, k.src, k.src_port, v.dst, v.dst_port),
        // Masqueraded: client → backend, rewritten to node → backend.
        (false, true) => (p, k.family, k.src, k.src_port, k.dst, k.dst_port),
        // Backend → client, rewritten to frontend → client.
        (true, true) => (p, k.family, k.dst, k.dst_port, k.src, k.src_port),
        // Masqueraded: backend → node, rewritten to backend → client.
        (true, false) => (p, k.family, v.dst, v.dst_port, k.src, k.src_port),
    }
}

/// The UDP and TCP flows over at `now` (seconds of the kernel's coarse
/// monotonic clock), each as its entries as read (to check nothing met
/// them since). A UDP flow with an entry whose clock is not yet known
/// (0) is not judged; nor is a TCP connection that has not ended.
pub fn expired_flows(entries: &[(NatTuple, NatValue)], now: u32) -> Vec<Vec<(NatTuple, NatValue)>> {
    // Only flows with an entry idle past the shortest timeout are
    // gathered: a busy table is mostly live flows, and gathering all of
    // them cost more than reading the table.
    let candidates: HashSet<FlowKey> = entries
        .iter()
        .filter(|(k, v)| may_be_over(k, v, now))
        .map(|(k, v)| flow_of(k, v))
        .collect();
    if candidates.is_empty() {
        return Vec::new();
    }
    let mut flows: BTreeMap<FlowKey, Vec<(NatTuple, NatValue)>> = BTreeMap::new();
    for (k, v) in entries {
        let flow = flow_of(k, v);
        if candidates.contains(&flow) {
            flows.entry(flow).or_default().push((*k, *v));
        }
    }
    flows.into_values().filter(|flow| over(flow, now)).collect()
}

/// Whether an entry is idle past the shortest timeout its flow could
/// have: every entry with a clock of a flow that is over is.
fn may_be_over(k: &NatTuple, v: &NatValue, now: u32) -> bool {
    let idle = now.saturating_sub(v.seen);
    v.seen != 0
        && match k.protocol {
            UDP => idle > udp_flow_timeout(false),
            TCP => v.flags & (NAT_FIN | NAT_RST) != 0 && idle > tcp_closed_timeout(true),
            _ => false,
        }
}

/// Whether one flow's entries (one protocol, never empty) say it is over.
fn over(flow: &[(NatTuple, NatValue)], now: u32) -> bool {
    let last = flow.iter().map(|(_, v)| v.seen).max().unwrap_or(0);
    let protocol = flow[0].0.protocol;
    if last == 0 || protocol == UDP && flow.iter().any(|(_, v)| v.seen == 0) {
        return false;
    }
    let side = |reply: bool| {
        flow.iter()
            .filter(|(_, v)| (v.flags & NAT_REPLY != 0) == reply)
            .fold(0, |f, (_, v)| f | v.flags)
    };
    flow_over(protocol, side(false), side(true), last, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy_bpf_common::{NAT_MASQUERADE, NAT_REPLIED};

    fn a(last: u8) -> [u8; 16] {
        let mut b = [0; 16];
        b[..4].copy_from_slice(&[10, 0, 0, last]);
        b
    }

    fn tuple(src: [u8; 16], sp: u16, dst: [u8; 16], dp: u16, protocol: u8) -> NatTuple {
        NatTuple {
            src,
            dst,
            src_port: sp,
            dst_port: dp,
            protocol,
            family: 4,
            pad: 0,
        }
    }

    fn value(src: [u8; 16], sp: u16, dst: [u8; 16], dp: u16, flags: u32, seen: u32) -> NatValue {
        NatValue {
            src,
            dst,
            src_port: sp,
            dst_port: dp,
            flags,
            backend: 3,
            seen,
        }
    }

    /// A masqueraded flow's four entries: client 10.0.0.1:4000 to
    /// frontend 10.0.0.100:53, backend 10.0.0.5:5353, node 10.0.0.254:33000.
    fn masqueraded(seen: [u32; 4], replied: bool) -> Vec<(NatTuple, NatValue)> {
        let (client, frontend, backend, node) = (a(1), a(100), a(5), a(254));
        let r = if replied { NAT_REPLIED } else { 0 };
        vec![
            (
                tuple(client, 4000, frontend, 53, UDP),
                value(client, 4000, backend, 5353, NAT_MASQUERADE, seen[0]),
            ),
            (
                tuple(client, 4000, backend, 5353, UDP),
                value(
                    node,
                    33000,
                    backend,
                    5353,
                    NAT_AFTER_POLICY | NAT_MASQUERADE,
                    seen[1],
                ),
            ),
            (
                tuple(backend, 5353, node, 33000, UDP),
                value(
                    backend,
                    5353,
                    client,
                    4000,
                    NAT_REPLY | NAT_MASQUERADE | r,
                    seen[2],
                ),
            ),
            (
                tuple(backend, 5353, client, 4000, UDP),
                value(
                    frontend,
                    53,
                    client,
                    4000,
                    NAT_REPLY | NAT_AFTER_POLICY | NAT_MASQUERADE,
                    seen[3],
                ),
            ),
        ]
    }

    #[test]
    fn a_masqueraded_flows_four_entries_go_together_after_its_last_packet() {
        let flow = masqueraded([10, 10, 50, 10], false);
        assert!(expired_flows(&flow, 80).is_empty(), "30 s after 50");
        let gone = expired_flows(&flow, 81);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].len(), 4);
    }

    #[test]
    fn a_replied_flow_lives_120_seconds() {
        let flow = masqueraded([10, 10, 10, 10], true);
        assert!(expired_flows(&flow, 130).is_empty());
        assert_eq!(expired_flows(&flow, 131).len(), 1);
    }

    #[test]
    fn unknown_clocks_and_open_tcp_are_never_judged() {
        let flow = masqueraded([10, 0, 10, 10], false);
        assert!(expired_flows(&flow, 1_000).is_empty(), "an entry of 0");
        let tcp = as_tcp(masqueraded([10, 10, 10, 10], false), [0; 4]);
        assert!(expired_flows(&tcp, 1_000).is_empty());
    }

    /// The flow as a TCP connection, each entry's flags ORed with `marks`
    /// (and its clock kept only where marked, as the program does).
    fn as_tcp(flow: Vec<(NatTuple, NatValue)>, marks: [u32; 4]) -> Vec<(NatTuple, NatValue)> {
        flow.into_iter()
            .zip(marks)
            .map(|((mut k, mut v), m)| {
                k.protocol = TCP;
                v.flags |= m;
                if m == 0 {
                    v.seen = 0;
                }
                (k, v)
            })
            .collect()
    }

    #[test]
    fn a_reset_tcp_connection_is_over_10_seconds_after_its_last_packet() {
        // The client's RST met its two outgoing entries at 40 and 41.
        let reset = as_tcp(masqueraded([40, 41, 0, 0], false), [NAT_RST, NAT_RST, 0, 0]);
        assert!(expired_flows(&reset, 51).is_empty());
        let gone = expired_flows(&reset, 52);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].len(), 4, "its four entries go together");
        // The backend's RST ends it as well.
        let reset = as_tcp(masqueraded([0, 0, 40, 40], false), [0, 0, NAT_RST, 0]);
        assert_eq!(expired_flows(&reset, 51).len(), 1);
    }

    #[test]
    fn a_tcp_connection_closed_both_ways_lives_120_seconds_one_way_is_not_judged() {
        let both = as_tcp(
            masqueraded([40, 40, 45, 45], false),
            [NAT_FIN, NAT_FIN, NAT_FIN, NAT_FIN],
        );
        assert!(expired_flows(&both, 165).is_empty());
        assert_eq!(expired_flows(&both, 166).len(), 1);
        let half = as_tcp(masqueraded([40, 40, 0, 0], false), [NAT_FIN, NAT_FIN, 0, 0]);
        assert!(expired_flows(&half, 100_000).is_empty(), "half-closed");
        let answered = as_tcp(masqueraded([40, 0, 0, 45], false), [NAT_FIN, 0, 0, NAT_FIN]);
        assert_eq!(
            expired_flows(&answered, 166).len(),
            1,
            "the FIN back met the reply entry only"
        );
    }

    #[test]
    fn a_tcp_and_a_udp_flow_on_the_same_ports_are_apart() {
        let mut entries = masqueraded([10, 10, 10, 10], false);
        entries.extend(as_tcp(
            masqueraded([10, 10, 10, 10], false),
            [NAT_FIN, 0, 0, 0],
        ));
        let gone = expired_flows(&entries, 1_000);
        assert_eq!(gone.len(), 1);
        assert!(gone[0].iter().all(|(k, _)| k.protocol == UDP));
    }

    #[test]
    fn flows_of_one_client_to_two_backends_are_apart() {
        let mut entries = masqueraded([10, 10, 10, 10], false);
        let mut other = masqueraded([100, 100, 100, 100], false);
        for (k, v) in &mut other {
            // The same client port to another backend (10.0.0.6).
            for addr in [&mut k.src, &mut k.dst, &mut v.src, &mut v.dst] {
                if *addr == a(5) {
                    *addr = a(6);
                }
            }
        }
        entries.extend(other);
        let gone = expired_flows(&entries, 50);
        assert_eq!(gone.len(), 1, "only the first flow is idle");
        assert!(gone[0].iter().all(|(_, v)| v.seen == 10));
    }
}
