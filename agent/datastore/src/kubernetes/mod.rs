//! The Kubernetes datastore, as Calico's: pods, namespaces, service
//! accounts, nodes, NetworkPolicies, Services and EndpointSlices from the
//! API, Calico's own kinds from its `crd.projectcalico.org/v1` custom
//! resources, converted as Calico converts them ([`convert`]).
//!
//! ```text
//!  API server ──list+watch per kind──▶ follow.rs (one task each, own runtime)
//!                                         │ converted batches
//!                                         ▼
//!                 Shared: objects by key, change log, sync state per kind
//!                   │ snapshot()                 │ watch(after)
//!                   ▼                            ▼
//!             the agent's listing          KubeWatch (Follower)
//! ```
//!
//! - Each kind is listed (in pages), then watched from the listing's
//!   resourceVersion with bookmarks; a watch that ends or breaks resumes
//!   from the last version seen; `410 Gone` lists again, and the listing
//!   replaces that kind's objects whole (one batch: puts and deletes).
//! - Revisions are this store's own counter (one per batch): the API's
//!   resourceVersions are per kind and opaque.
//! - A kind out of sync (a broken watch, 403, throttling, the API away)
//!   makes every follower fail once, and no follower starts until every
//!   kind is in sync again: the agent is ready only while all are.
//! - Objects are written through the API server (`kubectl apply`); the
//!   store writes only what an agent records, as Calico does ([`write`]):
//!   a pod's addresses and its own Node's tunnel, as annotations.

pub mod convert;
mod follow;
pub mod write;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use policy_core::ObjectRef;
use serde_json::Value;

use crate::kinds::{KindInfo, document_ref, kind_named};
use crate::{
    Datastore, Follower, Revision, Snapshot, StoreChange, StoreError, StoredObject, Written,
};
pub use convert::{Conversion, Stored, pod_interface, workload_endpoint_name};

/// One kind read from the API.
#[derive(Debug, Clone, Copy)]
pub struct ApiKind {
    /// API group (empty for the core group).
    pub group: &'static str,
    /// API version.
    pub version: &'static str,
    /// The resource's plural name in the API.
    pub plural: &'static str,
    /// `plural[.group]`: how RBAC and messages name it.
    pub resource: &'static str,
    /// Its kind.
    pub kind: &'static str,
    /// How its objects are stored.
    pub conversion: Conversion,
    /// The datastore kind (plural) whose keys its objects take.
    pub stored_as: &'static str,
}

impl ApiKind {
    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub(crate) fn info(&self) -> &'static KindInfo {
        kind_named(self.stored_as).expect("every API kind is stored as a datastore kind")
    }
}

/// A core-group kind.
macro_rules! core {
    ($plural:literal, $kind:literal, $conversion:expr) => {
        ApiKind {
            group: "",
            version: "v1",
            plural: $plural,
            resource: $plural,
            kind: $kind,
            conversion: $conversion,
            stored_as: $plural,
        }
    };
}

/// One of Calico's custom resources.
macro_rules! calico {
    ($plural:literal, $kind:literal) => {
        ApiKind {
            group: "crd.projectcalico.org",
            version: "v1",
            plural: $plural,
            resource: concat!($plural, ".crd.projectcalico.org"),
            kind: $kind,
            conversion: Conversion::Calico,
            stored_as: $plural,
        }
    };
}

