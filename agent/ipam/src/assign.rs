//! Assignment: AutoAssign, AssignIP and EnsureBlock as Calico's `ipam.go`
//! defines them, over one commit per block write.
//!
//! AutoAssign, per family: choose pools (requested, else those selecting
//! the node and namespace; then by intended use), take addresses from the
//! host's affine blocks, then claim new blocks (up to the host's block
//! limit; reclaiming empty blocks of other hosts claimed over a minute
//! ago), then, without strict affinity, borrow from any block of the pools.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::block::{Block, HostReserved};
use crate::cluster::{LOAD_BALANCER_NODE, Labels, family};
use crate::error::IpamError;
use crate::ipam::{HostView, Ipam, RETRIES};
use crate::pool::{Pool, Use};
use crate::records::{self, Config, Handle};
use crate::store::{Check, Committed, Expect, Read, Revision, StoreError, Write};

/// Checks and writes of one checked commit at most (etcd takes 128
/// comparisons by default); a host with more affine blocks takes the full
/// path.
const MAX_CHECKED_COMMIT: usize = 100;

/// Blocks a host may hold when no limit is configured.
pub const DEFAULT_BLOCK_LIMIT: u32 = 20;

/// An AutoAssign request (Calico's `AutoAssignArgs`).
#[derive(Debug, Clone)]
pub struct AutoAssignArgs {
    /// IPv4 addresses wanted.
    pub num4: usize,
    /// IPv6 addresses wanted.
    pub num6: usize,
    /// The handle the addresses are allocated under.
    pub handle: Option<String>,
    /// Owner attributes stored with each address.
    pub attrs: Labels,
    /// The node.
    pub hostname: String,
    /// Pools to use, by CIDR (empty: choose by selectors).
    pub ipv4_pools: Vec<IpNet>,
    /// IPv6 pools to use, by CIDR.
    pub ipv6_pools: Vec<IpNet>,
    /// Per-request block limit (0: none).
    pub max_blocks_per_host: u32,
    /// Addresses reserved at the ends of every IPv4 block the host claims.
    pub host_reserved_v4: Option<HostReserved>,
    /// Addresses reserved at the ends of every IPv6 block the host claims.
    pub host_reserved_v6: Option<HostReserved>,
    /// What the addresses are for.
    pub intended_use: Use,
    /// The namespace, for pools' namespace selectors.
    pub namespace: Option<String>,
    /// With a handle: the most addresses of one family it may hold; a
    /// handle at its limit gets its addresses back (0: no limit).
    pub max_alloc_per_handle: usize,
    /// Calico's Windows path (strict affinity required).
    pub windows: bool,
}

impl AutoAssignArgs {
    /// A request for `num4` IPv4 and `num6` IPv6 addresses on `hostname`.
    pub fn new(hostname: &str, num4: usize, num6: usize, intended_use: Use) -> AutoAssignArgs {
        AutoAssignArgs {
            num4,
            num6,
            handle: None,
            attrs: Labels::new(),
            hostname: hostname.to_string(),
            ipv4_pools: Vec::new(),
            ipv6_pools: Vec::new(),
            max_blocks_per_host: 0,
            host_reserved_v4: None,
            host_reserved_v6: None,
            intended_use,
            namespace: None,
            max_alloc_per_handle: 0,
            windows: false,
        }
    }
}

/// What AutoAssign gave for one family (Calico's `IPAMAssignments`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignments {
    /// Addresses, each with its block's prefix length.
    pub ips: Vec<IpNet>,
    /// 4 or 6.
    pub version: u8,
    /// How many were asked for.
    pub requested: usize,
    /// The host reservation in force.
    pub host_reserved: Option<HostReserved>,
    /// Why fewer were given, in Calico's words.
    pub msgs: Vec<String>,
}

impl Assignments {
    fn add_msg(&mut self, msg: String) {
        if !self.msgs.contains(&msg) {
            self.msgs.push(msg);
        }
    }

