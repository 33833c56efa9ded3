//! v1 Services and discovery.k8s.io/v1 EndpointSlices as the proxy sees
//! them: API defaults applied, one [`ServicePort`] per Service port and IP
//! family, each with its endpoints resolved the way kube-proxy resolves
//! them (by port name and protocol, never by `targetPort`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;

use crate::error::ServiceError;

/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_SECONDS: u32 = 10_800;

/// Transport protocols a Service port may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses `TCP`, `UDP` or `SCTP` (absent means TCP, as the API defaults).
    pub fn parse(s: Option<&str>) -> Option<Protocol> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// IP family of a proxier (each family is proxied on its own, as upstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    pub fn holds(self, ip: &IpAddr) -> bool {
        Family::of(ip) == self
    }

    fn slice_type(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// `namespace/service:port`, kube-proxy's ServicePortName.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortName {
    pub namespace: String,
    pub service: String,
    pub port: String,
}

impl fmt::Display for PortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.namespace, self.service, self.port)
    }
}

/// One endpoint of one Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub node: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub zone_hints: BTreeSet<String>,
    pub node_hints: BTreeSet<String>,
}

impl Endpoint {
    /// Whether it runs on `node`.
    pub fn is_on(&self, node: &str) -> bool {
        self.node.as_deref() == Some(node)
    }
}

/// One port of one Service in one family, with everything the dataplane
/// needs to know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: PortName,
    pub protocol: Protocol,
    pub port: u16,
    pub cluster_ip: Option<IpAddr>,
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    /// LoadBalancer ingress IPs the proxy handles (`ipMode: Proxy` excluded).
    pub load_balancer_ips: Vec<IpAddr>,
    pub source_ranges: Vec<IpNet>,
    pub external_policy_local: bool,
    pub internal_policy_local: bool,
    /// `sessionAffinity: ClientIP` timeout, in seconds.
    pub affinity_seconds: Option<u32>,
    pub health_check_node_port: Option<u16>,
    pub endpoints: Vec<Endpoint>,
}

impl ServicePort {
    /// Reachable from outside the cluster (NodePort, LB or external IPs).
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.load_balancer_ips.is_empty()
            || !self.external_ips.is_empty()
    }

    /// Whether any traffic class uses Cluster-policy endpoints: iTP=Cluster,
    /// or any external address (even under eTP=Local, pod and node clients
    /// short-circuit to every endpoint).
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local || self.externally_accessible()
    }

    /// Whether any traffic class uses Local-policy endpoints.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local || (self.externally_accessible() && self.external_policy_local)
    }
}

/// Parses an address as kube-proxy does, accepting legacy leading zeros
/// in IPv4 octets (`172.30.0.041` is `172.30.0.41`).
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    let octets: Vec<u8> = s
        .split('.')
        .map(|o| {
            if o.is_empty() || o.len() > 3 || !o.bytes().all(|b| b.is_ascii_digit()) {
                None
            } else {
                o.parse::<u8>().ok()
            }
        })
        .collect::<Option<_>>()?;
    let [a, b, c, d] = octets.as_slice() else {
        return None;
    };
    Some(IpAddr::V4(Ipv4Addr::new(*a, *b, *c, *d)))
}

fn parse_net(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .ok()
        .or_else(|| parse_ip(s).map(IpNet::from))
}

/// Services and EndpointSlices, as received.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
}

impl Objects {
    /// Reads Kubernetes-wire-format documents; other kinds are ignored, a
    /// malformed Service or EndpointSlice is an error naming it and the field.
    pub fn from_documents<'a>(
        docs: impl IntoIterator<Item = &'a Value>,
    ) -> Result<Objects, ServiceError> {
        let mut out = Objects::default();
        for (i, doc) in docs.into_iter().enumerate() {
            let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
            let name = || {
                let m = &doc["metadata"];
                format!(
                    "{kind} {}/{}",
                    m["namespace"].as_str().unwrap_or("default"),
                    m["name"].as_str().unwrap_or(&format!("#{i}"))
                )
            };
            match kind {
                "Service" => out.services.push(typed(doc, name)?),
                "EndpointSlice" => out.slices.push(typed(doc, name)?),
                _ => {}
            }
        }
        Ok(out)
    }

    /// Every Service port of `family`, with its endpoints; headless and
    /// ExternalName Services are left out (nothing to load-balance).
    pub fn service_ports(&self, family: Family) -> Result<Vec<ServicePort>, ServiceError> {
        let mut slices: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
        for s in &self.slices {
            if s.address_type != family.slice_type() {
                continue;
            }
            let Some(svc) = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
            else {
                continue;
            };
            let ns = s
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            slices.entry((ns, svc.clone())).or_default().push(s);
        }
        let mut out = Vec::new();
        for svc in &self.services {
            let ns = svc
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let name = svc.metadata.name.clone().unwrap_or_default();
            let key = (ns.clone(), name.clone());
            let mine = slices.get(&key).map(Vec::as_slice).unwrap_or(&[]);
            out.extend(ports_of(svc, &ns, &name, family, mine)?);
        }
        Ok(out)
    }
}

