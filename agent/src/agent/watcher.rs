//! The watcher thread: lists the datastore, then follows it; says when it
//! is lost, reconnects with backoff, resumes from its revision and lists
//! again after a compaction.

use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use palisade_datastore::{
    Datastore, EmbeddedStore, EtcdStore, Follower, KubeStore, Revision, StoreError, Watch,
};

use super::{AgentArgs, Input};
use crate::store_cmd::DatastoreKind;

/// Follows the datastore on its own thread: a listing, then changes as they
/// are written. When the datastore goes away it says so, and reconnects
/// with backoff: it resumes from the last revision it handed out, and lists
/// again only when the datastore no longer has the changes after it.
pub(super) fn spawn_watcher(args: &AgentArgs, tx: Sender<Input>) -> Result<()> {
    let store = args.store.clone();
    // One set of Kubernetes watches for the agent's life: a reconnect
    // follows them again rather than starting new ones.
    let kubernetes = match store.datastore {
        DatastoreKind::Kubernetes => Some(store.kubernetes()?),
        _ => None,
    };
    std::thread::Builder::new()
        .name("watcher".into())
        .spawn(move || match store.datastore {
            DatastoreKind::Embedded => watch_loop(
                &tx,
                || Ok(EmbeddedStore::open(&store.state_dir)?),
                |s, after| Ok(Watch::new(s.clone(), after)?),
            ),
            DatastoreKind::Etcd => watch_loop(
                &tx,
                || Ok(EtcdStore::connect(&store.etcd())?),
                |s, after| Ok(s.watch(after)?),
            ),
            DatastoreKind::Kubernetes => watch_loop(
                &tx,
                || kubernetes.clone().context("the Kubernetes datastore"),
                |s: &KubeStore, after| Ok(s.watch(after)?),
            ),
        })
        .context("starting the watcher thread")?;
    Ok(())
}

/// How a follow ended.
enum Ended {
    /// The writer is gone (the agent is stopping).
    Stopping,
    /// The history after our revision is gone: list again at once.
    Compacted,
    /// The datastore failed: say so, wait, reconnect.
    Failed(anyhow::Error),
}

