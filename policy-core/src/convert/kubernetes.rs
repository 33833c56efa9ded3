//! Kubernetes objects (NetworkPolicy, Namespace, Pod) into the model, following
//! Calico's `K8sNetworkPolicyToCalico` and its label-selector conversion.

use super::*;

/// Converts a Kubernetes label selector to Calico selector text, like
/// Calico's `k8sSelectorToCalico`.
pub(super) fn k8s_selector_text(
    s: Option<&LabelSelector>,
    pod: bool,
    field: &str,
) -> Result<String, Error> {
    let mut parts: Vec<String> = Vec::new();
    if pod {
        parts.push(format!("{LABEL_ORCHESTRATOR} == 'k8s'"));
    }
    let Some(s) = s else {
        return Ok(parts.join(" && "));
    };
    let labels = s.match_labels.clone().unwrap_or_default();
    let exprs = s.match_expressions.clone().unwrap_or_default();
    if !pod && labels.is_empty() && exprs.is_empty() {
        return Ok("all()".to_string());
    }
    check_labels(&labels, &format!("{field}.matchLabels"))?;
    for (k, v) in &labels {
        parts.push(format!("{k} == '{v}'"));
    }
    for (i, e) in exprs.iter().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        if !is_valid_label_key(&e.key) {
            return Err(Error::invalid(
                format!("{f}.key"),
                format!("{:?} is not a valid label key", e.key),
            ));
        }
        let values = e.values.clone().unwrap_or_default();
        for (j, v) in values.iter().enumerate() {
            if v.contains('\'') || v.contains('"') {
                return Err(Error::invalid(
                    format!("{f}.values[{j}]"),
                    format!("{v:?} is not a valid label value"),
                ));
            }
        }
        let list = values.join("', '");
        match e.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(Error::invalid(
                    format!("{f}.values"),
                    format!("operator {} needs at least one value", e.operator),
                ));
            }
            "In" => parts.push(format!("{} in {{ '{list}' }}", e.key)),
            "NotIn" => parts.push(format!("{} not in {{ '{list}' }}", e.key)),
            "Exists" => parts.push(format!("has({})", e.key)),
            "DoesNotExist" => parts.push(format!("! has({})", e.key)),
            other => {
                return Err(Error::invalid(
                    format!("{f}.operator"),
                    format!(
                        "{other:?} is not a label selector operator: expected In, NotIn, Exists or DoesNotExist"
                    ),
                ));
            }
        }
    }
    Ok(parts.join(" && "))
}

/// Converts a Kubernetes NetworkPolicy to the Calico form: tier default,
/// order 1000, one Allow rule per (protocol, peer).
pub(super) fn k8s_network_policy(
    meta: &ObjectMeta,
    spec: Option<&netv1::NetworkPolicySpec>,
    kind: PolicyKind,
) -> Result<Policy, Error> {
    let default_spec = netv1::NetworkPolicySpec::default();
    let spec = spec.unwrap_or(&default_spec);
    let ns = namespace_of(meta)?;

    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        ingress.extend(k8s_rule(
            r.from.as_deref().unwrap_or_default(),
            r.ports.as_deref().unwrap_or_default(),
            true,
            &format!("spec.ingress[{i}]"),
        )?);
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        egress.extend(k8s_rule(
            r.to.as_deref().unwrap_or_default(),
            r.ports.as_deref().unwrap_or_default(),
            false,
            &format!("spec.egress[{i}]"),
        )?);
    }
    let types = spec.policy_types.clone().unwrap_or_default();
    for (i, t) in types.iter().enumerate() {
        if t != "Ingress" && t != "Egress" {
            return Err(Error::invalid(
                format!("spec.policyTypes[{i}]"),
                format!("{t:?} is not a policy type: expected Ingress or Egress"),
            ));
        }
    }
    // The API server's defaulting: Ingress, plus Egress when there are egress rules.
    let (ingress_enabled, egress_enabled) = if types.is_empty() {
        (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty()))
    } else {
        (
            types.iter().any(|t| t == "Ingress"),
            types.iter().any(|t| t == "Egress"),
        )
    };
    let calico_spec = PolicySpec {
        tier: Some("default".into()),
        order: Some(1000.0),
        selector: Some(k8s_selector_text(
            spec.pod_selector.as_ref(),
            true,
            "spec.podSelector",
        )?),
        types: Some(
            [
                ingress_enabled.then_some(PolicyTypeSpec::Ingress),
                egress_enabled.then_some(PolicyTypeSpec::Egress),
            ]
            .into_iter()
            .flatten()
            .collect(),
        ),
        ingress,
        egress,
        ..Default::default()
    };
    let mut meta = meta.clone();
    meta.namespace = Some(ns);
    let mut p = calico_policy(&meta, &calico_spec, PolicyKind::NetworkPolicy)?;
    p.id.kind = kind;
    // A policy with neither type enabled (policyTypes: []) still selects pods.
    p.ingress_enabled = ingress_enabled;
    p.egress_enabled = egress_enabled;
    Ok(p)
}

