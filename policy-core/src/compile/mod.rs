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
pub mod program;
mod residual;

use std::collections::{BTreeMap, BTreeSet};

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use rayon::prelude::*;

use crate::cluster::{Applied, Change, Cluster};
use crate::convert::Object;
use crate::error::Error;
use crate::flow::{DecidedBy, Decision, Engine, EngineError, Flow};
use crate::model::*;
use crate::net::{IpVersion, Protocol};
use crate::selector::Selector;

pub use bits::{Bits, Tracked};
pub use index::{IdentityKey, LabelId};
pub use program::{Bit, Feature, Features, Leaf, Next, Node, Program, RuleId, Test};

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

/// Where an endpoint's program is attached: endpoint, local address, direction.
pub type Slot = (EndpointKey, IpAddr, Direction);

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
    /// Peer sets (membership bits).
    pub peer_sets: usize,
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
    unions: HashMap<Vec<LabelId>, u32>,
    union_refs: HashMap<u32, u32>,
    next_union: u32,
    class_ids: HashMap<Bits, ClassId>,
    class_refs: HashMap<ClassId, u32>,
    classes: Tracked<ClassId, Bits>,
    next_class: ClassId,
    program_of_key: HashMap<ProgramKey, ProgramId>,
    keys_of_label: HashMap<LabelId, HashSet<ProgramKey>>,
    programs: Tracked<ProgramId, Arc<Program>>,
    program_refs: HashMap<ProgramId, u32>,
    program_sets: HashMap<ProgramId, Vec<PeerSetKey>>,
    program_rules: HashMap<ProgramId, Vec<RuleId>>,
    program_by_content: HashMap<Arc<Program>, ProgramId>,
    next_program: ProgramId,
    slots: Tracked<Slot, ProgramId>,
    rule_ids: HashMap<RuleRef, RuleId>,
    rule_refs: HashMap<RuleId, u32>,
    rules: Tracked<RuleId, RuleRef>,
    next_rule: RuleId,
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
            unions: HashMap::default(),
            union_refs: HashMap::default(),
            next_union: UNION_IDENTITY_BASE,
            class_ids: HashMap::default(),
            class_refs: HashMap::default(),
            classes: Tracked::default(),
            next_class: 1,
            program_of_key: HashMap::default(),
            keys_of_label: HashMap::default(),
            programs: Tracked::default(),
            program_refs: HashMap::default(),
            program_sets: HashMap::default(),
            program_rules: HashMap::default(),
            program_by_content: HashMap::default(),
            next_program: 1,
            slots: Tracked::default(),
            rule_ids: HashMap::default(),
            rule_refs: HashMap::default(),
            rules: Tracked::default(),
            next_rule: 1,
            pending_ranges: Vec::new(),
            profile_eps: HashMap::default(),
            profile_cache: HashMap::default(),
            policy_arcs: HashMap::default(),
            netsets_by_ns: HashMap::default(),
            keys_of_program: HashMap::default(),
            ep_slots: HashMap::default(),
        };
        // Class 0: no CIDR memberships. Always present.
        c.class_ids.insert(Bits::new(), 0);
        c.class_refs.insert(0, u32::MAX / 2);
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
                .policies()
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
        let applied = self.cluster.apply(changes)?;
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
        Ok(self.take_delta())
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

    fn identity_added(&mut self, l: LabelId, w: &mut Work) {
        let key = self.ids.key(l).clone();
        let matched = self.selectors.add_identity(l, &key.labels);
        let mut bits = Bits::new();
        for s in &matched {
            if let Some(b) = self.selector_bit.get(s) {
                bits.set(*b);
            }
        }
        for (name, proto, port) in &key.ports {
            if name.is_empty() {
                continue;
            }
            let r = (Protocol(*proto), *port);
            let count = self
                .realizations
                .entry(name.clone())
                .or_default()
                .entry(r)
                .or_insert(0);
            *count += 1;
            if *count == 1 {
                w.named_ports.insert(name.clone());
            }
            if let Some(sets) = self.np_by_realization.get(&(name.clone(), r.0, r.1)) {
                for k in sets {
                    if let PeerSetKey::NamedPort { selector, .. } = k
                        && selector.as_ref().is_none_or(|s| matched.contains(s))
                    {
                        bits.set(self.peer_sets[k].bit);
                    }
                }
            }
        }
        if !bits.is_empty() {
            self.id_bits.insert(l, bits);
        }
    }

    fn identity_removed(&mut self, l: LabelId, key: &IdentityKey, w: &mut Work) {
        self.selectors.remove_identity(l, &key.labels);
        self.id_bits.remove(&l);
        for (name, proto, port) in &key.ports {
            if name.is_empty() {
                continue;
            }
            if let Some(m) = self.realizations.get_mut(name) {
                let r = (Protocol(*proto), *port);
                if let Some(c) = m.get_mut(&r) {
                    *c -= 1;
                    if *c == 0 {
                        m.remove(&r);
                        w.named_ports.insert(name.clone());
                    }
                }
                if m.is_empty() {
                    self.realizations.remove(name);
                }
            }
        }
        for d in Direction::ALL {
            if let Some(set) = self.policy_sets.remove(&(l, d)) {
                for p in set.iter() {
                    if let Some(u) = self.policy_users.get_mut(p) {
                        u.remove(&l);
                    }
                }
            }
        }
        for p in &key.profiles {
            if let Some(u) = self.profile_users.get_mut(p) {
                u.remove(&l);
            }
        }
        self.forget_keys(l);
    }

    fn forget_keys(&mut self, l: LabelId) {
        if let Some(keys) = self.keys_of_label.remove(&l) {
            for k in keys {
                if let Some(pid) = self.program_of_key.remove(&k)
                    && let Some(set) = self.keys_of_program.get_mut(&pid)
                {
                    set.remove(&k);
                }
            }
        }
    }

    fn host_touch(&mut self, ip: IpAddr, ep: &EndpointKey, add: bool, w: &mut Work) {
        let k = addr_key(&ip);
        let entry = self.hosts.entry(k).or_insert_with(|| (ip, Vec::new()));
        if add {
            if !entry.1.contains(ep) {
                entry.1.push(ep.clone());
                entry.1.sort();
            }
        } else {
            entry.1.retain(|e| e != ep);
        }
        let shared = entry.1.len() > 1;
        if entry.1.is_empty() {
            self.hosts.remove(&k);
        }
        w.hosts.insert(ip);
        // Endpoints sharing an address resolve local matches together, so
        // their programs change when the sharing does.
        if let Some((_, eps)) = self.hosts.get(&k)
            && (shared || eps.len() == 1 && !add)
        {
            for e in eps.clone() {
                if let Some(st) = self.endpoints.get(&e) {
                    w.labels.insert(st.label);
                }
                w.slots.insert(e);
            }
        }
    }

    fn refresh_endpoint(&mut self, key: &EndpointKey, w: &mut Work) {
        let old = self.endpoints.remove(key);
        let new = self.cluster.endpoint(key).cloned();
        if let Some(old) = &old {
            for ip in old.ips.clone() {
                self.host_touch(ip, key, false, w);
            }
            if let Some(set) = self.identity_eps.get_mut(&old.label) {
                set.remove(key);
            }
            if old.local {
                let c = self.local_count.entry(old.label).or_insert(1);
                *c -= 1;
                if *c == 0 {
                    self.local_count.remove(&old.label);
                }
            }
            for p in &old.profiles {
                if let Some(set) = self.profile_eps.get_mut(p) {
                    set.remove(key);
                    if set.is_empty() {
                        self.profile_eps.remove(p);
                    }
                }
            }
            let okey = self.ids.key(old.label).clone();
            if self.ids.release(old.label) {
                self.identity_eps.remove(&old.label);
                self.identity_removed(old.label, &okey, w);
            }
            w.slots.insert(key.clone());
        }
        if let Some(ep) = new {
            let profiles = ep.profile_names();
            let mut cache: Vec<(String, Option<Arc<Profile>>)> = Vec::new();
            for p in &profiles {
                cache.push((p.clone(), self.profile_of(p)));
                self.profile_eps
                    .entry(p.clone())
                    .or_default()
                    .insert(key.clone());
            }
            let labels = crate::cluster::endpoint_labels_with(&ep, |name| {
                cache
                    .iter()
                    .find(|(n, _)| n == name)
                    .and_then(|(_, p)| p.as_ref())
                    .map(|p| &p.labels_to_apply)
            });
            let (l, fresh) =
                self.ids
                    .acquire(IdentityKey::new(labels, &ep.ports, profiles.clone()));
            if fresh {
                self.identity_added(l, w);
            }
            self.identity_eps.entry(l).or_default().insert(key.clone());
            let local = self.is_local(&ep);
            if local {
                let c = self.local_count.entry(l).or_insert(0);
                *c += 1;
                if *c == 1 {
                    w.policy_sets.insert(l);
                    for p in &profiles {
                        self.profile_users.entry(p.clone()).or_default().insert(l);
                    }
                }
            }
            let mut ips = ep.ips.clone();
            ips.sort();
            ips.dedup();
            self.endpoints.insert(
                key.clone(),
                EpState {
                    label: l,
                    ips: ips.clone(),
                    local,
                    profiles,
                },
            );
            for ip in ips {
                self.host_touch(ip, key, true, w);
            }
            w.slots.insert(key.clone());
        }
    }

    fn netset_cidrs_add(&mut self, nets: &[IpNet], bit: Bit, add: bool, w: &mut Work) {
        for n in nets {
            let k = net_key(n);
            let e = self
                .prefix_bits
                .entry(k)
                .or_insert_with(|| (*n, HashMap::default()));
            if add {
                *e.1.entry(bit).or_insert(0) += 1;
            } else if let Some(c) = e.1.get_mut(&bit) {
                *c -= 1;
                if *c == 0 {
                    e.1.remove(&bit);
                }
            }
            if e.1.is_empty() {
                self.prefix_bits.remove(&k);
            }
            w.ranges.push(*n);
        }
    }

    fn refresh_netset(&mut self, key: &(Option<String>, String), w: &mut Work) {
        let old = self.netsets.remove(key);
        let new = self
            .cluster
            .network_sets()
            .find(|s| s.namespace == key.0 && s.name == key.1)
            .map(|s| (self.cluster.network_set_labels(s), s.nets.clone()));
        let sel_sets: Vec<(Selector, Bit)> = self
            .selector_bit
            .iter()
            .map(|(s, b)| (s.clone(), *b))
            .collect();
        for (s, bit) in sel_sets {
            let was = old.as_ref().is_some_and(|(l, _)| s.matches(l));
            let now = new.as_ref().is_some_and(|(l, _)| s.matches(l));
            let pk = PeerSetKey::Selector(s.clone());
            if was {
                let nets = old.as_ref().map(|(_, n)| n.clone()).unwrap_or_default();
                self.netset_cidrs_add(&nets, bit, false, w);
                if let Some(ps) = self.peer_sets.get_mut(&pk) {
                    for n in &nets {
                        if let Some(i) = ps.cidrs.iter().position(|x| x == n) {
                            ps.cidrs.remove(i);
                        }
                    }
                }
            }
            if now {
                let nets = new.as_ref().map(|(_, n)| n.clone()).unwrap_or_default();
                self.netset_cidrs_add(&nets, bit, true, w);
                if let Some(ps) = self.peer_sets.get_mut(&pk) {
                    ps.cidrs.extend(nets.iter().copied());
                }
            }
        }
        // Local-side matches may depend on network sets: programs keyed by
        // address are recomputed.
        let ip_keyed: Vec<LabelId> = self
            .program_of_key
            .keys()
            .filter(|k| k.ip.is_some())
            .map(|k| k.label)
            .collect();
        w.labels.extend(ip_keyed);
        if let Some(ns) = &key.0 {
            let set = self.netsets_by_ns.entry(ns.clone()).or_default();
            if new.is_some() {
                set.insert(key.clone());
            } else {
                set.remove(key);
            }
        }
        if let Some(n) = new {
            self.netsets.insert(key.clone(), n);
        }
    }

    fn refresh_policy(&mut self, id: &PolicyId, w: &mut Work) {
        if let Some(old) = self.policy_selector.remove(id) {
            if let Some(bm) = self.selectors.bitmap(&old) {
                w.policy_sets
                    .extend(bm.iter().filter(|l| self.local_count.contains_key(l)));
            }
            if let Some(s) = self.selector_policies.get_mut(&old) {
                s.remove(id);
                if s.is_empty() {
                    self.selector_policies.remove(&old);
                }
            }
            self.selectors.release(&old);
        }
        self.policy_local_side.remove(id);
        self.policy_arcs.remove(id);
        self.set_named_ports((Owner::Policy, id.to_string()), Vec::new());
        if let Some(users) = self.policy_users.get(id) {
            w.labels.extend(users.iter().copied());
            w.policy_sets.extend(users.iter().copied());
        }
        let Some(p) = self.cluster.policy(id).cloned() else {
            return;
        };
        if !p.enforced() {
            return;
        }
        self.selectors.acquire(&p.selector, &self.ids);
        if let Some(bm) = self.selectors.bitmap(&p.selector) {
            w.policy_sets
                .extend(bm.iter().filter(|l| self.local_count.contains_key(l)));
        }
        self.selector_policies
            .entry(p.selector.clone())
            .or_default()
            .insert(id.clone());
        self.policy_selector.insert(id.clone(), p.selector.clone());
        self.policy_arcs.insert(id.clone(), Arc::new(p.clone()));
        self.policy_local_side.insert(
            id.clone(),
            [
                p.ingress
                    .iter()
                    .any(|r| residual::has_local_side(r, Direction::Ingress)),
                p.egress
                    .iter()
                    .any(|r| residual::has_local_side(r, Direction::Egress)),
            ],
        );
        let names = residual::peer_named_ports(&p.ingress, Direction::Ingress)
            .into_iter()
            .chain(residual::peer_named_ports(&p.egress, Direction::Egress))
            .collect();
        self.set_named_ports((Owner::Policy, id.to_string()), names);
    }

    fn refresh_profile(&mut self, name: &str, w: &mut Work) {
        if let Some(users) = self.profile_users.get(name) {
            w.labels.extend(users.iter().copied());
        }
        let names = match self.cluster.profile(name) {
            Some(p) => residual::peer_named_ports(&p.ingress, Direction::Ingress)
                .into_iter()
                .chain(residual::peer_named_ports(&p.egress, Direction::Egress))
                .collect(),
            None => Vec::new(),
        };
        self.set_named_ports((Owner::Profile, name.to_string()), names);
    }

    fn set_named_ports(&mut self, owner: (Owner, String), names: Vec<String>) {
        if let Some(old) = self.owner_named_ports.remove(&owner) {
            for n in old {
                if let Some(u) = self.named_port_users.get_mut(&n) {
                    u.remove(&owner);
                    if u.is_empty() {
                        self.named_port_users.remove(&n);
                    }
                }
            }
        }
        if !names.is_empty() {
            for n in &names {
                self.named_port_users
                    .entry(n.clone())
                    .or_default()
                    .insert(owner.clone());
            }
            self.owner_named_ports.insert(owner, names);
        }
    }

    /// Programs of rules with peer-side named port `name` depend on which
    /// (protocol, port) pairs endpoints declare for it.
    fn invalidate_named_port(&mut self, name: &str, w: &mut Work) {
        let Some(owners) = self.named_port_users.get(name) else {
            return;
        };
        for (kind, id) in owners {
            let users = match kind {
                Owner::Policy => self
                    .policy_users
                    .iter()
                    .find(|(p, _)| p.to_string() == *id)
                    .map(|(_, u)| u),
                Owner::Profile => self.profile_users.get(id),
            };
            if let Some(u) = users {
                w.labels.extend(u.iter().copied());
            }
        }
    }

    fn sorted_policy_set(&self, l: LabelId, dir: Direction) -> Vec<PolicyId> {
        let labels = &self.ids.key(l).labels;
        let mut v: Vec<&Policy> = Vec::new();
        for s in self.selectors.matching(labels) {
            if let Some(ps) = self.selector_policies.get(&s) {
                for id in ps {
                    if let Some(p) = self.cluster.policy(id)
                        && p.enforced()
                        && p.applies_in(dir)
                    {
                        v.push(p);
                    }
                }
            }
        }
        let tier_key = |name: &str| {
            self.cluster
                .tier(name)
                .map(|t| t.sort_key())
                .unwrap_or((OrderKey(f64::INFINITY), name.to_string()))
        };
        v.sort_by_cached_key(|p| (tier_key(&p.tier), p.sort_key()));
        v.dedup_by(|a, b| a.id == b.id);
        v.into_iter().map(|p| p.id.clone()).collect()
    }

    fn refresh_policy_sets(&mut self, l: LabelId, w: &mut Work) {
        if !self.local_count.contains_key(&l) {
            return;
        }
        let mut touched: Vec<PolicyId> = Vec::new();
        for d in Direction::ALL {
            let new = self.sorted_policy_set(l, d);
            let old = self.policy_sets.get(&(l, d)).cloned();
            if old.as_deref() == Some(&new) {
                continue;
            }
            if let Some(old) = &old {
                touched.extend(old.iter().cloned());
            }
            touched.extend(new.iter().cloned());
            self.policy_sets.insert((l, d), Arc::new(new));
            w.labels.insert(l);
        }
        // A label uses a policy while either direction's set holds it, so
        // membership is decided on both sets, not per direction.
        for p in touched {
            let uses = Direction::ALL.iter().any(|d| {
                self.policy_sets
                    .get(&(l, *d))
                    .is_some_and(|set| set.contains(&p))
            });
            if uses {
                self.policy_users.entry(p).or_default().insert(l);
            } else if let Some(u) = self.policy_users.get_mut(&p) {
                u.remove(&l);
                if u.is_empty() {
                    self.policy_users.remove(&p);
                }
            }
        }
    }

    fn acquire_bit(&mut self, key: &PeerSetKey) -> Bit {
        if let Some(ps) = self.peer_sets.get_mut(key) {
            ps.refs += 1;
            return ps.bit;
        }
        let bit = match self.free_bits.pop() {
            Some(b) => b,
            None => {
                self.bit_owner.push(None);
                (self.bit_owner.len() - 1) as Bit
            }
        };
        self.bit_owner[bit as usize] = Some(key.clone());
        let mut cidrs: Vec<IpNet> = Vec::new();
        match key {
            PeerSetKey::Selector(s) => {
                self.selectors.acquire(s, &self.ids);
                for (l, nets) in self.netsets.values() {
                    if s.matches(l) {
                        cidrs.extend(nets.iter().copied());
                    }
                }
                self.selector_bit.insert(s.clone(), bit);
            }
            PeerSetKey::Nets(n) => cidrs = n.clone(),
            PeerSetKey::NamedPort {
                name,
                selector,
                protocol,
                port,
            } => {
                if let Some(s) = selector {
                    self.selectors.acquire(s, &self.ids);
                }
                self.np_by_realization
                    .entry((name.clone(), *protocol, *port))
                    .or_default()
                    .insert(key.clone());
            }
        }
        let members = self.identity_members(key);
        for l in members {
            self.id_bits.update(l, |b| b.set(bit), Bits::new);
        }
        let mut scratch = Work::default();
        self.netset_cidrs_add(&cidrs, bit, true, &mut scratch);
        self.pending_ranges.extend(scratch.ranges);
        self.peer_sets.insert(
            key.clone(),
            PeerSet {
                bit,
                refs: 1,
                cidrs,
            },
        );
        bit
    }

    /// Identities whose addresses belong to a peer set (its CIDRs aside).
    fn identity_members(&self, key: &PeerSetKey) -> Vec<LabelId> {
        match key {
            PeerSetKey::Selector(s) => self
                .selectors
                .bitmap(s)
                .map(|b| b.iter().collect())
                .unwrap_or_default(),
            PeerSetKey::Nets(_) => Vec::new(),
            PeerSetKey::NamedPort {
                name,
                selector,
                protocol,
                port,
            } => {
                let want = (name.clone(), protocol.0, *port);
                let pool: Vec<LabelId> = match selector {
                    Some(s) => self
                        .selectors
                        .bitmap(s)
                        .map(|b| b.iter().collect())
                        .unwrap_or_default(),
                    None => self.ids.all().iter().collect(),
                };
                pool.into_iter()
                    .filter(|l| self.ids.key(*l).ports.contains(&want))
                    .collect()
            }
        }
    }

    fn release_bit(&mut self, key: &PeerSetKey) {
        let Some(ps) = self.peer_sets.get_mut(key) else {
            return;
        };
        ps.refs -= 1;
        if ps.refs > 0 {
            return;
        }
        let ps = self.peer_sets.remove(key).expect("present");
        let bit = ps.bit;
        let members = self.identity_members(key);
        for l in members {
            let mut empty = false;
            self.id_bits.update(
                l,
                |b| {
                    b.clear(bit);
                    empty = b.is_empty();
                },
                Bits::new,
            );
            if empty {
                self.id_bits.remove(&l);
            }
        }
        let mut scratch = Work::default();
        self.netset_cidrs_add(&ps.cidrs, bit, false, &mut scratch);
        self.pending_ranges.extend(scratch.ranges);
        match key {
            PeerSetKey::Selector(s) => {
                self.selector_bit.remove(s);
                self.selectors.release(s);
            }
            PeerSetKey::Nets(_) => {}
            PeerSetKey::NamedPort {
                name,
                selector,
                protocol,
                port,
            } => {
                if let Some(s) = selector {
                    self.selectors.release(s);
                }
                let rk = (name.clone(), *protocol, *port);
                if let Some(set) = self.np_by_realization.get_mut(&rk) {
                    set.remove(key);
                    if set.is_empty() {
                        self.np_by_realization.remove(&rk);
                    }
                }
            }
        }
        self.bit_owner[bit as usize] = None;
        self.free_bits.push(bit);
    }
}