fn watch_loop<S: Datastore, F: Follower>(
    tx: &Sender<Input>,
    open: impl Fn() -> Result<S>,
    follow: impl Fn(&S, Revision) -> Result<F>,
) {
    let mut resume: Option<Revision> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let ended = (|| -> Ended {
            let store = match open() {
                Ok(s) => s,
                Err(e) => return Ended::Failed(e),
            };
            let mut follower = match resume {
                Some(after) => match follow(&store, after) {
                    Ok(f) => {
                        if tx.send(Input::Resumed(after)).is_err() {
                            return Ended::Stopping;
                        }
                        f
                    }
                    Err(e) => return Ended::Failed(e),
                },
                None => {
                    let listed = store
                        .snapshot()
                        .map_err(anyhow::Error::from)
                        .and_then(|snap| Ok((follow(&store, snap.revision)?, snap)));
                    match listed {
                        Ok((f, snap)) => {
                            resume = Some(snap.revision);
                            if tx.send(Input::Listing(snap, Instant::now())).is_err() {
                                return Ended::Stopping;
                            }
                            f
                        }
                        Err(e) => return Ended::Failed(e),
                    }
                }
            };
            backoff = Duration::from_millis(100);
            loop {
                match follower.next(None) {
                    Ok(changes) => {
                        resume = Some(follower.revision());
                        if !changes.is_empty()
                            && tx.send(Input::Changes(changes, Instant::now())).is_err()
                        {
                            return Ended::Stopping;
                        }
                    }
                    Err(StoreError::Compacted { .. }) => return Ended::Compacted,
                    Err(e) => return Ended::Failed(e.into()),
                }
            }
        })();
        match ended {
            Ended::Stopping => return,
            Ended::Compacted => {
                tracing::warn!(after = ?resume, "the datastore compacted the changes after our revision: listing again");
                resume = None;
            }
            Ended::Failed(err) => {
                let why = format!("{err:#}");
                tracing::warn!(error = %why, retry_in = ?backoff, "datastore lost; the dataplane keeps enforcing the last state");
                if tx.send(Input::Lost(why)).is_err() {
                    return;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_datastore::{Snapshot, StoreChange, StoredObject, Written};
    use policy_core::ObjectRef;
    use std::collections::VecDeque;
    use std::sync::Arc;
    use std::sync::Mutex;

    type Script = Arc<Mutex<VecDeque<Result<Vec<StoreChange>, StoreError>>>>;

    /// A store that lists `revision`, and followers that play a script.
    struct Scripted {
        revision: Mutex<Revision>,
        script: Script,
    }

    struct Player {
        after: Revision,
        script: Script,
    }

    impl Datastore for Scripted {
        fn snapshot(&self) -> Result<Snapshot, StoreError> {
            Ok(Snapshot {
                revision: *self.revision.lock().unwrap(),
                objects: Vec::new(),
            })
        }
        fn apply_sources(&self, _: &[(String, String)]) -> Result<Written, StoreError> {
            Err(StoreError::Unavailable("read-only".into()))
        }
        fn delete(&self, _: &[ObjectRef]) -> Result<Written, StoreError> {
            Err(StoreError::Unavailable("read-only".into()))
        }
    }

    impl Follower for Player {
        fn revision(&self) -> Revision {
            self.after
        }
        fn next(&mut self, _: Option<Duration>) -> Result<Vec<StoreChange>, StoreError> {
            // Past the script the store is gone: the watcher says so, and
            // stops once nobody listens.
            let next = self.script.lock().unwrap().pop_front();
            let r = next.unwrap_or_else(|| Err(StoreError::Unavailable("script over".into())));
            if let Ok(c) = &r
                && let Some(last) = c.last()
            {
                self.after = last.revision();
            }
            r
        }
    }

    fn put(revision: Revision) -> StoreChange {
        StoreChange::Put(StoredObject {
            key: format!("k{revision}"),
            object: ObjectRef::new("GlobalNetworkPolicy", None, "p"),
            revision,
            document: serde_json::Value::Null,
        })
    }

    #[test]
    fn the_watcher_resumes_after_a_loss_and_lists_again_after_a_compaction() {
        let script = Arc::new(Mutex::new(VecDeque::from([
            Ok(vec![put(6)]),
            Err(StoreError::Unavailable("connection reset".into())),
            Ok(vec![put(7)]),
            Err(StoreError::Compacted {
                after: 7,
                compacted: 9,
            }),
        ])));
        let store = Arc::new(Scripted {
            revision: Mutex::new(5),
            script: script.clone(),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let watcher = {
            let store = store.clone();
            std::thread::spawn(move || {
                watch_loop(
                    &tx,
                    || {
                        // The second listing (after the compaction) is newer.
                        Ok(Scripted {
                            revision: Mutex::new(*store.revision.lock().unwrap()),
                            script: store.script.clone(),
                        })
                    },
                    |s, after| {
                        *store.revision.lock().unwrap() = 10;
                        Ok(Player {
                            after,
                            script: s.script.clone(),
                        })
                    },
                )
            })
        };
        let mut seen = Vec::new();
        while seen.len() < 6 {
            seen.push(match rx.recv().unwrap() {
                Input::Listing(s, _) => format!("listing {}", s.revision),
                Input::Changes(c, _) => format!("changes {}", c[0].revision()),
                Input::Lost(why) => format!("lost: {why}"),
                Input::Resumed(after) => format!("resumed after {after}"),
                Input::Stop => "stop".into(),
            });
        }
        drop(rx);
        watcher.join().unwrap();
        assert_eq!(
            seen,
            [
                "listing 5",
                "changes 6",
                "lost: connection reset",
                "resumed after 6",
                "changes 7",
                "listing 10",
            ]
        );
    }
}
