//! Decision programs: the compiled form of one endpoint's ordered rules for
//! one direction and IP version.
//!
//! A program is a DAG of binary test nodes. Every test is either "feature <
//! constant" over the packet's protocol, ports and ICMP type/code, or "bit b is
//! set" in the peer's membership bitsets. Leaves carry the verdict and the id
//! of the rule that decided, plus whether a Log rule matched on the way.
//!
//! Construction: the ordered items (rules, end-of-tier markers, profile rules,
//! the final drop) are first split on the packet features — protocol, local
//! port, peer port, ICMP type, ICMP code — into regions where every item's
//! non-peer condition is constant; inside a region what is left is a
//! first-match list over peer literals, emitted as a decision list. Identical
//! sub-problems and nodes are shared.

use rustc_hash::FxHashMap as HashMap;

use crate::flow::Verdict;
use crate::model::IcmpMatch;
use crate::net::Protocol;

/// Index of a membership bit (a peer set).
pub type Bit = u32;
/// Global id of a rule (or end-of-tier / profile / no-match marker).
pub type RuleId = u32;

/// A packet feature a node can compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Feature {
    /// IP protocol number.
    Protocol,
    /// Port on the enforcing endpoint's side (destination port for ingress).
    LocalPort,
    /// Port on the peer's side (source port for ingress).
    PeerPort,
    /// ICMP type (0 for other protocols).
    IcmpType,
    /// ICMP code (0 for other protocols).
    IcmpCode,
}

impl Feature {
    /// Split order.
    pub const ORDER: [Feature; 5] = [
        Feature::Protocol,
        Feature::LocalPort,
        Feature::PeerPort,
        Feature::IcmpType,
        Feature::IcmpCode,
    ];

    fn max(self) -> u32 {
        match self {
            Feature::LocalPort | Feature::PeerPort => 65535,
            _ => 255,
        }
    }
}

/// A node's test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Test {
    /// `feature < value`.
    Less(Feature, u32),
    /// Bit set in the peer's identity bitset or its address-class bitset.
    Bit(Bit),
}

/// Where a branch goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Next {
    /// Another node of the program.
    Node(u32),
    /// A leaf of the program.
    Leaf(u32),
}

/// A binary test node: `then` when the test holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Node {
    /// The test.
    pub test: Test,
    /// Branch when the test holds.
    pub then: Next,
    /// Branch when it does not.
    pub otherwise: Next,
}

/// A verdict with provenance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Leaf {
    /// Allow or deny.
    pub verdict: Verdict,
    /// The deciding rule.
    pub rule: RuleId,
    /// A Log rule matched before the decision.
    pub logged: bool,
}

/// A compiled program.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Program {
    /// Test nodes.
    pub nodes: Vec<Node>,
    /// Leaves.
    pub leaves: Vec<Leaf>,
    /// Entry point.
    pub root: Next,
}

/// Packet features a program reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// Protocol number.
    pub protocol: u8,
    /// Local-side port.
    pub local_port: u16,
    /// Peer-side port.
    pub peer_port: u16,
    /// ICMP type.
    pub icmp_type: u8,
    /// ICMP code.
    pub icmp_code: u8,
}

impl Features {
    fn get(&self, f: Feature) -> u32 {
        match f {
            Feature::Protocol => u32::from(self.protocol),
            Feature::LocalPort => u32::from(self.local_port),
            Feature::PeerPort => u32::from(self.peer_port),
            Feature::IcmpType => u32::from(self.icmp_type),
            Feature::IcmpCode => u32::from(self.icmp_code),
        }
    }
}

impl Program {
    /// Walks the program; `bit` answers membership tests. Returns the leaf
    /// and the number of nodes visited.
    pub fn evaluate(&self, features: &Features, bit: impl Fn(Bit) -> bool) -> (Leaf, usize) {
        let mut at = self.root;
        let mut steps = 0;
        loop {
            match at {
                Next::Leaf(l) => return (self.leaves[l as usize], steps),
                Next::Node(n) => {
                    steps += 1;
                    let node = &self.nodes[n as usize];
                    let holds = match node.test {
                        Test::Less(f, v) => features.get(f) < v,
                        Test::Bit(b) => bit(b),
                    };
                    at = if holds { node.then } else { node.otherwise };
                }
            }
        }
    }

