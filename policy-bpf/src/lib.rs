//! # policy-bpf
//!
//! Lowers Palisade's compiled policy into eBPF map contents and runs the TC
//! programs that enforce it: [`lower`] turns a compiler's delta into ordered
//! map writes (and keeps a mirror of every map), [`datapath`] loads the
//! programs, writes plans with rollback and attaches to interfaces. The
//! engines that check all this against the reference live in
//! `palisade-testing`.
//!
//! ```
//! use policy_bpf::lower::{Capacity, Lowering, full_delta};
//! use policy_core::compile::{CompileOptions, Compiler};
//! use policy_core::manifest::parse_manifests;
//! use policy_core::Cluster;
//!
//! let yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
//! apiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: a, labels: {app: db}}\nstatus: {podIP: 10.0.0.2}\n---\n\
//! apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: db, namespace: a}\n\
//! spec: {selector: app == 'db', ingress: [{action: Allow, source: {selector: app == 'web'}}]}\n";
//! let objects = parse_manifests("x.yaml", yaml).unwrap().into_iter().map(|l| l.object);
//! let cluster = Cluster::from_objects(objects).unwrap();
//! let (compiler, _) = Compiler::from_cluster(&cluster, CompileOptions::default()).unwrap();
//! let mut lowering = Lowering::new(Capacity::default());
//! let plan = lowering.lower(&full_delta(&compiler)).unwrap();
//! // Entries first, then the switches that make them live, then cleanup.
//! assert!(!plan.prepare.is_empty() && !plan.switch.is_empty());
//! assert_eq!(lowering.mirror().lpm4.len(), 1);
//! ```

// Received data never reaches an unwrap: failures are errors, and the few
// `expect`s left state an internal invariant.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod conntrack;
pub mod datapath;
pub mod error;
pub mod lower;
pub mod nat_expiry;
pub mod packet;
pub mod services;
