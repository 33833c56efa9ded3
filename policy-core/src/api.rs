//! Wire types of the `projectcalico.org/v3` objects Palisade reads, as they
//! appear in YAML/JSON manifests. Kubernetes objects use `k8s-openapi`.
//!
//! Unknown fields are rejected so that a misspelt field (`sorce:`) is an
//! error rather than a silently ignored match.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// A protocol or port written as a number or a string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NumOrString {
    /// `80`, `6`
    Num(i64),
    /// `"80"`, `"80:90"`, `"http"`, `"TCP"`
    Str(String),
}

impl std::fmt::Display for NumOrString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NumOrString::Num(n) => write!(f, "{n}"),
            NumOrString::Str(s) => f.write_str(s),
        }
    }
}

/// A Calico rule action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ActionSpec {
    /// Allow the packet.
    Allow,
    /// Drop the packet.
    Deny,
    /// Record the packet and continue with the next rule.
    Log,
    /// Skip to the next tier.
    Pass,
}

/// `Ingress` / `Egress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PolicyTypeSpec {
    /// Incoming traffic.
    Ingress,
    /// Outgoing traffic.
    Egress,
}

/// ICMP type/code match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IcmpSpec {
    /// ICMP type 0-254.
    #[serde(rename = "type", default)]
    pub icmp_type: Option<i64>,
    /// ICMP code 0-255 (needs a type).
    #[serde(default)]
    pub code: Option<i64>,
}

/// `serviceAccounts` in an entity rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccountMatchSpec {
    /// Service account names.
    #[serde(default)]
    pub names: Vec<String>,
    /// Selector over service account labels.
    #[serde(default)]
    pub selector: Option<String>,
}

/// `services` in an entity rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceMatchSpec {
    /// Service name.
    #[serde(default)]
    pub name: String,
    /// Service namespace.
    #[serde(default)]
    pub namespace: Option<String>,
}

/// `source` / `destination` of a rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EntityRuleSpec {
    /// CIDRs the address must be in (any).
    #[serde(default)]
    pub nets: Vec<String>,
    /// CIDRs the address must not be in.
    #[serde(default)]
    pub not_nets: Vec<String>,
    /// Endpoint selector.
    #[serde(default)]
    pub selector: Option<String>,
    /// Negated endpoint selector.
    #[serde(default)]
    pub not_selector: Option<String>,
    /// Namespace selector.
    #[serde(default)]
    pub namespace_selector: Option<String>,
    /// Ports (numbers, ranges, names).
    #[serde(default)]
    pub ports: Vec<NumOrString>,
    /// Negated ports.
    #[serde(default)]
    pub not_ports: Vec<NumOrString>,
    /// Service account match.
    #[serde(default)]
    pub service_accounts: Option<ServiceAccountMatchSpec>,
    /// Kubernetes service match (not supported by Palisade yet).
    #[serde(default)]
    pub services: Option<ServiceMatchSpec>,
}

/// HTTP match (layer 7; Palisade enforces layers 3-4 only).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpMatchSpec {
    /// Methods.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Path matches.
    #[serde(default)]
    pub paths: Vec<serde_json::Value>,
}

/// Free-form rule metadata.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleMetadataSpec {
    /// Annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// A Calico rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleSpec {
    /// What to do when the rule matches.
    pub action: ActionSpec,
    /// Restricts the rule to IPv4 (4) or IPv6 (6).
    #[serde(default)]
    pub ip_version: Option<i64>,
    /// Protocol name or number.
    #[serde(default)]
    pub protocol: Option<NumOrString>,
    /// Negated protocol.
    #[serde(default)]
    pub not_protocol: Option<NumOrString>,
    /// ICMP match.
    #[serde(default)]
    pub icmp: Option<IcmpSpec>,
    /// Negated ICMP match.
    #[serde(default, rename = "notICMP")]
    pub not_icmp: Option<IcmpSpec>,
    /// Source match.
    #[serde(default)]
    pub source: EntityRuleSpec,
    /// Destination match.
    #[serde(default)]
    pub destination: EntityRuleSpec,
    /// HTTP match.
    #[serde(default)]
    pub http: Option<HttpMatchSpec>,
    /// Metadata.
    #[serde(default)]
    pub metadata: Option<RuleMetadataSpec>,
}

impl RuleSpec {
    /// A rule with `action` and `protocol` that matches any source and
    /// destination; converters fill in the sides.
    pub fn matching_any(action: ActionSpec, protocol: Option<NumOrString>) -> Self {
        Self {
            action,
            ip_version: None,
            protocol,
            not_protocol: None,
            icmp: None,
            not_icmp: None,
            source: EntityRuleSpec::default(),
            destination: EntityRuleSpec::default(),
            http: None,
            metadata: None,
        }
    }
}

