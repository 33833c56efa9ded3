//! Which UDP service flows the kernel's conntrack would have ended: a
//! flow's NAT entries (two, four when masqueraded) keep the second a
//! packet last met them ([`NatValue::seen`], written by the service
//! program), and a flow idle for [`udp_flow_timeout`] seconds (30, or 120
//! once it has seen a reply) is over, so its next datagram through the
//! frontend is balanced afresh and the backend's datagrams to that port
//! are no longer answered for the frontend. Pure: entries and the clock in,
//! the flows to remove out.
//!
//! ```
//! use policy_bpf::nat_expiry::expired_udp_flows;
//! use policy_bpf_common::{NAT_AFTER_POLICY, NAT_REPLY, NatTuple, NatValue};
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
//! let entries = [(client, forward), (reply_key, reply)];
//! assert!(expired_udp_flows(&entries, 130).is_empty(), "30 s idle: still alive");
//! let gone = expired_udp_flows(&entries, 131);
//! assert_eq!(gone.len(), 1);
//! assert_eq!(gone[0].len(), 2, "both directions go together");
//! ```

use std::collections::BTreeMap;

use policy_bpf_common::{
    NAT_AFTER_POLICY, NAT_REPLIED, NAT_REPLY, NatTuple, NatValue, udp_flow_timeout,
};

const UDP: u8 = 17;

/// A flow: (family, client address and port, backend address and port).
type FlowKey = (u8, [u8; 16], u16, [u8; 16], u16);

/// The flow an entry belongs to, from its key and value by its kind.
fn flow_of(k: &NatTuple, v: &NatValue) -> FlowKey {
    let reply = v.flags & NAT_REPLY != 0;
    let after_policy = v.flags & NAT_AFTER_POLICY != 0;
    match (reply, after_policy) {
        // Client → frontend, rewritten to client → backend.
        (false, false) => (k.family, k.src, k.src_port, v.dst, v.dst_port),
        // Masqueraded: client → backend, rewritten to node → backend.
        (false, true) => (k.family, k.src, k.src_port, k.dst, k.dst_port),
        // Backend → client, rewritten to frontend → client.
        (true, true) => (k.family, k.dst, k.dst_port, k.src, k.src_port),
        // Masqueraded: backend → node, rewritten to backend → client.
        (true, false) => (k.family, v.dst, v.dst_port, k.src, k.src_port),
    }
}

/// The UDP flows idle past their timeout at `now` (seconds of the
/// kernel's coarse monotonic clock), each as its entries' keys with the
/// clock each held (to check nothing met them since). A flow with an
/// entry whose clock is not yet known (0) is not judged.
pub fn expired_udp_flows(entries: &[(NatTuple, NatValue)], now: u32) -> Vec<Vec<(NatTuple, u32)>> {
    let mut flows: BTreeMap<FlowKey, Vec<(NatTuple, NatValue)>> = BTreeMap::new();
    for (k, v) in entries.iter().filter(|(k, _)| k.protocol == UDP) {
        flows.entry(flow_of(k, v)).or_default().push((*k, *v));
    }
    flows
        .into_values()
        .filter(|flow| {
            if flow.iter().any(|(_, v)| v.seen == 0) {
                return false;
            }
            let last = flow.iter().map(|(_, v)| v.seen).max().unwrap_or(0);
            let replied = flow.iter().any(|(_, v)| v.flags & NAT_REPLIED != 0);
            now.saturating_sub(last) > udp_flow_timeout(replied)
        })
        .map(|flow| flow.into_iter().map(|(k, v)| (k, v.seen)).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy_bpf_common::NAT_MASQUERADE;

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
        assert!(expired_udp_flows(&flow, 80).is_empty(), "30 s after 50");
        let gone = expired_udp_flows(&flow, 81);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].len(), 4);
    }

    #[test]
    fn a_replied_flow_lives_120_seconds() {
        let flow = masqueraded([10, 10, 10, 10], true);
        assert!(expired_udp_flows(&flow, 130).is_empty());
        assert_eq!(expired_udp_flows(&flow, 131).len(), 1);
    }

    #[test]
    fn unknown_clocks_and_tcp_are_never_judged() {
        let flow = masqueraded([10, 0, 10, 10], false);
        assert!(expired_udp_flows(&flow, 1_000).is_empty(), "an entry of 0");
        let tcp: Vec<_> = masqueraded([10, 10, 10, 10], false)
            .into_iter()
            .map(|(mut k, v)| {
                k.protocol = 6;
                (k, v)
            })
            .collect();
        assert!(expired_udp_flows(&tcp, 1_000).is_empty());
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
        let gone = expired_udp_flows(&entries, 50);
        assert_eq!(gone.len(), 1, "only the first flow is idle");
        assert!(gone[0].iter().all(|(_, seen)| *seen == 10));
    }
}
