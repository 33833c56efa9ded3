//! The network-policy-api's cluster-admin kinds into Calico policies, as
//! Calico renders them: AdminNetworkPolicy in tier `kube-admin` at order =
//! priority, BaselineAdminNetworkPolicy (the singleton `default`) in
//! `kube-baseline` at order 1000, ClusterNetworkPolicy in either by its
//! `tier` at order = priority. Both tiers end in Pass, so a policy that does
//! not decide hands the connection to the next tier. Each API rule becomes
//! one Calico rule per (protocol, peer), protocol-major, as Calico splits
//! them. Where Calico falls short of the API, Palisade follows the API:
//! named ports resolve against the destination pod (any protocol) and node
//! peers select the nodes' addresses. Domain-name peers are rejected:
//! Palisade does not resolve DNS.

use super::*;
use crate::admin_api::{
    AdminObject, AdminPort, AdminRule, AdminSpec, ClusterRule, ClusterSpec, NamespacedPods, Peer,
    ProtocolEntry, Subject, V1ALPHA1, V1ALPHA2,
};

/// The API's limits (kubebuilder markers of the Go types).
pub mod admin_limits {
    /// Highest priority value.
    pub const MAX_PRIORITY: i64 = 1000;
    /// Rules per direction, peers per rule and ports per rule in v1alpha1.
    pub const V1ALPHA1_ITEMS: usize = 100;
    /// Rules per direction, peers per rule and protocols per rule in v1alpha2.
    pub const V1ALPHA2_ITEMS: usize = 25;
    /// CIDRs of one `networks` peer.
    pub const NETWORKS: usize = 25;
    /// Characters of a rule name.
    pub const RULE_NAME: usize = 100;
}
use admin_limits::*;

/// The order Calico gives the BaselineAdminNetworkPolicy.
const BASELINE_ORDER: f64 = 1000.0;

/// One API rule, whatever its version, on its way to Calico rules.
struct ApiRule<'a> {
    field: String,
    name: Option<&'a str>,
    action: Action,
    peers: &'a [Peer],
    /// Ports by protocol.
    ports: PortGroups,
}

fn limit(what: &'static str, count: usize, max: usize, field: String) -> Result<(), Error> {
    if count > max {
        return Err(Error::new(ErrorKind::Limit {
            what,
            count,
            limit: max,
        })
        .at(field));
    }
    Ok(())
}

fn parse_action(text: &str, allowed: &[(&str, Action)], field: String) -> Result<Action, Error> {
    allowed
        .iter()
        .find(|(name, _)| *name == text)
        .map(|(_, a)| *a)
        .ok_or_else(|| {
            let names: Vec<&str> = allowed.iter().map(|(n, _)| *n).collect();
            Error::invalid(
                field,
                format!(
                    "{text:?} is not an action here: expected {}",
                    names.join(", ")
                ),
            )
        })
}

fn check_priority(priority: Option<i64>) -> Result<f64, Error> {
    match priority {
        None => Err(Error::invalid("spec.priority", "priority is required")),
        Some(p) if (0..=MAX_PRIORITY).contains(&p) => Ok(p as f64),
        Some(p) => Err(Error::invalid(
            "spec.priority",
            format!("{p} is out of range 0-{MAX_PRIORITY}"),
        )),
    }
}

fn check_rule_name(name: Option<&str>, field: &str) -> Result<(), Error> {
    match name {
        Some(n) if n.chars().count() > RULE_NAME => Err(Error::invalid(
            format!("{field}.name"),
            format!("a rule name has at most {RULE_NAME} characters"),
        )),
        _ => Ok(()),
    }
}

fn port_number(n: i64, field: String) -> Result<i64, Error> {
    if (1..=65535).contains(&n) {
        Ok(n)
    } else {
        Err(Error::invalid(
            field,
            format!("port {n} is out of range 1-65535"),
        ))
    }
}

fn api_protocol(p: Option<&str>, field: String) -> Result<String, Error> {
    match p.unwrap_or("TCP") {
        p @ ("TCP" | "UDP" | "SCTP") => Ok(p.to_string()),
        other => Err(Error::invalid(
            field,
            format!("{other:?} is not a protocol here: expected TCP, UDP or SCTP"),
        )),
    }
}

fn named_port(name: &str, field: String) -> Result<NumOrString, Error> {
    crate::net::validate_port_name(name).map_err(|m| Error::invalid(field, m))?;
    Ok(NumOrString::Str(name.to_string()))
}

