//! The zero-trust compiler: identities, selector bitmaps, peer
//! classification and decision programs, maintained incrementally.
//!
//! ```
//! use policy_core::compile::{Compiler, CompileOptions};
//! use policy_core::manifest::parse_manifests;
//! use policy_core::{Change, Direction, EndpointKey, Engine, Flow};
//! use policy_core::net::Protocol;
//!
//! let yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
//! apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: a, labels: {app: web}}\nstatus: {podIP: 10.0.0.1}\n---\n\
//! apiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: a, labels: {app: db}}\nstatus: {podIP: 10.0.0.2}\n---\n\
//! apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: db, namespace: a}\n\
//! spec: {selector: app == 'db', ingress: [{action: Allow, source: {selector: app == 'web'}}]}\n";
//! let changes = parse_manifests("x.yaml", yaml).unwrap()
//!     .into_iter().map(|l| Change::Upsert(l.object)).collect();
//! let mut c = Compiler::new(CompileOptions::default());
//! let delta = c.apply(changes).unwrap();
//! assert!(!delta.programs.is_empty());
//! let flow = Flow::ports("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), Protocol::TCP, 40000, 5432);
//! let d = c.decide(&EndpointKey::new("a", "db"), Direction::Ingress, &flow).unwrap();
//! assert_eq!(d.to_string(), "allow by tier default, np:a/db, rule 0 (allow)");
//! ```

pub mod bits;
pub mod index;
pub mod interner;
pub mod program;
mod programs;
mod queries;
mod refresh;
mod residual;

use std::collections::{BTreeMap, BTreeSet};

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use rayon::prelude::*;

use crate::cluster::{Applied, Change, Cluster};
use crate::connection::{Engine, EngineError};
use crate::convert::Object;
use crate::error::Error;
use crate::flow::{DecidedBy, Decision, Flow};
use crate::model::*;
use crate::net::{IpVersion, Protocol};
use crate::selector::Selector;

pub use bits::{Bits, Tracked};
pub use index::{IdentityKey, LabelId};
use interner::Interner;
pub use program::{Bit, Feature, Features, Leaf, Next, Node, Program, RuleId, Test};
pub use queries::{InvariantViolations, flow_features};

/// Id of a program in the compiled state.
pub type ProgramId = u32;
/// Id of an address class (CIDR memberships).
pub type ClassId = u32;
/// Identity numbers at or above this are unions of identities sharing one address.
pub const UNION_IDENTITY_BASE: u32 = 1 << 31;

/// What a leaf's rule id stands for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuleRef {
    /// A rule of a tiered policy.
    Policy {
        /// Tier.
        tier: String,
        /// Policy.
        policy: PolicyId,
        /// Direction of the rule list.
        direction: Direction,
        /// Index in it.
        index: usize,
        /// Its action.
        action: Action,
    },
    /// The end of a tier (default action Deny).
    TierDefault {
        /// Tier.
        tier: String,
    },
    /// A profile rule.
    Profile {
        /// Profile.
        profile: String,
        /// Direction.
        direction: Direction,
        /// Index.
        index: usize,
        /// Action (Pass counts as deny).
        action: Action,
    },
    /// Nothing allowed the packet.
    NoProfileMatch,
}

impl RuleRef {
    /// As a [`DecidedBy`].
    pub fn decided_by(&self) -> DecidedBy {
        match self {
            RuleRef::Policy {
                tier,
                policy,
                index,
                action,
                ..
            } => DecidedBy::Rule {
                tier: tier.clone(),
                policy: policy.clone(),
                rule: *index,
                action: *action,
            },
            RuleRef::TierDefault { tier } => DecidedBy::TierDefault { tier: tier.clone() },
            RuleRef::Profile {
                profile,
                index,
                action,
                ..
            } => DecidedBy::Profile {
                profile: profile.clone(),
                rule: *index,
                action: *action,
            },
            RuleRef::NoProfileMatch => DecidedBy::NoProfileMatch,
        }
    }
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleRef::Policy {
                policy,
                direction,
                index,
                action,
                tier,
            } => write!(f, "{tier}/{policy}/{direction}[{index}] {action}"),
            RuleRef::TierDefault { tier } => write!(f, "{tier}/end-of-tier deny"),
            RuleRef::Profile {
                profile,
                direction,
                index,
                action,
            } => write!(f, "profile {profile}/{direction}[{index}] {action}"),
            RuleRef::NoProfileMatch => f.write_str("no-profile-match deny"),
        }
    }
}

