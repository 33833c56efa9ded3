//! Conversion of manifest objects into the normalised model, with Calico's
//! validation. Selector scoping follows libcalico-go's update processors; the
//! Kubernetes NetworkPolicy conversion follows its `K8sNetworkPolicyToCalico`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as netv1;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;

use crate::api::{
    ActionSpec, CalicoObject, EntityRuleSpec, IcmpSpec, NetworkSetSpec, NumOrString, PolicySpec,
    PolicyTypeSpec, ProfileSpec, RuleSpec, TierSpec,
};
use crate::error::{Error, ErrorKind, Errors, ObjectRef};
use crate::model::*;
use crate::net::{IpVersion, PortMatch, Protocol, parse_cidr, parse_cidr_or_ip};
use crate::selector::{Expr, MAX_LABEL_LENGTH, Selector, is_valid_label_key};
use crate::strict::{self, UnknownField};
use crate::suggest::closest;

/// Calico's limits.
pub mod limits {
    /// Rules per direction of one policy.
    pub const RULES_PER_DIRECTION: usize = 1024;
    /// Entries of `nets` or `notNets`.
    pub const NETS: usize = 256;
    /// Entries of `ports` or `notPorts`.
    pub const PORTS: usize = 50;
    /// Characters in a selector.
    pub const SELECTOR_LENGTH: usize = 1024;
}

/// The API group/version of Calico objects.
pub const CALICO_API_VERSION: &str = "projectcalico.org/v3";

/// Any object Palisade reads, after conversion.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// A policy of any kind.
    Policy(Policy),
    /// A tier.
    Tier(Tier),
    /// A NetworkSet or GlobalNetworkSet.
    NetworkSet(NetworkSet),
    /// A Profile.
    Profile(Profile),
    /// A Namespace.
    Namespace(Namespace),
    /// A ServiceAccount.
    ServiceAccount(ServiceAccount),
    /// A Pod / workload endpoint.
    Endpoint(Endpoint),
}

impl Object {
    /// The identity used for duplicate detection and deletion.
    pub fn object_ref(&self) -> ObjectRef {
        match self {
            Object::Policy(p) => policy_ref(&p.id),
            Object::Tier(t) => ObjectRef::new("Tier", None, t.name.clone()),
            Object::NetworkSet(n) => ObjectRef::new(
                if n.namespace.is_some() {
                    "NetworkSet"
                } else {
                    "GlobalNetworkSet"
                },
                n.namespace.as_deref(),
                n.name.clone(),
            ),
            Object::Profile(p) => ObjectRef::new("Profile", None, p.name.clone()),
            Object::Namespace(n) => ObjectRef::new("Namespace", None, n.name.clone()),
            Object::ServiceAccount(s) => {
                ObjectRef::new("ServiceAccount", Some(&s.namespace), s.name.clone())
            }
            Object::Endpoint(e) => {
                ObjectRef::new("Pod", Some(&e.key.namespace), e.key.name.clone())
            }
        }
    }
}

/// The reference of a policy; Kubernetes policies are `KubernetesNetworkPolicy`
/// so they cannot be confused with a Calico NetworkPolicy of the same name.
pub fn policy_ref(id: &PolicyId) -> ObjectRef {
    let kind = match id.kind {
        PolicyKind::KubernetesNetworkPolicy => "KubernetesNetworkPolicy",
        k => k.kind_name(),
    };
    ObjectRef::new(kind, id.namespace.as_deref(), id.name.clone())
}

/// Kinds Palisade reads, for error messages.
pub const SUPPORTED_KINDS: &str = "projectcalico.org/v3 NetworkPolicy, GlobalNetworkPolicy, \
StagedNetworkPolicy, StagedGlobalNetworkPolicy, StagedKubernetesNetworkPolicy, Tier, NetworkSet, \
GlobalNetworkSet, Profile; networking.k8s.io/v1 NetworkPolicy; v1 Namespace, Pod, ServiceAccount";

/// Converts one manifest document (already parsed to JSON) into a model
/// object; on failure, the first of [`convert_document_all`]'s errors.
pub fn convert_document(doc: &serde_json::Value) -> Result<Object, Error> {
    convert_document_all(doc).map_err(|e| {
        e.into_iter()
            .next()
            .unwrap_or_else(|| Error::new(ErrorKind::Invalid("rejected".into())))
    })
}

