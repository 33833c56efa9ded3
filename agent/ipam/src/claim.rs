//! Finding and claiming blocks: a host's affine blocks first, then the
//! first block of its walk of each pool that does not exist (or is its own
//! with room), then an empty block of another host claimed long enough ago
//! (Calico's `findOrClaimBlock`, `findUsableBlock`, `randomBlockGenerator`).

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::assign::AffinityOf;
use crate::block::{Block, HostReserved};
use crate::error::IpamError;
use crate::ipam::{Ipam, RETRIES};
use crate::pool::Pool;
use crate::records::{self, Config};
use crate::store::{Revision, StoreError};

/// Seconds an empty block stays with the host that claimed it before
/// another host may take it (Calico's `EmptyBlockMinReclaimAge`).
pub const EMPTY_BLOCK_MIN_RECLAIM_AGE: u64 = 60;

/// A block to assign from, as read.
pub(crate) struct Found {
    pub block: Block,
    pub revision: Revision,
    pub newly_claimed: bool,
}

/// The block walk of a pool: its blocks from a start index, upwards,
/// wrapping around (Calico's `randomBlockGenerator`).
#[derive(Debug)]
pub struct Walk {
    base: u128,
    block_addrs: u128,
    count: u128,
    start: u128,
    v4: bool,
    prefix: u8,
}

impl Walk {
    /// The walk of `pool` starting at block `start_seed` (mod the block count).
    pub fn new(pool: &Pool, start_seed: u64) -> Walk {
        let bits = u32::from(pool.cidr.max_prefix_len());
        let pool_bits = bits - u32::from(pool.cidr.prefix_len());
        let block_bits = bits - u32::from(pool.block_size);
        let count = 1u128 << (pool_bits - block_bits).min(127);
        let base = match pool.cidr.network() {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        Walk {
            base,
            block_addrs: 1u128 << block_bits.min(127),
            count,
            start: u128::from(start_seed) % count,
            v4: pool.cidr.network().is_ipv4(),
            prefix: pool.block_size,
        }
    }

    /// Blocks in the pool.
    pub fn count(&self) -> u128 {
        self.count
    }

    /// The block at walk step `k` (0 ≤ k < count).
    pub fn at(&self, k: u128) -> IpNet {
        let index = (self.start + k) % self.count;
        let addr = self.base + index * self.block_addrs;
        let ip = if self.v4 {
            IpAddr::V4((addr as u32).into())
        } else {
            IpAddr::V6(addr.into())
        };
        // The prefix is the pool's validated block size.
        IpNet::new(ip, self.prefix).unwrap_or_else(|_| IpNet::from(ip))
    }

    /// Walk step of `block` (which must be one of the pool's blocks).
    pub fn step_of(&self, block: &IpNet) -> u128 {
        let addr = match block.network() {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        let index = (addr - self.base) / self.block_addrs;
        (index + self.count - self.start) % self.count
    }
}

/// FNV-1 32-bit hash: the same host starts its walk at the same block, so
/// its concurrent requests meet at one block instead of claiming several.
fn fnv1_32(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h = h.wrapping_mul(0x0100_0193);
        h ^= u32::from(b);
    }
    h
}

impl Ipam<'_> {
    /// The start of `host`'s walk of `pool`: fixed per host, random for
    /// single-address blocks (where meeting at one block cannot help).
    pub fn walk(&self, pool: &Pool, host: &str) -> Walk {
        let single = pool.block_size == pool.cidr.max_prefix_len();
        let seed = if single {
            self.env.random()
        } else {
            u64::from(fnv1_32(host))
        };
        Walk::new(pool, seed)
    }

