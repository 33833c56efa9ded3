//! The reference engine: direct evaluation of the ordered rules over the
//! model. It is the semantic oracle the other engines are checked against,
//! so it favours being obviously right over being fast.
//!
//! Matching follows felix: rule selectors are IP sets (the addresses of the
//! endpoints and the CIDRs of the network sets they select), named ports are
//! (address, protocol, port) sets filtered by the rule's positive selector,
//! and a rule whose CIDR fields have no entry of the packet's IP version does
//! not apply to that version.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::cluster::Cluster;
use crate::connection::{Engine, EngineError};
use crate::flow::{DecidedBy, Decision, Flow, Verdict};
use crate::model::*;
use crate::net::{IpVersion, PortMatch, Protocol};
use crate::selector::Selector;

/// The reference engine over a cluster snapshot.
#[derive(Debug)]
pub struct ReferenceEngine<'c> {
    cluster: &'c Cluster,
    labels: HashMap<EndpointKey, LabelMap>,
    by_ip: HashMap<IpAddr, Vec<EndpointKey>>,
    network_sets: Vec<(LabelMap, Vec<IpNet>)>,
    tiers: Vec<(&'c Tier, Vec<&'c Policy>)>,
    profiles: HashMap<String, Option<Profile>>,
}

/// Why a rule did not match, or that it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleOutcome {
    /// Every criterion held.
    Matched,
    /// The first criterion that failed.
    NoMatch(String),
}

/// One rule's evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleTrace {
    /// Index in the policy's rule list.
    pub index: usize,
    /// The rule's action.
    pub action: Action,
    /// The rule's name, if it was written with one.
    pub name: Option<String>,
    /// Match or why not.
    pub outcome: RuleOutcome,
}

/// One policy's evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyTrace {
    /// The policy.
    pub policy: PolicyId,
    /// Its order.
    pub order: Option<String>,
    /// Rules evaluated, in order, up to the one that matched with a terminal action.
    pub rules: Vec<RuleTrace>,
}

/// How a tier ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TierOutcome {
    /// A rule allowed or denied.
    Decided,
    /// A Pass rule sent evaluation to the next tier.
    Passed {
        /// The policy with the Pass rule.
        policy: PolicyId,
        /// Its index.
        rule: usize,
    },
    /// No rule decided; the tier's default action applied.
    EndOfTier(TierDefault),
}

/// One tier's evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierTrace {
    /// Tier name.
    pub tier: String,
    /// Applicable policies, in evaluation order.
    pub policies: Vec<PolicyTrace>,
    /// How it ended.
    pub outcome: TierOutcome,
}

/// One profile's evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileTrace {
    /// Profile name.
    pub profile: String,
    /// Whether it exists.
    pub defined: bool,
    /// Rules evaluated.
    pub rules: Vec<RuleTrace>,
}

/// The full story of one decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// Endpoint evaluated.
    pub endpoint: EndpointKey,
    /// Direction.
    pub direction: Direction,
    /// The flow.
    pub flow: Flow,
    /// Tiers with at least one applicable policy, in order.
    pub tiers: Vec<TierTrace>,
    /// Profiles evaluated (when no tier decided).
    pub profiles: Vec<ProfileTrace>,
    /// The decision.
    pub decision: Decision,
}

impl<'c> ReferenceEngine<'c> {
    /// Builds the engine's indexes over a cluster.
    pub fn new(cluster: &'c Cluster) -> Self {
        let mut labels = HashMap::new();
        let mut by_ip: HashMap<IpAddr, Vec<EndpointKey>> = HashMap::new();
        for ep in cluster.endpoints() {
            labels.insert(ep.key.clone(), cluster.endpoint_labels(ep));
            for ip in &ep.ips {
                by_ip.entry(*ip).or_default().push(ep.key.clone());
            }
        }
        let network_sets = cluster
            .network_sets()
            .map(|s| (cluster.network_set_labels(s), s.nets.clone()))
            .collect();
        let tiers = cluster
            .sorted_tiers()
            .into_iter()
            .map(|t| {
                let pols = cluster
                    .sorted_policies(&t.name)
                    .into_iter()
                    .filter(|p| p.enforced())
                    .collect();
                (t, pols)
            })
            .collect();
        let mut profiles = HashMap::new();
        for ep in cluster.endpoints() {
            for name in ep.profile_names() {
                profiles
                    .entry(name.clone())
                    .or_insert_with(|| cluster.profile(&name));
            }
        }
        Self {
            cluster,
            labels,
            by_ip,
            network_sets,
            tiers,
            profiles,
        }
    }

