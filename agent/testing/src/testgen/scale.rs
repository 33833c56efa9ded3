//! The realistic generated cluster of the benchmarks ([`scale_cluster`])
//! and wide policies.

use super::*;

/// Shape of a generated cluster for benchmarks; see [`scale_cluster`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scale {
    /// Pods.
    pub pods: usize,
    /// Policies of all kinds.
    pub policies: usize,
    /// Pods per node (the node-local view compiles one node).
    pub pods_per_node: usize,
}

/// A realistic generated cluster:
///
/// - one namespace per 50 pods; namespaces carry `team` (20 values), `env`
///   (prod/staging/dev) and `tier` labels; each team gets its own IP pool
///   (`10.<team>.0.0/16`), as Calico IPAM with a pool per business would;
/// - each namespace runs 5 apps in 2 versions (label cardinality: `app`,
///   `version`, `role`), so about 2.5 pods share an identity; pods declare
///   `http` (8080), `metrics` (9090) and, for some roles, `grpc` (50051);
/// - policies: a per-namespace default-deny Kubernetes NetworkPolicy for every
///   namespace (as many as the budget allows), then Kubernetes allow
///   policies (app to app, from other teams' namespaces by
///   namespaceSelector, named and numeric ports, ipBlock with except), Calico
///   NetworkPolicies in a `team` tier, and GlobalNetworkPolicies in tiers
///   `security` (deny the metadata address, Pass the rest) and `platform`
///   (allow DNS, allow monitoring to metrics, egress to external network
///   sets, notNets) — roughly 70% Kubernetes, 20% Calico namespaced, 10%
///   global;
/// - global network sets for 40 external partner ranges.
///
/// Deterministic in `seed`.
pub fn scale_cluster(scale: Scale, seed: u64) -> Vec<Object> {
    scale_parts(scale, seed)
        .into_iter()
        .filter_map(|p| match p {
            Part::Doc(v) => convert(&v),
            Part::Pod(e) => Some(Object::Endpoint(e)),
        })
        .collect()
}

/// The cluster of [`scale_cluster`] as manifests (JSON documents, pods as
/// Kubernetes `Pod`s with `status.podIP`), for tools that read files: the
/// same objects once loaded.
pub fn scale_manifests(scale: Scale, seed: u64) -> Vec<Value> {
    scale_parts(scale, seed)
        .into_iter()
        .map(|p| match p {
            Part::Doc(v) => v,
            Part::Pod(e) => pod_manifest(&e),
        })
        .collect()
}

/// A Kubernetes `Pod` manifest that loads as exactly this endpoint (for
/// endpoints with Kubernetes' default profiles and orchestrator).
pub fn pod_manifest(e: &Endpoint) -> Value {
    let ports: Vec<Value> = e
        .ports
        .iter()
        .map(|p| json!({"name": p.name, "containerPort": p.port, "protocol": p.protocol.to_string()}))
        .collect();
    let mut spec = json!({"containers": [{"name": "main", "ports": ports}]});
    if let Some(sa) = &e.service_account {
        spec["serviceAccountName"] = json!(sa);
    }
    if let Some(node) = &e.node {
        spec["nodeName"] = json!(node);
    }
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": e.key.name, "namespace": e.key.namespace, "labels": e.labels},
        "spec": spec});
    if let Some(ip) = e.ips.first() {
        pod["status"] = json!({"podIP": ip.to_string(),
            "podIPs": e.ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>()});
    }
    pod
}

/// A generated object: a manifest, or a pod built directly.
enum Part {
    Doc(Value),
    Pod(Endpoint),
}

