//! The frontend table: what a node's service dataplane holds for one IP
//! family, built from Service ports and the node's configuration. Each
//! frontend (ClusterIP, external IP, LoadBalancer IP, NodePort) points at
//! one Service port whose endpoint sets are already chosen for this node.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::objects::{Family, PortName, Protocol, ServicePort};
use crate::topology::{NodeTopology, categorize};

/// How kube-proxy is configured on this node, for one family.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub family: Family,
    pub node: NodeTopology,
    /// The node's addresses; the first of each family is its primary IP.
    pub node_ips: Vec<IpAddr>,
    /// Pod CIDRs (the local-traffic detector); empty means no detector.
    pub cluster_cidrs: Vec<IpNet>,
    /// Service ranges: unallocated addresses in them are dropped.
    pub service_cidrs: Vec<IpNet>,
    pub masquerade_all: bool,
    /// NodePorts answer on local addresses in these; none of the family means all.
    pub node_port_addresses: Vec<IpNet>,
}

impl ProxyConfig {
    /// The node's primary address in this family.
    pub fn primary_ip(&self) -> Option<IpAddr> {
        self.node_ips
            .iter()
            .copied()
            .find(|ip| self.family.holds(ip))
    }

    /// Whether `ip` is one of this node's own addresses (loopback included).
    pub fn is_node_local(&self, ip: &IpAddr) -> bool {
        ip.is_loopback() || self.node_ips.contains(ip)
    }

    /// Whether `ip` is a pod address by the local-traffic detector.
    pub fn is_pod(&self, ip: &IpAddr) -> bool {
        self.cluster_cidrs.iter().any(|n| n.contains(ip))
    }

    pub fn has_detector(&self) -> bool {
        self.cluster_cidrs
            .iter()
            .any(|n| self.family.holds(&n.addr()))
    }

    /// The node addresses NodePorts answer on (never loopback).
    pub fn node_port_ips(&self) -> BTreeSet<IpAddr> {
        let mine: Vec<&IpNet> = self
            .node_port_addresses
            .iter()
            .filter(|n| self.family.holds(&n.addr()))
            .collect();
        self.node_ips
            .iter()
            .filter(|ip| self.family.holds(ip) && !ip.is_loopback())
            .filter(|ip| mine.is_empty() || mine.iter().any(|n| n.contains(*ip)))
            .copied()
            .collect()
    }
}

/// Which address of a Service a packet was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp,
    ExternalIp,
    LoadBalancer,
    NodePort,
}

/// A Service port as the dataplane holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backends {
    pub name: PortName,
    pub protocol: Protocol,
    /// For Cluster-policy traffic.
    pub cluster: Vec<SocketAddr>,
    /// For Local-policy traffic.
    pub local: Vec<SocketAddr>,
    /// False when the Service has no usable endpoint anywhere.
    pub has_any: bool,
    pub internal_local: bool,
    pub external_local: bool,
    pub source_ranges: Vec<IpNet>,
    pub load_balancer_ips: Vec<IpAddr>,
    pub affinity_seconds: Option<u32>,
    /// Every endpoint the slices list, in any condition: an established
    /// connection keeps its backend while it is here.
    pub present: Vec<SocketAddr>,
    /// The endpoints serving (ready, or terminating and still serving): a
    /// UDP flow keeps its backend only while it is here, as kube-proxy
    /// clears the conntrack entries of UDP flows to any other, so the
    /// next datagram goes to one that serves.
    pub serving: Vec<SocketAddr>,
}

/// Every frontend of one family on one node.
#[derive(Debug, Clone)]
pub struct ServiceTable {
    pub config: ProxyConfig,
    pub services: Vec<Backends>,
    /// (address, protocol, port) of ClusterIPs, external and LB IPs.
    pub frontends: HashMap<(IpAddr, Protocol, u16), (FrontendKind, usize)>,
    /// (protocol, node port).
    pub node_ports: HashMap<(Protocol, u16), usize>,
    pub node_port_ips: BTreeSet<IpAddr>,
    /// Every active ClusterIP (wrong port or protocol is rejected).
    pub cluster_ips: BTreeSet<IpAddr>,
}