    /// Longest path from the root, in nodes.
    pub fn depth(&self) -> usize {
        fn go(p: &Program, at: Next, memo: &mut HashMap<u32, usize>) -> usize {
            match at {
                Next::Leaf(_) => 0,
                Next::Node(n) => {
                    if let Some(d) = memo.get(&n) {
                        return *d;
                    }
                    let node = p.nodes[n as usize];
                    let d = 1 + go(p, node.then, memo).max(go(p, node.otherwise, memo));
                    memo.insert(n, d);
                    d
                }
            }
        }
        go(self, self.root, &mut HashMap::default())
    }

    /// Bits the program tests.
    pub fn bits(&self) -> Vec<Bit> {
        let mut v: Vec<Bit> = self
            .nodes
            .iter()
            .filter_map(|n| match n.test {
                Test::Bit(b) => Some(b),
                Test::Less(..) => None,
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// A literal over the peer's membership bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lit {
    /// The bit.
    pub bit: Bit,
    /// True: the bit must be set; false: it must be clear.
    pub positive: bool,
}

/// Ports a rule side allows: numeric ranges (any protocol) plus named ports
/// resolved to (protocol, port) points, each with the bit that says whether
/// the peer has that named port (`None` on the local side, already resolved).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PortSpec {
    /// Inclusive numeric ranges.
    pub ranges: Vec<(u16, u16)>,
    /// Named-port realisations: protocol, port, and the peer bit (peer side).
    pub points: Vec<(Protocol, u16, Option<Bit>)>,
}

/// The residual condition of one rule once the local endpoint is known.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Cond {
    /// Protocol must equal.
    pub protocol: Option<Protocol>,
    /// Protocol must differ.
    pub not_protocol: Option<Protocol>,
    /// ICMP match.
    pub icmp: Option<IcmpMatch>,
    /// Negated ICMP match.
    pub not_icmp: Option<IcmpMatch>,
    /// Local-side ports that must match (`None`: any).
    pub local_ports: Option<PortSpec>,
    /// Local-side ports that must not match.
    pub local_not_ports: Option<PortSpec>,
    /// Peer-side ports that must match.
    pub peer_ports: Option<PortSpec>,
    /// Peer-side ports that must not match.
    pub peer_not_ports: Option<PortSpec>,
    /// Peer membership, in conjunctive normal form (AND of OR-clauses).
    pub clauses: Vec<Vec<Lit>>,
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ItemAction {
    /// Allow and stop.
    Allow,
    /// Deny and stop.
    Deny,
    /// Jump past the end of the current tier.
    Pass,
    /// Mark logged and continue.
    Log,
}

/// One element of the ordered evaluation.
// Rules are the common variant; boxing them would only add indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Item {
    /// A rule of a tiered policy or a profile (profile Pass is given as Deny).
    Rule {
        /// Residual condition.
        cond: Cond,
        /// Action.
        action: ItemAction,
        /// Rule id.
        rule: RuleId,
        /// Tier position (profiles use `u32::MAX`).
        tier: u32,
    },
    /// End of a tier: its default action.
    TierEnd {
        /// Tier position.
        tier: u32,
        /// Deny (stop) or Pass (continue).
        deny: bool,
        /// Id of the end-of-tier marker.
        rule: RuleId,
    },
    /// Nothing allowed the packet.
    End {
        /// Id of the no-match marker.
        rule: RuleId,
    },
}

/// Region-level condition after specialising on packet features: only peer
/// clauses remain.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Spec {
    Rule {
        cond: Cond,
        action: ItemAction,
        rule: RuleId,
        tier: u32,
    },
    TierEnd {
        tier: u32,
        deny: bool,
        rule: RuleId,
    },
    End {
        rule: RuleId,
    },
}

fn in_ranges(ranges: &[(u16, u16)], v: u32) -> bool {
    ranges
        .iter()
        .any(|(a, b)| u32::from(*a) <= v && v <= u32::from(*b))
}

