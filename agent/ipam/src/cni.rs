//! The address half of a CNI ADD and DEL, as Calico's `calico-ipam` plugin
//! and the Kubernetes path of its `calico` plugin do it: which pools
//! (network config, namespace and pod annotations), explicit addresses
//! (`CNI_ARGS` `IP=`, the `ipAddrs` and `ipAddrsNoIpam` annotations), the
//! handle (`<network>.<container>`), and the result (one address per
//! family, each with its block's prefix, one default route each).

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;

use crate::assign::{AssignIpArgs, AutoAssignArgs};
use crate::cluster::{Labels, family};
use crate::error::IpamError;
use crate::gc;
use crate::ipam::Ipam;
use crate::pool::Use;

/// Annotation: IPv4 pools (JSON list of CIDRs or pool names).
pub const IPV4_POOLS: &str = "cni.projectcalico.org/ipv4pools";
/// Annotation: IPv6 pools.
pub const IPV6_POOLS: &str = "cni.projectcalico.org/ipv6pools";
/// Annotation: addresses to assign through IPAM.
pub const IP_ADDRS: &str = "cni.projectcalico.org/ipAddrs";
/// Annotation: addresses to use without IPAM.
pub const IP_ADDRS_NO_IPAM: &str = "cni.projectcalico.org/ipAddrsNoIpam";

/// The pod an ADD is for (Kubernetes path).
#[derive(Debug, Clone, Default)]
pub struct PodInfo {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The namespace's annotations.
    pub namespace_annotations: Labels,
    /// The pod's annotations.
    pub annotations: Labels,
}

/// A CNI call's IPAM inputs.
#[derive(Debug, Clone)]
pub struct CniRequest<'a> {
    /// The network configuration.
    pub netconf: &'a Value,
    /// `CNI_CONTAINERID`.
    pub container_id: &'a str,
    /// `CNI_ARGS` `IP=`, if given.
    pub ip: Option<IpAddr>,
    /// The pod, on the Kubernetes path (`policy.type: k8s`).
    pub pod: Option<PodInfo>,
    /// This node's name when the config does not say.
    pub local_host: &'a str,
    /// The `calico` plugin outside Kubernetes: a container whose endpoint
    /// exists (here: whose handle holds addresses) gets them back, where
    /// `calico-ipam` alone would assign again.
    pub reuse_existing: bool,
}

/// What ADD returns: addresses and routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniResult {
    /// Addresses, IPv4 first, each with its prefix.
    pub ips: Vec<IpNet>,
    /// Route destinations (default routes).
    pub routes: Vec<IpNet>,
}

/// Why an ADD failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CniError {
    /// IPAM refused.
    #[error(transparent)]
    Ipam(#[from] IpamError),
    /// A requested family got no address.
    #[error("failed to request IPv{version} addresses: {detail}")]
    PoolExhausted {
        /// 4 or 6.
        version: u8,
        /// Calico's partial-fulfilment text.
        detail: String,
    },
    /// `ipAddrsNoIpam` without `feature_control.ip_addrs_no_ipam`.
    #[error("requested feature is not enabled: ip_addrs_no_ipam")]
    FeatureDisabled,
    /// An annotation that cannot be used.
    #[error("{0}")]
    InvalidAnnotation(String),
    /// A pool entry that is neither a CIDR nor a pool's name.
    #[error("the given pool ({0}) does not exist, or is not enabled")]
    UnknownPool(String),
}

impl CniError {
    /// The kind name (the conformance corpus's error kinds).
    pub fn kind(&self) -> &'static str {
        match self {
            CniError::Ipam(e) => e.kind(),
            CniError::PoolExhausted { .. } => "poolExhausted",
            CniError::FeatureDisabled => "featureDisabled",
            CniError::InvalidAnnotation(_) => "invalidAnnotation",
            CniError::UnknownPool(_) => "poolNotFound",
        }
    }
}

impl CniRequest<'_> {
    fn node(&self) -> String {
        self.netconf["nodename"]
            .as_str()
            .filter(|n| !n.is_empty())
            .unwrap_or(self.local_host)
            .to_string()
    }

    /// The handle of this container's addresses.
    pub fn handle(&self) -> String {
        let net = self.netconf["name"].as_str().unwrap_or("");
        format!("{net}.{}", self.container_id)
    }

    /// The workload id older Calico versions used as the handle.
    fn legacy_handle(&self) -> String {
        match &self.pod {
            Some(p) => format!("{}.{}", p.namespace, p.name),
            None => self.container_id.to_string(),
        }
    }

    fn k8s_pod(&self) -> Option<&PodInfo> {
        (self.netconf["policy"]["type"].as_str() == Some("k8s"))
            .then_some(self.pod.as_ref())
            .flatten()
    }
}

