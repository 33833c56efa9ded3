//! The kinds a datastore holds, by the names kubectl and calicoctl accept,
//! and the key each object is stored under (Calico's etcdv3 layout for
//! Calico kinds).

use crate::StoreError;

/// One kind a datastore holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindInfo {
    /// The plural lower-case name (`globalnetworkpolicies`).
    pub plural: &'static str,
    /// The kind as `ObjectRef` names it (`GlobalNetworkPolicy`; Kubernetes
    /// NetworkPolicies are `KubernetesNetworkPolicy`).
    pub kind: &'static str,
    /// The `kind` field of its documents.
    pub document_kind: &'static str,
    /// The `apiVersion` of its documents.
    pub api_version: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// Other names accepted on the command line (singular, short names,
    /// `plural.group`).
    pub aliases: &'static [&'static str],
    /// Read by the policy engine; false: stored for another layer (IPAM
    /// reads IP pools, reservations and nodes) and validated by it.
    pub policy: bool,
}

impl KindInfo {
    /// The key of an object of this kind: Calico's etcdv3 layout
    /// (`/calico/resources/v3/projectcalico.org/<plural>/[<ns>/]<name>`)
    /// for Calico kinds, the same shape under `/palisade/resources/` for
    /// the Kubernetes kinds Calico's etcd mode does not store.
    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        let (prefix, group) = match self.api_version.split_once('/') {
            Some(("projectcalico.org", _)) => ("/calico/resources/v3", "projectcalico.org"),
            Some((group, _)) => ("/palisade/resources", group),
            None => ("/palisade/resources", "core"),
        };
        match namespace {
            Some(ns) => format!("{prefix}/{group}/{}/{ns}/{name}", self.plural),
            None => format!("{prefix}/{group}/{}/{name}", self.plural),
        }
    }
}

/// Every kind the datastores hold: the kinds Palisade acts on.
pub const KINDS: &[KindInfo] = &[
    calico(
        "globalnetworkpolicies",
        "GlobalNetworkPolicy",
        false,
        &["globalnetworkpolicy", "gnp", "gnps"],
    ),
    calico(
        "networkpolicies",
        "NetworkPolicy",
        true,
        &[
            "networkpolicy",
            "np",
            "nps",
            "cnp",
            "networkpolicies.projectcalico.org",
        ],
    ),
    calico(
        "stagedglobalnetworkpolicies",
        "StagedGlobalNetworkPolicy",
        false,
        &["stagedglobalnetworkpolicy", "sgnp"],
    ),
    calico(
        "stagednetworkpolicies",
        "StagedNetworkPolicy",
        true,
        &["stagednetworkpolicy", "snp"],
    ),
    calico(
        "stagedkubernetesnetworkpolicies",
        "StagedKubernetesNetworkPolicy",
        true,
        &["stagedkubernetesnetworkpolicy", "sknp"],
    ),
    calico("tiers", "Tier", false, &["tier"]),
    calico("networksets", "NetworkSet", true, &["networkset", "netset"]),
    calico(
        "globalnetworksets",
        "GlobalNetworkSet",
        false,
        &["globalnetworkset", "gns"],
    ),
    calico("profiles", "Profile", false, &["profile", "pro"]),
    calico(
        "workloadendpoints",
        "WorkloadEndpoint",
        true,
        &["workloadendpoint", "wep", "weps"],
    ),
    KindInfo {
        plural: "networkpolicies.networking.k8s.io",
        kind: "KubernetesNetworkPolicy",
        document_kind: "NetworkPolicy",
        api_version: "networking.k8s.io/v1",
        namespaced: true,
        aliases: &[
            "kubernetesnetworkpolicies",
            "knp",
            "networkpolicy.networking.k8s.io",
        ],
        policy: true,
    },
    core("namespaces", "Namespace", false, &["namespace", "ns"]),
    core("pods", "Pod", true, &["pod", "po"]),
    core(
        "serviceaccounts",
        "ServiceAccount",
        true,
        &["serviceaccount", "sa"],
    ),
    // What Calico's `services` rule matches resolve against.
    info(
        "discovery.k8s.io/v1",
        "endpointslices",
        "EndpointSlice",
        true,
        &["endpointslice", "eps"],
    ),
    // The network-policy-api's cluster-admin kinds (tiers kube-admin and
    // kube-baseline).
    info(
        "policy.networking.k8s.io/v1alpha1",
        "adminnetworkpolicies",
        "AdminNetworkPolicy",
        false,
        &["adminnetworkpolicy", "anp"],
    ),
    info(
        "policy.networking.k8s.io/v1alpha1",
        "baselineadminnetworkpolicies",
        "BaselineAdminNetworkPolicy",
        false,
        &["baselineadminnetworkpolicy", "banp"],
    ),
    info(
        "policy.networking.k8s.io/v1alpha2",
        "clusternetworkpolicies",
        "ClusterNetworkPolicy",
        false,
        &["clusternetworkpolicy", "kcnp"],
    ),
    // What the service dataplane load-balances (with the EndpointSlices
    // above); validated by palisade-services, not the policy engine.
    KindInfo {
        policy: false,
        ..core("services", "Service", true, &["service", "svc"])
    },
    ipam("ippools", "IPPool", &["ippool", "ipp", "pool", "pools"]),
    ipam("ipreservations", "IPReservation", &["ipreservation"]),
    ipam("nodes", "Node", &["node", "no"]),
    // Felix's configuration (`default`, `node.<name>`): the overlay pass
    // reads its natOutgoing settings; other fields are kept, not acted on.
    ipam(
        "felixconfigurations",
        "FelixConfiguration",
        &["felixconfiguration", "felixconfig", "felixconfigs"],
    ),
];

