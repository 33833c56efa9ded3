//! IPAM records in one [redb] file on the node (`<state-dir>/ipam.redb`).
//!
//! - One table, key → (revision, value), and a revision counter in a second
//!   table: revisions keep increasing across reopens.
//! - A commit is one redb write transaction that checks every expectation
//!   and then writes; it is durable when it returns (redb's default
//!   `Durability::Immediate`: the commit is fsynced).
//! - **Several processes** (and several handles in one process) use the
//!   same file at once: the database is opened in redb's
//!   [`ConcurrencyMode::MultiWriter`], which serialises write transactions
//!   across processes with byte-range locks on the file (open file
//!   description locks, so two handles of one process exclude each other as
//!   two processes do) and lets every reader see the last commit. A writer
//!   waits for the one in progress on the lock itself (the kernel queues
//!   waiters; a dead writer's lock goes with its file); an open waits with
//!   backoff, for up to [`BUSY_FOR`], while a process that opened the file
//!   in another mode holds it. Every process sharing the file must use this
//!   type (or redb 5's `MultiWriter` mode).
//!
//! ```
//! use palisade_datastore::EmbeddedIpamStore;
//! use palisade_ipam::store::{Expect, IpamStore, StoreError, Write};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let store = EmbeddedIpamStore::open(dir.path().join("ipam.redb")).unwrap();
//! let key = "/calico/ipam/v2/handle/pod-a";
//! let put = |expect| Write::Put { key: key.into(), value: b"{}".to_vec(), expect };
//! store.commit(&[put(Expect::Absent)]).unwrap();
//! let entry = store.get(key).unwrap().unwrap();
//!
//! // A write that expects an older state writes nothing.
//! assert_eq!(
//!     store.commit(&[put(Expect::Absent)]),
//!     Err(StoreError::Conflict { key: key.into() })
//! );
//! store.commit(&[put(Expect::At(entry.revision))]).unwrap();
//!
//! // Another handle (or process) on the same file sees it.
//! let other = EmbeddedIpamStore::open(store.path()).unwrap();
//! assert!(other.get(key).unwrap().unwrap().revision > entry.revision);
//! ```
//!
//! [redb]: https://docs.rs/redb

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use palisade_ipam::store::{
    Check, Committed, Entry, Expect, IpamStore, Revision, StoreError, Write,
};
use redb::{
    ConcurrencyMode, Database, DatabaseError, ReadableDatabase, ReadableTable, TableDefinition,
    TableError, WriteTransaction,
};

use super::holds;

/// The records: key → (revision, value).
const RECORDS: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new(RECORDS_NAME);
const RECORDS_NAME: &str = "ipam_records";
/// The store's own state: [`REVISION`].
const META: TableDefinition<&str, u64> = TableDefinition::new(META_NAME);
const META_NAME: &str = "ipam_meta";
/// The last revision a commit took.
const REVISION: &str = "revision";

/// How long an open waits for a process holding the file in another mode
/// before it fails with `Unavailable`.
pub const BUSY_FOR: Duration = Duration::from_secs(10);

/// The longest pause between two attempts while the file is busy.
const MAX_BACKOFF: Duration = Duration::from_millis(20);

/// IPAM records in a redb file (see the module documentation).
pub struct EmbeddedIpamStore {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for EmbeddedIpamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedIpamStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Why a redb call failed, as a store error: damage the file's checksums,
/// header or types show is `Corrupt` (naming `key`: the record read, the
/// table, or the file), the rest `Unavailable`.
fn failed(path: &Path, key: &str, e: impl Into<redb::Error>) -> StoreError {
    let path = path.display();
    match e.into() {
        redb::Error::Corrupted(message) => StoreError::Corrupt {
            key: key.to_string(),
            message: format!("{path}: {message}"),
        },
        // Tables of other types, or a file that is not a redb database.
        e @ (redb::Error::TableTypeMismatch(_) | redb::Error::TypeDefinitionChanged(_)) => {
            StoreError::Corrupt {
                key: key.to_string(),
                message: format!("{path}: {e}"),
            }
        }
        redb::Error::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => StoreError::Corrupt {
            key: key.to_string(),
            message: format!("{path}: {e}"),
        },
        e => StoreError::Unavailable(format!("{path}: {e}")),
    }
}

/// Sleeps before the next attempt at a busy file: doubling from 100µs up to
/// [`MAX_BACKOFF`], with jitter so that waiting handles do not retry in
/// step.
fn backoff(wait: &mut Duration) {
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let pause = wait.mul_f64(0.5 + f64::from(jitter % 1000) / 1000.0);
    std::thread::sleep(pause);
    *wait = (*wait * 2).min(MAX_BACKOFF);
}

impl EmbeddedIpamStore {
    /// Opens the store at `path`, a file, created (empty) when missing; its
    /// directory must exist.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let deadline = Instant::now() + BUSY_FOR;
        let mut wait = Duration::from_micros(100);
        let db = loop {
            match Database::builder()
                .set_concurrency_mode(ConcurrencyMode::MultiWriter)
                .create(&path)
            {
                Ok(db) => break db,
                // Held by a handle in another mode, or being repaired by
                // another process after a crash: wait for it.
                Err(DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                    backoff(&mut wait);
                }
                Err(e) => return Err(failed(&path, &path.display().to_string(), e)),
            }
        };
        Ok(EmbeddedIpamStore { db, path })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The write transaction, once no other handle has one. The wait is
    /// the kernel's (a blocking byte-range lock), so waiting writers are
    /// served in turn instead of polling; a writer that dies releases the
    /// lock with its file.
    fn begin_write(&self) -> Result<WriteTransaction, StoreError> {
        self.db
            .begin_write()
            .map_err(|e| failed(&self.path, &self.path.display().to_string(), e))
    }

