//! The etcd v3 datastore, for more than one node: objects under Calico's
//! etcdv3 layout (`/calico/resources/v3/projectcalico.org/<plural>/[<ns>/]<name>`,
//! whole objects as JSON), the Kubernetes kinds Calico's etcd mode does not
//! store under `/palisade/resources/`.
//!
//! - A write validates against a listing and commits in one transaction
//!   that compares every key it touches with the listing (created keys must
//!   still be absent): a concurrent writer makes it list and try again.
//! - [`EtcdWatch`] follows both prefixes on one watch stream from a
//!   revision, and says [`StoreError::Compacted`] when etcd no longer has
//!   that history: the follower lists again.
//! - The client is async (tonic); this backend runs it on its own runtime
//!   behind the synchronous [`Datastore`] trait.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, TlsOptions, Txn, TxnOp, WatchOptions, WatchStream,
};
use policy_core::ObjectRef;
use tokio::runtime::Runtime;

use crate::kinds::{document_ref, ref_of_key};
use crate::plan::{parse_sources, plan_apply, plan_delete};
use crate::{
    Datastore, Follower, Revision, Snapshot, StoreChange, StoreError, StoredObject, Written,
};

/// The key prefixes objects live under.
pub const PREFIXES: [&str; 2] = [
    "/calico/resources/v3/projectcalico.org/",
    "/palisade/resources/",
];

/// How long a request waits for etcd to answer again (a new leader, another
/// member) before it fails.
const UNAVAILABLE_FOR: Duration = Duration::from_secs(10);

/// etcd's default limit of operations in one transaction (`--max-txn-ops`).
const TXN_OPS: usize = 128;

/// Keys per page of a listing.
pub(crate) const LIST_PAGE: i64 = 500;

/// Times a write lists and tries again when another writer got there first.
const WRITE_ATTEMPTS: usize = 8;

/// Where etcd is and how to talk to it.
#[derive(Debug, Clone, Default)]
pub struct EtcdConfig {
    /// Client URLs (`http://127.0.0.1:2379`, `https://...`).
    pub endpoints: Vec<String>,
    /// CA certificate (PEM) the servers' certificates are checked against.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), with `key_file`, for etcd's client
    /// certificate authentication.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key_file: Option<PathBuf>,
}

impl EtcdConfig {
    /// The endpoints, comma-separated (for messages).
    pub fn describe(&self) -> String {
        self.endpoints.join(",")
    }
}

/// The etcd datastore (see the module documentation).
pub struct EtcdStore {
    runtime: Arc<Runtime>,
    client: Client,
    endpoints: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

fn unavailable(endpoints: &str) -> impl Fn(etcd_client::Error) -> StoreError + '_ {
    move |e| StoreError::Unavailable(format!("etcd at {endpoints}: {e}"))
}

fn read_pem(path: &PathBuf) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|source| StoreError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// A client of an etcd cluster and the runtime it runs on: how every etcd
/// backend of this crate connects (the objects here, IPAM in
/// [`crate::ipam`]).
pub(crate) struct Connection {
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) client: Client,
    /// The endpoints, comma-separated (for messages).
    pub(crate) endpoints: String,
}

impl Connection {
    /// Connects to the cluster (any reachable member will do).
    pub(crate) fn open(config: &EtcdConfig) -> Result<Self, StoreError> {
        let endpoints = config.describe();
        if config.endpoints.is_empty() {
            return Err(StoreError::Unavailable(
                "no etcd endpoints given (--etcd-endpoints)".into(),
            ));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| StoreError::Io {
                path: "tokio runtime".into(),
                source,
            })?;
        // A dead member or a cut connection shows within seconds, not at
        // the kernel's TCP timeout. Pings no more often than etcd's
        // --grpc-keepalive-min-time (5 s by default): more often, etcd
        // answers GOAWAY (too_many_pings) and drops the watch every 8 s.
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(6), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        if config.ca_file.is_some() || config.cert_file.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &config.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read_pem(ca)?));
            }
            match (&config.cert_file, &config.key_file) {
                (Some(cert), Some(key)) => {
                    tls = tls.identity(Identity::from_pem(read_pem(cert)?, read_pem(key)?));
                }
                (None, None) => {}
                _ => {
                    return Err(StoreError::Unavailable(
                        "a client certificate needs both --etcd-cert-file and --etcd-key-file"
                            .into(),
                    ));
                }
            }
            options = options.with_tls(tls);
        }
        let client = runtime
            .block_on(Client::connect(&config.endpoints, Some(options)))
            .map_err(unavailable(&endpoints))?;
        Ok(Connection {
            runtime: Arc::new(runtime),
            client,
            endpoints,
        })
    }
}

