//! Findings about a cluster's policies that are valid but almost certainly
//! not what the author meant: policies that select nothing, rule peers that
//! match nothing, and DNS cut off by a default deny.
//!
//! Every check runs on the cluster as loaded; a selector that matches no pod
//! today may be waiting for tomorrow's, so these are warnings, not errors.
//!
//! ```
//! use policy_core::{Cluster, lint::{lint, Check}};
//! use policy_core::manifest::parse_manifests;
//!
//! let yaml = r#"
//! apiVersion: v1
//! kind: Namespace
//! metadata: {name: shop, labels: {env: prod}}
//! ---
//! apiVersion: v1
//! kind: Pod
//! metadata: {name: web, namespace: shop, labels: {app: web}}
//! status: {podIP: 10.0.0.1}
//! ---
//! apiVersion: projectcalico.org/v3
//! kind: GlobalNetworkPolicy
//! metadata: {name: prod-only}
//! spec: {selector: "env == 'prod'", types: [Ingress]}
//! "#;
//! let objects = parse_manifests("example.yaml", yaml).unwrap();
//! let cluster = Cluster::from_objects(objects.into_iter().map(|l| l.object)).unwrap();
//! let findings = lint(&cluster);
//! assert_eq!(findings[0].check, Check::SelectsNothing);
//! assert!(findings[0].message.contains("namespaceSelector"));
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use crate::cluster::{Change, Cluster};
use crate::connection::Engine;
use crate::convert::Object;
use crate::flow::{Flow, Verdict};
use crate::model::{Direction, Endpoint, EndpointKey, EntityMatch, LabelMap, Namespace, Policy};
use crate::net::Protocol;
use crate::reference::ReferenceEngine;
use crate::selector::Selector;

/// What a finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Check {
    /// A selector no label set can satisfy (`a == 'x' && a == 'y'`).
    ImpossibleSelector,
    /// An enforced policy that applies to no endpoint.
    SelectsNothing,
    /// A rule whose peer selector matches no endpoint and no network set.
    PeerMatchesNothing,
    /// Pods that cannot reach the cluster DNS on UDP 53.
    DnsBlocked,
}

impl Check {
    /// Short name, as printed.
    pub fn name(self) -> &'static str {
        match self {
            Check::ImpossibleSelector => "impossible-selector",
            Check::SelectsNothing => "selects-nothing",
            Check::PeerMatchesNothing => "peer-matches-nothing",
            Check::DnsBlocked => "dns-blocked",
        }
    }
}

/// One finding: the object it is about and what is wrong, with a hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The check that fired.
    pub check: Check,
    /// The object, as `gnp:name` or `np:namespace/name`.
    pub object: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} [{}]",
            self.object,
            self.message,
            self.check.name()
        )
    }
}

/// Labels pods carry for their namespace's labels (Calico's profile labels).
const NAMESPACE_LABEL_PREFIX: &str = "pcns.";

/// Labels Kubernetes gives the cluster DNS pods (CoreDNS keeps kube-dns's).
const DNS_APP_LABEL: (&str, &str) = ("k8s-app", "kube-dns");

/// Runs every check; findings in check order, then object order.
pub fn lint(cluster: &Cluster) -> Vec<Finding> {
    let endpoint_labels: Vec<LabelMap> = cluster
        .endpoints()
        .map(|e| cluster.endpoint_labels(e))
        .collect();
    let set_labels: Vec<LabelMap> = cluster
        .network_sets()
        .map(|s| cluster.network_set_labels(s))
        .collect();
    let mut out = Vec::new();
    let mut policies: Vec<&Policy> = cluster.policies().filter(|p| p.enforced()).collect();
    policies.sort_by(|a, b| a.id.cmp(&b.id));
    for p in &policies {
        let object = p.id.to_string();
        if !possible(&p.selector) {
            out.push(Finding {
                check: Check::ImpossibleSelector,
                object: object.clone(),
                message: format!(
                    "selector `{}` can never match: it asks one label for contradictory values",
                    p.selector.canonical()
                ),
            });
        } else if !endpoint_labels.iter().any(|l| p.selector.matches(l)) {
            out.push(Finding {
                check: Check::SelectsNothing,
                object: object.clone(),
                message: format!(
                    "selects no endpoint (selector `{}`){}",
                    p.selector.canonical(),
                    namespace_label_hint(cluster, &p.selector, &endpoint_labels)
                ),
            });
        }
        for dir in Direction::ALL {
            for (i, rule) in p.rules(dir).iter().enumerate() {
                for (side, m) in [("source", &rule.source), ("destination", &rule.destination)] {
                    if let Some(message) = peer_problem(side, m, &endpoint_labels, &set_labels) {
                        out.push(Finding {
                            check: if message.contains("can never match") {
                                Check::ImpossibleSelector
                            } else {
                                Check::PeerMatchesNothing
                            },
                            object: object.clone(),
                            message: format!("{dir} rule {i}: {message}"),
                        });
                    }
                }
            }
        }
    }
    out.extend(dns_blocked(cluster));
    out.sort_by(|a, b| (a.check, &a.object).cmp(&(b.check, &b.object)));
    out
}

