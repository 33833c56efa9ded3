//! Deterministic generators of clusters, changes and flows, for differential
//! tests between engines and for benchmarks. Everything derives from a seed,
//! so a failing seed reproduces exactly.
//!
//! Small clusters ([`small_cluster`]) exercise every rule feature: tiers with
//! Pass and Log, staged policies, Kubernetes and Calico policies, selectors
//! and notSelectors, namespace and service-account selectors, nested and
//! overlapping CIDRs, network sets, named ports with differing numbers,
//! port ranges and notPorts, ICMP type/code, protocol numbers, IPv4 and IPv6,
//! and explicit profiles.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::{Value, json};

use policy_core::cluster::Change;
use policy_core::convert::{Object, convert_document};
use policy_core::error::ObjectRef;
use policy_core::flow::Flow;
use policy_core::model::*;
use policy_core::net::Protocol;

/// SplitMix64: tiny, fast, good enough for test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeds the generator.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `p` percent.
    pub fn chance(&mut self, p: u32) -> bool {
        self.below(100) < p as usize
    }

    /// A random element.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const APPS: &[&str] = &["web", "api", "db", "cache"];
const TIERS_LABEL: &[&str] = &["fe", "be"];
const TEAMS: &[&str] = &["a", "b"];
const ENVS: &[&str] = &["prod", "dev"];
const NAMESPACES: &[&str] = &["x", "y", "z"];
const SERVICE_ACCOUNTS: &[&str] = &["default", "robot"];
const SERVICES: &[&str] = &["svc-a", "svc-b"];

/// An EndpointSlice of one of [`SERVICES`]: pod-like addresses (some of
/// no pod) and one or two ports.
fn endpoint_slice(r: &mut Rng, name: &str) -> Object {
    let ns = *r.pick(NAMESPACES);
    let addresses: Vec<IpAddr> = (0..1 + r.below(3))
        .map(|_| {
            let (n, h) = (r.below(3), 1 + r.below(8));
            if r.chance(80) {
                format!("10.0.{n}.{h}")
            } else {
                format!("fd00::{n}:{h}")
            }
            .parse()
            .expect("ip")
        })
        .collect();
    let choices = [
        (Protocol::TCP, 80),
        (Protocol::UDP, 53),
        (Protocol::TCP, 8080),
        (Protocol::SCTP, 80),
    ];
    let ports = (0..1 + r.below(2))
        .map(|i| {
            let (protocol, port) = *r.pick(&choices);
            SlicePort {
                name: format!("p{i}"),
                protocol,
                port,
            }
        })
        .collect();
    Object::EndpointSlice(EndpointSlice {
        namespace: ns.to_string(),
        name: name.to_string(),
        service: Some(r.pick(SERVICES).to_string()),
        addresses,
        ports,
    })
}

/// CIDRs that nest and overlap the pod addresses (10.0.<ns>.<n>, fd00::<ns>:<n>).
const CIDRS: &[&str] = &[
    "10.0.0.0/16",
    "10.0.1.0/24",
    "10.0.1.0/25",
    "10.0.1.2/32",
    "10.0.2.0/23",
    "10.0.0.0/8",
    "192.168.0.0/24",
    "0.0.0.0/0",
    "fd00::/64",
    "fd00::1:0/112",
    "fd00::2:2/128",
    "::/0",
];

const SELECTORS: &[&str] = &[
    "app == 'web'",
    "app == 'db'",
    "app in {'api', 'db'}",
    "app != 'web'",
    "has(tier)",
    "!has(tier)",
    "tier == 'fe' || app == 'cache'",
    "app starts with 'c'",
    "all()",
    "net == 'internal'",
    "net == 'partner' || app == 'db'",
    "projectcalico.org/namespace == 'y'",
    "team not in {'a'}",
];

const NS_SELECTORS: &[&str] = &[
    "team == 'a'",
    "env == 'prod'",
    "all()",
    "global()",
    "!has(team)",
];

/// The protocols flows and rules use.
const PROTOCOLS: &[&str] = &["TCP", "UDP", "SCTP", "ICMP", "253"];

fn ports_value(r: &mut Rng, named_ok: bool) -> Value {
    let n = 1 + r.below(3);
    let mut v = Vec::new();
    for _ in 0..n {
        let choice = r.below(if named_ok { 6 } else { 4 });
        v.push(match choice {
            0 => json!(80),
            1 => json!("8000:8100"),
            2 => json!(53),
            3 => json!("1:1024"),
            4 => json!("http"),
            _ => json!("dns"),
        });
    }
    Value::Array(v)
}

