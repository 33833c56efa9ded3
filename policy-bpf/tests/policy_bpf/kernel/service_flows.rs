//! Flows through a Service end as the kernel's conntrack ends them: UDP
//! idle 30 s (120 s once replied), TCP 10 s after a reset and 120 s after
//! FINs both ways. The sweep removes their NAT entries, so the backend's
//! packets to the client's port are no longer answered for the frontend
//! and the next packet is balanced afresh; a SYN on an ended TCP
//! connection's tuple is a new connection at once. The sweep is run at a
//! chosen time (the programs keep the kernel's clock).

use std::net::SocketAddr;

use policy_bpf::datapath::Datapath;
use policy_bpf::lower::Capacity;
use policy_bpf::services::ServiceCapacity;
use policy_bpf_common::{NAT_FIN, NAT_REPLIED, NAT_REPLY, NAT_RST, NatTuple, NatValue, map_names};

use super::privileged;
use super::services::{destination, load_api, packet, service, slice, sock, source, table};

const VIP: &str = "172.30.0.10";

#[test]
fn udp_flows_through_a_service_end_after_conntracks_timeouts() {
    if !privileged() {
        return;
    }
    let mut dp = load_api(&["10.0.2.5"]);
    let (vip, backend) = (sock(VIP, 53), sock("10.0.2.5", 5353));
    let (quiet, answered, tcp) = (
        sock("10.0.1.9", 40_100),
        sock("10.0.1.9", 40_101),
        sock("10.0.1.9", 40_102),
    );
    for client in [quiet, answered] {
        let (_, out) = dp.run_service(&packet(17, client, vip, 0), 0).unwrap();
        assert_eq!(destination(&out), backend);
    }
    let (_, back) = dp
        .run_service(&packet(17, backend, answered, 0), 0)
        .unwrap();
    assert_eq!(source(&back), vip, "the reply comes from the Service");
    let (_, out) = dp
        .run_service(&packet(6, tcp, sock(VIP, 80), 0x02), 0)
        .unwrap();
    assert_eq!(destination(&out), sock("10.0.2.5", 8080));

    let entries = dp.nat_entries().unwrap();
    let seen: Vec<u32> = entries
        .iter()
        .filter(|(k, _)| k.protocol == 17)
        .map(|(_, v)| v.seen)
        .collect();
    assert_eq!(seen.len(), 4, "two UDP flows, two entries each");
    let now = *seen.iter().max().unwrap();
    assert!(seen.iter().all(|s| *s > 0 && now - s <= 1), "{seen:?}");
    assert!(
        entries.iter().any(|(k, v)| k.dst_port == 40_101
            && v.flags & (NAT_REPLY | NAT_REPLIED) == NAT_REPLY | NAT_REPLIED),
        "the answered flow's reply entry marks it replied"
    );

    assert_eq!(dp.expire_service_flows_at(now + 25).unwrap(), 0);
    assert_eq!(
        dp.expire_service_flows_at(now + 31).unwrap(),
        1,
        "30 s idle without a reply: over"
    );
    let (_, back) = dp.run_service(&packet(17, backend, quiet, 0), 0).unwrap();
    assert_eq!(
        source(&back),
        backend,
        "over, its port no longer answers for the Service"
    );
    assert_eq!(
        dp.expire_service_flows_at(now + 119).unwrap(),
        0,
        "a replied flow lives 120 s"
    );
    assert_eq!(dp.expire_service_flows_at(now + 122).unwrap(), 1);
    let left = dp.nat_entries().unwrap();
    assert_eq!(left.len(), 2, "TCP is not timed by this sweep: {left:?}");
    assert!(left.iter().all(|(k, _)| k.protocol == 6));

    // A datagram through the Service again is a new flow, with its clock.
    let (_, out) = dp.run_service(&packet(17, quiet, vip, 0), 0).unwrap();
    assert_eq!(destination(&out), backend);
    assert_eq!(dp.expire_service_flows().unwrap(), 0, "at the kernel's now");
}

/// The entries of the UDP flows from `client`'s port (either way).
fn flow_entries(dp: &Datapath, port: u16) -> Vec<(NatTuple, NatValue)> {
    dp.nat_entries()
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.protocol == 17 && (k.src_port == port || k.dst_port == port))
        .collect()
}