impl Compiler {
    /// Recomputes the programs of every dirty local endpoint.
    fn refresh_programs(&mut self, w: &mut Work) {
        for l in w.labels.clone() {
            self.forget_keys(l);
            if let Some(eps) = self.identity_eps.get(&l) {
                w.slots.extend(eps.iter().cloned());
            }
        }
        let eps: Vec<EndpointKey> = std::mem::take(&mut w.slots).into_iter().collect();
        // Keys that need a program, computed once each.
        let mut wanted: Vec<(Slot, ProgramKey)> = Vec::new();
        for e in &eps {
            // Slots of this endpoint that exist now.
            let current: Vec<Slot> = match self.endpoints.get(e) {
                Some(st) if st.local => st
                    .ips
                    .iter()
                    .flat_map(|ip| Direction::ALL.map(|d| (e.clone(), *ip, d)))
                    .collect(),
                _ => Vec::new(),
            };
            let previous = self.ep_slots.remove(e).unwrap_or_default();
            for s in previous.iter().filter(|s| !current.contains(s)) {
                if let Some(pid) = self.slots.remove(s) {
                    self.unref_program(pid);
                }
            }
            if !current.is_empty() {
                self.ep_slots.insert(e.clone(), current.clone());
            }
            let Some(label) = self.endpoints.get(e).map(|st| st.label) else {
                continue;
            };
            for slot in current {
                let needs_address = self.needs_address(label, slot.2);
                let ip = slot.1;
                let shared = self
                    .hosts
                    .get(&addr_key(&ip))
                    .is_some_and(|(_, v)| v.len() > 1);
                let key = ProgramKey {
                    label,
                    direction: slot.2,
                    version: IpVersion::of(&ip),
                    ip: (shared || needs_address).then_some(ip),
                };
                wanted.push((slot, key));
            }
        }
        // Build the missing programs: items need &mut self (peer-set bits);
        // the decision structures are built in parallel.
        let mut to_build: Vec<(ProgramKey, IpAddr)> = Vec::new();
        let mut seen: HashSet<ProgramKey> = HashSet::default();
        for (slot, key) in &wanted {
            if !self.program_of_key.contains_key(key) && seen.insert(key.clone()) {
                to_build.push((key.clone(), slot.1));
            }
        }
        let mut inputs = Vec::with_capacity(to_build.len());
        for (key, ip) in to_build {
            let mut sets = Vec::new();
            let mut rules = Vec::new();
            let items = self.program_items(&key, ip, &mut sets, &mut rules);
            inputs.push((key, items, sets, rules));
        }
        // Identities a policy set treats alike get the same item list (one
        // `all()` policy: every identity): build each distinct list once.
        let mut distinct: HashMap<&[program::Item], usize> = HashMap::default();
        let mut unique: Vec<&[program::Item]> = Vec::new();
        let which: Vec<usize> = inputs
            .iter()
            .map(|(_, items, _, _)| {
                *distinct.entry(items.as_slice()).or_insert_with(|| {
                    unique.push(items.as_slice());
                    unique.len() - 1
                })
            })
            .collect();
        // Parallel only when there is enough work to pay for waking threads.
        let unique_built: Vec<Arc<Program>> = if unique.len() >= 32 {
            unique
                .par_iter()
                .map(|items| Arc::new(program::build(items)))
                .collect()
        } else {
            unique
                .iter()
                .map(|items| Arc::new(program::build(items)))
                .collect()
        };
        let built: Vec<Arc<Program>> = which.iter().map(|i| unique_built[*i].clone()).collect();
        for ((key, _, sets, rules), prog) in inputs.into_iter().zip(built) {
            let pid = match self.program_by_content.get(&prog).copied() {
                // An identical program already exists and holds its sets and rules.
                Some(pid) => pid,
                None => {
                    // A program holds exactly the peer sets it tests and the
                    // rule ids its leaves name: residualisation may acquire
                    // more (rules shadowed or impossible in every region).
                    let tested: HashSet<Bit> = prog.bits().into_iter().collect();
                    let mut held: Vec<PeerSetKey> = sets
                        .iter()
                        .filter(|k| {
                            self.peer_sets
                                .get(*k)
                                .is_some_and(|p| tested.contains(&p.bit))
                        })
                        .cloned()
                        .collect();
                    held.sort();
                    held.dedup();
                    for k in &held {
                        self.acquire_bit(k);
                    }
                    let mut leaf_rules: Vec<RuleId> = prog.leaves.iter().map(|l| l.rule).collect();
                    leaf_rules.sort_unstable();
                    leaf_rules.dedup();
                    for r in &leaf_rules {
                        *self
                            .rule_refs
                            .get_mut(r)
                            .expect("rule acquired while building") += 1;
                    }
                    let pid = self.next_program;
                    self.next_program += 1;
                    self.program_by_content.insert(prog.clone(), pid);
                    self.programs.insert(pid, prog);
                    self.program_refs.insert(pid, 0);
                    self.program_sets.insert(pid, held);
                    self.program_rules.insert(pid, leaf_rules);
                    pid
                }
            };
            for k in &sets {
                self.release_bit(k);
            }
            for r in &rules {
                self.unref_rule(*r);
            }
            self.keys_of_label
                .entry(key.label)
                .or_default()
                .insert(key.clone());
            // Dropping the program must also forget the keys that lead to it.
            self.keys_of_program
                .entry(pid)
                .or_default()
                .insert(key.clone());
            self.program_of_key.insert(key, pid);
        }
        // Point slots at their programs; take the new reference before
        // dropping the old one so a shared program is never freed in between.
        let mut released = Vec::new();
        for (slot, key) in wanted {
            let pid = self.program_of_key[&key];
            *self.program_refs.get_mut(&pid).expect("live program") += 1;
            if let Some(old) = self.slots.get(&slot).copied() {
                released.push(old);
            }
            self.slots.insert(slot, pid);
        }
        for old in released {
            self.unref_program(old);
        }
        // Programs built but not used by any slot (all slots moved on).
        let unused: Vec<ProgramId> = self
            .program_refs
            .iter()
            .filter(|(_, r)| **r == 0)
            .map(|(p, _)| *p)
            .collect();
        for pid in unused {
            self.drop_program(pid);
        }
    }

