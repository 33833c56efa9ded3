//! `palisade verify` for the Calico IPAM corpus: each scenario starts from
//! an empty store, loads its cluster objects and runs its steps through
//! palisade-ipam, comparing every outcome with upstream's expectation.
//! A step whose expectation holds a key this runner does not know fails:
//! an unread expectation must never pass silently.

mod expect;
mod ops;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use palisade_ipam::cluster::Labels;
use palisade_ipam::{Cluster, IpamError, IpamStore, Pool};
use serde_json::Value;

use crate::Tally;

/// Where scenarios keep IPAM state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// In memory (the reference for the others).
    Memory,
    /// The embedded store: a redb file in a scratch directory.
    Embedded,
    /// etcd at --etcd-endpoints.
    Etcd,
}

/// Whether a JSON document is an IPAM scenario.
pub fn is_scenario(doc: &Value) -> bool {
    doc.get("steps").is_some_and(Value::is_array) && doc.get("source").is_some()
}

/// The cluster objects of a scenario, kept as documents so `applyObject`
/// and `deleteObject` can change them.
#[derive(Default)]
struct Objects {
    pools: BTreeMap<String, Value>,
    namespaces: BTreeMap<String, Value>,
    pods: BTreeMap<(String, String), Value>,
    reservations: BTreeMap<String, Value>,
    nodes: BTreeMap<String, Labels>,
}

fn labels_of(v: &Value) -> Labels {
    v.as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

impl Objects {
    fn apply(&mut self, doc: &Value) -> Result<()> {
        let kind = doc["kind"].as_str().unwrap_or("");
        let name = doc["metadata"]["name"].as_str().unwrap_or("").to_string();
        match kind {
            "IPPool" => {
                self.pools.insert(name, doc.clone());
            }
            "Namespace" => {
                self.namespaces.insert(name, doc.clone());
            }
            "Pod" => {
                let ns = doc["metadata"]["namespace"].as_str().unwrap_or("default");
                self.pods.insert((ns.to_string(), name), doc.clone());
            }
            "IPReservation" => {
                self.reservations.insert(name, doc.clone());
            }
            "Node" => {
                self.nodes
                    .insert(name, labels_of(&doc["metadata"]["labels"]));
            }
            other => bail!("object kind {other:?} is not one IPAM reads"),
        }
        Ok(())
    }

    fn delete(&mut self, kind: &str, name: &str) {
        match kind {
            "IPPool" => {
                self.pools.remove(name);
            }
            "Namespace" => {
                self.namespaces.remove(name);
            }
            "IPReservation" => {
                self.reservations.remove(name);
            }
            "Node" => {
                self.nodes.remove(name);
            }
            _ => {
                self.pods.retain(|(_, n), _| n != name);
            }
        }
    }

    /// The cluster view, and the pools admission refused (name → error).
    fn cluster(&self) -> (Cluster, BTreeMap<String, IpamError>) {
        let mut refused = BTreeMap::new();
        let mut pools = Vec::new();
        for (name, doc) in &self.pools {
            match Pool::from_document(doc) {
                Ok(p) => pools.push(p),
                Err(e) => {
                    refused.insert(name.clone(), IpamError::InvalidPool(e));
                }
            }
        }
        let mut cluster = Cluster::new();
        if let Err(e) = cluster.set_pools(pools) {
            refused.insert("(overlap)".into(), e);
        }
        cluster.nodes = self.nodes.clone();
        cluster.namespaces = self
            .namespaces
            .iter()
            .map(|(n, d)| (n.clone(), labels_of(&d["metadata"]["labels"])))
            .collect();
        for doc in self.reservations.values() {
            for c in doc["spec"]["reservedCIDRs"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let text = c.as_str().unwrap_or("").trim();
                let net = text
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
                if let Ok(n) = net {
                    cluster.reservations.push(n.trunc());
                }
            }
        }
        (cluster, refused)
    }
}

/// Opens an empty store of the kind asked for, for one scenario.
pub struct StoreFactory {
    pub kind: StoreKind,
    pub etcd: Option<palisade_datastore::EtcdConfig>,
    scratch: tempfile::TempDir,
    count: usize,
}

impl StoreFactory {
    pub fn new(kind: StoreKind, etcd: Option<palisade_datastore::EtcdConfig>) -> Result<Self> {
        if kind == StoreKind::Etcd && etcd.is_none() {
            bail!("--store etcd needs --etcd-endpoints");
        }
        Ok(StoreFactory {
            kind,
            etcd,
            scratch: tempfile::tempdir().context("making a scratch directory")?,
            count: 0,
        })
    }

    fn open(&mut self) -> Result<Box<dyn IpamStore>> {
        self.count += 1;
        let store: Box<dyn IpamStore> = match self.kind {
            StoreKind::Memory => Box::new(palisade_ipam::MemoryStore::new()),
            StoreKind::Embedded => Box::new(
                palisade_datastore::EmbeddedIpamStore::open(
                    self.scratch
                        .path()
                        .join(format!("ipam-{}.redb", self.count)),
                )
                .context("opening the embedded IPAM store")?,
            ),
            StoreKind::Etcd => {
                let config = self.etcd.as_ref().context("no etcd endpoints")?;
                let store = palisade_datastore::EtcdIpamStore::connect(config)
                    .context("connecting to etcd")?;
                wipe(&store)?;
                Box::new(store)
            }
        };
        Ok(store)
    }
}

/// Deletes every IPAM record (each scenario starts from nothing).
fn wipe(store: &dyn IpamStore) -> Result<()> {
    let all = store.list(palisade_ipam::store::PREFIX)?;
    for chunk in all.chunks(64) {
        let writes: Vec<_> = chunk
            .iter()
            .map(|e| palisade_ipam::store::Write::Delete {
                key: e.key.clone(),
                revision: e.revision,
            })
            .collect();
        store.commit(&writes)?;
    }
    Ok(())
}

/// Runs one scenario file; every step is one check.
pub fn run_file(
    path: &Path,
    doc: &Value,
    stores: &mut StoreFactory,
    verbose: bool,
) -> Result<Tally> {
    let name = path.display().to_string();
    let store = stores.open()?;
    let mut run = ops::Run::new(doc, store.as_ref())?;
    let mut tally = Tally::default();
    for (i, step) in doc["steps"].as_array().into_iter().flatten().enumerate() {
        let op = step["op"].as_str().unwrap_or("?");
        match run.step(step) {
            Ok(()) => {
                tally.passed += 1;
                if verbose {
                    outln!("ok   {name} step {i} {op}")?;
                }
            }
            Err(why) => {
                tally.failed += 1;
                outln!("FAIL {name} step {i} {op}: {why}")?;
            }
        }
    }
    Ok(tally)
}