/// Converts one manifest document (already parsed to JSON) into a model
/// object. Fields are checked strictly: every unknown field is an error,
/// reported all at once with the first bad value.
pub fn convert_document_all(doc: &serde_json::Value) -> Result<Object, Errors> {
    let kind = doc.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    let api_version = doc.get("apiVersion").and_then(|k| k.as_str()).unwrap_or("");
    let meta = doc.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("<unnamed>");
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(|n| n.as_str());
    let obj = ObjectRef::new(
        if kind.is_empty() { "<no kind>" } else { kind },
        namespace,
        name,
    );
    convert_inner(doc, kind, api_version).map_err(|e| e.map(|e| e.on(obj.clone())))
}

fn expect_api(kind: &str, found: &str, expected: &'static str) -> Result<(), Error> {
    if found == expected {
        Ok(())
    } else {
        Err(Error::new(ErrorKind::WrongApiVersion {
            kind: kind.to_string(),
            found: found.to_string(),
            expected,
        })
        .at("apiVersion"))
    }
}

fn convert_inner(doc: &serde_json::Value, kind: &str, api: &str) -> Result<Object, Errors> {
    match kind {
        "NetworkPolicy" if api == "networking.k8s.io/v1" => {
            let np: netv1::NetworkPolicy = typed(doc)?;
            Ok(Object::Policy(k8s_network_policy(
                &np.metadata,
                np.spec.as_ref(),
                PolicyKind::KubernetesNetworkPolicy,
            )?))
        }
        "NetworkPolicy"
        | "GlobalNetworkPolicy"
        | "StagedNetworkPolicy"
        | "StagedGlobalNetworkPolicy" => {
            if kind == "NetworkPolicy" && api != CALICO_API_VERSION {
                return fail(
                    Error::new(ErrorKind::WrongApiVersion {
                        kind: kind.into(),
                        found: api.into(),
                        expected: "projectcalico.org/v3 or networking.k8s.io/v1",
                    })
                    .at("apiVersion"),
                );
            }
            expect_api(kind, api, CALICO_API_VERSION)?;
            let obj: CalicoObject<PolicySpec> = typed(doc)?;
            let pkind = match kind {
                "NetworkPolicy" => PolicyKind::NetworkPolicy,
                "GlobalNetworkPolicy" => PolicyKind::GlobalNetworkPolicy,
                "StagedNetworkPolicy" => PolicyKind::StagedNetworkPolicy,
                _ => PolicyKind::StagedGlobalNetworkPolicy,
            };
            Ok(Object::Policy(calico_policy(
                &obj.metadata,
                &obj.spec,
                pkind,
            )?))
        }
        "StagedKubernetesNetworkPolicy" => {
            expect_api(kind, api, CALICO_API_VERSION)?;
            let mut doc = doc.clone();
            let mut staged_action = None;
            if let Some(spec) = doc.get_mut("spec").and_then(|s| s.as_object_mut()) {
                staged_action = spec.remove("stagedAction");
            }
            if let Some(a) = &staged_action {
                check_staged_action(a.as_str()).map_err(|e| e.at("spec.stagedAction"))?;
            }
            // Read as a Kubernetes NetworkPolicy, so its own top-level
            // fields are checked here.
            const TOP: &[&str] = &["apiVersion", "kind", "metadata", "spec"];
            let mut errors: Errors = doc
                .as_object()
                .into_iter()
                .flat_map(|m| m.keys())
                .filter(|k| !TOP.contains(&k.as_str()))
                .map(|k| {
                    unknown_field(UnknownField {
                        path: k.clone(),
                        name: k.clone(),
                        parent: "StagedKubernetesNetworkPolicy",
                        known: TOP,
                    })
                })
                .collect();
            let np: Result<netv1::NetworkPolicy, Errors> = typed(&serde_json::json!({
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": doc.get("metadata").cloned().unwrap_or_default(),
                "spec": doc.get("spec").cloned().unwrap_or_default(),
            }));
            let np = match np {
                Ok(np) if errors.is_empty() => np,
                Ok(_) => return Err(errors),
                Err(e) => {
                    errors.extend(e);
                    return Err(errors);
                }
            };
            Ok(Object::Policy(k8s_network_policy(
                &np.metadata,
                np.spec.as_ref(),
                PolicyKind::StagedKubernetesNetworkPolicy,
            )?))
        }
        "Tier" => {
            expect_api(kind, api, CALICO_API_VERSION)?;
            let obj: CalicoObject<TierSpec> = typed(doc)?;
            let name = object_name(&obj.metadata, NameRule::Label)?;
            let default_action = match obj.spec.default_action {
                None | Some(ActionSpec::Deny) => TierDefault::Deny,
                Some(ActionSpec::Pass) => TierDefault::Pass,
                Some(other) => {
                    return fail(Error::invalid(
                        "spec.defaultAction",
                        format!("{other:?} is not a tier default action: expected Deny or Pass"),
                    ));
                }
            };
            let order = check_order(obj.spec.order, "spec.order")?;
            Ok(Object::Tier(Tier {
                name,
                order,
                default_action,
            }))
        }
        "NetworkSet" | "GlobalNetworkSet" => {
            expect_api(kind, api, CALICO_API_VERSION)?;
            let obj: CalicoObject<NetworkSetSpec> = typed(doc)?;
            let name = object_name(&obj.metadata, NameRule::Subdomain)?;
            let namespace = if kind == "NetworkSet" {
                Some(namespace_of(&obj.metadata)?)
            } else {
                if obj.metadata.namespace.is_some() {
                    return fail(Error::invalid(
                        "metadata.namespace",
                        "a GlobalNetworkSet is not namespaced",
                    ));
                }
                None
            };
            let labels = labels_of(&obj.metadata, "metadata.labels")?;
            if labels.contains_key(LABEL_NAMESPACE) {
                return fail(Error::invalid(
                    format!("metadata.labels[{LABEL_NAMESPACE}]"),
                    "projectcalico.org/namespace is set by Calico and may not be given",
                ));
            }
            if !obj.spec.allowed_egress_domains.is_empty() {
                return fail(
                    Error::new(ErrorKind::Unsupported(
                        "allowedEgressDomains (domain-based network sets)".into(),
                    ))
                    .at("spec.allowedEgressDomains"),
                );
            }
            let nets = obj
                .spec
                .nets
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    parse_cidr_or_ip(n).map_err(|m| Error::invalid(format!("spec.nets[{i}]"), m))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Object::NetworkSet(NetworkSet {
                namespace,
                name,
                labels,
                nets,
            }))
        }
        "Profile" => {
            expect_api(kind, api, CALICO_API_VERSION)?;
            let obj: CalicoObject<ProfileSpec> = typed(doc)?;
            let name = object_name(&obj.metadata, NameRule::Subdomain)?;
            let labels_to_apply = check_labels(&obj.spec.labels_to_apply, "spec.labelsToApply")?;
            let ingress = rules(&obj.spec.ingress, None, "spec.ingress")?;
            let egress = rules(&obj.spec.egress, None, "spec.egress")?;
            Ok(Object::Profile(Profile {
                name,
                ingress,
                egress,
                labels_to_apply,
            }))
        }
        "Namespace" => {
            expect_api(kind, api, "v1")?;
            let ns: core::Namespace = typed(doc)?;
            Ok(Object::Namespace(namespace_object(&ns.metadata)?))
        }
        "ServiceAccount" => {
            expect_api(kind, api, "v1")?;
            let sa: core::ServiceAccount = typed(doc)?;
            Ok(Object::ServiceAccount(ServiceAccount {
                namespace: namespace_of(&sa.metadata)?,
                name: object_name(&sa.metadata, NameRule::Subdomain)?,
                labels: labels_of(&sa.metadata, "metadata.labels")?,
            }))
        }
        "Pod" => {
            expect_api(kind, api, "v1")?;
            let pod: core::Pod = typed(doc)?;
            Ok(Object::Endpoint(pod_endpoint(&pod)?))
        }
        _ => fail(
            Error::new(ErrorKind::UnknownKind {
                kind: kind.to_string(),
                api_version: api.to_string(),
                supported: SUPPORTED_KINDS,
            })
            .at("kind"),
        ),
    }
}

