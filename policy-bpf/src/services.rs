//! Lowering a node's service table ([`palisade_services::ServiceTable`])
//! to the entries of the service maps, with capacity checks that name the
//! map (a table that does not fit changes nothing), and the same entries
//! read back in user space for the `maps` engine.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use palisade_services::{Family, FrontendKind, Protocol, ServiceTable};
use policy_bpf_common::*;

use crate::nat_expiry::{FlowKey, flow_of};

/// How many entries each service map holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceCapacity {
    pub frontends: usize,
    pub backends: usize,
    pub addresses: usize,
    pub source_ranges: usize,
    /// NAT entries (two per translated connection; an LRU).
    pub nat: usize,
    /// ClientIP affinity entries (an LRU).
    pub affinity: usize,
}

impl Default for ServiceCapacity {
    /// Sized for 10k Services with 100k endpoints on one node, and 128k
    /// translated connections at a time.
    fn default() -> Self {
        ServiceCapacity {
            frontends: 65_536,
            backends: 262_144,
            addresses: 65_536,
            source_ranges: 16_384,
            nat: 262_144,
            affinity: 65_536,
        }
    }
}

impl ServiceCapacity {
    /// Defaults with small NAT and affinity tables: the verification
    /// engines forget every connection before each probe.
    pub fn verification() -> Self {
        ServiceCapacity {
            nat: 1024,
            affinity: 1024,
            ..ServiceCapacity::default()
        }
    }
}

/// A table that does not fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("service map {map} would need {needed} entries; it holds {capacity} (nothing was changed)")]
pub struct ServiceMapFull {
    pub map: &'static str,
    pub needed: usize,
    pub capacity: usize,
}

/// Every entry of the service maps for one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceEntries {
    pub frontends: BTreeMap<FrontendKey, FrontendValue>,
    /// Each Service port's values, by its number (no map of their own:
    /// every frontend of the port carries them).
    pub services: Vec<ServiceValue>,
    pub backends: Vec<BackendValue>,
    /// (prefix, `ADDR_*` flags), flags of covering prefixes folded in.
    pub addresses: Vec<(IpNet, u32)>,
    /// ((service, prefix), `RANGE_*` flags), folded the same way.
    pub source_ranges: Vec<((u32, IpNet), u8)>,
    pub config: ServiceConfig,
}

/// A service range as the programs test it.
fn service_range(net: &IpNet) -> ServiceRange {
    let (family, addr) = net_bytes(net);
    let mask_bytes = addr_bytes(&net.netmask());
    let word = |b: &[u8; 16], i: usize| {
        u32::from_ne_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
    };
    ServiceRange {
        net: std::array::from_fn(|i| word(&addr, i) & word(&mask_bytes, i)),
        mask: std::array::from_fn(|i| word(&mask_bytes, i)),
        family,
        pad: [0; 3],
    }
}