/// The kernel's conntrack forgets a UDP flow at its timeout, not when the
/// agent's sweep next comes by (every 10 s): a datagram after the timeout
/// is a new flow, from the client balanced afresh, from the backend not
/// answered for the Service. Replies from a backend on another node (met
/// only after policy) keep the flow alive and mark it replied too.
#[test]
fn a_udp_flow_past_its_timeout_is_over_before_the_sweep() {
    if !privileged() {
        return;
    }
    let mut dp = one_backend();
    let (vip, backend) = (sock(VIP, 53), sock("10.0.2.5", 5353));
    let client = sock("10.0.1.9", 40_400);
    let clocks = |dp: &Datapath| -> Vec<u32> {
        flow_entries(dp, client.port())
            .iter()
            .map(|(_, v)| v.seen)
            .collect()
    };
    let udp = |from, to| packet(17, from, to, 0);
    dp.run_service(&udp(client, vip), 0).unwrap();
    let now = *clocks(&dp).iter().max().unwrap();

    // 25 s idle: the datagram is the flow's (the reply entry's clock left
    // as it was).
    dp.age_service_flows(25).unwrap();
    dp.run_service(&udp(client, vip), 0).unwrap();
    let mut seen = clocks(&dp);
    seen.sort();
    assert_eq!(seen.len(), 2);
    assert!(now - seen[0] >= 24 && seen[1] >= now, "{seen:?}");

    // Its last datagram 31 s ago (and 56 s for the reply side): over, so
    // the next one opens a new flow, every entry new.
    dp.age_service_flows(31).unwrap();
    let (_, out) = dp.run_service(&udp(client, vip), 0).unwrap();
    assert_eq!(destination(&out), backend);
    let seen = clocks(&dp);
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter().all(|s| *s >= now),
        "the flow was recorded anew: {seen:?}"
    );

    // Replied, it lives 120 s; a reply after that is not the Service's.
    let (_, back) = dp.run_service(&udp(backend, client), 0).unwrap();
    assert_eq!(source(&back), vip);
    dp.age_service_flows(119).unwrap();
    let (_, back) = dp.run_service(&udp(backend, client), 0).unwrap();
    assert_eq!(source(&back), vip, "replied: alive at 119 s");
    dp.age_service_flows(121).unwrap();
    let (_, back) = dp.run_service(&udp(backend, client), 0).unwrap();
    assert_eq!(source(&back), backend, "over at 121 s");
    assert!(flow_entries(&dp, client.port()).is_empty());

    // A backend on another node: its replies meet the flow only after
    // policy, and still keep it and mark it replied.
    let remote = sock("10.0.1.9", 40_401);
    dp.run_service(&udp(remote, vip), 0).unwrap();
    let (_, back) = dp.run_reply_nat(&udp(backend, remote)).unwrap();
    assert_eq!(source(&back), vip);
    assert!(
        flow_entries(&dp, remote.port())
            .iter()
            .any(|(_, v)| v.flags & (NAT_REPLY | NAT_REPLIED) == NAT_REPLY | NAT_REPLIED),
        "the reply after policy marks the flow replied"
    );
    dp.age_service_flows(60).unwrap();
    dp.run_reply_nat(&udp(backend, remote)).unwrap();
    dp.age_service_flows(60).unwrap();
    let (_, out) = dp.run_service(&udp(remote, vip), 0).unwrap();
    assert_eq!(destination(&out), backend);
    assert_eq!(
        dp.expire_service_flows().unwrap(),
        0,
        "a reply 60 s ago keeps the flow (120 s idle since the client's)"
    );
    assert_eq!(flow_entries(&dp, remote.port()).len(), 2);
    dp.age_service_flows(121).unwrap();
    let (_, back) = dp.run_reply_nat(&udp(backend, remote)).unwrap();
    assert_eq!(source(&back), backend, "over, after policy too");
    assert!(flow_entries(&dp, remote.port()).is_empty());

    // Masqueraded (a client outside the cluster): four entries, over
    // together; the backend's datagram to the node's port is then not
    // answered for the Service.
    let outside = sock("192.168.5.9", 40_402);
    let (_, out) = dp.run_service(&udp(outside, vip), 0).unwrap();
    let node = source(&out);
    assert_ne!(node, outside, "masqueraded");
    assert_eq!(dp.nat_entries().unwrap().len(), 4);
    dp.age_service_flows(31).unwrap();
    let (_, back) = dp.run_service(&udp(backend, node), 0).unwrap();
    assert_eq!(destination(&back), node, "over: not translated back");
    assert!(dp.nat_entries().unwrap().is_empty());
}