    fn unref_program(&mut self, pid: ProgramId) {
        let r = self.program_refs.get_mut(&pid).expect("live program");
        *r -= 1;
        if *r == 0 {
            self.drop_program(pid);
        }
    }

    fn drop_program(&mut self, pid: ProgramId) {
        self.program_refs.remove(&pid);
        if let Some(p) = self.programs.remove(&pid) {
            self.program_by_content.remove(&p);
        }
        for k in self.program_sets.remove(&pid).unwrap_or_default() {
            self.release_bit(&k);
        }
        for r in self.program_rules.remove(&pid).unwrap_or_default() {
            self.unref_rule(r);
        }
        for k in self.keys_of_program.remove(&pid).unwrap_or_default() {
            self.program_of_key.remove(&k);
            if let Some(set) = self.keys_of_label.get_mut(&k.label) {
                set.remove(&k);
            }
        }
    }

    fn unref_rule(&mut self, id: RuleId) {
        let r = self.rule_refs.get_mut(&id).expect("live rule id");
        *r -= 1;
        if *r == 0 {
            self.rule_refs.remove(&id);
            if let Some(rr) = self.rules.remove(&id) {
                self.rule_ids.remove(&rr);
            }
        }
    }

    fn intern_class(&mut self, bits: Bits) -> ClassId {
        let id = match self.class_ids.get(&bits) {
            Some(id) => *id,
            None => {
                let id = self.next_class;
                self.next_class += 1;
                self.class_ids.insert(bits.clone(), id);
                self.classes.insert(id, bits);
                id
            }
        };
        *self.class_refs.entry(id).or_insert(0) += 1;
        id
    }

