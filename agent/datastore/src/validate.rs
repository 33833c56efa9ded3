//! The check every backend runs before it writes: the batch, applied to the
//! stored objects, must leave a valid cluster, exactly as the CLI would
//! find it loading the same manifests.

use std::collections::{BTreeMap, BTreeSet};

use policy_core::cluster::{Change, Cluster};
use policy_core::convert::{Object, convert_document_all};
use policy_core::manifest::Loaded;
use policy_core::{Error, ErrorKind, Errors, ObjectRef};

use crate::Snapshot;
use crate::kinds::document_ref;

/// The stored objects as a cluster.
pub(crate) fn stored_cluster(stored: &Snapshot) -> Result<Cluster, Errors> {
    Cluster::from_objects(stored_objects(stored).into_iter().map(|(_, o)| o)).map_err(Errors::from)
}

/// The stored objects that convert, with their keys. A stored document
/// that does not (written around validation, or by another version) is
/// left out, as every agent leaves it out: it must not block writes of
/// other objects, nor its own replacement or deletion.
fn stored_objects(stored: &Snapshot) -> Vec<(&str, Object)> {
    stored
        .objects
        .iter()
        .filter_map(|o| {
            convert_document_all(&o.document)
                .ok()
                .map(|obj| (o.key.as_str(), obj))
        })
        .collect()
}

/// Checks `batch` against `stored`: no object twice in one batch, and the
/// stored objects with the batch applied form a valid cluster (tiers the
/// policies name exist, and so on). Errors carry the document's origin.
/// The batch is read with its documents kept
/// (`parse_source_keeping_documents`): they say where each object is stored.
pub fn validate_apply(stored: &Snapshot, batch: &[Loaded]) -> Result<(), Errors> {
    let mut errors = Errors::new();
    let mut seen: BTreeSet<ObjectRef> = BTreeSet::new();
    for l in batch {
        let r = l.object.object_ref();
        if !seen.insert(r.clone()) {
            errors.push(
                Error::new(ErrorKind::Duplicate(
                    r.clone(),
                    " earlier in this apply".into(),
                ))
                .on(r)
                .from_origin(l.origin.clone()),
            );
        }
    }
    errors.or_ok(())?;
    let objects = stored_objects(stored);
    // One object, one document: a Pod and a WorkloadEndpoint for the same
    // pod (or two endpoints for it) would leave which one counts to the
    // order of their keys.
    let mut errors = Errors::new();
    let held: BTreeMap<ObjectRef, &str> =
        objects.iter().map(|(k, o)| (o.object_ref(), *k)).collect();
    for l in batch {
        let r = l.object.object_ref();
        let key = l
            .document
            .as_ref()
            .and_then(document_ref)
            .map(|(info, d)| info.key(d.namespace.as_deref(), &d.name));
        if let Some(other) = held.get(&r)
            && key.as_deref() != Some(*other)
        {
            errors.push(
                Error::new(ErrorKind::Duplicate(r.clone(), format!(" as {other}")))
                    .on(r)
                    .from_origin(l.origin.clone()),
            );
        }
    }
    errors.or_ok(())?;
    let mut cluster = Cluster::from_objects(objects.into_iter().map(|(_, o)| o))?;
    let changes = batch
        .iter()
        .map(|l| Change::Upsert(l.object.clone()))
        .collect();
    cluster.apply(changes).map(|_| ()).map_err(|e| {
        // Place the error at the document of the object it names.
        let origin = e.object.as_ref().and_then(|r| {
            batch
                .iter()
                .find(|l| &l.object.object_ref() == r)
                .map(|l| l.origin.clone())
        });
        Errors::from(match origin {
            Some(o) if e.origin.is_none() => e.from_origin(o),
            _ => e,
        })
    })
}

/// Checks that deleting the objects stored under `keys` leaves a valid
/// cluster (a tier still named by a policy cannot go). The cluster knows
/// objects by what they are (a WorkloadEndpoint is its pod), so each
/// stored document says which object goes.
pub(crate) fn validate_delete(stored: &Snapshot, keys: &[String]) -> Result<(), Errors> {
    let mut cluster = stored_cluster(stored)?;
    let mut changes = Vec::new();
    for o in stored.objects.iter().filter(|o| keys.contains(&o.key)) {
        // An unreadable document is not in the cluster: nothing to check.
        if let Ok(object) = convert_document_all(&o.document) {
            changes.push(Change::Delete(object.object_ref()));
        }
    }
    cluster.apply(changes).map(|_| ()).map_err(Errors::from)
}
