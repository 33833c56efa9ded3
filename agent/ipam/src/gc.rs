//! Garbage collection as Calico's kube-controllers do it: addresses whose
//! owner (the pod, or the node of a tunnel address) no longer exists are
//! released once older than a grace period (the pod may not be in the
//! datastore yet); blocks affine to deleted nodes are released once empty;
//! handle counts and affinity records are mended to what the blocks hold.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::assign::AffinityOf;
use crate::block::Release;
use crate::check::{Finding, Report, check};
use crate::cluster::Labels;
use crate::error::IpamError;
use crate::ipam::{Ipam, RETRIES};
use crate::records;
use crate::store::StoreError;

/// Attribute keys Calico stores with an allocation.
pub const ATTR_NAMESPACE: &str = "namespace";
/// The pod.
pub const ATTR_POD: &str = "pod";
/// The node (tunnel addresses).
pub const ATTR_NODE: &str = "node";
/// When the address was allocated (RFC 3339).
pub const ATTR_TIMESTAMP: &str = "timestamp";

/// What exists: pods by (namespace, name) and nodes by name.
#[derive(Debug, Clone, Default)]
pub struct Live {
    /// Pods.
    pub pods: BTreeSet<(String, String)>,
    /// Nodes.
    pub nodes: BTreeSet<String>,
}

impl Live {
    /// Whether the owner named by an allocation's attributes exists; None
    /// when they name no owner (such addresses are never collected).
    pub fn owns(&self, attrs: &Labels) -> Option<bool> {
        match (attrs.get(ATTR_NAMESPACE), attrs.get(ATTR_POD)) {
            (Some(ns), Some(pod)) => Some(self.pods.contains(&(ns.clone(), pod.clone()))),
            _ => attrs.get(ATTR_NODE).map(|n| self.nodes.contains(n)),
        }
    }
}

/// Handles whose addresses all have a live (or unknown) owner.
pub fn live_handles(ipam: &Ipam<'_>, live: &Live) -> Result<BTreeSet<String>, StoreError> {
    let mut alive = BTreeSet::new();
    let mut dead = BTreeSet::new();
    for (b, _) in ipam.records().blocks(None)? {
        for (_, a) in b.allocated() {
            let Some(h) = &a.handle else { continue };
            match live.owns(&a.attrs) {
                Some(false) => dead.insert(h.clone()),
                _ => alive.insert(h.clone()),
            };
        }
    }
    Ok(alive.difference(&dead).cloned().collect())
}

/// What a collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collected {
    /// Leaked addresses released.
    pub released: usize,
    /// Leaked addresses kept because they are younger than the grace period.
    pub waiting: usize,
    /// Handle records rewritten.
    pub handles_mended: usize,
    /// Affinity records deleted or restored.
    pub affinities_mended: usize,
    /// Blocks of deleted nodes released.
    pub blocks_released: usize,
}

fn age(attrs: &Labels, now: Duration) -> Option<Duration> {
    let t = crate::time::parse_rfc3339(attrs.get(ATTR_TIMESTAMP)?).ok()?;
    Some(now.saturating_sub(Duration::from_secs(t)))
}

impl Ipam<'_> {
    /// One collection pass (see the module documentation); the report it
    /// acted on.
    pub fn collect(&self, live: &Live, grace: Duration) -> Result<(Collected, Report), IpamError> {
        let handles = live_handles(self, live)?;
        let report = check(self.records(), self.cluster, Some(&handles))?;
        let mut done = Collected::default();
        let now = self.env.now();
        // Leaked addresses, by block read once for their ages.
        let mut leaked: Vec<Release> = Vec::new();
        let blocks: BTreeMap<_, _> = self
            .records()
            .blocks(None)?
            .into_iter()
            .map(|(b, _)| (b.cidr(), b))
            .collect();
        for f in &report.findings {
            if let Finding::Leaked { ip, handle } = f {
                let attrs = blocks
                    .values()
                    .find(|b| b.cidr().contains(ip))
                    .and_then(|b| b.allocation(*ip))
                    .map(|a| a.attrs.clone())
                    .unwrap_or_default();
                // The owner must be gone (not merely unknown) and the
                // address old enough; no timestamp counts as old.
                if live.owns(&attrs) != Some(false) {
                    continue;
                }
                if age(&attrs, now).is_some_and(|a| a < grace) {
                    done.waiting += 1;
                    continue;
                }
                leaked.push(Release {
                    address: *ip,
                    handle: Some(handle.clone()),
                    sequence: None,
                });
            }
        }
        if !leaked.is_empty() {
            let out = self.release_ips(&leaked)?;
            done.released = leaked.len() - out.unallocated.len();
        }
        // Mend what the release did not already.
        let report = check(self.records(), self.cluster, None)?;
        for f in &report.findings {
            match f {
                Finding::HandleCount { handle, .. } if self.mend_handle(handle)? => {
                    done.handles_mended += 1;
                }
                Finding::StaleAffinity { host, block } => {
                    if let Some(rev) = self.records().affinity(host, block)? {
                        let w = records::delete_affinity(host, block, rev);
                        match self.store.commit(&[w]) {
                            Ok(()) => done.affinities_mended += 1,
                            Err(StoreError::Conflict { .. }) => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                Finding::MissingAffinity { host, block } => {
                    let w = records::put_affinity(host, block, None);
                    match self.store.commit(&[w]) {
                        Ok(()) => done.affinities_mended += 1,
                        Err(StoreError::Conflict { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Finding::DeletedNode { host, block, .. } => {
                    let owner = AffinityOf {
                        host: host.clone(),
                        text: format!("host:{host}"),
                    };
                    match self.release_block_affinity(&owner, block, true, None) {
                        Ok(()) => done.blocks_released += 1,
                        Err(IpamError::BlockNotEmpty(_))
                        | Err(IpamError::ClaimConflict(_))
                        | Err(IpamError::ResourceDoesNotExist { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                _ => {}
            }
        }
        Ok((done, report))
    }

    /// Rewrites a handle's counts to what the blocks hold (deleting it
    /// when they hold nothing); whether it changed anything.
    fn mend_handle(&self, id: &str) -> Result<bool, IpamError> {
        for _ in 0..RETRIES {
            let mut actual: BTreeMap<String, usize> = BTreeMap::new();
            for (b, _) in self.records().blocks(None)? {
                let n = b.ips_by_handle(id).len();
                if n > 0 {
                    actual.insert(b.cidr().to_string(), n);
                }
            }
            let current = self.records().handle(id)?;
            let revision = current.as_ref().map(|(_, r)| *r);
            if current.as_ref().map(|(h, _)| &h.block) == Some(&actual) {
                return Ok(false);
            }
            let handle = records::Handle {
                block: actual,
                deleted: false,
            };
            let Some(w) = records::write_handle(id, &handle, revision) else {
                return Ok(false);
            };
            match self.store.commit(&[w]) {
                Ok(()) => return Ok(true),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(IpamError::TooManyConflicts)
    }
}
