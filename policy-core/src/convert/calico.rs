//! Calico v3 policies into the model: rule sides (`entity`, scoped like
//! Calico's `getEndpointSelector`), rules, default types, policy names and orders.

use super::*;

/// Converts one side of a rule, scoping selectors like Calico's `getEndpointSelector`.
pub(super) fn entity(
    spec: &EntityRuleSpec,
    policy_namespace: Option<&str>,
    field: &str,
) -> Result<EntityMatch, Error> {
    let services = match &spec.services {
        None => None,
        Some(svc) => {
            let f = format!("{field}.services");
            if svc.name.is_empty() {
                return Err(Error::invalid(
                    format!("{f}.name"),
                    "must specify a service name",
                ));
            }
            for (set, what) in [
                (spec.namespace_selector.is_some(), "namespaceSelector"),
                (
                    spec.selector.is_some() || spec.not_selector.is_some(),
                    "selector/notSelector",
                ),
                (spec.service_accounts.is_some(), "serviceAccounts"),
                (
                    !spec.nets.is_empty() || !spec.not_nets.is_empty(),
                    "nets/notNets",
                ),
            ] {
                if set {
                    return Err(Error::invalid(
                        f,
                        format!("cannot specify {what} and services on the same rule side"),
                    ));
                }
            }
            let namespace = match (svc.namespace.as_deref(), policy_namespace) {
                (Some(ns), _) if !ns.is_empty() => ns.to_string(),
                (_, Some(ns)) => ns.to_string(),
                _ => {
                    return Err(Error::invalid(
                        format!("{f}.namespace"),
                        "must specify a namespace (service names are namespaced)",
                    ));
                }
            };
            Some(ServiceRef {
                namespace,
                name: svc.name.clone(),
            })
        }
    };
    let endpoint_sel = selector_field(spec.selector.as_deref(), &format!("{field}.selector"))?;
    if let Some(s) = &endpoint_sel
        && contains_global(s.expr())
    {
        return Err(Error::invalid(
            format!("{field}.selector"),
            "global() can only be used in a namespaceSelector",
        ));
    }
    let not_selector = selector_field(
        spec.not_selector.as_deref(),
        &format!("{field}.notSelector"),
    )?;
    let ns_field = format!("{field}.namespaceSelector");
    let namespace_sel = selector_field(spec.namespace_selector.as_deref(), &ns_field)?;
    if let Some(ns) = &namespace_sel
        && contains_global(ns.expr())
        && *ns.expr() != Expr::Global
    {
        return Err(Error::invalid(
            ns_field,
            "global() must be the whole namespaceSelector",
        ));
    }

    let mut sa_sel: Option<Expr> = None;
    if let Some(sa) = &spec.service_accounts {
        let sa_field = format!("{field}.serviceAccounts");
        let by_labels = selector_field(sa.selector.as_deref(), &format!("{sa_field}.selector"))?
            .map(|s| s.expr().with_label_prefix(SERVICE_ACCOUNT_LABEL_PREFIX));
        let by_name = if sa.names.is_empty() {
            None
        } else {
            let mut names = sa.names.clone();
            names.sort();
            names.dedup();
            Some(Expr::In(LABEL_SERVICE_ACCOUNT.to_string(), names))
        };
        sa_sel = match (by_labels, by_name) {
            (Some(l), Some(n)) => Some(and2(l, n)),
            (l, n) => l.or(n),
        };
    }

    let ns_expr: Option<Expr> = match (&namespace_sel, policy_namespace) {
        (Some(ns), _) => {
            let prefixed = ns.expr().with_label_prefix(NAMESPACE_LABEL_PREFIX);
            let prefixed = replace_all(&prefixed, &has_namespace());
            Some(replace_global(
                &prefixed,
                &Expr::Not(Box::new(has_namespace())),
            ))
        }
        (None, Some(ns)) => Some(Expr::Eq(LABEL_NAMESPACE.to_string(), ns.to_string())),
        (None, None) => None,
    };

    let mut selector: Option<Expr> = match (sa_sel, endpoint_sel.map(|s| s.expr().clone())) {
        (Some(a), Some(e)) => Some(and2(a, e)),
        (a, e) => a.or(e),
    };
    if let Some(ns) = ns_expr
        && (selector.is_some() || not_selector.is_some() || namespace_sel.is_some())
    {
        selector = Some(match selector {
            Some(s) => and2(ns, s),
            None => ns,
        });
    }

    Ok(EntityMatch {
        nets: nets_field(&spec.nets, &format!("{field}.nets"))?,
        not_nets: nets_field(&spec.not_nets, &format!("{field}.notNets"))?,
        selector: selector.map(Selector::from_expr),
        not_selector,
        ports: ports_field(&spec.ports, &format!("{field}.ports"))?,
        not_ports: ports_field(&spec.not_ports, &format!("{field}.notPorts"))?,
        services,
    })
}