/// 16-byte address form of the maps.
pub fn addr_bytes(ip: &IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

/// The address a 16-byte map address stands for.
pub fn addr_from(family: u8, bytes: &[u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(*bytes)
    }
}

/// A prefix's family code and 16-byte address form.
pub fn net_bytes(net: &IpNet) -> (u8, [u8; 16]) {
    let ip = net.addr();
    (family_code(&ip), addr_bytes(&ip))
}

/// A backend as the NAT entries name it: address, port, family.
pub type NatBackend = ([u8; 16], u16, u8);

/// A frontend as a flow's NAT entries name it: address, port, family (a
/// NodePort's address is the node's).
pub type NatFrontend = ([u8; 16], u16, u8);

/// The backends translated flows keep after a new table (see
/// [`KeptBackends::keeps`]).
#[derive(Debug, Default)]
pub struct KeptBackends {
    /// Every endpoint the slices list, in any condition.
    pub present: BTreeSet<NatBackend>,
    /// The endpoints serving (ready, or terminating and still serving),
    /// one set per UDP Service port.
    pub serving: Vec<BTreeSet<NatBackend>>,
    /// Which set of `serving` each UDP frontend's flows keep (ClusterIPs,
    /// external and LoadBalancer IPs).
    pub udp_frontends: BTreeMap<NatFrontend, usize>,
    /// Which set each UDP NodePort's flows keep: (port, family).
    pub udp_node_ports: BTreeMap<(u16, u8), usize>,
}

impl KeptBackends {
    pub fn of(tables: &[ServiceTable]) -> KeptBackends {
        let nat = |a: &SocketAddr| (addr_bytes(&a.ip()), a.port(), family_code(&a.ip()));
        let mut kept = KeptBackends::default();
        for t in tables {
            let family = match t.config.family {
                Family::V4 => FAMILY_V4,
                Family::V6 => FAMILY_V6,
            };
            let first = kept.serving.len();
            // Set `first + i` is Service port `i`'s (empty unless UDP).
            for b in &t.services {
                kept.present.extend(b.present.iter().map(nat));
                let udp = b.protocol == Protocol::Udp;
                // With the selected ones: a slice may say ready but not serving.
                let serving = b.serving.iter().chain(&b.cluster).chain(&b.local);
                kept.serving
                    .push(serving.filter(|_| udp).map(nat).collect());
            }
            for ((ip, protocol, port), (_, i)) in &t.frontends {
                if *protocol == Protocol::Udp {
                    let frontend = (addr_bytes(ip), *port, family);
                    kept.udp_frontends.insert(frontend, first + i);
                }
            }
            for ((protocol, port), i) in &t.node_ports {
                if *protocol == Protocol::Udp {
                    kept.udp_node_ports.insert((*port, family), first + i);
                }
            }
        }
        kept
    }

    /// The serving endpoints of the Service port behind UDP `frontend`.
    fn serving_at(&self, frontend: &NatFrontend) -> Option<&BTreeSet<NatBackend>> {
        let (_, port, family) = *frontend;
        let set = self
            .udp_frontends
            .get(frontend)
            .or_else(|| self.udp_node_ports.get(&(port, family)))?;
        self.serving.get(*set)
    }

    /// Whether every backend `before` kept is kept here too (then no
    /// flow's state needs forgetting).
    pub fn covers(&self, before: &KeptBackends) -> bool {
        let grown = |now: Option<&usize>, then: &usize| match (
            now.and_then(|i| self.serving.get(*i)),
            before.serving.get(*then),
        ) {
            (Some(now), Some(then)) => now.is_superset(then),
            _ => false,
        };
        self.present.is_superset(&before.present)
            && (before.udp_frontends.iter()).all(|(f, i)| grown(self.udp_frontends.get(f), i))
            && (before.udp_node_ports.iter()).all(|(p, i)| grown(self.udp_node_ports.get(p), i))
    }

    /// Whether a translated flow of `protocol` through `frontend` keeps
    /// `backend`: a connection while the slices list it in any
    /// condition, so one to a terminating endpoint that new connections
    /// no longer get drains as behind kube-proxy, whose conntrack entries
    /// outlive the selection; a UDP flow only while its frontend's Service
    /// port lists it serving, as kube-proxy clears the UDP conntrack
    /// entries of each Service to any other endpoint (the next datagram
    /// goes to one that serves).
    pub fn keeps(
        &self,
        protocol: u8,
        frontend: Option<&NatFrontend>,
        backend: &NatBackend,
    ) -> bool {
        if protocol == Protocol::Udp.number() {
            frontend
                .and_then(|f| self.serving_at(f))
                .is_some_and(|s| s.contains(backend))
        } else {
            self.present.contains(backend)
        }
    }

    /// The keys of the NAT entries a new table forgets: every entry of a
    /// flow whose backend it does not keep ([`Self::keeps`]; a UDP flow's
    /// frontend is in its forward or reply entry).
    pub fn forgotten(&self, entries: &[(NatTuple, NatValue)]) -> Vec<NatTuple> {
        let udp = Protocol::Udp.number();
        let frontends: HashMap<FlowKey, NatFrontend> = entries
            .iter()
            .filter(|(k, _)| k.protocol == udp)
            .filter_map(|(k, v)| Some((flow_of(k, v), frontend_of(k, v)?)))
            .collect();
        entries
            .iter()
            .filter(|(k, v)| {
                let backend = if v.flags & NAT_REPLY != 0 {
                    (k.src, k.src_port, k.family)
                } else {
                    (v.dst, v.dst_port, k.family)
                };
                let frontend = if k.protocol == udp {
                    frontends.get(&flow_of(k, v))
                } else {
                    None
                };
                !self.keeps(k.protocol, frontend, &backend)
            })
            .map(|(k, _)| *k)
            .collect()
    }

    /// The socket hooks' UDP flows a new table forgets (keys of
    /// `PALISADE_SOCK_FLOWS`): those whose backend it does not keep for
    /// their frontend, as [`Self::forgotten`] does the NAT entries.
    pub fn forgotten_socket_flows(
        &self,
        flows: &[(SockReverseKey, SockFlowValue)],
    ) -> Vec<SockReverseKey> {
        flows
            .iter()
            .filter(|(k, v)| {
                let frontend = (k.addr, u16::from_be(k.port), k.family);
                let backend = (v.backend, u16::from_be(v.backend_port), v.family);
                !self.keeps(Protocol::Udp.number(), Some(&frontend), &backend)
            })
            .map(|(k, _)| *k)
            .collect()
    }
}

/// The frontend an entry names: the forward entry's destination, the
/// reply entry's restored source (the SNAT entries name none).
fn frontend_of(k: &NatTuple, v: &NatValue) -> Option<NatFrontend> {
    match v.flags & (NAT_REPLY | NAT_AFTER_POLICY) {
        0 => Some((k.dst, k.dst_port, k.family)),
        f if f == NAT_REPLY | NAT_AFTER_POLICY => Some((v.src, v.src_port, k.family)),
        _ => None,
    }
}

fn family_code(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 }
}

