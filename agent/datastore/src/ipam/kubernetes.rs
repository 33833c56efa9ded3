//! IPAM records on the Kubernetes API, as Calico's Kubernetes datastore
//! keeps them: one custom resource per record, compare-and-swap on each
//! object's resourceVersion.
//!
//! | record key | resource (`crd.projectcalico.org/v1`) | name |
//! |---|---|---|
//! | `/calico/ipam/v2/assignment/ipv4/block/10.0.0.0-26` | IPAMBlock | `10-0-0-0-26` |
//! | `/calico/ipam/v2/host/<node>/ipv4/block/10.0.0.0-26` | BlockAffinity (`spec.node`, `spec.cidr`) | `<node>-10-0-0-0-26` |
//! | `/calico/ipam/v2/handle/<id>` | IPAMHandle (`spec.handleID`) | the id |
//! | `/calico/ipam/v2/config` | IPAMConfig | `default` |
//!
//! A name the API would refuse (upper case, `_`) becomes `x-` and a digest
//! of it; the spec keeps what the key needs.
//!
//! The API has no transaction over several objects, so a commit here is
//! not one: it first reads each record it will replace or delete before
//! its last write (for the undo; a stale expectation there stops it with
//! `Conflict`, nothing written); then it writes in the order given, each
//! write conditional on the version it expects, and on a conflict part-way
//! undoes what it wrote (each undo conditional on
//! the object still holding what this commit wrote; what another writer
//! has built on since stays) before saying `Conflict`. Between two writes of a commit other readers see the first
//! without the second, and a process killed there leaves it so: the
//! allocator orders its writes so that every such prefix is a state it
//! repairs (a handle counts an address before its block holds it; a block
//! names its host before the affinity confirms it), as Calico's allocator
//! does on this datastore. A record's revision is its resourceVersion,
//! which is a number on every API server backed by etcd.

use std::sync::Arc;

use ipnet::IpNet;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams, Preconditions,
};
use palisade_ipam::store::{
    self as records, CONFIG_KEY, Entry, Expect, IpamStore, StoreError, Write,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::runtime::Runtime;

use crate::kubernetes::KubeClient;

/// Which custom resource holds a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Block,
    Affinity,
    Handle,
    Config,
}

const KINDS: [Kind; 4] = [Kind::Block, Kind::Affinity, Kind::Handle, Kind::Config];

impl Kind {
    fn resource(self) -> ApiResource {
        let (plural, kind) = IPAM_RESOURCES[self as usize];
        ApiResource {
            group: "crd.projectcalico.org".into(),
            version: "v1".into(),
            api_version: "crd.projectcalico.org/v1".into(),
            kind: kind.into(),
            plural: plural.into(),
        }
    }

    /// The key prefix its records live under.
    fn prefix(self) -> String {
        match self {
            Kind::Block => records::blocks_prefix(None),
            Kind::Affinity => records::affinities_prefix(),
            Kind::Handle => records::handles_prefix(),
            Kind::Config => CONFIG_KEY.to_string(),
        }
    }
}

/// The resources this store reads and writes (`plural` and kind, for RBAC
/// and CRDs), in [`Kind`] order.
pub const IPAM_RESOURCES: [(&str, &str); 4] = [
    ("ipamblocks", "IPAMBlock"),
    ("blockaffinities", "BlockAffinity"),
    ("ipamhandles", "IPAMHandle"),
    ("ipamconfigs", "IPAMConfig"),
];

/// The calls this store makes, on each of [`IPAM_RESOURCES`].
pub const IPAM_VERBS: [&str; 5] = ["get", "list", "create", "update", "delete"];

/// A record's place in the API.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Place {
    kind: Kind,
    name: String,
    /// Fields the record's key puts into the spec (and reading takes out).
    key_fields: Vec<(&'static str, Value)>,
}

