//! Services in the agent, as kube-proxy's replacement: the writer keeps the
//! stored Services and EndpointSlices, and after every batch that touched
//! one it builds this node's service tables, IPv4 and IPv6
//! (palisade-services, the nftables proxier's semantics), and writes them
//! to the service maps as one. The
//! service program is attached first on each pod interface's ingress (with
//! the policy programs) and on the `--service-interface`s (NodePorts and
//! external IPs reached from outside the node).
//!
//! A document the model cannot read is skipped and reported (its Service
//! keeps no frontend); a table that does not fit the maps is refused whole
//! and the previous one stays in force.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use palisade_datastore::{Snapshot, StoreChange, kinds};
use palisade_services::health::{HealthCheck, health_checks};
use palisade_services::topology::{NodeTopology, ZONE_LABEL};
use palisade_services::{Family, Objects, ProxyConfig, ServiceTable};
use serde_json::Value;

/// How a node proxies Services (kube-proxy's flags of the same names);
/// `palisade agent` and `palisade services` share them.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ProxyArgs {
    /// Pod CIDRs: sources in them are pods, not masqueraded to ClusterIPs
    /// (default: the IP pools' CIDRs).
    #[arg(long = "cluster-cidr", value_delimiter = ',')]
    pub cluster_cidrs: Vec<IpNet>,
    /// Service CIDRs: unallocated addresses in them are dropped.
    #[arg(long = "service-cidr", value_delimiter = ',')]
    pub service_cidrs: Vec<IpNet>,
    /// NodePorts answer only on node addresses in these (default: all).
    #[arg(long = "node-port-address", value_delimiter = ',')]
    pub node_port_addresses: Vec<IpNet>,
    /// Masquerade all traffic to ClusterIPs.
    #[arg(long)]
    pub masquerade_all: bool,
    /// The node's zone (topology hints).
    #[arg(long)]
    pub zone: Option<String>,
}

impl ProxyArgs {
    /// The proxy configuration for `family` of `node` at `node_ips`;
    /// `pools` are the pod CIDRs when none were given.
    pub fn config(
        &self,
        family: Family,
        node: &str,
        node_ips: Vec<IpAddr>,
        pools: Vec<IpNet>,
    ) -> ProxyConfig {
        let labels: BTreeMap<String, String> = self
            .zone
            .iter()
            .map(|z| (ZONE_LABEL.to_string(), z.clone()))
            .collect();
        ProxyConfig {
            family,
            node: NodeTopology::new(node, &labels, true),
            node_ips,
            cluster_cidrs: if self.cluster_cidrs.is_empty() {
                pools
            } else {
                self.cluster_cidrs.clone()
            },
            service_cidrs: self.service_cidrs.clone(),
            masquerade_all: self.masquerade_all,
            node_port_addresses: self.node_port_addresses.clone(),
        }
    }
}

/// The Services and EndpointSlices the writer has seen, by key.
#[derive(Debug, Default)]
pub struct ServiceSource {
    documents: BTreeMap<String, Value>,
    /// A Service or slice changed since the last table.
    dirty: bool,
}

fn is_service_input(doc: &Value) -> bool {
    kinds::document_ref(doc)
        .is_some_and(|(info, _)| matches!(info.kind, "Service" | "EndpointSlice"))
}

impl ServiceSource {
    /// A complete listing replaces what was seen.
    pub fn listing(&mut self, snapshot: &Snapshot) {
        self.documents = snapshot
            .objects
            .iter()
            .filter(|o| is_service_input(&o.document))
            .map(|o| (o.key.clone(), o.document.clone()))
            .collect();
        self.dirty = true;
    }

    /// Changes after it.
    pub fn changes(&mut self, changes: &[StoreChange]) {
        for c in changes {
            match c {
                StoreChange::Put(o) if is_service_input(&o.document) => {
                    self.documents.insert(o.key.clone(), o.document.clone());
                    self.dirty = true;
                }
                StoreChange::Put(_) => {}
                StoreChange::Deleted { key, .. } => {
                    self.dirty |= self.documents.remove(key).is_some();
                }
            }
        }
    }

    /// Whether a table is due; taking it clears the flag.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Services stored.
    pub fn service_count(&self) -> usize {
        self.documents
            .values()
            .filter(|d| d["kind"] == "Service")
            .count()
    }

    /// A table per configuration (one per IP family), with the documents
    /// it had to skip (key and what is wrong, naming the field), and the
    /// health checks this node serves (over every configuration's family).
    pub fn build(&self, configs: Vec<ProxyConfig>) -> Built {
        let mut objects = Objects::default();
        let mut skipped = Vec::new();
        for (key, doc) in &self.documents {
            match Objects::from_documents([doc]) {
                Ok(o) => {
                    objects.services.extend(o.services);
                    objects.slices.extend(o.slices);
                }
                Err(e) => skipped.push((key.clone(), e.to_string())),
            }
        }
        let mut all_ports = Vec::new();
        let node = configs
            .first()
            .map(|c| c.node.name.clone())
            .unwrap_or_default();
        let tables = configs
            .into_iter()
            .map(|config| {
                let ports = objects.service_ports(config.family).unwrap_or_else(|e| {
                    skipped.push(("services".into(), e.to_string()));
                    Vec::new()
                });
                let table = ServiceTable::build(config, &ports);
                all_ports.extend(ports);
                table
            })
            .collect();
        Built {
            tables,
            skipped,
            health_checks: health_checks(&all_ports, &node),
        }
    }
}

