//! IPAM records in etcd v3, under the keys Calico's etcd datastore uses
//! (`/calico/ipam/v2/...`), for clusters of several nodes.
//!
//! - A record's revision is its key's `mod_revision`; the writes of one
//!   commit share the revision of its transaction.
//! - A commit is one etcd transaction: `version == 0` (no such key) for
//!   [`Expect::Absent`], `mod_revision == r` for [`Expect::At`] and
//!   [`Write::Delete`], then the puts and deletes. When a comparison fails
//!   the same transaction reads every key instead, so the `Conflict` names
//!   the first key whose expectation failed at that revision. etcd takes at
//!   most `--max-txn-ops` (128 by default) writes in one commit.
//! - Reads are retried while etcd cannot answer (a new leader, a member
//!   gone), as [`EtcdStore`](crate::EtcdStore)'s are, and a large listing
//!   is read in pages at one revision. A commit is never retried: when its
//!   answer is lost it may or may not have landed, so it returns
//!   `Unavailable` and the caller reads again.
//!
//! ```no_run
//! use palisade_datastore::{EtcdConfig, EtcdIpamStore};
//! use palisade_ipam::store::{Expect, IpamStore, Write};
//!
//! let store = EtcdIpamStore::connect(&EtcdConfig {
//!     endpoints: vec!["http://127.0.0.1:2379".into()],
//!     ..EtcdConfig::default()
//! })?;
//! let key = "/calico/ipam/v2/handle/pod-a";
//! store.commit(&[Write::Put { key: key.into(), value: b"{}".to_vec(), expect: Expect::Absent }])?;
//! let entry = store.get(key)?.expect("just written");
//! store.commit(&[Write::Delete { key: key.into(), revision: entry.revision }])?;
//! # Ok::<(), palisade_ipam::store::StoreError>(())
//! ```

use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse};
use palisade_ipam::store::{
    Check, Committed, Entry, Expect, IpamStore, Read, Revision, StoreError, Write,
};

use super::holds;
use crate::EtcdConfig;
use crate::etcd::{Connection, LIST_PAGE, prefix_end, retrying};

/// IPAM records in etcd (see the module documentation).
pub struct EtcdIpamStore {
    conn: Connection,
}

impl std::fmt::Debug for EtcdIpamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdIpamStore")
            .field("endpoints", &self.conn.endpoints)
            .finish_non_exhaustive()
    }
}

/// Whether a call may be tried again: etcd could not answer.
fn is_unavailable(e: &StoreError) -> bool {
    matches!(e, StoreError::Unavailable(_))
}

/// A stored key-value as an entry; `Corrupt` when its key is not UTF-8 or
/// its revision not a revision.
fn entry(kv: &KeyValue) -> Result<Entry, StoreError> {
    let key = std::str::from_utf8(kv.key()).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        message: format!("key is not UTF-8: {e}"),
    })?;
    let revision = u64::try_from(kv.mod_revision())
        .ok()
        .filter(|r| *r > 0)
        .ok_or_else(|| StoreError::Corrupt {
            key: key.to_string(),
            message: format!("mod revision {} is not a revision", kv.mod_revision()),
        })?;
    Ok(Entry {
        key: key.to_string(),
        value: kv.value().to_vec(),
        revision,
    })
}

/// The comparison that holds when `check` does. A prefix's: every key in
/// its range has a mod revision below the next one (a range with no keys
/// compares as a missing key, revision 0).
fn compare_check(check: &Check<'_>) -> Compare {
    match check {
        Check::Key(key, Expect::Absent) => Compare::version(*key, CompareOp::Equal, 0),
        Check::Key(key, Expect::At(revision)) => match i64::try_from(*revision) {
            Ok(revision) if revision > 0 => Compare::mod_revision(*key, CompareOp::Equal, revision),
            _ => Compare::mod_revision(*key, CompareOp::Less, 0),
        },
        Check::NoneNewer { prefix, revision } => {
            let below = i64::try_from(revision.saturating_add(1)).unwrap_or(i64::MAX);
            Compare::mod_revision(*prefix, CompareOp::Less, below)
                .with_range(prefix_end(prefix.as_bytes()))
        }
    }
}