const SYN: u8 = 0x02;
const FIN_ACK: u8 = 0x11;
const RST_ACK: u8 = 0x14;
const ACK: u8 = 0x10;

/// A datapath balancing the ClusterIP over one backend, 10.0.2.5.
fn one_backend() -> Datapath {
    load_api(&["10.0.2.5"])
}

/// One TCP packet through the program; the packet as it leaves.
fn send(dp: &Datapath, from: SocketAddr, to: SocketAddr, flags: u8) -> Vec<u8> {
    dp.run_service(&packet(6, from, to, flags), 0).unwrap().1
}

/// A handshake from `client` through the ClusterIP (port 80); the
/// address the backend sees (the node's, masqueraded).
fn open(dp: &Datapath, client: SocketAddr) -> SocketAddr {
    let (vip, backend) = (sock(VIP, 80), sock("10.0.2.5", 8080));
    let out = send(dp, client, vip, SYN);
    assert_eq!(destination(&out), backend, "{client}");
    let seen = source(&out);
    let back = send(dp, backend, seen, SYN | ACK);
    assert_eq!((source(&back), destination(&back)), (vip, client));
    send(dp, client, vip, ACK);
    seen
}

/// The clocks of the entries marked closing: (earliest, latest).
fn closing_clocks(dp: &mut Datapath) -> (u32, u32) {
    let seen: Vec<u32> = dp
        .nat_entries()
        .unwrap()
        .iter()
        .filter(|(_, v)| v.flags & (NAT_FIN | NAT_RST) != 0)
        .map(|(_, v)| v.seen)
        .collect();
    assert!(seen.iter().all(|s| *s > 0), "{seen:?}");
    (*seen.iter().min().unwrap(), *seen.iter().max().unwrap())
}

#[test]
fn tcp_connections_through_a_service_end_as_conntracks_do() {
    if !privileged() {
        return;
    }
    let mut dp = one_backend();
    let (vip, backend) = (sock(VIP, 80), sock("10.0.2.5", 8080));
    let reset = sock("10.0.1.9", 40_200);
    let masqueraded = sock("192.168.5.9", 40_201);
    let closed = sock("10.0.1.9", 40_202);
    let half_closed = sock("10.0.1.9", 40_203);
    let established = sock("10.0.1.9", 40_204);
    for client in [reset, masqueraded, closed, half_closed, established] {
        open(&dp, client);
    }
    assert_eq!(
        dp.expire_service_flows_at(u32::MAX / 2).unwrap(),
        0,
        "open connections are never timed by the sweep (the LRU's)"
    );
    send(&dp, reset, vip, RST_ACK);
    send(&dp, masqueraded, vip, RST_ACK);
    send(&dp, closed, vip, FIN_ACK);
    send(&dp, backend, closed, FIN_ACK);
    send(&dp, closed, vip, ACK);
    send(&dp, half_closed, vip, FIN_ACK);
    let marked = |dp: &mut Datapath, port: u16, flag: u32| {
        dp.nat_entries()
            .unwrap()
            .iter()
            .filter(|(k, v)| (k.src_port == port || k.dst_port == port) && v.flags & flag != 0)
            .count()
    };
    assert_eq!(
        marked(&mut dp, 40_200, NAT_RST),
        1,
        "the RST met the forward entry"
    );
    assert_eq!(
        marked(&mut dp, 40_201, NAT_RST),
        2,
        "and, masqueraded, the SNAT entry too"
    );
    assert_eq!(marked(&mut dp, 40_202, NAT_FIN), 2, "a FIN each way");

    let (earliest, latest) = closing_clocks(&mut dp);
    assert!(latest - earliest <= 1);
    assert_eq!(dp.expire_service_flows_at(earliest + 10).unwrap(), 0);
    assert_eq!(
        dp.expire_service_flows_at(latest + 11).unwrap(),
        2,
        "reset: over 10 s after its last packet (conntrack's CLOSE)"
    );
    let back = send(&dp, backend, reset, ACK);
    assert_eq!(
        source(&back),
        backend,
        "over, its port no longer answers for the Service"
    );
    assert_eq!(dp.expire_service_flows_at(earliest + 120).unwrap(), 0);
    assert_eq!(
        dp.expire_service_flows_at(latest + 121).unwrap(),
        1,
        "FINs both ways: over 120 s on (TIME_WAIT)"
    );
    let left = dp.nat_entries().unwrap();
    assert_eq!(left.len(), 4, "half-closed and established stay: {left:?}");
    assert_eq!(dp.expire_service_flows_at(u32::MAX / 2).unwrap(), 0);
}