fn addrs(eps: &Option<Vec<crate::objects::Endpoint>>) -> Vec<SocketAddr> {
    let mut v: Vec<SocketAddr> = eps.iter().flatten().map(|e| e.addr).collect();
    v.sort();
    v
}

impl ServiceTable {
    /// Builds the table from `ports` (other families are ignored).
    pub fn build(config: ProxyConfig, ports: &[ServicePort]) -> ServiceTable {
        let mut table = ServiceTable {
            node_port_ips: config.node_port_ips(),
            config,
            services: Vec::new(),
            frontends: HashMap::new(),
            node_ports: HashMap::new(),
            cluster_ips: BTreeSet::new(),
        };
        // Sorted so that a conflict (two Services on one frontend) resolves
        // the same way on every node and every run.
        let mut sorted: Vec<&ServicePort> = ports.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name).then(a.protocol.cmp(&b.protocol)));
        for p in sorted {
            let family = table.config.family;
            let c = categorize(p, &table.config.node);
            let idx = table.services.len();
            table.services.push(Backends {
                name: p.name.clone(),
                protocol: p.protocol,
                cluster: addrs(&c.cluster),
                local: addrs(&c.local),
                has_any: c.has_any,
                internal_local: p.internal_policy_local,
                external_local: p.external_policy_local,
                source_ranges: p.source_ranges.clone(),
                load_balancer_ips: p.load_balancer_ips.clone(),
                affinity_seconds: p.affinity_seconds,
                present: p.endpoints.iter().map(|e| e.addr).collect(),
                serving: p
                    .endpoints
                    .iter()
                    .filter(|e| e.serving)
                    .map(|e| e.addr)
                    .collect(),
            });
            if let Some(ip) = p.cluster_ip.filter(|ip| family.holds(ip)) {
                table.cluster_ips.insert(ip);
                table
                    .frontends
                    .entry((ip, p.protocol, p.port))
                    .or_insert((FrontendKind::ClusterIp, idx));
            }
            for ip in p.external_ips.iter().filter(|ip| family.holds(ip)) {
                table
                    .frontends
                    .entry((*ip, p.protocol, p.port))
                    .or_insert((FrontendKind::ExternalIp, idx));
            }
            for ip in p.load_balancer_ips.iter().filter(|ip| family.holds(ip)) {
                table
                    .frontends
                    .entry((*ip, p.protocol, p.port))
                    .or_insert((FrontendKind::LoadBalancer, idx));
            }
            if let Some(np) = p.node_port {
                table.node_ports.entry((p.protocol, np)).or_insert(idx);
            }
        }
        table
    }

    /// The Service port named `name`.
    pub fn service(&self, name: &PortName) -> Option<&Backends> {
        self.services.iter().find(|b| &b.name == name)
    }

    /// Service and endpoint counts, for status and metrics.
    pub fn counts(&self) -> TableCounts {
        let services: BTreeSet<(&str, &str)> = self
            .services
            .iter()
            .map(|b| (b.name.namespace.as_str(), b.name.service.as_str()))
            .collect();
        let mut endpoints = BTreeMap::new();
        for b in &self.services {
            for a in b.cluster.iter().chain(&b.local) {
                endpoints.insert((b.protocol, *a), ());
            }
        }
        TableCounts {
            services: services.len(),
            service_ports: self.services.len(),
            frontends: self.frontends.len() + self.node_ports.len() * self.node_port_ips.len(),
            endpoints: endpoints.len(),
        }
    }
}

/// Sizes of a [`ServiceTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TableCounts {
    pub services: usize,
    pub service_ports: usize,
    pub frontends: usize,
    pub endpoints: usize,
}
