//! What the writer tells the outside: log lines, metrics and the status
//! after every batch and tick, read from the node's state and, for the
//! kernel dataplane, its counters.

use std::time::{Duration, Instant};

use palisade_controller::{AyaDataplane, Dataplane, MirrorDataplane};
use palisade_datastore::StoreChange;
use policy_bpf_common::{ADDR_FILTER_WORDS, Statistic};
use policy_core::compile::RuleRef;
use policy_core::model::Action;

use super::Shared;
use super::metrics::{EventLabel, MapLabel, RuleLabel, StatisticLabel};
use super::status::{ConntrackStatus, LocalEndpointStatus, MapFill, ServiceStatus};
use super::sync::{NodeSync, Outcome, Problem};

/// The dataplane's counters, where it has them (the kernel does; memory
/// does not).
pub trait Telemetry {
    /// Tracked connections.
    fn conntrack_len(&self) -> Option<usize> {
        None
    }
    /// New flows that ended at rule `index`.
    fn rule_packets(&self, _index: u32) -> Option<u64> {
        None
    }
    /// Datapath statistics.
    fn statistics(&self) -> Option<Vec<(Statistic, u64)>> {
        None
    }
    /// NAT entries and ClientIP affinities held.
    fn service_state_len(&self) -> Option<(usize, usize)> {
        None
    }
    /// Bits of the service address filter set.
    fn service_filter_bits(&self) -> Option<usize> {
        None
    }
}

impl Telemetry for MirrorDataplane {}

impl Telemetry for AyaDataplane {
    fn conntrack_len(&self) -> Option<usize> {
        self.datapath().map(|d| d.conntrack_len())
    }
    fn rule_packets(&self, index: u32) -> Option<u64> {
        self.datapath()?.counter(index).ok().map(|c| c.packets)
    }
    fn service_state_len(&self) -> Option<(usize, usize)> {
        AyaDataplane::service_state_len(self)
    }
    fn service_filter_bits(&self) -> Option<usize> {
        self.datapath().map(|d| d.service_filter_bits())
    }
    fn statistics(&self) -> Option<Vec<(Statistic, u64)>> {
        let stats = self.datapath()?.stats().ok()?;
        Some(
            Statistic::ALL
                .iter()
                .map(|s| (*s, stats[s.code() as usize]))
                .collect(),
        )
    }
}

pub(super) fn count_events(shared: &Shared, changes: &[StoreChange]) {
    for c in changes {
        let kind = match c {
            StoreChange::Put(_) => "put",
            StoreChange::Deleted { .. } => "delete",
        };
        shared
            .metrics
            .datastore_events
            .get_or_create(&EventLabel {
                r#type: kind.into(),
            })
            .inc();
    }
}

/// The kernel counters as last read: counters advance by what they grew.
#[derive(Debug, Default)]
pub(super) struct Seen {
    drops: std::collections::HashMap<u32, u64>,
    stats: [u64; Statistic::COUNT as usize],
    /// NAT entries and affinities last counted, and when.
    service_state: Option<((usize, usize), std::time::Instant)>,
}

/// Counting the NAT table reads it from user space (a 262,144-entry table
/// full, in batches: about 95 ms here): a large one is counted this often,
/// not with every publish (each second).
const LARGE_STATE_RECOUNT: std::time::Duration = std::time::Duration::from_secs(10);
/// NAT entries and affinities below which they are counted with every
/// publish (a walk of a few milliseconds).
const SMALL_STATE: usize = 16_384;

impl Seen {
    /// The NAT entries and affinities, counted again when the last count
    /// was small or is old.
    fn service_state_len(&mut self, dataplane: &impl Telemetry) -> (usize, usize) {
        if let Some((counted @ (nat, affinities), at)) = self.service_state
            && nat + affinities >= SMALL_STATE
            && at.elapsed() < LARGE_STATE_RECOUNT
        {
            return counted;
        }
        let counted = dataplane.service_state_len().unwrap_or((0, 0));
        self.service_state = Some((counted, std::time::Instant::now()));
        counted
    }
}

/// The host side's settings on an interface just attached (pods wired by
/// an older plugin lack them); a failure is logged, the attach stands.
pub(super) fn settle_host_side(ifname: &str) {
    if let Err(e) = palisade_network::pod::settle_host_side(ifname) {
        tracing::warn!(interface = %ifname, error = %e, "host-side settings of an attached interface");
    }
}