/// Every kind the store lists and watches.
pub const API_KINDS: &[ApiKind] = &[
    core!("namespaces", "Namespace", Conversion::Same),
    core!("serviceaccounts", "ServiceAccount", Conversion::Same),
    core!("pods", "Pod", Conversion::Pod),
    core!("nodes", "Node", Conversion::Node),
    core!("services", "Service", Conversion::Same),
    ApiKind {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        resource: "endpointslices.discovery.k8s.io",
        kind: "EndpointSlice",
        conversion: Conversion::Same,
        stored_as: "endpointslices",
    },
    ApiKind {
        group: "networking.k8s.io",
        version: "v1",
        plural: "networkpolicies",
        resource: "networkpolicies.networking.k8s.io",
        kind: "NetworkPolicy",
        conversion: Conversion::Same,
        stored_as: "networkpolicies.networking.k8s.io",
    },
    // The network-policy-api's cluster-admin kinds (a cluster without
    // their CRDs answers 404: not served, nothing to follow).
    ApiKind {
        group: "policy.networking.k8s.io",
        version: "v1alpha1",
        plural: "adminnetworkpolicies",
        resource: "adminnetworkpolicies.policy.networking.k8s.io",
        kind: "AdminNetworkPolicy",
        conversion: Conversion::Same,
        stored_as: "adminnetworkpolicies",
    },
    ApiKind {
        group: "policy.networking.k8s.io",
        version: "v1alpha1",
        plural: "baselineadminnetworkpolicies",
        resource: "baselineadminnetworkpolicies.policy.networking.k8s.io",
        kind: "BaselineAdminNetworkPolicy",
        conversion: Conversion::Same,
        stored_as: "baselineadminnetworkpolicies",
    },
    ApiKind {
        group: "policy.networking.k8s.io",
        version: "v1alpha2",
        plural: "clusternetworkpolicies",
        resource: "clusternetworkpolicies.policy.networking.k8s.io",
        kind: "ClusterNetworkPolicy",
        conversion: Conversion::Same,
        stored_as: "clusternetworkpolicies",
    },
    calico!("tiers", "Tier"),
    calico!("globalnetworkpolicies", "GlobalNetworkPolicy"),
    calico!("networkpolicies", "NetworkPolicy"),
    calico!("stagedglobalnetworkpolicies", "StagedGlobalNetworkPolicy"),
    calico!("stagednetworkpolicies", "StagedNetworkPolicy"),
    calico!(
        "stagedkubernetesnetworkpolicies",
        "StagedKubernetesNetworkPolicy"
    ),
    calico!("globalnetworksets", "GlobalNetworkSet"),
    calico!("networksets", "NetworkSet"),
    calico!("ippools", "IPPool"),
    calico!("ipreservations", "IPReservation"),
    calico!("felixconfigurations", "FelixConfiguration"),
];

/// How the store reaches the API server.
#[derive(Clone)]
pub enum KubeClient {
    /// The in-cluster configuration, else `$KUBECONFIG` or `~/.kube/config`.
    Infer,
    /// This kubeconfig file.
    Kubeconfig(PathBuf),
    /// Clients built by the caller, on the store's runtimes (tests: a
    /// service replaying recorded responses).
    Custom(Arc<dyn Fn() -> kube::Client + Send + Sync>),
}

impl std::fmt::Debug for KubeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KubeClient::Infer => f.write_str("Infer"),
            KubeClient::Kubeconfig(p) => f.debug_tuple("Kubeconfig").field(p).finish(),
            KubeClient::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// Timings of the store (shorter in tests).
#[derive(Debug, Clone, Copy)]
pub struct KubeOptions {
    /// First wait after a failure; doubled per failure in a row.
    pub backoff: Duration,
    /// The longest wait after a failure.
    pub max_backoff: Duration,
    /// How long [`Datastore::snapshot`] waits for every kind to sync.
    pub sync_timeout: Duration,
    /// How long the server keeps a watch open before it ends it (seconds).
    pub watch_timeout: u32,
    /// Objects per page of a listing.
    pub page: u32,
    /// Changes the log keeps for followers that fall behind.
    pub log_limit: usize,
}

impl Default for KubeOptions {
    fn default() -> Self {
        Self {
            backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            sync_timeout: Duration::from_secs(30),
            watch_timeout: 290,
            page: 500,
            log_limit: 100_000,
        }
    }
}

/// Where one kind is.
#[derive(Debug, Clone, PartialEq)]
pub enum KindSync {
    /// Not listed yet.
    Listing,
    /// Listed and watched: every change reaches the store.
    InSync,
    /// Out of sync: why (retrying).
    Failed(String),
}

