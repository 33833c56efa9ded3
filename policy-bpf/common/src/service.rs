//! Service load balancing as map entries, and the first-packet decision
//! over them: which frontend a packet hit, DROP/REJECT, which backend
//! range it may go to and whether it is masqueraded. The kernel program
//! and the user-space `maps` engine run this same function over the same
//! entries (the maps behind [`ServiceMaps`]).

/// Address family codes.
pub const FAMILY_V4: u8 = 4;
/// IPv6.
pub const FAMILY_V6: u8 = 6;

/// Frontend kinds.
pub const FRONTEND_CLUSTER_IP: u8 = 0;
/// An external IP of the Service.
pub const FRONTEND_EXTERNAL_IP: u8 = 1;
/// A LoadBalancer ingress IP.
pub const FRONTEND_LOAD_BALANCER: u8 = 2;
/// A NodePort on one of the node's NodePort addresses.
pub const FRONTEND_NODE_PORT: u8 = 3;

/// Service flag: some endpoint is usable somewhere (else REJECT).
pub const SVC_HAS_ANY: u16 = 1;
/// `internalTrafficPolicy: Local`.
pub const SVC_INTERNAL_LOCAL: u16 = 2;
/// `externalTrafficPolicy: Local`.
pub const SVC_EXTERNAL_LOCAL: u16 = 4;
/// `loadBalancerSourceRanges` is set.
pub const SVC_SOURCE_RANGES: u16 = 8;

/// Address flag: a pod address (inside the cluster CIDRs).
pub const ADDR_POD: u32 = 1;
/// Address flag: one of this node's own addresses (loopback included).
pub const ADDR_NODE_LOCAL: u32 = 2;
/// Address flag: inside the service CIDRs.
pub const ADDR_SERVICE_CIDR: u32 = 4;
/// Address flag: an active ClusterIP.
pub const ADDR_CLUSTER_IP: u32 = 8;

/// Source-range flag: inside `loadBalancerSourceRanges`.
pub const RANGE_ALLOWED: u8 = 1;
/// Source-range flag: one of the Service's own LB IPs (hairpin via the LB).
pub const RANGE_LB_IP: u8 = 2;

/// Config flag: masquerade all ClusterIP traffic.
pub const CONFIG_MASQUERADE_ALL: u32 = 1;
/// Config flag: an IPv4 local-traffic detector (cluster CIDRs) exists.
pub const CONFIG_DETECTOR_V4: u32 = 2;
/// Config flag: an IPv6 local-traffic detector exists.
pub const CONFIG_DETECTOR_V6: u32 = 4;

/// Why a packet is dropped.
pub const DROP_SOURCE_RANGE: u8 = 1;
/// eTP=Local, no local endpoint.
pub const DROP_NO_LOCAL_ENDPOINT: u8 = 2;
/// iTP=Local, no local endpoint.
pub const DROP_NO_LOCAL_ENDPOINT_INTERNAL: u8 = 3;
/// Unallocated address in the service CIDRs.
pub const DROP_UNALLOCATED: u8 = 4;
/// Why a packet is rejected: no usable endpoint anywhere.
pub const REJECT_NO_ENDPOINTS: u8 = 1;
/// An active ClusterIP on a port or protocol the Service lacks.
pub const REJECT_UNKNOWN_PORT: u8 = 2;

/// A frontend: (address, port, protocol, family). IPv4 addresses fill the
/// first four bytes, the rest zero.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct FrontendKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub protocol: u8,
    pub family: u8,
}

/// What a frontend leads to.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FrontendValue {
    /// Index into the service array.
    pub service: u32,
    /// A `FRONTEND_*` kind.
    pub kind: u8,
    pub pad: [u8; 3],
}

/// One Service port: its backend ranges in the backend array.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ServiceValue {
    /// First Cluster-policy backend.
    pub cluster_first: u32,
    /// First Local-policy backend.
    pub local_first: u32,
    pub cluster_count: u16,
    pub local_count: u16,
    /// `SVC_*` flags.
    pub flags: u16,
    pub pad: u16,
    /// `sessionAffinity: ClientIP` timeout; 0 for none.
    pub affinity_seconds: u32,
}

/// One backend (endpoint address and port).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BackendValue {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u8,
    pub pad: u8,
}

/// The node's service configuration.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ServiceConfig {
    /// Primary IPv4 address (checked against source ranges for the node's own traffic).
    pub primary_v4: [u8; 16],
    /// Primary IPv6 address.
    pub primary_v6: [u8; 16],
    /// `CONFIG_*` flags.
    pub flags: u32,
    pub pad: u32,
}