/// An error as the one error of a document.
fn fail<T>(e: Error) -> Result<T, Errors> {
    Err(e.into())
}

/// Deserialises strictly: every unknown field (with a suggestion) and the
/// first bad value, each with its path.
fn typed<T: DeserializeOwned>(doc: &serde_json::Value) -> Result<T, Errors> {
    strict::from_value(doc).map_err(|failure| {
        let mut errors: Errors = failure.unknown.into_iter().map(unknown_field).collect();
        if let Some((path, msg)) = failure.invalid {
            let err = Error::new(ErrorKind::Invalid(msg));
            errors.push(if path == "." { err } else { err.at(path) });
        }
        errors
    })
}

fn unknown_field(u: UnknownField) -> Error {
    let help = other_api_help(u.parent, &u.name).or_else(|| {
        closest(&u.name, u.known.iter().copied()).map(|c| format!("did you mean `{c}`?"))
    });
    Error::new(ErrorKind::UnknownField { name: u.name, help }).at(u.path)
}

/// Fields of one policy API written in the other: Calico syntax in a
/// Kubernetes NetworkPolicy and the other way round. `parent` is the type
/// that was expected where the field was found.
fn other_api_help(parent: &str, name: &str) -> Option<String> {
    const K8S: &str = "networking.k8s.io/v1";
    const CALICO: &str = "projectcalico.org/v3";
    let calico_in_k8s =
        |instead: &str| format!("`{name}` is Calico syntax; in {K8S} use {instead}");
    let calico_only = || {
        format!(
            "`{name}` is Calico syntax, which {K8S} has no equivalent for: write a {CALICO} NetworkPolicy instead"
        )
    };
    let k8s_in_calico =
        |instead: &str| format!("`{name}` is {K8S} syntax; in {CALICO} use {instead}");
    let k8s_rule = matches!(
        parent,
        "NetworkPolicyIngressRule" | "NetworkPolicyEgressRule"
    );
    let ingress = parent == "NetworkPolicyIngressRule";
    Some(match (parent, name) {
        ("NetworkPolicySpec", "selector") => {
            calico_in_k8s("podSelector (a label selector: matchLabels, matchExpressions)")
        }
        ("NetworkPolicySpec", "types") => calico_in_k8s("policyTypes"),
        (
            "NetworkPolicySpec",
            "order"
            | "tier"
            | "namespaceSelector"
            | "serviceAccountSelector"
            | "doNotTrack"
            | "preDNAT"
            | "applyOnForward",
        ) => calico_only(),
        (_, "action") if k8s_rule => format!(
            "`action` is Calico syntax; {K8S} rules can only allow (write a {CALICO} NetworkPolicy to Deny, Pass or Log)"
        ),
        (_, "source") if ingress => calico_in_k8s("from"),
        (_, "destination") if k8s_rule && !ingress => calico_in_k8s("to"),
        (_, "destination") if ingress => {
            calico_in_k8s("ports (the destination of an ingress rule is the selected pods)")
        }
        (_, "source") if k8s_rule => {
            calico_in_k8s("to and ports (the source of an egress rule is the selected pods)")
        }
        (_, "protocol") if k8s_rule => {
            calico_in_k8s("a protocol per port: ports: [{protocol: UDP, port: 53}]")
        }
        (_, "ipVersion" | "notProtocol" | "icmp" | "notICMP" | "http" | "metadata") if k8s_rule => {
            calico_only()
        }
        ("NetworkPolicyPeer", "selector") => calico_in_k8s("podSelector"),
        ("NetworkPolicyPeer", "nets") => calico_in_k8s("ipBlock: {cidr: ...}"),
        ("NetworkPolicyPeer", "notNets") => calico_in_k8s("ipBlock.except"),
        ("NetworkPolicyPeer", "ports") => calico_in_k8s("ports on the rule, next to from/to"),
        ("NetworkPolicyPeer", "notSelector" | "serviceAccounts" | "services" | "notPorts") => {
            calico_only()
        }
        ("PolicySpec", "podSelector") => {
            k8s_in_calico("selector (an expression such as app == 'db')")
        }
        ("PolicySpec", "policyTypes") => k8s_in_calico("types"),
        ("RuleSpec", "from") => k8s_in_calico("source (and action: Allow)"),
        ("RuleSpec", "to") => k8s_in_calico("destination (and action: Allow)"),
        ("RuleSpec", "ports") => k8s_in_calico("protocol and destination.ports"),
        ("EntityRuleSpec", "podSelector") => k8s_in_calico("selector"),
        ("EntityRuleSpec", "ipBlock") => k8s_in_calico("nets and notNets"),
        _ => return None,
    })
}