fn protocol_code(p: Protocol) -> u8 {
    p.number()
}

/// Folds the flags of covering prefixes into each prefix, so a longest-
/// prefix lookup returns the union along the chain (each prefix looks up
/// its at most 128 supernets).
fn fold<K: Ord + Clone, F: Copy + std::ops::BitOr<Output = F>>(
    entries: BTreeMap<(K, IpNet), F>,
) -> Vec<((K, IpNet), F)> {
    entries
        .iter()
        .map(|((k, net), flags)| {
            let mut all = *flags;
            let mut cur = *net;
            while let Some(up) = cur.supernet() {
                if let Some(f) = entries.get(&(k.clone(), up)) {
                    all = all | *f;
                }
                cur = up;
            }
            ((k.clone(), *net), all)
        })
        .collect()
}

fn check(map: &'static str, needed: usize, capacity: usize) -> Result<(), ServiceMapFull> {
    if needed > capacity {
        Err(ServiceMapFull {
            map,
            needed,
            capacity,
        })
    } else {
        Ok(())
    }
}

/// Lowers `table` into map entries.
pub fn lower_services(
    table: &ServiceTable,
    capacity: &ServiceCapacity,
) -> Result<ServiceEntries, ServiceMapFull> {
    lower_service_tables(std::slice::from_ref(table), capacity)
}

/// Lowers one table per IP family (a dual-stack node) into one set of
/// map entries: every key carries its family, so the tables only share
/// the arrays (each table's indices follow the last's) and the config.
pub fn lower_service_tables(
    tables: &[ServiceTable],
    capacity: &ServiceCapacity,
) -> Result<ServiceEntries, ServiceMapFull> {
    let mut out = ServiceEntries::default();
    let mut addresses: BTreeMap<((), IpNet), u32> = BTreeMap::new();
    let mut ranges: BTreeMap<(u32, IpNet), u8> = BTreeMap::new();
    for table in tables {
        lower_table(table, &mut out, &mut addresses, &mut ranges)?;
    }
    out.addresses = fold(addresses)
        .into_iter()
        .map(|(((), net), f)| (net, f))
        .collect();
    out.source_ranges = fold(ranges);
    // The service ranges, for the programs to rule an address out without
    // the trie; more than the configuration holds and they use the trie.
    let service_ranges: BTreeSet<IpNet> = tables
        .iter()
        .flat_map(|t| t.config.service_cidrs.iter().map(IpNet::trunc))
        .collect();
    if service_ranges.len() <= SERVICE_RANGES {
        out.config.flags |= CONFIG_RANGES_KNOWN;
        for (slot, net) in out.config.ranges.iter_mut().zip(&service_ranges) {
            *slot = service_range(net);
        }
    }
    if !out.frontends.is_empty() {
        out.config.flags |= CONFIG_ENABLED;
    }
    check(
        map_names::SVC_FRONTENDS,
        out.frontends.len(),
        capacity.frontends,
    )?;
    check(
        map_names::SVC_BACKENDS,
        out.backends.len(),
        capacity.backends,
    )?;
    check(
        map_names::SVC_ADDRESSES,
        out.addresses.len(),
        capacity.addresses,
    )?;
    check(
        map_names::SVC_SOURCE_RANGES,
        out.source_ranges.len(),
        capacity.source_ranges,
    )?;
    Ok(out)
}