/// Runs `op` again while etcd cannot answer (between leaders, a member
/// gone: `is_unavailable` says which errors), for up to
/// [`UNAVAILABLE_FOR`]; other errors return at once.
pub(crate) fn retrying<T, E>(
    is_unavailable: impl Fn(&E) -> bool,
    mut op: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let deadline = std::time::Instant::now() + UNAVAILABLE_FOR;
    let mut wait = Duration::from_millis(50);
    loop {
        match op() {
            Err(e) if is_unavailable(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

impl EtcdStore {
    /// Connects to the cluster (any reachable member will do).
    pub fn connect(config: &EtcdConfig) -> Result<Self, StoreError> {
        let Connection {
            runtime,
            client,
            endpoints,
        } = Connection::open(config)?;
        Ok(EtcdStore {
            runtime,
            client,
            endpoints,
        })
    }

    /// Follows the changes after revision `after`.
    pub fn watch(&self, after: Revision) -> Result<EtcdWatch, StoreError> {
        let mut client = self.client.clone();
        let start = after as i64 + 1;
        let endpoints = self.endpoints.clone();
        // One watch over the key range from the first prefix to the end of
        // the second: one ordered stream of revisions (two watches may lag
        // each other while they catch up, and etcd 3.4 answers a progress
        // request before that catch-up is done). Keys of other things in
        // that range are skipped.
        let end = prefix_end(PREFIXES[1].as_bytes());
        let stream = self.runtime.block_on(
            client.watch(
                PREFIXES[0],
                Some(
                    WatchOptions::new()
                        .with_range(end)
                        .with_start_revision(start)
                        .with_progress_notify(),
                ),
            ),
        );
        Ok(EtcdWatch {
            runtime: self.runtime.clone(),
            stream: stream.map_err(unavailable(&endpoints))?,
            after,
            endpoints,
        })
    }

    /// Runs `op` again while etcd cannot answer, for up to
    /// [`UNAVAILABLE_FOR`]; other errors return at once.
    fn retrying<T>(&self, op: impl FnMut() -> Result<T, StoreError>) -> Result<T, StoreError> {
        retrying(|e| matches!(e, StoreError::Unavailable(_)), op)
    }

    /// Every object at one revision (one attempt).
    fn list(&self) -> Result<Snapshot, StoreError> {
        let mut client = self.client.clone();
        let lists = self.runtime.block_on(async {
            // Pages of LIST_PAGE keys (a large store does not fit one gRPC
            // message), every page at the revision of the first: one
            // consistent view of both prefixes.
            let mut revision = 0i64;
            let mut kvs = Vec::new();
            for prefix in PREFIXES {
                let end = prefix_end(prefix.as_bytes());
                let mut from = prefix.as_bytes().to_vec();
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
            }
            Ok::<_, etcd_client::Error>((revision, kvs))
        });
        let (revision, kvs) = lists.map_err(unavailable(&self.endpoints))?;
        let mut objects: Vec<StoredObject> = kvs.iter().filter_map(stored).collect();
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Snapshot {
            revision: revision as Revision,
            objects,
        })
    }

    /// Writes `changes` if no key they touch changed since `state` was
    /// listed; the revision they took, or `None` when another writer got
    /// there first. etcd takes at most [`TXN_OPS`] operations in one
    /// transaction, so a larger batch is written in several, each comparing
    /// its keys: when one of them loses to another writer, the caller lists
    /// again and writes what is still missing (the earlier ones are then
    /// unchanged).
    fn commit(
        &self,
        state: &Snapshot,
        changes: &[StoreChange],
    ) -> Result<Option<Revision>, StoreError> {
        let held: std::collections::HashMap<&str, Revision> = state
            .objects
            .iter()
            .map(|o| (o.key.as_str(), o.revision))
            .collect();
        let mut revision = None;
        for chunk in changes.chunks(TXN_OPS) {
            let mut compares = Vec::new();
            let mut ops = Vec::new();
            for c in chunk {
                let key = match c {
                    StoreChange::Put(o) => o.key.as_str(),
                    StoreChange::Deleted { key, .. } => key.as_str(),
                };
                compares.push(match held.get(key) {
                    Some(r) => Compare::mod_revision(key, CompareOp::Equal, *r as i64),
                    None => Compare::create_revision(key, CompareOp::Equal, 0),
                });
                ops.push(match c {
                    StoreChange::Put(o) => TxnOp::put(key, o.document.to_string(), None),
                    StoreChange::Deleted { .. } => TxnOp::delete(key, None),
                });
            }
            let mut client = self.client.clone();
            let resp = self
                .runtime
                .block_on(client.txn(Txn::new().when(compares).and_then(ops)))
                .map_err(unavailable(&self.endpoints))?;
            if !resp.succeeded() {
                return Ok(None);
            }
            revision = Some(resp.header().map_or(0, |h| h.revision()) as Revision);
        }
        Ok(revision)
    }
}

/// The end of the key range of everything under `prefix`: the smallest
/// key greater than every key starting with it (`"\0"`, which etcd reads as
/// "to the end of the keyspace", when there is none: an empty prefix or
/// one of `0xff` bytes only).
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A stored key-value as a stored object. A value that is not JSON (written
/// by another tool) is kept as a string, which no kind converts from, so a
/// follower reports it and skips it.
fn stored(kv: &KeyValue) -> Option<StoredObject> {
    let key = String::from_utf8_lossy(kv.key()).into_owned();
    let document = serde_json::from_slice(kv.value())
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(kv.value()).into()));
    let object = document_ref(&document)
        .map(|(_, r)| r)
        .or_else(|| ref_of_key(&key))?;
    Some(StoredObject {
        key,
        object,
        revision: kv.mod_revision() as Revision,
        document,
    })
}

impl Datastore for EtcdStore {
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.retrying(|| self.list())
    }

    fn apply_sources(&self, sources: &[(String, String)]) -> Result<Written, StoreError> {
        let batch = parse_sources(sources)?;
        for _ in 0..WRITE_ATTEMPTS {
            let state = self.snapshot()?;
            let (changes, mut written) = plan_apply(&state, batch.clone(), 0)?;
            if changes.is_empty() {
                return Ok(written);
            }
            if let Some(revision) = self.retrying(|| self.commit(&state, &changes))? {
                written.revision = revision;
                return Ok(written);
            }
        }
        Err(StoreError::Unavailable(format!(
            "etcd at {}: other writers changed the same objects {WRITE_ATTEMPTS} times in a row",
            self.endpoints
        )))
    }

    fn delete(&self, objects: &[ObjectRef]) -> Result<Written, StoreError> {
        for _ in 0..WRITE_ATTEMPTS {
            let state = self.snapshot()?;
            let (changes, mut written) = plan_delete(&state, objects, 0)?;
            if let Some(revision) = self.retrying(|| self.commit(&state, &changes))? {
                written.revision = revision;
                return Ok(written);
            }
        }
        Err(StoreError::Unavailable(format!(
            "etcd at {}: other writers changed the same objects {WRITE_ATTEMPTS} times in a row",
            self.endpoints
        )))
    }
}

/// The changes of an [`EtcdStore`] after a revision, as etcd delivers them.
pub struct EtcdWatch {
    runtime: Arc<Runtime>,
    stream: WatchStream,
    after: Revision,
    endpoints: String,
}

impl std::fmt::Debug for EtcdWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdWatch")
            .field("after", &self.after)
            .finish_non_exhaustive()
    }
}