enum NameRule {
    /// DNS-1123 label (tiers).
    Label,
    /// DNS-1123 subdomain (most objects).
    Subdomain,
}

fn object_name(meta: &ObjectMeta, rule: NameRule) -> Result<String, Error> {
    let name = meta.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(Error::invalid("metadata.name", "a name is required"));
    }
    let (ok, max, what) = match rule {
        NameRule::Label => (
            is_dns_label(&name),
            63,
            "a DNS-1123 label ([a-z0-9-], alphanumeric at both ends)",
        ),
        NameRule::Subdomain => (
            name.split('.').all(is_dns_label),
            253,
            "a DNS-1123 subdomain (dot-separated [a-z0-9-] labels)",
        ),
    };
    if name.len() > max {
        return Err(Error::invalid(
            "metadata.name",
            format!("{name:?} is longer than {max} characters"),
        ));
    }
    if !ok {
        return Err(Error::invalid(
            "metadata.name",
            format!("{name:?} is not {what}"),
        ));
    }
    Ok(name)
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn namespace_of(meta: &ObjectMeta) -> Result<String, Error> {
    let ns = meta
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_string());
    if !is_dns_label(&ns) {
        return Err(Error::invalid(
            "metadata.namespace",
            format!("{ns:?} is not a valid namespace name"),
        ));
    }
    Ok(ns)
}

