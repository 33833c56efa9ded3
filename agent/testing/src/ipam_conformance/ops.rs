//! One scenario's state and its ops (names as in the corpus README).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use palisade_ipam::block::Block;
use palisade_ipam::cluster::{Labels, family};
use palisade_ipam::cni;
use palisade_ipam::store::{Expect, Write};
use palisade_ipam::{
    AssignIpArgs, Assignments, AutoAssignArgs, Cluster, Config, EnsureBlockArgs, FixedEnv,
    HostReserved, Ipam, IpamError, IpamStore, Release, Use,
};
use serde_json::{Value, json};

use super::expect::{self, Checked};
use super::{Objects, Outcome};

/// A scenario being run.
pub struct Run<'s> {
    store: &'s dyn IpamStore,
    objects: Objects,
    cluster: Cluster,
    refused: BTreeMap<String, IpamError>,
    env: FixedEnv,
    /// Hosts' blocks remembered across steps: the corpus also checks that
    /// a stale hint never changes an outcome.
    cache: palisade_ipam::IpamCache,
    local_host: String,
    pub saved: BTreeMap<String, Value>,
}

fn s<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

fn usage(v: &Value) -> Result<Option<Use>, String> {
    match v.as_str() {
        None => Ok(None),
        Some("Workload") => Ok(Some(Use::Workload)),
        Some("Tunnel") => Ok(Some(Use::Tunnel)),
        Some("LoadBalancer") => Ok(Some(Use::LoadBalancer)),
        Some(o) => Err(format!("unknown intendedUse {o:?}")),
    }
}

fn nets(v: &Value) -> Result<Vec<IpNet>, String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            let t = x.as_str().unwrap_or("");
            t.parse::<IpNet>().map_err(|e| format!("pool {t:?}: {e}"))
        })
        .collect()
}

fn reservation(v: &Value) -> Option<HostReserved> {
    if v.is_null() {
        return None;
    }
    Some(HostReserved {
        start_of_block: v["startOfBlock"].as_u64().unwrap_or(0) as u32,
        end_of_block: v["endOfBlock"].as_u64().unwrap_or(0) as u32,
        handle: s(v, "handle").unwrap_or("").to_string(),
        note: s(v, "note").unwrap_or("").to_string(),
    })
}

/// An assignment as the corpus reads it.
pub fn assignment_json(a: &Assignments) -> Value {
    json!({
        "ips": a.ips.iter().map(|n| n.addr().to_string()).collect::<Vec<_>>(),
        "ipNets": a.ips.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        "count": a.ips.len(),
        "numRequested": a.requested,
        "ipVersion": a.version,
        "msgs": a.msgs,
        "hostReservedAttr": a.host_reserved.as_ref().map(|r| json!({
            "startOfBlock": r.start_of_block, "endOfBlock": r.end_of_block,
            "handle": r.handle, "note": r.note})),
    })
}

impl std::fmt::Debug for Run<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("local_host", &self.local_host)
            .field("saved", &self.saved)
            .finish_non_exhaustive()
    }
}

impl<'s> Run<'s> {
    /// A scenario on an empty `store`: its config, nodes and objects loaded.
    pub fn new(doc: &Value, store: &'s dyn IpamStore) -> Result<Self, String> {
        let mut objects = Objects::default();
        for n in doc["nodes"].as_array().into_iter().flatten() {
            objects.nodes.insert(
                s(n, "name").unwrap_or("").to_string(),
                super::labels_of(&n["labels"]),
            );
        }
        for o in doc["objects"].as_array().into_iter().flatten() {
            objects.apply(o)?;
        }
        let (cluster, refused) = objects.cluster();
        let run = Run {
            store,
            objects,
            cluster,
            refused,
            env: FixedEnv::new(Duration::from_secs(1_800_000_000), 0x5eed),
            cache: palisade_ipam::IpamCache::new(),
            local_host: s(doc, "localHostname").unwrap_or("local-host").to_string(),
            saved: BTreeMap::new(),
        };
        if let Some(c) = doc.get("config").filter(|c| c.is_object()) {
            let config = Config {
                strict_affinity: c["strictAffinity"].as_bool().unwrap_or(false),
                auto_allocate_blocks: c["autoAllocateBlocks"].as_bool().unwrap_or(true),
                max_blocks_per_host: c["maxBlocksPerHost"].as_u64().unwrap_or(0) as u32,
            };
            if config != Config::default() {
                run.ipam().set_config(config).map_err(|e| e.to_string())?;
            }
        }
        Ok(run)
    }