/// Adds one (protocol, port) to a rule's groups; `None` is every port of
/// the protocol and absorbs any listed one.
fn add_port(groups: &mut PortGroups, protocol: String, port: Option<NumOrString>) {
    match port {
        None => {
            groups.insert(protocol, None);
        }
        Some(p) => {
            if let Some(list) = groups.entry(protocol).or_insert_with(|| Some(Vec::new())) {
                list.push(p);
            }
        }
    }
}

/// Ports by protocol ("" for named ports); `None`: every port.
type PortGroups = BTreeMap<String, Option<Vec<NumOrString>>>;

/// A rule's `ports` / `protocols` list: `Ok(None)` when absent (every
/// protocol and port), else the list and its field, checked non-empty and
/// within `max`.
fn port_list<'a, T>(
    list: Option<&'a [T]>,
    field: &str,
    name: &'static str,
    max: usize,
) -> Result<Option<(&'a [T], String)>, Error> {
    let Some(list) = list else {
        return Ok(None);
    };
    let f = format!("{field}.{name}");
    if list.is_empty() {
        return Err(Error::invalid(
            f,
            format!("{name}, when given, lists at least one entry"),
        ));
    }
    limit(name, list.len(), max, f.clone())?;
    Ok(Some((list, f)))
}

/// Every protocol and port.
fn any_port() -> PortGroups {
    BTreeMap::from([(String::new(), None)])
}

/// v1alpha1 `ports`.
fn v1alpha1_ports(ports: Option<&[AdminPort]>, field: &str) -> Result<PortGroups, Error> {
    let Some((ports, f)) = port_list(ports, field, "ports", V1ALPHA1_ITEMS)? else {
        return Ok(any_port());
    };
    let mut groups = BTreeMap::new();
    for (i, p) in ports.iter().enumerate() {
        let pf = format!("{f}[{i}]");
        let set = [
            p.port_number.is_some(),
            p.named_port.is_some(),
            p.port_range.is_some(),
        ];
        if set.iter().filter(|s| **s).count() != 1 {
            return Err(Error::invalid(
                pf,
                "a port sets exactly one of portNumber, namedPort, portRange",
            ));
        }
        if let Some(n) = &p.port_number {
            let protocol =
                api_protocol(n.protocol.as_deref(), format!("{pf}.portNumber.protocol"))?;
            let port = port_number(n.port, format!("{pf}.portNumber.port"))?;
            add_port(&mut groups, protocol, Some(NumOrString::Num(port)));
        } else if let Some(name) = &p.named_port {
            let port = named_port(name, format!("{pf}.namedPort"))?;
            add_port(&mut groups, String::new(), Some(port));
        } else if let Some(r) = &p.port_range {
            let rf = format!("{pf}.portRange");
            let protocol = api_protocol(r.protocol.as_deref(), format!("{rf}.protocol"))?;
            let start = port_number(r.start, format!("{rf}.start"))?;
            let end = port_number(r.end, format!("{rf}.end"))?;
            if start > end {
                return Err(Error::invalid(
                    rf,
                    format!("start {start} is after end {end}"),
                ));
            }
            add_port(
                &mut groups,
                protocol,
                Some(NumOrString::Str(format!("{start}:{end}"))),
            );
        }
    }
    Ok(groups)
}

