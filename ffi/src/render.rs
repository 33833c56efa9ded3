//! JSON documents handed to C: the delta of an apply and the lowered maps.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use policy_bpf::lower::{Lowering, WritePlan};
use policy_bpf_common::{
    AddressFamily, HookDirection, LEAF_ALLOW, LEAF_LOGGED, MAX_WALK, NodeFeature, NodeOp,
    PeerClass, SlotKey, member_base, member_stride,
};
use policy_core::EndpointKey;
use policy_core::compile::{Bits, Compiler, Delta, RuleRef};
use serde_json::{Value, json};

/// The delta of one apply: what changed in the compiled state, and how many
/// map writes the lowering made of it.
pub fn delta(d: &Delta, plan: &WritePlan, c: &Compiler) -> String {
    let split = |m: Vec<(u32, bool)>| {
        let (set, removed): (Vec<_>, Vec<_>) = m.into_iter().partition(|(_, present)| *present);
        json!({
            "set": set.into_iter().map(|(i, _)| i).collect::<Vec<_>>(),
            "removed": removed.into_iter().map(|(i, _)| i).collect::<Vec<_>>(),
        })
    };
    let stats = c.stats();
    let v = json!({
        "changed": !d.is_empty(),
        "writes": d.writes(),
        "mapWrites": {
            "prepare": plan.prepare.len(),
            "switch": plan.switch.len(),
            "cleanup": plan.cleanup.len(),
        },
        "programs": split(d.programs.iter().map(|(i, p)| (*i, p.is_some())).collect()),
        "slots": d.slots.iter().map(|(slot, p)| json!({
            "endpoint": slot.endpoint.to_string(),
            "address": slot.addr.to_string(),
            "direction": slot.direction.to_string(),
            "program": p,
        })).collect::<Vec<_>>(),
        "identities": split(d.identities.iter().map(|(i, b)| (*i, b.is_some())).collect()),
        "classes": split(d.classes.iter().map(|(i, b)| (*i, b.is_some())).collect()),
        "prefixes": d.prefixes.iter().map(|(n, c)| json!({
            "prefix": n.to_string(),
            "class": c,
        })).collect::<Vec<_>>(),
        "hosts": d.hosts.iter().map(|(ip, h)| json!({
            "address": ip.to_string(),
            "identity": h.map(|h| h.identity),
            "class": h.map(|h| h.class),
        })).collect::<Vec<_>>(),
        "rules": d.rules.iter().map(|(id, r)| json!({
            "id": id,
            "rule": r.as_ref().map(ToString::to_string),
        })).collect::<Vec<_>>(),
        "stats": {
            "endpoints": stats.endpoints,
            "localEndpoints": stats.local_endpoints,
            "identities": stats.identities,
            "programs": stats.programs,
            "programNodes": stats.program_nodes,
            "lpmEntries": stats.lpm_entries,
            "ruleIds": stats.rule_ids,
        },
    });
    v.to_string()
}

fn rule_json(index: u32, r: &RuleRef) -> Value {
    let mut v = match r {
        RuleRef::Policy {
            tier,
            policy,
            direction,
            index,
            action,
        } => json!({
            "kind": "rule", "tier": tier, "policy": policy.to_string(),
            "direction": direction.to_string(), "rule": index, "action": action.to_string(),
        }),
        RuleRef::TierDefault { tier } => {
            json!({"kind": "endOfTier", "tier": tier, "action": "deny"})
        }
        RuleRef::Profile {
            profile,
            direction,
            index,
            action,
        } => json!({
            "kind": "profile", "policy": profile, "direction": direction.to_string(),
            "rule": index, "action": action.to_string(),
        }),
        RuleRef::NoProfileMatch => json!({"kind": "noProfileMatch", "action": "deny"}),
    };
    v["index"] = json!(index);
    v["text"] = json!(r.to_string());
    v
}

fn bits(b: &Bits) -> Vec<u32> {
    b.iter().collect()
}

fn lpm(prefix_len: u32, addr: IpAddr, c: &PeerClass) -> Value {
    json!({
        "prefix": format!("{addr}/{prefix_len}"),
        "prefixLen": prefix_len,
        "address": addr.to_string(),
        "identity": c.identity,
        "class": c.class,
    })
}

