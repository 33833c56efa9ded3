//! Calico IPAM for Palisade: IP pools, allocation blocks with node
//! affinity, borrowing, handles and release, as Calico's
//! `libcalico-go/lib/ipam` defines them; pure logic over a compare-and-swap
//! store ([`store::IpamStore`]) with time and randomness injected.
//!
//! ```
//! use palisade_ipam::{AutoAssignArgs, Cluster, FixedEnv, Ipam, MemoryStore, Pool, Use};
//! use std::time::Duration;
//!
//! let mut cluster = Cluster::new();
//! let pool = serde_json::json!({"metadata": {"name": "frontend"},
//!                               "spec": {"cidr": "10.10.0.0/16"}});
//! cluster.set_pools(vec![Pool::from_document(&pool).unwrap()]).unwrap();
//! cluster.nodes.insert("node-a".into(), Default::default());
//! let (store, env) = (MemoryStore::new(), FixedEnv::new(Duration::from_secs(1_700_000_000), 7));
//! let ipam = Ipam::new(&store, &cluster, &env);
//!
//! let mut args = AutoAssignArgs::new("node-a", 2, 0, Use::Workload);
//! args.handle = Some("pod-a".into());
//! let got = ipam.auto_assign(&args);
//! let ips = got.v4.unwrap().ips;
//! assert_eq!(ips.len(), 2);
//! assert_eq!(ips[0].prefix_len(), 26); // each address with its block's prefix
//! assert_eq!(ipam.ips_by_handle("pod-a").unwrap(), ips);
//! ipam.release_by_handle("pod-a").unwrap();
//! assert!(ipam.ips_by_handle("pod-a").is_err());
//! ```

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod assign;
pub mod block;
pub mod check;
pub mod claim;
pub mod cluster;
pub mod cni;
pub mod error;
pub mod gc;
pub mod ipam;
pub mod pool;
pub mod records;
pub mod release;
pub mod store;
pub mod time;

pub use assign::{AssignIpArgs, Assignments, AutoAssignArgs, AutoAssigned, EnsureBlockArgs};
pub use block::{HostReserved, Release};
pub use cluster::Cluster;
pub use error::IpamError;
pub use ipam::{Env, FixedEnv, Ipam, IpamCache};
pub use pool::{Pool, Use};
pub use records::Config;
pub use release::{AffinityClaims, PoolUse, ReleaseOutcome};
pub use store::{IpamStore, MemoryStore};
