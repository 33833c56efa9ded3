//! IP pools (`projectcalico.org/v3` IPPool) as IPAM reads them, validated
//! as Calico validates them; every error names the pool and the field.

use std::net::IpAddr;

use ipnet::IpNet;
use policy_core::Selector;
use serde_json::Value;

/// What an address from a pool may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Use {
    /// Pods.
    Workload,
    /// Tunnel addresses of nodes (VXLAN, IPIP).
    Tunnel,
    /// Service load balancer addresses.
    LoadBalancer,
}

/// Encapsulation modes (`ipipMode`, `vxlanMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encapsulation {
    /// Off.
    Never,
    /// Always.
    Always,
    /// Only across subnets.
    CrossSubnet,
}

/// A validated pool.
#[derive(Debug, Clone)]
pub struct Pool {
    /// `metadata.name`.
    pub name: String,
    /// `spec.cidr` (its network address).
    pub cidr: IpNet,
    /// `spec.blockSize`: prefix length of its blocks.
    pub block_size: u8,
    /// `spec.nodeSelector` (every node when absent).
    pub node_selector: Selector,
    /// `spec.namespaceSelector` (every namespace when absent).
    pub namespace_selector: Option<Selector>,
    /// `spec.disabled`.
    pub disabled: bool,
    /// `spec.allowedUses` (default Workload and Tunnel).
    pub allowed_uses: Vec<Use>,
    /// `spec.assignmentMode` is `Manual`: used only when requested.
    pub manual: bool,
    /// `spec.ipipMode`.
    pub ipip: Encapsulation,
    /// `spec.vxlanMode`.
    pub vxlan: Encapsulation,
    /// `spec.natOutgoing`.
    pub nat_outgoing: bool,
}

/// A pool Calico would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("IPPool {pool}: {field}: {message}")]
pub struct PoolError {
    /// The pool's name.
    pub pool: String,
    /// The field, as a path (`spec.blockSize`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl Pool {
    /// Reads and validates an IPPool document.
    pub fn from_document(doc: &Value) -> Result<Pool, PoolError> {
        let name = doc["metadata"]["name"].as_str().unwrap_or("").to_string();
        let err = |field: &str, message: String| PoolError {
            pool: name.clone(),
            field: field.to_string(),
            message,
        };
        if name.is_empty() {
            return Err(err("metadata.name", "a pool needs a name".into()));
        }
        let spec = &doc["spec"];
        let text = spec["cidr"]
            .as_str()
            .ok_or_else(|| err("spec.cidr", "required".into()))?;
        let cidr: IpNet = text
            .parse()
            .map_err(|e| err("spec.cidr", format!("{text:?} is not a CIDR: {e}")))?;
        let cidr = cidr.trunc();
        let v4 = matches!(cidr.addr(), IpAddr::V4(_));
        let (low, high, default) = if v4 { (20, 32, 26) } else { (116, 128, 122) };
        let block_size = match &spec["blockSize"] {
            Value::Null => default,
            v => v
                .as_u64()
                .and_then(|b| u8::try_from(b).ok())
                .ok_or_else(|| err("spec.blockSize", format!("{v} is not a prefix length")))?,
        };
        if !(low..=high).contains(&block_size) {
            return Err(err(
                "spec.blockSize",
                format!(
                    "{block_size} is out of range: IPv{} blocks are /{low} to /{high}",
                    if v4 { 4 } else { 6 }
                ),
            ));
        }
        if cidr.prefix_len() > block_size {
            return Err(err(
                "spec.cidr",
                format!(
                    "the pool (/{}) is smaller than one block (/{block_size}): it must be equal to or greater than the block size",
                    cidr.prefix_len()
                ),
            ));
        }
        let selector = |field: &str, v: &Value| -> Result<Option<Selector>, PoolError> {
            match v.as_str() {
                None | Some("") => Ok(None),
                Some(s) => Selector::parse(s)
                    .map(Some)
                    .map_err(|e| err(field, format!("invalid selector {s:?}: {e}"))),
            }
        };
        let node_selector = match selector("spec.nodeSelector", &spec["nodeSelector"])? {
            Some(s) => s,
            None => {
                Selector::parse("all()").map_err(|e| err("spec.nodeSelector", e.to_string()))?
            }
        };
        let namespace_selector = selector("spec.namespaceSelector", &spec["namespaceSelector"])?;
        let mode = |field: &str, v: &Value| match v.as_str() {
            None | Some("Never") | Some("") => Ok(Encapsulation::Never),
            Some("Always") => Ok(Encapsulation::Always),
            Some("CrossSubnet") => Ok(Encapsulation::CrossSubnet),
            Some(other) => Err(err(
                field,
                format!("{other:?}: expected Never, Always or CrossSubnet"),
            )),
        };
        let ipip = mode("spec.ipipMode", &spec["ipipMode"])?;
        let vxlan = mode("spec.vxlanMode", &spec["vxlanMode"])?;
        if ipip != Encapsulation::Never && vxlan != Encapsulation::Never {
            return Err(err(
                "spec.vxlanMode",
                "IPIP and VXLAN cannot both be enabled on one pool".into(),
            ));
        }
        if !v4 && ipip != Encapsulation::Never {
            return Err(err(
                "spec.ipipMode",
                "IPIP is not supported on an IPv6 pool".into(),
            ));
        }
        let allowed_uses = match &spec["allowedUses"] {
            Value::Null => vec![Use::Workload, Use::Tunnel],
            Value::Array(uses) => uses
                .iter()
                .enumerate()
                .map(|(i, u)| match u.as_str() {
                    Some("Workload") => Ok(Use::Workload),
                    Some("Tunnel") => Ok(Use::Tunnel),
                    Some("LoadBalancer") => Ok(Use::LoadBalancer),
                    _ => Err(err(
                        &format!("spec.allowedUses[{i}]"),
                        format!("{u}: expected Workload, Tunnel or LoadBalancer"),
                    )),
                })
                .collect::<Result<_, _>>()?,
            other => return Err(err("spec.allowedUses", format!("{other} is not a list"))),
        };
        let manual = match spec["assignmentMode"].as_str() {
            None | Some("Automatic") => false,
            Some("Manual") => true,
            Some(other) => {
                return Err(err(
                    "spec.assignmentMode",
                    format!("{other:?}: expected Automatic or Manual"),
                ));
            }
        };
        let flag = |field: &str, v: &Value| match v {
            Value::Null => Ok(false),
            Value::Bool(b) => Ok(*b),
            other => Err(err(field, format!("{other} is not true or false"))),
        };
        Ok(Pool {
            disabled: flag("spec.disabled", &spec["disabled"])?,
            nat_outgoing: flag("spec.natOutgoing", &spec["natOutgoing"])?,
            name,
            cidr,
            block_size,
            node_selector,
            namespace_selector,
            allowed_uses,
            manual,
            ipip,
            vxlan,
        })
    }

