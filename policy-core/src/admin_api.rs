//! Wire types of the network-policy-api's cluster-admin kinds
//! (`policy.networking.k8s.io`): AdminNetworkPolicy and
//! BaselineAdminNetworkPolicy (v1alpha1) and ClusterNetworkPolicy (v1alpha2).
//! Actions stay strings so a bad one is reported with the allowed set.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::{Deserialize, Serialize};

/// API group/version of AdminNetworkPolicy and BaselineAdminNetworkPolicy.
pub const V1ALPHA1: &str = "policy.networking.k8s.io/v1alpha1";
/// API group/version of ClusterNetworkPolicy.
pub const V1ALPHA2: &str = "policy.networking.k8s.io/v1alpha2";

/// A whole object; `status` is read and ignored (the API server owns it).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdminObject<S> {
    /// Group/version.
    pub api_version: String,
    /// Kind.
    pub kind: String,
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec.
    pub spec: S,
    /// Status (conditions), ignored.
    #[serde(default)]
    pub status: Option<serde_json::Value>,
}

/// Pods by namespace and pod labels.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedPods {
    /// Namespaces the pods are in.
    pub namespace_selector: LabelSelector,
    /// The pods.
    pub pod_selector: LabelSelector,
}

/// Which pods a policy applies to: exactly one field.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    /// Every pod of the selected namespaces.
    #[serde(default)]
    pub namespaces: Option<LabelSelector>,
    /// Selected pods of selected namespaces.
    #[serde(default)]
    pub pods: Option<NamespacedPods>,
}

/// A peer: exactly one field. Ingress peers may only be `namespaces` or `pods`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    /// Every pod of the selected namespaces.
    #[serde(default)]
    pub namespaces: Option<LabelSelector>,
    /// Selected pods of selected namespaces.
    #[serde(default)]
    pub pods: Option<NamespacedPods>,
    /// The addresses of the selected nodes (egress).
    #[serde(default)]
    pub nodes: Option<LabelSelector>,
    /// CIDRs (egress).
    #[serde(default)]
    pub networks: Option<Vec<String>>,
    /// Domain names (egress, AdminNetworkPolicy and ClusterNetworkPolicy).
    #[serde(default)]
    pub domain_names: Option<Vec<String>>,
}

/// v1alpha1 `portNumber`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct PortNumber {
    /// TCP (default), UDP or SCTP.
    #[serde(default)]
    pub protocol: Option<String>,
    /// 1-65535.
    pub port: i64,
}

/// v1alpha1 `portRange`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct PortRange {
    /// TCP (default), UDP or SCTP.
    #[serde(default)]
    pub protocol: Option<String>,
    /// First port.
    pub start: i64,
    /// Last port.
    pub end: i64,
}

/// v1alpha1 port: exactly one field.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdminPort {
    /// One port of one protocol.
    #[serde(default)]
    pub port_number: Option<PortNumber>,
    /// A container port name on the destination pod, any protocol.
    #[serde(default)]
    pub named_port: Option<String>,
    /// A range of one protocol.
    #[serde(default)]
    pub port_range: Option<PortRange>,
}

/// A v1alpha1 rule (`from` on ingress, `to` on egress).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct AdminRule {
    /// Rule name (at most 100 characters).
    #[serde(default)]
    pub name: Option<String>,
    /// Allow, Deny or Pass (BaselineAdminNetworkPolicy: Allow or Deny).
    #[serde(default)]
    pub action: String,
    /// Sources of an ingress rule.
    #[serde(default)]
    pub from: Option<Vec<Peer>>,
    /// Destinations of an egress rule.
    #[serde(default)]
    pub to: Option<Vec<Peer>>,
    /// Destination ports; absent means every port and protocol.
    #[serde(default)]
    pub ports: Option<Vec<AdminPort>>,
}

/// AdminNetworkPolicy / BaselineAdminNetworkPolicy spec (the baseline has no priority).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct AdminSpec {
    /// 0-1000, lower first (AdminNetworkPolicy only).
    #[serde(default)]
    pub priority: Option<i64>,
    /// Who the policy applies to.
    #[serde(default)]
    pub subject: Option<Subject>,
    /// Ingress rules, in order.
    #[serde(default)]
    pub ingress: Vec<AdminRule>,
    /// Egress rules, in order.
    #[serde(default)]
    pub egress: Vec<AdminRule>,
}

/// v1alpha2 destination port: exactly one field.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct PortSpec {
    /// One port.
    #[serde(default)]
    pub number: Option<i64>,
    /// A range (`start` < `end`).
    #[serde(default)]
    pub range: Option<RangeSpec>,
}

/// v1alpha2 port range.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct RangeSpec {
    /// First port.
    pub start: i64,
    /// Last port.
    pub end: i64,
}

/// v1alpha2 per-protocol match.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolPorts {
    /// Absent: every port of the protocol.
    #[serde(default)]
    pub destination_port: Option<PortSpec>,
}

/// v1alpha2 protocol entry: exactly one field.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolEntry {
    /// TCP.
    #[serde(default)]
    pub tcp: Option<ProtocolPorts>,
    /// UDP.
    #[serde(default)]
    pub udp: Option<ProtocolPorts>,
    /// SCTP.
    #[serde(default)]
    pub sctp: Option<ProtocolPorts>,
    /// A container port name on the destination pod, any protocol.
    #[serde(default)]
    pub destination_named_port: Option<String>,
}

/// A v1alpha2 rule.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct ClusterRule {
    /// Rule name (at most 100 characters).
    #[serde(default)]
    pub name: Option<String>,
    /// Accept, Deny or Pass.
    #[serde(default)]
    pub action: String,
    /// Sources of an ingress rule.
    #[serde(default)]
    pub from: Option<Vec<Peer>>,
    /// Destinations of an egress rule.
    #[serde(default)]
    pub to: Option<Vec<Peer>>,
    /// Protocols and ports; absent means every one.
    #[serde(default)]
    pub protocols: Option<Vec<ProtocolEntry>>,
}

/// ClusterNetworkPolicy spec.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct ClusterSpec {
    /// Admin or Baseline.
    #[serde(default)]
    pub tier: String,
    /// 0-1000, lower first within the tier.
    #[serde(default)]
    pub priority: Option<i64>,
    /// Who the policy applies to.
    #[serde(default)]
    pub subject: Option<Subject>,
    /// Ingress rules, in order.
    #[serde(default)]
    pub ingress: Vec<ClusterRule>,
    /// Egress rules, in order.
    #[serde(default)]
    pub egress: Vec<ClusterRule>,
}