impl Cond {
    /// Values where the truth of this condition may change along `f`.
    fn cuts(&self, f: Feature, out: &mut Vec<u32>) {
        fn pt(out: &mut Vec<u32>, v: u32) {
            out.push(v);
            out.push(v + 1);
        }
        match f {
            Feature::Protocol => {
                if let Some(p) = self.protocol {
                    pt(out, u32::from(p.0));
                }
                if let Some(p) = self.not_protocol {
                    pt(out, u32::from(p.0));
                }
                for spec in [
                    &self.local_ports,
                    &self.local_not_ports,
                    &self.peer_ports,
                    &self.peer_not_ports,
                ]
                .into_iter()
                .flatten()
                {
                    for (p, _, _) in &spec.points {
                        pt(out, u32::from(p.0));
                    }
                }
            }
            Feature::LocalPort | Feature::PeerPort => {
                let specs = if f == Feature::LocalPort {
                    [&self.local_ports, &self.local_not_ports]
                } else {
                    [&self.peer_ports, &self.peer_not_ports]
                };
                for spec in specs.into_iter().flatten() {
                    for (a, b) in &spec.ranges {
                        out.push(u32::from(*a));
                        out.push(u32::from(*b) + 1);
                    }
                    for (_, p, _) in &spec.points {
                        pt(out, u32::from(*p));
                    }
                }
            }
            Feature::IcmpType => {
                for m in [self.icmp, self.not_icmp].into_iter().flatten() {
                    pt(out, u32::from(m.icmp_type));
                }
            }
            Feature::IcmpCode => {
                for m in [self.icmp, self.not_icmp].into_iter().flatten() {
                    if let Some(c) = m.code {
                        pt(out, u32::from(c));
                    }
                }
            }
        }
    }

    /// Specialises on `f == v` (v stands for its whole elementary interval).
    /// `None`: the condition is false there.
    fn specialize(mut self, f: Feature, v: u32) -> Option<Cond> {
        match f {
            Feature::Protocol => {
                if self.protocol.is_some_and(|p| u32::from(p.0) != v) {
                    return None;
                }
                if self.not_protocol.is_some_and(|p| u32::from(p.0) == v) {
                    return None;
                }
                self.protocol = None;
                self.not_protocol = None;
                // Named-port realisations only count for their own protocol.
                // A positive list left empty can never match; an empty
                // negative list excludes nothing. (This keeps "no cut points
                // on a feature" meaning "the feature does not matter".)
                for sp in [&mut self.local_ports, &mut self.peer_ports]
                    .into_iter()
                    .flatten()
                {
                    sp.points.retain(|(p, _, _)| u32::from(p.0) == v);
                    if sp.ranges.is_empty() && sp.points.is_empty() {
                        return None;
                    }
                }
                for spec in [&mut self.local_not_ports, &mut self.peer_not_ports] {
                    if let Some(sp) = spec {
                        sp.points.retain(|(p, _, _)| u32::from(p.0) == v);
                        if sp.ranges.is_empty() && sp.points.is_empty() {
                            *spec = None;
                        }
                    }
                }
                Some(self)
            }
            Feature::LocalPort => {
                if let Some(spec) = self.local_ports.take() {
                    let hit = in_ranges(&spec.ranges, v)
                        || spec.points.iter().any(|(_, p, _)| u32::from(*p) == v);
                    if !hit {
                        return None;
                    }
                }
                if let Some(spec) = self.local_not_ports.take() {
                    let hit = in_ranges(&spec.ranges, v)
                        || spec.points.iter().any(|(_, p, _)| u32::from(*p) == v);
                    if hit {
                        return None;
                    }
                }
                Some(self)
            }
            Feature::PeerPort => {
                if let Some(spec) = self.peer_ports.take()
                    && !in_ranges(&spec.ranges, v)
                {
                    // Only named ports can match: the peer must have one.
                    let bits: Vec<Lit> = spec
                        .points
                        .iter()
                        .filter(|(_, p, _)| u32::from(*p) == v)
                        .filter_map(|(_, _, b)| {
                            b.map(|bit| Lit {
                                bit,
                                positive: true,
                            })
                        })
                        .collect();
                    if bits.is_empty() {
                        return None;
                    }
                    self.clauses.push(bits);
                }
                if let Some(spec) = self.peer_not_ports.take() {
                    if in_ranges(&spec.ranges, v) {
                        return None;
                    }
                    for (_, p, b) in &spec.points {
                        if u32::from(*p) == v
                            && let Some(bit) = b
                        {
                            self.clauses.push(vec![Lit {
                                bit: *bit,
                                positive: false,
                            }]);
                        }
                    }
                }
                Some(self)
            }
            Feature::IcmpType => {
                if let Some(m) = self.icmp {
                    if u32::from(m.icmp_type) != v {
                        return None;
                    }
                    self.icmp = m.code.map(|c| IcmpMatch {
                        icmp_type: m.icmp_type,
                        code: Some(c),
                    });
                }
                if let Some(m) = self.not_icmp {
                    if u32::from(m.icmp_type) != v {
                        self.not_icmp = None;
                    } else if m.code.is_none() {
                        return None;
                    }
                }
                Some(self)
            }
            Feature::IcmpCode => {
                if let Some(m) = self.icmp.take()
                    && m.code.is_some_and(|c| u32::from(c) != v)
                {
                    return None;
                }
                if let Some(m) = self.not_icmp.take()
                    && m.code.is_some_and(|c| u32::from(c) == v)
                {
                    return None;
                }
                Some(self)
            }
        }
    }
}