    /// Checks every expectation of `writes` in `txn` and writes them at the
    /// next revision; `Conflict` (and nothing written) at the first that
    /// fails.
    fn apply(
        &self,
        txn: &WriteTransaction,
        checks: &[Check<'_>],
        writes: &[Write],
    ) -> Result<Revision, StoreError> {
        let file = self.path.display().to_string();
        let mut records = txn
            .open_table(RECORDS)
            .map_err(|e| failed(&self.path, RECORDS_NAME, e))?;
        for c in checks {
            let held = match c {
                Check::Key(key, expect) => {
                    let have = records
                        .get(*key)
                        .map_err(|e| failed(&self.path, key, e))?
                        .map(|g| g.value().0);
                    match expect {
                        Expect::Absent => have.is_none(),
                        Expect::At(r) => have == Some(*r),
                    }
                }
                Check::NoneNewer { prefix, revision } => {
                    let mut newer = false;
                    for item in records
                        .range(*prefix..)
                        .map_err(|e| failed(&self.path, prefix, e))?
                    {
                        let (key, record) = item.map_err(|e| failed(&self.path, prefix, e))?;
                        if !key.value().starts_with(prefix) {
                            break;
                        }
                        if record.value().0 > *revision {
                            newer = true;
                            break;
                        }
                    }
                    !newer
                }
            };
            if !held {
                return Err(StoreError::Conflict {
                    key: c.key().to_string(),
                });
            }
        }
        for w in writes {
            let have = records
                .get(w.key())
                .map_err(|e| failed(&self.path, w.key(), e))?
                .map(|g| g.value().0);
            if !holds(w, have) {
                return Err(StoreError::Conflict {
                    key: w.key().to_string(),
                });
            }
        }
        let mut meta = txn
            .open_table(META)
            .map_err(|e| failed(&self.path, META_NAME, e))?;
        let last = meta
            .get(REVISION)
            .map_err(|e| failed(&self.path, &file, e))?
            .map_or(0, |g| g.value());
        let revision = last.checked_add(1).ok_or_else(|| StoreError::Corrupt {
            key: file.clone(),
            message: format!("revision counter at its maximum ({last})"),
        })?;
        for w in writes {
            match w {
                Write::Put { key, value, .. } => {
                    records
                        .insert(key.as_str(), (revision, value.as_slice()))
                        .map_err(|e| failed(&self.path, key, e))?;
                }
                Write::Delete { key, .. } => {
                    records
                        .remove(key.as_str())
                        .map_err(|e| failed(&self.path, key, e))?;
                }
            }
        }
        meta.insert(REVISION, revision)
            .map_err(|e| failed(&self.path, &file, e))?;
        Ok(revision)
    }
}

/// An entry from a stored record.
fn entry(key: &str, (revision, value): (u64, &[u8])) -> Entry {
    Entry {
        key: key.to_string(),
        value: value.to_vec(),
        revision,
    }
}

impl IpamStore for EmbeddedIpamStore {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| failed(&self.path, key, e))?;
        let table = match txn.open_table(RECORDS) {
            Ok(table) => table,
            // Nothing was ever committed.
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(failed(&self.path, key, e)),
        };
        let found = table.get(key).map_err(|e| failed(&self.path, key, e))?;
        Ok(found.map(|g| entry(key, g.value())))
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| failed(&self.path, prefix, e))?;
        let table = match txn.open_table(RECORDS) {
            Ok(table) => table,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(failed(&self.path, prefix, e)),
        };
        let mut entries = Vec::new();
        // Keys compare as their bytes, so the keys under a prefix are one
        // run starting at the prefix.
        for item in table
            .range(prefix..)
            .map_err(|e| failed(&self.path, prefix, e))?
        {
            let (key, record) = item.map_err(|e| failed(&self.path, prefix, e))?;
            let key = key.value();
            if !key.starts_with(prefix) {
                break;
            }
            entries.push(entry(key, record.value()));
        }
        Ok(entries)
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
        let txn = self.begin_write()?;
        match self.apply(&txn, checks, writes) {
            Ok(revision) => txn
                .commit()
                .map(|()| Committed::Landed(revision))
                .map_err(|e| failed(&self.path, &self.path.display().to_string(), e)),
            Err(e) => {
                // Nothing was written; dropping the transaction would abort
                // it as well.
                let _ = txn.abort();
                Err(e)
            }
        }
    }
}
