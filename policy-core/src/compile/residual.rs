//! Residualisation: a rule specialised to one local endpoint and IP version.
//! Everything about the local side (its address, labels and declared ports)
//! is decided here; what is left tests the packet and the peer.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::index::IdentityKey;
use super::program::{Cond, Item, ItemAction, Lit, PortSpec};
use super::{Compiler, PeerSetKey, ProgramKey, RuleId, RuleRef};
use crate::model::*;
use crate::net::{IpVersion, PortMatch, Protocol};
use crate::selector::Selector;

fn sides(rule: &Rule, dir: Direction) -> (&EntityMatch, &EntityMatch) {
    match dir {
        Direction::Ingress => (&rule.destination, &rule.source),
        Direction::Egress => (&rule.source, &rule.destination),
    }
}

/// Whether a rule tests the local endpoint's address (nets or selectors on
/// the local side), which makes its program depend on the exact address.
pub(super) fn has_local_side(rule: &Rule, dir: Direction) -> bool {
    let (local, _) = sides(rule, dir);
    !local.nets.is_empty()
        || !local.not_nets.is_empty()
        || local.selector.is_some()
        || local.not_selector.is_some()
}

/// Named ports a rule list matches on the peer side.
pub(super) fn peer_named_ports(rules: &[Rule], dir: Direction) -> Vec<String> {
    let mut v = Vec::new();
    for r in rules {
        let (_, peer) = sides(r, dir);
        for p in peer.ports.iter().chain(&peer.not_ports) {
            if let PortMatch::Named(n) = p {
                v.push(n.clone());
            }
        }
    }
    v.sort();
    v.dedup();
    v
}

fn same_family(list: &[IpNet], v: IpVersion) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = list
        .iter()
        .filter(|n| IpVersion::of_net(n) == v)
        .copied()
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The local endpoint(s) a program is specialised for.
pub(super) struct Local<'a> {
    pub ip: Option<IpAddr>,
    pub version: IpVersion,
    pub identities: Vec<Arc<IdentityKey>>,
    pub netsets: Vec<(&'a LabelMap, &'a [IpNet])>,
}

impl Local<'_> {
    fn selected(&self, sel: &Selector) -> bool {
        self.identities.iter().any(|k| sel.matches(&k.labels))
            || self.ip.is_some_and(|ip| {
                self.netsets
                    .iter()
                    .any(|(l, nets)| nets.iter().any(|n| n.contains(&ip)) && sel.matches(*l))
            })
    }

    fn named_points(
        &self,
        name: &str,
        positive: Option<&Selector>,
        rule_protocol: Option<Protocol>,
    ) -> Vec<(Protocol, u16, Option<u32>)> {
        let mut v = Vec::new();
        for k in &self.identities {
            if positive.is_some_and(|s| !s.matches(&k.labels)) {
                continue;
            }
            for (n, p, port) in &k.ports {
                let p = Protocol(*p);
                if n == name && rule_protocol.is_none_or(|rp| rp == p) {
                    v.push((p, *port, None));
                }
            }
        }
        v
    }
}