/// Appends one family's table to `out`; address classes and source
/// ranges are collected unfolded (folded once over every table).
fn lower_table(
    table: &ServiceTable,
    out: &mut ServiceEntries,
    addresses: &mut BTreeMap<((), IpNet), u32>,
    ranges: &mut BTreeMap<(u32, IpNet), u8>,
) -> Result<(), ServiceMapFull> {
    let cfg = &table.config;
    let offset = out.services.len();
    let backend = |a: &SocketAddr| BackendValue {
        addr: addr_bytes(&a.ip()),
        port: a.port(),
        family: family_code(&a.ip()),
        pad: 0,
    };
    for b in &table.services {
        let index = out.services.len() as u32;
        let cluster_first = out.backends.len() as u32;
        out.backends.extend(b.cluster.iter().map(backend));
        let local_first = out.backends.len() as u32;
        out.backends.extend(b.local.iter().map(backend));
        let mut flags = 0;
        for (set, flag) in [
            (b.has_any, SVC_HAS_ANY),
            (b.internal_local, SVC_INTERNAL_LOCAL),
            (b.external_local, SVC_EXTERNAL_LOCAL),
            (!b.source_ranges.is_empty(), SVC_SOURCE_RANGES),
        ] {
            if set {
                flags |= flag;
            }
        }
        let count = |n: usize| u16::try_from(n).unwrap_or(u16::MAX);
        out.services.push(ServiceValue {
            cluster_first,
            local_first,
            cluster_count: count(b.cluster.len()),
            local_count: count(b.local.len()),
            flags,
            pad: 0,
            affinity_seconds: b.affinity_seconds.unwrap_or(0),
        });
        if !b.source_ranges.is_empty() {
            for r in &b.source_ranges {
                *ranges.entry((index, *r)).or_insert(0) |= RANGE_ALLOWED;
            }
            for ip in &b.load_balancer_ips {
                *ranges.entry((index, IpNet::from(*ip))).or_insert(0) |= RANGE_LB_IP;
            }
        }
        if b.cluster.len() > usize::from(u16::MAX) || b.local.len() > usize::from(u16::MAX) {
            return Err(ServiceMapFull {
                map: map_names::SVC_BACKENDS,
                needed: b.cluster.len().max(b.local.len()),
                capacity: usize::from(u16::MAX),
            });
        }
    }
    let service = |index: usize| (offset + index) as u32;
    for ((ip, protocol, port), (kind, index)) in &table.frontends {
        out.frontends.insert(
            FrontendKey {
                addr: addr_bytes(ip),
                port: *port,
                protocol: protocol_code(*protocol),
                family: family_code(ip),
            },
            FrontendValue {
                service: service(*index),
                port: out.services[service(*index) as usize],
                kind: match kind {
                    FrontendKind::ClusterIp => FRONTEND_CLUSTER_IP,
                    FrontendKind::ExternalIp => FRONTEND_EXTERNAL_IP,
                    FrontendKind::LoadBalancer => FRONTEND_LOAD_BALANCER,
                    FrontendKind::NodePort => FRONTEND_NODE_PORT,
                },
                pad: [0; 3],
            },
        );
    }
    // NodePorts: one frontend per address they answer on (a VIP entry
    // of the same address and port wins, as the table decides VIPs first).
    for ((protocol, port), index) in &table.node_ports {
        for ip in &table.node_port_ips {
            out.frontends
                .entry(FrontendKey {
                    addr: addr_bytes(ip),
                    port: *port,
                    protocol: protocol_code(*protocol),
                    family: family_code(ip),
                })
                .or_insert(FrontendValue {
                    service: service(*index),
                    kind: FRONTEND_NODE_PORT,
                    pad: [0; 3],
                    port: out.services[service(*index) as usize],
                });
        }
    }
    let mut mark = |net: IpNet, flag: u32| *addresses.entry(((), net.trunc())).or_insert(0) |= flag;
    for n in &cfg.cluster_cidrs {
        mark(*n, ADDR_POD);
    }
    for ip in &cfg.node_ips {
        mark(IpNet::from(*ip), ADDR_NODE_LOCAL);
    }
    for loopback in ["127.0.0.0/8", "::1/128"] {
        if let Ok(net) = loopback.parse() {
            mark(net, ADDR_NODE_LOCAL);
        }
    }
    for n in &cfg.service_cidrs {
        mark(*n, ADDR_SERVICE_CIDR);
    }
    for ip in &table.cluster_ips {
        mark(IpNet::from(*ip), ADDR_CLUSTER_IP);
    }
    if cfg.masquerade_all {
        out.config.flags |= CONFIG_MASQUERADE_ALL;
    }
    if cfg.has_detector() {
        out.config.flags |= match cfg.family {
            Family::V4 => CONFIG_DETECTOR_V4,
            Family::V6 => CONFIG_DETECTOR_V6,
        };
    }
    if let Some(ip) = cfg.primary_ip() {
        match cfg.family {
            Family::V4 => out.config.primary_v4 = addr_bytes(&ip),
            Family::V6 => out.config.primary_v6 = addr_bytes(&ip),
        }
    }
    Ok(())
}

