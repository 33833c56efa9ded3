//! The normalised policy model every engine works on.
//!
//! Calico and Kubernetes objects are converted into these types the way
//! Calico's own syncer converts them for felix: rule selectors already carry
//! their namespace scope, namespace selectors are `pcns.`-prefixed, Kubernetes
//! NetworkPolicies are Calico policies in tier `default` at order 1000.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::net::{IpVersion, PortMatch, Protocol};
use crate::selector::Selector;

/// Label set of an object.
pub type LabelMap = BTreeMap<String, String>;

/// Labels Calico adds to every workload endpoint and namespaced network set.
pub const LABEL_NAMESPACE: &str = "projectcalico.org/namespace";
/// Orchestrator label (`k8s` for pods).
pub const LABEL_ORCHESTRATOR: &str = "projectcalico.org/orchestrator";
/// Service account label.
pub const LABEL_SERVICE_ACCOUNT: &str = "projectcalico.org/serviceaccount";
/// Name label inside the `pcns.`/`pcsa.` label families.
pub const LABEL_NAME: &str = "projectcalico.org/name";
/// Prefix of namespace labels inherited by endpoints.
pub const NAMESPACE_LABEL_PREFIX: &str = "pcns.";
/// Prefix of service-account labels inherited by endpoints.
pub const SERVICE_ACCOUNT_LABEL_PREFIX: &str = "pcsa.";
/// Label carrying a node's name on the address set Palisade derives from
/// each Node, which only the `nodes` peers of admin policies select.
pub const LABEL_NODE: &str = "projectcalico.org/node";
/// Prefix of the profile Calico derives from each namespace.
pub const NAMESPACE_PROFILE_PREFIX: &str = "kns.";
/// Prefix of the profile Calico derives from each service account.
pub const SERVICE_ACCOUNT_PROFILE_PREFIX: &str = "ksa.";

/// Traffic direction relative to the endpoint a policy is applied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Traffic arriving at the endpoint.
    Ingress,
    /// Traffic leaving the endpoint.
    Egress,
}

impl Direction {
    /// Both directions.
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// Rule action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Allow and stop.
    Allow,
    /// Deny and stop.
    Deny,
    /// Jump to the next tier.
    Pass,
    /// Record and continue.
    Log,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Pass => "pass",
            Action::Log => "log",
        })
    }
}

/// What kind of object a policy came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyKind {
    /// projectcalico.org/v3 NetworkPolicy
    NetworkPolicy,
    /// projectcalico.org/v3 GlobalNetworkPolicy
    GlobalNetworkPolicy,
    /// networking.k8s.io/v1 NetworkPolicy
    KubernetesNetworkPolicy,
    /// projectcalico.org/v3 StagedNetworkPolicy
    StagedNetworkPolicy,
    /// projectcalico.org/v3 StagedGlobalNetworkPolicy
    StagedGlobalNetworkPolicy,
    /// projectcalico.org/v3 StagedKubernetesNetworkPolicy
    StagedKubernetesNetworkPolicy,
    /// policy.networking.k8s.io/v1alpha1 AdminNetworkPolicy (tier `kube-admin`)
    AdminNetworkPolicy,
    /// policy.networking.k8s.io/v1alpha1 BaselineAdminNetworkPolicy (tier `kube-baseline`)
    BaselineAdminNetworkPolicy,
    /// policy.networking.k8s.io/v1alpha2 ClusterNetworkPolicy (tier `kube-admin` or `kube-baseline`)
    ClusterNetworkPolicy,
}

