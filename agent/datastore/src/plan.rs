//! What every backend does before it writes, apart from the writing:
//! validate the batch (read by [`parse_sources`]) against the stored state,
//! and work out the changes (unchanged documents are not written again).

use std::collections::BTreeMap;

use policy_core::ObjectRef;

use crate::kinds::{document_ref, kind_of_ref};
pub(crate) use crate::sources::{Batch, parse_sources};
use crate::validate::{validate_apply, validate_delete};
use crate::{Revision, Snapshot, StoreChange, StoreError, StoredObject, Written};

/// Validates `batch` against `state` and works out its changes, each at
/// `revision`; `Written.revision` is the state's when nothing changes.
pub(crate) fn plan_apply(
    state: &Snapshot,
    mut batch: Batch,
    revision: Revision,
) -> Result<(Vec<StoreChange>, Written), StoreError> {
    // The CNI plugin's endpoint for a stored Pod is that Pod, annotated.
    batch.loaded = crate::stored_pods::endpoints_onto_pods(state, batch.loaded)
        .map_err(StoreError::Rejected)?;
    validate_apply(state, &batch.loaded).map_err(StoreError::Rejected)?;
    crate::resources::validate(state, &batch.resources).map_err(StoreError::Rejected)?;
    let by_key: BTreeMap<&str, &StoredObject> =
        state.objects.iter().map(|o| (o.key.as_str(), o)).collect();
    let mut written = Written {
        revision: state.revision,
        created: Vec::new(),
        replaced: Vec::new(),
        unchanged: Vec::new(),
        deleted: Vec::new(),
    };
    let mut changes = Vec::new();
    let documents = batch
        .loaded
        .into_iter()
        .map(|l| (l.object.object_ref().kind, l.document))
        .chain(
            batch
                .resources
                .into_iter()
                .map(|r| (r.object.kind, Some(r.document))),
        );
    for (kind, document) in documents {
        // Stored under the document's own kind and name (a WorkloadEndpoint
        // is not stored as its pod).
        let unknown = || StoreError::UnknownKind {
            name: kind.clone(),
            known: known_kinds(),
        };
        let Some(document) = document else {
            return Err(unknown());
        };
        let (info, object) = document_ref(&document).ok_or_else(unknown)?;
        let key = info.key(object.namespace.as_deref(), &object.name);
        match by_key.get(key.as_str()) {
            Some(old) if old.document == document => {
                written.unchanged.push(object);
                continue;
            }
            Some(_) => written.replaced.push(object.clone()),
            None => written.created.push(object.clone()),
        }
        changes.push(StoreChange::Put(StoredObject {
            key,
            object,
            revision,
            document,
        }));
    }
    Ok((changes, written))
}

/// Checks that `objects` are stored and that deleting them leaves a valid
/// cluster; the deletes, each at `revision`.
pub(crate) fn plan_delete(
    state: &Snapshot,
    objects: &[ObjectRef],
    revision: Revision,
) -> Result<(Vec<StoreChange>, Written), StoreError> {
    let mut changes = Vec::new();
    let mut keys = Vec::new();
    for object in objects {
        let key = key_of(object)?;
        if !state.objects.iter().any(|o| o.key == key) {
            // An endpoint that lives on a stored Pod: the Pod loses it.
            if let Some(pod) = crate::stored_pods::pod_releasing_endpoint(state, object) {
                changes.push(StoreChange::Put(StoredObject { revision, ..pod }));
                continue;
            }
            return Err(StoreError::NotFound(object.clone()));
        }
        keys.push(key.clone());
        changes.push(StoreChange::Deleted {
            key,
            object: object.clone(),
            revision,
        });
    }
    validate_delete(state, &keys).map_err(StoreError::Rejected)?;
    let written = Written {
        revision,
        created: Vec::new(),
        replaced: Vec::new(),
        unchanged: Vec::new(),
        deleted: objects.to_vec(),
    };
    Ok((changes, written))
}

fn key_of(object: &ObjectRef) -> Result<String, StoreError> {
    let kind = kind_of_ref(&object.kind).ok_or_else(|| StoreError::UnknownKind {
        name: object.kind.clone(),
        known: known_kinds(),
    })?;
    Ok(kind.key(object.namespace.as_deref(), &object.name))
}

fn known_kinds() -> String {
    crate::KINDS
        .iter()
        .map(|k| k.plural)
        .collect::<Vec<_>>()
        .join(", ")
}