impl Compiler {
    /// Residual condition of `rule`, or `None` when it cannot match for this
    /// local endpoint and IP version. Peer sets it needs are acquired and
    /// recorded in `sets`.
    fn residual(
        &mut self,
        rule: &Rule,
        dir: Direction,
        local: &Local<'_>,
        sets: &mut Vec<PeerSetKey>,
    ) -> Option<Cond> {
        let v = local.version;
        if rule.ip_version.is_some_and(|rv| rv != v) {
            return None;
        }
        for list in [
            &rule.source.nets,
            &rule.source.not_nets,
            &rule.destination.nets,
            &rule.destination.not_nets,
        ] {
            if !list.is_empty() && !list.iter().any(|n| IpVersion::of_net(n) == v) {
                return None;
            }
        }
        let (lside, pside) = sides(rule, dir);

        // Local side: decided now.
        if let Some(ip) = local.ip {
            if !lside.nets.is_empty()
                && !lside
                    .nets
                    .iter()
                    .any(|n| IpVersion::of_net(n) == v && n.contains(&ip))
            {
                return None;
            }
            if lside
                .not_nets
                .iter()
                .any(|n| IpVersion::of_net(n) == v && n.contains(&ip))
            {
                return None;
            }
        }
        if let Some(s) = &lside.selector
            && !local.selected(s)
        {
            return None;
        }
        if let Some(s) = &lside.not_selector
            && local.selected(s)
        {
            return None;
        }
        let local_spec = |list: &[PortMatch]| -> Option<PortSpec> {
            if list.is_empty() {
                return None;
            }
            let mut spec = PortSpec::default();
            for m in list {
                match m {
                    PortMatch::Range { first, last } => spec.ranges.push((*first, *last)),
                    PortMatch::Named(n) => spec.points.extend(local.named_points(
                        n,
                        lside.selector.as_ref(),
                        rule.protocol,
                    )),
                }
            }
            Some(spec)
        };
        let local_ports = local_spec(&lside.ports);
        // A port list that resolves to nothing can never match.
        if local_ports
            .as_ref()
            .is_some_and(|s| s.ranges.is_empty() && s.points.is_empty())
        {
            return None;
        }
        let local_not_ports =
            local_spec(&lside.not_ports).filter(|s| !(s.ranges.is_empty() && s.points.is_empty()));

        // Peer side: membership bits.
        let mut clauses: Vec<Vec<Lit>> = Vec::new();
        let mut lit = |c: &mut Compiler, key: PeerSetKey, positive: bool| -> Lit {
            let bit = c.acquire_bit(&key);
            sets.push(key);
            Lit { bit, positive }
        };
        let nets = same_family(&pside.nets, v);
        if !nets.is_empty() {
            clauses.push(vec![lit(self, PeerSetKey::Nets(nets), true)]);
        }
        let not_nets = same_family(&pside.not_nets, v);
        if !not_nets.is_empty() {
            clauses.push(vec![lit(self, PeerSetKey::Nets(not_nets), false)]);
        }
        if let Some(s) = &pside.selector {
            clauses.push(vec![lit(self, PeerSetKey::Selector(s.clone()), true)]);
        }
        if let Some(s) = &pside.not_selector {
            clauses.push(vec![lit(self, PeerSetKey::Selector(s.clone()), false)]);
        }
        let mut peer_spec = |c: &mut Compiler, list: &[PortMatch]| -> Option<PortSpec> {
            if list.is_empty() {
                return None;
            }
            let mut spec = PortSpec::default();
            for m in list {
                match m {
                    PortMatch::Range { first, last } => spec.ranges.push((*first, *last)),
                    PortMatch::Named(n) => {
                        let realized: Vec<(Protocol, u16)> = c
                            .realizations
                            .get(n)
                            .map(|m| m.keys().copied().collect())
                            .unwrap_or_default();
                        for (p, port) in realized {
                            if rule.protocol.is_some_and(|rp| rp != p) {
                                continue;
                            }
                            let key = PeerSetKey::NamedPort {
                                name: n.clone(),
                                selector: pside.selector.clone(),
                                protocol: p,
                                port,
                            };
                            let l = lit(c, key, true);
                            spec.points.push((p, port, Some(l.bit)));
                        }
                    }
                }
            }
            Some(spec)
        };
        let peer_ports = peer_spec(self, &pside.ports);
        if peer_ports
            .as_ref()
            .is_some_and(|s| s.ranges.is_empty() && s.points.is_empty())
        {
            return None;
        }
        let peer_not_ports = peer_spec(self, &pside.not_ports)
            .filter(|s| !(s.ranges.is_empty() && s.points.is_empty()));
        Some(Cond {
            protocol: rule.protocol,
            not_protocol: rule.not_protocol,
            icmp: rule.icmp,
            not_icmp: rule.not_icmp,
            local_ports,
            local_not_ports,
            peer_ports,
            peer_not_ports,
            clauses,
        })
    }

    pub(super) fn rule_id(&mut self, r: RuleRef, used: &mut Vec<RuleId>) -> RuleId {
        let id = match self.rule_ids.id(&r) {
            Some(id) => {
                self.rule_ids.retain(id);
                id
            }
            None => {
                let (id, _) = self.rule_ids.acquire(r.clone());
                self.rules.insert(id, r);
                id
            }
        };
        used.push(id);
        id
    }

