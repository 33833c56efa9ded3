//! The embedded datastore: a state directory holding an append-only change
//! log (`changes.jsonl`, one JSON record per line), for a single node.
//!
//! - Writers take an exclusive `flock` on `lock`, read the log, validate,
//!   append the whole batch with one write and `fdatasync` it. Readers take
//!   the shared lock, so they see whole batches only.
//! - A crash mid-append leaves a torn last line: readers ignore it and the
//!   next writer cuts it off. Any other unreadable line is corruption and
//!   is reported with its line number, never skipped.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use policy_core::ObjectRef;

use crate::plan::{Batch, parse_sources, plan_apply, plan_delete};
use crate::{Datastore, Revision, Snapshot, StoreChange, StoreError, StoredObject, Written};

const LOG: &str = "changes.jsonl";
const LOCK: &str = "lock";

/// A datastore in a local directory (see the module documentation).
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    dir: PathBuf,
}

/// The log as read: its changes and the length of its whole lines.
struct Log {
    changes: Vec<StoreChange>,
    whole_bytes: u64,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let store = Self { dir };
        for name in [LOG, LOCK] {
            let path = store.dir.join(name);
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io(&path))?;
        }
        Ok(store)
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The changes after a revision, in order.
    pub fn changes_since(&self, after: Revision) -> Result<Vec<StoreChange>, StoreError> {
        self.locked(false, || {
            Ok(self
                .read_log()?
                .changes
                .into_iter()
                .filter(|c| c.revision() > after)
                .collect())
        })
    }

    /// The change log's path: an agent watches it (inotify) to hear of
    /// changes as they are written.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(LOG)
    }

    /// Runs `f` holding the store's lock (shared for readers, exclusive
    /// for writers).
    fn locked<T>(
        &self,
        exclusive: bool,
        f: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let path = self.dir.join(LOCK);
        let file = File::open(&path).map_err(io(&path))?;
        let how = if exclusive {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockShared
        };
        let _guard = Flock::lock(file, how).map_err(|(_, e)| StoreError::Io {
            path: path.display().to_string(),
            source: e.into(),
        })?;
        f()
    }

    fn read_log(&self) -> Result<Log, StoreError> {
        let path = self.log_path();
        let mut text = String::new();
        File::open(&path)
            .and_then(|mut f| f.read_to_string(&mut text))
            .map_err(io(&path))?;
        let mut changes = Vec::new();
        let mut whole_bytes = 0u64;
        let mut rest = text.as_str();
        let mut line_no = 0;
        while let Some(end) = rest.find('\n') {
            line_no += 1;
            let line = &rest[..end];
            let change: StoreChange =
                serde_json::from_str(line).map_err(|e| StoreError::Corrupt {
                    path: path.display().to_string(),
                    line: line_no,
                    message: e.to_string(),
                })?;
            changes.push(change);
            whole_bytes += end as u64 + 1;
            rest = &rest[end + 1..];
        }
        // `rest` is a torn last write (no newline yet): not part of the log.
        Ok(Log {
            changes,
            whole_bytes,
        })
    }

    fn append(&self, whole_bytes: u64, changes: &[StoreChange]) -> Result<(), StoreError> {
        let path = self.log_path();
        let mut file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        // Drop a torn tail left by a crash before appending after it.
        file.set_len(whole_bytes).map_err(io(&path))?;
        let mut batch = Vec::new();
        for c in changes {
            serde_json::to_writer(&mut batch, c).map_err(|e| StoreError::Io {
                path: path.display().to_string(),
                source: e.into(),
            })?;
            batch.push(b'\n');
        }
        use std::io::Seek;
        file.seek(std::io::SeekFrom::End(0)).map_err(io(&path))?;
        file.write_all(&batch).map_err(io(&path))?;
        file.sync_data().map_err(io(&path))
    }

    /// Applies objects read with their documents as one batch.
    fn apply_loaded(&self, batch: Batch) -> Result<Written, StoreError> {
        self.locked(true, || {
            let log = self.read_log()?;
            let state = fold(&log.changes);
            let (changes, mut written) = plan_apply(&state, batch, state.revision + 1)?;
            if !changes.is_empty() {
                self.append(log.whole_bytes, &changes)?;
                written.revision = state.revision + 1;
            }
            Ok(written)
        })
    }
}

impl Datastore for EmbeddedStore {
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.locked(false, || Ok(fold(&self.read_log()?.changes)))
    }

    fn apply_sources(&self, sources: &[(String, String)]) -> Result<Written, StoreError> {
        self.apply_loaded(parse_sources(sources)?)
    }

    fn delete(&self, objects: &[ObjectRef]) -> Result<Written, StoreError> {
        self.locked(true, || {
            let log = self.read_log()?;
            let state = fold(&log.changes);
            let (changes, written) = plan_delete(&state, objects, state.revision + 1)?;
            self.append(log.whole_bytes, &changes)?;
            Ok(written)
        })
    }
}

/// The state the changes lead to.
fn fold(changes: &[StoreChange]) -> Snapshot {
    let mut objects: BTreeMap<String, StoredObject> = BTreeMap::new();
    let mut revision = 0;
    for c in changes {
        revision = revision.max(c.revision());
        match c {
            StoreChange::Put(o) => {
                objects.insert(o.key.clone(), o.clone());
            }
            StoreChange::Deleted { key, .. } => {
                objects.remove(key);
            }
        }
    }
    Snapshot {
        revision,
        objects: objects.into_values().collect(),
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}
