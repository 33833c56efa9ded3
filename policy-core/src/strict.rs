//! Strict field validation, as `kubectl apply --validate=strict` does it:
//! every field of a document must be one the target type knows, at any depth.
//!
//! k8s-openapi's types (and serde's derive without `deny_unknown_fields`)
//! skip fields they do not know, so a misspelt `podSelecter` silently
//! vanishes. Every struct type still tells its deserializer which fields it
//! has (`deserialize_struct(name, FIELDS, ..)`); the deserializer here, over a
//! JSON value, checks each object's keys against that list, records the
//! strangers with their path and the known names, and hands the type only the
//! fields it knows. One pass therefore finds every unknown field of a
//! document, and the known-field lists come from the very types that read the
//! values, so they cannot drift from them.

use std::cell::RefCell;

use serde::de::value::BorrowedStrDeserializer;
use serde::de::{self, DeserializeOwned, DeserializeSeed, Deserializer, MapAccess, SeqAccess};
use serde_json::Value;

/// A field the type at its place does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UnknownField {
    /// Path of the field itself, e.g. `spec.ingress[0].from[0].podSelecter`.
    pub path: String,
    /// The field name as written.
    pub name: String,
    /// The type (struct) name that was expected there, e.g. `NetworkPolicyPeer`.
    pub parent: &'static str,
    /// The fields that type has.
    pub known: &'static [&'static str],
}

/// What went wrong reading a document into a type.
#[derive(Debug)]
pub(crate) struct Failure {
    /// Unknown fields, in document order.
    pub unknown: Vec<UnknownField>,
    /// The first value the type rejected, with its path (`.` for the root).
    pub invalid: Option<(String, String)>,
}

/// Reads `value` as `T`, rejecting unknown fields anywhere in it.
pub(crate) fn from_value<T: DeserializeOwned>(value: &Value) -> Result<T, Failure> {
    let sink = RefCell::new(Vec::new());
    let result = serde_path_to_error::deserialize::<_, T>(Strict {
        value,
        path: String::new(),
        sink: &sink,
    });
    let unknown = sink.into_inner();
    match result {
        Ok(v) if unknown.is_empty() => Ok(v),
        Ok(_) => Err(Failure {
            unknown,
            invalid: None,
        }),
        Err(e) => {
            let path = e.path().to_string();
            Err(Failure {
                unknown,
                invalid: Some((path, e.into_inner().to_string())),
            })
        }
    }
}

struct Strict<'a, 's> {
    value: &'a Value,
    path: String,
    sink: &'s RefCell<Vec<UnknownField>>,
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl<'a, 's> Strict<'a, 's> {
    fn map(
        self,
        map: &'a serde_json::Map<String, Value>,
        known: Option<(&'static str, &'static [&'static str])>,
    ) -> StrictMap<'a, 's> {
        StrictMap {
            iter: map.iter(),
            known,
            value: None,
            path: self.path,
            sink: self.sink,
        }
    }
}

macro_rules! delegate {
    ($($method:ident)*) => {
        $(
            fn $method<V: de::Visitor<'a>>(self, visitor: V) -> Result<V::Value, Self::Error> {
                self.value.$method(visitor)
            }
        )*
    };
}

impl<'a> Deserializer<'a> for Strict<'a, '_> {
    type Error = serde_json::Error;

    fn deserialize_any<V: de::Visitor<'a>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.value {
            Value::Object(m) => visitor.visit_map(self.map(m, None)),
            Value::Array(a) => visitor.visit_seq(self.seq(a)),
            v => v.deserialize_any(visitor),
        }
    }

    fn deserialize_option<V: de::Visitor<'a>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: de::Visitor<'a>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_struct<V: de::Visitor<'a>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        let Value::Object(m) = self.value else {
            return self.value.deserialize_struct(name, fields, visitor);
        };
        visitor.visit_map(self.map(m, Some((name, fields))))
    }

    fn deserialize_map<V: de::Visitor<'a>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.value {
            Value::Object(m) => visitor.visit_map(self.map(m, None)),
            v => v.deserialize_map(visitor),
        }
    }

    fn deserialize_seq<V: de::Visitor<'a>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.value {
            Value::Array(a) => visitor.visit_seq(self.seq(a)),
            v => v.deserialize_seq(visitor),
        }
    }

    fn deserialize_tuple<V: de::Visitor<'a>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: de::Visitor<'a>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_unit_struct<V: de::Visitor<'a>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.value.deserialize_unit_struct(name, visitor)
    }

    /// Enums are read as serde_json reads them: the only ones in the types
    /// read here are unit variants written as strings.
    fn deserialize_enum<V: de::Visitor<'a>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.value.deserialize_enum(name, variants, visitor)
    }

    fn deserialize_ignored_any<V: de::Visitor<'a>>(
        self,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_unit()
    }

    delegate! {
        deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64
        deserialize_u128 deserialize_f32 deserialize_f64 deserialize_char deserialize_str
        deserialize_string deserialize_bytes deserialize_byte_buf deserialize_unit
        deserialize_identifier
    }
}

