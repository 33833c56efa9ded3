//! What the service dataplane does with the first packet of a new
//! connection: the load-balancer source-range firewall, then DNAT to an
//! endpoint set chosen by the traffic policies, masquerading exactly where
//! kube-proxy's nftables proxier does; DROP and REJECT where it does.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use crate::objects::{PortName, Protocol};
use crate::table::{Backends, FrontendKind, ServiceTable};

/// The first packet of a connection, as the node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub source: IpAddr,
    pub destination: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Source outside `loadBalancerSourceRanges`.
    SourceRange,
    /// eTP=Local: external traffic, endpoints exist but none on this node.
    NoLocalEndpoint,
    /// iTP=Local: ClusterIP traffic, endpoints exist but none on this node.
    NoLocalEndpointInternal,
    /// An address in the service range that no Service holds.
    UnallocatedClusterIp,
}

/// Why a packet was refused (ICMP unreachable or TCP RST).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The Service has no usable endpoint anywhere.
    NoEndpoints,
    /// An active ClusterIP on a port or protocol its Service lacks.
    UnknownPort,
}

/// The service dataplane's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// DNAT to one of `backends`; `masquerade` is the traffic-policy
    /// masquerade (hairpin comes on top, per chosen backend).
    Forward {
        service: PortName,
        frontend: FrontendKind,
        backends: Vec<SocketAddr>,
        masquerade: bool,
        affinity_seconds: Option<u32>,
    },
    Drop(DropReason),
    Reject(RejectReason),
    /// Not service traffic: routed or delivered as usual.
    Pass,
}

impl Verdict {
    /// Whether the connection is source-NATed when `backend` is chosen:
    /// the policy's masquerade, or hairpin (a client reaching itself).
    pub fn masquerades_to(&self, source: IpAddr, backend: SocketAddr) -> bool {
        match self {
            Verdict::Forward { masquerade, .. } => *masquerade || backend.ip() == source,
            _ => false,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Forward {
                service,
                backends,
                masquerade,
                ..
            } => {
                let list: Vec<String> = backends.iter().map(SocketAddr::to_string).collect();
                write!(f, "DNAT {service} -> {}", list.join(", "))?;
                if *masquerade {
                    f.write_str(" (masquerade)")?;
                }
                Ok(())
            }
            Verdict::Drop(r) => write!(f, "DROP ({r:?})"),
            Verdict::Reject(r) => write!(f, "REJECT ({r:?})"),
            Verdict::Pass => f.write_str("pass"),
        }
    }
}

impl ServiceTable {
    /// Decides `packet`.
    pub fn decide(&self, packet: &Packet) -> Verdict {
        let key = (packet.destination, packet.protocol, packet.port);
        if let Some((kind, idx)) = self.frontends.get(&key) {
            return self.forward(packet, *kind, &self.services[*idx]);
        }
        if self.node_port_ips.contains(&packet.destination)
            && let Some(idx) = self.node_ports.get(&(packet.protocol, packet.port))
        {
            return self.forward(packet, FrontendKind::NodePort, &self.services[*idx]);
        }
        if self.cluster_ips.contains(&packet.destination) {
            return Verdict::Reject(RejectReason::UnknownPort);
        }
        if self
            .config
            .service_cidrs
            .iter()
            .any(|n| n.contains(&packet.destination))
        {
            return Verdict::Drop(DropReason::UnallocatedClusterIp);
        }
        Verdict::Pass
    }

    fn forward(&self, packet: &Packet, kind: FrontendKind, svc: &Backends) -> Verdict {
        let cfg = &self.config;
        let src = packet.source;
        if kind == FrontendKind::LoadBalancer && !svc.source_ranges.is_empty() {
            // A node's own connection leaves from its primary address; an
            // LB IP as source is a hairpin through the load balancer.
            let checked = if cfg.is_node_local(&src) {
                cfg.primary_ip().unwrap_or(src)
            } else {
                src
            };
            let allowed = svc.source_ranges.iter().any(|n| n.contains(&checked))
                || svc.load_balancer_ips.contains(&src);
            if !allowed {
                return Verdict::Drop(DropReason::SourceRange);
            }
        }
        if !svc.has_any {
            return Verdict::Reject(RejectReason::NoEndpoints);
        }
        let (backends, masquerade) = if kind == FrontendKind::ClusterIp {
            let masq = cfg.masquerade_all || (cfg.has_detector() && !cfg.is_pod(&src));
            if svc.internal_local {
                if svc.local.is_empty() {
                    return Verdict::Drop(DropReason::NoLocalEndpointInternal);
                }
                (&svc.local, masq)
            } else {
                (&svc.cluster, masq)
            }
        } else if !svc.external_local {
            (&svc.cluster, true)
        } else if cfg.has_detector() && cfg.is_pod(&src) && !svc.cluster.is_empty() {
            // Pods short-circuit to every endpoint, unmasqueraded (when
            // some traffic class uses Cluster endpoints at all).
            (&svc.cluster, false)
        } else if cfg.is_node_local(&src) && !svc.cluster.is_empty() {
            (&svc.cluster, true)
        } else {
            if svc.local.is_empty() {
                return Verdict::Drop(DropReason::NoLocalEndpoint);
            }
            (&svc.local, false)
        };
        Verdict::Forward {
            service: svc.name.clone(),
            frontend: kind,
            backends: backends.clone(),
            masquerade,
            affinity_seconds: svc.affinity_seconds,
        }
    }
}
