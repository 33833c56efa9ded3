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

mod scale;
mod services;
pub use scale::*;
pub use services::*;

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
