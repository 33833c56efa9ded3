//! UDP flows through a Service end as the kernel's conntrack ends them:
//! idle 30 s (120 s once replied), the sweep removes their NAT entries,
//! so the backend's datagrams to the client's port are no longer answered
//! for the frontend and the next datagram is balanced afresh. The sweep
//! is run at a chosen time (the programs keep the kernel's clock).

use policy_bpf::datapath::Datapath;
use policy_bpf::lower::Capacity;
use policy_bpf_common::{NAT_REPLIED, NAT_REPLY};

use super::privileged;
use super::services::{destination, packet, service, slice, sock, source, table};

const VIP: &str = "172.30.0.10";

#[test]
fn udp_flows_through_a_service_end_after_conntracks_timeouts() {
    if !privileged() {
        return;
    }
    let mut dp = Datapath::load_private(Capacity::verification()).unwrap();
    dp.set_services(&table(&[
        service("api", VIP, false),
        slice("api", &["10.0.2.5"]),
    ]))
    .unwrap();
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