    fn unref_class(&mut self, id: ClassId) {
        let r = self.class_refs.get_mut(&id).expect("live class");
        *r -= 1;
        if *r == 0 {
            self.class_refs.remove(&id);
            if let Some(b) = self.classes.remove(&id) {
                self.class_ids.remove(&b);
            }
        }
    }

    /// CIDR memberships of a prefix or address: every registered prefix that
    /// contains it contributes its bits.
    fn cidr_bits(&self, family: u8, addr: u128, len: u8) -> Bits {
        let mut bits = Bits::new();
        let width = if family == 4 { 32 } else { 128 };
        for l in 0..=len {
            let mask = if l == 0 {
                0
            } else {
                (!0u128 << (width - u32::from(l))) & if width == 32 { 0xffff_ffff } else { !0 }
            };
            if let Some((_, m)) = self.prefix_bits.get(&(family, addr & mask, l)) {
                for b in m.keys() {
                    bits.set(*b);
                }
            }
        }
        bits
    }

    fn refresh_classes(&mut self, w: &mut Work) {
        let mut ranges = std::mem::take(&mut w.ranges);
        ranges.append(&mut self.pending_ranges);
        // Prefix entries: every registered prefix inside a dirty range, and
        // entries whose prefix disappeared.
        let mut prefixes: BTreeSet<(u8, u128, u8)> = BTreeSet::new();
        let mut hosts: BTreeSet<(u8, u128)> = w.hosts.iter().map(addr_key).collect();
        for r in &ranges {
            let (lo, hi) = range_of(r);
            for (k, _) in self.prefix_bits.range((lo.0, lo.1, 0)..=(hi.0, hi.1, 255)) {
                prefixes.insert(*k);
            }
            prefixes.insert(net_key(r));
            for (k, _) in self.hosts.range(lo..=hi) {
                hosts.insert(*k);
            }
        }
        for k in prefixes {
            let net = self.prefix_bits.get(&k).map(|(n, _)| *n);
            // The entry for this exact prefix, if it still exists.
            let old = self
                .prefix_class
                .iter()
                .find(|(n, _)| net_key(n) == k)
                .map(|(n, c)| (*n, *c));
            if let Some((n, c)) = old {
                self.prefix_class.remove(&n);
                self.unref_class(c);
            }
            if let Some(n) = net {
                let bits = self.cidr_bits(k.0, k.1, k.2);
                let c = self.intern_class(bits);
                self.prefix_class.insert(n, c);
            }
        }
        for k in hosts {
            let ip = self.hosts.get(&k).map(|(ip, _)| *ip);
            let old_ip = match k.0 {
                4 => IpAddr::from(std::net::Ipv4Addr::from(k.1 as u32)),
                _ => IpAddr::from(std::net::Ipv6Addr::from(k.1)),
            };
            if let Some(old) = self.host_entries.remove(&old_ip) {
                self.unref_class(old.class);
                self.unref_union(old.identity);
            }
            let Some(ip) = ip else { continue };
            let eps = self.hosts[&k].1.clone();
            let labels: Vec<LabelId> = eps
                .iter()
                .filter_map(|e| self.endpoints.get(e).map(|s| s.label))
                .collect();
            if labels.is_empty() {
                continue;
            }
            let identity = self.address_identity(labels);
            let width = if k.0 == 4 { 32 } else { 128 };
            let bits = self.cidr_bits(k.0, k.1, width);
            let class = self.intern_class(bits);
            self.host_entries.insert(ip, HostEntry { identity, class });
        }
        self.refresh_unions();
    }