fn slot_addr(k: &SlotKey) -> IpAddr {
    if k.family == AddressFamily::V4.code() {
        IpAddr::V4(Ipv4Addr::new(k.addr[0], k.addr[1], k.addr[2], k.addr[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(k.addr))
    }
}

fn direction(d: u8) -> &'static str {
    if d == HookDirection::Egress.code() {
        "egress"
    } else {
        "ingress"
    }
}

/// Every lowered map entry, for a plugin that programs the maps with its
/// own loader.
pub fn maps(
    l: &Lowering,
    slots: &[(EndpointKey, SlotKey, u32)],
    interfaces: Vec<(String, u32, Vec<EndpointKey>)>,
) -> String {
    let m = l.mirror();
    let mut nodes: Vec<_> = m.nodes.iter().collect();
    nodes.sort_by_key(|(i, _)| **i);
    let mut identities: Vec<_> = m.identities.iter().collect();
    identities.sort_by_key(|(i, _)| **i);
    let mut classes: Vec<_> = m.classes.iter().collect();
    classes.sort_by_key(|(i, _)| **i);
    let mut rules: Vec<_> = l.rules().collect();
    rules.sort_by_key(|(i, _)| **i);
    let mut bound: Vec<_> = m.slots.iter().collect();
    bound.sort_by_key(|(k, _)| (k.ifindex, k.direction, k.family, k.addr));
    let mut managed: Vec<_> = m.interfaces.iter().collect();
    managed.sort();
    let cap = l.capacity();
    let v = json!({
        "format": 2,
        "layout": {
            // Rows of `memberStride` words from word `base` of each map
            // (see `member_layout`): word base + row * stride + bit / 64.
            "memberStride": l.stride(),
            "memberLayouts": {
                "identities": {"base": member_base(m.layouts.0), "stride": member_stride(m.layouts.0)},
                "classes": {"base": member_base(m.layouts.1), "stride": member_stride(m.layouts.1)},
            },
            "maxWalk": MAX_WALK,
            "ops": {"leaf": NodeOp::Leaf.code(), "less": NodeOp::Less.code(), "bit": NodeOp::Bit.code()},
            "features": {
                "protocol": NodeFeature::Protocol.code(), "localPort": NodeFeature::LocalPort.code(),
                "peerPort": NodeFeature::PeerPort.code(), "icmpType": NodeFeature::IcmpType.code(),
                "icmpCode": NodeFeature::IcmpCode.code(),
            },
            "leafFlags": {"allow": LEAF_ALLOW, "logged": LEAF_LOGGED},
            "directions": {"egress": HookDirection::Egress.code(), "ingress": HookDirection::Ingress.code()},
            "families": {"ipv4": AddressFamily::V4.code(), "ipv6": AddressFamily::V6.code()},
        },
        "capacity": {
            "nodes": cap.nodes, "slots": cap.slots, "interfaces": cap.interfaces,
            "lpm4": cap.lpm4, "lpm6": cap.lpm6, "identities": cap.identities,
            "classes": cap.classes, "identityWords": cap.identity_words,
            "classWords": cap.class_words, "rules": cap.rules, "conntrack": cap.conntrack,
        },
        "nodes": nodes.into_iter().map(|(i, n)| json!({
            "index": i, "op": n.op, "feature": n.feature, "flags": n.flags,
            "value": n.value, "then": n.then, "otherwise": n.otherwise,
        })).collect::<Vec<_>>(),
        "slots": slots.iter().map(|(ep, k, root)| json!({
            "endpoint": ep.to_string(),
            "address": slot_addr(k).to_string(),
            "family": k.family,
            "direction": direction(k.direction),
            "root": root,
        })).collect::<Vec<_>>(),
        "boundSlots": bound.into_iter().map(|(k, v)| json!({
            "ifindex": k.ifindex,
            "address": slot_addr(k).to_string(),
            "family": k.family,
            "direction": direction(k.direction),
            "root": v.root,
            "zone": v.zone,
        })).collect::<Vec<_>>(),
        "interfaces": managed.into_iter().map(|(i, z)| json!({"ifindex": i, "zone": z})).collect::<Vec<_>>(),
        "attached": interfaces.into_iter().map(|(name, ifindex, eps)| json!({
            "interface": name,
            "ifindex": ifindex,
            "endpoints": eps.iter().map(ToString::to_string).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "lpm4": m.lpm4.iter().map(|((len, a), c)| lpm(*len, IpAddr::V4(Ipv4Addr::from(*a)), c)).collect::<Vec<_>>(),
        "lpm6": m.lpm6.iter().map(|((len, a), c)| lpm(*len, IpAddr::V6(Ipv6Addr::from(*a)), c)).collect::<Vec<_>>(),
        "identities": identities.into_iter().map(|(i, b)| json!({"index": i, "bits": bits(b)})).collect::<Vec<_>>(),
        "classes": classes.into_iter().map(|(i, b)| json!({"index": i, "bits": bits(b)})).collect::<Vec<_>>(),
        "rules": rules.into_iter().map(|(i, r)| rule_json(*i, r)).collect::<Vec<_>>(),
    });
    v.to_string()
}
