//! The IPAM client: Calico's `ipam.Interface` over a store, a cluster view
//! and an injected clock and random source.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use ipnet::IpNet;

use crate::cluster::Cluster;
use crate::error::IpamError;
use crate::records::{self, Config, Records};
use crate::store::{Committed, IpamStore, Revision, StoreError, Write};

/// Attempts per write before giving up to other writers (Calico's
/// `datastoreRetries`).
pub const RETRIES: usize = 100;

/// Time and randomness, injected so the logic stays pure and testable.
pub trait Env: Send + Sync {
    /// Time since the Unix epoch.
    fn now(&self) -> Duration;
    /// A random number (where blocks of one address start their walk).
    fn random(&self) -> u64;
}

/// A settable clock that ticks a microsecond per reading (so, like a real
/// clock, two readings never agree) and a seeded generator, for tests and
/// replays.
#[derive(Debug)]
pub struct FixedEnv {
    inner: Mutex<(Duration, u64)>,
}

impl FixedEnv {
    /// From `now`, random numbers from `seed`.
    pub fn new(now: Duration, seed: u64) -> FixedEnv {
        FixedEnv {
            inner: Mutex::new((now, seed)),
        }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += by;
    }
}

impl Env for FixedEnv {
    fn now(&self) -> Duration {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += Duration::from_micros(1);
        g.0
    }

    fn random(&self) -> u64 {
        // xorshift64*: deterministic, good enough to spread walk starts.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut x = g.1 | 1;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        g.1 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// What a long-running allocator remembers between requests:
///
/// - each host's affine blocks, so the next request reads them together
///   with the affinities (one round trip) instead of after them;
/// - the host's view as last read (config, affinities) and the blocks as
///   last read or written, with their revisions, so that where the store
///   can check records it does not write in the same commit, the common
///   assignment is that one commit: it lands only if everything the
///   choice was made from is still as remembered, and is then exactly the
///   assignment a fresh read would have made.
///
/// Only ever a hint: what decides is compared in the commit.
#[derive(Debug, Default)]
pub struct IpamCache {
    blocks: Mutex<std::collections::BTreeMap<(String, u8), Vec<IpNet>>>,
    views: Mutex<std::collections::BTreeMap<(String, u8), HostView>>,
    known: Mutex<std::collections::BTreeMap<IpNet, (crate::block::Block, Revision)>>,
}

/// A host's IPAM inputs as last read, with their revisions.
#[derive(Debug, Clone)]
pub(crate) struct HostView {
    pub config: crate::records::Config,
    pub config_revision: Option<Revision>,
    /// Affine blocks as listed, with their affinities' revisions.
    pub affinities: Vec<(IpNet, Revision)>,
}

impl IpamCache {
    /// Blocks prefetched per request at most.
    const PREFETCH: usize = 4;

    /// An empty cache.
    pub fn new() -> IpamCache {
        IpamCache::default()
    }

    pub(crate) fn blocks(&self, host: &str, version: u8) -> Vec<IpNet> {
        let g = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        g.get(&(host.to_string(), version))
            .map(|v| v.iter().take(Self::PREFETCH).copied().collect())
            .unwrap_or_default()
    }

    pub(crate) fn remember(&self, host: &str, version: u8, blocks: Vec<IpNet>) {
        let mut g = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        g.insert((host.to_string(), version), blocks);
    }

    pub(crate) fn view(&self, host: &str, version: u8) -> Option<HostView> {
        let g = self.views.lock().unwrap_or_else(|p| p.into_inner());
        g.get(&(host.to_string(), version)).cloned()
    }

    /// Replaces the host's view (None: forgets it, after this process
    /// changed the host's affinities).
    pub(crate) fn set_view(&self, host: &str, version: u8, view: Option<HostView>) {
        let mut g = self.views.lock().unwrap_or_else(|p| p.into_inner());
        match view {
            Some(v) => g.insert((host.to_string(), version), v),
            None => g.remove(&(host.to_string(), version)),
        };
    }

    /// A block as read or written at `revision` (None: deleted).
    pub(crate) fn note_block(&self, cidr: IpNet, block: Option<(&crate::block::Block, Revision)>) {
        let mut g = self.known.lock().unwrap_or_else(|p| p.into_inner());
        match block {
            Some((b, r)) => {
                // An older read never replaces a newer one.
                if g.get(&cidr).is_none_or(|(_, have)| *have < r) {
                    g.insert(cidr, (b.clone(), r));
                }
            }
            None => {
                g.remove(&cidr);
            }
        }
    }

    pub(crate) fn known_block(&self, cidr: &IpNet) -> Option<(crate::block::Block, Revision)> {
        let g = self.known.lock().unwrap_or_else(|p| p.into_inner());
        g.get(cidr).cloned()
    }
}

/// The IPAM client (see the crate documentation).
#[derive(Clone, Copy)]
pub struct Ipam<'a> {
    pub(crate) store: &'a dyn IpamStore,
    pub(crate) cluster: &'a Cluster,
    pub(crate) env: &'a dyn Env,
    pub(crate) cache: Option<&'a IpamCache>,
}

impl std::fmt::Debug for Ipam<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ipam")
            .field("cluster", self.cluster)
            .finish()
    }
}