pub(super) fn k8s_rule(
    peers: &[netv1::NetworkPolicyPeer],
    ports: &[netv1::NetworkPolicyPort],
    ingress: bool,
    field: &str,
) -> Result<Vec<RuleSpec>, Error> {
    // protocol ("" = any) -> ports (None = all ports of that protocol)
    let mut by_protocol: BTreeMap<String, Option<Vec<NumOrString>>> = BTreeMap::new();
    if ports.is_empty() {
        by_protocol.insert(String::new(), None);
    }
    for (i, p) in ports.iter().enumerate() {
        let f = format!("{field}.ports[{i}]");
        let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".into());
        if !matches!(protocol.as_str(), "TCP" | "UDP" | "SCTP") {
            return Err(Error::invalid(
                format!("{f}.protocol"),
                format!("{protocol:?} is not a Kubernetes protocol: expected TCP, UDP or SCTP"),
            ));
        }
        let port = match &p.port {
            None => {
                if p.end_port.is_some() {
                    return Err(Error::invalid(format!("{f}.endPort"), "endPort needs port"));
                }
                None
            }
            Some(IntOrString::Int(n)) => {
                let n = i64::from(*n);
                PortMatch::number(n).map_err(|m| Error::invalid(format!("{f}.port"), m))?;
                match p.end_port {
                    Some(end) => {
                        let end = i64::from(end);
                        if !(n..=65535).contains(&end) {
                            return Err(Error::invalid(
                                format!("{f}.endPort"),
                                format!("endPort {end} must be between port {n} and 65535"),
                            ));
                        }
                        Some(NumOrString::Str(format!("{n}:{end}")))
                    }
                    None => Some(NumOrString::Num(n)),
                }
            }
            Some(IntOrString::String(s)) => {
                if p.end_port.is_some() {
                    return Err(Error::invalid(
                        format!("{f}.endPort"),
                        "endPort cannot be used with a named port",
                    ));
                }
                if s.bytes().all(|b| b.is_ascii_digit()) && !s.is_empty() {
                    PortMatch::parse(s).map_err(|m| Error::invalid(format!("{f}.port"), m))?;
                } else {
                    crate::net::validate_port_name(s)
                        .map_err(|m| Error::invalid(format!("{f}.port"), m))?;
                }
                Some(NumOrString::Str(s.clone()))
            }
        };
        match port {
            None => {
                by_protocol.insert(protocol, None);
            }
            Some(port) => {
                // None means all ports of this protocol are already allowed.
                if let Some(list) = by_protocol
                    .entry(protocol)
                    .or_insert_with(|| Some(Vec::new()))
                {
                    list.push(port);
                }
            }
        }
    }

    let mut out = Vec::new();
    let no_peer = [None];
    let peer_list: Vec<Option<&netv1::NetworkPolicyPeer>> = if peers.is_empty() {
        no_peer.to_vec()
    } else {
        peers.iter().map(Some).collect()
    };
    for (protocol, port_list) in &by_protocol {
        for (pi, peer) in peer_list.iter().enumerate() {
            let mut entity = EntityRuleSpec::default();
            if let Some(peer) = peer {
                let pf = format!("{field}.{}[{pi}]", if ingress { "from" } else { "to" });
                if let Some(block) = &peer.ip_block {
                    if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
                        return Err(Error::invalid(
                            pf,
                            "ipBlock cannot be combined with podSelector or namespaceSelector",
                        ));
                    }
                    let cidr = parse_cidr(&block.cidr)
                        .map_err(|m| Error::invalid(format!("{pf}.ipBlock.cidr"), m))?;
                    entity.nets = vec![cidr.to_string()];
                    for (ei, ex) in block.except.iter().flatten().enumerate() {
                        let n = parse_cidr(ex)
                            .map_err(|m| Error::invalid(format!("{pf}.ipBlock.except[{ei}]"), m))?;
                        entity.not_nets.push(n.to_string());
                    }
                } else {
                    entity.selector = Some(k8s_selector_text(
                        peer.pod_selector.as_ref(),
                        true,
                        &format!("{pf}.podSelector"),
                    )?);
                    if peer.namespace_selector.is_some() {
                        entity.namespace_selector = Some(k8s_selector_text(
                            peer.namespace_selector.as_ref(),
                            false,
                            &format!("{pf}.namespaceSelector"),
                        )?);
                    }
                }
            }
            let protocol_spec = if protocol.is_empty() {
                None
            } else {
                Some(NumOrString::Str(protocol.clone()))
            };
            let ports = port_list.clone().unwrap_or_default();
            let mut rule = RuleSpec::matching_any(ActionSpec::Allow, protocol_spec);
            if ingress {
                rule.source = entity;
                rule.destination.ports = ports;
            } else {
                entity.ports = ports;
                rule.destination = entity;
            }
            out.push(rule);
        }
    }
    Ok(out)
}

