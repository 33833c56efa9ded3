//! Read-only views of a [`Compiler`]: peer bits, programs, slots, statistics,
//! the canonical dump, per-flow decisions (the [`Engine`] impl) and invariant checks.

use super::*;

impl Compiler {
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
            membership_bits: self.bit_owner.len(),
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
            let Some(p) = self.programs.get(pid) else {
                let _ = writeln!(
                    out,
                    "slot {}/{}: missing program {pid}",
                    slot.endpoint, slot.addr
                );
                continue;
            };
            let _ = writeln!(
                out,
                "slot {}/{} {}:",
                slot.endpoint, slot.addr, slot.direction
            );
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

pub(super) fn render(
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
            return Err(EngineError::NotLocal(endpoint.clone()));
        }
        let (local_ip, peer_ip, features) = flow_features(flow, direction);
        let program = self
            .program(&Slot {
                endpoint: endpoint.clone(),
                addr: local_ip,
                direction,
            })
            .ok_or_else(|| EngineError::NotAnAddressOf {
                endpoint: endpoint.clone(),
                addr: local_ip,
            })?;
        let bits = self.peer_bits(&peer_ip);
        let (leaf, _) = program.evaluate(&features, |b| bits.get(b));
        let rule = self
            .rule(leaf.rule)
            .ok_or_else(|| EngineError::Inconsistent(format!("unknown rule id {}", leaf.rule)))?;
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
    pub fn check_invariants(&self) -> Result<(), InvariantViolations> {
        let mut problems = Vec::new();
        let mut slot_refs: HashMap<ProgramId, u32> = HashMap::default();
        for (_, pid) in self.slots.iter() {
            *slot_refs.entry(*pid).or_insert(0) += 1;
        }
        for (pid, _, refs) in self.program_ids.iter() {
            let held = slot_refs.get(&pid).copied().unwrap_or(0);
            if held != refs {
                problems.push(format!("program {pid}: {refs} refs, {held} slots"));
            }
        }
        for (pid, _) in self.programs.iter() {
            if self.program_ids.refs(*pid) == 0 {
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
            // The statistics' row width counts every live bit.
            let width = self.bit_owner.len();
            if ps.bit as usize >= width || self.bit_owner[ps.bit as usize].as_ref() != Some(k) {
                problems.push(format!(
                    "peer set {k}: bit {} is not owned by it within the width {width}",
                    ps.bit
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(InvariantViolations(problems))
        }
    }
}

/// Bookkeeping of a [`Compiler`] that does not add up (a bug, never bad
/// input): one line per problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct InvariantViolations(pub Vec<String>);