fn flag(v: &Value, default: bool) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::String(s) => s == "true",
        _ => default,
    }
}

fn json_list(text: &str, what: &str) -> Result<Vec<String>, CniError> {
    serde_json::from_str::<Vec<String>>(text).map_err(|e| {
        CniError::InvalidAnnotation(format!(
            "{what}: {text:?} is not a JSON list of strings: {e}"
        ))
    })
}

/// Pool entries: CIDRs as given, anything else looked up as a pool name.
fn resolve_pools(ipam: &Ipam<'_>, entries: &[String]) -> Result<Vec<IpNet>, CniError> {
    entries
        .iter()
        .map(|e| match e.parse::<IpNet>() {
            Ok(n) => Ok(n),
            Err(_) => ipam
                .cluster()
                .pool(e)
                .map(|p| p.cidr)
                .ok_or_else(|| CniError::UnknownPool(e.clone())),
        })
        .collect()
}

fn host_prefix(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

fn default_route(ip: &IpNet) -> IpNet {
    match ip {
        IpNet::V4(_) => "0.0.0.0/0".parse().unwrap_or(*ip),
        IpNet::V6(_) => "::/0".parse().unwrap_or(*ip),
    }
}

fn result_of(mut ips: Vec<IpNet>) -> CniResult {
    ips.sort_by_key(family);
    let routes = ips.iter().map(default_route).collect();
    CniResult { ips, routes }
}

/// CNI ADD's address part.
pub fn add(ipam: &Ipam<'_>, req: &CniRequest<'_>) -> Result<CniResult, CniError> {
    let handle = req.handle();
    let node = req.node();
    if req.reuse_existing
        && let Some(held) = existing_endpoint(ipam, req)
    {
        return Ok(result_of(held));
    }
    let ipam_conf = &req.netconf["ipam"];
    let mut v4_pools: Vec<String> = strings(&ipam_conf["ipv4_pools"]);
    let mut v6_pools: Vec<String> = strings(&ipam_conf["ipv6_pools"]);
    let mut namespace = None;
    if let Some(pod) = req.k8s_pod() {
        namespace = Some(pod.namespace.clone());
        if let Some(text) = pod.annotations.get(IP_ADDRS_NO_IPAM) {
            if !flag(&req.netconf["feature_control"]["ip_addrs_no_ipam"], false) {
                return Err(CniError::FeatureDisabled);
            }
            let ips = one_per_family(&json_list(text, IP_ADDRS_NO_IPAM)?, IP_ADDRS_NO_IPAM)?;
            return Ok(result_of(ips.into_iter().map(host_prefix).collect()));
        }
        if let Some(text) = pod.annotations.get(IP_ADDRS) {
            let ips = one_per_family(&json_list(text, IP_ADDRS)?, IP_ADDRS)?;
            let mut assigned = Vec::new();
            for ip in ips {
                let args = assign_args(ipam, ip, &node, &handle, Some(pod));
                if let Err(e) = ipam.assign_ip(&args) {
                    let _ = ipam.release_by_handle(&handle);
                    return Err(e.into());
                }
                assigned.push(host_prefix(ip));
            }
            return Ok(result_of(assigned));
        }
        for (key, pools) in [(IPV4_POOLS, &mut v4_pools), (IPV6_POOLS, &mut v6_pools)] {
            let text = pod
                .annotations
                .get(key)
                .or_else(|| pod.namespace_annotations.get(key));
            if let Some(t) = text {
                *pools = json_list(t, key)?;
            }
        }
    }
    if let Some(ip) = req.ip {
        ipam.assign_ip(&assign_args(ipam, ip, &node, &handle, req.k8s_pod()))?;
        return Ok(result_of(vec![host_prefix(ip)]));
    }
    let want4 = flag(&ipam_conf["assign_ipv4"], true);
    let want6 = flag(&ipam_conf["assign_ipv6"], false);
    let mut args =
        AutoAssignArgs::new(&node, usize::from(want4), usize::from(want6), Use::Workload);
    args.handle = Some(handle.clone());
    args.ipv4_pools = resolve_pools(ipam, &v4_pools)?;
    args.ipv6_pools = resolve_pools(ipam, &v6_pools)?;
    args.namespace = namespace;
    if let Some(pod) = req.k8s_pod() {
        args.attrs = pod_attrs(ipam, pod, &node);
    }
    let got = ipam.auto_assign(&args);
    let mut ips = Vec::new();
    for a in [&got.v4, &got.v6].into_iter().flatten() {
        ips.extend(a.ips.iter().copied());
    }
    let failure = if let Some(e) = got.error {
        Some(CniError::Ipam(e))
    } else {
        [(want4, &got.v4, 4), (want6, &got.v6, 6)]
            .into_iter()
            .find_map(|(wanted, a, version)| match a {
                Some(a) if wanted && a.ips.is_empty() => Some(CniError::PoolExhausted {
                    version,
                    detail: a.partial_fulfillment_error().unwrap_or_default(),
                }),
                _ => None,
            })
    };
    if let Some(e) = failure {
        // Nothing of a failed ADD stays allocated.
        let _ = ipam.release_by_handle(&handle);
        return Err(e);
    }
    Ok(result_of(ips))
}

/// The addresses of the container's endpoint, if it has one. Outside
/// Kubernetes Calico's endpoint is the container's (node, `cni`, container
/// ID, interface), whichever network's ADD made it, so an ADD under
/// another network name finds it too: its addresses are under
/// `<that network>.<container ID>`.
fn existing_endpoint(ipam: &Ipam<'_>, req: &CniRequest<'_>) -> Option<Vec<IpNet>> {
    let held = |handle: &str| {
        ipam.ips_by_handle(handle)
            .ok()
            .filter(|ips| !ips.is_empty())
    };
    if let Some(ips) = held(&req.handle()) {
        return Some(ips);
    }
    if req.container_id.is_empty() {
        return None;
    }
    let suffix = format!(".{}", req.container_id);
    ipam.records()
        .handles()
        .ok()?
        .into_iter()
        .filter(|(id, _)| id.ends_with(&suffix))
        .find_map(|(id, _)| held(&id))
}

/// CNI DEL's address part: the handle's addresses, then the legacy
/// handle's; missing handles are fine.
pub fn del(ipam: &Ipam<'_>, req: &CniRequest<'_>) -> Result<(), CniError> {
    for h in [req.handle(), req.legacy_handle()] {
        match ipam.release_by_handle(&h) {
            Ok(()) | Err(IpamError::HandleNotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(String::from))
        .collect()
}

fn one_per_family(entries: &[String], what: &str) -> Result<Vec<IpAddr>, CniError> {
    let mut out: Vec<IpAddr> = Vec::new();
    for e in entries {
        let ip: IpAddr = e.parse().map_err(|_| {
            CniError::InvalidAnnotation(format!("{what}: {e:?} is not an IP address"))
        })?;
        if out.iter().any(|o| o.is_ipv4() == ip.is_ipv4()) {
            return Err(CniError::InvalidAnnotation(format!(
                "cannot have more than one IPv{} address for {what:?} annotation",
                if ip.is_ipv4() { 4 } else { 6 }
            )));
        }
        out.push(ip);
    }
    Ok(out)
}

/// The owner attributes of a pod's address: what garbage collection reads.
fn pod_attrs(ipam: &Ipam<'_>, pod: &PodInfo, node: &str) -> Labels {
    Labels::from([
        (gc::ATTR_NAMESPACE.to_string(), pod.namespace.clone()),
        (gc::ATTR_POD.to_string(), pod.name.clone()),
        (gc::ATTR_NODE.to_string(), node.to_string()),
        (
            gc::ATTR_TIMESTAMP.to_string(),
            crate::time::rfc3339(ipam.now().as_secs()),
        ),
    ])
}

fn assign_args(
    ipam: &Ipam<'_>,
    ip: IpAddr,
    node: &str,
    handle: &str,
    pod: Option<&PodInfo>,
) -> AssignIpArgs {
    let attrs = pod.map(|p| pod_attrs(ipam, p, node)).unwrap_or_default();
    AssignIpArgs {
        ip,
        hostname: node.to_string(),
        handle: Some(handle.to_string()),
        attrs,
        intended_use: Some(Use::Workload),
        max_alloc_per_handle: 0,
        host_reserved: None,
    }
}