fn typed<T: serde::de::DeserializeOwned>(
    doc: &Value,
    name: impl Fn() -> String,
) -> Result<T, ServiceError> {
    serde_path_to_error::deserialize(doc).map_err(|e| ServiceError::Invalid {
        object: name(),
        field: e.path().to_string(),
        reason: e.inner().to_string(),
    })
}

fn ports_of(
    svc: &Service,
    ns: &str,
    name: &str,
    family: Family,
    slices: &[&EndpointSlice],
) -> Result<Vec<ServicePort>, ServiceError> {
    let object = format!("Service {ns}/{name}");
    let invalid = |field: &str, reason: String| ServiceError::Invalid {
        object: object.clone(),
        field: field.to_string(),
        reason,
    };
    let Some(spec) = &svc.spec else {
        return Ok(Vec::new());
    };
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if kind == "ExternalName" {
        return Ok(Vec::new());
    }
    // clusterIPs when given, else clusterIP; "None" is headless.
    let candidates: Vec<&String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    if candidates.iter().any(|c| c.as_str() == "None") {
        return Ok(Vec::new());
    }
    let mut cluster_ip = None;
    for (i, c) in candidates.iter().enumerate() {
        if c.is_empty() {
            continue;
        }
        let ip = parse_ip(c).ok_or_else(|| {
            invalid(
                &format!("spec.clusterIPs[{i}]"),
                format!("{c:?} is not an IP address"),
            )
        })?;
        if family.holds(&ip) && cluster_ip.is_none() {
            cluster_ip = Some(ip);
        }
    }
    // A Service without a ClusterIP of this family is not this family's
    // (kube-proxy runs one proxier per family).
    if cluster_ip.is_none() {
        return Ok(Vec::new());
    }
    let mut external_ips = Vec::new();
    for (i, e) in spec.external_ips.iter().flatten().enumerate() {
        let ip = parse_ip(e).ok_or_else(|| {
            invalid(
                &format!("spec.externalIPs[{i}]"),
                format!("{e:?} is not an IP address"),
            )
        })?;
        if family.holds(&ip) {
            external_ips.push(ip);
        }
    }
    let mut load_balancer_ips = Vec::new();
    if kind == "LoadBalancer" {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            let Some(raw) = ing.ip.as_deref() else {
                continue;
            };
            let ip = parse_ip(raw).ok_or_else(|| {
                invalid(
                    &format!("status.loadBalancer.ingress[{i}].ip"),
                    format!("{raw:?} is not an IP address"),
                )
            })?;
            if family.holds(&ip) {
                load_balancer_ips.push(ip);
            }
        }
    }
    let mut source_ranges = Vec::new();
    for (i, r) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        let net = parse_net(r).ok_or_else(|| {
            invalid(
                &format!("spec.loadBalancerSourceRanges[{i}]"),
                format!("{r:?} is not a CIDR"),
            )
        })?;
        if family.holds(&net.addr()) {
            source_ranges.push(net.trunc());
        }
    }
    let policy = |v: &Option<String>, field: &str| match v.as_deref() {
        None | Some("Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(other) => Err(invalid(
            field,
            format!("{other:?}: expected Cluster or Local"),
        )),
    };
    let external_accessible_kind =
        matches!(kind, "NodePort" | "LoadBalancer") || !external_ips.is_empty();
    let external_policy_local =
        policy(&spec.external_traffic_policy, "spec.externalTrafficPolicy")?
            && external_accessible_kind;
    let internal_policy_local =
        policy(&spec.internal_traffic_policy, "spec.internalTrafficPolicy")?;
    let affinity_seconds = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => Some(
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .map(|t| t.clamp(1, 86_400) as u32)
                .unwrap_or(DEFAULT_AFFINITY_SECONDS),
        ),
        Some(other) => {
            return Err(invalid(
                "spec.sessionAffinity",
                format!("{other:?}: expected None or ClientIP"),
            ));
        }
    };
    let health_check_node_port = if kind == "LoadBalancer" && external_policy_local {
        spec.health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
    } else {
        None
    };

    let mut out = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let protocol = Protocol::parse(p.protocol.as_deref()).ok_or_else(|| {
            invalid(
                &format!("spec.ports[{i}].protocol"),
                format!(
                    "{:?}: expected TCP, UDP or SCTP",
                    p.protocol.as_deref().unwrap_or("")
                ),
            )
        })?;
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                invalid(
                    &format!("spec.ports[{i}].port"),
                    format!("{} is not a port", p.port),
                )
            })?;
        let node_port = if matches!(kind, "NodePort" | "LoadBalancer") {
            p.node_port
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0)
        } else {
            None
        };
        let port_name = p.name.clone().unwrap_or_default();
        let endpoints = endpoints_for(&port_name, protocol, family, slices);
        out.push(ServicePort {
            name: PortName {
                namespace: ns.to_string(),
                service: name.to_string(),
                port: port_name,
            },
            protocol,
            port,
            cluster_ip,
            node_port,
            external_ips: external_ips.clone(),
            load_balancer_ips: load_balancer_ips.clone(),
            source_ranges: source_ranges.clone(),
            external_policy_local,
            internal_policy_local,
            affinity_seconds,
            health_check_node_port,
            endpoints,
        });
    }
    Ok(out)
}