/// v1alpha2 `protocols`.
fn v1alpha2_protocols(
    protocols: Option<&[ProtocolEntry]>,
    field: &str,
) -> Result<PortGroups, Error> {
    let Some((protocols, f)) = port_list(protocols, field, "protocols", V1ALPHA2_ITEMS)? else {
        return Ok(any_port());
    };
    let mut groups = BTreeMap::new();
    for (i, e) in protocols.iter().enumerate() {
        let pf = format!("{f}[{i}]");
        let entries = [
            ("TCP", "tcp", e.tcp.as_ref()),
            ("UDP", "udp", e.udp.as_ref()),
            ("SCTP", "sctp", e.sctp.as_ref()),
        ];
        let set = entries.iter().filter(|(_, _, p)| p.is_some()).count()
            + usize::from(e.destination_named_port.is_some());
        if set != 1 {
            return Err(Error::invalid(
                pf,
                "a protocol entry sets exactly one of tcp, udp, sctp, destinationNamedPort",
            ));
        }
        if let Some(name) = &e.destination_named_port {
            let port = named_port(name, format!("{pf}.destinationNamedPort"))?;
            add_port(&mut groups, String::new(), Some(port));
            continue;
        }
        for (protocol, key, ports) in entries {
            let Some(ports) = ports else { continue };
            let port = match &ports.destination_port {
                None => None,
                Some(d) => {
                    let df = format!("{pf}.{key}.destinationPort");
                    Some(match (d.number, &d.range) {
                        (Some(n), None) => {
                            NumOrString::Num(port_number(n, format!("{df}.number"))?)
                        }
                        (None, Some(r)) => {
                            let start = port_number(r.start, format!("{df}.range.start"))?;
                            let end = port_number(r.end, format!("{df}.range.end"))?;
                            if start >= end {
                                return Err(Error::invalid(
                                    format!("{df}.range"),
                                    format!("start {start} must be less than end {end}"),
                                ));
                            }
                            NumOrString::Str(format!("{start}:{end}"))
                        }
                        _ => {
                            return Err(Error::invalid(
                                df,
                                "a destination port sets exactly one of number, range",
                            ));
                        }
                    })
                }
            };
            add_port(&mut groups, protocol.to_string(), port);
        }
    }
    Ok(groups)
}

fn pods_selectors(p: &NamespacedPods, field: &str) -> Result<(String, String), Error> {
    Ok((
        k8s_selector_text(Some(&p.pod_selector), true, &format!("{field}.podSelector"))?,
        k8s_selector_text(
            Some(&p.namespace_selector),
            false,
            &format!("{field}.namespaceSelector"),
        )?,
    ))
}

/// One peer as a Calico rule side.
fn peer_entity(peer: &Peer, ingress: bool, field: &str) -> Result<EntityRuleSpec, Error> {
    let set = [
        ("namespaces", peer.namespaces.is_some()),
        ("pods", peer.pods.is_some()),
        ("nodes", peer.nodes.is_some()),
        ("networks", peer.networks.is_some()),
        ("domainNames", peer.domain_names.is_some()),
    ];
    let given: Vec<&str> = set.iter().filter(|(_, s)| *s).map(|(n, _)| *n).collect();
    let allowed = if ingress {
        "namespaces, pods"
    } else {
        "namespaces, pods, nodes, networks, domainNames"
    };
    match given.as_slice() {
        [one] if !ingress || matches!(*one, "namespaces" | "pods") => {}
        [one] => {
            return Err(Error::invalid(
                format!("{field}.{one}"),
                format!("an ingress peer is one of {allowed}"),
            ));
        }
        _ => {
            return Err(Error::invalid(
                field,
                format!("a peer sets exactly one of {allowed}"),
            ));
        }
    }
    let mut e = EntityRuleSpec::default();
    if let Some(ns) = &peer.namespaces {
        e.namespace_selector = Some(k8s_selector_text(
            Some(ns),
            false,
            &format!("{field}.namespaces"),
        )?);
    } else if let Some(p) = &peer.pods {
        let (pods, ns) = pods_selectors(p, &format!("{field}.pods"))?;
        e.selector = Some(pods);
        e.namespace_selector = Some(ns);
    } else if let Some(n) = &peer.nodes {
        let labels = k8s_selector_text(Some(n), false, &format!("{field}.nodes"))?;
        e.selector = Some(if labels == "all()" {
            format!("has({LABEL_NODE})")
        } else {
            format!("has({LABEL_NODE}) && {labels}")
        });
    } else if let Some(nets) = &peer.networks {
        let f = format!("{field}.networks");
        if nets.is_empty() {
            return Err(Error::invalid(f, "networks lists at least one CIDR"));
        }
        limit("CIDRs", nets.len(), NETWORKS, f.clone())?;
        for (i, n) in nets.iter().enumerate() {
            let cidr = parse_cidr(n).map_err(|m| Error::invalid(format!("{f}[{i}]"), m))?;
            e.nets.push(cidr.to_string());
        }
    } else {
        return Err(Error::new(ErrorKind::Unsupported(
            "domainNames peers: Palisade does not resolve DNS names; use networks".into(),
        ))
        .at(format!("{field}.domainNames")));
    }
    Ok(e)
}

