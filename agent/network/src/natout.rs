//! IP pools' `natOutgoing`, as Calico does it, as plain data.
//!
//! | traffic from a pod in a `natOutgoing` pool to | masqueraded? |
//! |---|---|
//! | the internet, a host outside the cluster | yes |
//! | another node's host address | yes (Calico's default `natOutgoingExclusions: IPPoolsOnly`) |
//! | a pod or tunnel address in any pool, this node's or another's (disabled pools count) | no |
//! | an address in a `LoadBalancer`-only pool | yes |
//! | this node's own addresses | no (it never leaves through an interface) |
//!
//! Pods in other pools are never masqueraded. Calico's eBPF mode leaves
//! this SNAT to the kernel's netfilter (one MASQUERADE rule over two IP
//! sets in POSTROUTING, `felix/rules/nat.go`); so does Palisade: [`plan`]
//! derives the two sets per family and [`NatOutgoing::script`] the one
//! `nft` table that holds them, replaced atomically. Policy has judged the
//! pod's own address before routing; conntrack undoes the SNAT on replies
//! before they reach the pod's veth, where they are established.
//!
//! ```
//! use palisade_network::natout::{plan, PoolNat};
//! let pools = [
//!     PoolNat { cidr: "10.10.0.0/16".parse().unwrap(), nat_outgoing: true, load_balancer_only: false },
//!     PoolNat { cidr: "10.20.0.0/16".parse().unwrap(), nat_outgoing: false, load_balancer_only: false },
//! ];
//! let p = plan(&pools);
//! let pod = "10.10.0.5".parse().unwrap();
//! assert!(p.masquerades(pod, "1.1.1.1".parse().unwrap()));
//! assert!(!p.masquerades(pod, "10.20.3.4".parse().unwrap()));
//! assert!(p.script().contains("masquerade"));
//! ```

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;

/// The `nft` table Palisade owns (family `inet`).
pub const TABLE: &str = "palisade";
/// Its chain, at the NAT postrouting hook (source NAT priority).
pub const CHAIN: &str = "nat-outgoing";

/// What `natOutgoing` needs to know of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolNat {
    /// The pool's CIDR.
    pub cidr: IpNet,
    /// `spec.natOutgoing`.
    pub nat_outgoing: bool,
    /// `spec.allowedUses` is only `LoadBalancer`: its addresses are not
    /// pods', so traffic to them leaves the cluster's pools.
    pub load_balancer_only: bool,
}

/// The two sets Calico keeps (`all-ipam-pools`, `masq-ipam-pools`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatOutgoing {
    /// Destinations that are never masqueraded: every pool but the
    /// LoadBalancer-only ones (disabled pools included).
    pub pools: BTreeSet<IpNet>,
    /// Sources that are: the pools with `natOutgoing`.
    pub masquerade: BTreeSet<IpNet>,
}

/// The sets `pools` lead to.
pub fn plan(pools: &[PoolNat]) -> NatOutgoing {
    let mut p = NatOutgoing::default();
    for pool in pools {
        let cidr = pool.cidr.trunc();
        if !pool.load_balancer_only {
            p.pools.insert(cidr);
        }
        if pool.nat_outgoing {
            p.masquerade.insert(cidr);
        }
    }
    p
}

impl NatOutgoing {
    /// No pool masquerades: the table is not needed at all.
    pub fn is_empty(&self) -> bool {
        self.masquerade.is_empty()
    }

    /// Whether a packet from `src` to `dst` that leaves through an
    /// interface is masqueraded.
    pub fn masquerades(&self, src: IpAddr, dst: IpAddr) -> bool {
        self.masquerade.iter().any(|n| n.contains(&src))
            && !self.pools.iter().any(|n| n.contains(&dst))
    }