fn labels_of(meta: &ObjectMeta, field: &str) -> Result<LabelMap, Error> {
    match &meta.labels {
        Some(l) => check_labels(l, field),
        None => Ok(LabelMap::new()),
    }
}

/// Label keys must be usable in selectors; values follow Kubernetes' rules.
pub fn check_labels(labels: &BTreeMap<String, String>, field: &str) -> Result<LabelMap, Error> {
    for (k, v) in labels {
        if !is_valid_label_key(k) {
            return Err(Error::invalid(
                format!("{field}[{k}]"),
                format!(
                    "{k:?} is not a valid label key: 1-{MAX_LABEL_LENGTH} characters of [A-Za-z0-9_./-]"
                ),
            ));
        }
        let value_ok = v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && (v.is_empty()
                || (v.as_bytes()[0].is_ascii_alphanumeric()
                    && v.as_bytes()[v.len() - 1].is_ascii_alphanumeric()));
        if !value_ok {
            return Err(Error::invalid(
                format!("{field}[{k}]"),
                format!(
                    "{v:?} is not a valid label value: at most 63 characters of [A-Za-z0-9-_.], alphanumeric at both ends"
                ),
            ));
        }
    }
    Ok(labels.clone())
}

fn check_order(order: Option<f64>, field: &str) -> Result<Option<f64>, Error> {
    match order {
        Some(o) if !o.is_finite() => Err(Error::invalid(field, "order must be a finite number")),
        o => Ok(o),
    }
}

fn check_staged_action(a: Option<&str>) -> Result<bool, Error> {
    match a {
        None | Some("Set") => Ok(false),
        Some("Delete") => Ok(true),
        Some(other) => Err(Error::new(ErrorKind::Invalid(format!(
            "{other:?} is not a staged action: expected Set or Delete"
        )))),
    }
}

/// Parses a selector field, enforcing Calico's length limit. Empty means absent.
fn selector_field(text: Option<&str>, field: &str) -> Result<Option<Selector>, Error> {
    match text {
        None => Ok(None),
        Some("") => Ok(None),
        Some(t) => {
            if t.len() > limits::SELECTOR_LENGTH {
                return Err(Error::new(ErrorKind::Limit {
                    what: "characters in the selector",
                    count: t.len(),
                    limit: limits::SELECTOR_LENGTH,
                })
                .at(field));
            }
            Selector::parse(t)
                .map(Some)
                .map_err(|e| Error::new(ErrorKind::Selector(e)).at(field))
        }
    }
}

/// Replaces every `all()` in a tree (Calico does this with a string replace
/// on namespace selectors, so `all()` there means "any namespace").
fn replace_all(expr: &Expr, with: &Expr) -> Expr {
    match expr {
        Expr::All => with.clone(),
        Expr::Not(e) => Expr::Not(Box::new(replace_all(e, with))),
        Expr::And(es) => Expr::And(es.iter().map(|e| replace_all(e, with)).collect()),
        Expr::Or(es) => Expr::Or(es.iter().map(|e| replace_all(e, with)).collect()),
        other => other.clone(),
    }
}