fn entity(r: &mut Rng, namespaced: bool, ports: Option<bool>) -> Value {
    let mut e = serde_json::Map::new();
    if r.chance(15) {
        e.insert("nets".into(), json!([r.pick(CIDRS), r.pick(CIDRS)]));
    }
    if r.chance(10) {
        e.insert("notNets".into(), json!([r.pick(CIDRS)]));
    }
    if r.chance(30) {
        e.insert("selector".into(), json!(r.pick(SELECTORS)));
    }
    if r.chance(10) {
        e.insert("notSelector".into(), json!(r.pick(SELECTORS)));
    }
    if r.chance(if namespaced { 15 } else { 10 }) {
        e.insert("namespaceSelector".into(), json!(r.pick(NS_SELECTORS)));
    }
    if r.chance(8) {
        let mut sa = serde_json::Map::new();
        if r.chance(50) {
            sa.insert("names".into(), json!([r.pick(SERVICE_ACCOUNTS)]));
        } else {
            sa.insert("selector".into(), json!("level == 'high'"));
        }
        e.insert("serviceAccounts".into(), Value::Object(sa));
    }
    if let Some(named_ok) = ports {
        if r.chance(40) {
            e.insert("ports".into(), ports_value(r, named_ok));
        }
        if r.chance(15) {
            e.insert("notPorts".into(), ports_value(r, named_ok));
        }
    }
    Value::Object(e)
}

fn calico_rule(r: &mut Rng, namespaced: bool) -> Value {
    let action = *r.pick(&["Allow", "Allow", "Allow", "Deny", "Pass", "Log"]);
    let mut rule = serde_json::Map::new();
    rule.insert("action".into(), json!(action));
    let proto = if r.chance(60) {
        Some(*r.pick(PROTOCOLS))
    } else {
        None
    };
    // Numeric ports need TCP/UDP/SCTP; named ports are allowed without a protocol.
    let port_proto = matches!(proto, Some("TCP" | "UDP" | "SCTP"));
    let ports = (port_proto || (proto.is_none() && r.chance(30))).then_some(true);
    if let Some(p) = proto {
        rule.insert(
            "protocol".into(),
            p.parse::<u8>().map(|n| json!(n)).unwrap_or(json!(p)),
        );
        if p == "ICMP" && r.chance(40) {
            let mut icmp = serde_json::Map::new();
            icmp.insert("type".into(), json!(*r.pick(&[0, 3, 8])));
            if r.chance(50) {
                icmp.insert("code".into(), json!(*r.pick(&[0, 1, 3])));
            }
            let key = if r.chance(50) { "icmp" } else { "notICMP" };
            rule.insert(key.into(), Value::Object(icmp));
        }
    }
    if r.chance(10) {
        rule.insert("notProtocol".into(), json!(*r.pick(&["UDP", "TCP"])));
    }
    if r.chance(8) && proto != Some("ICMP") {
        rule.insert("ipVersion".into(), json!(*r.pick(&[4, 6])));
    }
    let named_only = |v: &mut Value| {
        // Without a protocol, only named ports are valid.
        if let Some(o) = v.as_object_mut() {
            for k in ["ports", "notPorts"] {
                if let Some(Value::Array(a)) = o.get_mut(k) {
                    a.retain(|p| {
                        p.is_string()
                            && p.as_str()
                                .is_some_and(|s| s.starts_with(char::is_alphabetic))
                    });
                    if a.is_empty() {
                        o.remove(k);
                    }
                }
            }
        }
    };
    let mut src = entity(r, namespaced, ports);
    let mut dst = entity(r, namespaced, ports);
    if !port_proto {
        named_only(&mut src);
        named_only(&mut dst);
    }
    rule.insert("source".into(), src);
    rule.insert("destination".into(), dst);
    Value::Object(rule)
}

fn k8s_peer(r: &mut Rng) -> Value {
    match r.below(4) {
        0 => json!({"podSelector": {"matchLabels": {"app": r.pick(APPS)}}}),
        1 => json!({"namespaceSelector": {"matchLabels": {"team": r.pick(TEAMS)}}}),
        2 => json!({"namespaceSelector": {}, "podSelector": {"matchExpressions": [
            {"key": "tier", "operator": r.pick(&["Exists", "DoesNotExist", "In", "NotIn"]), "values": ["fe"]}]}}),
        _ => {
            json!({"ipBlock": {"cidr": r.pick(&["10.0.0.0/16", "10.0.1.0/24", "fd00::/64"]), "except": [r.pick(&["10.0.1.2/32", "10.0.1.0/25"])]}})
        }
    }
}