/// `10.0.0.0/26` → `10-0-0-0-26`, Calico's name for a CIDR.
fn cidr_name(cidr: &IpNet) -> String {
    cidr.to_string().replace(['.', ':', '/'], "-")
}

/// A DNS subdomain (what the API takes as a cluster-scoped name).
fn dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `wanted` when the API takes it as a name, else `x-` and a digest of it
/// (the record's spec keeps what its key needs).
fn api_name(wanted: &str) -> String {
    if dns_name(wanted) {
        return wanted.to_string();
    }
    let digest = Sha256::digest(wanted.as_bytes());
    let hex: String = digest.iter().take(20).map(|b| format!("{b:02x}")).collect();
    format!("x-{hex}")
}

fn place(key: &str) -> Result<Place, StoreError> {
    let unknown = || {
        StoreError::Unavailable(format!(
            "{key} is no IPAM record the Kubernetes datastore keeps"
        ))
    };
    if key == CONFIG_KEY {
        return Ok(Place {
            kind: Kind::Config,
            name: "default".into(),
            key_fields: Vec::new(),
        });
    }
    if let Some((host, cidr)) = records::parse_affinity_key(key) {
        return Ok(Place {
            kind: Kind::Affinity,
            name: api_name(&format!("{host}-{}", cidr_name(&cidr))),
            key_fields: vec![("node", json!(host)), ("cidr", json!(cidr.to_string()))],
        });
    }
    if let Some(id) = key.strip_prefix(&records::handles_prefix()) {
        return Ok(Place {
            kind: Kind::Handle,
            name: api_name(id),
            key_fields: vec![("handleID", json!(id))],
        });
    }
    let segment = key
        .strip_prefix(&records::blocks_prefix(None))
        .and_then(|rest| rest.rsplit_once("/block/"))
        .map(|(_, s)| s)
        .ok_or_else(unknown)?;
    let cidr = records::parse_cidr_segment(segment).ok_or_else(unknown)?;
    Ok(Place {
        kind: Kind::Block,
        name: cidr_name(&cidr),
        key_fields: Vec::new(),
    })
}

/// The key and entry an object stands for.
fn entry_of(kind: Kind, object: &DynamicObject) -> Result<Entry, StoreError> {
    let name = object.metadata.name.clone().unwrap_or_default();
    let corrupt = |message: String| StoreError::Corrupt {
        key: format!("{} {name}", kind.resource().plural),
        message,
    };
    let mut spec = object
        .data
        .get("spec")
        .cloned()
        .unwrap_or_else(|| json!({}));
    from_crd(kind, &mut spec);
    let text = |v: Option<Value>, field: &str| {
        v.and_then(|v| v.as_str().map(str::to_string))
            .ok_or_else(|| corrupt(format!("spec.{field} is missing")))
    };
    let key = match kind {
        Kind::Config => CONFIG_KEY.to_string(),
        Kind::Handle => records::handle_key(&text(take(&mut spec, "handleID"), "handleID")?),
        Kind::Affinity => {
            let node = text(take(&mut spec, "node"), "node")?;
            let cidr: IpNet = text(take(&mut spec, "cidr"), "cidr")?
                .parse()
                .map_err(|e| corrupt(format!("spec.cidr: {e}")))?;
            records::affinity_key(&node, &cidr)
        }
        Kind::Block => {
            let cidr: IpNet = spec["cidr"]
                .as_str()
                .ok_or_else(|| corrupt("spec.cidr is missing".into()))?
                .parse()
                .map_err(|e| corrupt(format!("spec.cidr: {e}")))?;
            records::block_key(&cidr)
        }
    };
    let revision = object
        .metadata
        .resource_version
        .as_deref()
        .unwrap_or_default()
        .parse()
        .map_err(|_| {
            corrupt(format!(
                "resourceVersion {:?} is not a number",
                object.metadata.resource_version
            ))
        })?;
    let value = serde_json::to_vec(&spec).map_err(|e| corrupt(e.to_string()))?;
    Ok(Entry {
        key,
        value,
        revision,
    })
}