impl<'a, 's> Strict<'a, 's> {
    fn seq(self, items: &'a [Value]) -> StrictSeq<'a, 's> {
        StrictSeq {
            iter: items.iter().enumerate(),
            path: self.path,
            sink: self.sink,
        }
    }
}

struct StrictMap<'a, 's> {
    iter: serde_json::map::Iter<'a>,
    /// For a struct: its name and fields.
    known: Option<(&'static str, &'static [&'static str])>,
    value: Option<(&'a str, &'a Value)>,
    path: String,
    sink: &'s RefCell<Vec<UnknownField>>,
}

impl<'a> MapAccess<'a> for StrictMap<'a, '_> {
    type Error = serde_json::Error;

    fn next_key_seed<K: DeserializeSeed<'a>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        for (k, v) in self.iter.by_ref() {
            if let Some((parent, known)) = self.known
                && !known.contains(&k.as_str())
            {
                self.sink.borrow_mut().push(UnknownField {
                    path: child(&self.path, k),
                    name: k.clone(),
                    parent,
                    known,
                });
                continue;
            }
            self.value = Some((k, v));
            return seed
                .deserialize(BorrowedStrDeserializer::new(k.as_str()))
                .map(Some);
        }
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'a>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        let Some((k, v)) = self.value.take() else {
            return Err(de::Error::custom("value asked for before its key"));
        };
        seed.deserialize(Strict {
            value: v,
            path: child(&self.path, k),
            sink: self.sink,
        })
    }
}

struct StrictSeq<'a, 's> {
    iter: std::iter::Enumerate<std::slice::Iter<'a, Value>>,
    path: String,
    sink: &'s RefCell<Vec<UnknownField>>,
}

impl<'a> SeqAccess<'a> for StrictSeq<'a, '_> {
    type Error = serde_json::Error;

    fn next_element_seed<T: DeserializeSeed<'a>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Self::Error> {
        match self.iter.next() {
            None => Ok(None),
            Some((i, v)) => seed
                .deserialize(Strict {
                    value: v,
                    path: format!("{}[{i}]", self.path),
                    sink: self.sink,
                })
                .map(Some),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use serde_json::json;

    fn unknown<T: DeserializeOwned>(v: Value) -> Vec<(String, &'static str)> {
        match from_value::<T>(&v) {
            Ok(_) => Vec::new(),
            Err(f) => {
                assert_eq!(f.invalid, None);
                f.unknown.into_iter().map(|u| (u.path, u.parent)).collect()
            }
        }
    }

    #[test]
    fn unknown_fields_at_every_depth_in_document_order() {
        let found = unknown::<NetworkPolicy>(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "x", "lables": {"a": "b"}},
            "spec": {
                "podSelector": {"matchLabel": {"app": "db"}},
                "ingres": [],
                "ingress": [{"from": [{"podSelecter": {}}], "action": "Allow"}]
            }
        }));
        assert_eq!(
            found,
            vec![
                ("metadata.lables".to_string(), "ObjectMeta"),
                ("spec.podSelector.matchLabel".to_string(), "LabelSelector"),
                ("spec.ingres".to_string(), "NetworkPolicySpec"),
                (
                    "spec.ingress[0].from[0].podSelecter".to_string(),
                    "NetworkPolicyPeer"
                ),
                (
                    "spec.ingress[0].action".to_string(),
                    "NetworkPolicyIngressRule"
                ),
            ]
        );
    }

    #[test]
    fn known_documents_read_as_before() {
        let v = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "labels": {"app": "web"},
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "c", "image": "i",
                     "ports": [{"containerPort": 80, "name": "http"}],
                     "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}],
                     "nodeName": null},
            "status": {"podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}]}
        });
        let strict: Pod = from_value(&v).unwrap();
        let lax: Pod = serde_json::from_value(v).unwrap();
        assert_eq!(strict, lax);
    }

    #[test]
    fn a_bad_value_is_reported_with_its_path() {
        let f = from_value::<NetworkPolicy>(&json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "p"},
            "spec": {"egres": [], "ingress": [{"ports": [{"port": [1]}]}]}
        }))
        .unwrap_err();
        assert_eq!(f.unknown.len(), 1);
        let (path, _) = f.invalid.unwrap();
        assert_eq!(path, "spec.ingress[0].ports[0].port");
    }
}
