//! palisade-services against the vendored kube-proxy corpus, session
//! affinity and endpoint churn.

use std::path::PathBuf;

use palisade_services::case::{Case, check_selection, is_case, outcome};

fn corpus() -> Vec<(String, serde_json::Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../conformance/services");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            let doc = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            out.push((p.file_name().unwrap().to_string_lossy().into_owned(), doc));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn kube_proxy_corpus_on_the_reference_model() {
    let mut failures = Vec::new();
    let (mut passed, mut skipped) = (0, 0);
    for (name, doc) in corpus() {
        assert!(is_case(&doc), "{name}");
        let case = Case::from_json(&name, &doc).unwrap();
        let table = case.table().unwrap();
        for probe in &case.probes {
            if probe.skip_reason(&case).is_some() {
                skipped += 1;
                continue;
            }
            let packet = probe.packet().unwrap();
            let got = outcome(&table.decide(&packet), packet.source);
            let want = probe.expected().unwrap();
            if got == want {
                passed += 1;
            } else {
                failures.push(format!("{name} {}: got {got}, want {want}", probe.name));
            }
        }
        for check in &case.selection_checks {
            match check_selection(&case, check) {
                Ok(()) => passed += 1,
                Err(e) => failures.push(format!("{name} {}: {e}", check.name)),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        passed > 100 && skipped > 0,
        "{passed} passed, {skipped} skipped"
    );
}

mod state {
    use std::collections::BTreeSet;
    use std::net::SocketAddr;
    use std::time::Duration;

    use palisade_services::topology::NodeTopology;
    use palisade_services::{
        Connection, Family, NatOutcome, NatTable, Objects, PortName, Protocol, ProxyConfig,
        ServiceTable,
    };
    use proptest::prelude::*;
    use serde_json::{Value, json};

    fn config() -> ProxyConfig {
        ProxyConfig {
            family: Family::V4,
            node: NodeTopology {
                name: "node-a".into(),
                ..Default::default()
            },
            node_ips: vec!["192.168.0.2".parse().unwrap()],
            cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            service_cidrs: vec!["172.30.0.0/16".parse().unwrap()],
            masquerade_all: false,
            node_port_addresses: vec![],
        }
    }

    /// A ClusterIP Service `api` on 172.30.0.10:80 with these endpoint
    /// hosts (10.1.0.<h>:8080), optionally with ClientIP affinity.
    fn table(hosts: &BTreeSet<u8>, affinity: Option<u32>) -> ServiceTable {
        let mut spec = json!({"clusterIP": "172.30.0.10", "ports": [{"name": "http", "port": 80}]});
        if let Some(t) = affinity {
            spec["sessionAffinity"] = json!("ClientIP");
            spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": t}});
        }
        let endpoints: Vec<Value> = hosts
            .iter()
            .map(|h| json!({"addresses": [format!("10.1.0.{h}")]}))
            .collect();
        let docs = [
            json!({"kind": "Service", "metadata": {"name": "api", "namespace": "shop"}, "spec": spec}),
            json!({"kind": "EndpointSlice", "metadata": {"name": "api-1", "namespace": "shop",
                   "labels": {"kubernetes.io/service-name": "api"}}, "addressType": "IPv4",
                   "endpoints": endpoints, "ports": [{"name": "http", "port": 8080}]}),
        ];
        let objects = Objects::from_documents(&docs).unwrap();
        ServiceTable::build(config(), &objects.service_ports(Family::V4).unwrap())
    }

    fn conn(client: u8, port: u16) -> Connection {
        Connection {
            source: format!("10.9.0.{client}:{port}").parse().unwrap(),
            destination: "172.30.0.10:80".parse().unwrap(),
            protocol: Protocol::Tcp,
        }
    }

    fn backend(o: &NatOutcome) -> SocketAddr {
        match o {
            NatOutcome::New { backend, .. } | NatOutcome::Established { backend, .. } => *backend,
            other => panic!("not forwarded: {other:?}"),
        }
    }

    #[test]
    fn client_ip_affinity_holds_until_the_timeout() {
        let hosts: BTreeSet<u8> = (1..=5).collect();
        let t = table(&hosts, Some(60));
        let mut nat = NatTable::new();
        let s = |secs| Duration::from_secs(secs);
        // New connections every 20 s with varying randomness: one backend.
        let first = backend(&nat.packet(&t, &conn(1, 40000), s(0), 0));
        for (i, secs) in [20u64, 40, 60, 80, 100].iter().enumerate() {
            let b = backend(&nat.packet(&t, &conn(1, 40001 + i as u16), s(*secs), i as u64 + 1));
            assert_eq!(b, first, "connection at {secs}s moved");
        }
        // Another client is balanced on its own.
        let other = backend(&nat.packet(&t, &conn(2, 40000), s(100), 3));
        assert_eq!(other, "10.1.0.4:8080".parse::<SocketAddr>().unwrap());
        // 60 s after client 1's last new connection, a new one may move.
        let after: BTreeSet<SocketAddr> = (0..5u64)
            .map(|r| {
                let mut copy = nat.clone();
                backend(&copy.packet(&t, &conn(1, 50000), s(161), r))
            })
            .collect();
        assert_eq!(
            after.len(),
            5,
            "after the timeout every backend is possible"
        );
        assert_eq!(nat.affinity_entries(), 2);
        // Without affinity, the same client spreads.
        let t = table(&hosts, None);
        let mut nat = NatTable::new();
        let spread: BTreeSet<SocketAddr> = (0..5u64)
            .map(|r| backend(&nat.packet(&t, &conn(1, 41000 + r as u16), s(0), r)))
            .collect();
        assert_eq!(spread.len(), 5);
    }

    #[test]
    fn an_affinity_backend_that_leaves_is_not_used() {
        let mut hosts: BTreeSet<u8> = (1..=3).collect();
        let t = table(&hosts, Some(3600));
        let mut nat = NatTable::new();
        let b = backend(&nat.packet(&t, &conn(1, 40000), Duration::ZERO, 1));
        hosts.remove(
            &b.ip()
                .to_string()
                .rsplit('.')
                .next()
                .unwrap()
                .parse::<u8>()
                .unwrap(),
        );
        let t = table(&hosts, Some(3600));
        assert_eq!(nat.resync(&t), 1);
        let again = backend(&nat.packet(&t, &conn(1, 40001), Duration::from_secs(1), 1));
        assert_ne!(again, b);
    }

    #[derive(Debug, Clone)]
    enum Step {
        Add(u8),
        Remove(u8),
        Open(u8, u64),
        Packet(usize),
        Close(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (1u8..12).prop_map(Step::Add),
            (1u8..12).prop_map(Step::Remove),
            ((1u8..6), any::<u64>()).prop_map(|(c, r)| Step::Open(c, r)),
            (0usize..64).prop_map(Step::Packet),
            (0usize..64).prop_map(Step::Close),
        ]
    }

    proptest! {
        /// Endpoints come and go while connections run: a connection whose
        /// backend stays keeps it; a new connection only reaches a current
        /// endpoint; a Service with none rejects.
        #[test]
        fn churn_never_moves_or_misroutes(steps in proptest::collection::vec(step(), 1..80)) {
            let name = PortName { namespace: "shop".into(), service: "api".into(), port: "http".into() };
            let mut hosts: BTreeSet<u8> = [1, 2].into_iter().collect();
            let mut t = table(&hosts, None);
            let mut nat = NatTable::new();
            let mut open: Vec<(Connection, SocketAddr)> = Vec::new();
            let mut port = 30000u16;
            for (i, s) in steps.into_iter().enumerate() {
                let now = Duration::from_secs(i as u64);
                match s {
                    Step::Add(h) | Step::Remove(h) => {
                        if matches!(s, Step::Add(_)) { hosts.insert(h); } else { hosts.remove(&h); }
                        t = table(&hosts, None);
                        nat.resync(&t);
                        let current = &t.service(&name).unwrap().present;
                        open.retain(|(_, b)| current.contains(b));
                    }
                    Step::Open(client, r) => {
                        port += 1;
                        let c = conn(client, port);
                        match nat.packet(&t, &c, now, r) {
                            NatOutcome::New { backend, .. } => {
                                prop_assert!(t.service(&name).unwrap().cluster.contains(&backend),
                                             "new connection to {} not in {:?}", backend, hosts);
                                open.push((c, backend));
                            }
                            NatOutcome::NotForwarded(v) => prop_assert!(hosts.is_empty(), "{} with {:?}", v, hosts),
                            NatOutcome::Established { .. } => prop_assert!(false, "fresh tuple was tracked"),
                        }
                    }
                    Step::Packet(k) if !open.is_empty() => {
                        let (c, b) = open[k % open.len()];
                        prop_assert_eq!(nat.packet(&t, &c, now, 0), NatOutcome::Established { backend: b, masquerade: false });
                    }
                    Step::Close(k) if !open.is_empty() => {
                        let (c, _) = open.remove(k % open.len());
                        nat.close(&c);
                    }
                    _ => {}
                }
                prop_assert_eq!(nat.len(), open.len());
            }
        }
    }
}
