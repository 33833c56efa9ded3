//! Kinds the datastore stores for other layers than the policy engine: IP
//! pools, IP reservations and nodes for IPAM, validated as Calico validates
//! them (pools by palisade-ipam, overlaps across the store and the batch),
//! and the IPAM cluster view they make; Services for the service dataplane,
//! validated by palisade-services.

use std::collections::BTreeMap;

use ipnet::IpNet;
use palisade_ipam::{Cluster, Pool};
use policy_core::Origin;
use policy_core::{Error, Errors, ObjectRef};
use serde_json::Value;

use crate::kinds::{KindInfo, document_ref};
use crate::{Snapshot, StoredObject};

/// A document of a non-policy kind, as read from a manifest.
#[derive(Debug, Clone)]
pub struct Resource {
    /// Where it was read.
    pub origin: Origin,
    /// Its kind.
    pub info: &'static KindInfo,
    /// Its reference.
    pub object: ObjectRef,
    /// The document.
    pub document: Value,
}

fn labels(v: &Value) -> Option<BTreeMap<String, String>> {
    match v {
        Value::Null => Some(BTreeMap::new()),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
            .collect(),
        _ => None,
    }
}

fn reserved_cidrs(doc: &Value) -> Result<Vec<IpNet>, String> {
    let list = doc["spec"]["reservedCIDRs"]
        .as_array()
        .ok_or("spec.reservedCIDRs: required, a list of CIDRs or addresses")?;
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            let t = v.as_str().unwrap_or("").trim();
            t.parse::<IpNet>()
                .map(|n| n.trunc())
                .or_else(|_| t.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| format!("spec.reservedCIDRs[{i}]: {t:?} is not a CIDR or address"))
        })
        .collect()
}

/// Checks one document alone; the error names the field.
fn check_one(r: &Resource) -> Result<Option<Pool>, Error> {
    let bad = |field: &str, msg: String| Error::invalid(field.to_string(), msg);
    match r.info.kind {
        "IPPool" => Pool::from_document(&r.document)
            .map(Some)
            .map_err(|e| bad(&e.field, e.message)),
        "IPReservation" => reserved_cidrs(&r.document)
            .map(|_| None)
            .map_err(|m| bad("spec.reservedCIDRs", m)),
        "FelixConfiguration" => palisade_network::natout::NatSettings::from_document(&r.document)
            .map(|_| None)
            .map_err(|e| bad(e.field, e.message)),
        "Service" => palisade_services::Objects::from_documents([&r.document])
            .map(|_| None)
            .map_err(
                |palisade_services::ServiceError::Invalid { field, reason, .. }| {
                    bad(&field, reason)
                },
            ),
        _ => labels(&r.document["metadata"]["labels"])
            .map(|_| None)
            .ok_or_else(|| bad("metadata.labels", "labels are a map of strings".into())),
    }
}

/// Validates a batch of resources against what is stored: each document,
/// then pool overlaps over the stored pools with the batch applied. A
/// rejected batch changes nothing.
pub fn validate(stored: &Snapshot, batch: &[Resource]) -> Result<(), Errors> {
    let mut errors = Errors::new();
    let mut pools: BTreeMap<String, (Pool, Option<Origin>)> = BTreeMap::new();
    for o in &stored.objects {
        if let Some((info, _)) = document_ref(&o.document)
            && info.kind == "IPPool"
            && let Ok(p) = Pool::from_document(&o.document)
        {
            pools.insert(p.name.clone(), (p, None));
        }
    }
    for r in batch {
        match check_one(r) {
            Ok(Some(pool)) => {
                pools.insert(pool.name.clone(), (pool, Some(r.origin.clone())));
            }
            Ok(None) => {}
            Err(e) => errors.push(e.on(r.object.clone()).from_origin(r.origin.clone())),
        }
    }
    // Each pool of the batch against every other pool: the error is on the
    // pool being applied, naming the one it overlaps.
    for (name, (pool, origin)) in &pools {
        let Some(origin) = origin else { continue };
        let other = pools.iter().find(|(n, (p, _))| {
            *n != name
                && (p.cidr.contains(&pool.cidr.network()) || pool.cidr.contains(&p.cidr.network()))
        });
        if let Some((_, (p, _))) = other {
            errors.push(
                Error::invalid(
                    "spec.cidr",
                    format!("{} overlaps IPPool {} ({})", pool.cidr, p.name, p.cidr),
                )
                .on(ObjectRef::new("IPPool", None, name.clone()))
                .from_origin(origin.clone()),
            );
        }
    }
    errors.or_ok(())
}

/// The IPAM view of stored objects: pools, nodes and reservations (objects
/// that do not validate are left out; the store refused them at apply).
pub fn cluster<'a>(objects: impl IntoIterator<Item = &'a StoredObject>) -> Cluster {
    let mut pools = Vec::new();
    let mut cluster = Cluster::new();
    for o in objects {
        let Some((info, r)) = document_ref(&o.document) else {
            continue;
        };
        match info.kind {
            "IPPool" => pools.extend(Pool::from_document(&o.document).ok()),
            "IPReservation" => cluster
                .reservations
                .extend(reserved_cidrs(&o.document).unwrap_or_default()),
            "Node" => {
                let l = labels(&o.document["metadata"]["labels"]).unwrap_or_default();
                cluster.nodes.insert(r.name, l);
            }
            "Namespace" => {
                let l = labels(&o.document["metadata"]["labels"]).unwrap_or_default();
                cluster.namespaces.insert(r.name, l);
            }
            _ => {}
        }
    }
    // Stored pools were checked for overlaps when applied.
    let _ = cluster.set_pools(pools);
    cluster
}