/// The Calico rules of one API rule: one per (protocol group, peer).
fn calico_rules(
    r: &ApiRule,
    ingress: bool,
    out: &mut Vec<RuleSpec>,
    names: &mut Vec<Option<String>>,
) -> Result<(), Error> {
    let peers_field = format!("{}.{}", r.field, if ingress { "from" } else { "to" });
    if r.peers.is_empty() {
        return Err(Error::invalid(peers_field, "a rule has at least one peer"));
    }
    check_rule_name(r.name, &r.field)?;
    let entities = r
        .peers
        .iter()
        .enumerate()
        .map(|(i, p)| peer_entity(p, ingress, &format!("{peers_field}[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let named = r.ports.get("").is_some_and(Option::is_some);
    if named
        && let Some(i) = r
            .peers
            .iter()
            .position(|p| p.nodes.is_some() || p.networks.is_some() || p.domain_names.is_some())
    {
        return Err(Error::invalid(
            format!("{peers_field}[{i}]"),
            "a named port cannot be used with nodes, networks or domainNames peers (no pod declares it)",
        ));
    }
    for (protocol, ports) in &r.ports {
        for entity in &entities {
            let mut entity = entity.clone();
            let ports = ports.clone().unwrap_or_default();
            let mut rule = RuleSpec::matching_any(
                match r.action {
                    Action::Allow => ActionSpec::Allow,
                    Action::Deny => ActionSpec::Deny,
                    Action::Pass => ActionSpec::Pass,
                    Action::Log => ActionSpec::Log,
                },
                (!protocol.is_empty()).then(|| NumOrString::Str(protocol.clone())),
            );
            if ingress {
                rule.source = entity;
                rule.destination.ports = ports;
            } else {
                entity.ports = ports;
                rule.destination = entity;
            }
            out.push(rule);
            names.push(r.name.map(String::from));
        }
    }
    Ok(())
}

fn subject_selectors(subject: Option<&Subject>) -> Result<(String, String), Error> {
    let Some(s) = subject else {
        return Err(Error::invalid("spec.subject", "subject is required"));
    };
    match (&s.namespaces, &s.pods) {
        (Some(ns), None) => Ok((
            format!("{LABEL_ORCHESTRATOR} == 'k8s'"),
            k8s_selector_text(Some(ns), false, "spec.subject.namespaces")?,
        )),
        (None, Some(p)) => pods_selectors(p, "spec.subject.pods"),
        _ => Err(Error::invalid(
            "spec.subject",
            "a subject sets exactly one of namespaces, pods",
        )),
    }
}

/// Builds the Calico policy from converted rules.
fn admin_policy(
    meta: &ObjectMeta,
    kind: PolicyKind,
    tier: &str,
    order: f64,
    subject: Option<&Subject>,
    ingress: &[ApiRule],
    egress: &[ApiRule],
) -> Result<Policy, Error> {
    let (selector, namespace_selector) = subject_selectors(subject)?;
    let (mut ingress_specs, mut ingress_names) = (Vec::new(), Vec::new());
    for r in ingress {
        calico_rules(r, true, &mut ingress_specs, &mut ingress_names)?;
    }
    let (mut egress_specs, mut egress_names) = (Vec::new(), Vec::new());
    for r in egress {
        calico_rules(r, false, &mut egress_specs, &mut egress_names)?;
    }
    let spec = PolicySpec {
        tier: Some(tier.into()),
        order: Some(order),
        selector: Some(selector),
        namespace_selector: Some(namespace_selector),
        ingress: ingress_specs,
        egress: egress_specs,
        ..Default::default()
    };
    let mut p = calico_policy(meta, &spec, PolicyKind::GlobalNetworkPolicy)?;
    p.id.kind = kind;
    // One Calico rule per name pushed, in order.
    for (rule, name) in p.ingress.iter_mut().zip(ingress_names) {
        rule.name = name;
    }
    for (rule, name) in p.egress.iter_mut().zip(egress_names) {
        rule.name = name;
    }
    // Calico lists a type only for a direction with rules; a direction
    // without any leaves the tier's Pass in charge either way.
    p.ingress_enabled = !p.ingress.is_empty();
    p.egress_enabled = !p.egress.is_empty();
    Ok(p)
}

/// The peers of a rule: `from` on ingress, `to` on egress, never the other.
fn rule_peers<'a>(
    from: &'a Option<Vec<Peer>>,
    to: &'a Option<Vec<Peer>>,
    ingress: bool,
    field: &str,
    max: usize,
) -> Result<&'a [Peer], Error> {
    let (peers, name, wrong) = if ingress {
        (from, "from", to.is_some().then_some("to"))
    } else {
        (to, "to", from.is_some().then_some("from"))
    };
    if let Some(w) = wrong {
        let dir = if ingress { "ingress" } else { "egress" };
        return Err(Error::invalid(
            format!("{field}.{w}"),
            format!("an {dir} rule has no `{w}`"),
        ));
    }
    let peers = peers.as_deref().unwrap_or_default();
    limit("peers", peers.len(), max, format!("{field}.{name}"))?;
    Ok(peers)
}

fn v1alpha1_rules<'a>(
    rules: &'a [AdminRule],
    ingress: bool,
    actions: &[(&str, Action)],
) -> Result<Vec<ApiRule<'a>>, Error> {
    let dir = if ingress { "ingress" } else { "egress" };
    limit("rules", rules.len(), V1ALPHA1_ITEMS, format!("spec.{dir}"))?;
    rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let field = format!("spec.{dir}[{i}]");
            let peers = rule_peers(&r.from, &r.to, ingress, &field, V1ALPHA1_ITEMS)?;
            Ok(ApiRule {
                action: parse_action(&r.action, actions, format!("{field}.action"))?,
                name: r.name.as_deref(),
                peers,
                ports: v1alpha1_ports(r.ports.as_deref(), &field)?,
                field,
            })
        })
        .collect()
}