#[derive(Debug, Default)]
struct State {
    revision: Revision,
    objects: BTreeMap<String, StoredObject>,
    log: VecDeque<StoreChange>,
    /// The newest revision dropped from the log.
    compacted: Revision,
    sync: BTreeMap<&'static str, KindSync>,
    /// Bumped each time a kind falls out of sync.
    losses: u64,
    stopped: bool,
}

impl State {
    fn unsynced(&self) -> Vec<String> {
        self.sync
            .iter()
            .filter(|(_, s)| **s != KindSync::InSync)
            .map(|(k, s)| match s {
                KindSync::Failed(why) => format!("{k}: {why}"),
                _ => format!("{k}: not listed yet"),
            })
            .collect()
    }
}

/// The state the watch tasks write and readers read.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    log_limit: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicked writer leaves whole batches behind: the state is usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One batch: `(key, document or None for absent)`; unchanged
    /// documents are left out; one revision for the rest.
    pub(crate) fn write(&self, batch: Vec<(String, Option<Value>)>) {
        let mut s = self.lock();
        let revision = s.revision + 1;
        let mut changes = Vec::new();
        for (key, document) in batch {
            match document {
                Some(document) => {
                    if s.objects.get(&key).is_some_and(|o| o.document == document) {
                        continue;
                    }
                    let object = document_ref(&document)
                        .map(|(_, r)| r)
                        .or_else(|| crate::kinds::ref_of_key(&key))
                        .unwrap_or_else(|| ObjectRef::new("unknown", None, key.as_str()));
                    let stored = StoredObject {
                        key: key.clone(),
                        object,
                        revision,
                        document,
                    };
                    s.objects.insert(key, stored.clone());
                    changes.push(StoreChange::Put(stored));
                }
                None => {
                    if let Some(old) = s.objects.remove(&key) {
                        changes.push(StoreChange::Deleted {
                            key,
                            object: old.object,
                            revision,
                        });
                    }
                }
            }
        }
        if changes.is_empty() {
            return;
        }
        s.revision = revision;
        s.log.extend(changes);
        while s.log.len() > self.log_limit.max(1) {
            if let Some(dropped) = s.log.pop_front() {
                s.compacted = dropped.revision();
            }
        }
        self.changed.notify_all();
    }

    /// A whole listing of one kind: every key under `prefix` not listed
    /// goes, the listed ones are put (one batch).
    pub(crate) fn relisted(&self, prefix: &str, listed: BTreeMap<String, Value>) {
        let gone: Vec<(String, Option<Value>)> = {
            let s = self.lock();
            s.objects
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .filter(|(k, _)| !listed.contains_key(*k))
                .map(|(k, _)| (k.clone(), None))
                .collect()
        };
        let mut batch = gone;
        batch.extend(listed.into_iter().map(|(k, v)| (k, Some(v))));
        self.write(batch);
    }

    pub(crate) fn set_sync(&self, kind: &'static str, sync: KindSync) {
        let mut s = self.lock();
        let was_in_sync = s.sync.get(kind) == Some(&KindSync::InSync);
        if sync != KindSync::InSync && was_in_sync {
            s.losses += 1;
        }
        if let KindSync::Failed(why) = &sync
            && s.sync.get(kind) != Some(&sync)
        {
            tracing::warn!(kind, error = %why, "Kubernetes API: out of sync");
        }
        s.sync.insert(kind, sync);
        self.changed.notify_all();
    }

    fn stop(&self) {
        self.lock().stopped = true;
        self.changed.notify_all();
    }
}

/// Stops the watch tasks when the last handle of a store goes.
#[derive(Debug)]
struct StopOnDrop {
    shared: Arc<Shared>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.shared.stop();
        let _ = self.stop.send(true);
    }
}

/// The Kubernetes datastore (see the module documentation). Clones share
/// one set of watches.
#[derive(Debug, Clone)]
pub struct KubeStore {
    shared: Arc<Shared>,
    options: KubeOptions,
    writer: Arc<Writer>,
    /// What the watch thread needs, until it is started.
    watches: Arc<Mutex<Option<WatchStart>>>,
    _stop: Arc<StopOnDrop>,
}