fn longest<'a, T: Copy>(entries: impl Iterator<Item = (&'a IpNet, T)>, ip: &IpAddr) -> Option<T> {
    entries
        .filter(|(net, _)| net.contains(ip))
        .max_by_key(|(net, _)| net.prefix_len())
        .map(|(_, v)| v)
}

/// The entries as the lookups of the decision see them (the `maps` engine).
impl ServiceMaps for ServiceEntries {
    fn frontend(&self, key: &FrontendKey) -> Option<FrontendValue> {
        self.frontends.get(key).copied()
    }

    fn config_flags(&self) -> u32 {
        self.config.flags
    }

    fn primary(&self, family: u8) -> [u8; 16] {
        if family == FAMILY_V4 {
            self.config.primary_v4
        } else {
            self.config.primary_v6
        }
    }

    fn address_flags(&self, family: u8, addr: &[u8; 16]) -> u32 {
        let ip = addr_from(family, addr);
        longest(self.addresses.iter().map(|(n, f)| (n, *f)), &ip).unwrap_or(0)
    }

    fn source_range(&self, service: u32, family: u8, addr: &[u8; 16]) -> u8 {
        let ip = addr_from(family, addr);
        longest(
            self.source_ranges
                .iter()
                .filter(|((s, _), _)| *s == service)
                .map(|((_, n), f)| (n, *f)),
            &ip,
        )
        .unwrap_or(0)
    }
}

impl ServiceEntries {
    /// The backends of a forward decision.
    pub fn backends_of(&self, first: u32, count: u16) -> Vec<SocketAddr> {
        self.backends
            .iter()
            .skip(first as usize)
            .take(usize::from(count))
            .map(|b| SocketAddr::new(addr_from(b.family, &b.addr), b.port))
            .collect()
    }
}

/// A packet of the service lookup from addresses.
pub fn service_packet(
    source: IpAddr,
    destination: IpAddr,
    protocol: Protocol,
    port: u16,
) -> ServicePacket {
    ServicePacket {
        family: family_code(&destination),
        source: addr_bytes(&source),
        destination: addr_bytes(&destination),
        protocol: protocol_code(protocol),
        port,
    }
}