/// Whether some label set can satisfy the selector.
fn possible(sel: &Selector) -> bool {
    sel.label_restrictions().values().all(|r| r.possible())
}

/// A rule side whose positive selector matches nothing (and that has no
/// CIDRs of its own to match instead).
fn peer_problem(
    side: &str,
    m: &EntityMatch,
    endpoints: &[LabelMap],
    sets: &[LabelMap],
) -> Option<String> {
    let sel = m.selector.as_ref()?;
    if !possible(sel) {
        return Some(format!(
            "{side} selector `{}` can never match: it asks one label for contradictory values",
            sel.canonical()
        ));
    }
    if !m.nets.is_empty() {
        return None;
    }
    let matched = endpoints.iter().chain(sets).any(|l| sel.matches(l));
    (!matched).then(|| {
        format!(
            "{side} selector `{}` matches no endpoint or network set, so the rule matches nothing today",
            sel.canonical()
        )
    })
}

/// Why a selector may have missed: a label it names is on namespaces, not
/// on pods (a frequent GlobalNetworkPolicy mistake).
fn namespace_label_hint(cluster: &Cluster, sel: &Selector, endpoints: &[LabelMap]) -> String {
    let mut keys: BTreeSet<&str> = BTreeSet::new();
    sel.expr().visit_labels(&mut |k| {
        keys.insert(k);
    });
    for key in keys {
        let on_pods = endpoints.iter().any(|l| l.contains_key(key));
        let on_namespaces = cluster.namespaces().any(|n| n.labels.contains_key(key));
        if !on_pods && on_namespaces {
            return format!(
                "; `{key}` is a namespace label, not a pod label: select with `namespaceSelector: {}` (pods see it as `{NAMESPACE_LABEL_PREFIX}{key}`)",
                sel.canonical()
            );
        }
    }
    String::new()
}

/// Address of the stand-in DNS pod when the manifests hold none.
const STAND_IN_DNS_IP: [u8; 4] = [10, 255, 255, 253];

