//! Giving back: ReleaseIPs, ReleaseByHandle, the affinity calls
//! (ClaimAffinity, ReleaseAffinity, ReleaseBlockAffinity,
//! ReleaseHostAffinities, RemoveIPAMHost) and GetUtilization.
//!
//! A block write and its handle changes are one commit; a block left empty
//! with no affinity is deleted; a block whose pool no longer selects its
//! host loses its affinity once empty.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::assign::AffinityOf;
use crate::block::{Block, Release, block_size};
use crate::error::IpamError;
use crate::ipam::{Ipam, RETRIES};
use crate::pool::Use;
use crate::records;
use crate::store::{Revision, StoreError, Write};

/// What ReleaseIPs did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReleaseOutcome {
    /// Addresses that were not allocated.
    pub unallocated: Vec<IpAddr>,
    /// Request items of blocks that did not fail (Calico's second result).
    pub released: usize,
    /// The first error (a block whose release was refused).
    pub error: Option<IpamError>,
}

/// Use of one block (Calico's `BlockUtilization`, with reservations).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockUse {
    /// The block.
    pub cidr: IpNet,
    /// The host it is affine to.
    pub host: Option<String>,
    /// Addresses.
    pub capacity: u128,
    /// Allocated (host reservations included).
    pub in_use: u128,
    /// Under an IPReservation, allocated or not.
    pub reserved: u128,
    /// Free and not reserved.
    pub available: u128,
}

/// Use of one pool (Calico's `PoolUtilization`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolUse {
    /// The pool's name (or `orphaned allocation blocks`).
    pub name: String,
    /// Its range.
    pub cidr: IpNet,
    /// Addresses in the pool.
    pub capacity: u128,
    /// Allocated, in all its blocks.
    pub in_use: u128,
    /// Under reservations.
    pub reserved: u128,
    /// Free, not reserved, in blocks or not yet in any block.
    pub available: u128,
    /// Its blocks.
    pub blocks: Vec<BlockUse>,
}

fn net_size(net: &IpNet) -> u128 {
    let bits = u32::from(net.max_prefix_len() - net.prefix_len());
    1u128.checked_shl(bits).unwrap_or(u128::MAX)
}

/// Addresses of `within` covered by `nets` (overlaps counted once).
fn covered(within: &IpNet, nets: &[IpNet]) -> u128 {
    let mut parts: Vec<IpNet> = nets
        .iter()
        .filter_map(|r| {
            if within.contains(r) {
                Some(*r)
            } else if r.contains(within) {
                Some(*within)
            } else {
                None
            }
        })
        .collect();
    parts.sort();
    // Prefixes either nest or are disjoint: drop the nested ones.
    let mut kept: Vec<IpNet> = Vec::new();
    for p in parts {
        if !kept.iter().any(|k| k.contains(&p)) {
            kept.retain(|k| !p.contains(k));
            kept.push(p);
        }
    }
    kept.iter().map(net_size).sum()
}

/// What [`Ipam::claim_affinity`] did with a CIDR's blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AffinityClaims {
    /// Blocks now affine to the host (already its, or claimed now).
    pub claimed: Vec<IpNet>,
    /// Blocks held by another host, or by none.
    pub failed: Vec<IpNet>,
    /// The error that stopped it: as Calico, the blocks handled before it
    /// are still reported (none when the CIDR is refused up front).
    pub error: Option<IpamError>,
}