fn v1alpha2_rules(rules: &[ClusterRule], ingress: bool) -> Result<Vec<ApiRule<'_>>, Error> {
    let dir = if ingress { "ingress" } else { "egress" };
    limit("rules", rules.len(), V1ALPHA2_ITEMS, format!("spec.{dir}"))?;
    rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let field = format!("spec.{dir}[{i}]");
            let peers = rule_peers(&r.from, &r.to, ingress, &field, V1ALPHA2_ITEMS)?;
            Ok(ApiRule {
                action: parse_action(
                    &r.action,
                    &[
                        ("Accept", Action::Allow),
                        ("Deny", Action::Deny),
                        ("Pass", Action::Pass),
                    ],
                    format!("{field}.action"),
                )?,
                name: r.name.as_deref(),
                peers,
                ports: v1alpha2_protocols(r.protocols.as_deref(), &field)?,
                field,
            })
        })
        .collect()
}

/// Converts an AdminNetworkPolicy, BaselineAdminNetworkPolicy or
/// ClusterNetworkPolicy document.
pub(super) fn admin_document(
    doc: &serde_json::Value,
    kind: &str,
    api: &str,
) -> Result<Policy, Errors> {
    const ANP_ACTIONS: &[(&str, Action)] = &[
        ("Allow", Action::Allow),
        ("Deny", Action::Deny),
        ("Pass", Action::Pass),
    ];
    const BANP_ACTIONS: &[(&str, Action)] = &[("Allow", Action::Allow), ("Deny", Action::Deny)];
    match kind {
        "AdminNetworkPolicy" | "BaselineAdminNetworkPolicy" => {
            expect_api(kind, api, V1ALPHA1)?;
            let obj: AdminObject<AdminSpec> = typed(doc)?;
            let spec = &obj.spec;
            if kind == "AdminNetworkPolicy" {
                let order = check_priority(spec.priority)?;
                Ok(admin_policy(
                    &obj.metadata,
                    PolicyKind::AdminNetworkPolicy,
                    "kube-admin",
                    order,
                    spec.subject.as_ref(),
                    &v1alpha1_rules(&spec.ingress, true, ANP_ACTIONS)?,
                    &v1alpha1_rules(&spec.egress, false, ANP_ACTIONS)?,
                )?)
            } else {
                if obj.metadata.name.as_deref() != Some("default") {
                    return fail(Error::invalid(
                        "metadata.name",
                        "the BaselineAdminNetworkPolicy is a singleton named \"default\"",
                    ));
                }
                if spec.priority.is_some() {
                    return fail(Error::invalid(
                        "spec.priority",
                        "a BaselineAdminNetworkPolicy has no priority",
                    ));
                }
                Ok(admin_policy(
                    &obj.metadata,
                    PolicyKind::BaselineAdminNetworkPolicy,
                    "kube-baseline",
                    BASELINE_ORDER,
                    spec.subject.as_ref(),
                    &v1alpha1_rules(&spec.ingress, true, BANP_ACTIONS)?,
                    &v1alpha1_rules(&spec.egress, false, BANP_ACTIONS)?,
                )?)
            }
        }
        _ => {
            expect_api(kind, api, V1ALPHA2)?;
            let obj: AdminObject<ClusterSpec> = typed(doc)?;
            let spec = &obj.spec;
            let tier = match spec.tier.as_str() {
                "Admin" => "kube-admin",
                "Baseline" => "kube-baseline",
                other => {
                    return fail(Error::invalid(
                        "spec.tier",
                        format!("{other:?} is not a tier: expected Admin or Baseline"),
                    ));
                }
            };
            let order = check_priority(spec.priority)?;
            Ok(admin_policy(
                &obj.metadata,
                PolicyKind::ClusterNetworkPolicy,
                tier,
                order,
                spec.subject.as_ref(),
                &v1alpha2_rules(&spec.ingress, true)?,
                &v1alpha2_rules(&spec.egress, false)?,
            )?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::{Object, convert_document};
    use serde_json::json;

    fn anp(spec: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": V1ALPHA1, "kind": "AdminNetworkPolicy",
               "metadata": {"name": "guard"}, "spec": spec})
    }

    fn subject() -> serde_json::Value {
        json!({"namespaces": {"matchLabels": {"team": "shop"}}})
    }

    fn policy(doc: serde_json::Value) -> Policy {
        match convert_document(&doc).unwrap() {
            Object::Policy(p) => p,
            o => panic!("not a policy: {o:?}"),
        }
    }

    fn error(doc: serde_json::Value) -> (String, String) {
        let e = convert_document(&doc).unwrap_err();
        assert_eq!(e.object.as_ref().unwrap().name, doc["metadata"]["name"]);
        (e.field.clone().unwrap_or_default(), e.to_string())
    }

    #[test]
    fn anp_lands_in_kube_admin_at_its_priority_split_by_protocol_then_peer() {
        let p = policy(anp(json!({
            "priority": 7, "subject": subject(),
            "egress": [{"name": "r", "action": "Pass",
                "to": [{"namespaces": {}}, {"networks": ["10.0.0.0/8"]}],
                "ports": [{"portNumber": {"port": 80}}, {"portRange": {"protocol": "UDP", "start": 5000, "end": 5010}}]}]
        })));
        assert_eq!(p.id.kind, PolicyKind::AdminNetworkPolicy);
        assert_eq!(p.id.to_string(), "kanp:guard");
        assert_eq!((p.tier.as_str(), p.order), ("kube-admin", Some(7.0)));
        assert!(!p.ingress_enabled && p.egress_enabled);
        assert_eq!(
            p.selector.canonical(),
            "(projectcalico.org/orchestrator == \"k8s\" && pcns.team == \"shop\")"
        );
        // TCP x 2 peers, then UDP x 2 peers.
        let shape: Vec<_> = p
            .egress
            .iter()
            .map(|r| (r.action, r.protocol, r.destination.nets.len()))
            .collect();
        assert_eq!(
            shape,
            [
                (Action::Pass, Some(Protocol::TCP), 0),
                (Action::Pass, Some(Protocol::TCP), 1),
                (Action::Pass, Some(Protocol::UDP), 0),
                (Action::Pass, Some(Protocol::UDP), 1),
            ]
        );
        assert_eq!(
            p.egress[0]
                .destination
                .selector
                .as_ref()
                .unwrap()
                .canonical(),
            "has(projectcalico.org/namespace)"
        );
        // Every Calico rule keeps the name of the rule it came from.
        assert!(p.egress.iter().all(|r| r.name.as_deref() == Some("r")));
    }

    #[test]
    fn named_ports_keep_any_protocol_and_node_peers_need_the_node_label() {
        let p = policy(anp(json!({
            "priority": 0, "subject": subject(),
            "ingress": [{"action": "Allow", "from": [{"pods": {
                "namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "x"}}}}],
                "ports": [{"namedPort": "web"}]}],
            "egress": [{"action": "Deny", "to": [{"nodes": {"matchLabels": {"kubernetes.io/os": "linux"}}}]}]
        })));
        assert_eq!(p.ingress[0].protocol, None);
        assert_eq!(
            p.ingress[0].destination.ports,
            [PortMatch::Named("web".into())]
        );
        assert_eq!(
            p.egress[0]
                .destination
                .selector
                .as_ref()
                .unwrap()
                .canonical(),
            "(has(projectcalico.org/node) && kubernetes.io/os == \"linux\")"
        );
    }

    #[test]
    fn baseline_and_cluster_policies_pick_their_tiers() {
        let banp = policy(
            json!({"apiVersion": V1ALPHA1, "kind": "BaselineAdminNetworkPolicy",
            "metadata": {"name": "default"},
            "spec": {"subject": subject(), "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}}),
        );
        assert_eq!(
            (banp.tier.as_str(), banp.order, banp.id.to_string()),
            ("kube-baseline", Some(1000.0), "kbanp:default".into())
        );
        for (tier, want) in [("Admin", "kube-admin"), ("Baseline", "kube-baseline")] {
            let cnp = policy(
                json!({"apiVersion": V1ALPHA2, "kind": "ClusterNetworkPolicy",
                "metadata": {"name": "c"},
                "spec": {"tier": tier, "priority": 3, "subject": subject(),
                    "ingress": [{"action": "Accept", "from": [{"namespaces": {}}],
                        "protocols": [{"tcp": {"destinationPort": {"range": {"start": 1, "end": 9}}}},
                                      {"udp": {}}, {"destinationNamedPort": "dns"}]}]}}),
            );
            assert_eq!((cnp.tier.as_str(), cnp.order), (want, Some(3.0)));
            let protocols: Vec<_> = cnp.ingress.iter().map(|r| r.protocol).collect();
            // Named ports ("" group) first, then TCP, then UDP (every port).
            assert_eq!(protocols, [None, Some(Protocol::TCP), Some(Protocol::UDP)]);
            assert_eq!(cnp.ingress[0].action, Action::Allow);
            assert!(cnp.ingress[2].destination.ports.is_empty());
        }
    }

    #[test]
    fn every_kind_can_be_deleted_by_its_reference() {
        use crate::cluster::{Change, Cluster};
        let docs = [
            anp(json!({"priority": 1, "subject": subject()})),
            json!({"apiVersion": V1ALPHA1, "kind": "BaselineAdminNetworkPolicy",
                "metadata": {"name": "default"}, "spec": {"subject": subject()}}),
            json!({"apiVersion": V1ALPHA2, "kind": "ClusterNetworkPolicy",
                "metadata": {"name": "c"}, "spec": {"tier": "Baseline", "priority": 1, "subject": subject()}}),
        ];
        let objects: Vec<Object> = docs.iter().map(|d| convert_document(d).unwrap()).collect();
        let refs: Vec<_> = objects.iter().map(Object::object_ref).collect();
        let mut c = Cluster::from_objects(objects).unwrap();
        assert_eq!(c.policies().count(), 3);
        c.apply(refs.into_iter().map(Change::Delete).collect())
            .unwrap();
        assert_eq!(c.policies().count(), 0);
    }

    #[test]
    fn a_pod_labelled_as_a_node_is_not_a_node_peer() {
        use crate::cluster::Cluster;
        use crate::model::{Endpoint, EndpointKey, Node};
        let rule = policy(anp(json!({"priority": 1, "subject": subject(),
            "egress": [{"action": "Allow", "to": [{"nodes": {"matchLabels": {"os": "linux"}}}]}]})));
        let peer = rule.egress[0].destination.selector.clone().unwrap();
        let labels = [("os", "linux"), (LABEL_NODE, "n1")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into();
        let node = Node {
            name: "n1".into(),
            labels: BTreeMap::from([("os".to_string(), "linux".to_string())]),
            ips: vec!["192.168.0.1".parse().unwrap()],
        };
        let pod = Endpoint {
            key: EndpointKey::new("x", "spoof"),
            labels,
            ips: vec!["10.0.0.1".parse().unwrap()],
            ports: Vec::new(),
            service_account: None,
            node: None,
            profiles: None,
            orchestrator: "k8s".into(),
            interface: None,
        };
        let c = Cluster::from_objects([Object::Node(node.clone())]).unwrap();
        assert!(peer.matches(&node.address_set().labels));
        assert!(!peer.matches(&c.endpoint_labels(&pod)));
    }

    #[test]
    fn bad_objects_name_the_field() {
        let rule = json!({"action": "Allow", "from": [{"namespaces": {}}]});
        let cases = [
            (
                anp(json!({"priority": 1001, "subject": subject()})),
                "spec.priority",
                "out of range 0-1000",
            ),
            (
                anp(json!({"subject": subject()})),
                "spec.priority",
                "required",
            ),
            (
                anp(
                    json!({"priority": 1, "subject": subject(), "ingress": vec![rule.clone(); 101]}),
                ),
                "spec.ingress",
                "too many rules: 101, the limit is 100",
            ),
            (
                anp(json!({"priority": 1, "subject": subject(),
                    "ingress": [{"action": "Accept", "from": [{"namespaces": {}}]}]})),
                "spec.ingress[0].action",
                "expected Allow, Deny, Pass",
            ),
            (
                anp(json!({"priority": 1, "subject": subject(),
                    "ingress": [{"action": "Allow", "from": [{"networks": ["10.0.0.0/8"]}]}]})),
                "spec.ingress[0].from[0].networks",
                "an ingress peer is one of namespaces, pods",
            ),
            (
                anp(json!({"priority": 1, "subject": subject(),
                    "egress": [{"action": "Allow", "to": [{"networks": ["10.0.0.0/8"]}],
                        "ports": [{"namedPort": "web"}]}]})),
                "spec.egress[0].to[0]",
                "named port",
            ),
            (
                anp(json!({"priority": 1, "subject": subject(),
                    "egress": [{"action": "Allow", "to": [{"domainNames": ["example.com"]}]}]})),
                "spec.egress[0].to[0].domainNames",
                "DNS",
            ),
            (
                anp(json!({"priority": 1, "subject": {}})),
                "spec.subject",
                "exactly one of namespaces, pods",
            ),
            (
                anp(json!({"priority": 1, "subject": subject(),
                    "egress": [{"action": "Deny", "to": [{"namespaces": {}}],
                        "ports": [{"portNumber": {"protocol": "ICMP", "port": 1}}]}]})),
                "spec.egress[0].ports[0].portNumber.protocol",
                "expected TCP, UDP or SCTP",
            ),
            (
                json!({"apiVersion": V1ALPHA1, "kind": "BaselineAdminNetworkPolicy",
                    "metadata": {"name": "mine"}, "spec": {"subject": subject()}}),
                "metadata.name",
                "singleton",
            ),
            (
                json!({"apiVersion": V1ALPHA1, "kind": "BaselineAdminNetworkPolicy",
                    "metadata": {"name": "default"},
                    "spec": {"subject": subject(), "ingress": [{"action": "Pass", "from": [{"namespaces": {}}]}]}}),
                "spec.ingress[0].action",
                "expected Allow, Deny",
            ),
            (
                json!({"apiVersion": V1ALPHA2, "kind": "ClusterNetworkPolicy",
                    "metadata": {"name": "c"},
                    "spec": {"tier": "Middle", "priority": 1, "subject": subject()}}),
                "spec.tier",
                "expected Admin or Baseline",
            ),
            (
                json!({"apiVersion": V1ALPHA2, "kind": "ClusterNetworkPolicy",
                    "metadata": {"name": "c"},
                    "spec": {"tier": "Admin", "priority": 1, "subject": subject(),
                        "egress": vec![json!({"action": "Deny", "to": [{"namespaces": {}}]}); 26]}}),
                "spec.egress",
                "too many rules: 26, the limit is 25",
            ),
            (
                json!({"apiVersion": V1ALPHA2, "kind": "ClusterNetworkPolicy",
                    "metadata": {"name": "c"},
                    "spec": {"tier": "Admin", "priority": 1, "subject": subject(),
                        "egress": [{"action": "Deny", "to": [{"namespaces": {}}],
                            "protocols": [{"tcp": {"destinationPort": {"range": {"start": 9, "end": 9}}}}]}]}}),
                "spec.egress[0].protocols[0].tcp.destinationPort.range",
                "less than end",
            ),
        ];
        for (doc, field, text) in cases {
            let (f, msg) = error(doc);
            assert_eq!(f, field, "{msg}");
            assert!(msg.contains(text), "{msg} lacks {text:?}");
        }
        // Unknown fields are caught like everywhere else.
        let (f, msg) = error(anp(
            json!({"priority": 1, "subject": subject(), "ingres": []}),
        ));
        assert_eq!(f, "spec.ingres", "{msg}");
        assert!(msg.contains("did you mean `ingress`?"), "{msg}");
    }
}
