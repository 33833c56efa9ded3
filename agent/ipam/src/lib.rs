//! Calico IPAM for Palisade (work in progress, issue 19): the allocation
//! logic, pure, over stores behind a trait. So far: allocation blocks and
//! validated IP pools.
//!
//! ```
//! use palisade_ipam::block::Block;
//! use std::collections::BTreeMap;
//!
//! let mut b = Block::new("10.10.0.0/30".parse().unwrap(), 1, None);
//! let got = b.auto_assign(2, Some("pod-a"), &BTreeMap::new(), |_| false);
//! assert_eq!(got.len(), 2);
//! assert_eq!(b.ips_by_handle("pod-a"), got);
//! ```

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod block;
pub mod pool;
pub mod store;
