//! The compare-and-swap store IPAM runs on: string keys in Calico's etcd
//! layout, opaque values, a revision per key, and atomic multi-key commits
//! whose every write states what it expects to find.
//!
//! | record | key |
//! |---|---|
//! | allocation block | `/calico/ipam/v2/assignment/ipv4/block/10.10.0.0-26` |
//! | block affinity | `/calico/ipam/v2/host/<node>/ipv4/block/10.10.0.0-26` |
//! | handle | `/calico/ipam/v2/handle/<id>` |
//! | IPAM config | `/calico/ipam/v2/config` |
//!
//! A commit lands whole or not at all; when any expectation fails nothing
//! is written and the caller re-reads and tries again. The common
//! assignment (a free address in an affine block) is one commit: the block
//! and its handle together.

use std::collections::BTreeMap;
use std::sync::Mutex;

use ipnet::IpNet;

/// A key's version: changes on every write of the key (etcd's mod revision).
pub type Revision = u64;

/// A stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its key.
    pub key: String,
    /// Its value (JSON written by this crate).
    pub value: Vec<u8>,
    /// Its revision.
    pub revision: Revision,
}

/// What a write expects to find at its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// No record.
    Absent,
    /// The record at this revision.
    At(Revision),
}

/// One write of a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Create or replace.
    Put {
        /// The key.
        key: String,
        /// The new value.
        value: Vec<u8>,
        /// What must be there now.
        expect: Expect,
    },
    /// Remove.
    Delete {
        /// The key.
        key: String,
        /// The revision that must be there now.
        revision: Revision,
    },
}

impl Write {
    /// The key written.
    pub fn key(&self) -> &str {
        match self {
            Write::Put { key, .. } | Write::Delete { key, .. } => key,
        }
    }
}

/// Why a store call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// An expectation of the commit did not hold; nothing was written.
    #[error("update conflict on {key}")]
    Conflict {
        /// The first key whose expectation failed.
        key: String,
    },
    /// The store could not be reached or answered with an error.
    #[error("IPAM store unavailable: {0}")]
    Unavailable(String),
    /// A stored record does not parse.
    #[error("IPAM record {key} is corrupt: {message}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// A condition of [`IpamStore::commit_checked`] on records it does not
/// write: what a decision made from a cached view rests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check<'a> {
    /// The record at the key is as expected.
    Key(&'a str, Expect),
    /// No record under the prefix was written after the revision (a
    /// removed record is not seen here: check it by key).
    NoneNewer {
        /// The prefix.
        prefix: &'a str,
        /// The newest revision allowed.
        revision: Revision,
    },
}

impl Check<'_> {
    /// The key or prefix checked, for a conflict's message.
    pub fn key(&self) -> &str {
        match self {
            Check::Key(key, _) => key,
            Check::NoneNewer { prefix, .. } => prefix,
        }
    }
}

/// What [`IpamStore::commit_checked`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Every check held and every write landed, at this revision.
    Landed(Revision),
    /// The store cannot check and write in one step (nor tell the revision
    /// written); nothing was written.
    Unsupported,
}

