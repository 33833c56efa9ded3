//! # policy-core
//!
//! The semantic core of Palisade: Calico's selector language, the
//! Calico/Kubernetes policy model, manifest loading with precise errors, and
//! the `reference` engine that answers "is this connection allowed, and who
//! decided?" by evaluating tiers, policies and rules in Calico's order.
//!
//! The crate is pure: data in, data out, no I/O and no `unsafe`.
//!
//! ```
//! use policy_core::{Cluster, ReferenceEngine, Engine, Flow, Direction, EndpointKey};
//! use policy_core::manifest::parse_manifests;
//! use policy_core::net::Protocol;
//!
//! let yaml = r#"
//! apiVersion: v1
//! kind: Namespace
//! metadata: {name: shop}
//! ---
//! apiVersion: v1
//! kind: Pod
//! metadata: {name: web, namespace: shop, labels: {app: web}}
//! status: {podIP: 10.0.0.1}
//! ---
//! apiVersion: v1
//! kind: Pod
//! metadata: {name: db, namespace: shop, labels: {app: db}}
//! spec: {containers: [{name: pg, ports: [{name: pg, containerPort: 5432}]}]}
//! status: {podIP: 10.0.0.2}
//! ---
//! apiVersion: projectcalico.org/v3
//! kind: GlobalNetworkPolicy
//! metadata: {name: default-deny}
//! spec: {selector: all(), types: [Ingress, Egress]}
//! ---
//! apiVersion: projectcalico.org/v3
//! kind: NetworkPolicy
//! metadata: {name: db-from-web, namespace: shop}
//! spec:
//!   order: 100
//!   selector: app == 'db'
//!   ingress:
//!   - action: Allow
//!     protocol: TCP
//!     source: {selector: app == 'web'}
//!     destination: {ports: [pg]}
//! "#;
//! let objects = parse_manifests("example.yaml", yaml).unwrap();
//! let cluster = Cluster::from_objects(objects.into_iter().map(|l| l.object)).unwrap();
//! let engine = ReferenceEngine::new(&cluster);
//! let flow = Flow::ports("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(),
//!                        Protocol::TCP, 40000, 5432);
//! let db = EndpointKey::new("shop", "db");
//! let decision = engine.decide(&db, Direction::Ingress, &flow).unwrap();
//! assert_eq!(decision.to_string(), "allow by tier default, np:shop/db-from-web, rule 0 (allow)");
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// Received data never reaches an unwrap: failures are errors, and the few
// `expect`s left state an internal invariant.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod admin_api;
pub mod api;
pub mod cluster;
pub mod compile;
pub mod connection;
pub mod convert;
pub mod error;
pub mod flow;
pub mod lint;
pub mod manifest;
pub mod matrix;
pub mod model;
pub mod net;
pub mod reference;
pub mod selector;
pub mod service_match;
mod strict;
pub mod suggest;

pub use cluster::{Change, Cluster};
pub use connection::{Engine, EngineError};
pub use convert::Object;
pub use error::{Error, ErrorKind, Errors, InvalidValue, ObjectRef, Origin};
pub use flow::{DecidedBy, Decision, Flow, Verdict};
pub use model::{Direction, EndpointKey, Policy, PolicyId};
pub use reference::ReferenceEngine;
pub use selector::Selector;