/// Builds programs, sharing nodes and leaves.
struct Builder {
    nodes: Vec<Node>,
    node_ids: HashMap<Node, u32>,
    leaves: Vec<Leaf>,
    leaf_ids: HashMap<Leaf, u32>,
    regions: HashMap<(usize, Vec<u32>), Next>,
    specs: Vec<Spec>,
    spec_ids: HashMap<Spec, u32>,
    /// Rule specialisations plus items handed to sub-problems: the
    /// builder's work, counted so tests can check how it grows.
    work: u64,
}

impl Builder {
    fn leaf(&mut self, leaf: Leaf) -> Next {
        if let Some(id) = self.leaf_ids.get(&leaf) {
            return Next::Leaf(*id);
        }
        let id = self.leaves.len() as u32;
        self.leaves.push(leaf);
        self.leaf_ids.insert(leaf, id);
        Next::Leaf(id)
    }

    fn node(&mut self, test: Test, then: Next, otherwise: Next) -> Next {
        if then == otherwise {
            return then;
        }
        let n = Node {
            test,
            then,
            otherwise,
        };
        if let Some(id) = self.node_ids.get(&n) {
            return Next::Node(*id);
        }
        let id = self.nodes.len() as u32;
        self.nodes.push(n);
        self.node_ids.insert(n, id);
        Next::Node(id)
    }

    fn intern(&mut self, spec: Spec) -> u32 {
        if let Some(id) = self.spec_ids.get(&spec) {
            return *id;
        }
        let id = self.specs.len() as u32;
        self.specs.push(spec.clone());
        self.spec_ids.insert(spec, id);
        id
    }