    fn address_identity(&mut self, mut labels: Vec<LabelId>) -> u32 {
        labels.sort_unstable();
        labels.dedup();
        if labels.len() == 1 {
            return labels[0];
        }
        let id = match self.unions.get(&labels) {
            Some(id) => *id,
            None => {
                let id = self.next_union;
                self.next_union += 1;
                self.unions.insert(labels, id);
                id
            }
        };
        *self.union_refs.entry(id).or_insert(0) += 1;
        id
    }

    fn unref_union(&mut self, id: u32) {
        if id < UNION_IDENTITY_BASE {
            return;
        }
        let r = self.union_refs.get_mut(&id).expect("live union");
        *r -= 1;
        if *r == 0 {
            self.union_refs.remove(&id);
            self.unions.retain(|_, v| *v != id);
            self.id_bits.remove(&id);
        }
    }

    /// Union identities get the OR of their members' bits.
    fn refresh_unions(&mut self) {
        let unions: Vec<(Vec<LabelId>, u32)> =
            self.unions.iter().map(|(k, v)| (k.clone(), *v)).collect();
        for (members, id) in unions {
            let mut bits = Bits::new();
            for m in &members {
                if let Some(b) = self.id_bits.get(m) {
                    bits.union_with(b);
                }
            }
            if self.id_bits.get(&id) != Some(&bits) {
                if bits.is_empty() {
                    self.id_bits.remove(&id);
                } else {
                    self.id_bits.insert(id, bits);
                }
            }
        }
    }