impl PolicyKind {
    /// The object kind as written in manifests.
    pub fn kind_name(self) -> &'static str {
        match self {
            PolicyKind::NetworkPolicy | PolicyKind::KubernetesNetworkPolicy => "NetworkPolicy",
            PolicyKind::GlobalNetworkPolicy => "GlobalNetworkPolicy",
            PolicyKind::StagedNetworkPolicy => "StagedNetworkPolicy",
            PolicyKind::StagedGlobalNetworkPolicy => "StagedGlobalNetworkPolicy",
            PolicyKind::StagedKubernetesNetworkPolicy => "StagedKubernetesNetworkPolicy",
            PolicyKind::AdminNetworkPolicy => "AdminNetworkPolicy",
            PolicyKind::BaselineAdminNetworkPolicy => "BaselineAdminNetworkPolicy",
            PolicyKind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
        }
    }

    /// The short prefix Calico's flow logs use (`np`, `gnp`, `knp`, `snp`, ...).
    pub fn short(self) -> &'static str {
        match self {
            PolicyKind::NetworkPolicy => "np",
            PolicyKind::GlobalNetworkPolicy => "gnp",
            PolicyKind::KubernetesNetworkPolicy => "knp",
            PolicyKind::StagedNetworkPolicy => "snp",
            PolicyKind::StagedGlobalNetworkPolicy => "sgnp",
            PolicyKind::StagedKubernetesNetworkPolicy => "sknp",
            PolicyKind::AdminNetworkPolicy => "kanp",
            PolicyKind::BaselineAdminNetworkPolicy => "kbanp",
            PolicyKind::ClusterNetworkPolicy => "kcnp",
        }
    }

    /// Staged kinds never enforce.
    pub fn is_staged(self) -> bool {
        matches!(
            self,
            PolicyKind::StagedNetworkPolicy
                | PolicyKind::StagedGlobalNetworkPolicy
                | PolicyKind::StagedKubernetesNetworkPolicy
        )
    }

    /// Whether objects of this kind live in a namespace.
    pub fn is_namespaced(self) -> bool {
        !matches!(
            self,
            PolicyKind::GlobalNetworkPolicy
                | PolicyKind::StagedGlobalNetworkPolicy
                | PolicyKind::AdminNetworkPolicy
                | PolicyKind::BaselineAdminNetworkPolicy
                | PolicyKind::ClusterNetworkPolicy
        )
    }
}

/// Identity of a policy: kind, namespace (for namespaced kinds) and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyId {
    /// Source kind.
    pub kind: PolicyKind,
    /// Namespace, for namespaced kinds.
    pub namespace: Option<String>,
    /// Object name.
    pub name: String,
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{}:{}/{}", self.kind.short(), ns, self.name),
            None => write!(f, "{}:{}", self.kind.short(), self.name),
        }
    }
}

/// ICMP type and optional code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IcmpMatch {
    /// ICMP type.
    pub icmp_type: u8,
    /// ICMP code; `None` matches any code.
    pub code: Option<u8>,
}

/// One side (source or destination) of a rule, after namespace scoping.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct EntityMatch {
    /// The address must be in one of these.
    pub nets: Vec<IpNet>,
    /// The address must be in none of these.
    pub not_nets: Vec<IpNet>,
    /// The address must belong to an endpoint or network set this selects.
    /// Already combines `selector`, `namespaceSelector`, `serviceAccounts` and
    /// the policy's own namespace, as Calico does.
    pub selector: Option<Selector>,
    /// The address must not belong to anything this selects (not namespace-scoped).
    pub not_selector: Option<Selector>,
    /// Port must match one of these (numeric, or named on the owning endpoint).
    pub ports: Vec<PortMatch>,
    /// Port must match none of these.
    pub not_ports: Vec<PortMatch>,
    /// A Kubernetes Service (Calico's `services`): as a source, the
    /// addresses of its EndpointSlices; as a destination, their addresses
    /// and ports. Resolved by the cluster before any engine sees a rule.
    pub services: Option<ServiceRef>,
}

/// The Service a rule side names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    /// Namespace of the Service.
    pub namespace: String,
    /// Name of the Service.
    pub name: String,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl EntityMatch {
    /// Whether this side matches everything.
    pub fn is_empty(&self) -> bool {
        self.services.is_none()
            && self.nets.is_empty()
            && self.not_nets.is_empty()
            && self.selector.is_none()
            && self.not_selector.is_none()
            && self.ports.is_empty()
            && self.not_ports.is_empty()
    }
}

