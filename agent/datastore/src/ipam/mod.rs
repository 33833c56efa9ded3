//! Durable stores for IPAM: the [`IpamStore`] trait of `palisade-ipam`
//! (string keys in Calico's etcd layout, opaque values, a revision per key,
//! atomic multi-key commits whose every write states what it expects to
//! find) on disk and in etcd.
//!
//! | store | for | revisions |
//! |---|---|---|
//! | [`EmbeddedIpamStore`] | one node: one redb file, shared by every process of the node that allocates | a counter kept in the file, one step per commit |
//! | [`EtcdIpamStore`] | several nodes: the same keys Calico's etcd datastore uses | etcd's: a key's `mod_revision` |
//! | [`KubeIpamStore`] | a cluster's API: Calico's IPAMBlock, BlockAffinity, IPAMHandle and IPAMConfig resources | each object's resourceVersion; a commit is ordered single-object writes with undo (see its module) |
//!
//! Both behave as [`palisade_ipam::store::MemoryStore`] does: `list` in key
//! order, a commit lands whole or not at all, and a failed expectation
//! writes nothing and names the first key whose expectation failed
//! ([`StoreError::Conflict`]). Every write of one commit takes the same
//! revision, greater than every revision before it.
//!
//! [`IpamStore`]: palisade_ipam::store::IpamStore
//! [`StoreError::Conflict`]: palisade_ipam::store::StoreError::Conflict

pub mod embedded;
pub mod etcd;
pub mod kubernetes;

pub use embedded::EmbeddedIpamStore;
pub use etcd::EtcdIpamStore;
pub use kubernetes::KubeIpamStore;

use palisade_ipam::store::{Expect, Revision, Write};

/// Whether `write`'s expectation holds when its key is at `have` (`None`:
/// no record).
fn holds(write: &Write, have: Option<Revision>) -> bool {
    match write {
        Write::Put {
            expect: Expect::Absent,
            ..
        } => have.is_none(),
        Write::Put {
            expect: Expect::At(revision),
            ..
        }
        | Write::Delete { revision, .. } => have == Some(*revision),
    }
}

/// The real clock and randomness IPAM runs on outside tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemEnv;

impl palisade_ipam::Env for SystemEnv {
    fn now(&self) -> std::time::Duration {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
    }

    fn random(&self) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        // A fresh random SipHash key per call, seeded by the OS.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(self.now().as_nanos());
        h.finish()
    }
}