#[test]
fn a_syn_on_an_ended_tcp_connections_port_is_a_new_connection() {
    if !privileged() {
        return;
    }
    let mut dp = one_backend();
    let vip = sock(VIP, 80);
    // (client, its packets after the handshake: from the client or the
    // backend, the connection's entries, whether a SYN then reopens it)
    type Case = (SocketAddr, &'static [(bool, u8)], usize, bool);
    let cases: [Case; 6] = [
        (sock("10.0.1.9", 40_300), &[(true, RST_ACK)], 2, true),
        (sock("192.168.5.9", 40_301), &[(true, RST_ACK)], 4, true),
        (
            sock("10.0.1.9", 40_302),
            &[(true, FIN_ACK), (false, FIN_ACK), (true, ACK)],
            2,
            true,
        ),
        (
            sock("10.0.1.9", 40_303),
            &[(false, FIN_ACK), (false, RST_ACK)],
            2,
            true,
        ),
        // Reset by the backend without a FIN: conntrack passes the SYN on
        // the old entry.
        (sock("10.0.1.9", 40_304), &[(false, RST_ACK)], 2, false),
        // Half-closed: conntrack ignores the SYN.
        (sock("10.0.1.9", 40_305), &[(true, FIN_ACK)], 2, false),
    ];
    for (client, end, entries, reopens) in cases {
        dp.flush_services_state().unwrap();
        let seen = open(&dp, client);
        for (from_client, flags) in end {
            if *from_client {
                send(&dp, client, vip, *flags);
            } else {
                send(&dp, sock("10.0.2.5", 8080), seen, *flags);
            }
        }
        let closing = |dp: &mut Datapath| {
            dp.nat_entries()
                .unwrap()
                .iter()
                .filter(|(_, v)| v.flags & (NAT_FIN | NAT_RST) != 0)
                .count()
        };
        assert!(closing(&mut dp) > 0, "{client}: marked");
        let seen = open(&dp, client);
        let now = dp.nat_entries().unwrap();
        assert_eq!(
            now.len(),
            entries,
            "{client}: one connection's entries: {now:?}"
        );
        if reopens {
            assert_eq!(
                closing(&mut dp),
                0,
                "{client}: the SYN opened a new connection (conntrack kills one in CLOSE or TIME_WAIT)"
            );
        } else {
            assert!(
                closing(&mut dp) > 0,
                "{client}: the SYN is the old connection's"
            );
        }
        let back = send(&dp, sock("10.0.2.5", 8080), seen, ACK);
        assert_eq!(source(&back), vip, "{client}: answered for the Service");
    }
}

/// The sweep and the metrics read the NAT table in batches: the same
/// entries as asked one bucket at a time (a batch of one entry, which a
/// bucket of two overflows: the read grows its buffer and goes on).
#[test]
fn the_nat_table_is_read_whole_in_batches() {
    if !privileged() {
        return;
    }
    let capacity = Capacity {
        services: ServiceCapacity {
            nat: 16_384,
            ..ServiceCapacity::verification()
        },
        ..Capacity::verification()
    };
    let mut dp = Datapath::load_private(capacity).unwrap();
    dp.set_services(&table(&[
        service("api", VIP, false),
        slice("api", &["10.0.2.5"]),
    ]))
    .unwrap();
    let flows = 3_000u16;
    for port in 0..flows {
        let client = sock("10.0.1.9", 20_000 + port);
        dp.run_service(&packet(17, client, sock(VIP, 53), 0), 0)
            .unwrap();
    }
    let mut whole = dp.nat_entries().unwrap();
    let mut one_by_one: Vec<(NatTuple, NatValue)> =
        dp.read_hash_map_in(map_names::SVC_NAT, 1).unwrap();
    assert_eq!(whole.len(), 2 * usize::from(flows));
    let key = |e: &(NatTuple, NatValue)| (e.0.src, e.0.dst, e.0.src_port, e.0.dst_port);
    whole.sort_by_key(key);
    one_by_one.sort_by_key(key);
    assert!(whole == one_by_one, "the same entries, each once");
    whole.dedup_by_key(|e| key(e));
    assert_eq!(whole.len(), 2 * usize::from(flows));
    assert_eq!(
        dp.service_state_len().unwrap(),
        (2 * usize::from(flows), 0),
        "the metrics' count"
    );
}