    /// Whether `ip` is in the pool.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(&ip)
    }

    /// The block of the pool that holds `ip`.
    pub fn block_of(&self, ip: IpAddr) -> Option<IpNet> {
        if !self.contains(ip) {
            return None;
        }
        IpNet::new(ip, self.block_size).ok().map(|n| n.trunc())
    }
}

/// Pools whose ranges overlap, as Calico refuses them: the later pool (by
/// name) is named, with the one it overlaps.
pub fn check_overlaps(pools: &[Pool]) -> Result<(), PoolError> {
    let mut sorted: Vec<&Pool> = pools.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for (i, a) in sorted.iter().enumerate() {
        for b in &sorted[..i] {
            if a.cidr.contains(&b.cidr.network()) || b.cidr.contains(&a.cidr.network()) {
                return Err(PoolError {
                    pool: a.name.clone(),
                    field: "spec.cidr".into(),
                    message: format!("{} overlaps IPPool {} ({})", a.cidr, b.name, b.cidr),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pool(name: &str, spec: Value) -> Result<Pool, PoolError> {
        Pool::from_document(
            &json!({"apiVersion": "projectcalico.org/v3", "kind": "IPPool",
                                    "metadata": {"name": name}, "spec": spec}),
        )
    }

    #[test]
    fn defaults_are_calicos() {
        let p = pool("frontend", json!({"cidr": "10.10.0.0/16"})).unwrap();
        assert_eq!(p.block_size, 26);
        assert_eq!(p.allowed_uses, [Use::Workload, Use::Tunnel]);
        assert!(!p.disabled && !p.manual && !p.nat_outgoing);
        let p6 = pool("v6", json!({"cidr": "fd00:10::/64"})).unwrap();
        assert_eq!(p6.block_size, 122);
        assert_eq!(
            p.block_of("10.10.3.77".parse().unwrap())
                .unwrap()
                .to_string(),
            "10.10.3.64/26"
        );
        // A CIDR written with host bits is its network.
        let p = pool("x", json!({"cidr": "10.0.0.1/24"})).unwrap();
        assert_eq!(p.cidr.to_string(), "10.0.0.0/24");
    }

    #[test]
    fn bad_pools_are_refused_naming_the_field() {
        for (spec, field) in [
            (
                json!({"cidr": "10.0.0.0/16", "blockSize": 19}),
                "spec.blockSize",
            ),
            (
                json!({"cidr": "fd00::/64", "blockSize": 100}),
                "spec.blockSize",
            ),
            (json!({"cidr": "10.0.0.0/28"}), "spec.cidr"),
            (json!({"cidr": "10.0.0.300/16"}), "spec.cidr"),
            (
                json!({"cidr": "10.0.0.0/16", "nodeSelector": "a = 'b'"}),
                "spec.nodeSelector",
            ),
            (
                json!({"cidr": "10.0.0.0/16", "ipipMode": "Always", "vxlanMode": "Always"}),
                "spec.vxlanMode",
            ),
            (
                json!({"cidr": "fd00::/64", "ipipMode": "Always"}),
                "spec.ipipMode",
            ),
            (
                json!({"cidr": "10.0.0.0/16", "allowedUses": ["Workload", "Pods"]}),
                "spec.allowedUses[1]",
            ),
            (
                json!({"cidr": "10.0.0.0/16", "assignmentMode": "Sometimes"}),
                "spec.assignmentMode",
            ),
        ] {
            let e = pool("p", spec.clone()).unwrap_err();
            assert_eq!(e.field, field, "{spec}: {e}");
            assert!(e.to_string().starts_with("IPPool p: "), "{e}");
        }
    }

    #[test]
    fn overlapping_pools_are_refused() {
        let a = pool("a", json!({"cidr": "10.10.0.0/16"})).unwrap();
        let b = pool("b", json!({"cidr": "10.10.64.0/18"})).unwrap();
        let c = pool("c", json!({"cidr": "10.20.0.0/16"})).unwrap();
        assert!(check_overlaps(&[a.clone(), c.clone()]).is_ok());
        let e = check_overlaps(&[c, b, a]).unwrap_err();
        assert_eq!(e.pool, "b");
        assert!(e.message.contains("IPPool a"), "{e}");
    }
}