    /// Splits on feature `Feature::ORDER[dim]`, then recurses. Items are
    /// interned specs, so sub-problems hash and compare cheaply.
    ///
    /// Each rule is specialised once per stretch between its own cut points
    /// (its truth cannot change inside one), and a sweep over the region's
    /// elementary intervals picks the stretch that covers each: the work is
    /// the items' own cuts plus one index step per item and interval, not a
    /// specialisation (with its allocations) per item and interval.
    fn region(&mut self, dim: usize, items: Vec<u32>) -> Next {
        if dim == Feature::ORDER.len() {
            let specs = std::mem::take(&mut self.specs);
            let chained: Vec<&Spec> = items.iter().map(|i| &specs[*i as usize]).collect();
            let out = self.chain(&chained);
            self.specs = specs;
            return out;
        }
        let key = (dim, items);
        if let Some(n) = self.regions.get(&key) {
            return *n;
        }
        let (dim, items) = key;
        let f = Feature::ORDER[dim];
        // Each item's specialised form as the sweep moves right: pass-through
        // items (their condition ignores this feature) never change; a rule
        // changes only at its own cuts, listed in `changes` as (start, item,
        // specialised spec or None where the rule cannot match).
        let mut current: Vec<Option<u32>> = Vec::with_capacity(items.len());
        let mut changes: Vec<(u32, usize, Option<u32>)> = Vec::new();
        let mut own = Vec::new();
        for (i, id) in items.iter().enumerate() {
            current.push(Some(*id));
            let Spec::Rule {
                cond,
                action,
                rule,
                tier,
            } = &self.specs[*id as usize]
            else {
                continue;
            };
            own.clear();
            cond.cuts(f, &mut own);
            if own.is_empty() {
                continue;
            }
            own.push(0);
            own.retain(|c| *c <= f.max());
            own.sort_unstable();
            own.dedup();
            let (cond, action, rule, tier) = (cond.clone(), *action, *rule, *tier);
            for &start in &own {
                self.work += 1;
                let spec = cond.clone().specialize(f, start).map(|cond| {
                    self.intern(Spec::Rule {
                        cond,
                        action,
                        rule,
                        tier,
                    })
                });
                changes.push((start, i, spec));
            }
        }
        changes.sort_unstable_by_key(|(start, i, _)| (*start, *i));
        // Items that can match in the current interval, in list order: the
        // work per interval is what its sub-problem holds, not every item.
        let mut live: std::collections::BTreeSet<usize> = (0..items.len()).collect();
        let mut parts: Vec<(u32, Next)> = Vec::new();
        let mut next_change = 0;
        while next_change < changes.len() {
            let start = changes[next_change].0;
            while let Some(&(at, i, spec)) = changes.get(next_change) {
                if at != start {
                    break;
                }
                current[i] = spec;
                if spec.is_some() {
                    live.insert(i);
                } else {
                    live.remove(&i);
                }
                next_change += 1;
            }
            let specialised: Vec<u32> = live.iter().filter_map(|i| current[*i]).collect();
            self.work += specialised.len() as u64;
            let child = self.region(dim + 1, specialised);
            match parts.last() {
                Some((_, prev)) if *prev == child => {}
                _ => parts.push((start, child)),
            }
        }
        if parts.is_empty() {
            // No item looks at this feature: one interval, everything passes.
            let child = self.region(dim + 1, items.clone());
            parts.push((0, child));
        }
        let out = self.search(f, &parts);
        self.regions.insert((dim, items), out);
        out
    }

    /// Balanced binary search over interval starts.
    fn search(&mut self, f: Feature, parts: &[(u32, Next)]) -> Next {
        if parts.len() == 1 {
            return parts[0].1;
        }
        let mid = parts.len() / 2;
        let lower = self.search(f, &parts[..mid]);
        let upper = self.search(f, &parts[mid..]);
        self.node(Test::Less(f, parts[mid].0), lower, upper)
    }

    /// First-match decision list over peer literals.
    fn chain(&mut self, items: &[&Spec]) -> Next {
        // Position after each tier's end marker, for Pass.
        let mut after_tier: HashMap<u32, usize> = HashMap::default();
        for (i, it) in items.iter().enumerate() {
            if let Spec::TierEnd { tier, .. } = it {
                after_tier.insert(*tier, i + 1);
            }
        }
        let mut memo: HashMap<(usize, bool), Next> = HashMap::default();
        self.chain_at(items, &after_tier, 0, false, &mut memo)
    }

    fn chain_at(
        &mut self,
        items: &[&Spec],
        after_tier: &HashMap<u32, usize>,
        pos: usize,
        logged: bool,
        memo: &mut HashMap<(usize, bool), Next>,
    ) -> Next {
        if let Some(n) = memo.get(&(pos, logged)) {
            return *n;
        }
        let out = match items[pos] {
            Spec::End { rule }
            | Spec::TierEnd {
                deny: true, rule, ..
            } => self.leaf(Leaf {
                verdict: Verdict::Deny,
                rule: *rule,
                logged,
            }),
            Spec::TierEnd { deny: false, .. } => {
                self.chain_at(items, after_tier, pos + 1, logged, memo)
            }
            Spec::Rule {
                cond,
                action,
                rule,
                tier,
            } => {
                let on_fail = self.chain_at(items, after_tier, pos + 1, logged, memo);
                let on_match = match action {
                    ItemAction::Allow => self.leaf(Leaf {
                        verdict: Verdict::Allow,
                        rule: *rule,
                        logged,
                    }),
                    ItemAction::Deny => self.leaf(Leaf {
                        verdict: Verdict::Deny,
                        rule: *rule,
                        logged,
                    }),
                    ItemAction::Log => self.chain_at(items, after_tier, pos + 1, true, memo),
                    ItemAction::Pass => {
                        let next = after_tier
                            .get(tier)
                            .copied()
                            .expect("every tier has an end marker");
                        self.chain_at(items, after_tier, next, logged, memo)
                    }
                };
                self.clauses(&cond.clauses, on_match, on_fail)
            }
        };
        memo.insert((pos, logged), out);
        out
    }