/// Pods that cannot reach a DNS pod on UDP 53, egress or ingress side.
/// Manifest folders rarely include CoreDNS itself, so when no pod carries
/// `k8s-app: kube-dns`, a stand-in `kube-system/coredns` with that label is
/// added for the check (and named as such).
fn dns_blocked(cluster: &Cluster) -> Vec<Finding> {
    let (key, value) = DNS_APP_LABEL;
    let is_dns = |e: &Endpoint| e.labels.get(key).is_some_and(|v| v == value) && !e.ips.is_empty();
    if cluster.endpoints().next().is_none() {
        return Vec::new();
    }
    let mut with_stand_in;
    let mut stand_in = false;
    let cluster = if cluster.endpoints().any(is_dns) {
        cluster
    } else {
        with_stand_in = cluster.clone();
        let dns = Endpoint {
            key: EndpointKey::new("kube-system", "coredns"),
            labels: LabelMap::from([(key.to_string(), value.to_string())]),
            ips: vec![IpAddr::from(STAND_IN_DNS_IP)],
            ports: Vec::new(),
            service_account: Some("coredns".into()),
            node: None,
            profiles: None,
            orchestrator: "k8s".into(),
            interface: None,
        };
        let mut changes = vec![Change::Upsert(Object::Endpoint(dns))];
        if cluster.namespace("kube-system").is_none() {
            changes.insert(
                0,
                Change::Upsert(Object::Namespace(Namespace {
                    name: "kube-system".into(),
                    labels: LabelMap::new(),
                })),
            );
        }
        if with_stand_in.apply(changes).is_err() {
            return Vec::new();
        }
        stand_in = true;
        &with_stand_in
    };
    let Some(dns) = cluster.endpoints().find(|e| is_dns(e)) else {
        return Vec::new();
    };
    let engine = ReferenceEngine::new(cluster);
    let dns_ip = dns.ips[0];
    let mut clients = 0;
    // Per direction: how many pods are cut off, and one example decision.
    let mut blocked: [(usize, Option<String>); 2] = [(0, None), (0, None)];
    for e in cluster.endpoints() {
        if e.key == dns.key || e.labels.get(key).is_some_and(|v| v == value) {
            continue;
        }
        let Some(ip) = e.ips.iter().find(|ip| ip.is_ipv4() == dns_ip.is_ipv4()) else {
            continue;
        };
        clients += 1;
        let flow = Flow::ports(*ip, dns_ip, Protocol::UDP, 40000, 53);
        for (slot, (at, dir)) in [(&e.key, Direction::Egress), (&dns.key, Direction::Ingress)]
            .into_iter()
            .enumerate()
        {
            if let Ok(d) = engine.decide(at, dir, &flow)
                && d.verdict == Verdict::Deny
            {
                blocked[slot].0 += 1;
                blocked[slot]
                    .1
                    .get_or_insert_with(|| format!("{} by {}", e.key, d.decided_by));
            }
        }
    }
    let mut out = Vec::new();
    for (slot, what) in ["egress from the pods", "ingress at the DNS pod"]
        .into_iter()
        .enumerate()
    {
        let (n, example) = &blocked[slot];
        if *n > 0 {
            out.push(Finding {
                check: Check::DnsBlocked,
                object: dns.key.to_string(),
                message: format!(
                    "{n} of {clients} pods cannot resolve names: UDP 53 to {}{} ({dns_ip}) is denied on {what} (first: {}); a default deny needs an egress allow to kube-dns and an ingress allow on it",
                    dns.key,
                    if stand_in { " (a stand-in: the manifests hold no pod labelled k8s-app: kube-dns)" } else { "" },
                    example.as_deref().unwrap_or("?")
                ),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::parse_manifests;

    fn cluster(yaml: &str) -> Cluster {
        let objects = parse_manifests("t.yaml", yaml).expect("parses");
        Cluster::from_objects(objects.into_iter().map(|l| l.object)).expect("valid")
    }

    const BASE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: kube-system}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {env: prod}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}\nstatus: {podIP: 10.0.9.9}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\nstatus: {podIP: 10.0.0.1}\n";

    #[test]
    fn a_clean_cluster_has_no_findings() {
        assert_eq!(lint(&cluster(BASE)), vec![]);
    }

    #[test]
    fn default_deny_all_cuts_off_dns_both_ways() {
        let c = cluster(&format!(
            "{BASE}---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: deny}}\nspec: {{selector: all(), types: [Ingress, Egress]}}\n"
        ));
        let f = lint(&c);
        let dns: Vec<_> = f.iter().filter(|f| f.check == Check::DnsBlocked).collect();
        assert_eq!(dns.len(), 2, "{f:#?}");
        assert!(dns[0].message.contains("1 of 1 pods"), "{}", dns[0]);
    }

    #[test]
    fn dns_allowed_both_ways_is_quiet() {
        let c = cluster(&format!(
            "{BASE}---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: deny}}\nspec: {{order: 1000, selector: all(), types: [Ingress, Egress]}}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: dns}}\nspec:\n  order: 10\n  selector: all()\n  types: [Ingress, Egress]\n  egress: [{{action: Allow, protocol: UDP, destination: {{selector: k8s-app == 'kube-dns', ports: [53]}}}}]\n  ingress: [{{action: Allow, protocol: UDP, destination: {{ports: [53]}}}}]\n"
        ));
        let f = lint(&c);
        assert!(!f.iter().any(|f| f.check == Check::DnsBlocked), "{f:#?}");
    }

    #[test]
    fn a_namespace_label_in_a_pod_selector_is_called_out() {
        let c = cluster(&format!(
            "{BASE}---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: prod}}\nspec: {{selector: env == 'prod', types: [Ingress]}}\n"
        ));
        let f = lint(&c);
        assert_eq!(f.len(), 1, "{f:#?}");
        assert_eq!(f[0].check, Check::SelectsNothing);
        assert_eq!(f[0].object, "gnp:prod");
        assert!(
            f[0].message.contains("`env` is a namespace label"),
            "{}",
            f[0]
        );
    }

    #[test]
    fn impossible_and_empty_peers_are_named_with_their_rule() {
        let c = cluster(&format!(
            "{BASE}---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: web, namespace: shop}}\nspec:\n  selector: app == 'web'\n  ingress:\n  - {{action: Allow, source: {{selector: app == 'api'}}}}\n  - {{action: Allow, source: {{selector: app == 'a' && app == 'b'}}}}\n"
        ));
        let f = lint(&c);
        let text: Vec<String> = f.iter().map(ToString::to_string).collect();
        assert!(
            text.iter()
                .any(|t| t.contains("ingress rule 0: source selector")
                    && t.ends_with("[peer-matches-nothing]")),
            "{text:#?}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("ingress rule 1") && t.ends_with("[impossible-selector]")),
            "{text:#?}"
        );
    }

    #[test]
    fn without_a_dns_pod_a_stand_in_is_checked() {
        let c = cluster(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\nstatus: {podIP: 10.0.0.1}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: deny}\nspec: {selector: all(), types: [Egress]}\n",
        );
        let f = lint(&c);
        assert_eq!(f.len(), 1, "{f:#?}");
        assert!(f[0].message.contains("a stand-in"), "{}", f[0]);
        assert!(f[0].message.contains("egress from the pods"), "{}", f[0]);
    }
}
