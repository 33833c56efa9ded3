//! Which endpoints each traffic class of a Service port may reach from this
//! node: Ready endpoints (topology hints honoured when every ready endpoint
//! carries them), falling back to serving-and-terminating ones, split into
//! Cluster-policy and Local-policy sets as kube-proxy's `CategorizeEndpoints`
//! defines them.

use std::collections::BTreeMap;

use crate::objects::{Endpoint, ServicePort};

/// The node the proxy runs on, as topology sees it.
#[derive(Debug, Clone, Default)]
pub struct NodeTopology {
    pub name: String,
    /// `topology.kubernetes.io/zone`, if the node has it.
    pub zone: Option<String>,
    /// The `PreferSameTrafficDistribution` feature gate (node hints).
    pub prefer_same_node: bool,
}

/// The zone label on nodes.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

impl NodeTopology {
    /// From a node's name and labels.
    pub fn new(name: &str, labels: &BTreeMap<String, String>, prefer_same_node: bool) -> Self {
        NodeTopology {
            name: name.to_string(),
            zone: labels.get(ZONE_LABEL).cloned(),
            prefer_same_node,
        }
    }
}

/// The endpoint sets of one Service port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Categories {
    /// For Cluster-policy traffic; `None` when no traffic class uses them.
    pub cluster: Option<Vec<Endpoint>>,
    /// For Local-policy traffic; `None` when no traffic class uses them.
    pub local: Option<Vec<Endpoint>>,
    /// Every endpoint reachable from this node.
    pub all: Vec<Endpoint>,
    /// False exactly when the Service has no usable endpoint anywhere (it rejects).
    pub has_any: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Any,
    SameNode,
    SameZone,
}

fn mode(endpoints: &[Endpoint], node: &NodeTopology) -> Mode {
    let ready: Vec<&Endpoint> = endpoints.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return Mode::Any;
    }
    let zone = node.zone.as_deref().unwrap_or("");
    if node.prefer_same_node
        && ready.iter().all(|e| !e.node_hints.is_empty())
        && ready.iter().any(|e| e.node_hints.contains(&node.name))
    {
        return Mode::SameNode;
    }
    if ready.iter().all(|e| !e.zone_hints.is_empty())
        && ready.iter().any(|e| e.zone_hints.contains(zone))
    {
        return Mode::SameZone;
    }
    Mode::Any
}

fn available(e: &Endpoint, mode: Mode, node: &NodeTopology) -> bool {
    match mode {
        Mode::Any => true,
        Mode::SameNode => e.node_hints.contains(&node.name),
        Mode::SameZone => e.zone_hints.contains(node.zone.as_deref().unwrap_or("")),
    }
}

fn filter(endpoints: &[Endpoint], keep: impl Fn(&Endpoint) -> bool) -> Vec<Endpoint> {
    endpoints.iter().filter(|e| keep(e)).cloned().collect()
}

/// Categorises `port`'s endpoints for `node`.
pub fn categorize(port: &ServicePort, node: &NodeTopology) -> Categories {
    let eps = &port.endpoints;
    let mut out = Categories::default();
    if eps.is_empty() {
        return out;
    }
    let mut topology = Mode::Any;
    if port.uses_cluster_endpoints() {
        topology = mode(eps, node);
        let mut cluster = filter(eps, |e| e.ready && available(e, topology, node));
        if cluster.is_empty() {
            // No ready endpoint anywhere (topology already fell back).
            cluster = filter(eps, |e| e.serving && e.terminating);
        }
        out.has_any = !cluster.is_empty();
        out.cluster = Some(cluster);
    }
    if !port.uses_local_endpoints() {
        out.all = out.cluster.clone().unwrap_or_default();
        return out;
    }
    let usable = |e: &Endpoint| e.ready || (e.serving && e.terminating);
    out.has_any |= eps.iter().any(usable);
    let local_ready = eps.iter().any(|e| e.ready && e.is_on(&node.name));
    let mut terminating_fallback = false;
    let local = if local_ready {
        filter(eps, |e| e.ready && e.is_on(&node.name))
    } else {
        terminating_fallback = true;
        filter(eps, |e| e.serving && e.terminating && e.is_on(&node.name))
    };
    let Some(cluster) = out.cluster.clone() else {
        out.all = local.clone();
        out.local = Some(local);
        return out;
    };
    if topology == Mode::Any && !terminating_fallback {
        // Every ready endpoint is in `cluster`, so it holds `local` already.
        out.all = cluster;
    } else {
        let mut all = cluster;
        for e in &local {
            if !all.iter().any(|a| a.addr == e.addr) {
                all.push(e.clone());
            }
        }
        out.all = all;
    }
    out.local = Some(local);
    out
}
