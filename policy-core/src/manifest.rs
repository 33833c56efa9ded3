//! Manifest parsing: multi-document YAML, JSON, `kind: List` documents. Pure:
//! the caller reads files and passes their text with a source name.
//!
//! A load is all or nothing: [`parse_manifests`] returns every object or the
//! first error, and [`ManifestSet`] rejects duplicates across sources.

use std::collections::BTreeMap;

use crate::convert::{Object, convert_document};
use crate::error::{Error, ErrorKind, ObjectRef, Origin};

/// An object with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// Source and document index.
    pub origin: Origin,
    /// The object.
    pub object: Object,
}

/// Splits a text into JSON documents. JSON input (starting with `{` or `[`)
/// is parsed as JSON for precise errors; anything else as YAML.
pub fn split_documents(source: &str, text: &str) -> Result<Vec<serde_json::Value>, Error> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let mut out = Vec::new();
        let stream = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
        for (i, v) in stream.enumerate() {
            let v = v.map_err(|e| {
                Error::new(ErrorKind::Syntax {
                    format: "JSON",
                    message: e.to_string(),
                })
                .from_origin(Origin {
                    source: source.to_string(),
                    document: i + 1,
                })
            })?;
            match v {
                serde_json::Value::Array(items) => out.extend(items),
                other => out.push(other),
            }
        }
        return Ok(out);
    }
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let origin = Origin {
            source: source.to_string(),
            document: i + 1,
        };
        let value: serde_json::Value = serde::Deserialize::deserialize(doc).map_err(|e| {
            Error::new(ErrorKind::Syntax {
                format: "YAML",
                message: e.to_string(),
            })
            .from_origin(origin.clone())
        })?;
        // Empty documents (a trailing `---`) are not objects.
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// Parses every object in a text. Documents of kind `List` (or `*List`) are
/// expanded into their items.
pub fn parse_manifests(source: &str, text: &str) -> Result<Vec<Loaded>, Error> {
    let docs = split_documents(source, text)?;
    let mut out = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        let origin = Origin {
            source: source.to_string(),
            document: i + 1,
        };
        if !doc.is_object() {
            return Err(Error::new(ErrorKind::Invalid(format!(
                "a manifest document must be an object, found {}",
                json_type(&doc)
            )))
            .from_origin(origin));
        }
        let kind = doc.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        if kind == "List" || (kind.ends_with("List") && doc.get("items").is_some()) {
            let items = doc
                .get("items")
                .and_then(|i| i.as_array())
                .cloned()
                .unwrap_or_default();
            for (j, item) in items.iter().enumerate() {
                let object = convert_document(item)
                    .map_err(|e| e.at(format!("items[{j}]")).from_origin(origin.clone()))?;
                out.push(Loaded {
                    origin: origin.clone(),
                    object,
                });
            }
            continue;
        }
        let object = convert_document(&doc).map_err(|e| e.from_origin(origin.clone()))?;
        out.push(Loaded { origin, object });
    }
    Ok(out)
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A set of loaded objects with duplicate detection across sources.
#[derive(Debug, Default, Clone)]
pub struct ManifestSet {
    objects: Vec<Loaded>,
    seen: BTreeMap<ObjectRef, Origin>,
}

impl ManifestSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the objects of one source; on error nothing from it is added.
    pub fn add_source(&mut self, source: &str, text: &str) -> Result<usize, Error> {
        let loaded = parse_manifests(source, text)?;
        self.add_all(loaded)
    }

    /// Adds objects; a duplicate (same kind, namespace, name) is an error
    /// naming both places, and nothing from `loaded` is added.
    pub fn add_all(&mut self, loaded: Vec<Loaded>) -> Result<usize, Error> {
        let mut batch: BTreeMap<ObjectRef, Origin> = BTreeMap::new();
        for l in &loaded {
            let r = l.object.object_ref();
            if let Some(first) = self.seen.get(&r).or_else(|| batch.get(&r)) {
                return Err(
                    Error::new(ErrorKind::Duplicate(r.clone(), format!(" at {first}")))
                        .on(r)
                        .from_origin(l.origin.clone()),
                );
            }
            batch.insert(r, l.origin.clone());
        }
        let n = loaded.len();
        self.seen.extend(batch);
        self.objects.extend(loaded);
        Ok(n)
    }

    /// The objects, in load order.
    pub fn objects(&self) -> &[Loaded] {
        &self.objects
    }

    /// Consumes the set.
    pub fn into_objects(self) -> Vec<Loaded> {
        self.objects
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_yaml_with_origin() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: b\n---\n";
        let objs = parse_manifests("ns.yaml", text).unwrap();
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[1].origin.document, 2);
    }

    #[test]
    fn malformed_yaml() {
        let e = parse_manifests("bad.yaml", "kind: [unclosed\n").unwrap_err();
        assert!(matches!(e.kind, ErrorKind::Syntax { .. }), "{e}");
        assert_eq!(e.origin.as_ref().unwrap().source, "bad.yaml");
    }

    #[test]
    fn duplicates_across_sources() {
        let mut set = ManifestSet::new();
        let ns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n";
        set.add_source("one.yaml", ns).unwrap();
        let e = set.add_source("two.yaml", ns).unwrap_err();
        assert!(matches!(e.kind, ErrorKind::Duplicate(..)), "{e}");
        assert!(e.to_string().contains("one.yaml"), "{e}");
        assert_eq!(set.objects().len(), 1);
    }
}