/// One part of a batched read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read<'a> {
    /// The record at a key (zero or one entry).
    Key(&'a str),
    /// Every record under a prefix, in key order.
    Prefix(&'a str),
}

/// A compare-and-swap store of IPAM records (see the module documentation).
pub trait IpamStore: Send + Sync {
    /// Several reads at once: one round trip where the store can (etcd: one
    /// read-only transaction, so one revision). The default reads them one
    /// by one.
    fn read(&self, reads: &[Read<'_>]) -> Result<Vec<Vec<Entry>>, StoreError> {
        reads
            .iter()
            .map(|r| match r {
                Read::Key(k) => Ok(self.get(k)?.into_iter().collect()),
                Read::Prefix(p) => self.list(p),
            })
            .collect()
    }
    /// The record at `key`.
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError>;
    /// Every record whose key starts with `prefix`, in key order.
    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError>;
    /// Applies `writes` atomically: all of them, or none and `Conflict`.
    /// Keys are distinct. Durable once it returns `Ok`. A store without
    /// transactions over several records (the Kubernetes API) applies them
    /// in the order given and undoes them on a conflict, so callers order
    /// them so that every prefix is a state IPAM repairs: a handle counts
    /// an address before its block holds it, a block names its host before
    /// the affinity confirms it, and a block lets an address go before its
    /// handle stops counting it.
    fn commit(&self, writes: &[Write]) -> Result<(), StoreError>;
    /// Like [`commit`](IpamStore::commit), with `checks` on records not
    /// written holding in the same atomic step, and the revision every
    /// write took. A failed check is a `Conflict` naming its key or prefix.
    /// Stores that cannot do this in one step say `Unsupported` (the
    /// default) and write nothing.
    fn commit_checked(
        &self,
        checks: &[Check<'_>],
        writes: &[Write],
    ) -> Result<Committed, StoreError> {
        let _ = (checks, writes);
        Ok(Committed::Unsupported)
    }
}

/// Key prefix of every IPAM record.
pub const PREFIX: &str = "/calico/ipam/v2/";
/// The IPAM config key.
pub const CONFIG_KEY: &str = "/calico/ipam/v2/config";

fn family(cidr: &IpNet) -> &'static str {
    match cidr {
        IpNet::V4(_) => "ipv4",
        IpNet::V6(_) => "ipv6",
    }
}

/// `10.0.0.0/26` as Calico writes it in keys: `10.0.0.0-26`.
fn cidr_segment(cidr: &IpNet) -> String {
    format!("{}-{}", cidr.network(), cidr.prefix_len())
}

/// Reads a key segment `10.0.0.0-26` back.
pub fn parse_cidr_segment(segment: &str) -> Option<IpNet> {
    let (addr, len) = segment.rsplit_once('-')?;
    format!("{addr}/{len}").parse().ok()
}

/// The key of a block.
pub fn block_key(cidr: &IpNet) -> String {
    format!(
        "{PREFIX}assignment/{}/block/{}",
        family(cidr),
        cidr_segment(cidr)
    )
}

/// The prefix of every block of a family (`4` or `6`), or of both.
pub fn blocks_prefix(version: Option<u8>) -> String {
    match version {
        Some(v) => format!("{PREFIX}assignment/ipv{v}/block/"),
        None => format!("{PREFIX}assignment/"),
    }
}

/// The key of a host's affinity for a block.
pub fn affinity_key(host: &str, cidr: &IpNet) -> String {
    format!(
        "{PREFIX}host/{host}/{}/block/{}",
        family(cidr),
        cidr_segment(cidr)
    )
}

/// The prefix of a host's affinities (of one family, or both).
pub fn host_prefix(host: &str, version: Option<u8>) -> String {
    match version {
        Some(v) => format!("{PREFIX}host/{host}/ipv{v}/block/"),
        None => format!("{PREFIX}host/{host}/"),
    }
}

/// The prefix of every affinity.
pub fn affinities_prefix() -> String {
    format!("{PREFIX}host/")
}

/// Reads an affinity key back: host and block.
pub fn parse_affinity_key(key: &str) -> Option<(String, IpNet)> {
    let rest = key.strip_prefix(PREFIX)?.strip_prefix("host/")?;
    let (host, rest) = rest.split_once('/')?;
    let (_, segment) = rest.rsplit_once("/block/")?;
    Some((host.to_string(), parse_cidr_segment(segment)?))
}

/// The key of a handle.
pub fn handle_key(handle: &str) -> String {
    format!("{PREFIX}handle/{handle}")
}

/// The prefix of every handle.
pub fn handles_prefix() -> String {
    format!("{PREFIX}handle/")
}

/// A store in memory: for tests, the conformance runner and embedding in
/// processes that keep IPAM state elsewhere.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    records: BTreeMap<String, (Vec<u8>, Revision)>,
    revision: Revision,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        // A panic while holding the lock cannot leave a half-applied
        // commit (commits check everything before writing), so the data
        // behind a poisoned lock is whole.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl IpamStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        Ok(self.lock().records.get(key).map(|(v, r)| Entry {
            key: key.to_string(),
            value: v.clone(),
            revision: *r,
        }))
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        Ok(self
            .lock()
            .records
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (v, r))| Entry {
                key: k.clone(),
                value: v.clone(),
                revision: *r,
            })
            .collect())
    }

    fn commit(&self, writes: &[Write]) -> Result<(), StoreError> {
        self.commit_checked(&[], writes).map(|_| ())
    }

    fn commit_checked(
        &self,
        checks: &[Check<'_>],
        writes: &[Write],
    ) -> Result<Committed, StoreError> {
        let mut inner = self.lock();
        for c in checks {
            let have = |k: &str| inner.records.get(k).map(|(_, r)| *r);
            let held = match c {
                Check::Key(key, Expect::Absent) => have(key).is_none(),
                Check::Key(key, Expect::At(r)) => have(key) == Some(*r),
                Check::NoneNewer { prefix, revision } => inner
                    .records
                    .range(prefix.to_string()..)
                    .take_while(|(k, _)| k.starts_with(prefix))
                    .all(|(_, (_, r))| r <= revision),
            };
            if !held {
                return Err(StoreError::Conflict {
                    key: c.key().to_string(),
                });
            }
        }
        for w in writes {
            let have = inner.records.get(w.key()).map(|(_, r)| *r);
            let holds = match w {
                Write::Put { expect, .. } => match expect {
                    Expect::Absent => have.is_none(),
                    Expect::At(r) => have == Some(*r),
                },
                Write::Delete { revision, .. } => have == Some(*revision),
            };
            if !holds {
                return Err(StoreError::Conflict {
                    key: w.key().to_string(),
                });
            }
        }
        inner.revision += 1;
        let revision = inner.revision;
        for w in writes {
            match w {
                Write::Put { key, value, .. } => {
                    inner.records.insert(key.clone(), (value.clone(), revision));
                }
                Write::Delete { key, .. } => {
                    inner.records.remove(key);
                }
            }
        }
        Ok(Committed::Landed(revision))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_calicos_layout_and_read_back() {
        let b: IpNet = "10.10.0.64/26".parse().unwrap();
        assert_eq!(
            block_key(&b),
            "/calico/ipam/v2/assignment/ipv4/block/10.10.0.64-26"
        );
        let k = affinity_key("node-a", &b);
        assert_eq!(k, "/calico/ipam/v2/host/node-a/ipv4/block/10.10.0.64-26");
        assert_eq!(parse_affinity_key(&k), Some(("node-a".into(), b)));
        let b6: IpNet = "fd00::40/122".parse().unwrap();
        assert_eq!(
            parse_affinity_key(&affinity_key("n", &b6)),
            Some(("n".into(), b6))
        );
    }

    #[test]
    fn a_commit_with_one_stale_expectation_writes_nothing() {
        let s = MemoryStore::new();
        let put = |k: &str, expect| Write::Put {
            key: k.into(),
            value: b"v".to_vec(),
            expect,
        };
        s.commit(&[put("/a", Expect::Absent)]).unwrap();
        let a = s.get("/a").unwrap().unwrap().revision;
        let err = s
            .commit(&[put("/b", Expect::Absent), put("/a", Expect::At(a + 7))])
            .unwrap_err();
        assert_eq!(err, StoreError::Conflict { key: "/a".into() });
        assert!(s.get("/b").unwrap().is_none());
        s.commit(&[put("/b", Expect::Absent), put("/a", Expect::At(a))])
            .unwrap();
        assert_eq!(s.list("/").unwrap().len(), 2);
    }
}
