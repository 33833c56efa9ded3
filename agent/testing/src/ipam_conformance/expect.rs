//! Variables (`$name`, `$name[i]`, `$name[i:j]`, `$name+N`) and the
//! expectation checks of the IPAM corpus.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use palisade_ipam::IpamError;
use serde_json::Value;

use palisade_ipam::block::Block;

use super::Outcome;

/// Resolves one `$…` reference; None when `text` is not one.
fn lookup(text: &str, saved: &BTreeMap<String, Value>) -> Result<Option<Value>, String> {
    let Some(body) = text.strip_prefix('$') else {
        return Ok(None);
    };
    if let Some((name, plus)) = body.split_once('+') {
        let base = saved
            .get(name)
            .and_then(Value::as_u64)
            .ok_or(format!("${name} is not a saved number"))?;
        let n: u64 = plus.parse().map_err(|_| format!("bad offset in {text}"))?;
        return Ok(Some(Value::from(base + n)));
    }
    let (name, index) = match body.split_once('[') {
        Some((n, rest)) => (n, Some(rest.trim_end_matches(']'))),
        None => (body, None),
    };
    let value = saved.get(name).ok_or(format!("${name} was never saved"))?;
    let Some(index) = index else {
        return Ok(Some(value.clone()));
    };
    let list = value.as_array().ok_or(format!("${name} is not a list"))?;
    let at = |t: &str, default: usize| -> Result<usize, String> {
        if t.is_empty() {
            Ok(default)
        } else {
            t.parse().map_err(|_| format!("bad index in {text}"))
        }
    };
    Ok(Some(match index.split_once(':') {
        Some((i, j)) => {
            let (i, j) = (at(i, 0)?, at(j, list.len())?);
            Value::Array(
                list.get(i..j)
                    .ok_or(format!("{text} is out of range"))?
                    .to_vec(),
            )
        }
        None => list
            .get(at(index, 0)?)
            .cloned()
            .ok_or(format!("{text} is out of range"))?,
    }))
}

