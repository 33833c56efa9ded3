//! The conformance case format (`conformance/README.md`): a cluster snapshot
//! plus connectivity probes with upstream's expected answers, and a runner
//! that checks any [`Engine`] against them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::Deserialize;

use policy_core::cluster::Cluster;
use policy_core::connection::{
    ConnectionSpec, Peer, ProbeOutcome, evaluate_connection, flow_between,
};
use policy_core::connection::{Engine, EngineError};
use policy_core::convert::{Object, check_labels, convert_document};
use policy_core::error::{Error, ErrorKind, ObjectRef};
use policy_core::flow::Flow;
use policy_core::model::*;
use policy_core::net::{IpVersion, PortMatch, Protocol};

/// A connectivity question with its expected answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// Position in the case's probe list.
    pub index: usize,
    /// Client.
    pub from: Peer,
    /// Server.
    pub to: Peer,
    /// The connection's first packet.
    pub flow: Flow,
    /// Upstream's expectation.
    pub allowed: bool,
    /// Why the probe is not run, if it is not.
    pub skip: Option<String>,
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{} {} -> {} ({})",
            self.index, self.from, self.to, self.flow
        )
    }
}

/// A parsed conformance case.
#[derive(Debug, Clone)]
pub struct Case {
    /// Case id (file stem when the case has none).
    pub id: String,
    /// Upstream test it was transcribed from.
    pub source: String,
    /// The cluster snapshot.
    pub cluster: Cluster,
    /// Probes.
    pub probes: Vec<Probe>,
    /// Features the case needs.
    pub requires: Vec<String>,
}

