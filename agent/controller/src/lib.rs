//! Palisade's node controller, sans I/O: policy objects, endpoints and
//! interface changes come in; map writes go out to a [`Dataplane`]. The C
//! ABI (`palisade-ffi`), the CLI and the node agent all drive this one
//! controller, so staging, atomic apply, rollback and interface binding
//! behave the same everywhere.
//!
//! The dataplane is a trait, the way rustls takes its providers: the real
//! one loads Palisade's TC programs with aya ([`AyaDataplane`], cargo
//! feature `aya`), [`MirrorDataplane`] keeps the maps in memory for tests
//! and dry runs (and can refuse writes on purpose).
//!
//! ```
//! use palisade_controller::{Controller, MirrorDataplane};
//! use policy_core::connection::ConnectionSpec;
//! use policy_core::net::Protocol;
//!
//! let dataplane = MirrorDataplane::with_interfaces([("veth-db", 7, [2, 0, 0, 0, 0, 7])]);
//! let mut c = Controller::new(None, dataplane);
//! c.load_manifests("policy.yaml", "\
//! apiVersion: v1
//! kind: Namespace
//! metadata: {name: shop}
//! ---
//! apiVersion: projectcalico.org/v3
//! kind: NetworkPolicy
//! metadata: {name: db, namespace: shop}
//! spec: {selector: app == 'db', ingress: [{action: Allow, source: {selector: app == 'web'}}]}
//! ").unwrap();
//! c.upsert_endpoint_json(r#"{"namespace":"shop","name":"web","labels":{"app":"web"},"ips":["10.0.0.1"]}"#).unwrap();
//! c.upsert_endpoint_json(r#"{"namespace":"shop","name":"db","labels":{"app":"db"},"ips":["10.0.0.2"]}"#).unwrap();
//! let applied = c.apply().unwrap();
//! assert!(!applied.plan.is_empty());
//!
//! // The first attach loads the programs with everything applied so far.
//! c.attach("veth-db", Some("shop/db".parse().unwrap())).unwrap();
//! assert!(c.dataplane().loaded);
//!
//! let (web, _) = c.peer("shop/web", "src").unwrap();
//! let (db, _) = c.peer("shop/db", "dst").unwrap();
//! let spec = ConnectionSpec { protocol: Protocol::TCP, dst_port: Some(5432), src_port: None, icmp: None, ip_version: None };
//! let checked = c.check((&web, None), (&db, None), spec).unwrap();
//! assert!(checked.allowed, "{checked:?}");
//! ```

// Received data never reaches an unwrap: failures are errors, and the few
// `expect`s left state an internal invariant.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod controller;
mod dataplane;
mod endpoint_json;
mod error;

#[cfg(feature = "aya")]
mod aya_dataplane;

#[cfg(feature = "aya")]
pub use aya_dataplane::{AyaDataplane, STALL_ENV, STALL_MESSAGE};
pub use controller::{Applied, AttachedInterface, Checked, Controller, Started};
pub use dataplane::{Adopted, Dataplane, MirrorDataplane, UnavailableDataplane, full_plan};
pub use endpoint_json::parse_endpoint;
pub use error::{ControllerError, DataplaneError};
