//! The conformance case format (`conformance/README.md`): a cluster snapshot
//! plus connectivity probes with upstream's expected answers, and a runner
//! that checks any [`Engine`] against them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::Deserialize;

use crate::cluster::Cluster;
use crate::convert::{Object, check_labels, convert_document};
use crate::error::{Error, ErrorKind, ObjectRef};
use crate::flow::{Decision, Engine, EngineError, Flow, Verdict};
use crate::model::*;
use crate::net::{IpVersion, PortMatch, Protocol};

/// Source port used when a probe does not give one (an ephemeral port).
pub const DEFAULT_SOURCE_PORT: u16 = 45678;

/// One end of a probe.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A workload endpoint.
    Endpoint(EndpointKey),
    /// A bare address with no labels (outside the cluster).
    Ip(IpAddr),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Endpoint(k) => write!(f, "{k}"),
            Peer::Ip(ip) => write!(f, "ip:{ip}"),
        }
    }
}

impl std::str::FromStr for Peer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(ip) = s
            .strip_prefix("ip:")
            .or_else(|| s.strip_prefix("external:"))
        {
            return ip
                .parse()
                .map(Peer::Ip)
                .map_err(|_| format!("{ip:?} is not an IP address"));
        }
        s.parse().map(Peer::Endpoint)
    }
}

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
}