    /// Calico's `PartialFulfillmentError`: None when every address was given.
    pub fn partial_fulfillment_error(&self) -> Option<String> {
        if self.ips.len() >= self.requested {
            return None;
        }
        let mut s = format!(
            "Assigned {} out of {} requested IPv{} addresses",
            self.ips.len(),
            self.requested,
            self.version
        );
        for m in &self.msgs {
            s.push_str("; ");
            s.push_str(m);
        }
        if let Some(r) = &self.host_reserved {
            s.push_str("; HostReservedAttr: ");
            s.push_str(&r.handle);
        }
        Some(s)
    }
}

/// AutoAssign's result: what each family got, and the error that stopped
/// it (addresses given before an error stay allocated, as in Calico).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoAssigned {
    /// IPv4 result (None: not requested, or failed before assigning).
    pub v4: Option<Assignments>,
    /// IPv6 result.
    pub v6: Option<Assignments>,
    /// The error, if any.
    pub error: Option<IpamError>,
}

/// An AssignIP request (Calico's `AssignIPArgs`).
#[derive(Debug, Clone)]
pub struct AssignIpArgs {
    /// The address.
    pub ip: IpAddr,
    /// The node.
    pub hostname: String,
    /// The handle.
    pub handle: Option<String>,
    /// Owner attributes.
    pub attrs: Labels,
    /// Checked against the pool's allowed uses when given.
    pub intended_use: Option<Use>,
    /// See [`AutoAssignArgs::max_alloc_per_handle`].
    pub max_alloc_per_handle: usize,
    /// Host reservations for a block claimed on the way.
    pub host_reserved: Option<HostReserved>,
}

/// The affinity a request acts under: Calico's `<type>:<host>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AffinityOf {
    pub host: String,
    pub text: String,
}

impl AffinityOf {
    pub fn new(host: &str, usage: Use) -> AffinityOf {
        if usage == Use::LoadBalancer {
            AffinityOf {
                host: LOAD_BALANCER_NODE.into(),
                text: format!("virtual:{LOAD_BALANCER_NODE}"),
            }
        } else {
            AffinityOf {
                host: host.into(),
                text: format!("host:{host}"),
            }
        }
    }

    /// The host named by a block's affinity string.
    pub fn host_of(affinity: &str) -> Option<&str> {
        affinity.split_once(':').map(|(_, h)| h)
    }
}

/// The longest block prefix that still holds the host reservations.
pub(crate) fn max_prefix_len(
    version: u8,
    reserved: Option<&HostReserved>,
) -> Result<u8, IpamError> {
    let bits: u32 = if version == 4 { 32 } else { 128 };
    let Some(r) = reserved else {
        return Ok(bits as u8);
    };
    let n = r.start_of_block + r.end_of_block;
    let len = u32::BITS - n.leading_zeros();
    if n == 0 || len >= bits {
        return Err(IpamError::BadHostReservation);
    }
    Ok((bits - len) as u8)
}

/// What a request asks of the pools: its family, host, use and namespace.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolQuery<'q> {
    pub requested: &'q [IpNet],
    pub version: u8,
    pub host: &'q str,
    pub reserved: Option<&'q HostReserved>,
    pub usage: Use,
    pub namespace: Option<&'q str>,
}

impl<'q> PoolQuery<'q> {
    fn of(
        args: &'q AutoAssignArgs,
        version: u8,
        requested: &'q [IpNet],
        reserved: Option<&'q HostReserved>,
    ) -> PoolQuery<'q> {
        PoolQuery {
            requested,
            version,
            host: &args.hostname,
            reserved,
            usage: args.intended_use,
            namespace: args.namespace.as_deref(),
        }
    }
}

/// A host's affine blocks with their affinities' revisions.
type AffineBlocks = Vec<(IpNet, Revision)>;

/// A handle as read ahead of its first write (None inside: no handle yet);
/// taken by the first commit, later ones read it again.
type HandleHint = Option<Option<(Handle, Revision)>>;

/// The write that adds `delta` addresses in `block` to a handle as read.
fn handle_change(
    id: &str,
    current: Option<(Handle, Revision)>,
    block: &IpNet,
    delta: isize,
) -> Option<Write> {
    let (mut handle, revision) = match current {
        Some((h, r)) => (h, Some(r)),
        None if delta <= 0 => return None,
        None => (Handle::default(), None),
    };
    let key = block.to_string();
    let n = handle.block.get(&key).copied().unwrap_or(0) as isize + delta;
    if n <= 0 {
        handle.block.remove(&key);
    } else {
        handle.block.insert(key, n as usize);
    }
    records::write_handle(id, &handle, revision)
}