pub(super) fn namespace_object(meta: &ObjectMeta) -> Result<Namespace, Error> {
    let name = object_name(meta, NameRule::Label)?;
    let mut labels = labels_of(meta, "metadata.labels")?;
    // The API server adds this label to every namespace.
    labels
        .entry("kubernetes.io/metadata.name".into())
        .or_insert_with(|| name.clone());
    Ok(Namespace { name, labels })
}

pub(super) fn pod_endpoint(pod: &core::Pod) -> Result<Endpoint, Error> {
    let name = object_name(&pod.metadata, NameRule::Subdomain)?;
    let namespace = namespace_of(&pod.metadata)?;
    let labels = labels_of(&pod.metadata, "metadata.labels")?;
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.host_network == Some(true) {
        return Err(Error::new(ErrorKind::Unsupported(
            "host-networked pods are host endpoints, not workload endpoints".into(),
        ))
        .at("spec.hostNetwork"));
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    let status = pod.status.clone().unwrap_or_default();
    for (i, p) in status.pod_ips.iter().flatten().enumerate() {
        let ip = p.ip.parse::<IpAddr>().map_err(|_| {
            Error::invalid(
                format!("status.podIPs[{i}].ip"),
                format!("{:?} is not an IP address", p.ip),
            )
        })?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    if let Some(ip) = &status.pod_ip {
        let ip = ip
            .parse::<IpAddr>()
            .map_err(|_| Error::invalid("status.podIP", format!("{ip:?} is not an IP address")))?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let mut ports = Vec::new();
    for (ci, c) in spec.containers.iter().enumerate() {
        for (pi, p) in c.ports.iter().flatten().enumerate() {
            let f = format!("spec.containers[{ci}].ports[{pi}]");
            let protocol = Protocol::parse(p.protocol.as_deref().unwrap_or("TCP"))
                .map_err(|m| Error::invalid(format!("{f}.protocol"), m))?;
            if !protocol.has_ports() {
                return Err(Error::invalid(
                    format!("{f}.protocol"),
                    format!("{protocol} has no ports"),
                ));
            }
            let first = crate::net::port_number(i64::from(p.container_port))
                .map_err(|m| Error::invalid(format!("{f}.containerPort"), m))?;
            let name = p.name.clone().unwrap_or_default();
            if !name.is_empty() {
                crate::net::validate_port_name(&name)
                    .map_err(|m| Error::invalid(format!("{f}.name"), m))?;
            }
            ports.push(DeclaredPort {
                name,
                port: first,
                protocol,
            });
        }
    }
    Ok(Endpoint {
        key: EndpointKey::new(namespace, name),
        labels,
        ips,
        ports,
        service_account: Some(
            spec.service_account_name
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
        ),
        node: spec.node_name.clone(),
        profiles: None,
        orchestrator: "k8s".into(),
        interface: None,
    })
}
