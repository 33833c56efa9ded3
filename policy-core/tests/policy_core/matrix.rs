//! The compiled matrix against the reference engine, cell by cell, on
//! generated clusters.

use palisade_testing::testgen::small_cluster;
use policy_core::EndpointKey;
use policy_core::compile::CompileOptions;
use policy_core::compile::{Compiler, Leaf};
use policy_core::connection::ConnectionSpec;
use policy_core::connection::{Peer, decide_connection, flow_between};
use policy_core::matrix::{CompiledMatrix, MatrixError};
use policy_core::net::Protocol;
use policy_core::{Change, Cluster, ReferenceEngine};

fn cluster(seed: u64) -> Cluster {
    let mut c = Cluster::new();
    c.apply(
        small_cluster(seed)
            .objects
            .into_iter()
            .map(Change::Upsert)
            .collect(),
    )
    .expect("generated cluster is valid");
    c
}

/// The fast path answers every cell exactly as the reference engine
/// does, deciding rule included, in both directions.
#[test]
fn cells_agree_with_the_reference_engine() {
    let specs = [
        (Protocol::TCP, Some(80)),
        (Protocol::TCP, Some(8080)),
        (Protocol::UDP, Some(53)),
        (Protocol::ICMP, None),
        (Protocol(253), None),
    ];
    let mut compared = 0;
    for seed in 0..24 {
        let cluster = cluster(seed);
        let (compiler, _) =
            Compiler::from_cluster(&cluster, CompileOptions::default()).expect("compiles");
        let reference = ReferenceEngine::new(&cluster);
        let pods: Vec<EndpointKey> = cluster
            .endpoints()
            .filter(|e| !e.ips.is_empty())
            .map(|e| e.key.clone())
            .collect();
        for (protocol, dst_port) in specs {
            let spec = ConnectionSpec {
                protocol,
                dst_port,
                src_port: None,
                icmp: None,
                ip_version: None,
            };
            let m = CompiledMatrix::new(&compiler, &pods, &pods, spec).expect("matrix");
            for (i, a) in pods.iter().enumerate() {
                let row = m.row(i);
                for (j, b) in pods.iter().enumerate() {
                    let (from, to) = (Peer::Endpoint(a.clone()), Peer::Endpoint(b.clone()));
                    let Ok(flow) = flow_between(&cluster, &from, &to, spec, None, None) else {
                        assert_eq!(row[j], None, "seed {seed}: {a} -> {b} has no flow");
                        continue;
                    };
                    let want = decide_connection(&reference, &cluster, &from, &to, &flow)
                        .expect("reference answers");
                    let got = row[j].unwrap_or_else(|| panic!("seed {seed}: {a} -> {b}"));
                    let name = |l: Option<Leaf>| {
                        l.map(|l| (l.verdict, m.rule(l.rule).expect("rule").decided_by()))
                    };
                    let want_name =
                        |d: Option<policy_core::Decision>| d.map(|d| (d.verdict, d.decided_by));
                    assert_eq!(got.allowed, want.allowed, "seed {seed}: {a} -> {b} {flow}");
                    assert_eq!(
                        name(got.egress),
                        want_name(want.egress),
                        "seed {seed}: {flow}"
                    );
                    assert_eq!(
                        name(got.ingress),
                        want_name(want.ingress),
                        "seed {seed}: {flow}"
                    );
                    compared += 1;
                }
            }
        }
    }
    assert!(compared > 1000, "only {compared} cells compared");
}

#[test]
fn pods_without_addresses_or_unknown_are_refused() {
    let cluster = cluster(1);
    let (compiler, _) =
        Compiler::from_cluster(&cluster, CompileOptions::default()).expect("compiles");
    let spec = ConnectionSpec {
        protocol: Protocol::TCP,
        dst_port: Some(80),
        src_port: None,
        icmp: None,
        ip_version: None,
    };
    let nosuch = EndpointKey::new("nosuch", "pod");
    assert_eq!(
        CompiledMatrix::new(&compiler, std::slice::from_ref(&nosuch), &[], spec).unwrap_err(),
        MatrixError::UnknownPod(nosuch)
    );
    let no_port = ConnectionSpec {
        dst_port: None,
        ..spec
    };
    assert!(matches!(
        CompiledMatrix::new(&compiler, &[], &[], no_port),
        Err(MatrixError::InvalidSpec(_))
    ));
}