/// A set of peer addresses a rule tests, given one membership bit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerSetKey {
    /// Addresses of selected endpoints and CIDRs of selected network sets.
    Selector(Selector),
    /// A list of CIDRs (of one IP version).
    Nets(Vec<IpNet>),
    /// Addresses of endpoints (selected by `selector`, if any) declaring a
    /// port `name` as `protocol`/`port`.
    NamedPort {
        /// Port name.
        name: String,
        /// The rule side's positive selector.
        selector: Option<Selector>,
        /// Declared protocol.
        protocol: Protocol,
        /// Declared port.
        port: u16,
    },
}

impl fmt::Display for PeerSetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerSetKey::Selector(s) => write!(f, "sel({s})"),
            PeerSetKey::Nets(n) => {
                let v: Vec<String> = n.iter().map(ToString::to_string).collect();
                write!(f, "nets({})", v.join(","))
            }
            PeerSetKey::NamedPort {
                name,
                selector,
                protocol,
                port,
            } => match selector {
                Some(s) => write!(f, "port({name}={protocol}/{port} in {s})"),
                None => write!(f, "port({name}={protocol}/{port})"),
            },
        }
    }
}

/// An LPM entry for an endpoint address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostEntry {
    /// Identity (or union identity) of the endpoint(s) at the address.
    pub identity: u32,
    /// CIDR memberships of the address.
    pub class: ClassId,
}

/// Where an endpoint's program is attached: one of its addresses, in one
/// direction. Ordered by endpoint, address, direction.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot {
    /// The endpoint.
    pub endpoint: EndpointKey,
    /// One of its addresses.
    pub addr: IpAddr,
    /// Ingress or egress.
    pub direction: Direction,
}

/// The map writes a batch of changes implies. `None` values are deletions.
/// The lowering applies new entries first, then switches slots, then deletes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    /// Programs added (with content) or removed.
    pub programs: BTreeMap<ProgramId, Option<Arc<Program>>>,
    /// Endpoint slots whose program changed.
    pub slots: BTreeMap<Slot, Option<ProgramId>>,
    /// Identity membership bitsets.
    pub identities: BTreeMap<u32, Option<Bits>>,
    /// Address classes (CIDR membership bitsets).
    pub classes: BTreeMap<ClassId, Option<Bits>>,
    /// LPM entries for CIDRs.
    pub prefixes: BTreeMap<IpNet, Option<ClassId>>,
    /// LPM entries for endpoint addresses.
    pub hosts: BTreeMap<IpAddr, Option<HostEntry>>,
    /// Rule ids and what they stand for.
    pub rules: BTreeMap<RuleId, Option<RuleRef>>,
}

impl Delta {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.programs.is_empty()
            && self.slots.is_empty()
            && self.identities.is_empty()
            && self.classes.is_empty()
            && self.prefixes.is_empty()
            && self.hosts.is_empty()
            && self.rules.is_empty()
    }

    /// Number of map entries written or deleted (program nodes counted).
    pub fn writes(&self) -> usize {
        self.programs
            .values()
            .map(|p| p.as_ref().map_or(1, |p| p.nodes.len() + p.leaves.len()))
            .sum::<usize>()
            + self.slots.len()
            + self.identities.len()
            + self.classes.len()
            + self.prefixes.len()
            + self.hosts.len()
            + self.rules.len()
    }
}