fn scale_parts(scale: Scale, seed: u64) -> Vec<Part> {
    let mut r = Rng::new(seed);
    let mut objects: Vec<Part> = Vec::new();
    let namespaces = scale.pods.div_ceil(50).max(1);
    let teams = 20usize;
    let envs = ["prod", "staging", "dev"];
    for t in [
        ("security", 100.0, "Pass"),
        ("platform", 200.0, "Pass"),
        ("team", 300.0, "Deny"),
    ] {
        objects.push(Part::Doc(
            json!({"apiVersion": "projectcalico.org/v3", "kind": "Tier",
            "metadata": {"name": t.0}, "spec": {"order": t.1, "defaultAction": t.2}}),
        ));
    }
    objects.push(Part::Doc(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "kube-system"}})));
    objects.push(Part::Doc(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "monitoring", "labels": {"purpose": "monitoring"}}})));
    for n in 0..namespaces {
        objects.push(Part::Doc(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("ns-{n}"), "labels": {
                "team": format!("team-{}", n % teams), "env": envs[n % 3],
                "tier": if n % 2 == 0 { "frontend" } else { "backend" }}}})));
    }
    for i in 0..40 {
        objects.push(Part::Doc(json!({"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
            "metadata": {"name": format!("partner-{i}"), "labels": {"partner": format!("p{}", i % 8), "external": "true"}},
            "spec": {"nets": [format!("198.{}.{}.0/24", 18 + i / 200, i % 200), format!("203.0.{i}.0/24")]}})));
    }
    let roles = ["frontend", "backend", "worker", "db"];
    let mut per_team = vec![0u32; teams];
    let nodes = scale.pods.div_ceil(scale.pods_per_node.max(1)).max(1);
    for i in 0..scale.pods {
        let ns = i % namespaces;
        let team = ns % teams;
        let app = (i / namespaces) % 5;
        let version = (i / namespaces / 5) % 2;
        let role = roles[app % roles.len()];
        let k = per_team[team];
        per_team[team] += 1;
        let ip: IpAddr = format!("10.{}.{}.{}", team, k / 250, k % 250 + 1)
            .parse()
            .expect("ip");
        let mut ports = vec![
            DeclaredPort {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::TCP,
            },
            DeclaredPort {
                name: "metrics".into(),
                port: 9090,
                protocol: Protocol::TCP,
            },
        ];
        if role == "backend" {
            ports.push(DeclaredPort {
                name: "grpc".into(),
                port: 50051,
                protocol: Protocol::TCP,
            });
        }
        objects.push(Part::Pod(Endpoint {
            key: EndpointKey::new(format!("ns-{ns}"), format!("pod-{i}")),
            labels: BTreeMap::from([
                ("app".to_string(), format!("app-{app}")),
                ("version".to_string(), format!("v{version}")),
                ("role".to_string(), role.to_string()),
            ]),
            ips: vec![ip],
            ports,
            service_account: Some(format!("sa-{app}")),
            node: Some(format!("node-{}", i % nodes)),
            profiles: None,
            orchestrator: "k8s".into(),
            interface: None,
        }));
    }
    let dns_pod = Endpoint {
        key: EndpointKey::new("kube-system", "coredns"),
        labels: BTreeMap::from([("k8s-app".to_string(), "kube-dns".to_string())]),
        ips: vec!["10.250.0.10".parse().expect("ip")],
        ports: vec![DeclaredPort {
            name: "dns".into(),
            port: 53,
            protocol: Protocol::UDP,
        }],
        service_account: Some("coredns".into()),
        node: Some("node-0".into()),
        profiles: None,
        orchestrator: "k8s".into(),
        interface: None,
    };
    objects.push(Part::Pod(dns_pod));

    // Global policies first (about 10% of the budget).
    let n_global = (scale.policies / 10).max(4);
    let global_templates = [
        json!({"tier": "security", "order": 10.0, "selector": "all()", "types": ["Egress"],
               "egress": [{"action": "Deny", "destination": {"nets": ["169.254.169.254/32"]}},
                          {"action": "Pass"}]}),
        json!({"tier": "platform", "order": 10.0, "selector": "all()", "types": ["Egress"],
               "egress": [{"action": "Allow", "protocol": "UDP",
                           "destination": {"namespaceSelector": "projectcalico.org/name == 'kube-system'",
                                           "selector": "k8s-app == 'kube-dns'", "ports": [53]}},
                          {"action": "Pass"}]}),
        json!({"tier": "platform", "order": 20.0, "selector": "has(app)", "types": ["Ingress"],
               "ingress": [{"action": "Allow", "protocol": "TCP",
                            "source": {"namespaceSelector": "purpose == 'monitoring'"},
                            "destination": {"ports": ["metrics"]}},
                           {"action": "Pass"}]}),
    ];
    for g in 0..n_global {
        let spec = if g < global_templates.len() {
            global_templates[g].clone()
        } else {
            let partner = r.below(8);
            let team = r.below(teams);
            json!({"tier": if g % 2 == 0 { "platform" } else { "security" }, "order": 100.0 + g as f64,
                   "selector": format!("role == '{}'", roles[r.below(4)]),
                   "namespaceSelector": format!("team == 'team-{team}'"),
                   "types": ["Egress"],
                   "egress": [
                       {"action": "Allow", "protocol": "TCP",
                        "destination": {"selector": format!("partner == 'p{partner}'"), "ports": [443]}},
                       {"action": "Allow", "protocol": "TCP",
                        "destination": {"nets": [format!("198.51.{}.0/24", g % 250)], "notNets": [format!("198.51.{}.128/25", g % 250)]}},
                       {"action": "Pass"}]})
        };
        objects.push(Part::Doc(
            json!({"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
            "metadata": {"name": format!("global-{g}")}, "spec": spec}),
        ));
    }
    let remaining = scale.policies.saturating_sub(n_global);
    let n_calico = remaining * 2 / 9;
    let n_k8s = remaining - n_calico;
    let mut k8s = 0;
    // Per-namespace default deny first.
    for n in 0..namespaces.min(n_k8s) {
        objects.push(Part::Doc(
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "default-deny", "namespace": format!("ns-{n}")},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}),
        ));
        k8s += 1;
    }
    while k8s < n_k8s {
        let ns = r.below(namespaces);
        let app = r.below(5);
        let from_app = r.below(5);
        let spec = match r.below(4) {
            0 => json!({"podSelector": {"matchLabels": {"app": format!("app-{app}")}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("app-{from_app}")}}}],
                                     "ports": [{"port": "http"}]}],
                        "policyTypes": ["Ingress"]}),
            1 => json!({"podSelector": {"matchLabels": {"app": format!("app-{app}")}},
                        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("team-{}", r.below(teams))}},
                                               "podSelector": {"matchLabels": {"role": "frontend"}}}],
                                     "ports": [{"port": 8080, "protocol": "TCP"}, {"port": "grpc"}]}],
                        "policyTypes": ["Ingress"]}),
            2 => json!({"podSelector": {"matchLabels": {"app": format!("app-{app}")}},
                        "egress": [{"to": [{"podSelector": {"matchLabels": {"app": format!("app-{from_app}")}}},
                                           {"namespaceSelector": {"matchLabels": {"tier": "backend"}}}],
                                    "ports": [{"port": "http"}, {"port": 5432, "protocol": "TCP"}]}],
                        "policyTypes": ["Egress"]}),
            _ => {
                json!({"podSelector": {"matchExpressions": [{"key": "role", "operator": "In", "values": ["backend", "worker"]}]},
                        "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [format!("10.{}.0.0/16", r.below(teams))]}}],
                                    "ports": [{"port": 8000, "endPort": 8100, "protocol": "TCP"}]}],
                        "policyTypes": ["Egress"]})
            }
        };
        objects.push(Part::Doc(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": format!("allow-{k8s}"), "namespace": format!("ns-{ns}")}, "spec": spec})));
        k8s += 1;
    }
    for c in 0..n_calico {
        let ns = r.below(namespaces);
        let app = r.below(5);
        let spec = json!({"tier": "team", "order": (c % 10) as f64 * 10.0,
            "selector": format!("app == 'app-{app}' && version == 'v{}'", r.below(2)),
            "types": ["Ingress"],
            "ingress": [
                {"action": "Deny", "protocol": "TCP", "source": {"selector": "role == 'worker'"}, "destination": {"ports": ["grpc"]}},
                {"action": "Allow", "protocol": "TCP",
                 "source": {"namespaceSelector": format!("team == 'team-{}'", r.below(teams)), "selector": "role in {'frontend', 'backend'}"},
                 "destination": {"ports": ["http", "8000:8100"]}},
                {"action": "Allow", "protocol": "ICMP", "icmp": {"type": 8}},
                {"action": "Pass", "source": {"selector": "app == 'app-0'"}}]});
        objects.push(Part::Doc(json!({"apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
            "metadata": {"name": format!("team-{c}"), "namespace": format!("ns-{ns}")}, "spec": spec})));
    }
    objects
}