fn k8s_policy(r: &mut Rng, name: &str, ns: &str) -> Value {
    let mut spec = serde_json::Map::new();
    spec.insert(
        "podSelector".into(),
        if r.chance(30) {
            json!({})
        } else {
            json!({"matchLabels": {"app": r.pick(APPS)}})
        },
    );
    let mut types = Vec::new();
    for (key, peers_key) in [("ingress", "from"), ("egress", "to")] {
        if r.chance(60) {
            types.push(if key == "ingress" {
                "Ingress"
            } else {
                "Egress"
            });
            let mut rules = Vec::new();
            for _ in 0..r.below(3) {
                let mut rule = serde_json::Map::new();
                if r.chance(70) {
                    rule.insert(peers_key.into(), json!([k8s_peer(r)]));
                }
                if r.chance(50) {
                    let port = match r.below(4) {
                        0 => json!({"port": 80}),
                        1 => json!({"port": "http", "protocol": "TCP"}),
                        2 => json!({"protocol": "UDP", "port": 53, "endPort": 60}),
                        _ => json!({"protocol": "SCTP"}),
                    };
                    rule.insert("ports".into(), json!([port]));
                }
                rules.push(Value::Object(rule));
            }
            spec.insert(key.into(), Value::Array(rules));
        }
    }
    if r.chance(80) {
        spec.insert("policyTypes".into(), json!(types));
    }
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

fn calico_policy(r: &mut Rng, name: &str, tiers: &[String]) -> Value {
    let global = r.chance(40);
    let staged = r.chance(8);
    let kind = match (global, staged) {
        (true, false) => "GlobalNetworkPolicy",
        (false, false) => "NetworkPolicy",
        (true, true) => "StagedGlobalNetworkPolicy",
        (false, true) => "StagedNetworkPolicy",
    };
    let mut spec = serde_json::Map::new();
    spec.insert("tier".into(), json!(r.pick(tiers)));
    if r.chance(80) {
        spec.insert("order".into(), json!(r.below(5) as f64 * 10.0));
    }
    spec.insert("selector".into(), json!(r.pick(SELECTORS)));
    if global && r.chance(15) {
        spec.insert(
            "namespaceSelector".into(),
            json!(r.pick(&NS_SELECTORS[..3])),
        );
    }
    if r.chance(8) {
        spec.insert("serviceAccountSelector".into(), json!("level == 'high'"));
    }
    let mut types = Vec::new();
    for (key, t) in [("ingress", "Ingress"), ("egress", "Egress")] {
        let n = r.below(4);
        if n > 0 || r.chance(30) {
            types.push(t);
        }
        if n > 0 {
            let rules: Vec<Value> = (0..n).map(|_| calico_rule(r, !global)).collect();
            spec.insert(key.into(), Value::Array(rules));
        }
    }
    // Calico `services` matches: an ingress rule's source, an egress
    // rule's destination (the only sides Calico allows).
    for (key, side) in [("ingress", "source"), ("egress", "destination")] {
        if let Some(Value::Array(rules)) = spec.get_mut(key) {
            for rule in rules.iter_mut() {
                if r.chance(12) {
                    let mut svc = serde_json::Map::new();
                    svc.insert("name".into(), json!(r.pick(SERVICES)));
                    if global || r.chance(50) {
                        svc.insert("namespace".into(), json!(r.pick(NAMESPACES)));
                    }
                    rule[side] = json!({"services": svc});
                }
            }
        }
    }
    if r.chance(75) {
        spec.insert("types".into(), json!(types));
    }
    let mut meta = json!({"name": name});
    if !global {
        meta["namespace"] = json!(r.pick(NAMESPACES));
    }
    json!({"apiVersion": "projectcalico.org/v3", "kind": kind, "metadata": meta, "spec": spec})
}

/// A generated cluster as objects (valid ones only) plus the addresses
/// flows may use.
#[derive(Debug, Clone)]
pub struct Generated {
    /// Objects in dependency order (tiers before policies).
    pub objects: Vec<Object>,
    /// Addresses that belong to no pod (inside and outside the CIDRs).
    pub external: Vec<IpAddr>,
}

fn convert(v: &Value) -> Option<Object> {
    convert_document(v).ok()
}

fn pod(r: &mut Rng, ns_index: usize, i: usize, name: &str) -> Object {
    let ns = NAMESPACES[ns_index];
    let mut labels = BTreeMap::new();
    labels.insert("app".to_string(), r.pick(APPS).to_string());
    if r.chance(50) {
        labels.insert("tier".to_string(), r.pick(TIERS_LABEL).to_string());
    }
    let mut ips: Vec<IpAddr> = vec![format!("10.0.{ns_index}.{i}").parse().expect("ip")];
    if r.chance(40) {
        ips.push(format!("fd00::{ns_index}:{i}").parse().expect("ip"));
    }
    let mut ports = Vec::new();
    if r.chance(70) {
        // Different pods give "http" different numbers, as real clusters do.
        let port = *r.pick(&[80u16, 8080]);
        ports.push(DeclaredPort {
            name: "http".into(),
            port,
            protocol: Protocol::TCP,
        });
    }
    if r.chance(40) {
        ports.push(DeclaredPort {
            name: "dns".into(),
            port: 53,
            protocol: *r.pick(&[Protocol::UDP, Protocol::TCP]),
        });
    }
    let profiles = if r.chance(10) {
        Some(vec![r.pick(&["open", "closed", "missing"]).to_string()])
    } else {
        None
    };
    Object::Endpoint(Endpoint {
        key: EndpointKey::new(ns, name),
        labels,
        ips,
        ports,
        service_account: Some(r.pick(SERVICE_ACCOUNTS).to_string()),
        node: Some(format!("node-{}", r.below(2))),
        profiles,
        orchestrator: "k8s".into(),
        interface: None,
    })
}

/// A small cluster that uses every rule feature.
pub fn small_cluster(seed: u64) -> Generated {
    let mut r = Rng::new(seed);
    let mut objects = Vec::new();
    for (i, ns) in NAMESPACES.iter().enumerate() {
        let mut labels = BTreeMap::new();
        if r.chance(70) {
            labels.insert("team".to_string(), TEAMS[i % 2].to_string());
        }
        labels.insert("env".to_string(), r.pick(ENVS).to_string());
        labels.insert("kubernetes.io/metadata.name".to_string(), ns.to_string());
        objects.push(Object::Namespace(Namespace {
            name: ns.to_string(),
            labels,
        }));
        for sa in SERVICE_ACCOUNTS {
            let mut labels = BTreeMap::new();
            if r.chance(50) {
                labels.insert("level".to_string(), "high".to_string());
            }
            objects.push(Object::ServiceAccount(ServiceAccount {
                namespace: ns.to_string(),
                name: sa.to_string(),
                labels,
            }));
        }
    }
    if r.chance(50) {
        for (name, allow) in [("open", true), ("closed", false)] {
            objects.push(Object::Profile(Profile {
                name: name.into(),
                ingress: vec![Rule::any(if allow { Action::Allow } else { Action::Deny })],
                egress: if r.chance(50) {
                    vec![Rule::any(Action::Log), Rule::any(Action::Allow)]
                } else {
                    vec![]
                },
                labels_to_apply: BTreeMap::from([("profiled".to_string(), name.to_string())]),
            }));
        }
    }
    let mut tiers = vec!["default".to_string()];
    for t in 0..r.below(3) {
        let name = format!("t{t}");
        let mut spec = serde_json::Map::new();
        if r.chance(80) {
            spec.insert("order".into(), json!(r.below(4) as f64 * 100.0));
        }
        if r.chance(50) {
            spec.insert("defaultAction".into(), json!("Pass"));
        }
        if let Some(o) = convert(
            &json!({"apiVersion": "projectcalico.org/v3", "kind": "Tier",
                                         "metadata": {"name": name}, "spec": spec}),
        ) {
            objects.push(o);
            tiers.push(name);
        }
    }
    for i in 0..r.below(4) {
        let global = r.chance(50);
        let mut meta = json!({"name": format!("set{i}"),
                              "labels": {"net": r.pick(&["internal", "partner"])}});
        if !global {
            meta["namespace"] = json!(r.pick(NAMESPACES));
        }
        let v = json!({"apiVersion": "projectcalico.org/v3",
                       "kind": if global { "GlobalNetworkSet" } else { "NetworkSet" },
                       "metadata": meta,
                       "spec": {"nets": [r.pick(CIDRS), r.pick(CIDRS)]}});
        objects.extend(convert(&v));
    }
    for i in 0..r.below(4) {
        objects.push(endpoint_slice(&mut r, &format!("eps{i}")));
    }
    let n_pods = 3 + r.below(6);
    for i in 0..n_pods {
        let ns = r.below(NAMESPACES.len());
        objects.push(pod(&mut r, ns, i + 1, &format!("p{i}")));
    }
    for i in 0..2 + r.below(7) {
        let v = if r.chance(35) {
            let ns = *r.pick(NAMESPACES);
            k8s_policy(&mut r, &format!("k{i}"), ns)
        } else {
            calico_policy(&mut r, &format!("c{i}"), &tiers)
        };
        objects.extend(convert(&v));
    }
    Generated {
        objects,
        external: vec![
            "10.0.1.200".parse().expect("ip"),
            "10.0.5.5".parse().expect("ip"),
            "192.168.0.7".parse().expect("ip"),
            "172.16.0.1".parse().expect("ip"),
            "fd00::1:99".parse().expect("ip"),
            "2001:db8::1".parse().expect("ip"),
        ],
    }
}

/// Random flows to or from the cluster's endpoints: each flow comes with the
/// endpoint and direction whose policy decides it.
pub fn flows(
    r: &mut Rng,
    endpoints: &[Endpoint],
    external: &[IpAddr],
    n: usize,
) -> Vec<(EndpointKey, Direction, Flow)> {
    let mut out = Vec::new();
    if endpoints.is_empty() {
        return out;
    }
    for _ in 0..n {
        let ep = r.pick(endpoints);
        if ep.ips.is_empty() {
            continue;
        }
        let local = *r.pick(&ep.ips);
        let same_family: Vec<IpAddr> = endpoints
            .iter()
            .flat_map(|e| e.ips.iter().copied())
            .chain(external.iter().copied())
            .filter(|a| a.is_ipv4() == local.is_ipv4())
            .collect();
        let peer = *r.pick(&same_family);
        let dir = if r.chance(50) {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        let protocol = match r.below(6) {
            0 | 1 => Protocol::TCP,
            2 => Protocol::UDP,
            3 => Protocol::SCTP,
            4 => {
                if local.is_ipv4() {
                    Protocol::ICMP
                } else {
                    Protocol::ICMPV6
                }
            }
            _ => *r.pick(&[Protocol(253), Protocol(47), Protocol(136)]),
        };
        let port = |r: &mut Rng| *r.pick(&[53u16, 80, 443, 8080, 8050, 9090, 1, 1024, 1025, 40000]);
        let (sp, dp) = if protocol.has_ports() {
            (port(r), port(r))
        } else {
            (0, 0)
        };
        let icmp = protocol
            .is_icmp()
            .then(|| (*r.pick(&[0u8, 3, 8]), *r.pick(&[0u8, 1, 3])));
        let (src, dst) = match dir {
            Direction::Ingress => (peer, local),
            Direction::Egress => (local, peer),
        };
        out.push((
            ep.key.clone(),
            dir,
            Flow {
                src,
                dst,
                protocol,
                src_port: sp,
                dst_port: dp,
                icmp,
            },
        ));
    }
    out
}

/// A random change to a generated cluster: relabel, move, add or delete a
/// pod, change namespace labels, replace, add or delete a policy, network set
/// or tier. Some changes are invalid on purpose (a policy in a missing tier).
pub fn random_change(r: &mut Rng, current: &[Object], step: usize) -> Change {
    let pick_kind = |r: &mut Rng, pred: &dyn Fn(&Object) -> bool| -> Option<Object> {
        let matching: Vec<&Object> = current.iter().filter(|o| pred(o)).collect();
        (!matching.is_empty()).then(|| matching[r.below(matching.len())].clone())
    };
    match r.below(11) {
        10 => match pick_kind(r, &|o| matches!(o, Object::EndpointSlice(_))) {
            Some(o) if r.chance(40) => Change::Delete(o.object_ref()),
            _ => {
                let name = format!("eps{}", r.below(5));
                Change::Upsert(endpoint_slice(r, &name))
            }
        },
        0 | 1 => {
            if let Some(Object::Endpoint(mut e)) =
                pick_kind(r, &|o| matches!(o, Object::Endpoint(_)))
            {
                if r.chance(50) {
                    e.labels.insert("app".into(), r.pick(APPS).to_string());
                } else if r.chance(50) {
                    e.labels.remove("tier");
                } else {
                    e.labels
                        .insert("tier".into(), r.pick(TIERS_LABEL).to_string());
                }
                return Change::Upsert(Object::Endpoint(e));
            }
            Change::Upsert(pod(r, 0, 100 + step, &format!("n{step}")))
        }
        2 => {
            let ns = r.below(NAMESPACES.len());
            Change::Upsert(pod(r, ns, 100 + step, &format!("n{step}")))
        }
        3 => match pick_kind(r, &|o| matches!(o, Object::Endpoint(_))) {
            Some(o) => Change::Delete(o.object_ref()),
            None => Change::Upsert(pod(r, 1, 100 + step, &format!("n{step}"))),
        },
        4 => {
            let ns = r.pick(NAMESPACES);
            let mut labels = BTreeMap::new();
            if r.chance(50) {
                labels.insert("team".to_string(), r.pick(TEAMS).to_string());
            }
            labels.insert("env".to_string(), r.pick(ENVS).to_string());
            Change::Upsert(Object::Namespace(Namespace {
                name: ns.to_string(),
                labels,
            }))
        }
        5 | 6 => {
            let tiers: Vec<String> = current
                .iter()
                .filter_map(|o| match o {
                    Object::Tier(t) => Some(t.name.clone()),
                    _ => None,
                })
                .chain(std::iter::once("default".to_string()))
                .chain(r.chance(5).then(|| "missing".to_string()))
                .collect();
            let name = format!("c{}", r.below(8));
            let v = if r.chance(30) {
                let name = format!("k{}", r.below(8));
                k8s_policy(r, &name, "x")
            } else {
                calico_policy(r, &name, &tiers)
            };
            match convert(&v) {
                Some(o) => Change::Upsert(o),
                None => Change::Delete(ObjectRef::new("GlobalNetworkPolicy", None, "c0")),
            }
        }
        7 => match pick_kind(r, &|o| matches!(o, Object::Policy(_))) {
            Some(o) => Change::Delete(o.object_ref()),
            None => Change::Delete(ObjectRef::new("GlobalNetworkPolicy", None, "none")),
        },
        8 => {
            let global = r.chance(50);
            let mut meta = json!({"name": format!("set{}", r.below(4)),
                                  "labels": {"net": r.pick(&["internal", "partner"])}});
            if !global {
                meta["namespace"] = json!(r.pick(NAMESPACES));
            }
            let v = json!({"apiVersion": "projectcalico.org/v3",
                           "kind": if global { "GlobalNetworkSet" } else { "NetworkSet" },
                           "metadata": meta, "spec": {"nets": [r.pick(CIDRS)]}});
            match convert(&v) {
                Some(o) if r.chance(80) => Change::Upsert(o),
                Some(o) => Change::Delete(o.object_ref()),
                None => Change::Delete(ObjectRef::new("GlobalNetworkSet", None, "none")),
            }
        }
        _ => {
            let name = format!("t{}", r.below(3));
            let v = json!({"apiVersion": "projectcalico.org/v3", "kind": "Tier",
                           "metadata": {"name": name},
                           "spec": {"order": r.below(4) as f64 * 100.0,
                                    "defaultAction": r.pick(&["Deny", "Pass"])}});
            match convert(&v) {
                Some(o) => Change::Upsert(o),
                None => Change::Delete(ObjectRef::new("Tier", None, "none")),
            }
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The generated clusters exercise Calico `services` matches: policies
    /// naming Services, and EndpointSlices for them.
    #[test]
    fn small_clusters_carry_service_matches() {
        let (mut with_rules, mut with_slices) = (0, 0);
        for seed in 0..200 {
            let g = small_cluster(seed);
            with_slices += usize::from(
                g.objects
                    .iter()
                    .any(|o| matches!(o, Object::EndpointSlice(_))),
            );
            with_rules += usize::from(g.objects.iter().any(
                |o| matches!(o, Object::Policy(p) if policy_core::service_match::uses_services(p)),
            ));
        }
        assert!(
            with_rules > 20 && with_slices > 100,
            "{with_rules} {with_slices}"
        );
    }

    /// Tools that read files see exactly the cluster the benchmarks build.
    #[test]
    fn scale_manifests_load_as_the_scale_cluster() {
        let scale = Scale {
            pods: 260,
            policies: 60,
            pods_per_node: 100,
        };
        let docs = scale_manifests(scale, 3);
        let loaded: Vec<Object> = docs
            .iter()
            .map(|d| convert_document(d).unwrap_or_else(|e| panic!("{d}: {e}")))
            .collect();
        assert_eq!(loaded, scale_cluster(scale, 3));
    }
}