/// The address filter's bits (word → bits to set): every frontend
/// address in the frontends' half, every backend address in the
/// backends' half (see [`ADDR_FILTER_BITS_LOG2`]). They are set, never
/// cleared: a backend gone from the table may still have connections.
pub fn filter_bits<'a>(
    frontends: impl IntoIterator<Item = &'a FrontendKey>,
    backends: impl IntoIterator<Item = &'a BackendValue>,
) -> BTreeMap<u32, u64> {
    let mut words = BTreeMap::new();
    let mut set = |(word, bit): (u32, u64)| *words.entry(word).or_insert(0) |= bit;
    for k in frontends {
        set(addr_filter_bit(FILTER_FRONTENDS, k.family, &k.addr));
    }
    for b in backends {
        set(addr_filter_bit(FILTER_BACKENDS, b.family, &b.addr));
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_services::topology::NodeTopology;
    use palisade_services::{Objects, ProxyConfig};
    use serde_json::json;

    fn table(family: Family, objects: &Objects) -> ServiceTable {
        let config = ProxyConfig {
            family,
            node: NodeTopology::new("node-a", &Default::default(), true),
            node_ips: vec!["192.168.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
            cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap(), "fd10::/64".parse().unwrap()],
            service_cidrs: vec![],
            masquerade_all: false,
            node_port_addresses: vec![],
        };
        ServiceTable::build(config, &objects.service_ports(family).unwrap())
    }

    fn slice(name: &str, kind: &str, addr: &str) -> serde_json::Value {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": name, "namespace": "default",
                            "labels": {"kubernetes.io/service-name": "api"}},
               "addressType": kind,
               "endpoints": [{"addresses": [addr], "conditions": {"ready": true}}],
               "ports": [{"name": "http", "port": 9090, "protocol": "TCP"}]})
    }

    /// The service ranges go into the configuration, where the programs
    /// rule an address out without the trie; more than it holds, and the
    /// flag says the programs must use the trie.
    #[test]
    fn service_ranges_are_in_the_configuration_while_they_fit() {
        let objects = Objects::from_documents(&[]).unwrap();
        let with = |cidrs: &[&str]| {
            let mut t = table(Family::V4, &objects);
            t.config.service_cidrs = cidrs.iter().map(|c| c.parse().unwrap()).collect();
            lower_service_tables(&[t], &ServiceCapacity::default()).unwrap()
        };
        let e = with(&["172.30.0.0/16", "fd30::/112"]);
        assert!(e.config.flags & CONFIG_RANGES_KNOWN != 0);
        let bytes = |ip: &str| {
            let ip: IpAddr = ip.parse().unwrap();
            (family_code(&ip), addr_bytes(&ip))
        };
        let inside = |ip: &str| {
            let (family, addr) = bytes(ip);
            e.config.ranges.iter().any(|r| r.contains(family, &addr))
        };
        assert!(inside("172.30.0.10") && inside("172.30.255.255") && inside("fd30::ffff"));
        assert!(!inside("172.31.0.1") && !inside("10.0.0.1") && !inside("fd30::1:0"));
        // An IPv4 range does not take an IPv6 address with the same first word.
        assert!(!inside("ac1e::1"));
        let e = with(&[
            "172.30.0.0/16",
            "172.31.0.0/16",
            "172.32.0.0/16",
            "172.33.0.0/16",
            "172.34.0.0/16",
        ]);
        assert_eq!(e.config.flags & CONFIG_RANGES_KNOWN, 0);
    }

    /// A dual-stack Service: each family's ClusterIP forwards to that
    /// family's endpoint, through one set of entries.
    #[test]
    fn both_families_lower_into_one_set_of_entries() {
        let docs = [
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "api", "namespace": "default"},
                   "spec": {"clusterIP": "172.30.0.10", "clusterIPs": ["172.30.0.10", "fd30::10"],
                            "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
            slice("api-v4", "IPv4", "10.20.0.5"),
            slice("api-v6", "IPv6", "fd10::5"),
        ];
        let objects = Objects::from_documents(&docs).unwrap();
        let tables = [table(Family::V4, &objects), table(Family::V6, &objects)];
        let entries = lower_service_tables(&tables, &ServiceCapacity::default()).unwrap();
        assert_eq!(entries.services.len(), 2);
        assert_ne!(entries.config.primary_v4, [0; 16]);
        assert_ne!(entries.config.primary_v6, [0; 16]);
        for (client, vip, backend) in [
            ("10.1.0.1", "172.30.0.10", "10.20.0.5"),
            ("fd10::1", "fd30::10", "fd10::5"),
        ] {
            let packet = service_packet(
                client.parse().unwrap(),
                vip.parse().unwrap(),
                Protocol::Tcp,
                80,
            );
            let ServiceAction::Forward { first, count, .. } = service_decide(&packet, &entries)
            else {
                panic!("{vip}: not forwarded");
            };
            assert_eq!(count, 1, "{vip}");
            let b = entries.backends[first as usize];
            let ip: IpAddr = backend.parse().unwrap();
            assert_eq!(
                (b.addr, b.port),
                (addr_bytes(&ip), 9090),
                "{vip} -> {backend}"
            );
        }
        // One family alone lowers as before.
        let v4 = lower_services(&tables[0], &ServiceCapacity::default()).unwrap();
        assert_eq!(v4.services.len(), 1);
        assert_eq!(v4.config.primary_v6, [0; 16]);

        // The address filter names every frontend and backend in its
        // half, and a client address in neither (these addresses do not
        // collide).
        let bits = filter_bits(entries.frontends.keys(), &entries.backends);
        let has = |half, ip: &str| {
            let ip: IpAddr = ip.parse().unwrap();
            let (word, bit) = addr_filter_bit(half, family_code(&ip), &addr_bytes(&ip));
            bits.get(&word).is_some_and(|w| w & bit != 0)
        };
        for vip in ["172.30.0.10", "fd30::10"] {
            assert!(
                has(FILTER_FRONTENDS, vip) && !has(FILTER_BACKENDS, vip),
                "{vip}"
            );
        }
        for backend in ["10.20.0.5", "fd10::5"] {
            assert!(
                has(FILTER_BACKENDS, backend) && !has(FILTER_FRONTENDS, backend),
                "{backend}"
            );
        }
        for client in ["10.1.0.1", "fd10::1"] {
            assert!(
                !has(FILTER_FRONTENDS, client) && !has(FILTER_BACKENDS, client),
                "{client}"
            );
        }
    }

    /// Services `api` (TCP 80, UDP 53, NodePort 30053) and `dns` (UDP 53
    /// only), both over endpoint 10.0.2.5 with the conditions given.
    fn two_services(api: serde_json::Value, dns: serde_json::Value) -> ServiceTable {
        let service = |name: &str, ip: &str, ports: serde_json::Value| {
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": name, "namespace": "default"},
                   "spec": {"type": "NodePort", "clusterIP": ip, "ports": ports}})
        };
        let slice = |name: &str, conditions: serde_json::Value| {
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": format!("{name}-1"), "namespace": "default",
                                "labels": {"kubernetes.io/service-name": name}},
                   "addressType": "IPv4",
                   "endpoints": [{"addresses": ["10.0.2.5"], "conditions": conditions}],
                   "ports": [{"name": "http", "port": 9090, "protocol": "TCP"},
                             {"name": "dns", "port": 5353, "protocol": "UDP"}]})
        };
        let objects = Objects::from_documents(&[
            service(
                "api",
                "172.30.0.10",
                json!([{"name": "http", "port": 80, "targetPort": 9090},
                       {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353,
                        "nodePort": 30053}]),
            ),
            service(
                "dns",
                "172.30.0.11",
                json!([{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]),
            ),
            slice("api", api),
            slice("dns", dns),
        ])
        .unwrap();
        table(Family::V4, &objects)
    }

    #[test]
    fn flows_keep_backends_by_protocol_and_service_and_a_grown_set_covers_the_old() {
        let ip = |s: &str| addr_bytes(&s.parse().unwrap());
        let (tcp, udp) = (Protocol::Tcp.number(), Protocol::Udp.number());
        let (http, dns) = (
            (ip("10.0.2.5"), 9090, FAMILY_V4),
            (ip("10.0.2.5"), 5353, FAMILY_V4),
        );
        let (api, other) = (
            (ip("172.30.0.10"), 53, FAMILY_V4),
            (ip("172.30.0.11"), 53, FAMILY_V4),
        );
        let node_port = (ip("192.168.0.2"), 30053, FAMILY_V4);
        let (ready, unready) = (json!({"ready": true}), json!({"ready": false}));
        let draining = json!({"ready": false, "serving": true, "terminating": true});
        let kept = |api: &serde_json::Value, dns: &serde_json::Value| {
            KeptBackends::of(&[two_services(api.clone(), dns.clone())])
        };

        let all = kept(&ready, &ready);
        assert!(all.keeps(tcp, None, &http));
        assert!(all.keeps(udp, Some(&api), &dns) && all.keeps(udp, Some(&other), &dns));
        assert!(all.keeps(udp, Some(&node_port), &dns), "by the NodePort");
        assert!(
            !all.keeps(udp, None, &dns),
            "a UDP flow of no known frontend"
        );
        // Unready for one Service only: that Service's UDP flows leave the
        // endpoint, the other's stay (kube-proxy cleans per Service).
        let half = kept(&ready, &unready);
        assert!(half.keeps(udp, Some(&api), &dns) && !half.keeps(udp, Some(&other), &dns));
        let none = kept(&unready, &unready);
        assert!(none.keeps(tcp, None, &http) && !none.keeps(udp, Some(&node_port), &dns));
        let drains = kept(&draining, &draining);
        assert!(drains.keeps(tcp, None, &http) && drains.keeps(udp, Some(&api), &dns));

        // Going unready drops a UDP backend: the table must be read; coming
        // back only adds one: nothing to forget.
        assert!(!half.covers(&all) && all.covers(&half));
        assert!(!none.covers(&half) && half.covers(&none));
        assert!(all.covers(&drains) && drains.covers(&all));
        let empty = KeptBackends::default();
        assert!(all.covers(&empty) && !empty.covers(&all));
    }

    #[test]
    fn a_flows_entries_are_forgotten_together_by_its_frontend() {
        let ip = |s: &str| addr_bytes(&s.parse().unwrap());
        let tuple = |src: &str, sp, dst: &str, dp| NatTuple {
            src: ip(src),
            dst: ip(dst),
            src_port: sp,
            dst_port: dp,
            protocol: Protocol::Udp.number(),
            family: FAMILY_V4,
            pad: 0,
        };
        let value = |src: &str, sp, dst: &str, dp, flags| NatValue {
            src: ip(src),
            dst: ip(dst),
            src_port: sp,
            dst_port: dp,
            flags,
            backend: 0,
            seen: 1,
        };
        // A masqueraded flow (an outside client) through `dns`'s ClusterIP
        // and a plain one through `api`'s, both to 10.0.2.5:5353.
        let (m, r, a) = (NAT_MASQUERADE, NAT_REPLY, NAT_AFTER_POLICY);
        let entries = [
            (
                tuple("192.168.9.1", 4000, "172.30.0.11", 53),
                value("192.168.9.1", 4000, "10.0.2.5", 5353, m),
            ),
            (
                tuple("192.168.9.1", 4000, "10.0.2.5", 5353),
                value("192.168.0.2", 33000, "10.0.2.5", 5353, m | a),
            ),
            (
                tuple("10.0.2.5", 5353, "192.168.0.2", 33000),
                value("10.0.2.5", 5353, "192.168.9.1", 4000, m | r),
            ),
            (
                tuple("10.0.2.5", 5353, "192.168.9.1", 4000),
                value("172.30.0.11", 53, "192.168.9.1", 4000, m | r | a),
            ),
            (
                tuple("10.0.1.9", 4001, "172.30.0.10", 53),
                value("10.0.1.9", 4001, "10.0.2.5", 5353, 0),
            ),
            (
                tuple("10.0.2.5", 5353, "10.0.1.9", 4001),
                value("172.30.0.10", 53, "10.0.1.9", 4001, r | a),
            ),
        ];
        let kept = KeptBackends::of(&[two_services(
            json!({"ready": true}),
            json!({"ready": false}),
        )]);
        let gone = kept.forgotten(&entries);
        assert_eq!(
            gone,
            entries[..4].iter().map(|(k, _)| *k).collect::<Vec<_>>()
        );
        let kept =
            KeptBackends::of(&[two_services(json!({"ready": true}), json!({"ready": true}))]);
        assert!(kept.forgotten(&entries).is_empty());
    }
}