/// Few, wide policies: `policies` GlobalNetworkPolicies on `all()` of
/// `rules` ingress rules each, over 200 pods in 10 namespaces. Rule `r`
/// allows (even `r`) or denies (odd) TCP to port `1000 + r` from pods
/// labelled `app == 'a{r % 20}' && rank == 'r{r}'`, so every rule has its own
/// port interval and its own peer set: the shape that made compile time grow
/// faster than the rules (issue 16). At most 1,024 rules, Calico's limit.
pub fn wide_policies(policies: usize, rules: usize) -> Vec<Object> {
    assert!(
        rules <= 1024,
        "Calico allows at most 1,024 rules per policy"
    );
    let mut objects: Vec<Object> = Vec::new();
    for n in 0..10 {
        objects.extend(convert(&json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("ns{n}"), "labels": {"team": format!("t{}", n % 3)}}})));
    }
    for p in 0..200usize {
        objects.extend(convert(&json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("pod{p}"), "namespace": format!("ns{}", p % 10),
                "labels": {"app": format!("a{}", p % 20), "rank": format!("r{}", p % 50)}},
            "status": {"podIP": format!("10.0.{}.{}", p / 250, p % 250 + 1)}})));
    }
    for k in 0..policies {
        let ingress: Vec<Value> = (0..rules)
            .map(|r| {
                json!({"action": if r % 2 == 0 { "Allow" } else { "Deny" }, "protocol": "TCP",
                    "source": {"selector": format!("app == 'a{}' && rank == 'r{r}'", r % 20)},
                    "destination": {"ports": [1000 + r]}})
            })
            .collect();
        let policy = json!({"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
            "metadata": {"name": format!("gnp{k}")},
            "spec": {"order": k as f64, "selector": "all()", "types": ["Ingress"], "ingress": ingress}});
        objects.push(convert_document(&policy).expect("generated policy is valid"));
    }
    objects
}