/// Which endpoints to compile programs for.
#[derive(Debug, Clone, Default)]
pub struct CompileOptions {
    /// Only endpoints on this node (felix's active policies); `None`: every endpoint.
    pub node: Option<String>,
}

/// Compilation statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Endpoints known.
    pub endpoints: usize,
    /// Endpoints with programs (local).
    pub local_endpoints: usize,
    /// Identities.
    pub identities: usize,
    /// Selectors with bitmaps.
    pub selectors: usize,
    /// Distinct policy sets (identity x direction lists).
    pub policy_sets: usize,
    /// Live peer sets, one membership bit each.
    pub peer_sets: usize,
    /// Width of the membership rows in bits (highest bit in use + 1): bits
    /// freed by peer sets that went are reused before the width grows, so
    /// this is at least `peer_sets`.
    pub membership_bits: usize,
    /// Distinct peer classes (identity bits plus address class, over known addresses).
    pub peer_classes: usize,
    /// Address classes.
    pub address_classes: usize,
    /// Distinct programs.
    pub programs: usize,
    /// Total nodes of all programs.
    pub program_nodes: usize,
    /// Deepest program walk.
    pub max_depth: usize,
    /// LPM entries (prefixes + hosts).
    pub lpm_entries: usize,
    /// Rule ids.
    pub rule_ids: usize,
    /// Map entries the lowering writes.
    pub lowered_entries: usize,
}

#[derive(Debug, Clone)]
struct EpState {
    label: LabelId,
    ips: Vec<IpAddr>,
    local: bool,
    profiles: Vec<String>,
}

