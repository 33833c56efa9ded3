//! # palisade-testing
//!
//! Everything that checks Palisade and that a production agent never links:
//! the conformance case format and runner ([`conformance`]), seeded
//! generators of clusters, changes and flows ([`testgen`]), and the engines
//! that answer from the lowered maps ([`maps_engine`]), from the kernel
//! programs through `BPF_PROG_TEST_RUN` ([`kernel_engine`]) and from real
//! traffic between network namespaces ([`netns_engine`], on the lab of
//! [`netns`]), real etcd clusters on loopback ([`etcd`]), and a cluster of
//! agents on one machine that pods join through CNI ([`lab`]). The CLI's `verify`, `matrix --engine` and `explain --engine`
//! use it; libraries take it as a dev-dependency of their integration tests.
//!
//! ```
//! use palisade_testing::conformance::{parse_case, run_case, ProbeStatus};
//! use palisade_testing::maps_engine::MapsEngine;
//! use policy_bpf::lower::Capacity;
//!
//! let case = r#"{
//!   "source": "example",
//!   "namespaces": {"x": {"labels": {"ns": "x"}}},
//!   "pods": [{"namespace": "x", "name": "a", "labels": {"pod": "a"}, "ip": "10.0.1.1"},
//!            {"namespace": "x", "name": "b", "labels": {"pod": "b"}, "ip": "10.0.1.2"}],
//!   "policies": [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
//!                 "metadata": {"name": "deny", "namespace": "x"},
//!                 "spec": {"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"]}}],
//!   "probes": [{"from": "x/a", "to": "x/b", "port": 80, "protocol": "TCP", "allowed": false},
//!              {"from": "x/b", "to": "x/a", "port": 80, "protocol": "TCP", "allowed": true}]
//! }"#;
//! let case = parse_case("example.json", case).unwrap();
//! let engine = MapsEngine::new(&case.cluster, Capacity::default()).unwrap();
//! let results = run_case(&engine, &case);
//! assert!(results.iter().all(|r| r.status == ProbeStatus::Passed));
//! ```

pub mod cgroup;
pub mod conformance;
pub mod etcd;
pub mod ipam_conformance;
pub mod testgen;

#[cfg(feature = "bpf")]
pub mod kernel_engine;
#[cfg(feature = "bpf")]
pub mod lab;
#[cfg(feature = "bpf")]
pub mod maps_engine;
#[cfg(feature = "bpf")]
pub mod netns;
#[cfg(feature = "bpf")]
pub mod netns_engine;
