//! IPAM in the agent. Pool headroom for Prometheus, because when a pool
//! runs out every new pod fails: per pool its size, addresses in use and
//! free, and its blocks; per node its blocks. And, where enabled (one node
//! is enough; several are safe), garbage collection as Calico's
//! kube-controllers run it: addresses of pods that are gone, once older
//! than the grace period; blocks of deleted nodes once empty.
//!
//! The writer keeps what IPAM reads of the datastore (pools, reservations,
//! nodes, and which pods exist) in [`IpamView`]; a thread reads the IPAM
//! records every `--ipam-metrics-seconds`, sets the gauges, and collects
//! every `--ipam-gc-seconds`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_datastore::{Snapshot, StoreChange, StoredObject, SystemEnv, kinds, resources};
use palisade_ipam::gc::Live;
use palisade_ipam::{Cluster, Ipam};

use super::Shared;
use super::metrics::{NodeLabel, PoolLabel, PoolStateLabel};
use crate::store_cmd::StoreArgs;

/// What IPAM reads of the datastore, as the writer last saw it.
#[derive(Debug, Default)]
pub struct IpamView {
    inner: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    /// Pools, reservations, nodes and namespaces, by key.
    objects: BTreeMap<String, StoredObject>,
    /// Pods (and workload endpoints, by their pod), by key.
    pods: BTreeMap<String, (String, String)>,
    /// Stored Pods' annotations (IPAM's pool and address requests), by
    /// namespace and name.
    pod_annotations: BTreeMap<(String, String), palisade_ipam::cluster::Labels>,
    /// Whether a complete listing was seen (before it, nothing is known to
    /// be gone).
    listed: bool,
}

/// What an object is to IPAM: cluster input, a pod, or nothing.
fn classify(o: &StoredObject) -> (bool, Option<(String, String)>) {
    let Some((info, r)) = kinds::document_ref(&o.document) else {
        return (false, None);
    };
    let namespace = r.namespace.clone().unwrap_or_default();
    match info.kind {
        "Pod" => (false, Some((namespace, r.name))),
        // A workload endpoint stands for the pod it names.
        "WorkloadEndpoint" => {
            let pod = o.document["spec"]["pod"]
                .as_str()
                .unwrap_or(&r.name)
                .to_string();
            (false, Some((namespace, pod)))
        }
        "Namespace" => (true, None),
        // The service dataplane's, not IPAM's.
        "Service" => (false, None),
        _ => (!info.policy, None),
    }
}

impl Seen {
    fn put(&mut self, o: &StoredObject) {
        let (input, pod) = classify(o);
        if input {
            self.objects.insert(o.key.clone(), o.clone());
        }
        if let Some(p) = pod {
            if o.document["kind"] == "Pod" {
                let annotations = o.document["metadata"]["annotations"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect();
                self.pod_annotations.insert(p.clone(), annotations);
            }
            self.pods.insert(o.key.clone(), p);
        }
    }

    fn remove(&mut self, key: &str) {
        self.objects.remove(key);
        if let Some(p) = self.pods.remove(key)
            && !self.pods.values().any(|other| *other == p)
        {
            self.pod_annotations.remove(&p);
        }
    }
}

impl IpamView {
    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        // Maps of documents are whole whatever a panicking holder did.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A complete listing replaces what was seen.
    pub fn listing(&self, snapshot: &Snapshot) {
        let mut seen = Seen {
            listed: true,
            ..Seen::default()
        };
        for o in &snapshot.objects {
            seen.put(o);
        }
        *self.lock() = seen;
    }

    /// Changes after it.
    pub fn changes(&self, changes: &[StoreChange]) {
        let mut g = self.lock();
        for c in changes {
            match c {
                StoreChange::Put(o) => g.put(o),
                StoreChange::Deleted { key, .. } => g.remove(key),
            }
        }
    }

