//! IP pools' `natOutgoing`, as Calico does it, as plain data.
//!
//! | traffic from a pod in a `natOutgoing` pool to | masqueraded? |
//! |---|---|
//! | the internet, a host outside the cluster | yes |
//! | another node's host address | yes (Calico's default `natOutgoingExclusions: IPPoolsOnly`); no with `IPPoolsAndHostIPs` |
//! | a pod or tunnel address in any pool, this node's or another's (disabled pools count) | no |
//! | an address in a `LoadBalancer`-only pool | yes |
//! | this node's own addresses | no (it never leaves through an interface) |
//!
//! Pods in other pools are never masqueraded. Felix's `natPortRange` bounds
//! the source ports TCP and UDP are masqueraded to, and
//! `natOutgoingAddress` makes IPv4 leave from that address (SNAT) instead
//! of the outgoing interface's ([`NatSettings`], from FelixConfiguration
//! `default` and `node.<name>`, the node's winning field by field).
//!
//! Calico's eBPF mode leaves
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

/// Felix's settings for the masquerade (FelixConfiguration `spec`), as
/// written: an absent field is `None`, so a node's configuration can be
/// laid over the `default` one field by field ([`NatSettings::over`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NatSettings {
    /// `natOutgoingExclusions`: `IPPoolsAndHostIPs` (true) also spares
    /// the hosts' addresses; `IPPoolsOnly` (false, the default) does not.
    pub exclude_hosts: Option<bool>,
    /// `natPortRange` (`"min:max"` or one port): the source ports TCP and
    /// UDP are masqueraded to.
    pub port_range: Option<(u16, u16)>,
    /// `natOutgoingAddress`: IPv4 leaves from this address (SNAT) rather
    /// than the outgoing interface's.
    pub address: Option<std::net::Ipv4Addr>,
}

/// A FelixConfiguration field Palisade reads that does not parse: the
/// field's path and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadSetting {
    pub field: &'static str,
    pub message: String,
}

impl NatSettings {
    /// The settings in a FelixConfiguration document (its other fields
    /// are Felix's and ignored here).
    pub fn from_document(doc: &Value) -> Result<NatSettings, BadSetting> {
        let spec = &doc["spec"];
        let bad = |field, message: String| BadSetting { field, message };
        let exclude_hosts = match &spec["natOutgoingExclusions"] {
            Value::Null => None,
            Value::String(s) if s == "IPPoolsOnly" => Some(false),
            Value::String(s) if s == "IPPoolsAndHostIPs" => Some(true),
            other => {
                return Err(bad(
                    "spec.natOutgoingExclusions",
                    format!("{other}: IPPoolsOnly or IPPoolsAndHostIPs"),
                ));
            }
        };
        let port_range = match &spec["natPortRange"] {
            Value::Null => None,
            v => Some(port_range(v).ok_or_else(|| {
                bad(
                    "spec.natPortRange",
                    format!("{v}: a port or \"min:max\", 1 to 65535, min not above max"),
                )
            })?),
        };
        let address =
            match &spec["natOutgoingAddress"] {
                Value::Null => None,
                Value::String(s) if s.is_empty() => None,
                v => Some(v.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
                    bad("spec.natOutgoingAddress", format!("{v}: an IPv4 address"))
                })?),
            };
        Ok(NatSettings {
            exclude_hosts,
            port_range,
            address,
        })
    }

    /// These settings (a node's) over `default`'s: each field set here wins.
    pub fn over(self, default: NatSettings) -> NatSettings {
        NatSettings {
            exclude_hosts: self.exclude_hosts.or(default.exclude_hosts),
            port_range: self.port_range.or(default.port_range),
            address: self.address.or(default.address),
        }
    }
}

fn port_range(v: &Value) -> Option<(u16, u16)> {
    let (min, max) = match v {
        Value::Number(n) => {
            let p = u16::try_from(n.as_u64()?).ok()?;
            (p, p)
        }
        Value::String(s) => match s.split_once(':') {
            Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
            None => {
                let p = s.trim().parse().ok()?;
                (p, p)
            }
        },
        _ => return None,
    };
    (min >= 1 && min <= max).then_some((min, max))
}