    /// The cluster this engine evaluates.
    pub fn cluster(&self) -> &'c Cluster {
        self.cluster
    }

    /// Effective labels of an endpoint.
    pub fn endpoint_labels(&self, key: &EndpointKey) -> Option<&LabelMap> {
        self.labels.get(key)
    }

    /// Endpoints owning an address.
    pub fn endpoints_at(&self, ip: &IpAddr) -> &[EndpointKey] {
        self.by_ip.get(ip).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Whether `ip` is in the IP set of `sel`: the address of a selected
    /// endpoint or inside a CIDR of a selected network set.
    pub fn selector_contains(&self, sel: &Selector, ip: &IpAddr) -> bool {
        self.endpoints_at(ip)
            .iter()
            .any(|k| sel.matches(&self.labels[k]))
            || self
                .network_sets
                .iter()
                .any(|(l, nets)| nets.iter().any(|n| n.contains(ip)) && sel.matches(l))
    }

    /// Whether a named port matches: an endpoint at `ip`, selected by the
    /// rule's positive selector (if any), declares `name` with the packet's
    /// protocol and port (and the rule's protocol, if set).
    fn named_port_matches(
        &self,
        name: &str,
        positive: Option<&Selector>,
        rule_protocol: Option<Protocol>,
        ip: &IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> bool {
        self.endpoints_at(ip).iter().any(|k| {
            let Some(ep) = self.cluster.endpoint(k) else {
                return false;
            };
            positive.is_none_or(|s| s.matches(&self.labels[k]))
                && ep.ports.iter().any(|p| {
                    p.name == name
                        && p.protocol == protocol
                        && p.port == port
                        && rule_protocol.is_none_or(|rp| rp == p.protocol)
                })
        })
    }

    fn port_list_matches(
        &self,
        list: &[PortMatch],
        positive: Option<&Selector>,
        rule_protocol: Option<Protocol>,
        ip: &IpAddr,
        flow: &Flow,
        port: u16,
    ) -> bool {
        list.iter().any(|m| match m {
            PortMatch::Range { first, last } => (*first..=*last).contains(&port),
            PortMatch::Named(n) => {
                self.named_port_matches(n, positive, rule_protocol, ip, flow.protocol, port)
            }
        })
    }

    /// Checks one side of a rule. `Err` says why it does not match.
    fn entity_matches(
        &self,
        e: &EntityMatch,
        rule_protocol: Option<Protocol>,
        ip: &IpAddr,
        port: u16,
        flow: &Flow,
        side: &str,
    ) -> Result<(), String> {
        let v = IpVersion::of(ip);
        let same_family = |n: &&IpNet| IpVersion::of_net(n) == v;
        if !e.nets.is_empty() && !e.nets.iter().filter(same_family).any(|n| n.contains(ip)) {
            return Err(format!("{side} {ip} is not in nets {}", fmt_nets(&e.nets)));
        }
        if let Some(n) = e
            .not_nets
            .iter()
            .filter(same_family)
            .find(|n| n.contains(ip))
        {
            return Err(format!("{side} {ip} is in notNets entry {n}"));
        }
        if let Some(sel) = &e.selector
            && !self.selector_contains(sel, ip)
        {
            return Err(format!("{side} {ip} is not selected by {sel}"));
        }
        if let Some(sel) = &e.not_selector
            && self.selector_contains(sel, ip)
        {
            return Err(format!("{side} {ip} is selected by notSelector {sel}"));
        }
        if !e.ports.is_empty()
            && !self.port_list_matches(&e.ports, e.selector.as_ref(), rule_protocol, ip, flow, port)
        {
            return Err(format!(
                "{side} port {port} is not in ports {}",
                fmt_ports(&e.ports)
            ));
        }
        if !e.not_ports.is_empty()
            && self.port_list_matches(
                &e.not_ports,
                e.selector.as_ref(),
                rule_protocol,
                ip,
                flow,
                port,
            )
        {
            return Err(format!(
                "{side} port {port} is in notPorts {}",
                fmt_ports(&e.not_ports)
            ));
        }
        Ok(())
    }

    /// Checks a whole rule against a flow. `Err` is the trace's reason why it
    /// does not match (text for `explain`, not a failure).
    fn rule_matches(&self, rule: &Rule, flow: &Flow) -> Result<(), String> {
        let v = flow.ip_version();
        if let Some(rv) = rule.ip_version
            && rv != v
        {
            return Err(format!("rule is for {rv} only"));
        }
        // felix drops, per IP version, a rule whose CIDR list has no entry of that version.
        for (list, name) in [
            (&rule.source.nets, "source.nets"),
            (&rule.source.not_nets, "source.notNets"),
            (&rule.destination.nets, "destination.nets"),
            (&rule.destination.not_nets, "destination.notNets"),
        ] {
            if !list.is_empty() && !list.iter().any(|n| IpVersion::of_net(n) == v) {
                return Err(format!(
                    "{name} has no {v} entry, so the rule does not apply to {v}"
                ));
            }
        }
        if let Some(p) = rule.protocol
            && p != flow.protocol
        {
            return Err(format!("protocol {} is not {p}", flow.protocol));
        }
        if let Some(p) = rule.not_protocol
            && p == flow.protocol
        {
            return Err(format!("protocol is {p} (notProtocol)"));
        }
        let (icmp_type, icmp_code) = flow.icmp.unwrap_or((0, 0));
        if let Some(m) = rule.icmp
            && !icmp_matches(m, icmp_type, icmp_code)
        {
            return Err(format!(
                "ICMP type/code {icmp_type}/{icmp_code} does not match {}",
                fmt_icmp(m)
            ));
        }
        if let Some(m) = rule.not_icmp
            && icmp_matches(m, icmp_type, icmp_code)
        {
            return Err(format!(
                "ICMP type/code {icmp_type}/{icmp_code} matches notICMP {}",
                fmt_icmp(m)
            ));
        }
        self.entity_matches(
            &rule.source,
            rule.protocol,
            &flow.src,
            flow.src_port,
            flow,
            "source",
        )?;
        self.entity_matches(
            &rule.destination,
            rule.protocol,
            &flow.dst,
            flow.dst_port,
            flow,
            "destination",
        )?;
        Ok(())
    }

    /// Evaluates with a full trace.
    pub fn trace(
        &self,
        endpoint: &EndpointKey,
        direction: Direction,
        flow: &Flow,
    ) -> Result<Trace, EngineError> {
        flow.validate().map_err(EngineError::InvalidFlow)?;
        let labels = self
            .labels
            .get(endpoint)
            .ok_or_else(|| EngineError::UnknownEndpoint(endpoint.clone()))?;
        let mut logged = false;
        let mut tiers = Vec::new();
        for (tier, policies) in &self.tiers {
            let applicable: Vec<&Policy> = policies
                .iter()
                .copied()
                .filter(|p| p.applies_in(direction) && p.selector.matches(labels))
                .collect();
            if applicable.is_empty() {
                continue;
            }
            let mut tier_trace = TierTrace {
                tier: tier.name.clone(),
                policies: Vec::new(),
                outcome: TierOutcome::EndOfTier(tier.default_action),
            };
            let mut decided: Option<Decision> = None;
            'policies: for p in applicable {
                let mut pt = PolicyTrace {
                    policy: p.id.clone(),
                    order: p.order.map(|o| o.to_string()),
                    rules: Vec::new(),
                };
                for (i, rule) in p.rules(direction).iter().enumerate() {
                    let outcome = match self.rule_matches(rule, flow) {
                        Ok(()) => RuleOutcome::Matched,
                        Err(why) => RuleOutcome::NoMatch(why),
                    };
                    let matched = outcome == RuleOutcome::Matched;
                    pt.rules.push(RuleTrace {
                        index: i,
                        action: rule.action,
                        name: rule.name.clone(),
                        outcome,
                    });
                    if !matched {
                        continue;
                    }
                    match rule.action {
                        Action::Log => logged = true,
                        Action::Allow | Action::Deny => {
                            decided = Some(Decision {
                                verdict: if rule.action == Action::Allow {
                                    Verdict::Allow
                                } else {
                                    Verdict::Deny
                                },
                                decided_by: DecidedBy::Rule {
                                    tier: tier.name.clone(),
                                    policy: p.id.clone(),
                                    rule: i,
                                    action: rule.action,
                                },
                                logged,
                            });
                            tier_trace.outcome = TierOutcome::Decided;
                            tier_trace.policies.push(pt);
                            break 'policies;
                        }
                        Action::Pass => {
                            tier_trace.outcome = TierOutcome::Passed {
                                policy: p.id.clone(),
                                rule: i,
                            };
                            tier_trace.policies.push(pt);
                            break 'policies;
                        }
                    }
                }
                tier_trace.policies.push(pt);
            }
            if decided.is_none() && tier_trace.outcome == TierOutcome::EndOfTier(TierDefault::Deny)
            {
                decided = Some(Decision {
                    verdict: Verdict::Deny,
                    decided_by: DecidedBy::TierDefault {
                        tier: tier.name.clone(),
                    },
                    logged,
                });
            }
            tiers.push(tier_trace);
            if let Some(decision) = decided {
                return Ok(Trace {
                    endpoint: endpoint.clone(),
                    direction,
                    flow: *flow,
                    tiers,
                    profiles: Vec::new(),
                    decision,
                });
            }
        }

        // No tier decided: the endpoint's profiles, in order.
        let ep = self
            .cluster
            .endpoint(endpoint)
            .ok_or_else(|| EngineError::UnknownEndpoint(endpoint.clone()))?;
        let mut profiles = Vec::new();
        for name in ep.profile_names() {
            let profile = self.profiles.get(&name).cloned().flatten();
            let mut pt = ProfileTrace {
                profile: name.clone(),
                defined: profile.is_some(),
                rules: Vec::new(),
            };
            if let Some(profile) = profile {
                for (i, rule) in profile.rules(direction).iter().enumerate() {
                    let outcome = match self.rule_matches(rule, flow) {
                        Ok(()) => RuleOutcome::Matched,
                        Err(why) => RuleOutcome::NoMatch(why),
                    };
                    let matched = outcome == RuleOutcome::Matched;
                    pt.rules.push(RuleTrace {
                        index: i,
                        action: rule.action,
                        name: rule.name.clone(),
                        outcome,
                    });
                    if !matched {
                        continue;
                    }
                    if rule.action == Action::Log {
                        logged = true;
                        continue;
                    }
                    profiles.push(pt);
                    return Ok(Trace {
                        endpoint: endpoint.clone(),
                        direction,
                        flow: *flow,
                        tiers,
                        profiles,
                        decision: Decision {
                            verdict: if rule.action == Action::Allow {
                                Verdict::Allow
                            } else {
                                Verdict::Deny
                            },
                            decided_by: DecidedBy::Profile {
                                profile: name,
                                rule: i,
                                action: rule.action,
                            },
                            logged,
                        },
                    });
                }
            }
            profiles.push(pt);
        }
        Ok(Trace {
            endpoint: endpoint.clone(),
            direction,
            flow: *flow,
            tiers,
            profiles,
            decision: Decision {
                verdict: Verdict::Deny,
                decided_by: DecidedBy::NoProfileMatch,
                logged,
            },
        })
    }
}