/// Logs and counts what an update did, and refreshes the status.
pub(super) fn report<D: Dataplane + Telemetry>(
    node: &NodeSync<D>,
    shared: &Shared,
    out: &Outcome,
    arrived: Instant,
    took: Duration,
) {
    let m = &shared.metrics;
    m.batches.inc();
    m.apply_seconds.observe(took.as_secs_f64());
    m.update_latency_seconds
        .observe(arrived.elapsed().as_secs_f64());
    m.datastore_revision.set(node.revision() as i64);
    for p in &out.rejected {
        tracing::error!(object = %p.object, revision = p.revision, error = %p.message, "skipped an object that does not convert; its last good version stays in force");
    }
    for p in &out.refused {
        tracing::error!(object = %p.object, revision = p.revision, error = %p.message, "the dataplane refused a change; the rest of the batch is applied");
    }
    for i in &out.attached {
        tracing::info!(interface = %i, "attached");
        settle_host_side(i);
    }
    for i in &out.detached {
        tracing::info!(interface = %i, "detached");
    }
    m.rejected_changes
        .inc_by((out.rejected.len() + out.refused.len()) as u64);
    let mut s = shared.status();
    for p in out.rejected.iter().chain(&out.refused) {
        s.record(p.clone());
    }
}

/// Refreshes the status and the gauges from the node's state; counters
/// read from the kernel advance by what they grew since last `seen`.
pub(super) fn publish<D: Dataplane + Telemetry>(
    node: &NodeSync<D>,
    shared: &Shared,
    seen: &mut Seen,
) {
    let c = node.controller();
    let lowering = c.lowering();
    let cap = lowering.capacity();
    let mirror = lowering.mirror();
    let maps = [
        ("nodes", mirror.nodes.len(), cap.nodes),
        ("slots", mirror.slots.len(), cap.slots),
        ("interfaces", mirror.interfaces.len(), cap.interfaces),
        ("lpm4", mirror.lpm4.len(), cap.lpm4),
        ("lpm6", mirror.lpm6.len(), cap.lpm6),
        ("identities", mirror.identities.len(), cap.identities),
        ("classes", mirror.classes.len(), cap.classes),
        ("rules", lowering.rules().count(), cap.rules),
    ];
    let m = &shared.metrics;
    let mut fill = Vec::new();
    let dataplane = c.dataplane();
    // The service maps, once a table was written.
    let services = dataplane.services();
    let service_maps = services.map(|e| {
        let s = &cap.services;
        [
            ("svc_frontends", e.frontends.len(), s.frontends),
            ("svc_backends", e.backends.len(), s.backends),
            ("svc_addresses", e.addresses.len(), s.addresses),
            ("svc_source_ranges", e.source_ranges.len(), s.source_ranges),
            // Its bits, not entries: the more are set, the more packets
            // not balanced take the lookups it saves them.
            (
                "svc_filter",
                dataplane.service_filter_bits().unwrap_or(0),
                64 * ADDR_FILTER_WORDS as usize,
            ),
        ]
    });
    let maps = maps.into_iter().chain(
        service_maps
            .into_iter()
            .flatten()
            .map(|(n, e, c)| (n, e, u32::try_from(c).unwrap_or(u32::MAX))),
    );
    m.service_nat_capacity.set(cap.services.nat as i64);
    let (nat, affinities) = seen.service_state_len(dataplane);
    m.service_nat_entries.set(nat as i64);
    m.service_affinity_entries.set(affinities as i64);
    let service_status = services.map(|e| {
        m.services.set(e.services.len() as i64);
        m.service_backends.set(e.backends.len() as i64);
        ServiceStatus {
            ports: e.services.len(),
            frontends: e.frontends.len(),
            backends: e.backends.len(),
            nat_entries: nat as u64,
            nat_capacity: cap.services.nat as u64,
            affinities: affinities as u64,
        }
    });
    for (name, entries, capacity) in maps {
        let label = MapLabel { map: name.into() };
        m.map_entries.get_or_create(&label).set(entries as i64);
        m.map_capacity
            .get_or_create(&label)
            .set(i64::from(capacity));
        fill.push(MapFill {
            map: name.into(),
            entries: entries as u64,
            capacity: u64::from(capacity),
        });
    }
    let conntrack = dataplane.conntrack_len().unwrap_or(0) as u64;
    m.conntrack_entries.set(conntrack as i64);
    m.conntrack_capacity.set(i64::from(cap.conntrack));
    for (index, rule) in lowering.rules() {
        let label = match rule {
            RuleRef::Policy {
                tier,
                policy,
                index: i,
                action,
                ..
            } if *action == Action::Deny => RuleLabel {
                tier: tier.clone(),
                policy: policy.to_string(),
                rule: i.to_string(),
            },
            RuleRef::TierDefault { tier } => RuleLabel {
                tier: tier.clone(),
                policy: "tier-default".into(),
                rule: String::new(),
            },
            RuleRef::NoProfileMatch => RuleLabel {
                tier: String::new(),
                policy: "no-profile-match".into(),
                rule: String::new(),
            },
            _ => continue,
        };
        let Some(now) = dataplane.rule_packets(*index) else {
            continue;
        };
        let last = seen.drops.entry(*index).or_insert(0);
        // A rule index reused by another rule starts again from its count.
        let grown = now.checked_sub(*last).unwrap_or(now);
        *last = now;
        if grown > 0 {
            m.policy_drops.get_or_create(&label).inc_by(grown);
        }
    }
    if let Some(stats) = dataplane.statistics() {
        for (s, now) in stats {
            let i = s.code() as usize;
            let grown = now.saturating_sub(seen.stats[i]);
            seen.stats[i] = now;
            m.datapath_packets
                .get_or_create(&StatisticLabel {
                    statistic: format!("{s:?}"),
                })
                .inc_by(grown);
        }
    }
    let cluster = c.compiler().cluster();
    let mut endpoints: Vec<LocalEndpointStatus> = node
        .view()
        .bindings()
        .iter()
        .map(|(iface, key)| LocalEndpointStatus {
            endpoint: key.to_string(),
            interface: iface.clone(),
            state: match node.pending().get(iface) {
                Some((_, why)) => format!("waiting: {why}"),
                None if c.interfaces().contains_key(iface) => "attached".into(),
                None => "not attached".into(),
            },
        })
        .collect();
    endpoints.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
    m.local_endpoints
        .set(endpoints.iter().filter(|e| e.state == "attached").count() as i64);
    m.pending_interfaces.set(node.pending().len() as i64);
    let policies = cluster.policies().count();
    m.policies.set(policies as i64);
    let rejected: Vec<Problem> = node
        .view()
        .rejected()
        .map(|r| Problem {
            revision: r.revision,
            object: r.key.clone(),
            message: r.errors.clone(),
        })
        .collect();
    m.rejected_objects.set(rejected.len() as i64);
    let mut s = shared.status();
    // Last: a reader that sees the revision sees everything it brought.
    s.revision = node.revision();
    s.endpoints = endpoints;
    s.known_endpoints = cluster.endpoints().count();
    s.policies = policies;
    s.maps = fill;
    s.services = service_status;
    s.conntrack = ConntrackStatus {
        entries: conntrack,
        capacity: u64::from(cap.conntrack),
        sweeps: m.conntrack_sweeps.get(),
        expired: m.conntrack_expired.get(),
    };
    s.rejected = rejected;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table of a fixed size that counts how often it was walked.
    struct Table {
        len: (usize, usize),
        walks: std::cell::Cell<usize>,
    }

    impl Telemetry for Table {
        fn service_state_len(&self) -> Option<(usize, usize)> {
            self.walks.set(self.walks.get() + 1);
            Some(self.len)
        }
    }

    #[test]
    fn a_small_nat_table_is_counted_with_every_publish_a_large_one_less_often() {
        let small = Table {
            len: (100, 2),
            walks: 0.into(),
        };
        let mut seen = Seen::default();
        for _ in 0..3 {
            assert_eq!(seen.service_state_len(&small), (100, 2));
        }
        assert_eq!(small.walks.get(), 3);

        let large = Table {
            len: (200_000, 10),
            walks: 0.into(),
        };
        let mut seen = Seen::default();
        for _ in 0..3 {
            assert_eq!(seen.service_state_len(&large), (200_000, 10));
        }
        assert_eq!(large.walks.get(), 1, "counted again only after a while");
    }
}