type WatchStart = (KubeClient, tokio::sync::watch::Receiver<bool>);

/// The client writes go through, made on first use on a runtime of its own.
struct Writer {
    source: KubeClient,
    connection: Mutex<Option<(tokio::runtime::Runtime, kube::Client)>>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

impl Writer {
    fn make(&self, writes: &[write::ApiWrite]) -> Result<(), StoreError> {
        let mut connection = self.connection.lock().unwrap_or_else(|p| p.into_inner());
        if connection.is_none() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| StoreError::Unavailable(format!("starting a runtime: {e}")))?;
            let client = runtime.block_on(async {
                match &self.source {
                    KubeClient::Custom(make) => Ok(make()),
                    KubeClient::Infer => kube::Client::try_default()
                        .await
                        .map_err(|e| StoreError::Unavailable(format!("Kubernetes API: {e}"))),
                    KubeClient::Kubeconfig(path) => {
                        client_from(path).await.map_err(StoreError::Unavailable)
                    }
                }
            })?;
            *connection = Some((runtime, client));
        }
        let Some((runtime, client)) = connection.as_ref() else {
            return Err(StoreError::Unavailable("no Kubernetes client".into()));
        };
        for w in writes {
            runtime.block_on(write::make(client, w))?;
        }
        Ok(())
    }
}

impl KubeStore {
    /// Starts listing and watching every kind of [`API_KINDS`] on a thread
    /// of its own; returns at once (see [`KubeStore::sync`]).
    pub fn start(client: KubeClient, options: KubeOptions) -> Result<Self, StoreError> {
        let store = Self::new(client, options);
        store.ensure_watching()?;
        Ok(store)
    }

    /// A store whose watches start on the first read ([`Datastore::snapshot`],
    /// [`KubeStore::watch`]): a writer (the CNI plugin's ADD) makes its two
    /// kinds of write without listing the cluster.
    pub fn new(client: KubeClient, options: KubeOptions) -> Self {
        let shared = Arc::new(Shared {
            log_limit: options.log_limit,
            ..Shared::default()
        });
        {
            let mut s = shared.lock();
            for k in API_KINDS {
                s.sync.insert(k.resource, KindSync::Listing);
            }
        }
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let writer = Arc::new(Writer {
            source: client.clone(),
            connection: Mutex::new(None),
        });
        Self {
            shared: Arc::clone(&shared),
            options,
            writer,
            watches: Arc::new(Mutex::new(Some((client, stopped)))),
            _stop: Arc::new(StopOnDrop { shared, stop }),
        }
    }

    /// Starts the watch thread unless it runs.
    fn ensure_watching(&self) -> Result<(), StoreError> {
        let mut pending = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let Some((client, stopped)) = pending.take() else {
            return Ok(());
        };
        let tasks = Arc::clone(&self.shared);
        let options = self.options;
        std::thread::Builder::new()
            .name("kube-watch".into())
            .spawn(move || follow::run(client, tasks, options, stopped))
            .map_err(|source| StoreError::Io {
                path: "kube-watch thread".into(),
                source,
            })?;
        Ok(())
    }

    /// Where every kind is, by API resource.
    pub fn sync(&self) -> BTreeMap<&'static str, KindSync> {
        self.shared.lock().sync.clone()
    }

    /// Follows the store's changes after `after` (see [`KubeWatch`]): fails
    /// while a kind is out of sync, and with [`StoreError::Compacted`] when
    /// the log no longer holds them.
    pub fn watch(&self, after: Revision) -> Result<KubeWatch, StoreError> {
        self.ensure_watching()?;
        let s = self.shared.lock();
        let unsynced = s.unsynced();
        if !unsynced.is_empty() {
            return Err(out_of_sync(&unsynced));
        }
        if after < s.compacted {
            return Err(StoreError::Compacted {
                after,
                compacted: s.compacted,
            });
        }
        Ok(KubeWatch {
            shared: Arc::clone(&self.shared),
            after,
            losses: s.losses,
        })
    }
}