impl Engine for ReferenceEngine<'_> {
    fn name(&self) -> &'static str {
        "reference"
    }

    fn decide(
        &self,
        endpoint: &EndpointKey,
        direction: Direction,
        flow: &Flow,
    ) -> Result<Decision, EngineError> {
        self.trace(endpoint, direction, flow).map(|t| t.decision)
    }
}

fn icmp_matches(m: IcmpMatch, t: u8, c: u8) -> bool {
    m.icmp_type == t && m.code.is_none_or(|mc| mc == c)
}

fn fmt_icmp(m: IcmpMatch) -> String {
    match m.code {
        Some(c) => format!("type {} code {c}", m.icmp_type),
        None => format!("type {}", m.icmp_type),
    }
}

fn fmt_nets(nets: &[IpNet]) -> String {
    let v: Vec<String> = nets.iter().map(ToString::to_string).collect();
    format!("[{}]", v.join(", "))
}

fn fmt_ports(ports: &[PortMatch]) -> String {
    let v: Vec<String> = ports.iter().map(ToString::to_string).collect();
    format!("[{}]", v.join(", "))
}

impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} {} of {}", self.endpoint, self.direction, self.flow)?;
        if self.tiers.is_empty() {
            writeln!(
                f,
                "  no policy applies to {} in {}",
                self.endpoint, self.direction
            )?;
        }
        for t in &self.tiers {
            writeln!(f, "  tier {}", t.tier)?;
            for p in &t.policies {
                writeln!(
                    f,
                    "    policy {} (order {})",
                    p.policy,
                    p.order.as_deref().unwrap_or("unset")
                )?;
                if p.rules.is_empty() {
                    writeln!(f, "      no {} rules", self.direction)?;
                }
                for r in &p.rules {
                    write_rule(f, r, "      ")?;
                }
            }
            match &t.outcome {
                TierOutcome::Decided => {}
                TierOutcome::Passed { policy, rule } => {
                    writeln!(f, "    -> passed to the next tier by {policy} rule {rule}")?
                }
                TierOutcome::EndOfTier(TierDefault::Deny) => {
                    writeln!(f, "    -> end of tier: default action deny")?
                }
                TierOutcome::EndOfTier(TierDefault::Pass) => {
                    writeln!(f, "    -> end of tier: default action pass")?
                }
            }
        }
        for p in &self.profiles {
            if p.defined {
                writeln!(f, "  profile {}", p.profile)?;
            } else {
                writeln!(f, "  profile {} (not defined: no rules)", p.profile)?;
            }
            for r in &p.rules {
                write_rule(f, r, "    ")?;
            }
        }
        writeln!(f, "  => {}{}", self.decision, self.decider_name_suffix())
    }
}

impl Trace {
    /// The name of the rule that decided, when it was written with one.
    pub fn decider_name(&self) -> Option<&str> {
        let DecidedBy::Rule { policy, rule, .. } = &self.decision.decided_by else {
            return None;
        };
        self.tiers
            .iter()
            .flat_map(|t| &t.policies)
            .filter(|p| &p.policy == policy)
            .flat_map(|p| &p.rules)
            .find(|r| r.index == *rule)
            .and_then(|r| r.name.as_deref())
    }

    fn decider_name_suffix(&self) -> String {
        self.decider_name()
            .map(|n| format!(", named {n:?}"))
            .unwrap_or_default()
    }
}

fn write_rule(f: &mut fmt::Formatter<'_>, r: &RuleTrace, indent: &str) -> fmt::Result {
    let name = r
        .name
        .as_deref()
        .map(|n| format!(" {n:?}"))
        .unwrap_or_default();
    match &r.outcome {
        RuleOutcome::Matched => writeln!(f, "{indent}rule {}{name} {}: matched", r.index, r.action),
        RuleOutcome::NoMatch(why) => {
            writeln!(
                f,
                "{indent}rule {}{name} {}: no match: {why}",
                r.index, r.action
            )
        }
    }
}
