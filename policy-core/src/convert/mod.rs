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

mod admin;
mod calico;
mod fields;
mod kubernetes;
mod mixups;
mod workload;
pub use admin::admin_limits;
use calico::*;
pub use fields::check_labels;
use fields::*;
use kubernetes::*;

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
    /// An EndpointSlice (what `services` rule matches resolve against).
    EndpointSlice(EndpointSlice),
    /// A Node (what admin policies' `nodes` peers select).
    Node(Node),
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
            Object::EndpointSlice(s) => {
                ObjectRef::new("EndpointSlice", Some(&s.namespace), s.name.clone())
            }
            Object::Node(n) => ObjectRef::new("Node", None, n.name.clone()),
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
GlobalNetworkSet, Profile, WorkloadEndpoint; networking.k8s.io/v1 NetworkPolicy; v1 Namespace, Node, Pod, \
ServiceAccount; discovery.k8s.io/v1 EndpointSlice; policy.networking.k8s.io/v1alpha1 AdminNetworkPolicy, \
BaselineAdminNetworkPolicy; policy.networking.k8s.io/v1alpha2 ClusterNetworkPolicy";

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
                    unknown_field(
                        &doc,
                        UnknownField {
                            path: k.clone(),
                            name: k.clone(),
                            parent: "StagedKubernetesNetworkPolicy",
                            known: TOP,
                        },
                    )
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
            for reserved in [LABEL_NAMESPACE, LABEL_NODE] {
                if labels.contains_key(reserved) {
                    return fail(Error::invalid(
                        format!("metadata.labels[{reserved}]"),
                        format!("{reserved} is set by Calico and may not be given"),
                    ));
                }
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
            for (list, field) in [(&ingress, "spec.ingress"), (&egress, "spec.egress")] {
                if let Some(i) = list
                    .iter()
                    .position(|r| r.source.services.is_some() || r.destination.services.is_some())
                {
                    return fail(
                        Error::new(ErrorKind::Unsupported(
                            "services matches in Profile rules (use a policy)".into(),
                        ))
                        .at(format!("{field}[{i}]")),
                    );
                }
            }
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
        "WorkloadEndpoint" => {
            expect_api(kind, api, CALICO_API_VERSION)?;
            let obj: CalicoObject<crate::api::WorkloadEndpointSpec> = typed(doc)?;
            Ok(Object::Endpoint(workload::workload_endpoint(&obj)?))
        }
        "EndpointSlice" => {
            expect_api(kind, api, "discovery.k8s.io/v1")?;
            let slice: k8s_openapi::api::discovery::v1::EndpointSlice = typed(doc)?;
            Ok(Object::EndpointSlice(endpoint_slice(&slice)?))
        }
        "AdminNetworkPolicy" | "BaselineAdminNetworkPolicy" | "ClusterNetworkPolicy" => {
            Ok(Object::Policy(admin::admin_document(doc, kind, api)?))
        }
        "Node" => {
            expect_api(kind, api, "v1")?;
            let node: core::Node = typed(doc)?;
            Ok(Object::Node(node_object(&node)?))
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

/// A Node: its labels and its InternalIP/ExternalIP addresses.
pub fn node_object(node: &core::Node) -> Result<Node, Error> {
    let mut ips = Vec::new();
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    for (i, a) in addresses.into_iter().flatten().enumerate() {
        if !matches!(a.type_.as_str(), "InternalIP" | "ExternalIP") {
            continue;
        }
        let ip: IpAddr = a.address.trim().parse().map_err(|_| {
            Error::invalid(
                format!("status.addresses[{i}].address"),
                format!("{:?} is not an IP address", a.address),
            )
        })?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(Node {
        name: object_name(&node.metadata, NameRule::Subdomain)?,
        labels: labels_of(&node.metadata, "metadata.labels")?,
        ips,
    })
}

/// A Calico Node (`projectcalico.org/v3`, what IPAM and the datastores
/// keep per node) as admin policies' node peers see it: its labels, and the
/// addresses in `spec.addresses` and `spec.bgp.ipv4Address`/`ipv6Address`
/// (prefix lengths dropped). Other fields are IPAM's and not read here.
pub fn calico_node(doc: &serde_json::Value) -> Result<Node, Error> {
    let meta: ObjectMeta = serde_json::from_value(doc["metadata"].clone())
        .map_err(|e| Error::invalid("metadata", e.to_string()))?;
    let on = |e: Error| {
        e.on(ObjectRef::new(
            "Node",
            None,
            meta.name.clone().unwrap_or_default(),
        ))
    };
    let name = object_name(&meta, NameRule::Subdomain).map_err(on)?;
    let labels = labels_of(&meta, "metadata.labels").map_err(on)?;
    let spec = &doc["spec"];
    let mut found: Vec<(String, &str)> = Vec::new();
    for (i, a) in spec["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        if let Some(text) = a["address"].as_str() {
            found.push((format!("spec.addresses[{i}].address"), text));
        }
    }
    for key in ["ipv4Address", "ipv6Address"] {
        if let Some(text) = spec["bgp"][key].as_str() {
            found.push((format!("spec.bgp.{key}"), text));
        }
    }
    let mut ips = Vec::new();
    for (field, text) in found {
        let host = text.split('/').next().unwrap_or(text).trim();
        let ip: IpAddr = host.parse().map_err(|_| {
            on(Error::invalid(
                field,
                format!("{text:?} is not an IP address"),
            ))
        })?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(Node { name, labels, ips })
}

/// An EndpointSlice: its Service, addresses and numbered ports.
pub fn endpoint_slice(
    slice: &k8s_openapi::api::discovery::v1::EndpointSlice,
) -> Result<EndpointSlice, Error> {
    let mut addresses = Vec::new();
    for (i, ep) in slice.endpoints.iter().enumerate() {
        for (j, a) in ep.addresses.iter().enumerate() {
            let ip: IpAddr = a.trim().parse().map_err(|_| {
                Error::invalid(
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("{a:?} is not an IP address"),
                )
            })?;
            if !addresses.contains(&ip) {
                addresses.push(ip);
            }
        }
    }
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let protocol = Protocol::parse(p.protocol.as_deref().unwrap_or("TCP"))
            .map_err(|m| Error::invalid(format!("ports[{i}].protocol"), m))?;
        let Some(n) = p.port else { continue };
        let port = crate::net::port_number(i64::from(n))
            .map_err(|m| Error::invalid(format!("ports[{i}].port"), m))?;
        ports.push(SlicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol,
            port,
        });
    }
    Ok(EndpointSlice {
        namespace: namespace_of(&slice.metadata)?,
        name: object_name(&slice.metadata, NameRule::Subdomain)?,
        service: slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
            .cloned(),
        addresses,
        ports,
    })
}

fn fail<T>(e: Error) -> Result<T, Errors> {
    Err(e.into())
}

/// Deserialises strictly: every unknown field (with a suggestion) and the
/// first bad value, each with its path.
fn typed<T: DeserializeOwned>(doc: &serde_json::Value) -> Result<T, Errors> {
    strict::from_value(doc).map_err(|failure| {
        let mut errors: Errors = failure
            .unknown
            .into_iter()
            .map(|u| unknown_field(doc, u))
            .collect();
        if let Some((path, msg)) = failure.invalid {
            let err = Error::new(ErrorKind::Invalid(msg.into()));
            errors.push(if path == "." { err } else { err.at(path) });
        }
        errors
    })
}

fn unknown_field(doc: &serde_json::Value, u: UnknownField) -> Error {
    let rewritten = (u.parent == "RuleSpec")
        .then(|| mixups::calico_rules_for_k8s_peers(doc, &u.path, &u.name))
        .flatten();
    let help = rewritten
        .or_else(|| other_api_help(u.parent, &u.name))
        .or_else(|| {
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