/// The comparison that holds when `write`'s expectation does.
fn compare(write: &Write) -> Compare {
    let key = write.key();
    let revision = match write {
        Write::Put {
            expect: Expect::Absent,
            ..
        } => return Compare::version(key, CompareOp::Equal, 0),
        Write::Put {
            expect: Expect::At(revision),
            ..
        }
        | Write::Delete { revision, .. } => *revision,
    };
    match i64::try_from(revision) {
        Ok(revision) if revision > 0 => Compare::mod_revision(key, CompareOp::Equal, revision),
        // No record is at revision 0 (a missing key's mod_revision is 0 to
        // etcd) or past i64: a comparison that never holds.
        _ => Compare::mod_revision(key, CompareOp::Less, 0),
    }
}

impl EtcdIpamStore {
    /// Connects to the cluster (any reachable member will do).
    pub fn connect(config: &EtcdConfig) -> Result<Self, StoreError> {
        let conn = Connection::open(config).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(EtcdIpamStore { conn })
    }

    fn unavailable(&self) -> impl Fn(etcd_client::Error) -> StoreError + '_ {
        move |e| StoreError::Unavailable(format!("etcd at {}: {e}", self.conn.endpoints))
    }

    /// The record at `key` (one attempt).
    fn get_once(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let mut client = self.conn.client.clone();
        let resp = self
            .conn
            .runtime
            .block_on(client.get(key, None))
            .map_err(self.unavailable())?;
        resp.kvs().first().map(entry).transpose()
    }

    /// The records under `prefix` (one attempt): pages of
    /// [`LIST_PAGE`] keys, every page at the revision of the first.
    fn list_once(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let mut client = self.conn.client.clone();
        let end = prefix_end(prefix.as_bytes());
        // etcd has no empty key: everything is from "\0" on.
        let mut from = if prefix.is_empty() {
            vec![0]
        } else {
            prefix.as_bytes().to_vec()
        };
        let kvs = self.conn.runtime.block_on(async {
            let mut revision = 0i64;
            let mut kvs = Vec::new();
            loop {
                let mut options = GetOptions::new()
                    .with_range(end.clone())
                    .with_limit(LIST_PAGE);
                if revision > 0 {
                    options = options.with_revision(revision);
                }
                let mut page = client.get(from.clone(), Some(options)).await?;
                if revision == 0 {
                    revision = page.header().map_or(0, |h| h.revision());
                }
                let more = page.more();
                let got = page.take_kvs();
                if let Some(last) = got.last() {
                    from = last.key().to_vec();
                    from.push(0);
                }
                kvs.extend(got);
                if !more {
                    break;
                }
            }
            Ok::<_, etcd_client::Error>(kvs)
        });
        // In key order, as etcd returns a range.
        kvs.map_err(self.unavailable())?.iter().map(entry).collect()
    }
}

impl EtcdIpamStore {
    /// Every read in one read-only transaction (one round trip, one
    /// revision); a prefix with more than a page of keys is read again
    /// whole (one attempt).
    fn read_once(&self, reads: &[Read<'_>]) -> Result<Vec<Vec<Entry>>, StoreError> {
        let ops: Vec<TxnOp> = reads
            .iter()
            .map(|r| match r {
                Read::Key(k) => TxnOp::get(*k, None),
                Read::Prefix(p) => TxnOp::get(
                    *p,
                    Some(
                        GetOptions::new()
                            .with_range(prefix_end(p.as_bytes()))
                            .with_limit(LIST_PAGE),
                    ),
                ),
            })
            .collect();
        let mut client = self.conn.client.clone();
        let resp = self
            .conn
            .runtime
            .block_on(client.txn(Txn::new().and_then(ops)))
            .map_err(self.unavailable())?;
        let mut out = Vec::with_capacity(reads.len());
        for (r, got) in reads.iter().zip(resp.op_responses()) {
            let TxnOpResponse::Get(got) = got else {
                return Err(StoreError::Unavailable(
                    "etcd answered a read with something else".into(),
                ));
            };
            match r {
                Read::Prefix(p) if got.more() => out.push(self.list_once(p)?),
                _ => out.push(got.kvs().iter().map(entry).collect::<Result<_, _>>()?),
            }
        }
        Ok(out)
    }
}

impl IpamStore for EtcdIpamStore {
    fn read(&self, reads: &[Read<'_>]) -> Result<Vec<Vec<Entry>>, StoreError> {
        retrying(is_unavailable, || self.read_once(reads))
    }

    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        retrying(is_unavailable, || self.get_once(key))
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        retrying(is_unavailable, || self.list_once(prefix))
    }