/// The IPAMConfig fields: etcd's names (what the records hold) and the
/// custom resource's.
const CONFIG_FIELDS: [(&str, &str); 2] = [
    ("strict_affinity", "strictAffinity"),
    ("auto_allocate_blocks", "autoAllocateBlocks"),
];

/// A record's value (Calico's etcd form) as its custom resource's spec
/// (Calico's CRD schemas): IPAMConfig's field names, BlockAffinity's
/// `deleted` as a string, IPAMBlock's required `strictAffinity`.
fn to_crd(kind: Kind, spec: &mut Value) {
    let Some(m) = spec.as_object_mut() else {
        return;
    };
    match kind {
        Kind::Config => {
            for (etcd, crd) in CONFIG_FIELDS {
                if let Some(v) = m.remove(etcd) {
                    m.insert(crd.into(), v);
                }
            }
        }
        Kind::Affinity => {
            if let Some(b) = m.get("deleted").and_then(Value::as_bool) {
                m.insert("deleted".into(), json!(b.to_string()));
            }
        }
        Kind::Block => {
            m.entry("strictAffinity").or_insert(json!(false));
        }
        Kind::Handle => {}
    }
}

/// The inverse of [`to_crd`].
fn from_crd(kind: Kind, spec: &mut Value) {
    let Some(m) = spec.as_object_mut() else {
        return;
    };
    match kind {
        Kind::Config => {
            for (etcd, crd) in CONFIG_FIELDS {
                if let Some(v) = m.remove(crd) {
                    m.insert(etcd.into(), v);
                }
            }
        }
        Kind::Affinity => {
            if let Some(text) = m.get("deleted").and_then(Value::as_str) {
                let deleted = text == "true";
                m.insert("deleted".into(), json!(deleted));
            }
        }
        Kind::Block => {
            m.remove("strictAffinity");
        }
        Kind::Handle => {}
    }
}

fn take(spec: &mut Value, field: &str) -> Option<Value> {
    spec.as_object_mut().and_then(|m| m.remove(field))
}

/// The object that stores `value` at `place`.
fn object_for(
    place: &Place,
    value: &[u8],
    revision: Option<u64>,
) -> Result<DynamicObject, StoreError> {
    let mut spec: Value = serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        key: place.name.clone(),
        message: format!("an IPAM record is JSON here: {e}"),
    })?;
    for (field, v) in &place.key_fields {
        if let Some(m) = spec.as_object_mut() {
            m.insert((*field).to_string(), v.clone());
        }
    }
    to_crd(place.kind, &mut spec);
    let mut object =
        DynamicObject::new(&place.name, &place.kind.resource()).data(json!({ "spec": spec }));
    object.metadata.resource_version = revision.map(|r| r.to_string());
    Ok(object)
}

/// What undoes one applied write.
enum Undo {
    /// Delete what this commit created (it holds `value` at `revision`).
    Remove { place: Place, value: Vec<u8> },
    /// Put back what this commit replaced.
    Restore {
        place: Place,
        old: Vec<u8>,
        value: Vec<u8>,
    },
    /// Create again what this commit deleted.
    Recreate { place: Place, old: Vec<u8> },
}

/// IPAM records on a Kubernetes API server (see the module documentation).
pub struct KubeIpamStore {
    runtime: Arc<Runtime>,
    client: kube::Client,
}

impl std::fmt::Debug for KubeIpamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeIpamStore").finish_non_exhaustive()
    }
}

fn api_error(e: kube::Error) -> StoreError {
    StoreError::Unavailable(format!("Kubernetes API: {e}"))
}

/// The status code of an API error answer.
fn code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Attempts of an undo whose object another writer touched without
/// changing (its version moved, its content is still this commit's).
const UNDO_ATTEMPTS: usize = 32;