/// A normalised rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Action on match.
    pub action: Action,
    /// Only this IP version matches.
    pub ip_version: Option<IpVersion>,
    /// Protocol must equal this.
    pub protocol: Option<Protocol>,
    /// Protocol must differ from this.
    pub not_protocol: Option<Protocol>,
    /// ICMP type/code must match.
    pub icmp: Option<IcmpMatch>,
    /// ICMP type/code must not match.
    pub not_icmp: Option<IcmpMatch>,
    /// Source side.
    pub source: EntityMatch,
    /// Destination side.
    pub destination: EntityMatch,
    /// The name the rule was written with (network-policy-api rules have
    /// one); several rules share it when one written rule became several.
    pub name: Option<String>,
}

impl Rule {
    /// A rule that matches everything with the given action.
    pub fn any(action: Action) -> Rule {
        Rule {
            action,
            ip_version: None,
            protocol: None,
            not_protocol: None,
            icmp: None,
            not_icmp: None,
            source: EntityMatch::default(),
            destination: EntityMatch::default(),
            name: None,
        }
    }
}

/// A normalised policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Identity.
    pub id: PolicyId,
    /// Tier name.
    pub tier: String,
    /// Order inside the tier; `None` sorts after every number.
    pub order: Option<f64>,
    /// Effective endpoint selector (namespace and service-account scoping included).
    pub selector: Selector,
    /// Applies to ingress traffic.
    pub ingress_enabled: bool,
    /// Applies to egress traffic.
    pub egress_enabled: bool,
    /// Ingress rules.
    pub ingress: Vec<Rule>,
    /// Egress rules.
    pub egress: Vec<Rule>,
    /// preDNAT / doNotTrack policies apply to host endpoints only.
    pub host_only: bool,
}

impl Policy {
    /// Whether the policy governs a direction.
    pub fn applies_in(&self, dir: Direction) -> bool {
        match dir {
            Direction::Ingress => self.ingress_enabled,
            Direction::Egress => self.egress_enabled,
        }
    }

    /// Rules for a direction.
    pub fn rules(&self, dir: Direction) -> &[Rule] {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// Whether the policy can enforce at all (staged and host-only policies cannot).
    pub fn enforced(&self) -> bool {
        !self.id.kind.is_staged() && !self.host_only
    }

    /// Sort key inside a tier: order (unset = +inf), then name/namespace/kind as Calico does.
    pub fn sort_key(&self) -> (OrderKey, String) {
        (
            OrderKey(self.order.unwrap_or(f64::INFINITY)),
            format!(
                "{}/{}/{}",
                self.id.name,
                self.id.namespace.as_deref().unwrap_or(""),
                self.id.kind.kind_name()
            ),
        )
    }
}

/// A total order over policy and tier `order` values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OrderKey(pub f64);
impl Eq for OrderKey {}
impl PartialOrd for OrderKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrderKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// What happens at the end of a tier that did not decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TierDefault {
    /// Drop.
    Deny,
    /// Continue with the next tier.
    Pass,
}

/// A tier.
#[derive(Debug, Clone, PartialEq)]
pub struct Tier {
    /// Name.
    pub name: String,
    /// Order; `None` sorts last.
    pub order: Option<f64>,
    /// End-of-tier action.
    pub default_action: TierDefault,
}

impl Tier {
    /// The tiers Calico always has.
    pub fn well_known() -> Vec<Tier> {
        vec![
            Tier {
                name: "kube-admin".into(),
                order: Some(1_000.0),
                default_action: TierDefault::Pass,
            },
            Tier {
                name: "default".into(),
                order: Some(1_000_000.0),
                default_action: TierDefault::Deny,
            },
            Tier {
                name: "kube-baseline".into(),
                order: Some(10_000_000.0),
                default_action: TierDefault::Pass,
            },
        ]
    }

    /// Sort key: order (unset = +inf), then name.
    pub fn sort_key(&self) -> (OrderKey, String) {
        (
            OrderKey(self.order.unwrap_or(f64::INFINITY)),
            self.name.clone(),
        )
    }
}