impl Ipam<'_> {
    fn config_for(&self, windows: bool) -> Result<(Config, Option<Revision>), IpamError> {
        let (config, revision) = self.records().config()?;
        if windows && !config.strict_affinity {
            return Err(IpamError::StrictAffinityRequired);
        }
        Ok((config, revision))
    }

    /// Calico's `AutoAssign`.
    pub fn auto_assign(&self, args: &AutoAssignArgs) -> AutoAssigned {
        let mut out = AutoAssigned {
            v4: None,
            v6: None,
            error: None,
        };
        if args.num4 > 0 {
            if args.ipv4_pools.iter().any(|p| family(p) != 4) {
                out.error = Some(IpamError::MixedFamilyPools(4, 6));
                return out;
            }
            let (a, e) = self.auto_assign_family(args, 4);
            out.v4 = a;
            if e.is_some() {
                out.error = e;
                return out;
            }
        }
        if args.num6 > 0 {
            if args.ipv6_pools.iter().any(|p| family(p) != 6) {
                // Calico returns neither result here (the IPv4 addresses
                // stay allocated).
                out.v4 = None;
                out.error = Some(IpamError::MixedFamilyPools(6, 4));
                return out;
            }
            let (a, e) = self.auto_assign_family(args, 6);
            out.v6 = a;
            out.error = e;
        }
        out
    }

    /// Pools for a request and the host's affine blocks in them; empty
    /// affine blocks of pools that no longer select the host are released
    /// (Calico's `prepareAffinityBlocksForHost`).
    pub(crate) fn prepare(
        &self,
        query: &PoolQuery<'_>,
        host_blocks: Vec<(IpNet, Revision)>,
    ) -> Result<(Vec<&Pool>, AffineBlocks), IpamError> {
        let (allowed, affine, release) = self.plan_pools(query, host_blocks)?;
        let affinity = AffinityOf::new(query.host, query.usage);
        for cidr in release {
            // Only if empty; a failure leaves the affinity for next time.
            let _ = self.release_block_affinity(&affinity, &cidr, true, None);
        }
        Ok((allowed, affine))
    }

    /// What [`prepare`](Self::prepare) decides, without writing: the pools,
    /// the affine blocks in them, and the affine blocks to let go if empty.
    fn plan_pools(
        &self,
        query: &PoolQuery<'_>,
        host_blocks: Vec<(IpNet, Revision)>,
    ) -> Result<(Vec<&Pool>, AffineBlocks, Vec<IpNet>), IpamError> {
        let PoolQuery {
            requested,
            version,
            host,
            reserved,
            usage,
            namespace,
        } = *query;
        let node = self.cluster.node(host, usage)?;
        let max_prefix = max_prefix_len(version, reserved)?;
        let ns_labels = namespace.and_then(|n| self.cluster.namespaces.get(n));
        let (selecting, enabled) = self
            .cluster
            .determine_pools(requested, version, &node, ns_labels, max_prefix)?;
        if selecting.is_empty() {
            return Err(IpamError::NoMatchingPool(host.to_string()));
        }
        let allowed: Vec<&Pool> = selecting
            .iter()
            .copied()
            .filter(|p| p.allowed_uses.contains(&usage))
            .collect();
        if allowed.is_empty() {
            return Err(IpamError::NoQualifiedPool(Some(usage)));
        }
        let contains = |pools: &[&Pool], b: &IpNet| pools.iter().any(|p| p.contains(b.network()));
        let mut affine = Vec::new();
        let mut release = Vec::new();
        for (cidr, revision) in host_blocks {
            if contains(&allowed, &cidr) {
                affine.push((cidr, revision));
            } else if !contains(&selecting, &cidr) {
                let Some(pool) = enabled.iter().find(|p| p.contains(cidr.network())) else {
                    continue;
                };
                if pool.node_selector.matches(&node) {
                    continue;
                }
                release.push(cidr);
            }
        }
        Ok((allowed, affine, release))
    }

    /// The common assignment (addresses from the first affine block with
    /// room) decided from the cache's view and made in one commit that also
    /// checks everything the choice rests on: the config, the host's
    /// affinities (none gone, none new), each affine block passed over and
    /// the block used, and that the handle is new. It lands only when a
    /// fresh read would have chosen the same, so it is the same assignment
    /// in one round trip instead of two. None: the view cannot decide alone
    /// (no view, a block not known, more than one block needed, a store
    /// that cannot check) or something changed; the full path runs and
    /// renews the view.
    #[allow(clippy::too_many_arguments)]
    fn assign_from_view(
        &self,
        args: &AutoAssignArgs,
        version: u8,
        num: usize,
        requested: &[IpNet],
        reserved: Option<&HostReserved>,
        affinity: &AffinityOf,
    ) -> Option<(Option<Assignments>, Option<IpamError>)> {
        let cache = self.cache?;
        if args.max_alloc_per_handle > 0 || num == 0 {
            return None;
        }
        let view = cache.view(&affinity.host, version)?;
        if args.windows && !view.config.strict_affinity {
            return None;
        }
        let query = PoolQuery::of(args, version, requested, reserved);
        let (_, affine, release) = self.plan_pools(&query, view.affinities.clone()).ok()?;
        if !release.is_empty() {
            return None;
        }
        let reserved_ip = |ip| self.cluster.is_reserved(ip);
        let mut passed = Vec::new();
        let mut chosen = None;
        for (cidr, _) in &affine {
            if self.cluster.reserves_whole(cidr) {
                continue;
            }
            let (block, revision) = cache.known_block(cidr)?;
            if block.affinity.as_deref() != Some(affinity.text.as_str()) {
                return None;
            }
            if block.free(reserved_ip) >= 1 {
                chosen = Some((block, revision));
                break;
            }
            passed.push((crate::store::block_key(cidr), revision));
        }
        let (mut block, revision) = chosen?;
        let ips = block.auto_assign(num, args.handle.as_deref(), &args.attrs, reserved_ip);
        if ips.len() < num {
            return None;
        }
        let mut writes = Vec::new();
        if let Some(h) = &args.handle {
            writes.extend(handle_change(h, None, &block.cidr(), ips.len() as isize));
        }
        writes.push(records::put_block(&mut block, Some(revision)));
        let prefix = crate::store::host_prefix(&affinity.host, Some(version));
        let affinity_keys: Vec<(String, Revision)> = view
            .affinities
            .iter()
            .map(|(c, r)| (crate::store::affinity_key(&affinity.host, c), *r))
            .collect();
        let newest = view.affinities.iter().map(|(_, r)| *r).max().unwrap_or(0);
        let at = |r: Option<Revision>| r.map_or(Expect::Absent, Expect::At);
        let mut checks = vec![
            Check::Key(crate::store::CONFIG_KEY, at(view.config_revision)),
            Check::NoneNewer {
                prefix: &prefix,
                revision: newest,
            },
        ];
        for (key, r) in affinity_keys.iter().chain(&passed) {
            checks.push(Check::Key(key, Expect::At(*r)));
        }
        if checks.len() + writes.len() > MAX_CHECKED_COMMIT {
            return None;
        }
        let landed = match self.store.commit_checked(&checks, &writes) {
            Ok(Committed::Landed(r)) => r,
            Ok(Committed::Unsupported) | Err(StoreError::Conflict { .. }) => return None,
            Err(e) => return Some((None, Some(e.into()))),
        };
        cache.note_block(block.cidr(), Some((&block, landed)));
        let prefix_len = block.cidr().prefix_len();
        let ia = Assignments {
            ips: ips
                .into_iter()
                .filter_map(|ip| IpNet::new(ip, prefix_len).ok())
                .collect(),
            version,
            requested: num,
            host_reserved: reserved.cloned(),
            msgs: Vec::new(),
        };
        Some((Some(ia), None))
    }

    fn auto_assign_family(
        &self,
        args: &AutoAssignArgs,
        version: u8,
    ) -> (Option<Assignments>, Option<IpamError>) {
        let (num, requested, reserved) = if version == 4 {
            (args.num4, &args.ipv4_pools, args.host_reserved_v4.as_ref())
        } else {
            (args.num6, &args.ipv6_pools, args.host_reserved_v6.as_ref())
        };
        let affinity = AffinityOf::new(&args.hostname, args.intended_use);
        if let Some(done) =
            self.assign_from_view(args, version, num, requested, reserved, &affinity)
        {
            return done;
        }
        // One round trip for what every assignment reads: the host's
        // affinities, the config and the handle.
        let prefix = crate::store::host_prefix(&affinity.host, Some(version));
        let handle_key = args.handle.as_deref().map(crate::store::handle_key);
        let mut reads = vec![Read::Prefix(&prefix), Read::Key(crate::store::CONFIG_KEY)];
        if let Some(k) = &handle_key {
            reads.push(Read::Key(k));
        }
        // The blocks this host had last time, read in the same round trip.
        let cached = self
            .cache
            .map(|c| c.blocks(&affinity.host, version))
            .unwrap_or_default();
        let cached_keys: Vec<String> = cached.iter().map(crate::store::block_key).collect();
        let first_cached = reads.len();
        reads.extend(cached_keys.iter().map(|k| Read::Key(k)));
        let read = match self.store.read(&reads) {
            Ok(r) => r,
            Err(e) => return (None, Some(e.into())),
        };
        let parsed = (|| -> Result<_, StoreError> {
            let (config, _) = records::config_of(read[1].first())?;
            let handle = match (&handle_key, read.get(2)) {
                (Some(_), Some(e)) => records::handle_of(e.first())?,
                _ => None,
            };
            let mut prefetched = BTreeMap::new();
            for (cidr, got) in cached.iter().zip(&read[first_cached..]) {
                if let Some(e) = got.first() {
                    let b = Block::from_json(&e.value).map_err(|m| StoreError::Corrupt {
                        key: e.key.clone(),
                        message: m,
                    })?;
                    prefetched.insert(*cidr, (b, e.revision));
                }
            }
            Ok((config, handle, prefetched))
        })();
        let (config, handle_read, mut prefetched) = match parsed {
            Ok(p) => p,
            Err(e) => return (None, Some(e.into())),
        };
        let host_blocks = records::host_blocks_of(&affinity.host, &read[0]);
        if let Some(c) = self.cache {
            let config_revision = read[1].first().map(|e| e.revision);
            c.set_view(
                &affinity.host,
                version,
                Some(HostView {
                    config,
                    config_revision,
                    affinities: host_blocks.clone(),
                }),
            );
            for (b, r) in prefetched.values() {
                c.note_block(b.cidr(), Some((b, *r)));
            }
        }
        let query = PoolQuery::of(args, version, requested, reserved);
        let (pools, affine) = match self.prepare(&query, host_blocks) {
            Ok(p) => p,
            Err(e) => return (None, Some(e)),
        };
        if let Some(c) = self.cache {
            c.remember(
                &affinity.host,
                version,
                affine.iter().map(|(b, _)| *b).collect(),
            );
        }
        let mut owned = affine.len() as u32;
        if args.windows && !config.strict_affinity {
            return (None, Some(IpamError::StrictAffinityRequired));
        }
        // The handle as read, for the first commit; later ones re-read it.
        let mut handle_hint = Some(handle_read);
        let mut limit = args.max_blocks_per_host;
        if config.max_blocks_per_host > 0 && (limit == 0 || limit > config.max_blocks_per_host) {
            limit = config.max_blocks_per_host;
        }
        if limit == 0 {
            limit = DEFAULT_BLOCK_LIMIT;
        }
        let mut ia = Assignments {
            ips: Vec::new(),
            version,
            requested: num,
            host_reserved: reserved.cloned(),
            msgs: Vec::new(),
        };
        if let (Some(h), true) = (&args.handle, args.max_alloc_per_handle > 0) {
            match self.ips_of_handle_in_family(h, version) {
                Ok(held) if held.len() >= args.max_alloc_per_handle => {
                    ia.ips = held.into_iter().take(num).collect();
                    return (Some(ia), None);
                }
                Ok(_) => {}
                Err(e) => return (Some(ia), Some(e)),
            }
        }
        let mut remaining: VecDeque<(IpNet, Revision)> = affine.into();
        let handle = args.handle.as_deref();
        // Each round either assigns or consumes an affine block or a claim;
        // the bound only guards against a store that keeps changing.
        let mut rounds = 0;
        while ia.ips.len() < num && rounds < 10 * RETRIES {
            rounds += 1;
            let allow_new = owned < limit;
            let found = self.find_or_claim_block(
                &mut remaining,
                &mut prefetched,
                &pools,
                1,
                allow_new,
                &config,
                reserved,
                &affinity,
            );
            let found = match found {
                Ok(f) => f,
                Err(IpamError::NoFreeBlocks) => {
                    if config.strict_affinity {
                        ia.add_msg("No more free affine blocks and strict affinity enabled".into());
                    }
                    break;
                }
                Err(IpamError::BlockLimit) => {
                    ia.add_msg(format!(
                        "Need to allocate an IPAM block but could not - limit of {limit} blocks reached for this node"
                    ));
                    return (Some(ia), Some(IpamError::BlockLimit));
                }
                Err(e) => return (Some(ia), Some(e)),
            };
            if found.newly_claimed {
                owned += 1;
                // The host's affinities changed: read them next time.
                if let Some(c) = self.cache {
                    c.set_view(&affinity.host, version, None);
                }
            }
            let rem = num - ia.ips.len();
            let check = config.strict_affinity.then_some(&affinity);
            match self.assign_retrying(
                found.block,
                found.revision,
                rem,
                handle,
                &args.attrs,
                check,
                &mut handle_hint,
            ) {
                Ok(ips) => ia.ips.extend(ips),
                Err(IpamError::Store(e)) => return (Some(ia), Some(e.into())),
                Err(_) => ia.add_msg("Failed to assign IPs in newly allocated block".into()),
            }
        }
        if ia.ips.len() < num
            && !config.strict_affinity
            && let Err(e) = self.borrow(
                &mut ia,
                num,
                &pools,
                &affinity,
                handle,
                &args.attrs,
                &mut handle_hint,
            )
        {
            return (Some(ia), Some(e));
        }
        (Some(ia), None)
    }

    /// Takes addresses from any block of the pools (strict affinity off).
    #[allow(clippy::too_many_arguments)]
    fn borrow(
        &self,
        ia: &mut Assignments,
        num: usize,
        pools: &[&Pool],
        affinity: &AffinityOf,
        handle: Option<&str>,
        attrs: &Labels,
        handle_hint: &mut HandleHint,
    ) -> Result<(), IpamError> {
        let existing: BTreeMap<IpNet, (Block, Revision)> = self
            .records()
            .blocks(Some(ia.version))?
            .into_iter()
            .map(|(b, r)| (b.cidr(), (b, r)))
            .collect();
        let mut exhausted = Vec::new();
        for pool in pools {
            if ia.ips.len() >= num {
                break;
            }
            // Walking every block of the pool and reading each is what
            // Calico does; only existing blocks can lend, so they are
            // visited in walk order instead.
            let walk = self.walk(pool, &affinity.host);
            let mut in_pool: Vec<(u128, &IpNet)> = existing
                .keys()
                .filter(|c| pool.contains(c.network()) && c.prefix_len() == pool.block_size)
                .map(|c| (walk.step_of(c), c))
                .collect();
            in_pool.sort();
            for (_, cidr) in in_pool {
                if ia.ips.len() >= num {
                    break;
                }
                if self.cluster.reserves_whole(cidr) {
                    continue;
                }
                let (block, revision) = existing[cidr].clone();
                let rem = num - ia.ips.len();
                match self.assign_retrying(block, revision, rem, handle, attrs, None, handle_hint) {
                    Ok(ips) => ia.ips.extend(ips),
                    Err(IpamError::Store(e)) => return Err(e.into()),
                    Err(_) => {}
                }
            }
            if ia.ips.len() < num {
                exhausted.push(pool.cidr.to_string());
            }
        }
        if !exhausted.is_empty() {
            ia.add_msg(format!(
                "No IPs available in pools: [{}]",
                exhausted.join(" ")
            ));
        }
        Ok(())
    }

    /// Assigns up to `num` addresses from a block, re-reading it when
    /// another writer got there first.
    #[allow(clippy::too_many_arguments)]
    fn assign_retrying(
        &self,
        mut block: Block,
        mut revision: Revision,
        num: usize,
        handle: Option<&str>,
        attrs: &Labels,
        affinity_check: Option<&AffinityOf>,
        handle_hint: &mut HandleHint,
    ) -> Result<Vec<IpNet>, IpamError> {
        for _ in 0..RETRIES {
            let cidr = block.cidr();
            let hint = handle_hint.take();
            match self.assign_from_block(block, revision, num, handle, attrs, affinity_check, hint)
            {
                Err(IpamError::Store(StoreError::Conflict { .. })) => {
                    match self.records().block(&cidr)? {
                        Some((b, r)) => (block, revision) = (b, r),
                        None => return Ok(Vec::new()),
                    }
                }
                other => return other,
            }
        }
        Err(IpamError::TooManyConflicts)
    }

    /// One commit: the block with its new allocations and the handle
    /// (`hint`: the handle as just read, if it was).
    #[allow(clippy::too_many_arguments)]
    fn assign_from_block(
        &self,
        mut block: Block,
        revision: Revision,
        num: usize,
        handle: Option<&str>,
        attrs: &Labels,
        affinity_check: Option<&AffinityOf>,
        hint: Option<Option<(Handle, Revision)>>,
    ) -> Result<Vec<IpNet>, IpamError> {
        if let (Some(want), Some(have)) = (affinity_check, &block.affinity)
            && *have != want.text
        {
            return Err(IpamError::AffinityMismatch {
                have: have.clone(),
                want: want.text.clone(),
            });
        }
        let ips = block.auto_assign(num, handle, attrs, |ip| self.cluster.is_reserved(ip));
        if ips.is_empty() {
            return Ok(Vec::new());
        }
        // The handle first: a store that applies writes one by one (the
        // Kubernetes API) then never shows an address in a block that its
        // handle does not count (a count too high is what release mends).
        let mut writes = Vec::new();
        if let Some(h) = handle {
            let current = match hint {
                Some(read) => read,
                None => self.records().handle(h)?,
            };
            writes.extend(handle_change(h, current, &block.cidr(), ips.len() as isize));
        }
        writes.push(records::put_block(&mut block, Some(revision)));
        self.commit_noting(&writes, Some(&block))?;
        let prefix = block.cidr().prefix_len();
        Ok(ips
            .into_iter()
            .filter_map(|ip| IpNet::new(ip, prefix).ok())
            .collect())
    }

    /// The write that adds `delta` addresses in `block` to handle `id`.
    pub(crate) fn handle_delta(
        &self,
        id: &str,
        block: &IpNet,
        delta: isize,
    ) -> Result<Option<Write>, IpamError> {
        Ok(handle_change(id, self.records().handle(id)?, block, delta))
    }

    fn ips_of_handle_in_family(&self, handle: &str, version: u8) -> Result<Vec<IpNet>, IpamError> {
        match self.ips_by_handle(handle) {
            Ok(ips) => Ok(ips.into_iter().filter(|n| family(n) == version).collect()),
            Err(IpamError::HandleNotFound(_)) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Calico's `AssignIP`.
    pub fn assign_ip(&self, args: &AssignIpArgs) -> Result<(), IpamError> {
        let pool = self
            .cluster
            .enabled_pool_for(args.ip)
            .ok_or(IpamError::NotInAnyPool(args.ip))?;
        if let Some(u) = args.intended_use
            && !pool.allowed_uses.contains(&u)
        {
            return Err(IpamError::UseNotAllowed {
                ip: args.ip,
                pool: pool.name.clone(),
                usage: u,
                allowed: pool.allowed_uses.clone(),
            });
        }
        let (config, _) = self.records().config()?;
        let block_cidr = pool
            .block_of(args.ip)
            .ok_or(IpamError::NotInAnyPool(args.ip))?;
        let version = crate::cluster::ip_family(&args.ip);
        if let (Some(h), true) = (&args.handle, args.max_alloc_per_handle > 0) {
            let held = self.ips_of_handle_in_family(h, version)?;
            if held.len() >= args.max_alloc_per_handle {
                if held.iter().any(|n| n.addr() == args.ip) {
                    return Ok(());
                }
                return Err(IpamError::MaxAllocReached {
                    handle: h.clone(),
                    ip: args.ip,
                    max: args.max_alloc_per_handle,
                });
            }
        }
        let affinity = AffinityOf::new(&args.hostname, args.intended_use.unwrap_or(Use::Workload));
        for _ in 0..RETRIES {
            let (mut block, revision) = match self.records().block(&block_cidr)? {
                Some(found) => found,
                None => match self.claim_block(&block_cidr, &affinity, args.host_reserved.as_ref())
                {
                    Ok(f) => (f.block, f.revision),
                    Err(IpamError::ClaimConflict(_))
                    | Err(IpamError::Store(StoreError::Conflict { .. })) => continue,
                    Err(e) => return Err(e),
                },
            };
            if config.strict_affinity
                && let Some(have) = &block.affinity
                && *have != affinity.text
            {
                return Err(IpamError::AffinityMismatch {
                    have: have.clone(),
                    want: affinity.text.clone(),
                });
            }
            if let Err(e) = block.assign(args.ip, args.handle.as_deref(), &args.attrs) {
                let same_handle = block
                    .allocation(args.ip)
                    .is_some_and(|a| a.handle.is_some() && a.handle == args.handle);
                if args.max_alloc_per_handle > 0 && same_handle {
                    return Ok(());
                }
                return Err(match e {
                    crate::block::BlockError::InUse(ip) => IpamError::AddressInUse(ip),
                    _ => IpamError::NotInAnyPool(args.ip),
                });
            }
            // The handle first, as in auto-assignment.
            let mut writes = Vec::new();
            if let Some(h) = &args.handle {
                writes.extend(self.handle_delta(h, &block_cidr, 1)?);
            }
            writes.push(records::put_block(&mut block, Some(revision)));
            match self.store.commit(&writes) {
                Ok(()) => return Ok(()),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(IpamError::TooManyConflicts)
    }

    /// Calico's `EnsureBlock`: the host's block of each family whose host
    /// reservation is given (claiming one if it has none).
    pub fn ensure_block(
        &self,
        args: &EnsureBlockArgs,
    ) -> Result<(Option<IpNet>, Option<IpNet>), IpamError> {
        let mut v4 = None;
        let mut v6 = None;
        if let Some(r) = &args.host_reserved_v4 {
            if args.ipv4_pools.iter().any(|p| family(p) != 4) {
                return Err(IpamError::MixedFamilyPools(4, 6));
            }
            v4 = Some(self.ensure_family(r, &args.ipv4_pools, 4, &args.hostname, args.windows)?);
        }
        if let Some(r) = &args.host_reserved_v6 {
            if args.ipv6_pools.iter().any(|p| family(p) != 6) {
                return Err(IpamError::MixedFamilyPools(6, 4));
            }
            v6 = Some(self.ensure_family(r, &args.ipv6_pools, 6, &args.hostname, args.windows)?);
        }
        Ok((v4, v6))
    }

    fn ensure_family(
        &self,
        reserved: &HostReserved,
        requested: &[IpNet],
        version: u8,
        host: &str,
        windows: bool,
    ) -> Result<IpNet, IpamError> {
        let host_blocks = self.records().host_blocks(host, Some(version))?;
        let query = PoolQuery {
            requested,
            version,
            host,
            reserved: Some(reserved),
            usage: Use::Workload,
            namespace: None,
        };
        let (pools, affine) = self.prepare(&query, host_blocks)?;
        let (config, _) = self.config_for(windows)?;
        let affinity = AffinityOf::new(host, Use::Workload);
        let found = self.find_or_claim_block(
            &mut affine.into(),
            &mut BTreeMap::new(),
            &pools,
            0,
            true,
            &config,
            Some(reserved),
            &affinity,
        )?;
        Ok(found.block.cidr())
    }
}

/// An EnsureBlock request (Calico's `BlockArgs`).
#[derive(Debug, Clone, Default)]
pub struct EnsureBlockArgs {
    /// The node.
    pub hostname: String,
    /// IPv4 pools to use.
    pub ipv4_pools: Vec<IpNet>,
    /// IPv6 pools to use.
    pub ipv6_pools: Vec<IpNet>,
    /// IPv4 host reservation (the family is handled only when given).
    pub host_reserved_v4: Option<HostReserved>,
    /// IPv6 host reservation.
    pub host_reserved_v6: Option<HostReserved>,
    /// Calico's Windows path.
    pub windows: bool,
}
