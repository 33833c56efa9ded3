//! The Calico IPAM corpus runner (`conformance/ipam`, schema in its
//! README): each scenario loads its cluster objects and runs its steps
//! through palisade-ipam on the store it is given, comparing every outcome
//! with upstream's expectation. A step whose expectation holds a key this
//! runner does not know fails: an unread expectation must never pass
//! silently.

mod expect;
mod ops;

use std::collections::BTreeMap;

use palisade_ipam::cluster::Labels;
use palisade_ipam::{Cluster, IpamError, Pool};
use serde_json::Value;

pub use ops::Run;

/// An op's outcome: its error, its reported fields and its saveable values.
#[derive(Debug, Default)]
pub struct Outcome {
    /// IPAM's error.
    pub error: Option<IpamError>,
    /// An error that is not IPAM's own: its kind and text.
    pub text_error: Option<(&'static str, String)>,
    /// Reported fields, as expectations name them.
    pub fields: BTreeMap<&'static str, Value>,
    /// Values a step can save.
    pub values: BTreeMap<&'static str, Value>,
    /// How long the op took.
    pub elapsed: std::time::Duration,
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
    fn apply(&mut self, doc: &Value) -> Result<(), String> {
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
            other => return Err(format!("object kind {other:?} is not one IPAM reads")),
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
