//! The check every backend runs before it writes: the batch, applied to the
//! stored objects, must leave a valid cluster, exactly as the CLI would
//! find it loading the same manifests.

use std::collections::BTreeSet;

use policy_core::cluster::{Change, Cluster};
use policy_core::convert::convert_document_all;
use policy_core::manifest::Loaded;
use policy_core::{Error, ErrorKind, Errors, ObjectRef};

use crate::Snapshot;

/// The stored objects as a cluster. A stored document that no longer
/// converts (written by another version) is reported, not skipped: the
/// store must not validate against a state it cannot read.
pub(crate) fn stored_cluster(stored: &Snapshot) -> Result<Cluster, Errors> {
    let mut errors = Errors::new();
    let mut objects = Vec::with_capacity(stored.objects.len());
    for o in &stored.objects {
        match convert_document_all(&o.document) {
            Ok(obj) => objects.push(obj),
            Err(es) => {
                for e in es {
                    errors.push(e.on(o.object.clone()));
                }
            }
        }
    }
    errors.or_ok(())?;
    Cluster::from_objects(objects).map_err(Errors::from)
}

/// Checks `batch` against `stored`: no object twice in one batch, and the
/// stored objects with the batch applied form a valid cluster (tiers the
/// policies name exist, and so on). Errors carry the document's origin.
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
    let mut cluster = stored_cluster(stored)?;
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

/// Checks that deleting `refs` leaves a valid cluster (a tier still named
/// by a policy cannot go).
pub(crate) fn validate_delete(stored: &Snapshot, refs: &[ObjectRef]) -> Result<(), Errors> {
    let mut cluster = stored_cluster(stored)?;
    let changes = refs.iter().cloned().map(Change::Delete).collect();
    cluster.apply(changes).map(|_| ()).map_err(Errors::from)
}