fn case_err(source: &str, field: String, msg: impl Into<String>) -> Error {
    Error::invalid(field, msg).on(ObjectRef::new("ConformanceCase", None, source))
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
        }));
    }
    for (i, p) in raw.policies.iter().enumerate() {
        objects.push(convert_document(p).map_err(|e| {
            let e = e.from_origin(crate::error::Origin::document(source, i + 1));
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
            build_probe(&cluster, i, p).map_err(|m| case_err(source, format!("probes[{i}]"), m))?,
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

fn peer_addresses(cluster: &Cluster, peer: &Peer) -> Result<Vec<IpAddr>, String> {
    match peer {
        Peer::Ip(ip) => Ok(vec![*ip]),
        Peer::Endpoint(k) => {
            let ep = cluster
                .endpoint(k)
                .ok_or_else(|| format!("pod {k} is not in the case"))?;
            if ep.ips.is_empty() {
                return Err(format!("pod {k} has no IP address"));
            }
            Ok(ep.ips.clone())
        }
    }
}

fn pick(
    addrs: &[IpAddr],
    explicit: Option<&str>,
    version: Option<IpVersion>,
) -> Result<IpAddr, String> {
    if let Some(s) = explicit {
        let ip: IpAddr = s
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address"))?;
        return Ok(ip);
    }
    match version {
        None => Ok(addrs[0]),
        Some(v) => addrs
            .iter()
            .copied()
            .find(|a| IpVersion::of(a) == v)
            .ok_or_else(|| format!("no {v} address")),
    }
}

/// What a connection carries beyond its two ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionSpec {
    /// Protocol.
    pub protocol: Protocol,
    /// Destination port (protocols with ports).
    pub dst_port: Option<u16>,
    /// Source port (default: an ephemeral port).
    pub src_port: Option<u16>,
    /// ICMP type and code (default: echo request).
    pub icmp: Option<(u8, u8)>,
    /// Restricts address selection to one IP version.
    pub ip_version: Option<IpVersion>,
}

/// Builds the flow of a connection between two peers: the destination's
/// address (of `ip_version` if given, or `to_ip`), and the source's address of
/// the same family (or `from_ip`).
pub fn flow_between(
    cluster: &Cluster,
    from: &Peer,
    to: &Peer,
    spec: ConnectionSpec,
    from_ip: Option<&str>,
    to_ip: Option<&str>,
) -> Result<Flow, String> {
    let to_addrs = peer_addresses(cluster, to)?;
    let dst = pick(&to_addrs, to_ip, spec.ip_version)?;
    let from_addrs = peer_addresses(cluster, from)?;
    let src = pick(&from_addrs, from_ip, Some(IpVersion::of(&dst)))
        .map_err(|m| format!("{from}: {m} to reach {dst}"))?;
    flow_for(src, dst, spec)
}

/// The flow of a connection between two chosen addresses: ports (the
/// default source port when `spec` gives none), or an ICMP echo request
/// when `spec` gives no type/code.
pub fn flow_for(src: IpAddr, dst: IpAddr, spec: ConnectionSpec) -> Result<Flow, String> {
    let protocol = spec.protocol;
    let (src_port, dst_port, icmp) = if protocol.has_ports() {
        (
            spec.src_port.unwrap_or(DEFAULT_SOURCE_PORT),
            spec.dst_port
                .ok_or_else(|| format!("protocol {protocol} needs a port"))?,
            None,
        )
    } else if protocol.is_icmp() || protocol == Protocol::ICMP {
        let echo = if IpVersion::of(&dst) == IpVersion::V4 {
            8
        } else {
            128
        };
        (0, 0, Some(spec.icmp.unwrap_or((echo, 0))))
    } else {
        (0, 0, None)
    };
    let flow = Flow {
        src,
        dst,
        protocol,
        src_port,
        dst_port,
        icmp,
    };
    flow.validate()?;
    Ok(flow)
}

fn build_probe(cluster: &Cluster, index: usize, p: &RawProbe) -> Result<Probe, String> {
    let from: Peer = p.from.parse()?;
    let to: Peer = p.to.parse()?;
    let protocol = match &p.protocol {
        serde_json::Value::String(s) => Protocol::parse(s)?,
        serde_json::Value::Number(n) => Protocol::from_number(n.as_i64().unwrap_or(0))?,
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
    )?;
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

/// Which endpoint enforces policy for a peer: a named pod, or the pod owning
/// the destination address. Bare source addresses are outside the cluster.
pub fn enforcing_endpoint(cluster: &Cluster, peer: &Peer, is_source: bool) -> Option<EndpointKey> {
    match peer {
        Peer::Endpoint(k) => Some(k.clone()),
        Peer::Ip(ip) if !is_source => cluster
            .endpoints()
            .find(|e| e.ips.contains(ip))
            .map(|e| e.key.clone()),
        Peer::Ip(_) => None,
    }
}

/// The answer to a probe with the decisions behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeOutcome {
    /// Whether the connection succeeds.
    pub allowed: bool,
    /// The client's egress decision, when the client is a pod.
    pub egress: Option<Decision>,
    /// The server's ingress decision, when the server is a pod.
    pub ingress: Option<Decision>,
}

/// Asks an engine about a connection (see [`Engine::connection`]).
pub fn evaluate_connection<E: Engine + ?Sized>(
    engine: &E,
    cluster: &Cluster,
    from: &Peer,
    to: &Peer,
    flow: &Flow,
) -> Result<ProbeOutcome, EngineError> {
    engine.connection(cluster, from, to, flow)
}

/// A connection from per-direction decisions: client egress, then server
/// ingress; both must allow.
pub fn decide_connection<E: Engine + ?Sized>(
    engine: &E,
    cluster: &Cluster,
    from: &Peer,
    to: &Peer,
    flow: &Flow,
) -> Result<ProbeOutcome, EngineError> {
    let egress = match enforcing_endpoint(cluster, from, true) {
        Some(k) => Some(engine.decide(&k, Direction::Egress, flow)?),
        None => None,
    };
    let ingress = match enforcing_endpoint(cluster, to, false) {
        Some(k) => Some(engine.decide(&k, Direction::Ingress, flow)?),
        None => None,
    };
    let ok = |d: &Option<Decision>| d.as_ref().is_none_or(|d| d.verdict == Verdict::Allow);
    Ok(ProbeOutcome {
        allowed: ok(&egress) && ok(&ingress),
        egress,
        ingress,
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