/// A (global) network set: labelled CIDRs that rule selectors can match.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkSet {
    /// Namespace for NetworkSet, `None` for GlobalNetworkSet.
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// Own labels.
    pub labels: LabelMap,
    /// Member CIDRs.
    pub nets: Vec<IpNet>,
}

/// A Kubernetes Node, as the `nodes` peers of admin policies see it: its
/// labels and addresses.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: LabelMap,
    /// Its addresses (`status.addresses` of type InternalIP and ExternalIP).
    pub ips: Vec<IpAddr>,
}

impl Node {
    /// The address set rule selectors see: the node's labels plus
    /// [`LABEL_NODE`], which no user-written set may carry, so only node
    /// peers (which require it) select it.
    pub fn address_set(&self) -> NetworkSet {
        let mut labels = self.labels.clone();
        labels.insert(LABEL_NODE.into(), self.name.clone());
        NetworkSet {
            namespace: None,
            name: format!("node:{}", self.name),
            labels,
            nets: self.ips.iter().map(|ip| IpNet::from(*ip)).collect(),
        }
    }
}

/// A profile: rules applied after all tiers, and labels for its endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Name.
    pub name: String,
    /// Ingress rules.
    pub ingress: Vec<Rule>,
    /// Egress rules.
    pub egress: Vec<Rule>,
    /// Labels inherited by endpoints using the profile.
    pub labels_to_apply: LabelMap,
}

impl Profile {
    /// Rules for a direction.
    pub fn rules(&self, dir: Direction) -> &[Rule] {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// A Kubernetes namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct Namespace {
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: LabelMap,
}

/// A discovery.k8s.io/v1 EndpointSlice: what Calico's `services` rule
/// matches resolve against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The Service it belongs to (label `kubernetes.io/service-name`).
    pub service: Option<String>,
    /// Every endpoint address.
    pub addresses: Vec<IpAddr>,
    /// Its ports (a port without a number is left out).
    pub ports: Vec<SlicePort>,
}

/// A port of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlicePort {
    /// Port name (`""` for an unnamed port).
    pub name: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Port number.
    pub port: u16,
}

/// A Kubernetes service account.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceAccount {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: LabelMap,
}

/// A port a container declares; named ports in rules resolve against these.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeclaredPort {
    /// Port name (may be empty).
    pub name: String,
    /// Port number.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

/// Identity of a workload endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl EndpointKey {
    /// Builds a key.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for EndpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl std::str::FromStr for EndpointKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(EndpointKey::new(ns, name))
            }
            _ => Err(format!(
                "{s:?} is not an endpoint reference: expected namespace/name"
            )),
        }
    }
}

/// A workload endpoint (a pod) as the policy engine sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// Identity.
    pub key: EndpointKey,
    /// The pod's own labels (implicit and inherited labels are added by the cluster).
    pub labels: LabelMap,
    /// Addresses.
    pub ips: Vec<IpAddr>,
    /// Declared container ports.
    pub ports: Vec<DeclaredPort>,
    /// Service account name.
    pub service_account: Option<String>,
    /// Node the endpoint runs on.
    pub node: Option<String>,
    /// Explicit profile list; `None` means the Kubernetes default
    /// (`kns.<namespace>` then `ksa.<namespace>.<serviceaccount>`).
    pub profiles: Option<Vec<String>>,
    /// Orchestrator label value (`k8s` for pods).
    pub orchestrator: String,
    /// The host-side interface the endpoint is attached to, when a
    /// WorkloadEndpoint records it (Calico's CNI plugin writes it).
    pub interface: Option<String>,
}

impl Endpoint {
    /// The profiles the endpoint uses, in order.
    pub fn profile_names(&self) -> Vec<String> {
        match &self.profiles {
            Some(p) => p.clone(),
            None => {
                let mut v = vec![format!("{NAMESPACE_PROFILE_PREFIX}{}", self.key.namespace)];
                if let Some(sa) = &self.service_account {
                    v.push(format!(
                        "{SERVICE_ACCOUNT_PROFILE_PREFIX}{}.{sa}",
                        self.key.namespace
                    ));
                }
                v
            }
        }
    }
}