    fn ipam(&self) -> Ipam<'_> {
        Ipam::new(self.store, &self.cluster, &self.env).with_cache(&self.cache)
    }

    fn host(&self, args: &Value) -> String {
        s(args, "hostname")
            .filter(|h| !h.is_empty())
            .unwrap_or(&self.local_host)
            .to_string()
    }

    fn rebuild(&mut self) {
        (self.cluster, self.refused) = self.objects.cluster();
    }

    /// Runs a step and checks it; Err says what did not hold.
    pub fn step(&mut self, step: &Value) -> Result<(), String> {
        let op = s(step, "op").unwrap_or("");
        let args = expect::resolve(&step["args"], &self.saved)?;
        let expect = expect::resolve(&step["expect"], &self.saved)?;
        let started = Instant::now();
        let mut got = self.run_op(op, &args)?;
        got.elapsed = started.elapsed();
        let checked = Checked::new(&got, &self.refused);
        checked.check(op, &expect, &self.saved, &|| self.blocks())?;
        if let Some(save) = step.get("save").and_then(Value::as_object) {
            for (field, var) in save {
                let value = got.values.get(field.as_str()).cloned().ok_or_else(|| {
                    format!("nothing to save as {var}: the op returned no {field}")
                })?;
                self.saved
                    .insert(var.as_str().unwrap_or("").to_string(), value);
            }
        }
        Ok(())
    }

    fn run_op(&mut self, op: &str, a: &Value) -> Result<Outcome, String> {
        let mut out = Outcome::default();
        match op {
            "autoAssign" => {
                let mut args = AutoAssignArgs::new(
                    &self.host(a),
                    a["num4"].as_u64().unwrap_or(0) as usize,
                    a["num6"].as_u64().unwrap_or(0) as usize,
                    usage(&a["intendedUse"])?.unwrap_or(Use::Workload),
                );
                args.handle = s(a, "handleID").map(String::from);
                args.attrs = super::labels_of(&a["attrs"]);
                args.ipv4_pools = nets(&a["ipv4Pools"])?;
                args.ipv6_pools = nets(&a["ipv6Pools"])?;
                args.max_blocks_per_host = a["maxBlocksPerHost"].as_u64().unwrap_or(0) as u32;
                args.max_alloc_per_handle =
                    a["maxAllocToHandlePerIPVersion"].as_u64().unwrap_or(0) as usize;
                args.host_reserved_v4 = reservation(&a["hostReservedAttrIPv4s"]);
                args.host_reserved_v6 = reservation(&a["hostReservedAttrIPv6s"]);
                args.namespace = s(a, "namespace").map(String::from);
                args.windows = s(a, "os") == Some("windows");
                let r = self.ipam().auto_assign(&args);
                out.error = r.error;
                for (k, v) in [("v4", &r.v4), ("v6", &r.v6)] {
                    let j = v.as_ref().map(assignment_json).unwrap_or(Value::Null);
                    if let Some(x) = v {
                        out.values.insert(
                            k,
                            json!(
                                x.ips
                                    .iter()
                                    .map(|n| n.addr().to_string())
                                    .collect::<Vec<_>>()
                            ),
                        );
                    }
                    out.fields.insert(k, j);
                }
            }
            "assignIP" => {
                let ip = ip_arg(a, "ip")?;
                let args = AssignIpArgs {
                    ip,
                    hostname: self.host(a),
                    handle: s(a, "handleID").map(String::from),
                    attrs: super::labels_of(&a["attrs"]),
                    intended_use: usage(&a["intendedUse"])?,
                    max_alloc_per_handle: a["maxAllocToHandlePerIPVersion"].as_u64().unwrap_or(0)
                        as usize,
                    host_reserved: reservation(&a["hostReservedAttrIPv4s"]),
                };
                out.error = self.ipam().assign_ip(&args).err();
            }
            "releaseIPs" => {
                let mut reqs = Vec::new();
                for item in a["ips"].as_array().into_iter().flatten() {
                    reqs.push(match item {
                        Value::String(t) => Release {
                            address: parse_ip(t)?,
                            handle: None,
                            sequence: None,
                        },
                        o => Release {
                            address: ip_arg(o, "address")?,
                            handle: s(o, "handle").map(String::from),
                            sequence: o["sequenceNumber"].as_u64(),
                        },
                    });
                }
                match self.ipam().release_ips(&reqs) {
                    Ok(r) => {
                        out.error = r.error;
                        out.fields.insert(
                            "unallocated",
                            json!(
                                r.unallocated
                                    .iter()
                                    .map(|i| i.to_string())
                                    .collect::<Vec<_>>()
                            ),
                        );
                        out.fields
                            .insert("unallocatedCount", json!(r.unallocated.len()));
                        out.fields.insert("releasedCount", json!(r.released));
                    }
                    Err(e) => out.error = Some(e),
                }
            }
            "releaseByHandle" => {
                out.error = self.ipam().release_by_handle(str_arg(a, "handleID")?).err()
            }
            "ipsByHandle" => match self.ipam().ips_by_handle(str_arg(a, "handleID")?) {
                Ok(ips) => {
                    let list = json!(ips.iter().map(|n| n.addr().to_string()).collect::<Vec<_>>());
                    out.fields.insert("ips", list.clone());
                    out.fields.insert("count", json!(ips.len()));
                    out.values.insert("ips", list);
                }
                Err(e) => out.error = Some(e),
            },
            "getAssignmentAttributes" => {
                match self.ipam().assignment_attributes(ip_arg(a, "ip")?) {
                    Ok((attrs, handle)) => {
                        out.fields.insert("attributes", json!(attrs));
                        out.fields.insert("activeOwnerAttrs", json!(attrs));
                        out.fields.insert("handleID", json!(handle));
                    }
                    Err(e) => {
                        out.error = Some(e);
                        out.fields.insert("attributes", Value::Null);
                    }
                }
            }
            "claimAffinity" => {
                let claims = self
                    .ipam()
                    .claim_affinity(&net_arg(a, "cidr")?, &self.host(a));
                out.fields
                    .insert("claimedCount", json!(claims.claimed.len()));
                out.fields.insert("failedCount", json!(claims.failed.len()));
                out.error = claims.error;
            }
            "releaseAffinity" => {
                let must = a["mustBeEmpty"].as_bool().unwrap_or(false);
                out.error = self
                    .ipam()
                    .release_affinity(&net_arg(a, "cidr")?, &self.host(a), must)
                    .err();
            }
            "releaseBlockAffinity" => {
                let must = a["mustBeEmpty"].as_bool().unwrap_or(false);
                out.error = self
                    .ipam()
                    .release_block_affinity_of(&net_arg(a, "cidr")?, must)
                    .err();
            }
            "releaseHostAffinities" => {
                let must = a["mustBeEmpty"].as_bool().unwrap_or(false);
                out.error = self
                    .ipam()
                    .release_host_affinities(&self.host(a), must)
                    .err();
            }
            "removeIPAMHost" => out.error = self.ipam().remove_ipam_host(&self.host(a)).err(),
            "getUtilization" => {
                let wanted: Vec<String> = a["pools"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect();
                match self.ipam().utilization(&wanted) {
                    Ok(pools) => {
                        out.fields.insert("poolCount", json!(pools.len()));
                        let orphan = wanted.is_empty();
                        let real = &pools[..pools.len() - usize::from(orphan)];
                        out.fields.insert(
                            "pools",
                            json!(real.iter().map(|p| {
                            let mut blocks: Vec<_> = p.blocks.iter().map(|b| json!({
                                "cidr": b.cidr.to_string(), "capacity": b.capacity as u64,
                                "inUse": b.in_use as u64, "reserved": b.reserved as u64,
                                "available": b.available as u64})).collect();
                            blocks.sort_by_key(|b| b["cidr"].as_str().unwrap_or("").to_string());
                            json!({"cidr": p.cidr.to_string(), "capacity": p.capacity as u64,
                                "inUse": p.in_use as u64, "reserved": p.reserved as u64,
                                "available": p.available as u64, "blockCount": p.blocks.len(),
                                "blocks": blocks})
                        }).collect::<Vec<_>>()),
                        );
                        out.fields.insert("allBlocks", json!(pools.iter().flat_map(|p| p.blocks.iter().map(|b| json!({"cidr": b.cidr.to_string(), "inUse": b.in_use as u64}))).collect::<Vec<_>>()));
                    }
                    Err(e) => out.error = Some(e),
                }
            }
            "ensureBlock" => {
                let args = EnsureBlockArgs {
                    hostname: self.host(a),
                    ipv4_pools: nets(&a["ipv4Pools"])?,
                    ipv6_pools: nets(&a["ipv6Pools"])?,
                    host_reserved_v4: reservation(&a["hostReservedAttrIPv4s"]),
                    host_reserved_v6: reservation(&a["hostReservedAttrIPv6s"]),
                    windows: s(a, "os") == Some("windows"),
                };
                match self.ipam().ensure_block(&args) {
                    Ok((v4, v6)) => {
                        for (k, v) in [("v4Block", v4), ("v6Block", v6)] {
                            if let Some(n) = v {
                                out.fields.insert(k, json!(n.to_string()));
                                out.values.insert(k, json!(n.to_string()));
                            }
                        }
                    }
                    Err(e) => out.error = Some(e),
                }
            }
            "getIPAMConfig" => match self.ipam().get_config(s(a, "os") == Some("windows")) {
                Ok(c) => {
                    out.fields.insert("config", json!({"strictAffinity": c.strict_affinity,
                        "autoAllocateBlocks": c.auto_allocate_blocks, "maxBlocksPerHost": c.max_blocks_per_host}));
                }
                Err(e) => out.error = Some(e),
            },
            "setIPAMConfig" => {
                let c = Config {
                    strict_affinity: a["strictAffinity"].as_bool().unwrap_or(false),
                    auto_allocate_blocks: a["autoAllocateBlocks"].as_bool().unwrap_or(true),
                    max_blocks_per_host: a["maxBlocksPerHost"].as_u64().unwrap_or(0) as u32,
                };
                out.error = self.ipam().set_config(c).err();
            }
            "listBlocks" => {
                let v = a["ipVersion"].as_u64().map(|v| v as u8);
                let blocks = self.ipam().records().blocks(v).map_err(|e| e.to_string())?;
                let cidrs: Vec<String> = blocks.iter().map(|(b, _)| b.cidr().to_string()).collect();
                out.fields.insert("count", json!(blocks.len()));
                out.fields.insert("cidrs", json!(cidrs));
                out.fields.insert(
                    "affinities",
                    json!(
                        blocks
                            .iter()
                            .map(|(b, _)| b.affinity.clone())
                            .collect::<Vec<_>>()
                    ),
                );
                out.values.insert("cidrs", json!(cidrs));
            }
            "listBlockAffinities" => {
                let v = a["ipVersion"].as_u64().map(|v| v as u8);
                let within = s(a, "within")
                    .map(|t| t.parse::<IpNet>())
                    .transpose()
                    .map_err(|e| e.to_string())?;
                let host = s(a, "hostname");
                let mut items = Vec::new();
                for (h, cidr, _) in self
                    .ipam()
                    .records()
                    .affinities()
                    .map_err(|e| e.to_string())?
                {
                    if host.is_some_and(|x| x != h)
                        || v.is_some_and(|v| family(&cidr) != v)
                        || within.is_some_and(|w| !w.contains(&cidr))
                        || s(a, "affinityType").is_some_and(|t| {
                            (t == "virtual") != (h == palisade_ipam::cluster::LOAD_BALANCER_NODE)
                        })
                    {
                        continue;
                    }
                    let block = self
                        .ipam()
                        .records()
                        .block(&cidr)
                        .map_err(|e| e.to_string())?;
                    items.push(
                        json!({"host": h, "cidr": cidr.to_string(), "state": "confirmed",
                        "blockAffinity": block.map(|(b, _)| b.affinity)}),
                    );
                }
                let cidrs: Vec<_> = items.iter().map(|i| i["cidr"].clone()).collect();
                out.fields.insert("count", json!(items.len()));
                out.fields.insert("items", json!(items));
                out.values.insert("cidrs", json!(cidrs));
            }
            "sequenceNumberForIP" => {
                let ip = ip_arg(a, "ip")?;
                let block = self.block_holding(ip)?;
                let seq = block.sequence_of(ip).ok_or("address not in its block")?;
                out.fields.insert("seq", json!(seq));
                out.values.insert("seq", json!(seq));
            }
            "ageBlock" => {
                let cidr = net_arg(a, "cidr")?;
                let secs = a["seconds"].as_u64().unwrap_or(0);
                // A writer like any other: on a conflict it reads again.
                let mut attempts = 0;
                loop {
                    let entry = self
                        .store
                        .get(&palisade_ipam::store::block_key(&cidr))
                        .map_err(|e| e.to_string())?
                        .ok_or(format!("no block {cidr} to age"))?;
                    let mut b = Block::from_json(&entry.value)?;
                    b.affinity_claimed_at = b.affinity_claimed_at.map(|t| t.saturating_sub(secs));
                    match self.store.commit(&[Write::Put {
                        key: entry.key,
                        value: b.to_json(),
                        expect: Expect::At(entry.revision),
                    }]) {
                        Ok(()) => break,
                        Err(palisade_ipam::store::StoreError::Conflict { .. })
                            if attempts < 100 =>
                        {
                            attempts += 1;
                        }
                        Err(e) => return Err(e.to_string()),
                    }
                }
            }
            "applyNode" => {
                self.objects.nodes.insert(
                    str_arg(a, "name")?.to_string(),
                    super::labels_of(&a["labels"]),
                );
                self.rebuild();
            }
            "applyObject" => {
                self.objects
                    .apply(&a["object"])
                    .map_err(|e| e.to_string())?;
                self.rebuild();
            }
            "deleteObject" => {
                self.objects
                    .delete(str_arg(a, "kind")?, str_arg(a, "name")?);
                self.rebuild();
            }
            "ipsWithinAffineBlocks" => {
                let hosts: Vec<&str> = a["hostnames"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let handles: Vec<&str> = a["handleIDs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let count = a["count"].as_u64().unwrap_or(0) as usize;
                let mut holds = true;
                for (h, handle) in hosts.iter().zip(&handles) {
                    let blocks: Vec<IpNet> = self
                        .ipam()
                        .records()
                        .host_blocks(h, None)
                        .map_err(|e| e.to_string())?
                        .into_iter()
                        .map(|(c, _)| c)
                        .collect();
                    if blocks.is_empty() {
                        continue;
                    }
                    let ips = self.ipam().ips_by_handle(handle).unwrap_or_default();
                    holds &= ips.len() == count
                        && ips
                            .iter()
                            .all(|n| blocks.iter().any(|b| b.contains(&n.addr())));
                }
                out.fields.insert("holds", json!(holds));
            }
            "determinePools" => {
                let node = self
                    .cluster
                    .nodes
                    .get(&self.host(a))
                    .cloned()
                    .unwrap_or_default();
                let ns = s(a, "namespace").and_then(|n| self.cluster.namespaces.get(n));
                let version = a["version"].as_u64().unwrap_or(4) as u8;
                let max = a["maxPrefixLen"]
                    .as_u64()
                    .unwrap_or(if version == 4 { 32 } else { 128 }) as u8;
                let requested = nets(&a["requestedPools"])?;
                match self
                    .cluster
                    .determine_pools(&requested, version, &node, ns, max)
                {
                    Ok((chosen, enabled)) => {
                        out.fields.insert(
                            "pools",
                            json!(chosen.iter().map(|p| p.name.clone()).collect::<Vec<_>>()),
                        );
                        out.fields.insert("enabledPoolCount", json!(enabled.len()));
                    }
                    Err(e) => {
                        out.error = Some(e);
                        out.fields.insert("pools", json!([]));
                    }
                }
            }
            "selectsNamespace" => {
                let pool = str_arg(a, "pool")?;
                let ns = &a["namespace"];
                let labels: Option<Labels> =
                    (!ns["labels"].is_null()).then(|| super::labels_of(&ns["labels"]));
                match self.cluster.pool(pool) {
                    Some(p) => {
                        let m = palisade_ipam::cluster::selects_namespace(
                            p.namespace_selector.as_ref(),
                            Some(&labels.unwrap_or_default()),
                        );
                        out.fields.insert("matches", json!(m));
                    }
                    None => {
                        out.fields.insert("matches", json!(false));
                        out.error = self
                            .refused
                            .get(pool)
                            .cloned()
                            .or(Some(IpamError::InvalidConfig(format!("no pool {pool}"))));
                    }
                }
            }
            "poolBlocks" => {
                let p = self
                    .cluster
                    .pool(str_arg(a, "pool")?)
                    .ok_or("no such pool")?;
                let walk = self.ipam().walk(p, &self.host(a));
                let n = walk.count().min(1 << 20);
                let all_within = (0..n).all(|k| p.cidr.contains(&walk.at(k)));
                let distinct: std::collections::BTreeSet<IpNet> =
                    (0..n).map(|k| walk.at(k)).collect();
                out.fields.insert("count", json!(distinct.len()));
                out.fields.insert("allWithinPool", json!(all_within));
            }
            "partialFulfillmentError" => {
                let version = a["ipVersion"].as_u64().unwrap_or(4) as u8;
                let n = a["numAssigned"].as_u64().unwrap_or(0) as usize;
                let fake: IpNet = if version == 4 {
                    "192.0.2.1/32".parse()
                } else {
                    "2001:db8::1/128".parse()
                }
                .map_err(|e: ipnet::AddrParseError| e.to_string())?;
                let ia = Assignments {
                    ips: vec![fake; n],
                    version,
                    requested: a["numRequested"].as_u64().unwrap_or(0) as usize,
                    host_reserved: reservation(&a["hostReservedAttr"]),
                    msgs: a["msgs"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|m| m.as_str().map(String::from))
                        .collect(),
                };
                out.text_error = ia
                    .partial_fulfillment_error()
                    .map(|m| ("partialFulfillment", m));
            }
            "ipamAdd" | "ipamDel" | "cniAdd" | "cniDel" => self.cni(op, a, &mut out)?,
            other => return Err(format!("unknown op {other:?}")),
        }
        Ok(out)
    }

    fn cni(&self, op: &str, a: &Value, out: &mut Outcome) -> Result<(), String> {
        let pod = match (s(a, "pod"), s(a, "namespace")) {
            (Some(name), Some(ns)) => {
                let annotations = |v: Option<&Value>| {
                    v.map(|d| super::labels_of(&d["metadata"]["annotations"]))
                        .unwrap_or_default()
                };
                Some(cni::PodInfo {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                    namespace_annotations: annotations(self.objects.namespaces.get(ns)),
                    annotations: annotations(
                        self.objects.pods.get(&(ns.to_string(), name.to_string())),
                    ),
                })
            }
            _ => None,
        };
        let req = cni::CniRequest {
            netconf: &a["netconf"],
            container_id: s(a, "containerID").unwrap_or(""),
            ip: s(&a["cniArgs"], "IP").map(parse_ip).transpose()?,
            pod,
            local_host: &self.local_host,
            reuse_existing: op == "cniAdd"
                && a["netconf"]["policy"]["type"].as_str() != Some("k8s"),
        };
        let ipam = self.ipam();
        let failed = if op.ends_with("Add") {
            match cni::add(&ipam, &req) {
                Ok(r) => {
                    let ips: Vec<String> = r.ips.iter().map(|n| n.to_string()).collect();
                    out.values.insert(
                        "ips",
                        json!(
                            r.ips
                                .iter()
                                .map(|n| n.addr().to_string())
                                .collect::<Vec<_>>()
                        ),
                    );
                    out.fields.insert("result", json!({"ips": ips, "routes": r.routes.iter().map(|n| n.to_string()).collect::<Vec<_>>()}));
                    None
                }
                Err(e) => Some(e),
            }
        } else {
            out.fields
                .insert("result", json!({"ips": [], "routes": []}));
            cni::del(&ipam, &req).err()
        };
        if let Some(e) = failed {
            out.text_error = Some((e.kind(), e.to_string()));
            out.fields
                .insert("result", json!({"ips": [], "routes": []}));
        }
        out.fields.insert(
            "exitCode",
            json!(if failed_exit(&out.text_error) {
                "nonzero".into()
            } else {
                json!(0)
            }),
        );
        Ok(())
    }

    fn block_holding(&self, ip: IpAddr) -> Result<Block, String> {
        let blocks = self
            .ipam()
            .records()
            .blocks(None)
            .map_err(|e| e.to_string())?;
        blocks
            .into_iter()
            .map(|(b, _)| b)
            .find(|b| b.cidr().contains(&ip))
            .ok_or(format!("no block holds {ip}"))
    }

    /// Every block (for expectations that look inside).
    pub fn blocks(&self) -> Vec<Block> {
        self.ipam()
            .records()
            .blocks(None)
            .map(|v| v.into_iter().map(|(b, _)| b).collect())
            .unwrap_or_default()
    }
}

fn failed_exit(e: &Option<(&'static str, String)>) -> bool {
    e.is_some()
}

fn parse_ip(t: &str) -> Result<IpAddr, String> {
    t.parse().map_err(|e| format!("address {t:?}: {e}"))
}

fn ip_arg(a: &Value, k: &str) -> Result<IpAddr, String> {
    parse_ip(s(a, k).ok_or(format!("args.{k} missing"))?)
}

fn net_arg(a: &Value, k: &str) -> Result<IpNet, String> {
    let t = s(a, k).ok_or(format!("args.{k} missing"))?;
    t.parse().map_err(|e| format!("args.{k} {t:?}: {e}"))
}

fn str_arg<'a>(a: &'a Value, k: &str) -> Result<&'a str, String> {
    s(a, k).ok_or(format!("args.{k} missing"))
}
