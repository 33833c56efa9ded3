//! Reading manifest sources into what a backend writes: the objects the
//! policy engine reads, with their documents, and the kinds stored for
//! IPAM. Kinds no datastore holds are errors.

use policy_core::manifest::{Loaded, parse_source_keeping_documents};

use crate::StoreError;
use crate::kinds::document_ref;
use crate::resources::Resource;

/// What one apply writes: objects the policy engine reads, and documents
/// of the kinds stored for IPAM.
#[derive(Debug, Clone, Default)]
pub(crate) struct Batch {
    pub loaded: Vec<Loaded>,
    pub resources: Vec<Resource>,
}

/// Reads manifest sources (name, text) keeping each object's document;
/// kinds no datastore holds are errors.
pub(crate) fn parse_sources(sources: &[(String, String)]) -> Result<Batch, StoreError> {
    let mut loaded = Vec::new();
    let mut resources = Vec::new();
    let mut errors = policy_core::Errors::new();
    for (source, text) in sources {
        match parse_source_keeping_documents(source, text) {
            Ok(parsed) => {
                for s in parsed.skipped {
                    if let Some(doc) = &s.document
                        && let Some((info, object)) = document_ref(doc)
                        && !info.policy
                    {
                        resources.push(Resource {
                            origin: s.origin,
                            info,
                            object,
                            document: doc.clone(),
                        });
                        continue;
                    }
                    errors.push(
                        policy_core::Error::new(policy_core::ErrorKind::Unsupported(format!(
                            "kind {} ({}) is not something Palisade stores; known kinds: {}",
                            s.kind,
                            s.api_version,
                            crate::KINDS
                                .iter()
                                .map(|k| k.plural)
                                .collect::<Vec<_>>()
                                .join(", ")
                        )))
                        .from_origin(s.origin),
                    );
                }
                loaded.extend(parsed.objects);
            }
            Err(es) => {
                for e in es {
                    errors.push(e);
                }
            }
        }
    }
    errors.or_ok(()).map_err(StoreError::Rejected)?;
    Ok(Batch { loaded, resources })
}