    fn take_delta(&mut self) -> Delta {
        Delta {
            programs: self.programs.take_changes().into_iter().collect(),
            slots: self.slots.take_changes().into_iter().collect(),
            identities: self.id_bits.take_changes().into_iter().collect(),
            classes: self.classes.take_changes().into_iter().collect(),
            prefixes: self.prefix_class.take_changes().into_iter().collect(),
            hosts: self.host_entries.take_changes().into_iter().collect(),
            rules: self.rules.take_changes().into_iter().collect(),
        }
    }

    /// Membership bits of a peer address: its identity's bits (if it is an
    /// endpoint address) OR the CIDR class of its longest matching prefix.
    pub fn peer_bits(&self, ip: &IpAddr) -> Bits {
        let mut bits = Bits::new();
        if let Some(h) = self.host_entries.get(ip) {
            if let Some(b) = self.id_bits.get(&h.identity) {
                bits.union_with(b);
            }
            if let Some(c) = self.classes.get(&h.class) {
                bits.union_with(c);
            }
            return bits;
        }
        let net = IpNet::from(*ip);
        for len in (0..=net.prefix_len()).rev() {
            let p = IpNet::new(*ip, len).expect("valid length").trunc();
            if let Some(c) = self.prefix_class.get(&p) {
                if let Some(b) = self.classes.get(c) {
                    bits.union_with(b);
                }
                break;
            }
        }
        bits
    }

