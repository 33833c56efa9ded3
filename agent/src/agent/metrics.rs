//! The agent's Prometheus metrics (text format on `/metrics`). Every name
//! starts with `palisade_`; the README lists them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// A map of the datapath.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    /// The map's short name (`nodes`, `slots`, `lpm4`, ...).
    pub map: String,
}

/// A datastore event type.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    /// `put` or `delete`.
    pub r#type: String,
}

/// A rule that denies.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabel {
    /// Tier (empty for profiles and the end of the chain).
    pub tier: String,
    /// Policy, profile, or `tier-default` / `no-profile-match`.
    pub policy: String,
    /// Rule index in its list (empty for defaults).
    pub rule: String,
}

/// A datapath statistic.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatisticLabel {
    /// Its name (`new_flows`, `established`, `malformed`, ...).
    pub statistic: String,
}

/// An IP pool and a state of its addresses.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolStateLabel {
    /// The pool's name.
    pub pool: String,
    /// `size`, `in_use` or `free`.
    pub state: String,
}

/// An IP pool.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    /// The pool's name.
    pub pool: String,
}

/// A node.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    /// The node's name.
    pub node: String,
}

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// 1 once the first complete sync is written and the datastore is connected.
    pub ready: Gauge,
    /// 1 while the datastore is connected and followed.
    pub datastore_connected: Gauge,
    /// The datastore revision applied last.
    pub datastore_revision: Gauge,
    /// Datastore changes received, by type.
    pub datastore_events: Family<EventLabel, Counter>,
    /// Times the datastore was lost and listed again.
    pub datastore_resyncs: Counter,
    /// Objects currently skipped because they do not convert.
    pub rejected_objects: Gauge,
    /// Changes skipped (objects that do not convert, changes refused).
    pub rejected_changes: Counter,
    /// Batches applied.
    pub batches: Counter,
    /// Compile + lower + write of one batch.
    pub apply_seconds: Histogram,
    /// From a batch's arrival at the agent to the maps holding it.
    pub update_latency_seconds: Histogram,
    /// Entries written per map.
    pub map_entries: Family<MapLabel, Gauge>,
    /// Capacity per map.
    pub map_capacity: Family<MapLabel, Gauge>,
    /// Tracked connections.
    pub conntrack_entries: Gauge,
    /// Conntrack capacity.
    pub conntrack_capacity: Gauge,
    /// Conntrack sweeps run.
    pub conntrack_sweeps: Counter,
    /// Connections the sweeps expired.
    pub conntrack_expired: Counter,
    /// New flows denied, by the rule that denied them.
    pub policy_drops: Family<RuleLabel, Counter>,
    /// Datapath statistics (packets).
    pub datapath_packets: Family<StatisticLabel, Counter>,
    /// Endpoints of this node attached to their interfaces.
    pub local_endpoints: Gauge,
    /// Local endpoints waiting for their interface.
    pub pending_interfaces: Gauge,
    /// Policies in force.
    pub policies: Gauge,
    /// The agent's CPU time (user + system).
    pub cpu_seconds: Gauge<f64, AtomicU64>,
    /// The agent's resident memory.
    pub resident_memory_bytes: Gauge,
    /// IP pool addresses: size, in use, free.
    pub ipam_pool_addresses: Family<PoolStateLabel, Gauge<i64>>,
    /// Allocation blocks per pool.
    pub ipam_pool_blocks: Family<PoolLabel, Gauge>,
    /// Allocation blocks affine to each node.
    pub ipam_node_blocks: Family<NodeLabel, Gauge>,
    /// IPAM reads that failed (the gauges keep their last values).
    pub ipam_errors: Counter,
    /// Leaked addresses garbage collection released.
    pub ipam_gc_released: Counter,
    /// Blocks of deleted nodes garbage collection released.
    pub ipam_gc_blocks_released: Counter,
    /// Overlay routes wanted (remote blocks, local blackholes).
    pub overlay_routes: Gauge,
    /// Remote nodes reached over VXLAN.
    pub overlay_remote_nodes: Gauge,
    /// Overlay passes that failed.
    pub overlay_errors: Counter,
    /// Service ports with a frontend on this node.
    pub services: Gauge,
    /// Endpoints the service table reaches (cluster and local sets).
    pub service_backends: Gauge,
    /// Translated connections' NAT entries (both directions).
    pub service_nat_entries: Gauge,
    /// NAT capacity (an LRU: the oldest go when full).
    pub service_nat_capacity: Gauge,
    /// ClientIP affinities held.
    pub service_affinity_entries: Gauge,
    /// Service documents skipped and tables refused.
    pub service_errors: Counter,
    /// Pods whose TCP the socket hooks balance at `connect()`.
    pub pods_balanced_at_connect: Gauge,
    /// Tables of kube-proxy's rules found on this node (it and Palisade
    /// must not both load-balance Services).
    pub kube_proxy_tables: Gauge,
    /// Programs another balancer put on the socket hooks' cgroup.
    pub foreign_socket_hooks: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric registered under the `palisade` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("palisade");
        let latency = || Histogram::new(exponential_buckets(0.000_05, 2.0, 18));
        let m = Metrics {
            registry: Registry::default(),
            ready: Gauge::default(),
            datastore_connected: Gauge::default(),
            datastore_revision: Gauge::default(),
            datastore_events: Family::default(),
            datastore_resyncs: Counter::default(),
            rejected_objects: Gauge::default(),
            rejected_changes: Counter::default(),
            batches: Counter::default(),
            apply_seconds: latency(),
            update_latency_seconds: latency(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            conntrack_entries: Gauge::default(),
            conntrack_capacity: Gauge::default(),
            conntrack_sweeps: Counter::default(),
            conntrack_expired: Counter::default(),
            policy_drops: Family::default(),
            datapath_packets: Family::default(),
            local_endpoints: Gauge::default(),
            pending_interfaces: Gauge::default(),
            policies: Gauge::default(),
            cpu_seconds: Gauge::default(),
            resident_memory_bytes: Gauge::default(),
            ipam_pool_addresses: Family::default(),
            ipam_pool_blocks: Family::default(),
            ipam_node_blocks: Family::default(),
            ipam_errors: Counter::default(),
            ipam_gc_released: Counter::default(),
            ipam_gc_blocks_released: Counter::default(),
            overlay_routes: Gauge::default(),
            overlay_remote_nodes: Gauge::default(),
            overlay_errors: Counter::default(),
            services: Gauge::default(),
            service_backends: Gauge::default(),
            service_nat_entries: Gauge::default(),
            service_nat_capacity: Gauge::default(),
            service_affinity_entries: Gauge::default(),
            service_errors: Counter::default(),
            pods_balanced_at_connect: Gauge::default(),
            kube_proxy_tables: Gauge::default(),
            foreign_socket_hooks: Gauge::default(),
        };
        macro_rules! register {
            ($($name:literal, $help:literal, $field:ident;)*) => {
                $(registry.register($name, $help, m.$field.clone());)*
            };
        }
        register! {
            "ready", "1 once the first complete sync is written and the datastore is connected", ready;
            "datastore_connected", "1 while the datastore is connected and followed", datastore_connected;
            "datastore_revision", "The datastore revision applied last", datastore_revision;
            "datastore_events", "Datastore changes received, by type", datastore_events;
            "datastore_resyncs", "Times the datastore was listed again after its watch was lost", datastore_resyncs;
            "rejected_objects", "Objects skipped because they do not convert (their last good version stays)", rejected_objects;
            "rejected_changes", "Changes skipped: objects that do not convert, changes the dataplane refused", rejected_changes;
            "batches", "Batches of datastore changes applied", batches;
            "apply_seconds", "Compile, lower and write of one batch", apply_seconds;
            "update_latency_seconds", "From a batch's arrival at the agent to the maps holding it", update_latency_seconds;
            "map_entries", "Entries written per datapath map", map_entries;
            "map_capacity", "Capacity per datapath map", map_capacity;
            "conntrack_entries", "Tracked connections", conntrack_entries;
            "conntrack_capacity", "Conntrack capacity", conntrack_capacity;
            "conntrack_sweeps", "Conntrack sweeps run", conntrack_sweeps;
            "conntrack_expired", "Connections the sweeps expired (tracked connections, and flows through Services past conntrack's timeouts)", conntrack_expired;
            "policy_drops", "New flows denied, by the rule that denied them", policy_drops;
            "datapath_packets", "Datapath statistics, in packets", datapath_packets;
            "local_endpoints", "Endpoints of this node attached to their interfaces", local_endpoints;
            "pending_interfaces", "Endpoints of this node waiting for their interface", pending_interfaces;
            "policies", "Policies in force", policies;
            "agent_cpu_seconds", "The agent's CPU time, user and system", cpu_seconds;
            "agent_resident_memory_bytes", "The agent's resident memory", resident_memory_bytes;
            "ipam_pool_addresses", "IP pool addresses by state: size, in_use, free (not reserved, in blocks or not)", ipam_pool_addresses;
            "ipam_pool_blocks", "Allocation blocks per IP pool", ipam_pool_blocks;
            "ipam_node_blocks", "Allocation blocks affine to each node", ipam_node_blocks;
            "ipam_errors", "IPAM reads that failed (the IPAM gauges keep their last values)", ipam_errors;
            "ipam_gc_released", "Leaked addresses (their pod or node gone) released by garbage collection", ipam_gc_released;
            "ipam_gc_blocks_released", "Blocks of deleted nodes released by garbage collection", ipam_gc_blocks_released;
            "overlay_routes", "Overlay routes wanted: remote blocks and local blackholes", overlay_routes;
            "overlay_remote_nodes", "Remote nodes reached over VXLAN (neighbour and FDB entries)", overlay_remote_nodes;
            "overlay_errors", "Overlay passes that failed (the next pass retries)", overlay_errors;
            "services", "Service ports with a frontend on this node", services;
            "service_backends", "Endpoints the service table reaches (cluster and local sets)", service_backends;
            "service_nat_entries", "NAT entries of translated connections (two per connection, four when masqueraded)", service_nat_entries;
            "service_nat_capacity", "NAT entry capacity (an LRU: the least recently used go when full)", service_nat_capacity;
            "service_affinity_entries", "ClientIP session affinities held", service_affinity_entries;
            "service_errors", "Service documents skipped and service tables refused", service_errors;
            "pods_balanced_at_connect", "Pods whose TCP connections to Services the socket hooks balance at connect() (--pod-connect-balancing tcp)", pods_balanced_at_connect;
            "kube_proxy_tables", "Tables of kube-proxy's rules on this node (nonzero: kube-proxy and Palisade both load-balance Services)", kube_proxy_tables;
            "foreign_socket_hooks", "Programs another balancer attached to the socket hooks' cgroup (nonzero: two balancers rewrite the node's connect() calls)", foreign_socket_hooks;
        }
        Metrics { registry, ..m }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// This process's CPU seconds (user + system) and resident bytes, from
/// /proc/self.
pub fn process_usage() -> Option<(f64, i64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after ')'.
    let cpu = (fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?) / ticks;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rss_kb: i64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((cpu, rss_kb * 1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exported_under_the_palisade_prefix() {
        let m = Metrics::new();
        m.datastore_events
            .get_or_create(&EventLabel {
                r#type: "put".into(),
            })
            .inc();
        m.map_entries
            .get_or_create(&MapLabel {
                map: "nodes".into(),
            })
            .set(3);
        let text = m.encode();
        for name in [
            "palisade_ready ",
            "palisade_datastore_events_total{type=\"put\"} 1",
            "palisade_map_entries{map=\"nodes\"} 3",
            "palisade_apply_seconds_bucket",
            "palisade_agent_cpu_seconds ",
            "palisade_conntrack_sweeps_total 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            assert!(line.starts_with("palisade_"), "{line}");
        }
    }

    #[test]
    fn process_usage_reads_this_process() {
        let (cpu, rss) = process_usage().unwrap();
        assert!(cpu >= 0.0 && rss > 0);
    }
}