    /// A stored Pod's annotations (empty when no Pod is stored): its
    /// `cni.projectcalico.org/ipv4pools` and the like choose its addresses.
    pub fn pod_annotations(&self, namespace: &str, name: &str) -> palisade_ipam::cluster::Labels {
        self.lock()
            .pod_annotations
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    /// The cluster IPAM reads.
    pub fn cluster(&self) -> Cluster {
        resources::cluster(self.lock().objects.values())
    }

    /// The cluster, once a complete listing was seen.
    pub fn listed_cluster(&self) -> Option<Cluster> {
        let g = self.lock();
        g.listed.then(|| resources::cluster(g.objects.values()))
    }

    /// Whether load balancers should still use node `name`, as kube-proxy
    /// judges it (see [`palisade_services::health::node_eligible`]); true
    /// while its Node is not stored.
    pub fn node_eligible(&self, name: &str) -> bool {
        self.lock()
            .objects
            .values()
            .find(|o| {
                kinds::document_ref(&o.document)
                    .is_some_and(|(info, r)| info.kind == "Node" && r.name == name)
            })
            .is_none_or(|o| palisade_services::health::node_eligible(&o.document))
    }

    /// The stored documents of one IPAM kind (`Node`, `IPPool`, ...), by name.
    pub fn documents(&self, kind: &str) -> Vec<(String, serde_json::Value)> {
        self.lock()
            .objects
            .values()
            .filter_map(|o| {
                let (info, r) = kinds::document_ref(&o.document)?;
                (info.kind == kind).then(|| (r.name, o.document.clone()))
            })
            .collect()
    }

    /// What exists, once a complete listing was seen.
    pub fn live(&self, cluster: &Cluster) -> Option<Live> {
        let g = self.lock();
        g.listed.then(|| Live {
            pods: g.pods.values().cloned().collect(),
            nodes: cluster.nodes.keys().cloned().collect(),
        })
    }
}

/// Sets the gauges from one read of the IPAM records.
fn refresh(ipam: &Ipam<'_>, shared: &Shared) -> Result<(), palisade_ipam::IpamError> {
    let pools = ipam.utilization(&[])?;
    let m = &shared.metrics;
    m.ipam_pool_addresses.clear();
    m.ipam_pool_blocks.clear();
    m.ipam_node_blocks.clear();
    let mut per_node: BTreeMap<String, i64> = BTreeMap::new();
    for p in &pools {
        for b in &p.blocks {
            if let Some(h) = &b.host {
                *per_node.entry(h.clone()).or_insert(0) += 1;
            }
        }
        if p.name == "orphaned allocation blocks" {
            continue;
        }
        let clamp = |v: u128| i64::try_from(v).unwrap_or(i64::MAX);
        for (state, v) in [
            ("size", p.capacity),
            ("in_use", p.in_use),
            ("free", p.available),
        ] {
            m.ipam_pool_addresses
                .get_or_create(&PoolStateLabel {
                    pool: p.name.clone(),
                    state: state.into(),
                })
                .set(clamp(v));
        }
        m.ipam_pool_blocks
            .get_or_create(&PoolLabel {
                pool: p.name.clone(),
            })
            .set(p.blocks.len() as i64);
    }
    for (node, n) in per_node {
        m.ipam_node_blocks.get_or_create(&NodeLabel { node }).set(n);
    }
    Ok(())
}

/// How often the IPAM thread reads, and whether it collects.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Between refreshes of the gauges.
    pub metrics: Duration,
    /// Between collections (None: this agent does not collect).
    pub gc: Option<Duration>,
    /// Addresses younger than this are not collected.
    pub grace: Duration,
}

/// One collection, logged and counted.
fn collect(ipam: &Ipam<'_>, live: &Live, grace: Duration, shared: &Shared) {
    match ipam.collect(live, grace) {
        Ok((done, _)) => {
            let m = &shared.metrics;
            m.ipam_gc_released.inc_by(done.released as u64);
            m.ipam_gc_blocks_released
                .inc_by(done.blocks_released as u64);
            if done != Default::default() {
                tracing::info!(
                    released = done.released,
                    waiting = done.waiting,
                    blocks_released = done.blocks_released,
                    handles_mended = done.handles_mended,
                    affinities_mended = done.affinities_mended,
                    "IPAM garbage collected"
                );
            }
        }
        Err(e) => {
            shared.metrics.ipam_errors.inc();
            tracing::warn!(error = %e, "IPAM garbage collection");
        }
    }
}

/// Starts the thread that refreshes the IPAM gauges (and collects, if
/// scheduled); a store that cannot be opened or read is retried next time
/// (and counted).
pub fn spawn(store: StoreArgs, schedule: Schedule, shared: Arc<Shared>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("ipam-metrics".into())
        .spawn(move || {
            let mut records = None;
            let mut last_gc = std::time::Instant::now();
            loop {
                if records.is_none() {
                    match crate::ipam_cmd::open_ipam_store(&store) {
                        Ok(r) => records = Some(r),
                        Err(e) => {
                            shared.metrics.ipam_errors.inc();
                            tracing::warn!(error = %format!("{e:#}"), "IPAM records");
                        }
                    }
                }
                if let Some(r) = &records {
                    let cluster = shared.ipam.cluster();
                    let env = SystemEnv;
                    let ipam = Ipam::new(r.as_ref(), &cluster, &env);
                    if let Some(every) = schedule.gc
                        && last_gc.elapsed() >= every
                        && let Some(live) = shared.ipam.live(&cluster)
                    {
                        last_gc = std::time::Instant::now();
                        collect(&ipam, &live, schedule.grace, &shared);
                    }
                    if let Err(e) = refresh(&ipam, &shared) {
                        shared.metrics.ipam_errors.inc();
                        tracing::warn!(error = %e, "IPAM metrics");
                    }
                }
                std::thread::sleep(schedule.metrics);
            }
        })
        .map(|_| ())
}
