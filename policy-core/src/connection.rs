//! Engines and connections: the [`Engine`] trait every decider implements
//! (the reference evaluator, the compiled programs, the BPF engines), the
//! peers of a connection, how a connection between two peers becomes a
//! [`Flow`], and how a whole connection is decided (client egress, then
//! server ingress).

use std::fmt;
use std::net::IpAddr;

use crate::cluster::Cluster;
use crate::flow::{Decision, Flow, FlowError, Verdict};
use crate::model::*;
use crate::net::{IpVersion, Protocol};

/// Something an engine could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The endpoint is not known.
    #[error("endpoint {0} does not exist")]
    UnknownEndpoint(EndpointKey),
    /// The endpoint is on another node: no programs are compiled for it.
    #[error("{0} is not on this node: no programs are compiled for it")]
    NotLocal(EndpointKey),
    /// The flow is malformed.
    #[error("invalid flow: {0}")]
    InvalidFlow(FlowError),
    /// The flow's address on the endpoint's side is not the endpoint's.
    #[error("invalid flow: {addr} is not an address of {endpoint}")]
    NotAnAddressOf {
        /// The endpoint.
        endpoint: EndpointKey,
        /// The address the flow gives it.
        addr: IpAddr,
    },
    /// The cluster given to the engine does not compile.
    #[error("{0}")]
    InvalidCluster(String),
    /// The cluster does not fit the engine's maps.
    #[error("{0}")]
    Capacity(String),
    /// The engine cannot run here (missing privileges, kernel features...).
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// The datapath failed (loading, a map, a test run).
    #[error("{0}")]
    Dataplane(String),
    /// The engine's own tables contradict each other (a bug, not bad input).
    #[error("{0}")]
    Inconsistent(String),
}

/// An engine answers: what does policy at `endpoint` decide for `flow` in
/// direction `direction` (ingress: the endpoint is the destination; egress:
/// the source)?
pub trait Engine {
    /// Short engine name.
    fn name(&self) -> &'static str;
    /// Evaluates one direction at one endpoint.
    fn decide(
        &self,
        endpoint: &EndpointKey,
        direction: Direction,
        flow: &Flow,
    ) -> Result<Decision, EngineError>;

    /// Evaluates a whole connection: the client's egress, then the server's
    /// ingress. Engines that send real traffic override this to observe the
    /// connection itself.
    fn connection(
        &self,
        cluster: &Cluster,
        from: &Peer,
        to: &Peer,
        flow: &Flow,
    ) -> Result<ProbeOutcome, EngineError> {
        decide_connection(self, cluster, from, to, flow)
    }
}

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

fn peer_addresses(cluster: &Cluster, peer: &Peer) -> Result<Vec<IpAddr>, ConnectionError> {
    match peer {
        Peer::Ip(ip) => Ok(vec![*ip]),
        Peer::Endpoint(k) => {
            let ep = cluster
                .endpoint(k)
                .ok_or_else(|| ConnectionError::UnknownPod(k.clone()))?;
            if ep.ips.is_empty() {
                return Err(ConnectionError::NoAddress(k.clone()));
            }
            Ok(ep.ips.clone())
        }
    }
}

fn pick(
    addrs: &[IpAddr],
    explicit: Option<&str>,
    version: Option<IpVersion>,
) -> Result<IpAddr, ConnectionError> {
    if let Some(s) = explicit {
        let ip: IpAddr = s
            .parse()
            .map_err(|_| ConnectionError::NotAnAddress(s.to_string()))?;
        return Ok(ip);
    }
    match version {
        None => Ok(addrs[0]),
        Some(v) => addrs
            .iter()
            .copied()
            .find(|a| IpVersion::of(a) == v)
            .ok_or(ConnectionError::NoAddressOfVersion(v)),
    }
}

/// Why a connection between two peers has no flow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionError {
    /// The pod is not in the cluster.
    #[error("pod {0} is not in the case")]
    UnknownPod(EndpointKey),
    /// The pod has no address to connect to or from.
    #[error("pod {0} has no IP address")]
    NoAddress(EndpointKey),
    /// An address given explicitly does not parse.
    #[error("{0:?} is not an IP address")]
    NotAnAddress(String),
    /// The peer has no address of that IP version.
    #[error("no {0} address")]
    NoAddressOfVersion(IpVersion),
    /// The client has no usable address to reach the server's.
    #[error("{from}: {reason} to reach {dst}")]
    Source {
        /// The client.
        from: Peer,
        /// The server's address.
        dst: IpAddr,
        /// Why none of the client's addresses fits.
        reason: Box<ConnectionError>,
    },
    /// A protocol with ports needs a destination port.
    #[error("protocol {0} needs a port")]
    NeedsPort(Protocol),
    /// The flow is malformed.
    #[error(transparent)]
    Flow(#[from] FlowError),
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
) -> Result<Flow, ConnectionError> {
    let to_addrs = peer_addresses(cluster, to)?;
    let dst = pick(&to_addrs, to_ip, spec.ip_version)?;
    let from_addrs = peer_addresses(cluster, from)?;
    let src = pick(&from_addrs, from_ip, Some(IpVersion::of(&dst))).map_err(|e| {
        ConnectionError::Source {
            from: from.clone(),
            dst,
            reason: Box::new(e),
        }
    })?;
    flow_for(src, dst, spec)
}

/// The flow of a connection between two chosen addresses: ports (the
/// default source port when `spec` gives none), or an ICMP echo request
/// when `spec` gives no type/code.
pub fn flow_for(src: IpAddr, dst: IpAddr, spec: ConnectionSpec) -> Result<Flow, ConnectionError> {
    let protocol = spec.protocol;
    let (src_port, dst_port, icmp) = if protocol.has_ports() {
        (
            spec.src_port.unwrap_or(DEFAULT_SOURCE_PORT),
            spec.dst_port.ok_or(ConnectionError::NeedsPort(protocol))?,
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