    /// The ordered items of one program: tiers with applicable policies,
    /// then the endpoint's profiles, then the final drop.
    pub(super) fn program_items(
        &mut self,
        key: &ProgramKey,
        local_ip: IpAddr,
        sets: &mut Vec<PeerSetKey>,
        rules: &mut Vec<RuleId>,
    ) -> Vec<Item> {
        let dir = key.direction;
        let identity = self.ids.key(key.label).clone();
        let mut identities = vec![identity.clone()];
        if let Some((_, eps)) = self.hosts.get(&super::addr_key(&local_ip))
            && eps.len() > 1
        {
            identities = eps
                .iter()
                .filter_map(|e| self.endpoints.get(e))
                .map(|st| self.ids.key(st.label).clone())
                .collect();
        }
        // Network sets only matter when rules test the local address.
        let netsets: Vec<(LabelMap, Vec<IpNet>)> = if key.ip.is_some() {
            self.netsets.values().cloned().collect()
        } else {
            Vec::new()
        };
        let local = Local {
            ip: key.ip,
            version: key.version,
            identities,
            netsets: netsets.iter().map(|(l, n)| (l, n.as_slice())).collect(),
        };
        let set = self
            .policy_sets
            .get(&(key.label, dir))
            .cloned()
            .unwrap_or_default();
        let mut items = Vec::new();
        let mut tier_pos = 0u32;
        let mut i = 0;
        while i < set.len() {
            let tier_name = self
                .policy_arcs
                .get(&set[i])
                .map(|p| p.tier.clone())
                .unwrap_or_default();
            while i < set.len() {
                let Some(p) = self.policy_arcs.get(&set[i]).cloned() else {
                    i += 1;
                    continue;
                };
                if p.tier != tier_name {
                    break;
                }
                for (idx, rule) in p.rules(dir).iter().enumerate() {
                    let Some(cond) = self.residual(rule, dir, &local, sets) else {
                        continue;
                    };
                    let action = match rule.action {
                        Action::Allow => ItemAction::Allow,
                        Action::Deny => ItemAction::Deny,
                        Action::Pass => ItemAction::Pass,
                        Action::Log => ItemAction::Log,
                    };
                    let id = self.rule_id(
                        RuleRef::Policy {
                            tier: p.tier.clone(),
                            policy: p.id.clone(),
                            direction: dir,
                            index: idx,
                            action: rule.action,
                        },
                        rules,
                    );
                    items.push(Item::Rule {
                        cond,
                        action,
                        rule: id,
                        tier: tier_pos,
                    });
                }
                i += 1;
            }
            let deny = self
                .cluster
                .tier(&tier_name)
                .is_none_or(|t| t.default_action == TierDefault::Deny);
            let id = self.rule_id(RuleRef::TierDefault { tier: tier_name }, rules);
            items.push(Item::TierEnd {
                tier: tier_pos,
                deny,
                rule: id,
            });
            tier_pos += 1;
        }
        for name in identity.profiles.iter() {
            let Some(profile) = self.profile_of(name) else {
                continue;
            };
            for (idx, rule) in profile.rules(dir).iter().enumerate() {
                let Some(cond) = self.residual(rule, dir, &local, sets) else {
                    continue;
                };
                let action = match rule.action {
                    Action::Allow => ItemAction::Allow,
                    // Pass has no next tier here: it drops.
                    Action::Deny | Action::Pass => ItemAction::Deny,
                    Action::Log => ItemAction::Log,
                };
                let id = self.rule_id(
                    RuleRef::Profile {
                        profile: name.clone(),
                        direction: dir,
                        index: idx,
                        action: rule.action,
                    },
                    rules,
                );
                items.push(Item::Rule {
                    cond,
                    action,
                    rule: id,
                    tier: u32::MAX,
                });
            }
        }
        let id = self.rule_id(RuleRef::NoProfileMatch, rules);
        items.push(Item::End { rule: id });
        items
    }

    /// Whether programs for this identity and direction depend on the exact
    /// local address.
    pub(super) fn needs_address(&mut self, label: super::LabelId, dir: Direction) -> bool {
        let idx = match dir {
            Direction::Ingress => 0,
            Direction::Egress => 1,
        };
        let by_policy = self.policy_sets.get(&(label, dir)).is_some_and(|set| {
            set.iter()
                .any(|p| self.policy_local_side.get(p).is_some_and(|f| f[idx]))
        });
        if by_policy {
            return true;
        }
        let profiles = self.ids.key(label).profiles.clone();
        profiles.iter().any(|name| {
            self.profile_of(name)
                .is_some_and(|p| p.rules(dir).iter().any(|r| has_local_side(r, dir)))
        })
    }
}