    fn commit(&self, writes: &[Write]) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        self.commit_checked(&[], writes).map(|_| ())
    }

    fn commit_checked(
        &self,
        checks: &[Check<'_>],
        writes: &[Write],
    ) -> Result<Committed, StoreError> {
        let mut compares: Vec<Compare> = checks.iter().map(compare_check).collect();
        compares.extend(writes.iter().map(compare));
        let ops: Vec<TxnOp> = writes
            .iter()
            .map(|w| match w {
                Write::Put { key, value, .. } => TxnOp::put(key.as_str(), value.clone(), None),
                Write::Delete { key, .. } => TxnOp::delete(key.as_str(), None),
            })
            .collect();
        // When a comparison fails: every key compared as it was then, to
        // name the first whose expectation failed.
        let key_checks: Vec<(&str, Expect)> = checks
            .iter()
            .filter_map(|c| match c {
                Check::Key(k, e) => Some((*k, *e)),
                Check::NoneNewer { .. } => None,
            })
            .collect();
        let reads: Vec<TxnOp> = key_checks
            .iter()
            .map(|(k, _)| TxnOp::get(*k, None))
            .chain(writes.iter().map(|w| TxnOp::get(w.key(), None)))
            .collect();
        let txn = Txn::new().when(compares).and_then(ops).or_else(reads);
        let mut client = self.conn.client.clone();
        // Not retried (unlike reads): an error here may mean the answer was
        // lost after etcd applied the transaction, and a blind retry would
        // then fail its comparisons against our own writes and report a
        // conflict that is not one. `Unavailable` tells the caller to read
        // again and decide.
        let resp = self
            .conn
            .runtime
            .block_on(client.txn(txn))
            .map_err(self.unavailable())?;
        if resp.succeeded() {
            let revision = resp.header().map_or(0, |h| h.revision());
            return u64::try_from(revision)
                .ok()
                .filter(|r| *r > 0)
                .map(Committed::Landed)
                .ok_or_else(|| {
                    StoreError::Unavailable(format!(
                        "etcd answered a commit with revision {revision}"
                    ))
                });
        }
        let mut answers = resp.op_responses().into_iter();
        let mut have = || -> Result<Option<Revision>, StoreError> {
            match answers.next() {
                Some(TxnOpResponse::Get(got)) => match got.kvs().first() {
                    Some(kv) => Ok(Some(entry(kv)?.revision)),
                    None => Ok(None),
                },
                _ => Ok(None),
            }
        };
        for (key, expect) in &key_checks {
            let found = have()?;
            let held = match expect {
                Expect::Absent => found.is_none(),
                Expect::At(r) => found == Some(*r),
            };
            if !held {
                return Err(StoreError::Conflict {
                    key: key.to_string(),
                });
            }
        }
        for w in writes {
            if !holds(w, have()?) {
                return Err(StoreError::Conflict {
                    key: w.key().to_string(),
                });
            }
        }
        // Some comparison failed and it was none of the keys': a prefix's.
        let key = checks
            .iter()
            .find(|c| matches!(c, Check::NoneNewer { .. }))
            .map_or_else(|| writes.first().map_or("", |w| w.key()), |c| c.key());
        Err(StoreError::Conflict {
            key: key.to_string(),
        })
    }
}