    /// The program attached to a slot.
    pub fn program(&self, slot: &Slot) -> Option<&Arc<Program>> {
        self.slots.get(slot).and_then(|p| self.programs.get(p))
    }

    /// What a rule id stands for.
    pub fn rule(&self, id: RuleId) -> Option<&RuleRef> {
        self.rules.get(&id)
    }

    /// The peer set a bit stands for.
    pub fn bit_meaning(&self, bit: Bit) -> Option<&PeerSetKey> {
        self.bit_owner.get(bit as usize).and_then(Option::as_ref)
    }

    /// Every slot and its program id.
    pub fn slots(&self) -> impl Iterator<Item = (&Slot, &ProgramId)> {
        self.slots.iter()
    }

    /// Every program.
    pub fn programs(&self) -> impl Iterator<Item = (&ProgramId, &Arc<Program>)> {
        self.programs.iter()
    }

    /// Identity membership bitsets.
    pub fn identity_bits(&self) -> impl Iterator<Item = (&u32, &Bits)> {
        self.id_bits.iter()
    }

    /// Address classes.
    pub fn classes(&self) -> impl Iterator<Item = (&ClassId, &Bits)> {
        self.classes.iter()
    }

    /// LPM entries for CIDRs.
    pub fn prefixes(&self) -> impl Iterator<Item = (&IpNet, &ClassId)> {
        self.prefix_class.iter()
    }

    /// LPM entries for endpoint addresses.
    pub fn hosts(&self) -> impl Iterator<Item = (&IpAddr, &HostEntry)> {
        self.host_entries.iter()
    }

    /// Rule ids.
    pub fn rule_ids(&self) -> impl Iterator<Item = (&RuleId, &RuleRef)> {
        self.rules.iter()
    }

    /// Number of membership bits in use (highest bit + 1).
    pub fn bit_width(&self) -> usize {
        self.bit_owner.len()
    }

    /// Statistics of the compiled state.
    pub fn stats(&self) -> Stats {
        let policy_sets: HashSet<&Arc<Vec<PolicyId>>> = self.policy_sets.values().collect();
        let mut peer_classes: HashSet<(Option<&Bits>, ClassId)> = HashSet::default();
        for h in self.host_entries.iter().map(|(_, h)| h) {
            peer_classes.insert((self.id_bits.get(&h.identity), h.class));
        }
        for c in self.prefix_class.iter().map(|(_, c)| *c) {
            peer_classes.insert((None, c));
        }
        peer_classes.insert((None, 0));
        let program_nodes: usize = self
            .programs
            .iter()
            .map(|(_, p)| p.nodes.len() + p.leaves.len())
            .sum();
        let max_depth = self
            .programs
            .iter()
            .map(|(_, p)| p.depth())
            .max()
            .unwrap_or(0);
        let words = self.bit_owner.len().div_ceil(64).max(1);
        let lpm = self.prefix_class.len() + self.host_entries.len();
        Stats {
            endpoints: self.endpoints.len(),
            local_endpoints: self.endpoints.values().filter(|e| e.local).count(),
            identities: self.ids.len(),
            selectors: self.selectors.len(),
            policy_sets: policy_sets.len(),
            peer_sets: self.peer_sets.len(),
            peer_classes: peer_classes.len(),
            address_classes: self.classes.len(),
            programs: self.programs.len(),
            program_nodes,
            max_depth,
            lpm_entries: lpm,
            rule_ids: self.rules.len(),
            lowered_entries: lpm
                + program_nodes
                + self.slots.len()
                + (self.id_bits.len() + self.classes.len()) * words
                + self.rules.len(),
        }
    }

    /// An id-free rendering of the compiled state: programs with bits named
    /// by their peer sets and leaves by their rules, memberships by peer-set
    /// names. Two compilers of the same cluster render identically whatever
    /// history led there.
    pub fn canonical(&self) -> String {
        use std::fmt::Write;
        let name = |b: Bit| {
            self.bit_meaning(b)
                .map(ToString::to_string)
                .unwrap_or_else(|| format!("<unowned bit {b}>"))
        };
        let names = |bits: &Bits| -> Vec<String> {
            let mut v: Vec<String> = bits.iter().map(name).collect();
            v.sort();
            v
        };
        let mut out = String::new();
        let mut slots: Vec<(&Slot, &ProgramId)> = self.slots.iter().collect();
        slots.sort_by(|a, b| a.0.cmp(b.0));
        for (slot, pid) in slots {
            let p = &self.programs.get(pid).expect("slot program exists");
            let _ = writeln!(out, "slot {}/{} {}:", slot.0, slot.1, slot.2);
            let mut numbering: HashMap<Next, usize> = HashMap::default();
            render(p, p.root, &mut numbering, &mut out, &name, &|id| {
                self.rule(id).map(ToString::to_string).unwrap_or_default()
            });
        }
        let mut hosts: Vec<(&IpAddr, &HostEntry)> = self.host_entries.iter().collect();
        hosts.sort();
        for (ip, h) in hosts {
            let id = self.id_bits.get(&h.identity).map(names).unwrap_or_default();
            let class = self.classes.get(&h.class).map(names).unwrap_or_default();
            let _ = writeln!(out, "host {ip}: identity {id:?} cidr {class:?}");
        }
        let mut prefixes: Vec<(&IpNet, &ClassId)> = self.prefix_class.iter().collect();
        prefixes.sort();
        for (n, c) in prefixes {
            let class = self.classes.get(c).map(names).unwrap_or_default();
            let _ = writeln!(out, "prefix {n}: {class:?}");
        }
        out
    }
}