    /// AND of OR-clauses: `yes` when all hold, `no` otherwise.
    fn clauses(&mut self, clauses: &[Vec<Lit>], yes: Next, no: Next) -> Next {
        let Some((first, rest)) = clauses.split_first() else {
            return yes;
        };
        let after = self.clauses(rest, yes, no);
        // OR of literals: any literal true -> `after`; all false -> `no`.
        let mut out = no;
        for lit in first.iter().rev() {
            out = if lit.positive {
                self.node(Test::Bit(lit.bit), after, out)
            } else {
                self.node(Test::Bit(lit.bit), out, after)
            };
        }
        out
    }
}

/// Compiles an ordered item list into a program. The list must end with
/// [`Item::End`] and every tier referenced by a rule must have its
/// [`Item::TierEnd`].
pub fn build(items: &[Item]) -> Program {
    build_counting(items).0
}

/// [`build`], and the builder's work (see `Builder::work`).
fn build_counting(items: &[Item]) -> (Program, u64) {
    let specs: Vec<Spec> = items
        .iter()
        .map(|it| match it {
            Item::Rule {
                cond,
                action,
                rule,
                tier,
            } => Spec::Rule {
                cond: cond.clone(),
                action: *action,
                rule: *rule,
                tier: *tier,
            },
            Item::TierEnd { tier, deny, rule } => Spec::TierEnd {
                tier: *tier,
                deny: *deny,
                rule: *rule,
            },
            Item::End { rule } => Spec::End { rule: *rule },
        })
        .collect();
    let mut b = Builder {
        nodes: Vec::new(),
        node_ids: HashMap::default(),
        leaves: Vec::new(),
        leaf_ids: HashMap::default(),
        regions: HashMap::default(),
        specs: Vec::new(),
        spec_ids: HashMap::default(),
        work: 0,
    };
    let ids: Vec<u32> = specs.into_iter().map(|s| b.intern(s)).collect();
    let root = b.region(0, ids);
    (compact(&b.nodes, &b.leaves, root), b.work)
}