/// `count` AdminNetworkPolicies plus the BaselineAdminNetworkPolicy for a
/// [`scale_cluster`] of `namespaces` namespaces, the guard rails a platform
/// team writes: per team, deny ingress from `dev` namespaces, allow
/// monitoring to the named `metrics` port, Pass the team's own namespaces,
/// deny egress to the cloud metadata address; alternately by namespace
/// (team) and by pod (role in env). Priorities spread over 0-1000. Empty
/// for `count` 0.
pub fn admin_policies(count: usize, namespaces: usize) -> Vec<Object> {
    let teams = 20.min(namespaces.max(1));
    let mut docs: Vec<Value> = (0..count)
        .map(|k| {
            let team = format!("team-{}", k % teams);
            let subject = if k % 2 == 0 {
                json!({"namespaces": {"matchLabels": {"team": team}}})
            } else {
                json!({"pods": {"namespaceSelector": {"matchLabels": {"team": team, "env": "prod"}},
                    "podSelector": {"matchExpressions": [{"key": "role", "operator": "In",
                        "values": ["backend", "db"]}]}}})
            };
            json!({"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "AdminNetworkPolicy",
                "metadata": {"name": format!("guard-{k}")},
                "spec": {"priority": (k * 7) % 1001, "subject": subject,
                    "ingress": [
                        {"name": "no-dev", "action": "Deny",
                         "from": [{"namespaces": {"matchLabels": {"env": "dev"}}}]},
                        {"name": "monitoring", "action": "Allow",
                         "from": [{"namespaces": {"matchLabels": {"purpose": "monitoring"}}}],
                         "ports": [{"namedPort": "metrics"}]},
                        {"name": "own-team", "action": "Pass",
                         "from": [{"namespaces": {"matchLabels": {"team": team}}}],
                         "ports": [{"portNumber": {"port": 8080}}, {"portRange": {"start": 50000, "end": 50100}}]}],
                    "egress": [
                        {"name": "no-metadata", "action": "Deny",
                         "to": [{"networks": ["169.254.169.254/32"]}]},
                        {"name": "dns", "action": "Allow",
                         "to": [{"pods": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                             "podSelector": {}}}],
                         "ports": [{"portNumber": {"protocol": "UDP", "port": 53}}]}]}})
        })
        .collect();
    if count > 0 {
        docs.push(json!({"apiVersion": "policy.networking.k8s.io/v1alpha1",
            "kind": "BaselineAdminNetworkPolicy", "metadata": {"name": "default"},
            "spec": {"subject": {"namespaces": {}},
                "ingress": [{"name": "default-deny", "action": "Deny", "from": [{"namespaces": {}}]}]}}));
    }
    docs.iter()
        .map(|d| convert_document(d).expect("generated admin policy is valid"))
        .collect()
}