impl KubeIpamStore {
    /// Connects (the client is made on this store's runtime).
    pub fn connect(client: KubeClient) -> Result<Self, StoreError> {
        // Driven by the callers' block_on (several threads take turns), as
        // the etcd stores' runtimes are.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("starting a runtime: {e}")))?;
        let client = runtime.block_on(async {
            match client {
                KubeClient::Custom(make) => Ok(make()),
                KubeClient::Infer => kube::Client::try_default().await.map_err(api_error),
                KubeClient::Kubeconfig(path) => crate::kubernetes::client_from(&path)
                    .await
                    .map_err(StoreError::Unavailable),
            }
        })?;
        Ok(Self {
            runtime: Arc::new(runtime),
            client,
        })
    }

    fn api(&self, kind: Kind) -> Api<DynamicObject> {
        Api::all_with(self.client.clone(), &kind.resource())
    }

    fn fetch(&self, place: &Place) -> Result<Option<Entry>, StoreError> {
        let api = self.api(place.kind);
        let got = self
            .runtime
            .block_on(api.get_opt(&place.name))
            .map_err(api_error)?;
        got.map(|o| entry_of(place.kind, &o)).transpose()
    }

    /// One write, conditional on what it expects: the version it made (0
    /// for a delete), `None` on a conflict.
    fn write_one(
        &self,
        place: &Place,
        value: Option<&[u8]>,
        expect: Expect,
    ) -> Result<Option<u64>, StoreError> {
        let api = self.api(place.kind);
        let outcome = match (value, expect) {
            (_, Expect::At(0)) => return Ok(None),
            (Some(value), Expect::Absent) => {
                let object = object_for(place, value, None)?;
                self.runtime
                    .block_on(api.create(&PostParams::default(), &object))
                    .map(Some)
            }
            (Some(value), Expect::At(revision)) => {
                let object = object_for(place, value, Some(revision))?;
                self.runtime
                    .block_on(api.replace(&place.name, &PostParams::default(), &object))
                    .map(Some)
            }
            (None, Expect::At(revision)) => {
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        resource_version: Some(revision.to_string()),
                        uid: None,
                    }),
                    ..DeleteParams::default()
                };
                self.runtime
                    .block_on(api.delete(&place.name, &params))
                    .map(|_| None)
            }
            (None, Expect::Absent) => return Ok(None),
        };
        match outcome {
            Ok(Some(object)) => Ok(Some(entry_of(place.kind, &object)?.revision)),
            Ok(None) => Ok(Some(0)),
            Err(e) if matches!(code(&e), Some(409 | 404)) => Ok(None),
            Err(e) => Err(api_error(e)),
        }
    }

    /// Undoes one write; false when the object moved on under another
    /// writer (then it stays as that writer left it).
    fn undo(&self, undo: &Undo) -> Result<bool, StoreError> {
        for _ in 0..UNDO_ATTEMPTS {
            let (place, ours) = match undo {
                Undo::Remove { place, value, .. } | Undo::Restore { place, value, .. } => {
                    (place, Some(value))
                }
                Undo::Recreate { place, .. } => (place, None),
            };
            let now = self.fetch(place)?;
            let revision = match (ours, &now) {
                // Still this commit's content (at our version, or rewritten
                // unchanged by another writer).
                (Some(v), Some(e)) if same_json(&e.value, v) => e.revision,
                (None, None) => 0,
                _ => return Ok(false),
            };
            let done = match undo {
                Undo::Remove { place, .. } => self.write_one(place, None, Expect::At(revision))?,
                Undo::Restore { place, old, .. } => {
                    self.write_one(place, Some(old), Expect::At(revision))?
                }
                Undo::Recreate { place, old } => {
                    self.write_one(place, Some(old), Expect::Absent)?
                }
            };
            if done.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

fn same_json(a: &[u8], b: &[u8]) -> bool {
    serde_json::from_slice::<Value>(a).ok() == serde_json::from_slice::<Value>(b).ok()
}

impl IpamStore for KubeIpamStore {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        self.fetch(&place(key)?)
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        for kind in KINDS {
            let under = kind.prefix();
            if !(under.starts_with(prefix) || prefix.starts_with(&under)) {
                continue;
            }
            let api = self.api(kind);
            let mut params = ListParams::default().limit(500);
            loop {
                let page = self
                    .runtime
                    .block_on(api.list(&params))
                    .map_err(api_error)?;
                for object in &page.items {
                    let entry = entry_of(kind, object)?;
                    if entry.key.starts_with(prefix) {
                        out.push(entry);
                    }
                }
                match page.metadata.continue_.filter(|c| !c.is_empty()) {
                    Some(token) => params = ListParams::default().limit(500).continue_token(&token),
                    None => break,
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn commit(&self, writes: &[Write]) -> Result<(), StoreError> {
        let conflict = |key: &str| StoreError::Conflict {
            key: key.to_string(),
        };
        let places: Vec<Place> = writes
            .iter()
            .map(|w| place(w.key()))
            .collect::<Result<_, _>>()?;
        // The old value of a record replaced or deleted before the last
        // write is read first (the undo puts it back; a stale expectation
        // stops the commit before anything is written). A create needs no
        // old value, and the last write no undo.
        let mut before: Vec<Option<Entry>> = vec![None; writes.len()];
        let last = writes.len().saturating_sub(1);
        for (((w, p), slot), _) in writes.iter().zip(&places).zip(&mut before).zip(0..last) {
            let creates = matches!(
                w,
                Write::Put {
                    expect: Expect::Absent,
                    ..
                }
            );
            if creates {
                continue;
            }
            let have = self.fetch(p)?;
            if !super::holds(w, have.as_ref().map(|e| e.revision)) {
                return Err(conflict(w.key()));
            }
            *slot = have;
        }
        let mut applied: Vec<Undo> = Vec::new();
        for ((w, p), old) in writes.iter().zip(&places).zip(before) {
            let (value, expect) = match w {
                Write::Put { value, expect, .. } => (Some(value.as_slice()), *expect),
                Write::Delete { revision, .. } => (None, Expect::At(*revision)),
            };
            let landed = self.write_one(p, value, expect)?;
            if landed.is_none() {
                for undo in applied.iter().rev() {
                    if !self.undo(undo)? {
                        // Another writer built on it (an address taken in
                        // a block this commit claimed): it stays, a state
                        // the allocator repairs when it reads again.
                        tracing::info!(
                            key = w.key(),
                            "IPAM commit conflicted part-way; what it wrote is in use and stays"
                        );
                        break;
                    }
                }
                return Err(conflict(w.key()));
            }
            applied.push(match (value, old) {
                (Some(value), None) => Undo::Remove {
                    place: p.clone(),
                    value: value.to_vec(),
                },
                (Some(value), Some(old)) => Undo::Restore {
                    place: p.clone(),
                    old: old.value,
                    value: value.to_vec(),
                },
                (None, old) => Undo::Recreate {
                    place: p.clone(),
                    old: old.map(|e| e.value).unwrap_or_default(),
                },
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec properties and required fields of Calico's IPAM custom
    /// resources, transcribed from Calico's `kdd-crds.yaml`
    /// (crd.projectcalico.org ipamblocks, ipamconfigs, ipamhandles,
    /// blockaffinities; `affinityClaimTime` from Calico 3.26 on).
    type Schema = (Kind, &'static [&'static str], &'static [&'static str]);
    const CALICO_SCHEMAS: [Schema; 4] = [
        (
            Kind::Block,
            &[
                "affinity",
                "affinityClaimTime",
                "allocations",
                "attributes",
                "cidr",
                "deleted",
                "sequenceNumber",
                "sequenceNumberForAllocation",
                "strictAffinity",
                "unallocated",
            ],
            &[
                "allocations",
                "attributes",
                "cidr",
                "strictAffinity",
                "unallocated",
            ],
        ),
        (
            Kind::Config,
            &["autoAllocateBlocks", "maxBlocksPerHost", "strictAffinity"],
            &["autoAllocateBlocks", "strictAffinity"],
        ),
        (
            Kind::Handle,
            &["block", "deleted", "handleID"],
            &["block", "handleID"],
        ),
        (
            Kind::Affinity,
            &["cidr", "deleted", "node", "state"],
            &["cidr", "deleted", "node", "state"],
        ),
    ];

    /// What this store writes is what Calico's CRDs keep (a field they do
    /// not know would be pruned), with every field they require, and reads
    /// back as it was written.
    #[test]
    fn specs_fit_calicos_crd_schemas_and_read_back_unchanged() {
        let cidr: IpNet = "10.0.0.0/26".parse().unwrap();
        let mut block = palisade_ipam::block::Block::new(cidr, 7, None);
        block.affinity = Some("host:node-a".into());
        block.affinity_claimed_at = Some(1_800_000_000);
        let config = serde_json::to_vec(&palisade_ipam::Config::default()).unwrap();
        let records: [(String, Vec<u8>); 4] = [
            (records::block_key(&cidr), block.to_json()),
            (CONFIG_KEY.into(), config),
            (
                records::handle_key("pod-a"),
                br#"{"block":{"10.0.0.0/26":1},"deleted":false}"#.to_vec(),
            ),
            (
                records::affinity_key("node-a", &cidr),
                br#"{"state":"confirmed","deleted":false}"#.to_vec(),
            ),
        ];
        for (key, value) in records {
            let p = place(&key).unwrap();
            let object = object_for(&p, &value, Some(3)).unwrap();
            let spec = object.data["spec"].as_object().unwrap();
            let (_, known, required) = CALICO_SCHEMAS
                .iter()
                .find(|(k, _, _)| *k == p.kind)
                .unwrap();
            for field in spec.keys() {
                assert!(
                    known.contains(&field.as_str()),
                    "{key}: {field} is not in Calico's schema"
                );
            }
            for field in *required {
                assert!(spec.contains_key(*field), "{key}: Calico requires {field}");
            }
            let entry = entry_of(p.kind, &object).unwrap();
            assert_eq!(entry.key, key);
            assert!(
                same_json(&entry.value, &value),
                "{key} reads back as written"
            );
        }
    }

    #[test]
    fn keys_map_to_calicos_resource_names_and_back() {
        let cidr: IpNet = "10.0.0.0/26".parse().unwrap();
        let block = place(&records::block_key(&cidr)).unwrap();
        assert_eq!(
            (block.kind, block.name.as_str()),
            (Kind::Block, "10-0-0-0-26")
        );
        let affinity = place(&records::affinity_key("node-a", &cidr)).unwrap();
        assert_eq!(affinity.name, "node-a-10-0-0-0-26");
        let handle = place(&records::handle_key("k8s-pod-network.abc123")).unwrap();
        assert_eq!(handle.name, "k8s-pod-network.abc123");
        let odd = place(&records::handle_key("Pod_A")).unwrap();
        assert!(
            odd.name.starts_with("x-") && dns_name(&odd.name),
            "{}",
            odd.name
        );
        assert_eq!(place(CONFIG_KEY).unwrap().name, "default");
        assert!(place("/t/a").is_err());

        // The key comes back from the object's spec.
        let object = object_for(
            &affinity,
            br#"{"state":"confirmed","deleted":false}"#,
            Some(7),
        )
        .unwrap();
        assert_eq!(
            object.data["spec"]["deleted"], "false",
            "a string, as Calico's CRD has it"
        );
        let entry = entry_of(Kind::Affinity, &object).unwrap();
        assert_eq!(entry.key, records::affinity_key("node-a", &cidr));
        assert_eq!(entry.revision, 7);
        assert!(same_json(
            &entry.value,
            br#"{"state":"confirmed","deleted":false}"#
        ));
    }
}
