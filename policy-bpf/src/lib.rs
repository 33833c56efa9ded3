//! # policy-bpf
//!
//! Lowers Palisade's compiled policy into eBPF map contents, runs the TC
//! programs that enforce it, and provides the engines that check the lowering
//! and the kernel against the rest: `maps` (a user-space interpreter of the
//! exact map contents), `kernel` (the real program through
//! `BPF_PROG_TEST_RUN`) and `netns` (real sockets between network namespaces).
//!
//! ```
//! use policy_bpf::maps_engine::MapsEngine;
//! use policy_bpf::lower::Capacity;
//! use policy_core::manifest::parse_manifests;
//! use policy_core::{Cluster, Direction, EndpointKey, Engine, Flow};
//! use policy_core::net::Protocol;
//!
//! let yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
//! apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: a, labels: {app: web}}\nstatus: {podIP: 10.0.0.1}\n---\n\
//! apiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: a, labels: {app: db}}\nstatus: {podIP: 10.0.0.2}\n---\n\
//! apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: db, namespace: a}\n\
//! spec: {selector: app == 'db', ingress: [{action: Allow, source: {selector: app == 'web'}}]}\n";
//! let objects = parse_manifests("x.yaml", yaml).unwrap().into_iter().map(|l| l.object);
//! let cluster = Cluster::from_objects(objects).unwrap();
//! let engine = MapsEngine::new(&cluster, Capacity::default()).unwrap();
//! let flow = Flow::ports("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), Protocol::TCP, 40000, 5432);
//! let d = engine.decide(&EndpointKey::new("a", "db"), Direction::Ingress, &flow).unwrap();
//! assert_eq!(d.to_string(), "allow by tier default, np:a/db, rule 0 (allow)");
//! ```

pub mod conntrack;
pub mod datapath;
pub mod error;
pub mod kernel_engine;
pub mod lower;
pub mod maps_engine;
pub mod netns;
pub mod netns_engine;
pub mod packet;