/// Where Calico allows `services`: a destination of egress rules, a source
/// of ingress rules, and never with destination ports (they come from the
/// Service's endpoints).
pub(super) fn check_service_sides(rules: &[Rule], egress: bool, field: &str) -> Result<(), Error> {
    for (i, r) in rules.iter().enumerate() {
        let f = format!("{field}[{i}]");
        if egress && r.source.services.is_some() {
            return Err(Error::invalid(
                format!("{f}.source.services"),
                "not allowed in an egress rule's source",
            ));
        }
        if !egress && r.destination.services.is_some() {
            return Err(Error::invalid(
                format!("{f}.destination.services"),
                "not allowed in an ingress rule's destination",
            ));
        }
        if r.destination.services.is_some() {
            for (set, what) in [
                (!r.destination.ports.is_empty(), "ports"),
                (!r.destination.not_ports.is_empty(), "notPorts"),
            ] {
                if set {
                    return Err(Error::invalid(
                        format!("{f}.destination.{what}"),
                        format!(
                            "cannot specify {what} with a service (its endpoints' ports apply)"
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Converts and validates a rule.
pub(crate) fn rule(
    spec: &RuleSpec,
    policy_namespace: Option<&str>,
    field: &str,
) -> Result<Rule, Error> {
    let action = match spec.action {
        ActionSpec::Allow => Action::Allow,
        ActionSpec::Deny => Action::Deny,
        ActionSpec::Pass => Action::Pass,
        ActionSpec::Log => Action::Log,
    };
    let ip_version = match spec.ip_version {
        None => None,
        Some(4) => Some(IpVersion::V4),
        Some(6) => Some(IpVersion::V6),
        Some(v) => {
            return Err(Error::invalid(
                format!("{field}.ipVersion"),
                format!("{v} is not an IP version: expected 4 or 6"),
            ));
        }
    };
    let protocol = spec
        .protocol
        .as_ref()
        .map(|p| protocol_field(p, &format!("{field}.protocol")))
        .transpose()?;
    let not_protocol = spec
        .not_protocol
        .as_ref()
        .map(|p| protocol_field(p, &format!("{field}.notProtocol")))
        .transpose()?;
    for (p, name) in [(protocol, "protocol"), (not_protocol, "notProtocol")] {
        match (p, ip_version) {
            (Some(Protocol::ICMP), Some(IpVersion::V6)) => {
                return Err(Error::invalid(
                    format!("{field}.{name}"),
                    "protocol ICMP requires ipVersion 4 (use ICMPv6 for IPv6)",
                ));
            }
            (Some(Protocol::ICMPV6), Some(IpVersion::V4)) => {
                return Err(Error::invalid(
                    format!("{field}.{name}"),
                    "protocol ICMPv6 requires ipVersion 6 (use ICMP for IPv4)",
                ));
            }
            _ => {}
        }
    }
    let icmp = spec
        .icmp
        .as_ref()
        .map(|i| icmp_field(i, &format!("{field}.icmp")))
        .transpose()?;
    let not_icmp = spec
        .not_icmp
        .as_ref()
        .map(|i| icmp_field(i, &format!("{field}.notICMP")))
        .transpose()?;
    if (icmp.is_some() || not_icmp.is_some()) && !protocol.is_some_and(Protocol::is_icmp) {
        let which = if icmp.is_some() { "icmp" } else { "notICMP" };
        return Err(Error::invalid(
            format!("{field}.{which}"),
            "ICMP fields require protocol to be ICMP or ICMPv6",
        ));
    }
    if let Some(http) = &spec.http {
        let _ = http;
        if action != Action::Allow {
            return Err(Error::invalid(
                format!("{field}.http"),
                "HTTP match is only valid on Allow rules",
            ));
        }
        return Err(Error::new(ErrorKind::Unsupported(
            "HTTP (layer 7) matches: Palisade enforces layers 3 and 4".into(),
        ))
        .at(format!("{field}.http")));
    }
    let source = entity(&spec.source, policy_namespace, &format!("{field}.source"))?;
    let destination = entity(
        &spec.destination,
        policy_namespace,
        &format!("{field}.destination"),
    )?;

    // Ports need a protocol that has them; named ports alone may go without one.
    for (side, name) in [(&source, "source"), (&destination, "destination")] {
        for (list, lname) in [(&side.ports, "ports"), (&side.not_ports, "notPorts")] {
            if list.is_empty() {
                continue;
            }
            let f = format!("{field}.{name}.{lname}");
            match protocol {
                None if list.iter().any(PortMatch::is_numeric) => {
                    return Err(Error::invalid(
                        f,
                        "numeric ports need the rule's protocol set to TCP, UDP or SCTP",
                    ));
                }
                Some(p) if !matches!(p, Protocol::TCP | Protocol::UDP | Protocol::SCTP) => {
                    return Err(Error::invalid(
                        f,
                        format!("protocol {p} has no ports; ports need TCP, UDP or SCTP"),
                    ));
                }
                _ => {}
            }
        }
    }
    // A CIDR of the other family contradicts an explicit ipVersion.
    if let Some(v) = ip_version {
        for (side, name) in [(&source, "source"), (&destination, "destination")] {
            for (list, lname) in [(&side.nets, "nets"), (&side.not_nets, "notNets")] {
                if let Some((i, n)) = list
                    .iter()
                    .enumerate()
                    .find(|(_, n)| IpVersion::of_net(n) != v)
                {
                    return Err(Error::invalid(
                        format!("{field}.{name}.{lname}[{i}]"),
                        format!(
                            "{n} is {} but the rule's ipVersion is {v}",
                            IpVersion::of_net(n)
                        ),
                    ));
                }
            }
        }
    }
    Ok(Rule {
        action,
        ip_version,
        protocol,
        not_protocol,
        icmp,
        not_icmp,
        source,
        destination,
        name: None,
    })
}

pub(super) fn rules(specs: &[RuleSpec], ns: Option<&str>, field: &str) -> Result<Vec<Rule>, Error> {
    if specs.len() > limits::RULES_PER_DIRECTION {
        return Err(Error::new(ErrorKind::Limit {
            what: "rules",
            count: specs.len(),
            limit: limits::RULES_PER_DIRECTION,
        })
        .at(field));
    }
    specs
        .iter()
        .enumerate()
        .map(|(i, r)| rule(r, ns, &format!("{field}[{i}]")))
        .collect()
}

/// Calico's defaulting of `types`: Ingress unless there are only egress
/// rules; Egress when there are egress rules.
pub(super) fn default_types(
    spec_types: Option<&[PolicyTypeSpec]>,
    ingress: usize,
    egress: usize,
) -> Result<(bool, bool), Error> {
    match spec_types {
        Some(t) if !t.is_empty() => {
            let i = t.iter().filter(|x| **x == PolicyTypeSpec::Ingress).count();
            let e = t.iter().filter(|x| **x == PolicyTypeSpec::Egress).count();
            if i > 1 || e > 1 {
                return Err(Error::invalid(
                    "spec.types",
                    "a type is listed more than once",
                ));
            }
            Ok((i == 1, e == 1))
        }
        _ => Ok((ingress > 0 || egress == 0, egress > 0)),
    }
}

pub(super) fn policy_name(meta: &ObjectMeta) -> Result<String, Error> {
    object_name(meta, NameRule::Subdomain)
}

/// Converts a Calico NetworkPolicy / GlobalNetworkPolicy (or staged variant).
pub(super) fn calico_policy(
    meta: &ObjectMeta,
    spec: &PolicySpec,
    kind: PolicyKind,
) -> Result<Policy, Error> {
    let name = policy_name(meta)?;
    let namespace = if kind.is_namespaced() {
        Some(namespace_of(meta)?)
    } else {
        if meta.namespace.is_some() {
            return Err(Error::invalid(
                "metadata.namespace",
                format!("a {} is not namespaced", kind.kind_name()),
            ));
        }
        None
    };
    let delete = check_staged_action(spec.staged_action.as_deref())
        .map_err(|e| e.at("spec.stagedAction"))?;
    if spec.staged_action.is_some() && !kind.is_staged() {
        return Err(Error::invalid(
            "spec.stagedAction",
            "stagedAction is only valid in staged policies",
        ));
    }
    if namespace.is_some() {
        for (set, f) in [
            (spec.namespace_selector.is_some(), "spec.namespaceSelector"),
            (spec.do_not_track, "spec.doNotTrack"),
            (spec.pre_dnat, "spec.preDNAT"),
            (spec.apply_on_forward, "spec.applyOnForward"),
        ] {
            if set {
                return Err(Error::invalid(f, "only valid in a GlobalNetworkPolicy"));
            }
        }
    }
    let tier = match spec.tier.as_deref() {
        None | Some("") => "default".to_string(),
        Some(t) => t.to_string(),
    };
    let order = check_order(spec.order, "spec.order")?;

    let ingress = rules(&spec.ingress, namespace.as_deref(), "spec.ingress")?;
    let egress = rules(&spec.egress, namespace.as_deref(), "spec.egress")?;
    check_service_sides(&ingress, false, "spec.ingress")?;
    check_service_sides(&egress, true, "spec.egress")?;
    let (mut ingress_enabled, mut egress_enabled) =
        default_types(spec.types.as_deref(), ingress.len(), egress.len())?;
    if delete {
        // A staged delete previews removing the policy: it carries no rules.
        ingress_enabled = false;
        egress_enabled = false;
    }

    let base = selector_field(spec.selector.as_deref(), "spec.selector")?;
    if let Some(s) = &base
        && contains_global(s.expr())
    {
        return Err(Error::invalid(
            "spec.selector",
            "global() can only be used in a rule's namespaceSelector",
        ));
    }
    let mut selector: Option<Expr> = base.map(|s| s.expr().clone());
    if let Some(ns) = &namespace {
        let ns_eq = Expr::Eq(LABEL_NAMESPACE.to_string(), ns.clone());
        selector = Some(match selector {
            Some(s) => and2(s, ns_eq),
            None => ns_eq,
        });
    } else if let Some(nss) =
        selector_field(spec.namespace_selector.as_deref(), "spec.namespaceSelector")?
    {
        let prefixed = nss.expr().with_label_prefix(NAMESPACE_LABEL_PREFIX);
        let combined = match selector {
            Some(s) => and2(s, prefixed),
            None => prefixed,
        };
        selector = Some(replace_all(&combined, &has_namespace()));
    }
    if let Some(sas) = selector_field(
        spec.service_account_selector.as_deref(),
        "spec.serviceAccountSelector",
    )? {
        let prefixed = sas.expr().with_label_prefix(SERVICE_ACCOUNT_LABEL_PREFIX);
        let combined = match selector {
            Some(s) => and2(s, prefixed),
            None => prefixed,
        };
        selector = Some(if namespace.is_none() {
            replace_all(&combined, &Expr::Has(LABEL_SERVICE_ACCOUNT.to_string()))
        } else {
            combined
        });
    }
    Ok(Policy {
        id: PolicyId {
            kind,
            namespace,
            name,
        },
        tier,
        order,
        selector: Selector::from_expr(selector.unwrap_or(Expr::All)),
        ingress_enabled,
        egress_enabled,
        ingress,
        egress,
        host_only: spec.do_not_track || spec.pre_dnat,
    })
}
