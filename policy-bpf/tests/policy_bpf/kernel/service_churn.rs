//! Endpoint churn: a new service table forgets the NAT state of flows
//! whose backend is gone, as kube-proxy's conntrack would leave them.

use std::net::IpAddr;

use serde_json::json;

use super::privileged;
use super::services::{CLIENT, VIP, destination, load, packet, service, slice, sock, table};

#[test]
fn endpoint_churn_keeps_connections_whose_backend_stays() {
    if !privileged() {
        return;
    }
    let mut dp = load();
    let all = ["10.0.2.5", "10.0.3.6", "10.0.4.7"];
    dp.set_services(&table(&[service("api", VIP, false), slice("api", &all)]))
        .unwrap();
    // Connections until each backend has one.
    let mut by_backend = std::collections::BTreeMap::new();
    for i in 0..200 {
        let client = sock(CLIENT, 42_000 + i);
        let (_, out) = dp
            .run_service(&packet(6, client, sock(VIP, 80), 0x02), 0)
            .unwrap();
        by_backend.entry(destination(&out).ip()).or_insert(client);
    }
    assert_eq!(by_backend.len(), 3);
    // The first backend goes; a new one comes.
    let removed: IpAddr = all[0].parse().unwrap();
    let now = ["10.0.3.6", "10.0.4.7", "10.0.6.9"];
    dp.set_services(&table(&[service("api", VIP, false), slice("api", &now)]))
        .unwrap();
    for (backend, client) in &by_backend {
        let (_, out) = dp
            .run_service(&packet(6, *client, sock(VIP, 80), 0x10), 0)
            .unwrap();
        let to = destination(&out).ip();
        if *backend == removed {
            assert_ne!(to, removed, "a connection went on to a removed backend");
        } else {
            assert_eq!(to, *backend, "a connection whose backend stays moved");
        }
    }
    for i in 0..100 {
        let (_, out) = dp
            .run_service(&packet(6, sock(CLIENT, 43_000 + i), sock(VIP, 80), 0x02), 0)
            .unwrap();
        assert_ne!(
            destination(&out).ip(),
            removed,
            "a new connection reached a removed backend"
        );
    }

    // A UDP flow on each backend too.
    let mut udp_by_backend = std::collections::BTreeMap::new();
    for i in 0..200 {
        let client = sock(CLIENT, 45_000 + i);
        let (_, out) = dp
            .run_service(&packet(17, client, sock(VIP, 53), 0), 0)
            .unwrap();
        udp_by_backend
            .entry(destination(&out).ip())
            .or_insert(client);
    }
    assert_eq!(udp_by_backend.len(), 3);
    // One backend terminates (still listed, serving) while others are
    // ready: it gets no new connection, and its connections and UDP flows
    // drain on it, as behind kube-proxy, whose conntrack entries outlive
    // the selection. Another goes unready (listed, not serving): its TCP
    // connection stays, its UDP flow moves (kube-proxy clears UDP
    // conntrack entries to an endpoint that does not serve).
    let mut terminating = slice("api", &now);
    terminating["endpoints"][0]["conditions"] =
        json!({"ready": false, "serving": true, "terminating": true});
    terminating["endpoints"][1]["conditions"] = json!({"ready": false});
    let draining: IpAddr = now[0].parse().unwrap();
    let unready: IpAddr = now[1].parse().unwrap();
    dp.set_services(&table(&[service("api", VIP, false), terminating]))
        .unwrap();
    for (backend, tcp_stays, udp_stays) in [(draining, true, true), (unready, true, false)] {
        let (_, out) = dp
            .run_service(&packet(6, by_backend[&backend], sock(VIP, 80), 0x10), 0)
            .unwrap();
        assert_eq!(
            destination(&out).ip() == backend,
            tcp_stays,
            "{backend}'s TCP connection"
        );
        let (_, out) = dp
            .run_service(&packet(17, udp_by_backend[&backend], sock(VIP, 53), 0), 0)
            .unwrap();
        assert_eq!(
            destination(&out).ip() == backend,
            udp_stays,
            "{backend}'s UDP flow"
        );
    }
    for i in 0..100 {
        let (_, out) = dp
            .run_service(&packet(6, sock(CLIENT, 44_000 + i), sock(VIP, 80), 0x02), 0)
            .unwrap();
        assert_ne!(
            destination(&out).ip(),
            draining,
            "a new connection reached a terminating backend while others are ready"
        );
    }
}