impl<'a> Ipam<'a> {
    /// A client over `store` for `cluster`.
    pub fn new(store: &'a dyn IpamStore, cluster: &'a Cluster, env: &'a dyn Env) -> Ipam<'a> {
        Ipam {
            store,
            cluster,
            env,
            cache: None,
        }
    }

    /// Commits `writes`; with a cache, notes `block` as they leave it (put
    /// or deleted) at the revision the commit took, where the store tells.
    pub(crate) fn commit_noting(
        &self,
        writes: &[Write],
        block: Option<&crate::block::Block>,
    ) -> Result<(), StoreError> {
        let Some(cache) = self.cache else {
            return self.store.commit(writes);
        };
        match self.store.commit_checked(&[], writes)? {
            Committed::Landed(revision) => {
                if let Some(b) = block {
                    let key = crate::store::block_key(&b.cidr());
                    match writes.iter().find(|w| w.key() == key) {
                        Some(Write::Put { .. }) => cache.note_block(b.cidr(), Some((b, revision))),
                        Some(Write::Delete { .. }) => cache.note_block(b.cidr(), None),
                        None => {}
                    }
                }
                Ok(())
            }
            Committed::Unsupported => self.store.commit(writes),
        }
    }

    /// Notes a block as read (with a cache).
    pub(crate) fn note_read(&self, block: &crate::block::Block, revision: Revision) {
        if let Some(c) = self.cache {
            c.note_block(block.cidr(), Some((block, revision)));
        }
    }

    /// The same client remembering hosts' blocks in `cache` between
    /// requests (for processes that allocate many times).
    pub fn with_cache(self, cache: &'a IpamCache) -> Ipam<'a> {
        Ipam {
            cache: Some(cache),
            ..self
        }
    }

    /// Typed access to the store's records.
    pub fn records(&self) -> Records<'a> {
        Records { store: self.store }
    }

    /// The injected clock's time.
    pub fn now(&self) -> Duration {
        self.env.now()
    }

    /// The cluster this client reads.
    pub fn cluster(&self) -> &'a Cluster {
        self.cluster
    }

    /// Calico's `GetIPAMConfig` (Windows nodes need strict affinity).
    pub fn get_config(&self, windows: bool) -> Result<Config, IpamError> {
        let (config, _) = self.records().config()?;
        if windows && !config.strict_affinity {
            return Err(IpamError::StrictAffinityRequired);
        }
        Ok(config)
    }

    /// Calico's `SetIPAMConfig`, with its refusals.
    pub fn set_config(&self, config: Config) -> Result<(), IpamError> {
        if !config.strict_affinity && !config.auto_allocate_blocks {
            return Err(IpamError::InvalidConfig(
                "Cannot disable 'StrictAffinity' and 'AutoAllocateBlocks' at the same time".into(),
            ));
        }
        if config.max_blocks_per_host > 0 && !config.strict_affinity {
            return Err(IpamError::InvalidConfig(
                "MaxBlocksPerHost requires StrictAffinity to be enabled".into(),
            ));
        }
        for _ in 0..RETRIES {
            let (current, revision) = self.records().config()?;
            if current == config && revision.is_some() {
                return Ok(());
            }
            match self.store.commit(&[records::put_config(&config, revision)]) {
                Ok(()) => return Ok(()),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(IpamError::TooManyConflicts)
    }

    /// Calico's `IPsByHandle`: each address with its block's prefix.
    pub fn ips_by_handle(&self, handle: &str) -> Result<Vec<IpNet>, IpamError> {
        let (h, _) = self
            .records()
            .handle(handle)?
            .ok_or_else(|| IpamError::HandleNotFound(handle.to_string()))?;
        let mut out = Vec::new();
        for cidr in h.block.keys() {
            let Ok(cidr) = cidr.parse::<IpNet>() else {
                continue;
            };
            if let Some((b, _)) = self.records().block(&cidr)? {
                let prefix = b.cidr().prefix_len();
                out.extend(
                    b.ips_by_handle(handle)
                        .into_iter()
                        .filter_map(|ip| IpNet::new(ip, prefix).ok()),
                );
            }
        }
        Ok(out)
    }

    /// Calico's `GetAssignmentAttributes`: owner attributes and handle.
    pub fn assignment_attributes(
        &self,
        ip: IpAddr,
    ) -> Result<(crate::cluster::Labels, Option<String>), IpamError> {
        let missing = |reason: &str| IpamError::ResourceDoesNotExist {
            ip: ip.to_string(),
            reason: reason.to_string(),
        };
        let pool = self
            .cluster
            .enabled_pool_for(ip)
            .ok_or_else(|| missing("No valid IPPool"))?;
        let cidr = pool
            .block_of(ip)
            .ok_or_else(|| missing("No valid IPPool"))?;
        let (block, _) =
            self.records()
                .block(&cidr)?
                .ok_or_else(|| IpamError::ResourceDoesNotExist {
                    ip: cidr.to_string(),
                    reason: "block does not exist".into(),
                })?;
        let a = block
            .allocation(ip)
            .ok_or_else(|| missing("IP is unassigned"))?;
        Ok((a.attrs.clone(), a.handle.clone()))
    }
}
