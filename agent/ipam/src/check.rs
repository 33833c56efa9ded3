//! Consistency of IPAM's records, as `palisade ipam check` reports it and
//! the concurrency and crash tests assert it: every finding names the
//! record and what to do about it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::assign::AffinityOf;
use crate::block::Block;
use crate::cluster::Cluster;
use crate::records::{Handle, Records};
use crate::store::StoreError;

/// One inconsistency or leak.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Finding {
    /// Two blocks cover the same addresses: a block claimed twice.
    OverlappingBlocks(IpNet, IpNet),
    /// An affinity record whose block is missing or affine elsewhere.
    StaleAffinity {
        /// The host the record names.
        host: String,
        /// The block.
        block: IpNet,
    },
    /// A block affine to a host that has no affinity record for it.
    MissingAffinity {
        /// The host.
        host: String,
        /// The block.
        block: IpNet,
    },
    /// A block affine to a node that no longer exists.
    DeletedNode {
        /// The node.
        host: String,
        /// The block.
        block: IpNet,
        /// Addresses still allocated in it.
        in_use: usize,
    },
    /// A block no pool holds.
    OrphanedBlock(IpNet),
    /// A handle's count for a block differs from the block's addresses.
    HandleCount {
        /// The handle.
        handle: String,
        /// The block.
        block: IpNet,
        /// What the handle says.
        recorded: usize,
        /// What the block holds.
        actual: usize,
    },
    /// An address whose owner is gone (its handle is not live).
    Leaked {
        /// The address.
        ip: IpAddr,
        /// Its handle.
        handle: String,
    },
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::OverlappingBlocks(a, b) => {
                write!(
                    f,
                    "blocks {a} and {b} overlap: addresses may be held twice; release one by hand"
                )
            }
            Finding::StaleAffinity { host, block } => {
                write!(
                    f,
                    "affinity of {host} for {block} has no matching block; gc deletes it"
                )
            }
            Finding::MissingAffinity { host, block } => {
                write!(
                    f,
                    "block {block} is affine to {host} but the host has no affinity record; gc restores it"
                )
            }
            Finding::DeletedNode {
                host,
                block,
                in_use,
            } => write!(
                f,
                "block {block} is affine to deleted node {host} ({in_use} addresses in use); gc releases it once empty"
            ),
            Finding::OrphanedBlock(b) => write!(f, "block {b} is in no IP pool (pool deleted?)"),
            Finding::HandleCount {
                handle,
                block,
                recorded,
                actual,
            } => write!(
                f,
                "handle {handle} counts {recorded} addresses in {block}, the block holds {actual}; gc corrects it"
            ),
            Finding::Leaked { ip, handle } => {
                write!(
                    f,
                    "{ip} (handle {handle}) belongs to nothing live; gc releases it after the grace period"
                )
            }
        }
    }
}

/// What a check found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Findings, sorted.
    pub findings: Vec<Finding>,
    /// Addresses allocated, and their handles.
    pub allocated: BTreeMap<IpAddr, Option<String>>,
    /// Blocks read.
    pub blocks: usize,
}

/// Checks the records against the cluster; `live` names the handles whose
/// owners exist (None: leaks are not judged).
pub fn check(
    records: Records<'_>,
    cluster: &Cluster,
    live: Option<&BTreeSet<String>>,
) -> Result<Report, StoreError> {
    let blocks: Vec<Block> = records.blocks(None)?.into_iter().map(|(b, _)| b).collect();
    let affinities = records.affinities()?;
    let handles: BTreeMap<String, Handle> = records.handles()?.into_iter().collect();
    let mut report = Report {
        blocks: blocks.len(),
        ..Report::default()
    };
    let mut out = BTreeSet::new();
    let mut sorted: Vec<IpNet> = blocks.iter().map(Block::cidr).collect();
    sorted.sort();
    for w in sorted.windows(2) {
        if w[0].contains(&w[1].network()) || w[1].contains(&w[0].network()) {
            out.insert(Finding::OverlappingBlocks(w[0], w[1]));
        }
    }
    let by_cidr: BTreeMap<IpNet, &Block> = blocks.iter().map(|b| (b.cidr(), b)).collect();
    let recorded: BTreeSet<(String, IpNet)> =
        affinities.iter().map(|(h, c, _)| (h.clone(), *c)).collect();
    for (host, cidr, _) in &affinities {
        let matches = by_cidr
            .get(cidr)
            .and_then(|b| b.affinity.as_deref())
            .and_then(AffinityOf::host_of)
            == Some(host.as_str());
        if !matches {
            out.insert(Finding::StaleAffinity {
                host: host.clone(),
                block: *cidr,
            });
        }
    }
    let mut per_handle: BTreeMap<(String, IpNet), usize> = BTreeMap::new();
    for b in &blocks {
        let cidr = b.cidr();
        if cluster.any_pool_for(cidr.network()).is_none() {
            out.insert(Finding::OrphanedBlock(cidr));
        }
        if let Some(text) = &b.affinity
            && let Some(host) = AffinityOf::host_of(text)
        {
            if !recorded.contains(&(host.to_string(), cidr)) {
                out.insert(Finding::MissingAffinity {
                    host: host.to_string(),
                    block: cidr,
                });
            }
            let virtual_node = text.starts_with("virtual:");
            if !virtual_node && !cluster.nodes.contains_key(host) {
                out.insert(Finding::DeletedNode {
                    host: host.to_string(),
                    block: cidr,
                    in_use: b.in_use(),
                });
            }
        }
        for (ip, attr) in b.allocated() {
            report.allocated.insert(ip, attr.handle.clone());
            if let Some(h) = &attr.handle {
                *per_handle.entry((h.clone(), cidr)).or_insert(0) += 1;
                if live.is_some_and(|l| !l.contains(h)) {
                    out.insert(Finding::Leaked {
                        ip,
                        handle: h.clone(),
                    });
                }
            }
        }
    }
    for (id, h) in &handles {
        for (cidr, n) in &h.block {
            let Ok(block) = cidr.parse::<IpNet>() else {
                continue;
            };
            let actual = per_handle.get(&(id.clone(), block)).copied().unwrap_or(0);
            if actual != *n {
                out.insert(Finding::HandleCount {
                    handle: id.clone(),
                    block,
                    recorded: *n,
                    actual,
                });
            }
        }
    }
    for ((id, block), actual) in &per_handle {
        let recorded = handles
            .get(id)
            .and_then(|h| h.block.get(&block.to_string()))
            .copied();
        if recorded.is_none() {
            out.insert(Finding::HandleCount {
                handle: id.clone(),
                block: *block,
                recorded: 0,
                actual: *actual,
            });
        }
    }
    report.findings = out.into_iter().collect();
    Ok(report)
}
