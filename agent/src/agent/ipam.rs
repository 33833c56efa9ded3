//! Pool headroom for Prometheus, because when a pool runs out every new pod
//! fails: per pool its size, addresses in use and free, and its blocks;
//! per node its blocks. The writer keeps the IPAM objects it is fed (pools,
//! reservations, nodes) in [`IpamView`]; a thread reads the IPAM records
//! every `--ipam-metrics-seconds` and sets the gauges.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_datastore::{Snapshot, StoreChange, StoredObject, SystemEnv, kinds, resources};
use palisade_ipam::{Cluster, Ipam};

use super::Shared;
use super::metrics::{NodeLabel, PoolLabel, PoolStateLabel};
use crate::store_cmd::StoreArgs;

/// The IPAM objects of the datastore, as the writer last saw them.
#[derive(Debug, Default)]
pub struct IpamView {
    objects: Mutex<BTreeMap<String, StoredObject>>,
}

fn is_ipam(o: &StoredObject) -> bool {
    kinds::document_ref(&o.document).is_some_and(|(info, _)| !info.policy)
}

impl IpamView {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, StoredObject>> {
        // A map of documents is whole whatever a panicking holder did.
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A complete listing replaces what was seen.
    pub fn listing(&self, snapshot: &Snapshot) {
        *self.lock() = snapshot
            .objects
            .iter()
            .filter(|o| is_ipam(o))
            .map(|o| (o.key.clone(), o.clone()))
            .collect();
    }

    /// Changes after it.
    pub fn changes(&self, changes: &[StoreChange]) {
        let mut g = self.lock();
        for c in changes {
            match c {
                StoreChange::Put(o) if is_ipam(o) => {
                    g.insert(o.key.clone(), o.clone());
                }
                StoreChange::Put(_) => {}
                StoreChange::Deleted { key, .. } => {
                    g.remove(key);
                }
            }
        }
    }

    /// The cluster IPAM reads.
    pub fn cluster(&self) -> Cluster {
        resources::cluster(self.lock().values())
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

/// Starts the thread that refreshes the IPAM gauges every `every`; a store
/// that cannot be opened or read is retried next time (and counted).
pub fn spawn(store: StoreArgs, every: Duration, shared: Arc<Shared>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("ipam-metrics".into())
        .spawn(move || {
            let mut records = None;
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
                    if let Err(e) = refresh(&Ipam::new(r.as_ref(), &cluster, &env), &shared) {
                        shared.metrics.ipam_errors.inc();
                        tracing::warn!(error = %e, "IPAM metrics");
                    }
                }
                std::thread::sleep(every);
            }
        })
        .map(|_| ())
}