/// Spec of NetworkPolicy, GlobalNetworkPolicy and their staged variants.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicySpec {
    /// Tier name (default `default`).
    #[serde(default)]
    pub tier: Option<String>,
    /// Order inside the tier; unset sorts last.
    #[serde(default)]
    pub order: Option<f64>,
    /// Endpoint selector.
    #[serde(default)]
    pub selector: Option<String>,
    /// Directions the policy applies to.
    #[serde(default)]
    pub types: Option<Vec<PolicyTypeSpec>>,
    /// Ingress rules.
    #[serde(default)]
    pub ingress: Vec<RuleSpec>,
    /// Egress rules.
    #[serde(default)]
    pub egress: Vec<RuleSpec>,
    /// Selects endpoints by their service account's labels.
    #[serde(default)]
    pub service_account_selector: Option<String>,
    /// GlobalNetworkPolicy only: selects endpoints by their namespace's labels.
    #[serde(default)]
    pub namespace_selector: Option<String>,
    /// GlobalNetworkPolicy only (host endpoints).
    #[serde(default)]
    pub do_not_track: bool,
    /// GlobalNetworkPolicy only (host endpoints).
    #[serde(default, rename = "preDNAT")]
    pub pre_dnat: bool,
    /// GlobalNetworkPolicy only (host endpoints).
    #[serde(default)]
    pub apply_on_forward: bool,
    /// Performance hints (accepted, no effect).
    #[serde(default)]
    pub performance_hints: Vec<String>,
    /// Staged kinds only: `Set` (default) or `Delete`.
    #[serde(default)]
    pub staged_action: Option<String>,
}

/// Tier spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TierSpec {
    /// Order; unset sorts last.
    #[serde(default)]
    pub order: Option<f64>,
    /// What happens at the end of the tier: Deny (default) or Pass.
    #[serde(default)]
    pub default_action: Option<ActionSpec>,
}

/// NetworkSet / GlobalNetworkSet spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkSetSpec {
    /// Member CIDRs.
    #[serde(default)]
    pub nets: Vec<String>,
    /// Domain names (egress gateways; not supported).
    #[serde(default)]
    pub allowed_egress_domains: Vec<String>,
}

/// Profile spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProfileSpec {
    /// Ingress rules.
    #[serde(default)]
    pub ingress: Vec<RuleSpec>,
    /// Egress rules.
    #[serde(default)]
    pub egress: Vec<RuleSpec>,
    /// Labels inherited by endpoints that use the profile.
    #[serde(default)]
    pub labels_to_apply: BTreeMap<String, String>,
}

/// A Calico object: metadata plus a spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    bound(deserialize = "S: Deserialize<'de> + Default")
)]
pub struct CalicoObject<S> {
    /// `projectcalico.org/v3`
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    /// Object kind.
    pub kind: String,
    /// Kubernetes object metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The spec.
    #[serde(default)]
    pub spec: S,
}

/// WorkloadEndpoint spec: what Calico's CNI plugin records for a pod's
/// interface (`projectcalico.org/v3`, Calico's field names).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadEndpointSpec {
    /// `k8s` for pods.
    #[serde(default)]
    pub orchestrator: String,
    /// Workload name (other orchestrators).
    #[serde(default)]
    pub workload: String,
    /// The node the endpoint is on.
    #[serde(default)]
    pub node: String,
    /// Container runtime id.
    #[serde(default, rename = "containerID")]
    pub container_id: String,
    /// The pod's name.
    #[serde(default)]
    pub pod: String,
    /// Interface name inside the workload (`eth0`).
    #[serde(default)]
    pub endpoint: String,
    /// The pod's service account.
    #[serde(default)]
    pub service_account_name: String,
    /// Addresses, as /32 or /128 networks.
    #[serde(default)]
    pub ip_networks: Vec<String>,
    /// One-to-one NAT addresses (floating IPs; not supported).
    #[serde(default, rename = "ipNATs")]
    pub ip_nats: Vec<serde_json::Value>,
    /// IPv4 gateway.
    #[serde(default, rename = "ipv4Gateway")]
    pub ipv4_gateway: String,
    /// IPv6 gateway.
    #[serde(default, rename = "ipv6Gateway")]
    pub ipv6_gateway: String,
    /// Profiles applied, in order.
    #[serde(default)]
    pub profiles: Vec<String>,
    /// Host-side interface.
    #[serde(default)]
    pub interface_name: String,
    /// MAC address of the workload side.
    #[serde(default)]
    pub mac: String,
    /// Named ports.
    #[serde(default)]
    pub ports: Vec<WorkloadEndpointPort>,
    /// Source prefixes the workload may also send from (not supported).
    #[serde(default)]
    pub allow_spoofed_source_prefixes: Vec<String>,
}

/// A named port of a WorkloadEndpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadEndpointPort {
    /// Port name.
    #[serde(default)]
    pub name: String,
    /// Protocol (`TCP`, `UDP`, `SCTP`).
    #[serde(default)]
    pub protocol: Option<NumOrString>,
    /// Port number.
    #[serde(default)]
    pub port: u16,
    /// Host port (port mapping; not enforced by policy).
    #[serde(default)]
    pub host_port: u16,
    /// Host address of the port mapping.
    #[serde(default, rename = "hostIP")]
    pub host_ip: String,
}