/// A client from a kubeconfig file.
pub(crate) async fn client_from(path: &std::path::Path) -> Result<kube::Client, String> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .map_err(|e| format!("{}: {e}", path.display()))?;
    kube::Client::try_from(config).map_err(|e| format!("{}: {e}", path.display()))
}

fn out_of_sync(unsynced: &[String]) -> StoreError {
    StoreError::Unavailable(format!(
        "Kubernetes API: not in sync: {}",
        unsynced.join("; ")
    ))
}

impl Datastore for KubeStore {
    /// Every object once every kind is in sync (waits up to the options'
    /// `sync_timeout`).
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.ensure_watching()?;
        let deadline = Instant::now() + self.options.sync_timeout;
        let mut s = self.shared.lock();
        loop {
            let unsynced = s.unsynced();
            if unsynced.is_empty() {
                return Ok(Snapshot {
                    revision: s.revision,
                    objects: s.objects.values().cloned().collect(),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || s.stopped {
                return Err(out_of_sync(&unsynced));
            }
            s = self
                .shared
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Workload endpoints (their pods' addresses) and Nodes (their
    /// annotations) only; any other kind refuses the batch before anything
    /// is written.
    fn apply_sources(&self, sources: &[(String, String)]) -> Result<Written, StoreError> {
        let batch = crate::sources::parse_sources(sources)?;
        let documents = batch
            .loaded
            .iter()
            .filter_map(|l| l.document.as_ref())
            .chain(batch.resources.iter().map(|r| &r.document));
        let mut writes = Vec::new();
        let mut replaced = Vec::new();
        for document in documents {
            writes.push(write::write_for(document)?);
            if let Some((_, r)) = document_ref(document) {
                replaced.push(r);
            }
        }
        self.writer.make(&writes)?;
        Ok(self.written(replaced, Vec::new()))
    }

    /// The addresses of workload endpoints' pods; nothing else.
    fn delete(&self, objects: &[ObjectRef]) -> Result<Written, StoreError> {
        let writes = objects
            .iter()
            .map(write::delete_for)
            .collect::<Result<Vec<_>, _>>()?;
        self.writer.make(&writes)?;
        Ok(self.written(Vec::new(), objects.to_vec()))
    }
}

impl KubeStore {
    fn written(&self, replaced: Vec<ObjectRef>, deleted: Vec<ObjectRef>) -> Written {
        Written {
            // The store's revision moves when the watch brings the change.
            revision: self.shared.lock().revision,
            created: Vec::new(),
            replaced,
            unchanged: Vec::new(),
            deleted,
        }
    }
}

/// Follows a [`KubeStore`]: the batches after a revision, in order; fails
/// once when a kind falls out of sync after it started.
#[derive(Debug)]
pub struct KubeWatch {
    shared: Arc<Shared>,
    after: Revision,
    losses: u64,
}

impl Follower for KubeWatch {
    fn revision(&self) -> Revision {
        self.after
    }

    fn next(&mut self, timeout: Option<Duration>) -> Result<Vec<StoreChange>, StoreError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut s = self.shared.lock();
        loop {
            if self.after < s.compacted {
                return Err(StoreError::Compacted {
                    after: self.after,
                    compacted: s.compacted,
                });
            }
            if s.revision > self.after {
                // The log is in revision order: start where ours end.
                let from = s.log.partition_point(|c| c.revision() <= self.after);
                let changes: Vec<StoreChange> = s.log.range(from..).cloned().collect();
                self.after = s.revision;
                return Ok(changes);
            }
            if s.losses != self.losses || s.stopped {
                let unsynced = s.unsynced();
                self.losses = s.losses;
                return Err(if unsynced.is_empty() {
                    StoreError::Unavailable("Kubernetes API: a watch was lost".into())
                } else {
                    out_of_sync(&unsynced)
                });
            }
            s = match deadline {
                None => self
                    .shared
                    .changed
                    .wait(s)
                    .unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(Vec::new());
                    }
                    self.shared
                        .changed
                        .wait_timeout(s, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }
}