/// The sets Calico keeps (`all-ipam-pools`, `masq-ipam-pools`, the hosts'
/// addresses) and how the masquerade is done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatOutgoing {
    /// Destinations that are never masqueraded: every pool but the
    /// LoadBalancer-only ones (disabled pools included).
    pub pools: BTreeSet<IpNet>,
    /// Sources that are: the pools with `natOutgoing`.
    pub masquerade: BTreeSet<IpNet>,
    /// Destinations spared as well (`IPPoolsAndHostIPs`): the hosts'
    /// addresses.
    pub hosts: BTreeSet<IpNet>,
    /// `natPortRange`, for TCP and UDP.
    pub port_range: Option<(u16, u16)>,
    /// `natOutgoingAddress`: IPv4's SNAT address.
    pub address: Option<std::net::Ipv4Addr>,
}

/// The sets `pools` lead to, with Felix's defaults.
pub fn plan(pools: &[PoolNat]) -> NatOutgoing {
    plan_with(pools, &NatSettings::default(), &[])
}

/// The sets `pools` lead to under `settings`; `hosts` are the cluster's
/// host addresses (spared under `IPPoolsAndHostIPs`).
pub fn plan_with(pools: &[PoolNat], settings: &NatSettings, hosts: &[IpAddr]) -> NatOutgoing {
    let mut p = NatOutgoing {
        port_range: settings.port_range,
        address: settings.address,
        ..NatOutgoing::default()
    };
    for pool in pools {
        let cidr = pool.cidr.trunc();
        if !pool.load_balancer_only {
            p.pools.insert(cidr);
        }
        if pool.nat_outgoing {
            p.masquerade.insert(cidr);
        }
    }
    if settings.exclude_hosts == Some(true) {
        p.hosts = hosts.iter().map(|h| IpNet::from(*h)).collect();
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
            && !self.hosts.iter().any(|n| n.contains(&dst))
    }

    /// The source NAT of a family's rule (`masquerade`, or `snat ip to`
    /// the configured address), with ports when `ports`.
    fn action(&self, v4: bool, ports: bool) -> String {
        let range = match (ports, self.port_range) {
            (true, Some((a, b))) if a == b => format!(":{a}"),
            (true, Some((a, b))) => format!(":{a}-{b}"),
            _ => String::new(),
        };
        match (v4, self.address) {
            (true, Some(addr)) => format!("snat ip to {addr}{range}"),
            _ if range.is_empty() => "masquerade".into(),
            _ => format!("masquerade to {range}"),
        }
    }

    /// Rules the table holds: one per family, two with a port range (TCP
    /// and UDP with it, the rest without).
    fn rule_count(&self) -> usize {
        if self.port_range.is_some() { 4 } else { 2 }
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
                ("all-hosts", &self.hosts),
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
        for (ip, family, v4) in [("ip", "v4", true), ("ip6", "v6", false)] {
            let matches = format!(
                "{ip} saddr @masq-ipam-pools-{family} {ip} daddr != @all-ipam-pools-{family} \
                 {ip} daddr != @all-hosts-{family}"
            );
            if self.port_range.is_some() {
                s.push_str(&format!(
                    "    {matches} meta l4proto {{ tcp, udp }} {}\n",
                    self.action(v4, true)
                ));
            }
            s.push_str(&format!("    {matches} {}\n", self.action(v4, false)));
        }
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
            if o["rule"]["chain"] == CHAIN {
                for x in o["rule"]["expr"].as_array().into_iter().flatten() {
                    let nat = x.get("masquerade").or_else(|| x.get("snat"));
                    let Some(nat) = nat else { continue };
                    rules += 1;
                    if let Some([a, b]) = nat["port"]["range"].as_array().map(Vec::as_slice) {
                        p.port_range = a.as_u64().zip(b.as_u64()).and_then(|(a, b)| {
                            Some((u16::try_from(a).ok()?, u16::try_from(b).ok()?))
                        });
                    } else if let Some(one) = nat["port"].as_u64() {
                        p.port_range = u16::try_from(one).ok().map(|p| (p, p));
                    }
                    if let Some(addr) = nat["addr"].as_str() {
                        p.address = addr.parse().ok();
                    }
                }
            }
            let set = &o["set"];
            let Some(name) = set["name"].as_str() else {
                continue;
            };
            let into = if name.starts_with("all-ipam-pools-") {
                &mut p.pools
            } else if name.starts_with("masq-ipam-pools-") {
                &mut p.masquerade
            } else if name.starts_with("all-hosts-") {
                &mut p.hosts
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
        if rules != p.rule_count() {
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

    #[test]
    fn felix_settings_read_as_calico_writes_them_and_a_node_overrides_by_field() {
        let default = NatSettings::from_document(&json!({"spec": {
            "natOutgoingExclusions": "IPPoolsAndHostIPs", "natPortRange": "32768:65000",
            "ipipMTU": 1400}}))
        .unwrap();
        assert_eq!(default.exclude_hosts, Some(true));
        assert_eq!(default.port_range, Some((32768, 65000)));
        let node = NatSettings::from_document(&json!({"spec": {
            "natPortRange": 40000, "natOutgoingAddress": "192.168.100.9"}}))
        .unwrap();
        let merged = node.over(default);
        assert_eq!(merged.exclude_hosts, Some(true));
        assert_eq!(merged.port_range, Some((40000, 40000)));
        assert_eq!(merged.address, Some("192.168.100.9".parse().unwrap()));
        for (spec, field) in [
            (
                json!({"natOutgoingExclusions": "Hosts"}),
                "spec.natOutgoingExclusions",
            ),
            (json!({"natPortRange": "65000:32768"}), "spec.natPortRange"),
            (json!({"natPortRange": "0:10"}), "spec.natPortRange"),
            (json!({"natPortRange": "a:b"}), "spec.natPortRange"),
            (
                json!({"natOutgoingAddress": "fd00::1"}),
                "spec.natOutgoingAddress",
            ),
        ] {
            let e = NatSettings::from_document(&json!({ "spec": spec })).unwrap_err();
            assert_eq!(e.field, field, "{spec}");
        }
    }

    #[test]
    fn host_exclusion_port_range_and_address_shape_the_rules() {
        let pools = [
            pool("10.10.0.0/16", true, false),
            pool("fd00:10::/48", true, false),
        ];
        let hosts = [ip("192.168.100.2"), ip("fd00::2")];
        // IPPoolsOnly (the default): hosts are masqueraded.
        let only = plan_with(&pools, &NatSettings::default(), &hosts);
        assert!(only.masquerades(ip("10.10.1.2"), ip("192.168.100.2")));
        let settings = NatSettings {
            exclude_hosts: Some(true),
            port_range: Some((40000, 40100)),
            address: Some("192.168.100.9".parse().unwrap()),
        };
        let p = plan_with(&pools, &settings, &hosts);
        assert!(!p.masquerades(ip("10.10.1.2"), ip("192.168.100.2")));
        assert!(!p.masquerades(ip("fd00:10::5"), ip("fd00::2")));
        assert!(p.masquerades(ip("10.10.1.2"), ip("8.8.8.8")));
        let s = p.script();
        assert!(s.contains("elements = { 192.168.100.2/32 }"), "{s}");
        assert!(
            s.contains("meta l4proto { tcp, udp } snat ip to 192.168.100.9:40000-40100\n"),
            "{s}"
        );
        assert!(
            s.contains("ip daddr != @all-hosts-v4 snat ip to 192.168.100.9\n"),
            "{s}"
        );
        // IPv6 has no SNAT address: masquerade, with the ports.
        assert!(
            s.contains("meta l4proto { tcp, udp } masquerade to :40000-40100\n"),
            "{s}"
        );
        assert_eq!(
            s.matches("snat").count() + s.matches("masquerade").count(),
            4
        );
    }
}