#[derive(Deserialize)]
struct RawPort {
    #[serde(default)]
    name: Option<String>,
    port: i64,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPod {
    namespace: String,
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    ip: Option<String>,
    #[serde(default)]
    ips: Option<Vec<String>>,
    #[serde(default)]
    container_ports: Vec<RawPort>,
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    profiles: Option<Vec<String>>,
    #[serde(default)]
    host_network: bool,
}

#[derive(Deserialize)]
struct RawNamespace {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RawNode {
    name: String,
    #[serde(default)]
    ip: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RawServiceAccount {
    namespace: String,
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawProbe {
    from: String,
    to: String,
    #[serde(default)]
    port: Option<i64>,
    #[serde(default)]
    src_port: Option<i64>,
    protocol: serde_json::Value,
    allowed: bool,
    #[serde(default)]
    icmp_type: Option<i64>,
    #[serde(default)]
    icmp_code: Option<i64>,
    #[serde(default, rename = "from_ip")]
    from_ip: Option<String>,
    #[serde(default, rename = "to_ip")]
    to_ip: Option<String>,
    #[serde(default)]
    ip_version: Option<i64>,
    #[serde(default, rename = "loopback_ignored_upstream")]
    loopback_ignored_upstream: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawCase {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    source: String,
    #[serde(default)]
    namespaces: BTreeMap<String, RawNamespace>,
    #[serde(default)]
    pods: Vec<RawPod>,
    #[serde(default)]
    policies: Vec<serde_json::Value>,
    #[serde(default)]
    probes: Vec<RawProbe>,
    #[serde(default)]
    requires: Vec<String>,
    #[serde(default)]
    service_accounts: Vec<RawServiceAccount>,
    /// Nodes (admin policies' node peers select their addresses).
    #[serde(default)]
    nodes: Vec<RawNode>,
    /// EndpointSlices (`calico-services` cases): the EndpointSlice body
    /// with `namespace`, `name` and `labels` beside it instead of metadata.
    #[serde(default)]
    endpoint_slices: Vec<serde_json::Value>,
    /// Services with selectors: their EndpointSlices are derived from the
    /// pods, as Kubernetes' EndpointSlice controller derives them.
    #[serde(default)]
    services: Vec<RawService>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawService {
    namespace: String,
    name: String,
    #[serde(default)]
    selector: Option<BTreeMap<String, String>>,
    #[serde(default)]
    ports: Vec<RawServicePort>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawServicePort {
    #[serde(default)]
    name: Option<String>,
    port: i64,
    #[serde(default)]
    target_port: Option<serde_json::Value>,
    #[serde(default)]
    protocol: Option<String>,
}

/// The EndpointSlices Kubernetes' controller makes for a selector Service:
/// every selected pod, one slice per distinct resolution of the target
/// ports (a named targetPort may resolve differently per pod).
fn derived_slices(svc: &RawService, pods: &[Endpoint]) -> Result<Vec<EndpointSlice>, String> {
    let Some(selector) = &svc.selector else {
        return Ok(Vec::new());
    };
    let mut groups: BTreeMap<Vec<SlicePort>, Vec<IpAddr>> = BTreeMap::new();
    for pod in pods.iter().filter(|p| {
        p.key.namespace == svc.namespace && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
    }) {
        let mut ports = Vec::new();
        for (i, sp) in svc.ports.iter().enumerate() {
            let protocol = Protocol::parse(sp.protocol.as_deref().unwrap_or("TCP"))
                .map_err(|m| format!("services.{}.ports[{i}].protocol: {m}", svc.name))?;
            let number = match &sp.target_port {
                None => Some(sp.port),
                Some(serde_json::Value::Number(n)) => n.as_i64(),
                Some(serde_json::Value::String(name)) => pod
                    .ports
                    .iter()
                    .find(|d| &d.name == name && d.protocol == protocol)
                    .map(|d| i64::from(d.port)),
                Some(other) => {
                    return Err(format!(
                        "services.{}.ports[{i}].targetPort: {other}",
                        svc.name
                    ));
                }
            };
            // A named port the pod lacks: the controller leaves the pod out.
            let Some(port) = number.and_then(|n| u16::try_from(n).ok()) else {
                continue;
            };
            ports.push(SlicePort {
                name: sp.name.clone().unwrap_or_default(),
                protocol,
                port,
            });
        }
        groups
            .entry(ports)
            .or_default()
            .extend(pod.ips.iter().copied());
    }
    Ok(groups
        .into_iter()
        .enumerate()
        .map(|(i, (ports, addresses))| EndpointSlice {
            namespace: svc.namespace.clone(),
            name: format!("{}-derived-{i}", svc.name),
            service: Some(svc.name.clone()),
            addresses,
            ports,
        })
        .collect())
}

fn case_err(source: &str, field: String, msg: impl std::fmt::Display) -> Error {
    Error::invalid(field, msg.to_string()).on(ObjectRef::new("ConformanceCase", None, source))
}

/// Parses a case file. `source` names it in errors and is the id fallback.
pub fn parse_case(source: &str, text: &str) -> Result<Case, Error> {
    let raw: RawCase = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(
        text,
    ))
    .map_err(|e| {
        let path = e.path().to_string();
        Error::new(ErrorKind::Syntax {
            format: "JSON",
            message: e.into_inner().to_string(),
        })
        .at(path)
        .on(ObjectRef::new("ConformanceCase", None, source))
    })?;

    let mut objects: Vec<Object> = Vec::new();
    for (name, ns) in &raw.namespaces {
        let mut labels = check_labels(&ns.labels, &format!("namespaces.{name}.labels"))
            .map_err(|e| e.on(ObjectRef::new("Namespace", None, name.clone())))?;
        labels
            .entry("kubernetes.io/metadata.name".into())
            .or_insert_with(|| name.clone());
        objects.push(Object::Namespace(Namespace {
            name: name.clone(),
            labels,
        }));
    }
    for (i, sa) in raw.service_accounts.iter().enumerate() {
        objects.push(Object::ServiceAccount(ServiceAccount {
            namespace: sa.namespace.clone(),
            name: sa.name.clone(),
            labels: check_labels(&sa.labels, &format!("serviceAccounts[{i}].labels"))?,
        }));
    }
    for (i, node) in raw.nodes.iter().enumerate() {
        let field = |f: &str| format!("nodes[{i}].{f}");
        let ips = match &node.ip {
            None => Vec::new(),
            Some(s) => vec![s.parse::<IpAddr>().map_err(|_| {
                case_err(source, field("ip"), format!("{s:?} is not an IP address"))
            })?],
        };
        objects.push(Object::Node(Node {
            name: node.name.clone(),
            labels: check_labels(&node.labels, &field("labels"))?,
            ips,
        }));
    }
    // Host-networked pods are not workload endpoints: a probe to or from
    // one is a probe to or from its node's address.
    let host_network: Vec<String> = raw
        .pods
        .iter()
        .filter(|p| p.host_network)
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    for (i, pod) in raw.pods.iter().enumerate() {
        if pod.host_network {
            // Host-networked pods are not workload endpoints; policy does not apply to them.
            continue;
        }
        let field = |f: &str| format!("pods[{i}].{f}");
        let mut ips = Vec::new();
        for s in pod.ips.iter().flatten().chain(pod.ip.iter()) {
            let ip: IpAddr = s.parse().map_err(|_| {
                case_err(source, field("ip"), format!("{s:?} is not an IP address"))
            })?;
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        let mut ports = Vec::new();
        for (j, p) in pod.container_ports.iter().enumerate() {
            let protocol =
                Protocol::parse(p.protocol.as_deref().unwrap_or("TCP")).map_err(|m| {
                    case_err(source, field(&format!("containerPorts[{j}].protocol")), m)
                })?;
            let PortMatch::Range { first, .. } = PortMatch::number(p.port)
                .map_err(|m| case_err(source, field(&format!("containerPorts[{j}].port")), m))?
            else {
                unreachable!("numeric port")
            };
            ports.push(DeclaredPort {
                name: p.name.clone().unwrap_or_default(),
                port: first,
                protocol,
            });
        }
        objects.push(Object::Endpoint(Endpoint {
            key: EndpointKey::new(pod.namespace.clone(), pod.name.clone()),
            labels: check_labels(&pod.labels, &field("labels"))?,
            ips,
            ports,
            service_account: pod.service_account.clone(),
            node: pod.node_name.clone(),
            profiles: pod.profiles.clone(),
            orchestrator: "k8s".into(),
            interface: None,
        }));
    }
    let pods: Vec<Endpoint> = objects
        .iter()
        .filter_map(|o| match o {
            Object::Endpoint(e) => Some(e.clone()),
            _ => None,
        })
        .collect();
    for svc in &raw.services {
        for slice in
            derived_slices(svc, &pods).map_err(|m| case_err(source, "services".into(), m))?
        {
            objects.push(Object::EndpointSlice(slice));
        }
    }
    for (i, raw_slice) in raw.endpoint_slices.iter().enumerate() {
        let mut doc = raw_slice.clone();
        if let Some(obj) = doc.as_object_mut() {
            let mut meta = serde_json::Map::new();
            for key in ["namespace", "name", "labels"] {
                if let Some(v) = obj.remove(key) {
                    meta.insert(key.into(), v);
                }
            }
            obj.insert("metadata".into(), serde_json::Value::Object(meta));
            obj.insert("apiVersion".into(), "discovery.k8s.io/v1".into());
            obj.insert("kind".into(), "EndpointSlice".into());
        }
        objects.push(
            convert_document(&doc)
                .map_err(|e| case_err(source, format!("endpointSlices[{i}]"), e))?,
        );
    }
    for (i, p) in raw.policies.iter().enumerate() {
        objects.push(convert_document(p).map_err(|e| {
            let e = e.from_origin(policy_core::error::Origin::document(source, i + 1));
            let field = format!(
                "policies[{i}]{}",
                e.field
                    .as_deref()
                    .map(|f| format!(".{f}"))
                    .unwrap_or_default()
            );
            e.with_field(Some(field))
        })?);
    }
    let cluster = Cluster::from_objects(objects)?;

    let mut probes = Vec::new();
    for (i, p) in raw.probes.iter().enumerate() {
        probes.push(
            build_probe(&cluster, i, p, &host_network)
                .map_err(|m| case_err(source, format!("probes[{i}]"), m))?,
        );
    }
    Ok(Case {
        id: raw.id.unwrap_or_else(|| source.to_string()),
        source: raw.source,
        cluster,
        probes,
        requires: raw.requires,
    })
}

fn build_probe(
    cluster: &Cluster,
    index: usize,
    p: &RawProbe,
    host_network: &[String],
) -> Result<Probe, String> {
    let peer = |name: &str, ip: Option<&str>| -> Result<Peer, String> {
        if host_network.iter().any(|h| h == name) {
            let ip = ip.ok_or_else(|| {
                format!(
                    "{name} is host-networked: the probe needs its node address (from_ip/to_ip)"
                )
            })?;
            return ip
                .parse()
                .map(Peer::Ip)
                .map_err(|_| format!("{ip:?} is not an IP address"));
        }
        name.parse()
    };
    let from = peer(&p.from, p.from_ip.as_deref())?;
    let to = peer(&p.to, p.to_ip.as_deref())?;
    let protocol = match &p.protocol {
        serde_json::Value::String(s) => Protocol::parse(s).map_err(|e| e.to_string())?,
        serde_json::Value::Number(n) => {
            Protocol::from_number(n.as_i64().unwrap_or(0)).map_err(|e| e.to_string())?
        }
        other => return Err(format!("protocol {other} is neither a name nor a number")),
    };
    let ip_version = match p.ip_version {
        None => None,
        Some(4) => Some(IpVersion::V4),
        Some(6) => Some(IpVersion::V6),
        Some(v) => return Err(format!("ipVersion {v} is not 4 or 6")),
    };
    let port = |v: Option<i64>, what: &str| -> Result<Option<u16>, String> {
        match v {
            None => Ok(None),
            Some(n) if (0..=65535).contains(&n) => Ok(Some(n as u16)),
            Some(n) => Err(format!("{what} {n} is out of range")),
        }
    };
    let icmp = match (p.icmp_type, p.icmp_code) {
        (None, None) => None,
        (t, c) => {
            let t = t.unwrap_or(0);
            let c = c.unwrap_or(0);
            if !(0..=255).contains(&t) || !(0..=255).contains(&c) {
                return Err(format!("ICMP type/code {t}/{c} out of range"));
            }
            Some((t as u8, c as u8))
        }
    };
    let spec = ConnectionSpec {
        protocol,
        dst_port: if protocol.has_ports() {
            port(p.port, "port")?
        } else {
            None
        },
        src_port: if protocol.has_ports() {
            port(p.src_port, "srcPort")?
        } else {
            None
        },
        icmp,
        ip_version,
    };
    let flow = flow_between(
        cluster,
        &from,
        &to,
        spec,
        p.from_ip.as_deref(),
        p.to_ip.as_deref(),
    )
    .map_err(|e| e.to_string())?;
    Ok(Probe {
        index,
        from,
        to,
        flow,
        allowed: p.allowed,
        skip: p
            .loopback_ignored_upstream
            .then(|| "pod-to-itself probe; upstream does not check it".to_string()),
    })
}

/// How one probe fared.
#[derive(Debug, Clone, PartialEq)]
pub enum ProbeStatus {
    /// The engine agreed with upstream.
    Passed,
    /// The engine disagreed, or failed.
    Failed(String),
    /// Not run, with the reason.
    Skipped(String),
}

/// The result of one probe.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeResult {
    /// The probe.
    pub probe: Probe,
    /// Its status.
    pub status: ProbeStatus,
}

/// Runs every probe of a case through an engine.
pub fn run_case<E: Engine + ?Sized>(engine: &E, case: &Case) -> Vec<ProbeResult> {
    case.probes
        .iter()
        .map(|probe| {
            let status = if let Some(why) = &probe.skip {
                ProbeStatus::Skipped(why.clone())
            } else {
                match evaluate_connection(
                    engine,
                    &case.cluster,
                    &probe.from,
                    &probe.to,
                    &probe.flow,
                ) {
                    Ok(o) if o.allowed == probe.allowed => ProbeStatus::Passed,
                    Ok(o) => ProbeStatus::Failed(describe_mismatch(probe, &o)),
                    Err(EngineError::Unavailable(why)) => ProbeStatus::Skipped(why),
                    Err(e) => ProbeStatus::Failed(format!("engine error: {e}")),
                }
            };
            ProbeResult {
                probe: probe.clone(),
                status,
            }
        })
        .collect()
}

/// A one-line explanation of a disagreement.
pub fn describe_mismatch(probe: &Probe, o: &ProbeOutcome) -> String {
    let mut s = format!(
        "expected {}, got {}",
        if probe.allowed { "allowed" } else { "denied" },
        if o.allowed { "allowed" } else { "denied" }
    );
    if let Some(d) = &o.egress {
        s.push_str(&format!("; egress at {}: {d}", probe.from));
    }
    if let Some(d) = &o.ingress {
        s.push_str(&format!("; ingress at {}: {d}", probe.to));
    }
    s
}