    /// The `nft -f` script that makes the kernel hold exactly this plan:
    /// the table is created (so the delete cannot fail), deleted and
    /// written again in one transaction; nothing when no pool masquerades.
    pub fn script(&self) -> String {
        let mut s = format!("table inet {TABLE}\ndelete table inet {TABLE}\n");
        if self.is_empty() {
            return s;
        }
        s.push_str(&format!("table inet {TABLE} {{\n"));
        for (family, kind, v4) in [("v4", "ipv4_addr", true), ("v6", "ipv6_addr", false)] {
            for (name, nets) in [
                ("all-ipam-pools", &self.pools),
                ("masq-ipam-pools", &self.masquerade),
            ] {
                let elements: Vec<String> = nets
                    .iter()
                    .filter(|n| n.addr().is_ipv4() == v4)
                    .map(IpNet::to_string)
                    .collect();
                s.push_str(&format!(
                    "  set {name}-{family} {{\n    type {kind}\n    flags interval\n"
                ));
                if !elements.is_empty() {
                    s.push_str(&format!("    elements = {{ {} }}\n", elements.join(", ")));
                }
                s.push_str("  }\n");
            }
        }
        s.push_str(&format!(
            "  chain {CHAIN} {{\n    type nat hook postrouting priority srcnat; policy accept;\n"
        ));
        s.push_str("    ip saddr @masq-ipam-pools-v4 ip daddr != @all-ipam-pools-v4 masquerade\n");
        s.push_str(
            "    ip6 saddr @masq-ipam-pools-v6 ip6 daddr != @all-ipam-pools-v6 masquerade\n",
        );
        s.push_str("  }\n}\n");
        s
    }

    /// What the kernel holds, from `nft -j list table inet palisade`'s
    /// output (None: no table). A table without its two rules reads as
    /// not matching any plan, so it is written again.
    pub fn from_listing(json: &Value) -> Option<NatOutgoing> {
        let objects = json["nftables"].as_array()?;
        let mut found = false;
        let mut rules = 0;
        let mut p = NatOutgoing::default();
        for o in objects {
            if o["table"]["name"] == TABLE {
                found = true;
            }
            if o["rule"]["chain"] == CHAIN
                && o["rule"]["expr"]
                    .as_array()
                    .is_some_and(|e| e.iter().any(|x| x.get("masquerade").is_some()))
            {
                rules += 1;
            }
            let set = &o["set"];
            let Some(name) = set["name"].as_str() else {
                continue;
            };
            let into = if name.starts_with("all-ipam-pools-") {
                &mut p.pools
            } else if name.starts_with("masq-ipam-pools-") {
                &mut p.masquerade
            } else {
                continue;
            };
            let elems = match &set["elem"] {
                Value::Array(a) => a.clone(),
                Value::Null => Vec::new(),
                one => vec![one.clone()],
            };
            for e in elems {
                if let Some(net) = element(&e) {
                    into.insert(net);
                }
            }
        }
        if !found {
            return None;
        }
        if rules != 2 {
            // Not a table this plan writes: make sure it never compares equal.
            p.masquerade.insert(IpNet::V4(Default::default()));
        }
        Some(p)
    }
}