fn render(
    p: &Program,
    at: Next,
    seen: &mut HashMap<Next, usize>,
    out: &mut String,
    bit: &dyn Fn(Bit) -> String,
    rule: &dyn Fn(RuleId) -> String,
) -> usize {
    use std::fmt::Write;
    if let Some(n) = seen.get(&at) {
        return *n;
    }
    let text = match at {
        Next::Leaf(l) => {
            let leaf = p.leaves[l as usize];
            format!(
                "{} by {}{}",
                leaf.verdict,
                rule(leaf.rule),
                if leaf.logged { " [logged]" } else { "" }
            )
        }
        Next::Node(n) => {
            let node = p.nodes[n as usize];
            let t = render(p, node.then, seen, out, bit, rule);
            let e = render(p, node.otherwise, seen, out, bit, rule);
            match node.test {
                Test::Less(f, v) => format!("{f:?} < {v} ? #{t} : #{e}"),
                Test::Bit(b) => format!("peer in {} ? #{t} : #{e}", bit(b)),
            }
        }
    };
    let id = seen.len();
    seen.insert(at, id);
    let _ = writeln!(out, "  #{id} {text}");
    id
}

/// How a flow looks from the endpoint enforcing `direction`: the local
/// address (whose slot holds the program), the peer address (whose bits the
/// program tests) and the packet features the program reads.
pub fn flow_features(flow: &Flow, direction: Direction) -> (IpAddr, IpAddr, Features) {
    let (local_ip, peer_ip, local_port, peer_port) = match direction {
        Direction::Ingress => (flow.dst, flow.src, flow.dst_port, flow.src_port),
        Direction::Egress => (flow.src, flow.dst, flow.src_port, flow.dst_port),
    };
    let (icmp_type, icmp_code) = flow.icmp.unwrap_or((0, 0));
    let features = Features {
        protocol: flow.protocol.0,
        local_port,
        peer_port,
        icmp_type,
        icmp_code,
    };
    (local_ip, peer_ip, features)
}

impl Engine for Compiler {
    fn name(&self) -> &'static str {
        "compiled"
    }

    fn decide(
        &self,
        endpoint: &EndpointKey,
        direction: Direction,
        flow: &Flow,
    ) -> Result<Decision, EngineError> {
        flow.validate().map_err(EngineError::InvalidFlow)?;
        let st = self
            .endpoints
            .get(endpoint)
            .ok_or_else(|| EngineError::UnknownEndpoint(endpoint.clone()))?;
        if !st.local {
            return Err(EngineError::Other(format!(
                "{endpoint} is not on this node: no programs are compiled for it"
            )));
        }
        let (local_ip, peer_ip, features) = flow_features(flow, direction);
        let program = self
            .program(&(endpoint.clone(), local_ip, direction))
            .ok_or_else(|| {
                EngineError::InvalidFlow(format!("{local_ip} is not an address of {endpoint}"))
            })?;
        let bits = self.peer_bits(&peer_ip);
        let (leaf, _) = program.evaluate(&features, |b| bits.get(b));
        let rule = self
            .rule(leaf.rule)
            .ok_or_else(|| EngineError::Other(format!("unknown rule id {}", leaf.rule)))?;
        Ok(Decision {
            verdict: leaf.verdict,
            decided_by: rule.decided_by(),
            logged: leaf.logged,
        })
    }
}

impl Compiler {
    /// Checks the bookkeeping invariants (reference counts match their
    /// holders); returns what is wrong. For tests.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        let mut slot_refs: HashMap<ProgramId, u32> = HashMap::default();
        for (_, pid) in self.slots.iter() {
            *slot_refs.entry(*pid).or_insert(0) += 1;
        }
        for (pid, refs) in &self.program_refs {
            let held = slot_refs.get(pid).copied().unwrap_or(0);
            if held != *refs {
                problems.push(format!("program {pid}: {refs} refs, {held} slots"));
            }
        }
        for (pid, _) in self.programs.iter() {
            if self.program_refs.get(pid).is_none_or(|r| *r == 0) {
                problems.push(format!("program {pid} is alive without references"));
            }
        }
        for pid in slot_refs.keys() {
            if self.programs.get(pid).is_none() {
                problems.push(format!("slot points at missing program {pid}"));
            }
        }
        for (k, pid) in &self.program_of_key {
            if self.programs.get(pid).is_none() {
                problems.push(format!("key {k:?} points at dropped program {pid}"));
            }
        }
        // Every label's policy sets are mirrored in policy_users, or a
        // policy edit would miss the programs that depend on it.
        for ((l, d), set) in &self.policy_sets {
            for p in set.iter() {
                if !self.policy_users.get(p).is_some_and(|u| u.contains(l)) {
                    problems.push(format!("label {l} uses {p} ({d:?}) but is not its user"));
                }
            }
        }
        for (pid, sets) in &self.program_sets {
            let Some(p) = self.programs.get(pid) else {
                problems.push(format!("sets recorded for missing program {pid}"));
                continue;
            };
            let mut held: Vec<Bit> = sets
                .iter()
                .filter_map(|k| self.peer_sets.get(k).map(|s| s.bit))
                .collect();
            held.sort_unstable();
            if held != p.bits() {
                problems.push(format!(
                    "program {pid} holds bits {held:?} but tests {:?}",
                    p.bits()
                ));
            }
        }
        let mut set_refs: HashMap<&PeerSetKey, u32> = HashMap::default();
        for sets in self.program_sets.values() {
            for k in sets {
                *set_refs.entry(k).or_insert(0) += 1;
            }
        }
        for (k, ps) in &self.peer_sets {
            let held = set_refs.get(k).copied().unwrap_or(0);
            if held != ps.refs {
                problems.push(format!(
                    "peer set {k}: {} refs, {held} held by programs",
                    ps.refs
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }
}