#[derive(Debug, Clone)]
struct PeerSet {
    bit: Bit,
    refs: u32,
    cidrs: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ProgramKey {
    label: LabelId,
    direction: Direction,
    version: IpVersion,
    /// Present when rules test the local address (or it is shared).
    ip: Option<IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Owner {
    Policy,
    Profile,
}

/// Dirty sets of one batch.
#[derive(Debug, Default)]
struct Work {
    endpoints: BTreeSet<EndpointKey>,
    netsets: BTreeSet<(Option<String>, String)>,
    policies: BTreeSet<PolicyId>,
    profiles: BTreeSet<String>,
    /// Identities whose policy sets must be recomputed.
    policy_sets: HashSet<LabelId>,
    /// Identities whose programs must be recomputed.
    labels: HashSet<LabelId>,
    /// Endpoints whose slots must be recomputed.
    slots: BTreeSet<EndpointKey>,
    /// Named ports whose realisations changed.
    named_ports: BTreeSet<String>,
    /// Address ranges whose classes must be recomputed.
    ranges: Vec<IpNet>,
    /// Addresses whose host entries must be recomputed.
    hosts: BTreeSet<IpAddr>,
}

/// A prefix in sort order (see [`net_key`]).
type NetKey = (u8, u128, u8);
/// A registered prefix and how many peer sets give it each bit.
type PrefixBits = (IpNet, HashMap<Bit, u32>);

/// Sort key of a prefix: family, address, length (so a CIDR's sub-prefixes
/// are a contiguous range).
fn net_key(n: &IpNet) -> (u8, u128, u8) {
    match n {
        IpNet::V4(v) => (4, u128::from(u32::from(v.network())), v.prefix_len()),
        IpNet::V6(v) => (6, u128::from(v.network()), v.prefix_len()),
    }
}

fn addr_key(a: &IpAddr) -> (u8, u128) {
    match a {
        IpAddr::V4(v) => (4, u128::from(u32::from(*v))),
        IpAddr::V6(v) => (6, u128::from(*v)),
    }
}

fn range_of(n: &IpNet) -> ((u8, u128), (u8, u128)) {
    match n {
        IpNet::V4(v) => (
            (4, u128::from(u32::from(v.network()))),
            (4, u128::from(u32::from(v.broadcast()))),
        ),
        IpNet::V6(v) => ((6, u128::from(v.network())), (6, u128::from(v.broadcast()))),
    }
}

/// The compiler's state; see the module documentation.
#[derive(Debug)]
pub struct Compiler {
    opts: CompileOptions,
    cluster: Cluster,
    ids: index::Identities,
    selectors: index::Selectors,
    endpoints: HashMap<EndpointKey, EpState>,
    identity_eps: HashMap<LabelId, BTreeSet<EndpointKey>>,
    local_count: HashMap<LabelId, u32>,
    netsets: HashMap<(Option<String>, String), (LabelMap, Vec<IpNet>)>,
    policy_selector: HashMap<PolicyId, Selector>,
    selector_policies: HashMap<Selector, BTreeSet<PolicyId>>,
    policy_local_side: HashMap<PolicyId, [bool; 2]>,
    policy_sets: HashMap<(LabelId, Direction), Arc<Vec<PolicyId>>>,
    policy_users: HashMap<PolicyId, HashSet<LabelId>>,
    profile_users: HashMap<String, HashSet<LabelId>>,
    named_port_users: HashMap<String, HashSet<(Owner, String)>>,
    owner_named_ports: HashMap<(Owner, String), Vec<String>>,
    realizations: HashMap<String, BTreeMap<(Protocol, u16), u32>>,
    peer_sets: HashMap<PeerSetKey, PeerSet>,
    bit_owner: Vec<Option<PeerSetKey>>,
    free_bits: Vec<Bit>,
    selector_bit: HashMap<Selector, Bit>,
    np_by_realization: HashMap<(String, Protocol, u16), HashSet<PeerSetKey>>,
    id_bits: Tracked<u32, Bits>,
    prefix_bits: BTreeMap<NetKey, PrefixBits>,
    prefix_class: Tracked<IpNet, ClassId>,
    hosts: BTreeMap<(u8, u128), (IpAddr, Vec<EndpointKey>)>,
    host_entries: Tracked<IpAddr, HostEntry>,
    /// Identities of addresses that several label sets share.
    unions: Interner<Vec<LabelId>>,
    /// Address classes by their CIDR memberships; `classes` mirrors them for the delta.
    class_ids: Interner<Bits>,
    classes: Tracked<ClassId, Bits>,
    program_of_key: HashMap<ProgramKey, ProgramId>,
    keys_of_label: HashMap<LabelId, HashSet<ProgramKey>>,
    /// Programs by content, referenced once per slot; `programs` mirrors them for the delta.
    program_ids: Interner<Arc<Program>>,
    programs: Tracked<ProgramId, Arc<Program>>,
    program_sets: HashMap<ProgramId, Vec<PeerSetKey>>,
    program_rules: HashMap<ProgramId, Vec<RuleId>>,
    slots: Tracked<Slot, ProgramId>,
    /// Rule references, held by the programs whose leaves name them; `rules` mirrors them for the delta.
    rule_ids: Interner<RuleRef>,
    rules: Tracked<RuleId, RuleRef>,
    pending_ranges: Vec<IpNet>,
    profile_eps: HashMap<String, BTreeSet<EndpointKey>>,
    profile_cache: HashMap<String, Option<Arc<Profile>>>,
    policy_arcs: HashMap<PolicyId, Arc<Policy>>,
    netsets_by_ns: HashMap<String, BTreeSet<(Option<String>, String)>>,
    keys_of_program: HashMap<ProgramId, HashSet<ProgramKey>>,
    ep_slots: HashMap<EndpointKey, Vec<Slot>>,
}

impl Compiler {
    /// An empty compiler.
    pub fn new(opts: CompileOptions) -> Self {
        let mut c = Self {
            opts,
            cluster: Cluster::new(),
            ids: Default::default(),
            selectors: Default::default(),
            endpoints: HashMap::default(),
            identity_eps: HashMap::default(),
            local_count: HashMap::default(),
            netsets: HashMap::default(),
            policy_selector: HashMap::default(),
            selector_policies: HashMap::default(),
            policy_local_side: HashMap::default(),
            policy_sets: HashMap::default(),
            policy_users: HashMap::default(),
            profile_users: HashMap::default(),
            named_port_users: HashMap::default(),
            owner_named_ports: HashMap::default(),
            realizations: HashMap::default(),
            peer_sets: HashMap::default(),
            bit_owner: Vec::new(),
            free_bits: Vec::new(),
            selector_bit: HashMap::default(),
            np_by_realization: HashMap::default(),
            id_bits: Tracked::default(),
            prefix_bits: BTreeMap::new(),
            prefix_class: Tracked::default(),
            hosts: BTreeMap::new(),
            host_entries: Tracked::default(),
            unions: Interner::new(UNION_IDENTITY_BASE),
            class_ids: Interner::new(1),
            classes: Tracked::default(),
            program_of_key: HashMap::default(),
            keys_of_label: HashMap::default(),
            program_ids: Interner::new(1),
            programs: Tracked::default(),
            program_sets: HashMap::default(),
            program_rules: HashMap::default(),
            slots: Tracked::default(),
            rule_ids: Interner::new(1),
            rules: Tracked::default(),
            pending_ranges: Vec::new(),
            profile_eps: HashMap::default(),
            profile_cache: HashMap::default(),
            policy_arcs: HashMap::default(),
            netsets_by_ns: HashMap::default(),
            keys_of_program: HashMap::default(),
            ep_slots: HashMap::default(),
        };
        // Class 0: no CIDR memberships. Always present.
        c.class_ids.insert_permanent(0, Bits::new());
        c.classes.insert(0, Bits::new());
        c.classes.take_changes();
        c
    }

    /// Compiles a cluster from scratch (one batch).
    pub fn from_cluster(cluster: &Cluster, opts: CompileOptions) -> Result<(Self, Delta), Error> {
        let mut c = Self::new(opts);
        let mut objects: Vec<Change> = Vec::new();
        objects.extend(
            cluster
                .tiers()
                .cloned()
                .map(|t| Change::Upsert(Object::Tier(t))),
        );
        objects.extend(
            cluster
                .namespaces()
                .cloned()
                .map(|n| Change::Upsert(Object::Namespace(n))),
        );
        objects.extend(
            cluster
                .service_accounts()
                .cloned()
                .map(|s| Change::Upsert(Object::ServiceAccount(s))),
        );
        objects.extend(
            cluster
                .explicit_profiles()
                .cloned()
                .map(|p| Change::Upsert(Object::Profile(p))),
        );
        objects.extend(
            cluster
                .network_sets()
                .cloned()
                .map(|n| Change::Upsert(Object::NetworkSet(n))),
        );
        objects.extend(
            cluster
                .endpoint_slices()
                .cloned()
                .map(|s| Change::Upsert(Object::EndpointSlice(s))),
        );
        objects.extend(
            cluster
                .policies()
                .filter_map(|p| cluster.policy_as_written(&p.id))
                .cloned()
                .map(|p| Change::Upsert(Object::Policy(p))),
        );
        objects.extend(
            cluster
                .endpoints()
                .cloned()
                .map(|e| Change::Upsert(Object::Endpoint(e))),
        );
        let d = c.apply(objects)?;
        Ok((c, d))
    }

    /// The cluster state the compiled form reflects.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Applies a batch; returns the map writes it implies. A rejected batch
    /// changes nothing.
    pub fn apply(&mut self, changes: Vec<Change>) -> Result<Delta, Error> {
        self.apply_undoable(changes).map(|(delta, _)| delta)
    }

    /// [`Compiler::apply`], also returning the changes that put the cluster
    /// back as it was (applied in order): a caller whose later step fails
    /// undoes the batch without having copied the whole cluster first.
    pub fn apply_undoable(&mut self, changes: Vec<Change>) -> Result<(Delta, Vec<Change>), Error> {
        let applied = self.cluster.apply(changes)?;
        let undo = applied
            .iter()
            .rev()
            .filter(|a| !a.derived)
            .filter_map(|a| match (&a.old, &a.new) {
                (Some(old), _) => Some(Change::Upsert(old.clone())),
                (None, Some(new)) => Some(Change::Delete(new.object_ref())),
                (None, None) => None,
            })
            .collect();
        let mut w = Work::default();
        for a in &applied {
            self.note_change(a, &mut w);
        }
        let eps: Vec<EndpointKey> = std::mem::take(&mut w.endpoints).into_iter().collect();
        for k in eps {
            self.refresh_endpoint(&k, &mut w);
        }
        let sets: Vec<_> = std::mem::take(&mut w.netsets).into_iter().collect();
        for k in sets {
            self.refresh_netset(&k, &mut w);
        }
        let pols: Vec<PolicyId> = std::mem::take(&mut w.policies).into_iter().collect();
        for p in &pols {
            self.refresh_policy(p, &mut w);
        }
        for name in std::mem::take(&mut w.profiles) {
            self.refresh_profile(&name, &mut w);
        }
        for name in std::mem::take(&mut w.named_ports) {
            self.invalidate_named_port(&name, &mut w);
        }
        let labels: Vec<LabelId> = w.policy_sets.drain().collect();
        for l in labels {
            self.refresh_policy_sets(l, &mut w);
        }
        self.refresh_programs(&mut w);
        self.refresh_classes(&mut w);
        Ok((self.take_delta(), undo))
    }

    fn note_change(&mut self, a: &Applied, w: &mut Work) {
        for obj in [&a.old, &a.new].into_iter().flatten() {
            // Namespaces and service accounts reach endpoints through the
            // profiles Calico derives from them.
            let profile = match obj {
                Object::Endpoint(e) => {
                    w.endpoints.insert(e.key.clone());
                    None
                }
                Object::Namespace(n) => {
                    if let Some(sets) = self.netsets_by_ns.get(&n.name) {
                        w.netsets.extend(sets.iter().cloned());
                    }
                    for s in self.cluster.network_sets() {
                        if s.namespace.as_deref() == Some(&n.name) {
                            w.netsets.insert((s.namespace.clone(), s.name.clone()));
                        }
                    }
                    Some(format!("{NAMESPACE_PROFILE_PREFIX}{}", n.name))
                }
                Object::ServiceAccount(s) => Some(format!(
                    "{SERVICE_ACCOUNT_PROFILE_PREFIX}{}.{}",
                    s.namespace, s.name
                )),
                Object::Profile(p) => Some(p.name.clone()),
                Object::NetworkSet(n) => {
                    w.netsets.insert((n.namespace.clone(), n.name.clone()));
                    None
                }
                Object::Node(n) => {
                    let set = n.address_set();
                    w.netsets.insert((set.namespace, set.name));
                    None
                }
                Object::Policy(p) => {
                    w.policies.insert(p.id.clone());
                    None
                }
                Object::Tier(t) => {
                    for p in self.cluster.policies() {
                        if p.tier == t.name {
                            w.policies.insert(p.id.clone());
                        }
                    }
                    None
                }
                // Policies whose Service matches it changed arrive as
                // derived policy changes of their own.
                Object::EndpointSlice(_) => None,
            };
            if let Some(name) = profile {
                self.profile_cache.remove(&name);
                if let Some(eps) = self.profile_eps.get(&name) {
                    w.endpoints.extend(eps.iter().cloned());
                }
                w.profiles.insert(name);
            }
        }
    }

    /// A profile by name (cached; invalidated by note_change).
    fn profile_of(&mut self, name: &str) -> Option<Arc<Profile>> {
        if let Some(p) = self.profile_cache.get(name) {
            return p.clone();
        }
        let p = self.cluster.profile(name).map(Arc::new);
        self.profile_cache.insert(name.to_string(), p.clone());
        p
    }

    fn is_local(&self, e: &Endpoint) -> bool {
        match &self.opts.node {
            None => true,
            Some(n) => e.node.as_deref() == Some(n.as_str()),
        }
    }
}