impl Ipam<'_> {
    /// Calico's `ReleaseIPs`.
    pub fn release_ips(&self, requests: &[Release]) -> Result<ReleaseOutcome, IpamError> {
        let mut out = ReleaseOutcome::default();
        let mut by_block: BTreeMap<IpNet, Vec<Release>> = BTreeMap::new();
        let mut all_blocks: Option<Vec<IpNet>> = None;
        for r in requests {
            let cidr = match self.cluster.any_pool_for(r.address) {
                Some(pool) => pool.block_of(r.address),
                None => {
                    // Outside every pool (deleted pool): look among the
                    // blocks that exist.
                    if all_blocks.is_none() {
                        all_blocks = Some(
                            self.records()
                                .blocks(None)?
                                .into_iter()
                                .map(|(b, _)| b.cidr())
                                .collect(),
                        );
                    }
                    all_blocks
                        .as_ref()
                        .and_then(|v| v.iter().find(|c| c.contains(&r.address)).copied())
                }
            };
            match cidr {
                Some(c) => by_block.entry(c).or_default().push(r.clone()),
                None => out.unallocated.push(r.address),
            }
        }
        for (cidr, reqs) in by_block {
            match self.release_from_block(&cidr, &reqs) {
                Ok(unallocated) => {
                    out.unallocated.extend(unallocated);
                    out.released += reqs.len();
                }
                Err(e @ IpamError::Store(StoreError::Unavailable(_))) => return Err(e),
                Err(e) => {
                    if out.error.is_none() {
                        out.error = Some(e);
                    }
                }
            }
        }
        Ok(out)
    }

    fn release_from_block(&self, cidr: &IpNet, reqs: &[Release]) -> Result<Vec<IpAddr>, IpamError> {
        for _ in 0..RETRIES {
            let Some((mut block, revision)) = self.records().block(cidr)? else {
                return Ok(reqs.iter().map(|r| r.address).collect());
            };
            let released = block.release(reqs).map_err(|e| match e {
                crate::block::BlockError::Conflict { address, reason } => {
                    IpamError::ReleaseConflict { address, reason }
                }
                other => IpamError::ResourceDoesNotExist {
                    ip: cidr.to_string(),
                    reason: other.to_string(),
                },
            })?;
            if released.count == 0 {
                return Ok(released.unallocated);
            }
            let mut writes = vec![self.write_or_drop(&mut block, revision)];
            for (h, n) in &released.by_handle {
                writes.extend(self.handle_delta(h, cidr, -(*n as isize))?);
            }
            match self.commit_noting(&writes, Some(&block)) {
                Ok(()) => {
                    self.ensure_consistent_affinity(&block);
                    return Ok(released.unallocated);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(IpamError::TooManyConflicts)
    }

    /// The write of a block after a release: deleted when empty and
    /// affine to nobody, else updated.
    fn write_or_drop(&self, block: &mut Block, revision: Revision) -> Write {
        if block.is_empty() && block.affinity.is_none() {
            records::delete_block(&block.cidr(), revision)
        } else {
            records::put_block(block, Some(revision))
        }
    }

    /// Releases the affinity of a block whose pool no longer selects its
    /// host, if the block is empty (Calico's `ensureConsistentAffinity`).
    fn ensure_consistent_affinity(&self, block: &Block) {
        let Some(text) = &block.affinity else { return };
        let Some(host) = AffinityOf::host_of(text) else {
            return;
        };
        let Some(node) = self.cluster.nodes.get(host) else {
            return;
        };
        let Some(pool) = self.cluster.enabled_pool_for(block.cidr().network()) else {
            return;
        };
        if pool.node_selector.matches(node) {
            return;
        }
        let owner = AffinityOf {
            host: host.to_string(),
            text: text.clone(),
        };
        // Best effort, as in Calico: the addresses are released already.
        let _ = self.release_block_affinity(&owner, &block.cidr(), true, None);
    }

    /// Calico's `ReleaseByHandle`.
    pub fn release_by_handle(&self, handle: &str) -> Result<(), IpamError> {
        let read = self
            .records()
            .handle(handle)?
            .ok_or_else(|| IpamError::HandleNotFound(handle.to_string()))?;
        let blocks: Vec<IpNet> = read.0.block.keys().filter_map(|c| c.parse().ok()).collect();
        // The handle as read serves the first block's commit; the others
        // read it again.
        let mut hint = Some(read);
        for cidr in blocks {
            self.release_handle_in_block(handle, &cidr, hint.take())?;
        }
        Ok(())
    }

    fn release_handle_in_block(
        &self,
        handle: &str,
        cidr: &IpNet,
        mut hint: Option<(records::Handle, Revision)>,
    ) -> Result<(), IpamError> {
        // The block as this process last saw it, if that shows the handle:
        // the commit compares its revision, so a stale one is a conflict
        // and a read. (One that does not show the handle is read: it may
        // be stale the other way.)
        let mut known = self
            .cache
            .and_then(|c| c.known_block(cidr))
            .filter(|(b, _)| b.holds_handle(handle));
        for _ in 0..RETRIES {
            let current = match known.take() {
                Some(k) => Some(k),
                None => self.records().block(cidr)?,
            };
            let (block, writes) = match current {
                None => (None, Vec::new()),
                Some((mut b, rev)) => {
                    if b.release_by_handle(handle) == 0 {
                        (None, Vec::new())
                    } else {
                        let w = self.write_or_drop(&mut b, rev);
                        (Some(b), vec![w])
                    }
                }
            };
            // Whatever the handle counted in this block is gone now, so its
            // entry goes whole (this also mends counts a crash left high).
            let mut writes = writes;
            let current = match hint.take() {
                Some(h) => Some(h),
                None => self.records().handle(handle)?,
            };
            if let Some((mut h, rev)) = current
                && h.block.remove(&cidr.to_string()).is_some()
            {
                writes.extend(records::write_handle(handle, &h, Some(rev)));
            }
            if writes.is_empty() {
                return Ok(());
            }
            match self.commit_noting(&writes, block.as_ref()) {
                Ok(()) => {
                    if let Some(b) = block {
                        self.ensure_consistent_affinity(&b);
                    }
                    return Ok(());
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(IpamError::TooManyConflicts)
    }

    /// Releases `affinity`'s claim on a block: the block is deleted if
    /// empty, else keeps its addresses without affinity (Calico's
    /// `releaseBlockAffinity`). With `required_sequence`, only if the block
    /// was not written since it was read.
    pub(crate) fn release_block_affinity(
        &self,
        affinity: &AffinityOf,
        cidr: &IpNet,
        require_empty: bool,
        required_sequence: Option<u64>,
    ) -> Result<(), IpamError> {
        for _ in 0..RETRIES {
            let aff_rev = self.records().affinity(&affinity.host, cidr)?;
            let block = self.records().block(cidr)?;
            let (mut block, brev) = match (aff_rev, block) {
                (None, _) => {
                    return Err(IpamError::ResourceDoesNotExist {
                        ip: cidr.to_string(),
                        reason: format!("no affinity for {}", affinity.host),
                    });
                }
                (Some(ar), None) => {
                    // The block is gone: the affinity is stale.
                    let w = records::delete_affinity(&affinity.host, cidr, ar);
                    match self.store.commit(&[w]) {
                        Ok(()) | Err(StoreError::Conflict { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                    return Err(IpamError::ResourceDoesNotExist {
                        ip: cidr.to_string(),
                        reason: "block does not exist".into(),
                    });
                }
                (Some(_), Some(found)) => found,
            };
            let aff_rev = aff_rev.unwrap_or_default();
            if required_sequence.is_some_and(|s| s != block.sequence) {
                return Err(IpamError::Store(StoreError::Conflict {
                    key: crate::store::block_key(cidr),
                }));
            }
            if let Some(have) = &block.affinity
                && *have != affinity.text
            {
                let w = records::delete_affinity(&affinity.host, cidr, aff_rev);
                let _ = self.store.commit(&[w]);
                return Err(IpamError::ClaimConflict(*cidr));
            }
            if require_empty && !block.is_empty() {
                return Err(IpamError::BlockNotEmpty(*cidr));
            }
            let block_write = if block.is_empty() {
                records::delete_block(cidr, brev)
            } else {
                block.affinity = None;
                block.affinity_claimed_at = None;
                records::put_block(&mut block, Some(brev))
            };
            let writes = [
                block_write,
                records::delete_affinity(&affinity.host, cidr, aff_rev),
            ];
            match self.store.commit(&writes) {
                Ok(()) => return Ok(()),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(IpamError::TooManyConflicts)
    }

    /// The enabled pool holding `cidr` and its block-sized parts.
    fn blocks_within(&self, cidr: &IpNet) -> Result<Vec<IpNet>, IpamError> {
        let pool = self
            .cluster
            .enabled_pool_for(cidr.network())
            .ok_or(IpamError::CidrNotInPool(*cidr))?;
        if cidr.prefix_len() > pool.block_size {
            return Err(IpamError::CidrTooSmall(*cidr));
        }
        let cidr = cidr.trunc();
        // The pool's block size is at least the CIDR's prefix, so this
        // splits it; an absurd request (a /64 into /122s) is refused.
        let count = net_size(&cidr)
            / u128::from(block_size(
                &IpNet::new(cidr.network(), pool.block_size)
                    .map_err(|_| IpamError::CidrTooSmall(cidr))?,
            ));
        if count > 1 << 20 {
            return Err(IpamError::InvalidConfig(format!(
                "{cidr} holds {count} blocks; claim smaller ranges"
            )));
        }
        Ok(cidr
            .subnets(pool.block_size)
            .map(|s| s.collect())
            .unwrap_or_default())
    }

    /// Calico's `ClaimAffinity`: claims every block in `cidr` for `host`.
    pub fn claim_affinity(&self, cidr: &IpNet, host: &str) -> AffinityClaims {
        let mut claims = AffinityClaims::default();
        let blocks = match self.blocks_within(cidr) {
            Ok(b) => b,
            Err(e) => {
                claims.error = Some(e);
                return claims;
            }
        };
        let affinity = AffinityOf::new(host, Use::Workload);
        'blocks: for b in blocks {
            for _ in 0..RETRIES {
                match self.claim_block(&b, &affinity, None) {
                    Ok(_) => {
                        claims.claimed.push(b);
                        continue 'blocks;
                    }
                    Err(IpamError::ClaimConflict(_)) => {
                        claims.failed.push(b);
                        continue 'blocks;
                    }
                    Err(IpamError::Store(StoreError::Conflict { .. })) => continue,
                    Err(e) => {
                        claims.error = Some(e);
                        return claims;
                    }
                }
            }
            claims.error = Some(IpamError::TooManyConflicts);
            return claims;
        }
        claims
    }

    /// Calico's `ReleaseAffinity`: releases `host`'s blocks in `cidr`.
    pub fn release_affinity(
        &self,
        cidr: &IpNet,
        host: &str,
        must_be_empty: bool,
    ) -> Result<(), IpamError> {
        let affinity = AffinityOf::new(host, Use::Workload);
        for b in self.blocks_within(cidr)? {
            match self.release_block_affinity(&affinity, &b, must_be_empty, None) {
                Ok(())
                | Err(IpamError::ClaimConflict(_))
                | Err(IpamError::ResourceDoesNotExist { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Calico's `ReleaseBlockAffinity`: releases whatever affinity a block
    /// has.
    pub fn release_block_affinity_of(
        &self,
        cidr: &IpNet,
        must_be_empty: bool,
    ) -> Result<(), IpamError> {
        let Some((block, _)) = self.records().block(cidr)? else {
            return Ok(());
        };
        let Some(text) = block.affinity else {
            return Ok(());
        };
        let owner = AffinityOf {
            host: AffinityOf::host_of(&text).unwrap_or_default().to_string(),
            text: text.clone(),
        };
        match self.release_block_affinity(&owner, cidr, must_be_empty, None) {
            Ok(())
            | Err(IpamError::ClaimConflict(_))
            | Err(IpamError::ResourceDoesNotExist { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Calico's `ReleaseHostAffinities`: every block affine to `host`;
    /// with `must_be_empty` the others are released and `BlockNotEmpty`
    /// returned for the rest.
    pub fn release_host_affinities(
        &self,
        host: &str,
        must_be_empty: bool,
    ) -> Result<(), IpamError> {
        let affinity = AffinityOf::new(host, Use::Workload);
        let mut stored = None;
        for version in [4, 6] {
            for (cidr, _) in self.records().host_blocks(host, Some(version))? {
                match self.release_block_affinity(&affinity, &cidr, must_be_empty, None) {
                    Ok(())
                    | Err(IpamError::ClaimConflict(_))
                    | Err(IpamError::ResourceDoesNotExist { .. }) => {}
                    Err(e) => stored = Some(e),
                }
            }
        }
        stored.map_or(Ok(()), Err)
    }

    /// Calico's `RemoveIPAMHost`: the host's affinities go (its addresses
    /// stay allocated).
    pub fn remove_ipam_host(&self, host: &str) -> Result<(), IpamError> {
        self.release_host_affinities(host, false)
    }

    /// Calico's `GetUtilization` for the named pools (names or CIDRs;
    /// empty: all, plus an `orphaned allocation blocks` entry).
    pub fn utilization(&self, wanted: &[String]) -> Result<Vec<PoolUse>, IpamError> {
        let mut out: Vec<PoolUse> = self
            .cluster
            .pools()
            .iter()
            .filter(|p| {
                wanted.is_empty()
                    || wanted.iter().any(|w| {
                        *w == p.name || w.parse::<IpNet>().is_ok_and(|c| c.trunc() == p.cidr)
                    })
            })
            .map(|p| PoolUse {
                name: p.name.clone(),
                cidr: p.cidr,
                capacity: net_size(&p.cidr),
                in_use: 0,
                reserved: 0,
                available: 0,
                blocks: Vec::new(),
            })
            .collect();
        let orphans = wanted.is_empty();
        let mut orphaned = PoolUse {
            name: "orphaned allocation blocks".into(),
            cidr: IpNet::default(),
            capacity: 0,
            in_use: 0,
            reserved: 0,
            available: 0,
            blocks: Vec::new(),
        };
        let reservations = &self.cluster.reservations;
        for (b, _) in self.records().blocks(None)? {
            let cidr = b.cidr();
            let capacity = u128::from(b.size());
            let reserved = covered(&cidr, reservations);
            let use_ = BlockUse {
                cidr,
                host: b
                    .affinity
                    .as_deref()
                    .and_then(AffinityOf::host_of)
                    .map(String::from),
                capacity,
                in_use: capacity - b.free(|_| false) as u128,
                reserved,
                available: b.free(|ip| self.cluster.is_reserved(ip)) as u128,
            };
            let owner = out
                .iter_mut()
                .find(|p| p.cidr.contains(&cidr.network()) || cidr.contains(&p.cidr.network()));
            match owner {
                Some(p) => p.blocks.push(use_),
                None if orphans => orphaned.blocks.push(use_),
                None => {}
            }
        }
        for p in &mut out {
            p.in_use = p.blocks.iter().map(|b| b.in_use).sum();
            p.reserved = covered(&p.cidr, reservations);
            let in_blocks: u128 = p.blocks.iter().map(|b| b.capacity).sum();
            let reserved_in_blocks: u128 = p.blocks.iter().map(|b| b.reserved).sum();
            let outside = p.capacity.saturating_sub(in_blocks);
            let reserved_outside = p.reserved.saturating_sub(reserved_in_blocks);
            p.available = p.blocks.iter().map(|b| b.available).sum::<u128>()
                + outside.saturating_sub(reserved_outside);
        }
        if orphans {
            orphaned.in_use = orphaned.blocks.iter().map(|b| b.in_use).sum();
            out.push(orphaned);
        }
        Ok(out)
    }
}