impl Follower for EtcdWatch {
    fn revision(&self) -> Revision {
        self.after
    }

    /// One etcd response's changes (one revision or more); empty when the
    /// time ran out or etcd only said how far it is.
    fn next(&mut self, timeout: Option<Duration>) -> Result<Vec<StoreChange>, StoreError> {
        let endpoints = self.endpoints.clone();
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let resp = loop {
            let message = self.runtime.block_on(async {
                match deadline {
                    Some(d) => tokio::time::timeout_at(d, self.stream.message()).await.ok(),
                    None => Some(self.stream.message().await),
                }
            });
            let Some(message) = message else {
                return Ok(Vec::new());
            };
            let Some(resp) = message.map_err(unavailable(&endpoints))? else {
                return Err(StoreError::Unavailable(format!(
                    "etcd at {endpoints} closed the watch"
                )));
            };
            // The confirmation of a new watch carries nothing to hand out.
            if resp.created() && resp.events().is_empty() && resp.compact_revision() == 0 {
                continue;
            }
            break resp;
        };
        if resp.compact_revision() > 0 {
            return Err(StoreError::Compacted {
                after: self.after,
                compacted: resp.compact_revision() as Revision,
            });
        }
        if resp.canceled() {
            return Err(StoreError::Unavailable(format!(
                "etcd at {endpoints} cancelled the watch: {}",
                resp.cancel_reason()
            )));
        }
        let mut changes = Vec::new();
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            if !PREFIXES.iter().any(|p| kv.key().starts_with(p.as_bytes())) {
                continue;
            }
            match event.event_type() {
                EventType::Put => changes.extend(stored(kv).map(StoreChange::Put)),
                EventType::Delete => {
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    if let Some(object) = ref_of_key(&key) {
                        changes.push(StoreChange::Deleted {
                            key,
                            object,
                            revision: kv.mod_revision() as Revision,
                        });
                    }
                }
            }
        }
        // Events come in revision order; a progress report (sent only to a
        // watch that is caught up) says it is at the header's revision.
        let reached = match changes.last() {
            Some(c) => c.revision(),
            None if resp.watch_id() >= 0 && resp.events().is_empty() => {
                resp.header().map_or(0, |h| h.revision()) as Revision
            }
            None => self.after,
        };
        self.after = self.after.max(reached);
        Ok(changes)
    }
}
