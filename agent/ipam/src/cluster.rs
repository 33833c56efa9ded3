//! What IPAM reads from the cluster besides its own records: pools, nodes
//! and their labels, namespaces and their labels, IP reservations; and the
//! pool choice that depends only on them (Calico's `determinePools`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use policy_core::Selector;

use crate::error::IpamError;
use crate::pool::{Pool, Use};

/// Labels of a node or namespace.
pub type Labels = BTreeMap<String, String>;

/// The name of the virtual node load balancer addresses are affine to.
pub const LOAD_BALANCER_NODE: &str = "load-balancer";

/// The cluster as IPAM sees it (see the module documentation).
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    pools: Vec<Pool>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Labels>,
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Labels>,
    /// Addresses IPAM never hands out (IPReservation `reservedCIDRs`).
    pub reservations: Vec<IpNet>,
}

impl Cluster {
    /// An empty cluster.
    pub fn new() -> Cluster {
        Cluster::default()
    }

    /// Sets the pools, refusing overlapping ones; they are kept in name
    /// order, the order Calico tries them in.
    pub fn set_pools(&mut self, mut pools: Vec<Pool>) -> Result<(), IpamError> {
        crate::pool::check_overlaps(&pools).map_err(IpamError::InvalidPool)?;
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        self.pools = pools;
        Ok(())
    }

    /// Every pool, in name order.
    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// Enabled pools of a family (4 or 6), in name order.
    pub fn enabled_pools(&self, version: u8) -> Vec<&Pool> {
        self.pools
            .iter()
            .filter(|p| !p.disabled && family(&p.cidr) == version)
            .collect()
    }

    /// The enabled pool holding `ip`.
    pub fn enabled_pool_for(&self, ip: IpAddr) -> Option<&Pool> {
        self.pools.iter().find(|p| !p.disabled && p.contains(ip))
    }

    /// Any pool (enabled or not) holding `ip`.
    pub fn any_pool_for(&self, ip: IpAddr) -> Option<&Pool> {
        self.pools.iter().find(|p| p.contains(ip))
    }

    /// Whether a reservation covers `ip`.
    pub fn is_reserved(&self, ip: IpAddr) -> bool {
        self.reservations.iter().any(|r| r.contains(&ip))
    }

    /// Whether reservations cover every address of `block`.
    pub fn reserves_whole(&self, block: &IpNet) -> bool {
        self.reservations
            .iter()
            .any(|r| r.contains(&block.network()) && r.contains(&block.broadcast()))
    }

    /// The labels of node `host`; the load-balancer virtual node has none.
    pub fn node(&self, host: &str, usage: Use) -> Result<Labels, IpamError> {
        if usage == Use::LoadBalancer {
            return Ok(Labels::new());
        }
        self.nodes
            .get(host)
            .cloned()
            .ok_or_else(|| IpamError::NodeNotFound(host.to_string()))
    }

    /// Calico's `determinePools`: the pools a request may use and the
    /// enabled pools of the family. `max_prefix_len` is the longest block
    /// prefix that can hold the host reservations (bits of the family when
    /// there are none).
    pub fn determine_pools(
        &self,
        requested: &[IpNet],
        version: u8,
        node: &Labels,
        namespace: Option<&Labels>,
        max_prefix_len: u8,
    ) -> Result<(Vec<&Pool>, Vec<&Pool>), IpamError> {
        let enabled = self.enabled_pools(version);
        let qualified: Vec<&Pool> = enabled
            .iter()
            .copied()
            .filter(|p| p.block_size <= max_prefix_len)
            .collect();
        if qualified.is_empty() {
            return Err(IpamError::NoQualifiedPool(None));
        }
        let mut chosen = Vec::new();
        for r in requested {
            let cidr = r.trunc();
            match qualified.iter().find(|p| p.cidr == cidr) {
                Some(p) => chosen.push(*p),
                None => {
                    let why = match self.pools.iter().find(|p| p.cidr == cidr) {
                        None => crate::error::PoolProblem::NotFound,
                        Some(p) if p.disabled => crate::error::PoolProblem::Disabled,
                        Some(_) => crate::error::PoolProblem::Unqualified,
                    };
                    return Err(IpamError::RequestedPool { cidr, why });
                }
            }
        }
        if !chosen.is_empty() {
            return Ok((chosen, enabled));
        }
        // Selectors are only consulted without requested pools, and over
        // every enabled pool (not only those whose blocks fit reservations),
        // as Calico does.
        for p in &enabled {
            if p.manual {
                continue;
            }
            if !p.node_selector.matches(node) {
                continue;
            }
            if !selects_namespace(p.namespace_selector.as_ref(), namespace) {
                continue;
            }
            chosen.push(*p);
        }
        Ok((chosen, enabled))
    }
}

/// Whether a pool's namespace selector selects a namespace (no selector:
/// every namespace; no namespace, e.g. tunnel addresses: matched against no
/// labels).
pub fn selects_namespace(selector: Option<&Selector>, namespace: Option<&Labels>) -> bool {
    match selector {
        None => true,
        Some(s) => match namespace {
            Some(labels) => s.matches(labels),
            None => s.matches(&Labels::new()),
        },
    }
}

/// 4 or 6.
pub fn family(net: &IpNet) -> u8 {
    match net {
        IpNet::V4(_) => 4,
        IpNet::V6(_) => 6,
    }
}

/// 4 or 6.
pub fn ip_family(ip: &IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 4,
        IpAddr::V6(_) => 6,
    }
}