/// Replaces references in a step's args or expectation; a reference to a
/// list inside a list is spliced in.
pub fn resolve(v: &Value, saved: &BTreeMap<String, Value>) -> Result<Value, String> {
    Ok(match v {
        Value::String(t) => lookup(t, saved)?.unwrap_or_else(|| v.clone()),
        Value::Array(items) => {
            let mut out = Vec::new();
            for i in items {
                match i {
                    Value::String(t) => match lookup(t, saved)? {
                        Some(Value::Array(xs)) => out.extend(xs),
                        Some(x) => out.push(x),
                        None => out.push(i.clone()),
                    },
                    other => out.push(resolve(other, saved)?),
                }
            }
            Value::Array(out)
        }
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| Ok((k.clone(), resolve(x, saved)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::Array(xs) => xs.iter().flat_map(strings).collect(),
        Value::String(s) => vec![s.clone()],
        _ => Vec::new(),
    }
}

fn set(v: &Value) -> BTreeSet<String> {
    strings(v).into_iter().collect()
}

fn nets(v: &Value) -> Vec<IpNet> {
    strings(v)
        .iter()
        .filter_map(|s| {
            s.parse::<IpNet>()
                .ok()
                .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
        })
        .collect()
}

fn addrs(v: &Value) -> Vec<IpAddr> {
    strings(v)
        .iter()
        .filter_map(|s| {
            s.parse::<IpAddr>()
                .ok()
                .or_else(|| s.parse::<IpNet>().ok().map(|n| n.addr()))
        })
        .collect()
}

/// An outcome, ready to be compared.
pub struct Checked<'a> {
    got: &'a Outcome,
    refused: &'a BTreeMap<String, IpamError>,
}

fn eq(what: &str, want: &Value, got: &Value) -> Result<(), String> {
    if want == got {
        Ok(())
    } else {
        Err(format!("{what}: want {want}, got {got}"))
    }
}

impl<'a> Checked<'a> {
    pub fn new(got: &'a Outcome, refused: &'a BTreeMap<String, IpamError>) -> Self {
        Checked { got, refused }
    }

    fn field(&self, k: &str) -> Value {
        self.got.fields.get(k).cloned().unwrap_or(Value::Null)
    }

    fn check_error(&self, want: &Value) -> Result<(), String> {
        let text = self
            .got
            .error
            .as_ref()
            .map(|e| (e.kind(), e.to_string()))
            .or_else(|| self.got.text_error.clone());
        if want.is_null() {
            return match text {
                None => Ok(()),
                Some((k, m)) => Err(format!("want success, got {k}: {m}")),
            };
        }
        let want_kind = want["kind"].as_str().unwrap_or("");
        let Some((kind, message)) = text else {
            // Admission may refuse what upstream only rejects later (a pool
            // with an unparsable selector): the refusal is the error.
            if want_kind == "invalidSelector"
                && self.refused.values().any(
                    |e| matches!(e, IpamError::InvalidPool(p) if p.field.ends_with("Selector")),
                )
            {
                return Ok(());
            }
            return Err(format!("want error {want_kind}, got success"));
        };
        let selector_refusal = want_kind == "invalidSelector"
            && matches!(self.got.error, Some(IpamError::InvalidPool(ref p)) if p.field.ends_with("Selector"));
        if want["kindAsserted"].as_bool().unwrap_or(true) && kind != want_kind && !selector_refusal
        {
            return Err(format!("want error {want_kind}, got {kind}: {message}"));
        }
        if let Some(m) = want["message"].as_str()
            && m != message
        {
            return Err(format!("error text: want {m:?}, got {message:?}"));
        }
        if let Some(m) = want["messageContains"].as_str()
            && !message.contains(m)
        {
            return Err(format!("error text {message:?} lacks {m:?}"));
        }
        Ok(())
    }

    /// Checks every key of `expect`; unknown keys fail.
    pub fn check(
        &self,
        op: &str,
        expect: &Value,
        saved: &BTreeMap<String, Value>,
        blocks: &dyn Fn() -> Vec<Block>,
    ) -> Result<(), String> {
        let Some(map) = expect.as_object() else {
            return Ok(());
        };
        for (k, want) in map {
            match (op, k.as_str()) {
                (_, "error") => self.check_error(want)?,
                ("autoAssign", "v4" | "v6") => {
                    self.check_assignment(k, want, &self.field(k), saved, blocks)?
                }
                (_, "withinSeconds") => {
                    let limit = want.as_f64().unwrap_or(f64::MAX);
                    let took = self.got.elapsed.as_secs_f64();
                    if took > limit {
                        return Err(format!("took {took:.2}s, upstream allows {limit}s"));
                    }
                }
                ("releaseIPs" | "ipsByHandle", "unallocated" | "ips") => {
                    let got = set(&self.field(k));
                    if set(want) != got {
                        return Err(format!("{k}: want {want} (as a set), got {got:?}"));
                    }
                }
                ("ipsByHandle", "sameAsSaved") => {
                    let want = set(saved
                        .get(want.as_str().unwrap_or(""))
                        .unwrap_or(&Value::Null));
                    if want != set(&self.field("ips")) {
                        return Err(format!("ips: want the saved {want:?}"));
                    }
                }
                ("getAssignmentAttributes", "attributes") if want.is_null() => {
                    if !self.field("attributes").is_null() {
                        return Err("want no attributes".into());
                    }
                }
                ("getAssignmentAttributes", "handleID" | "activeOwnerAttrs") => {
                    eq(k, want, &self.field(k))?
                }
                ("getUtilization", "pools") => eq(k, want, &self.field("pools"))?,
                ("getUtilization", "hasBlock") => {
                    let all = self.field("allBlocks");
                    for hb in want.as_array().into_iter().flatten() {
                        let found = all.as_array().into_iter().flatten().any(|b| {
                            b["cidr"] == hb["cidr"]
                                && (hb["inUse"].is_null() || b["inUse"] == hb["inUse"])
                        });
                        if found != hb["present"].as_bool().unwrap_or(true) {
                            return Err(format!("hasBlock {hb}: found={found}"));
                        }
                    }
                }
                ("ipamAdd" | "ipamDel" | "cniAdd" | "cniDel", "exitCode") => {
                    eq(k, want, &self.field("exitCode"))?
                }
                // DEL prints no result: no addresses, no routes.
                ("ipamAdd" | "cniAdd" | "ipamDel" | "cniDel", "result") => {
                    self.check_cni_result(want, saved)?
                }
                ("ensureBlock", "v4Block" | "v6Block") => {
                    let got = self.field(k);
                    let got_net: Option<IpNet> = got.as_str().and_then(|s| s.parse().ok());
                    if let Some(w) = want.get("within").and_then(Value::as_str) {
                        let w: IpNet = w.parse().map_err(|e| format!("{w}: {e}"))?;
                        if !got_net.is_some_and(|g| w.contains(&g)) {
                            return Err(format!("{k}: want within {w}, got {got}"));
                        }
                    }
                    if let Some(var) = want.get("sameAsSaved").and_then(Value::as_str) {
                        eq(k, saved.get(var).unwrap_or(&Value::Null), &got)?;
                    }
                }
                ("getIPAMConfig", "config") => {
                    let got = self.field("config");
                    for (ck, cv) in want.as_object().into_iter().flatten() {
                        eq(ck, cv, &got[ck])?;
                    }
                }
                ("listBlocks", "allAffinity") => {
                    for a in self.field("affinities").as_array().into_iter().flatten() {
                        eq("affinity", want, a)?;
                    }
                }
                ("listBlocks" | "listBlockAffinities", "coversPools") => {
                    let cidrs = nets(&self.cidrs());
                    for p in nets(want) {
                        if !cidrs.iter().any(|c| p.contains(c)) {
                            return Err(format!("no block in {p}"));
                        }
                    }
                }
                ("listBlockAffinities", "hosts") => {
                    let mut got: Vec<String> = self
                        .items()
                        .iter()
                        .map(|i| i["host"].as_str().unwrap_or("").to_string())
                        .collect();
                    let mut w = strings(want);
                    got.sort();
                    w.sort();
                    if got != w {
                        return Err(format!("hosts: want {w:?}, got {got:?}"));
                    }
                }
                ("listBlockAffinities", "allStates") => {
                    for i in self.items() {
                        eq("state", want, &i["state"])?;
                    }
                }
                ("listBlockAffinities", "matchBlocks") if want.as_bool() == Some(true) => {
                    for i in self.items() {
                        let want_aff =
                            Value::from(format!("host:{}", i["host"].as_str().unwrap_or("")));
                        eq(
                            &format!("block {} affinity", i["cidr"]),
                            &want_aff,
                            &i["blockAffinity"],
                        )?;
                    }
                }
                ("listBlockAffinities", "allIn") => {
                    let outer = nets(want);
                    for c in nets(&self.cidrs()) {
                        if !outer.iter().any(|o| o.contains(&c)) {
                            return Err(format!("block {c} is outside {want}"));
                        }
                    }
                }
                ("listBlockAffinities", "containsSavedIPs") => {
                    let blocks = nets(&self.cidrs());
                    for var in strings(want) {
                        for ip in addrs(saved.get(&var).unwrap_or(&Value::Null)) {
                            if !blocks.iter().any(|b| b.contains(&ip)) {
                                return Err(format!("saved {ip} (${var}) is in no listed block"));
                            }
                        }
                    }
                }
                ("sequenceNumberForIP", "equalsSavedPlus") => {
                    let var = want[0].as_str().unwrap_or("");
                    let base = saved
                        .get(var)
                        .and_then(Value::as_u64)
                        .ok_or(format!("${var} not saved"))?;
                    let n = want[1].as_u64().unwrap_or(0);
                    eq(
                        "sequence number",
                        &Value::from(base + n),
                        &self.field("seq"),
                    )?;
                }
                ("determinePools", "poolsUnordered") => {
                    if set(want) != set(&self.field("pools")) {
                        return Err(format!(
                            "pools: want {want} in any order, got {}",
                            self.field("pools")
                        ));
                    }
                }
                (
                    "releaseIPs"
                    | "ipsByHandle"
                    | "claimAffinity"
                    | "listBlocks"
                    | "listBlockAffinities"
                    | "determinePools"
                    | "selectsNamespace"
                    | "poolBlocks"
                    | "getUtilization"
                    | "ipsWithinAffineBlocks",
                    _,
                ) if self.got.fields.contains_key(k.as_str()) => eq(k, want, &self.field(k))?,
                (
                    _,
                    "count" | "matches" | "pools" | "enabledPoolCount" | "claimedCount"
                    | "failedCount" | "poolCount",
                ) if !self.got.fields.contains_key(k.as_str()) && self.got.error.is_some() => {
                    return Err(format!("{k}: want {want}, the call failed"));
                }
                _ => {
                    return Err(format!(
                        "expectation {k:?} of {op} is not understood by this runner"
                    ));
                }
            }
        }
        Ok(())
    }

    fn check_cni_result(
        &self,
        want: &Value,
        saved: &BTreeMap<String, Value>,
    ) -> Result<(), String> {
        let got = self.field("result");
        let ips = nets(&got["ips"]);
        let routes = nets(&got["routes"]);
        let addresses: Vec<IpAddr> = ips.iter().map(|n| n.addr()).collect();
        let saved_set = |v: &Value| -> BTreeSet<IpAddr> {
            strings(v)
                .iter()
                .flat_map(|var| addrs(saved.get(var).unwrap_or(&Value::Null)))
                .collect()
        };
        for (k, w) in want.as_object().into_iter().flatten() {
            let what = format!("result.{k}");
            let prefix_of = |v: u8| {
                ips.iter()
                    .find(|n| palisade_ipam::cluster::family(n) == v)
                    .map(|n| Value::from(n.prefix_len()))
                    .unwrap_or(Value::Null)
            };
            match k.as_str() {
                "ipCount" => eq(&what, w, &Value::from(ips.len()))?,
                "ips" => eq(&what, w, &got["ips"])?,
                "addresses" => eq(
                    &what,
                    w,
                    &Value::from(addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>()),
                )?,
                "families" => eq(
                    &what,
                    w,
                    &Value::from(
                        ips.iter()
                            .map(palisade_ipam::cluster::family)
                            .collect::<Vec<_>>(),
                    ),
                )?,
                "v4PrefixLen" => eq(&what, w, &prefix_of(4))?,
                "v6PrefixLen" => eq(&what, w, &prefix_of(6))?,
                "routeCount" => eq(&what, w, &Value::from(routes.len()))?,
                "routesCoverIPs" => {
                    let covered = addresses
                        .iter()
                        .all(|a| routes.iter().any(|r| r.contains(a)));
                    eq(&what, w, &Value::from(covered))?
                }
                "allIn" => {
                    let outer = nets(w);
                    if let Some(a) = addresses
                        .iter()
                        .find(|a| !outer.iter().any(|o| o.contains(*a)))
                    {
                        return Err(format!("{what}: {a} is outside {w}"));
                    }
                }
                "sameAsSaved" => {
                    if saved_set(w) != addresses.iter().copied().collect() {
                        return Err(format!(
                            "{what}: want the saved {:?}, got {addresses:?}",
                            saved_set(w)
                        ));
                    }
                }
                "disjointFromSaved" => {
                    let before = saved_set(w);
                    if let Some(a) = addresses.iter().find(|a| before.contains(a)) {
                        return Err(format!("{what}: {a} was saved before"));
                    }
                }
                _ => {
                    return Err(format!(
                        "expectation {what:?} is not understood by this runner"
                    ));
                }
            }
        }
        Ok(())
    }

    fn cidrs(&self) -> Value {
        match self.got.fields.get("cidrs") {
            Some(c) => c.clone(),
            None => Value::Array(self.items().iter().map(|i| i["cidr"].clone()).collect()),
        }
    }

    fn items(&self) -> Vec<Value> {
        self.field("items").as_array().cloned().unwrap_or_default()
    }

    fn check_assignment(
        &self,
        fam: &str,
        want: &Value,
        got: &Value,
        saved: &BTreeMap<String, Value>,
        blocks: &dyn Fn() -> Vec<Block>,
    ) -> Result<(), String> {
        if want.is_null() {
            return if got.is_null() {
                Ok(())
            } else {
                Err(format!("{fam}: want no assignment, got {got}"))
            };
        }
        if got.is_null() {
            return Err(format!("{fam}: want {want}, got no assignment"));
        }
        let ips = addrs(&got["ips"]);
        let saved_set = |v: &Value| -> BTreeSet<IpAddr> {
            strings(v)
                .iter()
                .flat_map(|var| addrs(saved.get(var).unwrap_or(&Value::Null)))
                .collect()
        };
        for (k, w) in want.as_object().into_iter().flatten() {
            let what = format!("{fam}.{k}");
            match k.as_str() {
                "count" | "numRequested" | "ipVersion" | "msgs" | "hostReservedAttr" | "ipNets"
                | "ips" => eq(&what, w, &got[k])?,
                "allIn" => {
                    let outer = nets(w);
                    if let Some(ip) = ips.iter().find(|ip| !outer.iter().any(|o| o.contains(*ip))) {
                        return Err(format!("{what}: {ip} is outside {w}"));
                    }
                }
                "noneOf" => {
                    let bad = set(w);
                    if let Some(ip) = ips.iter().find(|ip| bad.contains(&ip.to_string())) {
                        return Err(format!("{what}: {ip} must not be given"));
                    }
                }
                "sameAsSaved" => {
                    let want_set = saved_set(w);
                    if want_set != ips.iter().copied().collect() {
                        return Err(format!("{what}: want {want_set:?}, got {ips:?}"));
                    }
                }
                "subsetOfSaved" => {
                    let want_set = saved_set(w);
                    if !ips.iter().all(|i| want_set.contains(i)) {
                        return Err(format!("{what}: {ips:?} not within {want_set:?}"));
                    }
                }
                "disjointFromSaved" => {
                    let want_set = saved_set(w);
                    if let Some(ip) = ips.iter().find(|i| want_set.contains(i)) {
                        return Err(format!("{what}: {ip} was saved before"));
                    }
                }
                "hostOffsetsNotIn" => {
                    let size = w["blockSize"].as_u64().unwrap_or(32) as u8;
                    let offsets: BTreeSet<u64> = w["offsets"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_u64)
                        .collect();
                    for ip in &ips {
                        let block = IpNet::new(*ip, size).map_err(|e| e.to_string())?.trunc();
                        let off = match (ip, block.network()) {
                            (IpAddr::V4(a), IpAddr::V4(n)) => {
                                u64::from(u32::from(*a) - u32::from(n))
                            }
                            (IpAddr::V6(a), IpAddr::V6(n)) => {
                                (u128::from(*a) - u128::from(n)) as u64
                            }
                            _ => 0,
                        };
                        if offsets.contains(&off) {
                            return Err(format!("{what}: {ip} is at offset {off} of its block"));
                        }
                    }
                }
                "blockReservedHandle" => {
                    let handle = w.as_str().unwrap_or("");
                    for ip in &ips {
                        let block = blocks()
                            .into_iter()
                            .find(|b| b.cidr().contains(ip))
                            .ok_or(format!("{what}: no block holds {ip}"))?;
                        if block.ips_by_handle(handle).is_empty() {
                            return Err(format!(
                                "{what}: block {} has nothing under {handle}",
                                block.cidr()
                            ));
                        }
                    }
                }
                _ => {
                    return Err(format!(
                        "expectation {what:?} is not understood by this runner"
                    ));
                }
            }
        }
        Ok(())
    }
}