/// A new connection's first packet, as the service lookup reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServicePacket {
    pub family: u8,
    pub source: [u8; 16],
    pub destination: [u8; 16],
    pub protocol: u8,
    pub port: u16,
}

/// The lookups the decision makes (maps in the kernel, tables in user space).
pub trait ServiceMaps {
    fn frontend(&self, key: &FrontendKey) -> Option<FrontendValue>;
    fn service(&self, index: u32) -> Option<ServiceValue>;
    fn config(&self) -> ServiceConfig;
    /// `ADDR_*` flags of an address (longest prefix, flags of covering prefixes included).
    fn address_flags(&self, family: u8, addr: &[u8; 16]) -> u32;
    /// `RANGE_*` flags of a source for a Service (longest prefix, as above).
    fn source_range(&self, service: u32, family: u8, addr: &[u8; 16]) -> u8;
}

/// The decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceAction {
    /// DNAT to a backend of `count` starting at `first`.
    Forward {
        service: u32,
        kind: u8,
        first: u32,
        count: u16,
        /// The traffic policy masquerades (hairpin comes on top, per backend).
        masquerade: bool,
        affinity_seconds: u32,
    },
    /// A `DROP_*` reason.
    Drop(u8),
    /// A `REJECT_*` reason.
    Reject(u8),
    /// Not service traffic.
    Pass,
}

/// Decides a connection's first packet.
pub fn service_decide<M: ServiceMaps>(p: &ServicePacket, maps: &M) -> ServiceAction {
    let key = FrontendKey {
        addr: p.destination,
        port: p.port,
        protocol: p.protocol,
        family: p.family,
    };
    let Some(fe) = maps.frontend(&key) else {
        let flags = maps.address_flags(p.family, &p.destination);
        if flags & ADDR_CLUSTER_IP != 0 {
            return ServiceAction::Reject(REJECT_UNKNOWN_PORT);
        }
        if flags & ADDR_SERVICE_CIDR != 0 {
            return ServiceAction::Drop(DROP_UNALLOCATED);
        }
        return ServiceAction::Pass;
    };
    let Some(svc) = maps.service(fe.service) else {
        return ServiceAction::Pass;
    };
    let config = maps.config();
    let source_flags = maps.address_flags(p.family, &p.source);
    let node_local = source_flags & ADDR_NODE_LOCAL != 0;
    if fe.kind == FRONTEND_LOAD_BALANCER && svc.flags & SVC_SOURCE_RANGES != 0 {
        // The node's own connections leave from its primary address.
        let checked = if node_local {
            if p.family == FAMILY_V4 {
                config.primary_v4
            } else {
                config.primary_v6
            }
        } else {
            p.source
        };
        let in_range = maps.source_range(fe.service, p.family, &checked) & RANGE_ALLOWED != 0;
        let from_lb = maps.source_range(fe.service, p.family, &p.source) & RANGE_LB_IP != 0;
        if !in_range && !from_lb {
            return ServiceAction::Drop(DROP_SOURCE_RANGE);
        }
    }
    if svc.flags & SVC_HAS_ANY == 0 {
        return ServiceAction::Reject(REJECT_NO_ENDPOINTS);
    }
    let detector = config.flags
        & if p.family == FAMILY_V4 {
            CONFIG_DETECTOR_V4
        } else {
            CONFIG_DETECTOR_V6
        }
        != 0;
    let pod = detector && source_flags & ADDR_POD != 0;
    let cluster = (svc.cluster_first, svc.cluster_count);
    let local = (svc.local_first, svc.local_count);
    let ((first, count), masquerade) = if fe.kind == FRONTEND_CLUSTER_IP {
        let masq = config.flags & CONFIG_MASQUERADE_ALL != 0 || (detector && !pod);
        if svc.flags & SVC_INTERNAL_LOCAL != 0 {
            if local.1 == 0 {
                return ServiceAction::Drop(DROP_NO_LOCAL_ENDPOINT_INTERNAL);
            }
            (local, masq)
        } else {
            (cluster, masq)
        }
    } else if svc.flags & SVC_EXTERNAL_LOCAL == 0 {
        (cluster, true)
    } else if pod && cluster.1 > 0 {
        // Pods short-circuit to every endpoint, unmasqueraded.
        (cluster, false)
    } else if node_local && cluster.1 > 0 {
        (cluster, true)
    } else {
        if local.1 == 0 {
            return ServiceAction::Drop(DROP_NO_LOCAL_ENDPOINT);
        }
        (local, false)
    };
    ServiceAction::Forward {
        service: fe.service,
        kind: fe.kind,
        first,
        count,
        masquerade,
        affinity_seconds: svc.affinity_seconds,
    }
}