/// One set element of `nft -j`: `{"prefix": {"addr", "len"}}` or a bare
/// address (a /32 or /128).
fn element(e: &Value) -> Option<IpNet> {
    if let Some(a) = e.as_str() {
        let ip: IpAddr = a.parse().ok()?;
        return Some(IpNet::from(ip));
    }
    let p = &e["prefix"];
    let ip: IpAddr = p["addr"].as_str()?.parse().ok()?;
    IpNet::new(ip, u8::try_from(p["len"].as_u64()?).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pool(cidr: &str, nat: bool, lb: bool) -> PoolNat {
        PoolNat {
            cidr: cidr.parse().unwrap(),
            nat_outgoing: nat,
            load_balancer_only: lb,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn masquerades_as_calico_does() {
        let p = plan(&[
            pool("10.10.0.0/16", true, false),
            pool("10.20.0.0/16", false, false),
            pool("10.99.0.0/24", false, true),
            pool("fd00:10::/48", true, false),
        ]);
        let pod = ip("10.10.1.2");
        // Out of the cluster, to a host (other nodes' too), to an LB-only pool.
        for dst in ["8.8.8.8", "192.168.100.2", "10.99.0.7"] {
            assert!(p.masquerades(pod, ip(dst)), "{dst}");
        }
        // Pods and tunnels in any pool stay unmasqueraded.
        for dst in ["10.10.9.9", "10.20.0.1"] {
            assert!(!p.masquerades(pod, ip(dst)), "{dst}");
        }
        // Pods of a pool without natOutgoing never are.
        assert!(!p.masquerades(ip("10.20.0.5"), ip("8.8.8.8")));
        assert!(p.masquerades(ip("fd00:10::5"), ip("2001:db8::1")));
        assert!(!p.masquerades(ip("fd00:10::5"), ip("fd00:10::9")));
    }

    #[test]
    fn the_script_writes_both_families_and_an_empty_plan_removes_the_table() {
        let p = plan(&[
            pool("10.10.0.0/16", true, false),
            pool("10.20.0.0/16", false, false),
        ]);
        let s = p.script();
        assert!(s.starts_with("table inet palisade\ndelete table inet palisade\n"));
        assert!(s.contains("set all-ipam-pools-v4 {\n    type ipv4_addr\n    flags interval\n    elements = { 10.10.0.0/16, 10.20.0.0/16 }"));
        assert!(s.contains("set masq-ipam-pools-v4 {\n    type ipv4_addr\n    flags interval\n    elements = { 10.10.0.0/16 }"));
        // No v6 pool: the v6 sets are empty (no elements line).
        assert!(
            s.contains("set masq-ipam-pools-v6 {\n    type ipv6_addr\n    flags interval\n  }")
        );
        assert!(s.contains("type nat hook postrouting priority srcnat"));
        let none = plan(&[pool("10.20.0.0/16", false, false)]);
        assert!(none.is_empty());
        assert_eq!(
            none.script(),
            "table inet palisade\ndelete table inet palisade\n"
        );
    }

    #[test]
    fn a_listing_reads_back_as_the_plan_it_came_from() {
        let listing = json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "palisade", "handle": 3}},
            {"set": {"family": "inet", "name": "all-ipam-pools-v4", "table": "palisade", "type": "ipv4_addr",
                     "flags": ["interval"], "elem": [{"prefix": {"addr": "10.10.0.0", "len": 16}}, "10.50.0.1"]}},
            {"set": {"family": "inet", "name": "masq-ipam-pools-v4", "table": "palisade", "type": "ipv4_addr",
                     "flags": ["interval"], "elem": [{"prefix": {"addr": "10.10.0.0", "len": 16}}]}},
            {"set": {"family": "inet", "name": "all-ipam-pools-v6", "table": "palisade", "type": "ipv6_addr", "flags": ["interval"]}},
            {"set": {"family": "inet", "name": "masq-ipam-pools-v6", "table": "palisade", "type": "ipv6_addr", "flags": ["interval"]}},
            {"chain": {"family": "inet", "table": "palisade", "name": "nat-outgoing"}},
            {"rule": {"family": "inet", "table": "palisade", "chain": "nat-outgoing", "expr": [{"match": {}}, {"masquerade": null}]}},
            {"rule": {"family": "inet", "table": "palisade", "chain": "nat-outgoing", "expr": [{"match": {}}, {"masquerade": null}]}}
        ]});
        let want = plan(&[
            pool("10.10.0.0/16", true, false),
            pool("10.50.0.1/32", false, false),
        ]);
        assert_eq!(NatOutgoing::from_listing(&listing), Some(want.clone()));
        // A rule gone: it no longer matches.
        let mut cut = listing.clone();
        cut["nftables"].as_array_mut().unwrap().pop();
        assert_ne!(NatOutgoing::from_listing(&cut), Some(want));
        assert_eq!(NatOutgoing::from_listing(&json!({"nftables": []})), None);
    }
}