fn replace_global(expr: &Expr, with: &Expr) -> Expr {
    match expr {
        Expr::Global => with.clone(),
        Expr::Not(e) => Expr::Not(Box::new(replace_global(e, with))),
        Expr::And(es) => Expr::And(es.iter().map(|e| replace_global(e, with)).collect()),
        Expr::Or(es) => Expr::Or(es.iter().map(|e| replace_global(e, with)).collect()),
        other => other.clone(),
    }
}

fn has_namespace() -> Expr {
    Expr::Has(LABEL_NAMESPACE.to_string())
}

fn contains_global(expr: &Expr) -> bool {
    match expr {
        Expr::Global => true,
        Expr::Not(e) => contains_global(e),
        Expr::And(es) | Expr::Or(es) => es.iter().any(contains_global),
        _ => false,
    }
}

fn and2(a: Expr, b: Expr) -> Expr {
    Expr::And(vec![a, b])
}

fn protocol_field(p: &NumOrString, field: &str) -> Result<Protocol, Error> {
    match p {
        NumOrString::Num(n) => Protocol::from_number(*n),
        NumOrString::Str(s) => Protocol::parse(s),
    }
    .map_err(|m| Error::invalid(field, m))
}

fn ports_field(ports: &[NumOrString], field: &str) -> Result<Vec<PortMatch>, Error> {
    if ports.len() > limits::PORTS {
        return Err(Error::new(ErrorKind::Limit {
            what: "ports",
            count: ports.len(),
            limit: limits::PORTS,
        })
        .at(field));
    }
    ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            match p {
                NumOrString::Num(n) => PortMatch::number(*n),
                NumOrString::Str(s) => PortMatch::parse(s),
            }
            .map_err(|m| Error::invalid(format!("{field}[{i}]"), m))
        })
        .collect()
}

fn nets_field(nets: &[String], field: &str) -> Result<Vec<IpNet>, Error> {
    if nets.len() > limits::NETS {
        return Err(Error::new(ErrorKind::Limit {
            what: "CIDRs",
            count: nets.len(),
            limit: limits::NETS,
        })
        .at(field));
    }
    nets.iter()
        .enumerate()
        .map(|(i, n)| parse_cidr_or_ip(n).map_err(|m| Error::invalid(format!("{field}[{i}]"), m)))
        .collect()
}

fn icmp_field(icmp: &IcmpSpec, field: &str) -> Result<IcmpMatch, Error> {
    let Some(t) = icmp.icmp_type else {
        return Err(Error::invalid(
            field,
            if icmp.code.is_some() {
                "ICMP code specified without an ICMP type"
            } else {
                "an ICMP match needs a type"
            },
        ));
    };
    if !(0..=254).contains(&t) {
        return Err(Error::invalid(
            format!("{field}.type"),
            format!("ICMP type {t} is out of range 0-254"),
        ));
    }
    let code = match icmp.code {
        None => None,
        Some(c) if (0..=255).contains(&c) => Some(c as u8),
        Some(c) => {
            return Err(Error::invalid(
                format!("{field}.code"),
                format!("ICMP code {c} is out of range 0-255"),
            ));
        }
    };
    Ok(IcmpMatch {
        icmp_type: t as u8,
        code,
    })
}

/// Converts one side of a rule, scoping selectors like Calico's `getEndpointSelector`.
fn entity(
    spec: &EntityRuleSpec,
    policy_namespace: Option<&str>,
    field: &str,
) -> Result<EntityMatch, Error> {
    if spec.services.is_some() {
        return Err(Error::new(ErrorKind::Unsupported(
            "services matches in rules (match the backing pods with a selector instead)".into(),
        ))
        .at(format!("{field}.services")));
    }
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
    })
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
    })
}