/// Keeps only what is reachable from the root, numbered in depth-first
/// order from the root (node 0 is the root when the root is a node), so equal
/// decision functions built along different paths get equal programs.
fn compact(nodes: &[Node], leaves: &[Leaf], root: Next) -> Program {
    let mut out = Program {
        nodes: Vec::new(),
        leaves: Vec::new(),
        root,
    };
    let mut node_map: HashMap<u32, u32> = HashMap::default();
    let mut leaf_map: HashMap<u32, u32> = HashMap::default();
    fn visit(
        at: Next,
        nodes: &[Node],
        leaves: &[Leaf],
        out: &mut Program,
        node_map: &mut HashMap<u32, u32>,
        leaf_map: &mut HashMap<u32, u32>,
    ) -> Next {
        match at {
            Next::Leaf(l) => Next::Leaf(*leaf_map.entry(l).or_insert_with(|| {
                out.leaves.push(leaves[l as usize]);
                (out.leaves.len() - 1) as u32
            })),
            Next::Node(n) => {
                if let Some(id) = node_map.get(&n) {
                    return Next::Node(*id);
                }
                let id = out.nodes.len() as u32;
                node_map.insert(n, id);
                let node = nodes[n as usize];
                // Reserve the slot, then fill in the children.
                out.nodes.push(node);
                let then = visit(node.then, nodes, leaves, out, node_map, leaf_map);
                let otherwise = visit(node.otherwise, nodes, leaves, out, node_map, leaf_map);
                out.nodes[id as usize].then = then;
                out.nodes[id as usize].otherwise = otherwise;
                Next::Node(id)
            }
        }
    }
    out.root = visit(root, nodes, leaves, &mut out, &mut node_map, &mut leaf_map);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(protocol: u8, local_port: u16) -> Features {
        Features {
            protocol,
            local_port,
            peer_port: 40000,
            icmp_type: 0,
            icmp_code: 0,
        }
    }

    /// `n` rules, each on its own port and peer set, then the tier's end.
    fn one_port_per_rule(n: u16) -> Vec<Item> {
        let mut items: Vec<Item> = (0..n)
            .map(|r| Item::Rule {
                cond: Cond {
                    protocol: Some(Protocol::TCP),
                    local_ports: Some(PortSpec {
                        ranges: vec![(1000 + r, 1000 + r)],
                        points: vec![],
                    }),
                    clauses: vec![vec![Lit {
                        bit: u32::from(r),
                        positive: true,
                    }]],
                    ..Default::default()
                },
                action: ItemAction::Allow,
                rule: u32::from(r) + 1,
                tier: 0,
            })
            .collect();
        items.push(Item::TierEnd {
            tier: 0,
            deny: true,
            rule: 0,
        });
        items
    }

    #[test]
    fn work_grows_linearly_with_rules_that_each_cut_the_ports() {
        // Specialising every rule in every port interval was quadratic: a
        // 1,024-rule policy took seconds (issue 16). Doubling the rules must
        // now about double the work, not quadruple it.
        let (small, w1) = build_counting(&one_port_per_rule(500));
        let (large, w2) = build_counting(&one_port_per_rule(1000));
        assert_eq!(small.leaves.len(), 501);
        assert_eq!(large.leaves.len(), 1001);
        let ratio = w2 as f64 / w1 as f64;
        assert!(
            ratio < 2.5,
            "work {w1} -> {w2} ({ratio:.2}x) for twice the rules"
        );
        let p = large;
        let at = |port| {
            p.evaluate(&features(6, port), |b| u32::from(port - 1000) == b)
                .0
        };
        assert_eq!(at(1500).rule, 501);
        assert_eq!(at(1999).verdict, Verdict::Allow);
    }

    #[test]
    fn allow_port_from_set_then_deny() {
        let items = vec![
            Item::Rule {
                cond: Cond {
                    protocol: Some(Protocol::TCP),
                    local_ports: Some(PortSpec {
                        ranges: vec![(80, 81)],
                        points: vec![],
                    }),
                    clauses: vec![vec![Lit {
                        bit: 3,
                        positive: true,
                    }]],
                    ..Default::default()
                },
                action: ItemAction::Allow,
                rule: 1,
                tier: 0,
            },
            Item::TierEnd {
                tier: 0,
                deny: true,
                rule: 2,
            },
            Item::End { rule: 3 },
        ];
        let p = build(&items);
        let eval =
            |proto, port, member: bool| p.evaluate(&features(proto, port), |b| member && b == 3).0;
        assert_eq!(eval(6, 80, true).rule, 1);
        assert_eq!(eval(6, 81, true).verdict, Verdict::Allow);
        assert_eq!(eval(6, 82, true).rule, 2);
        assert_eq!(eval(17, 80, true).rule, 2);
        assert_eq!(eval(6, 80, false).rule, 2);
    }

    #[test]
    fn pass_and_log() {
        let any = Cond::default();
        let items = vec![
            Item::Rule {
                cond: any.clone(),
                action: ItemAction::Log,
                rule: 1,
                tier: 0,
            },
            Item::Rule {
                cond: any.clone(),
                action: ItemAction::Pass,
                rule: 2,
                tier: 0,
            },
            Item::TierEnd {
                tier: 0,
                deny: true,
                rule: 3,
            },
            Item::Rule {
                cond: any,
                action: ItemAction::Allow,
                rule: 4,
                tier: 1,
            },
            Item::TierEnd {
                tier: 1,
                deny: true,
                rule: 5,
            },
            Item::End { rule: 6 },
        ];
        let p = build(&items);
        let (leaf, steps) = p.evaluate(&features(6, 1), |_| false);
        assert_eq!(
            leaf,
            Leaf {
                verdict: Verdict::Allow,
                rule: 4,
                logged: true
            }
        );
        assert_eq!(steps, 0);
    }
}