/// The endpoints of one Service port: every slice port with the same name
/// and protocol, each address once (the first slice listing it wins).
fn endpoints_for(
    port_name: &str,
    protocol: Protocol,
    family: Family,
    slices: &[&EndpointSlice],
) -> Vec<Endpoint> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for s in slices {
        let Some(port) = s.ports.iter().flatten().find_map(|p| {
            let same_name = p.name.as_deref().unwrap_or("") == port_name;
            let same_proto = Protocol::parse(p.protocol.as_deref()) == Some(protocol);
            (same_name && same_proto)
                .then_some(p.port)
                .flatten()
                .and_then(|n| u16::try_from(n).ok())
        }) else {
            continue;
        };
        for ep in &s.endpoints {
            let c = ep.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let hints = ep.hints.as_ref();
            let zone_hints = hints
                .and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|z| z.name.clone())
                .collect();
            let node_hints = hints
                .and_then(|h| h.for_nodes.as_ref())
                .into_iter()
                .flatten()
                .map(|n| n.name.clone())
                .collect();
            // Only the first address of an endpoint is used, as upstream.
            let Some(ip) = ep.addresses.first().and_then(|a| parse_ip(a)) else {
                continue;
            };
            if !family.holds(&ip) {
                continue;
            }
            let addr = SocketAddr::new(ip, port);
            if !seen.insert(addr) {
                continue;
            }
            out.push(Endpoint {
                addr,
                node: ep.node_name.clone(),
                ready,
                serving,
                terminating,
                zone_hints,
                node_hints,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn legacy_leading_zeros_parse() {
        assert_eq!(
            parse_ip("172.30.0.041"),
            Some("172.30.0.41".parse().unwrap())
        );
        assert_eq!(parse_ip(" 10.0.0.1"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(parse_ip("1.2.3"), None);
        assert_eq!(parse_ip("1.2.3.256"), None);
    }

    #[test]
    fn endpoint_port_comes_from_the_slice_not_target_port() {
        let docs = [
            json!({"kind": "Service", "metadata": {"name": "s", "namespace": "n"},
                   "spec": {"clusterIP": "172.30.0.1", "ports": [{"name": "https", "port": 443, "targetPort": 1}]}}),
            json!({"kind": "EndpointSlice", "metadata": {"name": "s-1", "namespace": "n",
                   "labels": {"kubernetes.io/service-name": "s"}}, "addressType": "IPv4",
                   "endpoints": [{"addresses": ["10.0.0.1"]}], "ports": [{"name": "https", "port": 8443}]}),
        ];
        let objs = Objects::from_documents(&docs).unwrap();
        let ports = objs.service_ports(Family::V4).unwrap();
        assert_eq!(ports[0].endpoints[0].addr, "10.0.0.1:8443".parse().unwrap());
        assert!(ports[0].endpoints[0].ready);
    }

    #[test]
    fn bad_field_is_named() {
        let docs = [
            json!({"kind": "Service", "metadata": {"name": "s", "namespace": "n"},
                           "spec": {"clusterIP": "nope", "ports": [{"port": 80}]}}),
        ];
        let objs = Objects::from_documents(&docs).unwrap();
        let err = objs.service_ports(Family::V4).unwrap_err().to_string();
        assert!(
            err.contains("Service n/s") && err.contains("clusterIPs[0]"),
            "{err}"
        );
    }
}