fn rules(specs: &[RuleSpec], ns: Option<&str>, field: &str) -> Result<Vec<Rule>, Error> {
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
fn default_types(
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

fn policy_name(meta: &ObjectMeta) -> Result<String, Error> {
    object_name(meta, NameRule::Subdomain)
}

/// Converts a Calico NetworkPolicy / GlobalNetworkPolicy (or staged variant).
fn calico_policy(meta: &ObjectMeta, spec: &PolicySpec, kind: PolicyKind) -> Result<Policy, Error> {
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

/// Converts a Kubernetes label selector to Calico selector text, like
/// Calico's `k8sSelectorToCalico`.
fn k8s_selector_text(s: Option<&LabelSelector>, pod: bool, field: &str) -> Result<String, Error> {
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
fn k8s_network_policy(
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

fn k8s_rule(
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
            let mut rule = RuleSpec {
                action: ActionSpec::Allow,
                ip_version: None,
                protocol: protocol_spec,
                not_protocol: None,
                icmp: None,
                not_icmp: None,
                source: EntityRuleSpec::default(),
                destination: EntityRuleSpec::default(),
                http: None,
                metadata: None,
            };
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

fn namespace_object(meta: &ObjectMeta) -> Result<Namespace, Error> {
    let name = object_name(meta, NameRule::Label)?;
    let mut labels = labels_of(meta, "metadata.labels")?;
    // The API server adds this label to every namespace.
    labels
        .entry("kubernetes.io/metadata.name".into())
        .or_insert_with(|| name.clone());
    Ok(Namespace { name, labels })
}

fn pod_endpoint(pod: &core::Pod) -> Result<Endpoint, Error> {
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
            let port = PortMatch::number(i64::from(p.container_port))
                .map_err(|m| Error::invalid(format!("{f}.containerPort"), m))?;
            let PortMatch::Range { first, .. } = port else {
                unreachable!("numeric port")
            };
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conv(v: serde_json::Value) -> Result<Object, Error> {
        convert_document(&v)
    }

    fn policy(v: serde_json::Value) -> Policy {
        match conv(v).unwrap() {
            Object::Policy(p) => p,
            o => panic!("not a policy: {o:?}"),
        }
    }

    #[test]
    fn namespaced_rule_selectors_are_scoped() {
        let p = policy(json!({
            "apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "x"},
            "spec": {"selector": "app == 'a'", "ingress": [
                {"action": "Allow", "source": {"selector": "role == 'fe'"}},
                {"action": "Allow", "source": {"namespaceSelector": "team == 'b'"}},
                {"action": "Allow", "source": {"namespaceSelector": "global()"}},
                {"action": "Allow", "source": {"nets": ["10.0.0.0/8"]}},
                {"action": "Allow", "source": {"notSelector": "bad == 'x'"}}
            ]}
        }));
        assert_eq!(
            p.selector.canonical(),
            "(app == \"a\" && projectcalico.org/namespace == \"x\")"
        );
        let sel = |i: usize| {
            p.ingress[i]
                .source
                .selector
                .as_ref()
                .map(|s| s.canonical().to_string())
        };
        assert_eq!(
            sel(0).unwrap(),
            "(projectcalico.org/namespace == \"x\" && role == \"fe\")"
        );
        assert_eq!(sel(1).unwrap(), "pcns.team == \"b\"");
        assert_eq!(sel(2).unwrap(), "!has(projectcalico.org/namespace)");
        assert_eq!(sel(3), None);
        assert_eq!(sel(4).unwrap(), "projectcalico.org/namespace == \"x\"");
        assert_eq!(
            p.ingress[4]
                .source
                .not_selector
                .as_ref()
                .unwrap()
                .canonical(),
            "bad == \"x\""
        );
        // Calico default types: only ingress rules => Ingress.
        assert!(p.ingress_enabled && !p.egress_enabled);
    }

    #[test]
    fn k8s_policy_conversion() {
        let p = policy(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "np", "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                     "ingress": [{"from": [{"namespaceSelector": {}}, {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                                  "ports": [{"port": 80}, {"protocol": "UDP", "port": 53}]}]}
        }));
        assert_eq!(p.tier, "default");
        assert_eq!(p.order, Some(1000.0));
        assert_eq!(p.id.kind, PolicyKind::KubernetesNetworkPolicy);
        assert_eq!(
            p.selector.canonical(),
            "((projectcalico.org/orchestrator == \"k8s\" && pod == \"a\") && projectcalico.org/namespace == \"x\")"
        );
        // two protocols x two peers
        assert_eq!(p.ingress.len(), 4);
        assert_eq!(p.ingress[0].protocol, Some(Protocol::TCP));
        assert_eq!(
            p.ingress[0].source.selector.as_ref().unwrap().canonical(),
            "(has(projectcalico.org/namespace) && projectcalico.org/orchestrator == \"k8s\")"
        );
        assert_eq!(p.ingress[1].source.nets[0].to_string(), "10.0.0.0/8");
        assert_eq!(p.ingress[1].source.not_nets[0].to_string(), "10.1.0.0/16");
        assert_eq!(p.ingress[2].protocol, Some(Protocol::UDP));
        assert!(p.ingress_enabled && !p.egress_enabled);
    }

    #[test]
    fn bad_input_names_field() {
        let e = conv(json!({
            "apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
            "metadata": {"name": "p"},
            "spec": {"ingress": [{"action": "Allow", "source": {"selector": "a = 'b'"}}]}
        }))
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("spec.ingress[0].source.selector"));
        assert!(matches!(e.kind, ErrorKind::Selector(ref s) if s.offset == 2));
        assert_eq!(e.object.as_ref().unwrap().name, "p");

        let e = conv(json!({
            "apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
            "metadata": {"name": "p"},
            "spec": {"ingress": [{"action": "Allow", "sorce": {}}]}
        }))
        .unwrap_err();
        assert!(e.to_string().contains("sorce"), "{e}");
    }

    #[test]
    fn kubernetes_kinds_reject_unknown_fields() {
        let np = |spec: serde_json::Value| {
            convert_document_all(&json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "p", "namespace": "x"}, "spec": spec
            }))
            .unwrap_err()
            .into_vec()
        };
        let e = np(
            json!({"podSelector": {}, "ingres": [{}], "egress": [{"to": [{"nets": ["10.0.0.0/8"]}]}]}),
        );
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].field.as_deref(), Some("spec.ingres"));
        assert_eq!(
            e[0].kind,
            ErrorKind::UnknownField {
                name: "ingres".into(),
                help: Some("did you mean `ingress`?".into())
            }
        );
        assert_eq!(e[1].field.as_deref(), Some("spec.egress[0].to[0].nets"));
        assert!(
            e[1].to_string()
                .contains("in networking.k8s.io/v1 use ipBlock"),
            "{}",
            e[1]
        );
        assert_eq!(e[1].object.as_ref().unwrap().name, "p");

        // A staged Kubernetes policy is as strict.
        let e = convert_document_all(&json!({
            "apiVersion": "projectcalico.org/v3", "kind": "StagedKubernetesNetworkPolicy",
            "metadata": {"name": "p", "namespace": "x"},
            "spec": {"stagedAction": "Set", "podSelector": {"matchLabel": {"a": "b"}}}
        }))
        .unwrap_err();
        assert_eq!(
            e.first().unwrap().field.as_deref(),
            Some("spec.podSelector.matchLabel")
        );
        let e = convert_document_all(&json!({
            "apiVersion": "projectcalico.org/v3", "kind": "StagedKubernetesNetworkPolicy",
            "metadata": {"name": "p", "namespace": "x"},
            "sepc": {"podSelector": {}}
        }))
        .unwrap_err();
        assert_eq!(e.first().unwrap().field.as_deref(), Some("sepc"));
        assert!(e.to_string().ends_with("did you mean `spec`?"), "{e}");
        // The first-error form still works for embedders.
        let e = convert_document(&json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "s", "namespace": "x", "annotation": {}}
        }))
        .unwrap_err();
        assert!(
            e.to_string().ends_with("did you mean `annotations`?"),
            "{e}"
        );
    }

    #[test]
    fn other_api_help_goes_both_ways() {
        assert!(
            other_api_help("NetworkPolicySpec", "types")
                .unwrap()
                .ends_with("use policyTypes")
        );
        assert!(
            other_api_help("NetworkPolicyEgressRule", "destination")
                .unwrap()
                .ends_with("use to")
        );
        assert!(
            other_api_help("NetworkPolicyIngressRule", "source")
                .unwrap()
                .ends_with("use from")
        );
        assert!(
            other_api_help("RuleSpec", "from")
                .unwrap()
                .starts_with("`from` is networking.k8s.io/v1 syntax")
        );
        assert!(
            other_api_help("EntityRuleSpec", "ipBlock")
                .unwrap()
                .ends_with("use nets and notNets")
        );
        assert_eq!(other_api_help("NetworkPolicySpec", "ingres"), None);
        assert_eq!(other_api_help("RuleSpec", "action"), None);
    }
}