    /// A block of the host with at least `min_free` free addresses: an
    /// affine one, else a newly claimed one (Calico's `findOrClaimBlock`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn find_or_claim_block(
        &self,
        remaining: &mut VecDeque<(IpNet, Revision)>,
        prefetched: &mut BTreeMap<IpNet, (Block, Revision)>,
        pools: &[&Pool],
        min_free: usize,
        allow_new: bool,
        config: &Config,
        reserved: Option<&HostReserved>,
        affinity: &AffinityOf,
    ) -> Result<Found, IpamError> {
        let reserved_ip = |ip| self.cluster.is_reserved(ip);
        'affine: while let Some((cidr, listed)) = remaining.pop_front() {
            if self.cluster.reserves_whole(&cidr) {
                continue;
            }
            // The affinity's revision as listed; after a conflict, as read.
            let mut known = Some(listed);
            for _ in 0..RETRIES {
                let aff_rev = match known.take() {
                    Some(r) => r,
                    None => match self.records().affinity(&affinity.host, &cidr)? {
                        Some(r) => r,
                        None => continue 'affine,
                    },
                };
                // Read with the affinities, if it was; else now.
                let current = match prefetched.remove(&cidr) {
                    Some(found) => Some(found),
                    None => {
                        let read = self.records().block(&cidr)?;
                        if let Some((b, r)) = &read {
                            self.note_read(b, *r);
                        }
                        read
                    }
                };
                match current {
                    None => {
                        // An affinity whose block is gone: make the block.
                        match self.create_block(&cidr, affinity, Some(aff_rev), reserved) {
                            Ok(found) if found.block.free(reserved_ip) >= min_free => {
                                return Ok(found);
                            }
                            Ok(_) => continue 'affine,
                            Err(IpamError::Store(StoreError::Conflict { .. })) => continue,
                            Err(e) => return Err(e),
                        }
                    }
                    Some((b, rev)) => {
                        if b.affinity.as_deref() != Some(affinity.text.as_str()) {
                            // A stale affinity: the block went elsewhere.
                            let stale = records::delete_affinity(&affinity.host, &cidr, aff_rev);
                            match self.store.commit(&[stale]) {
                                Ok(()) | Err(StoreError::Conflict { .. }) => continue 'affine,
                                Err(e) => return Err(e.into()),
                            }
                        }
                        if b.free(reserved_ip) >= min_free {
                            return Ok(Found {
                                block: b,
                                revision: rev,
                                newly_claimed: false,
                            });
                        }
                        continue 'affine;
                    }
                }
            }
        }
        if !allow_new {
            return Err(IpamError::BlockLimit);
        }
        if !config.auto_allocate_blocks {
            return Err(IpamError::NoClaimableBlock);
        }
        for _ in 0..RETRIES {
            let subnet = self.find_usable_block(pools, affinity)?;
            match self.claim_block(&subnet, affinity, reserved) {
                Ok(found) => {
                    if found.block.free(reserved_ip) >= min_free {
                        return Ok(found);
                    }
                    // The host's own block, filled by another request of
                    // this host since it was found: look again (Calico
                    // gives up here).
                    continue;
                }
                Err(IpamError::ClaimConflict(_))
                | Err(IpamError::Store(StoreError::Conflict { .. })) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(IpamError::TooManyConflicts)
    }

    /// Claims `cidr` for the host: creates the block with the host's
    /// affinity (or takes it if it is the host's already).
    pub(crate) fn claim_block(
        &self,
        cidr: &IpNet,
        affinity: &AffinityOf,
        reserved: Option<&HostReserved>,
    ) -> Result<Found, IpamError> {
        let aff_rev = self.records().affinity(&affinity.host, cidr)?;
        match self.records().block(cidr)? {
            None => self.create_block(cidr, affinity, aff_rev, reserved),
            Some((b, rev)) if b.affinity.as_deref() == Some(affinity.text.as_str()) => {
                if aff_rev.is_none() {
                    self.confirm_affinity(cidr, affinity)?;
                }
                Ok(Found {
                    block: b,
                    revision: rev,
                    newly_claimed: true,
                })
            }
            Some(_) => Err(IpamError::ClaimConflict(*cidr)),
        }
    }

    /// Makes sure the host's affinity to its block `cidr` exists before
    /// the block is used: a conflict on creating it is taken as another
    /// writer's affinity only once a read shows it (a conflict may also
    /// come from a commit that then undid it, which left the block's
    /// affinity without its record).
    fn confirm_affinity(&self, cidr: &IpNet, affinity: &AffinityOf) -> Result<(), IpamError> {
        for _ in 0..RETRIES {
            let confirm = records::put_affinity(&affinity.host, cidr, None);
            match self.store.commit(&[confirm]) {
                Ok(()) => return Ok(()),
                Err(StoreError::Conflict { .. }) => {
                    if self.records().affinity(&affinity.host, cidr)?.is_some() {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(IpamError::ClaimConflict(*cidr))
    }

    /// One commit: a new block affine to the host and the host's affinity.
    fn create_block(
        &self,
        cidr: &IpNet,
        affinity: &AffinityOf,
        aff_rev: Option<Revision>,
        reserved: Option<&HostReserved>,
    ) -> Result<Found, IpamError> {
        // A new block's sequence numbers start from the clock, so no reader
        // of an earlier block at this CIDR can hold a matching one.
        let now = self.env.now();
        let mut block = Block::new(*cidr, now.as_nanos() as u64, reserved);
        block.affinity = Some(affinity.text.clone());
        block.affinity_claimed_at = Some(now.as_secs());
        let writes = [
            records::put_block(&mut block, None),
            records::put_affinity(&affinity.host, cidr, aff_rev),
        ];
        self.store.commit(&writes)?;
        // Read back for the revision the commit gave it.
        match self.records().block(cidr)? {
            Some((b, rev)) => Ok(Found {
                block: b,
                revision: rev,
                newly_claimed: true,
            }),
            None => Err(StoreError::Conflict {
                key: crate::store::block_key(cidr),
            }
            .into()),
        }
    }

    /// A block CIDR the host can claim: the first in its walk of each pool
    /// that does not exist (or is its own with room); else an empty block
    /// of another host claimed long enough ago (Calico's
    /// `findUsableBlock`).
    fn find_usable_block(
        &self,
        pools: &[&Pool],
        affinity: &AffinityOf,
    ) -> Result<IpNet, IpamError> {
        if pools.is_empty() {
            return Err(IpamError::NoMatchingPool(affinity.host.clone()));
        }
        let existing: BTreeMap<IpNet, Block> = self
            .records()
            .blocks(None)?
            .into_iter()
            .map(|(b, _)| (b.cidr(), b))
            .collect();
        let reserved_ip = |ip| self.cluster.is_reserved(ip);
        let mut empty = Vec::new();
        for pool in pools {
            let walk = self.walk(pool, &affinity.host);
            // At most every existing block, then a free one follows; whole
            // reservations are skipped without a read.
            let mut k = 0u128;
            while k < walk.count() {
                let subnet = walk.at(k);
                k += 1;
                if self.cluster.reserves_whole(&subnet) {
                    continue;
                }
                match existing.get(&subnet) {
                    None => return Ok(subnet),
                    Some(b) => {
                        let free = b.free(reserved_ip);
                        if b.affinity.as_deref() == Some(affinity.text.as_str()) && free > 0 {
                            return Ok(subnet);
                        }
                        if b.is_empty() && free > 0 {
                            empty.push(b);
                        }
                    }
                }
            }
        }
        let now = self.env.now().as_secs();
        for b in empty {
            let claimed = b.affinity_claimed_at.unwrap_or(0);
            if now.saturating_sub(claimed) < EMPTY_BLOCK_MIN_RECLAIM_AGE {
                continue;
            }
            let Some(host) = b.affinity.as_deref().and_then(AffinityOf::host_of) else {
                continue;
            };
            let owner = AffinityOf {
                host: host.to_string(),
                text: b.affinity.clone().unwrap_or_default(),
            };
            if self
                .release_block_affinity(&owner, &b.cidr(), true, Some(b.sequence))
                .is_ok()
            {
                return Ok(b.cidr());
            }
        }
        Err(IpamError::NoFreeBlocks)
    }
}
