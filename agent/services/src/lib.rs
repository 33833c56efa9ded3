//! Kubernetes Service load balancing for Palisade, with kube-proxy's
//! semantics (its nftables proxier where the two proxiers differ): v1
//! Services and EndpointSlices in, a per-node frontend table out, and the
//! decision for a connection's first packet: DNAT to which endpoints,
//! masquerade or not, DROP or REJECT. Pure: no I/O; time and randomness
//! are passed in ([`Balancer::pick`]).
//!
//! ```
//! use palisade_services::{Family, Objects, Packet, Protocol, ProxyConfig, ServiceTable, Verdict};
//! use palisade_services::topology::NodeTopology;
//! use serde_json::json;
//!
//! let docs = [
//!     json!({"kind": "Service", "metadata": {"name": "api", "namespace": "backend"},
//!            "spec": {"clusterIP": "172.30.0.10", "ports": [{"name": "http", "port": 80}]}}),
//!     json!({"kind": "EndpointSlice", "metadata": {"name": "api-1", "namespace": "backend",
//!            "labels": {"kubernetes.io/service-name": "api"}}, "addressType": "IPv4",
//!            "endpoints": [{"addresses": ["10.20.0.5"], "nodeName": "node-a"}],
//!            "ports": [{"name": "http", "port": 8080}]}),
//! ];
//! let objects = Objects::from_documents(&docs).unwrap();
//! let config = ProxyConfig {
//!     family: Family::V4,
//!     node: NodeTopology { name: "node-a".into(), ..Default::default() },
//!     node_ips: vec!["192.168.0.2".parse().unwrap()],
//!     cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
//!     service_cidrs: vec!["172.30.0.0/16".parse().unwrap()],
//!     masquerade_all: false,
//!     node_port_addresses: vec![],
//! };
//! let table = ServiceTable::build(config, &objects.service_ports(Family::V4).unwrap());
//! let packet = Packet { source: "10.10.0.7".parse().unwrap(),
//!                       destination: "172.30.0.10".parse().unwrap(),
//!                       protocol: Protocol::Tcp, port: 80 };
//! match table.decide(&packet) {
//!     Verdict::Forward { backends, masquerade, .. } => {
//!         assert_eq!(backends, vec!["10.20.0.5:8080".parse().unwrap()]);
//!         assert!(!masquerade); // a pod client keeps its address
//!     }
//!     other => panic!("{other}"),
//! }
//! ```

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod affinity;
pub mod case;
pub mod decide;
pub mod error;
pub mod health;
pub mod nat;
pub mod objects;
pub mod table;
pub mod topology;

pub use affinity::Balancer;
pub use decide::{DropReason, Packet, RejectReason, Verdict};
pub use error::ServiceError;
pub use nat::{Connection, NatOutcome, NatTable};
pub use objects::{Endpoint, Family, Objects, PortName, Protocol, ServicePort};
pub use table::{FrontendKind, ProxyConfig, ServiceTable};