/// A Calico kind IPAM reads (cluster-scoped).
const fn ipam(
    plural: &'static str,
    kind: &'static str,
    aliases: &'static [&'static str],
) -> KindInfo {
    let mut k = info("projectcalico.org/v3", plural, kind, false, aliases);
    k.policy = false;
    k
}

const fn calico(
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    aliases: &'static [&'static str],
) -> KindInfo {
    info("projectcalico.org/v3", plural, kind, namespaced, aliases)
}

const fn core(
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    aliases: &'static [&'static str],
) -> KindInfo {
    info("v1", plural, kind, namespaced, aliases)
}

/// A kind whose documents say `kind: <kind>`.
const fn info(
    api_version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    aliases: &'static [&'static str],
) -> KindInfo {
    KindInfo {
        plural,
        kind,
        document_kind: kind,
        api_version,
        namespaced,
        aliases,
        policy: true,
    }
}

/// The kind a command-line name stands for (plural, singular, short name
/// or `plural.group`, any case).
pub fn kind_named(name: &str) -> Result<&'static KindInfo, StoreError> {
    let lower = name.to_ascii_lowercase();
    KINDS
        .iter()
        .find(|k| k.plural == lower || k.aliases.contains(&lower.as_str()))
        .ok_or_else(|| StoreError::UnknownKind {
            name: name.to_string(),
            known: KINDS
                .iter()
                .map(|k| k.plural)
                .collect::<Vec<_>>()
                .join(", "),
        })
}

fn str_of(v: Option<&serde_json::Value>) -> Option<&str> {
    v.and_then(|v| v.as_str())
}

/// The kind of a manifest document, by its `kind` and `apiVersion`, with
/// its reference (namespace and name from its metadata).
pub fn document_ref(
    document: &serde_json::Value,
) -> Option<(&'static KindInfo, policy_core::ObjectRef)> {
    let kind = str_of(document.get("kind"))?;
    let api = str_of(document.get("apiVersion"))?;
    let info = KINDS
        .iter()
        .find(|k| k.document_kind == kind && k.api_version == api)?;
    let meta = document.get("metadata");
    let name = str_of(meta.and_then(|m| m.get("name")))?;
    let namespace = str_of(meta.and_then(|m| m.get("namespace"))).filter(|_| info.namespaced);
    Some((
        info,
        policy_core::ObjectRef::new(info.kind, namespace, name),
    ))
}

/// The object stored under `key`, from the key alone (a delete event
/// carries no document).
pub fn ref_of_key(key: &str) -> Option<policy_core::ObjectRef> {
    KINDS.iter().find_map(|info| {
        let rest = key.strip_prefix(&info.key(None, ""))?;
        let (namespace, name) = match (info.namespaced, rest.split_once('/')) {
            (true, Some((ns, name))) => (Some(ns), name),
            (false, None) => (None, rest),
            _ => return None,
        };
        (!name.is_empty() && !name.contains('/'))
            .then(|| policy_core::ObjectRef::new(info.kind, namespace, name))
    })
}

/// The kind an `ObjectRef` kind names.
pub fn kind_of_ref(kind: &str) -> Option<&'static KindInfo> {
    KINDS.iter().find(|k| k.kind == kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_as_kubectl_and_calicoctl_accept_them() {
        assert_eq!(kind_named("gnp").unwrap().kind, "GlobalNetworkPolicy");
        assert_eq!(kind_named("NetworkPolicies").unwrap().kind, "NetworkPolicy");
        assert_eq!(
            kind_named("networkpolicies.networking.k8s.io")
                .unwrap()
                .kind,
            "KubernetesNetworkPolicy"
        );
        assert_eq!(kind_named("ns").unwrap().kind, "Namespace");
        let e = kind_named("deployments").unwrap_err().to_string();
        assert!(e.contains("globalnetworkpolicies"), "{e}");
    }

    #[test]
    fn keys_follow_calicos_etcd_layout() {
        let np = kind_named("networkpolicies").unwrap();
        assert_eq!(
            np.key(Some("shop"), "db"),
            "/calico/resources/v3/projectcalico.org/networkpolicies/shop/db"
        );
        let gnp = kind_named("globalnetworkpolicies").unwrap();
        assert_eq!(
            gnp.key(None, "default-deny"),
            "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/default-deny"
        );
        let pod = kind_named("pods").unwrap();
        assert_eq!(
            pod.key(Some("a"), "web"),
            "/palisade/resources/core/pods/a/web"
        );
    }

    #[test]
    fn keys_name_their_objects() {
        for (info, ns) in KINDS.iter().map(|k| (k, k.namespaced.then_some("shop"))) {
            let key = info.key(ns, "db");
            let r = ref_of_key(&key).unwrap_or_else(|| panic!("{key}"));
            assert_eq!(
                (r.kind.as_str(), r.namespace.as_deref(), r.name.as_str()),
                (info.kind, ns, "db")
            );
        }
        assert_eq!(
            ref_of_key("/calico/ipam/v2/assignment/ipv4/block/10.0.0.0-26"),
            None
        );
        assert_eq!(
            ref_of_key("/calico/resources/v3/projectcalico.org/networkpolicies/shop"),
            None
        );
    }

    #[test]
    fn every_name_is_unique() {
        let mut names: Vec<&str> = KINDS
            .iter()
            .flat_map(|k| std::iter::once(k.plural).chain(k.aliases.iter().copied()))
            .collect();
        let all = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all);
    }
}
