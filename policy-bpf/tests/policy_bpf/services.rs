//! The service lookup over lowered map entries answers like the reference
//! model on random Services and packets; a table that does not fit names
//! the map and lowers nothing.

use std::net::IpAddr;

use palisade_services::case::{Outcome, Output, outcome};
use palisade_services::topology::NodeTopology;
use palisade_services::{Family, Objects, Packet, Protocol, ProxyConfig, ServiceTable};
use palisade_testing::testgen::{Rng, service_documents};
use policy_bpf::services::{ServiceCapacity, lower_services, service_packet};
use policy_bpf_common::{ServiceAction, service_decide};
use proptest::prelude::*;

fn config(family: Family, r: &mut Rng) -> ProxyConfig {
    let v4 = family == Family::V4;
    ProxyConfig {
        family,
        node: NodeTopology {
            name: "node-a".into(),
            zone: r.chance(50).then(|| "zone-a".into()),
            prefer_same_node: true,
        },
        node_ips: [
            "192.168.0.2",
            "192.168.99.11",
            "2001:db8::1",
            "2001:db8::99",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect(),
        cluster_cidrs: if r.chance(80) {
            vec![
                if v4 { "10.0.0.0/8" } else { "fd00:10::/64" }
                    .parse()
                    .unwrap(),
            ]
        } else {
            vec![]
        },
        service_cidrs: if r.chance(70) {
            vec![
                if v4 { "172.30.0.0/16" } else { "fd00:96::/112" }
                    .parse()
                    .unwrap(),
            ]
        } else {
            vec![]
        },
        masquerade_all: r.chance(15),
        node_port_addresses: if r.chance(30) {
            vec!["192.168.0.0/24".parse().unwrap()]
        } else {
            vec![]
        },
    }
}

fn packets(r: &mut Rng, family: Family, n: usize) -> Vec<Packet> {
    let (sources, dests): (&[&str], &[&str]) = if family == Family::V4 {
        (
            &[
                "10.0.0.2",
                "10.0.1.1",
                "192.168.0.2",
                "127.0.0.1",
                "203.0.113.2",
                "203.0.113.200",
                "5.6.0.1",
            ],
            &[
                "172.30.0.1",
                "172.30.0.2",
                "172.30.0.3",
                "172.30.0.200",
                "192.168.0.2",
                "192.168.99.11",
                "5.6.0.1",
                "5.6.0.2",
                "8.8.8.8",
            ],
        )
    } else {
        (
            &[
                "fd00:10::5",
                "2001:db8::1",
                "::1",
                "2600::1",
                "2001:db8:5::1",
            ],
            &[
                "fd00:96::1",
                "fd00:96::2",
                "fd00:96::ff",
                "2001:db8::1",
                "2001:db8::99",
                "2001:db8:5::1",
            ],
        )
    };
    (0..n)
        .map(|_| Packet {
            source: r.pick(sources).parse::<IpAddr>().unwrap(),
            destination: r.pick(dests).parse::<IpAddr>().unwrap(),
            protocol: *r.pick(&[Protocol::Tcp, Protocol::Tcp, Protocol::Udp, Protocol::Sctp]),
            port: *r.pick(&[80, 81, 443, 30000, 30001, 30002, 30004, 30005]),
        })
        .collect()
}

fn maps_outcome(entries: &policy_bpf::services::ServiceEntries, p: &Packet) -> Outcome {
    match service_decide(
        &service_packet(p.source, p.destination, p.protocol, p.port),
        entries,
    ) {
        ServiceAction::Forward {
            first,
            count,
            masquerade,
            ..
        } => {
            let b = entries.backends_of(first, count);
            Outcome {
                masq: masquerade || b.iter().any(|a| a.ip() == p.source),
                output: Output::Endpoints(b.into_iter().collect()),
            }
        }
        ServiceAction::Drop(_) => Outcome {
            output: Output::Drop,
            masq: false,
        },
        ServiceAction::Reject(_) => Outcome {
            output: Output::Reject,
            masq: false,
        },
        ServiceAction::Pass => Outcome {
            output: Output::Pass,
            masq: false,
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn maps_agree_with_the_reference_model(seed in any::<u64>()) {
        let mut r = Rng::new(seed);
        let n = 1 + r.below(6);
        let docs = service_documents(&mut r, n);
        let objects = Objects::from_documents(&docs).unwrap();
        for family in [Family::V4, Family::V6] {
            let table = ServiceTable::build(config(family, &mut r), &objects.service_ports(family).unwrap());
            let entries = lower_services(&table, &ServiceCapacity::default()).unwrap();
            for p in packets(&mut r, family, 40) {
                let want = outcome(&table.decide(&p), p.source);
                prop_assert_eq!(maps_outcome(&entries, &p), want, "{:?}", p);
            }
        }
    }
}

#[test]
fn a_table_too_large_names_the_map() {
    let mut r = Rng::new(7);
    let docs = service_documents(&mut r, 40);
    let objects = Objects::from_documents(&docs).unwrap();
    let mut cfg = config(Family::V4, &mut r);
    cfg.node_port_addresses.clear();
    let table = ServiceTable::build(cfg, &objects.service_ports(Family::V4).unwrap());
    let capacity = ServiceCapacity {
        backends: 3,
        ..ServiceCapacity::default()
    };
    let err = lower_services(&table, &capacity).unwrap_err();
    assert_eq!(err.map, "PALISADE_SVC_BACKENDS");
    assert!(err.to_string().contains("nothing was changed"), "{err}");
    let capacity = ServiceCapacity {
        frontends: 1,
        ..ServiceCapacity::default()
    };
    assert_eq!(
        lower_services(&table, &capacity).unwrap_err().map,
        "PALISADE_SVC_FRONTENDS"
    );
}