/// What [`ServiceSource::build`] makes.
pub struct Built {
    pub tables: Vec<ServiceTable>,
    /// Documents skipped: key and what is wrong, naming the field.
    pub skipped: Vec<(String, String)>,
    pub health_checks: Vec<HealthCheck>,
}

/// This node's addresses for the service table: `--node-ip` or the first
/// global IPv4 address on a link that is up and not a pod's, the
/// overlay's or loopback, and the first global IPv6 address likewise.
pub fn node_addresses(given: Option<std::net::Ipv4Addr>) -> Vec<IpAddr> {
    let found: Vec<IpAddr> = match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => addrs
            .filter(|a| {
                a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP)
                    && !a.interface_name.starts_with("cali")
                    && !a.interface_name.starts_with("vxlan")
            })
            .filter_map(|a| {
                let a = a.address?;
                a.as_sockaddr_in()
                    .map(|s| IpAddr::V4(s.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
            })
            .filter(|ip| match ip {
                IpAddr::V4(v) => !v.is_loopback() && !v.is_link_local(),
                IpAddr::V6(v) => !v.is_loopback() && !v.is_unicast_link_local(),
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    let v4 = given
        .map(IpAddr::V4)
        .or_else(|| found.iter().copied().find(IpAddr::is_ipv4));
    let v6 = found.iter().copied().find(IpAddr::is_ipv6);
    v4.into_iter().chain(v6).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_datastore::StoredObject;
    use serde_json::json;

    fn stored(key: &str, document: Value) -> StoreChange {
        let (_, object) = kinds::document_ref(&document).unwrap();
        StoreChange::Put(StoredObject {
            key: key.into(),
            object,
            revision: 1,
            document,
        })
    }

    fn service() -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "api", "namespace": "backend"},
               "spec": {"clusterIP": "172.30.0.10",
                        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
    }

    fn slice(addr: &str) -> Value {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "api-1", "namespace": "backend",
                            "labels": {"kubernetes.io/service-name": "api"}},
               "addressType": "IPv4",
               "endpoints": [{"addresses": [addr], "conditions": {"ready": true}}],
               "ports": [{"name": "http", "port": 9090, "protocol": "TCP"}]})
    }

    fn config() -> ProxyConfig {
        ProxyArgs::default().config(
            Family::V4,
            "node-a",
            vec!["192.168.0.2".parse().unwrap()],
            vec!["10.0.0.0/8".parse().unwrap()],
        )
    }

    #[test]
    fn a_service_and_its_slice_make_a_frontend_and_changes_mark_the_table_due() {
        let mut source = ServiceSource::default();
        source.changes(&[
            stored("/s", service()),
            stored("/e", slice("10.20.0.5")),
            stored(
                "/ns",
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}),
            ),
        ]);
        assert!(source.take_dirty());
        assert!(!source.take_dirty());
        assert_eq!(source.service_count(), 1);
        let Built {
            tables, skipped, ..
        } = source.build(vec![config()]);
        let table = &tables[0];
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(table.services.len(), 1);
        assert_eq!(
            table.services[0].cluster,
            vec!["10.20.0.5:9090".parse().unwrap()]
        );
        // A delete of something never seen is not a change.
        let gone = |key: &str, revision| StoreChange::Deleted {
            key: key.into(),
            object: policy_core::ObjectRef::new("EndpointSlice", Some("backend"), "api-1"),
            revision,
        };
        source.changes(&[gone("/other", 2)]);
        assert!(!source.take_dirty());
        source.changes(&[gone("/e", 3)]);
        assert!(source.take_dirty());
        let Built { tables, .. } = source.build(vec![config()]);
        assert!(tables[0].services[0].cluster.is_empty());
    }

    #[test]
    fn a_document_the_model_cannot_read_is_skipped_and_named() {
        let mut source = ServiceSource::default();
        let mut bad = slice("10.20.0.5");
        bad["ports"][0]["port"] = json!("ninety");
        source.changes(&[stored("/s", service()), stored("/e", bad)]);
        let Built {
            tables, skipped, ..
        } = source.build(vec![config()]);
        assert_eq!(tables[0].services.len(), 1);
        assert_eq!(skipped.len(), 1);
        assert!(
            skipped[0].0 == "/e" && skipped[0].1.contains("api-1"),
            "{skipped:?}"
        );
    }
}
