//! Palisade's CNI plugin. The `palisade-cni` binary (in the `palisade`
//! package, beside the agent) is thin, as Cilium's
//! is: it reads the call ([`spec::Invocation`] from the environment,
//! [`spec::NetConf`] from stdin), answers VERSION itself, and hands every
//! other verb to the node agent over a root-only Unix socket
//! ([`protocol`]). The agent does the work (addresses from IPAM, the veth,
//! the workload endpoint, the policy in the kernel before ADD returns), so
//! one process owns the datastore, the kernel and the rollback.
//!
//! ```
//! use palisade_cni::spec::{NetConf, ErrorCode};
//! let conf = NetConf::parse(br#"{"cniVersion": "1.0.0", "name": "frontend",
//!     "type": "palisade-cni", "namespace": "shop", "ipam": {"ipv4_pools": ["frontend"]}}"#)
//!     .unwrap();
//! assert_eq!(conf.ipv4_pools, ["frontend"]);
//! let bad = NetConf::parse(br#"{"cniVersion": "9.9.9", "name": "n", "type": "t"}"#).unwrap_err();
//! assert_eq!(bad.code, ErrorCode::IncompatibleVersion);
//! ```

#![forbid(unsafe_code)]

pub mod plugin;
pub mod protocol;
pub mod spec;
